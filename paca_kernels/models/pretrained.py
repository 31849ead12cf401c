"""Loading pretrained weights into a model of another head or cluster count (timm-like).

One function, :func:`load_pretrained`, serves ``create_model(..., pretrained=path)``,
``PaCaViT(pretrained=path)`` and ``PaCaSegmentor.from_name(..., pretrained=path)``:

- every checkpoint tensor whose name and shape fit the model is copied in;
- a model tensor whose checkpoint tensor has another shape (the classifier for another
  ``num_classes``, a clustering head's last conv for another ``downstream_cluster_num``) keeps the
  model's fresh initialisation, and so does a model tensor the checkpoint lacks;
- checkpoint tensors the model has no place for (``head.*`` when loading a ``features_only``
  backbone) are ignored;
- all of it is reported: an INFO log line with the counts, a WARNING naming every re-initialised and
  missing tensor, and the returned :class:`LoadReport`;
- a checkpoint that fits less than half of the model's tensors (another architecture) is a
  ValueError naming the counts, never a model left mostly random; a missing file is
  FileNotFoundError.

Checkpoint layouts understood: a plain state dict, one wrapped under "state_dict" or "model" (the
official releases and most trainers), keys prefixed by ``module.`` (DistributedDataParallel) or
``_orig_mod.`` (a ``torch.compile``-d module), and a segmentation checkpoint whose backbone keys
carry ``backbone.`` (mmseg) when loaded into a plain backbone.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["LoadReport", "load_pretrained", "read_checkpoint"]

_log = logging.getLogger("paca_kernels")

# Wrappers under which trainers store the weights, tried in this order.
_WRAPPER_KEYS = ("state_dict", "model", "model_state", "module")
# Prefixes that wrappers add to every key (DDP, torch.compile); stripped when all keys carry one.
_WHOLE_PREFIXES = ("module.", "_orig_mod.")
# Minimum share of the model's tensors a checkpoint must fill for the load to count as a fit.
MIN_FIT = 0.5


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did. Names are the model's state-dict keys (``ignored``: the
    checkpoint's)."""

    loaded: list[str] = field(default_factory=list)
    #: (name, checkpoint shape, model shape): kept at the model's initialisation.
    reinitialized: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    #: model tensors the checkpoint does not have: kept at the model's initialisation.
    missing: list[str] = field(default_factory=list)
    #: checkpoint tensors with no place in the model.
    ignored: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def model_tensors(self) -> int:
        return len(self.loaded) + len(self.reinitialized) + len(self.missing)

    def summary(self) -> str:
        return (
            f"loaded {len(self.loaded)} of the model's {self.model_tensors} tensors from {self.source}; "
            f"re-initialised {len(self.reinitialized)} (shape differs), {len(self.missing)} not in "
            f"the checkpoint; {len(self.ignored)} checkpoint tensors ignored"
        )


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict (wrappers and whole-dict prefixes
    removed).

    Raises:
        ValueError: ``path`` is True (PaCa-ViT has no download URLs), or the file holds no tensors
            by name.
        TypeError: ``path`` is not a path.
        FileNotFoundError: no such file.
    """
    if isinstance(path, bool):
        # A value error: True means "download" in timm's API, a request this library cannot serve.
        raise ValueError(  # noqa: TRY004
            f"pretrained must be the path of a local checkpoint file, got {path!r} (the official "
            "release publishes no download URLs, so nothing is fetched)"
        )
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"pretrained must be the path of a local checkpoint file, got {path!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained checkpoint {os.fspath(path)!r} does not exist")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    return _flatten(obj, os.fspath(path))


def _flatten(obj: object, source: str) -> dict[str, Tensor]:
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and not isinstance(inner, Tensor):
                obj = inner
                break
    if not isinstance(obj, Mapping):
        # The file's content is wrong, not an argument's type.
        raise ValueError(f"{source}: expected a state dict, found a {type(obj).__name__}")  # noqa: TRY004
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Tensor)}
    if not state:
        raise ValueError(f"{source}: the checkpoint holds no named tensors (keys: {list(obj)[:8]})")
    for prefix in _WHOLE_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _abbreviate(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", and {len(names) - limit} more" if len(names) > limit else "")


def load_pretrained(
    model: nn.Module,
    checkpoint: str | os.PathLike[str] | Mapping[str, Tensor],
    *,
    strict: bool = False,
    source: str | None = None,
) -> LoadReport:
    """Copy every tensor of ``checkpoint`` that fits ``model`` (same name, same shape) into it.

    Args:
        model: the module to fill (its fresh initialisation stays where nothing fits).
        checkpoint: a file path (see :func:`read_checkpoint`) or a state dict.
        strict: require every model tensor to be loaded and every checkpoint tensor to be used
            (``load_state_dict(strict=True)`` semantics, with the report's names in the error).
        source: how to name the checkpoint in messages (default: its path, or "the given state
            dict").

    Returns:
        A :class:`LoadReport`; also logged (INFO: the counts; WARNING: the re-initialised and
        missing tensors by name).

    Raises:
        FileNotFoundError / TypeError / ValueError: as :func:`read_checkpoint`.
        ValueError: fewer than half of the model's tensors fit (another architecture), or
            ``strict`` and anything did not fit.
    """
    if isinstance(checkpoint, Mapping):
        source = source or "the given state dict"
        state = _flatten(checkpoint, source)
    else:
        state = read_checkpoint(checkpoint)
        source = source or repr(os.fspath(checkpoint))
    own = model.state_dict()
    # A segmentation checkpoint (backbone.* / decode_head.*) loaded into a plain backbone.
    if not own.keys() & state.keys() and any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items()}

    report = LoadReport(source=source)
    fitting: dict[str, Tensor] = {}
    for name, target in own.items():
        if name not in state:
            report.missing.append(name)
        elif state[name].shape != target.shape:
            report.reinitialized.append((name, tuple(state[name].shape), tuple(target.shape)))
        else:
            fitting[name] = state[name]
            report.loaded.append(name)
    report.ignored = [k for k in state if k not in own]

    total = report.model_tensors
    if strict and (report.reinitialized or report.missing or report.ignored):
        raise ValueError(
            f"strict load from {source}: {report.summary()}. Re-initialised: "
            f"{_abbreviate([n for n, *_ in report.reinitialized])}; missing: "
            f"{_abbreviate(report.missing)}; ignored: {_abbreviate(report.ignored)}"
        )
    if total and len(report.loaded) < MIN_FIT * total:
        example = _abbreviate(sorted(state), 5)
        raise ValueError(
            f"the checkpoint {source} does not fit this {type(model).__name__}: only "
            f"{len(report.loaded)} of the model's {total} tensors have a checkpoint tensor of the same "
            f"name and shape ({len(report.reinitialized)} differ in shape, {len(report.missing)} are "
            f"absent; the checkpoint has {len(state)} tensors, e.g. {example}). Is it another "
            "architecture?"
        )
    # load_state_dict (not a raw copy_) so that modules' own load hooks run; every key is in `own`.
    model.load_state_dict(fitting, strict=False)
    _log.info("pretrained: %s", report.summary())
    if report.reinitialized:
        _log.warning(
            "pretrained: re-initialised (checkpoint shape -> model shape): %s",
            _abbreviate([f"{n} {list(a)}->{list(b)}" for n, a, b in report.reinitialized]),
        )
    if report.missing:
        _log.warning("pretrained: not in the checkpoint, left at initialisation: %s",
                     _abbreviate(report.missing))
    if report.ignored:
        _log.info("pretrained: checkpoint tensors with no place in the model: %s",
                  _abbreviate(report.ignored))
    return report

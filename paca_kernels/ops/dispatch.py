"""The one place that chooses which backend runs a PaCa op call.

A backend is a named implementation of some of the ops (``cluster_pool``, ``p2c_attention``) with the
devices and dtypes it serves. The choice is made per call, from metadata only (device, dtype, shape), so
it traces cleanly under ``torch.compile``:

1. the ``backend=`` argument of the op, else
2. the ``PACA_KERNELS_BACKEND`` environment variable, else
3. the automatic priority for the inputs' device (see :data:`AUTO_PRIORITY`): the first backend that
   can serve the call and that its own measured table (:attr:`Backend.auto_skip`) does not put behind
   the next one for this op, shape regime and grad mode (with or without the backward).

A single name (``"cpu"``) is strict: if that backend cannot serve the call, a :class:`BackendError`
lists why each backend cannot. A comma-separated list (``"cpu,reference"``) is an ordered preference:
the first backend that can serve the call runs it.

The backends themselves are declared one per file in :mod:`paca_kernels.ops.backends` (devices, dtypes,
limits, test tolerances); this module only holds the :class:`Backend` record, the registry and the
choice, so that it imports nothing of the kernels.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

__all__ = [
    "AUTO_PRIORITY",
    "ENV_VAR",
    "Backend",
    "BackendError",
    "backend_names",
    "get_backend",
    "preferred_backend",
    "records_backward",
    "register_backend",
    "select_backend",
]

ENV_VAR = "PACA_KERNELS_BACKEND"

OPS = ("cluster_pool", "p2c_attention")


class BackendError(ValueError):
    """An explicitly requested backend cannot serve a call (the message says why, per backend)."""


@dataclass
class Backend:
    """One implementation of (some of) the PaCa ops.

    Attributes:
        name: the name used in ``backend=`` and ``PACA_KERNELS_BACKEND``.
        description: one line for ``python -m paca_kernels``.
        device_types: device types served ("cpu", "cuda").
        dtypes: dtypes served.
        impls: op name -> callable with the op's signature (without ``backend``).
        availability: returns None when the backend can run at all here, else why it cannot
            (not built, Triton missing, ...). Called per dispatch: keep it cheap (cache inside).
        limits: op name -> callable(inputs) returning the reasons this call's shapes are out of range.
        tolerances: dtype -> (rtol, atol) of this backend's forward outputs against the reference in
            the same dtype (float32/float64), measured on the test shapes; the op tests take them
            from here. fp16/bf16 are held to FlashAttention's rule instead (error against float64 at
            most :attr:`low_precision_factor` times the reference's own low-precision error).
        grad_tolerances: the same for gradients.
        low_precision_factor: the factor of that rule.
        auto_skip: op name -> callable(inputs, grad) returning why the *automatic* choice passes this
            backend over for this call although it can serve it (a regime where it was measured slower
            than the backends after it; ``grad``: the call records a backward), or None. Metadata only
            (shapes, dtype), like ``limits``. A backend named explicitly still serves the call.
    """

    name: str
    description: str
    device_types: tuple[str, ...]
    dtypes: tuple[torch.dtype, ...]
    impls: dict[str, Callable[..., torch.Tensor]] = field(default_factory=dict)
    availability: Callable[[], str | None] = lambda: None
    limits: dict[str, Callable[[Sequence[torch.Tensor]], list[str]]] = field(default_factory=dict)
    tolerances: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    grad_tolerances: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    low_precision_factor: float = 2.0
    auto_skip: dict[str, Callable[[Sequence[torch.Tensor], bool], str | None]] = field(default_factory=dict)

    def tolerance(self, dtype: torch.dtype, *, grad: bool = False) -> dict[str, float]:
        """``{"rtol": .., "atol": ..}`` for comparing this backend's outputs (or gradients) in
        ``dtype`` with the reference's; KeyError naming the backend if none is declared."""
        table = self.grad_tolerances if grad else self.tolerances
        if dtype not in table:
            kind = "gradient" if grad else "forward"
            raise KeyError(f"backend {self.name!r} declares no {kind} tolerance for {dtype}")
        rtol, atol = table[dtype]
        return {"rtol": rtol, "atol": atol}

    def unavailable_reason(self) -> str | None:
        """Why this backend cannot run at all in this process, or None."""
        return self.availability()

    def not_supported_reasons(self, op: str, inputs: Sequence[torch.Tensor]) -> list[str]:
        """Every reason this backend cannot run ``op`` on ``inputs`` (empty when it can)."""
        reason = self.unavailable_reason()
        if reason is not None:
            return [reason]
        if op not in self.impls:
            return [f"has no {op} implementation"]
        reasons: list[str] = []
        device = inputs[0].device
        if device.type not in self.device_types:
            reasons.append(f"does not run on {device.type} (runs on {', '.join(self.device_types)})")
        dtype = inputs[0].dtype
        if dtype not in self.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"does not support {str(dtype).removeprefix('torch.')} (supports {names})")
        if op in self.limits:
            reasons.extend(self.limits[op](inputs))
        return reasons

    def auto_skip_reason(self, op: str, inputs: Sequence[torch.Tensor], grad: bool) -> str | None:
        """Why the automatic choice passes this backend over for ``op`` on ``inputs`` (None: it does not)."""
        skip = self.auto_skip.get(op)
        return None if skip is None else skip(inputs, grad)


_REGISTRY: dict[str, Backend] = {}

#: Automatic choice per device type, best first. A backend is taken when it can serve the call.
AUTO_PRIORITY: dict[str, list[str]] = {"cpu": ["reference"], "cuda": ["reference"]}  # set by ops.backends


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend in the registry."""
    _REGISTRY[backend.name] = backend


def backend_names() -> list[str]:
    """Names of all registered backends, in registration order."""
    return list(_REGISTRY)


def get_backend(name: str) -> Backend:
    """The backend called ``name``; ValueError listing the valid names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown paca_kernels backend {name!r}; known backends: {', '.join(_REGISTRY)}"
        ) from None


def check_backend_name(backend: object, argument: str = "backend") -> str | None:
    """Validate a ``backend=`` setting where it enters (a constructor), not at the first forward.

    Accepts None (automatic) or a backend name or a comma-separated preference list of names
    ("cpu,reference"); returns it unchanged. Whether the named backend can serve a given call
    (device, dtype, shape) is still decided per call by :func:`select_backend`.

    Raises:
        TypeError: not a str or None.
        ValueError: an empty request or an unknown name (the message lists the known ones).
    """
    if backend is None:
        return None
    if not isinstance(backend, str):
        raise TypeError(f"{argument} must be a backend name (str) or None, got {type(backend).__name__}")
    names = [n.strip() for n in backend.split(",")]
    if not all(names):
        raise ValueError(f"{argument}={backend!r} has an empty name; known backends: {', '.join(_REGISTRY)}")
    unknown = [n for n in names if n not in _REGISTRY]
    if unknown:
        raise ValueError(
            f"{argument}={backend!r}: unknown paca_kernels backend {unknown[0]!r}; known backends: "
            f"{', '.join(_REGISTRY)} (or a comma-separated preference list of them, or None)"
        )
    return backend


def _reasons_table(op: str, inputs: Sequence[torch.Tensor]) -> str:
    lines = []
    for backend in _REGISTRY.values():
        reasons = backend.not_supported_reasons(op, inputs)
        lines.append(f"  {backend.name}: {'; '.join(reasons) if reasons else 'can serve this call'}")
    return "\n".join(lines)


def _describe(inputs: Sequence[torch.Tensor]) -> str:
    t = inputs[0]
    shapes = ", ".join(str(tuple(i.shape)) for i in inputs)
    return f"{str(t.dtype).removeprefix('torch.')} on {t.device}, shapes {shapes}"


def _requested(backend: str | None) -> tuple[str | None, list[str]]:
    """(the request: the ``backend=`` argument, else the environment variable, else None; its names)."""
    request = backend if backend is not None else os.environ.get(ENV_VAR) or None
    if request is None:
        return None, []
    return request, [n.strip() for n in request.split(",") if n.strip()]


def records_backward(inputs: Sequence[torch.Tensor]) -> bool:
    """Whether a call on ``inputs`` records a backward: grad mode is on and an input requires grad
    (the training calls, for the automatic choice's per-grad-mode tables). Traces under torch.compile."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in inputs)


def select_backend(op: str, inputs: Sequence[torch.Tensor], backend: str | None) -> Backend:
    """Choose the backend that runs ``op`` on ``inputs``.

    Args:
        op: "cluster_pool" or "p2c_attention".
        inputs: the op's tensor inputs (already validated: same device and dtype).
        backend: the ``backend=`` argument (None: environment variable, then automatic).

    Raises:
        BackendError: a requested backend (or every one of a requested list) cannot serve the call.
        ValueError: an unknown backend name.
    """
    request, names = _requested(backend)
    if request is not None:
        if not names:
            raise ValueError(f"empty backend request {request!r}")
        for name in names:
            if not get_backend(name).not_supported_reasons(op, inputs):
                return _REGISTRY[name]
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise BackendError(
            f"{source}{request!r} cannot run paca_kernels {op} for {_describe(inputs)}:\n"
            + _reasons_table(op, inputs)
        )
    grad = records_backward(inputs)
    for name in AUTO_PRIORITY.get(inputs[0].device.type, ["reference"]):
        b = _REGISTRY.get(name)
        if b is None or b.not_supported_reasons(op, inputs):
            continue
        if b.auto_skip_reason(op, inputs, grad) is None:
            return b
    # The reference serves every device and floating dtype (and no table passes it over): reaching
    # here means it was removed.
    raise BackendError(
        f"no paca_kernels backend can run {op} for {_describe(inputs)}:\n" + _reasons_table(op, inputs)
    )


def preferred_backend(backend: str | None, device_type: str) -> str | None:
    """The name of the backend that a layer's ``backend`` setting (None: the environment variable,
    then automatic) puts first for tensors on ``device_type``: the first requested (or prioritised)
    backend that is available and runs on that device, or None.

    Metadata only and cheaper than :func:`select_backend` (no inputs, no per-op limits): the layers
    use it to decide whether their fused CPU inference path applies, which is exact for the "cpu"
    backend (it has no shape limits and serves every floating dtype). A setting that cannot serve a
    call is reported by the op call itself.
    """
    request, names = _requested(backend)
    if request is None:
        names = AUTO_PRIORITY.get(device_type, ["reference"])
    for name in names:
        b = _REGISTRY.get(name)
        if b is None:
            return None  # an unknown name: the op call raises the ValueError that lists the names
        if device_type in b.device_types and b.unavailable_reason() is None:
            return name
    return None

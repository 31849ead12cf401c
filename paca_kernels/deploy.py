"""Deploying a paca_kernels model: ONNX (ONNX Runtime) and AOTInductor packages, on the CPU.

Both start from ``torch.export`` of the model in eval mode under ``torch.no_grad()``, where the layers
take their fused inference ops (``conv_paca_layer``, ``mlp_fused``, ...; ``nn/_fusion.py``):

- **ONNX**: ``torch.onnx.export(model, (x,), path, dynamo=True)`` works as it is, because importing
  paca_kernels registers a decomposition of every custom op into standard ATen ops
  (:mod:`paca_kernels.ops.decompositions`), which the exporter applies before its translation to ONNX.
  :func:`export_onnx` is that call with a dynamic batch dimension and a check in ONNX Runtime.
- **AOTInductor**: :func:`export_aoti` compiles with ``torch._inductor.aoti_compile_and_package``; the
  custom ops stay extern kernels that the compiled code calls through the dispatcher, so the package
  runs the fused C++ kernels of ``paca_kernels._C``. A process that loads the package must have that
  library loaded first (``import paca_kernels``, or just
  ``torch.ops.load_library(".../paca_kernels/_C*.so")``); otherwise loading fails with
  "Could not find schema for paca_kernels::...". :func:`load_aoti` does it.

onnx, onnxscript and onnxruntime are imported only by the functions that need them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _ext

__all__ = ["batch_dynamic_shapes", "export_aoti", "export_onnx", "load_aoti", "onnx_available", "run_onnx"]


def onnx_available() -> str | None:
    """None when onnx, onnxscript and onnxruntime import, else the reason (for skips and messages)."""
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    return None if not missing else f"not installed: {', '.join(missing)} (pip install onnx onnxscript onnxruntime)"


def batch_dynamic_shapes(args: Sequence[Any], max_batch: int | None = None) -> tuple[Any, ...]:
    """``dynamic_shapes`` for ``torch.export``: dim 0 of every tensor argument is one symbolic batch
    size (1 ≤ B ≤ max_batch when given), everything else static (the models' H and W are fixed by
    their position embeddings or cluster counts only through the input size a user chose)."""
    batch = torch.export.Dim("batch", min=1, max=max_batch) if max_batch else torch.export.Dim("batch")
    return tuple({0: batch} if isinstance(a, Tensor) else None for a in args)


def _trace_args(args: tuple[Any, ...], dynamic_batch: bool) -> tuple[Any, ...]:
    # torch.export specialises a dimension of size 1 (it cannot be symbolic), so a batch-1 example
    # is traced as a batch of 2 when the batch is to be dynamic; the values do not matter for tracing.
    if not dynamic_batch:
        return args
    return tuple(a.expand(2, *a.shape[1:]).contiguous() if isinstance(a, Tensor) and a.shape[0] == 1 else a
                 for a in args)


def _export(model: nn.Module, args: tuple[Any, ...], dynamic_batch: bool, max_batch: int | None):
    if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
        raise ValueError(f"max_batch must be an int >= 1 or None, got {max_batch!r}")
    if dynamic_batch and max_batch == 1:
        # A batch that can only be 1 is static (torch.export cannot make a Dim with min = max).
        dynamic_batch = False
    if max_batch is not None:
        for a in args:
            if isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] > max_batch:
                raise ValueError(f"the example's batch {a.shape[0]} exceeds max_batch={max_batch}")
    args = _trace_args(args, dynamic_batch)
    with torch.no_grad():
        return torch.export.export(
            model.eval(), args, dynamic_shapes=batch_dynamic_shapes(args, max_batch) if dynamic_batch else None
        )


def export_onnx(
    model: nn.Module,
    args: tuple[Any, ...],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    check: bool = True,
    rtol: float = 1e-4,
    **export_kwargs: Any,
) -> Any:
    """Export ``model`` (put in eval mode) to an ONNX file at ``path`` and return the ``ONNXProgram``.

    The graph is captured under ``torch.no_grad()`` with ``torch.onnx.export(..., dynamo=True)``; the
    custom ops become standard ONNX operators through their decompositions. With ``dynamic_batch`` the
    first dimension of every tensor input is symbolic (named "batch" in the ONNX graph). With ``check``
    the file is run once in ONNX Runtime (CPUExecutionProvider) on ``args`` and every output must match
    the eager model: max |onnx − torch| ≤ rtol · max |torch| per output, else AssertionError.
    ``export_kwargs`` go to ``torch.onnx.export`` (e.g. ``opset_version``).
    """
    model = model.eval()
    dyn = batch_dynamic_shapes(args) if dynamic_batch else None
    with torch.no_grad():
        program = torch.onnx.export(model, _trace_args(args, dynamic_batch), os.fspath(path), dynamo=True,
                                    dynamic_shapes=dyn, **export_kwargs)
        if check:
            want = model(*args)
            got = run_onnx(path, args)
            want = [want] if isinstance(want, Tensor) else list(torch.utils._pytree.tree_leaves(want))
            for i, (g, w) in enumerate(zip(got, want, strict=True)):
                err = float((torch.as_tensor(g) - w).abs().max() / w.abs().max().clamp_min(1e-30))
                assert err <= rtol, f"ONNX output {i}: relative error {err:.2e} > {rtol:.0e}"
    return program


def run_onnx(path: str | os.PathLike[str], args: tuple[Any, ...], threads: int | None = None) -> list[Any]:
    """Run the ONNX file at ``path`` in ONNX Runtime on the CPU with the tensor ``args`` (in order);
    returns the outputs as numpy arrays."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    tensors = [a for a in args if isinstance(a, Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(sess.get_inputs(), tensors, strict=True)}
    return sess.run(None, feeds)


def export_aoti(
    model: nn.Module,
    args: tuple[Any, ...],
    path: str | os.PathLike[str],
    *,
    dynamic_batch: bool = True,
    max_batch: int | None = 256,
    inductor_configs: dict[str, Any] | None = None,
) -> str:
    """Compile ``model`` (put in eval mode, traced under ``torch.no_grad()``) ahead of time with
    AOTInductor into the package ``path`` (``.pt2``) and return its path.

    The fused ops are extern kernels in the compiled code (their fake kernels give Inductor the output
    shapes), so the package calls paca_kernels' C++ kernels; load it with :func:`load_aoti`. With
    ``dynamic_batch`` the batch size is symbolic, 1 ≤ B ≤ ``max_batch``.
    """
    ep = _export(model, args, dynamic_batch, max_batch)
    return torch._inductor.aoti_compile_and_package(
        ep, package_path=os.fspath(path), inductor_configs=inductor_configs
    )


def load_aoti(path: str | os.PathLike[str]) -> Any:
    """Load an AOTInductor package made by :func:`export_aoti`, after loading the op library
    ``paca_kernels._C`` whose kernels it calls; returns the callable runner (call it under
    ``torch.no_grad()`` or not: it has no autograd)."""
    if not _ext.load():
        raise RuntimeError(f"the package calls paca_kernels' C++ ops: {_ext.unavailable_reason()}")
    return torch._inductor.aoti_load_package(os.fspath(path))

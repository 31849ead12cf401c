"""``python -m paca_kernels``: the environment, every backend with its status, and a self-check.

Each backend that can run on the chosen device is checked against the reference on fresh random
inputs (odd shapes, forward and every gradient); the exit status is 1 on any mismatch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import time

import torch

from . import __version__, _ext, ops, reference
from .testing import TOLERANCES, make_cluster_pool_inputs, make_p2c_inputs, max_error

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16,
           "float16": torch.float16}


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report_environment(device: torch.device) -> None:
    print(f"paca_kernels {__version__}")
    print(f"  python   {platform.python_version()} ({sys.executable})")
    print(f"  torch    {torch.__version__} (CUDA {torch.version.cuda or 'none: CPU build'})")
    print(f"  triton   {_version('triton')}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"  cuda:{i}   {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        print("  cuda     no CUDA device visible")
    print(f"  cpu      {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    info = _ext.build_info() if _ext.load() else None
    if info is not None:
        print(f"  _C       built for torch {info.get('torch_version')}, CUDA kernels "
              f"{'yes' if info.get('cuda_built') else 'no'}")
    else:
        print(f"  _C       unavailable: {_ext.unavailable_reason()}")
    print(f"  device   {device}")


def report_backends() -> None:
    print("\nbackends")
    for name in ops.backend_names():
        b = ops.get_backend(name)
        reason = b.unavailable_reason()
        state = "available" if reason is None else f"unavailable: {reason}"
        print(f"  {name:<10} {state}")
        print(f"  {'':<10} {b.description}; ops: {', '.join(sorted(b.impls))}")


def _check_op(op: str, backend: str, device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    """Forward and gradients of one op on one backend against the float64 reference."""
    if op == "cluster_pool":
        inp = make_cluster_pool_inputs(2, 49, 197, 24, dtype=dtype, device=device, requires_grad=True)
        args = (inp.logits, inp.x, inp.weight, inp.bias)
        fn, ref = ops.cluster_pool, reference.cluster_pool
    else:
        inp = make_p2c_inputs(2, 197, 49, 3, 24, dtype=dtype, device=device, requires_grad=True)
        args = (inp.q, inp.k, inp.v)
        fn, ref = ops.p2c_attention, reference.p2c_attention
    reasons = ops.get_backend(backend).not_supported_reasons(op, args[:2])
    if reasons:
        return True, "skipped: " + "; ".join(reasons)
    exact_args = tuple(a.detach().double().requires_grad_(True) for a in args)
    low_args = tuple(a.detach().clone().requires_grad_(True) for a in args)
    out = fn(*args, backend=backend)
    exact = ref(*exact_args)
    low = ref(*low_args)
    grad = torch.randn_like(exact)
    out.backward(grad.to(out.dtype))
    exact.backward(grad)
    low.backward(grad.to(low.dtype))
    names = ["out"] + (["dlogits", "dx", "dweight", "dbias"] if op == "cluster_pool" else ["dq", "dk", "dv"])
    pairs = [(out, exact, low)] + [(a.grad, e.grad, lo.grad) for a, e, lo in zip(args, exact_args, low_args,
                                                                                 strict=True)]
    worst = []
    ok = True
    for name, (got, want, low_ref) in zip(names, pairs, strict=True):
        err = max_error(got, want)
        # float32/64: an absolute-plus-relative bound; fp16/bf16: FlashAttention's 2x rule.
        if dtype in (torch.float16, torch.bfloat16):
            bound = 2.0 * max_error(low_ref, want) + 1e-5
        else:
            # fp32 accumulates rounding over N terms: 1e-4 relative to the output's scale.
            bound = TOLERANCES[dtype][1] * 5 * max(1.0, float(want.detach().abs().max()))
        ok &= err <= bound
        worst.append(f"{name} {err:.1e}")
    return ok, ", ".join(worst)


def self_check(device: torch.device, dtype: torch.dtype) -> bool:
    print(f"\nself-check against the float64 reference ({str(dtype).removeprefix('torch.')}, {device})")
    all_ok = True
    for op in ("cluster_pool", "p2c_attention"):
        for name in ops.backend_names():
            if ops.get_backend(name).unavailable_reason() is not None:
                print(f"  {op:<14} {name:<10} skipped: unavailable")
                continue
            t = time.perf_counter()
            try:
                ok, detail = _check_op(op, name, device, dtype)
            # Report and go on: one broken backend must not hide the others.
            except Exception as exc:  # noqa: BLE001
                ok, detail = False, f"raised {type(exc).__name__}: {exc}"
            status = "skip" if detail.startswith("skipped") else ("ok" if ok else "MISMATCH")
            print(f"  {op:<14} {name:<10} {status:<9} {detail} ({time.perf_counter() - t:.2f} s)")
            all_ok &= ok
    return all_ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paca_kernels",
        description="Report the environment and the paca_kernels backends, and check every available "
        "backend against the pure-PyTorch reference (exit status 1 on a mismatch).",
    )
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto (cuda when available; default)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                        help="dtype of the self-check inputs (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    torch.manual_seed(args.seed)
    report_environment(device)
    report_backends()
    ok = self_check(device, _DTYPES[args.dtype])
    print("\nall available backends match the reference" if ok else "\nMISMATCH: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""``python -m paca_kernels``: the environment, every backend with its status, a self-check, and a
speed table.

Each backend that can run on the chosen device is checked against the reference on fresh random
inputs (odd shapes, forward and every gradient); the exit status is 1 on any mismatch. Then one
PaCa-ViT-Tiny stage-1 layer (PaCaAttention, C = 96, h = 2, M = 100 conv clusters, 56×56 patches) is
timed with the reference eager and compiled and with each available backend (``--speed``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import platform
import sys
import time

import torch

from . import __version__, _ext, ops, reference
from .nn import PaCaAttention
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


# -- speed table --------------------------------------------------------------------------------------

#: PaCa-ViT-Tiny stage 1 at 224²: C = 96 channels, h = 2 heads, M = 100 clusters, a 56×56 patch grid.
_STAGE1 = {"dim": 96, "heads": 2, "clusters": 100, "H": 56, "W": 56}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn, device: torch.device, reps: int, warmup: int) -> float:
    """Median wall time of ``fn()`` in ms over ``reps`` runs after ``warmup`` (device-synchronised)."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    times.sort()
    return 1e3 * times[len(times) // 2]


def speed_table(
    device: torch.device,
    dtype: torch.dtype,
    mode: str = "quick",
    *,
    batch: int | None = None,
    compile_backend: str = "inductor",
    grid: tuple[int, int] | None = None,
) -> list[tuple[str, str, float | None, str]]:
    """Time one PaCa-ViT-Tiny stage-1 layer per provider and print the table (with progress).

    Args:
        mode: "quick" (inference forward, small batch, few repetitions) or "full" (the benchmark
            suite's batch, B = 8 on the CPU and 64 on CUDA; forward, and forward + backward).
        batch, grid: override the batch size and the patch grid (tests use tiny ones).
        compile_backend: torch.compile backend of the "compiled" rows.

    Returns:
        rows of (provider, pass, median ms or None when skipped, note).
    """
    full = mode == "full"
    b = batch or ((64 if device.type == "cuda" else 8) if full else (8 if device.type == "cuda" else 2))
    H, W = grid or (_STAGE1["H"], _STAGE1["W"])
    reps, warmup = (20, 5) if full else (5, 2)
    layer = PaCaAttention(_STAGE1["dim"], _STAGE1["heads"], _STAGE1["clusters"]).to(device, dtype)
    x = torch.randn(b, H * W, _STAGE1["dim"], device=device, dtype=dtype)
    probe = (x, x)
    providers: list[tuple[str, str | None, bool]] = [("reference", "reference", False),
                                                     ("reference compiled", "reference", True)]
    for name in ops.backend_names():
        if name != "reference":
            providers.append((name, name, False))
    passes = ["forward", "forward+backward"] if full else ["forward"]
    print(f"\nspeed: PaCa-ViT-Tiny stage-1 layer (B={b}, N={H * W}, C={_STAGE1['dim']}, "
          f"h={_STAGE1['heads']}, M={_STAGE1['clusters']}), {str(dtype).removeprefix('torch.')}, {device}, "
          f"{mode} mode (median of {reps} after {warmup} warm-up runs)")
    rows: list[tuple[str, str, float | None, str]] = []
    total = len(providers) * len(passes)
    step = 0
    for pass_name in passes:
        train = pass_name != "forward"
        layer.train(train)
        base = None
        for label, backend, compiled in providers:
            step += 1
            # Progress: the row's label is printed first, its result appended when it is measured.
            print(f"  [{step}/{total}] {label:<20} {pass_name:<16}", end="", flush=True)
            be = ops.get_backend(backend)
            reasons = be.not_supported_reasons("cluster_pool", probe) + be.not_supported_reasons("p2c_attention", probe)
            if reasons:
                note = "skipped: " + "; ".join(dict.fromkeys(reasons))
                print(f" {note}")
                rows.append((label, pass_name, None, note))
                continue
            layer.backend = backend
            xin = x.detach().requires_grad_(train)

            def call(t: torch.Tensor = xin) -> torch.Tensor:
                return layer(t, H, W)[0]

            fn = torch.compile(call, backend=compile_backend) if compiled else call
            if train:
                def step_fn(fn=fn, xin=xin) -> None:
                    fn(xin).float().square().mean().backward()
            else:
                def step_fn(fn=fn, xin=xin) -> None:
                    with torch.no_grad():
                        fn(xin)
            if compiled:
                print(" (compiling)", end="", flush=True)
            try:
                ms = _median_ms(step_fn, device, reps, warmup)
            # One provider failing (e.g. no C compiler for Inductor) must not hide the others.
            except Exception as exc:  # noqa: BLE001
                note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                print(f" {note}")
                rows.append((label, pass_name, None, note))
                continue
            if base is None:
                base = ms
            note = f"{base / ms:.3g}x reference eager"
            print(f" {ms:9.2f} ms   {note}")
            rows.append((label, pass_name, ms, note))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m paca_kernels",
        description="Report the environment and the paca_kernels backends, check every available "
        "backend against the pure-PyTorch reference (exit status 1 on a mismatch), then time one "
        "PaCa-ViT-Tiny stage-1 layer with each provider (--speed).",
    )
    parser.add_argument("--device", default="auto",
                        help="cpu, cuda, cuda:N, or auto (cuda when available; default)")
    parser.add_argument("--dtype", default="float32", choices=sorted(_DTYPES),
                        help="dtype of the self-check inputs (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    parser.add_argument(
        "--speed", default="quick", choices=["none", "quick", "full"],
        help="speed table of one PaCa-ViT-Tiny stage-1 layer after the self-check: quick (inference, "
        "small batch; default), full (B = 8 on CPU / 64 on CUDA, forward and forward+backward), none",
    )
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    torch.manual_seed(args.seed)
    report_environment(device)
    report_backends()
    ok = self_check(device, _DTYPES[args.dtype])
    print("\nall available backends match the reference" if ok else "\nMISMATCH: see above")
    if args.speed != "none":
        speed_table(device, _DTYPES[args.dtype], args.speed)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

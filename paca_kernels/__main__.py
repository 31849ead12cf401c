"""``python -m paca_kernels``: the environment, every backend with its status, a self-check, and a
speed table.

Each backend that can run on the chosen device is checked against the reference on fresh random
inputs (odd shapes, forward and every gradient); the exit status is 1 on any mismatch. Then one
PaCa-ViT-Tiny stage-1 layer (PaCaAttention, C = 96, h = 2, M = 100 conv clusters, 56×56 patches) is
timed with the reference eager and compiled and with each available backend (``--speed``), in
interleaved rounds within a time budget (:mod:`paca_kernels.timing`): each row gives the median time
and per-round speed-up with their quartiles, and a WARNING line flags a speed-up too spread to read.
"""

from __future__ import annotations

import argparse
import copy
import importlib.metadata
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import __version__, _ext, ops, reference, timing
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
    print(f"  cpu      {_cpu_line()}")
    print(f"  cpu isa  {_isa_line()}")
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

#: The provider every speed-up is taken against.
_BASELINE = "reference"


@dataclass(frozen=True)
class SpeedMode:
    """What a ``--speed`` mode times and how long it may take."""

    batch_cpu: int
    batch_cuda: int
    passes: tuple[str, ...]
    #: Seconds for the whole table: every warm-up (torch.compile's compilation included) and the rounds.
    budget_s: float
    #: Rounds run whatever the budget: fewer give no spread worth the name.
    min_rounds: int
    #: Rounds at most, however fast the providers (tiny shapes would otherwise run thousands).
    max_rounds: int


#: quick: a few seconds of inference rounds. full: the benchmark suite's batch, forward and
#: forward+backward, sized to end within about 2 minutes on the 2-core development machine.
SPEED_MODES = {
    "quick": SpeedMode(batch_cpu=2, batch_cuda=8, passes=("forward",), budget_s=12.0, min_rounds=5,
                       max_rounds=50),
    "full": SpeedMode(batch_cpu=8, batch_cuda=64, passes=("forward", "forward+backward"), budget_s=90.0,
                      min_rounds=5, max_rounds=200),
}

#: Share of the budget per pass: a forward+backward step costs about three forwards.
_PASS_WEIGHT = {"forward": 1.0, "forward+backward": 2.0}

#: Calls of each provider before the rounds: the first compiles a compiled provider, the second runs
#: what was compiled (a guard may recompile on it), both warm the allocator.
_WARMUP_CALLS = 2


@dataclass(frozen=True)
class SpeedRow:
    """One provider in one pass of the speed table."""

    provider: str
    pass_name: str
    #: Its time and per-round speed-up over the baseline; None when it was skipped or failed.
    result: timing.Comparison | None
    #: Why it has no result ("skipped: ...", "failed: ..."), else "".
    note: str = ""


def _provider_label(name: str) -> str:
    return "reference eager" if name == _BASELINE else name


def _fmt_ms(s: timing.Spread) -> str:
    return f"{1e3 * s.median:9.2f} ms [{1e3 * s.q1:.4g}, {1e3 * s.q3:.4g}]"


def _fmt_ratio(s: timing.Spread | None) -> str:
    return "1 (baseline)" if s is None else f"{s.median:.3g}x [{s.q1:.3g}, {s.q3:.3g}]"


def format_rounds(
    pass_name: str,
    samples: dict[str, list[float]],
    baseline: str = _BASELINE,
    skipped: dict[str, str] | None = None,
    order: list[str] | None = None,
) -> tuple[dict[str, timing.Comparison], list[str]]:
    """The table lines and warnings of one pass, from its per-round times (seconds; pure, no timing).

    Args:
        samples: provider -> its time in each round, round i of every provider taken side by side.
        baseline: the provider the speed-ups are taken against (per round).
        skipped: provider -> why it has no samples (printed in its place).
        order: the providers' order in the table (default: samples' order, then skipped's).

    Returns:
        (provider -> :class:`timing.Comparison`, the lines to print: one per provider, then one
        ``WARNING`` line per speed-up that cannot be read).
    """
    skipped = skipped or {}
    comparisons = timing.compare(samples, baseline)
    lines, warnings = [], []
    for name in order or [*samples, *skipped]:
        if name in skipped:
            lines.append(f"  {name:<20} {pass_name:<16} {skipped[name]}")
            continue
        c = comparisons[name]
        lines.append(f"  {name:<20} {pass_name:<16} {_fmt_ms(c.time):<32} {_fmt_ratio(c.speedup)}")
        if c.warning is not None:
            warnings.append(f"  WARNING {name}, {pass_name}: the speed-up over {_provider_label(baseline)} "
                            f"cannot be read: {c.warning}; the machine was too busy or noisy for it "
                            f"(rerun on a quieter machine, or with a larger --budget for more rounds)")
    return comparisons, lines + warnings


def _cpu_line() -> str:
    """The CPU model and torch's thread count."""
    return f"{timing.cpu_model()}, {torch.get_num_threads()} torch threads on {timing.visible_cpus()} visible CPUs"


def _isa_line() -> str:
    """The instruction sets the C++ kernels and ATen chose on this CPU."""
    isa = _ext.cpu_isa()
    kernels = f"{isa[0]} ({isa[1]})" if isa is not None else "none (_C unavailable)"
    return f"C++ kernels {kernels}, ATen {torch.backends.cpu.get_cpu_capability()}"


def _dot_a_second() -> Callable[[int], None]:
    """Progress for the rounds: a dot after a round that ends a second or more after the last dot
    (a dot a round would run off the line for fast providers)."""
    last = time.perf_counter()

    def tick(_done: int) -> None:
        nonlocal last
        if time.perf_counter() - last >= 1.0:
            print(".", end="", flush=True)
            last = time.perf_counter()

    return tick


def speed_table(
    device: torch.device,
    dtype: torch.dtype,
    mode: str = "quick",
    *,
    batch: int | None = None,
    compile_backend: str = "inductor",
    grid: tuple[int, int] | None = None,
    budget_s: float | None = None,
    min_rounds: int | None = None,
) -> list[SpeedRow]:
    """Time one PaCa-ViT-Tiny stage-1 layer per provider in interleaved rounds; print the table.

    Every pass warms each provider up (compiling the compiled ones), then runs rounds in which every
    provider is called once, in a rotating order, until the pass's share of the mode's budget is
    spent (at least ``min_rounds``): a busy spell then slows all providers alike, and each round's
    speed-up compares times taken side by side. The table gives the median and the quartiles of the
    time and of the per-round speed-up, and a WARNING line for each speed-up too spread to be read.

    Args:
        mode: "quick" (inference forward, small batch) or "full" (the benchmark suite's batch, B = 8
            on the CPU and 64 on CUDA; forward, and forward + backward); see :data:`SPEED_MODES`.
        batch, grid: override the batch size and the patch grid (tests use tiny ones).
        compile_backend: torch.compile backend of the "compiled" rows.
        budget_s, min_rounds: override the mode's budget (seconds for warm-ups and rounds together)
            and its minimum number of rounds.

    Returns:
        one row per provider and pass.
    """
    plan = SPEED_MODES[mode]
    budget = plan.budget_s if budget_s is None else budget_s
    least = plan.min_rounds if min_rounds is None else min_rounds
    b = batch or (plan.batch_cuda if device.type == "cuda" else plan.batch_cpu)
    H, W = grid or (_STAGE1["H"], _STAGE1["W"])
    template = PaCaAttention(_STAGE1["dim"], _STAGE1["heads"], _STAGE1["clusters"]).to(device, dtype)
    x = torch.randn(b, H * W, _STAGE1["dim"], device=device, dtype=dtype)
    probe = (x, x)
    providers: list[tuple[str, str, bool]] = [("reference", "reference", False),
                                              ("reference compiled", "reference", True)]
    providers += [(name, name, False) for name in ops.backend_names() if name != "reference"]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    print(f"\nspeed: PaCa-ViT-Tiny stage-1 layer (B={b}, N={H * W}, C={_STAGE1['dim']}, "
          f"h={_STAGE1['heads']}, M={_STAGE1['clusters']}), {str(dtype).removeprefix('torch.')}, {device}, "
          f"{mode} mode")
    print(f"  on {_cpu_line()}; ISA: {_isa_line()}")
    print(f"  method: {_WARMUP_CALLS} warm-up calls per provider (compilation included), then interleaved "
          f"rounds (each calls every provider once, in a rotating order)\n"
          f"          until the table's {budget:.3g} s budget is spent, at least {least} rounds; speed-up = "
          f"{_provider_label(_BASELINE)}'s time / the provider's in the same round; median [q1, q3] of the rounds")

    skipped: dict[str, str] = {}
    layers: dict[str, PaCaAttention] = {}
    for label, backend, _compiled in providers:
        be = ops.get_backend(backend)
        reasons = be.not_supported_reasons("cluster_pool", probe) + be.not_supported_reasons("p2c_attention", probe)
        if reasons:
            skipped[label] = "skipped: " + "; ".join(dict.fromkeys(reasons))
            continue
        # One layer per provider: all of them are alive at once in the rounds.
        layers[label] = copy.deepcopy(template)
        layers[label].backend = backend

    rows: list[SpeedRow] = []
    start = time.perf_counter()
    weights = [_PASS_WEIGHT.get(p, 1.0) for p in plan.passes]
    for i, pass_name in enumerate(plan.passes):
        train = pass_name != "forward"
        deadline = start + budget * sum(weights[: i + 1]) / sum(weights)
        fns: dict[str, Callable[[], None]] = {}
        failed: dict[str, str] = {}
        print(f"  {pass_name}: warm-up", end="", flush=True)
        for label, _backend, compiled in providers:
            if label in skipped:
                continue
            layer = layers[label].train(train)
            xin = x.detach().requires_grad_(train)

            def call(t: torch.Tensor = xin, layer: PaCaAttention = layer) -> torch.Tensor:
                return layer(t, H, W)[0]

            fn = torch.compile(call, backend=compile_backend) if compiled else call
            if train:
                def step(fn=fn, xin=xin) -> None:
                    fn(xin).float().square().mean().backward()
            else:
                def step(fn=fn, xin=xin) -> None:
                    with torch.no_grad():
                        fn(xin)
            try:
                seconds = timing.warm_up(step, _WARMUP_CALLS, sync)
            # One provider failing (e.g. no C compiler for Inductor) must not hide the others.
            except Exception as exc:  # noqa: BLE001
                failed[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
                print(f" | {label} failed", end="", flush=True)
                continue
            print(f" | {label} {seconds:.2f} s{' (compiling)' if compiled else ''}", end="", flush=True)
            fns[label] = step
        print()
        if _BASELINE not in fns:
            failed.update(dict.fromkeys(fns, f"not timed: no {_provider_label(_BASELINE)} to compare with"))
            fns = {}
        rounds_budget = deadline - time.perf_counter()
        print(f"  {pass_name}: rounds ", end="", flush=True)
        result = timing.interleave(
            fns, budget_s=rounds_budget, min_rounds=least, max_rounds=plan.max_rounds, warmup=0, sync=sync,
            on_round=_dot_a_second(),
        ) if fns else None
        if result is not None:
            print(f" {result.rounds} rounds in {result.elapsed_s:.1f} s (stopped by: {result.stopped_by})")
            comparisons, lines = format_rounds(pass_name, result.samples, skipped={**skipped, **failed},
                                               order=[label for label, _, _ in providers])
        else:
            print(" none")
            comparisons = {}
            lines = [f"  {label:<20} {pass_name:<16} {note}" for label, note in {**skipped, **failed}.items()]
        print(f"  {'provider':<20} {'pass':<16} {'median [q1, q3] of the rounds':<32} "
              f"speed-up over {_provider_label(_BASELINE)}, median [q1, q3]")
        print("\n".join(lines))
        for label, _backend, _compiled in providers:
            note = skipped.get(label) or failed.get(label, "")
            rows.append(SpeedRow(label, pass_name, comparisons.get(label), note))
    print(f"  speed table: {time.perf_counter() - start:.1f} s (budget {budget:.3g} s)")
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
        help="speed table of one PaCa-ViT-Tiny stage-1 layer after the self-check, timed in interleaved "
        "rounds with the spread of each time and speed-up: quick (inference, small batch, about a 12 s "
        "budget; default), full (B = 8 on CPU / 64 on CUDA, forward and forward+backward, about a 90 s "
        "budget), none",
    )
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="seconds for the speed table, warm-ups and compilation included (default: "
                        + ", ".join(f"{m} {p.budget_s:g}" for m, p in SPEED_MODES.items())
                        + f"); at least {SPEED_MODES['quick'].min_rounds} rounds are run whatever it is")
    args = parser.parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto"
                          else args.device)
    torch.manual_seed(args.seed)
    report_environment(device)
    report_backends()
    ok = self_check(device, _DTYPES[args.dtype])
    print("\nall available backends match the reference" if ok else "\nMISMATCH: see above")
    if args.speed != "none":
        speed_table(device, _DTYPES[args.dtype], args.speed, budget_s=args.budget)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

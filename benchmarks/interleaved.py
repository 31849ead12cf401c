"""Interleaved timing of the layer- and model-level comparisons, for machines whose speed drifts.

pytest-benchmark times one provider's rounds back to back, so on a shared machine a busy minute lands
on whichever provider runs then (on the 2-core development machine the same layer varied by ±50 %
minutes apart). Here every round runs each provider of a group once, in a rotating order, so slow
periods are spread over all providers, and the ratios compare samples taken side by side.

    python benchmarks/interleaved.py [--rounds 15] [--models tiny,small,base] [--out FILE.json]
    python benchmarks/interleaved.py --bf16 [--batches 1,8] [--models tiny,small] [--out FILE.json]

Groups: the PaCaAttention layer (conv clustering, 100 clusters) at the three PaCa-Tiny stage shapes
against the official layer's path, eager and compiled; PaCa-ViT inference per model, reference
against cpu backend, eager and compiled. With ``--bf16`` (issue #28) instead: the same layer shapes
and models at each batch size of ``--batches``, in bfloat16 both ways a user asks for it: the
reference backend under ``torch.autocast("cpu", bfloat16)`` (oneDNN's bf16 GEMMs; the baseline of
the ratios), the cpu backend under the same autocast, a bf16 model (``.to(torch.bfloat16)``) on
each backend, and the cpu backend in float32. Each provider's error against a float64 run is
checked first by FlashAttention's rule (at most twice the reference's in the same precision).
CPU only (the GPU suite synchronises per call and has
steadier clocks). The JSON has pytest-benchmark's layout (``benchmarks`` rows with ``group``,
``stats`` and ``extra_info``), so ``scripts/bench_report.py`` renders it like the suite's results.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from shapes import stage_shapes
from test_bench_layer import official_forward

from paca_kernels import PaCaAttention, _ext, create_model, timing

MODELS = {"tiny": "pacavit_tiny_p2cconv_100_0", "small": "pacavit_small_p2cconv_100_0",
          "base": "pacavit_base_p2cconv_100_0"}


#: What the samples measure: wall time, or with --cpu-time the calling thread's CPU time (one torch
#: thread), which the other users of a shared machine disturb far less.
CLOCK = {"clock": time.perf_counter}


def add_clock_args(ap: argparse.ArgumentParser, threads: bool = True) -> None:
    """``--threads N`` (with ``threads``) and ``--cpu-time``, as every interleaved script takes them."""
    if threads:
        ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="one torch thread, samples in thread CPU time (a load-robust cross-check)")


def apply_clock_args(args: argparse.Namespace) -> None:
    """Set torch's threads and the samples' clock (:data:`CLOCK`) from :func:`add_clock_args`'s options."""
    if getattr(args, "threads", 0):
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        torch.set_num_threads(1)
        CLOCK["clock"] = time.thread_time


def _interleave(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Each round calls every function once, starting one further along the list each round
    (paca_kernels.timing.interleave, after two warm-up calls each), without autograd."""
    with torch.no_grad():
        return timing.interleave(fns, rounds=rounds, warmup=2, clock=CLOCK["clock"]).samples


def _rows(group: str, samples: dict[str, list[float]], flops: dict[str, int], ceil: dict,
          dtypes: dict[str, str] | None = None, extra: dict | None = None) -> list[dict]:
    rows = []
    for provider, s in samples.items():
        dtype = (dtypes or {}).get(provider, "float32")
        sp = timing.Spread.of(s)
        med = sp.median
        rows.append({
            "group": group, "name": f"{group}[{provider}]",
            "stats": {"median": med, "min": sp.min, "max": sp.max, "mean": statistics.fmean(s),
                      "q1": sp.q1, "q3": sp.q3, "iqr": sp.iqr, "rounds": len(s), "data": s},
            "extra_info": {
                "provider": provider, "device": "cpu", "dtype": dtype, "torch": torch.__version__,
                "cuda": None, "triton": None, "flops": flops[provider], "min_bytes": 0,
                "tflops": flops[provider] / med / 1e12, "gbps": 0.0,
                "share_of_matmul_rate": flops[provider] / med / ceil["matmul"],
                "ceiling_copy_gbps": ceil["copy"] / 1e9, "ceiling_matmul_tflops": ceil["matmul"] / 1e12,
                "timing": "interleaved rounds", "clock": CLOCK["clock"].__name__,
                "threads": torch.get_num_threads(), **(extra or {}),
            },
        })
    return rows


def _ceilings() -> dict:
    """The machine's copy bandwidth and float32 / bfloat16 matmul rates (2048² products; bf16 through
    oneDNN, on AMX where the CPU has it), measured side by side."""
    src = torch.randn(1 << 25)
    dst = torch.empty_like(src)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    ab, bb = a.bfloat16(), b.bfloat16()
    s = _interleave({"copy": lambda: dst.copy_(src), "mm": lambda: a @ b, "mm_bf16": lambda: ab @ bb}, 10)
    return {"copy": 2 * src.numel() * 4 / statistics.median(s["copy"]),
            "matmul": 2 * 2048**3 / statistics.median(s["mm"]),
            "matmul_bf16": 2 * 2048**3 / statistics.median(s["mm_bf16"])}


# -- bfloat16 (issue #28) ------------------------------------------------------------------------------

#: The bf16 providers: (name, backend, how bf16 is asked for: "autocast", "model" or None for float32).
BF16_PROVIDERS = [("reference-autocast", "reference", "autocast"), ("cpu-autocast", "cpu", "autocast"),
                  ("reference-bf16", "reference", "model"), ("cpu-bf16", "cpu", "model"),
                  ("cpu-fp32", "cpu", None)]


#: What the bf16 rows carry besides the timing: BENCHMARKS.md shows them as one row per shape and a
#: column per provider (scripts/bench_report.py), the bf16 matmul ceiling measured in the run.
BF16_EXTRA: dict = {"table": "wide"}


def _bf16_fns(make, x: Tensor, call) -> tuple[dict, dict]:
    """For each BF16_PROVIDERS entry, a function of no argument running ``call(module, input)`` on
    ``make(backend)`` as that provider asks for bf16, and the provider's output dtype."""
    fns, dtypes = {}, {}
    for name, backend, how in BF16_PROVIDERS:
        m = make(backend)
        if how == "model":
            m, inp = m.to(torch.bfloat16), x.to(torch.bfloat16)
        else:
            inp = x

        def f(m=m, inp=inp, how=how):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=how == "autocast"):
                return call(m, inp)

        fns[name] = f
        dtypes[name] = "float32" if how is None else "bfloat16"
    return fns, dtypes


def _check_bf16(fns: dict, make, x: Tensor, call) -> dict[str, float]:
    """Each provider's max error against the reference backend run in float64 (for the bf16 models:
    on the bf16-rounded weights), held to FlashAttention's rule against the reference's in the same
    precision; returns the errors."""
    with torch.no_grad():
        exact = call(make("reference").double(), x.double())
        exact_rounded = call(make("reference").to(torch.bfloat16).double(), x.to(torch.bfloat16).double())
        outs = {k: f().double() for k, f in fns.items()}
    err = {}
    for name, _, how in BF16_PROVIDERS:
        want = exact_rounded if how == "model" else exact
        err[name] = (outs[name] - want).abs().max().item()
    for name, bar in (("cpu-autocast", "reference-autocast"), ("cpu-bf16", "reference-bf16")):
        assert err[name] <= 2 * err[bar] + 1e-5, (name, err)
    return err


def bf16_layer_groups(rounds: int, ceil: dict, batches: list[int], smoke: bool = False) -> list[dict]:
    """The PaCaAttention layer (conv clustering) at the Tiny stage shapes, bf16 providers."""
    rows = []
    for s0 in stage_shapes("cpu", smoke=smoke)[:3]:
        for b in batches:
            s = dataclasses.replace(s0, B=b)
            torch.manual_seed(0)
            layer = PaCaAttention(s.C, s.h, s.M, clustering="conv").eval()
            x = torch.randn(s.B, s.N, s.C)

            def make(backend, layer=layer, s=s):
                m = PaCaAttention(s.C, s.h, s.M, clustering="conv", backend=backend).eval()
                m.load_state_dict(layer.state_dict())
                return m

            def call(m, t, s=s):
                return m(t, s.H, s.W)[0]

            fns, dtypes = _bf16_fns(make, x, call)
            err = _check_bf16(fns, make, x, call)
            flops = (2 * s.B * s.M * s.N * s.C + 4 * s.B * s.N * s.M * s.C
                     + 2 * s.C * s.C * (2 * s.B * s.N + 2 * s.B * s.M))
            samples = _interleave(fns, rounds)
            group = f"bf16 PaCaAttention-fwd-{s.id} (interleaved)"
            rows += _rows(group, samples, dict.fromkeys(fns, flops), ceil, dtypes, BF16_EXTRA)
            _print(group, samples, err)
    return rows


def bf16_model_groups(names: list[str], rounds: int, ceil: dict, batches: list[int]) -> list[dict]:
    """PaCa-ViT inference per model and batch size, bf16 providers."""
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for key in names:
        name = MODELS[key]
        torch.manual_seed(0)
        ref = create_model(name, backend="reference").eval()
        state = ref.state_dict()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref(torch.randn(1, 3, 224, 224))
        for b in batches:
            images = torch.randn(b, 3, 224, 224)

            def make(backend, name=name, state=state):
                m = create_model(name, backend=backend).eval()
                m.load_state_dict(state)
                return m

            def call(m, t):
                return m(t)

            fns, dtypes = _bf16_fns(make, images, call)
            err = _check_bf16(fns, make, images, call)
            samples = _interleave(fns, rounds)
            group = f"bf16 inference-{name}-B{b} (interleaved)"
            rows += _rows(group, samples, dict.fromkeys(fns, fc.get_total_flops() * b), ceil, dtypes,
                          BF16_EXTRA)
            _print(group, samples, err)
    return rows


def layer_groups(rounds: int, ceil: dict, smoke: bool = False) -> list[dict]:
    rows = []
    compile_kw = {"backend": "aot_eager"} if smoke else {}
    for s in stage_shapes("cpu", smoke=smoke)[:3]:
        torch.manual_seed(0)
        layer = PaCaAttention(s.C, s.h, s.M, clustering="conv").eval()
        x = torch.randn(s.B, s.N, s.C)
        cpu = PaCaAttention(s.C, s.h, s.M, clustering="conv", backend="cpu").eval()
        cpu.load_state_dict(layer.state_dict())
        ref = PaCaAttention(s.C, s.h, s.M, clustering="conv", backend="reference").eval()
        ref.load_state_dict(layer.state_dict())

        def official(t, layer=layer, s=s):
            return official_forward(layer, t, s.H, s.W)

        def paca_cpu(t, cpu=cpu, s=s):
            return cpu(t, s.H, s.W)[0]

        def paca_ref(t, ref=ref, s=s):
            return ref(t, s.H, s.W)[0]

        base = {"official": official, "paca-reference": paca_ref, "paca-cpu": paca_cpu}
        fns = dict(base)
        fns.update({f"{k}-compiled": torch.compile(v, **compile_kw) for k, v in base.items()})
        with torch.no_grad():
            want = official(x)
            for name, f in fns.items():
                torch.testing.assert_close(f(x), want, rtol=2e-2, atol=2e-2, msg=name)
        # As in test_bench_layer: the attention core (pooling, two attention matmuls) + 4 projections.
        flops = (2 * s.B * s.M * s.N * s.C + 4 * s.B * s.N * s.M * s.C
                 + 2 * s.C * s.C * (2 * s.B * s.N + 2 * s.B * s.M))
        samples = _interleave({k: (lambda f=f, x=x: f(x)) for k, f in fns.items()}, rounds)
        group = f"PaCaAttention-fwd-{s.id} (interleaved)"
        rows += _rows(group, samples, dict.fromkeys(fns, flops), ceil)
        _print(group, samples)
    return rows


def model_groups(names: list[str], rounds: int, ceil: dict) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    rows = []
    for key in names:
        name = MODELS[key]
        torch.manual_seed(0)
        images = torch.randn(8, 3, 224, 224)
        ref = create_model(name, backend="reference").eval()
        cpu = create_model(name, backend="cpu").eval()
        cpu.load_state_dict(ref.state_dict())
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref(images[:1])
        flops = fc.get_total_flops() * images.shape[0]
        fns = {"reference": ref, "cpu": cpu, "reference-compiled": torch.compile(ref),
               "cpu-compiled": torch.compile(cpu)}
        with torch.no_grad():
            want = ref(images)
            for n, f in fns.items():
                torch.testing.assert_close(f(images), want, rtol=1e-3, atol=1e-3, msg=n)
        samples = _interleave({k: (lambda f=f, im=images: f(im)) for k, f in fns.items()}, rounds)
        group = f"inference-{name} (interleaved)"
        rows += _rows(group, samples, dict.fromkeys(fns, flops), ceil)
        _print(group, samples)
    return rows


def _print(group: str, samples: dict[str, list[float]], errors: dict[str, float] | None = None) -> None:
    """Median and quartiles per provider, and its per-round speed-up over each baseline present
    (and its error against float64, where given)."""
    print(group, flush=True)
    bases = [b for b in ("official", "official-compiled", "reference", "reference-compiled",
                         "reference-autocast", "cpu-fp32") if b in samples]
    per_base = {b: timing.compare(samples, b) for b in bases}
    warnings = []
    for p, s in samples.items():
        sp = timing.Spread.of(s)
        ratios = "  ".join(f"x{b}={c[p].speedup.median:.2f} [{c[p].speedup.q1:.2f}, {c[p].speedup.q3:.2f}]"
                           for b, c in per_base.items() if c[p].speedup is not None)
        err = f"  max err {errors[p]:.3g}" if errors and p in errors else ""
        print(f"  {p:26s} median {sp.median * 1e3:9.2f} ms [{sp.q1 * 1e3:.4g}, {sp.q3 * 1e3:.4g}]  {ratios}{err}")
        warnings += [f"  WARNING {p} over {b}: {c[p].warning}" for b, c in per_base.items() if c[p].warning]
    print("\n".join(warnings) or f"  ({len(next(iter(samples.values())))} rounds)", flush=True)


def write_results(path: Path, rows: list[dict], **machine: object) -> None:
    """Write ``rows`` as a results file in pytest-benchmark's layout (what scripts/bench_report.py
    reads): the CPU model and torch's thread count (plus ``machine``'s entries) under machine_info, the
    git commit, the UTC time. Every interleaved script writes its results through this."""
    git = ["git", "rev-parse", "HEAD"]
    commit = subprocess.run(git, check=False, capture_output=True, text=True, cwd=HERE).stdout.strip()
    data = {"machine_info": {"cpu": {"brand_raw": timing.cpu_model(), "count": torch.get_num_threads()},
                             **machine},
            "commit_info": {"id": commit}, "datetime": dt.datetime.now(dt.UTC).isoformat(),
            "benchmarks": rows}
    path.write_text(json.dumps(data, indent=1))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--models", default="tiny", help="comma-separated subset of tiny,small,base; '' for none")
    ap.add_argument("--no-layer", action="store_true", help="skip the layer groups")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    ap.add_argument("--bf16", action="store_true",
                    help="the bfloat16 comparison (issue #28) instead of the float32 one")
    ap.add_argument("--batches", default="1,8", help="with --bf16: comma-separated batch sizes")
    add_clock_args(ap, threads=False)
    ap.add_argument("--smoke", action="store_true",
                    help="one tiny layer shape, aot_eager compilation (what make test runs)")
    args = ap.parse_args(argv)
    apply_clock_args(args)
    ceil = _ceilings()
    BF16_EXTRA["ceiling_matmul_bf16_tflops"] = ceil["matmul_bf16"] / 1e12
    print(f"ceilings: copy {ceil['copy'] / 1e9:.1f} GB/s, matmul fp32 {ceil['matmul'] / 1e9:.0f} GF/s, "
          f"bf16 {ceil['matmul_bf16'] / 1e9:.0f} GF/s; C++ kernels: {_ext.cpu_isa()}", flush=True)
    models = [m for m in args.models.split(",") if m]
    if args.bf16:
        batches = [int(b) for b in args.batches.split(",") if b]
        rows = [] if args.no_layer else bf16_layer_groups(args.rounds, ceil, batches, smoke=args.smoke)
        rows += bf16_model_groups(models, args.rounds, ceil, batches)
    else:
        rows = [] if args.no_layer else layer_groups(args.rounds, ceil, smoke=args.smoke)
        rows += model_groups(models, args.rounds, ceil)
    if args.out:
        write_results(args.out, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())

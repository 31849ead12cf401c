"""The Triton resource gate: compile every launch configuration the launchers can choose for sm_90, with
the installed Triton and no GPU, and hold each to the H100's budgets.

    python scripts/triton_gate.py [--json OUT] [--fp32 all|sample|none] [--jobs N]

The configurations come from the launchers' own planning code (paca_kernels/triton/plan.py,
``configurations(H100)``) over the advertised limits (paca_kernels/triton/__init__.py). Each is compiled
with the least favourable specialisations Triton's launcher gives a contiguous input: 16-byte aligned
pointers and unit strides as the constant 1, but no size or stride known to be a multiple of 16 (so
no vectorised loads: the most registers; aligned shapes compile to fewer). Each is checked: it compiles;
no returning atomics in the SASS (p2c_attention's dk/dv reduce: REDG, no ATOMG); shared memory
(Triton's dynamic + the cubin's static) <= 227 KiB; for fp16/bf16 no stack and no local memory (spills),
from ``cuobjdump -res-usage`` of the cubin; its grid within CUDA's limits (checked by the planner while
enumerating). fp32 variants ("ieee" dot, 10-60 s each to compile) are sampled by default: per kernel,
the one with the largest tiles and the one with the smallest.

Compiled kernels land in Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache): a second run
with the same Triton and kernels compiles nothing. Prints one line per variant and a summary; exits 1
when any variant fails a check. Must run without TRITON_INTERPRET (the kernels must be JIT functions).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paca_kernels.triton.plan import H100  # after the path insert

SHARED_LIMIT = H100.shared_bytes  # 227 KiB per block on an H100
FP32_PTRS = {"lse_ptr", "stats_ptr", "pooled_ptr", "part_m_ptr", "part_l_ptr", "part_acc_ptr", "dp_ptr", "rowdot_ptr",
             "dk_ptr", "dv_ptr"}
FLOATS = {"eps", "scale"}


def _kernels():
    from paca_kernels.triton import cluster_pool as cp
    from paca_kernels.triton import p2c_attention as p2c

    return {"cluster_pool_fwd": cp._cluster_pool_fwd_kernel, "cluster_pool_merge": cp._cluster_pool_merge_kernel,
            "cluster_pool_bwd": cp._cluster_pool_bwd_kernel, "p2c_fwd": p2c._p2c_fwd_kernel,
            "p2c_bwd": p2c._p2c_bwd_kernel}


def _int_args(launch, shape) -> dict[str, int]:
    """The integer arguments the launcher passes for contiguous inputs of ``shape``."""
    kind = shape[0]
    c = launch.consts
    if kind == "cluster_pool_fwd":
        _, b, m, n, ch, _sms = shape
        return {"M": m, "N": n, "C": ch, "chunk": launch.get("chunk"), "n_splits": launch.get("splits"),
                "m_blocks": -(-m // c["BLOCK_M"]), "sl_b": m * n, "sl_m": n, "sl_n": 1, "sx_b": n * ch,
                "sx_n": ch, "sx_c": 1, "s_w": 1, "s_b": 1, "has_w": 1, "has_b": 1}
    if kind == "cluster_pool_merge":
        _, b, m, ch, splits = shape
        return {"BM": b * m, "M": m, "C": ch, "n_splits": splits, "s_w": 1, "s_b": 1, "has_w": 1, "has_b": 1}
    if kind == "cluster_pool_bwd":
        _, b, m, n, ch = shape
        return {"M": m, "N": n, "C": ch, "n_blocks": -(-n // c["BLOCK_K"]), "sl_b": m * n, "sl_m": n, "sl_n": 1,
                "sx_b": n * ch, "sx_n": ch, "sx_c": 1}
    _, b, n, m, h, d = shape
    args = {"N": n, "M": m, "H": h, "D": d, "B": b, "tiles": launch.get("tiles"), "deterministic": 0}
    for t, axis, rows in (("q", "n", n), ("k", "m", m), ("v", "m", m), ("o", "n", n), ("do", "n", n),
                          ("dq", "n", n)):
        args.update({f"s{t}_b": rows * h * d, f"s{t}_{axis}": h * d, f"s{t}_h": d, f"s{t}_d": 1})
    return args


def _source(kernel, launch, shape):
    from triton.compiler.compiler import ASTSource

    names = list(inspect.signature(kernel.fn).parameters)
    dns = set(getattr(kernel, "do_not_specialize", ()) or ())
    dns_names = {names[i] if isinstance(i, int) else i for i in dns}
    ints = _int_args(launch, shape)
    consts = dict(launch.constexprs)
    sig, attrs = {}, {}
    half = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}[launch.dtype]
    for i, name in enumerate(names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*fp32" if name in FP32_PTRS else "*" + half
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            value = ints[name]
            if name not in dns_names and value == 1:  # Triton's launcher makes a 1 a constant
                sig[name] = "constexpr"
                consts[name] = 1
                continue
            # No multiple-of-16 hints on sizes and strides: the worst case (unvectorised loads, a 64-bit
            # address per element), which head dims like 24, 40, 48 and odd B·h·d strides give at runtime.
            sig[name] = "i32"
    return ASTSource(kernel, sig, constexprs={(names.index(k),): v for k, v in consts.items()}, attrs=attrs)


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def _compile_one(item):
    """Compile one (launch, shape); returns a result dict (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget

    launch, shape = item
    kernel = _kernels()[launch.kernel]
    res = {"kernel": launch.kernel, "dtype": launch.dtype, "consts": dict(launch.constexprs),
           "num_warps": launch.num_warps, "num_stages": launch.num_stages, "shape": list(shape)}
    t0 = time.perf_counter()
    # Triton prints the whole PTX of a kernel ptxas rejects to stdout: keep the worker's stdout quiet.
    saved = os.dup(1)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    try:
        compiled = triton.compile(_source(kernel, launch, shape), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": launch.num_warps, "num_stages": launch.num_stages})
    except Exception as exc:  # noqa: BLE001 (any compiler failure is the finding)
        res.update(ok=False, error=f"{type(exc).__name__}: {str(exc)[:2000]}")
        return res
    finally:
        os.dup2(saved, 1)
        os.close(saved)
        os.close(devnull)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([_cuobjdump(), "-res-usage", f.name], capture_output=True, text=True,
                               check=True).stdout
        ptx = compiled.asm["ptx"]
        sass = (subprocess.run([_cuobjdump(), "-sass", f.name], capture_output=True, text=True, check=True).stdout
                if "atom.global" in ptx else "")  # PTX red.* can only become REDG
    finally:
        os.unlink(f.name)
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    # Returning global atomics (SASS ATOMG) where a reduction (REDG, result unused) would do: dk/dv
    # must reduce. (Triton 3.6 writes atom.global with dead results in PTX; ptxas makes them REDG.)
    res["returning_atomics"] = len(re.findall(r"\bATOMG\.", sass))
    res["reductions"] = len(re.findall(r"\bREDG?\.", sass))
    res.update(ok=True, regs=int(fields.get("REG", -1)), stack=int(fields.get("STACK", 0)),
               local=int(fields.get("LOCAL", 0)),
               shared=int(compiled.metadata.shared) + int(fields.get("SHARED", 0)))
    return res


def _violations(res) -> list[str]:
    if not res["ok"]:
        return ["does not compile"]
    out = []
    if res["shared"] > SHARED_LIMIT:
        out.append(f"shared memory {res['shared']} B > {SHARED_LIMIT} B")
    if res["returning_atomics"]:
        out.append(f"{res['returning_atomics']} returning atomics (ATOMG) instead of reductions (REDG)")
    if res["dtype"] != "fp32" and (res["stack"] or res["local"]):
        out.append(f"spills: stack {res['stack']} B, local {res['local']} B ({res['regs']} registers)")
    return out


def select(configs, fp32: str):
    """The configurations to compile: every fp16/bf16 one; fp32 all, none, or a sample (per kernel,
    the largest and the smallest tiles)."""
    half = [c for c in configs if c[0].dtype != "fp32"]
    if fp32 == "all":
        return half + [c for c in configs if c[0].dtype == "fp32"]
    if fp32 == "none":
        return half
    sample = []
    for name in sorted({c[0].kernel for c in configs}):
        mine = sorted((c for c in configs if c[0].dtype == "fp32" and c[0].kernel == name),
                      key=lambda c: _tile_volume(c[0]))
        sample += [mine[-1], mine[0]] if len(mine) > 1 else mine
    return half + sample


def _tile_volume(launch) -> int:
    v = 1
    for k, x in launch.constexprs:
        if k.startswith("BLOCK_"):
            v *= int(x)
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write every variant's figures here")
    ap.add_argument("--fp32", choices=("all", "sample", "none"), default="sample")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("unset TRITON_INTERPRET: the gate compiles the kernels for the GPU", file=sys.stderr)
        return 2
    import triton

    from paca_kernels.triton import MAX_CHANNELS, MAX_HEAD_DIM, MAX_KEY_TILE, MAX_KEYS, plan

    t0 = time.perf_counter()
    configs = plan.configurations(plan.H100, MAX_KEYS, MAX_HEAD_DIM, MAX_KEY_TILE, MAX_CHANNELS)
    chosen = select(configs, args.fp32)
    print(f"triton {triton.__version__}: {len(configs)} configurations, compiling {len(chosen)} "
          f"(fp32: {args.fp32}) with {args.jobs} processes", flush=True)
    results = []
    with ProcessPoolExecutor(args.jobs) as pool:
        for res in pool.map(_compile_one, chosen):
            res["violations"] = _violations(res)
            results.append(res)
            state = "FAIL " + "; ".join(res["violations"]) if res["violations"] else "ok"
            figures = (f"regs {res['regs']} stack {res['stack']} shared {res['shared']}" if res["ok"]
                       else res["error"].splitlines()[0][:200])
            print(f"{state:<6} {res['kernel']} {res['dtype']} {res['consts']} w{res['num_warps']} "
                  f"s{res['num_stages']}: {figures}", flush=True)
    bad = [r for r in results if r["violations"]]
    summary = {
        "triton": triton.__version__, "configurations": len(configs), "compiled": sum(r["ok"] for r in results),
        "attempted": len(results), "fp32": args.fp32,
        "over_budget": sum(r["ok"] and r["shared"] > SHARED_LIMIT for r in results),
        "with_spills": sum(r["ok"] and r["dtype"] != "fp32" and bool(r["stack"] or r["local"]) for r in results),
        "fp32_with_stack": sum(r["ok"] and r["dtype"] == "fp32" and bool(r["stack"] or r["local"])
                               for r in results),
        "with_returning_atomics": sum(r["ok"] and r["returning_atomics"] > 0 for r in results),
        "failed_to_compile": sum(not r["ok"] for r in results),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "variants": results}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

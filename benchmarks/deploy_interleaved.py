"""Deployment paths of PaCa-ViT inference on the CPU, timed in interleaved rounds.

    python benchmarks/deploy_interleaved.py [--models tiny,small] [--batches 1,8] [--rounds 15] [--threads N]
                                            [--official-src PATH] [--out FILE.json]

Providers, per model and batch size (fp32, 224×224, one process, the same threads for all):

- ``onnxrt-official``: ONNX Runtime (CPUExecutionProvider, all graph optimisations) on the official
  model: with ``--official-src PATH`` (a checkout of iVMCL/PaCaViT) the official code itself builds it
  (``benchmarks/official_code.py``: stand-ins for the timm/mmcv/mmengine names it imports, checked to
  load this package's weights with ``strict=True`` and to give its logits), exported with
  ``torch.onnx.export(..., dynamo=True)``; or ``--official-onnx tiny=PATH,small=PATH``, ONNX files
  exported elsewhere. Without either, no such row.
- ``onnxrt-reference``: ONNX Runtime on this package's model on the ``reference`` backend (the
  official layers' math in plain PyTorch ops, restructured: no attention maps in inference, one
  softmax pass), exported the same way: the baseline when the official code is not at hand.
- ``onnxrt-paca``: ONNX Runtime on the cpu-backend model exported by ``paca_kernels.deploy.export_onnx``
  (the fused ops decomposed into standard ONNX operators).
- ``aoti``: the AOTInductor package from ``paca_kernels.deploy.export_aoti`` (dynamic batch; the fused
  C++ kernels as extern calls).
- ``cpu`` / ``cpu-compiled``: paca_kernels eager on the cpu backend, and under ``torch.compile``.

``--threads N`` gives PyTorch and ONNX Runtime N threads each (default: PyTorch's default, the cores);
the groups are then named ``...-B<b>-T<N>``. On a machine shared with other work, PyTorch's OpenMP
loops wait at every parallel region's barrier for a thread the OS has preempted, which at batch 1 (many
short regions) costs more than the work; ONNX Runtime's pool lets the calling thread take over, and one
thread has no barrier: ``--threads 1`` then compares the kernels rather than the schedulers.

Every provider's output is checked against the reference model before timing (relative error
≤ 1e-4). Rows go to a JSON in pytest-benchmark's layout with ``extra_info.suite = "deploy"``, which
``scripts/bench_report.py`` renders as its own section.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from interleaved import MODELS, _ceilings, _interleave, _print, _rows, write_results
from official_code import check_against, create_official

from paca_kernels import PaCaViT, create_model, deploy


def _session(path: Path | str, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # ONNX Runtime's pool threads spin after each run by default; interleaved with PyTorch on the same
    # cores, they would take the cores from the next provider's threads (and so slow every other row).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _ort_fn(sess, images: torch.Tensor):
    feed = {sess.get_inputs()[0].name: images.numpy()}
    return lambda: sess.run(None, feed)[0]


#: --smoke: a small PaCa-ViT at 64×64 (one block a stage) in place of the official variants, so that
#: the benchmark suite's smoke run keeps this script working at a fraction of the cost.
SMOKE_ARCH = {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 2, 2, 4], "mlp_ratios": [2] * 4,
              "depths": [1, 1, 1, 1]}


def _model(key: str, backend: str, smoke: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if smoke:
        return PaCaViT(num_classes=10, img_size=64, arch_cfg=SMOKE_ARCH, paca_cfg={"clusters": [4, 5, 6, 0]},
                       backend=backend).eval()
    return create_model(MODELS[key], backend=backend).eval()


def deploy_groups(keys: list[str], batches: list[int], rounds: int, ceil: dict, tmp: Path,
                  official_onnx: dict[str, str], suffix: str = "", smoke: bool = False,
                  official_src: str | None = None) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    threads = torch.get_num_threads()
    size = 64 if smoke else 224
    # The smoke run checks the plumbing, not the speed: the cheapest AOTInductor wrapper and compiler.
    aoti_kw = {"inductor_configs": {"aot_inductor.compile_wrapper_opt_level": "O0"}} if smoke else {}
    rows = []
    for key in keys:
        name = f"smoke-{key}" if smoke else MODELS[key]
        ref = _model(key, "reference", smoke)
        cpu = _model(key, "cpu", smoke)
        cpu.load_state_dict(ref.state_dict())
        example = torch.randn(2, 3, size, size)
        dyn = deploy.batch_dynamic_shapes((example,))
        onnx_paths = {}
        if key in official_onnx:
            onnx_paths["onnxrt-official"] = official_onnx[key]
        elif official_src is not None:
            # The official code's own model, with this package's weights (strict), checked first.
            official = create_official(official_src, MODELS[key]) if not smoke else None
            if official is not None:
                err = check_against(official, ref, example)
                print(f"{name}: the official code's model gives the reference logits (relative error {err:.1e})")
                onnx_paths["onnxrt-official"] = tmp / f"{key}-official.onnx"
                with torch.no_grad():
                    torch.onnx.export(official.eval(), (example,), str(onnx_paths["onnxrt-official"]),
                                      dynamo=True, dynamic_shapes=dyn)
        onnx_paths["onnxrt-reference"] = tmp / f"{key}-reference.onnx"
        with torch.no_grad():
            torch.onnx.export(ref, (example,), str(onnx_paths["onnxrt-reference"]), dynamo=True,
                              dynamic_shapes=dyn)
        paca_path = tmp / f"{key}-paca.onnx"
        deploy.export_onnx(cpu, (example,), paca_path, check=False)
        # A dynamic batch, as the ONNX files have.
        runner = deploy.load_aoti(deploy.export_aoti(cpu, (example,), tmp / f"{key}.pt2",
                                                    max_batch=max(2, *batches), **aoti_kw))
        sessions = {n: _session(path, threads) for n, path in onnx_paths.items()}
        sessions["onnxrt-paca"] = _session(paca_path, threads)
        compiled = torch.compile(cpu, backend="aot_eager" if smoke else "inductor")
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref(example[:1])
        flops_one = fc.get_total_flops()
        for b in batches:
            images = torch.randn(b, 3, size, size)
            fns = {n: _ort_fn(sess, images) for n, sess in sessions.items()}
            fns |= {"aoti": lambda im=images, f=runner: f(im), "cpu": lambda im=images, f=cpu: f(im),
                    "cpu-compiled": lambda im=images, f=compiled: f(im)}
            with torch.no_grad():
                want = ref(images)
                for n, f in fns.items():
                    got = torch.as_tensor(f())
                    err = float((got - want).abs().max() / want.abs().max())
                    assert err <= 1e-4, f"{n}: relative error {err:.1e}"
            samples = _interleave(fns, rounds)
            group = f"deployment-{name}-B{b}{suffix} (interleaved)"
            new = _rows(group, samples, dict.fromkeys(fns, flops_one * b), ceil)
            for r in new:
                r["extra_info"]["suite"] = "deploy"
                r["extra_info"]["batch"] = b
                r["extra_info"]["threads"] = threads
            rows += new
            _print(group, samples)
            base = new[0]["stats"]["median"]
            print("  " + "  ".join(f"{r['extra_info']['provider']} x{base / r['stats']['median']:.2f}"
                                   for r in new), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small", help="comma-separated subset of tiny,small,base")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=0, help="threads for PyTorch and ONNX Runtime each")
    ap.add_argument("--official-onnx", default="", help="key=PATH pairs: ONNX files of the official model")
    ap.add_argument("--official-src", default=None,
                    help="a checkout of iVMCL/PaCaViT: export the official code's model (onnxrt-official)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    ap.add_argument("--smoke", action="store_true",
                    help="a small 64x64 model per key (checks the script, not the speed)")
    args = ap.parse_args(argv)
    reason = deploy.onnx_available()
    if reason:
        print(f"deploy_interleaved: {reason}", file=sys.stderr)
        return 2
    official = dict(p.split("=", 1) for p in args.official_onnx.split(",") if p)
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    ceil = _ceilings()
    with tempfile.TemporaryDirectory() as d:
        rows = deploy_groups([m for m in args.models.split(",") if m], [int(b) for b in args.batches.split(",")],
                             args.rounds, ceil, Path(d), official, f"-T{args.threads}" if args.threads else "",
                             smoke=args.smoke, official_src=args.official_src)
    load_after = os.getloadavg()
    print(f"load average before {load_before}, after {load_after}")
    if args.out:
        import onnxruntime

        write_results(args.out, rows, loadavg_before=load_before, loadavg_after=load_after,
                      onnxruntime=onnxruntime.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())

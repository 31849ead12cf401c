"""Deployment paths of PaCa-ViT inference on the CPU, timed in interleaved rounds.

    python benchmarks/deploy_interleaved.py [--models tiny,small] [--batches 1,8] [--rounds 15] [--threads N]
                                            [--out FILE.json]

Providers, per model and batch size (fp32, 224×224, one process, the same threads for all):

- ``onnxrt-official``: ONNX Runtime (CPUExecutionProvider, all graph optimisations) on the official
  model's computation: this package's model on the ``reference`` backend (the official layers' math
  in plain PyTorch ops, the official parameter names and shapes), exported with
  ``torch.onnx.export(..., dynamo=True)``. ``--official-onnx tiny=PATH,small=PATH`` times ONNX files
  exported from the official code itself instead (it needs timm, mmcv and mmengine, which are not
  installed here).
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

from paca_kernels import create_model, deploy


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


def deploy_groups(keys: list[str], batches: list[int], rounds: int, ceil: dict, tmp: Path,
                  official_onnx: dict[str, str], suffix: str = "") -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    threads = torch.get_num_threads()
    rows = []
    for key in keys:
        name = MODELS[key]
        torch.manual_seed(0)
        ref = create_model(name, backend="reference").eval()
        cpu = create_model(name, backend="cpu").eval()
        cpu.load_state_dict(ref.state_dict())
        example = torch.randn(2, 3, 224, 224)
        dyn = deploy.batch_dynamic_shapes((example,))
        off_path = official_onnx.get(key)
        if off_path is None:
            off_path = tmp / f"{key}-official.onnx"
            with torch.no_grad():
                torch.onnx.export(ref, (example,), str(off_path), dynamo=True, dynamic_shapes=dyn)
        paca_path = tmp / f"{key}-paca.onnx"
        deploy.export_onnx(cpu, (example,), paca_path, check=False)
        runner = deploy.load_aoti(deploy.export_aoti(cpu, (example,), tmp / f"{key}.pt2",
                                                    max_batch=max(2, *batches)))  # dynamic, as the ONNX files
        sess_off, sess_paca = _session(off_path, threads), _session(paca_path, threads)
        compiled = torch.compile(cpu)
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref(example[:1])
        flops_one = fc.get_total_flops()
        for b in batches:
            images = torch.randn(b, 3, 224, 224)
            fns = {"onnxrt-official": _ort_fn(sess_off, images), "onnxrt-paca": _ort_fn(sess_paca, images),
                   "aoti": lambda im=images, f=runner: f(im), "cpu": lambda im=images, f=cpu: f(im),
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
            _print(new)
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
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
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
                             args.rounds, ceil, Path(d), official, f"-T{args.threads}" if args.threads else "")
    load_after = os.getloadavg()
    print(f"load average before {load_before}, after {load_after}")
    if args.out:
        import onnxruntime

        write_results(args.out, rows, loadavg_before=load_before, loadavg_after=load_after,
                      onnxruntime=onnxruntime.__version__)
    return 0


if __name__ == "__main__":
    sys.exit(main())

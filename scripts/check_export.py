"""Export every model create_model builds (and the teachers, a features_only backbone and a
PaCaSegmentor) to ONNX, run each in ONNX Runtime on the CPU and print its relative error against
eager PyTorch; optionally compile AOTInductor packages too. Slow (minutes): the test suite runs small
models (tests/test_export.py); this is the full sweep.

    python scripts/check_export.py                      # every classifier at 64x64, plain exporter call
    python scripts/check_export.py --size 224 --dense   # + features_only and a segmentor at 512x512
    python scripts/check_export.py --models pacavit_tiny_p2cconv_100_0 --aoti
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

import paca_kernels
from paca_kernels import PaCaSegmentor, create_model, deploy

TEACHERS = ["pacavit_convmixer_tiny_100", "pacavit_convmixer_small_100", "pacavit_convmixer_base_100"]


def rel_err(got, want: torch.Tensor) -> float:
    return float((torch.as_tensor(got) - want).abs().max() / want.abs().max())


def check_onnx(name: str, model: torch.nn.Module, x: torch.Tensor, tmp: Path, no_grad: bool) -> float:
    """Plain ``torch.onnx.export(model, (x,), path, dynamo=True)`` (under no_grad when asked: the fused
    inference ops are then traced), run in ONNX Runtime; the worst relative error over the outputs."""
    path = tmp / f"{name}.onnx"
    with torch.set_grad_enabled(not no_grad):
        torch.onnx.export(model, (x,), str(path), dynamo=True, verbose=False)
    with torch.no_grad():
        want = model(x)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = deploy.run_onnx(path, (x,))
    return max(rel_err(g, w) for g, w in zip(got, want, strict=True))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="", help="comma-separated names (default: all and the teachers)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--dense", action="store_true", help="also features_only and PaCaSegmentor at 512x512")
    ap.add_argument("--dense-model", default="pacavit_tiny_p2cconv_100_0", help="backbone of the dense cases")
    ap.add_argument("--only-dense", action="store_true", help="only the features_only and segmentor cases")
    ap.add_argument("--aoti", action="store_true", help="also AOTInductor packages (about a minute each)")
    args = ap.parse_args(argv)
    names = args.models.split(",") if args.models else paca_kernels.list_models() + TEACHERS
    names = list(dict.fromkeys(names))
    worst = 0.0
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cases = [] if args.only_dense else [
            (n, create_model(n, img_size=args.size).eval(), (args.batch, 3, args.size, args.size)) for n in names]
        if args.dense or args.only_dense:
            dense = args.dense_model
            cases.append((f"features_only-{dense}", create_model(dense, features_only=True).eval(),
                          (1, 3, 512, 512)))
            cases.append((f"segmentor-{dense}", PaCaSegmentor.from_name(dense).eval(), (1, 3, 512, 512)))
        for label, model, shape in cases:
            x = torch.randn(shape)
            for no_grad in (False, True):
                t = time.perf_counter()
                err = check_onnx(label, model, x, tmp, no_grad)
                worst = max(worst, err)
                mode = "no_grad" if no_grad else "grad"
                print(f"onnx {label:40s} {mode:8s} rel err {err:.1e}  ({time.perf_counter() - t:.0f} s)",
                      flush=True)
            if args.aoti:
                t = time.perf_counter()
                runner = deploy.load_aoti(deploy.export_aoti(model, (x,), tmp / f"{label}.pt2"))
                with torch.no_grad():
                    out, want = runner(x), model(x)
                want = [want] if isinstance(want, torch.Tensor) else list(want)
                out = [out] if isinstance(out, torch.Tensor) else list(out)
                err = max(rel_err(g, w) for g, w in zip(out, want, strict=True))
                worst = max(worst, err)
                print(f"aoti {label:40s}          rel err {err:.1e}  ({time.perf_counter() - t:.0f} s)",
                      flush=True)
    print(f"worst relative error {worst:.1e}")
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())

"""Deployment: the ops' decompositions, ONNX export run in ONNX Runtime, AOTInductor packages.

- Every custom op against its decomposition (paca_kernels.ops.decompositions) on random inputs,
  float64 and float32: the decompositions are what the ONNX exporter turns into ONNX operators.
- ONNX (skipped with the reason when onnx, onnxscript or onnxruntime is missing): a small PaCa-ViT with
  a dynamic batch, the plain ``torch.onnx.export(..., dynamo=True)`` call on the clustering-teacher
  model, a ``features_only`` backbone at a dense-prediction size and a PaCaSegmentor, each run in ONNX
  Runtime against eager PyTorch (relative error ≤ 1e-4).
- AOTInductor: a small model compiled into a .pt2 package that calls the C++ kernels, run in this
  process and in a fresh one that loads only the op library.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.onnx._internal.exporter import _decomp as _onnx_decomp

from paca_kernels import PaCaSegHead, PaCaSegmentor, PaCaViT, _ext, deploy
from paca_kernels.ops import decompositions

needs_ext = pytest.mark.skipif(not _ext.available(), reason=f"C++ extension: {_ext.unavailable_reason()}")
_ONNX_MISSING = deploy.onnx_available()
needs_onnx = pytest.mark.skipif(_ONNX_MISSING is not None, reason=f"ONNX export: {_ONNX_MISSING}")

ARCH = {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 2, 2, 4], "mlp_ratios": [2] * 4,
        "depths": [1, 2, 1, 1]}


_TWIN_NAMES = ("cluster_pool_fwd_triton", "p2c_attention_fwd_triton")
#: Whether the Triton twins exist (Triton imports; the tests run it under TRITON_INTERPRET on the CPU).
TRITON_TWINS = all(hasattr(torch.ops.paca_kernels, n) for n in _TWIN_NAMES)


def small_vit(depths: list[int] | None = None) -> PaCaViT:
    torch.manual_seed(0)
    arch = ARCH if depths is None else {**ARCH, "depths": depths}
    return PaCaViT(num_classes=10, img_size=64, arch_cfg=arch, paca_cfg={"clusters": [4, 5, 6, 0]}).eval()


def rel_err(got, want: torch.Tensor) -> float:
    return ((torch.as_tensor(got) - want).abs().max() / want.abs().max()).item()


# -- the decompositions ------------------------------------------------------------------------------


def _op_cases(dtype: torch.dtype, with_bias: bool) -> list[tuple[str, tuple]]:
    """(op name, arguments) for every op, small odd shapes: B 2, H×W 4×5, C 8, M 3, 2 heads, k 3."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=dtype)

    def rb(*shape: int) -> torch.Tensor | None:
        return r(*shape) if with_bias else None

    B, H, W, C, M, h, hid = 2, 4, 5, 8, 3, 2, 16
    N = H * W
    x, logits, c = r(B, N, C), r(B, M, N), r(B, M, C)
    head = (r(C, 1, 3, 3), rb(C), r(C, C, 1, 1), rb(C), r(M, C, 1, 1), rb(M))
    attn = (r(C, C), rb(C), r(C, C), rb(C), r(C, C), rb(C), r(C, C), rb(C))
    norm = (r(C) if with_bias else None, rb(C), 1e-6)
    cases = [
        ("cluster_pool_fwd", (logits, x, *norm)),
        ("p2c_attention_fwd", (r(B, N, h, C // h), r(B, M, h, C // h), r(B, M, h, C // h), 0.3)),
        ("p2c_attention_saved_fwd", (r(B, N, h, C // h), r(B, M, h, C // h), r(B, M, h, C // h), 0.3)),
        ("conv_cluster_logits", (x, H, W, *head)),
        ("mlp_dwconv", (r(B, N, hid), H, W, r(hid, 1, 3, 3), rb(hid), rb(hid), with_bias, with_bias)),
        ("mlp_fused", (x, H, W, r(hid, C), rb(hid), r(hid, 1, 3, 3), rb(hid), with_bias, not with_bias,
                       r(C, hid), rb(C))),
        # With the block's ends: x + mlp(LayerNorm(x)) (fc2 back to C).
        ("mlp_fused", (x, H, W, r(hid, C), rb(hid), r(hid, 1, 3, 3), rb(hid), True, True, r(C, hid), rb(C),
                       True, *norm, True, False)),
        ("p2c_attention_proj", (x, c, *attn, h, 0.5)),
        ("p2c_attention_proj", (x, c, *attn, h, 0.5, r(B, N, C))),  # with the residual
        ("layer_norm", (r(B, C, N).transpose(1, 2), *norm[:2], 1e-5)) if with_bias else ("layer_norm", (x, None, None, 1e-5)),
        ("linear", (r(B, C, N).transpose(1, 2), r(hid, C), rb(hid))),
        ("cached_linear", (r(B, C, N).transpose(1, 2), r(hid, C), rb(hid))),
        ("conv_paca_layer", (x, H, W, *head, *norm, *attn, h, 0.5, with_bias)),
        ("conv_paca_layer", (x, H, W, *head, *norm, *attn, h, 0.5, with_bias, r(B, N, C))),
    ]
    # The Triton twins (under the interpreter on the CPU here) against the same decompositions.
    twins = [(f"{n}_triton", a) for n, a in cases if n in ("cluster_pool_fwd", "p2c_attention_fwd")]
    return cases + (twins if TRITON_TWINS and dtype != torch.float64 else [])  # Triton: no float64


@needs_ext
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_decompositions_match_ops(dtype: torch.dtype, with_bias: bool) -> None:
    want_names = set(decompositions.DECOMPOSITIONS) - (set() if TRITON_TWINS else set(_TWIN_NAMES))
    assert set(decompositions.REGISTERED) == want_names
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    for name, args in _op_cases(dtype, with_bias):
        op = getattr(torch.ops.paca_kernels, name).default
        # In the ONNX exporter's table, not in the global one (Inductor under CI=1 would refuse it).
        assert op in _onnx_decomp.create_onnx_friendly_decomposition_table(set()), name
        assert op not in torch._decomp.decomposition_table, name
        want, got = op(*args), decompositions.DECOMPOSITIONS[name](*args)
        want = want if isinstance(want, tuple) else (want,)
        got = got if isinstance(got, tuple) else (got,)
        assert len(got) == len(want), name
        # Every output has the op's shape, dtype and (contiguous) strides: FakeTensorMode runs the
        # decomposition in place of the fake kernel under dynamic shapes.
        for w, d in zip(want, got, strict=True):
            assert (d.shape, d.dtype, d.stride()) == (w.shape, w.dtype, w.stride()), name
        if name.endswith(("_fwd", "_fwd_triton")):  # the backward's statistics: NaN placeholders
            assert all(t.isnan().all() for t in got[1:]), name
            got, want = got[:1], want[:1]
        for w, d in zip(want, got, strict=True):
            assert rel_err(d, w) <= tol, (name, rel_err(d, w))


@needs_ext
def test_every_forward_op_has_a_decomposition() -> None:
    """A new op that can appear in an exported inference graph needs one (ARCHITECTURE.md), the Triton
    twins included (a model exported from a GPU on the triton backend). Backward ops never do."""
    names = {n.split("::")[1].split(".")[0] for n in torch._C._dispatch_get_all_op_names()
             if n.startswith("paca_kernels::")}
    # The queries take no tensors and the private test factory of the output cache is no model's
    # op: they never appear in a graph.
    queries = {"cpu_isa", "cpu_output_cache", "cpu_output_cache_clear", "_cpu_empty_output"}
    forward = {n for n in names if not n.endswith(("_bwd", "_bwd_triton")) and n not in queries}
    have = {op.name().split("::")[1].split(".")[0] for op in decompositions.onnx_decomposition_table()}
    assert forward == have, forward ^ have
    assert have <= set(decompositions.DECOMPOSITIONS)


@needs_ext
def test_inductor_compiles_the_ops_where_ci_is_set(monkeypatch) -> None:
    """Inductor refuses to fall back on an op that has a global decomposition when the environment has
    CI set ("make_fallback(...): a decomposition exists"): with the decompositions in the global table,
    every torch.compile of a fused model failed on CI machines. They live in the ONNX exporter's table."""
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("CI", "1")
    torch._dynamo.reset()
    model = small_vit()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad(), inductor_config.patch(fx_graph_cache=False):
        want = model(x)
        got = torch.compile(model)(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch._dynamo.reset()


@needs_ext
def test_compiled_model_keeps_the_cpp_ops() -> None:
    """The decompositions live in the ONNX exporter's table only: torch.export's default
    decompositions (and Inductor's) do not take them, so a program keeps the fused ops until an
    exporter asks for ONNX."""
    model = small_vit()
    with torch.no_grad():
        ep = torch.export.export(model, (torch.randn(2, 3, 64, 64),)).run_decompositions()
    ops = {n.target.name() for n in ep.graph.nodes if n.op == "call_function"
           and hasattr(n.target, "name") and n.target.name().startswith("paca_kernels::")}
    assert {"paca_kernels::conv_paca_layer", "paca_kernels::mlp_fused"} <= ops, ops


def test_import_does_not_import_onnx() -> None:
    code = "import sys, paca_kernels; print(sorted(m for m in sys.modules if m.split('.')[0] in "
    code += "('onnx', 'onnxscript', 'onnxruntime')))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert res.stdout.strip() == "[]", res.stdout


# -- ONNX --------------------------------------------------------------------------------------------


@needs_ext
@needs_onnx
def test_onnx_dynamic_batch(tmp_path: Path) -> None:
    """deploy.export_onnx: eval, no_grad (the fused ops), batch dynamic; run at two other batches."""
    model = small_vit()
    path = tmp_path / "small.onnx"
    deploy.export_onnx(model, (torch.randn(2, 3, 64, 64),), path)
    for b in (1, 3):
        x = torch.randn(b, 3, 64, 64)
        with torch.no_grad():
            want = model(x)
        assert rel_err(deploy.run_onnx(path, (x,))[0], want) <= 1e-4


@needs_onnx
@pytest.mark.skipif(not TRITON_TWINS, reason="Triton does not import: no Triton twin ops")
def test_onnx_triton_backend_model(tmp_path: Path) -> None:
    """A model on the triton backend (its graph holds the Triton twin ops; run here under the
    interpreter) exports and runs in ONNX Runtime with the model's outputs."""
    torch.manual_seed(0)
    model = PaCaViT(num_classes=10, img_size=64, arch_cfg={**ARCH, "depths": [1, 1, 1, 1]},
                    paca_cfg={"clusters": [4, 5, 6, 0]}, backend="triton").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        graph = torch.export.export(model, (x,)).graph
    targets = {str(n.target) for n in graph.nodes if n.op == "call_function"}
    assert {"paca_kernels.cluster_pool_fwd_triton.default", "paca_kernels.p2c_attention_fwd_triton.default"} <= targets
    path = tmp_path / "triton.onnx"
    deploy.export_onnx(model, (x,), path, check=False)
    with torch.no_grad():
        want = model(x)
    assert rel_err(deploy.run_onnx(path, (x,))[0], want) <= 1e-4


@needs_ext
@needs_onnx
def test_onnx_plain_call_teacher_model(tmp_path: Path) -> None:
    """The plain exporter call, gradients enabled (so the differentiable ops are traced), on the
    clustering teacher (as the pacavit_convmixer_* variants: BatchNorm, bilinear upsampling, the
    teacher's assignments shared by every block)."""
    torch.manual_seed(0)
    teacher = {"type": "PaCaTeacher_ConvMixer", "stem_cfg": None, "embed_dims": ARCH["embed_dims"],
               "depths": [1, 1, 1, 1]}
    model = PaCaViT(num_classes=10, img_size=64, arch_cfg=ARCH, paca_cfg={"clusters": [4, 5, 3, 2]},
                    paca_teacher_cfg=teacher).eval()
    x = torch.randn(2, 3, 64, 64)
    path = tmp_path / "teacher.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    with torch.no_grad():
        want = model(x)
    assert rel_err(deploy.run_onnx(path, (x,))[0], want) <= 1e-4


@needs_ext
@needs_onnx
def test_onnx_features_only_and_segmentor(tmp_path: Path) -> None:
    """A features_only backbone (four maps) at a non-square dense-prediction size, and a PaCaSegmentor
    with small channels; export_onnx checks every output in ONNX Runtime itself."""
    torch.manual_seed(0)
    backbone = PaCaViT(num_classes=0, img_size=64, arch_cfg=ARCH, paca_cfg={"clusters": [4, 5, 6, 0]},
                       out_indices=[0, 1, 2, 3])
    deploy.export_onnx(backbone, (torch.randn(1, 3, 96, 128),), tmp_path / "features.onnx")
    seg = PaCaSegmentor(backbone, PaCaSegHead(ARCH["embed_dims"], num_classes=5, channels=16))
    deploy.export_onnx(seg, (torch.randn(1, 3, 64, 96),), tmp_path / "seg.onnx", dynamic_batch=False)


# -- AOTInductor -------------------------------------------------------------------------------------

_FRESH = textwrap.dedent("""
    import sys, torch
    pt2, lib, inp, out = sys.argv[1:]
    try:
        torch._inductor.aoti_load_package(pt2)
        print("loaded without the op library")
        sys.exit(1)
    except RuntimeError as exc:
        assert "paca_kernels::" in str(exc), exc
    torch.ops.load_library(lib)
    x, want = torch.load(inp), torch.load(out)
    got = torch._inductor.aoti_load_package(pt2)(x)
    err = ((got - want).abs().max() / want.abs().max()).item()
    print(err)
    sys.exit(0 if err <= 1e-5 else 1)
""")


@needs_ext
def test_aoti_package(tmp_path: Path) -> None:
    """deploy.export_aoti: the package matches eager at two batch sizes, and in a fresh process it
    needs (and runs with) only the op library paca_kernels._C: the ops are extern kernels."""
    model = small_vit(depths=[1, 1, 1, 1])  # one block a stage: the C++ compilation takes most of the time
    # -O0 for the generated wrapper: the test checks what the package calls, not its speed.
    pt2 = deploy.export_aoti(model, (torch.randn(2, 3, 64, 64),), tmp_path / "small.pt2", max_batch=8,
                             inductor_configs={"aot_inductor.compile_wrapper_opt_level": "O0"})
    runner = deploy.load_aoti(pt2)
    for b in (1, 3):
        x = torch.randn(b, 3, 64, 64)
        with torch.no_grad():
            assert rel_err(runner(x), model(x)) <= 1e-5
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.save(x, tmp_path / "x.pt")
        torch.save(model(x), tmp_path / "y.pt")
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    lib = importlib.util.find_spec("paca_kernels._C").origin  # the op library's file
    res = subprocess.run([sys.executable, str(script), pt2, lib, str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, res.stdout + res.stderr


def test_export_max_batch_bounds() -> None:
    """max_batch = 1 exports a static batch (torch.export cannot make a Dim with min = max = 1: the
    deployment benchmark at B = 1 failed there); a max_batch below 1, or below the example's batch,
    is a ValueError before any tracing."""
    model = small_vit(depths=[1, 1, 1, 1])
    ep = deploy._export(model, (torch.randn(1, 3, 64, 64),), True, 1)
    (name,) = ep.graph_signature.user_inputs
    (inp,) = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name == name]
    assert tuple(inp.meta["val"].shape) == (1, 3, 64, 64)
    assert all(isinstance(d, int) for d in inp.meta["val"].shape)  # no symbolic batch
    for bad in (0, -3, 2.0, True):
        with pytest.raises(ValueError, match="max_batch"):
            deploy.export_aoti(model, (torch.randn(1, 3, 64, 64),), "unused.pt2", max_batch=bad)
    with pytest.raises(ValueError, match="exceeds max_batch=2"):
        deploy.export_aoti(model, (torch.randn(3, 3, 64, 64),), "unused.pt2", max_batch=2)

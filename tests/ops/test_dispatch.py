"""paca_kernels.ops.dispatch: which backend serves a call (argument, environment variable, automatic
priority), the errors that list every backend's reasons, and the ops under autocast. The ops
themselves, on every backend: tests/ops/test_cluster_pool.py and tests/ops/test_p2c_attention.py."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from paca_kernels import _ext, ops, reference
from paca_kernels.ops import BackendError
from paca_kernels.ops import dispatch as _backends
from paca_kernels.ops.backends import cuda
from paca_kernels.testing import (
    BACKEND_NAMES,
    assert_close,
    assert_low_precision_ok,
    backend_device,
    make_cluster_pool_inputs,
    make_p2c_inputs,
    require_backend,
)

needs_ext = pytest.mark.skipif(not _ext.load(), reason=f"C++ extension: {_ext.unavailable_reason()}")


# -- selection --------------------------------------------------------------------------------------


def test_automatic_choice_on_cpu_is_the_cpu_backend_then_reference(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    inp = make_cluster_pool_inputs(1, 2, 3, 4)
    want = "cpu" if _ext.load() else "reference"
    assert ops.select_backend("cluster_pool", (inp.logits, inp.x), None).name == want
    # Without the extension the reference serves the call.
    monkeypatch.setattr(ops.get_backend("cpu"), "availability", lambda: "extension disabled for the test")
    assert ops.select_backend("cluster_pool", (inp.logits, inp.x), None).name == "reference"


def test_unknown_backend_lists_known_ones():
    inp = make_cluster_pool_inputs(1, 2, 3, 4)
    with pytest.raises(ValueError, match="unknown paca_kernels backend 'nope'.*reference"):
        ops.cluster_pool(inp.logits, inp.x, backend="nope")


@pytest.fixture
def pool_only_backend(monkeypatch):
    """A registered backend that serves cluster_pool only (what a partial backend looks like)."""
    backend = ops.Backend(
        name="pool-only", description="test backend", device_types=("cpu",), dtypes=(torch.float32,),
        impls={"cluster_pool": reference.cluster_pool},
    )
    monkeypatch.setitem(_backends._REGISTRY, "pool-only", backend)
    return backend


def test_explicit_backend_that_cannot_serve_lists_every_reason(pool_only_backend):
    p = make_p2c_inputs(1, 3, 2, 1, 8)
    with pytest.raises(BackendError) as info:
        ops.p2c_attention(p.q, p.k, p.v, backend="pool-only")
    msg = str(info.value)
    assert "backend='pool-only'" in msg and "p2c_attention" in msg
    assert "pool-only: has no p2c_attention implementation" in msg
    for name in ops.backend_names():
        assert f"  {name}: " in msg
    assert "reference: can serve this call" in msg
    # A float64 call: the dtype reason is listed too.
    p64 = make_p2c_inputs(1, 3, 2, 1, 8, dtype=torch.float64)
    with pytest.raises(BackendError, match="pool-only: has no p2c_attention"):
        ops.p2c_attention(p64.q, p64.k, p64.v, backend="pool-only")
    inp = make_cluster_pool_inputs(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(BackendError, match=r"pool-only: does not support float64 \(supports float32\)"):
        ops.cluster_pool(inp.logits, inp.x, backend="pool-only")


def test_env_var_selects_and_is_strict(monkeypatch, pool_only_backend):
    p = make_p2c_inputs(1, 3, 2, 1, 8)
    monkeypatch.setenv(ops.ENV_VAR, "pool-only")
    with pytest.raises(BackendError, match=f"{ops.ENV_VAR}="):
        ops.p2c_attention(p.q, p.k, p.v)
    # A preference list falls through to the first backend that can serve the call.
    monkeypatch.setenv(ops.ENV_VAR, "pool-only,reference")
    assert_close(ops.p2c_attention(p.q, p.k, p.v), reference.p2c_attention(p.q, p.k, p.v))
    # The argument wins over the environment.
    monkeypatch.setenv(ops.ENV_VAR, "nope")
    ops.p2c_attention(p.q, p.k, p.v, backend="reference")


def test_preferred_backend_is_the_first_available_on_the_device(monkeypatch):
    """What the layers ask before taking their fused CPU inference path: metadata only."""
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.preferred_backend(None, "cpu") == ("cpu" if _ext.load() else "reference")
    assert ops.preferred_backend("reference", "cpu") == "reference"
    assert ops.preferred_backend("cuda,reference", "cpu") == "reference"  # cuda does not run on the CPU
    assert ops.preferred_backend("cuda", "cpu") is None
    assert ops.preferred_backend("nope", "cpu") is None  # the op call raises the error naming the backends
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.preferred_backend(None, "cpu") == "reference"
    monkeypatch.setattr(ops.get_backend("cpu"), "availability", lambda: "extension disabled for the test")
    assert ops.preferred_backend("cpu,reference", "cpu") == "reference"


def test_backend_status_reports_every_backend():
    status = ops.backend_status()
    assert status["reference"] is None
    assert set(status) == set(ops.backend_names())
    if not _ext.load():
        assert status["cpu"] == _ext.unavailable_reason()


def test_functional_ops_default_to_the_automatic_backend(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    inp = make_cluster_pool_inputs(2, 5, 11, 6)
    auto = ops.select_backend("cluster_pool", (inp.logits, inp.x), None).name
    assert_close(  # bitwise: the default call is the automatic backend's call
        ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias),
        ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias, backend=auto),
        rtol=0, atol=0,
    )
    assert_close(
        ops.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias),
        reference.cluster_pool(inp.logits, inp.x, inp.weight, inp.bias),
    )
    p = make_p2c_inputs(2, 7, 3, 2, 8)
    assert_close(ops.p2c_attention(p.q, p.k, p.v, 0.5), reference.p2c_attention(p.q, p.k, p.v, 0.5))


# -- autocast: the ops run in the autocast dtype, on every backend that serves it -----------------------------------------------------------------------------------------

AUTOCAST_BACKENDS = ["reference", pytest.param("cpu", marks=needs_ext)]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_ops_run_in_the_autocast_dtype(backend):
    b = ops.get_backend(backend)
    require_backend(b)
    device = backend_device(backend)
    inp = make_cluster_pool_inputs(2, 5, 11, 8, device=device, requires_grad=True)
    p = make_p2c_inputs(2, 9, 5, 2, 8, device=device, requires_grad=True)
    require_backend(b, "p2c_attention", tuple(t.detach().to(torch.bfloat16) for t in (p.q, p.k, p.v)))
    with torch.autocast(device, dtype=torch.bfloat16):
        # Mixed input dtypes, as autocast produces them (a conv's bf16 logits, fp32 LayerNorm output).
        pooled = ops.cluster_pool(inp.logits.to(torch.bfloat16), inp.x, inp.weight, inp.bias, backend=backend)
        attn = ops.p2c_attention(p.q, p.k.to(torch.bfloat16), p.v, backend=backend)
    assert pooled.dtype == torch.bfloat16 and attn.dtype == torch.bfloat16
    exact = reference.cluster_pool(*(t.detach().double() for t in (inp.logits, inp.x, inp.weight, inp.bias)))
    low = reference.cluster_pool(*(t.detach().to(torch.bfloat16) for t in (inp.logits, inp.x, inp.weight,
                                                                           inp.bias)))
    assert_low_precision_ok(pooled, low, exact, factor=b.low_precision_factor)
    exact = reference.p2c_attention(*(t.detach().double() for t in (p.q, p.k, p.v)))
    low = reference.p2c_attention(*(t.detach().to(torch.bfloat16) for t in (p.q, p.k, p.v)))
    assert_low_precision_ok(attn, low, exact, factor=b.low_precision_factor)
    (pooled.float().sum() + attn.float().sum()).backward()
    for t in (inp.logits, inp.x, inp.weight, inp.bias, p.q, p.k, p.v):
        assert t.grad is not None and t.grad.dtype == torch.float32 and torch.isfinite(t.grad).all()


@needs_ext
def test_autocast_compiles_fullgraph():
    torch._dynamo.reset()

    def f(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return ops.p2c_attention(q, k, v, backend="cpu")

    p = make_p2c_inputs(1, 7, 3, 2, 8)
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(p.q, p.k, p.v)
    assert out.dtype == torch.bfloat16
    assert_close(out, f(p.q, p.k, p.v))


@pytest.mark.parametrize("backend", AUTOCAST_BACKENDS)
def test_model_forward_under_autocast(backend):
    from paca_kernels import create_model

    model = create_model("pacavit_tiny_p2cconv_100_0", num_classes=5, backend=backend).eval()
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(images)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = model(images)
    assert torch.isfinite(got).all()
    assert float((got.float() - want).abs().max() / want.abs().max()) < 0.05


@needs_ext
def test_paper_macs_hold_with_the_fused_cpu_backend():
    from paca_kernels import create_model

    def macs(backend: str) -> int:
        model = create_model("pacavit_tiny_p2cconv_100_0", backend=backend).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.randn(1, 3, 224, 224))
        return fc.get_total_flops() // 2

    assert macs("cpu") == macs("reference") == 3_219_262_208  # the official count (compat README)


def test_cuda_limits_come_from_the_build_info(monkeypatch):
    """The cuda backend refuses shapes past the kernels' limits, read from the build info
    (csrc/cuda/limits.h through _build_info.json), not restated in Python: a different recorded
    limit changes the refusal."""
    lim = cuda.limits()
    if lim is None:
        pytest.skip("no _build_info.json (extension not built)")
    check = cuda.BACKEND.limits["p2c_attention"]
    q = torch.empty(1, 4, 1, 8, device="meta")
    fits = torch.empty(1, lim["max_keys"], 1, 8, device="meta")
    over = torch.empty(1, lim["max_keys"] + 1, 1, 8, device="meta")
    assert check((q, fits, fits)) == []
    assert check((q, over, over)) == [
        f"p2c_attention holds all keys on chip: M = {lim['max_keys'] + 1} > {lim['max_keys']}"]
    wide = torch.empty(1, 3, lim["max_channels"] + 1, device="meta")
    assert any(f"C = {lim['max_channels'] + 1}" in r
               for r in cuda.BACKEND.limits["cluster_pool"]((torch.empty(1, 1, 3, device="meta"), wide)))
    monkeypatch.setattr(_ext, "kernel_limits", lambda device: {**lim, "max_keys": 4})
    assert check((q, fits, fits)) == [
        f"p2c_attention holds all keys on chip: M = {lim['max_keys']} > 4"]
    monkeypatch.setattr(_ext, "kernel_limits", lambda device: None)
    assert "no CUDA kernel limits" in check((q, fits, fits))[0]


# -- empty inputs: the validation layer gives every backend the same call -------------------------------

P2C_EMPTY = {"B0": (0, 5, 3, 2, 4), "N0": (2, 0, 3, 2, 4), "h0": (2, 5, 3, 0, 4), "d0": (2, 5, 3, 2, 0)}


@pytest.mark.parametrize("shape", P2C_EMPTY.values(), ids=P2C_EMPTY.keys())
@pytest.mark.parametrize("name", [*BACKEND_NAMES, None], ids=[*BACKEND_NAMES, "auto"])
def test_p2c_empty_inputs_agree_on_every_backend(name, shape):
    """B, N, h or d = 0 (B, N, M, h, d): every backend (and the automatic choice) returns the reference's
    empty output, and zero gradients. d = 0 has no default scale d^-1/2 (it raised ZeroDivisionError on
    every backend): every score is an empty dot product, 0, whatever the scale, so 1 is used."""
    device = backend_device(name) if name is not None else "cpu"
    if name is not None:
        require_backend(ops.get_backend(name))
    inp = make_p2c_inputs(*shape, device=device, requires_grad=True)
    args = (inp.q, inp.k, inp.v)
    out = ops.p2c_attention(*args, backend=name)
    want = reference.p2c_attention(*[t.detach() for t in args], 1.0)
    assert out.shape == want.shape and out.dtype == want.dtype
    out.sum().backward()
    for t in args:
        assert torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("name", [*BACKEND_NAMES, None], ids=[*BACKEND_NAMES, "auto"])
def test_p2c_no_clusters_is_a_value_error_on_every_backend(name):
    """M = 0: a softmax over no clusters is undefined; the same ValueError on every backend."""
    device = backend_device(name) if name is not None else "cpu"
    if name is not None:
        require_backend(ops.get_backend(name))
    q, kv = torch.randn(2, 5, 2, 4, device=device), torch.randn(2, 0, 2, 4, device=device)
    with pytest.raises(ValueError, match=r"at least one cluster \(M >= 1\)"):
        ops.p2c_attention(q, kv, kv, backend=name)


# -- the cpu backend's measured table of slower regimes ----------------------------------------------


@needs_ext
def test_automatic_choice_passes_the_cpu_backend_over_where_its_table_says(monkeypatch):
    """A row of ``SLOWER_THAN_REFERENCE`` sends the automatic choice to the reference for the calls it
    covers (op, grad mode, N and channel ranges, float32), and only those; a named backend still runs."""
    from paca_kernels.ops.backends import cpu

    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    row = cpu.SlowerRegime("cluster_pool", grad=True, n=(10, 20), channels=(8, 8), speed=0.9, source="x.json")
    monkeypatch.setattr(cpu, "SLOWER_THAN_REFERENCE", (row,))
    inp = make_cluster_pool_inputs(1, 3, 12, 8)
    args = (inp.logits.requires_grad_(True), inp.x)
    assert ops.select_backend("cluster_pool", args, None).name == "reference"
    assert ops.select_backend("cluster_pool", args, "cpu").name == "cpu"
    assert "measured slower than the reference" in ops.get_backend("cpu").auto_skip_reason("cluster_pool", args, True)
    # The functional op follows the choice: the reference backend's bits.
    assert torch.equal(ops.cluster_pool(*args), ops.cluster_pool(*args, backend="reference"))
    with torch.no_grad():  # no backward recorded: the grad=True row does not apply
        assert ops.select_backend("cluster_pool", args, None).name == "cpu"
    inp.logits.requires_grad_(False)
    assert ops.select_backend("cluster_pool", (inp.logits, inp.x), None).name == "cpu"
    for b, m, n, c in [(1, 3, 21, 8), (1, 3, 12, 9)]:  # outside the N or the channel range
        other = make_cluster_pool_inputs(b, m, n, c, requires_grad=True)
        assert ops.select_backend("cluster_pool", (other.logits, other.x), None).name == "cpu"
    double = make_cluster_pool_inputs(1, 3, 12, 8, dtype=torch.float64, requires_grad=True)
    assert ops.select_backend("cluster_pool", (double.logits, double.x), None).name == "cpu"  # fp32 table
    p = make_p2c_inputs(1, 12, 3, 2, 4, requires_grad=True)  # another op: not covered
    assert ops.select_backend("p2c_attention", (p.q, p.k, p.v), None).name == "cpu"


@needs_ext
def test_automatic_choice_with_the_table_compiles_fullgraph(monkeypatch):
    from paca_kernels.ops.backends import cpu

    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    row = cpu.SlowerRegime("p2c_attention", grad=True, n=(1, 100), channels=(1, 64), speed=0.9, source="x.json")
    monkeypatch.setattr(cpu, "SLOWER_THAN_REFERENCE", (row,))
    p = make_p2c_inputs(1, 12, 3, 2, 4, requires_grad=True)
    fn = torch.compile(ops.p2c_attention, backend="aot_eager", fullgraph=True)
    out = fn(p.q, p.k, p.v)
    out.sum().backward()
    assert_close(out, reference.p2c_attention(p.q, p.k, p.v), rtol=1e-5, atol=1e-6)


def test_the_cpu_table_rows_come_from_a_committed_measurement():
    """Every row names a results file under benchmarks/results/ that holds the op's group at that mode,
    with the cpu backend slower than the reference there, as the row says."""
    import json
    from pathlib import Path

    from paca_kernels.ops.backends import cpu

    results = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
    for row in cpu.SLOWER_THAN_REFERENCE:
        data = json.loads((results / row.source).read_text())
        mode = "fwd+bwd" if row.grad else "fwd"
        rows = [r for r in data["benchmarks"] if r["extra_info"].get("op") == row.op
                and r["extra_info"].get("mode") == mode and row.n[0] <= r["extra_info"]["N"] <= row.n[1]]
        assert rows, row
        by_group: dict[str, dict[str, float]] = {}
        for r in rows:
            by_group.setdefault(r["group"], {})[r["extra_info"]["provider"]] = r["stats"]["median"]
        assert any(g["reference"] / g["cpu"] < 1.0 for g in by_group.values()), row

"""The C++ CPU kernels' output cache (csrc/cpu/output_pool.h): outputs of 256 KiB and more reuse
blocks that earlier outputs freed, so that they are not page-faulted in again on every call.

What it must never do: hand a kernel memory that still holds an earlier result the kernel then
fails to overwrite. So every op with pooled outputs runs twice here, its first outputs filled with
NaN and freed in between (the second call then gets those very blocks: the cache is last in, first
out per size), and the second outputs must equal the first bit for bit (the kernels are
deterministic). Also: the cache's accounting and cap, the environment variable (off, small cap,
bad value), and that pooled tensors are ordinary CPU tensors (resize, share_memory_, save/load,
threads, a forked child)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch

from paca_kernels import ops, testing

pytestmark = pytest.mark.extension

OPS = torch.ops.paca_kernels
MIN_BYTES = 256 << 10


@pytest.fixture(autouse=True)
def _empty_cache():
    ops.cpu_output_cache_clear()
    yield
    ops.cpu_output_cache_clear()


def _g(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape) + 1000 * seed))


def _p2c() -> tuple[torch.Tensor, ...]:
    q, k, v = _g(2, 1000, 2, 40), _g(2, 49, 2, 40), _g(2, 49, 2, 40) * 0.5
    out, _ = OPS.p2c_attention_fwd(q, k, v, 0.15)
    return (out, *OPS.p2c_attention_bwd(_g(2, 1000, 2, 40), q, k, v, 0.15, True))


def _p2c_out() -> torch.Tensor:
    q, k = _g(2, 1000, 2, 40), _g(2, 49, 2, 40)
    return OPS.p2c_attention_fwd(q, k, k, 0.15)[0]  # 625 KiB


def _pool() -> tuple[torch.Tensor, ...]:
    logits, x = _g(2, 49, 1500), _g(2, 1500, 37)
    w, b = 1 + 0.1 * _g(37), 0.1 * _g(37, seed=1)
    out, pooled, stats = OPS.cluster_pool_fwd(logits, x, w, b, 1e-5)
    dl, dx, _, _ = OPS.cluster_pool_bwd(_g(2, 49, 37), logits, x, w, pooled, stats, 1e-5)
    return out, dl, dx


def _dwconv() -> tuple[torch.Tensor, ...]:
    x, w, b, ib = _g(2, 900, 70), _g(70, 1, 3, 3), _g(70), _g(70, seed=1)
    y = OPS.mlp_dwconv(x, 30, 30, w, b, ib, True, True)
    return (y, OPS.mlp_dwconv_bwd(_g(2, 900, 70), x, 30, 30, w, b, ib, True, True)[0])


def _fused() -> tuple[torch.Tensor, ...]:
    x = _g(2, 900, 40)
    mlp = OPS.mlp_fused(x, 30, 30, _g(120, 40), _g(120), _g(120, 1, 3, 3), _g(120), False, True,
                        _g(44, 120), _g(44))
    attn = OPS.p2c_attention_proj(x, _g(2, 49, 40), _g(40, 40), _g(40), _g(40, 40), _g(40),
                                  _g(40, 40), _g(40), _g(40, 40), _g(40), 2, 0.2)
    head = OPS.conv_cluster_logits(x, 30, 30, _g(40, 1, 7, 7), _g(40), _g(40, 40, 1, 1), _g(40),
                                   _g(49, 40, 1, 1), _g(49))
    embed = OPS.patch_embed(_g(2, 60, 60, 24), _g(48, 24, 3, 3), _g(48), 2, 1, True, _g(48), _g(48), 1e-6)
    block_half = OPS.mlp_fused(x, 30, 30, _g(120, 40), _g(120), _g(120, 1, 3, 3), _g(120), False, True,
                               _g(40, 120), _g(40), True, _g(40), _g(40), 1e-6, True)
    norm1 = OPS.layer_norm(_g(2, 900, 40), _g(40), _g(40), 1e-6, torch.bfloat16)
    return mlp, attn, head, embed, block_half, norm1


@pytest.mark.parametrize("run", [_p2c, _pool, _dwconv, _fused], ids=lambda f: f.__name__.strip("_"))
def test_reused_blocks_are_overwritten(run: Callable[[], tuple[torch.Tensor, ...]]):
    first = run()
    pooled = [t for t in first if t.nbytes >= MIN_BYTES]
    assert pooled, "the shapes must give outputs the cache serves"
    expected = [t.clone() for t in first]
    for t in first:
        t.fill_(float("nan"))
    nbytes = sum(t.untyped_storage().nbytes() for t in pooled)
    del first, pooled, t
    cached = ops.cpu_output_cache()[0]
    assert cached >= nbytes  # the NaN-filled blocks wait in the cache
    second = run()
    assert ops.cpu_output_cache()[0] < cached  # and were handed out again
    for i, (a, b) in enumerate(zip(second, expected, strict=True)):
        assert torch.isfinite(a).all(), f"output {i}: NaN left in a reused block"
        assert torch.equal(a, b), f"output {i}"


def test_accounting_and_clear():
    out = _p2c_out()
    nbytes = out.untyped_storage().nbytes()
    cached, limit = ops.cpu_output_cache()
    assert cached == 0 and limit == 1024 << 20  # the default cap
    del out
    cached = ops.cpu_output_cache()[0]
    assert cached >= nbytes and cached % (64 << 10) == 0
    assert ops.cpu_output_cache_clear() == cached
    assert ops.cpu_output_cache() == (0, limit)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int32])
def test_reused_blocks_are_poisoned_like_at_empty(dtype: torch.dtype):
    """Under ``testing.poisoned_outputs()`` (torch's fill_uninitialized_memory) a cached block is
    filled as at::empty fills new memory (NaN, integers their largest value): without that, an
    element a kernel failed to write would show the previous output's value, and the tests'
    poisoning would not reach any output of 256 KiB or more."""
    n = (MIN_BYTES // torch.empty((), dtype=dtype).element_size()) * 2
    stale = OPS._cpu_empty_output([n], dtype)
    stale.fill_(7)
    ptr = stale.data_ptr()
    del stale
    plain = OPS._cpu_empty_output([n], dtype)  # the same block, as it was left (the cache at work)
    assert plain.data_ptr() == ptr and bool((plain == 7).all())
    del plain
    with testing.poisoned_outputs():
        out = OPS._cpu_empty_output([n], dtype)
    assert out.data_ptr() == ptr and out.shape == (n,) and out.dtype == dtype
    if dtype.is_floating_point:
        assert bool(torch.isnan(out).all())
    else:
        assert bool((out == torch.iinfo(dtype).max).all())


def test_pooled_tensors_behave_as_cpu_tensors(tmp_path):
    out = _p2c_out()
    ref = out.clone()
    assert out.is_contiguous() and out.device.type == "cpu"
    buf = io.BytesIO()
    torch.save(out, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf), ref)
    out.resize_(2 * out.numel())  # grows through the storage's allocator, keeping the data
    assert torch.equal(out[: ref.numel()].view_as(ref), ref)
    out2 = _p2c_out()
    out2.share_memory_()
    assert out2.is_shared() and torch.equal(out2, ref)


def test_threads_allocate_and_free_concurrently():
    expected = [t.clone() for t in _p2c()]
    errors: list[str] = []

    def work():
        for _ in range(5):
            got = _p2c()
            if not all(torch.equal(a, b) for a, b in zip(got, expected, strict=True)):
                errors.append("mismatch")

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_forked_child_uses_the_cache():
    expected = _p2c_out()
    del expected
    expected = _p2c_out()  # a block was cached and handed out again before the fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            torch.set_num_threads(1)
            ok = torch.equal(_p2c_out(), expected)
        finally:
            os._exit(0 if ok else 3)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _run_with_env(value: str, code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PACA_KERNELS_CPU_OUTPUT_CACHE_MB": value}
    prog = "import torch\nfrom paca_kernels import ops\nOPS = torch.ops.paca_kernels\n" + code
    return subprocess.run([sys.executable, "-c", prog], env=env, capture_output=True, text=True,
                          timeout=120, check=False)


def test_env_zero_turns_the_cache_off():
    proc = _run_with_env("0", (
        "q = torch.randn(2, 1000, 2, 40); k = torch.randn(2, 49, 2, 40)\n"
        "out = OPS.p2c_attention_fwd(q, k, k, 0.1)[0]\n"
        "del out\n"
        "print(tuple(ops.cpu_output_cache()))\n"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "(0, 0)"


def test_env_cap_keeps_only_what_fits():
    proc = _run_with_env("1", (
        "k = torch.randn(2, 49, 2, 40)\n"
        "big = OPS.p2c_attention_fwd(torch.randn(2, 4000, 2, 40), k, k, 0.1)[0]\n"   # 2.4 MiB
        "small = OPS.p2c_attention_fwd(torch.randn(2, 1000, 2, 40), k, k, 0.1)[0]\n"  # 0.6 MiB
        "del big\n"
        "print(ops.cpu_output_cache()[0])\n"
        "del small\n"
        "print(tuple(ops.cpu_output_cache()))\n"))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "0"  # over the 1 MiB cap: freed at once
    assert lines[1] == f"({640 << 10}, {1 << 20})"  # 625 KiB rounded to 64 KiB, kept


def test_env_bad_value_is_a_clear_error():
    proc = _run_with_env("lots", (
        "k = torch.randn(2, 49, 2, 40)\n"
        "OPS.p2c_attention_fwd(torch.randn(2, 1000, 2, 40), k, k, 0.1)\n"))
    assert proc.returncode != 0
    assert "PACA_KERNELS_CPU_OUTPUT_CACHE_MB must be a whole number of MiB" in proc.stderr

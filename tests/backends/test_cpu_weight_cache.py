"""The packed-weight cache of the CPU kernels (csrc/cpu/math/pack_cache.h): in inference the fused
kernels keep each weight's packed form (bf16 pair panels, float32 panels) across calls while the
weight is unchanged. What must hold: a cached call gives the bits of an uncached one; any change of
the weight that bumps its version (in-place updates, load_state_dict, writes through a view) is seen
at the next call; a new tensor at a freed weight's address is never mistaken for it; inference
tensors (no version counter) still work; and turning the cache off or capping it at 0 bytes changes
no bit. Each model is called three times before comparing: the first call records the weight, the
second packs it into the cache, the third reads it from there."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import paca_kernels.ops.fused.mlp_fused as mlp_op
from paca_kernels import PaCaAttention
from paca_kernels.nn.block import Mlp

pytestmark = pytest.mark.extension

BF16 = torch.bfloat16


def _mlp(C: int = 24, hidden: int = 101) -> Mlp:
    torch.manual_seed(C + hidden)
    m = Mlp(C, hidden, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
    return m


def _layer(C: int = 33, heads: int = 3, M: int = 7) -> PaCaAttention:
    torch.manual_seed(C + M)
    layer = PaCaAttention(C, heads, M, clustering="conv", backend="cpu").eval()
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    return layer


def _calls(f, n: int = 3) -> list[torch.Tensor]:
    with torch.no_grad():
        return [f() for _ in range(n)]


# (model maker, input shape (B, H, W, C), how the bf16 is asked for)
CASES = [(_mlp, (2, 5, 7, 24), mode) for mode in ("bf16", "autocast", "fp32")] + [
    (_layer, (2, 7, 5, 33), mode) for mode in ("bf16", "autocast", "fp32")]


def _run(model, x: torch.Tensor, H: int, W: int, mode: str) -> torch.Tensor:
    if mode == "autocast":
        with torch.autocast("cpu", dtype=BF16):
            out = model(x, H, W)
    else:
        out = model(x, H, W)
    return (out[0] if isinstance(out, tuple) else out).float()


def _prepare(make, shape, mode):
    B, H, W, C = shape
    model = make()
    x = torch.randn(B, H * W, C)
    if mode == "bf16":
        model, x = model.to(BF16), x.to(BF16)
    return model, x, H, W


@pytest.mark.parametrize(("make", "shape", "mode"), CASES,
                         ids=[f"{m.__name__[1:]}-{mode}" for m, _, mode in CASES])
def test_cached_calls_give_the_uncached_bits(make, shape, mode):
    model, x, H, W = _prepare(make, shape, mode)
    outs = _calls(lambda: _run(model, x, H, W, mode))
    fresh = _calls(lambda: _run(copy.deepcopy(model), x, H, W, mode), 1)[0]  # new storages: uncached
    for i, o in enumerate(outs):
        assert torch.isfinite(o).all()
        assert torch.equal(o, fresh), f"call {i}"


@pytest.mark.parametrize(("make", "shape", "mode"), CASES,
                         ids=[f"{m.__name__[1:]}-{mode}" for m, _, mode in CASES])
def test_in_place_weight_updates_are_seen(make, shape, mode):
    """Every 2-d and 4-d weight changed in place (through the parameter, and through a view of it),
    then the whole state replaced by load_state_dict: each time the next call must equal a fresh
    copy's (whose weights were never cached)."""
    model, x, H, W = _prepare(make, shape, mode)
    _calls(lambda: _run(model, x, H, W, mode))
    weights = [p for p in model.parameters() if p.dim() >= 2]
    assert weights
    with torch.no_grad():
        for p in weights[::2]:
            p.mul_(-0.75)
        for p in weights[1::2]:
            p.view(p.shape[0], -1)[:, 0] += 0.5  # through a view: same version counter
    got = _calls(lambda: _run(model, x, H, W, mode))
    want = _calls(lambda: _run(copy.deepcopy(model), x, H, W, mode), 1)[0]
    for o in got:
        assert torch.equal(o, want)
    before = got[-1]
    other = make()
    if mode == "bf16":
        other = other.to(BF16)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(1.5)
    model.load_state_dict(other.state_dict())
    got = _calls(lambda: _run(model, x, H, W, mode))
    want = _calls(lambda: _run(other, x, H, W, mode), 1)[0]
    assert not torch.equal(want, before)
    for o in got:
        assert torch.equal(o, want)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_a_new_weight_at_a_freed_weights_address_is_not_mistaken_for_it(dtype):
    """New weights over one and the same memory (torch.frombuffer: a new storage each time, the same
    data pointer, shape and version), each filled with new values and the previous one dropped:
    each must be packed anew. Then fresh weights made and dropped in a loop, as the allocator hands
    them out."""
    torch.manual_seed(0)
    B, H, W, C, hidden = 1, 4, 5, 16, 48
    x = torch.randn(B, H * W, C, dtype=dtype)
    dw = torch.randn(hidden, 1, 3, 3, dtype=dtype)
    w2 = torch.randn(C, hidden, dtype=dtype)
    mem = bytearray(hidden * C * dtype.itemsize)

    def mlp(w1: torch.Tensor) -> torch.Tensor:
        return mlp_op.mlp_fused(x, H, W, w1, None, dw, None, True, True, w2, None)

    prev = None
    for i in range(5):
        w1 = torch.frombuffer(mem, dtype=dtype).view(hidden, C)
        with torch.no_grad():
            w1.copy_(torch.randn(hidden, C))
        assert w1._version == 1

        got = _calls(functools.partial(mlp, w1))
        want = _calls(functools.partial(mlp, w1.clone()), 1)[0]
        assert prev is None or not torch.equal(want, prev)
        for o in got:
            assert torch.equal(o, want), f"weight {i}"
        prev = want
        del w1, got
    for i in range(5):
        w1 = torch.randn(hidden, C, dtype=dtype)
        got = _calls(functools.partial(mlp, w1))
        want = _calls(functools.partial(mlp, w1.clone()), 1)[0]
        for o in got:
            assert torch.equal(o, want), f"fresh weight {i}"
        del w1, got


def test_inference_tensors_are_not_cached_but_work():
    """Weights made under torch.inference_mode have no version counter: never cached, same bits."""
    m = _mlp().to(BF16)
    x = torch.randn(2, 35, 24, dtype=BF16)
    want = _calls(lambda: m(x, 5, 7), 1)[0]
    with torch.inference_mode():
        mi = copy.deepcopy(m)
        for p in mi.parameters():
            p.data = p.data.clone()  # inference tensors
        assert all(p.is_inference() for p in mi.parameters())
        outs = [mi(x, 5, 7) for _ in range(3)]
    for o in outs:
        assert torch.equal(o, want)


_SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
from test_cpu_weight_cache import CASES, _prepare, _run, _calls
outs = []
torch.manual_seed(1)
for make, shape, mode in CASES:
    model, x, H, W = _prepare(make, shape, mode)
    outs += _calls(lambda: _run(model, x, H, W, mode))
torch.save(outs, sys.argv[1])
"""


def test_cache_off_or_capped_gives_the_same_bits(tmp_path):
    """PACA_KERNELS_WEIGHT_CACHE=0 (off) and PACA_KERNELS_WEIGHT_CACHE_MB=0 (nothing fits) against
    the default, each in a process of its own (both are read once)."""
    script = _SCRIPT.format(here=str(Path(__file__).resolve().parent))
    results = {}
    for name, extra in {"default": {}, "off": {"PACA_KERNELS_WEIGHT_CACHE": "0"},
                        "cap0": {"PACA_KERNELS_WEIGHT_CACHE_MB": "0"}}.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("PACA_KERNELS_WEIGHT_CACHE")}
        env.update(extra)
        path = tmp_path / f"{name}.pt"
        proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        results[name] = torch.load(path)
    for name in ("off", "cap0"):
        assert len(results[name]) == len(results["default"])
        for i, (a, b) in enumerate(zip(results[name], results["default"], strict=True)):
            assert torch.equal(a, b), f"{name}: output {i}"

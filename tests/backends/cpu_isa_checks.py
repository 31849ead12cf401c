"""Checks of the C++ CPU kernels run in a process of their own, with the build capped by
``PACA_KERNELS_CPU_ISA`` (read once, at first use): test_cpu_isa.py runs this file as a script.

- ``python cpu_isa_checks.py``: every float32 kernel against float64 or the reference (the differentiable
  ops with their gradients, and the six inference fusions), and the kernels' GELU; prints "isa ok".
- ``python cpu_isa_checks.py outputs PATH``: every kernel that multiplies matrices, forward and
  backward, on shapes with ragged tiles, saved to PATH (the AVX-512 and AVX2 builds must agree bitwise).
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F

from paca_kernels import PaCaAttention, ops, reference
from paca_kernels.nn._fusion import conv_head_tensors
from paca_kernels.nn.block import DWConv, Mlp
from paca_kernels.nn.clustering import P2CConv2d
from paca_kernels.ops.fused.conv_cluster_logits import conv_cluster_logits
from paca_kernels.ops.fused.layer_norm import layer_norm
from paca_kernels.ops.fused.linear import linear
from paca_kernels.ops.fused.mlp_dwconv import mlp_dwconv
from paca_kernels.ops.fused.mlp_fused import mlp_fused
from paca_kernels.ops.fused.patch_embed import patch_embed
from paca_kernels.testing import assert_close, clone_leaves, make_cluster_pool_inputs, make_p2c_inputs


def check_ops() -> None:
    """p2c_attention and cluster_pool on the cpu backend: forward and every gradient."""
    for shape in [(2, 37, 13, 2, 24), (1, 70, 100, 1, 40)]:
        a = make_p2c_inputs(*shape, requires_grad=True)
        b = clone_leaves((a.q, a.k, a.v))
        ops.p2c_attention(a.q, a.k, a.v, backend="cpu").square().sum().backward()
        reference.p2c_attention(*b).square().sum().backward()
        for s, d in zip((a.q, a.k, a.v), b, strict=True):
            assert_close(s.grad, d.grad, rtol=1e-4, atol=2e-5)
    for shape, patch_major in [((2, 5, 150, 24), False), ((1, 100, 70, 40), False), ((2, 13, 300, 24), True)]:
        a = make_cluster_pool_inputs(*shape)
        logits = a.logits
        if patch_major:  # the clustering heads' layout, strides (N M, 1, M): the tiles are transposed
            logits = logits.transpose(1, 2).contiguous().transpose(1, 2)
        args = tuple(t.requires_grad_(True) for t in (logits, a.x, a.weight, a.bias))
        b = clone_leaves(args)
        out = ops.cluster_pool(*args, backend="cpu")
        ref = reference.cluster_pool(*b)
        assert_close(out, ref, rtol=1e-5, atol=2e-5)
        out.square().sum().backward()
        ref.square().sum().backward()
        for s, d in zip(args, b, strict=True):
            assert_close(s.grad, d.grad, rtol=1e-4, atol=5e-5)


def check_conv_cluster_logits() -> None:
    for B, H, W, C, M, k in [(2, 7, 9, 40, 49, 7), (1, 5, 6, 20, 3, 3)]:
        head = P2CConv2d(C, M, kernel_size=k)
        x = torch.randn(B, H * W, C)
        with torch.no_grad():
            out = conv_cluster_logits(x, H, W, *conv_head_tensors(head.clustering)).double()
            exact = head.double()(x.double(), H, W)
        err = (out - exact).abs().max().item()
        assert err < 1e-5, ("conv_cluster_logits", err)


def check_p2c_attention_proj() -> None:
    for B, N, C, h, d, M in [(2, 70, 24, 3, 7, 49), (1, 5, 16, 2, 8, 3)]:
        x, c = torch.randn(B, N, C).double(), torch.randn(B, M, C).double()
        w = [torch.randn(h * d, C).double() / C**0.5 for _ in range(3)]
        b = [torch.randn(h * d).double() for _ in range(3)]
        wp, bp = torch.randn(C, h * d).double() / (h * d) ** 0.5, torch.randn(C).double()
        args = (x, c, w[0], b[0], w[1], b[1], w[2], b[2], wp, bp)
        out = torch.ops.paca_kernels.p2c_attention_proj(*(t.float() for t in args), h, 1 / math.sqrt(d)).double()
        q = F.linear(x, w[0], b[0]).view(B, N, h, d)
        k = F.linear(c, w[1], b[1]).view(B, M, h, d)
        v = F.linear(c, w[2], b[2]).view(B, M, h, d)
        s = torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(d)
        o = torch.einsum("bhnm,bmhd->bnhd", s.softmax(-1), v).reshape(B, N, h * d)
        err = (out - F.linear(o, wp, bp)).abs().max().item()
        assert err < 1e-5, ("p2c_attention_proj", err)


def check_conv_paca_layer() -> None:
    for B, H, W, C, h, M in [(2, 5, 7, 24, 3, 10), (1, 3, 4, 16, 2, 49)]:
        layer = PaCaAttention(C, h, M, clustering="conv", backend="cpu").eval()
        ref = PaCaAttention(C, h, M, clustering="conv", backend="reference").eval().double()
        ref.load_state_dict(layer.state_dict())
        x = torch.randn(B, H * W, C)
        with torch.no_grad():
            out, z = layer(x, H, W)
            rout, rz = ref(x.double(), H, W)
        err = max((out.double() - rout).abs().max().item(), (z.double() - rz).abs().max().item())
        assert err < 1e-5, ("conv_paca_layer", err)


def check_mlp_dwconv() -> None:
    for B, H, W, C in [(2, 7, 9, 40), (1, 5, 6, 20)]:
        m = DWConv(C, with_shortcut=True)
        x, b1 = torch.randn(B, H * W, C), torch.randn(C)
        with torch.no_grad():
            out = mlp_dwconv(x, H, W, m.dwconv.weight, m.dwconv.bias, b1, True, True).double()
            exact = F.gelu(m.double()(x.double() + b1.double(), H, W))
        err = (out - exact).abs().max().item()
        assert err < 1e-5, ("mlp_dwconv", err)


def check_mlp_dwconv_bwd() -> None:
    """mlp_dwconv's backward (mlp_dwconv_bwd): every gradient against the float64 modules, on a
    grid of one band and one of two (over 2048 patches), k = 3 and 7, channel tails."""
    for B, H, W, C, k in [(2, 7, 9, 40, 3), (1, 70, 31, 13, 3), (1, 9, 11, 21, 7)]:
        m = DWConv(C, kernel_size=k, with_shortcut=True)
        x = torch.randn(B, H * W, C, requires_grad=True)
        b1 = torch.randn(C, requires_grad=True)
        gy = torch.randn(B, H * W, C)
        w, b = m.dwconv.weight, m.dwconv.bias
        got = torch.autograd.grad(mlp_dwconv(x, H, W, w, b, b1, True, True), (x, w, b, b1), gy)
        md = DWConv(C, kernel_size=k, with_shortcut=True).double()
        md.load_state_dict(m.state_dict())
        xd, b1d = x.detach().double().requires_grad_(), b1.detach().double().requires_grad_()
        exact = F.gelu(md(xd + b1d, H, W))
        want = torch.autograd.grad(exact, (xd, md.dwconv.weight, md.dwconv.bias, b1d), gy.double())
        for g, e in zip(got, want, strict=True):
            assert_close(g.double(), e, rtol=1e-4, atol=1e-4 * (1 + e.abs().max().item()))


def check_gelu_grad() -> None:
    """The backward's GELU derivative (rational erf, Cephes exp) against float64, tails and NaN: with
    zero taps and the shortcut, grad_x of mlp_dwconv is grad_y · GELU'(x)."""
    C = 37
    sweep = torch.linspace(-12.0, 12.0, 20 * 37 * 37)
    extremes = torch.tensor([1e30, -1e30, 3e38, -3e38, 1e4, -1e4, 6.0, -6.0, 0.0, -0.0] * 2
                            + [float("nan")] * 7)
    v = torch.cat([sweep, extremes, torch.randn(37 * 37) * 3])
    v = torch.cat([v, torch.randn((-v.numel()) % C)])
    x = v.view(1, -1, C)
    gx = torch.ops.paca_kernels.mlp_dwconv_bwd(torch.ones_like(x), x, 1, x.shape[1], torch.zeros(C, 1, 3, 3),
                                               None, None, True, True)[0].flatten()
    vd = v.double().requires_grad_()
    exact = torch.autograd.grad(F.gelu(vd).sum(), vd)[0]
    nan = v.isnan()
    # 0 * NaN from the zero taps: z is NaN one pixel from a NaN input, g too, grad_x two pixels.
    near_nan = nan | torch.roll(nan, C) | torch.roll(nan, -C) | torch.roll(nan, 2 * C) | torch.roll(nan, -2 * C)
    fin = v.isfinite() & (v.abs() < 1e6) & ~near_nan
    err = (gx[fin].double() - exact[fin]).abs()
    assert err.max().item() < 1e-6, err.max().item()
    big, small = fin & (v >= 6.0), fin & (v <= -6.0)
    assert bool((gx[big] == 1).all()) and bool((gx[small].abs() < 1e-7).all())
    assert bool(gx[nan].isnan().all())


def check_mlp_fused() -> None:
    for B, H, W, C in [(2, 7, 9, 24), (1, 40, 3, 12)]:
        m = Mlp(C, 3 * C + 1, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
        x = torch.randn(B, H * W, C)
        c = m.dwconv.dwconv
        with torch.no_grad():
            out = mlp_fused(x, H, W, m.fc1.weight, m.fc1.bias, c.weight, c.bias, True, True,
                            m.fc2.weight, m.fc2.bias).double()
            md = m.double()
            exact = md.fc2(md.act(md.dwconv(md.fc1(x.double()), H, W)))
        err = (out - exact).abs().max().item()
        assert err < 1e-5, ("mlp_fused", err)
        # With the block's ends (the dispatched LayerNorm's 8-lane body and tail: C = 24, 12).
        nw, nb = 1 + 0.2 * torch.randn(C), 0.2 * torch.randn(C)
        with torch.no_grad():
            out = mlp_fused(x * 3 + 1, H, W, m.fc1.weight.float(), m.fc1.bias.float(), c.weight.float(),
                            c.bias.float(), True, True, m.fc2.weight.float(), m.fc2.bias.float(),
                            norm=(nw, nb, 1e-6), residual=True).double()
            xd = x.double() * 3 + 1
            u = F.layer_norm(xd, (C,), nw.double(), nb.double(), 1e-6)
            exact = xd + md.fc2(md.act(md.dwconv(md.fc1(u), H, W)))
        err = (out - exact).abs().max().item()
        assert err < 2e-5, ("mlp_fused with norm and residual", err)


def check_patch_embed() -> None:
    """The stem / transition kernel against conv2d + LayerNorm in float64: a transition at B = 1 (its
    output columns split between tasks) and the stem's first conv on an NCHW image."""
    for B, H, C, Co, norm, nchw in [(1, 14, 40, 70, True, False), (2, 17, 3, 24, False, True)]:
        x = torch.randn(B, C, H, H) if nchw else torch.randn(B, H, H, C).permute(0, 3, 1, 2)
        w, b = torch.randn(Co, C, 3, 3) / (3 * C) ** 0.5, torch.randn(Co)
        nw, nb = torch.randn(Co), torch.randn(Co)
        with torch.no_grad():
            out = patch_embed(x.permute(0, 2, 3, 1), w, b, 2, 1, norm, nw if norm else None,
                              nb if norm else None).double()
        y = F.conv2d(x.double(), w.double(), b.double(), 2, 1).permute(0, 2, 3, 1)
        exact = F.layer_norm(y, (Co,), nw.double(), nb.double(), 1e-6) if norm else y
        err = (out - exact).abs().max().item()
        assert err < 2e-5, ("patch_embed", err)


def check_linear_and_layer_norm() -> None:
    """The head's linear (split by columns at few rows, by row blocks at many; ragged panels) and
    the LayerNorm rows (four at a time and the rest; an 8-lane tail) against float64."""
    for R, K, O in [(1, 384, 1000), (3, 37, 19), (45, 30, 70)]:
        x, w, b = torch.randn(R, K), torch.randn(O, K) / K**0.5, torch.randn(O)
        err = (linear(x, w, b).double() - F.linear(x.double(), w.double(), b.double())).abs().max().item()
        assert err < 2e-5, ("linear", err)
    for R, C in [(7, 96), (13, 37)]:
        x, w, b = torch.randn(R, C) * 3 + 1, torch.randn(C), torch.randn(C)
        exact = F.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-6)
        err = (layer_norm(x, w, b, 1e-6).double() - exact).abs().max().item()
        assert err < 2e-5, ("layer_norm", err)


def check_gelu() -> None:
    """The kernels' rational-erf GELU against float64, tails and NaN: a depthwise conv whose taps are
    all zero, with the shortcut (folded into the centre tap as 1), passes x through exactly, so
    mlp_dwconv(gelu=True) returns gelu(x)."""
    torch.manual_seed(0)
    C = 37  # a masked vector tail as well
    sweep = torch.linspace(-12.0, 12.0, 40 * 37 * 37)  # dense over the fitted range and the tails
    extremes = torch.tensor([1e30, -1e30, 3e38, -3e38, 1e4, -1e4, 6.0, -6.0, 5.66, -5.66, 1e-30,
                             -1e-30, 0.0, -0.0] * 2 + [float("nan")] * 9)
    rand = torch.randn(37 * 37 * 3) * 3
    v = torch.cat([sweep, extremes, rand])
    v = torch.cat([v, torch.randn((-v.numel()) % C)])
    weight = torch.zeros(C, 1, 3, 3)
    with torch.no_grad():
        x = v.view(1, -1, C)
        out = mlp_dwconv(x, 1, x.shape[1], weight, None, None, True, True).flatten()
    exact = F.gelu(v.double())
    # A NaN input also reaches its two neighbours along W (as 0 * NaN): leave those out.
    nan = v.isnan()
    near_nan = nan | torch.roll(nan, C) | torch.roll(nan, -C)
    fin = v.isfinite() & (v.abs() < 1e6) & ~near_nan
    # erf within 3.2e-7 (the fit's float32 evaluation), output rounding 6e-8 relative.
    err = (out[fin].double() - exact[fin]).abs()
    bound = 2.5e-7 * v[fin].double().abs() + 1e-37
    assert bool((err <= bound).all()), (err / bound).max().item()
    # Saturated tails: exactly v above, exactly 0 below (PyTorch gives the same).
    big = v.isfinite() & (v >= 6.0) & ~near_nan
    small = v.isfinite() & (v <= -6.0) & ~near_nan
    assert torch.equal(out[big], v[big]), (out[big] - v[big]).abs().max()
    assert bool((out[small] == 0).all()), out[small].abs().max()
    assert bool(out[nan].isnan().all())


CHECKS = [check_ops, check_conv_cluster_logits, check_p2c_attention_proj, check_conv_paca_layer,
          check_mlp_dwconv, check_mlp_dwconv_bwd, check_gelu_grad, check_mlp_fused, check_patch_embed,
          check_linear_and_layer_norm, check_gelu]

#: How many tensors :func:`outputs` saves.
NUM_OUTPUTS = 63


def outputs() -> list[torch.Tensor]:
    """Every C++ kernel that multiplies matrices, on shapes whose columns and rows leave ragged tiles
    (C = 30: a 16-lane vector and 14 masked lanes; M = 7 and 49; 13 x 15 grids), forward and backward."""
    torch.manual_seed(0)
    outs = []
    with torch.no_grad():
        for C, h, M, H, W in [(96, 2, 100, 14, 14), (40, 4, 49, 13, 15), (30, 3, 7, 5, 9)]:
            layer = PaCaAttention(C, h, M, clustering="conv", backend="cpu").eval()
            outs += list(layer(torch.randn(2, H * W, C), H, W))
        for B, H, W, C in [(2, 7, 9, 24), (1, 13, 3, 30)]:
            m = Mlp(C, 3 * C + 1, with_dwconv=True, with_shortcut=True, backend="cpu").eval()
            outs.append(m(torch.randn(B, H * W, C), H, W))  # the whole-MLP kernel (small weights)
            c = m.dwconv.dwconv  # and with the block's ends (the dispatched LayerNorm rows)
            outs.append(mlp_fused(torch.randn(B, H * W, C) * 3, H, W, m.fc1.weight, m.fc1.bias, c.weight,
                                  c.bias, True, True, m.fc2.weight, m.fc2.bias,
                                  norm=(torch.randn(C), torch.randn(C), 1e-6), residual=True))
        # patch_embed: a transition at B = 1 (column groups; C = 30: ragged tiles), the NCHW stem.
        for B, H, C, Co, norm in [(1, 13, 30, 70, True), (2, 15, 3, 24, False)]:
            x = torch.randn(B, C, H, H)
            outs.append(patch_embed(x.permute(0, 2, 3, 1), torch.randn(Co, C, 3, 3), torch.randn(Co), 2, 1,
                                    norm, torch.randn(Co) if norm else None, torch.randn(Co) if norm else None))
        # linear: split by columns (1 row) and by row blocks (45 rows), ragged panels (70 = 64 + 6);
        # the LayerNorm rows: four at a time and the rest (7 rows), an 8-lane tail (C = 37).
        for R in (1, 45):
            outs.append(linear(torch.randn(R, 30), torch.randn(70, 30), torch.randn(70)))
        for C in (96, 37):
            outs.append(layer_norm(torch.randn(7, C) * 3, torch.randn(C), torch.randn(C), 1e-6))
    # d = 40 and 48 and M = 100 (32 + 32 + 36): the 3-vector tiles; M = 13, 49, 100: exp row tails.
    # Through the op (training: the saving pair), and the recomputing backward and the saved
    # numerators raw.
    p2c = torch.ops.paca_kernels
    for shape in [(2, 37, 13, 3, 24), (1, 70, 49, 2, 40), (1, 50, 100, 2, 48)]:
        a = make_p2c_inputs(*shape, requires_grad=True)
        out = ops.p2c_attention(a.q, a.k, a.v, backend="cpu")
        out.square().sum().backward()
        outs += [out.detach(), a.q.grad, a.k.grad, a.v.grad]
        q, k, v = (t.detach() for t in (a.q, a.k, a.v))
        scale = q.shape[-1] ** -0.5
        _, e, sums = p2c.p2c_attention_saved_fwd(q, k, v, scale)
        outs += [e, sums, *p2c.p2c_attention_bwd(2 * out.detach(), q, k, v, scale, True)]
    # (1, 50, 300, 190): the products' packed two-panel tiles, in both operand layouts (forward
    # P.x with more reduction steps than one chunk; backward dx = S^T.dP, A transposed), with a
    # masked second panel (190 = 5 x 32 + 16 + 14) and 2-row tails.
    for shape in [(2, 7, 150, 30), (1, 49, 70, 40), (1, 50, 300, 190)]:
        a = make_cluster_pool_inputs(*shape, requires_grad=True)
        out = ops.cluster_pool(a.logits, a.x, a.weight, a.bias, backend="cpu")
        out.square().sum().backward()
        outs += [out.detach(), a.logits.grad, a.x.grad, a.weight.grad, a.bias.grad]
    # Patch-major logits (the clustering heads' layout): the backward's patch-major pass (the
    # per-column exp with masked lanes at M = 49, C = 30).
    a = make_cluster_pool_inputs(2, 49, 197, 30)
    leaves = [a.logits.transpose(1, 2).contiguous().transpose(1, 2), a.x, a.weight, a.bias]
    leaves = [t.requires_grad_() for t in leaves]
    out = ops.cluster_pool(*leaves, backend="cpu")
    out.square().sum().backward()
    outs += [out.detach(), *(t.grad for t in leaves)]
    assert len(outs) == NUM_OUTPUTS
    return outs


if __name__ == "__main__":
    if sys.argv[1:2] == ["outputs"]:
        torch.save(outputs(), sys.argv[2])
    else:
        for check in CHECKS:
            torch.manual_seed(0)
            check()
            print("passed", check.__name__)
    print("isa ok")

"""Training steps of PaCa-ViT on the CPU, timed in interleaved rounds (issue #29, item 5).

    python benchmarks/interleaved_train.py [--models tiny,small] [--batch 8] [--rounds 10] [--threads N]
                                           [--cpu-time] [--no-compile] [--official-src PATH] [--out FILE.json]
    python benchmarks/interleaved_train.py --smoke   # a small model at 64×64, aot_eager compilation

One training step, per provider: forward of a (B, 3, 224, 224) float32 batch, cross-entropy against
random labels, backward, ``torch.optim.SGD(lr=1e-3, momentum=0.9).step()``, ``zero_grad()`` (the
gradients set to None, PyTorch's default). Providers, each with its own copy of the same weights and
its own optimiser:

- ``reference`` / ``cpu``: ``create_model(name, backend=...)`` eager (the pure-PyTorch backend; the
  C++ kernels, as ``backend="cpu"`` asks for them, so the automatic choice's table of slower regimes
  does not apply).
- ``reference-compiled`` / ``cpu-compiled``: the model's forward and the loss under ``torch.compile``
  (Inductor, or aot_eager with ``--smoke``); the backward is the compiled graph's, the optimiser step
  stays eager in all providers.
- ``official``: with ``--official-src PATH`` (a checkout of iVMCL/PaCaViT), the official code's own
  model (``benchmarks/official_code.py``: its timm/mmcv/mmengine names stood in for, its computation
  untouched), loaded with the reference model's weights (strict), in training mode: its PaCa layers
  call ``F.multi_head_attention_forward`` with ``need_weights=not self.training``, so PyTorch's
  ``scaled_dot_product_attention`` in training. Without it (and with ``--smoke``, whose small model
  is no official variant), an emulation of that computation. What the emulation is: the model's own
  patch embedding, transitions, norms, MLPs (plain ``nn.Linear``/depthwise ``nn.Conv2d``/GELU on the
  reference backend: the official modules' math) and the official block loop
  (``tests/test_models.py::official_forward``: ``x, z = block(x, H, W, z)``, the softmaxed assignment
  z handed from a stage's first block to the next); each PaCa layer computes as the official
  ``PaCaLayer.forward`` does (``benchmarks/test_bench_layer.py::official_forward``): the clustering
  head's logits, ``softmax`` over the patches, ``einsum`` pooling, the cluster LayerNorm, then
  ``F.multi_head_attention_forward`` with separate q/k/v weights and the output projection. In
  training the official layer passes ``need_weights=not self.training`` (/work/shared/compat/README.md:
  the maps only in eval), so here ``need_weights=False``, which makes PyTorch run
  ``scaled_dot_product_attention``. What it is not: the official code byte for byte: timm's
  ``DropPath``/``Mlp`` wrappers, mmcv's norm/activation builders and the official module hierarchy are
  replaced by this package's modules of the same math and parameters; the official model's
  ``torch.compile`` is not timed. It is NOT the official code's cost: measured side by side (Tiny,
  B = 8, one thread, CPU time) the emulation's step took 1.9 s and the official code's 3.0 s, whose
  own layouts cost it GELU backward 400 ms (against 60-75), copies 340 ms (72-108) and convolution
  backward 630 ms (295): time the official code (``--official-src``) wherever a checkout exists.

Every provider runs with ``drop_path_rate=0`` (the variants' training recipe has 0.1): stochastic
depth draws random masks, which differ between eager and compiled code, so the providers could not
be checked against each other; its cost is one elementwise product per residual branch.

Before timing, each provider's loss and every parameter's gradient after one step from the same
weights and batch are checked against the reference's (relative to the largest gradient entry of the
parameter, or 1e-3 of the largest of all where that is smaller, at most 2e-3). Rows: pytest-benchmark layout, group ``train-step-<model>-B<b>`` with
``extra_info.suite = "train"`` (``scripts/bench_report.py`` renders them as their own section), FLOPs
3 × the forward's (``FlopCounterMode`` on the reference model: backward ≈ 2 × forward).

``--threads N`` sets torch's threads; ``--cpu-time`` one thread and the calling thread's CPU time
(``time.thread_time``) as the clock, as ``benchmarks/interleaved.py`` does on a loaded machine.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import interleaved
from interleaved import MODELS, _ceilings, _interleave, _print, _rows, write_results
from official_code import create_official

from paca_kernels import PaCaViT, create_model
from paca_kernels.nn import PaCaAttention

#: Smoke model (``--smoke``): four stages, 64×64 input, 10 classes (as tests/test_export.py's).
SMOKE_ARCH = {"embed_dims": [16, 32, 48, 64], "num_heads": [1, 2, 2, 4], "mlp_ratios": [2] * 4,
              "depths": [1, 2, 1, 1]}
#: Relative gradient tolerance of the check before timing (fp32, other summation orders).
GRAD_RTOL = 2e-3


def official_attention(layer: PaCaAttention, x: Tensor, H: int, W: int, z: Tensor | None
                       ) -> tuple[Tensor, Tensor | None]:
    """The official ``PaCaLayer.forward`` in training mode on ``layer``'s weights: x (B, N, C), the
    assignment z (B, M, N) from an earlier block (None where this layer clusters on site) ->
    (out (B, N, C), z)."""
    if layer.num_clusters > 0:
        if layer.onsite_clustering:
            z = layer.clustering(x, H, W).softmax(dim=-1)
        c = torch.einsum("bmn,bnc->bmc", z, x)
        if layer.cluster_pos_embed:
            c = c + layer.cluster_pos_enc
        c = layer.cluster_norm(c)
    else:
        c = x
    out, _ = F.multi_head_attention_forward(
        query=x.transpose(0, 1), key=c.transpose(0, 1), value=c.transpose(0, 1),
        embed_dim_to_check=x.shape[-1], num_heads=layer.num_heads,
        q_proj_weight=layer.q.weight, k_proj_weight=layer.k.weight, v_proj_weight=layer.v.weight,
        in_proj_weight=None, in_proj_bias=torch.cat([layer.q.bias, layer.k.bias, layer.v.bias]),
        bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=layer.attn_drop,
        out_proj_weight=layer.proj.weight, out_proj_bias=layer.proj.bias,
        use_separate_proj_weight=True, training=layer.training, need_weights=not layer.training,
    )
    return layer.proj_drop(out.transpose(0, 1)), z


def official_model_forward(model: PaCaViT, img: Tensor) -> Tensor:
    """The official model's forward (the block loop of tests/test_models.py::official_forward) with
    every PaCa layer computed by :func:`official_attention`: images (B, 3, H, W) -> logits."""
    if model.paca_teacher is not None:
        raise ValueError("the official emulation covers the variants without a teacher")
    x = model.patch_embed(img)
    for i in range(model.num_stages):
        b, c, h, w = x.shape
        x = x.flatten(2).transpose(1, 2)
        z = None
        for block in getattr(model, f"stage{i + 1}"):
            def attn(t: Tensor, residual: Tensor | None = None, *, block=block, h=h, w=w,
                     z=z) -> tuple[Tensor, Tensor | None]:
                # residual: the block's stream where its fused inference path hands it over
                # (PaCaBlock._run); the official layer returns the attention alone.
                out, z_out = official_attention(block.attn, t, h, w, z)
                return (out if residual is None else residual + out), z_out
            # The block's residual wiring (norms, MLP, layer scale) as the official PaCaBlock has it.
            x, z = block._run(x, h, w, attn)
        x = getattr(model, f"norm{i + 1}")(x)
        if i < model.num_stages - 1:
            x = getattr(model, f"transition{i + 1}")(x.transpose(1, 2).reshape(b, c, h, w))
    return model.head(x.mean(1))


def _official_model(src: str, key: str) -> nn.Module:
    """The official code's model of variant ``key`` with its stochastic depth off (the official
    builders take no drop_path_rate: they read 0.1 from their architecture table)."""
    model = create_official(src, MODELS[key])
    for m in model.modules():
        if hasattr(m, "drop_prob"):
            m.drop_prob = 0.0
    return model


def _make_model(key: str, backend: str, smoke: bool) -> PaCaViT:
    if smoke:
        return PaCaViT(num_classes=10, img_size=64, arch_cfg=SMOKE_ARCH,
                       paca_cfg={"clusters": [4, 5, 6, 0]}, backend=backend)
    return create_model(MODELS[key], backend=backend, drop_path_rate=0.0)


class Trainer:
    """One provider's model, loss function and optimiser; ``step()`` is one training step."""

    def __init__(self, model: nn.Module, forward: Callable[[Tensor], Tensor], images: Tensor,
                 labels: Tensor) -> None:
        self.model, self.images, self.labels = model, images, labels
        self.loss_fn = lambda im, y: F.cross_entropy(forward(im), y)
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def compile(self, **kw: object) -> Trainer:
        self.loss_fn = torch.compile(self.loss_fn, **kw)
        return self

    def loss_and_grads(self) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and gradients of one forward+backward (no optimiser step), for the check."""
        with torch.enable_grad():
            self.opt.zero_grad()
            loss = self.loss_fn(self.images, self.labels)
            loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.opt.zero_grad()
        return loss.detach(), grads

    def step(self) -> None:
        # interleaved._interleave times under no_grad (the inference groups): training asks for it back.
        with torch.enable_grad():
            loss = self.loss_fn(self.images, self.labels)
            loss.backward()
            self.opt.step()
            self.opt.zero_grad()


def _check(trainers: dict[str, Trainer]) -> dict[str, float]:
    """Every provider's loss and gradients against the reference's (same weights, same batch):
    the worst per-parameter error relative to the parameter's largest reference gradient entry."""
    want_loss, want = trainers["reference"].loss_and_grads()
    # A parameter whose exact gradient is 0 (k's bias: it shifts a row's scores by a constant, which
    # the softmax cancels) has rounding noise for a gradient: relative to it, not to its own scale.
    floor = 1e-3 * max(float(g.abs().max()) for g in want.values())
    errors = {}
    for name, t in trainers.items():
        loss, got = t.loss_and_grads()
        torch.testing.assert_close(loss, want_loss, rtol=1e-4, atol=1e-5, msg=f"{name}: loss")
        assert got.keys() == want.keys(), (name, sorted(set(got) ^ set(want)))
        worst = 0.0
        for p, g in want.items():
            err = float((got[p] - g).abs().max()) / max(float(g.abs().max()), floor)
            assert err <= GRAD_RTOL, f"{name}: gradient of {p} off by {err:.2e} (relative)"
            worst = max(worst, err)
        errors[name] = worst
    return errors


def train_groups(keys: list[str], batch: int, rounds: int, ceil: dict, smoke: bool = False,
                 compiled: bool = True, official_src: str | None = None) -> list[dict]:
    from torch.utils.flop_counter import FlopCounterMode

    compile_kw = {"backend": "aot_eager"} if smoke else {}
    side = 64 if smoke else 224
    rows = []
    for key in keys:
        torch.manual_seed(0)
        ref = _make_model(key, "reference", smoke).train()
        state = ref.state_dict()
        classes = ref.head.out_features
        images = torch.randn(batch, 3, side, side)
        labels = torch.randint(0, classes, (batch,))
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            ref(images[:1])
        flops = 3 * fc.get_total_flops() * batch

        def make(backend: str, official: bool = False, key: str = key, state: dict = state,
                 images: Tensor = images, labels: Tensor = labels) -> Trainer:
            if official and official_src is not None and not smoke:
                m = _official_model(official_src, key).train()
                m.load_state_dict(state, strict=True)
                return Trainer(m, m, images, labels)
            m = _make_model(key, backend, smoke).train()
            m.load_state_dict(state)
            fwd = (lambda im, m=m: official_model_forward(m, im)) if official else m
            return Trainer(m, fwd, images, labels)

        trainers = {"official": make("reference", official=True), "reference": make("reference"),
                    "cpu": make("cpu")}
        if compiled:
            trainers["reference-compiled"] = make("reference").compile(**compile_kw)
            trainers["cpu-compiled"] = make("cpu").compile(**compile_kw)
        errors = _check(trainers)
        samples = _interleave({k: t.step for k, t in trainers.items()}, rounds)
        name = "smoke" if smoke else MODELS[key]
        group = f"train-step-{name}-B{batch} (interleaved, load {os.getloadavg()[0]:.1f})"
        new = _rows(group, samples, dict.fromkeys(trainers, flops), ceil)
        for r in new:
            r["group"] = f"train-step-{name}-B{batch} (interleaved)"
            r["name"] = f"{r['group']}[{r['extra_info']['provider']}]"
            r["extra_info"].update(suite="train", batch=batch, image_size=side,
                                   grad_error=errors[r["extra_info"]["provider"]])
        for r in new:
            if r["extra_info"]["provider"] == "official":
                r["extra_info"]["official"] = "code" if official_src and not smoke else "emulation"
        rows += new
        _print(group, samples, errors)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="tiny,small", help="comma-separated subset of tiny,small,base")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    interleaved.add_clock_args(ap)
    ap.add_argument("--no-compile", action="store_true", help="eager providers only")
    ap.add_argument("--smoke", action="store_true", help="a small model at 64×64, aot_eager compilation")
    ap.add_argument("--official-src", default=None,
                    help="a checkout of iVMCL/PaCaViT: its model is the official provider (else an emulation)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: print only)")
    args = ap.parse_args(argv)
    interleaved.apply_clock_args(args)
    load_before = os.getloadavg()
    ceil = _ceilings()
    print(f"load average {load_before}, {torch.get_num_threads()} threads; ceilings: copy "
          f"{ceil['copy'] / 1e9:.1f} GB/s, fp32 matmul {ceil['matmul'] / 1e9:.0f} GF/s", flush=True)
    keys = ["smoke"] if args.smoke else [m for m in args.models.split(",") if m]
    rows = train_groups(keys, args.batch, args.rounds, ceil, smoke=args.smoke, compiled=not args.no_compile,
                        official_src=args.official_src)
    load_after = os.getloadavg()
    print(f"load average before {load_before}, after {load_after}", flush=True)
    if args.out:
        write_results(args.out, rows, loadavg_before=load_before, loadavg_after=load_after)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soft k-means and GMM clustering heads: logits against explicit per-element formulas, gradients,
registry, and use inside PaCaAttention / a PaCa-ViT."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import paca_kernels
from paca_kernels.nn import (
    CLUSTERING_HEADS,
    GMMClustering,
    PaCaAttention,
    SoftKMeansClustering,
    build_clustering,
)


def _kmeans_explicit(x: torch.Tensor, mu: torch.Tensor, tau: float) -> torch.Tensor:
    """Loops over the difference vectors: logits[b, m, n] = −‖x[b, n] − μ_m‖² / τ."""
    b, n, _ = x.shape
    out = torch.empty(b, mu.shape[0], n, dtype=x.dtype)
    for i in range(b):
        for m in range(mu.shape[0]):
            out[i, m] = -((x[i] - mu[m]) ** 2).sum(-1) / tau
    return out


def _gmm_explicit(x: torch.Tensor, head: GMMClustering, tau: float) -> torch.Tensor:
    """log π_m + Σ_c log N(x_c | μ_mc, σ²_mc), through torch.distributions, divided by τ."""
    mu = head.means.detach().double()
    sigma = torch.exp(0.5 * head.log_var.detach().double())
    log_pi = torch.log_softmax(head.mix_logits.detach().double(), 0)
    normal = torch.distributions.Normal(mu[None, :, None, :], sigma[None, :, None, :])  # (1, M, 1, C)
    log_n = normal.log_prob(x[:, None, :, :]).sum(-1)  # (B, M, N)
    return (log_pi[None, :, None] + log_n) / tau


@pytest.mark.parametrize("temperature", [None, 0.7])
def test_kmeans_matches_explicit(temperature: float | None) -> None:
    head = SoftKMeansClustering(6, 4, temperature=temperature).double()
    x = torch.randn(2, 15, 6, dtype=torch.float64)
    tau = math.sqrt(6) if temperature is None else temperature
    torch.testing.assert_close(head(x, 3, 5), _kmeans_explicit(x, head.centroids.detach(), tau))


@pytest.mark.parametrize("temperature", [1.0, None])
def test_gmm_matches_explicit(temperature: float | None) -> None:
    head = GMMClustering(5, 3, temperature=temperature).double()
    with torch.no_grad():  # non-trivial variances and weights
        head.log_var.normal_(0, 0.5)
        head.mix_logits.normal_()
    x = torch.randn(2, 12, 5, dtype=torch.float64)
    tau = math.sqrt(5) if temperature is None else temperature
    expected = _gmm_explicit(x, head, tau)
    torch.testing.assert_close(head(x, 3, 4), expected)
    post = GMMClustering(5, 3, temperature=temperature, posterior=True).double()
    post.load_state_dict(head.state_dict())
    torch.testing.assert_close(post(x, 3, 4), expected - torch.logsumexp(expected, dim=1, keepdim=True))
    torch.testing.assert_close(post(x, 3, 4).exp().sum(1), torch.ones(2, 12, dtype=torch.float64))


@pytest.mark.parametrize("cls", [SoftKMeansClustering, GMMClustering])
def test_gradcheck_and_learned_temperature(cls: type) -> None:
    head = cls(4, 3, temperature=0.9, learn_temperature=True).double()
    x = torch.randn(1, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: head(t, 2, 3), (x,))
    head(x, 2, 3).square().sum().backward()
    for p in head.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert "log_temperature" in dict(head.named_parameters())
    assert "log_temperature" not in dict(cls(4, 3).named_parameters())  # fixed: a buffer
    assert "log_temperature" in cls(4, 3).state_dict()


def test_registry_and_kwargs_pass_through() -> None:
    assert CLUSTERING_HEADS["kmeans"] is SoftKMeansClustering
    assert CLUSTERING_HEADS["gmm"] is GMMClustering
    head = build_clustering("kmeans", 8, 5, temperature=2.0)
    assert isinstance(head, SoftKMeansClustering) and float(head.temperature) == pytest.approx(2.0)
    head = build_clustering("gmm", 8, 5, posterior=True)
    assert head.posterior
    with pytest.raises(ValueError, match="unknown clustering head 'nope'.*kmeans, gmm"):
        build_clustering("nope", 8, 5)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="temperature"):
        SoftKMeansClustering(4, 2, temperature=0.0)
    with pytest.raises(ValueError, match="num_clusters"):
        GMMClustering(4, 0)
    head = SoftKMeansClustering(4, 2)
    with pytest.raises(ValueError, match=r"\(B, N, C=4\)"):
        head(torch.randn(1, 6, 5), 2, 3)
    with pytest.raises(ValueError, match="does not match N"):
        head(torch.randn(1, 6, 4), 2, 2)
    with pytest.raises(TypeError, match="floating"):
        head(torch.ones(1, 6, 4, dtype=torch.long), 2, 3)


@pytest.mark.parametrize("kind", ["kmeans", "gmm", functools.partial(GMMClustering, posterior=True)])
def test_in_paca_attention_and_model(kind: object) -> None:
    attn = PaCaAttention(16, 2, 5, clustering=kind)  # type: ignore[arg-type]
    x = torch.randn(2, 12, 16, requires_grad=True)
    out, z = attn(x, 3, 4)
    assert out.shape == (2, 12, 16) and z.shape == (2, 5, 12)
    torch.testing.assert_close(z, torch.softmax(attn.clustering(x, 3, 4), -1))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_pacavit_with_variant() -> None:
    model = paca_kernels.PaCaViT(
        num_classes=3, img_size=32,
        arch_cfg={"embed_dims": [16, 16, 16, 16], "num_heads": [1, 1, 1, 1], "mlp_ratios": [2, 2, 2, 2],
                  "depths": [1, 1, 1, 1]},
        paca_cfg={"type": "gmm", "clusters": [4, 4, 4, 0]},
    )
    assert isinstance(model.stage1[0].attn.clustering, GMMClustering)
    y = model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert model.stage1[0].attn.clustering.means.grad.abs().sum() > 0

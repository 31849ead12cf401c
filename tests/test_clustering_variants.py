"""Soft k-means, GMM, hierarchical and density clustering heads (and the Ward tree): logits against explicit per-element formulas, gradients,
registry, and use inside PaCaAttention / a PaCa-ViT."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import paca_kernels
from paca_kernels.nn import (
    CLUSTERING_HEADS,
    DensityClustering,
    GMMClustering,
    HierarchicalClustering,
    PaCaAttention,
    SoftKMeansClustering,
    build_clustering,
    ward_tree,
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


# ---------------------------------------------------------------------------------------------------
# Hierarchical (Ward-merged prototypes) and density (DBSCAN-like) heads
# ---------------------------------------------------------------------------------------------------
def _partition(labels: torch.Tensor | list[int]) -> list[list[int]]:
    labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    return sorted(sorted(i for i, g in enumerate(labels) if g == group) for group in set(labels))


def test_ward_tree_by_hand_and_numbering() -> None:
    pts = torch.tensor([[0.0], [10.0], [0.1], [5.0], [5.2]])
    labels = ward_tree(pts, 3)
    assert _partition(labels) == [[0, 2], [1], [3, 4]]
    assert labels.tolist() == [0, 1, 0, 2, 2]  # groups numbered by their smallest member
    assert ward_tree(pts, 5).tolist() == [0, 1, 2, 3, 4] and ward_tree(pts, 1).tolist() == [0] * 5
    with pytest.raises(ValueError, match="cannot group 5 points into 6"):
        ward_tree(pts, 6)
    with pytest.raises(ValueError, match="num_groups must be an int >= 1"):
        ward_tree(pts, 0)


@pytest.mark.parametrize(("k", "m", "c"), [(40, 10, 8), (96, 24, 16), (30, 2, 3)])
def test_ward_tree_matches_scipy(k: int, m: int, c: int) -> None:
    hierarchy = pytest.importorskip("scipy.cluster.hierarchy")
    pts = torch.randn(k, c, generator=torch.Generator().manual_seed(k + m))
    expected = hierarchy.fcluster(hierarchy.linkage(pts.double().numpy(), "ward"), m, "maxclust")
    labels = ward_tree(pts, m)
    assert _partition(labels) == _partition(list(expected))
    assert torch.equal(ward_tree(pts.clone(), m), labels)  # deterministic


def _hierarchical_explicit(x: torch.Tensor, head: HierarchicalClustering) -> torch.Tensor:
    """logits[b, m, n] = logsumexp over the children k of m of −‖x_n − μ_k‖²/τ, by loops."""
    tau = float(head.temperature)
    mu = head.prototypes.detach()
    fine = torch.stack([-((x - mu[k]) ** 2).sum(-1) / tau for k in range(mu.shape[0])], 1)  # (B, K, N)
    out = [torch.logsumexp(fine[:, head.parent == m], dim=1) for m in range(head.num_clusters)]
    return torch.stack(out, 1)


def test_hierarchical_matches_explicit_and_ratio_one_is_kmeans() -> None:
    head = HierarchicalClustering(6, 4, ratio=3, temperature=0.8).double()
    assert head.parent.shape == (12,) and sorted(set(head.parent.tolist())) == [0, 1, 2, 3]
    assert _partition(head.parent) == _partition(ward_tree(head.prototypes, 4))
    x = torch.randn(2, 15, 6, dtype=torch.float64)
    torch.testing.assert_close(head(x, 3, 5), _hierarchical_explicit(x, head))
    flat = HierarchicalClustering(6, 4, ratio=1).double()
    kmeans = SoftKMeansClustering(6, 4).double()
    kmeans.centroids.data.copy_(flat.prototypes.data[flat.parent.argsort()])
    torch.testing.assert_close(flat(x, 3, 5), kmeans(x, 3, 5))


def test_hierarchical_rebuild_only_regroups() -> None:
    torch.manual_seed(3)
    model = paca_kernels.PaCaViT(
        num_classes=3, img_size=32,
        arch_cfg={"embed_dims": [16, 16, 16, 16], "num_heads": [1, 1, 1, 1], "mlp_ratios": [2, 2, 2, 2],
                  "depths": [1, 1, 1, 1]},
        paca_cfg={"type": "hierarchical", "clusters": [4, 4, 4, 0]},
    )
    head = model.stage1[0].attn.clustering
    assert isinstance(head, HierarchicalClustering)
    with torch.no_grad():  # the prototypes move (as training moves them): the old tree is stale
        head.prototypes.mul_(torch.linspace(0.1, 3.0, head.num_prototypes)[:, None])
        head.prototypes.add_(torch.randn_like(head.prototypes))
    before = head.prototypes.detach().clone()
    param = head.prototypes
    old_parent = head.parent.clone()
    assert paca_kernels.nn.rebuild_trees(model) == 3
    assert head.prototypes is param and torch.equal(head.prototypes, before)  # same prototypes
    assert torch.equal(head.parent, ward_tree(before, 4))
    assert not torch.equal(head.parent, old_parent)  # this move regroups them
    y = model(torch.randn(2, 3, 32, 32))
    y.sum().backward()
    assert head.prototypes.grad.abs().sum() > 0


def _density_explicit(x: torch.Tensor, head: DensityClustering) -> torch.Tensor:
    """The docstring's formula, elementwise in float64: a, share, core c, reach r, then the log."""
    tau = float(head.temperature)
    eps2 = head.log_eps2.detach().exp()
    b, n, _ = x.shape
    m = head.num_clusters
    a = torch.empty(b, m, n, dtype=x.dtype)
    for i in range(m):
        d = ((x - head.cores.detach()[i]) ** 2).sum(-1)
        a[:, i] = torch.sigmoid((eps2[i] - d) / tau)
    core = torch.sigmoid((a.mean(-1, keepdim=True) - head.min_samples) / (0.25 * head.min_samples))
    reach = a.sum(1, keepdim=True).clamp(max=1.0)
    return torch.log(core * a + (1 - core) * reach)


def test_density_matches_explicit() -> None:
    head = DensityClustering(5, 3, eps=2.5, min_samples=0.1, temperature=0.9).double()
    with torch.no_grad():
        head.log_eps2.add_(torch.tensor([0.0, 0.5, -3.0], dtype=torch.float64))  # one nearly empty ball
    x = torch.randn(2, 20, 5, dtype=torch.float64)
    torch.testing.assert_close(head(x, 4, 5), _density_explicit(x, head))


def test_density_noise_gets_little_mass_everywhere() -> None:
    """Two tight blobs at the cores plus far outliers: each cluster's softmax over N puts < 1e-4 on
    the outliers, also the cluster whose ball is empty (it falls back to the reached patches); soft
    k-means, for contrast, gives an outlier near its centroid's direction real mass."""
    g = torch.Generator().manual_seed(0)
    c = 4
    cores = torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0], [0, 40.0, 0, 0]], dtype=torch.float64)
    blob0 = cores[0] + 0.2 * torch.randn(20, c, generator=g, dtype=torch.float64)
    blob1 = cores[1] + 0.2 * torch.randn(20, c, generator=g, dtype=torch.float64)
    noise = torch.tensor([[0, 0, 12.0, 0], [0, 0, 0, -12.0], [0, 0, -12.0, 0], [12.0, 12.0, 0, 0]],
                         dtype=torch.float64)
    x = torch.cat([blob0, blob1, noise])[None]  # (1, 44, 4)
    head = DensityClustering(c, 3, eps=1.5, min_samples=0.1, temperature=0.5).double()
    with torch.no_grad():
        head.cores.copy_(cores)
    s = torch.softmax(head(x, 4, 11), dim=-1)[0]  # (3, 44)
    assert s[:, 40:].max() < 1e-4, s[:, 40:]
    assert s[0, :20].sum() > 0.99 and s[1, 20:40].sum() > 0.99
    assert s[2, :40].sum() > 0.99  # the empty core pools the dense patches, not the noise
    kmeans = SoftKMeansClustering(c, 3, temperature=0.5).double()
    with torch.no_grad():
        kmeans.centroids.copy_(cores)
    assert torch.softmax(kmeans(x, 4, 11), dim=-1)[0, 2, 40:].max() > 0.5


@pytest.mark.parametrize("cls", [HierarchicalClustering, DensityClustering])
def test_new_heads_gradcheck_compile_flops_state_dict(cls: type) -> None:
    head = cls(4, 3, learn_temperature=True).double()
    x = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: head(t, 2, 3), (x,))
    head(x, 2, 3).exp().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())

    eager = cls(8, 5).eval()
    xs = torch.randn(2, 12, 8)
    compiled = torch.compile(eager, fullgraph=True)
    torch.testing.assert_close(compiled(xs, 3, 4), eager(xs, 3, 4))

    k = eager.num_prototypes if cls is HierarchicalClustering else eager.num_clusters
    with FlopCounterMode(display=False) as counter:
        eager(xs, 3, 4)
    assert counter.get_total_flops() == 2 * 2 * 12 * 8 * k

    again = cls(8, 5)
    again.load_state_dict(eager.state_dict())
    assert torch.equal(again(xs, 3, 4), eager(xs, 3, 4))
    if cls is HierarchicalClustering:
        assert "parent" in eager.state_dict()


def test_new_heads_bad_arguments_and_registry() -> None:
    assert CLUSTERING_HEADS["hierarchical"] is HierarchicalClustering
    assert CLUSTERING_HEADS["density"] is DensityClustering
    assert isinstance(build_clustering("hierarchical", 8, 3, ratio=2), HierarchicalClustering)
    for make, match in [
        (lambda: HierarchicalClustering(8, 3, ratio=0), "ratio must be an int >= 1"),
        (lambda: HierarchicalClustering(8, 0), "num_clusters must be an int >= 1"),
        (lambda: DensityClustering(8, 3, eps=-1.0), "eps must be a positive"),
        (lambda: DensityClustering(8, 3, min_samples=1.5), r"min_samples is a share .* \(0, 1\)"),
        (lambda: DensityClustering(8, 3, temperature=0.0), "temperature"),
    ]:
        with pytest.raises(ValueError, match=match):
            make()
    with pytest.raises(ValueError, match="does not match N"):
        DensityClustering(4, 2)(torch.randn(1, 6, 4), 2, 2)


@pytest.mark.parametrize("kind", ["hierarchical", "density"])
def test_new_heads_in_paca_attention(kind: str) -> None:
    attn = PaCaAttention(16, 2, 5, clustering=kind)
    x = torch.randn(2, 12, 16, requires_grad=True)
    out, z = attn(x, 3, 4)
    torch.testing.assert_close(z, torch.softmax(attn.clustering(x, 3, 4), -1))
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()

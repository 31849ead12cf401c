"""Distance-based clustering heads: soft k-means, a diagonal Gaussian mixture, a hierarchical
(Ward-merged prototypes) head and a density-based (DBSCAN-like) head.

All map patch tokens x (B, N, C) on an H×W grid to cluster logits (B, M, N), like the official
P2CConv2d / P2CMlp / P2CLinear, so the fused ``cluster_pool`` (softmax over N, weighted sum, LayerNorm)
and ``p2c_attention`` kernels serve them unchanged. Select them with ``clustering="kmeans"``,
``"gmm"``, ``"hierarchical"`` or ``"density"`` (``PaCaAttention``, ``build_clustering``, a model's
``paca_cfg["type"]``).

Where the official heads learn an arbitrary map from a patch to M scores, these score a patch by how
close it lies to M learned prototypes in feature space, which makes the clusters readable (a centroid
is a point in token space) and gives a head with only M·C (k-means) or 2·M·C + M (GMM) parameters.

Note on what the softmax over N sees: anything that depends on m only (‖μ_m‖² in k-means, log π_m and
the log-determinant in the GMM) shifts a whole row of logits and cancels in softmax over N, so it does
not change the assignment S; it is kept so the logits are the stated formula (for losses on them, or a
softmax over M). ``GMMClustering(posterior=True)`` instead returns the E-step log-responsibilities
log p(m | x_n), normalised over M, which does change S: each cluster then pools the patches it owns.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "DensityClustering",
    "GMMClustering",
    "HierarchicalClustering",
    "SoftKMeansClustering",
    "rebuild_trees",
    "ward_tree",
]

_LOG_2PI = math.log(2.0 * math.pi)


def _check_x(x: object, dim: int, H: int, W: int) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor of shape (B, N, C), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {str(x.dtype).removeprefix('torch.')}")
    if x.dim() != 3 or x.shape[2] != dim:
        raise ValueError(f"x must have shape (B, N, C={dim}), got {tuple(x.shape)}")
    if int(H) * int(W) != x.shape[1]:
        raise ValueError(f"H·W = {H}·{W} = {int(H) * int(W)} does not match N = {x.shape[1]} of x")
    return x


def _check_count(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _sq_dist(x: Tensor, mu: Tensor) -> Tensor:
    """‖x[b, n] − μ_m‖² as (B, M, N), from one (M, C)×(C, N) matmul per batch:
    ‖x‖² − 2 μ·x + ‖μ‖² (never a (B, M, N, C) difference)."""
    cross = torch.matmul(mu, x.transpose(1, 2))  # (B, M, N)
    return x.pow(2).sum(-1).unsqueeze(1) - 2.0 * cross + mu.pow(2).sum(-1)[:, None]


class _TemperatureMixin(nn.Module):
    """A positive temperature τ, fixed (a buffer) or learned (as log τ, so it stays positive)."""

    def _init_temperature(self, dim: int, temperature: float | None, learn_temperature: bool) -> None:
        # Default √C: with LayerNorm-ed tokens, squared distances grow like C, so dividing by √C keeps
        # the logits O(√C) at any width, the same reasoning as attention's 1/√d.
        tau = math.sqrt(dim) if temperature is None else float(temperature)
        if not tau > 0.0 or not math.isfinite(tau):
            raise ValueError(f"temperature must be a positive finite number, got {temperature}")
        log_tau = torch.tensor(math.log(tau))
        if learn_temperature:
            self.log_temperature = nn.Parameter(log_tau)
        else:
            self.register_buffer("log_temperature", log_tau)

    @property
    def temperature(self) -> Tensor:
        """τ (a 0-d tensor)."""
        return self.log_temperature.exp()


class SoftKMeansClustering(_TemperatureMixin):
    """Soft k-means clustering head: logits[b, m, n] = −‖x[b, n] − μ_m‖² / τ.

    Args:
        dim: channels C of the tokens.
        num_clusters: M (≥ 1).
        temperature: τ > 0; default √C.
        learn_temperature: learn τ (as log τ) instead of keeping it fixed.
        init_std: standard deviation of the normal initialisation of the centroids μ (M, C); 1 matches
            LayerNorm-ed tokens.

    Computed as (2·x·μᵀ − ‖x‖² − ‖μ‖²)/τ, one (B·N, C)×(C, M) matmul, never a (B, N, M, C) difference.
    """

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        temperature: float | None = None,
        learn_temperature: bool = False,
        init_std: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        self.dim = dim
        self.num_clusters = num_clusters
        self.centroids = nn.Parameter(torch.randn(num_clusters, dim) * init_std)
        self._init_temperature(dim, temperature, learn_temperature)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C), N = H·W -> logits (B, M, N)."""
        _check_x(x, self.dim, H, W)
        return -_sq_dist(x, self.centroids.to(x.dtype)) / self.temperature.to(x.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_clusters={self.num_clusters}, temperature={float(self.temperature):.4g}"


class GMMClustering(_TemperatureMixin):
    """Gaussian-mixture clustering head with diagonal covariances.

    logits[b, m, n] = (log π_m + log N(x[b, n] | μ_m, diag σ_m²)) / τ, where

        log N(x | μ, diag σ²) = −½ Σ_c [(x_c − μ_c)²/σ_c² + log σ_c² + log 2π],
        log π = log_softmax(mixing logits)  (so the weights π sum to 1).

    Args:
        dim: channels C of the tokens.
        num_clusters: M (≥ 1).
        temperature: τ > 0 dividing the log-density; default √C (τ = 1 is the plain log-joint).
        learn_temperature: learn τ (as log τ).
        posterior: return the log-responsibilities log p(m | x_n) = logits − logsumexp over M instead
            (normalised over the clusters, the GMM's E-step).
        init_std: standard deviation of the normal initialisation of the means; log σ² starts at 0
            and the mixing weights at uniform.

    Parameters: ``means`` (M, C), ``log_var`` (M, C), ``mix_logits`` (M,). The quadratic form is two
    matmuls: Σ_c x_c²/σ²_mc − 2 Σ_c x_c μ_mc/σ²_mc + Σ_c μ²_mc/σ²_mc.
    """

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        temperature: float | None = None,
        learn_temperature: bool = False,
        posterior: bool = False,
        init_std: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1, got {num_clusters}")
        self.dim = dim
        self.num_clusters = num_clusters
        self.posterior = bool(posterior)
        self.means = nn.Parameter(torch.randn(num_clusters, dim) * init_std)
        self.log_var = nn.Parameter(torch.zeros(num_clusters, dim))
        self.mix_logits = nn.Parameter(torch.zeros(num_clusters))
        self._init_temperature(dim, temperature, learn_temperature)

    def log_weights(self) -> Tensor:
        """log π (M,), the normalised mixing log-weights."""
        return torch.log_softmax(self.mix_logits, dim=0)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C), N = H·W -> logits (B, M, N)."""
        _check_x(x, self.dim, H, W)
        mu = self.means.to(x.dtype)
        log_var = self.log_var.to(x.dtype)
        prec = torch.exp(-log_var)  # 1/σ² (M, C)
        quad = (
            torch.matmul(prec, x.pow(2).transpose(1, 2))  # Σ_c x²/σ²       (B, M, N)
            - 2.0 * torch.matmul(mu * prec, x.transpose(1, 2))  # Σ_c xμ/σ²  (B, M, N)
            + (mu.pow(2) * prec).sum(-1)[:, None]  # Σ_c μ²/σ²          (M, 1)
        )
        const = self.log_weights().to(x.dtype) - 0.5 * (log_var.sum(-1) + self.dim * _LOG_2PI)  # (M,)
        logits = (const[:, None] - 0.5 * quad) / self.temperature.to(x.dtype)
        if self.posterior:
            logits = logits - torch.logsumexp(logits, dim=1, keepdim=True)
        return logits

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_clusters={self.num_clusters}, "
            f"temperature={float(self.temperature):.4g}, posterior={self.posterior}"
        )


def ward_tree(points: Tensor, num_groups: int) -> Tensor:
    """Agglomerative clustering of ``points`` (K, C) with Ward's linkage, stopped at ``num_groups``.

    Starting from K singletons, repeatedly merge the two groups A, B whose merge least increases the
    within-group sum of squares, Δ(A, B) = |A|·|B| / (|A| + |B|) · ‖c_A − c_B‖² (c: group means),
    until ``num_groups`` remain. Computed in float64 on the CPU; a tie goes to the first pair in
    row-major order, so the result is deterministic. Returns labels (K,) int64 in [0, num_groups),
    numbered by each group's smallest member index (group 0 holds point 0), so equal partitions give
    equal labels. Every group is non-empty. Cost O(K²·(C + K)), run on request, not per forward.
    """
    k = points.shape[0]
    _check_count("num_groups", num_groups)
    if num_groups > k:
        raise ValueError(f"cannot group {k} points into {num_groups} groups")
    p = points.detach().to("cpu", torch.float64)
    cent = p.clone()
    size = torch.ones(k, dtype=torch.float64)
    sq = cent.pow(2).sum(-1)
    cost = (sq[:, None] + sq[None, :] - 2.0 * cent @ cent.T).clamp_min(0.0) * 0.5  # |A|=|B|=1: ½‖·‖²
    inf = float("inf")
    cost.fill_diagonal_(inf)
    # Each row's minimum and its first column, kept up to date, so a merge costs O(K) rather than a
    # scan of the K×K matrix: the smallest row minimum (first such row), at its first column, is the
    # first minimum of the whole matrix in row-major order.
    row_min, row_arg = cost.min(1)
    rep = torch.arange(k)  # each point's group representative (the group's smallest index)
    for _ in range(k - num_groups):
        i = int(torch.argmin(row_min))
        j = int(row_arg[i])
        i, j = min(i, j), max(i, j)  # the survivor keeps the smaller index
        n_i, n_j = size[i], size[j]
        cent[i] = (n_i * cent[i] + n_j * cent[j]) / (n_i + n_j)
        size[i] = n_i + n_j
        rep[rep == j] = i
        cost[j, :] = inf
        cost[:, j] = inf
        row_min[j] = inf
        alive = torch.isfinite(row_min)
        alive[i] = False
        d = (cent - cent[i]).pow(2).sum(-1)
        row = torch.where(alive, size * size[i] / (size + size[i]) * d, inf)
        cost[i, :] = row
        cost[:, i] = row
        row_min[i], row_arg[i] = row.min(0)
        if not torch.isfinite(row_min[i]):
            row_arg[i] = 0
        # Rows whose minimum sat in column i or j: rescan; the others: column i may now be lower.
        stale = alive & ((row_arg == i) | (row_arg == j))
        if bool(stale.any()):
            row_min[stale], row_arg[stale] = cost[stale].min(1)
        fresh = alive & ~stale & ((row < row_min) | ((row == row_min) & (i < row_arg)))
        row_min[fresh] = row[fresh]
        row_arg[fresh] = i
    # Number the groups by their representative (= smallest member) in increasing order.
    return torch.unique(rep, return_inverse=True)[1]


class HierarchicalClustering(_TemperatureMixin):
    """Two-level clustering head: K = r·M fine prototypes merged into M clusters by a Ward tree.

    The fine level is soft k-means over K learned prototypes μ_k: f[b, k, n] = −‖x[b, n] − μ_k‖² / τ.
    A cluster's logit is the log-sum-exp of its children's:

        logits[b, m, n] = log Σ_{k : parent[k] = m} exp f[b, k, n],

    so the assignment S = softmax over N of a cluster is driven by the patches close to any of its
    prototypes (a cluster can be several blobs in feature space, which k-means with M centroids
    cannot express). ``parent`` (K,) is the agglomerative (Ward) grouping of the prototypes into M
    groups (:func:`ward_tree`), computed at construction and refreshed by :meth:`rebuild_tree` (e.g.
    once per epoch, as the prototypes move); between rebuilds it is a fixed buffer (in the state dict,
    so a checkpoint restores the tree). A rebuild never changes the prototypes, only how they group.
    With ``ratio=1`` every cluster has one prototype and this is exactly :class:`SoftKMeansClustering`.

    Args:
        dim: channels C of the tokens.
        num_clusters: M (≥ 1).
        ratio: r ≥ 1, fine prototypes per cluster (K = r·M).
        temperature: τ > 0; default √C.
        learn_temperature: learn τ (as log τ).
        init_std: standard deviation of the normal initialisation of the prototypes (K, C).

    Cost per forward: one (B·N, C)×(C, K) matmul (2·B·N·C·K FLOPs, what FlopCounterMode counts) and
    O(B·K·N) elementwise work; memory O(B·K·N) for the fine logits.
    """

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        ratio: int = 4,
        temperature: float | None = None,
        learn_temperature: bool = False,
        init_std: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.dim = _check_count("dim", dim)
        self.num_clusters = _check_count("num_clusters", num_clusters)
        self.ratio = _check_count("ratio", ratio)
        self.num_prototypes = num_clusters * ratio
        self.prototypes = nn.Parameter(torch.randn(self.num_prototypes, dim) * init_std)
        self._init_temperature(dim, temperature, learn_temperature)
        self.register_buffer("parent", torch.zeros(self.num_prototypes, dtype=torch.long))
        self.rebuild_tree()

    @torch.no_grad()
    def rebuild_tree(self) -> Tensor:
        """Recompute ``parent`` from the current prototypes (Ward linkage); returns it."""
        labels = ward_tree(self.prototypes, self.num_clusters)
        self.parent.copy_(labels.to(self.parent.device))
        return self.parent

    def fine_logits(self, x: Tensor) -> Tensor:
        """The prototypes' soft k-means logits f (B, K, N)."""
        return -_sq_dist(x, self.prototypes.to(x.dtype)) / self.temperature.to(x.dtype)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C), N = H·W -> logits (B, M, N)."""
        _check_x(x, self.dim, H, W)
        fine = self.fine_logits(x)  # (B, K, N)
        b, k, n = fine.shape
        index = self.parent.view(1, k, 1).expand(b, k, n)
        # Group-wise log-sum-exp, stabilised by the group maximum (a constant for the gradient, so
        # it is detached; every group is non-empty, so the sum is >= 1 and its log finite).
        top = fine.new_full((b, self.num_clusters, n), float("-inf"))
        top = top.scatter_reduce(1, index, fine.detach(), "amax", include_self=True)
        summed = fine.new_zeros((b, self.num_clusters, n)).scatter_add(1, index, torch.exp(fine - top.gather(1, index)))
        return top + torch.log(summed)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_clusters={self.num_clusters}, ratio={self.ratio}, "
            f"temperature={float(self.temperature):.4g}"
        )


def rebuild_trees(module: nn.Module) -> int:
    """Call :meth:`HierarchicalClustering.rebuild_tree` on every hierarchical head inside ``module``
    (e.g. once per epoch); returns how many were rebuilt."""
    heads = [m for m in module.modules() if isinstance(m, HierarchicalClustering)]
    for head in heads:
        head.rebuild_tree()
    return len(heads)


class DensityClustering(_TemperatureMixin):
    """Density-based clustering head in the spirit of DBSCAN, differentiable and O(N·M·C).

    M learned cores μ_m, each with a learned radius ε_m, play DBSCAN's core points and ε. With
    d[m, n] = ‖x_n − μ_m‖² (one matmul):

    - ε-neighbourhood, soft: a[m, n] = σ((ε_m² − d[m, n]) / τ) ≈ 1 inside the ball, fading outside.
      Inside, every patch is an equal member (DBSCAN does not weight by distance), unlike k-means.
    - minPts, as a share of the patches (N varies with resolution): a core is dense when its ball
      holds at least ``min_samples``·N patches, soft: c_m = σ((mean_n a[m, n] − min_samples) / s),
      s = ``min_samples``/4.
    - noise: a patch reached by no core, r_n = min(1, Σ_m a[m, n]) ≈ 0.

    logits[b, m, n] = log(c_m · a[m, n] + (1 − c_m) · r_n)   (computed in log space).

    A dense core's cluster pools the patches in its ε-ball; a core whose ball is (nearly) empty, which
    DBSCAN would not report as a cluster, falls back to pooling the patches that some core reaches,
    never the noise. Noise patches (outside every ball) get little mass in every cluster. What it
    cannot keep of DBSCAN: the number of clusters is M, fixed, not found from the data (an empty core
    is the closest it comes to "no cluster here"); cores are not chained by density-reachability
    (two overlapping balls stay two clusters); there are no N×N neighbourhoods, so density is
    measured against the cores, not between patches; and membership is soft.

    Args:
        dim: channels C of the tokens.
        num_clusters: M (≥ 1).
        eps: initial radius ε (> 0), the same for every core; default √(2C), the typical distance
            between unit-variance tokens and cores.
        min_samples: minPts as a share of the N patches, in (0, 1); default 0.02.
        temperature: τ > 0, the softness of the ball's edge in squared-distance units; default √C.
        learn_temperature: learn τ (as log τ).
        init_std: standard deviation of the normal initialisation of the cores.

    Parameters: ``cores`` (M, C), ``log_eps2`` (M,) = log ε_m². Cost: one (B·N, C)×(C, M) matmul
    (2·B·N·C·M FLOPs) and O(B·M·N) elementwise work.
    """

    def __init__(
        self,
        dim: int,
        num_clusters: int,
        eps: float | None = None,
        min_samples: float = 0.02,
        temperature: float | None = None,
        learn_temperature: bool = False,
        init_std: float = 1.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.dim = _check_count("dim", dim)
        self.num_clusters = _check_count("num_clusters", num_clusters)
        eps = math.sqrt(2.0 * dim) if eps is None else float(eps)
        if not eps > 0.0 or not math.isfinite(eps):
            raise ValueError(f"eps must be a positive finite number, got {eps}")
        if not 0.0 < float(min_samples) < 1.0:
            raise ValueError(f"min_samples is a share of the patches in (0, 1), got {min_samples}")
        self.min_samples = float(min_samples)
        self.cores = nn.Parameter(torch.randn(num_clusters, dim) * init_std)
        self.log_eps2 = nn.Parameter(torch.full((num_clusters,), 2.0 * math.log(eps)))
        self._init_temperature(dim, temperature, learn_temperature)

    @property
    def eps(self) -> Tensor:
        """The radii ε (M,)."""
        return torch.exp(0.5 * self.log_eps2)

    def forward(self, x: Tensor, H: int, W: int) -> Tensor:
        """x (B, N, C), N = H·W -> logits (B, M, N)."""
        _check_x(x, self.dim, H, W)
        d = _sq_dist(x, self.cores.to(x.dtype))  # (B, M, N)
        z = (self.log_eps2.to(x.dtype).exp()[:, None] - d) / self.temperature.to(x.dtype)
        log_a = F.logsigmoid(z)  # log a[m, n]: soft "within ε_m of core m"
        share = torch.exp(log_a).mean(-1, keepdim=True)  # (B, M, 1): soft |ball| / N
        u = (share - self.min_samples) / (0.25 * self.min_samples)
        log_r = torch.logsumexp(log_a, dim=1, keepdim=True).clamp(max=0.0)  # (B, 1, N): reached at all
        return torch.logaddexp(F.logsigmoid(u) + log_a, F.logsigmoid(-u) + log_r)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_clusters={self.num_clusters}, min_samples={self.min_samples}, "
            f"temperature={float(self.temperature):.4g}"
        )

"""Distance-based clustering heads: soft k-means and a diagonal Gaussian mixture.

Both map patch tokens x (B, N, C) on an H×W grid to cluster logits (B, M, N), like the official
P2CConv2d / P2CMlp / P2CLinear, so the fused ``cluster_pool`` (softmax over N, weighted sum, LayerNorm)
and ``p2c_attention`` kernels serve them unchanged. Select them with ``clustering="kmeans"`` or
``clustering="gmm"`` (``PaCaAttention``, ``build_clustering``, a model's ``paca_cfg["type"]``).

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
from torch import Tensor, nn

__all__ = ["GMMClustering", "SoftKMeansClustering"]

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
        mu = self.centroids.to(x.dtype)
        cross = torch.matmul(mu, x.transpose(1, 2))  # (B, M, N): μ_m·x_n
        sq_dist = x.pow(2).sum(-1).unsqueeze(1) - 2.0 * cross + mu.pow(2).sum(-1)[:, None]
        return -sq_dist / self.temperature.to(x.dtype)

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

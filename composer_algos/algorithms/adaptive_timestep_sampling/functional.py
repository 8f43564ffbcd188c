"""The adaptive sampler's math on plain tensors: the discretised Beta, the F-test, the probe grid, rewards, REINFORCE."""

from __future__ import annotations

import math
from typing import Optional

import torch

__all__ = ['beta_grid_log_probs', 'f_regression_scores', 'grid_timesteps', 'grid_weights', 'reinforce_loss',
           'select_timesteps', 'standardised', 'sum_of_changes']


def beta_grid_log_probs(alpha: torch.Tensor, beta: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """``(B, T)`` log-probabilities of Beta(alpha, beta) on the grid of T timesteps.

    ``p(t) ∝ u_t^(alpha-1) (1 - u_t)^(beta-1)`` at the bin centres ``u_t = (t + 0.5) / T``, normalised over t, so
    every timestep (the ends included) is a full bin and Beta(1, 1) is exactly uniform.

    Example:
        >>> p = beta_grid_log_probs(torch.tensor([1.0]), torch.tensor([1.0]), 4).exp()
        >>> p
        tensor([[0.2500, 0.2500, 0.2500, 0.2500]])
    """
    u = (torch.arange(num_timesteps, device=alpha.device, dtype=alpha.dtype) + 0.5) / num_timesteps
    log_density = torch.stack([alpha - 1, beta - 1], dim=1) @ torch.stack([torch.log(u), torch.log1p(-u)])
    return torch.log_softmax(log_density, dim=1)


def f_regression_scores(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Univariate F statistic of each column of ``features`` (n, d) against ``target`` (n,), in float64.

    ``F_j = r_j^2 / (1 - r_j^2) * (n - 2)`` with ``r_j`` the Pearson correlation of column j with the target: the
    score of scikit-learn's ``f_regression`` (with ``force_finite=True``: a constant column or target scores 0, a
    perfectly correlated column the largest float).
    """
    x = features.double() - features.double().mean(0)
    y = target.double() - target.double().mean()
    denom = x.norm(dim=0) * y.norm()
    r = torch.where(denom > 0, (x * y[:, None]).sum(0) / denom.clamp(min=torch.finfo(torch.float64).tiny),
                    torch.zeros_like(denom))
    r2 = r * r
    dof = features.shape[0] - 2
    scores = r2 / (1.0 - r2).clamp(min=0) * dof
    return torch.where(torch.isfinite(scores), scores, torch.full_like(scores, torch.finfo(torch.float64).max))


def select_timesteps(queue_x: torch.Tensor, queue_y: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the ``k`` columns of ``queue_x`` with the highest F statistic against ``queue_y``."""
    scores = f_regression_scores(queue_x, queue_y)
    return torch.sort(torch.topk(scores, k).indices).values


def grid_timesteps(num_timesteps: int, num_points: int) -> torch.Tensor:
    """``num_points`` evenly spaced timesteps from 0 to T-1 (both ends included): the feature-selection probe."""
    return torch.linspace(0, num_timesteps - 1, num_points).round().long()


def grid_weights(grid: torch.Tensor, num_timesteps: int) -> torch.Tensor:
    """How many of the T timesteps each grid point stands for: the timesteps nearer to it than to its neighbours.

    The weighted sum of per-grid-point values estimates their sum over all T timesteps: exactly for a constant, within
    0.1% for a linear ramp over T = 1000 with 32 points; the weights sum to T. An unweighted sum would count t = 0, one timestep, as much as an
    interior point that stands for T / (K - 1).

    Example:
        >>> grid_weights(torch.tensor([0, 4, 9]), 10)
        tensor([2., 5., 3.], dtype=torch.float64)
    """
    g = grid.double()
    edges = torch.cat([g.new_tensor([-0.5]), (g[1:] + g[:-1]) / 2, g.new_tensor([num_timesteps - 0.5])])
    # Cell k holds the integers t with edge_k < t + 0.5 <= edge_{k+1} (a tie goes to the later point).
    counts = torch.floor(edges - 0.5)
    return counts[1:] - counts[:-1]


def sum_of_changes(changes: torch.Tensor, per_timestep_scale: bool, scale: Optional[torch.Tensor] = None
                   ) -> torch.Tensor:
    """Per-sample reward from ``(|S|, B)`` changes (before minus after) at the selected timesteps.

    Without ``per_timestep_scale`` the changes are summed (the paper). With it, each timestep's changes are first
    divided by ``scale`` (``(|S|,)``, default: the mean absolute change at that timestep over the batch), so every
    selected timestep counts alike instead of the one with the largest terms.
    """
    if not per_timestep_scale:
        return changes.sum(0)
    if scale is None:
        scale = changes.abs().mean(1)
    return (changes / scale.clamp(min=torch.finfo(changes.dtype).tiny)[:, None]).sum(0)


def standardised(reward: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """``(reward - mean) / std``, or zeros when the rewards do not vary."""
    return (reward - mean) / std if std > 0 else torch.zeros_like(reward)


def reinforce_loss(sample_log_probs: torch.Tensor, t: torch.Tensor, advantage: torch.Tensor, entropy_coef: float,
                   policy_log_probs: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE loss with an entropy bonus: ``-mean_n(A_n log p(t_n | x_n)) - entropy_coef * H``.

    Args:
        sample_log_probs: ``(B, T)`` log-probabilities of the distribution ``t`` was drawn from (with grad).
        t: ``(B,)`` drawn timesteps.
        advantage: ``(B,)`` advantages (treated as constants).
        entropy_coef: weight of the entropy bonus.
        policy_log_probs: ``(B, T)`` log-probabilities whose mean entropy ``H`` is the bonus (default:
            ``sample_log_probs``).

    Returns:
        The loss and the mean entropy ``H``.
    """
    policy_log_probs = sample_log_probs if policy_log_probs is None else policy_log_probs
    chosen = sample_log_probs.gather(1, t.to(sample_log_probs.device).long()[:, None]).squeeze(1)
    entropy = -(policy_log_probs.exp() * policy_log_probs).sum(1).mean()
    loss = -(advantage.detach().to(chosen) * chosen).mean() - entropy_coef * entropy
    return loss, entropy


def nats_to_bits(value: torch.Tensor) -> torch.Tensor:
    return value / math.log(2.0)

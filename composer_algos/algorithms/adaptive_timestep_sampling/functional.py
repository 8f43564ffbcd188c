"""The adaptive sampler's math on tensors: the discretised Beta, the F-test, the probe grid, rewards, REINFORCE."""

from __future__ import annotations

import math

import torch

__all__ = [
    'beta_grid_log_probs',
    'clipped_importance_weights',
    'f_regression_scores',
    'grid_timesteps',
    'grid_weights',
    'kl_divergence',
    'mix_with_uniform',
    'nats_to_bits',
    'reinforce_loss',
    'select_timesteps',
    'standardised',
    'sum_of_changes',
    'time_averaged_distribution',
]


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
    r = torch.where(
        denom > 0, (x * y[:, None]).sum(0) / denom.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(denom)
    )
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
    0.1% for a linear ramp over T = 1000 with 32 points; the weights sum to T. An unweighted sum would count t = 0,
    one timestep, as much as an interior point that stands for T / (K - 1).

    Example:
        >>> grid_weights(torch.tensor([0, 4, 9]), 10)
        tensor([2., 5., 3.], dtype=torch.float64)
    """
    g = grid.double()
    edges = torch.cat([g.new_tensor([-0.5]), (g[1:] + g[:-1]) / 2, g.new_tensor([num_timesteps - 0.5])])
    # Cell k holds the integers t with edge_k < t + 0.5 <= edge_{k+1} (a tie goes to the later point).
    counts = torch.floor(edges - 0.5)
    return counts[1:] - counts[:-1]


def sum_of_changes(changes: torch.Tensor, per_timestep_scale: bool, scale: torch.Tensor | None = None) -> torch.Tensor:
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


def reinforce_loss(
    sample_log_probs: torch.Tensor,
    t: torch.Tensor,
    advantage: torch.Tensor,
    entropy_coef: float,
    policy_log_probs: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE with the entropy bonus in the reward, as the paper's code computes it on a continuous Beta.

    ``loss = -mean_n[ log(T p(t_n | x_n)) * (A_n + entropy_coef * (H(pi_n) - ln T)) ]``, with ``A_n`` a constant
    and the entropy not detached. On the grid of T timesteps ``log(T p(t))`` is the continuous log-density of
    ``u = t / T`` and ``H - ln T`` its differential entropy (up to the discretisation), so the bonus has the scale it
    has in the code: about 0 near uniform, where both vanish, and in expectation ``entropy_coef * KL(p || U)`` times
    the entropy's gradient once the policy has sharpened. (With ``log p`` instead, the term would carry an offset
    ``-ln T * entropy_coef * dH`` that pulls towards uniform with a strength independent of the reward.) ``ln T``
    times ``A_n`` adds nothing to the gradient: ``A_n`` is a constant.

    Args:
        sample_log_probs: ``(B, T)`` log-probabilities of the distribution ``t`` was drawn from (with grad).
        t: ``(B,)`` drawn timesteps.
        advantage: ``(B,)`` advantages (treated as constants).
        entropy_coef: weight of the entropy bonus.
        policy_log_probs: ``(B, T)`` log-probabilities whose entropy makes the bonus (default: ``sample_log_probs``):
            the policy's own when a prior tilts it, so that the bonus does not push the policy to undo the prior.

    Returns:
        The loss and the mean entropy ``H`` (in nats, of the discrete distribution).

    Example:
        >>> log_p = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
        >>> loss, h = reinforce_loss(log_p, torch.tensor([0]), torch.tensor([2.0]), 0.0)
        >>> round(float(loss), 4), round(float(h), 4)  # -log(3 * 0.5) * 2
        (-0.8109, 1.0397)
    """
    policy_log_probs = sample_log_probs if policy_log_probs is None else policy_log_probs
    num_timesteps = sample_log_probs.shape[1]
    chosen = sample_log_probs.gather(1, t.to(sample_log_probs.device).long()[:, None]).squeeze(1)
    # p log p from the log-probabilities: finite with a finite gradient where p underflows to 0.
    entropy = -(policy_log_probs.exp() * policy_log_probs).sum(1)
    reward = advantage.detach().to(chosen) + entropy_coef * (entropy - math.log(num_timesteps))
    loss = -((chosen + math.log(num_timesteps)) * reward).mean()
    return loss, entropy.mean()


def mix_with_uniform(log_probs: torch.Tensor, uniform_mix: float) -> torch.Tensor:
    """``log((1 - eps) p + eps / T)`` for ``(B, T)`` or ``(T,)`` log-probabilities ``log p``; ``eps = 0`` returns them.

    Every timestep keeps at least ``eps / T``: the distribution's importance weights ``1 / (T p)`` stay below
    ``1 / eps`` and no timestep is ever left out of training.
    """
    if uniform_mix == 0:
        return log_probs
    floor = torch.full_like(log_probs, math.log(uniform_mix / log_probs.shape[-1]))
    return torch.logaddexp(log_probs + math.log1p(-uniform_mix), floor)


def clipped_importance_weights(ratios: torch.Tensor, clip: float) -> torch.Tensor:
    """Importance weights ``min(r, clip)`` divided by their mean over the batch, from ratios ``r = q(t) / p(t)``.

    Without the clip, ``E_p[r(t) L(t)] = E_q[L(t)]``: the loss of the target distribution ``q`` (uniform, or uniform
    tilted by a curriculum's prior), with a variance that depends on ``p``. The clip bounds the variance where
    ``p < q / clip`` (and biases the objective there); the division by the batch's mean keeps the loss's scale that of
    unweighted draws, so the learning rate means the same.

    Example:
        >>> clipped_importance_weights(torch.tensor([0.5, 1.5, 40.0]), 10.0)
        tensor([0.1250, 0.3750, 2.5000])
    """
    clipped = ratios.clamp(max=clip)
    return clipped / clipped.mean().clamp(min=torch.finfo(clipped.dtype).tiny)


def kl_divergence(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` over the last dimension of ``(B, T)`` log-probabilities, per row (zero-probability terms of
    ``p`` count 0)."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, torch.zeros_like(log_p))).sum(-1)


def time_averaged_distribution(steps: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """The average of distributions ``probs`` ``(R, T)`` recorded at training ``steps`` ``(R,)``, each weighted by the
    steps it covers: those nearer to its record than to any other, from step 0 to the last record. ``(T,)`` float64.

    Between records the distribution is taken to be the nearest record's, so the average is what the sampler drew
    from over the run (a row of the first record also stands for the steps before it).

    Example:
        >>> time_averaged_distribution(torch.tensor([10, 20, 40]), torch.eye(3))
        tensor([0.3750, 0.3750, 0.2500], dtype=torch.float64)
    """
    steps = torch.as_tensor(steps).double().flatten()
    probs = torch.as_tensor(probs).double()
    if probs.dim() != 2 or probs.shape[0] != steps.numel() or probs.shape[0] == 0:
        raise ValueError(
            f'Expected one distribution row per step, got steps {tuple(steps.shape)} and probs {tuple(probs.shape)}.'
        )
    if bool((steps[1:] <= steps[:-1]).any()) or float(steps[0]) < 0:
        raise ValueError('The steps of the records must be non-negative and increasing.')
    edges = torch.cat([steps.new_zeros(1), (steps[1:] + steps[:-1]) / 2, steps[-1:]])
    weights = edges[1:] - edges[:-1]
    if float(weights.sum()) <= 0:  # one record at step 0
        weights = torch.ones_like(weights)
    rows = probs / probs.sum(1, keepdim=True)
    average = (weights[:, None] * rows).sum(0) / weights.sum()
    if not bool(torch.isfinite(average).all()) or bool((average < 0).any()):
        raise ValueError('The recorded distributions must be finite and non-negative.')
    return average


def nats_to_bits(value: torch.Tensor) -> torch.Tensor:
    return value / math.log(2.0)

"""What made a diffusion loss NaN or infinite: the batch, a loss weighting, the sampler's weights or the denoiser.

Runs only once the loss is known to be non-finite, so it costs nothing on a healthy step. It looks at this rank's
tensors only (the local shards of FSDP parameters): the error it helps to word is raised on this rank alone.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ['nonfinite_loss_causes']


def _listing(values: list, limit: int = 8) -> str:
    return str(values[:limit])[:-1] + (f', ... ({len(values)} in all)]' if len(values) > limit else ']')


def _bad_rows(x: torch.Tensor) -> list[int]:
    x = x.detach()
    return torch.nonzero(~torch.isfinite(x.reshape(x.shape[0], -1)).all(1)).flatten().tolist()


def nonfinite_loss_causes(model: Any, record: Any, batch: Any) -> list[str]:
    """Each cause found, in words, with where to look; empty if none of the checked ones is the cause.

    ``record`` is the forward's :class:`~composer_algos.diffusion.draw.DrawRecord`.
    """
    causes = []
    try:
        x0 = model.images(batch)
    except Exception:  # the batch was readable in forward; a second failure here says nothing new
        x0 = None
    if x0 is not None and torch.is_tensor(x0):
        rows = _bad_rows(x0)
        if rows:
            causes.append(f"the batch holds NaN or inf values in samples {_listing(rows)} of this rank's batch")
    # Weightings take what the objective draws: t, or sigma on a flow-matching model.
    name, level = ('t', record.t) if record.sigma is None else ('sigma', record.sigma)
    for owner, weighting in getattr(model, '_weightings', []):
        with torch.no_grad():
            weights = weighting(model.noise_schedule, level, model.prediction_type)
        rows = _bad_rows(weights.reshape(-1, 1))
        if rows:
            causes.append(f'the loss weighting of {owner} is NaN or inf at {name}={_listing(level[rows].tolist())}')
    if not causes and _bad_rows(record.loss_weight.reshape(-1, 1)):
        causes.append(
            f'the timestep sampler of {model.timestep_sampler_owner or "the model"} gave NaN or inf importance weights'
        )
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, 'to_local') else param
        if not bool(torch.isfinite(local.detach()).all()):
            causes.append(f'the weights hold NaN or inf ({name}, ...): training diverged')
            break
    if not causes and _bad_rows(record.per_sample_loss.reshape(-1, 1)):
        causes.append("the denoiser's prediction overflowed: training is diverging")
    return causes

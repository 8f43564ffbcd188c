"""The adaptive sampler's probe (arXiv 2411.09998): terms before and after an optimizer step, and the reward."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from composer_algos.algorithms.adaptive_timestep_sampling.functional import nats_to_bits, sum_of_changes
from composer_algos.algorithms.adaptive_timestep_sampling.precision import FullPrecisionReplica, probe_math
from composer_algos.algorithms.adaptive_timestep_sampling.selection import TimestepSelection
from composer_algos.distributed import all_reduce, broadcast, global_positions, rank_world
from composer_algos.evaluation.generation import eval_mode
from composer_algos.seeding import derive_seed, keyed_uniform_and_normal

__all__ = ['TERMS', 'Probe', 'Prober']

# What a probe measures at each timestep: the VLB's Gaussian KL term, or the unweighted training loss.
TERMS = ('kl', 'loss')
# Keys of the probes' random streams (see composer_algos.seeding).
_IMAGE_STREAM, _BATCH_STREAM, _GRID_STREAM = 0, 1, 2


@dataclasses.dataclass
class Probe:
    """One probe, from its first pass (before the optimizer step) to its second (after it)."""

    step: int
    x0: torch.Tensor  # this rank's batch, on the device
    tau: torch.Tensor  # S
    inputs: torch.Tensor  # |S| copies of the batch, then the grid's copies of the probe image
    timesteps: torch.Tensor  # the timestep of each input
    conditioning: dict[str, torch.Tensor]
    noise_keys: list[tuple[int, ...]]
    num_real: int  # this rank's real (not padding) grid entries
    before: torch.Tensor | None = None  # (|S|, B) terms of the batch
    grid_before: torch.Tensor | None = None  # the probe image's terms at this rank's grid share
    seconds: float = 0.0
    t: list[torch.Tensor] = dataclasses.field(default_factory=list)  # the timesteps drawn, per micro-batch
    prior: torch.Tensor | None = None  # the curriculum prior t was drawn under (from the model's draw record)


class Prober:
    """The two passes of a probe and the per-sample reward they give.

    A pass evaluates, in one batched denoiser forward without grad, in eval mode and outside autocast, the terms of
    this rank's batch at each timestep of ``S`` and of one probe image of the global batch (chosen by the probe's
    key, broadcast by its rank) at this rank's share of the probe grid. The noise of every term is keyed by the
    probe's number and the sample's position in the global batch (or the grid timestep), so the pass after the
    optimizer step sees the same numbers as the pass before it (common random numbers) on any number of ranks.

    Args:
        seed: key of the probes' noise and of the choice of the probe image.
        terms: ``'kl'`` (the VLB's Gaussian KL term, t = 0 included, predicted x0 not clamped) or ``'loss'`` (the
            unweighted training loss).
        in_bits: KL terms in bits (else nats).
        per_timestep_scale: divide each timestep's changes by their mean absolute value over the global batch
            before summing them into the reward.
        probe_precision: ``'tf32'`` or ``'fp32'`` (see ``precision.py``).
    """

    def __init__(self, seed: int, terms: str, in_bits: bool, per_timestep_scale: bool, probe_precision: str):
        if terms not in TERMS:
            raise ValueError(f'terms must be one of {TERMS}, got {terms!r}.')
        self.seed = seed
        self.terms = terms
        self.in_bits = in_bits
        self.per_timestep_scale = per_timestep_scale
        self.probe_precision = probe_precision
        self.replica: FullPrecisionReplica | None = None

    def before(
        self,
        model: Any,
        x0: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        tau: torch.Tensor,
        selection: TimestepSelection,
        number: int,
        step: int,
    ) -> Probe:
        """The first pass of probe ``number`` (before the optimizer step of ``step``) on this rank's batch ``x0``."""
        _, world_size = rank_world()
        batch_size = x0.shape[0]
        # The feature probe: one image of the global batch, chosen by the probe's key; its owner broadcasts it and
        # every rank takes its share of the grid.
        index, owner = divmod(derive_seed(self.seed, _IMAGE_STREAM, number) % (batch_size * world_size), world_size)
        image = broadcast(x0[index : index + 1].clone(), src=owner)
        image_cond = {k: broadcast(v[index : index + 1].clone(), src=owner) for k, v in conditioning.items()}
        grid_index, num_real = selection.grid_share()
        grid = selection.probe_timesteps[grid_index].to(x0.device)
        num_selected = len(tau)

        def stack(batch_part: torch.Tensor, image_part: torch.Tensor) -> torch.Tensor:
            # |S| copies of the batch (tau-major), then the grid's copies of the probe image.
            return torch.cat(
                [
                    batch_part.repeat((num_selected,) + (1,) * (batch_part.dim() - 1)),
                    image_part.expand(len(grid), *image_part.shape[1:]),
                ]
            )

        # Noise keyed by (probe, tau, position in the global batch) and (probe, grid timestep): the pass after the
        # step draws the same numbers (common random numbers) on any number of ranks, and nothing is stored.
        positions = global_positions(batch_size)
        noise_keys: list[tuple[int, ...]] = [
            (_BATCH_STREAM, number, i, p) for i in range(num_selected) for p in positions
        ]
        noise_keys += [(_GRID_STREAM, number, int(g)) for g in grid_index]
        probe = Probe(
            step=step,
            x0=x0,
            tau=tau,
            inputs=stack(x0, image),
            timesteps=torch.cat([tau.repeat_interleave(batch_size), grid]),
            conditioning={k: stack(v, image_cond[k]) for k, v in conditioning.items()},
            noise_keys=noise_keys,
            num_real=num_real,
        )
        probe.before, probe.grid_before = self.run(model, probe)
        return probe

    def after(self, model: Any, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
        """The second pass: the ``(|S|, B)`` changes (before minus after) of the batch's terms and those of the
        probe image at this rank's real grid entries."""
        assert probe.before is not None and probe.grid_before is not None, 'the probe had no first pass (before)'
        after, grid_after = self.run(model, probe)
        return probe.before - after, (probe.grid_before - grid_after)[: probe.num_real]

    def run(self, model: Any, probe: Probe) -> tuple[torch.Tensor, torch.Tensor]:
        """Every term of a probe in one batched denoiser forward, eval mode, with the probe's keyed noise.

        Returns the ``(|S|, B)`` terms of the batch and the grid share's terms of the probe image.
        """
        x = probe.inputs
        _, noise = keyed_uniform_and_normal(self.seed, probe.noise_keys, x.shape[1:])
        noise = noise.to(x.device, x.dtype)
        denoiser = self.replica.refresh(model.denoiser) if self.replica is not None else None
        with eval_mode(model), probe_math(x.device, self.probe_precision):
            if self.terms == 'kl':
                terms = model.vlb_terms(
                    x, probe.timesteps, noise, probe.conditioning, denoiser=denoiser, decoder_nll=False, clip=False
                ).double()
            else:
                terms = model.training_losses(x, probe.timesteps, noise, probe.conditioning, denoiser=denoiser).double()
        if self.in_bits and self.terms == 'kl':
            terms = nats_to_bits(terms)
        num_batch_terms = len(probe.tau) * probe.x0.shape[0]
        return terms[:num_batch_terms].view(len(probe.tau), -1), terms[num_batch_terms:]

    def rewards(self, changes: torch.Tensor) -> torch.Tensor:
        """Per-sample rewards from this rank's ``(|S|, B)`` changes (before minus after) at the selected timesteps.

        With a per-timestep scale, each timestep's scale is its mean absolute change over all ranks' samples.
        """
        scale = None
        if self.per_timestep_scale:
            clean = torch.where(torch.isfinite(changes), changes, torch.zeros_like(changes))
            totals = all_reduce(torch.cat([clean.abs().sum(1), clean.new_tensor([float(changes.shape[1])])]))
            scale = totals[:-1] / totals[-1].clamp(min=1)
        return sum_of_changes(changes, self.per_timestep_scale, scale)

"""The model contract: every member that algorithms and callbacks use on a diffusion model, checked at install."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import nn

from composer_algos.diffusion.draw import DrawRecord
from composer_algos.registry import ConfigError

__all__ = [
    'CONTRACT_MEMBERS',
    'DRAW_KEY',
    'DiffusionContract',
    'OBJECTIVES',
    'get_diffusion_model',
    'missing_members',
    'record_of',
]

# What a model can train; ``DiffusionContract.objective``.
OBJECTIVES = ('ddpm', 'flow_matching')

# The one key of the forward outputs (training and evaluation) that holds the batch's DrawRecord.
DRAW_KEY = 'draw'


class DiffusionContract(Protocol):
    """What algorithms and callbacks use on a diffusion model, and nothing else.

    :class:`~composer_algos.diffusion.DiffusionModel` and :class:`~composer_algos.diffusion.FlowMatchingModel`
    implement it; a user's ``ComposerModel`` can too. Its forward returns ``{DRAW_KEY: DrawRecord}``: what was
    drawn for the batch and the unweighted per-sample loss at it (algorithms read it through
    ``composer_algos.algorithms.common.draw_record``). Each algorithm declares the members it ``needs``; they are
    checked once, when it installs at ``Event.INIT`` (:func:`get_diffusion_model`).
    """

    # ------------------------------------------------------------------------------------------- what it trains
    @property
    def objective(self) -> str:
        """``'ddpm'`` or ``'flow_matching'`` (:data:`OBJECTIVES`); a model without it is taken to train DDPM."""

    @property
    def noise_schedule(self) -> Any:
        """The schedule: a ``NoiseSchedule`` (DDPM: ``alphas_cumprod``, ``snr``) or a ``FlowSchedule`` (its cells of
        sigma, ``cell_centres``)."""

    @property
    def num_timesteps(self) -> int:
        """T: the timesteps of a DDPM schedule, or the cells of a flow model's grid on sigma."""

    @property
    def prediction_type(self) -> str:
        """What the denoiser predicts: ``'epsilon'``, ``'v_prediction'``, ``'sample'`` or ``'velocity'`` (flow)."""

    @property
    def denoiser(self) -> nn.Module:
        """The trained network, called as ``denoiser(x_t, t, **conditioning)``."""

    @property
    def encoder(self) -> nn.Module | None:
        """The frozen encoder of a latent model, or ``None`` (read with a default of ``None``)."""

    @property
    def label_key(self) -> Any:
        """The batch key of class labels, or ``None`` for an unconditional model (read with a default of ``None``)."""

    @property
    def conditioner(self) -> Any:
        """What the denoiser is told about each sample, a ``Conditioner`` (none, class label, text; its ``kind``), or
        ``None`` (read with a default of ``None``)."""

    # ------------------------------------------------------------------------------------------- the timestep sampler
    @property
    def timestep_sampler(self) -> Any:
        """The active ``TimestepSampler`` (a distribution over the T grid cells)."""

    @property
    def timestep_sampler_owner(self) -> str | None:
        """The name of the algorithm that installed the sampler, ``None`` for the default."""

    def set_timestep_sampler(self, sampler: Any, owner: str) -> None:
        """Install ``sampler`` for ``owner``; a second, different owner is an error naming both."""

    def add_timestep_prior(self, prior: Any, owner: str) -> None:
        """Tilt whichever sampler is active by ``prior(T, device) -> (T,)`` masses (replacing ``owner``'s last one)."""

    def timestep_probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The ``(T,)`` or per-sample ``(B, T)`` distribution t is drawn from: the sampler's, tilted by the priors."""

    def timestep_distribution(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The marginal ``(T,)`` distribution over t (averaged over the batch for per-sample samplers), no grad."""

    # ------------------------------------------------------------------------------------------- the noise
    def set_noise_coupling(self, coupling: Any, owner: str) -> None:
        """Let ``coupling(NoiseDraw) -> (noise, NoisePairing)`` pair each training batch's keyed noise with its
        data (``draw.py``; the record's ``noise_pairing`` says what it did); a second, different owner is an
        error naming both."""

    # ------------------------------------------------------------------------------------------- the loss
    def add_loss_weighting(self, weighting: Any, owner: str) -> None:
        """Multiply the per-sample loss by ``weighting(schedule, level, prediction_type)`` (replacing ``owner``'s)."""

    def grid_points(self) -> torch.Tensor:
        """``(T,)``: what loss weightings take at each grid cell (the timesteps, or the cells' centre sigmas)."""

    def training_losses(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        conditioning: dict | None = None,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """``(B,)`` unweighted training losses at grid cells ``t`` with the given noise, no grad."""

    def vlb_terms(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        conditioning: dict | None = None,
        denoiser: nn.Module | None = None,
        decoder_nll: bool = True,
        clip: bool | None = None,
    ) -> torch.Tensor:
        """``(B,)`` variational-bound terms in nats per dimension at ``(x0, t, noise)``, no grad (DDPM)."""

    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        """``(B,)`` ``KL(q(x_T | x0) || N(0, I))`` in nats per dimension (DDPM)."""

    # ------------------------------------------------------------------------------------------- data and sampling
    def images(self, batch: Any) -> torch.Tensor:
        """The batch's clean data x0 (latents for a latent model)."""

    def conditioning(self, batch: Any) -> dict[str, torch.Tensor]:
        """The denoiser's keyword arguments from the batch (class labels, text embeddings), ``{}`` for an unconditional
        model; never dropped (caption dropout belongs to the training forward), no grad."""

    def generate(
        self,
        num_samples: int,
        shape: Sequence[int],
        num_steps: int = 50,
        eta: float = 0.0,
        seed: int = 0,
        labels: torch.Tensor | None = None,
        device: torch.device | None = None,
        clip: bool | None = None,
        noise: torch.Tensor | None = None,
        solver: str | None = None,
        prompts: Sequence[str] | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """``(num_samples, *shape)`` samples from ``seed`` (or the starting ``noise``), no grad; ``labels`` or
        ``prompts`` condition them, ``guidance_scale`` > 1 guides towards them (classifier-free)."""


# Members read with a default (``getattr(model, name, default)``): a model may leave them out.
_OPTIONAL = ('objective', 'encoder', 'label_key', 'conditioner', 'timestep_sampler', 'timestep_sampler_owner')
CONTRACT_MEMBERS = tuple(name for name in vars(DiffusionContract) if not name.startswith('_'))


def missing_members(model: Any, names: Iterable[str] = CONTRACT_MEMBERS) -> list[str]:
    """The members of ``names`` that ``model`` lacks, sorted (optional members count as present)."""
    return sorted(name for name in names if name not in _OPTIONAL and not hasattr(model, name))


def get_diffusion_model(model: nn.Module, who: Any = None, needs: Sequence[str] = CONTRACT_MEMBERS) -> Any:
    """The module behind Composer's wrappers (DDP's ``.module``) that provides the contract members ``needs``.

    Raises a ``ConfigError`` in one line naming ``who`` (an algorithm or callback, or its name), what it needs and what
    the model lacks.

    Example:
        >>> try:
        ...     get_diffusion_model(nn.Linear(1, 1), 'MinSNRWeighting', ('add_loss_weighting',))
        ... except ConfigError as error:
        ...     print(str(error).split(' (')[0])
        MinSNRWeighting needs the model to provide add_loss_weighting; Linear lacks add_loss_weighting
    """
    name = who if isinstance(who, str) or who is None else type(who).__name__
    unknown = sorted(set(needs) - set(CONTRACT_MEMBERS))
    if unknown:
        raise ValueError(f'{name or "A caller"} names {unknown}, which are not members of DiffusionContract.')
    found: Any = model  # a wrapper's .module, which torch types as Tensor | Module
    while missing_members(found, needs) and hasattr(found, 'module'):
        found = found.module
    missing = missing_members(found, needs)
    if missing:
        raise ConfigError(
            f'{name or "This"} needs the model to provide {", ".join(sorted(needs))}; '
            f'{type(found).__name__} lacks {", ".join(missing)} (composer_algos.diffusion.contract.'
            'DiffusionContract documents each).'
        )
    return found


def record_of(outputs: Any, who: str | None = None) -> DrawRecord:
    """The :class:`DrawRecord` a forward published under :data:`DRAW_KEY` (a clear error naming ``who`` if none)."""
    record = outputs.get(DRAW_KEY) if isinstance(outputs, Mapping) else None
    if not isinstance(record, DrawRecord):
        found = sorted(map(str, outputs)) if isinstance(outputs, Mapping) else type(outputs).__name__
        raise ValueError(
            f'{who or "This"} reads the draw record from the forward outputs: a dict with a DrawRecord '
            f'under {DRAW_KEY!r}, as DiffusionModel returns; the model returned {found}.'
        )
    return record

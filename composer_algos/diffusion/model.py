"""DiffusionModel: a ComposerModel that trains any denoiser with a replaceable timestep sampler."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from composer.models import ComposerModel
from torch import nn
from torchmetrics import Metric

from composer_algos.diffusion.conditioning import (
    ClassLabelConditioner,
    Conditioner,
    Guidance,
    NoConditioner,
    batch_entry,
    caption_drop_mask,
    check_denoiser_keywords,
    check_guidance_scale,
)
from composer_algos.diffusion.contract import DRAW_KEY, record_of
from composer_algos.diffusion.diagnostics import nonfinite_loss_causes
from composer_algos.diffusion.draw import (
    DROPOUT_STREAM,
    DrawRecord,
    NoiseCoupling,
    NoiseDraw,
    couple_noise,
    draw_levels,
    evaluation_draw,
    objective_grid_points,
    objective_log_probs,
    objective_sampler,
    objective_sigma_grid,
    tilted_distribution,
    training_randoms,
)
from composer_algos.diffusion.flow import FlowSchedule
from composer_algos.diffusion.schedule import PREDICTION_TYPES, NoiseSchedule, check_prediction_type
from composer_algos.diffusion.timestep_samplers import TimestepPrior, TimestepSampler
from composer_algos.diffusion.utils import module_device, reshard_fsdp2
from composer_algos.diffusion.vlb import discretized_gaussian_log_likelihood, normal_kl
from composer_algos.distributed import fsdp_gradient_scale, rank_world
from composer_algos.registry import ConfigError
from composer_algos.seeding import derive_seed

__all__ = [
    'DiffusionModel',
    'DiffusionLoss',
    'LossWeighting',
    'PREDICTION_TYPES',
    'loss_weight_product',
    'timestep_bands',
]

log = logging.getLogger(__name__)

# A loss weighting maps (schedule, t, prediction_type) to per-sample weights of shape (B,).
LossWeighting = Callable[[NoiseSchedule, torch.Tensor, str], torch.Tensor]


def loss_weight_product(
    weightings: Iterable[LossWeighting], schedule: Any, level: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """``(B,)`` float32: the product of every weighting at the noise levels ``level`` (``t``, or flow matching's
    sigma) of ``schedule``; 1 without weightings."""
    weight = torch.ones(level.shape[0], device=level.device)
    for weighting in weightings:
        weight = weight * weighting(schedule, level, prediction_type).to(weight)
    return weight


def timestep_bands(t: torch.Tensor, num_bands: int, num_timesteps: int) -> torch.Tensor:
    """The band of each timestep when [0, T) is cut into ``num_bands`` equal bands: ``t * num_bands // T``."""
    return (t * num_bands // num_timesteps).clamp(max=num_bands - 1)


class DiffusionLoss(Metric):
    """Mean unweighted per-sample diffusion loss; with ``num_bands > 1`` also the mean in each band of t."""

    full_state_update = False
    # States made by add_state.
    total: torch.Tensor
    count: torch.Tensor

    def __init__(self, num_timesteps: int, num_bands: int = 1):
        super().__init__()
        self.num_timesteps = num_timesteps
        self.num_bands = num_bands
        self.add_state('total', default=torch.zeros(num_bands, dtype=torch.float64), dist_reduce_fx='sum')
        self.add_state('count', default=torch.zeros(num_bands, dtype=torch.float64), dist_reduce_fx='sum')

    def update(self, per_sample_loss: torch.Tensor, t: torch.Tensor) -> None:
        band = timestep_bands(t, self.num_bands, self.num_timesteps)
        loss = per_sample_loss.detach().to(torch.float64)
        self.total.index_add_(0, band, loss)
        self.count.index_add_(0, band, torch.ones_like(loss))

    def compute(self) -> torch.Tensor:
        if self.num_bands == 1:
            return self.total[0] / self.count[0].clamp(min=1)
        return self.total / self.count.clamp(min=1)


class DiffusionModel(ComposerModel):
    """Trains ``denoiser(x_t, t, **conditioning)`` to predict noise, velocity or the clean sample.

    The model carries the contract that timestep and weighting algorithms use, so they never reach inside it:

    * ``noise_schedule`` (T, ``alphas_cumprod``, ``snr``) and ``prediction_type``;
    * a replaceable ``timestep_sampler`` owned by at most one algorithm (:meth:`set_timestep_sampler`), plus
      curriculum priors that tilt it (:meth:`add_timestep_prior`);
    * a chain of loss weightings that multiply (:meth:`add_loss_weighting`);
    * forward outputs ``{'draw': DrawRecord}``: the drawn ``t``, the distribution it came from, the noise, the
      unweighted ``per_sample_loss`` and the total ``loss_weight`` (:class:`~composer_algos.diffusion.draw.DrawRecord`);
    * :meth:`vlb_terms`, per-sample variational-bound terms at given ``(x0, t, noise)`` without grad;
    * :meth:`draw_randoms`: t and noise keyed by the sample's position in the global batch and a draw index that
      checkpoints save, so a run draws the same numbers resumed or not, on any number of ranks;
    * a noise coupling (:meth:`set_noise_coupling`) that may pair each training batch's keyed noise with its data.

    Args:
        denoiser: any module called as ``denoiser(x_t, t, **conditioning)``; an output with a ``.sample``
            attribute (diffusers) or a tuple is unwrapped. Extra output channels (a learned variance) are ignored.
        noise_schedule: the :class:`NoiseSchedule` (default: linear, T=1000).
        prediction_type: ``'epsilon'``, ``'v_prediction'`` or ``'sample'``.
        image_key: batch key (or tuple index) of the images, scaled to [-1, 1].
        label_key: batch key of class labels, passed to the denoiser as ``conditioning_kwarg``; ``None`` for an
            unconditional model. Shorthand for ``conditioner=ClassLabelConditioner(label_key, conditioning_kwarg)``.
        conditioning_kwarg: the denoiser's keyword for labels (``class_labels`` for diffusers models).
        encoder: optional frozen module mapping images to latents (latent diffusion); its output is multiplied by
            ``latent_scale``.
        latent_scale: scale applied to encoder outputs.
        seed: seed of the training draws (t, noise, the denoiser's dropout) and of the evaluation loss's draws.
        check_finite_loss: raise a clear error when the loss becomes NaN or infinite.
        num_loss_bands: bands of t for the validation loss metric.
        low_discrepancy: draw each global batch's noise levels from VDM's low-discrepancy uniforms, one keyed offset
            per batch (:func:`~composer_algos.diffusion.draw.low_discrepancy_uniforms`): every batch covers [0, 1)
            evenly before the active sampler's inverse CDF, whose marginal is unchanged. Off: independent uniforms.
        conditioner: what the denoiser is told about each sample
            (:mod:`composer_algos.diffusion.conditioning`: none, a class label, a caption through a text encoder);
            with ``drop_prob > 0`` a training sample gets the unconditional input with that probability, keyed by the
            draw (classifier-free guidance). Default: from ``label_key``.

    Attributes:
        recipe: what built the model, saved in every checkpoint (plain data, ``None`` for none): the YAML layer sets
            ``{'run_name': ..., 'model': <the recipe's model section>}``, so that a checkpoint loaded into a model
            it does not fit can name the run and the settings that wrote it
            (:func:`composer_algos.checkpoint_integrity.written_by`).
    """

    # Which objective the model trains (algorithms stated on DDPM schedules check it); FlowMatchingModel: flow_matching.
    objective = 'ddpm'
    prediction_types: tuple[str, ...] = NoiseSchedule.prediction_types

    def __init__(
        self,
        denoiser: nn.Module,
        noise_schedule: NoiseSchedule | None = None,
        prediction_type: str = 'epsilon',
        image_key: Any = 'image',
        label_key: Any | None = None,
        conditioning_kwarg: str = 'class_labels',
        encoder: nn.Module | None = None,
        latent_scale: float = 1.0,
        seed: int = 17,
        check_finite_loss: bool = True,
        num_loss_bands: int = 10,
        low_discrepancy: bool = False,
        conditioner: Conditioner | None = None,
    ):
        super().__init__()
        check_prediction_type(prediction_type, self.prediction_types)
        if isinstance(noise_schedule, FlowSchedule) and self.objective != 'flow_matching':
            raise TypeError(
                'A FlowSchedule is the schedule of a flow-matching model: build a FlowMatchingModel (model.objective: '
                'flow_matching in a recipe), or give DiffusionModel a NoiseSchedule.'
            )
        self.denoiser = denoiser
        self.noise_schedule = noise_schedule or NoiseSchedule()
        self.prediction_type = prediction_type
        self.image_key = image_key
        self.conditioning_kwarg = conditioning_kwarg
        self.encoder = encoder
        if encoder is not None:
            encoder.requires_grad_(False)
            encoder.eval()
        if conditioner is not None and label_key is not None:
            raise ConfigError(
                f'The model has a conditioner ({conditioner.kind}) and label_key={label_key!r}; give one '
                'of them (class labels: model.conditioner: {name: class_label, label_key: ...}).'
            )
        self.conditioner = conditioner or (
            ClassLabelConditioner(label_key, conditioning_kwarg)
            if label_key is not None
            else NoConditioner(conditioning_kwarg)
        )
        if conditioner is not None:
            check_denoiser_keywords(denoiser, conditioner)
        self.label_key = self.conditioner.label_key
        self.latent_scale = latent_scale
        self.check_finite_loss = check_finite_loss
        self.num_loss_bands = num_loss_bands
        self.seed = int(seed)
        self.low_discrepancy = bool(low_discrepancy)
        self.num_draws = 0  # training forwards so far: the key of the next draw
        self.recipe: dict[str, Any] | None = None
        self._sampler: TimestepSampler = self.default_timestep_sampler()
        self._sampler_owner: str | None = None
        self._priors: list[tuple[str, TimestepPrior]] = []
        self._weightings: list[tuple[str, LossWeighting]] = []
        self._noise_coupling: tuple[str, NoiseCoupling] | None = None
        self.val_loss = DiffusionLoss(self.num_timesteps, num_bands=1)
        self.val_loss_bands = DiffusionLoss(self.num_timesteps, num_bands=num_loss_bands)

    # ----------------------------------------------------------------------------------------- contract
    @property
    def num_timesteps(self) -> int:
        return self.noise_schedule.num_timesteps

    @property
    def timestep_sampler(self) -> TimestepSampler:
        return self._sampler

    def default_timestep_sampler(self) -> TimestepSampler:
        """The sampler in force until an algorithm installs another, the objective's own: uniform over the T
        timesteps; flow matching: the time uniform, shifted (:func:`~composer_algos.diffusion.draw.objective_sampler`).
        """
        return objective_sampler(self.noise_schedule)

    def grid_points(self) -> torch.Tensor:
        """What the loss weightings take at each of the T cells of the sampling grid: the timesteps themselves; flow
        matching: the sigma each cell stands for, its centre (what they are tabulated at for samplers)."""
        return objective_grid_points(self.noise_schedule)

    @property
    def timestep_sampler_owner(self) -> str | None:
        return self._sampler_owner

    def set_timestep_sampler(self, sampler: TimestepSampler, owner: str) -> None:
        """Install ``sampler`` on behalf of ``owner``. A second, different owner is an error naming both."""
        if self._sampler_owner is not None and self._sampler_owner != owner:
            # Recipes are checked before this (check_timestep_sampler_owners, from what the classes declare);
            # this catches algorithms built in Python or that declare no role.
            raise ConfigError(
                f'{owner} and {self._sampler_owner} both set the timestep sampler; only one '
                'algorithm may own it. Remove one of them (a curriculum such as '
                'CurriculumTimestepSchedule composes with any owner as a prior).'
            )
        if sampler.num_timesteps != self.num_timesteps:
            raise ValueError(
                f'{owner}: sampler has {sampler.num_timesteps} timesteps but the noise schedule has '
                f'{self.num_timesteps}.'
            )
        self._sampler = sampler
        self._sampler_owner = owner
        sampler.set_loss_weights(self.loss_weights(self.grid_points()))

    def add_timestep_prior(self, prior: TimestepPrior, owner: str) -> None:
        """Tilt the active sampler by ``prior`` (a function ``(T, device) -> (T,)`` masses)."""
        self._priors = [(o, p) for o, p in self._priors if o != owner] + [(owner, prior)]

    def add_loss_weighting(self, weighting: LossWeighting, owner: str) -> None:
        """Multiply the per-sample loss by ``weighting(schedule, t, prediction_type)``."""
        self._weightings = [(o, w) for o, w in self._weightings if o != owner] + [(owner, weighting)]
        self._sampler.set_loss_weights(self.loss_weights(self.grid_points()))

    @property
    def loss_weighting_owners(self) -> list[str]:
        return [o for o, _ in self._weightings]

    def timestep_priors(self, device: torch.device | None = None) -> list[torch.Tensor]:
        return [p(self.num_timesteps, device or torch.device('cpu')) for _, p in self._priors]

    def timestep_probs(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The distribution t is drawn from: the sampler's, tilted by the priors. ``(T,)`` or ``(B, T)``."""
        probs = self._sampler.probs(x0)
        return tilted_distribution(probs, self.timestep_priors(probs.device))[0]

    def timestep_distribution(self, x0: torch.Tensor | None = None) -> torch.Tensor:
        """The marginal ``(T,)`` distribution over t (averaged over the batch for per-sample samplers)."""
        with torch.no_grad():
            p = self.timestep_probs(x0)
        return p.mean(0) if p.dim() == 2 else p

    def draw_randoms(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This training draw's ``(u, noise)`` for the batch ``x0``: a uniform (for t) and the noise, per sample.

        Keyed by ``(seed, draw index, position in the global batch)``
        (:func:`~composer_algos.diffusion.draw.training_randoms`): with one micro-batch per step the same sample gets
        the same t and noise on any number of ranks, and a resumed run repeats them. With ``low_discrepancy`` the
        uniforms are the batch's low-discrepancy ones. Each call moves to the next draw index.
        """
        u, noise = training_randoms(self.seed, self.num_draws, x0, self.low_discrepancy)
        self.num_draws += 1
        return u, noise

    def draw_timesteps(self, x0: torch.Tensor, u: torch.Tensor | None = None) -> DrawRecord:
        """Draw the batch's noise levels by inverse CDF at the uniforms ``u`` (default: the next draw's), with their
        record (:func:`~composer_algos.diffusion.draw.draw_levels`)."""
        if u is None:
            u, _ = self.draw_randoms(x0)
        return draw_levels(
            self._sampler, self.timestep_priors(x0.device), x0, u, self.importance_target_log_probs, self.sigma_grid
        )

    def set_noise_coupling(self, coupling: NoiseCoupling, owner: str) -> None:
        """Let ``coupling`` pair each training batch's keyed noise with its data (``coupling(NoiseDraw) -> (noise,
        NoisePairing)``, :mod:`composer_algos.diffusion.draw`), on behalf of ``owner``; evaluation and generation
        keep their own noise. A second, different owner is an error naming both."""
        if self._noise_coupling is not None and self._noise_coupling[0] != owner:
            raise ConfigError(
                f'{owner} and {self._noise_coupling[0]} both pair the noise with the data; only one '
                'algorithm may. Remove one of them.'
            )
        self._noise_coupling = (owner, coupling)

    @property
    def noise_coupling_owner(self) -> str | None:
        """The name of the algorithm whose coupling pairs the noise with the data, ``None`` for none."""
        return None if self._noise_coupling is None else self._noise_coupling[0]

    # ----------------------------------------------------------------------------------------- objective
    @property
    def sigma_grid(self) -> FlowSchedule | None:
        """The grid whose cells hold continuous noise levels (flow matching); ``None``: discrete timesteps."""
        return objective_sigma_grid(self.noise_schedule)

    def importance_target_log_probs(self, x0: torch.Tensor) -> torch.Tensor:
        """``(T,)`` log-probabilities of the objective's own distribution (:meth:`default_timestep_sampler`'s), which
        importance weights correct towards (before the priors tilt it)."""
        return objective_log_probs(self.noise_schedule, x0)

    def denoiser_timesteps(self, level: torch.Tensor) -> torch.Tensor:
        """What the denoiser is given for the noise levels ``level``: the timesteps themselves."""
        return level

    def prediction_target(self, x0: torch.Tensor, noise: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
        """The regression target of ``prediction_type`` at ``level``."""
        return self.noise_schedule.target(x0, noise, level, self.prediction_type)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """``(B,)``: the product of the loss weightings at the noise levels ``t`` (flow matching: sigma)."""
        return loss_weight_product((w for _, w in self._weightings), self.noise_schedule, t, self.prediction_type)

    # ----------------------------------------------------------------------------------------- data
    def _get(self, batch: Any, key: Any) -> Any:
        return batch_entry(batch, key)

    def images(self, batch: Any) -> torch.Tensor:
        """The batch's clean data x0 (latents if an encoder is set), checked for shape."""
        images = self._get(batch, self.image_key)
        if not torch.is_tensor(images) or images.dim() != 4:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(
                f'Expected images of shape (batch, channels, height, width), got {shape}. '
                'Check the dataset transform and image_key.'
            )
        if images.dtype == torch.uint8:
            raise ValueError('Images are uint8; scale them to floats in [-1, 1] in the dataset.')
        if self.encoder is not None:
            with torch.no_grad():
                latents = self.encoder(images)
                latents = getattr(latents, 'latent_dist', latents)
                # A posterior (diffusers' DiagonalGaussianDistribution) gives its mode; a plain tensor is the latent
                # itself (every tensor has a .mode() too: the statistical mode).
                latents = latents if torch.is_tensor(latents) else latents.mode()
                # Under autocast the encoder returns bf16; noising in bf16 would lose sqrt(1 - alphabar_t) ~ 0.01
                # against the latent for small t, so the latents are fp32 from here on.
                images = latents.float() * self.latent_scale
        return images

    def conditioning(self, batch: Any) -> dict[str, torch.Tensor]:
        """The denoiser's keyword arguments from the batch (its conditioner's), with no dropout and no grad."""
        with torch.no_grad():
            return self.conditioner(batch)

    # ----------------------------------------------------------------------------------------- network
    def denoise(
        self,
        x_t: torch.Tensor,
        t: torch.Tensor,
        conditioning: dict | None = None,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """The denoiser's prediction (``denoiser``: another module of the same architecture, e.g. a replica);
        ``conditioning`` may be a :class:`~composer_algos.diffusion.conditioning.Guidance`."""
        if isinstance(conditioning, Guidance):
            return conditioning(lambda x, level, cond: self.denoise(x, level, cond, denoiser), x_t, t)
        out = (denoiser or self.denoiser)(x_t, t, **(conditioning or {}))
        out = getattr(out, 'sample', out)
        if isinstance(out, (tuple, list)):
            out = out[0]
        if out.shape[1] != x_t.shape[1]:
            out = out[:, : x_t.shape[1]]
        if out.shape != x_t.shape:
            raise ValueError(
                f'Denoiser returned shape {tuple(out.shape)} for input {tuple(x_t.shape)}; its output '
                'must match its input (check sample_size and channels).'
            )
        return out

    def forward(self, batch: Any) -> dict[str, DrawRecord]:
        x0 = self.images(batch)
        index = self.num_draws
        u, noise = self.draw_randoms(x0)
        record = self.draw_timesteps(x0, u)
        record.noise = noise
        if self._noise_coupling is not None:
            labels = None if self.label_key is None else self._get(batch, self.label_key)
            draw = NoiseDraw(x0, noise, labels, self.seed, index)
            record.noise, record.noise_pairing = couple_noise(self._noise_coupling[1], draw)
        weight = record.importance_weight * self.loss_weights(record.level)
        context = self._denoiser_rng(x0.device, index) if self.training else contextlib.nullcontext()
        drop = (
            caption_drop_mask(self.seed, index, x0.shape[0], self.conditioner.drop_prob)
            if self.training and self.conditioner.drop_prob > 0
            else None
        )
        return self._publish(record, x0, batch, weight, context, drop)

    def _publish(
        self,
        record: DrawRecord,
        x0: torch.Tensor,
        batch: Any,
        loss_weight: torch.Tensor,
        context: contextlib.AbstractContextManager,
        drop: torch.Tensor | None = None,
    ) -> dict[str, DrawRecord]:
        """Complete ``record`` with the conditioning (the unconditional input where ``drop``), the loss weight and
        the per-sample loss (both computed in ``context``), as the forward outputs."""
        record.loss_weight = loss_weight
        assert record.noise is not None, 'the draw carries its noise'
        with context:
            record.conditioning = self.conditioner(batch, drop)
            record.per_sample_loss = self.per_sample_losses(x0, record.level, record.noise, record.conditioning)
        return {DRAW_KEY: record}

    @contextlib.contextmanager
    def _denoiser_rng(self, device: torch.device, draw: int) -> Iterator[None]:
        """The global RNG, seeded by (seed, draw index, rank), for the denoiser's own randomness (dropout, label drop).

        Composer does not restore the global RNG when it resumes mid-epoch from a streaming dataset, so dropout
        drawn from it would differ after a resume; seeded from the checkpointed draw index it repeats exactly.
        Activation checkpointing replays the same state (it saves the RNG state at the forward).
        """
        seed = derive_seed(self.seed, DROPOUT_STREAM, draw, rank_world()[0])
        cuda = (
            [device.index if device.index is not None else torch.cuda.current_device()] if device.type == 'cuda' else []
        )
        with torch.random.fork_rng(devices=cuda):
            torch.random.default_generator.manual_seed(seed)
            if cuda:
                torch.cuda.manual_seed(seed)
            yield

    def per_sample_losses(
        self,
        x0: torch.Tensor,
        level: torch.Tensor,
        noise: torch.Tensor,
        conditioning: dict | None = None,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """``(B,)`` unweighted losses, the MSE between the prediction and the target at noise levels ``level``."""
        x_t = self.noise_schedule.add_noise(x0, noise, level)
        prediction = self.denoise(x_t, self.denoiser_timesteps(level), conditioning, denoiser).float()
        target = self.prediction_target(x0.float(), noise.float(), level)
        return (prediction - target).pow(2).flatten(1).mean(1)

    def loss(self, outputs: dict[str, DrawRecord], batch: Any, *args, **kwargs) -> torch.Tensor:
        record = record_of(outputs, type(self).__name__)
        assert record.loss_weight is not None and record.per_sample_loss is not None, 'the forward sets both'
        loss = (record.loss_weight * record.per_sample_loss).mean()
        if self.check_finite_loss and not bool(torch.isfinite(loss)):
            causes = '; '.join(nonfinite_loss_causes(self, record, batch)) or 'no NaN in the batch, weights or model'
            raise FloatingPointError(
                f'The diffusion loss is {loss.item()} ({causes}). Lower the learning rate, enable gradient clipping, '
                'or check the data for NaNs; no step was taken on this loss, and the last saved checkpoint is intact '
                'and can be resumed.'
            )
        scale = fsdp_gradient_scale(self)
        if scale != 1.0:
            # The same value, a gradient scaled by 1/world size (see fsdp_gradient_scale).
            loss = loss * scale + (loss * (1.0 - scale)).detach()
        return loss

    # ----------------------------------------------------------------------------------------- evaluation
    def eval_forward(self, batch: Any, outputs: Any | None = None) -> dict[str, DrawRecord]:
        if outputs is not None:
            return outputs
        x0 = self.images(batch)
        # Levels and noise from the objective's own distribution, seeded by the batch's content (never the training
        # draws), so every evaluation of a batch draws the same ones and a resume stays exact.
        record = evaluation_draw(self.seed, x0, self.default_timestep_sampler(), self.sigma_grid)
        outputs = self._publish(record, x0, batch, record.importance_weight, torch.no_grad())
        reshard_fsdp2(self)
        return outputs

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        if is_train:
            return {}
        return {'DiffusionLoss': self.val_loss, 'DiffusionLossBands': self.val_loss_bands}

    def update_metric(self, batch: Any, outputs: Any, metric: Metric) -> None:
        record = record_of(outputs, type(self).__name__)
        metric.update(record.per_sample_loss, record.t)

    # ----------------------------------------------------------------------------------------- VLB
    @torch.no_grad()
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
        """Per-sample VLB terms L_t in nats per dimension, one denoiser forward (of ``denoiser`` if given), no grad.

        For t > 0: KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) with the fixed variance beta_t (DDPM's
        sigma^2 = beta choice). For t = 0 with ``decoder_nll`` (the likelihood): the negative log-likelihood of x0
        under the discretised Gaussian decoder (256 levels; pixel data in [-1, 1]); without it, the same Gaussian KL
        as every other t (at t = 0 the true posterior's mean is x0 itself). ``clip`` clamps the predicted x0 to
        [-1, 1] (default: for pixel models).
        """
        s = self.noise_schedule
        x_t = s.add_noise(x0, noise, t)
        output = self.denoise(x_t, t, conditioning, denoiser).float()
        x0_pred, _ = s.predict_x0_eps(x_t.float(), output, t, self.prediction_type)
        if (self.encoder is None) if clip is None else clip:
            x0_pred = x0_pred.clamp(-1, 1)
        true_mean = s.posterior_mean(x0.float(), x_t.float(), t)
        model_mean = s.posterior_mean(x0_pred, x_t.float(), t)
        true_logvar = s.gather(s.posterior_log_variance_clipped, t, x0.dim())
        model_logvar = s.gather(self._model_log_variance(), t, x0.dim())
        kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1)
        reshard_fsdp2(self)
        if not decoder_nll:
            return kl
        nll = -discretized_gaussian_log_likelihood(x0.float(), model_mean, 0.5 * model_logvar).flatten(1).mean(1)
        return torch.where(t == 0, nll, kl)

    @torch.no_grad()
    def training_losses(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: torch.Tensor,
        conditioning: dict | None = None,
        denoiser: nn.Module | None = None,
    ) -> torch.Tensor:
        """Per-sample unweighted training losses (the MSE to the prediction target) at the grid cells ``t`` (their
        :meth:`grid_points`) with the given noise, no grad."""
        losses = self.per_sample_losses(x0, self.grid_points().to(t.device)[t], noise, conditioning, denoiser)
        reshard_fsdp2(self)
        return losses

    def _model_log_variance(self) -> torch.Tensor:
        s = self.noise_schedule
        return torch.log(torch.cat([s.posterior_variance[1:2], s.betas[1:]]))

    @torch.no_grad()
    def prior_term(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x0) || N(0, I)) per sample, nats per dimension."""
        s = self.noise_schedule
        t = torch.full((x0.shape[0],), self.num_timesteps - 1, device=x0.device, dtype=torch.long)
        ac = s.gather(s.alphas_cumprod, t, x0.dim())
        mean, logvar = ac.sqrt() * x0.float(), torch.log((1 - ac).clamp(min=1e-20)).expand_as(x0)
        return normal_kl(mean, logvar, torch.zeros_like(mean), torch.zeros_like(mean)).flatten(1).mean(1)

    # ----------------------------------------------------------------------------------------- generation
    @torch.no_grad()
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
        """``(num_samples, *shape)`` samples from the noise of ``seed`` (or the given starting ``noise``).

        ``labels`` condition a class-conditional model, ``prompts`` (one per sample) a text-conditioned one;
        ``guidance_scale`` above 1 applies classifier-free guidance towards them (a conditioner with an unconditional
        input only), ``uncond + s (cond - uncond)`` on every denoiser output, DDPM and flow alike. ``clip`` (default:
        pixel models) clamps the predicted x0 to [-1, 1] at each step. DDPM samples with DDIM (``eta=0``,
        deterministic) or ancestral DDPM steps (``eta=1``), ``num_steps`` timesteps spaced evenly over [0, T-1]
        (``num_steps=T, eta=1`` is the original DDPM sampler); ``solver`` is a flow-matching model's
        (:meth:`FlowMatchingModel.generate`).
        """
        device = device or module_device(self.denoiser)
        gen = torch.Generator().manual_seed(seed)
        x = noise.to(device) if noise is not None else torch.randn((num_samples, *shape), generator=gen).to(device)
        clip = self.encoder is None if clip is None else clip
        cond: Any = self.conditioner.for_generation(num_samples, device, labels, prompts)
        scale = check_guidance_scale(guidance_scale, self.conditioner)
        if scale != 1.0:
            cond = Guidance(cond, self.conditioner.unconditional(num_samples, device), scale)
        x = self._sample(x, cond, num_steps, eta, clip, gen, solver)
        reshard_fsdp2(self)
        return x

    def _sample(
        self,
        x: torch.Tensor,
        cond: dict,
        num_steps: int,
        eta: float,
        clip: bool,
        gen: torch.Generator,
        solver: str | None,
    ) -> torch.Tensor:
        if solver is not None:
            raise ValueError(
                f'solver applies to flow-matching models; a DDPM model samples with DDIM (eta=0) or '
                f'ancestral steps (eta=1), got solver={solver!r}.'
            )
        s = self.noise_schedule
        steps = torch.linspace(self.num_timesteps - 1, 0, min(num_steps, self.num_timesteps)).round().long()
        for i, step in enumerate(steps.tolist()):
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            out = self.denoise(x, t, cond).float()
            x0, eps = s.predict_x0_eps(x, out, t, self.prediction_type)
            if clip:
                x0 = x0.clamp(-1, 1)
                ac = s.gather(s.alphas_cumprod, t, x.dim())
                eps = (x - ac.sqrt() * x0) / (1 - ac).sqrt().clamp(min=1e-8)
            ac_t = float(s.alphas_cumprod[step])
            ac_prev = float(s.alphas_cumprod[steps[i + 1]]) if i + 1 < len(steps) else 1.0
            sigma = eta * math.sqrt(max((1 - ac_prev) / (1 - ac_t) * (1 - ac_t / ac_prev), 0.0))
            x = math.sqrt(ac_prev) * x0 + math.sqrt(max(1 - ac_prev - sigma**2, 0.0)) * eps
            if sigma > 0 and i + 1 < len(steps):
                x = x + sigma * torch.randn(x.shape, generator=gen).to(x.device)
        return x

    # ----------------------------------------------------------------------------------------- checkpointing
    def get_extra_state(self) -> dict[str, Any]:
        # The same on every rank and on any number of ranks: all training randomness is keyed by these two.
        state: dict[str, Any] = {'seed': self.seed, 'num_draws': self.num_draws}
        if self.recipe is not None:
            state['recipe'] = self.recipe
        return state

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the seed and the draw count; ``recipe`` stays this run's (a resumed run records what built it)."""
        if int(state['seed']) != self.seed:
            log.warning(
                'The checkpoint was trained with model seed %s; it continues with that seed, not %s.',
                state['seed'],
                self.seed,
            )
        self.seed = int(state['seed'])
        self.num_draws = int(state['num_draws'])

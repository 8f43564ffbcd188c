"""Discrete DDPM noise schedules and the quantities derived from them."""

from __future__ import annotations

import math

import torch

__all__ = ['NoiseSchedule', 'PREDICTION_TYPES', 'SCHEDULE_KINDS', 'check_prediction_type']

SCHEDULE_KINDS = ('linear', 'scaled_linear', 'squaredcos_cap_v2')
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')


def check_prediction_type(prediction_type: str, allowed: tuple[str, ...] = PREDICTION_TYPES) -> None:
    """Raise a ``ValueError`` naming the allowed values unless ``prediction_type`` is one of ``allowed``."""
    if prediction_type not in allowed:
        raise ValueError(f'prediction_type must be one of {allowed}, got {prediction_type!r}.')


def _betas(kind: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    if kind == 'linear':
        # Betas are given for T=1000 in DDPM; rescale so other T keep the same total noise.
        scale = 1000.0 / num_timesteps
        return torch.linspace(beta_start * scale, beta_end * scale, num_timesteps, dtype=torch.float64)
    if kind == 'scaled_linear':
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2
    if kind == 'squaredcos_cap_v2':

        def alpha_bar(u: float) -> float:
            return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = [
            min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), 0.999)
            for i in range(num_timesteps)
        ]
        return torch.tensor(betas, dtype=torch.float64)
    raise ValueError(f'Unknown noise schedule kind {kind!r}; choose one of {SCHEDULE_KINDS}.')


class NoiseSchedule:
    """A discrete variance-preserving schedule over ``num_timesteps`` steps (index 0 is the least noisy).

    ``x_t = sqrt(alphabar_t) x_0 + sqrt(1 - alphabar_t) eps`` and ``SNR(t) = alphabar_t / (1 - alphabar_t)``.
    With ``zero_terminal_snr=True`` the betas are rescaled (Lin et al., 2023) so that ``alphabar_{T-1} = 0`` and
    ``SNR(T-1) = 0``; every derived quantity stays finite there.

    Args:
        kind: ``'linear'``, ``'scaled_linear'`` or ``'squaredcos_cap_v2'``.
        num_timesteps: T, the number of training timesteps.
        beta_start: first beta (linear kinds).
        beta_end: last beta (linear kinds).
        zero_terminal_snr: rescale so that the last step is pure noise.

    Example:
        >>> s = NoiseSchedule('linear', 1000)
        >>> s.snr(torch.tensor([0, 999])).shape
        torch.Size([2])
    """

    # What a DDPM schedule trains the denoiser to predict (the first is the default).
    prediction_types: tuple[str, ...] = PREDICTION_TYPES

    def __init__(
        self,
        kind: str = 'linear',
        num_timesteps: int = 1000,
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
        zero_terminal_snr: bool = False,
    ):
        if num_timesteps < 2:
            raise ValueError(f'num_timesteps must be at least 2, got {num_timesteps}.')
        self.kind = kind
        self.num_timesteps = int(num_timesteps)
        self.zero_terminal_snr = zero_terminal_snr
        betas = _betas(kind, self.num_timesteps, beta_start, beta_end)
        if zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        if not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError(
                f'Schedule {kind!r} with T={num_timesteps} gives betas outside (0, 1]; '
                'lower beta_end or raise num_timesteps.'
            )
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        self.alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), self.alphas_cumprod[:-1]])
        # Posterior q(x_{t-1} | x_t, x_0), DDPM eq. (7).
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The t=0 posterior variance is 0; clip its log to the t=1 value as improved-diffusion does.
        self.posterior_log_variance_clipped = torch.log(
            torch.cat([self.posterior_variance[1:2], self.posterior_variance[1:]])
        )
        self.posterior_mean_coef1 = betas * self.alphas_cumprod_prev.sqrt() / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * self.alphas.sqrt() / (1.0 - self.alphas_cumprod)

    def __repr__(self) -> str:
        return (
            f'NoiseSchedule(kind={self.kind!r}, num_timesteps={self.num_timesteps}, '
            f'zero_terminal_snr={self.zero_terminal_snr})'
        )

    def gather(self, values: torch.Tensor, t: torch.Tensor, ndim: int = 1, dtype=torch.float32) -> torch.Tensor:
        """Index a per-timestep table at ``t`` and reshape to broadcast over ``ndim`` dims."""
        out = values.to(t.device)[t].to(dtype)
        return out.reshape(t.shape + (1,) * (ndim - t.dim()))

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) in float64; ``inf`` where alphabar is 1 and ``0`` where alphabar is 0."""
        ac = self.alphas_cumprod.to(t.device)[t]
        return ac / (1.0 - ac)

    def noise_rate(self, t: torch.Tensor) -> torch.Tensor:
        """``sqrt(1 - alphabar_t)``, the standard deviation of the noise in ``x_t``."""
        return (1.0 - self.alphas_cumprod.to(t.device)[t]).sqrt()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ac = self.gather(self.alphas_cumprod, t, x0.dim(), x0.dtype)
        return ac.sqrt() * x0 + (1.0 - ac).sqrt() * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, prediction_type: str) -> torch.Tensor:
        """The regression target for ``prediction_type`` in {epsilon, v_prediction, sample}."""
        check_prediction_type(prediction_type)
        if prediction_type == 'epsilon':
            return noise
        if prediction_type == 'sample':
            return x0
        ac = self.gather(self.alphas_cumprod, t, x0.dim(), x0.dtype)
        return ac.sqrt() * noise - (1.0 - ac).sqrt() * x0

    def predict_x0_eps(
        self, x_t: torch.Tensor, output: torch.Tensor, t: torch.Tensor, prediction_type: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a model output into the implied ``(x0, eps)`` pair."""
        check_prediction_type(prediction_type)
        ac = self.gather(self.alphas_cumprod, t, x_t.dim(), x_t.dtype)
        a, s = ac.sqrt(), (1.0 - ac).sqrt()
        if prediction_type == 'epsilon':
            eps = output
            # alphabar can be 0 at a zero-terminal-SNR step: x0 is then unidentifiable from eps; clamp.
            x0 = (x_t - s * eps) / a.clamp(min=1e-8)
        elif prediction_type == 'sample':
            x0 = output
            eps = (x_t - a * x0) / s.clamp(min=1e-8)
        else:
            x0 = a * x_t - s * output
            eps = s * x_t + a * output
        return x0, eps

    def posterior_mean(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c1 = self.gather(self.posterior_mean_coef1, t, x_t.dim(), x_t.dtype)
        c2 = self.gather(self.posterior_mean_coef2, t, x_t.dim(), x_t.dtype)
        return c1 * x0 + c2 * x_t


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Shift and scale sqrt(alphabar) so that its last value is 0 and its first is unchanged."""
    sqrt_ac = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    sqrt_ac = (sqrt_ac - last) * first / (first - last)
    ac = sqrt_ac**2
    alphas = torch.cat([ac[:1], ac[1:] / ac[:-1]])
    return 1.0 - alphas

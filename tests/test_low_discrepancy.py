"""The low-discrepancy option of the model's draw (VDM): every batch covers [0, 1) evenly, each draw keeps its
marginal under every kind of sampler, the sample's noise is unchanged, and the draws repeat on resume and on any
number of ranks."""

import pytest
import torch
from conftest import tiny_model
from scipy import stats

from composer_algos.algorithms.curriculum_timestep_schedule import clts_probs
from composer_algos.algorithms.logit_normal_sampling import logit_normal_probs
from composer_algos.diffusion import (
    FixedDistributionSampler,
    FlowMatchingModel,
    FlowSchedule,
    LogitNormalDensity,
    TimeConditionedConvNet,
)
from composer_algos.diffusion.densities import grid_masses
from composer_algos.diffusion.draw import low_discrepancy_uniforms
from composer_algos.diffusion.flow import unshift_sigmas
from composer_algos.diffusion.timestep_samplers import ContinuousTimestepSampler, TimestepSampler


def flow_model(num_cells: int = 50, shift: float = 1.0, **kwargs) -> FlowMatchingModel:
    torch.manual_seed(0)
    return FlowMatchingModel(
        TimeConditionedConvNet(in_channels=1, width=8), FlowSchedule(shift=shift, num_cells=num_cells), **kwargs
    )


class TwoGroupSampler(TimestepSampler):
    """A per-sample ``(B, T)`` sampler: samples with a positive mean draw from ``high``, the others from ``low``."""

    def __init__(self, low: torch.Tensor, high: torch.Tensor):
        super().__init__(low.numel())
        self.low, self.high = low.float(), high.float()

    def probs(self, x0=None):
        positive = (x0.flatten(1).mean(1) > 0)[:, None]
        return torch.where(positive, self.high, self.low)


def _chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs.double() / probs.double().sum() * counts.sum()
    keep = expected > 0
    assert int(counts[~keep].sum()) == 0  # nothing drawn where there is no mass
    return float(stats.chisquare(counts[keep].double().numpy(), expected[keep].numpy()).pvalue)


@pytest.mark.parametrize('batch', [1, 7, 128])
def test_every_batch_holds_one_uniform_in_each_of_its_bins(batch):
    model = tiny_model(low_discrepancy=True)
    for _ in range(20):
        u, _ = model.draw_randoms(torch.zeros(batch, 1, 8, 8))
        assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
        assert sorted((u * batch).floor().long().tolist()) == list(range(batch))
    # The offset moves from draw to draw (one keyed number per draw index).
    offsets = [float(low_discrepancy_uniforms(17, index, [0], 1)) for index in range(50)]
    assert len(set(offsets)) == 50 and 0.3 < sum(offsets) / 50 < 0.7


def test_with_as_many_samples_as_timesteps_a_batch_draws_each_timestep_once():
    model = tiny_model(num_timesteps=64, low_discrepancy=True)
    for _ in range(5):
        assert sorted(model.draw_timesteps(torch.zeros(64, 1, 8, 8)).t.tolist()) == list(range(64))
    independent = tiny_model(num_timesteps=64).draw_timesteps(torch.zeros(64, 1, 8, 8)).t
    assert len(set(independent.tolist())) < 64  # independent uniforms repeat timesteps (about 63% distinct)


def test_the_noise_is_the_one_drawn_without_the_option():
    x0 = torch.zeros(16, 1, 8, 8)
    u_off, noise_off = tiny_model().draw_randoms(x0)
    u_on, noise_on = tiny_model(low_discrepancy=True).draw_randoms(x0)
    assert torch.equal(noise_on, noise_off) and not torch.equal(u_on, u_off)


def _histogram(model, batches: int, batch: int, x0=None) -> torch.Tensor:
    counts = torch.zeros(model.num_timesteps, dtype=torch.long)
    x0 = torch.zeros(batch, 1, 8, 8) if x0 is None else x0
    for _ in range(batches):
        counts += torch.bincount(model.draw_timesteps(x0).t, minlength=model.num_timesteps)
    return counts


def test_discrete_samplers_keep_their_distribution():
    """Inverse CDF on the grid of T (cumulative sums and searchsorted): a fixed density, and uniform tilted by the
    curriculum."""
    model = tiny_model(num_timesteps=50, low_discrepancy=True)
    probs = logit_normal_probs(model.noise_schedule, m=0.5, s=1.0)
    model.set_timestep_sampler(FixedDistributionSampler(probs), 'LogitNormalSampling')
    assert _chi_square_p(_histogram(model, 200, 32), probs) > 1e-3
    model = tiny_model(num_timesteps=50, low_discrepancy=True)
    prior = clts_probs(model.noise_schedule.alphas_cumprod, lam=0.8)
    model.add_timestep_prior(lambda num_timesteps, device: prior.to(device), 'CurriculumTimestepSchedule')
    assert _chi_square_p(_histogram(model, 200, 32), model.timestep_distribution()) > 1e-3


def test_per_sample_distributions_keep_theirs():
    """A per-sample (B, T) distribution (as the adaptive policy gives): each sample's t follows its own row."""
    model = tiny_model(num_timesteps=40, low_discrepancy=True)
    ramp = torch.arange(1, 41, dtype=torch.float64)
    low, high = ramp.flip(0) / ramp.sum(), ramp / ramp.sum()
    model.set_timestep_sampler(TwoGroupSampler(low, high), 'Policy')
    x0 = torch.cat([-torch.ones(16, 1, 8, 8), torch.ones(16, 1, 8, 8)])
    counts = {'low': torch.zeros(40, dtype=torch.long), 'high': torch.zeros(40, dtype=torch.long)}
    for _ in range(300):
        t = model.draw_timesteps(x0).t
        counts['low'] += torch.bincount(t[:16], minlength=40)
        counts['high'] += torch.bincount(t[16:], minlength=40)
    assert _chi_square_p(counts['low'], low) > 1e-3 and _chi_square_p(counts['high'], high) > 1e-3


@pytest.mark.parametrize('tilted', [False, True])
def test_flow_samplers_keep_their_density(tilted):
    """Flow matching: logit-normal sigma in closed form (sigmoid(m + s Phi^-1(u))), or within the cells of the grid
    when a prior tilts it; the shift applied."""
    model = flow_model(num_cells=50, shift=3.0, low_discrepancy=True)
    density = LogitNormalDensity(0.5, 1.0)
    model.set_timestep_sampler(ContinuousTimestepSampler(density, model.noise_schedule), 'LogitNormalSampling')
    expected = grid_masses(density, unshift_sigmas(model.noise_schedule.cell_edges(), 3.0))
    if tilted:
        prior = torch.linspace(1.0, 2.0, 50)
        model.add_timestep_prior(lambda num_timesteps, device: prior.to(device), 'CurriculumTimestepSchedule')
        expected = expected * prior.double()
    sigmas = torch.cat([model.draw_timesteps(torch.zeros(32, 1, 8, 8)).sigma for _ in range(200)])
    counts = torch.bincount(model.noise_schedule.cells(sigmas), minlength=50)
    assert _chi_square_p(counts, expected) > 1e-3
    # Finer than the cells: the distribution function of sigma itself (Kolmogorov-Smirnov).
    if not tilted:
        shifted_cdf = lambda s: density.cdf(unshift_sigmas(torch.as_tensor(s, dtype=torch.float64), 3.0)).numpy()
        assert stats.kstest(sigmas.numpy(), shifted_cdf).pvalue > 1e-3


def test_resume_repeats_the_draws():
    x0 = torch.zeros(16, 1, 8, 8)
    full = tiny_model(low_discrepancy=True)
    draws = [full.draw_timesteps(x0).t for _ in range(5)]
    resumed = tiny_model(seed=99, low_discrepancy=True)
    resumed.set_extra_state({**full.get_extra_state(), 'num_draws': 3})
    assert [resumed.draw_timesteps(x0).t.tolist() for _ in range(2)] == [d.tolist() for d in draws[3:]]


@pytest.mark.parametrize('flow', [False, True])
def test_two_ranks_draw_what_one_rank_draws_at_each_global_position(flow, monkeypatch):
    """Rank r holds positions r, r + 2, ... of the global batch; the offset and B are the global batch's."""

    def model():
        return flow_model(low_discrepancy=True) if flow else tiny_model(low_discrepancy=True)

    x0 = torch.randn(16, 1, 8, 8)
    one = model()
    levels = [one.draw_timesteps(x0) for _ in range(3)]
    # The launcher's environment says which rank this is; a process group of one rank that an earlier test of the
    # same interpreter left behind would otherwise answer instead.
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: False)
    for rank in range(2):
        monkeypatch.setenv('RANK', str(rank))
        monkeypatch.setenv('WORLD_SIZE', '2')
        part = model()
        for draw in levels:
            mine = part.draw_timesteps(x0[rank::2])
            assert torch.equal(mine.t, draw.t[rank::2])
            if flow:
                assert torch.equal(mine.sigma, draw.sigma[rank::2])

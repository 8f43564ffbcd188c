"""Adaptive timestep sampling (arXiv 2411.09998): distributions, the F-test, probe cadence, composition, resume."""

import math

import numpy as np
import pytest
import torch
from conftest import LossRecorder, make_trainer, tiny_model

from composer_algos.algorithms.adaptive import (AdaptiveTimestepSampling, BetaPolicy, GlobalPolicy,
                                                beta_grid_log_probs, f_regression_scores)
from composer_algos.algorithms.curriculum import CurriculumTimestepSchedule
from composer_algos.diffusion import FixedDistributionSampler


def test_beta_grid_is_a_distribution_without_half_weight_ends():
    p = beta_grid_log_probs(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, 5.0, 0.5]), 1000).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(3, dtype=p.dtype))
    # Beta(1, 1) is exactly uniform, ends included.
    torch.testing.assert_close(p[0], torch.full((1000,), 1e-3))
    # Beta(2, 5) at bin centres, against the closed-form density.
    u = (torch.arange(1000) + 0.5) / 1000
    density = u * (1 - u)**4
    torch.testing.assert_close(p[1], (density / density.sum()).float())


@pytest.mark.parametrize('shape', [(4, 1, 8, 8), (4, 3, 32, 32), (4, 4, 16, 16)])
def test_policy_starts_uniform_for_any_input(shape):
    policy = BetaPolicy(shape[1])
    p = policy.log_probs(torch.randn(shape), 50).exp()
    torch.testing.assert_close(p, torch.full((4, 50), 0.02), atol=1e-3, rtol=0)
    g = GlobalPolicy(1000, num_bins=10).log_probs(torch.randn(shape), 1000).exp()
    torch.testing.assert_close(g.sum(1), torch.ones(4))
    torch.testing.assert_close(g, torch.full((4, 1000), 1e-3))


def test_f_test_matches_sklearn():
    from sklearn.feature_selection import f_regression
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 7))
    y = x[:, 2] * 3 + rng.normal(size=20) * 0.1
    x[:, 5] = 1.0  # constant column
    expected, _ = f_regression(x[:, [0, 1, 2, 3, 4, 6]], y)
    scores = f_regression_scores(torch.tensor(x), torch.tensor(y))
    np.testing.assert_allclose(scores[[0, 1, 2, 3, 4, 6]].numpy(), expected, rtol=1e-8)
    assert float(scores[5]) == 0.0 and int(scores.argmax()) == 2


class ProbeSpy(AdaptiveTimestepSampling):
    """Records the global step of every probe and the timesteps gathered for it."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.probe_steps, self.probe_sizes = [], []

    def _update_policy(self, x0, t, reward, model, state):
        self.probe_steps.append(int(state.timestamp.batch) - 1)
        self.probe_sizes.append((int(x0.shape[0]), int(t.shape[0])))
        return super()._update_policy(x0, t, reward, model, state)


@pytest.mark.parametrize('microbatch', [None, 8])
def test_probes_at_global_optimizer_steps(digits_mds, microbatch):
    spy = ProbeSpy(update_every=3)
    kwargs = {'device_train_microbatch_size': microbatch} if microbatch else {}
    trainer = make_trainer(digits_mds, algorithms=[spy], max_duration='10ba', **kwargs)
    trainer.fit()
    assert spy.probe_steps == [0, 3, 6, 9]
    assert spy.probe_sizes == [(32, 32)] * 4  # every micro-batch's timesteps were collected
    assert spy.num_updates == 4 and len(spy.selected_timesteps) == 3
    assert spy.queue_x.shape == (4, 32) and torch.isfinite(spy.queue_x).all()
    # With four queued probes the F-test chose S.
    scores = f_regression_scores(spy.queue_x, spy.queue_y)
    assert sorted(spy.selected.tolist()) == sorted(torch.topk(scores, 3).indices.tolist())


def test_policy_learns_and_is_the_models_sampler(digits_mds):
    adaptive = AdaptiveTimestepSampling(update_every=1, lr=0.05)
    trainer = make_trainer(digits_mds, algorithms=[adaptive], max_duration='8ba')
    model = trainer.state.model
    assert model.timestep_sampler_owner == 'AdaptiveTimestepSampling'
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    before = model.timestep_probs(x0).clone()
    torch.testing.assert_close(before, torch.full_like(before, 0.01), atol=1e-4, rtol=0)
    trainer.fit()
    after = model.timestep_probs(x0)
    assert not torch.allclose(after, before, atol=1e-4)
    torch.testing.assert_close(after.sum(1), torch.ones(5))


def test_second_sampler_owner_is_a_clear_error(digits_mds):
    from composer.core import Algorithm, Event

    class OtherSampler(Algorithm):

        def match(self, event, state):
            return event == Event.INIT

        def apply(self, event, state, logger):
            state.model.set_timestep_sampler(FixedDistributionSampler(torch.ones(100)), owner='OtherSampler')

    with pytest.raises(ValueError, match='OtherSampler and AdaptiveTimestepSampling both set the timestep sampler'):
        make_trainer(digits_mds, algorithms=[AdaptiveTimestepSampling(), OtherSampler()])


def test_curriculum_tilts_the_policy_and_the_log_prob_is_normalised(digits_mds):
    adaptive = AdaptiveTimestepSampling(update_every=2)
    clts = CurriculumTimestepSchedule(lam_max=0.9, sigma=0.1, ramp_start='0ba', ramp_end='2ba')
    trainer = make_trainer(digits_mds, algorithms=[clts, adaptive], max_duration='4ba')
    trainer.fit()
    model = trainer.state.model
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    pi = adaptive.policy.log_probs(x0, 100).exp()
    expected = pi * clts.probs().float()
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(model.timestep_probs(x0), expected)
    torch.testing.assert_close(adaptive.policy_log_probs(x0, model).exp(), expected)
    assert float(model.timestep_distribution(x0)[20:40].sum()) > 0.5  # mass moved towards mu = 0.3


def test_nan_reward_skips_the_update(digits_mds):
    adaptive = AdaptiveTimestepSampling(update_every=1)
    trainer = make_trainer(digits_mds, algorithms=[adaptive], max_duration='1ba')
    params = [p.detach().clone() for p in adaptive.policy.parameters()]
    model = trainer.state.model
    x0 = torch.rand(4, 1, 8, 8)
    with pytest.warns(UserWarning, match='skipped'):
        adaptive._update_policy(x0, torch.zeros(4, dtype=torch.long), torch.tensor([1.0, float('nan'), 0.0, 2.0]),
                                model, trainer.state)
    assert adaptive.num_skipped == 1 and adaptive.num_updates == 0
    for p, q in zip(params, adaptive.policy.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize('policy', ['beta', 'global'])
def test_resume_gives_the_same_losses_and_sampler_state(digits_mds, tmp_path, policy):

    def algorithm():
        return AdaptiveTimestepSampling(update_every=2, policy=policy, num_bins=10)

    rec = LossRecorder()
    full = make_trainer(digits_mds, algorithms=[algorithm()], max_duration='8ba', callbacks=[rec],
                        save_folder=str(tmp_path / 'a'), save_interval='3ba')
    full.fit()
    rec2 = LossRecorder()
    resumed = make_trainer(digits_mds, algorithms=[algorithm()], max_duration='8ba', callbacks=[rec2],
                           model=tiny_model(seed=4), load_path=str(tmp_path / 'a' / 'ep0-ba3-rank0.pt'))
    resumed.fit()
    assert rec2.losses == rec.losses[3:]
    a, b = full.state.algorithms[0], resumed.state.algorithms[0]
    assert b.num_updates == a.num_updates == 4
    for key, value in a.state_dict().items():
        if key in ('policy', 'queue_x', 'queue_y', 'selected'):
            got = b.state_dict()[key]
            if isinstance(value, dict):
                assert all(torch.equal(value[k], got[k]) for k in value), key
            else:
                assert torch.equal(value, got), key
    # The algorithm's state is tensors and primitives only: it loads with weights_only=True.
    torch.save(a.state_dict(), tmp_path / 'adaptive.pt')
    reloaded = torch.load(tmp_path / 'adaptive.pt', weights_only=True)
    assert torch.equal(reloaded['queue_x'], a.queue_x)
    assert math.isfinite(rec.losses[-1])

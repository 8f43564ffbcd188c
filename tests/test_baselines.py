"""Baseline samplers and weightings: closed forms for every prediction type, composition, Trainer runs, resume."""

import math

import pytest
import torch
from conftest import LossRecorder, make_trainer, tiny_model

from composer_algos.algorithms.baselines import (LogitNormalSampling, LogNormalSampling, LossSecondMomentSampler,
                                                 LossSecondMomentSampling, MinSNRWeighting, P2Weighting, SpeeD)
from composer_algos.diffusion import NoiseSchedule
from composer_algos.diffusion.weighting import (log_normal_probs, logit_normal_probs, min_snr_weight, p2_weight,
                                                speed_probs, speed_weights)

SNR = torch.tensor([0.0, 0.5, 5.0, 20.0, math.inf], dtype=torch.float64)


@pytest.mark.parametrize('prediction_type, expected', [
    ('epsilon', [1.0, 1.0, 1.0, 0.25, 0.0]),
    ('v_prediction', [0.0, 0.5 / 1.5, 5 / 6, 5 / 21, 0.0]),
    ('sample', [0.0, 0.5, 5.0, 5.0, 5.0]),
])
def test_min_snr_closed_form_with_limits(prediction_type, expected):
    w = min_snr_weight(SNR, 5.0, prediction_type)
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))
    assert bool(torch.isfinite(w).all())


@pytest.mark.parametrize('prediction_type, factor', [('epsilon', lambda s: 1.0), ('v_prediction', lambda s: s / (s + 1)),
                                                     ('sample', lambda s: s)])
def test_p2_closed_form(prediction_type, factor):
    snr = SNR[:4]
    expected = torch.tensor([factor(float(s)) / (1 + float(s))**0.5 for s in snr], dtype=torch.float64)
    torch.testing.assert_close(p2_weight(snr, gamma=0.5, k=1.0, prediction_type=prediction_type), expected)
    assert bool(torch.isfinite(p2_weight(SNR, 1.0, 1.0, prediction_type)).all())


def test_min_snr_on_a_zero_terminal_snr_schedule_is_finite():
    s = NoiseSchedule('linear', 1000, zero_terminal_snr=True)
    t = torch.arange(1000)
    for prediction_type in ('epsilon', 'v_prediction', 'sample'):
        assert bool(torch.isfinite(min_snr_weight(s.snr(t), 5.0, prediction_type)).all())


def test_densities_are_distributions_in_the_stated_direction():
    T = 1000
    t = torch.arange(T, dtype=torch.float64)
    for probs in (logit_normal_probs(T), logit_normal_probs(T, m=1.0), log_normal_probs(NoiseSchedule()),
                  speed_probs(T)):
        assert bool((probs >= 0).all()) and float(probs.sum()) == pytest.approx(1.0)
    assert float((logit_normal_probs(T) * t).sum()) == pytest.approx((T - 1) / 2, abs=1.0)  # symmetric at m=0
    assert float((logit_normal_probs(T, m=1.0) * t).sum()) > T / 2  # m > 0: more noise
    assert float((logit_normal_probs(T, m=-1.0) * t).sum()) < T / 2
    # EDM's P_mean = -1.2 favours small sigma, i.e. small t; a large P_mean favours noise.
    assert float((log_normal_probs(NoiseSchedule(), -1.2, 1.2) * t).sum()) < T / 2
    assert float((log_normal_probs(NoiseSchedule(), 2.0, 0.5) * t).sum()) > T / 2
    p = speed_probs(1000, tau=700, k=2.0)
    assert float(p[0] / p[999]) == pytest.approx(2.0) and float(p[699] / p[700]) == pytest.approx(2.0)
    assert float(speed_probs(100)[69] / speed_probs(100)[70]) == pytest.approx(2.0)  # tau scales with T


@pytest.mark.parametrize('lam', [0.0, 0.3, 0.6, 1.0])
def test_speed_weights_never_negative(lam):
    for schedule in (NoiseSchedule(), NoiseSchedule('squaredcos_cap_v2', 500), NoiseSchedule(zero_terminal_snr=True)):
        w = speed_weights(schedule, lam)
        assert bool((w >= 0).all()) and float(w.mean()) == pytest.approx(1.0)


def test_speed_rejects_lambdas_that_make_negative_weights():
    with pytest.raises(ValueError, match=r'lam must be in \[0, 1\]'):
        SpeeD(lam=5)
    with pytest.raises(ValueError, match='lam must be in'):
        speed_weights(NoiseSchedule(), -0.1)


def test_loss_second_moment_sampler_warms_then_follows_sqrt_second_moment():
    sampler = LossSecondMomentSampler(4, history=2, uniform_prob=0.1)
    sampler.update(torch.tensor([0, 0, 1, 1, 2, 2]), torch.ones(6))
    torch.testing.assert_close(sampler.probs(), torch.full((4,), 0.25))  # t=3 has no history yet
    sampler.update(torch.tensor([3, 3, 0]), torch.tensor([2.0, 2.0, 3.0]))  # t=0 ring now holds [3, 1]
    rms = torch.tensor([math.sqrt(5), 1.0, 1.0, 2.0], dtype=torch.float64)
    expected = rms / rms.sum() * 0.9 + 0.1 / 4
    torch.testing.assert_close(sampler.probs(), expected.float())
    model = tiny_model(num_timesteps=100)
    algorithm_sampler = LossSecondMomentSampler(100, history=1, uniform_prob=0.5)
    algorithm_sampler.update(torch.arange(100), torch.arange(1, 101).double())
    model.set_timestep_sampler(algorithm_sampler, owner='x')
    t, w = model.draw_timesteps(torch.zeros(64, 1, 8, 8))
    torch.testing.assert_close(w, 1.0 / (100 * algorithm_sampler.probs()[t]))


@pytest.mark.parametrize('algorithm', [MinSNRWeighting(), P2Weighting(), SpeeD(), LogitNormalSampling(),
                                       LogNormalSampling(), LossSecondMomentSampling(history=1)])
def test_each_baseline_trains(digits_mds, algorithm):
    rec = LossRecorder()
    trainer = make_trainer(digits_mds, algorithms=[algorithm], max_duration='4ba', callbacks=[rec])
    trainer.fit()
    assert len(rec.losses) == 4 and all(math.isfinite(x) for x in rec.losses)
    assert ' at 0x' not in repr(algorithm) and repr(algorithm).startswith(type(algorithm).__name__ + '(')


def test_two_sampler_owners_name_both(digits_mds):
    with pytest.raises(ValueError, match='LogitNormalSampling and SpeeD both set the timestep sampler'):
        make_trainer(digits_mds, algorithms=[SpeeD(), LogitNormalSampling()])


def test_weightings_multiply(digits_mds):
    trainer = make_trainer(digits_mds, algorithms=[MinSNRWeighting(), P2Weighting()], max_duration='1ba')
    model = trainer.state.model
    t = torch.arange(0, 100, 7)
    snr = model.noise_schedule.snr(t)
    expected = (min_snr_weight(snr, 5.0) * p2_weight(snr, 1.0, 1.0)).float()
    torch.testing.assert_close(model.loss_weights(t), expected)


def test_loss_second_moment_resume_is_exact(digits_mds, tmp_path):
    rec = LossRecorder()
    full = make_trainer(digits_mds, algorithms=[LossSecondMomentSampling(history=1)], max_duration='16ba',
                        callbacks=[rec], save_folder=str(tmp_path / 'a'), save_interval='12ba', batch_size=64)
    full.fit()
    assert full.state.algorithms[0].sampler.warm()  # every t has a loss: the sampler is importance-sampling
    rec2 = LossRecorder()
    resumed = make_trainer(digits_mds, algorithms=[LossSecondMomentSampling(history=1)], max_duration='16ba',
                           callbacks=[rec2], model=tiny_model(seed=8), batch_size=64,
                           load_path=str(tmp_path / 'a' / 'ep0-ba12-rank0.pt'))
    resumed.fit()
    assert rec2.losses == rec.losses[12:]
    assert torch.equal(resumed.state.algorithms[0].sampler.losses, full.state.algorithms[0].sampler.losses)
    assert torch.equal(resumed.state.algorithms[0].sampler.counts, full.state.algorithms[0].sampler.counts)

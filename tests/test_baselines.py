"""Baseline samplers and weightings: closed forms for every prediction type (SNR 0 and inf included), densities and
their time direction, the loss-second-moment sampler, each algorithm in a real Trainer, composition and resume."""

import math
import os
import types
import warnings

import numpy as np
import pytest
import torch
import yaml
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Callback, Event
from composer.loggers import InMemoryLogger, Logger
from conftest import LossRecorder, make_trainer, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from composer_algos.algorithms.log_normal_sampling import LogNormalSampling, log_normal_probs, log_sigmas
from composer_algos.algorithms.logit_normal_sampling import LogitNormalSampling, logit_normal_probs
from composer_algos.algorithms.loss_second_moment_sampling import (
    LossSecondMomentSampler,
    LossSecondMomentSampling,
    append_losses,
    loss_second_moment_probs,
)
from composer_algos.algorithms.min_snr_weighting import MinSNRWeighting, min_snr_weight
from composer_algos.algorithms.p2_weighting import P2Weighting, p2_weight
from composer_algos.algorithms.speed import SpeeD, speed_probs, speed_threshold, speed_weight
from composer_algos.algorithms.weighting import epsilon_loss_factor
from composer_algos.diffusion import NoiseSchedule
from composer_algos.registry import algorithms as algorithm_registry
from composer_algos.registry import resolve

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PREDICTION_TYPES = ('epsilon', 'v_prediction', 'sample')
# alphabar = 1 gives SNR = inf, alphabar = 0 gives SNR = 0 (the last step of a zero-terminal-SNR schedule).
EDGE_ALPHAS_CUMPROD = [1.0, 0.999, 0.9, 0.5, 0.1, 0.0]


def schedule_with(alphas_cumprod) -> NoiseSchedule:
    schedule = NoiseSchedule('scaled_linear', len(alphas_cumprod))
    schedule.alphas_cumprod = torch.tensor(alphas_cumprod, dtype=torch.float64)
    return schedule


def minimal_state(model):
    """The part of Composer's State that INIT-time installation reads."""
    return types.SimpleNamespace(model=model)


def install(algorithm, model):
    destination = InMemoryLogger()
    algorithm.apply(Event.INIT, minimal_state(model), Logger(minimal_state(model), [destination]))
    return destination.hyperparameters


# ----------------------------------------------------------------------------------------------- weightings


def test_edge_schedule_has_the_intended_snrs():
    snr = schedule_with(EDGE_ALPHAS_CUMPROD).snr(torch.arange(6))
    assert math.isinf(float(snr[0])) and float(snr[-1]) == 0.0
    torch.testing.assert_close(snr[1:5], torch.tensor([999.0, 9.0, 1.0, 1 / 9], dtype=torch.float64))


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
@pytest.mark.parametrize('gamma', [5.0, 1.0])
def test_min_snr_closed_form_with_limits(prediction_type, gamma):
    s = schedule_with(EDGE_ALPHAS_CUMPROD)
    expected = []
    for snr in s.snr(torch.arange(6)).tolist():
        if math.isinf(snr):  # g / SNR -> 0, g / (SNR + 1) -> 0, min(SNR, g) = g
            expected.append({'epsilon': 0.0, 'v_prediction': 0.0, 'sample': gamma}[prediction_type])
        elif snr == 0:  # SNR / SNR = 1 near 0; the others vanish
            expected.append({'epsilon': 1.0, 'v_prediction': 0.0, 'sample': 0.0}[prediction_type])
        else:
            clipped = min(snr, gamma)
            expected.append(
                {'epsilon': clipped / snr, 'v_prediction': clipped / (snr + 1), 'sample': clipped}[prediction_type]
            )
    w = min_snr_weight(s, torch.arange(6), prediction_type, gamma)
    assert w.dtype == torch.float64
    torch.testing.assert_close(w, torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
@pytest.mark.parametrize('gamma, k', [(1.0, 1.0), (0.5, 1.0), (2.0, 0.5), (0.0, 1.0)])
def test_p2_closed_form_with_limits(prediction_type, gamma, k):
    s = schedule_with(EDGE_ALPHAS_CUMPROD)
    expected = []
    for snr in s.snr(torch.arange(6)).tolist():
        if math.isinf(snr):
            eps = 1.0 if gamma == 0 else 0.0
            sample = 0.0 if gamma > 1 else 1.0 if gamma == 1 else math.inf  # SNR^(1 - gamma)
            expected.append({'epsilon': eps, 'v_prediction': eps, 'sample': sample}[prediction_type])
        else:
            eps = (k + snr) ** -gamma
            expected.append(
                {'epsilon': eps, 'v_prediction': eps * snr / (snr + 1), 'sample': eps * snr}[prediction_type]
            )
    torch.testing.assert_close(
        p2_weight(s, torch.arange(6), prediction_type, gamma, k), torch.tensor(expected, dtype=torch.float64)
    )


def _speed_reference(alphas_cumprod: np.ndarray, tau_t: int, lam: float) -> np.ndarray:
    change = np.gradient(1 - alphas_cumprod)
    normalised = (change - change.min()) / (change.max() - change.min())
    return np.where(np.arange(len(change)) < tau_t, (1 - lam) + (2 * lam - 1) * normalised, 1.0)


@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
@pytest.mark.parametrize('lam', [0.6, 1.0, 0.5, 0.2, 0.0])
def test_speed_weights_closed_form(prediction_type, lam):
    s = NoiseSchedule('linear', 1000)
    t = torch.arange(1000)
    snr = s.snr(t).numpy()
    factor = {'epsilon': 1.0, 'v_prediction': snr / (snr + 1), 'sample': snr}[prediction_type]
    expected = _speed_reference(s.alphas_cumprod.numpy(), 700, lam) * factor
    w = speed_weight(s, t, prediction_type, tau=700, lam=lam)
    np.testing.assert_allclose(w.numpy(), expected, rtol=1e-12)
    eps = speed_weight(s, t, 'epsilon', tau=700, lam=lam)
    # Below tau the weights span [1 - lam, lam]: the fastest change in 1 - alphabar (t = 219 here) gets lam.
    assert int(torch.argmax(torch.gradient(1 - s.alphas_cumprod)[0])) == 219
    assert float(eps[219]) == pytest.approx(lam) and bool((eps[700:] == 1).all())
    assert float(eps[:700].min()) >= min(lam, 1 - lam) - 1e-12 and float(eps[:700].max()) <= max(lam, 1 - lam) + 1e-12


def test_every_target_weights_the_same_objective():
    """Min-SNR, P2 and SpeeD weight the epsilon, v and x0 losses of one prediction so that the products agree."""
    s = NoiseSchedule('linear', 1000)
    t = torch.tensor([0, 10, 200, 500, 900, 999])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn((6, 1, 4, 4), generator=gen, dtype=torch.float64)
    noise = torch.randn((6, 1, 4, 4), generator=gen, dtype=torch.float64)
    x_t = s.add_noise(x0, noise, t)
    eps_hat = noise + 0.3 * torch.randn((6, 1, 4, 4), generator=gen, dtype=torch.float64)
    x0_hat, _ = s.predict_x0_eps(x_t, eps_hat, t, 'epsilon')
    predictions = {'epsilon': eps_hat, 'v_prediction': s.target(x0_hat, eps_hat, t, 'v_prediction'), 'sample': x0_hat}
    losses = {p: (predictions[p] - s.target(x0, noise, t, p)).pow(2).flatten(1).mean(1) for p in PREDICTION_TYPES}
    for p in PREDICTION_TYPES:
        torch.testing.assert_close(losses['epsilon'], epsilon_loss_factor(s.snr(t), p) * losses[p])
    for weight in (min_snr_weight, p2_weight, speed_weight):
        objective = {p: weight(s, t, p) * losses[p] for p in PREDICTION_TYPES}
        torch.testing.assert_close(objective['v_prediction'], objective['epsilon'])
        torch.testing.assert_close(objective['sample'], objective['epsilon'])


@pytest.mark.parametrize('weight', [min_snr_weight, p2_weight, speed_weight])
@pytest.mark.parametrize('prediction_type', PREDICTION_TYPES)
def test_weights_finite_on_zero_terminal_snr_schedules(weight, prediction_type):
    for kind in ('linear', 'scaled_linear', 'squaredcos_cap_v2'):
        s = NoiseSchedule(kind, 1000, zero_terminal_snr=True)
        assert float(s.snr(torch.tensor([999]))) == 0.0
        w = weight(s, torch.arange(1000), prediction_type)
        assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())
    # The limits at SNR = 0: epsilon 1 for Min-SNR and 1 / k^gamma for P2; v and x0 weights vanish.
    last = torch.tensor([999])
    if prediction_type == 'epsilon':
        assert float(min_snr_weight(s, last)) == 1.0 and float(p2_weight(s, last, k=2.0)) == 0.5
    else:
        assert float(min_snr_weight(s, last, prediction_type)) == 0.0 == float(p2_weight(s, last, prediction_type))


SCHEDULES = [
    NoiseSchedule('linear', 1000),
    NoiseSchedule('linear', 50),
    NoiseSchedule('squaredcos_cap_v2', 300),
    NoiseSchedule('scaled_linear', 1000, zero_terminal_snr=True),
    NoiseSchedule('squaredcos_cap_v2', 2),
]


@settings(max_examples=60, deadline=None, database=None)
@given(
    lam=st.floats(0.0, 1.0),
    schedule=st.sampled_from(SCHEDULES),
    prediction_type=st.sampled_from(PREDICTION_TYPES),
    tau=st.integers(1, 999),
)
def test_speed_weights_never_negative_for_any_allowed_lambda(lam, schedule, prediction_type, tau):
    w = speed_weight(schedule, torch.arange(schedule.num_timesteps), prediction_type, tau=tau, lam=lam)
    assert bool(torch.isfinite(w).all()) and bool((w >= 0).all())


@pytest.mark.parametrize('lam', [5, 1.0001, -0.1, math.nan])
def test_speed_rejects_lambdas_that_give_negative_weights(lam):
    with pytest.raises(ValueError, match=r'lam must be in \[0, 1\]'):
        SpeeD(lam=lam)
    with pytest.raises(ValueError, match=r'lam must be in \[0, 1\]'):
        speed_weight(NoiseSchedule(), torch.arange(3), lam=lam)


# ----------------------------------------------------------------------------------------------- densities


def _mean_t(probs: torch.Tensor) -> float:
    return float((probs * torch.arange(probs.numel(), dtype=torch.float64)).sum())


@pytest.mark.parametrize('schedule', SCHEDULES, ids=repr)
def test_densities_are_distributions(schedule):
    for probs in (
        logit_normal_probs(schedule),
        logit_normal_probs(schedule, 3.0, 0.3),
        logit_normal_probs(schedule, -1.0, 2.0),
        log_normal_probs(schedule),
        log_normal_probs(schedule, 2.0, 0.5),
        speed_probs(schedule),
        speed_probs(schedule, 300, 5.0),
    ):
        assert probs.shape == (schedule.num_timesteps,) and probs.dtype == torch.float64
        assert bool(torch.isfinite(probs).all()) and bool((probs >= 0).all())
        assert float(probs.sum()) == pytest.approx(1.0, abs=1e-12)


def test_logit_normal_direction_and_sampling_equivalence():
    s = NoiseSchedule('linear', 1000)
    # t = 0 is clean, t = T-1 pure noise: m = 0 is symmetric, m > 0 favours noisier timesteps.
    assert _mean_t(logit_normal_probs(s)) == pytest.approx(999 / 2, abs=1e-6)
    assert _mean_t(logit_normal_probs(s, m=1.0)) > 500 + 100
    assert _mean_t(logit_normal_probs(s, m=-1.0)) < 500 - 100
    # The cell masses are the distribution of floor(sigmoid(m + s z) T), which is how SD3's u becomes an index.
    s100 = NoiseSchedule('linear', 100)
    gen = torch.Generator().manual_seed(1)
    u = torch.sigmoid(0.5 + 0.8 * torch.randn(400_000, generator=gen, dtype=torch.float64))
    empirical = torch.bincount((u * 100).long(), minlength=100).double() / u.numel()
    assert float((empirical - logit_normal_probs(s100, 0.5, 0.8)).abs().sum()) / 2 < 0.01


def test_log_normal_direction_and_nearest_sigma_equivalence():
    s = NoiseSchedule('linear', 1000)
    # EDM's P_mean = -1.2 is low noise: small t. A large P_mean is the noisy end.
    assert _mean_t(log_normal_probs(s)) < 250
    assert _mean_t(log_normal_probs(s, 3.0, 1.0)) > 500
    # Each draw of ln(sigma) goes to the timestep whose ln(sigma_t) is nearest, sigma_t = sqrt((1 - ab) / ab).
    s100 = NoiseSchedule('linear', 100)
    sigma = ((1 - s100.alphas_cumprod) / s100.alphas_cumprod).sqrt()
    torch.testing.assert_close(log_sigmas(s100), sigma.log())
    gen = torch.Generator().manual_seed(2)
    draws = -1.2 + 1.2 * torch.randn(100_000, generator=gen, dtype=torch.float64)
    nearest = (draws[:, None] - sigma.log()[None, :]).abs().argmin(1)
    empirical = torch.bincount(nearest, minlength=100).double() / draws.numel()
    assert float((empirical - log_normal_probs(s100)).abs().sum()) / 2 < 0.01


def test_log_normal_on_zero_terminal_snr_gives_the_infinite_sigma_step_no_mass():
    s = NoiseSchedule('linear', 1000, zero_terminal_snr=True)
    probs = log_normal_probs(s, 2.0, 2.0)
    assert float(probs[-1]) == 0.0 and float(probs[-2]) > 0 and float(probs.sum()) == pytest.approx(1.0)


def test_speed_probs_direction_and_scaling():
    p = speed_probs(NoiseSchedule('linear', 1000), tau=700, k=2.0)
    # Timesteps below tau (acceleration/deceleration areas) are k times as likely as the convergence area's.
    assert float(p[0] / p[999]) == pytest.approx(2.0) and float(p[699] / p[700]) == pytest.approx(2.0)
    assert float(p[:700].sum()) == pytest.approx(1400 / 1700)
    assert _mean_t(p) < 999 / 2
    assert speed_threshold(100, 700) == 70 and speed_threshold(10, 999) == 9 and speed_threshold(10, 1) == 1
    p100 = speed_probs(NoiseSchedule('linear', 100), tau=700, k=3.0)
    assert float(p100[69] / p100[70]) == pytest.approx(3.0) and float(p100[0] / p100[69]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------------------------- loss second moment


def _reference_history(t: list[int], values: list[float], num_timesteps: int, history: int):
    """Improved DDPM's bookkeeping: the last `history` losses of each timestep."""
    kept = {step: [] for step in range(num_timesteps)}
    for step, value in zip(t, values):
        kept[step] = (kept[step] + [value])[-history:]
    return kept


def test_append_losses_keeps_the_last_losses_of_each_timestep():
    gen = torch.Generator().manual_seed(3)
    num_timesteps, history = 5, 3
    losses = torch.zeros(num_timesteps, history, dtype=torch.float64)
    counts = torch.zeros(num_timesteps, dtype=torch.long)
    all_t, all_values = [], []
    for size in (4, 17, 1, 30):  # calls with many repeats of one timestep, beyond the history length
        t = torch.randint(0, num_timesteps - 1, (size,), generator=gen)  # the last timestep never appears
        values = torch.rand(size, generator=gen, dtype=torch.float64)
        new_losses, new_counts = append_losses(losses, counts, t, values)
        assert int(counts.sum()) == len(all_t)  # inputs are not modified
        losses, counts = new_losses, new_counts
        all_t += t.tolist()
        all_values += values.tolist()
        reference = _reference_history(all_t, all_values, num_timesteps, history)
        for step in range(num_timesteps):
            assert counts[step] == all_t.count(step)
            stored = losses[step, : min(history, int(counts[step]))].tolist()
            assert sorted(stored) == sorted(reference[step])
            # The n-th loss of a timestep sits at slot n % history.
            if counts[step] > 0:
                assert losses[step, (int(counts[step]) - 1) % history] == reference[step][-1]


def test_second_moment_probs_uniform_until_warm_then_sqrt_mean_square():
    losses = torch.tensor([[1.0, 3.0], [1.0, 1.0], [2.0, 2.0], [0.5, 0.0]], dtype=torch.float64)
    counts = torch.tensor([2, 2, 2, 1])
    torch.testing.assert_close(
        loss_second_moment_probs(losses, counts, 0.1), torch.full((4,), 0.25, dtype=torch.float64)
    )
    counts[3] = 2
    rms = torch.tensor([math.sqrt(5.0), 1.0, 2.0, math.sqrt(0.125)], dtype=torch.float64)
    expected = 0.9 * rms / rms.sum() + 0.1 / 4
    torch.testing.assert_close(loss_second_moment_probs(losses, counts, 0.1), expected)
    w = torch.tensor([1.0, 0.5, 0.0, 2.0])
    torch.testing.assert_close(
        loss_second_moment_probs(losses, counts, 0.1, w), 0.9 * rms * w / (rms * w).sum() + 0.1 / 4
    )
    # Defaults of Improved DDPM: 0.001 uniform mass.
    torch.testing.assert_close(loss_second_moment_probs(losses, counts), 0.999 * rms / rms.sum() + 0.001 / 4)


def test_importance_weights_are_one_over_t_p_through_the_model():
    model = tiny_model(num_timesteps=50)
    sampler = LossSecondMomentSampler(50, history=2, uniform_prob=0.2)
    model.set_timestep_sampler(sampler, owner='test')
    draw = model.draw_timesteps(torch.zeros(256, 1, 8, 8))
    t, w = draw.t, draw.importance_weight
    assert bool((w == 1).all())  # not warm: uniform, weight 1
    sampler.update(torch.arange(50).repeat(2), torch.linspace(0.1, 5.0, 50, dtype=torch.float64).repeat(2))
    assert sampler.warm()
    probs = sampler.probs()
    assert float(probs.max() / probs.min()) > 5
    draw = model.draw_timesteps(torch.zeros(4096, 1, 8, 8))
    t, w = draw.t, draw.importance_weight
    torch.testing.assert_close(w, 1.0 / (50 * probs[t]))
    # The draws follow p: far more draws of the high-loss timesteps.
    assert int((t >= 40).sum()) > 3 * int((t < 10).sum())


# ----------------------------------------------------------------------------------------------- algorithms


def test_weighting_algorithms_install_and_log_on_a_minimal_state():
    model = tiny_model(num_timesteps=100, prediction_type='v_prediction')
    logged = install(MinSNRWeighting(gamma=2.0), model)
    logged.update(install(P2Weighting(gamma=0.5, k=2.0), model))
    assert model.loss_weighting_owners == ['MinSNRWeighting', 'P2Weighting']
    assert logged['min_snr_weighting/gamma'] == 2.0 and logged['p2_weighting/k'] == 2.0
    t = torch.arange(100)
    expected = min_snr_weight(model.noise_schedule, t, 'v_prediction', 2.0) * p2_weight(
        model.noise_schedule, t, 'v_prediction', 0.5, 2.0
    )
    torch.testing.assert_close(model.loss_weights(t), expected.float())


def test_p2_rejects_an_infinite_weight_at_init():
    model = tiny_model(prediction_type='sample')
    model.noise_schedule = schedule_with(EDGE_ALPHAS_CUMPROD)
    message = r"P2Weighting gives loss weights .* prediction_type='sample' at timesteps \[0\]"
    with pytest.raises(ValueError, match=message):
        install(P2Weighting(gamma=0.5), model)
    install(P2Weighting(gamma=1.0), model)  # SNR^(1 - gamma) -> 1: finite
    assert model.loss_weighting_owners == ['P2Weighting']


def test_no_effect_warning_when_every_weight_is_one():
    with pytest.warns(NoEffectWarning, match='P2Weighting weights every timestep by 1'):
        install(P2Weighting(gamma=0.0), tiny_model())
    with warnings.catch_warnings():
        warnings.simplefilter('error', NoEffectWarning)
        install(P2Weighting(gamma=1.0), tiny_model())


def test_samplers_install_on_a_minimal_state():
    for algorithm, expected in (
        (LogitNormalSampling(m=0.5), lambda s: logit_normal_probs(s, 0.5)),
        (LogNormalSampling(), log_normal_probs),
        (SpeeD(k=3.0), lambda s: speed_probs(s, 700, 3.0)),
    ):
        model = tiny_model(num_timesteps=100)
        logged = install(algorithm, model)
        assert model.timestep_sampler_owner == type(algorithm).__name__
        assert not model.timestep_sampler.importance
        torch.testing.assert_close(model.timestep_distribution(), expected(model.noise_schedule).float())
        assert logged
    assert logged['speed/threshold'] == 70 and logged['speed/mass_below_threshold'] == pytest.approx(210 / 240)


@pytest.mark.parametrize(
    'build, message',
    [
        (lambda: MinSNRWeighting(gamma=0), 'gamma must be positive'),
        (lambda: MinSNRWeighting(gamma=math.inf), 'gamma must be positive and finite'),
        (lambda: P2Weighting(gamma=-1), 'gamma must be non-negative'),
        (lambda: P2Weighting(k=0), 'k must be positive'),
        (lambda: SpeeD(tau=1000), 'tau must be strictly between 0 and 1000'),
        (lambda: SpeeD(k=0.5), 'k must be finite and >= 1'),
        (lambda: LogitNormalSampling(s=0), 's must be positive'),
        (lambda: LogitNormalSampling(m=math.nan), 'm must be finite'),
        (lambda: LogNormalSampling(p_std=-1), 'p_std must be positive'),
        (lambda: LossSecondMomentSampling(history=0), 'history must be a positive integer'),
        (lambda: LossSecondMomentSampling(history=2.5), 'history must be a positive integer'),
        (lambda: LossSecondMomentSampling(uniform_prob=0), r'uniform_prob must be in \(0, 1\]'),
        (lambda: min_snr_weight(NoiseSchedule(), torch.arange(2), 'x0'), 'prediction_type must be one of'),
    ],
)
def test_arguments_are_validated_by_name(build, message):
    with pytest.raises(ValueError, match=message):
        build()


NAMES = {
    'loss_second_moment_sampling': LossSecondMomentSampling,
    'min_snr_weighting': MinSNRWeighting,
    'p2_weighting': P2Weighting,
    'speed': SpeeD,
    'logit_normal_sampling': LogitNormalSampling,
    'log_normal_sampling': LogNormalSampling,
}


@pytest.mark.parametrize('name', sorted(NAMES))
def test_registry_names_and_yaml_fragments(name):
    assert resolve(algorithm_registry, name, 'algorithm') is NAMES[name]
    with open(os.path.join(ROOT, 'yamls', 'algorithms', f'{name}.yaml')) as f:
        fragment = yaml.safe_load(f)
    assert list(fragment['algorithms']) == [name]
    algorithm = resolve(algorithm_registry, name, 'algorithm')(**fragment['algorithms'][name])
    # The fragments spell out the defaults of the papers.
    assert repr(algorithm) == repr(NAMES[name]())
    assert ' at 0x' not in repr(algorithm) and repr(algorithm).startswith(f'{NAMES[name].__name__}(')


@pytest.mark.parametrize('name', sorted(NAMES))
def test_each_baseline_trains(digits_mds, name):
    algorithm = NAMES[name](history=1) if name == 'loss_second_moment_sampling' else NAMES[name]()
    rec = LossRecorder()
    trainer = make_trainer(digits_mds, algorithms=[algorithm], max_duration='3ba', callbacks=[rec])
    trainer.fit()
    model = trainer.state.model
    assert len(rec.losses) == 3 and all(math.isfinite(x) for x in rec.losses)
    owners = [model.timestep_sampler_owner] + model.loss_weighting_owners
    assert type(algorithm).__name__ in owners
    if name == 'loss_second_moment_sampling':
        assert int(algorithm.sampler.counts.sum()) == 3 * 32


def test_two_sampler_owners_are_an_error_naming_both(digits_mds):
    with pytest.raises(ValueError, match='LogitNormalSampling and SpeeD both set the timestep sampler'):
        make_trainer(digits_mds, algorithms=[SpeeD(), LogitNormalSampling()])
    with pytest.raises(ValueError, match='SpeeD and LossSecondMomentSampling both set the timestep sampler'):
        make_trainer(digits_mds, algorithms=[LossSecondMomentSampling(), SpeeD()])


class OutputRecorder(Callback):
    """Records ``t``, the unweighted per-sample loss and the total weight of every micro-batch."""

    def __init__(self):
        self.outputs = []

    def after_loss(self, state, logger):
        record = state.outputs['draw']
        self.outputs.append({k: getattr(record, k).detach().clone() for k in ('t', 'per_sample_loss', 'loss_weight')})


def test_weightings_multiply_in_training(digits_mds):
    rec = OutputRecorder()
    trainer = make_trainer(
        digits_mds, algorithms=[MinSNRWeighting(), P2Weighting(), SpeeD()], max_duration='2ba', callbacks=[rec]
    )
    trainer.fit()
    s = trainer.state.model.noise_schedule
    for out in rec.outputs:
        t = out['t']
        expected = min_snr_weight(s, t) * p2_weight(s, t) * speed_weight(s, t)
        torch.testing.assert_close(out['loss_weight'], expected.float())
    assert len(rec.outputs) == 2


def test_loss_history_follows_every_micro_batch(digits_mds):
    rec = OutputRecorder()
    algorithm = LossSecondMomentSampling(history=2)
    logs = InMemoryLogger()
    trainer = make_trainer(
        digits_mds,
        algorithms=[algorithm],
        max_duration='3ba',
        callbacks=[rec],
        loggers=[logs],
        device_train_microbatch_size=8,
        model=tiny_model(num_timesteps=20),
    )
    trainer.fit()
    assert len(rec.outputs) == 3 * 4  # AFTER_LOSS fired once per micro-batch
    t = torch.cat([o['t'] for o in rec.outputs]).tolist()
    values = torch.cat([o['per_sample_loss'] for o in rec.outputs]).double().tolist()
    reference = _reference_history(t, values, 20, 2)
    sampler = algorithm.sampler
    assert int(sampler.counts.sum()) == 96
    for step in range(20):
        stored = sampler.losses[step, : min(2, int(sampler.counts[step]))].tolist()
        assert sorted(stored) == pytest.approx(sorted(reference[step]), rel=1e-6)
    assert [v for _, v in logs.data['loss_second_moment/filled']][-1] == pytest.approx(
        float((sampler.counts >= 2).double().mean())
    )


def test_loss_second_moment_accounts_for_loss_weightings(digits_mds):
    algorithm = LossSecondMomentSampling(history=1, uniform_prob=0.01)
    model = tiny_model(num_timesteps=20)
    trainer = make_trainer(
        digits_mds, algorithms=[algorithm, MinSNRWeighting(gamma=1.0)], max_duration='4ba', model=model
    )
    trainer.fit()
    sampler = algorithm.sampler
    assert sampler.warm()
    w = min_snr_weight(model.noise_schedule, torch.arange(20), gamma=1.0)
    scores = w * sampler.losses.pow(2).mean(1).sqrt()
    torch.testing.assert_close(model.timestep_distribution(), (0.99 * scores / scores.sum() + 0.01 / 20).float())


def test_loss_second_moment_resume_is_exact(digits_mds, tmp_path):
    def run(**kwargs):
        rec = LossRecorder()
        algorithm = LossSecondMomentSampling(history=2)
        trainer = make_trainer(digits_mds, algorithms=[algorithm], max_duration='12ba', callbacks=[rec], **kwargs)
        trainer.fit()
        return rec.losses, algorithm, trainer

    save = str(tmp_path / 'ckpt')
    full_losses, full, _ = run(
        model=tiny_model(num_timesteps=20), save_folder=save, save_interval='6ba', save_filename='ba{batch}.pt'
    )
    checkpoint = torch.load(f'{save}/ba6.pt', weights_only=False)
    saved = dict(checkpoint['state']['algorithms'])['LossSecondMomentSampling']
    assert bool((saved['counts'] >= 2).all())  # warm at the save point: the second half importance-samples
    assert saved['losses'].dtype == torch.float64 and saved['counts'].dtype == torch.long
    # Fresh model (another seed), algorithm and trainer: everything must come from the checkpoint.
    resumed_losses, resumed, trainer = run(model=tiny_model(num_timesteps=20, seed=99), load_path=f'{save}/ba6.pt')
    assert len(full_losses) == 12 and resumed_losses == full_losses[6:]
    assert torch.equal(resumed.sampler.losses, full.sampler.losses)
    assert torch.equal(resumed.sampler.counts, full.sampler.counts)
    assert int(full.sampler.counts.sum()) == 12 * 32
    assert trainer.state.model.timestep_sampler is resumed.sampler

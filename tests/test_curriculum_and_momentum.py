"""CLTS and momentum decay (arXiv 2404.07946): closed forms, events, Trainer runs and exact resume."""

import math

import pytest
import torch
from composer.core import Event, State
from composer.loggers import Logger
from composer.optim import CosineAnnealingWithWarmupScheduler
from conftest import LossRecorder, digits_loader, make_trainer, tiny_model
from hypothesis import given, settings
from hypothesis import strategies as st

from composer_algos.algorithms.curriculum_timestep_schedule import (
    CurriculumTimestepSchedule,
    clts_probs,
    difficulty_coordinate,
)
from composer_algos.algorithms.momentum_decay import MomentumDecay, compensation, decayed_momentum, demon_momentum
from composer_algos.diffusion import NoiseSchedule


def test_clts_closed_form():
    ac = NoiseSchedule('linear', 1000).alphas_cumprod
    p = clts_probs(ac, lam=0.5, mu=0.3, sigma=0.2, coordinate='time')
    u = torch.arange(1000, dtype=torch.float64) / 999
    g = torch.exp(-0.5 * ((u - 0.3) / 0.2) ** 2)
    torch.testing.assert_close(p, 0.5 / 1000 + 0.5 * g / g.sum())
    torch.testing.assert_close(clts_probs(ac, lam=0.0), torch.full((1000,), 1e-3, dtype=torch.float64))
    # The mode sits at mu on the chosen coordinate.
    assert int(p.argmax()) == round(0.3 * 999)
    nr = difficulty_coordinate(ac, 'noise_rate')
    q = clts_probs(ac, lam=1.0, mu=0.3, sigma=0.05, coordinate='noise_rate')
    assert abs(float(nr[q.argmax()]) - 0.3) < 0.01
    # The noise rate is the default (the paper's indicator of difficulty): mu = 0.3 is t ~ 92 on it, not t ~ 300.
    torch.testing.assert_close(clts_probs(ac, lam=1.0, mu=0.3, sigma=0.05), q)
    assert 80 < int(q.argmax()) < 100 and CurriculumTimestepSchedule().coordinate == 'noise_rate'


@settings(max_examples=200, deadline=None)
@given(
    lam=st.floats(0, 1),
    mu=st.floats(-5, 5),
    sigma=st.floats(1e-12, 1e3),
    T=st.integers(2, 2000),
    coordinate=st.sampled_from(['time', 'noise_rate']),
)
def test_clts_is_always_a_distribution(lam, mu, sigma, T, coordinate):
    ac = NoiseSchedule('squaredcos_cap_v2', T).alphas_cumprod
    p = clts_probs(ac, lam, mu, sigma, coordinate)
    assert bool(torch.isfinite(p).all()) and bool((p >= 0).all())
    assert float(p.sum()) == pytest.approx(1.0, abs=1e-9)
    # Uniform mass never disappears while lam < 1.
    assert float(p.min()) >= (1 - lam) / T * (1 - 1e-9)


def test_clts_rejects_bad_arguments():
    with pytest.raises(ValueError, match='sigma'):
        CurriculumTimestepSchedule(sigma=0)
    with pytest.raises(ValueError, match='lam'):
        CurriculumTimestepSchedule(lam_max=1.5)
    with pytest.raises(ValueError, match='coordinate'):
        CurriculumTimestepSchedule(coordinate='snr')
    with pytest.raises(ValueError, match='same time unit'):
        CurriculumTimestepSchedule(ramp_start='0.0dur', ramp_end='100ba')


def test_clts_ramps_with_training_and_tilts_the_model(digits_mds):
    clts = CurriculumTimestepSchedule(lam_max=0.8, ramp_start='0ba', ramp_end='4ba')
    trainer = make_trainer(digits_mds, algorithms=[clts], max_duration='6ba')
    model = trainer.state.model
    assert clts.lam == 0.0
    torch.testing.assert_close(model.timestep_distribution(), torch.full((100,), 0.01))
    trainer.fit()
    assert clts.lam == pytest.approx(0.8)
    expected = clts_probs(model.noise_schedule.alphas_cumprod, 0.8, 0.3, 0.2).float()
    torch.testing.assert_close(model.timestep_distribution(), expected)
    assert repr(clts).startswith('CurriculumTimestepSchedule(mu=0.3, sigma=0.2, lam_max=0.8')


def test_demon_and_linear_closed_forms():
    assert demon_momentum(0.9, 0.0) == pytest.approx(0.9)
    assert demon_momentum(0.9, 1.0) == pytest.approx(0.0)
    assert demon_momentum(0.9, 0.5) == pytest.approx(0.9 * 0.5 / (0.1 + 0.45))
    assert decayed_momentum('demon', 0.9, 1.0, beta_end=0.5) == pytest.approx(0.5)
    assert decayed_momentum('linear', 0.9, 0.25, beta_end=0.5) == pytest.approx(0.8)
    with pytest.raises(ValueError, match='rule'):
        MomentumDecay(rule='cosine')
    with pytest.raises(ValueError, match='beta_end'):
        MomentumDecay(beta_end=1.0)


def test_momentum_decay_event_on_minimal_state():
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = State(
        model=model,
        rank_zero_seed=0,
        run_name='x',
        device='cpu',
        optimizers=opt,
        max_duration='10ba',
        dataloader=[None],
        dataloader_label='train',
    )
    md = MomentumDecay(beta_end=0.0, compensate_lr=True, end='1.0dur')
    logger = Logger(state)
    md.apply(Event.BEFORE_TRAIN_BATCH, state, logger)
    assert opt.param_groups[0]['momentum'] == pytest.approx(0.9)
    assert opt.param_groups[0]['lr'] == pytest.approx(0.1)
    md.apply(Event.BATCH_END, state, logger)
    with pytest.raises(TypeError, match='neither'):
        bad = State(
            model=model,
            rank_zero_seed=0,
            run_name='x',
            device='cpu',
            optimizers=torch.optim.Adagrad(model.parameters()),
            max_duration='10ba',
            dataloader=[None],
            dataloader_label='train',
        )
        md.apply(Event.BEFORE_TRAIN_BATCH, bad, Logger(bad))


def _lrs_and_betas_used(digits_mds, algorithms, sgd: bool = False):
    """(lr, beta1 or momentum) that Adam (or SGD) actually used at each of 8 steps under a cosine-with-warmup
    schedule."""
    from composer import Trainer

    model = tiny_model()
    opt = (
        torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        if sgd
        else torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    )
    used = []
    # A post-hook: Composer runs the batch inside optimizer.step(closure), after any pre-hook.
    opt.register_step_post_hook(
        lambda o, args, kwargs: used.append(
            (o.param_groups[0]['lr'], o.param_groups[0]['momentum'] if sgd else o.param_groups[0]['betas'][0])
        )
    )
    Trainer(
        model=model,
        train_dataloader=digits_loader(digits_mds, 16),
        optimizers=opt,
        schedulers=CosineAnnealingWithWarmupScheduler(t_warmup='2ba'),
        algorithms=algorithms,
        max_duration='8ba',
        device='cpu',
        progress_bar=False,
    ).fit()
    return used


@pytest.mark.parametrize('sgd', [False, True])
@pytest.mark.parametrize('mode', [True, 'noise'])
def test_lr_used_is_scheduler_lr_times_compensation(digits_mds, sgd, mode):
    reference = _lrs_and_betas_used(digits_mds, [], sgd)
    decayed = _lrs_and_betas_used(digits_mds, [MomentumDecay(beta_end=0.0, end='1.0dur', compensate_lr=mode)], sgd)
    assert len(reference) == len(decayed) == 8
    assert len({lr for lr, _ in reference}) > 3  # the schedule really moves the lr
    for step, ((scheduled, _), (lr, beta)) in enumerate(zip(reference, decayed)):
        b = demon_momentum(0.9, step / 8)
        assert beta == pytest.approx(b)
        if mode is True:
            # SGD's momentum buffer moves the parameters by lr g / (1 - b) in all: the compensation keeps that at its
            # starting value (larger steps as b decays); Adam's average needs none.
            factor = (1 - b) / (1 - 0.9) if sgd else 1.0
        else:
            # The spread of a step made of independent gradients: sqrt((1 - b) / (1 + b)) for Adam's average,
            # 1 / sqrt(1 - b^2) for SGD's buffer, kept at its value for 0.9.
            factor = math.sqrt((1 - b**2) / (1 - 0.81)) if sgd else math.sqrt((0.1 / 1.9) / ((1 - b) / (1 + b)))
        assert lr == pytest.approx(scheduled * factor, rel=1e-9)


@pytest.mark.parametrize('key', ['betas', 'momentum'])
def test_noise_compensation_keeps_the_spread_of_noisy_steps(key):
    """Simulated: the stationary step of Adam's average (or SGD's buffer) of independent gradients, times the lr
    factor, has the same spread at beta 0.5 as at 0.9."""
    gen = torch.Generator().manual_seed(0)
    grads = torch.randn(3000, 4000, generator=gen, dtype=torch.float64)

    def step_spread(beta: float) -> float:
        buf = torch.zeros(4000, dtype=torch.float64)
        for g in grads:
            buf = beta * buf + ((1 - beta) * g if key == 'betas' else g)
        return float(buf.std())

    spread_start = step_spread(0.9)
    scaled = compensation(key, 0.9, 0.5, 'noise') * step_spread(0.5)
    assert scaled == pytest.approx(spread_start, rel=0.03)
    # The total-contribution compensation does not keep it: Adam's steps grow 2.5x as beta1 falls to 0.5.
    assert compensation(key, 0.9, 0.5) * step_spread(0.5) / spread_start == pytest.approx(
        2.52 if key == 'betas' else 5 * math.sqrt(0.19 / 0.75), rel=0.03
    )
    with pytest.raises(ValueError, match='compensate_lr must be true, false or one of'):
        MomentumDecay(compensate_lr='nois')


def test_a_retried_batch_is_not_compensated_twice():
    # Composer fires BEFORE_TRAIN_BATCH again when it retries a batch after an out-of-memory error.
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    state = State(
        model=model,
        rank_zero_seed=0,
        run_name='x',
        device='cpu',
        optimizers=opt,
        max_duration='10ba',
        dataloader=[None],
        dataloader_label='train',
    )
    state.timestamp = state.timestamp.to_next_batch(samples=1).to_next_batch(samples=1).to_next_batch(samples=1)
    md = MomentumDecay(beta_end=0.0, end='1.0dur', compensate_lr=True)
    logger = Logger(state)
    md.apply(Event.BEFORE_TRAIN_BATCH, state, logger)
    once = opt.param_groups[0]['lr']
    beta = demon_momentum(0.9, 0.3)
    assert opt.param_groups[0]['momentum'] == pytest.approx(beta)
    assert once == pytest.approx(0.1 * (1 - beta) / (1 - 0.9))
    md.apply(Event.BEFORE_TRAIN_BATCH, state, logger)  # the retry
    assert opt.param_groups[0]['lr'] == pytest.approx(once)
    md.apply(Event.BATCH_END, state, logger)
    assert opt.param_groups[0]['lr'] == pytest.approx(0.1)


@pytest.mark.parametrize('mode', [True, 'noise'])
def test_compensation_does_not_compound_without_a_scheduler(digits_mds, mode):
    md = MomentumDecay(beta_end=0.5, compensate_lr=mode)
    trainer = make_trainer(digits_mds, algorithms=[md], max_duration='5ba')
    trainer.fit()
    assert trainer.state.optimizers[0].param_groups[0]['lr'] == pytest.approx(1e-3)


def test_clts_md_resume_is_exact(digits_mds, tmp_path):

    def algorithms():
        return [
            CurriculumTimestepSchedule(lam_max=0.7, ramp_end='6ba', ramp_start='0ba'),
            MomentumDecay(beta_end=0.3, compensate_lr=True),
        ]

    rec = LossRecorder()
    full = make_trainer(
        digits_mds,
        algorithms=algorithms(),
        max_duration='8ba',
        callbacks=[rec],
        save_folder=str(tmp_path / 'a'),
        save_interval='4ba',
    )
    full.fit()
    rec2 = LossRecorder()
    resumed = make_trainer(
        digits_mds,
        algorithms=algorithms(),
        max_duration='8ba',
        callbacks=[rec2],
        model=tiny_model(seed=3),
        load_path=str(tmp_path / 'a' / 'ep0-ba4-rank0.pt'),
    )
    resumed.fit()
    assert rec2.losses == rec.losses[4:]
    assert resumed.state.algorithms[0].lam == full.state.algorithms[0].lam == pytest.approx(0.7)
    assert resumed.state.optimizers[0].param_groups[0]['betas'] == full.state.optimizers[0].param_groups[0]['betas']
    assert resumed.state.optimizers[0].param_groups[0]['lr'] == full.state.optimizers[0].param_groups[0]['lr']

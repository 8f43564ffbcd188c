"""Adaptive timestep sampling (arXiv 2411.09998): distributions, F-test, probe cadence, composition, resume."""

import logging
import math

import numpy as np
import pytest
import torch
from composer.loggers import InMemoryLogger
from conftest import LossRecorder, make_trainer, tiny_model

from composer_algos.algorithms.adaptive_timestep_sampling import (
    AdaptiveTimestepSampling,
    BetaPolicy,
    GlobalPolicy,
    PolicyLearner,
    PolicySampler,
    beta_grid_log_probs,
    clipped_importance_weights,
    f_regression_scores,
    grid_timesteps,
    grid_weights,
    kl_divergence,
    mix_with_uniform,
    read_time_averaged_distribution,
    reinforce_loss,
    select_timesteps,
    sum_of_changes,
    time_averaged_distribution,
)
from composer_algos.algorithms.curriculum_timestep_schedule import CurriculumTimestepSchedule
from composer_algos.diffusion import FixedDistributionSampler
from composer_algos.diffusion.timestep_samplers import tilt, tilt_log_probs

# ------------------------------------------------------------------------------------------------ closed forms


def test_beta_grid_is_a_distribution_without_half_weight_ends():
    p = beta_grid_log_probs(torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, 5.0, 0.5]), 1000).exp()
    torch.testing.assert_close(p.sum(1), torch.ones(3))
    # Beta(1, 1) is exactly uniform, the end timesteps included (rounding a continuous draw halves them).
    torch.testing.assert_close(p[0], torch.full((1000,), 1e-3))
    # Beta(2, 5) and Beta(0.5, 0.5) at the bin centres, against the closed-form densities.
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    for row, density in ((1, u * (1 - u) ** 4), (2, (u * (1 - u)) ** -0.5)):
        torch.testing.assert_close(p[row].double(), density / density.sum(), rtol=1e-3, atol=0)
    # A symmetric Beta gives both ends the same full-bin mass.
    assert math.isclose(float(p[2, 0]), float(p[2, -1]), rel_tol=1e-4)


@pytest.mark.parametrize('shape', [(4, 1, 8, 8), (4, 3, 32, 32), (4, 4, 16, 16), (2, 3, 40, 24)])
@pytest.mark.parametrize('num_timesteps', [50, 1000])
def test_policies_start_near_uniform_for_any_input(shape, num_timesteps):
    torch.manual_seed(0)
    x0 = torch.randn(shape)
    policy = BetaPolicy()
    alpha, beta = policy(x0)
    torch.testing.assert_close(alpha, torch.ones(shape[0]), atol=2e-3, rtol=0)
    torch.testing.assert_close(beta, torch.ones(shape[0]), atol=2e-3, rtol=0)
    p = policy.log_probs(x0, num_timesteps).exp()
    assert p.shape == (shape[0], num_timesteps)
    torch.testing.assert_close(p, torch.full_like(p, 1 / num_timesteps), atol=0, rtol=2e-2)
    g = GlobalPolicy(num_timesteps).log_probs(x0, num_timesteps).exp()
    torch.testing.assert_close(g, torch.full((shape[0], num_timesteps), 1 / num_timesteps))


def test_concentration_maps_and_starting_points():
    x0 = torch.randn(3, 1, 8, 8)
    torch.manual_seed(0)
    paper = BetaPolicy(concentration='softplus', initial_concentration=0.97)
    for value in paper(x0):
        torch.testing.assert_close(value, torch.full((3,), 0.97), atol=2e-3, rtol=0)
    # Far out on the small-t side, the natural parameters still get an O(1) gradient (the log-probabilities are
    # linear in them); the softplus map's concentration sits on its floor and its gradient has vanished.
    z = torch.tensor([-12.0], requires_grad=True)
    log_p = beta_grid_log_probs(1 + z, torch.ones(1), 100)[0, 50]
    (grad_natural,) = torch.autograd.grad(log_p, z)
    z2 = torch.tensor([-12.0], requires_grad=True)
    log_p2 = beta_grid_log_probs(torch.nn.functional.softplus(z2) + 1e-5, torch.ones(1), 100)[0, 50]
    (grad_softplus,) = torch.autograd.grad(log_p2, z2)
    assert abs(float(grad_natural)) > 1.0 and abs(float(grad_softplus)) < 1e-4
    with pytest.raises(ValueError, match='concentration'):
        BetaPolicy(concentration='relu')


def test_grid_weights_make_the_target_estimate_the_sum_over_all_timesteps():
    grid = grid_timesteps(1000, 32)
    weights = grid_weights(grid, 1000)
    assert grid[0] == 0 and grid[-1] == 999 and weights.sum() == 1000
    # t = 0 stands for 16 timesteps, not 1/32 of the target; an interior point for about 32.
    assert weights[0] == 16 and set(weights[1:-1].tolist()) <= {32.0, 33.0}
    change = torch.arange(1000, dtype=torch.float64) * 0.3 + 2.0  # a smooth per-timestep change
    torch.testing.assert_close((weights * change[grid]).sum(), change.sum(), rtol=1e-3, atol=0)
    # A change concentrated at t = 0 (the clamped decoder term's) weighs 1/1000 of a constant change, not 1/32.
    spike = torch.zeros(1000, dtype=torch.float64)
    spike[0] = 1.0
    assert float((weights * spike[grid]).sum() / (weights * torch.ones(32, dtype=torch.float64)).sum()) == 16 / 1000


def test_gaussian_kl_at_t0_without_clamp_closed_form():
    model = tiny_model(num_timesteps=100)
    torch.manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8) * 2 - 1
    noise = torch.randn(4, 1, 8, 8)
    t = torch.zeros(4, dtype=torch.long)
    s = model.noise_schedule
    with torch.no_grad():
        kl = model.vlb_terms(x0, t, noise, decoder_nll=False, clip=False)
        x_t = s.add_noise(x0, noise, t)
        eps_hat = model.denoise(x_t, t)
        x0_hat = (x_t - (1 - s.alphas_cumprod[0]).sqrt() * eps_hat) / s.alphas_cumprod[0].sqrt()
    # At t = 0 the true posterior's mean is x0, the model's is x0_hat (unclamped), and both variances are the
    # clipped posterior variance of t = 1: KL = (x0 - x0_hat)^2 / (2 var), averaged over dimensions.
    expected = ((x0 - x0_hat) ** 2 / (2 * s.posterior_variance[1])).flatten(1).mean(1)
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=1e-6)
    # The likelihood's t = 0 term stays the discretised decoder NLL.
    assert not torch.allclose(model.vlb_terms(x0, t, noise), kl)


def test_training_losses_are_the_unweighted_mse():
    model = tiny_model(num_timesteps=100, prediction_type='v_prediction')
    x0, noise = torch.rand(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
    t = torch.tensor([0, 40, 99])
    with torch.no_grad():
        target = model.noise_schedule.target(x0, noise, t, 'v_prediction')
        expected = (model.denoise(model.noise_schedule.add_noise(x0, noise, t), t) - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(model.training_losses(x0, t, noise), expected)


def test_rewards_sum_or_scale_each_timestep():
    changes = torch.tensor([[1.0, 3.0], [0.01, -0.03]], dtype=torch.float64)  # (|S|, B)
    torch.testing.assert_close(sum_of_changes(changes, False), torch.tensor([1.01, 2.97], dtype=torch.float64))
    # Each timestep divided by its mean absolute change: (1/2, 3/2) + (0.01/0.02, -0.03/0.02).
    torch.testing.assert_close(sum_of_changes(changes, True), torch.tensor([1.0, 0.0], dtype=torch.float64))
    adaptive = AdaptiveTimestepSampling(reward='normalized')
    torch.testing.assert_close(adaptive.rewards(changes), torch.tensor([1.0, 0.0], dtype=torch.float64))
    assert AdaptiveTimestepSampling(reward='paper').rewards(changes).tolist() == pytest.approx([1.01, 2.97])


@pytest.mark.parametrize('reward', ['paper', 'loss', 'normalized'])
def test_each_reward_setting_starts_and_updates(digits_mds, reward):
    """The policy's log-probabilities and entropy at the start of each setting, then updates on a real Trainer."""
    adaptive = AdaptiveTimestepSampling(update_every=1, num_probe_timesteps=8, reward=reward)
    trainer = make_trainer(digits_mds, algorithms=[adaptive], max_duration='4ba')
    setting = adaptive.setting
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    log_probs = adaptive.log_probs(x0)
    a = torch.full((5,), setting.initial_concentration)
    torch.testing.assert_close(log_probs, beta_grid_log_probs(a, a, 100), atol=2e-3, rtol=0)
    entropy = -(log_probs.exp() * log_probs).sum(1)
    assert float(entropy.max()) <= math.log(100) + 1e-6
    if setting.initial_concentration == 1.0:
        torch.testing.assert_close(entropy, torch.full((5,), math.log(100)), atol=1e-5, rtol=0)
    expected_s = [0, 1, 2] if reward == 'paper' else adaptive.probe_timesteps[[2, 4, 5]].tolist()
    assert adaptive.selected_timesteps == expected_s
    trainer.fit()
    assert adaptive.num_updates == 4 and adaptive.num_skipped == 0
    assert adaptive.entropy_coef == (1e-2 if reward == 'paper' else 0.1)


def test_no_probe_while_the_learning_rate_is_zero(digits_mds):
    from composer.optim import ConstantWithWarmupScheduler

    spy = ProbeSpy(update_every=3, num_probe_timesteps=8)
    # Warm-up over 3 steps: Composer trains steps 0 and 1 at lr 0 (the scheduler's first step evaluates batch 0
    # again). The probe due at step 0 waits for step 2; the next is due at step 3.
    make_trainer(
        digits_mds, algorithms=[spy], max_duration='6ba', schedulers=ConstantWithWarmupScheduler(t_warmup='3ba')
    ).fit()
    assert spy.probe_steps == [2, 3]
    assert spy.num_updates == 2 and all(abs(r) > 0 for r in spy.rewards_seen)


def test_f_test_matches_sklearn():
    from sklearn.feature_selection import SelectKBest, f_regression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 9))
    y = x[:, 2] * 3 + 2 * x[:, 6] - 2 * x[:, 7] + rng.normal(size=20) * 0.1
    x[:, 5] = 1.0  # a constant column scores 0, as in sklearn with force_finite
    expected, _ = f_regression(x, y)
    scores = f_regression_scores(torch.tensor(x), torch.tensor(y))
    np.testing.assert_allclose(scores.numpy(), expected, rtol=1e-9)
    assert float(scores[5]) == 0.0
    expected_k = SelectKBest(f_regression, k=3).fit(x, y).get_support(indices=True)
    assert select_timesteps(torch.tensor(x), torch.tensor(y), 3).tolist() == expected_k.tolist()
    assert 2 in expected_k.tolist()


def test_tilted_log_probs_is_the_normalised_product():
    torch.manual_seed(0)
    log_probs = torch.log_softmax(torch.randn(3, 10), 1)
    prior = torch.rand(10)
    prior[4] = 0.0
    tilted = tilt_log_probs(log_probs, prior)
    torch.testing.assert_close(tilted.exp(), tilt(log_probs.exp(), [prior]))
    torch.testing.assert_close(tilted.exp().sum(1), torch.ones(3))
    assert bool(torch.isneginf(tilted[:, 4]).all())
    # A prior without mass is ignored (the model's tilt keeps the sampler's distribution then), row by row.
    torch.testing.assert_close(tilt_log_probs(log_probs, torch.zeros(10)), log_probs)
    one_hot = torch.log(torch.eye(10)[[0, 5]])
    torch.testing.assert_close(tilt_log_probs(one_hot, torch.eye(10)[5]).exp(), torch.eye(10)[[0, 5]])
    # Differentiable without NaN through a prior with zeros.
    logits = torch.randn(3, 10, requires_grad=True)
    tilt_log_probs(torch.log_softmax(logits, 1), prior)[:, 0].sum().backward()
    assert bool(torch.isfinite(logits.grad).all())


def test_per_sample_draws_follow_each_row():
    from composer_algos.diffusion.timestep_samplers import sample_from_probs

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.1, 0.2, 0.3, 0.4, 0.0]], dtype=torch.float64)
    u = torch.rand((4000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    draws = torch.stack([sample_from_probs(probs, row) for row in u])
    for row in range(2):
        freq = torch.bincount(draws[:, row], minlength=5).double() / 4000
        torch.testing.assert_close(freq, probs[row], atol=0.03, rtol=0)
        assert bool((freq[probs[row] == 0] == 0).all())  # zero-probability timesteps are never drawn


def test_policy_gradient_uses_the_tilted_normalised_log_prob():
    # d/dlogits [-A log p_tilt(t)] = A (p_tilt - onehot(t)) for a categorical policy tilted by a fixed prior.
    policy = GlobalPolicy(6)
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([0.1, -0.3, 0.5, 0.0, 0.2, -0.1]))
    prior = torch.tensor([0.05, 0.1, 0.3, 0.3, 0.2, 0.05])
    x0 = torch.zeros(1, 1, 2, 2)
    sample_log_probs = tilt_log_probs(policy.log_probs(x0, 6), prior)
    loss, _ = reinforce_loss(sample_log_probs, torch.tensor([3]), torch.tensor([2.0]), entropy_coef=0.0)
    loss.backward()
    p_tilt = torch.softmax(policy.logits.detach(), 0) * prior
    p_tilt = p_tilt / p_tilt.sum()
    torch.testing.assert_close(policy.logits.grad, 2.0 * (p_tilt - torch.nn.functional.one_hot(torch.tensor(3), 6)))


def test_entropy_bonus_is_in_the_reward_as_the_code_computes_it():
    # loss = -mean[log(T p(t)) (A + c (H - ln T))], the entropy not detached: a hand-computable categorical case.
    policy = GlobalPolicy(4)
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    with torch.no_grad():
        policy.logits.copy_(p.log())
    log_probs = policy.log_probs(torch.zeros(1, 1, 1, 1), 4)
    c, advantage = 0.5, 1.0
    loss, h = reinforce_loss(log_probs, torch.tensor([0]), torch.tensor([advantage]), entropy_coef=c)
    entropy = float(-(p * p.log()).sum())  # 1.2799
    log_density = math.log(4 * 0.4)  # log(T p(t)): 0.4700
    expected = -log_density * (advantage + c * (entropy - math.log(4)))
    assert math.isclose(float(h), entropy, rel_tol=1e-6) and math.isclose(float(loss), expected, rel_tol=1e-5)
    loss.backward()
    # d/dz: -(A + c (H - ln T)) (onehot(t) - p) - c log(T p(t)) dH/dz, with dH/dz_i = -p_i (log p_i + H).
    grad_h = -p * (p.log() + entropy)
    onehot = torch.nn.functional.one_hot(torch.tensor(0), 4).float()
    closed = -(advantage + c * (entropy - math.log(4))) * (onehot - p) - c * log_density * grad_h
    torch.testing.assert_close(policy.logits.grad, closed, rtol=1e-5, atol=1e-7)
    # Near uniform the bonus vanishes: log(T p) = 0 and H = ln T, so only the advantage moves the policy.
    uniform = GlobalPolicy(4)
    loss, h = reinforce_loss(
        uniform.log_probs(torch.zeros(1, 1, 1, 1), 4), torch.tensor([2]), torch.tensor([0.3]), entropy_coef=10.0
    )
    loss.backward()
    assert abs(float(loss)) < 1e-6 and math.isclose(float(h), math.log(4), rel_tol=1e-6)
    torch.testing.assert_close(uniform.logits.grad, -0.3 * (torch.eye(4)[2] - 0.25))


def test_grid_log_density_and_entropy_are_the_continuous_betas():
    # log(T p(t)) and H - ln T of the discretised Beta are the log-density of u = (t + 0.5) / T and the differential
    # entropy of torch.distributions.Beta (the code's log_prob and entropy), up to the discretisation.
    alpha, beta = torch.tensor([2.0, 0.97, 1.0]), torch.tensor([5.0, 0.97, 1.0])
    log_probs = beta_grid_log_probs(alpha.double(), beta.double(), 1000)
    u = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    continuous = torch.distributions.Beta(alpha.double()[:, None], beta.double()[:, None])
    interior = slice(10, 990)  # the density of Beta(0.97, 0.97) is unbounded at the ends
    torch.testing.assert_close(
        (log_probs + math.log(1000))[:, interior], continuous.log_prob(u)[:, interior], atol=2e-3, rtol=0
    )
    entropy = -(log_probs.exp() * log_probs).sum(1)
    torch.testing.assert_close(entropy - math.log(1000), continuous.entropy().squeeze(1), atol=2e-3, rtol=0)


def test_tilted_policy_bonus_uses_the_product_log_prob_and_the_policys_entropy():
    policy = GlobalPolicy(5)
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([0.3, -0.2, 0.5, 0.0, 0.1]))
    prior = torch.tensor([0.1, 0.3, 0.3, 0.2, 0.1])
    own = policy.log_probs(torch.zeros(1, 1, 1, 1), 5)
    loss, _ = reinforce_loss(tilt_log_probs(own, prior), torch.tensor([1]), torch.tensor([0.7]), 0.4, own)
    loss.backward()
    pi = torch.softmax(policy.logits.detach(), 0)
    q = pi * prior / (pi * prior).sum()
    entropy = float(-(pi * pi.log()).sum())
    log_density = math.log(5 * float(q[1]))
    closed = -(0.7 + 0.4 * (entropy - math.log(5))) * (torch.eye(5)[1] - q) - 0.4 * log_density * (
        -pi * (pi.log() + entropy)
    )
    torch.testing.assert_close(policy.logits.grad, closed, rtol=1e-5, atol=1e-7)


def test_uniform_mix_floors_every_timestep():
    log_p = torch.log(torch.tensor([[0.7, 0.3, 0.0, 0.0]]))
    mixed = mix_with_uniform(log_p, 0.2).exp()
    torch.testing.assert_close(mixed, torch.tensor([[0.61, 0.29, 0.05, 0.05]]))
    assert mix_with_uniform(log_p, 0.0) is log_p
    sampler = PolicySampler(GlobalPolicy(4), 4, uniform_mix=0.2)
    with torch.no_grad():
        sampler.policy.logits.copy_(torch.tensor([30.0, 0.0, 0.0, 0.0]))
    assert float(sampler.probs(torch.zeros(3, 1, 2, 2)).min()) >= 0.05 - 1e-7


def test_importance_weights_are_clipped_then_normalised_to_mean_one():
    ratios = torch.tensor([0.5, 1.0, 2.0, 30.0])
    weights = clipped_importance_weights(ratios, 10.0)
    torch.testing.assert_close(weights, torch.tensor([0.5, 1.0, 2.0, 10.0]) / 3.375)
    assert math.isclose(float(weights.mean()), 1.0, rel_tol=1e-6)
    # Unclipped, the weights 1 / (T p) make the expected weighted loss uniform's, whatever p is.
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(50, dtype=torch.float64) * 0.5, 0)
    loss = torch.rand(50, dtype=torch.float64)
    assert float((1 / (50 * p)).max()) < 10
    assert math.isclose(float((p * (1 / (50 * p)) * loss).sum()), float(loss.mean()), rel_tol=1e-12)
    # Normalised over a batch, the estimate is consistent: its mean over many batches is uniform's objective.
    gen = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(2000):
        t = torch.multinomial(p, 64, replacement=True, generator=gen)
        w = clipped_importance_weights(1 / (50 * p[t]), 10.0)
        estimates.append(float((w * loss[t]).mean()))
    assert abs(np.mean(estimates) - float(loss.mean())) < 3e-3
    # Plain draws from p train E_p[L] instead, the uniform objective with the weighting T p(t).
    assert abs(float((p * loss).sum()) - float(loss.mean())) > 1e-2


def test_importance_weights_reach_the_loss_through_the_draw_record(digits_mds):
    adaptive = AdaptiveTimestepSampling(
        update_every=2, num_probe_timesteps=8, policy='global', importance_weighted=True, importance_clip=4.0
    )
    trainer = make_trainer(digits_mds, algorithms=[adaptive], max_duration='4ba')
    model = trainer.state.model
    with torch.no_grad():
        adaptive.policy.logits.copy_(torch.linspace(-3, 3, 100))
    x0 = torch.rand(32, 1, 8, 8) * 2 - 1
    record = model({'image': x0})['draw']
    p_t = record.probs.gather(1, record.t[:, None]).squeeze(1)
    ratios = 1 / (100 * p_t)
    assert float(ratios.max()) > 4.0  # the clip binds
    torch.testing.assert_close(record.importance_weight, clipped_importance_weights(ratios, 4.0))
    torch.testing.assert_close(record.loss_weight, record.importance_weight)
    assert math.isclose(float(record.importance_weight.mean()), 1.0, rel_tol=1e-5)
    trainer.fit()
    assert adaptive.num_updates == 2
    # Without the setting, every weight is 1 (the paper's sampler).
    plain = AdaptiveTimestepSampling(num_probe_timesteps=8, policy='global')
    other = make_trainer(digits_mds, algorithms=[plain], max_duration='1ba')
    assert bool((other.state.model({'image': x0})['draw'].importance_weight == 1).all())


def test_time_averaged_distribution_weights_rows_by_the_steps_they_cover(tmp_path):
    rows = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]])  # rows are normalised
    average = time_averaged_distribution(torch.tensor([100, 200, 400]), rows)
    # Step 0 to 150 is the first record's, 150 to 300 the second's, 300 to 400 the third's.
    torch.testing.assert_close(average, torch.tensor([150.0, 150.0, 100.0], dtype=torch.float64) / 400)
    path = tmp_path / 'timestep_heatmap.npz'
    np.savez(path, steps=np.array([100, 200, 400]), probs=rows.numpy())
    torch.testing.assert_close(read_time_averaged_distribution(str(path)), average)
    with pytest.raises(ValueError, match='no such file'):
        AdaptiveTimestepSampling(frozen_average=str(tmp_path / 'missing.npz'))
    with pytest.raises(ValueError, match='increasing'):
        time_averaged_distribution(torch.tensor([200, 100]), rows[:2])


def test_frozen_average_is_a_fixed_sampler_without_probes(digits_mds, tmp_path):
    probs = torch.softmax(torch.linspace(-2, 2, 100), 0)
    path = tmp_path / 'timestep_heatmap.npz'
    np.savez(path, steps=np.array([3, 6]), probs=torch.stack([probs, probs]).numpy())
    frozen = AdaptiveTimestepSampling(frozen_average=str(path), update_every=1)
    assert frozen.needs == ('num_timesteps', 'set_timestep_sampler') and 'frozen_average=' in repr(frozen)
    recorder = InMemoryLogger()
    trainer = make_trainer(digits_mds, algorithms=[frozen], max_duration='3ba', loggers=[recorder])
    model = trainer.state.model
    assert model.timestep_sampler_owner == 'AdaptiveTimestepSampling' and frozen.policy is None
    torch.testing.assert_close(model.timestep_distribution(torch.zeros(2, 1, 8, 8)), probs)
    trainer.fit()
    assert not any(key.startswith('adaptive/') for key in recorder.data)  # no probes, no policy updates
    draw = model({'image': torch.zeros(4, 1, 8, 8)})['draw']
    assert bool((draw.importance_weight == 1).all())
    with pytest.raises(ValueError, match='timesteps'):
        make_trainer(
            digits_mds,
            algorithms=[AdaptiveTimestepSampling(frozen_average=str(path))],
            model=tiny_model(num_timesteps=50),
        )
    with pytest.raises(ValueError, match='exclude'):
        AdaptiveTimestepSampling(frozen_average=str(path), importance_weighted=True)


def test_trust_region_bounds_each_update():
    torch.manual_seed(0)
    x0 = torch.randn(64, 1, 8, 8)
    t = torch.randint(600, 800, (64,))
    reward = torch.ones(64, dtype=torch.float64)
    kls = {}
    for max_kl in (0.0, 0.01):
        torch.manual_seed(0)
        learner = PolicyLearner(
            BetaPolicy(), 1000, lr=0.5, grad_clip=1.0, normalize='none', entropy_coef=0.0, max_kl=max_kl
        )
        before = learner.policy.log_probs(x0, 1000).detach()
        metrics = learner.update(x0, t, reward)
        kls[max_kl] = float(kl_divergence(before, learner.policy.log_probs(x0, 1000).detach()).mean())
        if max_kl:
            assert math.isclose(metrics['adaptive/step_kl'], kls[max_kl], rel_tol=1e-4)
    assert kls[0.0] > 0.1 and 0.001 < kls[0.01] <= 0.01


def test_running_normalisation_uses_bias_corrected_moments():
    learner = PolicyLearner(GlobalPolicy(10), 10, lr=1e-2, grad_clip=1.0, normalize='running', entropy_coef=0.0)
    first = learner.advantages(torch.tensor([1.0, 3.0], dtype=torch.float64), 2.0, 5.0)
    torch.testing.assert_close(first, torch.tensor([-1.0, 1.0], dtype=torch.float64))  # the batch's own, at first
    second = learner.advantages(torch.tensor([4.0, 6.0], dtype=torch.float64), 5.0, 26.0)
    weight = 0.9 * 0.1 + 0.1
    mean = (0.9 * 0.1 * 2.0 + 0.1 * 5.0) / weight
    var = (0.9 * 0.1 * 5.0 + 0.1 * 26.0) / weight - mean**2
    torch.testing.assert_close(second, (torch.tensor([4.0, 6.0], dtype=torch.float64) - mean) / math.sqrt(var))


# ------------------------------------------------------------------------------------------------ a toy problem


def installed(adaptive, num_timesteps=1000):
    """``adaptive`` installed at Event.INIT on a tiny model (a minimal State, no Trainer); returns the model."""
    from composer.core import Event, State
    from composer.loggers import Logger

    model = tiny_model(num_timesteps=num_timesteps)
    state = State(
        model=model,
        rank_zero_seed=0,
        run_name='toy',
        device='cpu',
        max_duration='10ba',
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
        dataloader=[None],
        dataloader_label='train',
    )
    adaptive.apply(Event.INIT, state, Logger(state, []))
    return model


BAND = (600, 800)  # the timesteps the toy's reward favours: uniform puts 20% of its mass there


def toy_race(adaptive, updates=200, height=1e-2, noise=1.5e-2, shift=2e-2, seed=0):
    """The algorithm's own draw, reward and update on a reward that is a known function of t.

    Each update draws a batch of 128 timesteps from the model's installed sampler, makes the ``(|S|, B)`` changes at
    S from the band's reward (``height`` for t in BAND, else 0, in the paper's unit: bits), per-sample noise and a shift
    common to the batch (their sizes are those measured on the MNIST tier's paper-mode probes: per-sample spread 0.015
    bits, batch means within +-0.05), and passes them through ``rewards`` and ``update_policy``. Returns, per update,
    the mass of the batch's marginal distribution in BAND and its entropy.
    """
    model = installed(adaptive)
    gen = torch.Generator().manual_seed(seed)
    pool = torch.rand(256, 1, 8, 8, generator=gen) * 2 - 1
    size = len(adaptive.selected_timesteps)
    masses, entropies = [], []
    for _ in range(updates):
        x0 = pool[torch.randint(0, 256, (128,), generator=gen)]
        record = model.draw_timesteps(x0)
        marginal = record.probs.mean(0).double()
        masses.append(float(marginal[BAND[0] : BAND[1]].sum()))
        entropies.append(float(-torch.special.xlogy(marginal, marginal).sum()))
        in_band = ((record.t >= BAND[0]) & (record.t < BAND[1])).double()
        changes = (
            height * in_band / size
            + noise / math.sqrt(size) * torch.randn(size, 128, generator=gen, dtype=torch.float64)
            + shift / size * float(torch.randn(1, generator=gen))
        )
        adaptive.update_policy(x0, record.t, adaptive.rewards(changes), record.prior)
    return masses, entropies


POLICY_MOVES = {
    'paper': {'reward': 'paper'},
    'loss': {'reward': 'loss'},
    'normalized': {'reward': 'normalized'},
    'loss, running normalisation': {'reward': 'loss', 'normalize': 'running'},
    'loss, no uniform mix': {'reward': 'loss', 'uniform_mix': 0.0},
    'loss, no trust region': {'reward': 'loss', 'max_kl': 0.0},
}


@pytest.mark.parametrize('name', list(POLICY_MOVES))
def test_policy_moves_to_a_rewarded_band_and_does_not_collapse(name):
    masses, entropies = toy_race(AdaptiveTimestepSampling(**POLICY_MOVES[name]))
    first = next((i for i, m in enumerate(masses) if m >= 0.4), None)
    print(
        f'{name}: band mass {masses[0]:.3f} -> {masses[-1]:.3f} (max {max(masses):.3f}, first at twice uniform: '
        f'update {first}); batch entropy min {min(entropies):.2f}, last {entropies[-1]:.2f}'
    )
    assert first is not None and first < 200  # at least twice uniform's 20% within 200 updates
    assert min(entropies) >= 4.0  # about 55 effective timesteps or more, at every update


@pytest.mark.parametrize('name', list(POLICY_MOVES))
def test_policy_moves_nowhere_without_reward_or_bonus(name):
    adaptive = AdaptiveTimestepSampling(**POLICY_MOVES[name], entropy_coef=0.0)
    installed(adaptive)
    before = [p.detach().clone() for p in adaptive.policy.parameters()]
    x0 = torch.rand(64, 1, 8, 8) * 2 - 1
    for _ in range(3):
        t = torch.randint(0, 1000, (64,))
        adaptive.update_policy(
            x0, t, adaptive.rewards(torch.zeros(len(adaptive.selected_timesteps), 64, dtype=torch.float64))
        )
    assert adaptive.num_updates == 3
    assert all(torch.equal(a, b) for a, b in zip(before, adaptive.policy.parameters()))


def test_policy_update_has_zero_expectation_for_a_reward_independent_of_t():
    # The score-function identity behind "no reward, no move": sum_t p(t) d/dz[-log(T p(t)) A] = -A d/dz sum_t p = 0,
    # for the tilted, mixed distribution the algorithm differentiates.
    policy = GlobalPolicy(6)
    with torch.no_grad():
        policy.logits.copy_(torch.tensor([0.5, -1.0, 0.2, 0.0, 1.5, -0.3]))
    prior = torch.tensor([0.1, 0.2, 0.3, 0.2, 0.1, 0.1])
    learner = PolicyLearner(policy, 6, lr=1e-2, grad_clip=1.0, normalize='none', entropy_coef=0.0, uniform_mix=0.1)
    x0 = torch.zeros(1, 1, 2, 2)
    p = learner.log_probs(x0, prior).exp().detach()[0]
    expected = torch.zeros(6)
    for t in range(6):
        policy.logits.grad = None
        loss, _ = reinforce_loss(learner.log_probs(x0, prior), torch.tensor([t]), torch.tensor([0.8]), 0.0)
        loss.backward()
        expected += p[t] * policy.logits.grad
    torch.testing.assert_close(expected, torch.zeros(6), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    'kwargs, name',
    [
        ({'update_every': 0}, 'update_every'),
        ({'policy': 'gauss'}, 'policy'),
        ({'num_selected': 40}, 'num_selected'),
        ({'lr': -1.0}, 'lr'),
        ({'queue_size': 2}, 'queue_size'),
        ({'entropy_coef': float('nan')}, 'entropy_coef'),
        ({'uniform_mix': 1.0}, 'uniform_mix'),
        ({'max_kl': -0.1}, 'max_kl'),
        ({'normalize': 'z'}, 'normalize'),
        ({'importance_clip': 0.5}, 'importance_clip'),
        ({'num_probe_timesteps': 1}, 'num_probe_timesteps'),
        ({'importance_weighted': 'yes'}, 'importance_weighted'),
    ],
)
def test_arguments_are_validated(kwargs, name):
    with pytest.raises(ValueError, match=name):
        AdaptiveTimestepSampling(**kwargs)


def test_repr_is_clean():
    text = repr(AdaptiveTimestepSampling(update_every=7, policy='global'))
    assert text.startswith('AdaptiveTimestepSampling(update_every=7,') and "policy='global'" in text
    assert ' at 0x' not in text


# ------------------------------------------------------------------------------------------------ with a Trainer


class ProbeSpy(AdaptiveTimestepSampling):
    """Records the global step of each probe, the timesteps it collected, and every probe forward."""

    def __init__(self, **kwargs):
        kwargs.setdefault('reward', 'paper')  # it spies on the VLB terms, which the paper's reward probes
        super().__init__(**kwargs)
        self.probe_steps, self.t_counts, self.calls, self.train_mode_after_probe = [], [], [], []
        self.rewards_seen = []

    def _probe_before(self, state, model):
        if not hasattr(model, '_spied'):
            original = model.vlb_terms

            def vlb_terms(x0, t, noise, conditioning=None, **kwargs):
                self.calls.append((int(state.timestamp.batch), model.training, t.clone(), noise.clone()))
                return original(x0, t, noise, conditioning, **kwargs)

            model.vlb_terms, model._spied = vlb_terms, True
        super()._probe_before(state, model)
        self.train_mode_after_probe.append(model.training)

    def rewards(self, changes):
        reward = super().rewards(changes)
        self.rewards_seen.append(float(reward.abs().sum()))
        return reward

    def _probe_after(self, state, model, logger):
        self.probe_steps.append(int(state.timestamp.batch) - 1)  # BATCH_END follows the timestamp increment
        self.t_counts.append(sum(t.numel() for t in self._probe.t))
        super()._probe_after(state, model, logger)


@pytest.mark.parametrize('microbatch', [None, 8])
def test_probes_at_global_optimizer_steps(digits_mds, microbatch):
    spy = ProbeSpy(update_every=3, num_probe_timesteps=8)
    kwargs = {'device_train_microbatch_size': microbatch} if microbatch else {}
    make_trainer(digits_mds, algorithms=[spy], max_duration='10ba', **kwargs).fit()
    assert spy.probe_steps == [0, 3, 6, 9]
    assert spy.t_counts == [32] * 4  # every micro-batch's timesteps, in order
    assert spy.num_probes == spy.num_updates == 4 and spy.num_skipped == 0
    # One batched forward before and one after the step: |S| copies of the batch and the 8 grid timesteps, all in
    # eval mode, with train mode restored afterwards.
    assert len(spy.calls) == 4 * 2
    assert not any(training for _, training, _, _ in spy.calls) and all(spy.train_mode_after_probe)
    for probe in range(4):
        (step0, _, t0, n0), (step1, _, t1, n1) = spy.calls[2 * probe : 2 * probe + 2]
        assert step0 == spy.probe_steps[probe] and step1 == step0 + 1
        assert torch.equal(t0, t1) and torch.equal(n0, n1)  # common random numbers
        assert t0.shape == (3 * 32 + 8,) and t0[96:].tolist() == spy.probe_timesteps.tolist()
        blocks = t0[:96].view(3, 32)
        assert (blocks == blocks[:, :1]).all() and blocks[:, 0].unique().numel() == 3
    assert spy.queue_x.shape == (4, 8) and torch.isfinite(spy.queue_x).all()
    # The target is the grid's changes weighted by the timesteps each grid point stands for (an estimate of the sum
    # over all 100).
    torch.testing.assert_close(spy.queue_y, (spy.queue_x * spy.probe_weights).sum(1))
    assert spy.probe_weights.sum() == 100
    # Three queued probes and more: S is the F-test's choice.
    assert spy.selected.tolist() == spy.probe_timesteps[select_timesteps(spy.queue_x, spy.queue_y, 3)].tolist()


def test_paper_mode_probes_all_timesteps_as_the_code(digits_mds):
    spy = ProbeSpy(update_every=3)  # reward: paper, the probe grid left to the setting
    make_trainer(digits_mds, algorithms=[spy], max_duration='10ba').fit()
    assert spy.num_probe_timesteps is None and spy.probe_timesteps.tolist() == list(range(100))
    # Two forwards per probe, each of |S| copies of the batch and all T = 100 timesteps of one probe image.
    t0 = spy.calls[0][2]
    assert t0.shape == (3 * 32 + 100,) and t0[96:].tolist() == list(range(100))
    # The F-test target is the plain sum of the image's changes over all T, and S is chosen among all T.
    assert bool((spy.probe_weights == 1).all()) and spy.queue_x.shape == (4, 100)
    torch.testing.assert_close(spy.queue_y, spy.queue_x.sum(1))
    assert spy.selected.tolist() == select_timesteps(spy.queue_x, spy.queue_y, 3).tolist()


def test_fit_learns_a_per_sample_policy_and_logs(digits_mds):
    adaptive = AdaptiveTimestepSampling(update_every=1, lr=0.05, num_probe_timesteps=8, reward='loss')
    recorder = InMemoryLogger()
    trainer = make_trainer(digits_mds, algorithms=[adaptive], max_duration='6ba', loggers=[recorder])
    model = trainer.state.model
    assert model.timestep_sampler_owner == 'AdaptiveTimestepSampling'
    assert model.timestep_sampler.policy is adaptive.policy
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    before = model.timestep_probs(x0).clone()
    assert before.shape == (5, 100)
    torch.testing.assert_close(before, torch.full_like(before, 0.01), atol=1e-4, rtol=0)
    trainer.fit()
    after = model.timestep_probs(x0)
    assert (after - before).abs().max() > 1e-4
    torch.testing.assert_close(after.sum(1), torch.ones(5))
    for key in ('adaptive/reward', 'adaptive/mean_t', 'adaptive/entropy', 'adaptive/S0', 'adaptive/probe_seconds'):
        assert len(recorder.data[key]) == 6, key
    assert all(0 < v < math.log(100) + 1e-6 for _, v in recorder.data['adaptive/entropy'])
    assert all(v > 0 for _, v in recorder.data['adaptive/probe_seconds'])


def test_latents_of_another_shape_and_timestep_count():
    from composer import Trainer
    from torch.utils.data import DataLoader, TensorDataset

    from composer_algos.diffusion import DiffusionModel, NoiseSchedule, TimeConditionedConvNet

    torch.manual_seed(0)
    model = DiffusionModel(TimeConditionedConvNet(in_channels=4, width=8), NoiseSchedule('linear', 50), image_key=0)
    loader = DataLoader(TensorDataset(torch.randn(24, 4, 12, 12)), batch_size=8)
    adaptive = AdaptiveTimestepSampling(update_every=1, num_probe_timesteps=50, num_selected=2)
    Trainer(
        model=model,
        train_dataloader=loader,
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
        algorithms=[adaptive],
        max_duration='3ba',
        device='cpu',
        precision='fp32',
        progress_bar=False,
    ).fit()
    assert adaptive.num_updates == 3 and adaptive.queue_x.shape == (3, 50)
    assert adaptive.selected.tolist() == select_timesteps(adaptive.queue_x, adaptive.queue_y, 2).tolist()
    assert model.timestep_probs(torch.randn(2, 4, 12, 12)).shape == (2, 50)


def test_second_sampler_owner_is_a_clear_error(digits_mds):
    from composer.core import Algorithm, Event

    class OtherSampler(Algorithm):
        def match(self, event, state):
            return event == Event.INIT

        def apply(self, event, state, logger):
            state.model.set_timestep_sampler(FixedDistributionSampler(torch.ones(100)), owner='OtherSampler')

    with pytest.raises(ValueError, match='OtherSampler and AdaptiveTimestepSampling both set the timestep sampler'):
        make_trainer(digits_mds, algorithms=[AdaptiveTimestepSampling(), OtherSampler()])


def test_num_probe_timesteps_above_t_is_an_error(digits_mds):
    with pytest.raises(ValueError, match='num_probe_timesteps'):
        make_trainer(digits_mds, algorithms=[AdaptiveTimestepSampling(num_probe_timesteps=101)])


def test_curriculum_prior_tilts_the_draw_and_the_log_prob(digits_mds):
    adaptive = AdaptiveTimestepSampling(update_every=2, num_probe_timesteps=8)
    clts = CurriculumTimestepSchedule(lam_max=0.9, sigma=0.1, ramp_start='0ba', ramp_end='2ba', coordinate='time')
    trainer = make_trainer(digits_mds, algorithms=[clts, adaptive], max_duration='4ba')
    trainer.fit()
    model = trainer.state.model
    x0 = torch.rand(3, 1, 8, 8) * 2 - 1
    pi = adaptive.policy.log_probs(x0, 100).exp()
    expected = pi * clts.probs().float()
    expected = expected / expected.sum(1, keepdim=True)
    torch.testing.assert_close(model.timestep_probs(x0), expected)
    torch.testing.assert_close(adaptive.log_probs(x0, model.timestep_priors()[0]).exp(), expected)
    # The forward outputs record the prior the batch's timesteps were drawn under.
    draw = model({'image': x0})['draw']
    torch.testing.assert_close(draw.prior, clts.probs().float())
    torch.testing.assert_close(draw.probs, expected)
    # The prior moves the draw towards mu = 0.3 (t around 30 of 100), away from the policy's own distribution.
    gen = torch.Generator().manual_seed(0)
    tilted_draws = torch.multinomial(model.timestep_distribution(x0), 2000, replacement=True, generator=gen)
    gen.manual_seed(0)
    plain_draws = torch.multinomial(pi.mean(0), 2000, replacement=True, generator=gen)
    assert ((tilted_draws >= 20) & (tilted_draws < 40)).float().mean() > 0.5
    assert ((plain_draws >= 20) & (plain_draws < 40)).float().mean() < 0.3


def test_non_finite_reward_or_loss_skips_the_update(digits_mds, caplog):
    adaptive = AdaptiveTimestepSampling(update_every=1, num_probe_timesteps=8)
    make_trainer(digits_mds, algorithms=[adaptive], max_duration='1ba').fit()
    params = [p.detach().clone() for p in adaptive.policy.parameters()]
    adam = [s['exp_avg'].clone() for s in adaptive.optimizer.state.values()]
    x0, t = torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long)
    with caplog.at_level(logging.WARNING):
        adaptive.update_policy(x0, t, torch.tensor([1.0, float('nan'), 0.0, 2.0]))
        adaptive.update_policy(x0, t, torch.tensor([1.0, float('inf'), 0.0, 2.0]))
        adaptive.update_policy(x0, t, torch.tensor([1.0, 3.0, 0.0, 2.0]), loss_finite=False)
    assert caplog.text.count('update was skipped') == 3
    assert adaptive.num_skipped == 3 and adaptive.num_updates == 1
    assert all(torch.equal(p, q) for p, q in zip(params, adaptive.policy.parameters()))
    assert all(torch.equal(a, s['exp_avg']) for a, s in zip(adam, adaptive.optimizer.state.values()))
    assert all(torch.isfinite(p).all() for p in adaptive.policy.parameters())
    adaptive.update_policy(x0, torch.tensor([0, 10, 50, 99]), torch.tensor([1.0, 3.0, 0.0, 2.0]))
    assert adaptive.num_updates == 2
    assert any(not torch.equal(p, q) for p, q in zip(params, adaptive.policy.parameters()))


RESUMED = {
    'beta, paper': {'reward': 'paper', 'num_probe_timesteps': 8},
    'beta, paper, all T probed': {'reward': 'paper'},
    'global, paper': {'reward': 'paper', 'policy': 'global', 'num_probe_timesteps': 8},
    'beta, loss': {'reward': 'loss', 'num_probe_timesteps': 8},
    'beta, normalized': {'reward': 'normalized', 'num_probe_timesteps': 8},
    'beta, loss, running normalisation': {'reward': 'loss', 'normalize': 'running', 'num_probe_timesteps': 8},
    'beta, loss, importance weighted': {'reward': 'loss', 'importance_weighted': True, 'num_probe_timesteps': 8},
}


@pytest.mark.parametrize('name', list(RESUMED))
def test_resume_gives_the_same_losses_and_sampler_state(digits_mds, tmp_path, name):

    def algorithm():
        return AdaptiveTimestepSampling(update_every=2, **RESUMED[name])

    rec = LossRecorder()
    full = make_trainer(
        digits_mds,
        algorithms=[algorithm()],
        max_duration='8ba',
        callbacks=[rec],
        save_folder=str(tmp_path / 'a'),
        save_interval='4ba',
    )
    full.fit()
    rec2 = LossRecorder()
    resumed = make_trainer(
        digits_mds,
        algorithms=[algorithm()],
        max_duration='8ba',
        callbacks=[rec2],
        model=tiny_model(seed=4),
        load_path=str(tmp_path / 'a' / 'ep0-ba4-rank0.pt'),
    )
    b = resumed.state.algorithms[0]
    # Loaded in place: the model's sampler uses the algorithm's (restored) policy object.
    assert resumed.state.model.timestep_sampler.policy is b.policy and b.num_updates == 2
    resumed.fit()
    assert len(rec.losses) == 8 and rec2.losses == rec.losses[4:]
    a = full.state.algorithms[0]
    assert a.num_updates == b.num_updates == 4
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb)
    for key in ('policy', 'queue_x', 'queue_y', 'selected', 'reward_moments'):
        value, got = sa[key], sb[key]
        pairs = (
            value.items()
            if isinstance(value, dict)
            else enumerate(value)
            if isinstance(value, list)
            else [(None, value)]
        )
        for k, v in pairs:
            w = got if k is None else got[k]
            assert torch.equal(v, w), (key, k)
    assert sa['optimizer']['state'].keys() == sb['optimizer']['state'].keys()
    for k, state in sa['optimizer']['state'].items():
        assert all(torch.equal(state[n], sb['optimizer']['state'][k][n]) for n in state), k
    assert (sa['num_probes'], sa['num_skipped']) == (sb['num_probes'], sb['num_skipped']) == (4, 0)
    assert (float(sa['reward_moments'][0]) > 0) == (a.normalize == 'running')
    # Tensors and primitives only: the state loads with weights_only=True into a fresh algorithm after INIT.
    torch.save(sa, tmp_path / 'adaptive.pt')
    reloaded = torch.load(tmp_path / 'adaptive.pt', weights_only=True)
    fresh = algorithm()
    make_trainer(digits_mds, algorithms=[fresh], max_duration='1ba')
    fresh.load_state_dict(reloaded)
    assert torch.equal(fresh.queue_x, a.queue_x) and fresh.selected_timesteps == a.selected_timesteps
    assert all(torch.equal(p, q) for p, q in zip(fresh.policy.parameters(), a.policy.parameters()))


def test_frozen_average_resumes_with_the_distribution_it_trained_with(digits_mds, tmp_path):
    path = tmp_path / 'timestep_heatmap.npz'
    rows = torch.softmax(torch.randn(3, 100, generator=torch.Generator().manual_seed(0)), 1)
    np.savez(path, steps=np.array([2, 4, 8]), probs=rows.numpy())
    rec = LossRecorder()
    full = make_trainer(
        digits_mds,
        algorithms=[AdaptiveTimestepSampling(frozen_average=str(path))],
        max_duration='8ba',
        callbacks=[rec],
        save_folder=str(tmp_path / 'a'),
        save_interval='4ba',
    )
    full.fit()
    trained_with = full.state.algorithms[0].frozen_distribution.clone()
    # The file changes after the checkpoint: the resumed run still draws from the distribution it trained with.
    np.savez(path, steps=np.array([2]), probs=rows[:1].numpy())
    rec2 = LossRecorder()
    resumed = make_trainer(
        digits_mds,
        algorithms=[AdaptiveTimestepSampling(frozen_average=str(path))],
        max_duration='8ba',
        callbacks=[rec2],
        model=tiny_model(seed=4),
        load_path=str(tmp_path / 'a' / 'ep0-ba4-rank0.pt'),
    )
    b = resumed.state.algorithms[0]
    assert torch.equal(b.frozen_distribution, trained_with)
    assert resumed.state.model.timestep_sampler is b.sampler
    resumed.fit()
    assert len(rec.losses) == 8 and rec2.losses == rec.losses[4:]

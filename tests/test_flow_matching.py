"""Flow matching (rectified flow): the schedule and its shift against diffusers, the continuous densities and SD3
weightings in closed form, the objective, ODE sampling, which algorithms refuse a flow model, and Trainer runs with
exact resume."""

import importlib.util
import math
import os

import pytest
import torch
from composer.core import Event, State
from composer.loggers import Logger
from conftest import LossRecorder, make_trainer

from composer_algos import registry
from composer_algos.algorithms import (
    AdaptiveTimestepSampling,
    CosMapSampling,
    CosMapWeighting,
    CurriculumTimestepSchedule,
    LogitNormalSampling,
    LogNormalSampling,
    LossSecondMomentSampling,
    MinSNRWeighting,
    ModeSampling,
    MomentumDecay,
    P2Weighting,
    SigmaSqrtWeighting,
    SpeeD,
)
from composer_algos.algorithms.cosmap_weighting import cosmap_weight
from composer_algos.algorithms.sigma_sqrt_weighting import sigma_sqrt_weight
from composer_algos.diffusion import (
    CosMapDensity,
    FlowMatchingModel,
    FlowSchedule,
    LogitNormalDensity,
    ModeDensity,
    TimeConditionedConvNet,
    UniformDensity,
    sample_within_cells,
)
from composer_algos.diffusion.build import build_diffusion_model
from composer_algos.diffusion.densities import grid_masses
from composer_algos.diffusion.flow import resolution_shift, shift_sigmas, unshift_sigmas

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location('train_script', os.path.join(ROOT, 'recipes', 'train.py'))
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)

diffusers = pytest.importorskip('diffusers')
from diffusers import FlowMatchEulerDiscreteScheduler  # noqa: E402
from diffusers.pipelines.flux.pipeline_flux import calculate_shift  # noqa: E402
from diffusers.training_utils import (
    compute_density_for_timestep_sampling,  # noqa: E402
    compute_loss_weighting_for_sd3,
)


def flow_model(seed: int = 17, shift: float = 1.0, num_cells: int = 100, denoiser=None, **kwargs):
    torch.manual_seed(seed)
    return FlowMatchingModel(
        denoiser or TimeConditionedConvNet(in_channels=1, width=16),
        FlowSchedule(shift=shift, num_cells=num_cells),
        seed=seed,
        **kwargs,
    )


def minimal_state(model) -> State:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return State(
        model=model,
        rank_zero_seed=0,
        run_name='x',
        device='cpu',
        optimizers=opt,
        max_duration='10ba',
        dataloader=[None],
        dataloader_label='train',
    )


def init(model, *algorithms) -> None:
    state = minimal_state(model)
    for algorithm in algorithms:
        algorithm.apply(Event.INIT, state, Logger(state))


# ------------------------------------------------------------------------------------------ schedule and shift
def test_shift_is_monotone_fixes_the_ends_and_inverts():
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0):
        shifted = shift_sigmas(sigma, s)
        assert shifted[0] == 0 and shifted[-1] == 1 and bool((shifted.diff() > 0).all())
        torch.testing.assert_close(unshift_sigmas(shifted, s), sigma)
    torch.testing.assert_close(shift_sigmas(sigma, 1.0), sigma)
    assert float(shift_sigmas(torch.tensor(0.5), 3.0)) == pytest.approx(0.75)
    for kwargs, name in (
        ({'shift': 0.0}, 'shift'),
        ({'num_cells': 1}, 'num_cells'),
        ({'base_seq_len': 4096, 'max_seq_len': 256}, 'max_seq_len'),
        ({'patch_size': 0}, 'patch'),
    ):
        with pytest.raises(ValueError, match=name):
            FlowSchedule(**kwargs)


def test_fixed_shift_grid_equals_diffusers_scheduler():
    for shift in (1.0, 3.0):
        # The scheduler's training table: the shifted levels n / 1000, n = 1..1000.
        reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
        levels = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
        torch.testing.assert_close(shift_sigmas(levels, shift).float(), reference.sigmas.float(), rtol=1e-6, atol=1e-6)
        for num_steps in (1, 4, 28, 50):
            reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
            reference.set_timesteps(num_steps)
            ours = FlowSchedule(shift=shift).inference_sigmas(num_steps)
            torch.testing.assert_close(ours.float(), reference.sigmas.float(), rtol=1e-6, atol=1e-6)
            # What the denoiser sees at each level is diffusers' timestep.
            torch.testing.assert_close(
                FlowSchedule(shift=shift).timesteps(ours[:-1]), reference.timesteps.float(), rtol=1e-6, atol=1e-4
            )


def test_resolution_shift_grid_equals_diffusers_dynamic_shifting():
    for size, patch in ((64, 2), (128, 2), (32, 1)):
        check_resolution_shift(size, patch)


def check_resolution_shift(size: int, patch: int) -> None:
    seq_len = (size // patch) ** 2
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert resolution_shift(seq_len) == pytest.approx(math.exp(mu), rel=1e-12)
    reference = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
        time_shift_type='exponential',
    )
    reference.set_timesteps(20, mu=mu)
    schedule = FlowSchedule(resolution_shift=True, patch_size=patch)
    ours = schedule.inference_sigmas(20, (1, 4, size, size))
    torch.testing.assert_close(ours.float(), reference.sigmas.float(), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match='image shape'):
        schedule.shift_for(None)


# ------------------------------------------------------------------------------------------ densities and weightings
def test_logit_normal_density_gives_diffusers_numbers():
    m, s = 0.3, 0.7
    gen = torch.Generator().manual_seed(0)
    reference = compute_density_for_timestep_sampling(
        'logit_normal', 4096, logit_mean=m, logit_std=s, generator=gen
    ).double()
    # diffusers draws m + s z; the uniform Phi(z) of the same standard normal z gives the same u by inverse CDF.
    z = torch.randn(4096, generator=torch.Generator().manual_seed(0)).double()
    ours = LogitNormalDensity(m, s).inverse_cdf(torch.special.ndtr(z))
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    # Its CDF maps diffusers' draws to uniforms.
    v = LogitNormalDensity(m, s).cdf(reference).sort().values
    assert float((v - (torch.arange(4096) + 0.5) / 4096).abs().max()) < 0.03


def test_mode_density_gives_diffusers_numbers():
    scale = 1.29
    reference = compute_density_for_timestep_sampling(
        'mode', 4096, mode_scale=scale, generator=torch.Generator().manual_seed(1)
    ).double()
    w = torch.rand(4096, generator=torch.Generator().manual_seed(1)).double()
    density = ModeDensity(scale)
    torch.testing.assert_close(density.inverse_cdf(1 - w), reference, rtol=1e-5, atol=1e-6)
    # The bisected CDF inverts the map.
    torch.testing.assert_close(density.cdf(reference), 1 - w, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='scale'):
        ModeDensity(2.0)


def test_cosmap_density_is_sd3s_and_its_derivative_is_diffusers_cosmap_weighting():
    # diffusers' sampling function has no cosmap branch (it draws uniformly); SD3's map u = 1 - 1 / (tan(pi w / 2) + 1)
    # is the reference, and its density is exactly diffusers' cosmap loss weighting.
    w = torch.linspace(0.001, 0.999, 999, dtype=torch.float64)
    density = CosMapDensity()
    torch.testing.assert_close(density.inverse_cdf(w), 1 - 1 / (torch.tan(math.pi * w / 2) + 1))
    u = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    pdf = (density.cdf(u + h) - density.cdf(u - h)) / (2 * h)
    torch.testing.assert_close(pdf, compute_loss_weighting_for_sd3('cosmap', u).double(), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(density.cdf(density.inverse_cdf(w)), w)


def test_uniform_density_and_grid_masses():
    torch.testing.assert_close(
        UniformDensity().inverse_cdf(torch.tensor([0.2, 0.9])), torch.tensor([0.2, 0.9], dtype=torch.float64)
    )
    edges = torch.arange(11, dtype=torch.float64) / 10
    for density in (UniformDensity(), LogitNormalDensity(0.5, 1.2), ModeDensity(1.29), CosMapDensity()):
        masses = grid_masses(density, edges)
        assert float(masses.sum()) == pytest.approx(1.0) and bool((masses >= 0).all())
        torch.testing.assert_close(masses, density.cdf(edges).diff() / float(density.cdf(edges).diff().sum()))
    # Drawing within cells is the inverse CDF of the piecewise-constant density of the masses.
    probs = torch.tensor([0.2, 0.0, 0.5, 0.3], dtype=torch.float64)
    u = torch.tensor([0.1, 0.2 + 0.25, 0.95], dtype=torch.float64)
    cells, position = sample_within_cells(probs, u)
    assert cells.tolist() == [0, 2, 3]
    torch.testing.assert_close(position, torch.tensor([0.5, 0.5, 0.25 / 0.3], dtype=torch.float64))


def test_sd3_weightings_equal_diffusers():
    sigma = torch.linspace(0.001, 1.0, 1000, dtype=torch.float64)
    torch.testing.assert_close(
        sigma_sqrt_weight(None, sigma).float(),
        compute_loss_weighting_for_sd3('sigma_sqrt', sigma.float()),
        rtol=1e-5,
        atol=0,
    )
    torch.testing.assert_close(cosmap_weight(None, sigma), compute_loss_weighting_for_sd3('cosmap', sigma).double())
    # Below diffusers' smallest level the sigma_sqrt weight stops growing.
    assert float(sigma_sqrt_weight(None, torch.tensor([0.0]))) == pytest.approx(1e6)


# ------------------------------------------------------------------------------------------ the objective
class Recorder(torch.nn.Module):
    """A denoiser that records what it is called with and predicts ``scale * x``."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.scale * x


def test_forward_is_the_flow_matching_objective():
    for shift in (1.0, 3.0):
        check_objective(shift)


def check_objective(shift: float) -> None:
    net = Recorder()
    model = flow_model(shift=shift, denoiser=net)
    x0 = torch.randn(6, 1, 8, 8)
    record = model({'image': x0})['draw']
    model.num_draws = 0
    u, noise = model.draw_randoms(x0)
    sigma = record.sigma
    # Uniform time, shifted.
    torch.testing.assert_close(sigma, shift_sigmas(u, shift))
    x_t, t = net.calls[-1]
    s = sigma.float()[:, None, None, None]
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(t, sigma.float() * 1000)
    target = noise - x0
    torch.testing.assert_close(record.per_sample_loss, (0.5 * x_t - target).pow(2).flatten(1).mean(1))
    assert record.t.tolist() == torch.floor(sigma * 100).long().tolist()
    torch.testing.assert_close(record.noise, noise)
    # training_losses at given cells uses their centres.
    cells = torch.tensor([0, 49, 99])
    losses = model.training_losses(x0[:3], cells, noise[:3])
    c = torch.tensor([0.005, 0.495, 0.995])[:, None, None, None]
    x_c = (1 - c) * x0[:3] + c * noise[:3]
    torch.testing.assert_close(losses, (0.5 * x_c - target[:3]).pow(2).flatten(1).mean(1))


def test_build_from_recipe_section_and_what_a_flow_model_rejects():
    model = flow_model()
    with pytest.raises(ValueError, match='no discrete variational bound'):
        model.vlb_terms(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 8, 8))
    from composer_algos.diffusion import NoiseSchedule

    with pytest.raises(TypeError, match='FlowSchedule'):
        FlowMatchingModel(TimeConditionedConvNet(1, 16), NoiseSchedule('linear', 100))
    model = build_diffusion_model(
        {'name': 'conv', 'in_channels': 1, 'width': 16},
        objective='flow_matching',
        flow={'shift': 3.0, 'num_cells': 50},
        solver='heun',
    )
    assert isinstance(model, FlowMatchingModel) and model.noise_schedule.shift == 3.0 and model.num_timesteps == 50
    with pytest.raises(registry.ConfigError, match='objective'):
        build_diffusion_model({'name': 'conv', 'in_channels': 1}, objective='flow')
    with pytest.raises(registry.ConfigError, match='model.flow'):
        build_diffusion_model({'name': 'conv', 'in_channels': 1}, objective='flow_matching', noise_schedule={})
    with pytest.raises(registry.ConfigError, match='model.flow'):
        build_diffusion_model({'name': 'conv', 'in_channels': 1}, flow={'shift': 3.0})
    # The flow model passes DiffusionModel's arguments on by keyword: a misspelt one is still named, with the fix.
    model = build_diffusion_model(
        {'name': 'conv', 'in_channels': 1}, objective='flow_matching', seed=3, num_loss_bands=4
    )
    assert model.seed == 3 and model.num_loss_bands == 4
    with pytest.raises(registry.ConfigError, match="'model.sed'. Did you mean 'model.seed'"):
        build_diffusion_model({'name': 'conv', 'in_channels': 1}, objective='flow_matching', sed=3)


class PointMassVelocity(torch.nn.Module):
    """The exact velocity field of data concentrated at ``a``: ``v(x, sigma) = (x - a) / sigma``."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t):
        sigma = (t.float() / 1000)[:, None, None, None]
        return (x - self.a) / sigma


def test_ode_sampling_euler_and_heun():
    # The flow to a point mass is a straight line: any step size lands on it, from any noise.
    for solver in ('euler', 'heun'):
        for shift in (1.0, 3.0):
            model = flow_model(shift=shift, denoiser=PointMassVelocity(0.3), solver=solver)
            out = model.generate(4, (1, 8, 8), num_steps=5, seed=2, clip=False)
            torch.testing.assert_close(out, torch.full_like(out, 0.3), rtol=0, atol=1e-5)

    # A linear field v = x: Euler multiplies by (1 + d) each step, Heun by (1 + d + d^2 / 2), Euler on the last.
    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def forward(self, x, t):
            return x

    model = flow_model(shift=3.0, denoiser=Linear())
    noise = torch.randn(2, 1, 8, 8)
    sigmas = model.noise_schedule.inference_sigmas(4).tolist()
    deltas = [b - a for a, b in zip(sigmas[:-1], sigmas[1:])]
    euler = math.prod(1 + d for d in deltas)
    heun = math.prod(1 + d + d * d / 2 for d in deltas[:-1]) * (1 + deltas[-1])
    for solver, factor in (('euler', euler), ('heun', heun)):
        out = model.generate(2, (1, 8, 8), num_steps=4, noise=noise, solver=solver, clip=False)
        torch.testing.assert_close(out, noise * factor, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match='eta'):
        model.generate(1, (1, 8, 8), num_steps=2, eta=1.0)


# ------------------------------------------------------------------------------------------ algorithms on flow
def test_density_samplers_draw_sigma_by_their_inverse_cdf():
    for algorithm, density in (
        (LogitNormalSampling(m=0.4, s=0.8), LogitNormalDensity(0.4, 0.8)),
        (ModeSampling(scale=0.8), ModeDensity(0.8)),
        (CosMapSampling(), CosMapDensity()),
    ):
        check_density_sampler(algorithm, density)


def check_density_sampler(algorithm, density) -> None:
    model = flow_model(shift=3.0)
    init(model, algorithm)
    x0 = torch.zeros(64, 1, 8, 8)
    u = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    draw = model.draw_timesteps(x0, u)
    torch.testing.assert_close(draw.sigma, shift_sigmas(density.inverse_cdf(u), 3.0))
    assert bool((draw.importance_weight == 1).all())
    # The cell masses it reports are the density's, moved by the shift.
    edges = unshift_sigmas(torch.arange(101, dtype=torch.float64) / 100, 3.0)
    torch.testing.assert_close(
        model.timestep_distribution().double(), grid_masses(density, edges), rtol=1e-5, atol=1e-7
    )
    # On a DDPM model the same density sits on t / T.
    from conftest import tiny_model

    ddpm = tiny_model(num_timesteps=100)
    init(ddpm, type(algorithm)(**{k: v for k, v in vars(algorithm).items() if not k.startswith('_')}))
    torch.testing.assert_close(
        ddpm.timestep_distribution().double(),
        grid_masses(density, torch.arange(101, dtype=torch.float64) / 100),
        rtol=1e-5,
        atol=1e-7,
    )


def test_ddpm_only_algorithms_refuse_a_flow_model_in_one_line(digits_mds, tmp_path, capsys, monkeypatch):
    for algorithm, fix in (
        (MinSNRWeighting(), 'sigma_sqrt_weighting'),
        (P2Weighting(), 'sigma_sqrt_weighting'),
        (SpeeD(), 'logit_normal_sampling'),
        (LogNormalSampling(), 'logit_normal_sampling'),
    ):
        with pytest.raises(ValueError) as error:
            init(flow_model(), algorithm)
        message = str(error.value)
        assert type(algorithm).__name__ in message and fix in message and 'flow-matching' in message
        assert '\n' not in message
    # Through a recipe: one line and exit status 2 (a recipe that cannot be used), whether validation or the callback
    # at the run's start finds it.
    monkeypatch.chdir(tmp_path)
    base = [
        os.path.join(ROOT, 'yamls', 'digits', 'flow_uniform.yaml'),
        'prepare_data=false',
        f'train_loader.local={digits_mds}',
        f'eval_loader.local={digits_mds}',
        'max_duration=2ba',
        'progress_bar=false',
        'save_folder=null',
        'loggers=null',
        'callbacks=null',
    ]
    for overrides, code, named in (
        (['algorithms.min_snr_weighting={gamma: 5.0}'], 2, 'MinSNRWeighting'),
        (['callbacks.bits_per_dim={num_images: 8}'], 2, 'bits_per_dim'),
    ):
        capsys.readouterr()
        assert train_script.main(base + overrides) == code
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith('error:')]
        assert len(errors) == 1 and named in errors[0] and 'flow' in errors[0] and 'Traceback' not in err, err


def test_flow_weightings_refuse_a_ddpm_model_and_weight_by_sigma():
    from conftest import tiny_model

    for algorithm, reference in ((SigmaSqrtWeighting(), sigma_sqrt_weight), (CosMapWeighting(), cosmap_weight)):
        with pytest.raises(ValueError, match='flow-matching models only'):
            init(tiny_model(), algorithm)
        model = flow_model()
        init(model, algorithm)
        record = model({'image': torch.randn(5, 1, 8, 8)})['draw']
        torch.testing.assert_close(record.loss_weight, reference(None, record.sigma).float())


def test_loss_aware_sampler_and_a_weighting_train_a_flow_model(digits_mds):
    # The importance weights of the loss-second-moment sampler correct towards the flow model's own distribution;
    # the sigma_sqrt weighting multiplies them at each drawn sigma.
    lsm = LossSecondMomentSampling(history=2)
    model = flow_model(shift=3.0)
    trainer = make_trainer(digits_mds, algorithms=[lsm, SigmaSqrtWeighting()], model=model, max_duration='4ba')
    trainer.fit()
    assert torch.isfinite(trainer.state.loss)
    x0 = torch.zeros(8, 1, 8, 8)
    draw = model.draw_timesteps(x0, torch.linspace(0.05, 0.95, 8, dtype=torch.float64))
    own = model.default_timestep_sampler().probs(x0)
    torch.testing.assert_close(draw.importance_weight, (own[draw.t] / draw.probs[draw.t]).float())
    record = model({'image': x0})['draw']
    torch.testing.assert_close(
        record.loss_weight, (record.importance_weight * sigma_sqrt_weight(None, record.sigma)).float()
    )


def test_curriculum_over_sigma_tilts_the_draws_towards_mu():
    model = flow_model()
    clts = CurriculumTimestepSchedule(mu=0.3, sigma=0.05, lam_max=1.0)
    init(model, clts)
    clts.lam = 1.0
    p = model.timestep_distribution()
    centre = float(model.noise_schedule.cell_centres()[p.argmax()])
    assert abs(centre - 0.3) <= 0.01
    u = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    sigma = model.draw_timesteps(torch.zeros(2000, 1, 8, 8), u).sigma
    assert abs(float(sigma.mean()) - 0.3) < 0.01 and abs(float(sigma.std()) - 0.05) < 0.01
    # lam = 0: the flow model's own distribution (uniform sigma, no shift).
    clts.lam = 0.0
    sigma = model.draw_timesteps(torch.zeros(2000, 1, 8, 8), u).sigma
    assert float((sigma - u).abs().max()) < 1e-6


def test_adaptive_policy_rewards_the_flow_matching_loss_reduction(digits_mds):
    adaptive = AdaptiveTimestepSampling(update_every=2, num_probe_timesteps=8)
    model = flow_model()
    trainer = make_trainer(digits_mds, algorithms=[adaptive], model=model, max_duration='6ba')
    before = {k: v.clone() for k, v in adaptive.policy.state_dict().items()}
    trainer.fit()
    assert adaptive.prober.terms == 'loss' and adaptive.num_updates == 3
    assert any(not torch.equal(before[k], v) for k, v in adaptive.policy.state_dict().items())
    # The probe's terms are the flow-matching loss at the cell centres, with the same keyed noise each pass.
    x0 = torch.randn(4, 1, 8, 8)
    cells = torch.tensor([5, 20, 50, 95])
    noise = torch.randn(4, 1, 8, 8)
    first = model.training_losses(x0, cells, noise)
    torch.testing.assert_close(first, model.training_losses(x0, cells, noise))
    assert bool((first > 0).all())


def test_flow_recipe_algorithms_resume_exactly(digits_mds, tmp_path):

    def algorithms():
        return [
            AdaptiveTimestepSampling(update_every=2, num_probe_timesteps=8),
            CurriculumTimestepSchedule(lam_max=0.7, ramp_start='0ba', ramp_end='6ba'),
            MomentumDecay(beta_end=0.3, compensate_lr=True),
        ]

    rec = LossRecorder()
    full = make_trainer(
        digits_mds,
        algorithms=algorithms(),
        model=flow_model(),
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
        model=flow_model(seed=3),
        max_duration='8ba',
        callbacks=[rec2],
        load_path=str(tmp_path / 'a' / 'ep0-ba4-rank0.pt'),
    )
    resumed.fit()
    assert len(rec.losses) == 8 and all(math.isfinite(x) for x in rec.losses)
    assert rec2.losses == rec.losses[4:]
    assert resumed.state.algorithms[0].num_updates == full.state.algorithms[0].num_updates == 4
    assert resumed.state.model.num_draws == full.state.model.num_draws


def test_a_ddpm_model_refuses_a_flow_schedule():
    from composer_algos.diffusion import DiffusionModel, FlowSchedule, TimeConditionedConvNet

    with pytest.raises(TypeError, match='FlowMatchingModel'):
        DiffusionModel(TimeConditionedConvNet(in_channels=1, width=8), FlowSchedule(num_cells=10))

"""The training draws outside Composer: the diffusers loops of docs/outside_composer.md run, the draws are the
models' own (DDPM and flow matching), and they resume."""

import io
import os
import re

import pytest
import torch
from composer.core import Event, State
from composer.loggers import Logger

from composer_algos.algorithms import (
    CosMapWeighting,
    LossSecondMomentSampling,
    MinSNRWeighting,
    NoiseAssignment,
    SigmaSqrtWeighting,
)
from composer_algos.algorithms.cosmap_weighting import cosmap_weight
from composer_algos.algorithms.loss_second_moment_sampling import LossSecondMomentSampler
from composer_algos.algorithms.min_snr_weighting import min_snr_weight
from composer_algos.algorithms.sigma_sqrt_weighting import sigma_sqrt_weight
from composer_algos.diffusion import (
    DiffusionModel,
    FlowMatchingModel,
    FlowSchedule,
    NoiseSchedule,
    TimeConditionedConvNet,
)
from composer_algos.diffusion.training_draws import TrainingDraws

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_docs_block(index: int) -> dict:
    """Run the ``index``-th python block of docs/outside_composer.md; return its variables."""
    with open(os.path.join(ROOT, 'docs', 'outside_composer.md')) as f:
        code = re.findall(r'```python\n(.*?)```', f.read(), re.S)[index]
    scope: dict = {}
    exec(compile(code, 'outside_composer.md', 'exec'), scope)
    return scope


def test_the_docs_diffusers_loop_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = run_docs_block(0)
    draws, record = scope['draws'], scope['record']
    assert draws.num_draws == 4 and int(draws.sampler.counts.sum()) == 64  # every loss reached the sampler
    assert record.noise_pairing is not None and record.noise.shape == (16, 1, 8, 8)
    assert torch.isfinite(scope['loss'])
    assert os.path.isfile(tmp_path / 'checkpoint.pt')


def test_draws_are_keyed_and_resume_from_their_state():
    from composer_algos.algorithms.min_snr_weighting import min_snr_weight

    schedule = NoiseSchedule('linear', 100)
    x0 = torch.zeros(8, 1, 4, 4)
    full = TrainingDraws(schedule, weightings=[min_snr_weight], seed=3)
    records = [full.draw(x0) for _ in range(3)]
    resumed = TrainingDraws(schedule, weightings=[min_snr_weight], seed=3)
    resumed.load_state_dict(TrainingDraws(schedule, seed=3).state_dict() | {'num_draws': 2})
    again = resumed.draw(x0)
    assert torch.equal(again.t, records[2].t) and torch.equal(again.noise, records[2].noise)
    weights = min_snr_weight(schedule, records[0].t, 'epsilon')
    torch.testing.assert_close(full.loss_weights(records[0]), weights.float())


def test_a_loss_history_resumes_and_a_fixed_distribution_has_none_to_save():
    import pytest

    from composer_algos.algorithms.adaptive_timestep_sampling.policy import FrozenSampler
    from composer_algos.algorithms.loss_second_moment_sampling import LossSecondMomentSampler

    schedule = NoiseSchedule('squaredcos_cap_v2', 10)
    x0 = torch.zeros(16, 1, 2, 2)
    learner = TrainingDraws(schedule, sampler=LossSecondMomentSampler(10, history=2), seed=1)
    for _ in range(3):
        record = learner.draw(x0)
        learner.update(record, record.t.float() + 1.0)
    resumed = TrainingDraws(schedule, sampler=LossSecondMomentSampler(10, history=2), seed=1)
    resumed.load_state_dict(learner.state_dict())
    assert torch.equal(resumed.sampler.losses, learner.sampler.losses)
    assert torch.equal(resumed.draw(x0).t, learner.draw(x0).t)

    frozen = TrainingDraws(schedule, sampler=FrozenSampler(torch.linspace(1.0, 2.0, 10) / 15.0), seed=1)
    frozen.draw(x0)
    assert frozen.state_dict() == {'num_draws': 1}
    with pytest.raises(ValueError, match='keeps none'):
        frozen.load_state_dict(learner.state_dict())


def test_the_docs_flow_matching_loop_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = run_docs_block(1)
    draws, record, schedule = scope['draws'], scope['record'], scope['schedule']
    assert isinstance(schedule, FlowSchedule) and draws.prediction_type == 'velocity' and draws.num_draws == 4
    assert record.sigma is not None and torch.equal(record.t, schedule.cells(record.sigma))
    assert torch.isfinite(scope['loss'])
    assert os.path.isfile(tmp_path / 'flow_checkpoint.pt')


# ------------------------------------------------------------------------------------------ the models' own draws
def install(model, *algorithms) -> None:
    """Install ``algorithms`` on ``model`` as a Trainer does at ``Event.INIT``."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = State(
        model=model,
        rank_zero_seed=0,
        run_name='outside',
        device='cpu',
        optimizers=optimizer,
        max_duration='10ba',
        dataloader=[None],
        dataloader_label='train',
    )
    for algorithm in algorithms:
        algorithm.apply(Event.INIT, state, Logger(state))


def warm_history(num_timesteps: int, history: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A full, uneven loss history: the loss-second-moment sampler draws away from uniform, with importance weights."""
    losses = torch.rand(num_timesteps, history, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return losses + torch.linspace(0.1, 3.0, num_timesteps, dtype=torch.float64)[:, None], torch.full(
        (num_timesteps,), history, dtype=torch.long
    )


@pytest.mark.parametrize('objective', ['ddpm', 'flow_matching'])
@pytest.mark.parametrize('learner', [False, True], ids=['default_sampler', 'loss_second_moment'])
def test_the_draws_are_the_models_own(objective, learner):
    """For the same seed, batches and draw indices, TrainingDraws gives bit for bit what the model's training forward
    publishes: t (and flow matching's sigma), the noise, the sampler's distribution, importance weights and loss
    weights; the default sampler, or the loss-second-moment one (importance weights towards the objective's own
    distribution, its proposal reading the weights at the model's grid points) with a noise assignment."""
    torch.manual_seed(0)
    net = TimeConditionedConvNet(in_channels=1, width=8)
    if objective == 'ddpm':
        schedule = NoiseSchedule('linear', 50)
        model = DiffusionModel(net, schedule, seed=11)
        algorithms, weightings = [MinSNRWeighting(gamma=5.0)], [min_snr_weight]
    else:
        schedule = FlowSchedule(shift=3.0, num_cells=50)
        model = FlowMatchingModel(net, schedule, seed=11)
        algorithms, weightings = [SigmaSqrtWeighting(), CosMapWeighting()], [sigma_sqrt_weight, cosmap_weight]
    sampler, coupling = None, None
    if learner:
        algorithms += [LossSecondMomentSampling(history=2), NoiseAssignment()]
        sampler, coupling = LossSecondMomentSampler(50, history=2), NoiseAssignment()
    install(model, *algorithms)
    draws = TrainingDraws(schedule, sampler=sampler, weightings=weightings, noise_coupling=coupling, seed=11)
    assert draws.prediction_type == model.prediction_type
    assert type(draws.sampler) is type(model.timestep_sampler)
    if learner:
        assert torch.equal(draws.sampler.loss_weights, model.timestep_sampler.loss_weights)
        for learning in (draws.sampler, model.timestep_sampler):
            learning.load(*warm_history(50, 2))
    batches = torch.randn(3, 8, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    for index, x0 in enumerate(batches):
        published = model({'image': x0})['draw']
        record = draws.draw(x0)
        assert model.num_draws == draws.num_draws == index + 1
        assert torch.equal(record.t, published.t) and torch.equal(record.noise, published.noise)
        assert (record.sigma is None) == (objective == 'ddpm')
        if record.sigma is not None:
            assert torch.equal(record.sigma, published.sigma)
        assert torch.equal(record.probs, published.probs)
        assert torch.equal(record.importance_weight, published.importance_weight)
        assert torch.equal(draws.loss_weights(record), published.loss_weight)
        assert torch.equal(record.loss_weight, published.loss_weight)
        if learner:
            assert bool((record.importance_weight != 1).any())
            assert torch.equal(record.noise_pairing.source, published.noise_pairing.source)


def test_the_prediction_type_is_the_objectives():
    assert TrainingDraws(NoiseSchedule('linear', 100)).prediction_type == 'epsilon'
    assert TrainingDraws(FlowSchedule(num_cells=10)).prediction_type == 'velocity'
    assert TrainingDraws(NoiseSchedule('linear', 100), prediction_type='v_prediction').prediction_type == 'v_prediction'
    with pytest.raises(ValueError, match=r"one of \('velocity',\), got 'epsilon'"):
        TrainingDraws(FlowSchedule(num_cells=10), prediction_type='epsilon')
    with pytest.raises(ValueError, match=r"one of \('epsilon', 'v_prediction', 'sample'\), got 'velocity'"):
        TrainingDraws(NoiseSchedule('linear', 100), prediction_type='velocity')
    with pytest.raises(TypeError, match=r'NoiseSchedule \(DDPM\) or a FlowSchedule'):
        TrainingDraws('linear')


def test_a_flow_matching_loop_trains_on_the_velocity_and_resumes_to_the_same_draws():
    schedule = FlowSchedule(shift=2.0, num_cells=8)

    def new_draws() -> TrainingDraws:
        return TrainingDraws(
            schedule, sampler=LossSecondMomentSampler(8, history=1), weightings=[sigma_sqrt_weight], seed=4
        )

    torch.manual_seed(0)
    net = TimeConditionedConvNet(in_channels=1, width=8)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    batches = torch.rand(6, 8, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    draws, records, losses, saved = new_draws(), [], [], b''
    for step, x0 in enumerate(batches):
        if step == 3:
            buffer = io.BytesIO()
            torch.save({'draws': draws.state_dict()}, buffer)
            saved = buffer.getvalue()
        record = draws.draw(x0)
        assert record.sigma is not None and torch.equal(record.t, schedule.cells(record.sigma))
        x_sigma = schedule.add_noise(x0, record.noise, record.sigma)  # (1 - sigma) x0 + sigma eps
        prediction = net(x_sigma, schedule.timesteps(record.sigma))
        per_sample = (prediction - schedule.target(x0, record.noise)).pow(2).mean(dim=(1, 2, 3))  # eps - x0
        loss = (draws.loss_weights(record) * per_sample).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        draws.update(record, per_sample.detach())
        assert torch.isfinite(loss)
        records.append(record)
        losses.append(per_sample.detach())
    assert draws.sampler.warm() and bool((records[-1].importance_weight != 1).any())
    resumed = new_draws()
    resumed.load_state_dict(torch.load(io.BytesIO(saved))['draws'])
    for step in range(3, 6):
        record = resumed.draw(batches[step])
        for name in ('t', 'sigma', 'noise', 'importance_weight', 'loss_weight'):
            assert torch.equal(getattr(record, name), getattr(records[step], name)), name
        resumed.update(record, losses[step])
    assert torch.equal(resumed.sampler.losses, draws.sampler.losses)

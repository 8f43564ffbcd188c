"""The training draws outside Composer: the diffusers loop of docs/outside_composer.md runs, and draws resume."""

import os
import re

import torch

from composer_algos.diffusion import NoiseSchedule
from composer_algos.diffusion.training_draws import TrainingDraws

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_docs_diffusers_loop_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open(os.path.join(ROOT, 'docs', 'outside_composer.md')) as f:
        code = re.search(r'```python\n(.*?)```', f.read(), re.S).group(1)
    scope: dict = {}
    exec(compile(code, 'outside_composer.md', 'exec'), scope)
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

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

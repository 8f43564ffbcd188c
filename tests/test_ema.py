import pytest
import torch
from conftest import LossRecorder, make_trainer, tiny_model

from composer_algos.algorithms.ema import WarmupEMA, warmup_smoothing


def test_warmup_smoothing_closed_form():
    assert warmup_smoothing(0.999, 0) == pytest.approx(0.1)
    assert warmup_smoothing(0.999, 10) == pytest.approx(11 / 20)
    assert warmup_smoothing(0.99, 10_000) == 0.99


def _ema_weights(trainer):
    ema = next(a for a in trainer.state.algorithms if isinstance(a, WarmupEMA))
    return ema, {k: v.clone() for k, v in ema.ema_model.named_parameters_dict.items()}


def test_warmup_ema_tracks_the_weights_and_resumes_exactly(digits_mds, tmp_path):
    rec = LossRecorder()
    full = make_trainer(
        digits_mds,
        algorithms=[WarmupEMA(half_life='100ba')],
        max_duration='6ba',
        callbacks=[rec],
        save_folder=str(tmp_path / 'a'),
        save_interval='3ba',
    )
    full.fit()
    ema, full_weights = _ema_weights(full)
    assert ema.num_updates == 6
    # The last update used the warm-up value, far below the half-life's 0.993.
    assert ema.smoothing == pytest.approx(warmup_smoothing(ema.target_smoothing, 5))
    assert repr(ema).startswith('WarmupEMA(half_life=')

    rec2 = LossRecorder()
    resumed = make_trainer(
        digits_mds,
        algorithms=[WarmupEMA(half_life='100ba')],
        max_duration='6ba',
        callbacks=[rec2],
        model=tiny_model(seed=5),
        load_path=str(tmp_path / 'a' / 'ep0-ba3-rank0.pt'),
        save_folder=str(tmp_path / 'b'),
        save_interval='3ba',
    )
    resumed.fit()
    ema2, resumed_weights = _ema_weights(resumed)
    assert rec2.losses == rec.losses[3:]
    assert ema2.num_updates == 6
    for name, value in full_weights.items():
        assert torch.equal(value, resumed_weights[name]), name

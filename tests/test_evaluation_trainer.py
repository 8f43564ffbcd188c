"""Evaluation callbacks inside a real Composer Trainer on the digits shards, and recipes/evaluate.py."""

from __future__ import annotations

import importlib.util
import json
import math
import os

import numpy as np
import pytest
import torch
import yaml
from composer.algorithms import EMA
from composer.loggers import InMemoryLogger
from conftest import digits_loader, make_trainer, tiny_model
from PIL import Image

from composer_algos import registry
from composer_algos.callbacks import FID, BitsPerDim, LossBands, SampleGrid, TimestepHeatmap
from composer_algos.callbacks.summary import run_summary
from composer_algos.evaluation import ema_weights, load_checkpoint_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='session')
def classifier_cache(tmp_path_factory) -> str:
    # Shared with test_evaluation.py (same session folder): the classifier is trained once per session.
    path = tmp_path_factory.getbasetemp() / 'digit_classifier_cache'
    path.mkdir(exist_ok=True)
    return str(path)


def _logged(logger: InMemoryLogger, key: str) -> list[tuple[int, float]]:
    return [(int(ts.batch), float(value)) for ts, value in logger.data.get(key, [])]


def test_callbacks_are_registered_by_name():
    for name, cls in [
        ('fid', FID),
        ('bits_per_dim', BitsPerDim),
        ('loss_bands', LossBands),
        ('sample_grid', SampleGrid),
        ('timestep_heatmap', TimestepHeatmap),
    ]:
        assert registry.resolve(registry.callbacks, name, 'callback') is cls


def test_evaluation_callbacks_in_trainer_fit(digits_mds, classifier_cache, tmp_path):
    folder = str(tmp_path / '{run_name}')
    fid = FID(num_samples=48, num_steps=4, batch_size=32, classifier_cache_dir=classifier_cache, folder=folder)
    bpd = BitsPerDim(num_images=16, num_terms=6)
    grid = SampleGrid(num_samples=16, num_steps=4, scale=2, folder=folder)
    heatmap = TimestepHeatmap(interval='2ba', folder=folder)
    memory = InMemoryLogger()
    trainer = make_trainer(
        digits_mds,
        algorithms=[EMA(half_life='2ba')],
        max_duration='6ba',
        callbacks=[fid, bpd, LossBands(), grid, heatmap],
        loggers=[memory],
        eval_dataloader=digits_loader(digits_mds, 64, split='val', shuffle=False),
        eval_interval='3ba',
    )
    trainer.fit()

    fids = _logged(memory, 'FID')
    assert [step for step, _ in fids] == [3, 6] and all(math.isfinite(v) and v > 0 for _, v in fids)
    assert fid.steps == [3, 6] and fid.values == [v for _, v in fids]
    floor = _logged(memory, 'FID_real_vs_real')
    assert len(floor) == 1 and 0 < floor[0][1] < max(v for _, v in fids)
    accuracy = _logged(memory, 'FID_classifier_val_accuracy')
    assert len(accuracy) == 1 and accuracy[0][1] >= 0.95
    bits = _logged(memory, 'bits_per_dim')
    assert [step for step, _ in bits] == [3, 6] and all(math.isfinite(v) and v > 0 for _, v in bits)
    bands = [k for k in memory.data if k.startswith('metrics/eval/DiffusionLossBands/')]
    assert sorted(bands)[0].endswith('/t00-09') and len(bands) == 10
    assert all(len(_logged(memory, k)) == 2 for k in bands)

    run_folder = folder.format(run_name=trainer.state.run_name)
    for step in (3, 6):
        with Image.open(os.path.join(run_folder, f'samples_ba{step:07d}.png')) as image:
            assert image.size == (4 * 16 + 5 * 2, 4 * 16 + 5 * 2)
    assert os.path.isfile(os.path.join(run_folder, 'fid.png'))
    with np.load(os.path.join(run_folder, 'timestep_heatmap.npz')) as record:
        assert list(record['steps']) == [2, 4, 6] and record['probs'].shape == (3, 100)
        assert np.allclose(record['probs'].sum(1), 1.0, atol=1e-5)
    with Image.open(os.path.join(run_folder, 'timestep_heatmap.png')) as image:
        assert image.size == (700, 450)
    # The end-of-run summary: the last and best FID against the floor, and where the pictures are.
    summary = run_summary(trainer)
    assert summary[0] == f'Run {trainer.state.run_name!r} finished at step 6.'
    assert (
        summary[1].startswith(f'FID {fids[-1][1]:.2f} at step 6 (best ')
        and f'floor at these sample sizes {floor[0][1]:.2f}' in summary[1]
    )
    assert any(line == f'Bits/dim {bits[-1][1]:.3f} at step 6.' for line in summary)
    assert f'samples: {os.path.join(run_folder, "samples_ba0000006.png")}' in summary  # outside the working dir: whole
    assert any(line.startswith('timestep distribution: ') and line.endswith('timestep_heatmap.png') for line in summary)

    # The callbacks sample from the EMA weights: swapped in for the block, swapped back after.
    model = trainer.state.model
    live = [p.detach().clone() for p in model.parameters()]
    with ema_weights(trainer.state) as active:
        averaged = [p.detach().clone() for p in model.parameters()]
    assert active and any(not torch.equal(a, b) for a, b in zip(live, averaged))
    assert all(torch.equal(a, p) for a, p in zip(live, model.parameters()))


def test_fid_on_an_interval_with_a_configured_real_loader(digits_mds, classifier_cache, tmp_path):
    real_loader = {
        'local': digits_mds,
        'split': 'val',
        'global_batch_size': 32,
        'shuffle': False,
        'channels': 1,
        'image_size': 8,
    }
    fid = FID(
        num_samples=16,
        num_steps=2,
        interval='2ba',
        real_loader=real_loader,
        max_real_samples=64,
        classifier_cache_dir=classifier_cache,
        folder=str(tmp_path),
    )
    memory = InMemoryLogger()
    make_trainer(digits_mds, max_duration='4ba', callbacks=[fid], loggers=[memory]).fit()
    assert [step for step, _ in _logged(memory, 'FID')] == [2, 4]
    assert fid.state_dict()['steps'] == [2, 4]

    with pytest.raises(ValueError, match='eval_dataloader'):
        make_trainer(digits_mds, max_duration='1ba', callbacks=[FID(num_samples=4)]).fit()


def _load_evaluate_script():
    spec = importlib.util.spec_from_file_location('evaluate_script', os.path.join(ROOT, 'recipes', 'evaluate.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_checkpoint_weights_and_evaluate_script(digits_mds, classifier_cache, tmp_path):
    save = str(tmp_path / 'ckpt')
    trainer = make_trainer(
        digits_mds,
        algorithms=[EMA(half_life='2ba')],
        max_duration='4ba',
        save_folder=save,
        save_interval='2ba',
        save_filename='ba{batch}.pt',
        model=tiny_model(num_timesteps=100),
    )
    trainer.fit()
    ema = trainer.state.algorithms[0]
    # After the final checkpoint Composer leaves the EMA weights in the model and the training weights in EMA.
    assert ema.ema_weights_active
    averaged = {k: v.clone() for k, v in trainer.state.model.state_dict().items() if k != '_extra_state'}
    live = ema.ema_model.named_parameters_dict

    model = tiny_model(num_timesteps=100, seed=99)
    assert load_checkpoint_weights(model, f'{save}/ba4.pt', 'ema') == {'weights': 'ema', 'step': 4}
    assert all(torch.equal(model.state_dict()[k], v) for k, v in averaged.items())
    load_checkpoint_weights(model, f'{save}/ba4.pt', 'live')
    assert all(torch.equal(model.state_dict()[k], v) for k, v in live.items())

    recipe = {
        'max_duration': '4ba',
        'device': 'cpu',
        'precision': 'fp32',
        'model': {'denoiser': {'name': 'conv', 'width': 16}, 'noise_schedule': {'num_timesteps': 100}},
        'train_loader': {
            'local': digits_mds,
            'split': 'train',
            'global_batch_size': 32,
            'channels': 1,
            'image_size': 8,
        },
        'eval_loader': {
            'local': digits_mds,
            'split': 'val',
            'global_batch_size': 64,
            'shuffle': False,
            'drop_last': False,
            'channels': 1,
            'image_size': 8,
        },
    }
    config = tmp_path / 'recipe.yaml'
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / 'eval'
    script = _load_evaluate_script()
    code = script.main(
        [
            f'{save}/ba4.pt',
            '--config',
            str(config),
            '--out',
            str(out),
            '--compare',
            f'{save}/ba4.pt',
            'num_samples=40',
            'num_steps=3',
            'bpd_images=8',
            'bpd_terms=5',
            'grid_samples=16',
            'consistency_samples=8',
            f'classifier_cache_dir={classifier_cache}',
            'device=cpu',
        ]
    )
    assert code == 0
    results = json.loads((out / 'evaluation.json').read_text())
    assert results['step'] == 4 and results['weights'] == 'ema' and results['num_real'] == 360
    assert math.isfinite(results['FID']) and results['FID'] > 0 and results['FID_real_vs_real'] > 0
    assert math.isfinite(results['bits_per_dim']) and results['bits_per_dim'] > 0
    assert results['feature_classifier_val_accuracy'] >= 0.95
    assert results['consistency']['pixels']['nn_fraction'] == 1.0
    assert results['consistency']['features']['pair_distance'] == 0.0
    assert os.path.isfile(out / 'samples.png') and os.path.isfile(out / 'consistency.png')
    assert script.main([f'{save}/ba4.pt', 'num_samples=4']) == 2  # no --config: a clear error, not a crash

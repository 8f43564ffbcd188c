"""Every digits recipe in yamls/ builds from YAML and trains a few steps (tiny model, shrunk callbacks)."""

import glob
import os

import pytest
import torch

from composer_algos.config import build_trainer, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DIGITS_RECIPES = sorted(glob.glob(os.path.join(ROOT, 'yamls', 'digits', '*.yaml')))


def test_there_is_a_recipe_per_method():
    names = {os.path.basename(p)[:-5] for p in DIGITS_RECIPES}
    assert {'uniform', 'adaptive', 'clts', 'md', 'clts_md', 'adaptive_clts_md', 'loss_second_moment_sampling',
            'min_snr_weighting', 'p2_weighting', 'speed', 'logit_normal_sampling', 'log_normal_sampling'} <= names


@pytest.mark.parametrize('recipe', DIGITS_RECIPES, ids=lambda p: os.path.basename(p))
def test_recipe_trains(recipe, digits_mds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe, [f'train_loader.local={digits_mds}', f'eval_loader.local={digits_mds}',
                               'max_duration=3ba', 'eval_interval=3ba', 'progress_bar=false', 'save_folder=null',
                               'train_loader.global_batch_size=16'])
    cfg['model']['denoiser'] = {'name': 'conv', 'width': 16}
    cfg['model']['noise_schedule'] = {'num_timesteps': 100}
    cfg['callbacks'] = {'sample_grid': {'num_samples': 4, 'num_steps': 2}}
    trainer = build_trainer(cfg)
    names = {type(a).__name__ for a in trainer.state.algorithms}
    assert 'WarmupEMA' in names and len(names) == len(cfg['algorithms'])
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    assert torch.isfinite(trainer.state.loss)

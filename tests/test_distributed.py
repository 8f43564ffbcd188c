"""Real multi-process runs: ``composer -n 2`` with DDP and with FSDP2 on CPU (gloo).

Each case trains 8 steps saving at step 4, then resumes from step 4 on 2 ranks in a new process group; the
resumed losses and every algorithm's final state must equal the uninterrupted run's, rank by rank.
"""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from two_ranks import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, 'tests', 'distributed_run.py')

# Algorithm sets that compose, each run under both strategies.
ALGORITHM_SETS = {
    'adaptive_clts_md_ema': {
        'ema': {'half_life': '2ba'},
        # The default setting's trust region and uniform mix, with running reward moments and importance weights:
        # every rank must take the same decisions from global sums.
        'adaptive_timestep_sampling': {
            'update_every': 3,
            'num_probe_timesteps': 7,
            'normalize': 'running',
            'importance_weighted': True,
        },
        'curriculum_timestep_schedule': {'ramp_end': '6ba', 'ramp_start': '0ba'},
        'momentum_decay': {'beta_end': 0.5, 'compensate_lr': True},
    },
    'loss_second_moment_min_snr_p2': {
        'loss_second_moment_sampling': {'history': 1},
        'min_snr_weighting': {'gamma': 5.0},
        'p2_weighting': {},
    },
}


def _recipe(tmp_path, digits_mds: str, algorithms: dict, fsdp: bool) -> str:
    recipe = {
        'max_duration': '8ba',
        'device': 'cpu',
        'precision': 'fp32',
        'seed': 5,
        'model': {'denoiser': {'name': 'conv', 'width': 16}, 'noise_schedule': {'num_timesteps': 100}},
        'train_loader': {
            'local': digits_mds,
            'split': 'train',
            'global_batch_size': 16,
            'channels': 1,
            'image_size': 8,
        },
        'eval_loader': {
            'local': digits_mds,
            'split': 'val',
            'global_batch_size': 64,
            'channels': 1,
            'image_size': 8,
            'shuffle': False,
        },
        'eval_interval': '4ba',
        'optimizer': {'name': 'adam', 'lr': 1e-3},
        'algorithms': algorithms,
        'save_folder': str(tmp_path / 'ckpt'),
        'save_interval': '4ba',
        'save_overwrite': True,
        'progress_bar': False,
        # Its record grows during training: it must load from a sharded checkpoint all the same.
        'callbacks': {'timestep_heatmap': {'interval': '2ba', 'folder': str(tmp_path / 'pictures')}},
    }
    if fsdp:
        recipe['parallelism_config'] = {'fsdp': {'state_dict_type': 'sharded'}}
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _launch(recipe: str, out_dir: str, fsdp: bool, *overrides: str) -> list[dict]:
    env = dict(os.environ, FSDP_VERSION='2') if fsdp else None
    run_ranks(RUNNER, recipe, out_dir, *overrides, timeout=600, env=env)
    return [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=False) for r in range(2)]


def _assert_same_state(a, b, where: str) -> None:
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            if key == 'repr' and ' object at 0x' in str(a[key]):
                continue  # Composer's own algorithms (EMA) keep a memory address in their repr.
            _assert_same_state(a[key], b[key], f'{where}.{key}')
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f'{where}[{i}]')
    else:
        assert a == b, f'{where}: {a!r} != {b!r}'


@pytest.mark.parametrize('strategy', ['ddp', 'fsdp2'])
@pytest.mark.parametrize('name', sorted(ALGORITHM_SETS))
def test_two_rank_resume_is_exact(tmp_path, digits_mds, name, strategy):
    fsdp = strategy == 'fsdp2'
    recipe = _recipe(tmp_path, digits_mds, ALGORITHM_SETS[name], fsdp)
    full = _launch(recipe, str(tmp_path / 'full'), fsdp)
    ckpt = tmp_path / 'ckpt' / ('ep0-ba4' if fsdp else 'ep0-ba4-rank0.pt')
    # The resumed run saves too: Composer's EMA swaps its weights in at every checkpoint, so both runs must end the
    # same way for their final algorithm states to be comparable.
    resumed = _launch(
        recipe, str(tmp_path / 'resumed'), fsdp, f'load_path={ckpt}', f'save_folder={tmp_path / "ckpt_resumed"}'
    )

    assert [r['world_size'] for r in full] == [2, 2]
    assert len(full[0]['losses']) == 8
    # Ranks see different data and draw different timesteps.
    assert full[0]['losses'] != full[1]['losses']
    adaptive = [r['algorithms'].get('AdaptiveTimestepSampling') for r in full]
    if adaptive[0] is not None:
        # Every rank holds the same policy, queue and S; the probe ran (3 updates in 8 steps).
        for key in ('policy', 'queue_x', 'selected', 'num_updates', 'reward_moments'):
            _assert_same_state(adaptive[0][key], adaptive[1][key], f'ranks differ in {key}')
        assert adaptive[0]['num_updates'] == 3 and adaptive[0]['queue_x'].shape == (3, 7)
    lsm = [r['algorithms'].get('LossSecondMomentSampling') for r in full]
    if lsm[0] is not None:
        # Losses are all-gathered: both ranks hold the same history, filled from both ranks' batches.
        _assert_same_state(lsm[0], lsm[1], 'ranks differ in the loss history')
        assert int(lsm[0]['counts'].sum()) == 8 * 16
    for rank in range(2):
        assert resumed[rank]['losses'] == full[rank]['losses'][4:], f'rank {rank}'
        _assert_same_state(full[rank]['algorithms'], resumed[rank]['algorithms'], f'rank{rank}')
        heatmap = full[rank]['callbacks']['TimestepHeatmap']
        assert heatmap['steps'] == [2, 4, 6, 8]
        _assert_same_state(heatmap, resumed[rank]['callbacks']['TimestepHeatmap'], f'rank{rank} heatmap')

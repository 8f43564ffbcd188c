"""Faults, for real: kill -9 mid-run and resume, a rank that dies, unreadable checkpoints, NaN and inf.

* A single-process run and one rank of a ``FSDP_VERSION=2 composer -n 2`` run are killed with SIGKILL in the middle
  of a training step (after a checkpoint was written); relaunched with ``autoresume: true`` they end with the same
  weights and algorithm states as an uninterrupted run (adaptive sampling + curriculum + momentum decay + EMA).
* When one rank dies the other is ended within a bounded time (Composer's launcher); the test measures it.
* Checkpoints truncated, bit-flipped or half-written (a crash while saving): autoresume resumes from the newest
  readable one and the result equals an uninterrupted run's; the sharded (FSDP2) checkpoints of the two-rank run are
  verified the same way.
* NaN and inf in a batch, in the loss, in a loss weighting and in the adaptive sampler's reward: a clear error (or, for
  the reward, a logged skip), and the last checkpoint saved before still loads and trains on.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import yaml

from composer_algos import checkpoint_integrity
from composer_algos.config import build_model, build_trainer, load_config

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fault_run  # noqa: E402
from test_distributed import _assert_same_state  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNNER = os.path.join(ROOT, 'tests', 'fault_run.py')
COMPOSER = os.path.join(os.path.dirname(sys.executable), 'composer')
TRAIN_SCRIPT = os.path.join(ROOT, 'recipes', 'train.py')

_spec = importlib.util.spec_from_file_location('train_script', TRAIN_SCRIPT)
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)

ALGORITHMS = {
    'adaptive_timestep_sampling': {'update_every': 3, 'num_probe_timesteps': 7},
    'curriculum_timestep_schedule': {'ramp_start': '0ba', 'ramp_end': '8ba'},
    'momentum_decay': {'beta_end': 0.5, 'compensate_lr': True, 'start': '0ba', 'end': '12ba'},
    'ema': {'half_life': '2ba'},
}
# The launcher's grace for the survivors after a rank died (Composer's CLEANUP_TIMEOUT, then SIGKILL), plus margin
# for a machine shared with other jobs.
DEAD_RANK_BOUND_SECONDS = 45.0


def _recipe(tmp_path, digits_mds: str, name: str = 'recipe.yaml', **changes) -> str:
    recipe = {
        'run_name': 'faults',
        'seed': 5,
        'max_duration': '12ba',
        'device': 'cpu',
        'precision': 'fp32',
        'model': {'denoiser': {'name': 'conv', 'width': 16}, 'noise_schedule': {'num_timesteps': 100}},
        'train_loader': {
            'local': digits_mds,
            'split': 'train',
            'global_batch_size': 16,
            'channels': 1,
            'image_size': 8,
        },
        'optimizer': {'name': 'adam', 'lr': 1e-3},
        'algorithms': ALGORITHMS,
        'save_folder': str(tmp_path / 'ckpt'),
        'save_interval': '4ba',
        'autoresume': True,
        'progress_bar': False,
    }
    recipe.update(changes)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _wait_for(path: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            output = proc.communicate()[0] or ''
            raise AssertionError(f'the run ended (code {proc.returncode}) before it reached the stop: {output[-3000:]}')
        assert time.monotonic() < deadline, f'{path} did not appear'
        time.sleep(0.1)
    time.sleep(0.2)  # the process id is written


def _assert_same_run(resumed: dict, full: dict, where: str) -> None:
    assert resumed['batch'] == full['batch'] == 12, where
    _assert_same_state(full['model'], resumed['model'], f'{where} weights')
    _assert_same_state(full['algorithms'], resumed['algorithms'], f'{where} algorithms')
    assert resumed['losses'] == full['losses'][resumed['start'] :], where


# ------------------------------------------------------------------------------------------------ kill -9
def test_kill_9_single_process_then_autoresume_is_exact(tmp_path, digits_mds):
    recipe = _recipe(tmp_path, digits_mds)
    out = tmp_path / 'killed'
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS='1', STOP_RANK='0', STOP_BATCH='6')
    proc = subprocess.Popen(
        [sys.executable, RUNNER, recipe, str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        _wait_for(str(out / 'stopped-rank0'), proc)
        pid, prefix = map(int, (out / 'stopped-rank0').read_text().split())
        assert pid == proc.pid
        assert os.readlink(tmp_path / 'ckpt' / 'latest-rank0.pt') == 'ep0-ba4-rank0.pt'
        os.kill(proc.pid, signal.SIGKILL)  # mid step 6: after its backward pass, before the optimizer step
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    fault_run.release_shared_memory(prefix)
    assert proc.returncode == -signal.SIGKILL

    resumed = fault_run.run(recipe, str(tmp_path / 'resumed'), [])
    assert resumed['start'] == 4
    full = fault_run.run(recipe, str(tmp_path / 'full'), [f'save_folder={tmp_path / "ckpt_full"}'])
    assert full['start'] == 0
    _assert_same_run(resumed, full, 'single process')
    assert full['algorithms']['AdaptiveTimestepSampling']['num_updates'] == 4


def test_one_rank_killed_others_end_in_bounded_time_then_autoresume_is_exact(tmp_path, digits_mds):
    recipe = _recipe(
        tmp_path, digits_mds, save_interval='2ba', parallelism_config={'fsdp': {'state_dict_type': 'sharded'}}
    )
    killed = tmp_path / 'killed'
    killed.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS='1', FSDP_VERSION='2', STOP_RANK='1', STOP_BATCH='6')
    launcher = subprocess.Popen(
        [
            COMPOSER,
            '-n',
            '2',
            '--stdout',
            str(killed / 'rank{rank}.stdout'),
            '--stderr',
            str(killed / 'rank{rank}.stderr'),
            RUNNER,
            recipe,
            str(killed),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        _wait_for(str(killed / 'stopped-rank1'), launcher)
        pid, prefix = map(int, (killed / 'stopped-rank1').read_text().split())
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        output, _ = launcher.communicate(timeout=300)
        survivors_ended_after = time.monotonic() - killed_at
    finally:
        if launcher.poll() is None:
            launcher.kill()
    fault_run.release_shared_memory(prefix)
    how = [
        line.strip()
        for line in output.splitlines()
        if 'closed by peer' in line or 'exited with code' in line or 'crashed' in line
    ]
    print(f'one rank killed: the launcher exited {survivors_ended_after:.1f} s later; {" | ".join(how)}')
    assert launcher.returncode != 0, output[-3000:]
    assert survivors_ended_after < DEAD_RANK_BOUND_SECONDS, output[-3000:]
    assert not (killed / 'rank0.pt').exists()  # rank 0 did not go on training alone
    folder = tmp_path / 'ckpt'
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep0-ba4'

    # Relaunch with autoresume, then (in the same process group) the uninterrupted run for comparison.
    env.pop('STOP_RANK')
    logs = str(tmp_path / 'relaunch-rank{rank}.log')
    proc = subprocess.run(
        [
            COMPOSER,
            '-n',
            '2',
            '--stdout',
            logs,
            RUNNER,
            recipe,
            str(tmp_path / 'resumed'),
            '--',
            recipe,
            str(tmp_path / 'full'),
            f'save_folder={tmp_path / "ckpt_full"}',
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:] + open(logs.format(rank=1)).read()[-4000:]
    for rank in range(2):
        resumed = torch.load(tmp_path / 'resumed' / f'rank{rank}.pt', weights_only=False)
        full = torch.load(tmp_path / 'full' / f'rank{rank}.pt', weights_only=False)
        assert resumed['start'] == 4 and resumed['world_size'] == 2
        _assert_same_run(resumed, full, f'rank {rank}')

    # The sharded checkpoints this run wrote, damaged as a crash or a disk would: each is found unreadable, and
    # autoresume steps back to the newest readable one.
    assert checkpoint_integrity.verify_checkpoint(str(folder / 'ep0-ba12')) is None
    # What they hold of the model is read without loading it: every tensor's full shape, and the recipe that wrote it.
    saved = checkpoint_integrity.saved_model_state(str(folder / 'ep0-ba12'))
    with open(recipe) as f:
        model_cfg = yaml.safe_load(f)['model']
    assert saved.extra['recipe'] == {'run_name': 'faults', 'model': model_cfg}
    model = build_model(model_cfg)
    assert saved.shapes == {k: tuple(v.shape) for k, v in model.state_dict().items() if torch.is_tensor(v)}
    copy = tmp_path / 'damaged'
    shutil.copytree(folder, copy, symlinks=True)
    shard = copy / 'ep0-ba12' / '__1_0.distcp'
    with open(shard, 'r+b') as f:
        f.truncate(os.path.getsize(shard) // 2)
    assert 'truncated' in checkpoint_integrity.verify_checkpoint(str(copy / 'ep0-ba12'))
    os.remove(copy / 'ep0-ba10' / '.metadata')  # a save that did not finish
    assert '.metadata' in checkpoint_integrity.verify_checkpoint(str(copy / 'ep0-ba10'))
    chosen = checkpoint_integrity.prepare_autoresume(str(copy), 'latest-rank0.pt', ['ep{epoch}-ba{batch}'], 'faults')
    assert chosen == str((copy / 'ep0-ba8').resolve())
    assert os.readlink(copy / 'latest-rank0.pt') == 'ep0-ba8'
    assert (copy / 'ep0-ba12.unreadable').is_dir() and (copy / 'ep0-ba10.unreadable').is_dir()


# ------------------------------------------------------------------------------------------------ checkpoints
def test_autoresume_steps_over_truncated_and_half_written_checkpoints(tmp_path, digits_mds, caplog):
    recipe = _recipe(tmp_path, digits_mds, save_interval='2ba')
    fault_run.run(recipe, str(tmp_path / 'first'), ['max_duration=8ba'])
    folder = tmp_path / 'ckpt'
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep0-ba8-rank0.pt'
    # The newest checkpoint loses its end (a partial copy, a crash before the data reached the disk), and a save at
    # step 10 was cut short by a crash (Composer writes in place, and repoints latest only after a save).
    newest = folder / 'ep0-ba8-rank0.pt'
    with open(newest, 'r+b') as f:
        f.truncate(os.path.getsize(newest) - 10)
    shutil.copy(folder / 'ep0-ba6-rank0.pt', folder / 'ep0-ba10-rank0.pt')
    with open(folder / 'ep0-ba10-rank0.pt', 'r+b') as f:
        f.truncate(1000)
    with caplog.at_level(logging.WARNING, logger='composer_algos.checkpoint_integrity'):
        resumed = fault_run.run(recipe, str(tmp_path / 'resumed'), [])
    assert resumed['start'] == 6
    messages = [r.getMessage() for r in caplog.records if r.name == 'composer_algos.checkpoint_integrity']
    assert len(messages) == 2 and all('resume from' in m and 'ep0-ba6-rank0.pt' in m for m in messages)
    assert 'ep0-ba10-rank0.pt' in messages[0] and 'ep0-ba8-rank0.pt' in messages[1]
    assert (folder / 'ep0-ba8-rank0.pt.unreadable').exists() and (folder / 'ep0-ba10-rank0.pt.unreadable').exists()
    assert os.readlink(folder / 'latest-rank0.pt') == 'ep0-ba12-rank0.pt'
    full = fault_run.run(recipe, str(tmp_path / 'full'), [f'save_folder={tmp_path / "ckpt_full"}'])
    _assert_same_run(resumed, full, 'after stepping back')


def test_autoresume_folder_edge_cases(tmp_path):
    template = ['ep{epoch}-ba{batch}-rank{rank}.pt']
    folder, link = tmp_path / 'ckpt', tmp_path / 'ckpt' / 'latest-rank0.pt'
    assert (
        checkpoint_integrity.prepare_autoresume(str(folder), 'latest-rank0.pt', template, 'r') is None
    )  # no folder yet
    folder.mkdir()
    os.symlink('ep0-ba4-rank0.pt', link)  # left after the checkpoints were deleted: a fresh start
    assert checkpoint_integrity.prepare_autoresume(str(folder), 'latest-rank0.pt', template, 'r') is None
    # A crash between a finished save and the symlink update: the newer, readable checkpoint is the one to resume.
    for batch in (2, 4):
        torch.save({'batch': torch.full((3,), batch)}, folder / f'ep0-ba{batch}-rank0.pt')
    os.remove(link)
    os.symlink('ep0-ba2-rank0.pt', link)
    assert checkpoint_integrity.prepare_autoresume(str(folder), 'latest-rank0.pt', template, 'r') == str(
        (folder / 'ep0-ba4-rank0.pt').resolve()
    )
    assert os.readlink(link) == 'ep0-ba4-rank0.pt'
    # The same name found unreadable twice keeps both copies.
    for _ in range(2):
        (folder / 'ep0-ba6-rank0.pt').write_bytes(b'PK\x03\x04 cut short')
        checkpoint_integrity.prepare_autoresume(str(folder), 'latest-rank0.pt', template, 'r')
    assert {'ep0-ba6-rank0.pt.unreadable', 'ep0-ba6-rank0.pt.unreadable.1'} <= set(os.listdir(folder))
    assert not (folder / 'ep0-ba6-rank0.pt').exists() and os.readlink(link) == 'ep0-ba4-rank0.pt'


def test_a_bit_flip_is_found_although_torch_would_load_it(tmp_path, digits_mds):
    recipe = _recipe(tmp_path, digits_mds, autoresume=False)
    fault_run.run(recipe, str(tmp_path / 'run'), ['max_duration=4ba'])
    path = str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt')
    assert checkpoint_integrity.verify_checkpoint(path) is None
    fault_run.flip_tensor_byte(path)
    torch.load(path, weights_only=False)  # loads without complaint: the damage would go unnoticed
    assert 'CRC' in checkpoint_integrity.verify_checkpoint(path)


# ------------------------------------------------------------------------------------------------ NaN and inf
def _resume_and_train(recipe: str, load_path: str, overrides: list[str]) -> None:
    trainer = build_trainer(load_config(recipe, [f'load_path={load_path}', 'autoresume=false', *overrides]))
    start = int(trainer.state.timestamp.batch)
    trainer.fit()
    assert start > 0 and int(trainer.state.timestamp.batch) > start
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    trainer.close()


def test_nan_loss_stops_with_one_line_and_the_adaptive_reward_is_skipped(tmp_path, digits_mds, capsys, caplog):
    # From step 7 on the learning rate is infinite (Composer's scheduler sets step 7's rate at the end of step 6, at
    # timestamp 5): the update of step 7 destroys the weights. The adaptive sampler's probe after that step sees NaN
    # rewards and skips its update; step 8's loss is NaN and stops the run before anything else is saved.
    recipe = _recipe(
        tmp_path,
        digits_mds,
        autoresume=False,
        save_interval='2ba',
        algorithms={'adaptive_timestep_sampling': {'update_every': 1, 'num_probe_timesteps': 7}},
        scheduler={'name': 'multistep', 'milestones': ['5ba'], 'gamma': float('inf')},
    )
    capsys.readouterr()
    with caplog.at_level(logging.WARNING):
        code = train_script.main([recipe])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 1 and len(errors) == 1 and 'Traceback' not in err, err
    assert 'The diffusion loss is nan' in errors[0] and 'the weights hold NaN or inf' in errors[0], errors[0]
    skipped = [r.getMessage() for r in caplog.records if 'update was skipped' in r.getMessage()]
    assert len(skipped) == 1, skipped
    assert sorted(os.listdir(tmp_path / 'ckpt')) == [
        'ep0-ba2-rank0.pt',
        'ep0-ba4-rank0.pt',
        'ep0-ba6-rank0.pt',
        'latest-rank0.pt',
    ]
    # The last checkpoint, saved before the blow-up, still loads: finite weights, at step 6 (its optimizer holds the
    # infinite rate the scheduler had set for step 7). The one before trains on.
    trainer = build_trainer(load_config(recipe, [f'load_path={tmp_path}/ckpt/ep0-ba6-rank0.pt']))
    assert int(trainer.state.timestamp.batch) == 6
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    trainer.close()
    _resume_and_train(
        recipe,
        str(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt'),
        ['scheduler=null', 'max_duration=8ba', f'save_folder={tmp_path / "ckpt2"}'],
    )


def test_nan_loss_weighting_is_named(tmp_path, digits_mds):
    recipe = _recipe(tmp_path, digits_mds, autoresume=False, save_interval='2ba', algorithms={})
    trainer = build_trainer(load_config(recipe))

    def blows_up_at_step_3(schedule, t, prediction_type):
        weight = torch.ones(t.shape[0])
        return weight * float('inf') if int(trainer.state.timestamp.batch) >= 2 else weight

    trainer.state.model.add_loss_weighting(blows_up_at_step_3, owner='UserWeighting')
    with pytest.raises(FloatingPointError, match=r'the loss weighting of UserWeighting is NaN or inf at t=\['):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    trainer.close()
    _resume_and_train(
        recipe, str(tmp_path / 'ckpt' / 'ep0-ba2-rank0.pt'), ['max_duration=4ba', f'save_folder={tmp_path / "ckpt2"}']
    )


def test_nan_in_a_batch_names_the_shard_and_sample(tmp_path, capsys):
    from streaming import MDSWriter

    from composer_algos.data.latents import LATENT_COLUMNS

    rng = np.random.default_rng(0)
    data = tmp_path / 'latents'
    bad_sample = 3 * 16 + 5  # in step 4 (no shuffling, batches of 16)
    for split, count in (('train', 128), ('val', 32)):
        with MDSWriter(out=str(data / split), columns=LATENT_COLUMNS, size_limit=4000) as writer:
            for i in range(count):
                latent = rng.standard_normal((4, 8, 8)).astype(np.float16)
                if split == 'train' and i == bad_sample:
                    latent[2, 3, 4] = np.nan
                writer.write({'latents': latent, 'label': i % 10})
    recipe = _recipe(
        tmp_path,
        str(data),
        autoresume=False,
        save_interval='2ba',
        algorithms={},
        model={
            'denoiser': {'name': 'conv', 'in_channels': 4, 'width': 16},
            'noise_schedule': {'num_timesteps': 100},
            'encoder': {'name': 'vae', 'precomputed': True},
        },
    )
    train_loader = {'local': str(data), 'split': 'train', 'global_batch_size': 16, 'latents': True, 'shuffle': False}
    with open(recipe) as f:
        cfg = yaml.safe_load(f)
    cfg['train_loader'] = train_loader
    with open(recipe, 'w') as f:
        yaml.safe_dump(cfg, f)
    capsys.readouterr()
    assert train_script.main([recipe]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert len(errors) == 1 and 'Traceback' not in err, err
    index = json.loads((data / 'train' / 'index.json').read_text())
    offsets = np.cumsum([0] + [s['samples'] for s in index['shards']])
    shard = index['shards'][int(np.searchsorted(offsets, bad_sample, side='right')) - 1]['raw_data']['basename']
    assert f'samples [{bad_sample}]' in errors[0] and str(data / 'train' / shard) in errors[0], errors[0]
    assert 'NaN or inf' in errors[0]
    assert sorted(os.listdir(tmp_path / 'ckpt')) == ['ep0-ba2-rank0.pt', 'latest-rank0.pt']
    trainer = build_trainer(load_config(recipe, [f'load_path={tmp_path}/ckpt/ep0-ba2-rank0.pt']))
    assert int(trainer.state.timestamp.batch) == 2
    assert all(torch.isfinite(p).all() for p in trainer.state.model.parameters())
    trainer.close()

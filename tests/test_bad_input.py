"""Bad recipes, data and checkpoints: `recipes/train.py` stops before training with one line naming the key or file.

Every case runs the real entry point (``recipes/train.py``'s ``main``) on the default recipe against real MDS shards
and checkpoints on disk, damaged as a user's might be. Each must exit with code 2, print exactly one ``error:`` line
that names the offending key or file, no traceback, and write nothing to the save folder (every step would save a
checkpoint there). One case runs the script as a process, for its exit code and stderr as a user sees them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from typing import Callable, Optional, Union

import pytest
import torch
import yaml

from composer_algos.data.convert import DIGITS_SHAPE, digits_images, write_mds
from composer_algos.registry import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fault_run import flip_tensor_byte  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIFORM = os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml')
TRAIN_SCRIPT = os.path.join(ROOT, 'recipes', 'train.py')

_spec = importlib.util.spec_from_file_location('train_script', TRAIN_SCRIPT)
train_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_script)


@pytest.fixture(scope='module')
def data(tmp_path_factory) -> str:
    """The digits as the package writes them: ``<root>/train`` in three shards, ``<root>/val`` in one."""
    root = tmp_path_factory.mktemp('bad_input_data')
    write_mds(digits_images('train'), str(root / 'train'), size_limit=40_000, progress=False, shape=DIGITS_SHAPE)
    write_mds(digits_images('val'), str(root / 'val'), progress=False, shape=DIGITS_SHAPE)
    assert len(json.loads((root / 'train' / 'index.json').read_text())['shards']) == 3
    return str(root)


@pytest.fixture(scope='module')
def checkpoints(data, tmp_path_factory) -> str:
    """A folder with two real checkpoints of the default recipe, ``ep0-ba1-rank0.pt`` and ``ep0-ba2-rank0.pt``."""
    folder = str(tmp_path_factory.mktemp('bad_input_ckpt'))
    assert train_script.main([UNIFORM, *_base(data, folder), 'save_interval=1ba']) == 0
    assert {'ep0-ba1-rank0.pt', 'ep0-ba2-rank0.pt'} <= set(os.listdir(folder))
    return folder


def _base(data: str, save_folder: str) -> list[str]:
    return [
        'prepare_data=false',
        f'train_loader.local={data}',
        f'eval_loader.local={data}',
        'max_duration=2ba',
        'eval_interval=2ba',
        'save_interval=1ba',
        f'save_folder={save_folder}',
        'progress_bar=false',
        'callbacks=null',
        'loggers=null',
        'train_loader.global_batch_size=16',
        'eval_loader.global_batch_size=64',
        'run_name=bad-input',
    ]


def _copy_data(data: str, tmp_path) -> str:
    copy = str(tmp_path / 'data')
    shutil.copytree(data, copy)
    return copy


def _shard(root: str, i: int) -> str:
    return os.path.join(root, 'train', f'shard.{i:05d}.mds')


def _recipe_file(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def _recipe_with(tmp_path, change: Callable[[dict], None]) -> str:
    with open(UNIFORM) as f:
        recipe = yaml.safe_load(f)
    change(recipe)
    return _recipe_file(tmp_path, 'changed.yaml', yaml.safe_dump(recipe))


@dataclasses.dataclass
class Setup:
    """What a case runs: the recipe, overrides after the base ones, the data root and what the error must name."""

    named: Union[str, list[str]]
    overrides: list[str] = dataclasses.field(default_factory=list)
    recipe: str = UNIFORM
    data: Optional[str] = None


def _truncate(path: str, size: int) -> None:
    with open(path, 'r+b') as f:
        f.truncate(size)


def _flip_byte(path: str, offset: int) -> None:
    with open(path, 'r+b') as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))


# --------------------------------------------------------------------------------------------- the cases
def yaml_syntax(tmp_path, data, ckpt):
    path = _recipe_file(
        tmp_path, 'broken.yaml', 'seed: 1\nmodel:\n  denoiser: {name: unet, sample_size: 8\nmax_duration: 2ba\n'
    )
    return Setup(named=f'{path}:4:13: YAML syntax error', recipe=path)


def yaml_syntax_in_include(tmp_path, data, ckpt):
    fragment = _recipe_file(tmp_path, 'fragment.yaml', 'algorithms:\n  ema: {half_life: 50ba\n')
    path = _recipe_file(tmp_path, 'main.yaml', f'includes: [fragment.yaml]\n{open(UNIFORM).read()}')
    assert os.path.exists(fragment)
    return Setup(named=f'{fragment}:3:1: YAML syntax error', recipe=path)


def yaml_duplicate_key(tmp_path, data, ckpt):
    path = _recipe_file(tmp_path, 'dup.yaml', open(UNIFORM).read() + 'seed: 3\n')
    line = open(path).read().count('\n')
    return Setup(named=[f'{path}:{line}:1', 'duplicate key seed'], recipe=path)


def override_not_yaml(tmp_path, data, ckpt):
    return Setup(named="override 'model.denoiser={in_channels: '", overrides=['model.denoiser={in_channels: '])


def broken_interpolation(tmp_path, data, ckpt):
    return Setup(named=['run_name:', "'nope' not found"], overrides=['run_name=${nope}'])


def typed(override: str, named: str):
    def case(tmp_path, data, ckpt):
        return Setup(named=named, overrides=[override])

    case.__name__ = override
    return case


def gpu_without_cuda(tmp_path, data, ckpt):
    if torch.cuda.is_available():
        pytest.skip('this machine has CUDA')
    return Setup(named='device=gpu', overrides=['device=gpu'])


def autoresume_without_run_name(tmp_path, data, ckpt):
    return Setup(named='run_name', overrides=['autoresume=true', 'run_name=null'])


def missing_data_folder(tmp_path, data, ckpt):
    return Setup(named=f'train_loader.local={tmp_path}/nowhere', overrides=[f'train_loader.local={tmp_path}/nowhere'])


def missing_index(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    os.remove(os.path.join(root, 'train', 'index.json'))
    return Setup(named=[f'train_loader.local={root}', 'index.json missing'], data=root)


def corrupt_index(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    index = os.path.join(root, 'train', 'index.json')
    _truncate(index, 100)
    return Setup(named=[index, 'not valid JSON'], data=root)


def empty_index(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    index = os.path.join(root, 'train', 'index.json')
    with open(index, 'w') as f:
        json.dump({'shards': [], 'version': 2}, f)
    return Setup(named=[index, 'no samples'], data=root)


def truncated_shard(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    _truncate(_shard(root, 1), 5000)
    return Setup(named=[_shard(root, 1), 'truncated'], data=root)


def truncated_shard_to_nothing(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    _truncate(_shard(root, 2), 0)
    return Setup(named=[_shard(root, 2), 'truncated'], data=root)


def corrupt_shard_header(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    _flip_byte(_shard(root, 0), 1)  # the sample count
    return Setup(named=[_shard(root, 0), 'corrupt'], data=root)


def shard_missing(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    os.remove(_shard(root, 2))
    return Setup(named=[_shard(root, 2), 'missing'], data=root)


def shard_replaced_by_another(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    shutil.copy(_shard(root, 2), _shard(root, 1))  # the last, shorter shard
    return Setup(named=[_shard(root, 1), 'bytes but'], data=root)


def corrupt_shard_records_with_hashes(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    _flip_byte(_shard(root, 1), os.path.getsize(_shard(root, 1)) - 100)  # a pixel: only the hash can tell
    return Setup(named=[_shard(root, 1), 'xxh3_64'], data=root, overrides=['train_loader.validate_hash=xxh3_64'])


def hash_not_recorded(tmp_path, data, ckpt):
    return Setup(
        named=["validate_hash='sha1'", os.path.join(data, 'train', 'index.json'), 'it records: xxh3_64'],
        overrides=['train_loader.validate_hash=sha1'],
    )


def callback_loader_truncated_shard(tmp_path, data, ckpt):
    root = _copy_data(data, tmp_path)
    _truncate(os.path.join(root, 'val', 'shard.00000.mds'), 100)
    return Setup(
        named=['callbacks.fid.real_loader', os.path.join(root, 'val', 'shard.00000.mds'), 'truncated'],
        overrides=[f'callbacks.fid.real_loader={{local: {root}, split: val, global_batch_size: 64}}'],
    )


def conv_denoiser_wrong_channels(tmp_path, data, ckpt):
    def change(recipe):
        recipe['model']['denoiser'] = {'name': 'conv', 'in_channels': 3, 'width': 16}

    return Setup(
        named=['model.denoiser does not take the train_loader data', 'channels'], recipe=_recipe_with(tmp_path, change)
    )


def load_path_truncated(tmp_path, data, ckpt):
    bad = str(tmp_path / 'ep0-ba3-rank0.pt')
    shutil.copy(os.path.join(ckpt, 'ep0-ba2-rank0.pt'), bad)
    _truncate(bad, os.path.getsize(bad) // 2)
    shutil.copy(os.path.join(ckpt, 'ep0-ba1-rank0.pt'), tmp_path / 'ep0-ba1-rank0.pt')
    return Setup(
        named=[f'load_path={bad}', 'truncated', f'load_path={tmp_path}/ep0-ba1-rank0.pt'],
        overrides=[f'load_path={bad}'],
    )


def load_path_bit_flip(tmp_path, data, ckpt):
    bad = str(tmp_path / 'flipped.pt')
    shutil.copy(os.path.join(ckpt, 'ep0-ba2-rank0.pt'), bad)
    flip_tensor_byte(bad)
    return Setup(named=[f'load_path={bad}', 'CRC'], overrides=[f'load_path={bad}'])


def load_path_missing(tmp_path, data, ckpt):
    return Setup(named=[f'load_path={tmp_path}/none.pt', 'does not exist'], overrides=[f'load_path={tmp_path}/none.pt'])


def autoresume_nothing_readable(tmp_path, data, ckpt):
    folder = tmp_path / 'ckpt'
    folder.mkdir()
    for name in ('ep0-ba1-rank0.pt', 'ep0-ba2-rank0.pt'):
        shutil.copy(os.path.join(ckpt, name), folder / name)
        _truncate(str(folder / name), 1000)
    return Setup(
        named=['autoresume', f'{folder}/ep0-ba2-rank0.pt', f'{folder}/ep0-ba1-rank0.pt'], overrides=['autoresume=true']
    )


def two_sampler_owners(tmp_path, data, ckpt):
    return Setup(
        named=[
            'algorithms.log_normal_sampling and algorithms.logit_normal_sampling both own the timestep sampler',
            'curriculum_timestep_schedule',
        ],
        overrides=['algorithms.log_normal_sampling={}', 'algorithms.logit_normal_sampling={}'],
    )


def load_path_of_another_model(tmp_path, data, ckpt):
    path = os.path.join(ckpt, 'ep0-ba2-rank0.pt')
    return Setup(
        named=[
            f'load_path={path}: the checkpoint does not fit the model',
            'its tensor denoiser.down_blocks.1.resnets.0.conv1.weight has shape [32, 16, 3, 3] where the '
            'model has [48, 16, 3, 3]',
            "written by run 'bad-input', whose recipe had model.denoiser.block_out_channels=[16, 32] "
            '(this one: [16, 48])',
        ],
        overrides=[f'load_path={path}', 'model.denoiser.block_out_channels=[16, 48]'],
    )


def autoresume_of_another_model(tmp_path, data, ckpt):
    folder = tmp_path / 'ckpt'
    folder.mkdir()
    shutil.copy(os.path.join(ckpt, 'ep0-ba1-rank0.pt'), folder / 'ep0-ba1-rank0.pt')
    os.symlink('ep0-ba1-rank0.pt', folder / 'latest-rank0.pt')
    return Setup(
        named=[
            f'autoresume: the checkpoint this run resumes from, {folder}/ep0-ba1-rank0.pt, does not fit',
            'where the model has [48, 16, 3, 3]',
            f'or move the checkpoints in {folder} away',
        ],
        overrides=['autoresume=true', 'model.denoiser.block_out_channels=[16, 48]'],
    )


CASES = [
    yaml_syntax,
    yaml_syntax_in_include,
    yaml_duplicate_key,
    override_not_yaml,
    broken_interpolation,
    typed('modle.prediction_type=epsilon', "'modle'"),
    typed('optimizer.lrate=0.1', "'optimizer.lrate'"),
    typed('algorithms.min_snr_weigting={}', "'min_snr_weigting'"),
    typed('optimizer.lr=abc', 'optimizer.lr=abc: expected a number'),
    typed('optimizer.betas=[0.9]', 'optimizer.betas=[0.9]: expected a list of 2 items'),
    typed('max_duration=abc', 'max_duration=abc: expected'),
    typed('eval_interval=abc', 'eval_interval=abc: expected'),
    typed('save_interval=abc', 'save_interval=abc: expected'),
    typed('seed=abc', 'seed=abc: expected an integer'),
    typed('precision=fp64', 'precision=fp64: expected one of fp32'),
    gpu_without_cuda,
    typed('dist_timeout=abc', 'dist_timeout=abc: expected a number'),
    typed('progress_bar=3', 'progress_bar=3: expected true or false'),
    typed('model=abc', 'model=abc: expected a mapping'),
    typed('model.noise_schedule.num_timesteps=abc', 'model.noise_schedule.num_timesteps=abc: expected an integer'),
    typed('model.denoiser.block_out_channels=16', 'model.denoiser.block_out_channels=16: expected a list'),
    typed('model.prediction_type=noise', 'model.prediction_type=noise'),
    typed('model.seed=abc', 'model.seed=abc: expected an integer'),
    typed('algorithms.ema.half_life=abc', 'algorithms.ema.half_life=abc'),
    typed(
        'algorithms.adaptive_timestep_sampling.update_every=0.5',
        'algorithms.adaptive_timestep_sampling.update_every=0.5: expected an integer',
    ),
    typed('scheduler.t_warmup=abc', 'scheduler.t_warmup=abc: expected a duration'),
    typed('callbacks.sample_grid.num_samples=abc', 'callbacks.sample_grid.num_samples=abc: expected an integer'),
    typed('train_loader.global_batch_size=abc', 'train_loader.global_batch_size=abc: expected an integer'),
    typed('train_loader.shuffle=maybe', 'train_loader.shuffle=maybe: expected true or false'),
    typed('train_loader.predownload=abc', 'train_loader.predownload=abc: expected an integer'),
    typed('train_loader.batchsize=8', "'train_loader.batchsize'"),
    autoresume_without_run_name,
    missing_data_folder,
    missing_index,
    corrupt_index,
    empty_index,
    truncated_shard,
    truncated_shard_to_nothing,
    corrupt_shard_header,
    shard_missing,
    shard_replaced_by_another,
    corrupt_shard_records_with_hashes,
    hash_not_recorded,
    typed('model.denoiser.in_channels=3', 'model.denoiser.in_channels=3: the data in'),
    typed('model.denoiser.sample_size=16', 'model.denoiser.sample_size=16: the data in'),
    typed('train_loader.image_size=16', 'train_loader.image_size=16: the images in'),
    typed('eval_loader.image_size=16', 'eval_loader.image_size=16: the images in'),
    typed('train_loader.channels=2', 'train_loader.channels'),
    typed('train_loader.latents=true', 'set train_loader.latents=false'),
    typed('model.label_key=labels', 'model.label_key=labels'),
    typed('model.label_key=label', 'model.denoiser does not take the train_loader data'),
    typed('train_loader.global_batch_size=4096', 'train_loader.global_batch_size=4096: its per-rank batch'),
    conv_denoiser_wrong_channels,
    callback_loader_truncated_shard,
    load_path_truncated,
    load_path_bit_flip,
    load_path_missing,
    autoresume_nothing_readable,
    two_sampler_owners,
    typed('train_loader.global_batch_size=0', 'train_loader.global_batch_size=0: it must be positive'),
    typed('eval_loader.global_batch_size=-64', 'eval_loader.global_batch_size=-64: it must be positive'),
    typed(
        'callbacks.fid.real_loader={local: /nowhere, global_batch_size: 0}',
        'callbacks.fid.real_loader.global_batch_size=0: it must be positive',
    ),
    typed('device_train_microbatch_size=0', 'device_train_microbatch_size=0: it must be positive'),
    typed('max_duration=0ba', 'max_duration=0ba: it must be positive'),
    typed(
        'max_duration=0', 'max_duration=0: it must be positive (a run of 0ep trains nothing), e.g. max_duration=10ep'
    ),
    typed('max_duration=0.5dur', 'max_duration=0.5dur: it is a fraction of max_duration itself'),
    load_path_of_another_model,
    autoresume_of_another_model,
]

# The cases that once escaped as a traceback (from set_timestep_sampler, the loader's length, load_state_dict) or
# trained nothing and exited 0, run as a user runs them.
SCRIPT_CASES = [
    two_sampler_owners,
    typed('train_loader.global_batch_size=0', 'train_loader.global_batch_size=0'),
    load_path_of_another_model,
    typed('max_duration=0ba', 'max_duration=0ba'),
]


@pytest.mark.parametrize('case', CASES, ids=lambda c: c.__name__)
def test_bad_input_is_one_line_before_training(case, data, checkpoints, tmp_path, capsys):
    setup = case(tmp_path, data, checkpoints)
    save_folder = tmp_path / 'ckpt'
    before = sorted(os.listdir(save_folder)) if save_folder.exists() else None
    capsys.readouterr()
    code = train_script.main([setup.recipe, *_base(setup.data or data, str(save_folder)), *setup.overrides])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith('error:')]
    assert code == 2, err
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]), err
    assert 'Traceback' not in err
    for named in [setup.named] if isinstance(setup.named, str) else setup.named:
        assert named in errors[0], errors[0]
    # No step ran: a step would have saved a checkpoint (save_interval=1ba).
    after = sorted(os.listdir(save_folder)) if save_folder.exists() else None
    assert after == before or (before is None and after == []), after


@pytest.mark.parametrize('case', SCRIPT_CASES, ids=lambda c: c.__name__)
def test_the_script_ends_with_one_error_line(case, data, checkpoints, tmp_path):
    setup = case(tmp_path, data, checkpoints)
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('COMPOSER_ALGOS_DEBUG', None)
    proc = subprocess.run(
        [sys.executable, TRAIN_SCRIPT, setup.recipe, *_base(data, str(tmp_path / 'ckpt')), *setup.overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=tmp_path,
    )
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert last.startswith('error: ') and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    for named in [setup.named] if isinstance(setup.named, str) else setup.named:
        assert named in last, last


def test_a_finished_run_relaunched_has_nothing_to_train(data, tmp_path, capsys):
    args = [UNIFORM, *_base(data, str(tmp_path / 'ckpt')), 'autoresume=true']
    assert train_script.main(args) == 0
    capsys.readouterr()
    assert train_script.main(args) == 0
    err = capsys.readouterr().err
    assert 'The run is already at 2ba of max_duration=2ba; nothing to train.' in err and 'error:' not in err, err


def test_evaluate_names_the_run_that_wrote_a_checkpoint_of_another_model(data, checkpoints, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('evaluate_script', os.path.join(ROOT, 'recipes', 'evaluate.py'))
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    path = os.path.join(checkpoints, 'ep0-ba2-rank0.pt')
    capsys.readouterr()
    code = evaluate_script.main(
        [
            path,
            '--config',
            UNIFORM,
            f'eval_loader.local={data}',
            'model.denoiser.block_out_channels=[16, 48]',
            '--out',
            str(tmp_path / 'eval'),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and 'Traceback' not in err, err
    last = err.rstrip().splitlines()[-1]
    assert last.startswith(
        f'error: {path} does not fit the model: its tensor '
        'denoiser.down_blocks.1.resnets.0.conv1.weight has shape [32, 16, 3, 3] where the model has '
        '[48, 16, 3, 3]'
    ), last
    assert (
        "written by run 'bad-input', whose recipe had model.denoiser.block_out_channels=[16, 32] (this one: [16, 48])"
        in last
    ), last


def test_enough_cases():
    assert len(CASES) >= 30 and len({c.__name__ for c in CASES}) == len(CASES)


def test_the_script_exits_2_with_one_line_and_debug_shows_the_traceback(data, tmp_path):
    args = [sys.executable, TRAIN_SCRIPT, UNIFORM, *_base(data, str(tmp_path / 'ckpt')), 'max_duration=2bb']
    env = dict(os.environ, OMP_NUM_THREADS='1')
    env.pop('COMPOSER_ALGOS_DEBUG', None)
    proc = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.rstrip().splitlines()[-1] == (
        'error: max_duration=2bb: expected an integer or a duration such as 500ba, 2ep or 0.5dur or null.'
    )
    assert 'Traceback' not in proc.stderr
    with pytest.raises(ConfigError, match='max_duration=2bb'):
        train_script.main([*args[2:], '--debug'])


def test_intact_shards_pass_every_check(data):
    from composer_algos.data.integrity import SHARD_HASH, check_mds_folder

    for split in ('train', 'val'):
        index = check_mds_folder(os.path.join(data, split), validate_hash=SHARD_HASH)
        assert all(SHARD_HASH in shard['raw_data']['hashes'] for shard in index['shards'])

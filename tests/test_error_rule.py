"""The entry points' error rule: an exception that escapes is one ``error:`` line, its traceback a file.

A third-party callback, installed as a package would install it (an entry point of a distribution on the path) and
named in a recipe, fails for real inside a run of ``recipes/train.py``: at a given batch on a given rank, or in its
constructor while the recipe is built. The runs are real processes, on one rank and under ``composer -n 2``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_faults import _recipe as faults_recipe  # noqa: E402
from two_ranks import launch_ranks  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_SCRIPT = os.path.join(ROOT, 'recipes', 'train.py')
# A failed 2-rank run must end well before Composer's launcher would give up on a hung rank (30 s after the first
# exit, then SIGKILL) or gloo would time out (the recipe's dist_timeout): this bounds the whole launch.
TWO_RANK_TIMEOUT_SECONDS = 240


@pytest.fixture(scope='module')
def plugin(tmp_path_factory) -> str:
    """A folder to put on ``PYTHONPATH``: the module ``failing_callback`` and its distribution's entry point."""
    folder = tmp_path_factory.mktemp('plugin')
    (folder / 'failing_callback.py').write_text(
        textwrap.dedent('''
        """A callback that fails on purpose."""
        from composer.core import Callback
        from composer.utils import dist


        class FailAt(Callback):
            def __init__(self, batch: int = 2, rank: int = 0, in_constructor: bool = False):
                if in_constructor:
                    raise RuntimeError('planted failure in the constructor')
                self.batch, self.rank = batch, rank

            def batch_end(self, state, logger):
                if dist.get_global_rank() == self.rank and int(state.timestamp.batch) == self.batch:
                    raise OSError(f'planted failure on rank {self.rank} at batch {self.batch}')
    ''')
    )
    dist_info = folder / 'failing_callback-0.1.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: failing-callback\nVersion: 0.1\n')
    (dist_info / 'entry_points.txt').write_text('[composer_algos_callbacks]\nfail_at = failing_callback:FailAt\n')
    return str(folder)


def _recipe(tmp_path, digits_mds: str, fail_at: dict) -> str:
    """The small recipe of the fault tests (a conv denoiser on the digits), with the failing callback and nothing
    saved."""
    return faults_recipe(
        tmp_path,
        digits_mds,
        run_name='rule',
        max_duration='6ba',
        algorithms={},
        autoresume=False,
        save_folder=None,
        callbacks={'fail_at': fail_at},
        dist_timeout=120.0,
    )


def _env(plugin: str, **extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=os.pathsep.join([plugin, ROOT]), **extra)
    if 'COMPOSER_ALGOS_DEBUG' not in extra:
        env.pop('COMPOSER_ALGOS_DEBUG', None)
    return env


def _train(recipe: str, plugin: str, cwd, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, TRAIN_SCRIPT, recipe, *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=_env(plugin, **env),
        cwd=cwd,
    )


def test_a_failure_inside_a_callback_is_one_line_and_its_traceback_a_file(tmp_path, digits_mds, plugin):
    recipe = _recipe(tmp_path, digits_mds, {'batch': 2})
    proc = _train(recipe, plugin, tmp_path)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    assert [line for line in proc.stderr.splitlines() if line.startswith('error:')] == [
        proc.stderr.rstrip().splitlines()[-1]
    ]
    assert proc.stderr.rstrip().splitlines()[-1] == (
        'error: OSError: planted failure on rank 0 at batch 2 (in '
        'callbacks.fail_at, at batch 2); traceback: runs/rule/error.log'
    )
    log = (tmp_path / 'runs' / 'rule' / 'error.log').read_text()
    assert (
        log.startswith('Traceback')
        and 'in batch_end' in log
        and log.rstrip().endswith('OSError: planted failure on rank 0 at batch 2')
    )


def test_a_failure_while_the_recipe_is_built_exits_2_with_the_traceback_in_a_temporary_file(
    tmp_path, digits_mds, plugin
):
    recipe = _recipe(tmp_path, digits_mds, {'in_constructor': True})
    proc = _train(recipe, plugin, tmp_path)
    last = proc.stderr.rstrip().splitlines()[-1]
    assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
    prefix = 'error: RuntimeError: planted failure in the constructor (in callbacks.fail_at); traceback: '
    assert last.startswith(prefix), last
    log = last[len(prefix) :]
    try:
        assert not log.startswith('runs/') and os.path.isfile(log)  # no run folder yet
        assert 'in __init__' in open(log).read()
    finally:
        if os.path.isfile(log):
            os.remove(log)
    assert not (tmp_path / 'runs').exists()


@pytest.mark.parametrize('how', ['--debug', 'COMPOSER_ALGOS_DEBUG=1'])
def test_debug_shows_the_traceback_instead(tmp_path, digits_mds, plugin, how):
    recipe = _recipe(tmp_path, digits_mds, {'batch': 2})
    args, env = (['--debug'], {}) if how == '--debug' else ([], {'COMPOSER_ALGOS_DEBUG': '1'})
    proc = _train(recipe, plugin, tmp_path, *args, **env)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 'Traceback (most recent call last)' in proc.stderr
    # torch.distributed's excepthook prefixes each line of the traceback with the rank.
    assert proc.stderr.rstrip().splitlines()[-1].endswith('OSError: planted failure on rank 0 at batch 2')
    assert not any(line.startswith('error:') for line in proc.stderr.splitlines())


@pytest.mark.parametrize('failing_rank', [0, 1])
def test_two_ranks_one_fails_one_line_and_no_rank_hangs(tmp_path, digits_mds, plugin, failing_rank):
    """The failing rank prints the line (rank 1's output reaches the user through the launcher, which shows a
    crashed rank's output); the other, waiting in a collective, fails for want of its peer and stays silent."""
    recipe = _recipe(tmp_path, digits_mds, {'batch': 3, 'rank': failing_rank})
    start = time.monotonic()
    code, stdout, stderr = launch_ranks(
        TRAIN_SCRIPT, recipe, timeout=TWO_RANK_TIMEOUT_SECONDS, env=_env(plugin), cwd=tmp_path
    )
    elapsed = time.monotonic() - start
    output = stdout + stderr
    errors = [line for line in output.splitlines() if line.startswith('error:')]
    print(f'rank {failing_rank} failed: the launcher exited with code {code} after {elapsed:.1f} s')
    assert code is not None, f'a rank still ran after {TWO_RANK_TIMEOUT_SECONDS} s\n' + output[-4000:]
    assert code != 0, output[-4000:]
    assert errors == [
        f'error: OSError: planted failure on rank {failing_rank} at batch 3 (in callbacks.fail_at, at '
        f'batch 3); traceback: runs/rule/error{"-rank1" if failing_rank else ""}.log'
    ], output[-4000:]
    assert 'Traceback' not in output, output[-4000:]

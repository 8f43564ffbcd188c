"""The worked example of docs/architecture.md: a sampler added as new files only is registered by setup.py and trains."""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import subprocess
import sys
import textwrap
import types
from importlib.metadata import PathDistribution

import torch
import yaml
from composer.core import Callback
from conftest import make_trainer, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'truncated_uniform_sampling'
FOLDER = f'composer_algos/algorithms/{NAME}'
MODULE, INIT = f'{FOLDER}/{NAME}.py', f'{FOLDER}/__init__.py'
TEST = f'tests/test_{NAME}.py'
FRAGMENT = f'yamls/algorithms/{NAME}.yaml'


def doc_files() -> dict[str, str]:
    """The worked example's files: each code block of its section, keyed by the path in backticks that introduces it."""
    text = open(os.path.join(ROOT, 'docs', 'architecture.md')).read()
    section = text[text.index('### Worked example') :]
    blocks = re.findall(r'^`([^`\n]+)`[^\n]*:\n\n(`{3,})\w*\n(.*?)\n\2$', section, re.M | re.S)
    return {path: code + '\n' for path, _, code in blocks}


def test_the_worked_example_is_new_files_only():
    files = doc_files()
    assert set(files) == {MODULE, INIT, f'{FOLDER}/README.md', FRAGMENT, TEST}
    assert not any(os.path.exists(os.path.join(ROOT, path)) for path in files)


def _digests(tree: pathlib.Path) -> dict[str, str]:
    return {
        str(path.relative_to(tree)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in tree.rglob('*')
        if path.is_file() and '.egg-info' not in str(path.relative_to(tree))
    }


def _algorithm_entry_points(tree: pathlib.Path) -> dict[str, str]:
    """Run setup.py (as ``pip install -e .`` does, through egg_info) in ``tree``; its algorithm entry points."""
    subprocess.run([sys.executable, 'setup.py', '-q', 'egg_info'], cwd=tree, check=True, capture_output=True)
    entry_points = PathDistribution(tree / 'composer_algos.egg-info').entry_points
    return {ep.name: ep.value for ep in entry_points.select(group='composer_algos_algorithms')}


def test_setup_py_registers_a_new_algorithm_folder_by_its_name_alone(tmp_path):
    tree = tmp_path / 'tree'
    shutil.copytree(
        os.path.join(ROOT, 'composer_algos'), tree / 'composer_algos', ignore=shutil.ignore_patterns('__pycache__')
    )
    shutil.copy(os.path.join(ROOT, 'setup.py'), tree / 'setup.py')
    before = _algorithm_entry_points(tree)
    files_before = _digests(tree)
    assert NAME not in before

    for path, text in doc_files().items():
        (tree / path).parent.mkdir(parents=True, exist_ok=True)
        (tree / path).write_text(text)
    after = _algorithm_entry_points(tree)
    files_after = _digests(tree)

    assert after == {**before, NAME: f'composer_algos.algorithms.{NAME}:TruncatedUniformSampling'}
    assert {path: files_after[path] for path in files_before} == files_before  # no existing file was edited
    assert set(files_after) - set(files_before) == set(doc_files())
    # A fresh interpreter on that tree alone (run in it: `-c` puts the working directory first on the path) builds it
    # by name from a recipe's algorithms section.
    code = textwrap.dedent(f"""
        import sys
        from composer_algos.config import build_algorithms
        (algorithm,) = build_algorithms({{'{NAME}': {{'a': 0.25, 'b': 0.75}}}})
        print(sys.modules[type(algorithm).__module__].__file__.startswith({str(tree)!r}), repr(algorithm))
    """)
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, '-c', code], capture_output=True, text=True, env=env, cwd=tree, check=True
    ).stdout
    assert out.strip() == 'True TruncatedUniformSampling(a=0.25, b=0.75)'


def _exec_module(name: str, source: str, monkeypatch) -> types.ModuleType:
    """``source`` run as the module ``name`` (in ``sys.modules`` for the test's duration, so imports find it)."""
    module = types.ModuleType(name)
    module.__file__ = f'<docs/architecture.md: {name}>'
    monkeypatch.setitem(sys.modules, name, module)
    exec(compile(source, module.__file__, 'exec'), module.__dict__)
    return module


class DrawnTimesteps(Callback):
    """The timesteps the model drew, every micro-batch."""

    def __init__(self):
        self.t: list[torch.Tensor] = []

    def after_loss(self, state, logger):
        self.t.append(state.outputs['draw'].t.detach().clone())


def test_the_worked_example_code_trains_on_the_digits(monkeypatch, digits_mds):
    files = doc_files()
    package = f'composer_algos.algorithms.{NAME}'
    _exec_module(f'{package}.{NAME}', files[MODULE], monkeypatch)
    example = _exec_module(package, files[INIT], monkeypatch)
    assert example.__all__[0] == 'TruncatedUniformSampling'  # what setup.py registers

    arguments = yaml.safe_load(files[FRAGMENT])['algorithms'][NAME]
    algorithm = example.TruncatedUniformSampling(**arguments)
    assert repr(algorithm) == 'TruncatedUniformSampling(a=0.25, b=0.75)'
    drawn = DrawnTimesteps()
    model = tiny_model(num_timesteps=100)
    make_trainer(digits_mds, [algorithm], max_duration='2ba', model=model, callbacks=[drawn]).fit()
    t = torch.cat(drawn.t)
    assert t.numel() == 64 and int(t.min()) >= 25 and int(t.max()) <= 74  # u = t / T in [0.25, 0.75)

    # The example's own tests pass.
    tests = _exec_module(f'test_{NAME}', files[TEST], monkeypatch)
    tests.test_the_cell_masses_are_uniform_on_a_b_and_zero_outside()
    tests.test_a_trainer_draws_only_timesteps_in_a_b(digits_mds)

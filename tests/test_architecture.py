"""The package's layers: registration runs one way, library code never reads YAML, every algorithm has a folder."""

from __future__ import annotations

import ast
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from composer_algos import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'composer_algos')
YAML_LAYER = {'composer_algos/config.py', 'composer_algos/validation.py'}


def _imports(path: str) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    tree = ast.parse(open(path).read())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found.update(f'{node.module}.{alias.name}' for alias in node.names)
    return found


def test_the_registry_is_a_leaf():
    code = 'import sys, composer_algos.registry; print(sorted(m for m in sys.modules if m.startswith("composer_algos")))'
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['composer_algos', 'composer_algos.registry']"


def test_only_the_yaml_layer_imports_the_config_and_nothing_imports_the_builtins_table():
    for path in glob.glob(os.path.join(PACKAGE, '**', '*.py'), recursive=True):
        rel = os.path.relpath(path, ROOT)
        imported = _imports(path)
        if rel not in YAML_LAYER:
            assert 'composer_algos.config' not in imported, rel
        assert 'composer_algos.builtins' not in imported, rel  # a table for setup.py, registered by entry points
    assert not _imports(os.path.join(PACKAGE, 'builtins.py')) - {'__future__'}


def test_built_ins_resolve_by_name_in_a_fresh_interpreter():
    code = textwrap.dedent('''
        import sys
        from composer_algos import registry
        weighting = registry.resolve(registry.algorithms, 'min_snr_weighting', 'algorithm')
        fid = registry.resolve(registry.callbacks, 'fid', 'callback')
        adamw = registry.resolve(registry.optimizers, 'adamw', 'optimizer')
        print(weighting.__name__, fid.__name__, adamw.__name__, 'composer_algos.config' in sys.modules)
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ['MinSNRWeighting', 'FID', 'AdamW', 'False']


def test_every_algorithm_folder_is_registered_under_its_name_as_an_algorithm():
    from composer.core import Algorithm
    parts = registry.algorithms.get_all()
    folders = [name for name in os.listdir(os.path.join(PACKAGE, 'algorithms'))
               if os.path.isfile(os.path.join(PACKAGE, 'algorithms', name, '__init__.py'))]
    for name in folders:
        assert name in parts, f'{name}: not registered; reinstall the package (pip install -e .) to refresh its entry points'
        assert isinstance(parts[name], type) and issubclass(parts[name], Algorithm), (name, parts[name])


# The one function a package __init__ may define: PEP 562's lazy export of the names in its _LAZY_EXPORTS.
_LAZY_GETATTR = ast.parse(textwrap.dedent("""
    def __getattr__(name: str) -> type:
        if name in _LAZY_EXPORTS:
            return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
""")).body[0]


def _without_docstring(function: ast.FunctionDef) -> str:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    return ast.dump(ast.FunctionDef(function.name, function.args, body, [], function.returns))


def init_problems(source: str) -> list[str]:
    """What keeps a package ``__init__`` (its ``source``) from only re-exporting: anything but imports, a docstring,
    ``__all__``, ``__version__``, and a lazy export (a ``_LAZY_EXPORTS`` table of names to modules of the package with
    exactly :data:`_LAZY_GETATTR` to read it)."""
    problems = []
    for node in ast.parse(source).body:
        line = f'line {node.lineno}'
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr):
            if not isinstance(node.value, ast.Constant):
                problems.append(f'{line}: runs code at import time')
        elif isinstance(node, ast.Assign):
            names = [getattr(t, 'id', None) for t in node.targets]
            if names == ['_LAZY_EXPORTS']:
                table = ast.literal_eval(node.value) if isinstance(node.value, ast.Dict) else None
                if not (isinstance(table, dict) and all(isinstance(k, str) and isinstance(v, str)
                                                        and v.startswith('composer_algos.') for k, v in table.items())):
                    problems.append(f'{line}: _LAZY_EXPORTS must map names to modules of the package')
            elif names not in (['__all__'], ['__version__']):
                problems.append(f'{line}: assigns {names}')
        elif isinstance(node, ast.FunctionDef) and node.name == '__getattr__':
            if _without_docstring(node) != _without_docstring(_LAZY_GETATTR):
                problems.append(f'{line}: __getattr__ does more than the lazy export of _LAZY_EXPORTS')
        else:
            problems.append(f'{line}: {type(node).__name__}')
    return problems


def test_package_inits_only_re_export():
    for path in glob.glob(os.path.join(PACKAGE, '**', '__init__.py'), recursive=True):
        assert init_problems(open(path).read()) == [], path


@pytest.mark.parametrize('source, problem', [
    ('from composer_algos import registry\nregistry.algorithms.register("x", func=object)\n',
     'line 2: runs code at import time'),
    ('_LAZY_EXPORTS = {"X": "composer_algos.x"}\n\n\ndef __getattr__(name: str) -> type:\n'
     '    import composer_algos.algorithms\n    return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)\n',
     'line 4: __getattr__ does more than the lazy export of _LAZY_EXPORTS'),
    ('_LAZY_EXPORTS = {"X": "torch.nn"}\n', 'line 1: _LAZY_EXPORTS must map names to modules of the package'),
    ('_LAZY_EXPORTS = dict(X="composer_algos.x")\n', 'line 1: _LAZY_EXPORTS must map names to modules of the package'),
    ('def helper():\n    pass\n', 'line 1: FunctionDef'),
    ('NAMES = ["x"]\n', "line 1: assigns ['NAMES']"),
])
def test_the_init_check_refuses_anything_but_re_exports_and_the_lazy_export(source, problem):
    assert init_problems(source) == [problem]


def test_the_package_root_exports_the_models_lazily_in_a_fresh_interpreter():
    code = textwrap.dedent('''
        import sys
        import composer_algos
        before = 'composer_algos.diffusion.model' in sys.modules
        from composer_algos import DiffusionModel, FlowMatchingModel
        print(before, DiffusionModel.__module__, FlowMatchingModel.__module__, sorted(composer_algos.__all__))
    ''')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ['False', 'composer_algos.diffusion.model', 'composer_algos.diffusion.flow_model',
                           "['DiffusionModel',", "'FlowMatchingModel']"]


def test_every_registered_algorithm_lives_in_its_own_folder_with_a_readme():
    for name, part in registry.algorithms.get_all().items():
        module = part.__module__
        if not module.startswith('composer_algos.'):
            continue  # Composer's own (gradient_clipping)
        path = sys.modules[module].__file__
        folder = os.path.dirname(path)
        assert os.path.basename(folder) == os.path.splitext(os.path.basename(path))[0] == name, (name, path)
        assert os.path.isfile(os.path.join(folder, 'README.md')), name
        assert os.path.isfile(os.path.join(ROOT, 'yamls', 'algorithms', f'{name}.yaml')), f'{name}: no YAML fragment'


def test_a_third_party_package_registers_an_algorithm_by_entry_point(tmp_path):
    """An installed distribution declaring ``composer_algos_algorithms`` entry points is found by name from YAML."""
    (tmp_path / 'my_plugin.py').write_text(textwrap.dedent('''
        from composer.core import Algorithm

        class Halve(Algorithm):
            def __init__(self, factor: float = 0.5):
                self.factor = factor

            def match(self, event, state):
                return False

            def apply(self, event, state, logger):
                pass
    '''))
    dist_info = tmp_path / 'my_plugin-0.1.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n')
    (dist_info / 'entry_points.txt').write_text('[composer_algos_algorithms]\nhalve = my_plugin:Halve\n')
    code = textwrap.dedent('''
        from composer_algos.config import build_algorithms
        (algorithm,) = build_algorithms({'halve': {'factor': 0.25}})
        print(type(algorithm).__module__, type(algorithm).__name__, algorithm.factor)
    ''')
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ['my_plugin', 'Halve', '0.25']


def test_the_version_is_the_installed_one():
    from importlib.metadata import version

    import composer_algos
    assert composer_algos.__version__ == version('composer-algos')

"""The package's layers: registration runs one way, library code never reads YAML, every algorithm has a folder."""

from __future__ import annotations

import ast
import glob
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from composer_algos import registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'composer_algos')
YAML_LAYER = {'composer_algos/config.py', 'composer_algos/validation.py'}

# Lowest first: a module imports only from its own layer or the ones below it (docs/architecture.md draws these).
# The package root (its __init__) is in none: every submodule's import runs it, and its body imports nothing from
# the package; the classes it exports lazily count as imports of the modules that define them.
LAYERS = (
    (
        'leaves',
        (
            'composer_algos.registry',
            'composer_algos.distributed',
            'composer_algos.seeding',
            'composer_algos.machine',
            'composer_algos.pixels',
            'composer_algos.checkpoint_integrity',
            'composer_algos.builtins',
        ),
    ),
    ('diffusion', ('composer_algos.diffusion',)),
    ('data and evaluation', ('composer_algos.data', 'composer_algos.evaluation')),
    ('algorithms and callbacks', ('composer_algos.algorithms', 'composer_algos.callbacks')),
    ('entry rule and YAML', ('composer_algos.cli', 'composer_algos.validation', 'composer_algos.config')),
    ('recipes', ('recipes',)),
)


def module_files(root: str) -> dict[str, str]:
    """Module name -> file, for every module of ``root/composer_algos`` and every script of ``root/recipes``."""
    files = {}
    for path in glob.glob(os.path.join(root, 'composer_algos', '**', '*.py'), recursive=True):
        parts = os.path.relpath(path, root)[: -len('.py')].split(os.sep)
        files['.'.join(parts[:-1] if parts[-1] == '__init__' else parts)] = path
    for path in glob.glob(os.path.join(root, 'recipes', '*.py')):
        files[f'recipes.{os.path.basename(path)[: -len(".py")]}'] = path
    return files


def lazy_exports(root: str) -> dict[str, str]:
    """The package root's ``_LAZY_EXPORTS``: exported name -> the module that defines it."""
    tree = ast.parse(open(os.path.join(root, 'composer_algos', '__init__.py')).read())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, 'id', None) for t in node.targets] == ['_LAZY_EXPORTS']:
            return ast.literal_eval(node.value)
    return {}


def imported_modules(path: str, module: str, modules: set[str], exports: dict[str, str]) -> set[str]:
    """Every module ``path`` (module ``module``) imports, at any depth: module-level, function-level and
    ``importlib.import_module``/``__import__`` of a literal name, relative imports resolved, ``from package import
    name`` counted as the submodule ``name`` when it is one, and the package root's lazy exports (imported or read as
    attributes of ``composer_algos``) counted as the modules that define them."""
    package = module if path.endswith('__init__.py') else module.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[: len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                if f'{base}.{alias.name}' in modules:
                    found.add(f'{base}.{alias.name}')
                elif base == 'composer_algos' and alias.name in exports:
                    found.add(exports[alias.name])
                else:
                    found.add(base)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, 'id', None)
            if name in ('import_module', '__import__') and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == 'composer_algos'
            and node.attr in exports
        ):
            found.add(exports[node.attr])
    return found


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of ``module``'s layer, ``None`` for a module in none."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(f'{prefix}.') for prefix in prefixes):
            return index
    return None


def _own(module: str) -> bool:
    return module.split('.')[0] in ('composer_algos', 'recipes') and module != 'composer_algos'


def import_graph(root: str) -> dict[str, set[str]]:
    """Module -> the modules of the package (and recipes) it imports, at any depth (see :func:`imported_modules`)."""
    files = module_files(root)
    exports = lazy_exports(root)
    return {
        module: {m for m in imported_modules(path, module, set(files), exports) if _own(m) and m != module}
        for module, path in files.items()
    }


def layer_violations(root: str) -> list[str]:
    """One line for each module in no layer and each import of a higher layer, in the tree at ``root``."""
    problems = []
    for module, imported in sorted(import_graph(root).items()):
        if module == 'composer_algos':
            continue  # the root: test_package_inits_only_re_export
        own = layer_of(module)
        if own is None:
            problems.append(f'{module}: in no layer of LAYERS (add it to one, and to docs/architecture.md)')
            continue
        for target in sorted(imported):
            layer = layer_of(target)
            if layer is None or layer > own:
                above = LAYERS[layer][0] if layer is not None else 'no layer'
                problems.append(f'{module} ({LAYERS[own][0]}) imports {target} ({above})')
    return problems


def import_cycles(root: str) -> list[list[str]]:
    """The strongly connected sets of more than one module in the import graph of ``root`` (Tarjan)."""
    graph = import_graph(root)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while not component or component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    return cycles


def test_every_module_imports_only_its_own_layer_or_lower_ones():
    assert layer_violations(ROOT) == []


@pytest.mark.parametrize(
    'plant, target',
    [
        (
            'def _planted():\n    from composer_algos.config import build_trainer\n    return build_trainer\n',
            'composer_algos.config',
        ),
        (
            'def _planted():\n    import importlib\n    return importlib.import_module("composer_algos.callbacks.fid")\n',
            'composer_algos.callbacks.fid',
        ),
        (
            'def _planted():\n    from composer_algos import DiffusionModel\n    return DiffusionModel\n',
            'composer_algos.diffusion.model',
        ),
        ('def _planted():\n    from .algorithms import base\n    return base\n', 'composer_algos.algorithms.base'),
    ],
)
def test_the_layer_check_catches_an_upward_import_inside_a_function(tmp_path, plant, target):
    shutil.copytree(PACKAGE, tmp_path / 'composer_algos', ignore=shutil.ignore_patterns('__pycache__', 'weights'))
    assert layer_violations(str(tmp_path)) == []
    with open(tmp_path / 'composer_algos' / 'seeding.py', 'a') as f:
        f.write('\n\n' + plant)
    assert layer_violations(str(tmp_path)) == [
        f'composer_algos.seeding (leaves) imports {target} ({LAYERS[layer_of(target)][0]})'
    ]


def test_the_layer_check_names_a_module_in_no_layer(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / 'composer_algos', ignore=shutil.ignore_patterns('__pycache__', 'weights'))
    (tmp_path / 'composer_algos' / 'helpers.py').write_text('"""Planted."""\n')
    assert layer_violations(str(tmp_path)) == [
        'composer_algos.helpers: in no layer of LAYERS (add it to one, and to docs/architecture.md)'
    ]


def _diagram_layers() -> list[tuple[str, ...]]:
    """docs/architecture.md's layer diagram, lowest first: each line's first word (``composer_algos/{a,b}/``,
    ``recipes/*.py``) as module names."""
    text = open(os.path.join(ROOT, 'docs', 'architecture.md')).read()
    block = re.search(r'```\n(.*?)```', text, re.S).group(1)
    layers = []
    for line in block.splitlines():
        word = line.split()[0]
        braces = re.fullmatch(r'(.*)\{(.*)\}(.*)', word)
        paths = [braces[1] + name + braces[3] for name in braces[2].split(',')] if braces else [word]
        layers.append(tuple(re.sub(r'(/\*\.py|\.py|/)$', '', path).replace('/', '.') for path in paths))
    return layers[::-1]


def test_the_architecture_doc_draws_exactly_the_checked_layers():
    assert _diagram_layers() == [prefixes for _, prefixes in LAYERS]


def test_no_import_cycle_among_the_package_modules():
    assert import_cycles(ROOT) == []


def test_the_cycle_check_finds_a_cycle_through_a_lazy_import(tmp_path):
    package = tmp_path / 'composer_algos'
    (package / 'diffusion').mkdir(parents=True)
    (package / '__init__.py').write_text('')
    (package / 'diffusion' / '__init__.py').write_text('')
    (package / 'diffusion' / 'a.py').write_text('from composer_algos.diffusion.b import f\n')
    (package / 'diffusion' / 'b.py').write_text('def f():\n    from composer_algos.diffusion import a\n')
    (package / 'diffusion' / 'c.py').write_text('from composer_algos.diffusion import a\n')
    assert import_cycles(str(tmp_path)) == [['composer_algos.diffusion.a', 'composer_algos.diffusion.b']]


def test_the_registry_is_a_leaf():
    code = (
        'import sys, composer_algos.registry; print(sorted(m for m in sys.modules if m.startswith("composer_algos")))'
    )
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "['composer_algos', 'composer_algos.registry']"


def test_only_the_yaml_layer_imports_the_config_and_nothing_imports_the_builtins_table():
    files = module_files(ROOT)
    exports = lazy_exports(ROOT)
    for module, path in files.items():
        rel = os.path.relpath(path, ROOT)
        imported = imported_modules(path, module, set(files), exports)
        if rel not in YAML_LAYER and not module.startswith('recipes.'):
            assert 'composer_algos.config' not in imported, rel
        assert 'composer_algos.builtins' not in imported, rel  # a table for setup.py, registered by entry points
    builtins = files['composer_algos.builtins']
    assert not imported_modules(builtins, 'composer_algos.builtins', set(files), exports) - {'__future__'}


def test_built_ins_resolve_by_name_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import sys
        from composer_algos import registry
        weighting = registry.resolve(registry.algorithms, 'min_snr_weighting', 'algorithm')
        fid = registry.resolve(registry.callbacks, 'fid', 'callback')
        adamw = registry.resolve(registry.optimizers, 'adamw', 'optimizer')
        print(weighting.__name__, fid.__name__, adamw.__name__, 'composer_algos.config' in sys.modules)
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ['MinSNRWeighting', 'FID', 'AdamW', 'False']


def test_every_algorithm_folder_is_registered_under_its_name_as_an_algorithm():
    from composer.core import Algorithm

    parts = registry.algorithms.get_all()
    folders = [
        name
        for name in os.listdir(os.path.join(PACKAGE, 'algorithms'))
        if os.path.isfile(os.path.join(PACKAGE, 'algorithms', name, '__init__.py'))
    ]
    for name in folders:
        assert name in parts, (
            f'{name}: not registered; reinstall the package (pip install -e .) to refresh its entry points'
        )
        assert isinstance(parts[name], type) and issubclass(parts[name], Algorithm), (name, parts[name])


# The one function a package __init__ may define: PEP 562's lazy export of the names in its _LAZY_EXPORTS.
_LAZY_GETATTR = ast.parse(
    textwrap.dedent("""
    def __getattr__(name: str) -> type:
        if name in _LAZY_EXPORTS:
            return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
""")
).body[0]


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
                if not (
                    isinstance(table, dict)
                    and all(
                        isinstance(k, str) and isinstance(v, str) and v.startswith('composer_algos.')
                        for k, v in table.items()
                    )
                ):
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


@pytest.mark.parametrize(
    'source, problem',
    [
        (
            'from composer_algos import registry\nregistry.algorithms.register("x", func=object)\n',
            'line 2: runs code at import time',
        ),
        (
            '_LAZY_EXPORTS = {"X": "composer_algos.x"}\n\n\ndef __getattr__(name: str) -> type:\n'
            '    import composer_algos.algorithms\n    return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)\n',
            'line 4: __getattr__ does more than the lazy export of _LAZY_EXPORTS',
        ),
        ('_LAZY_EXPORTS = {"X": "torch.nn"}\n', 'line 1: _LAZY_EXPORTS must map names to modules of the package'),
        (
            '_LAZY_EXPORTS = dict(X="composer_algos.x")\n',
            'line 1: _LAZY_EXPORTS must map names to modules of the package',
        ),
        ('def helper():\n    pass\n', 'line 1: FunctionDef'),
        ('NAMES = ["x"]\n', "line 1: assigns ['NAMES']"),
    ],
)
def test_the_init_check_refuses_anything_but_re_exports_and_the_lazy_export(source, problem):
    assert init_problems(source) == [problem]


def test_the_package_root_exports_the_models_lazily_in_a_fresh_interpreter():
    code = textwrap.dedent("""
        import sys
        import composer_algos
        before = 'composer_algos.diffusion.model' in sys.modules
        from composer_algos import DiffusionModel, FlowMatchingModel
        print(before, DiffusionModel.__module__, FlowMatchingModel.__module__, sorted(composer_algos.__all__))
    """)
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.split() == [
        'False',
        'composer_algos.diffusion.model',
        'composer_algos.diffusion.flow_model',
        "['DiffusionModel',",
        "'FlowMatchingModel']",
    ]
    assert sorted(lazy_exports(ROOT)) == ['DiffusionModel', 'FlowMatchingModel']


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
    (tmp_path / 'my_plugin.py').write_text(
        textwrap.dedent("""
        from composer.core import Algorithm

        class Halve(Algorithm):
            def __init__(self, factor: float = 0.5):
                self.factor = factor

            def match(self, event, state):
                return False

            def apply(self, event, state, logger):
                pass
    """)
    )
    dist_info = tmp_path / 'my_plugin-0.1.dist-info'
    dist_info.mkdir()
    (dist_info / 'METADATA').write_text('Metadata-Version: 2.1\nName: my-plugin\nVersion: 0.1\n')
    (dist_info / 'entry_points.txt').write_text('[composer_algos_algorithms]\nhalve = my_plugin:Halve\n')
    code = textwrap.dedent("""
        from composer_algos.config import build_algorithms
        (algorithm,) = build_algorithms({'halve': {'factor': 0.25}})
        print(type(algorithm).__module__, type(algorithm).__name__, algorithm.factor)
    """)
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ['my_plugin', 'Halve', '0.25']


def test_the_version_is_the_installed_one():
    from importlib.metadata import version

    import composer_algos

    assert composer_algos.__version__ == version('composer-algos')

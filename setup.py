"""composer-algos: faster diffusion training as MosaicML Composer algorithms."""

import ast
import os
import re

from setuptools import find_packages, setup

with open('composer_algos/__init__.py') as f:
    VERSION = re.search(r"__version__ = '([^']+)'", f.read()).group(1)

install_requires = [
    # Exact where Composer 0.32.1's own pins leave no choice; the tested set of everything is constraints.txt.
    'torch==2.7.0',
    'torchvision==0.22.0',
    'torchmetrics[image]==1.7.4',
    'mosaicml==0.32.1',
    'mosaicml-streaming==0.13.0',
    'numpy>=1.26,<2.3',
    'diffusers>=0.31,<1',
    'catalogue>=2.0.10,<3',
    'omegaconf>=2.3,<3',
    'scikit-learn>=1.3',
    'matplotlib>=3.7',
    'mlxtend>=0.23',
    # The schedulefree_adamw optimizer is a built-in name; the switching between its weights reads the optimizer's
    # own state ('train_mode', 'k', 'z'), so minor versions, which may rename them, are not taken unseen.
    'schedulefree>=1.4.1,<1.5',
    'pillow',
    'tqdm',
]

# Text-to-image: a text encoder and tokenizer (model.conditioner.name: text) and CLIPScore; the package imports
# without them.
text = [
    'transformers>=4.40,<5',
    'tokenizers>=0.19',
]

extras_require = {
    'text': text,
    # The tests build a small CLIP text encoder and tokenizer.
    'dev': [
        'pytest>=8',
        'pytest-timeout>=2.3',
        'hypothesis>=6.100',
        # Lint, format and type checks (.ci/run); the versions are pinned in constraints.txt.
        'ruff>=0.17',
        'mypy>=2.4',
        *text,
    ],
}



def entry_points() -> dict[str, list[str]]:
    """The package's own ``composer_algos_<kind>`` entry points: the table in composer_algos/builtins.py, and every
    folder of composer_algos/algorithms/ under its name (the first name in its ``__init__``'s ``__all__``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, 'composer_algos', 'builtins.py')) as f:
        table = next(ast.literal_eval(node.value) for node in ast.parse(f.read()).body
                     if isinstance(node, ast.Assign) and node.targets[0].id == 'BUILTINS')
    algorithms = os.path.join(here, 'composer_algos', 'algorithms')
    for name in sorted(os.listdir(algorithms)):
        init = os.path.join(algorithms, name, '__init__.py')
        if not os.path.isfile(init):
            continue
        with open(init) as f:
            exported = next(ast.literal_eval(node.value) for node in ast.parse(f.read()).body
                            if isinstance(node, ast.Assign) and node.targets[0].id == '__all__')
        table['algorithms'][name] = f'composer_algos.algorithms.{name}:{exported[0]}'
    return {f'composer_algos_{kind}': [f'{name} = {target}' for name, target in sorted(parts.items())]
            for kind, parts in table.items()}


setup(
    name='composer-algos',
    version=VERSION,
    description='Timestep-sampling, curriculum and optimizer algorithms for diffusion training with MosaicML Composer',
    packages=find_packages(include=['composer_algos', 'composer_algos.*']),
    # The FID feature extractors' weights (composer_algos/evaluation/features.py).
    package_data={'composer_algos.evaluation': ['weights/*.pt', 'weights/manifest.json']},
    python_requires='>=3.10',
    install_requires=install_requires,
    extras_require=extras_require,
    entry_points=entry_points(),
)

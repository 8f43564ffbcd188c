"""composer-algos: faster diffusion training as MosaicML Composer algorithms."""

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
    'pillow',
    'tqdm',
]

extras_require = {
    'dev': [
        'pytest>=8',
        'pytest-timeout>=2.3',
        'hypothesis>=6.100',
    ],
}

setup(
    name='composer-algos',
    version=VERSION,
    description='Timestep-sampling, curriculum and optimizer algorithms for diffusion training with MosaicML Composer',
    packages=find_packages(include=['composer_algos', 'composer_algos.*']),
    python_requires='>=3.10',
    install_requires=install_requires,
    extras_require=extras_require,
)

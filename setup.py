"""composer-algos: faster diffusion training as MosaicML Composer algorithms."""

from setuptools import find_packages, setup

install_requires = [
    'torch==2.7.0',
    'torchvision==0.22.0',
    'mosaicml==0.32.1',
    'mosaicml-streaming==0.13.0',
    'torchmetrics[image]==1.7.4',
    'diffusers==0.39.0',
    'catalogue==2.0.10',
    'omegaconf==2.4.0',
    'scikit-learn==1.9.1',
    'matplotlib==3.11.2',
    'mlxtend==0.23.4',
    'numpy<2.3',
    'pillow',
    'tqdm',
]

extras_require = {
    'dev': [
        'pytest==9.2.0',
        'pytest-timeout==2.4.0',
        'hypothesis==6.170.15',
    ],
}

setup(
    name='composer-algos',
    version='0.1.0',
    description='Timestep-sampling, curriculum and optimizer algorithms for diffusion training with MosaicML Composer',
    packages=find_packages(include=['composer_algos', 'composer_algos.*']),
    python_requires='>=3.10',
    install_requires=install_requires,
    extras_require=extras_require,
)

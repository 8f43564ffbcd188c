"""composer-algos: faster diffusion training as MosaicML Composer algorithms."""

import importlib

__all__ = ['DiffusionModel', 'FlowMatchingModel']

__version__ = '0.2.0'

# The models are imported when first asked for (PEP 562), so that importing one leaf module, such as the registry,
# does not import the diffusion layer through this package's __init__.
_LAZY_EXPORTS = {
    'DiffusionModel': 'composer_algos.diffusion.model',
    'FlowMatchingModel': 'composer_algos.diffusion.flow_model',
}


def __getattr__(name: str) -> type:
    """The class ``name`` of :data:`_LAZY_EXPORTS`, imported from its module on first use."""
    if name in _LAZY_EXPORTS:
        return getattr(importlib.import_module(_LAZY_EXPORTS[name]), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')

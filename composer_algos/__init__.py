"""composer-algos: faster diffusion training as MosaicML Composer algorithms."""

__version__ = '0.2.0'

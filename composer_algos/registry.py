"""Name -> constructor registries, so YAML recipes and other packages can refer to parts by name.

Other packages register their own parts under the entry-point groups ``composer_algos_<kind>``
(for example ``composer_algos_algorithms``).
"""

from __future__ import annotations

import difflib
from typing import Any, Callable

import catalogue

__all__ = ['algorithms', 'callbacks', 'models', 'datasets', 'denoisers', 'encoders', 'resolve']

algorithms = catalogue.create('composer_algos', 'algorithms', entry_points=True)
callbacks = catalogue.create('composer_algos', 'callbacks', entry_points=True)
models = catalogue.create('composer_algos', 'models', entry_points=True)
datasets = catalogue.create('composer_algos', 'datasets', entry_points=True)
denoisers = catalogue.create('composer_algos', 'denoisers', entry_points=True)
# Frozen encoders from images to latents (latent diffusion).
encoders = catalogue.create('composer_algos', 'encoders', entry_points=True)


def resolve(registry: catalogue.Registry, name: str, kind: str) -> Callable[..., Any]:
    """Look ``name`` up in ``registry``; an unknown name is an error listing the closest known names."""
    _ensure_builtins()
    known_parts = registry.get_all()
    if name in known_parts:
        return known_parts[name]
    known = sorted(known_parts)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
    raise ValueError(f'Unknown {kind} {name!r}.{hint} Known {kind}s: {", ".join(known)}.')


def _ensure_builtins() -> None:
    # Importing the package modules runs their registrations.
    import composer_algos.algorithms  # noqa: F401
    import composer_algos.callbacks  # noqa: F401
    import composer_algos.data  # noqa: F401
    import composer_algos.diffusion  # noqa: F401

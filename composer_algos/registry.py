"""Name -> constructor registries, so YAML recipes and other packages can refer to parts by name.

This module imports nothing from the package. Every part is registered through the entry-point groups
``composer_algos_<kind>`` (for example ``composer_algos_algorithms``), which ``catalogue`` reads when a registry is
looked up: the package declares its built-ins there (``setup.py``, from ``composer_algos/builtins.py`` and the
algorithm folders) as other packages declare theirs, so a name resolves with no other module imported first.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import catalogue

__all__ = [
    'KINDS',
    'ConfigError',
    'algorithms',
    'build',
    'call_checked',
    'callbacks',
    'check_keys',
    'conditioners',
    'datasets',
    'denoisers',
    'encoders',
    'features',
    'loggers',
    'models',
    'named_items',
    'optimizers',
    'resolve',
    'schedulers',
    'set_argument_hooks',
    'suggest',
]

algorithms = catalogue.create('composer_algos', 'algorithms', entry_points=True)
callbacks = catalogue.create('composer_algos', 'callbacks', entry_points=True)
models = catalogue.create('composer_algos', 'models', entry_points=True)
datasets = catalogue.create('composer_algos', 'datasets', entry_points=True)
denoisers = catalogue.create('composer_algos', 'denoisers', entry_points=True)
# Frozen encoders from images to latents (latent diffusion).
encoders = catalogue.create('composer_algos', 'encoders', entry_points=True)
# What the denoiser is told about each sample: nothing, a class label, a caption through a text encoder.
conditioners = catalogue.create('composer_algos', 'conditioners', entry_points=True)
optimizers = catalogue.create('composer_algos', 'optimizers', entry_points=True)
schedulers = catalogue.create('composer_algos', 'schedulers', entry_points=True)
loggers = catalogue.create('composer_algos', 'loggers', entry_points=True)
# Feature extractors of FID (images in [-1, 1] -> features).
features = catalogue.create('composer_algos', 'features', entry_points=True)

KINDS = {
    'algorithms': algorithms,
    'callbacks': callbacks,
    'models': models,
    'datasets': datasets,
    'denoisers': denoisers,
    'encoders': encoders,
    'conditioners': conditioners,
    'optimizers': optimizers,
    'schedulers': schedulers,
    'loggers': loggers,
    'features': features,
}


class ConfigError(ValueError):
    """A recipe that cannot be built, or data or a checkpoint it points at that cannot be used; the message (one
    line) names the offending key or file and the fix."""


# Checks every checked call runs, added by the YAML layer (composer_algos.validation): the arguments against the
# callee's annotations before the call, and an explanation of a call that failed all the same.
ArgumentCheck = Callable[[Callable[..., Any], dict, str], None]
FailureExplainer = Callable[[BaseException, dict, str], 'ConfigError']
_HOOKS: dict[str, Any] = {'check': None, 'explain': None}


def set_argument_hooks(check: ArgumentCheck | None, explain: FailureExplainer | None) -> None:
    """Install the argument check and failure explainer that :func:`call_checked` uses (``None`` removes them)."""
    _HOOKS.update(check=check, explain=explain)


def suggest(key: str, allowed: Sequence[str], where: str = '') -> str:
    """`` Did you mean '<where><closest>'?`` for the closest of ``allowed``, or an empty string."""
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" Did you mean '{where}{close[0]}'?" if close else ''


def check_keys(section: dict, allowed: Sequence[str], where: str) -> None:
    """A key of ``section`` that is not in ``allowed`` is a :class:`ConfigError` naming it and the closest key."""
    for key in section:
        if key not in allowed:
            raise ConfigError(
                f"Unknown key '{where}{key}'.{suggest(key, allowed, where)} Allowed keys: {', '.join(sorted(allowed))}."
            )


def named_items(section: Any, where: str) -> list[tuple[str, dict]]:
    """``{name: kwargs}`` or ``[name, {name: kwargs}, ...]`` -> ``[(name, kwargs)]``; ``None`` kwargs -> ``{}``."""
    if section is None:
        return []
    if isinstance(section, dict):
        return [(name, dict(kwargs or {})) for name, kwargs in section.items()]
    if isinstance(section, (list, tuple)):
        items: list[tuple[str, dict[str, Any]]] = []
        for entry in section:
            if isinstance(entry, str):
                items.append((entry, {}))
            elif isinstance(entry, dict) and len(entry) == 1:
                ((name, kwargs),) = entry.items()
                items.append((name, dict(kwargs or {})))
            else:
                raise ConfigError(
                    f'{where}: each list entry must be a name or a one-key mapping name -> arguments, got {entry!r}.'
                )
        return items
    raise ConfigError(f'{where} must be a mapping of name -> arguments or a list, got {type(section).__name__}.')


def resolve(registry: catalogue.Registry, name: str, kind: str) -> Callable[..., Any]:
    """Look ``name`` up in ``registry``; an unknown name is a :class:`ConfigError` listing the closest known names."""
    known_parts = registry.get_all()
    if name in known_parts:
        return known_parts[name]
    known = sorted(known_parts)
    close = difflib.get_close_matches(name, known, n=3)
    hint = f' Did you mean {", ".join(repr(c) for c in close)}?' if close else ''
    raise ConfigError(f'Unknown {kind} {name!r}.{hint} Known {kind}s: {", ".join(known) or "none registered"}.')


def _parameters(fn: Callable[..., Any]) -> dict[str, inspect.Parameter] | None:
    """The keyword parameters ``fn`` accepts; ``None`` when it takes any (``**kwargs``). A class whose ``__init__``
    passes ``**kwargs`` on to its base's adds the base's parameters."""
    params: dict[str, inspect.Parameter]
    if not inspect.isclass(fn):
        params = dict(inspect.signature(fn).parameters)
        return None if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()) else params
    params = {}
    cls: type[Any]
    for cls in fn.__mro__:
        if '__init__' not in vars(cls) or cls is object:
            continue
        own = inspect.signature(cls.__init__).parameters
        params.update({n: p for n, p in own.items() if n not in params and p.kind != inspect.Parameter.VAR_KEYWORD})
        if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in own.values()):
            return params
    return None


def call_checked(fn: Callable[..., Any], kwargs: dict, where: str, *args: Any) -> Any:
    """``fn(*args, **kwargs)`` after checking every key against its signature (unless it takes ``**kwargs``).

    An unknown key, or a ``TypeError``/``ValueError`` from the call, is a :class:`ConfigError` naming ``where``.
    """
    params = _parameters(fn)
    if params is not None:
        skip = {'self'} | {n for n, _ in zip([p for p in params if p != 'self'], args, strict=False)}
        allowed = [n for n, p in params.items() if n not in skip and p.kind != inspect.Parameter.VAR_POSITIONAL]
        check_keys(kwargs, allowed, f'{where}.')
    if _HOOKS['check'] is not None:
        _HOOKS['check'](fn, kwargs, where)
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        if _HOOKS['explain'] is not None:
            raise _HOOKS['explain'](e, kwargs, where) from e
        raise ConfigError(f'{where}: {e}') from e


def build(
    registry: catalogue.Registry, config: dict[str, Any], kind: str, where: str, default: str = '', *args: Any
) -> Any:
    """Build the part named by ``config['name']`` (or ``default``) from ``registry`` with the other keys."""
    cfg = dict(config)
    name = cfg.pop('name', default)
    if not name:
        raise ConfigError(f"{where} needs a 'name' (one of the registered {kind}s).")
    return call_checked(resolve(registry, name, kind), cfg, where, *args)

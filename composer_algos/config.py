"""YAML recipe -> Composer Trainer.

A recipe is one YAML file (optionally ``includes:`` of reusable fragments, merged first) plus ``key=value``
overrides. Every section is checked against what its builder accepts: an unknown or mistyped key is an error
that names it and suggests the closest valid key.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from typing import Any, Callable, Optional, Sequence

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from composer_algos import registry

__all__ = [
    'ConfigError',
    'TOP_LEVEL_KEYS',
    'load_config',
    'build_model',
    'build_dataloader',
    'build_optimizer',
    'build_scheduler',
    'build_algorithms',
    'build_callbacks',
    'build_loggers',
    'build_trainer',
]

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A recipe that cannot be built, or data or a checkpoint it points at that cannot be used; the message (one
    line) names the offending key or file and the fix. The checks beyond unknown keys are in
    :mod:`composer_algos.validation`."""


# Top-level keys and their meaning. Keys passed straight to Composer's Trainer are marked 'trainer'.
TOP_LEVEL_KEYS = {
    'includes': 'YAML fragments merged before this file (paths relative to it)',
    'run_name': 'trainer',
    'seed': 'trainer',
    'max_duration': 'trainer',
    'device': 'trainer',
    'precision': 'trainer',
    'device_train_microbatch_size': 'trainer',
    'eval_interval': 'trainer',
    'eval_subset_num_batches': 'trainer',
    'save_folder': 'trainer',
    'save_interval': 'trainer',
    'save_filename': 'trainer',
    'save_latest_filename': 'trainer',
    'save_overwrite': 'trainer',
    'save_num_checkpoints_to_keep': 'trainer',
    'autoresume': 'trainer',
    'load_path': 'trainer',
    'load_weights_only': 'trainer',
    'progress_bar': 'trainer',
    'log_to_console': 'trainer',
    'console_log_interval': 'trainer',
    'python_log_level': 'trainer',
    'dist_timeout': 'trainer',
    'parallelism_config': 'trainer',
    'model': 'the DiffusionModel: denoiser, noise_schedule, prediction_type, ...',
    'train_loader': 'training data (registry: datasets)',
    'eval_loader': 'evaluation data (registry: datasets)',
    'optimizer': 'optimizer: name and its arguments',
    'scheduler': 'learning-rate scheduler: name and its arguments',
    'algorithms': 'algorithms by registry name: a mapping name -> arguments, or a list',
    'callbacks': 'callbacks by registry name: a mapping name -> arguments, or a list',
    'loggers': 'loggers by name (file, tensorboard, wandb, mlflow)',
    'prepare_data': 'convert the embedded digits dataset into train_loader.local if missing (true/false)',
}


def _suggest(key: str, allowed: Sequence[str], where: str = '') -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" Did you mean '{where}{close[0]}'?" if close else ''


def _check_keys(section: dict, allowed: Sequence[str], where: str) -> None:
    for key in section:
        if key not in allowed:
            raise ConfigError(f"Unknown key '{where}{key}'.{_suggest(key, allowed, where)} "
                              f"Allowed keys: {', '.join(sorted(allowed))}.")


def _lookup(known: dict[str, Any], name: str, kind: str) -> Any:
    if name not in known:
        raise ConfigError(f"Unknown {kind} '{name}'.{_suggest(name, list(known))} Known: {', '.join(known)}.")
    return known[name]


def _resolve(kind_registry: Any, name: str, kind: str) -> Callable[..., Any]:
    try:
        return registry.resolve(kind_registry, name, kind)
    except ValueError as e:
        raise ConfigError(str(e)) from e


def call_with_config(fn: Callable[..., Any], kwargs: dict, where: str) -> Any:
    """Call ``fn(**kwargs)`` after checking every key against its signature (unless it takes ``**kwargs``)."""
    from composer_algos import validation
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = inspect.signature(target).parameters
    if not any(p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [n for n, p in params.items() if n != 'self' and p.kind != inspect.Parameter.VAR_POSITIONAL]
        _check_keys(kwargs, allowed, f'{where}.')
    validation.check_arguments(fn, kwargs, where)
    try:
        return fn(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise validation.explain_failure(e, kwargs, where) from e


def load_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe, merge its ``includes`` (recursively) and ``key=value`` overrides; check top-level keys."""
    from composer_algos import validation
    if not os.path.isfile(path):
        raise ConfigError(f'Recipe {path!r} does not exist.')
    cfg = _load_with_includes(path, seen=())
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise ConfigError(f'Overrides must look like key=value; got {bad}.')
    if overrides:
        cfg = validation.merge_overrides(cfg, overrides)
    resolved = validation.to_container(cfg)
    _check_keys(resolved, list(TOP_LEVEL_KEYS), '')
    return resolved


def _load_with_includes(path: str, seen: tuple[str, ...]) -> DictConfig:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f'Recipe includes form a cycle: {" -> ".join(seen + (path,))}.')
    from composer_algos import validation
    cfg = validation.read_yaml(path)
    includes = cfg.pop('includes', None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged = OmegaConf.create({})
    for include in includes:
        include_path = os.path.join(os.path.dirname(path), include)
        if not os.path.isfile(include_path):
            raise ConfigError(f'{path}: included fragment {include!r} not found at {include_path}.')
        merged = OmegaConf.merge(merged, _load_with_includes(include_path, seen + (path,)))
    return OmegaConf.merge(merged, cfg)


def _named_items(section: Any, where: str) -> list[tuple[str, dict]]:
    """``{name: kwargs}`` or ``[name, {name: kwargs}, ...]`` -> ``[(name, kwargs)]``; ``None`` kwargs -> ``{}``."""
    if section is None:
        return []
    if isinstance(section, dict):
        return [(name, dict(kwargs or {})) for name, kwargs in section.items()]
    if isinstance(section, (list, ListConfig)):
        items = []
        for entry in section:
            if isinstance(entry, str):
                items.append((entry, {}))
            elif isinstance(entry, dict) and len(entry) == 1:
                (name, kwargs), = entry.items()
                items.append((name, dict(kwargs or {})))
            else:
                raise ConfigError(f'{where}: each list entry must be a name or a one-key mapping name -> arguments, '
                                  f'got {entry!r}.')
        return items
    raise ConfigError(f'{where} must be a mapping of name -> arguments or a list, got {type(section).__name__}.')


# ------------------------------------------------------------------------------------------------- model
def build_model(model_cfg: dict[str, Any]) -> torch.nn.Module:
    """Build the model section: ``name`` (default ``diffusion``) from the models registry."""
    cfg = dict(model_cfg)
    name = cfg.pop('name', 'diffusion')
    return call_with_config(_resolve(registry.models, name, 'model'), cfg, 'model')


def build_diffusion_model(denoiser: dict[str, Any], noise_schedule: Optional[dict[str, Any]] = None,
                          encoder: Optional[dict[str, Any]] = None, **kwargs: Any) -> torch.nn.Module:
    """The ``diffusion`` model: a denoiser from the denoisers registry inside a :class:`DiffusionModel`.

    ``encoder`` (optional, latent diffusion) is built from the encoders registry (default name ``vae``).
    """
    from composer_algos.diffusion import DiffusionModel, NoiseSchedule
    denoiser_cfg = dict(denoiser)
    denoiser_name = denoiser_cfg.pop('name', 'unet')
    net = call_with_config(_resolve(registry.denoisers, denoiser_name, 'denoiser'), denoiser_cfg,
                           'model.denoiser')
    schedule = call_with_config(NoiseSchedule, dict(noise_schedule or {}), 'model.noise_schedule')
    encoder_module = None
    if encoder is not None:
        encoder_cfg = dict(encoder)
        encoder_name = encoder_cfg.pop('name', 'vae')
        encoder_module = call_with_config(_resolve(registry.encoders, encoder_name, 'encoder'), encoder_cfg,
                                          'model.encoder')
        vae_scale = getattr(encoder_module, 'scaling_factor', None)
        if vae_scale is not None and abs(float(kwargs.get('latent_scale', 1.0)) - vae_scale) > 1e-6:
            log.warning('model.latent_scale=%s but the VAE was trained with scaling_factor=%s.',
                        kwargs.get('latent_scale', 1.0), vae_scale)
    allowed = [n for n in inspect.signature(DiffusionModel.__init__).parameters if n not in ('self', 'denoiser',
                                                                                            'noise_schedule',
                                                                                            'encoder')]
    _check_keys(kwargs, allowed, 'model.')
    from composer_algos import validation
    validation.check_arguments(DiffusionModel, kwargs, 'model')
    return DiffusionModel(net, schedule, encoder=encoder_module, **kwargs)


registry.models.register('diffusion', func=build_diffusion_model)


# ------------------------------------------------------------------------------------------------- data
def build_dataloader(loader_cfg: dict[str, Any], where: str = 'train_loader') -> Any:
    from composer_algos import validation
    cfg = dict(loader_cfg)
    name = cfg.pop('name', 'streaming_image')
    builder = _resolve(registry.datasets, name, 'dataset')
    validation.check_loader_files(name, cfg, where)
    return call_with_config(builder, cfg, where)


# ------------------------------------------------------------------------------------------------- optim
def _optimizers() -> dict[str, Callable[..., torch.optim.Optimizer]]:
    from composer.optim import DecoupledAdamW, DecoupledSGDW
    return {
        'adam': torch.optim.Adam,
        'adamw': torch.optim.AdamW,
        'sgd': torch.optim.SGD,
        'decoupled_adamw': DecoupledAdamW,
        'decoupled_sgdw': DecoupledSGDW,
    }


def build_optimizer(opt_cfg: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    cfg = dict(opt_cfg)
    name = cfg.pop('name', 'adamw')
    optimizer_cls = _lookup(_optimizers(), name, 'optimizer')
    from composer_algos import validation
    params = inspect.signature(optimizer_cls.__init__).parameters
    _check_keys(cfg, [n for n in params if n not in ('self', 'params')], 'optimizer.')
    validation.check_arguments(optimizer_cls, cfg, 'optimizer')
    if 'betas' in cfg:
        cfg['betas'] = tuple(cfg['betas'])
    try:
        return optimizer_cls([p for p in model.parameters() if p.requires_grad], **cfg)
    except (TypeError, ValueError) as e:
        raise validation.explain_failure(e, cfg, 'optimizer') from e


def _schedulers() -> dict[str, Any]:
    from composer.optim import scheduler as s
    return {
        'constant': s.ConstantScheduler,
        'constant_with_warmup': s.ConstantWithWarmupScheduler,
        'cosine': s.CosineAnnealingScheduler,
        'cosine_with_warmup': s.CosineAnnealingWithWarmupScheduler,
        'linear': s.LinearScheduler,
        'linear_with_warmup': s.LinearWithWarmupScheduler,
        'multistep': s.MultiStepScheduler,
        'multistep_with_warmup': s.MultiStepWithWarmupScheduler,
        'polynomial_with_warmup': s.PolynomialWithWarmupScheduler,
    }


def build_scheduler(sched_cfg: Optional[dict[str, Any]]) -> Any:
    if not sched_cfg:
        return None
    cfg = dict(sched_cfg)
    name = cfg.pop('name')
    return call_with_config(_lookup(_schedulers(), name, 'scheduler'), cfg, 'scheduler')


# ------------------------------------------------------------------------------------------------- plugins
def _build_named(section: Any, where: str, lookup: Callable[[str], Callable[..., Any]]) -> list[Any]:
    return [call_with_config(lookup(name), kwargs, f'{where}.{name}') for name, kwargs in _named_items(section, where)]


def build_algorithms(section: Any) -> list[Any]:
    return _build_named(section, 'algorithms', lambda name: _resolve(registry.algorithms, name, 'algorithm'))


def build_callbacks(section: Any) -> list[Any]:
    return _build_named(section, 'callbacks', lambda name: _resolve(registry.callbacks, name, 'callback'))


def _loggers() -> dict[str, Any]:
    from composer import loggers
    return {
        'file': loggers.FileLogger,
        'tensorboard': loggers.TensorboardLogger,
        'wandb': loggers.WandBLogger,
        'mlflow': loggers.MLFlowLogger,
        'in_memory': loggers.InMemoryLogger,
    }


def build_loggers(section: Any) -> list[Any]:
    known = _loggers()
    return _build_named(section, 'loggers', lambda name: _lookup(known, name, 'logger'))


# ------------------------------------------------------------------------------------------------- trainer
def prepare_digits(cfg: dict[str, Any]) -> None:
    """Convert the embedded digits into ``train_loader.local`` once (local rank 0 writes, others wait)."""
    from composer.utils import dist

    from composer_algos.data import convert_digits
    local = cfg.get('train_loader', {}).get('local')
    if not local:
        raise ConfigError('prepare_data: true needs train_loader.local (the folder to write the digits to).')
    if dist.get_local_rank() == 0:
        convert_digits(local)
    dist.barrier()


def build_trainer(cfg: dict[str, Any]) -> Any:
    """Build a Composer ``Trainer`` from a loaded recipe (see :func:`load_config`)."""
    from composer import Trainer
    from composer.utils import dist, reproducibility

    from composer_algos import validation
    cfg = dict(cfg)
    _check_keys(cfg, list(TOP_LEVEL_KEYS), '')
    for required in ('model', 'train_loader', 'max_duration'):
        if required not in cfg:
            raise ConfigError(f"The recipe has no '{required}' section.")
    validation.check_recipe(cfg)
    seed = int(cfg.get('seed', 17))
    reproducibility.seed_all(seed)
    device = cfg.get('device')
    # Data conversion and the per-device batch size need the process group before the Trainer makes it.
    dist.initialize_dist(validation.check_device(device), timeout=float(cfg.get('dist_timeout', 300.0)))
    if cfg.pop('prepare_data', False):
        prepare_digits(cfg)

    model = build_model(cfg.pop('model'))
    train_loader = build_dataloader(cfg.pop('train_loader'), 'train_loader')
    eval_cfg = cfg.pop('eval_loader', None)
    eval_loader = build_dataloader(eval_cfg, 'eval_loader') if eval_cfg else None
    validation.check_data_fits_model(model, train_loader, 'train_loader')
    validation.check_data_fits_model(model, eval_loader, 'eval_loader')
    optimizer = build_optimizer(cfg.pop('optimizer', {'name': 'adamw'}), model)
    scheduler = build_scheduler(cfg.pop('scheduler', None))
    algorithms = build_algorithms(cfg.pop('algorithms', None))
    validation.check_callback_loaders(cfg.get('callbacks'))
    callbacks = build_callbacks(cfg.pop('callbacks', None))
    loggers = build_loggers(cfg.pop('loggers', None))
    cfg.pop('includes', None)
    trainer_kwargs = {k: v for k, v in cfg.items() if TOP_LEVEL_KEYS.get(k) == 'trainer'}
    trainer_kwargs['seed'] = seed
    validation.check_checkpoints(trainer_kwargs)
    return Trainer(
        model=model,
        train_dataloader=train_loader,
        eval_dataloader=eval_loader,
        optimizers=optimizer,
        schedulers=scheduler,
        algorithms=algorithms,
        callbacks=callbacks,
        loggers=loggers,
        **trainer_kwargs,
    )

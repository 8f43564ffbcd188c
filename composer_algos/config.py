"""YAML recipe -> Composer Trainer.

A recipe is one YAML file (optionally ``includes:`` of reusable fragments, merged first) plus ``key=value``
overrides. Every section is checked against what its builder accepts: an unknown or mistyped key is an error
that names it and suggests the closest valid key.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from omegaconf import DictConfig, OmegaConf

from composer_algos import registry, validation
from composer_algos.registry import ConfigError, call_checked, check_keys, named_items, suggest
from composer_algos.validation import TOP_LEVEL_KEYS

if TYPE_CHECKING:
    from composer.models import ComposerModel

# Every part a recipe builds gets its arguments checked against the callee's annotations.
registry.set_argument_hooks(validation.check_arguments, validation.explain_failure)

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


def call_with_config(fn: Callable[..., Any], kwargs: dict, where: str) -> Any:
    """Call ``fn(**kwargs)`` after checking every key against its signature (see :func:`registry.call_checked`)."""
    return call_checked(fn, kwargs, where)


def load_config(path: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Read a recipe, merge its ``includes`` (recursively) and ``key=value`` overrides; check top-level keys."""
    if not os.path.isfile(path):
        raise ConfigError(f'Recipe {path!r} does not exist.')
    cfg = _load_with_includes(path, seen=())
    bad = [o for o in overrides if '=' not in o]
    if bad:
        raise ConfigError(f'Overrides must look like key=value; got {bad}.')
    if overrides:
        cfg = validation.merge_overrides(cfg, overrides)
    resolved = validation.to_container(cfg)
    check_keys(resolved, list(TOP_LEVEL_KEYS), '')
    return resolved


def _load_with_includes(path: str, seen: tuple[str, ...]) -> DictConfig:
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f'Recipe includes form a cycle: {" -> ".join((*seen, path))}.')
    cfg = validation.read_yaml(path)
    includes = cfg.pop('includes', None) or []
    if isinstance(includes, str):
        includes = [includes]
    merged = OmegaConf.create({})
    for include in includes:
        include_path = os.path.join(os.path.dirname(path), include)
        if not os.path.isfile(include_path):
            raise ConfigError(f'{path}: included fragment {include!r} not found at {include_path}.')
        # Mappings merged into a mapping: a DictConfig.
        merged = cast(DictConfig, OmegaConf.merge(merged, _load_with_includes(include_path, (*seen, path))))
    return cast(DictConfig, OmegaConf.merge(merged, cfg))


# ------------------------------------------------------------------------------------------------- model
def build_model(model_cfg: dict[str, Any]) -> ComposerModel:
    """Build the model section: ``name`` (default ``diffusion``) from the models registry."""
    return registry.build(registry.models, model_cfg, 'model', 'model', default='diffusion')


# ------------------------------------------------------------------------------------------------- data
def build_dataloader(loader_cfg: dict[str, Any], where: str = 'train_loader') -> Any:
    cfg = dict(loader_cfg)
    validation.check_loader_files(
        cfg.get('name', 'streaming_image'), {k: v for k, v in cfg.items() if k != 'name'}, where
    )
    return registry.build(registry.datasets, cfg, 'dataset', where, default='streaming_image')


# ------------------------------------------------------------------------------------------------- optim
def build_optimizer(opt_cfg: dict[str, Any], model: torch.nn.Module) -> torch.optim.Optimizer:
    cfg = dict(opt_cfg)
    if 'betas' in cfg:
        cfg['betas'] = tuple(cfg['betas'])
    params = [p for p in model.parameters() if p.requires_grad]
    return registry.build(registry.optimizers, cfg, 'optimizer', 'optimizer', 'adamw', params)


def build_scheduler(sched_cfg: dict[str, Any] | None) -> Any:
    if not sched_cfg:
        return None
    return registry.build(registry.schedulers, sched_cfg, 'scheduler', 'scheduler')


# ------------------------------------------------------------------------------------------------- plugins
def _build_named(section: Any, where: str, lookup: Callable[[str], Callable[..., Any]]) -> list[Any]:
    return [call_with_config(lookup(name), kwargs, f'{where}.{name}') for name, kwargs in named_items(section, where)]


def build_algorithms(section: Any) -> list[Any]:
    return _build_named(section, 'algorithms', lambda name: registry.resolve(registry.algorithms, name, 'algorithm'))


def build_callbacks(section: Any) -> list[Any]:
    return _build_named(section, 'callbacks', lambda name: registry.resolve(registry.callbacks, name, 'callback'))


def build_loggers(section: Any) -> list[Any]:
    return _build_named(section, 'loggers', lambda name: registry.resolve(registry.loggers, name, 'logger'))


# ------------------------------------------------------------------------------------------------- trainer
def prepare_data(cfg: dict[str, Any], dataset: Any = True) -> None:
    """Convert a bundled dataset into ``train_loader.local`` once (local rank 0 writes, others wait).

    ``dataset``: the recipe's ``prepare_data`` value, ``true`` (the digits, as before there was a choice) or a
    name from :data:`~composer_algos.data.convert.BUNDLED_DATASETS`. MNIST is written at ``train_loader.image_size``
    (28 when unset).
    """
    from composer.utils import dist

    from composer_algos.data.convert import BUNDLED_DATASETS, convert_bundled

    name = 'digits' if dataset is True else dataset
    if name not in BUNDLED_DATASETS:
        raise ConfigError(
            f'prepare_data must be true, false or one of {", ".join(BUNDLED_DATASETS)}; got '
            f'{dataset!r}.{suggest(str(dataset), list(BUNDLED_DATASETS))}'
        )
    loader = cfg.get('train_loader', {})
    local = loader.get('local')
    if not local:
        raise ConfigError(f'prepare_data: {dataset} needs train_loader.local (the folder to write the {name} to).')
    if dist.get_local_rank() == 0:
        convert_bundled(name, local, image_size=loader.get('image_size') if name == 'mnist5k' else None)
    dist.barrier()


def build_trainer(cfg: dict[str, Any]) -> Any:
    """Build a Composer ``Trainer`` from a loaded recipe (see :func:`load_config`)."""
    from composer import Trainer
    from composer.utils import dist, reproducibility

    from composer_algos.algorithms.schedule_free import add_schedule_free

    cfg = dict(cfg)
    check_keys(cfg, list(TOP_LEVEL_KEYS), '')
    for required in ('model', 'train_loader', 'max_duration'):
        if required not in cfg:
            raise ConfigError(f"The recipe has no '{required}' section.")
    validation.check_recipe(cfg)
    seed = int(cfg.get('seed', 17))
    reproducibility.seed_all(seed)
    device = cfg.get('device')
    # Data conversion and the per-device batch size need the process group before the Trainer makes it.
    dist.initialize_dist(validation.check_device(device), timeout=float(cfg.get('dist_timeout', 300.0)))
    dataset = cfg.pop('prepare_data', False)
    if dataset:
        prepare_data(cfg, dataset)

    model_cfg = cfg.pop('model')
    model = build_model(copy.deepcopy(model_cfg))
    train_loader = build_dataloader(cfg.pop('train_loader'), 'train_loader')
    eval_cfg = cfg.pop('eval_loader', None)
    eval_loader = build_dataloader(eval_cfg, 'eval_loader') if eval_cfg else None
    validation.check_data_fits_model(model, train_loader, 'train_loader')
    validation.check_data_fits_model(model, eval_loader, 'eval_loader')
    optimizer = build_optimizer(cfg.pop('optimizer', {'name': 'adamw'}), model)
    scheduler = build_scheduler(cfg.pop('scheduler', None))
    algorithms = build_algorithms(cfg.pop('algorithms', None))
    # A schedule-free optimizer trains at other weights than it evaluates: the switching comes with it.
    algorithms = add_schedule_free(optimizer, algorithms)
    validation.check_callback_loaders(cfg.get('callbacks'))
    callbacks = build_callbacks(cfg.pop('callbacks', None))
    loggers = build_loggers(cfg.pop('loggers', None))
    cfg.pop('includes', None)
    trainer_kwargs = {k: v for k, v in cfg.items() if TOP_LEVEL_KEYS.get(k) == 'trainer'}
    trainer_kwargs['seed'] = seed
    validation.check_checkpoints(trainer_kwargs, model, model_cfg)
    trainer = Trainer(
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
    if hasattr(model, 'recipe'):
        # Saved in every checkpoint from now on, so that a checkpoint that does not fit a model can say what wrote
        # it. Set after the Trainer loaded any checkpoint: a sharded one is read into the shape of the model's
        # state, and one written before models recorded their recipe has no entry for it.
        # (torch types a Module's attributes as tensors or modules.)
        model.recipe = {'run_name': trainer.state.run_name, 'model': model_cfg}  # type: ignore[assignment]
    return trainer

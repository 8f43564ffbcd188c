"""Checks that stop a recipe before its first training step, each with one line naming the key or file and the fix.

:mod:`composer_algos.config` calls these while it builds the parts of a run: the YAML syntax (file, line, column),
every value against the type annotations of the function or class it is passed to (durations parsed as Composer
``Time`` strings, enumerations against their values), counts (batch sizes positive and divisible by the world size,
``max_duration`` positive), the algorithms' declared roles (one owner of the timestep sampler), the MDS files a
loader points at (:mod:`composer_algos.data.integrity`), the data's shape against the denoiser (its ``in_channels``
and ``sample_size``, then one no-grad forward of a single example), and the checkpoint a run would load, readable and
fitting the model tensor for tensor (:mod:`composer_algos.checkpoint_integrity`). Each failure is a
:class:`~composer_algos.registry.ConfigError`.
"""

from __future__ import annotations

import collections.abc
import enum
import inspect
import json
import os
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Union, cast

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from composer_algos.registry import ConfigError, algorithms, check_keys, named_items, resolve

__all__ = [
    'TOP_LEVEL_KEYS',
    'read_yaml',
    'merge_overrides',
    'to_container',
    'check_arguments',
    'explain_failure',
    'check_recipe',
    'check_device',
    'check_loader_files',
    'check_callback_loaders',
    'check_data_fits_model',
    'check_checkpoints',
]

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
    'prepare_data': 'convert a bundled dataset into train_loader.local if missing: true (digits), digits, mnist5k, '
    'digits_captions or false',
}

_DURATION = 'a duration such as 500ba, 2ep or 0.5dur'
# A sensible max_duration in each unit, for messages.
_DURATION_EXAMPLES = {'ba': '2000ba', 'ep': '10ep', 'sp': '256000sp', 'tok': '1000000tok'}


def _one_line(text: str) -> str:
    return ' '.join(str(text).split())


# ------------------------------------------------------------------------------------------------- YAML
def read_yaml(path: str) -> DictConfig:
    """``OmegaConf.load`` with a syntax error reported as ``FILE:LINE:COLUMN: problem``."""
    try:
        cfg = OmegaConf.load(path)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f'{path}:{mark.line + 1}:{mark.column + 1}' if mark is not None else path
        context = ''
        if e.context and e.context_mark is not None and e.context_mark is not mark:
            context = f' ({e.context} at line {e.context_mark.line + 1}, column {e.context_mark.column + 1})'
        raise ConfigError(
            _one_line(f'{where}: YAML syntax error: {e.problem or e.context}{context}; fix the recipe there')
        ) from e
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise ConfigError(_one_line(f'{path}: cannot be read as YAML ({e})')) from e
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f'Recipe {path!r} must be a mapping at the top level.')
    return cfg


def merge_overrides(cfg: DictConfig, overrides: Sequence[str]) -> DictConfig:
    """``cfg`` with ``key=value`` overrides merged in; an override that does not parse is named."""
    for override in overrides:
        # Each override is parsed alone so that the one that does not parse can be named.
        try:
            OmegaConf.from_dotlist([override])
        except (yaml.YAMLError, OmegaConfBaseException) as e:  # noqa: PERF203
            problem = getattr(e, 'problem', None) or str(e).splitlines()[0]
            raise ConfigError(
                _one_line(
                    f'override {override!r}: the value is not valid YAML ({problem}); quote it, e.g. key=\'"text"\''
                )
            ) from e
    try:
        # A mapping merged into a mapping: a DictConfig.
        return cast(DictConfig, OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides))))
    except OmegaConfBaseException as e:
        raise ConfigError(_one_line(f'overrides {list(overrides)}: {e}')) from e


def to_container(cfg: DictConfig) -> dict[str, Any]:
    """The recipe as plain dicts and lists, ``${...}`` interpolations resolved (a broken one names its key)."""
    try:
        resolved = OmegaConf.to_container(cfg, resolve=True)
    except OmegaConfBaseException as e:
        key = getattr(e, 'full_key', None)
        message = str(e).splitlines()[0]
        raise ConfigError(_one_line(f'{key or "recipe"}: {message}; fix the ${{...}} reference')) from e
    assert isinstance(resolved, dict)
    return cast(dict[str, Any], resolved)  # a recipe's keys are strings


# ------------------------------------------------------------------------------------------------- types
def _is_time(annotation: Any) -> bool:
    from composer.core import Time

    return annotation is Time or typing.get_origin(annotation) is Time


def _is_timestring(value: str) -> bool:
    from composer.core import Time

    try:
        Time.from_timestring(value)
    except ValueError:
        return False
    return True


def _is_enum(annotation: Any) -> bool:
    return inspect.isclass(annotation) and issubclass(annotation, enum.Enum)


def _enum_accepts(annotation: Any, value: Any) -> bool:
    try:
        annotation(value)
    except (ValueError, KeyError, TypeError):
        return False
    return True


def _is_other_class(annotation: Any) -> bool:
    """A class YAML cannot write (a tensor, a module, a device), as opposed to the ones :func:`_fits` knows."""
    known = (bool, int, float, str, list, tuple, dict, type(None), Any, object)
    return (
        inspect.isclass(annotation)
        and annotation not in known
        and not _is_enum(annotation)
        and not _is_time(annotation)
        and typing.get_origin(annotation) is None
    )


def _union_members(annotation: Any) -> tuple | None:
    origin = typing.get_origin(annotation)
    if origin is Union or (hasattr(types, 'UnionType') and origin is types.UnionType):
        return typing.get_args(annotation)
    return None


_SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable, collections.abc.MutableSequence)
_MAPPINGS = (dict, collections.abc.Mapping, collections.abc.MutableMapping)


def _fits(value: Any, annotation: Any) -> bool:
    """Whether a value read from YAML fits ``annotation``. Unknown classes accept anything (only what can be
    judged is judged); in a union with ``Time`` (or an enumeration) a string must be a duration (or a value)."""
    if annotation in (inspect.Parameter.empty, Any, object) or isinstance(annotation, (str, typing.TypeVar)):
        return True
    members = _union_members(annotation)
    if members is not None:
        if isinstance(value, str) and any(_is_time(m) for m in members):
            return _is_timestring(value)
        if isinstance(value, str) and any(_is_enum(m) for m in members):
            return any(_enum_accepts(m, value) for m in members if _is_enum(m))
        # A union lists what it takes: a YAML value fits a class of it only by being an instance.
        return any(_fits(value, m) if not _is_other_class(m) else isinstance(value, m) for m in members)
    if annotation is type(None):
        return value is None
    if _is_time(annotation):
        return _is_timestring(value) if isinstance(value, str) else True
    origin = typing.get_origin(annotation) or annotation
    if origin is typing.Literal:
        return value in typing.get_args(annotation)
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if _is_enum(annotation):
        return isinstance(value, annotation) or _enum_accepts(annotation, value)
    if origin in _SEQUENCES:
        if not isinstance(value, (list, tuple)):
            return False
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
        return all(_fits(v, args[0]) for v in value) if args else True
    if origin in _MAPPINGS:
        return isinstance(value, dict)
    if origin is collections.abc.Callable:
        return callable(value)
    return True


def _describe(annotation: Any) -> str:
    """What ``annotation`` asks of a YAML value, in words ('' for what YAML cannot write)."""
    members = _union_members(annotation)
    if members is not None:
        if any(_is_time(m) or _is_enum(m) for m in members):
            members = tuple(m for m in members if m is not str)
        parts = []
        for member in members:
            part = _describe(member)
            if part and part not in parts:
                parts.append(part)
        return ' or '.join(parts)
    if annotation is type(None):
        return 'null'
    if _is_time(annotation):
        return _DURATION
    origin = typing.get_origin(annotation) or annotation
    if origin is typing.Literal:
        return 'one of ' + ', '.join(str(a) for a in typing.get_args(annotation))
    simple = {bool: 'true or false', int: 'an integer', float: 'a number', str: 'a string'}
    if annotation in simple:
        return simple[annotation]
    if _is_enum(annotation):
        return 'one of ' + ', '.join(str(m.value) for m in annotation)
    if origin in _SEQUENCES:
        args = typing.get_args(annotation)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return (
                f'a list of {len(args)} items, each {_describe(args[0])}'
                if len(set(args)) == 1
                else f'a list of {len(args)} items ({", ".join(_describe(a) for a in args)})'
            )
        return f'a list, each item {_describe(args[0])}' if args else 'a list'
    if origin in _MAPPINGS:
        return 'a mapping'
    return ''


def _yaml_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def _type_hints(fn: Callable[..., Any]) -> tuple[dict[str, inspect.Parameter], dict[str, Any]]:
    target = fn.__init__ if inspect.isclass(fn) else fn
    params = dict(inspect.signature(target).parameters)
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve (a name imported only for type checkers)
        hints = {n: p.annotation for n, p in params.items() if not isinstance(p.annotation, str)}
    return params, hints


def check_arguments(
    fn: Callable[..., Any], kwargs: dict[str, Any], where: str, also: Sequence[Callable[..., Any]] = ()
) -> None:
    """Check each of ``kwargs`` against the annotation (or, without one, the default's type) of the parameter of
    ``fn`` it goes to; ``also``: where ``fn`` passes its ``**kwargs`` on. A mismatch names ``where.key`` (``key``
    alone for ``where=''``)."""
    prefix = f'{where}.' if where else ''
    params, hints = _type_hints(fn)
    for extra in also:
        more_params, more_hints = _type_hints(extra)
        for name in more_params:
            if name not in params:
                params[name], hints[name] = more_params[name], more_hints.get(name, inspect.Parameter.empty)
    for name, value in kwargs.items():
        param = params.get(name)
        if param is None or param.kind in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL):
            continue
        annotation = hints.get(name, inspect.Parameter.empty)
        default = param.default
        if annotation is inspect.Parameter.empty and default is not inspect.Parameter.empty and default is not None:
            annotation = float if type(default) is int else type(default)  # an int default often stands for a number
            if annotation not in (bool, int, float, str):
                continue
        if _fits(value, annotation):
            continue
        expected = _describe(annotation) or 'another type'
        example = ''
        if (
            default is not inspect.Parameter.empty
            and default is not None
            and _fits(default, annotation)
            and isinstance(default, (bool, int, float, str, tuple, list))
            and _DURATION not in expected
        ):
            example = f', e.g. {prefix}{name}={_yaml_text(list(default) if isinstance(default, tuple) else default)}'
        raise ConfigError(_one_line(f'{prefix}{name}={_yaml_text(value)}: expected {expected}{example}.'))


def explain_failure(error: BaseException, kwargs: dict[str, Any], where: str) -> ConfigError:
    """A builder's own ``TypeError``/``ValueError`` as a ConfigError, naming the key whose value it quotes."""
    message = _one_line(str(error))
    if message.startswith('Invalid time string'):
        message += f'; expected {_DURATION}'
    for name, value in kwargs.items():
        text = _yaml_text(value)
        if (
            isinstance(value, (str, int, float))
            and not isinstance(value, bool)
            and len(text) > 1
            and (f': {text}' in message or repr(value) in message or f'={text}' in message)
        ):
            return ConfigError(f'{where}.{name}={text}: {message}')
    for name in kwargs:
        if len(name) > 2 and re.search(rf'(?<![\w.]){re.escape(name)}\b', message):
            return ConfigError(f'{where}.{name}: {message}')
    return ConfigError(f'{where}: {message}')


# ------------------------------------------------------------------------------------------------- recipe
# Sections and what they must be. A section's own keys are checked by its builder.
_SECTIONS = {
    'model': (dict,),
    'train_loader': (dict,),
    'eval_loader': (dict, type(None)),
    'optimizer': (dict,),
    'scheduler': (dict, type(None)),
    'algorithms': (dict, list, type(None)),
    'callbacks': (dict, list, type(None)),
    'loggers': (dict, list, type(None)),
    'prepare_data': (bool, str),  # a name is checked against the bundled datasets when the data is prepared
}


def check_recipe(cfg: dict[str, Any]) -> None:
    """Top-level values: sections are mappings (or lists), Trainer arguments fit the Trainer's annotations."""
    from composer import Trainer

    for key, kinds in _SECTIONS.items():
        if key in cfg and not isinstance(cfg[key], kinds):
            expected = ' or '.join(
                {
                    dict: 'a mapping',
                    list: 'a list',
                    type(None): 'null',
                    bool: 'true or false',
                    str: 'the name of a bundled dataset',
                }[k]
                for k in kinds
            )
            raise ConfigError(_one_line(f'{key}={_yaml_text(cfg[key])}: expected {expected}.'))
    trainer_args = {k: v for k, v in cfg.items() if TOP_LEVEL_KEYS.get(k) == 'trainer'}
    check_arguments(Trainer, trainer_args, '')
    if cfg.get('autoresume') and not cfg.get('save_folder'):
        raise ConfigError('autoresume=true needs save_folder (where checkpoints are written and looked for).')
    if cfg.get('autoresume') and not cfg.get('run_name'):
        raise ConfigError('autoresume=true needs run_name (it names the run whose checkpoints are resumed).')
    _check_max_duration(cfg)
    _check_microbatch_size(cfg.get('device_train_microbatch_size'))
    _check_algorithm_roles(cfg.get('algorithms'))


def _check_max_duration(cfg: dict[str, Any]) -> None:
    """``max_duration`` is a positive time in batches, epochs, samples or tokens: anything else never trains."""
    from composer.core import Time, TimeUnit

    if 'max_duration' not in cfg:
        return
    value = cfg['max_duration']
    # Composer reads a bare integer as epochs.
    duration = Time.from_input(value, TimeUnit.EPOCH) if value is not None else None
    if duration is None or duration.unit == TimeUnit.DURATION:
        why = 'it is a fraction of max_duration itself' if duration is not None else 'a recipe trains for a set time'
        raise ConfigError(
            f'max_duration={_yaml_text(value)}: {why}; give batches, epochs, samples or tokens, e.g. '
            'max_duration=2000ba.'
        )
    if duration.value <= 0:
        raise ConfigError(
            f'max_duration={_yaml_text(value)}: it must be positive (a run of {duration} trains '
            f'nothing), e.g. max_duration={_DURATION_EXAMPLES.get(duration.unit.value, "2000ba")}.'
        )


def _check_microbatch_size(size: Any) -> None:
    """A numeric ``device_train_microbatch_size`` splits each device batch: it must be positive."""
    if isinstance(size, (int, float)) and not isinstance(size, bool) and size <= 0:
        raise ConfigError(
            f'device_train_microbatch_size={size}: it must be positive (examples per forward pass on '
            'each device), or auto; e.g. device_train_microbatch_size=auto.'
        )


def _check_algorithm_roles(section: Any) -> None:
    """Algorithms that cannot run together, told from their classes' declared roles before any model is built."""
    from composer_algos.algorithms.base import check_timestep_sampler_owners

    check_timestep_sampler_owners(
        [
            (f'algorithms.{name}', resolve(algorithms, name, 'algorithm'))
            for name, _ in named_items(section, 'algorithms')
        ]
    )


def check_device(device: str | None) -> Any:
    """Composer's device for ``device``; one that does not exist here is named."""
    from composer.utils import get_device

    try:
        return get_device(device)
    except Exception as e:  # ImportError (tpu), RuntimeError or AssertionError (gpu without CUDA), ValueError
        available = 'cpu and gpu' if torch.cuda.is_available() else 'cpu'
        raise ConfigError(
            _one_line(
                f'device={device}: not usable here ({type(e).__name__}: '
                f'{str(e).splitlines()[0] if str(e) else "no details"}); this machine has '
                f'{available}'
            )
        ) from e


# ------------------------------------------------------------------------------------------------- data
def check_loader_files(name: str, cfg: dict[str, Any], where: str) -> None:
    """The MDS files of a ``streaming_image`` loader with local data: index, shard sizes and headers (and hashes
    with ``validate_hash``). Data streamed from ``remote`` is checked by streaming as it downloads."""
    from streaming import StreamingDataset

    from composer_algos.data.integrity import DataError, check_mds_folder
    from composer_algos.data.streaming import StreamingImageDataset, build_streaming_image_dataloader

    if name != 'streaming_image':
        return
    # The loader passes its other arguments on to the dataset, which passes its own on to streaming's; it sets
    # the per-device batch size and batching itself.
    parts = (build_streaming_image_dataloader, StreamingImageDataset.__init__, StreamingDataset.__init__)
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    check_keys(
        cfg,
        sorted(
            {
                n
                for part in parts
                for n, p in inspect.signature(part).parameters.items()
                if p.kind in kinds and n not in ('self', 'batch_size', 'yield_batches')
            }
        ),
        f'{where}.',
    )
    check_arguments(build_streaming_image_dataloader, cfg, where, also=parts[1:])
    if 'global_batch_size' in cfg:
        from composer_algos.data.streaming import global_batch_size_problem
        from composer_algos.distributed import rank_world

        problem = global_batch_size_problem(cfg['global_batch_size'], rank_world()[1])
        if problem is not None:
            raise ConfigError(f'{where}.global_batch_size={cfg["global_batch_size"]}: {problem}.')
    if cfg.get('remote'):
        return
    local, split = cfg.get('local'), cfg.get('split')
    if not local:
        raise ConfigError(f'{where}.local is not set: give the folder of the MDS shards (or {where}.remote).')
    folder = os.path.join(local, split) if split else local
    if not os.path.isfile(os.path.join(folder, 'index.json')):
        raise ConfigError(
            _one_line(
                f'{where}.local={local}: no MDS dataset at {folder} (index.json missing); create it with `python '
                f'recipes/convert_dataset.py --dataset digits --out {local}` (or prepare_data: true for the digits), '
                f'or set {where}.remote to stream it from object storage.'
            )
        )
    try:
        check_mds_folder(folder, cfg.get('validate_hash'))
    except DataError as e:
        raise ConfigError(_one_line(f'{where}: {e}')) from e


def check_callback_loaders(section: Any) -> None:
    """The data of loaders given inside callbacks (``callbacks.fid.real_loader``, ``callbacks.bits_per_dim.loader``),
    which the callbacks build only at their first evaluation, checked now like ``eval_loader``."""
    for name, kwargs in named_items(section, 'callbacks'):
        for key, value in kwargs.items():
            if key.endswith('loader') and isinstance(value, dict):
                loader = dict(value)
                check_loader_files(loader.pop('name', 'streaming_image'), loader, f'callbacks.{name}.{key}')


def _fixed_shape(shard: Any, column: str) -> tuple[int, ...] | None:
    names, encodings = list(shard.column_names), list(shard.column_encodings)
    parts = encodings[names.index(column)].split(':')
    if len(parts) == 3 and parts[0] == 'ndarray':
        return tuple(int(d) for d in parts[2].split(','))
    return None


def _data_shape(dataset: Any, where: str) -> tuple[tuple[int, ...], str]:
    """``((C, H, W) of one example as the loader yields it, where that shape was read)``."""
    column = dataset.column
    source = os.path.join(dataset.streams[0].local, dataset.streams[0].split or '', 'index.json')
    for shard in dataset.shards:
        if column not in shard.column_names:
            hint = (
                f'; these shards hold latents: set {where}.latents=true and model.encoder.precomputed=true'
                if 'latents' in shard.column_names
                else f'; these shards hold images: set {where}.latents=false'
                if 'image' in shard.column_names
                else ''
            )
            raise ConfigError(
                _one_line(
                    f'{where}: the shards in {source} have no {column!r} column (columns: '
                    f'{", ".join(shard.column_names)}){hint}.'
                )
            )
    found = {_fixed_shape(shard, column) for shard in dataset.shards}
    shapes = {shape for shape in found if shape is not None}
    if None not in found and len(shapes) > 1:
        raise ConfigError(
            _one_line(
                f'{where}: the shards in {source} hold {column} of different shapes '
                f'{sorted(shapes)}; write them at one size (--resize).'
            )
        )
    if None in found:
        try:
            shape = tuple(dataset[0]['image'].shape)
        except ValueError as e:
            raise ConfigError(_one_line(f'{where}: {e}')) from e
        return shape, f'sample 0 of {source}'
    (shape,) = shapes
    return shape, source


def _denoiser_config(denoiser: torch.nn.Module) -> Any:
    """The diffusers-style ``config`` (with ``in_channels``) of the denoiser or of the model it wraps."""
    for module in (denoiser, *denoiser.children()):
        config = getattr(module, 'config', None)
        if config is not None and hasattr(config, 'in_channels'):
            return config
    return None


def check_data_fits_model(model: torch.nn.Module, loader: Any, where: str) -> None:
    """The loader's examples against the model: batch keys, channels, image size, and one no-grad forward.

    The shape comes from the shards' declared column type (or one decoded example); the example is zeros of that
    shape, through the encoder (if any) and the denoiser in eval mode, so no state of the model changes.
    """
    from composer_algos.data.streaming import StreamingImageDataset

    dataset = getattr(loader, 'dataset', None)
    if not isinstance(dataset, StreamingImageDataset) or not hasattr(model, 'denoise'):
        return
    shape, source = _data_shape(dataset, where)
    channels, size = shape[0], shape[1:]
    kind = 'latents' if dataset.latents else 'images'
    if dataset.channels is not None and channels != dataset.channels:
        if dataset.latents or {channels, dataset.channels} != {1, 3}:
            raise ConfigError(
                f'{where}.channels={dataset.channels}: the {kind} in {source} have '
                f'{_channels(channels)}; set {where}.channels={channels}.'
            )
        channels = dataset.channels
    if dataset.image_size is not None and tuple(size) != (dataset.image_size, dataset.image_size):
        raise ConfigError(
            f'{where}.image_size={dataset.image_size}: the {kind} in {source} are '
            f'{"x".join(map(str, size))}; set {where}.image_size={size[0]}, or resize them when '
            'converting (--resize).'
        )
    for key, value, allowed in (
        ('image_key', model.image_key, ('image',)),
        ('label_key', model.label_key, (None, 'label')),
    ):
        if value not in allowed:
            raise ConfigError(
                f"model.{key}={value}: the {where} batches hold the keys 'image' and 'label'; set "
                f'model.{key}={allowed[-1]}.'
            )
    _check_conditioning_columns(model, dataset, source, where)
    if len(loader) == 0:
        from composer.utils import dist

        assert dataset.batch_size is not None, 'a loader that batches has a batch size'
        raise ConfigError(
            f'{where}.global_batch_size={dataset.batch_size * dist.get_world_size()}: its per-rank batch '
            f'of {dataset.batch_size} is more than the {len(dataset)} examples each rank reads from '
            f'{source}, so an epoch has no batch; lower it.'
        )
    _check_forward(model, (channels, *size), source, where)


def _check_conditioning_columns(model: torch.nn.Module, dataset: Any, source: str, where: str) -> None:
    """The batch keys the model's conditioner reads (captions, stored text embeddings) against what the loader
    gives."""
    conditioner = getattr(model, 'conditioner', None)
    gives = {'image', 'label', *getattr(dataset, 'text_columns', ())}
    missing = [key for key in getattr(conditioner, 'batch_keys', ()) if key not in gives]
    if not missing:
        return
    assert conditioner is not None, 'only a conditioner reads batch keys'
    in_shards = all(missing[0] in shard.column_names for shard in dataset.shards)
    fix = (
        f'set {where}.caption_embeddings=true to read it'
        if in_shards
        else 'write shards with captions (`python recipes/convert_dataset.py --dataset folder --captions ...`, or '
        '--dataset digits_captions)'
        + (' and their text embeddings (--encode-captions)' if missing[0] != 'caption' else '')
    )
    raise ConfigError(
        _one_line(
            f'model.conditioner ({conditioner.kind}) reads the batch key {missing[0]!r}, but the '
            f'{where} batches from {source} have none (columns: '
            f'{", ".join(dataset.shards[0].column_names)}); {fix}, or change '
            'model.conditioner.'
        )
    )


def _check_forward(model: Any, shape: tuple[int, ...], source: str, where: str) -> None:
    # Where the model is now (the Trainer moves it later): on its device the example is an ordinary batch.
    device = next(model.parameters(), torch.zeros(0)).device
    batch = {'image': torch.zeros(1, *shape).to(device), 'label': torch.zeros(1, dtype=torch.long).to(device)}
    conditioner = getattr(model, 'conditioner', None)
    if conditioner is not None:
        batch.update({k: v.to(device) if torch.is_tensor(v) else v for k, v in conditioner.example_batch(1).items()})
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            try:
                x0 = model.images(batch)
            except Exception as e:
                raise ConfigError(
                    _one_line(
                        f'model.encoder does not take the {where} data of shape '
                        f'{tuple(batch["image"].shape)} from {source} ({type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}); check model.encoder '
                        f'(latent shards need {where}.latents=true and '
                        'model.encoder.precomputed=true).'
                    )
                ) from e
            config = _denoiser_config(model.denoiser)
            if config is not None:
                _compare_config(config, tuple(x0.shape[1:]), source, where, model.encoder is not None)
            t = torch.zeros(x0.shape[0], dtype=torch.long).to(device)
            try:
                model.denoise(x0, t, model.conditioning(batch))
            except Exception as e:
                raise ConfigError(
                    _one_line(
                        f'model.denoiser does not take the {where} data (a batch of shape '
                        f'{tuple(x0.shape)} from {source}): {type(e).__name__}: '
                        f'{str(e).splitlines()[0] if str(e) else ""}; check model.denoiser '
                        'against the data.'
                    )
                ) from e
    finally:
        for module, training in modes:
            module.training = training


def _channels(count: int) -> str:
    return f'{count} channel' + ('' if count == 1 else 's')


def _compare_config(config: Any, shape: tuple[int, ...], source: str, where: str, latent: bool) -> None:
    what = 'latents of' if latent else 'data in'
    channels, size = shape[0], shape[1:]
    in_channels = getattr(config, 'in_channels', None)
    if in_channels is not None and in_channels != channels:
        alternative = f' or {where}.channels={in_channels}' if not latent and {channels, in_channels} == {1, 3} else ''
        raise ConfigError(
            f'model.denoiser.in_channels={in_channels}: the {what} {source} have {_channels(channels)}; '
            f'set model.denoiser.in_channels={channels}{alternative}.'
        )
    sample_size = getattr(config, 'sample_size', None)
    if sample_size is not None:
        expected = tuple(sample_size) if isinstance(sample_size, (list, tuple)) else (sample_size, sample_size)
        if expected != tuple(size):
            raise ConfigError(
                f'model.denoiser.sample_size={sample_size}: the {what} {source} are '
                f'{"x".join(map(str, size))}; set model.denoiser.sample_size={size[0]}.'
            )


# ------------------------------------------------------------------------------------------------- checkpoints
def check_checkpoints(
    cfg: dict[str, Any], model: torch.nn.Module | None = None, model_config: dict[str, Any] | None = None
) -> None:
    """The checkpoint a run would load: ``load_path`` must be readable; with ``autoresume``, the newest readable
    checkpoint in ``save_folder`` is made the one Composer resumes from (see
    :mod:`composer_algos.checkpoint_integrity`); and the one that will be loaded must fit ``model`` (the model built
    from ``model_config``, the recipe's section), tensor for tensor.

    Global rank 0 inspects and repairs the folder; every rank then raises the same error, if any.
    """
    from composer.utils import dist, format_name_with_dist

    from composer_algos import checkpoint_integrity as checkpoints

    problem: str | None = None
    if dist.get_global_rank() == 0:
        try:
            _check_checkpoints_here(cfg, checkpoints, format_name_with_dist, model, model_config)
        except ConfigError as e:
            problem = str(e)
    shared = [problem]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise ConfigError(shared[0])


def _check_checkpoints_here(
    cfg: dict[str, Any],
    checkpoints: Any,
    format_name: Callable[..., str],
    model: torch.nn.Module | None,
    model_config: dict[str, Any] | None,
) -> None:
    run_name = cfg.get('run_name') or ''
    save_folder = cfg.get('save_folder')
    sharded_dir = ((cfg.get('parallelism_config') or {}).get('fsdp') or {}).get(
        'sharded_ckpt_prefix_dir', 'ep{epoch}-ba{batch}'
    )
    templates = [os.path.basename(cfg.get('save_filename', 'ep{epoch}-ba{batch}-rank{rank}.pt')), sharded_dir]
    # The checkpoint Composer will load, and what to change to load another: autoresume's wins over load_path.
    loaded: tuple[str, str, str] | None = None
    if cfg.get('autoresume') and save_folder and not checkpoints.is_remote(save_folder):
        folder = format_name(save_folder, run_name)
        latest = format_name(cfg.get('save_latest_filename') or 'latest-rank{rank}.pt', run_name)
        try:
            chosen = checkpoints.prepare_autoresume(folder, latest, templates, run_name)
        except ValueError as e:
            raise ConfigError(_one_line(f'autoresume: {e}')) from e
        if chosen is not None:
            loaded = (
                chosen,
                f'autoresume: the checkpoint this run resumes from, {chosen},',
                f'or move the checkpoints in {folder} away to start over',
            )
    load_path = cfg.get('load_path')
    if load_path and not checkpoints.is_remote(load_path):
        path = format_name(load_path, run_name)
        problem = checkpoints.verify_checkpoint(path)
        if problem is not None:
            folder = os.path.dirname(os.path.abspath(path))
            others = (
                [p for p in checkpoints.checkpoint_names(folder, templates, run_name) if p != os.path.realpath(path)]
                if os.path.isdir(folder)
                else []
            )
            good, _ = checkpoints.newest_readable(others)
            hint = (
                f'set load_path={good} (the newest readable checkpoint there)'
                if good
                else 'point load_path at a readable checkpoint'
            )
            raise ConfigError(_one_line(f'load_path={load_path}: cannot be loaded, {problem}; {hint}.'))
        if loaded is None:
            loaded = (
                path,
                f'load_path={load_path}: the checkpoint',
                'or point load_path at a checkpoint of this model',
            )
    if loaded is not None and model is not None:
        _check_checkpoint_fits(*loaded, model, model_config)


def _check_checkpoint_fits(
    path: str, where: str, other_fix: str, model: torch.nn.Module, model_config: dict[str, Any] | None
) -> None:
    """The model tensors saved at ``path`` against ``model``'s: the first that differs, with both shapes."""
    from composer_algos import checkpoint_integrity as checkpoints

    saved = checkpoints.saved_model_state(path)
    if saved is None:
        return
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    problem = checkpoints.model_misfit(shapes, saved.shapes)
    if problem is None:
        return
    origin = checkpoints.written_by(saved.extra, model_config)
    raise ConfigError(
        _one_line(
            f'{where} does not fit the model this recipe builds: {problem}'
            f'{"; " + origin if origin else ""}; set the model section to match it, '
            f'{other_fix}.'
        )
    )

"""Checkpoints that cannot be read: found before the Trainer loads them, and autoresume that steps over them.

How Composer 0.32.1 writes a checkpoint decides what can be left behind by a crash. A monolithic checkpoint
(``ep0-ba8-rank0.pt``) is written in place by ``torch.save``, without fsync; a sharded one (a folder of
``__<rank>_0.distcp`` files) gets its ``.metadata`` last, through a temporary name and a rename. Only after every
rank has finished does rank 0 repoint ``latest-rank0.pt`` at the new checkpoint (remove, then symlink). So a
process killed while saving leaves a partial newest checkpoint that ``latest`` does not point at (which then blocks
the restart: Composer refuses to start next to a checkpoint newer than the one it resumes from, unless
``save_overwrite``), and ``latest`` can still point at an unreadable file after a machine crash (unsynced data),
a partial copy, or bit rot on disk, or be missing for the moment between the remove and the symlink.

Hence, with ``autoresume``, :func:`prepare_autoresume` resumes from the newest checkpoint in ``save_folder`` that
:func:`verify_checkpoint` accepts, renames each newer unreadable one to ``<name>.unreadable`` (kept for inspection,
out of Composer's way) and points ``latest`` at the chosen one; a folder holding checkpoints none of which can be
read is an error, never a silent restart from step 0. An explicit ``load_path`` is never replaced by another
checkpoint: an unreadable one is an error naming it and the newest readable checkpoint beside it.

A readable checkpoint may still not fit the model it is loaded into (a recipe whose model changed since):
:func:`saved_model_state` reads the shapes of its model tensors without loading them, :func:`model_misfit` names
the first that differs, and :func:`written_by` names the run and the model settings that wrote it, which
:class:`~composer_algos.diffusion.model.DiffusionModel` records in every checkpoint (its ``recipe``).
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import re
import tarfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    'verify_checkpoint',
    'checkpoint_names',
    'newest_readable',
    'prepare_autoresume',
    'is_remote',
    'UNREADABLE_SUFFIX',
    'SavedModelState',
    'saved_model_state',
    'model_misfit',
    'written_by',
]

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = '.unreadable'
_TIME_FIELDS = ('epoch', 'batch', 'sample', 'token')
# Composer's own compressed formats (an external tool compresses them): not opened here.
_COMPRESSED_SUFFIXES = ('.bz2', '.gz', '.lz4', '.lzma', '.lzo', '.xz', '.zst')


def is_remote(path: str) -> bool:
    return '://' in path


def verify_checkpoint(path: str) -> str | None:
    """Why the checkpoint at ``path`` cannot be loaded, or ``None`` if it can.

    A ``.pt`` file is a zip archive: its directory must be present (a truncated file has lost it) and every member
    must match its CRC-32 (the whole file is read; the load that follows then reads it from the page cache). A tar
    archive is read through (gzip and friends check their own CRC). A sharded checkpoint folder needs its
    ``.metadata`` and every byte range the metadata points at. Compressed ``.pt.<codec>`` files are not checked.
    """
    if os.path.isdir(path):
        return _verify_sharded(path)
    if not os.path.isfile(path):
        return 'it does not exist'
    if os.path.getsize(path) == 0:
        return 'it is empty'
    if tarfile.is_tarfile(path):
        try:
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.isfile():
                        # extractfile is typed Optional; it returns None only for members that are not files.
                        tar.extractfile(member).read()  # type: ignore[union-attr]
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            return f'its tar archive is damaged ({e})'
        return None
    if not zipfile.is_zipfile(path):
        if path.endswith(_COMPRESSED_SUFFIXES):
            return None
        return 'it is truncated or overwritten (the zip directory at its end is missing)'
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        return f'its zip archive is damaged ({e})'
    if bad is not None:
        return f'its member {bad} fails its CRC check (corrupt)'
    return None


def _verify_sharded(folder: str) -> str | None:
    if not os.path.isfile(os.path.join(folder, '.metadata')):
        return 'it has no .metadata (the save did not finish)'
    try:
        from torch.distributed.checkpoint import FileSystemReader

        metadata = FileSystemReader(folder).read_metadata()
    except Exception as e:  # any unpickling failure means the same thing here
        return f'its .metadata cannot be read ({type(e).__name__}: {e})'
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), int(info.offset) + int(info.length))
    for name, size in sorted(needed.items()):
        shard = os.path.join(folder, name)
        if not os.path.isfile(shard):
            return f'its shard {name} is missing'
        if os.path.getsize(shard) < size:
            return f'its shard {name} is truncated ({os.path.getsize(shard)} of at least {size} bytes)'
    return None


def _name_pattern(template: str, run_name: str) -> re.Pattern:
    """A regex matching the names a Composer filename template gives rank 0's checkpoints, time fields captured."""
    pattern = re.escape(template)
    for field in (*_TIME_FIELDS, 'batch_in_epoch', 'sample_in_epoch', 'token_in_epoch'):
        pattern = pattern.replace(re.escape('{' + field + '}'), f'(?P<{field}>\\d+)')
    fixed = {'run_name': run_name, 'rank': 0, 'local_rank': 0, 'node_rank': 0}
    for field, value in fixed.items():
        pattern = pattern.replace(re.escape('{' + field + '}'), re.escape(str(value)))
    pattern = re.sub(r'\\\{[a-z_]+\\\}', '[^/]*', pattern)  # any other placeholder: anything
    return re.compile(f'^{pattern}$')


def checkpoint_names(folder: str, templates: Sequence[str], run_name: str) -> list[str]:
    """Paths of the checkpoints in ``folder`` named by any of ``templates``, newest first (by their time fields)."""
    patterns = [_name_pattern(t, run_name) for t in templates]
    found = []
    for name in os.listdir(folder):
        for pattern in patterns:
            match = pattern.match(name)
            if match is not None:
                fields = match.groupdict()
                found.append(
                    (tuple(int(fields.get(f) or 0) for f in _TIME_FIELDS), os.path.realpath(os.path.join(folder, name)))
                )
                break
    return [path for _, path in sorted(found, reverse=True)]


def newest_readable(paths: Sequence[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """``(first readable path, [(unreadable path, why)] before it)`` for paths ordered newest first."""
    unreadable: list[tuple[str, str]] = []
    for path in paths:
        problem = verify_checkpoint(path)
        if problem is None:
            return path, unreadable
        unreadable.append((path, problem))
    return None, unreadable


def prepare_autoresume(folder: str, latest_name: str, templates: Sequence[str], run_name: str) -> str | None:
    """Make ``folder/latest_name`` point at the newest readable checkpoint, setting unreadable newer ones aside.

    Returns the path autoresume will load (``None``: the folder holds no checkpoint, a fresh start). Raises
    ``ValueError`` when the folder holds checkpoints and none of them can be read.
    """
    if not os.path.isdir(folder):
        return None
    candidates = checkpoint_names(folder, templates, run_name)
    link = os.path.join(folder, latest_name)
    target = os.path.realpath(link) if os.path.lexists(link) else None
    if target is not None and os.path.exists(target) and target not in candidates:
        candidates.append(target)  # a name no template gives: the oldest choice
    chosen, unreadable = newest_readable(candidates)
    if chosen is None and unreadable:
        listing = '; '.join(f'{path}: {why}' for path, why in unreadable)
        raise ValueError(
            f'no readable checkpoint to resume from in {folder} ({listing}); move them away to start '
            'over, or set load_path to a good copy'
        )
    for path, why in unreadable:
        aside = _free_name(path + UNREADABLE_SUFFIX)
        os.rename(path, aside)
        log.warning(
            'autoresume: %s cannot be loaded (%s); renamed it to %s and resume from %s',
            path,
            why,
            os.path.basename(aside),
            chosen,
        )
    if chosen is not None and target != chosen:
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(chosen, os.path.dirname(link)), link)
        if not unreadable:
            log.warning(
                'autoresume: %s pointed at %s; resuming from the newest readable checkpoint, %s',
                link,
                target if target is not None and os.path.exists(target) else 'nothing',
                chosen,
            )
    return chosen


def _free_name(path: str) -> str:
    """``path``, or ``path.1``, ``path.2``... whichever does not exist yet."""
    candidate, number = path, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = f'{path}.{number}'
    return candidate


# ------------------------------------------------------------------------------------------------- fit
# Where Composer keeps the model's state: ``state['model']`` in a file, ``state.model.<key>`` in a sharded folder.
_SHARDED_MODEL_PREFIX = 'state.model.'
# A module's non-tensor state in a state dict (DiffusionModel keeps its seed, draw count and recipe there).
_EXTRA_STATE = '_extra_state'
# Differences between two recipes' model settings listed in a message before the rest is counted.
_MAX_DIFFERENCES = 4


@dataclasses.dataclass
class SavedModelState:
    """What a checkpoint holds of a model, as far as loading it into another goes.

    Attributes:
        shapes: the shape of each model tensor, by state-dict key.
        extra: the model's extra state (a dict for a :class:`~composer_algos.diffusion.model.DiffusionModel`), or
            ``None`` if it has none or it could not be read.
    """

    shapes: dict[str, tuple[int, ...]]
    extra: Any = None


def _strip_module(key: str) -> str:
    # DDP's wrapper prefixes every key; checkpoints written through it may keep the prefix.
    return key[len('module.') :] if key.startswith('module.') else key


def saved_model_state(path: str) -> SavedModelState | None:
    """The model tensors' shapes (and the model's extra state) saved in the checkpoint at ``path``, or ``None`` when
    they cannot be read here (a remote, compressed or tar checkpoint, or not a Composer one).

    A ``.pt`` file is memory-mapped, so its tensors' data is not read; a sharded checkpoint's shapes come from its
    ``.metadata``, and its extra state from the bytes the metadata points at.
    """
    import torch

    if os.path.isdir(path):
        return _saved_sharded_model_state(path)
    if not zipfile.is_zipfile(path):
        return None
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=False, mmap=True)
    except Exception as e:  # a checkpoint this cannot open is left to the loader, which says why
        log.debug('%s: cannot be memory-mapped (%s)', path, e)
        return None
    state = checkpoint.get('state', checkpoint) if isinstance(checkpoint, dict) else None
    model = state.get('model') if isinstance(state, dict) else None
    if not isinstance(model, Mapping):
        return None
    shapes = {_strip_module(k): tuple(v.shape) for k, v in model.items() if isinstance(v, torch.Tensor)}
    extra = next((v for k, v in model.items() if _strip_module(k) == _EXTRA_STATE), None)
    return SavedModelState(shapes, extra)


def _saved_sharded_model_state(folder: str) -> SavedModelState | None:
    import torch
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        metadata = FileSystemReader(folder).read_metadata()
    except Exception as e:  # verify_checkpoint has already said why, if it matters
        log.debug('%s: no readable metadata (%s)', folder, e)
        return None
    shapes = {
        _strip_module(fqn[len(_SHARDED_MODEL_PREFIX) :]): tuple(item.size)
        for fqn, item in metadata.state_dict_metadata.items()
        if fqn.startswith(_SHARDED_MODEL_PREFIX) and isinstance(item, TensorStorageMetadata)
    }
    if not shapes:
        return None
    # Each non-tensor leaf of the extra state is an object of its own, at the path the planner recorded for it.
    extra: Any = None
    paths = metadata.planner_data if isinstance(metadata.planner_data, Mapping) else {}
    for index, info in (metadata.storage_data or {}).items():
        path = paths.get(index.fqn)
        if not isinstance(path, tuple) or path[:3] != ('state', 'model', _EXTRA_STATE):
            continue
        if getattr(info, 'transform_descriptors', None):
            return SavedModelState(shapes)
        try:
            with open(os.path.join(folder, info.relative_path), 'rb') as f:
                f.seek(info.offset)
                value = torch.load(io.BytesIO(f.read(info.length)), weights_only=False)
        except Exception as e:  # the shapes still say what does not fit
            log.debug('%s: its model extra state cannot be read (%s)', folder, e)
            return SavedModelState(shapes)
        if len(path) == 3:
            extra = value
            continue
        node = extra if isinstance(extra, dict) else {}
        extra = node
        for key in path[3:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return SavedModelState(shapes, _lists_back(extra))


def _lists_back(node: Any) -> Any:
    """Nested dicts rebuilt from flattened paths, with the lists (numbered keys) turned back into lists."""
    if not isinstance(node, dict):
        return node
    node = {k: _lists_back(v) for k, v in node.items()}
    if node and all(isinstance(k, int) for k in node) and set(node) == set(range(len(node))):
        return [node[i] for i in range(len(node))]
    return node


def _shape(shape: Sequence[int]) -> str:
    return '[' + ', '.join(str(d) for d in shape) + ']'


def model_misfit(model_shapes: Mapping[str, Sequence[int]], saved: Mapping[str, Sequence[int]]) -> str | None:
    """Why tensors of the shapes ``saved`` do not load into a model whose tensors have ``model_shapes``, or ``None``.

    Names the first tensor (in the model's order) whose shape differs, with both shapes, else the first the
    checkpoint lacks, else the first the model lacks; and how many differ in all.

    Example:
        >>> model_misfit({'w': (4, 2), 'b': (4,)}, {'w': (8, 2), 'b': (4,)})
        'its tensor w has shape [8, 2] where the model has [4, 2]'
    """
    wrong = [k for k in model_shapes if k in saved and tuple(saved[k]) != tuple(model_shapes[k])]
    missing = [k for k in model_shapes if k not in saved]
    extra = [k for k in saved if k not in model_shapes]
    count = len(wrong) + len(missing) + len(extra)
    if wrong:
        first = wrong[0]
        problem = (
            f'its tensor {first} has shape {_shape(saved[first])} where the model has {_shape(model_shapes[first])}'
        )
    elif missing:
        problem = f'it has no tensor {missing[0]} (shape {_shape(model_shapes[missing[0]])} in the model)'
    elif extra:
        problem = f'its tensor {extra[0]} (shape {_shape(saved[extra[0]])}) is not in the model'
    else:
        return None
    return problem + (f' ({count - 1} more tensors differ)' if count > 1 else '')


def written_by(extra: Any, model_config: Mapping[str, Any] | None = None) -> str:
    """Which run wrote a checkpoint whose model recorded ``extra`` (its extra state), and how that run's model
    settings differ from ``model_config`` (the ``model`` section of the recipe at hand); ``''`` when it recorded
    no recipe (checkpoints written before models recorded one, or by other models).

    Example:
        >>> written_by({'recipe': {'run_name': 'a', 'model': {'width': 16}}}, {'width': 32})
        "it was written by run 'a', whose recipe had model.width=16 (this one: 32)"
    """
    recipe = extra.get('recipe') if isinstance(extra, Mapping) else None
    if not isinstance(recipe, Mapping):
        return ''
    run = f"run '{recipe['run_name']}'" if recipe.get('run_name') else 'a run'
    differences = _differences(recipe.get('model'), model_config, 'model') if model_config is not None else []
    if not differences:
        return f'it was written by {run}'
    listed = ', '.join(differences[:_MAX_DIFFERENCES])
    more = f' and {len(differences) - _MAX_DIFFERENCES} more' if len(differences) > _MAX_DIFFERENCES else ''
    return f'it was written by {run}, whose recipe had {listed}{more}'


def _differences(recorded: Any, current: Any, key: str) -> list[str]:
    """``key=recorded value (this one: current value)`` for each setting where two recipe sections differ."""
    if isinstance(recorded, Mapping) and isinstance(current, Mapping):
        found = []
        for name in list(recorded) + [n for n in current if n not in recorded]:
            found += _differences(recorded.get(name), current.get(name), f'{key}.{name}')
        return found
    if recorded == current:
        return []
    return [f'{key}={_text(recorded)} (this one: {_text(current)})']


def _text(value: Any) -> str:
    return 'null' if value is None else value if isinstance(value, str) else json.dumps(value, default=str)

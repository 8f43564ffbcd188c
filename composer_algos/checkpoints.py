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
"""

from __future__ import annotations

import logging
import os
import re
import tarfile
import zipfile
from typing import Optional, Sequence

__all__ = ['verify_checkpoint', 'checkpoint_names', 'newest_readable', 'prepare_autoresume', 'is_remote',
           'UNREADABLE_SUFFIX']

log = logging.getLogger(__name__)

UNREADABLE_SUFFIX = '.unreadable'
_TIME_FIELDS = ('epoch', 'batch', 'sample', 'token')
# Composer's own compressed formats (an external tool compresses them): not opened here.
_COMPRESSED_SUFFIXES = ('.bz2', '.gz', '.lz4', '.lzma', '.lzo', '.xz', '.zst')


def is_remote(path: str) -> bool:
    return '://' in path


def verify_checkpoint(path: str) -> Optional[str]:
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


def _verify_sharded(folder: str) -> Optional[str]:
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
    for field in _TIME_FIELDS + ('batch_in_epoch', 'sample_in_epoch', 'token_in_epoch'):
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
                found.append((tuple(int(fields.get(f) or 0) for f in _TIME_FIELDS),
                              os.path.realpath(os.path.join(folder, name))))
                break
    return [path for _, path in sorted(found, reverse=True)]


def newest_readable(paths: Sequence[str]) -> tuple[Optional[str], list[tuple[str, str]]]:
    """``(first readable path, [(unreadable path, why)] before it)`` for paths ordered newest first."""
    unreadable = []
    for path in paths:
        problem = verify_checkpoint(path)
        if problem is None:
            return path, unreadable
        unreadable.append((path, problem))
    return None, unreadable


def prepare_autoresume(folder: str, latest_name: str, templates: Sequence[str], run_name: str) -> Optional[str]:
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
        raise ValueError(f'no readable checkpoint to resume from in {folder} ({listing}); move them away to start '
                         'over, or set load_path to a good copy')
    for path, why in unreadable:
        aside = _free_name(path + UNREADABLE_SUFFIX)
        os.rename(path, aside)
        log.warning('autoresume: %s cannot be loaded (%s); renamed it to %s and resume from %s', path, why,
                    os.path.basename(aside), chosen)
    if chosen is not None and target != chosen:
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.relpath(chosen, os.path.dirname(link)), link)
        if not unreadable:
            log.warning('autoresume: %s pointed at %s; resuming from the newest readable checkpoint, %s', link,
                        target if target is not None and os.path.exists(target) else 'nothing', chosen)
    return chosen


def _free_name(path: str) -> str:
    """``path``, or ``path.1``, ``path.2``... whichever does not exist yet."""
    candidate, number = path, 0
    while os.path.lexists(candidate):
        number += 1
        candidate = f'{path}.{number}'
    return candidate

"""Checks of MDS datasets on disk: the index, each shard's presence, size and header, optionally its hash.

Cheap enough to run at every start: per shard one ``stat`` and a read of its header (the sample count and the
record offsets, a few kilobytes), never of its records. A shard whose size or header disagrees with its index entry
was truncated, overwritten or belongs to another dataset. A shard of the right size with damaged records is caught
only by a hash: with ``validate_hash`` set (streaming's own option, which streaming applies to downloads only), every
local shard is hashed and compared with its index, which reads the whole dataset. Shards written by
``recipes/convert_dataset.py`` record :data:`SHARD_HASH`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

__all__ = [
    'DataError',
    'REWRITE_HINT',
    'SHARD_HASH',
    'read_index',
    'check_mds_folder',
    'check_shard_file',
    'nonfinite_rows',
]

REWRITE_HINT = 'rewrite the dataset with `python recipes/convert_dataset.py`'
# The hash the package's writers record for every shard: fast (xxHash, several GB/s), enough to catch damage.
SHARD_HASH = 'xxh3_64'


class DataError(ValueError):
    """Data that is missing, truncated, corrupt or does not fit the model; the message names the file and the fix."""


def read_index(folder: str) -> tuple[str, dict[str, Any]]:
    """``(path, parsed index.json)`` of the MDS dataset in ``folder``; a missing or malformed index is a DataError."""
    path = os.path.join(folder, 'index.json')
    if not os.path.isfile(path):
        raise DataError(f'no MDS dataset at {folder} ({path} is missing)')
    try:
        with open(path) as f:
            index = json.load(f)
    except json.JSONDecodeError as e:
        raise DataError(
            f'{path} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); {REWRITE_HINT}'
        ) from e
    if not isinstance(index, dict) or not isinstance(index.get('shards'), list):
        raise DataError(f'{path} is not an MDS index (no list of shards); {REWRITE_HINT}')
    return path, index


def check_mds_folder(folder: str, validate_hash: str | None = None) -> dict[str, Any]:
    """Check the index of ``folder`` and every shard it lists; returns the index. Raises DataError naming the file."""
    index_path, index = read_index(folder)
    if not index['shards'] or sum(int(s.get('samples', 0)) for s in index['shards']) == 0:
        raise DataError(f'{index_path} lists no samples; {REWRITE_HINT}')
    for shard in index['shards']:
        if shard.get('format') == 'mds':
            check_shard_file(folder, shard, index_path, validate_hash)
    return index


def check_shard_file(folder: str, shard: dict[str, Any], index_path: str, validate_hash: str | None = None) -> None:
    """One MDS shard against its index entry: present, of the recorded size, a sane header, the recorded hash.

    A compressed shard may be present only in its compressed form (streaming decompresses it on first use); that
    form is then checked for its size and hash.
    """
    raw, compressed = shard.get('raw_data') or {}, shard.get('zip_data') or {}
    raw_path = os.path.join(folder, raw.get('basename', ''))
    zip_path = os.path.join(folder, compressed['basename']) if compressed.get('basename') else None
    if os.path.isfile(raw_path):
        path, info = raw_path, raw
    elif zip_path is not None and os.path.isfile(zip_path):
        path, info = zip_path, compressed
    else:
        raise DataError(f'shard {raw_path} listed in {index_path} is missing; restore it or {REWRITE_HINT}')
    size = os.path.getsize(path)
    expected = info.get('bytes')
    if expected is not None and size != int(expected):
        state = 'truncated or replaced' if size < int(expected) else 'replaced or appended to'
        raise DataError(f'shard {path} has {size} bytes but {index_path} records {expected} ({state}); {REWRITE_HINT}')
    if path == raw_path:
        _check_header(path, size, int(shard.get('samples', 0)), index_path)
    if validate_hash:
        hashes = info.get('hashes') or {}
        if validate_hash not in hashes:
            raise DataError(
                f'validate_hash={validate_hash!r} but {index_path} records no {validate_hash} hash for '
                f'{path} (it records: {", ".join(sorted(hashes)) or "none"}); choose one of those or '
                'rewrite the shards with hashes'
            )
        from streaming.base.hashing import get_hash

        with open(path, 'rb') as f:
            if get_hash(validate_hash, f.read()) != hashes[validate_hash]:
                raise DataError(
                    f'shard {path} does not match its {validate_hash} hash in {index_path} (corrupt); {REWRITE_HINT}'
                )


def _check_header(path: str, size: int, samples: int, index_path: str) -> None:
    """An MDS shard starts with its sample count (uint32) and the byte offset of each record (one more than there
    are samples, uint32, non-decreasing, the last being the file size)."""
    header_size = 4 * (samples + 2)
    problem = None
    if size < header_size:
        problem = f'it is shorter ({size} bytes) than its header'
    else:
        with open(path, 'rb') as f:
            header = np.frombuffer(f.read(header_size), dtype=np.uint32)
        offsets = header[1:].astype(np.int64)
        if int(header[0]) != samples:
            problem = f'its header counts {int(header[0])} samples, the index {samples}'
        elif offsets[0] < header_size or bool((np.diff(offsets) < 0).any()) or int(offsets[-1]) != size:
            problem = 'its record offsets do not fit the file'
    if problem is not None:
        raise DataError(f'shard {path} is corrupt: {problem} ({index_path}); {REWRITE_HINT}')


def nonfinite_rows(data: np.ndarray) -> list[int]:
    """Positions along the first axis of ``data`` whose values include NaN or inf (none for integer data)."""
    if not np.issubdtype(data.dtype, np.floating):
        return []
    return np.nonzero(~np.isfinite(data.reshape(len(data), -1)).all(1))[0].tolist()

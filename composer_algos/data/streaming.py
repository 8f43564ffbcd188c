"""Image batches streamed from MDS shards with mosaicml-streaming's StreamingDataset."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from time import time_ns
from typing import Any, cast

import numpy as np
import torch
from composer.utils import dist
from streaming import StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.distributed import maybe_init_dist
from streaming.base.format.mds.reader import MDSReader
from streaming.base.world import World
from torch.utils.data import DataLoader

from composer_algos.data.integrity import REWRITE_HINT, DataError, nonfinite_rows
from composer_algos.distributed import all_gather, destroy_process_group
from composer_algos.pixels import from_uint8

__all__ = [
    'StreamingImageDataset',
    'StreamingBatchLoader',
    'build_streaming_image_dataloader',
    'flip_mask',
    'global_batch_size_problem',
]

log = logging.getLogger(__name__)

# The file in the temp dir (where streaming keeps its own lock files) that a node's local leader holds while its
# datasets take their shared-memory prefix; see _shm_prefix_lock.
_SHM_PREFIX_LOCK_NAME = 'composer_algos_streaming_prefix.lock'

# How many times a batch read prepares (downloads) a shard that went missing before giving up; as streaming's
# own ``get_item``, which retries when a shard is evicted between being prepared and being read.
_READ_RETRIES = 7


def flip_mask(seed: int, indices: np.ndarray) -> np.ndarray:
    """Which samples a random flip flips: one bit of a hash (splitmix64) of ``(seed, sample index)``.

    A function of the sample index, not of a running RNG, so a resumed run flips the same samples.
    """
    golden, mix1, mix2 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
    with np.errstate(over='ignore'):
        x = np.asarray(indices, dtype=np.uint64) + np.array([seed], dtype=np.uint64) * golden + golden
        x = (x ^ (x >> np.uint64(30))) * mix1
        x = (x ^ (x >> np.uint64(27))) * mix2
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(63)).astype(bool)


def _open_lock_file(path: str) -> int:
    try:
        # Read-only is enough for flock; an existing file of another user opens where O_CREAT would be refused
        # (fs.protected_regular in a sticky temp dir).
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)


@contextlib.contextmanager
def _shm_prefix_lock() -> Iterator[None]:
    """A context to build a StreamingDataset in, so that it takes its shared-memory prefix atomically machine-wide.

    Streaming names a dataset's shared memory ``NNNNNN_*`` with the first prefix no running dataset uses: every rank
    of a node scans for it, then (after a barrier across ranks) the local leader creates ``NNNNNN_locals``. Nothing
    stops another job from scanning in between, so two jobs starting together can both pick the same prefix, and
    the second to create it fails with ``FileExistsError: ... /NNNNNN_locals``. Here the node's local leader holds an
    exclusive ``flock`` on a file in the temp dir through the construction, and the other ranks of its job wait at a
    barrier until it has it, so their scans too fall inside it. Only the leader takes the lock: a rank waiting for it
    while another rank of its job held it inside streaming's barrier would wait forever.

    The lock orders creations, not releases: a job that ends frees its prefix whenever it ends. If that happens
    between the leader's scan and another rank's, the two find different prefixes, and the rank that found the
    later one fails with ``shared memory prefix=N was not registered by local leader``. So inside the lock only the
    local leader scans, and every rank of its node takes the leader's answer (one small all-gather per scan);
    see _leader_scans.
    """
    # The other ranks' wait needs the process group, which streaming would otherwise make itself.
    destroy_dist = maybe_init_dist()
    fd = None
    try:
        if World.detect().is_local_leader:
            path = os.path.join(tempfile.gettempdir(), _SHM_PREFIX_LOCK_NAME)
            fd = _open_lock_file(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info('Waiting for another process to finish building its streaming dataset (it holds %s).', path)
                fcntl.flock(fd, fcntl.LOCK_EX)
        dist.barrier()
        with _leader_scans():
            yield
    finally:
        if fd is not None:
            # Unlocked before closing: a process forked meanwhile would keep a closed-only lock held.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        if destroy_dist:
            destroy_process_group()


@contextlib.contextmanager
def _leader_scans() -> Iterator[None]:
    """A context in which streaming's scan for a free shared-memory prefix runs on each node's local leader only,
    and every rank takes its leader's result.

    Streaming calls ``_check_and_find_retrying`` once per kind of shared memory on every rank and takes the
    maximum; each call here scans on the leader and shares the prefix it found over the process group, so the ranks
    of a node agree however other jobs' shared memory comes and goes between their scans. A scan that fails on the
    leader (a local directory another running dataset uses) fails on every rank, with the leader's message.
    """
    from streaming.base.shared import prefix as streaming_prefix

    scan = streaming_prefix._check_and_find_retrying
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        yield
        return
    world = World.detect()
    leader = world.node * world.ranks_per_node

    def scan_on_leader(streams_local: list[str], streams_remote: list[str | None], shm_name: str, retry: int) -> int:
        found, error = -1, None
        if world.is_local_leader:
            try:
                found = scan(streams_local, streams_remote, shm_name, retry)
            except ValueError as e:
                error = e
        found = int(all_gather(torch.tensor([found], dtype=torch.long))[leader])
        if error is not None:
            raise error
        if found < 0:
            raise RuntimeError(
                f'The local leader (rank {leader}) could not find a free shared-memory prefix for its streaming '
                'dataset; its own error says why.'
            )
        return found

    streaming_prefix._check_and_find_retrying = scan_on_leader
    try:
        yield
    finally:
        streaming_prefix._check_and_find_retrying = scan


@dataclass(frozen=True)
class _FixedRecords:
    """Where the columns sit in an MDS shard whose data (image or latents) and ``label`` columns have fixed sizes.

    With every column of fixed size every record is equally long and a batch is sliced at fixed offsets; a
    variable-size column (a caption) makes each record say its own length (``sizes`` holds ``None`` for it).
    """

    path: str
    samples: int
    names: tuple[str, ...]
    encodings: tuple[str, ...]
    sizes: tuple[int | None, ...]
    data_column: str
    data_dtype: np.dtype
    data_shape: tuple[int, ...]

    @property
    def record_size(self) -> int | None:
        """The bytes of every record, ``None`` when a column has a variable size."""
        return None if None in self.sizes else int(sum(cast(tuple[int, ...], self.sizes)))


def _fixed_records(shard: Any, column: str) -> _FixedRecords | None:
    """The record layout of ``shard`` if its ``column`` is a fixed-shape ndarray and ``label`` an int, else None.

    An MDS record is its columns' bytes in order, preceded by a 4-byte size for each variable-size column; the
    fixed-size encodings are raw (``ndarray:DTYPE:SHAPE`` the array, ``int`` 8 bytes of int64).
    """
    if not isinstance(shard, MDSReader):
        return None
    names, encodings = list(shard.column_names), list(shard.column_encodings)
    if column not in names or 'label' not in names or encodings[names.index('label')] != 'int':
        return None
    parts = encodings[names.index(column)].split(':')
    if len(parts) != 3 or parts[0] != 'ndarray':
        return None
    return _FixedRecords(
        path=os.path.join(shard.dirname, shard.split or '', shard.raw_data.basename),
        samples=int(shard.samples),
        names=tuple(names),
        encodings=tuple(encodings),
        sizes=tuple(None if size is None else int(size) for size in shard.column_sizes),
        data_column=column,
        data_dtype=np.dtype(parts[1]),
        data_shape=tuple(int(d) for d in parts[2].split(',')),
    )


def _column_bytes(
    layout: _FixedRecords, data: np.ndarray, begins: list[int], wanted: tuple[str, ...]
) -> dict[str, list[np.ndarray]]:
    """The bytes of the ``wanted`` columns of the records starting at ``begins``, column by column."""
    out: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    variable = [i for i, size in enumerate(layout.sizes) if size is None]
    for begin in begins:
        head = np.frombuffer(data[begin : begin + 4 * len(variable)].tobytes(), np.uint32).tolist()
        sizes = list(layout.sizes)
        for index, size in zip(variable, head, strict=True):
            sizes[index] = size
        position = begin + 4 * len(variable)
        for name, size in zip(layout.names, sizes, strict=True):
            assert size is not None, 'every variable size is read from the head'
            if name in out:
                out[name].append(data[position : position + size])
            position += size
    return out


def _decode(encoding: str, pieces: Any) -> Any:
    """A column's raw values, a ``(n, bytes)`` block or a list of ``n`` byte arrays: equally long ones stacked
    (``ndarray:DTYPE:SHAPE``, ``int``), others as a list of decoded values (``str``: the text)."""
    parts = encoding.split(':')
    if (len(parts) == 3 and parts[0] == 'ndarray') or encoding == 'int':
        block = np.ascontiguousarray(pieces if isinstance(pieces, np.ndarray) else np.stack(pieces))
        if encoding == 'int':
            return block.view(np.int64).reshape(len(block))
        return block.view(np.dtype(parts[1])).reshape(len(block), *(int(d) for d in parts[2].split(',')))
    if encoding == 'str':
        return [piece.tobytes().decode('utf-8') for piece in pieces]
    from streaming.base.format.mds.encodings import mds_decode

    return [mds_decode(encoding, piece.tobytes()) for piece in pieces]


def _read_records(
    layout: _FixedRecords, rows: np.ndarray, extra: tuple[str, ...] = ()
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """``rows`` of a shard as ``(data of shape (n, *data_shape), int64 labels, {column: values} of the extra
    columns)``: one copy per record out of a memory map of the shard file, no per-sample decoding of the data.
    Raises FileNotFoundError if the file is absent."""
    with open(layout.path, 'rb') as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    # The shard starts with its sample count (uint32), then the byte offset of each record (uint32, one more than
    # there are samples).
    begins = np.frombuffer(mapped, np.uint32, count=layout.samples + 1, offset=4)[rows].tolist()
    data = np.frombuffer(mapped, np.uint8)
    wanted = (layout.data_column, 'label', *extra)
    size = layout.record_size
    if size is not None:
        records = np.stack([data[b : b + size] for b in begins])
        offsets = np.concatenate([[0], np.cumsum(cast(tuple[int, ...], layout.sizes))]).astype(int)
        columns: dict[str, Any] = {
            name: records[:, offsets[i] : offsets[i + 1]] for i, name in enumerate(layout.names) if name in wanted
        }
    else:
        columns = {
            name: [piece.copy() for piece in pieces]
            for name, pieces in _column_bytes(layout, data, begins, wanted).items()
        }
    del data  # the views must go before the map can close
    mapped.close()
    encodings = dict(zip(layout.names, layout.encodings, strict=True))
    decoded = {name: _decode(encodings[name], pieces) for name, pieces in columns.items()}
    return decoded.pop(layout.data_column), decoded.pop('label'), decoded


class _Prefetch:
    """A thread that prepares (downloads) the shards of an epoch ahead of the batches that read them.

    It walks the shards that are not local in the order the epoch first needs them, one ``prepare_shard`` per
    shard (streaming's own thread takes the cache file lock once per sample), and stays at most ``ahead`` samples in
    front of the batch being read.
    """

    def __init__(self, dataset: StreamingDataset, pending: list[tuple[int, int]], ahead: int | None):
        self.position = 0
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(
            target=self._run, args=(dataset, pending, ahead), daemon=True, name='streaming-shard-prefetch'
        )
        self.thread.start()

    def _run(self, dataset: StreamingDataset, pending: list[tuple[int, int]], ahead: int | None) -> None:
        try:
            for first_use, shard_id in pending:
                while ahead is not None and first_use - self.position > ahead:
                    if self.stop.wait(0.01):
                        return
                if self.stop.is_set():
                    return
                dataset.prepare_shard(shard_id, blocking=False)
        except BaseException as e:  # reported by the next batch read
            self.error = e

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class StreamingImageDataset(StreamingDataset):
    """Yields ``{'image': float tensor in [-1, 1] of shape (C, H, W), 'label': int}`` from MDS shards.

    With ``yield_batches=True`` iterating yields whole per-device batches instead, ``{'image': (B, C, H, W) float,
    'label': (B,) int64}``, in the order and with the partition across ranks and workers that streaming gives
    single samples (so mid-epoch resumption is unchanged); :func:`build_streaming_image_dataloader` uses this. A
    batch of shards whose columns all have fixed sizes (images written by ``recipes/convert_dataset.py`` as raw
    uint8 arrays) is read with one copy per record from the shard file, with no per-sample decoding; other shards
    (PNG images, images of several sizes, latents) are read sample by sample with streaming's decoders.

    With ``latents=True`` the shards hold precomputed latents (column ``latents``, written by
    ``recipes/convert_dataset.py --encode-latents``) and ``image`` is those latents as stored, with no [-1, 1]
    scaling; set ``model.encoder.precomputed: true`` (no VAE runs; ``model.latent_scale`` still applies).

    Shards with a ``caption`` column (text-to-image) add ``'caption'``, a list of strings, to every batch (a string to
    a single sample); with ``caption_embeddings=True`` also a text encoder's stored outputs, ``'caption_embedding'``
    ``(B, L, D)`` float, ``'caption_mask'`` ``(B, L)`` int64 and ``'caption_pooled'`` ``(B, D)`` float (written by
    ``recipes/convert_dataset.py --encode-captions``; ``model.conditioner.precomputed: true`` reads them).

    Args:
        local: local folder of the shards (or cache folder for ``remote``).
        remote: optional remote URL (``s3://``, ``gs://``, ``oci://``, ...); shards are cached into ``local``.
        split: sub-folder of ``local``/``remote``.
        batch_size: the per-device batch size (streaming uses it to partition and resume exactly).
        shuffle: shuffle samples (deterministically from ``shuffle_seed``).
        random_flip: flip horizontally with probability 1/2, as a deterministic function of (seed, index).
        channels: convert images to 1 (luma, as PIL's ``L``) or 3 (RGB) channels; ``None`` keeps them.
        image_size: if set, an image (or latent) of another size is an error.
        seed: seed of the flips and, by default, of the shuffle.
        latents: read the ``latents`` column (precomputed latents) instead of ``image``.
        caption_embeddings: read the stored text encoder outputs too.
        yield_batches: iterate over batches of ``batch_size`` instead of single samples.
        drop_last: with ``yield_batches``, drop each worker's last incomplete batch (as a DataLoader would).
        cache_limit: most bytes of shards kept in ``local`` (e.g. ``'100gb'``); beyond it streaming evicts the
            least recently used shards (and downloads them again when needed). ``None``: no limit.
        **streaming_kwargs: passed to ``StreamingDataset`` (``num_canonical_nodes``, ``predownload``, ...).
    """

    def __init__(
        self,
        local: str | None = None,
        remote: str | None = None,
        split: str | None = None,
        batch_size: int | None = None,
        shuffle: bool = True,
        random_flip: bool = False,
        channels: int | None = None,
        image_size: int | None = None,
        seed: int = 17,
        shuffle_seed: int | None = None,
        latents: bool = False,
        yield_batches: bool = False,
        drop_last: bool = True,
        cache_limit: int | str | None = None,
        caption_embeddings: bool = False,
        **streaming_kwargs: Any,
    ):
        if remote is None:
            path = os.path.join(local, split) if (local and split) else local
            if path is None or not os.path.exists(os.path.join(path, 'index.json')):
                raise FileNotFoundError(
                    f'No MDS dataset at {path!r} (index.json missing). Create it with '
                    f'`python recipes/convert_dataset.py --dataset digits --out {local or "<dir>"}`, '
                    'or set remote: to stream it from object storage.'
                )
        if channels not in (None, 1, 3) and not latents:
            raise ValueError(f'channels must be 1, 3 or None, got {channels!r}.')
        if latents and random_flip:
            raise ValueError(
                'random_flip is not available with latents: a flipped latent is not the latent of the '
                'flipped image. Encode images on the fly (model.encoder) to train with flips.'
            )
        if yield_batches and batch_size is None:
            raise ValueError('yield_batches needs batch_size (the per-device batch size).')
        with _shm_prefix_lock():
            super().__init__(
                local=local,
                remote=remote,
                split=split,
                shuffle=shuffle,
                batch_size=batch_size,
                shuffle_seed=shuffle_seed if shuffle_seed is not None else seed,
                cache_limit=cache_limit,
                **streaming_kwargs,
            )
        self.random_flip = random_flip
        self.channels = channels
        self.image_size = image_size
        self.flip_seed = seed
        self.latents = latents
        self.yield_batches = yield_batches
        self.drop_last = drop_last
        self.column = 'latents' if latents else 'image'
        self.caption_embeddings = caption_embeddings
        self.text_columns = self._text_columns()
        self._layouts: dict[int, _FixedRecords | None] = {}
        self._prefetch: _Prefetch | None = None
        self._warned_per_sample = False
        self._preparing = threading.Lock()

    def _text_columns(self) -> tuple[str, ...]:
        """The text columns every batch carries: ``caption`` when the shards have one, and the stored encoder
        outputs with ``caption_embeddings`` (an error naming the option when the shards lack them)."""
        # (streaming's Reader base class leaves the column names to its formats.)
        have = [set(shard.column_names) for shard in self.shards]  # type: ignore[attr-defined]
        wanted = tuple(c for c in _TEXT_COLUMNS if c == 'caption' or self.caption_embeddings)
        present = tuple(c for c in wanted if all(c in columns for columns in have))
        partly = [c for c in wanted if c not in present and any(c in columns for columns in have)]
        if partly:
            raise ValueError(
                f'Some shards of {self.streams[0].local} have the column {partly[0]!r} and some do not; '
                'write every shard of a dataset with the same columns.'
            )
        if self.caption_embeddings and not {'caption_embedding', 'caption_mask'} <= set(present):
            raise ValueError(
                f'caption_embeddings=true, but the shards of {self.streams[0].local} hold no text '
                'encoder outputs (columns caption_embedding, caption_mask); write them with '
                '`recipes/convert_dataset.py --encode-captions PATH`, or set caption_embeddings: false.'
            )
        return present

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers get a copy without the (unpicklable, per-process) prefetch thread and lock.
        state = dict(self.__dict__)
        state['_prefetch'] = None
        del state['_preparing']
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._preparing = threading.Lock()

    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        """Streaming's ``prepare_shard`` (download a shard, evicting others to stay under ``cache_limit``), one call
        at a time in this process.

        Streaming evicts until the cache has room for this shard, releases its cache lock, downloads, and counts the
        shard's bytes only when the download ends. A second download that starts meanwhile (the prefetch thread's
        next shard while a batch read fetches one that is missing) sees the cache without the first shard, makes
        room for itself alone, and the two leave the cache one shard over the limit until the next eviction.
        DataLoader workers are processes with a lock each, so with workers the cache can still pass the limit by a
        shard for each further worker downloading at once, as it can with streaming's own iteration.
        """
        with self._preparing:
            super().prepare_shard(shard_id, blocking)

    # ------------------------------------------------------------------------------------------- one sample
    # One sample by its index (a DataLoader's sampler); streaming's Array also takes slices and index arrays.
    def __getitem__(self, index: int) -> dict[str, Any]:  # type: ignore[override]
        sample = super().__getitem__(index)
        data = self._convert_channels(self._sample_array(sample, index)[None])
        ids = np.array([index], dtype=np.int64)
        out = {'image': self._to_tensor(data, ids)[0], 'label': int(sample['label'])}
        texts = _text_tensors({c: [sample[c]] for c in self.text_columns})
        return {**out, **{c: v[0] for c, v in texts.items()}}

    def _sample_array(self, sample: dict[str, Any], index: int) -> np.ndarray:
        """One decoded sample's image as uint8 (C, H, W) (PIL images converted to ``channels`` as before), or its
        latents as stored."""
        if self.latents:
            if 'latents' not in sample:
                raise ValueError(
                    f'Sample {index} has no latents column (columns: {sorted(sample)}); write the shards '
                    'with `recipes/convert_dataset.py --encode-latents VAE_PATH`, or set latents: false '
                    'for images.'
                )
            array = np.asarray(sample['latents'])
            if array.ndim != 3:
                raise ValueError(f'Latents {index} have shape {array.shape}; expected (channels, height, width).')
            return array
        if 'image' not in sample:
            hint = (
                ' These shards hold precomputed latents: set latents: true in the loader and '
                'model.encoder.precomputed: true.'
                if 'latents' in sample
                else ''
            )
            raise ValueError(f'Sample {index} has no image column (columns: {sorted(sample)}).{hint}')
        image = sample['image']
        if isinstance(image, np.ndarray):
            return image
        # An encoded image (PNG, JPEG: shards of the earlier format or of other tools) decoded by PIL.
        if self.channels == 1 and image.mode != 'L':
            image = image.convert('L')
        elif self.channels == 3 and image.mode != 'RGB':
            image = image.convert('RGB')
        array = np.asarray(image, dtype=np.uint8)
        return array[None] if array.ndim == 2 else np.ascontiguousarray(array.transpose(2, 0, 1))

    # ------------------------------------------------------------------------------------------- batches
    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._iter_batches() if self.yield_batches else super().__iter__()

    def _iter_batches(self) -> Iterator[dict[str, Any]]:
        """This worker's batches of the epoch: streaming's epoch, resumption and partition, read a batch at a time."""
        self._stop_prefetch()
        if hasattr(self, '_iterator'):
            self._iterator.exit()  # a sample-by-sample epoch of this copy is still running: end it as streaming would
        self._unique_worker_world = self._unique_rank_world.detect_workers()
        self._parallel_worker_world = self._parallel_rank_world.detect_workers()
        epoch, sample_in_epoch = self._resume_incr_epoch()
        sample_ids = self._get_work(epoch, sample_in_epoch)
        sample_ids = sample_ids[sample_ids != -1]  # streaming pads partitions with -1, which it skips
        assert self.batch_size is not None, 'yield_batches needs batch_size (checked when made)'
        size = int(self.batch_size)
        end = len(sample_ids) - (len(sample_ids) % size if self.drop_last else 0)
        self._start_prefetch(sample_ids[:end])
        prefetch = self._prefetch
        try:
            for start in range(0, end, size):
                if prefetch is not None:
                    if prefetch.error is not None:
                        raise RuntimeError('Preparing the shards of this epoch failed.') from prefetch.error
                    prefetch.position = start
                yield self._read_batch(sample_ids[start : start + size])
        finally:
            if prefetch is not None and prefetch is self._prefetch:
                self._stop_prefetch()

    def _shard_ids(self, sample_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        shard_ids = np.searchsorted(self.sample_offset_per_shard, sample_ids, side='right') - 1
        return shard_ids, sample_ids - self.sample_offset_per_shard[shard_ids]

    def _start_prefetch(self, sample_ids: np.ndarray) -> None:
        shard_ids, _ = self._shard_ids(sample_ids)
        shards, first_use = np.unique(shard_ids, return_index=True)
        states = self._shard_states.numpy()
        pending = sorted(
            (int(i), int(s)) for s, i in zip(shards, first_use, strict=True) if states[s] != _ShardState.LOCAL
        )
        if pending:  # all shards local (a local dataset, a full cache): no thread competes with training
            self._prefetch = _Prefetch(self, pending, self.predownload)

    def _stop_prefetch(self) -> None:
        if self._prefetch is not None:
            self._prefetch.close()
            self._prefetch = None

    def _layout(self, shard_id: int) -> _FixedRecords | None:
        if shard_id not in self._layouts:
            self._layouts[shard_id] = _fixed_records(self.shards[shard_id], self.column)
            if self._layouts[shard_id] is None and not self._warned_per_sample:
                self._warned_per_sample = True
                log.warning(
                    'Shard %d of %s stores %s of varying size or encoded (e.g. PNG): its batches are read and '
                    'decoded sample by sample. Write raw arrays of one shape (recipes/convert_dataset.py, '
                    'with --resize for a folder) to read whole batches.',
                    shard_id,
                    self.streams[self.stream_per_shard[shard_id]].local,
                    self.column,
                )
        return self._layouts[shard_id]

    def _read_batch(self, sample_ids: np.ndarray) -> dict[str, torch.Tensor]:
        shard_ids, rows = self._shard_ids(sample_ids)
        data: np.ndarray | None = None
        labels = np.empty(len(sample_ids), dtype=np.int64)
        texts: dict[str, list] = {c: [None] * len(sample_ids) for c in self.text_columns}
        for shard_id in np.unique(shard_ids).tolist():
            where = np.nonzero(shard_ids == shard_id)[0]
            layout = self._layout(shard_id)
            if layout is not None:
                part, part_labels, part_texts = self._read_fixed(shard_id, layout, rows[where])
            else:
                samples = [self.get_item(int(i)) for i in sample_ids[where]]
                part = _stack([self._sample_array(s, int(i)) for s, i in zip(samples, sample_ids[where], strict=True)])
                part_labels = np.array([int(s['label']) for s in samples], dtype=np.int64)
                part_texts = {c: [s[c] for s in samples] for c in self.text_columns}
            for column, values in part_texts.items():
                for position, value in zip(where.tolist(), values, strict=True):
                    texts[column][position] = value
            part = self._convert_channels(part)
            if data is None:
                data = np.empty((len(sample_ids), *part.shape[1:]), dtype=part.dtype)
            elif part.shape[1:] != data.shape[1:] or part.dtype != data.dtype:
                raise ValueError(
                    f'Samples of one batch differ: {tuple(data.shape[1:])} {data.dtype} against '
                    f'{tuple(part.shape[1:])} {part.dtype}; write every image at one size.'
                )
            data[where] = part
            labels[where] = part_labels
        assert data is not None
        return {'image': self._to_tensor(data, sample_ids), 'label': torch.from_numpy(labels), **_text_tensors(texts)}

    def _read_fixed(
        self, shard_id: int, layout: _FixedRecords, rows: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        for _ in range(1 + _READ_RETRIES):
            try:
                values = _read_records(layout, rows, self.text_columns)
                break
            except FileNotFoundError:
                # Not downloaded yet, evicted, or only its compressed form is cached: prepare it (waiting for
                # another worker that is already downloading it) and read again.
                self.prepare_shard(shard_id)
            except ValueError as e:  # the file is shorter than its records: truncated since the start-up check
                raise DataError(f'shard {layout.path} is corrupt ({e}); {REWRITE_HINT}') from e
        else:
            raise RuntimeError(
                f'Shard {shard_id} ({layout.path}) went missing {1 + _READ_RETRIES} times while being '
                'read; if cache_limit is set, it may be too low for this many workers.'
            )
        self._shard_access_times[shard_id] = time_ns()  # least recently used shards are evicted first
        return values

    # ------------------------------------------------------------------------------------------- conversion
    def _convert_channels(self, data: np.ndarray) -> np.ndarray:
        """uint8 images (n, C, H, W) to ``channels``: 1 -> 3 repeats, 3 -> 1 is PIL's integer luma (``L`` mode)."""
        have = data.shape[1]
        if self.latents or self.channels is None or have == self.channels:
            return data
        if have == 1 and self.channels == 3:
            return np.repeat(data, 3, axis=1)
        if have == 3 and self.channels == 1:
            rgb = data.astype(np.uint32)
            luma = (rgb[:, 0] * 19595 + rgb[:, 1] * 38470 + rgb[:, 2] * 7471 + 0x8000) >> 16
            return luma.astype(np.uint8)[:, None]
        raise ValueError(f'Cannot convert images with {have} channels to channels={self.channels}.')

    def _to_tensor(self, data: np.ndarray, sample_ids: np.ndarray) -> torch.Tensor:
        """Checked, flipped and scaled: uint8 images to float32 in [-1, 1]; latents to float32 as stored."""
        kind = 'Latents' if self.latents else 'Images'
        if self.image_size is not None and data.shape[2:] != (self.image_size, self.image_size):
            raise ValueError(
                f'{kind} of sample {int(sample_ids[0])} have size {data.shape[2:]} but '
                f'image_size={self.image_size}; resize the images when converting, or set image_size to '
                'match.'
            )
        if self.latents:
            if self.channels is not None and data.shape[1] != self.channels:
                raise ValueError(
                    f'Latents of sample {int(sample_ids[0])} have {data.shape[1]} channels but '
                    f'channels={self.channels}.'
                )
            latents = np.ascontiguousarray(data, dtype=np.float32)
            bad = nonfinite_rows(latents)
            if bad:
                shard_ids, _ = self._shard_ids(sample_ids[bad])
                files = sorted(
                    {
                        os.path.join(self.shards[s].dirname, self.shards[s].split, self.shards[s].raw_data.basename)
                        for s in shard_ids.tolist()
                    }
                )
                raise DataError(
                    f'latents of samples {sample_ids[bad].tolist()} (in {", ".join(files)}) hold NaN or '
                    'inf values; recompute or drop them'
                )
            return torch.from_numpy(latents)
        if data.dtype != np.uint8:
            raise ValueError(f'Images are stored as {data.dtype}; expected uint8 (0..255).')
        if self.random_flip:
            flip = flip_mask(self.flip_seed, sample_ids)
            data = np.array(data)  # decoded samples may be read-only views of their bytes
            data[flip] = data[flip][..., ::-1]
        # require: torch refuses read-only arrays (a single decoded sample is a view of its bytes).
        return from_uint8(torch.from_numpy(np.require(data, requirements=('C', 'W'))))


# A text-to-image shard's text columns: the caption, and a text encoder's outputs stored with it.
_TEXT_COLUMNS = ('caption', 'caption_embedding', 'caption_mask', 'caption_pooled')


def _text_tensors(columns: dict[str, Any]) -> dict[str, Any]:
    """Captions as a list of strings; stored encoder outputs as float32 (hidden states, pooled) or int64 (mask)."""
    out: dict[str, Any] = {}
    for column, values in columns.items():
        if column == 'caption':
            out[column] = [str(v) for v in values]
            continue
        array = np.stack([np.asarray(v) for v in values])
        out[column] = torch.from_numpy(array.astype(np.int64 if column == 'caption_mask' else np.float32))
    return out


def _stack(arrays: list[np.ndarray]) -> np.ndarray:
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f'Samples of one batch have different shapes {sorted(shapes)}; resize the images when '
            'converting (--resize) so that they can be batched.'
        )
    return np.stack(arrays)


class StreamingBatchLoader(DataLoader):
    """A DataLoader over a :class:`StreamingImageDataset` that yields whole batches itself (``yield_batches``).

    The loader does not collate (``batch_size=None`` underneath); ``batch_size`` and ``len()`` still answer the
    per-device batch size and the number of batches per epoch, as for an ordinary DataLoader (Composer reads both).
    """

    def __init__(
        self,
        dataset: StreamingImageDataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        persistent_workers: bool = False,
    ):
        if not dataset.yield_batches:
            raise ValueError('StreamingBatchLoader needs a dataset made with yield_batches=True.')
        super().__init__(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=persistent_workers,
        )

    dataset: StreamingImageDataset

    @property
    def batch_size(self) -> int:
        assert self.dataset.batch_size is not None, 'yield_batches needs batch_size (checked when made)'
        return int(self.dataset.batch_size)

    @batch_size.setter
    def batch_size(self, value: int | None) -> None:
        # DataLoader.__init__ records batch_size=None (no collation); the size is the dataset's.
        if value is not None:
            raise ValueError("The batch size of a StreamingBatchLoader is its dataset's batch_size.")

    def __len__(self) -> int:
        samples, size = len(self.dataset), self.batch_size
        return samples // size if self.dataset.drop_last else -(-samples // size)


def global_batch_size_problem(global_batch_size: int, world_size: int) -> str | None:
    """Why ``global_batch_size`` cannot be dealt to ``world_size`` ranks, or ``None`` if it can: each rank gets
    ``global_batch_size // world_size`` images, which must be a positive whole number."""
    if global_batch_size < 1:
        return f'it must be positive (a multiple of the world size, {world_size})'
    if global_batch_size % world_size:
        lower = global_batch_size - global_batch_size % world_size
        nearest = f'{lower} or {lower + world_size}' if lower else str(world_size)
        return f'it must be a multiple of the world size, {world_size}, such as {nearest}'
    return None


def build_streaming_image_dataloader(
    global_batch_size: int,
    local: str | None = None,
    remote: str | None = None,
    split: str | None = None,
    num_workers: int = 0,
    drop_last: bool = True,
    shuffle: bool = True,
    pin_memory: bool | None = None,
    **dataset_kwargs: Any,
) -> DataLoader:
    """A loader of per-device batches from a :class:`StreamingImageDataset` (see it for ``dataset_kwargs``).

    Batches are formed by the dataset (``yield_batches``), in streaming's order. ``pin_memory`` defaults to
    whether CUDA is available (pinned batches copy to the GPU asynchronously).
    """
    world_size = dist.get_world_size()
    problem = global_batch_size_problem(global_batch_size, world_size)
    if problem is not None:
        raise ValueError(f'global_batch_size={global_batch_size}: {problem}.')
    device_batch_size = global_batch_size // world_size
    dataset = StreamingImageDataset(
        local=local,
        remote=remote,
        split=split,
        batch_size=device_batch_size,
        shuffle=shuffle,
        yield_batches=True,
        drop_last=drop_last,
        **dataset_kwargs,
    )
    return StreamingBatchLoader(
        dataset,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=num_workers > 0,
    )

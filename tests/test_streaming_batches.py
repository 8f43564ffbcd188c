"""The batch-level streaming loader: the batches the model expects, in streaming's order, resumable mid-epoch; shards
of the earlier PNG format, channel conversion, shard eviction, and datasets built at the same moment."""

import contextlib
import os
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from streaming.base.dataset import _ShardState
from torch.utils.data import DataLoader

from composer_algos.data import StreamingImageDataset, build_streaming_image_dataloader, convert_digits
from composer_algos.data import streaming as streaming_module
from composer_algos.data.convert import DIGITS_SHAPE, digits_images, image_encoding, write_mds
from composer_algos.data.streaming import flip_mask


def _loader(root: str, batch_size: int = 32, **kwargs):
    kwargs = {'split': 'train', 'channels': 1, 'image_size': 8, 'seed': 3, **kwargs}
    return build_streaming_image_dataloader(global_batch_size=batch_size, local=root, **kwargs)


def _per_sample_loader(root: str, batch_size: int = 32, num_workers: int = 0, **kwargs):
    """What the loader was before: streaming's sample-by-sample iteration, collated by a DataLoader."""
    dataset = StreamingImageDataset(
        local=root, split='train', batch_size=batch_size, channels=1, image_size=8, seed=3, **kwargs
    )
    return DataLoader(dataset, batch_size=batch_size, drop_last=True, num_workers=num_workers)


def _assert_same_batches(got, expected):
    assert len(got) == len(expected) > 0
    for a, b in zip(got, expected):
        torch.testing.assert_close(a['image'], b['image'], rtol=0, atol=0)
        assert torch.equal(a['label'], b['label'])


@pytest.mark.parametrize('num_workers', [0, 2])
def test_batches_are_what_the_model_expects_in_streamings_order(digits_mds, num_workers):
    loader = _loader(digits_mds, num_workers=num_workers)
    batches = list(loader)
    assert len(batches) == len(loader) == 1437 // 32 and loader.batch_size == 32
    assert loader.pin_memory == torch.cuda.is_available()
    for batch in batches:
        images, labels = batch['image'], batch['label']
        assert images.shape == (32, 1, 8, 8) and images.dtype == torch.float32
        assert images.min() >= -1 and images.max() <= 1
        assert labels.shape == (32,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() <= 9
    # Each worker reads its own share, so the interleaving of workers is part of what must match.
    _assert_same_batches(batches, list(_per_sample_loader(digits_mds, num_workers=num_workers)))
    # Every training digit appears once per epoch (less the dropped remainder), scaled from 0..255 to [-1, 1].
    reference = {np.asarray(image).tobytes(): label for image, label in digits_images('train')}
    for batch in batches[:3]:
        for image, label in zip(batch['image'], batch['label']):
            pixels = np.round((image[0].numpy() + 1) * 127.5).astype(np.uint8)
            assert reference[pixels.tobytes()] == int(label)


def test_unshuffled_batches_are_the_digits_in_order(digits_mds):
    batch = next(iter(_loader(digits_mds, batch_size=16, shuffle=False)))
    digits = digits_images('train')[:16]
    expected = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image, _ in digits]))[:, None]
    torch.testing.assert_close(batch['image'], expected / 127.5 - 1.0, rtol=0, atol=0)
    assert batch['label'].tolist() == [label for _, label in digits]


def test_resume_mid_epoch_replays_the_batch_sequence(digits_mds):
    full = _loader(digits_mds, random_flip=True)
    batches = iter(full)
    epoch0 = [next(batches) for _ in range(5)]
    # The state a checkpoint after 5 batches holds (Composer counts samples from the start of the epoch).
    state = full.dataset.state_dict(num_samples=5 * 32, from_beginning=True)
    epoch0 += list(batches)
    epoch1 = list(full)
    assert not all(torch.equal(a['image'], b['image']) for a, b in zip(epoch0, epoch1))  # a new shuffle
    resumed = _loader(digits_mds, random_flip=True)
    resumed.dataset.load_state_dict(state)
    _assert_same_batches(list(resumed), epoch0[5:])
    _assert_same_batches(list(resumed), epoch1)


def test_random_flip_is_a_function_of_the_sample(digits_mds):
    mask = flip_mask(3, np.arange(10_000))
    assert 0.48 < mask.mean() < 0.52 and np.array_equal(mask, flip_mask(3, np.arange(10_000)))
    assert not np.array_equal(mask, flip_mask(4, np.arange(10_000)))
    plain = StreamingImageDataset(local=digits_mds, split='train', shuffle=False, batch_size=8, seed=3)
    flipped = StreamingImageDataset(
        local=digits_mds, split='train', shuffle=False, batch_size=8, seed=3, random_flip=True
    )
    batch = next(iter(_loader(digits_mds, batch_size=64, shuffle=False, random_flip=True)))
    for i in range(64):
        expected = plain[i]['image'].flip(-1) if flip_mask(3, np.array([i]))[0] else plain[i]['image']
        assert torch.equal(flipped[i]['image'], expected) and torch.equal(batch['image'][i], expected)


def test_png_shards_of_the_earlier_format_read_the_same_and_convert_again(digits_mds, tmp_path):
    from streaming import MDSWriter

    old = tmp_path / 'old'
    for split in ('train', 'val'):
        with MDSWriter(out=str(old / split), columns={'image': 'png', 'label': 'int'}) as writer:
            for image, label in digits_images(split):
                writer.write({'image': image, 'label': label})
    # PNG is lossless: sample by sample, the same batches.
    _assert_same_batches(list(_loader(str(old))), list(_loader(digits_mds)))
    convert_digits(str(old))
    assert image_encoding(str(old / 'train')) == image_encoding(str(old / 'val')) == 'ndarray:uint8:1,8,8'
    _assert_same_batches(list(_loader(str(old))), list(_loader(digits_mds)))
    # A folder holding other PNG shards is not the digits: left alone.
    other = tmp_path / 'other'
    with MDSWriter(out=str(other / 'train'), columns={'image': 'png', 'label': 'int'}) as writer:
        writer.write({'image': digits_images('train')[0][0], 'label': 0})
    convert_digits(str(other))
    assert image_encoding(str(other / 'train')) == 'png'


def test_channels_convert_as_pil_does(tmp_path):
    rng = np.random.default_rng(0)
    rgb = [Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)) for _ in range(6)]
    write_mds([(image, i % 2) for i, image in enumerate(rgb)], str(tmp_path / 'fixed'), progress=False, shape=(3, 8, 8))
    write_mds([(image, i % 2) for i, image in enumerate(rgb)], str(tmp_path / 'any'), progress=False)
    assert image_encoding(str(tmp_path / 'any')) == 'ndarray:uint8'
    gray = torch.from_numpy(np.stack([np.asarray(image.convert('L'), dtype=np.float32) for image in rgb]))[:, None]
    color = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32).transpose(2, 0, 1) for image in rgb]))
    for folder in ('fixed', 'any'):
        for channels, expected in ((1, gray), (3, color), (None, color)):
            loader = build_streaming_image_dataloader(6, local=str(tmp_path / folder), shuffle=False, channels=channels)
            batch = next(iter(loader))
            torch.testing.assert_close(batch['image'], expected / 127.5 - 1, rtol=0, atol=0)
            assert batch['label'].tolist() == [0, 1, 0, 1, 0, 1]
            torch.testing.assert_close(loader.dataset[4]['image'], expected[4] / 127.5 - 1, rtol=0, atol=0)
    with pytest.raises(ValueError, match='shape'):
        write_mds([(rgb[0], 0), (rgb[1].resize((4, 4)), 1)], str(tmp_path / 'mixed'), progress=False, shape=(3, 8, 8))


def test_shards_evicted_under_cache_limit_are_downloaded_again(tmp_path):
    remote = tmp_path / 'remote'
    samples = digits_images('train')
    # About 55 digits a shard: 27 shards, of which the cache holds 6.
    write_mds(samples, str(remote / 'train'), size_limit=4096, progress=False, shape=DIGITS_SHAPE)
    loader = build_streaming_image_dataloader(
        64,
        remote=str(remote),
        local=str(tmp_path / 'cache'),
        split='train',
        shuffle=False,
        cache_limit=6 * 4096,
        channels=1,
    )
    assert loader.dataset.cache_limit == 6 * 4096 and loader.dataset.num_shards > 20
    for _ in range(2):  # the second epoch finds most shards evicted
        images = torch.cat([b['image'] for b in loader])
        expected = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image, _ in samples]))
        torch.testing.assert_close(images, expected[: len(images), None] / 127.5 - 1, rtol=0, atol=0)
        assert len(images) == 1437 // 64 * 64
        assert loader.dataset.cache_usage <= 6 * 4096


def test_a_download_that_starts_during_another_leaves_room_for_both(tmp_path, monkeypatch):
    # Streaming counts a shard's bytes when its download ends: a download that started in between made room for
    # itself alone, and the cache ended a shard over its limit. Here the first download waits until the second has
    # started (at most a second, which it spends when the downloads take turns).
    from streaming.base.stream import Stream

    remote = tmp_path / 'remote'
    write_mds(digits_images('train'), str(remote / 'train'), size_limit=4096, progress=False, shape=DIGITS_SHAPE)
    dataset = StreamingImageDataset(
        remote=str(remote),
        local=str(tmp_path / 'cache'),
        split='train',
        batch_size=64,
        shuffle=False,
        cache_limit=6 * 4096,
        yield_batches=True,
    )
    download = Stream.prepare_shard
    second_started = threading.Event()

    def first_waits_for_second(stream, shard):
        if threading.current_thread().name == 'first':
            second_started.wait(1.0)
        else:
            second_started.set()
        return download(stream, shard)

    for shard_id in range(3):  # beside the index, the cache holds three of these shards
        dataset.prepare_shard(shard_id)
    monkeypatch.setattr(Stream, 'prepare_shard', first_waits_for_second)
    first = threading.Thread(target=dataset.prepare_shard, args=(3,), name='first')
    first.start()
    while first.is_alive() and dataset._shard_states[3] == _ShardState.REMOTE:  # until the first takes its shard
        time.sleep(0.001)
    second = threading.Thread(target=dataset.prepare_shard, args=(4,), name='second')
    second.start()
    first.join()
    second.join()
    assert dataset._shard_states[3] == dataset._shard_states[4] == _ShardState.LOCAL
    assert dataset.cache_usage <= 6 * 4096


def _waits_for_lock(path: str) -> bool:
    """Whether some process or thread is blocked waiting for a lock on the file ``path`` (Linux's /proc/locks marks
    a waiter with ``->``)."""
    inode = f':{os.stat(path).st_ino} '
    with open('/proc/locks') as f:
        return any('->' in line and inode in line for line in f)


def _build_at_once(root: str) -> list:
    """Two unshuffled datasets of ``root`` built on two threads, each scan for a free shared-memory prefix held open
    until the other construction has scanned too or is waiting for the lock around construction. Returns what each
    thread got: a dataset or the exception it raised."""
    from streaming.base.shared import prefix

    lock_path = os.path.join(tempfile.gettempdir(), streaming_module._SHM_PREFIX_LOCK_NAME)
    scanned = []
    scan = prefix._check_and_find

    def scan_held_open(streams_local, streams_remote, shm_name):
        found = scan(streams_local, streams_remote, shm_name)
        if shm_name == prefix.SHM_TO_CLEAN[-1]:  # the scan is over every name; creation comes next
            scanned.append(found)
            deadline = time.monotonic() + 60
            while len(scanned) < 2 and not (os.path.exists(lock_path) and _waits_for_lock(lock_path)):
                assert time.monotonic() < deadline, 'the other construction neither scanned nor waited for the lock'
                time.sleep(0.01)
        return found

    results = [None, None]

    def build(i):
        try:
            results[i] = StreamingImageDataset(
                local=root, split='train', shuffle=False, batch_size=16, channels=1, image_size=8, yield_batches=True
            )
        except Exception as e:  # the test inspects it
            results[i] = e

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(prefix, '_check_and_find', scan_held_open)
        threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return results


@pytest.mark.skipif(not os.path.exists('/proc/locks'), reason='finds a waiting lock in /proc/locks (Linux)')
def test_datasets_built_at_once_take_different_shared_memory_prefixes(digits_mds, monkeypatch):
    from multiprocessing import resource_tracker

    # Streaming swaps resource_tracker.register while attaching to shared memory; two constructions at once could
    # leave the swapped one behind for the rest of the session.
    monkeypatch.setattr(resource_tracker, 'register', resource_tracker.register)
    with monkeypatch.context() as unlocked:
        # Without the lock both scans find the same free prefix, and the second to create it fails.
        unlocked.setattr(streaming_module, '_shm_prefix_lock', contextlib.nullcontext)
        results = _build_at_once(digits_mds)
        errors = [r for r in results if isinstance(r, Exception)]
        assert len(errors) == 1 and isinstance(errors[0], FileExistsError) and '_locals' in str(errors[0])
        del results, errors  # frees the built one's shared memory
    first, second = _build_at_once(digits_mds)
    assert isinstance(first, StreamingImageDataset) and isinstance(second, StreamingImageDataset)
    assert first._shm_prefix_int != second._shm_prefix_int
    digits = digits_images('train')[:16]
    expected = torch.from_numpy(np.stack([np.asarray(image, dtype=np.float32) for image, _ in digits]))[:, None]
    for dataset in (first, second):
        batch = next(iter(dataset))
        torch.testing.assert_close(batch['image'], expected / 127.5 - 1.0, rtol=0, atol=0)
        assert batch['label'].tolist() == [label for _, label in digits]


@pytest.mark.parametrize('mode', ['package', 'unshared'])
def test_two_ranks_agree_on_a_prefix_when_another_jobs_memory_goes_mid_scan(digits_mds, tmp_path, mode):
    from two_ranks import launch_ranks

    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'shm_prefix_run.py')
    code, stdout, stderr = launch_ranks(script, digits_mds, str(tmp_path), mode, timeout=300)
    assert code is not None, 'the two ranks hung'
    lines = [(tmp_path / f'rank{rank}.txt').read_text() for rank in range(2)]
    if mode == 'package':
        assert code == 0, stdout[-2000:] + stderr[-4000:]
        assert not any(line.startswith('error') for line in lines), lines
        prefixes = [int(line.split(' ', 1)[0]) for line in lines]
        assert prefixes[0] == prefixes[1], lines
        # Rank r holds positions r, r + 2, ... of the global batch: the first 16 digits, dealt in turn.
        labels = [label for _, label in digits_images('train')[:16]]
        assert [line.split(' ', 1)[1] for line in lines] == [str(labels[0::2]), str(labels[1::2])], lines
    else:
        # Streaming's own way: the rank that scanned later looks for a prefix the leader never registered.
        assert 'was not registered by local leader' in lines[1], lines

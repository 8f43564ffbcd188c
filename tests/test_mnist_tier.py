"""The MNIST tier's data and FID features: the bundled MNIST split, its MDS shards, automatic conversion from a
recipe, and the classifier trained on the training split only."""

from __future__ import annotations

import collections
import filecmp
import importlib.util
import os

import numpy as np
import pytest
import torch
from conftest import MNIST_SIZE

from composer_algos.config import ConfigError, prepare_data
from composer_algos.data import StreamingImageDataset
from composer_algos.data.convert import mnist5k_images
from composer_algos.evaluation import fid_from_samples, real_vs_real_fid
from composer_algos.evaluation.features import (
    DigitFeatures,
    build_feature_extractor,
    digit_classifier_path,
    mnist5k_arrays,
    train_digit_classifier,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _arrays(pairs) -> np.ndarray:
    return np.stack([np.asarray(image) for image, _ in pairs])


def test_split_is_stratified_disjoint_and_deterministic():
    train, val = mnist5k_images('train'), mnist5k_images('val')
    assert len(train) == 4000 and len(val) == 1000
    assert collections.Counter(y for _, y in train) == {d: 400 for d in range(10)}
    assert collections.Counter(y for _, y in val) == {d: 100 for d in range(10)}
    # Classes take turns, so any prefix of a split holds every digit.
    assert [y for _, y in val[:20]] == list(range(10)) * 2
    train_bytes = {np.asarray(image).tobytes() for image, _ in train}
    assert not train_bytes & {np.asarray(image).tobytes() for image, _ in val}
    again = mnist5k_images('val')
    assert np.array_equal(_arrays(again), _arrays(val)) and [y for _, y in again] == [y for _, y in val]
    with pytest.raises(ValueError, match="'train' or 'val'"):
        mnist5k_images('test')


def test_images_are_uint8_and_downsampling_keeps_the_ink():
    full, small = _arrays(mnist5k_images('val')), _arrays(mnist5k_images('val', MNIST_SIZE))
    assert full.shape == (1000, 28, 28) and full.dtype == np.uint8 and full.min() == 0 and full.max() == 255
    assert small.shape == (1000, MNIST_SIZE, MNIST_SIZE) and small.dtype == np.uint8
    # A box filter averages each pixel's area: the ink per image follows the original's (PIL's fractional box
    # weights and uint8 rounding lose about 2% of it).
    ink_full, ink_small = full.reshape(1000, -1).mean(1), small.reshape(1000, -1).mean(1)
    assert np.corrcoef(ink_full, ink_small)[0, 1] > 0.98
    assert 0.97 < ink_small.mean() / ink_full.mean() < 1.01


def test_shards_load_in_range_and_in_the_written_order(mnist_mds):
    val = StreamingImageDataset(
        local=mnist_mds, split='val', shuffle=False, batch_size=1, channels=1, image_size=MNIST_SIZE
    )
    train = StreamingImageDataset(
        local=mnist_mds, split='train', shuffle=False, batch_size=1, channels=1, image_size=MNIST_SIZE
    )
    assert len(val) == 1000 and len(train) == 4000
    images = torch.stack([val[i]['image'] for i in range(50)])
    assert images.shape == (50, 1, MNIST_SIZE, MNIST_SIZE)
    assert images.min() == -1.0 and images.max() <= 1.0 and images.max() > 0.9
    expected = mnist5k_arrays('val', MNIST_SIZE)
    torch.testing.assert_close(images, expected[0][:50])
    assert [val[i]['label'] for i in range(50)] == expected[1][:50].tolist()


def _convert_dataset():
    spec = importlib.util.spec_from_file_location(
        'convert_dataset', os.path.join(ROOT, 'recipes', 'convert_dataset.py')
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_converter_writes_the_same_shards_every_time(mnist_mds, tmp_path, capsys):
    convert = _convert_dataset()
    out = tmp_path / 'mnist'
    assert (
        convert.main(['--dataset', 'mnist5k', '--image-size', str(MNIST_SIZE), '--out', str(out), '--no-progress']) == 0
    )
    for split in ('train', 'val'):
        names = sorted(os.listdir(out / split))
        assert names == sorted(os.listdir(os.path.join(mnist_mds, split))) and 'index.json' in names
        match, mismatch, errors = filecmp.cmpfiles(out / split, os.path.join(mnist_mds, split), names, shallow=False)
        assert not mismatch and not errors, (mismatch, errors)
    with pytest.raises(SystemExit):
        convert.main(['--dataset', 'digits', '--image-size', '16', '--out', str(tmp_path / 'x')])
    assert '--image-size applies to --dataset mnist5k' in capsys.readouterr().err


def test_prepare_data_converts_the_named_dataset_once(tmp_path):
    cfg = {'train_loader': {'local': str(tmp_path / 'mnist'), 'image_size': MNIST_SIZE}}
    prepare_data(cfg, 'mnist5k')
    ds = StreamingImageDataset(
        local=str(tmp_path / 'mnist'), split='train', shuffle=False, batch_size=1, image_size=MNIST_SIZE
    )
    assert len(ds) == 4000
    index = tmp_path / 'mnist' / 'train' / 'index.json'
    written = index.stat().st_mtime_ns
    prepare_data(cfg, 'mnist5k')  # present: left alone
    assert index.stat().st_mtime_ns == written
    # true still means the 8x8 digits, as before a dataset could be named.
    prepare_data({'train_loader': {'local': str(tmp_path / 'digits')}}, True)
    assert (
        len(
            StreamingImageDataset(
                local=str(tmp_path / 'digits'), split='val', shuffle=False, batch_size=1, image_size=8
            )
        )
        == 360
    )
    with pytest.raises(ConfigError, match="Did you mean 'mnist5k'"):
        prepare_data(cfg, 'mnist5')
    with pytest.raises(ConfigError, match='needs train_loader.local'):
        prepare_data({'train_loader': {}}, 'mnist5k')


# ------------------------------------------------------------------------------------------------ FID features
@pytest.fixture(scope='module')
def mnist_features(mnist_classifier_cache) -> DigitFeatures:
    return build_feature_extractor('mnist', (1, MNIST_SIZE, MNIST_SIZE), classifier_cache_dir=mnist_classifier_cache)


def test_mnist_classifier_is_accurate_on_the_held_out_split(mnist_features):
    # The shipped weights, trained on the 4000 training digits only; 98.4% on the 1000 validation digits.
    assert mnist_features.accuracy >= 0.97
    assert mnist_features.shipped and os.path.basename(mnist_features.cache_path) == f'mnist5k-{MNIST_SIZE}.pt'
    val_x, val_y = mnist5k_arrays('val', MNIST_SIZE)
    with torch.no_grad():
        predictions = mnist_features.classifier(val_x).argmax(1)
    assert float((predictions == val_y).float().mean()) == pytest.approx(mnist_features.accuracy, abs=1e-6)
    assert mnist_features(val_x[:3]).shape == (3, 64)
    with pytest.raises(ValueError, match=r'\(N, 1, 16, 16\)'):
        mnist_features(torch.zeros(2, 1, 8, 8))


def test_digits_classifier_keeps_its_config_and_cache_file():
    # The MNIST classifier is a second config; the digits one (and its cached file name) must not change.
    assert os.path.basename(digit_classifier_path('/cache')) == 'digit_classifier-863548c05790f772.pt'
    with pytest.raises(ValueError, match="feature='mnist' needs square"):
        build_feature_extractor('mnist', None)
    with pytest.raises(ValueError, match='dataset must be one of'):
        digit_classifier_path('/cache', {'dataset': 'cifar'})


def test_classifier_training_is_deterministic():
    config = {'dataset': 'mnist5k', 'image_size': 8, 'width': 8, 'num_features': 16, 'epochs': 2, 'lr': 1e-2}
    torch.set_num_threads(2)  # training uses one thread whatever the caller's setting
    try:
        first, accuracy = train_digit_classifier(config)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
    second, again = train_digit_classifier(config)
    assert accuracy == again and accuracy > 0.5  # two epochs of a tiny net at 8x8: far above chance (0.1)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b)


def test_real_vs_real_floor_is_far_below_a_degraded_set(mnist_features):
    val, train = mnist5k_arrays('val', MNIST_SIZE)[0], mnist5k_arrays('train', MNIST_SIZE)[0]
    floor = real_vs_real_fid(val, mnist_features)
    train_vs_val = fid_from_samples(val, train[:1000], mnist_features)
    # Blurred digits: still digit-like to the eye, but another distribution.
    blurred = torch.nn.functional.avg_pool2d(val, 3, stride=1, padding=1, count_include_pad=False)
    degraded = fid_from_samples(val, blurred, mnist_features)
    assert 0 < train_vs_val < floor * 1.5  # two real samples: the floor's size (the floor uses half-size sets)
    assert degraded > 5 * floor

"""Evaluation functions: FID on the digit classifier's features, bits/dim, pictures and the consistency check."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import tiny_model
from PIL import Image

from composer_algos.evaluation import (
    InceptionFeatures,
    bits_per_dim,
    consistency_diagnostic,
    digit_classifier_path,
    fid_from_samples,
    fid_metric,
    generate_samples,
    image_grid,
    load_or_train_digit_classifier,
    pair_statistics,
    rank_indices,
    real_vs_real_fid,
    side_by_side_grid,
    timestep_heatmap_png,
    update_fid,
    vlb_timesteps,
)
from composer_algos.evaluation import features as features_module
from composer_algos.evaluation.features import digits_arrays, weights_sha256
from composer_algos.evaluation.fid import floor_at


@pytest.fixture(scope='session')
def classifier_cache(tmp_path_factory) -> str:
    # The shipped classifier needs no cache; classifiers of other configs are trained into this one folder.
    path = tmp_path_factory.getbasetemp() / 'digit_classifier_cache'
    path.mkdir(exist_ok=True)
    return str(path)


@pytest.fixture(scope='session')
def digit_features(classifier_cache):
    return load_or_train_digit_classifier(classifier_cache)


@pytest.fixture(scope='session')
def val_images() -> torch.Tensor:
    return digits_arrays('val')[0]


def test_shipped_digit_classifier_is_loaded_not_trained(classifier_cache, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError('the shipped classifier should have been loaded, not trained')

    monkeypatch.setattr(features_module, 'train_digit_classifier', no_training)
    features = load_or_train_digit_classifier(classifier_cache)
    entry = features_module.shipped_classifiers()['digits']
    assert features.shipped and features.sha256 == entry['sha256'] == weights_sha256(features.classifier.state_dict())
    assert features.accuracy == entry['accuracy'] >= 0.95
    assert features.cache_path == os.path.join(features_module.SHIPPED_WEIGHTS_DIR, 'digits.pt')
    assert not os.listdir(classifier_cache)  # nothing trained, nothing cached


def test_shipped_classifier_whose_weights_changed_is_refused(tmp_path, monkeypatch):
    shutil.copytree(features_module.SHIPPED_WEIGHTS_DIR, tmp_path / 'weights')
    monkeypatch.setattr(features_module, 'SHIPPED_WEIGHTS_DIR', str(tmp_path / 'weights'))
    path = tmp_path / 'weights' / 'digits.pt'
    saved = torch.load(path, weights_only=True)
    next(iter(saved['state_dict'].values())).view(-1)[0] += 1e-6
    torch.save(saved, path)
    with pytest.raises(RuntimeError, match=r'digits\.pt holds weights of sha256 .* the file was changed'):
        load_or_train_digit_classifier(str(tmp_path / 'cache'))


def test_weights_sha256_names_the_tensors_not_the_file():
    weights = {'b': torch.arange(3.0), 'a': torch.ones(2, 2)}
    same = {'a': torch.ones(2, 2), 'b': torch.arange(3.0).clone()}
    assert weights_sha256(weights) == weights_sha256(same)
    assert weights_sha256(weights) != weights_sha256({**weights, 'b': torch.arange(3.0) + 1e-7})
    assert weights_sha256(weights) != weights_sha256({**weights, 'a': torch.ones(4)})  # same bytes, other shape


def test_unshipped_classifier_is_trained_once_and_cached(classifier_cache, monkeypatch):
    config = {'epochs': 3, 'width': 8}  # not a shipped config: trained on first use
    first = load_or_train_digit_classifier(classifier_cache, config, min_accuracy=0.5)
    assert not first.shipped and first.cache_path == digit_classifier_path(classifier_cache, config)

    def no_training(*args, **kwargs):
        raise AssertionError('the cached classifier should have been loaded, not retrained')

    monkeypatch.setattr(features_module, 'train_digit_classifier', no_training)
    again = load_or_train_digit_classifier(classifier_cache, config, min_accuracy=0.5)
    assert again.sha256 == first.sha256 and again.accuracy == first.accuracy
    # Another config is another file, so it would be trained, never confused with this one.
    assert digit_classifier_path(classifier_cache, {**config, 'epochs': 4}) != first.cache_path
    with pytest.raises(AssertionError, match='cached classifier'):
        load_or_train_digit_classifier(classifier_cache, {**config, 'epochs': 4})


def test_floor_at_scales_with_the_sample_sizes():
    # Halves of 500 and 500 (FID 20): 2000 samples against 1000 real images have 1.5e-3 / 4e-3 of the excess.
    assert floor_at(20.0, 500, 500, 2000, 1000) == pytest.approx(7.5)
    assert floor_at(20.0, 500, 500, 500, 500) == pytest.approx(20.0)


def test_digit_classifier_classifies_val_split(digit_features, val_images):
    val_labels = digits_arrays('val')[1]
    with torch.no_grad():
        predictions = digit_features.classifier(val_images).argmax(1)
    assert float((predictions == val_labels).float().mean()) == pytest.approx(digit_features.accuracy, abs=1e-6)
    assert digit_features(val_images[:5]).shape == (5, digit_features.num_features)


def test_fid_of_a_set_with_itself_is_zero_and_grows_with_noise(digit_features, val_images):
    assert abs(fid_from_samples(val_images, val_images, digit_features)) < 1e-3
    gen = torch.Generator().manual_seed(0)
    values = [
        fid_from_samples(
            val_images, (val_images + s * torch.randn(val_images.shape, generator=gen)).clamp(-1, 1), digit_features
        )
        for s in (0.05, 0.2, 0.5)
    ]
    assert 0 < values[0] < values[1] < values[2]
    floor = real_vs_real_fid(val_images, digit_features)
    assert 0 < floor < values[2]


def test_rank_shares_give_the_same_samples_and_fid(digit_features, val_images):
    model = tiny_model(num_timesteps=20)
    model.eval()
    shape, n = (1, 8, 8), 10
    full = generate_samples(model, range(n), shape, num_steps=4, seed=3)
    shares = [
        generate_samples(model, rank_indices(n, r, 2), shape, num_steps=4, seed=3, batch_size=3) for r in range(2)
    ]
    merged = torch.empty_like(full)
    merged[0::2], merged[1::2] = shares
    assert torch.allclose(merged, full, atol=1e-5)
    # A rank with no samples left still runs its padding batches (FSDP ranks must call the model equally often).
    calls = []
    handle = model.denoiser.register_forward_hook(lambda *args: calls.append(1))
    assert generate_samples(model, [], shape, num_steps=2, num_batches=1).shape == (0, *shape)
    handle.remove()
    assert len(calls) == 2

    # What torchmetrics does across ranks: sum each rank's feature statistics, then compute.
    one = fid_metric(digit_features)
    update_fid(one, val_images, real=True)
    update_fid(one, full, real=False)
    per_rank = []
    for r in range(2):
        metric = fid_metric(digit_features)
        update_fid(metric, val_images[r::2], real=True)
        update_fid(metric, shares[r], real=False)
        per_rank.append(metric)
    per_rank[0].merge_state(per_rank[1])
    assert float(per_rank[0].compute()) == pytest.approx(float(one.compute()), rel=1e-5)


def test_inception_weights_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match='inception_weights') as info:
        InceptionFeatures(str(tmp_path / 'missing.pth'))
    assert 'https://' in str(info.value)


class _KnownTerms(nn.Module):
    """A stand-in with closed-form VLB terms: L_t = (t + 1) / 100 per image, prior 0.5 (nats/dim)."""

    def __init__(self, num_timesteps: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.noise_schedule = type('Schedule', (), {'num_timesteps': num_timesteps})()

    def vlb_terms(self, x0, t, noise, conditioning=None):
        return (t.double() + 1) / 100 + 0 * x0.flatten(1).mean(1)

    def prior_term(self, x0):
        return torch.full((x0.shape[0],), 0.5, dtype=torch.float64)


def test_bits_per_dim_sums_all_terms_and_strided_estimate_is_unbiased():
    T = 50
    model = _KnownTerms(T)
    images = torch.zeros(3, 1, 8, 8)
    exact_nats = sum((t + 1) / 100 for t in range(T)) + 0.5
    full = bits_per_dim(model, images, num_terms=None, batch_size=2)
    assert torch.allclose(full, torch.full((3,), exact_nats / math.log(2), dtype=torch.float64))

    t, w = vlb_timesteps(T, 6, seed=1)
    assert t[0] == 0 and float(w.sum()) == T and len(t) == 6 and (t[1:] >= 1).all() and (t < T).all()
    estimates = torch.stack([bits_per_dim(model, images[:1], num_terms=6, seed=s)[0] for s in range(300)])
    assert float(estimates.mean()) == pytest.approx(exact_nats / math.log(2), rel=0.01)
    assert float(estimates.std()) > 0  # it is an estimate: the strata draws matter


def test_bits_per_dim_of_a_model_is_finite_and_positive(val_images):
    model = tiny_model(num_timesteps=20).eval()
    exact = bits_per_dim(model, val_images[:6], num_terms=None, batch_size=4)
    strided = bits_per_dim(model, val_images[:6], num_terms=8, batch_size=4, num_batches=3)
    for value in (exact, strided):
        assert value.shape == (6,) and torch.isfinite(value).all() and (value > 0).all()
    assert float(strided.mean()) == pytest.approx(float(exact.mean()), rel=0.5)


def test_timestep_heatmap_png_has_the_figure_shape(tmp_path):
    probs = torch.softmax(torch.randn(4, 50, generator=torch.Generator().manual_seed(0)), dim=1)
    path = str(tmp_path / 'heatmap.png')
    array = timestep_heatmap_png([10, 20, 30, 40], probs, path, figsize=(7.0, 4.5), dpi=100)
    with Image.open(path) as image:
        assert image.size == (700, 450)
        read = np.asarray(image.convert('RGB'))
    assert read.shape == (450, 700, 3) and np.array_equal(read, array)
    assert read.std() > 10  # a picture, not a blank canvas
    with pytest.raises(ValueError, match='len\\(steps\\)'):
        timestep_heatmap_png([10, 20], probs, path)


def test_image_grids_have_the_expected_size():
    images = torch.rand(16, 1, 8, 8) * 2 - 1
    grid = image_grid(images, scale=2)
    # 4 x 4 cells of 16 px with 2 px padding around each.
    assert grid.shape == (4 * 16 + 5 * 2, 4 * 16 + 5 * 2, 3) and grid.dtype == np.uint8
    pair = side_by_side_grid(images, images, scale=2, gap=4)
    assert pair.shape == (grid.shape[0], 2 * grid.shape[1] + 8, 3)


def test_pair_statistics_closed_form():
    a = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]])
    same = pair_statistics(a, a)
    assert same['pair_distance'] == 0 and same['nn_fraction'] == 1.0 and same['shuffled_distance'] > 0
    shifted = pair_statistics(a, a + torch.tensor([3.0, 4.0]))
    assert shifted['pair_distance'] == pytest.approx(5.0) and shifted['nn_fraction'] == 1.0
    swapped = pair_statistics(a, a[[1, 0, 3, 2]])
    assert swapped['nn_fraction'] == 0.0


def test_consistency_of_a_model_with_itself_and_with_another(digit_features):
    model = tiny_model(num_timesteps=20, seed=1)
    same = consistency_diagnostic(model, model, 12, (1, 8, 8), digit_features, num_steps=4, seed=2)
    assert same['pixels']['nn_fraction'] == 1.0 and same['features']['nn_fraction'] == 1.0
    assert same['pixels']['pair_distance'] == 0.0 and same['pixels']['shuffled_distance'] > 0
    other = consistency_diagnostic(
        model, tiny_model(num_timesteps=20, seed=2), 12, (1, 8, 8), digit_features, num_steps=4, seed=2
    )
    assert other['pixels']['pair_distance'] > 0
    assert same['samples_a'].shape == (12, 1, 8, 8)

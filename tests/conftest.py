"""Shared fixtures: real MDS shards of the digits and MNIST, a tiny DiffusionModel, and a Trainer factory."""

from __future__ import annotations

import os
from typing import Any, Optional

import pytest
import torch
from composer.core import Callback

os.environ.setdefault('OMP_NUM_THREADS', '1')
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def release_trainers():
    """Free each test's Trainers and streaming datasets when it ends.

    Composer's Engine and streaming's SharedMemory both register ``atexit`` hooks that are never unregistered, so
    every Trainer and every shared-memory block a StreamingDataset opened stay alive (and their files open) until
    the process exits; a dataset whose epoch was cut short also keeps its prefetch threads. Over a whole suite in
    one process that exhausts the open-file limit. After each test: close the engines, stop the prefetch threads,
    release the shared memory (the test is over: nothing uses it) and unregister the hooks.
    """
    yield
    import atexit
    import gc

    from composer.core.engine import Engine
    from streaming import StreamingDataset
    from streaming.base.shared.memory import SharedMemory

    # type(), not isinstance(): some live objects answer attribute look-ups themselves (numpy's NpzFile.f raises
    # AttributeError for __class__).
    for obj in gc.get_objects():
        kind = type(obj)
        if issubclass(kind, Engine):
            obj.close()
            atexit.unregister(obj._close)
        elif issubclass(kind, StreamingDataset) and hasattr(obj, '_iterator'):
            obj._iterator.exit()
    for obj in gc.get_objects():
        if issubclass(type(obj), SharedMemory):
            obj.cleanup()
            atexit.unregister(obj.cleanup)
    gc.collect()


@pytest.fixture(scope='session')
def digits_mds(tmp_path_factory) -> str:
    """``<dir>/train`` and ``<dir>/val`` MDS shards written from scikit-learn's digits."""
    from composer_algos.data import convert_digits

    root = str(tmp_path_factory.mktemp('digits_mds'))
    convert_digits(root)
    return root


TINY_VAE = {
    'block_out_channels': [8],
    'down_block_types': ['DownEncoderBlock2D'],
    'up_block_types': ['UpDecoderBlock2D'],
    'latent_channels': 4,
    'norm_num_groups': 8,
    'sample_size': 8,
}


@pytest.fixture(scope='session')
def tiny_vae_dir(tmp_path_factory) -> str:
    """A randomly initialised AutoencoderKL (8x8 -> 4x8x8) saved like a downloaded one."""
    from diffusers import AutoencoderKL

    path = str(tmp_path_factory.mktemp('vae'))
    torch.manual_seed(0)
    AutoencoderKL(**TINY_VAE).save_pretrained(path)
    return path


@pytest.fixture(scope='session')
def latent_mds(digits_mds, tiny_vae_dir, tmp_path_factory) -> str:
    """``<dir>/{train,val}``: latents of the first digits (as RGB) under the tiny VAE."""
    from composer_algos.data import build_vae_encoder, write_latents_mds
    from composer_algos.data.convert import digits_images

    root = str(tmp_path_factory.mktemp('latents'))
    encoder = build_vae_encoder(tiny_vae_dir)
    for split in ('train', 'val'):
        images = [(image.convert('RGB'), label) for image, label in digits_images(split)[:64]]
        write_latents_mds(images, os.path.join(root, split), encoder, batch_size=16, progress=False)
    return root


MNIST_SIZE = 16  # the MNIST tier's image size (yamls/mnist/uniform.yaml)


@pytest.fixture(scope='session')
def mnist_mds(tmp_path_factory) -> str:
    """``<dir>/train`` and ``<dir>/val`` MDS shards of the bundled MNIST digits at the tier's size, written once per
    test run."""
    from composer_algos.data.convert import convert_mnist5k

    root = str(tmp_path_factory.mktemp('mnist_mds'))
    convert_mnist5k(root, image_size=MNIST_SIZE)
    return root


@pytest.fixture(scope='session')
def mnist_classifier_cache(tmp_path_factory) -> str:
    """A cache folder for FID classifiers: the MNIST tier's ships with the package, so it stays empty unless a test
    asks for another config."""
    path = tmp_path_factory.getbasetemp() / 'mnist_classifier_cache'
    path.mkdir(exist_ok=True)
    return str(path)


def tiny_model(
    num_timesteps: int = 100, prediction_type: str = 'epsilon', seed: int = 17, width: int = 16, **kwargs: Any
):
    """A DiffusionModel with a small conv denoiser (fast on CPU)."""
    from composer_algos.diffusion import DiffusionModel, NoiseSchedule, TimeConditionedConvNet

    torch.manual_seed(seed)
    return DiffusionModel(
        TimeConditionedConvNet(in_channels=1, width=width),
        NoiseSchedule('linear', num_timesteps),
        prediction_type=prediction_type,
        seed=seed,
        **kwargs,
    )


def digits_loader(root: str, batch_size: int = 32, split: str = 'train', shuffle: bool = True, seed: int = 17):
    from composer_algos.data import build_streaming_image_dataloader

    return build_streaming_image_dataloader(
        global_batch_size=batch_size, local=root, split=split, shuffle=shuffle, seed=seed, channels=1, image_size=8
    )


def make_trainer(
    root: str,
    algorithms: Optional[list] = None,
    max_duration: str = '6ba',
    model=None,
    batch_size: int = 32,
    seed: int = 17,
    **trainer_kwargs: Any,
):
    """A real Composer Trainer on the digits shards with a tiny model, fp32 on CPU."""
    from composer import Trainer

    model = model if model is not None else tiny_model(seed=seed)
    trainer_kwargs.setdefault('progress_bar', False)
    trainer_kwargs.setdefault('log_to_console', False)
    return Trainer(
        model=model,
        train_dataloader=digits_loader(root, batch_size, seed=seed),
        optimizers=torch.optim.Adam(model.parameters(), lr=1e-3),
        algorithms=algorithms or [],
        max_duration=max_duration,
        device='cpu',
        precision='fp32',
        seed=seed,
        **trainer_kwargs,
    )


class LossRecorder(Callback):
    """A Composer callback recording the training loss of every batch."""

    def __init__(self):
        self.losses: list[float] = []

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss.detach()))

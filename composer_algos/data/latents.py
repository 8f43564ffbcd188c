"""Latent diffusion data: a frozen VAE encoder (diffusers ``AutoencoderKL``) and MDS shards of precomputed latents.

:class:`~composer_algos.diffusion.DiffusionModel` takes the mode of its encoder's output times ``latent_scale``
(0.18215 for Stable Diffusion's VAE). The ``vae`` encoder of the ``encoders`` registry is the encoding half of an
``AutoencoderKL`` applied to image batches in [-1, 1]; with ``precomputed: true`` the batches already hold its
latents (column ``latents``, float16, unscaled, written by ``recipes/convert_dataset.py --encode-latents`` and read
with ``latents: true`` in the loader) and it passes them through: the VAE is neither loaded nor run, while the
model still knows its data are latents (``latent_scale`` applies; predictions are not clipped to [-1, 1]).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn

from composer_algos.data.integrity import SHARD_HASH
from composer_algos.pixels import from_uint8

__all__ = ['LATENT_COLUMNS', 'VAEEncoder', 'PrecomputedLatents', 'load_vae', 'build_vae_encoder', 'write_latents_mds']

LATENT_COLUMNS = {'latents': 'ndarray:float16', 'label': 'int'}

_WEIGHTS_HELP = (
    'On a machine with internet, save the weights to a folder, e.g. `python -c "from diffusers import '
    "AutoencoderKL; AutoencoderKL.from_pretrained('stabilityai/sd-vae-ft-ema').save_pretrained('PATH')\"`"
    ' (or `huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir PATH`), copy PATH to the '
    'cluster and set model.encoder.pretrained_path=PATH (for a Stable Diffusion folder add '
    'subfolder: vae).'
)


class VAEEncoder(nn.Module):
    """The encoding half of an ``AutoencoderKL`` (the decoder is dropped): images -> posterior over latents.

    It is left out of FSDP wrapping (``_fsdp_wrap = False``): it is frozen and small (34M parameters for Stable
    Diffusion's VAE), so every rank keeps a full copy rather than all-gathering it at every step.
    ``scaling_factor`` is the VAE's own latent scale, which ``model.latent_scale`` should match.
    """

    def __init__(self, vae: Any):  # an AutoencoderKL, whose parts torch's Module typing does not know
        super().__init__()
        self.encoder = vae.encoder
        self.quant_conv = vae.quant_conv
        self.scaling_factor = float(vae.config.scaling_factor)
        self._fsdp_wrap = False

    def forward(self, images: torch.Tensor) -> Any:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussianDistribution(moments)


class PointMass:
    """The posterior of a stored latent: all of its mass at that latent."""

    def __init__(self, latents: torch.Tensor):
        self.latents = latents

    def mode(self) -> torch.Tensor:
        return self.latents


class PrecomputedLatents(nn.Module):
    """The encoder of batches that already hold latents (``latents: true`` in the loader): passes them through."""

    def forward(self, latents: torch.Tensor) -> PointMass:
        return PointMass(latents)


def load_vae(
    pretrained_path: str | None = None, config: dict[str, Any] | None = None, subfolder: str | None = None
) -> nn.Module:
    """A diffusers ``AutoencoderKL`` from a local folder (never downloads), or with random weights from ``config``.

    Args:
        pretrained_path: a folder written by ``save_pretrained`` (``config.json`` and the weights).
        config: ``AutoencoderKL`` keyword arguments; random weights, for tests and examples only.
        subfolder: sub-folder of ``pretrained_path`` holding the VAE (``vae`` in a Stable Diffusion folder).
    """
    from diffusers import AutoencoderKL

    if (pretrained_path is None) == (config is None):
        raise ValueError(
            'Set exactly one of pretrained_path (a local folder of VAE weights) or config (random '
            f'weights, for tests). {_WEIGHTS_HELP}'
        )
    if config is not None:
        # (diffusers' top-level classes type as placeholders.)
        return AutoencoderKL(**config)  # type: ignore[return-value]
    assert pretrained_path is not None  # exactly one of the two is set
    folder = os.path.join(pretrained_path, subfolder) if subfolder else pretrained_path
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise FileNotFoundError(
            f'VAE weights not found: {folder!r} is not a folder holding config.json and the weights. {_WEIGHTS_HELP}'
        )
    return AutoencoderKL.from_pretrained(pretrained_path, subfolder=subfolder, local_files_only=True)


def build_vae_encoder(
    pretrained_path: str | None = None,
    config: dict[str, Any] | None = None,
    subfolder: str | None = None,
    precomputed: bool = False,
) -> nn.Module:
    """The ``vae`` encoder of the encoders registry (see :func:`load_vae` for the first three arguments).

    With ``precomputed=True`` the batches already hold this VAE's latents: a :class:`PrecomputedLatents` is
    returned and the weights are not loaded (``pretrained_path`` then only records which VAE made the latents).
    """
    if precomputed:
        return PrecomputedLatents()
    return VAEEncoder(load_vae(pretrained_path, config, subfolder))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    # The loaders' scaling: uint8 -> [-1, 1], (C, H, W).
    array = np.asarray(image.convert('RGB'), dtype=np.uint8).transpose(2, 0, 1)
    return from_uint8(torch.from_numpy(np.ascontiguousarray(array)))


@torch.no_grad()
def write_latents_mds(
    samples: Iterable[tuple[Image.Image, int]],
    out: str,
    encoder: nn.Module,
    batch_size: int = 32,
    device: str = 'cpu',
    size_limit: str | int = '64mb',
    total: int | None = None,
    progress: bool = True,
    compression: str | None = None,
) -> int:
    """Encode ``(image, label)`` pairs in batches and write the unscaled posterior modes (float16) to ``out``.

    All images of a batch must have the same size (centre-crop them when converting).
    """
    from streaming import MDSWriter
    from tqdm import tqdm

    encoder = encoder.to(device).eval()
    count = 0
    batch: list[tuple[Image.Image, int]] = []
    with (
        MDSWriter(
            out=out, columns=LATENT_COLUMNS, size_limit=size_limit, compression=compression, hashes=[SHARD_HASH]
        ) as writer,
        tqdm(total=total, disable=not progress, desc=f'encoding {out}', unit='img') as bar,
    ):

        def flush() -> None:
            x = torch.stack([_to_tensor(image) for image, _ in batch]).to(device)
            latents = encoder(x).mode().float().cpu().numpy().astype(np.float16)
            for latent, (_, label) in zip(latents, batch, strict=True):
                writer.write({'latents': latent, 'label': int(label)})
            bar.update(len(batch))
            batch.clear()

        for sample in samples:
            batch.append(sample)
            count += 1
            if len(batch) == batch_size:
                flush()
        if batch:
            flush()
    if count == 0:
        raise ValueError(f'No images were written to {out}: the source is empty.')
    return count

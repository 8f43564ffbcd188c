"""Data: MDS conversion, streaming image (or latent) loaders and the frozen VAE encoder of latent diffusion."""

from composer_algos.data.convert import convert_digits, convert_mnist5k, write_folder_mds, write_mds
from composer_algos.data.latents import PrecomputedLatents, VAEEncoder, build_vae_encoder, write_latents_mds
from composer_algos.data.streaming import StreamingImageDataset, build_streaming_image_dataloader

__all__ = [
    'PrecomputedLatents',
    'StreamingImageDataset',
    'VAEEncoder',
    'build_streaming_image_dataloader',
    'build_vae_encoder',
    'convert_digits',
    'convert_mnist5k',
    'write_folder_mds',
    'write_latents_mds',
    'write_mds',
]

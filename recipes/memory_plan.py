"""Per-GPU memory plan of the scale-out recipes (CIFAR-10 UNet, latent DiT-XL/2) under FSDP.

    python recipes/memory_plan.py [--gpus 8] [--gpu-memory-gb 80]

Parameter counts come from the recipes' own models built on the ``meta`` device. Training state per trainable
parameter: fp32 master weight 4 B, fp32 gradient 4 B (FSDP reduces in fp32), Adam's two moments 8 B and the EMA copy
4 B, all sharded over the ``--gpus`` ranks. FSDP also gathers bf16 copies of the units being run: the denoiser's own
unit for the whole forward and backward and about two blocks (the current one and the prefetched next), or every
unit when the recipe keeps them gathered between forward and backward (``reshard_after_forward: false``), and
unsharded gradients of about two blocks before the fp32 reduce-scatter. The frozen VAE encoder is kept whole on every
rank in fp32.

Activations are measured, not modelled: one forward of a micro-batch of 2 on CPU with bf16 parameters under bf16
autocast (as FSDP's mixed precision and ``amp_bf16`` run on GPU), summing the bytes of every distinct non-parameter
tensor autograd saves for the backward pass, each attributed to the block that saved it. The UNet is measured at
its real 32x32 size; DiT-XL/2 at full width with 1 and 2 blocks, extrapolated linearly to 28 (its blocks are
identical; 256 tokens). Per-sample bytes are scaled linearly to the recipe's micro-batch. With activation
checkpointing the saved set becomes what lies outside the blocks, the blocks' inputs, and one block's activations
while it is recomputed. Not counted: temporary buffers inside kernels, the CUDA context (~0.5-1 GB), allocator
fragmentation (keep 10-20% headroom); GPU attention kernels may save slightly different tensors than the CPU ones.
The VAE runs without grad: its cost is transient, estimated as 3x its largest intermediate tensor (measured at
64x64, scaled by area) and, conservatively, added to the peak.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GB = 1e9
# Stable Diffusion's VAE (stabilityai/sd-vae-ft-ema): 83.7M parameters, 34.2M in the encoder half.
SD_VAE = {
    'block_out_channels': (128, 256, 512, 512),
    'down_block_types': ('DownEncoderBlock2D',) * 4,
    'up_block_types': ('UpDecoderBlock2D',) * 4,
    'layers_per_block': 2,
    'latent_channels': 4,
    'sample_size': 256,
}


def recipe_denoiser(recipe: str, device: str = 'meta', **changes: Any) -> Any:
    """A recipe's denoiser module (Any: its FSDP policies are attributes torch's Module typing does not know)."""
    from composer_algos import registry
    from composer_algos.config import call_with_config, load_config

    cfg = dict(load_config(os.path.join(ROOT, recipe))['model']['denoiser'], **changes)
    with torch.device(device):
        return call_with_config(registry.resolve(registry.denoisers, cfg.pop('name'), 'denoiser'), cfg, 'denoiser')


def fsdp_setting(recipe: str, key: str) -> Any:
    from composer_algos.config import load_config

    return load_config(os.path.join(ROOT, recipe))['parallelism_config']['fsdp'][key]


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class SavedTensors:
    """Bytes autograd saves during a forward, attributed to the block running when they are saved (or to none)."""

    def __init__(self, model: nn.Module, blocks: list[nn.Module]):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.sizes: dict[int, int] = {}  # storage -> bytes, every distinct saved storage
        self.owner: dict[int, int] = {}  # storage -> index of the block that saved it, -1 outside the blocks
        self.inputs: dict[int, int] = {}  # storage -> bytes of the blocks' floating-point inputs
        self.alive: list[torch.Tensor] = []  # held so that no storage address is reused during the forward
        self.current = -1
        self.num_blocks = len(blocks)
        for i, block in enumerate(blocks):
            block.register_forward_pre_hook(self._enter(i), with_kwargs=True)
            block.register_forward_hook(self._leave)

    def _enter(self, index: int):
        def hook(module, args, kwargs):
            self.current = index
            for value in [*args, *kwargs.values()]:
                for t in value if isinstance(value, (tuple, list)) else [value]:
                    if torch.is_tensor(t) and t.is_floating_point():
                        self.alive.append(t)
                        self.inputs[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

        return hook

    def _leave(self, module, args, output):
        self.current = -1

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in self.params and key not in self.sizes:
            self.sizes[key] = t.untyped_storage().nbytes()
            self.owner[key] = self.current
        return t

    def per_block(self) -> list[int]:
        return [sum(n for k, n in self.sizes.items() if self.owner[k] == b) for b in range(self.num_blocks)]

    def total(self) -> int:
        return sum(self.sizes.values())

    def checkpointed(self) -> int:
        """Saved bytes with the blocks checkpointed: what lies outside them, their inputs, one block recomputed."""
        kept = {k: n for k, n in self.sizes.items() if self.owner[k] == -1}
        kept.update(self.inputs)
        return sum(kept.values()) + max(self.per_block())


def measure(model: nn.Module, blocks: list[nn.Module], *inputs: torch.Tensor, **kwargs: Any) -> SavedTensors:
    # bf16 parameters, as FSDP's mixed precision gathers them: autocast then makes no bf16 copies of the weights
    # (copies it would save for the backward pass although they are not activations).
    model.to(torch.bfloat16).train()
    saved = SavedTensors(model, blocks)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t), torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(*inputs, **kwargs)
    del out
    return saved


def unet_activations(batch: int = 2) -> dict[str, float]:
    """Per-sample saved bytes of the CIFAR-10 UNet, without and with activation checkpointing."""
    torch.manual_seed(0)
    unet = recipe_denoiser('yamls/cifar10/base.yaml', device='cpu')
    x = torch.randn(batch, 3, 32, 32)
    t = torch.randint(0, 1000, (batch,))
    saved = measure(unet, unet.activation_checkpointing_fn.blocks, x, t)
    return {'none': saved.total() / batch, 'checkpointed': saved.checkpointed() / batch}


def dit_activations(num_layers: int, batch: int = 2) -> dict[str, float]:
    """Per-sample saved bytes of the DiT: measured with 1 and 2 blocks at full width, extrapolated to ``num_layers``."""
    saved = []
    for layers in (1, 2):
        torch.manual_seed(0)
        dit = recipe_denoiser('yamls/latent256/base.yaml', device='cpu', num_layers=layers)
        x = torch.randn(batch, 4, 32, 32)
        t = torch.randint(0, 1000, (batch,))
        y = torch.randint(0, 1000, (batch,))
        saved.append(measure(dit, dit.activation_checkpointing_fn.blocks, x, t, class_labels=y))
    one, two = saved
    # Each added block adds what the second block of `two` saved (without checkpointing) or its input (with).
    block = two.per_block()[1]
    block_input = two.checkpointed() - one.checkpointed()
    return {
        'none': (one.total() + (num_layers - 1) * block) / batch,
        'checkpointed': (one.checkpointed() + (num_layers - 1) * block_input) / batch,
    }


def vae_transient(image_size: int = 256, measured_size: int = 64) -> float:
    """Per-sample bytes of the VAE encoder's forward (no grad): 3x its largest intermediate tensor, in bf16."""
    from diffusers import AutoencoderKL

    from composer_algos.data.latents import VAEEncoder

    torch.manual_seed(0)
    encoder = VAEEncoder(AutoencoderKL(**SD_VAE))
    largest = [0]

    def hook(module, args, output):
        if torch.is_tensor(output):
            largest[0] = max(largest[0], output.numel() * 2)

    for module in encoder.modules():
        module.register_forward_hook(hook)
    with torch.no_grad():
        encoder(torch.randn(1, 3, measured_size, measured_size))
    return 3 * largest[0] * (image_size / measured_size) ** 2


def plan(
    name: str,
    trainable: int,
    frozen: int,
    root_unit: int,
    largest_unit: int,
    per_sample: dict[str, float],
    microbatch: int,
    gpus: int,
    reshard_after_forward: bool,
    transient_per_sample: float = 0.0,
) -> list[tuple[str, float]]:
    shard = 1.0 / gpus
    # Gathered bf16 weights: the denoiser's own unit and about two blocks (running, prefetched); without
    # resharding after forward, every unit stays gathered until its backward. Plus two blocks' unsharded
    # gradients, in bf16 and cast to fp32 for the reduce-scatter.
    if reshard_after_forward:
        gathered, what = 2 * (root_unit + 2 * largest_unit), 'own unit + 2 blocks'
    else:
        gathered, what = 2 * trainable, 'whole denoiser'
    gathered += 6 * 2 * largest_unit
    rows = [
        ('parameters, fp32 master (sharded)', 4 * trainable * shard),
        ('gradients, fp32 (sharded)', 4 * trainable * shard),
        ('Adam moments, 2 x fp32 (sharded)', 8 * trainable * shard),
        ('EMA copy, fp32 (sharded)', 4 * trainable * shard),
        (f'gathered bf16 weights ({what}) + 2 blocks of gradients', gathered),
        (f'activations, micro-batch {microbatch}, no checkpointing', per_sample['none'] * microbatch),
        (f'activations, micro-batch {microbatch}, blocks checkpointed', per_sample['checkpointed'] * microbatch),
    ]
    if frozen:
        rows.insert(4, ('frozen VAE encoder, fp32 (whole)', 4 * frozen))
    if transient_per_sample:
        rows.append((f'VAE forward (no grad), micro-batch {microbatch}', transient_per_sample * microbatch))
    return [(f'{name}: {label}', value) for label, value in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--gpus', type=int, default=8, help='FSDP sharding factor: GPUs in the job')
    parser.add_argument('--gpu-memory-gb', type=float, default=80.0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from diffusers import AutoencoderKL

    from composer_algos.data.latents import VAEEncoder
    from composer_algos.diffusion.denoisers import BlockPolicy

    unet = recipe_denoiser('yamls/cifar10/base.yaml')
    dit = recipe_denoiser('yamls/latent256/base.yaml')
    with torch.device('meta'):
        vae_encoder = VAEEncoder(AutoencoderKL(**SD_VAE))

    def units(model: nn.Module, policy: BlockPolicy) -> tuple[int, int]:
        sizes = [count(b) for b in policy.blocks]
        return count(model) - sum(sizes), max(sizes)

    unet_root, unet_block = units(unet, unet.fsdp_wrap_fn)
    dit_root, dit_block = units(dit, dit.fsdp_wrap_fn)
    print(
        f'CIFAR-10 UNet: {count(unet):,} parameters ({count(unet) / 1e6:.1f}M); own unit {unet_root / 1e6:.1f}M, '
        f'largest block {unet_block / 1e6:.1f}M'
    )
    print(
        f'DiT-XL/2 (diffusers layout): {count(dit):,} parameters ({count(dit) / 1e6:.1f}M); own unit '
        f'{dit_root / 1e6:.1f}M (with block 0), each other block {dit_block / 1e6:.1f}M'
    )
    print(f'VAE encoder (frozen): {count(vae_encoder):,} parameters ({count(vae_encoder) / 1e6:.1f}M)')
    print('measuring activations on CPU ...', file=sys.stderr)

    unet_acts = unet_activations()
    dit_acts = dit_activations(num_layers=len(dit.activation_checkpointing_fn.blocks))
    rows = plan(
        'CIFAR-10',
        count(unet),
        0,
        unet_root,
        unet_block,
        unet_acts,
        16,
        args.gpus,
        fsdp_setting('yamls/cifar10/base.yaml', 'reshard_after_forward'),
    )
    rows += plan(
        'latent256',
        count(dit),
        count(vae_encoder),
        dit_root,
        dit_block,
        dit_acts,
        32,
        args.gpus,
        fsdp_setting('yamls/latent256/base.yaml', 'reshard_after_forward'),
        vae_transient(),
    )
    print(f'\nper GPU, {args.gpus} GPUs (FSDP sharding factor {args.gpus}):\n')
    print(f'| {"item":<80} | {"GB":>7} |')
    print(f'| {"-" * 80} | {"-" * 7}:|')
    for label, value in rows:
        print(f'| {label:<80} | {value / GB:>7.2f} |')
    for name, acts, microbatch in (('CIFAR-10', unet_acts, 16), ('latent256', dit_acts, 32)):
        # Conservative: the VAE's transient forward is counted as if it coincided with the activations' peak.
        static = sum(v for label, v in rows if label.startswith(name) and 'activations' not in label)
        for mode in ('none', 'checkpointed'):
            total = static + acts[mode] * microbatch
            print(
                f'{name}, activation checkpointing {"off" if mode == "none" else "on"}: {total / GB:.1f} GB of '
                f'{args.gpu_memory_gb:.0f} GB per GPU ({acts[mode] / 1e6:.1f} MB of activations per sample)'
            )
    return 0


if __name__ == '__main__':
    sys.exit(main())

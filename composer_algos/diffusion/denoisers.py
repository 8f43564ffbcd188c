"""Denoiser backbones: diffusers' UNet2DModel and DiT built from small config dicts."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

__all__ = ['build_unet', 'build_dit', 'BlockPolicy', 'TimeConditionedConvNet', 'count_parameters']


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_unet(
    sample_size: int = 8,
    in_channels: int = 1,
    out_channels: Optional[int] = None,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention_levels: Sequence[int] = (1,),
    num_class_embeds: Optional[int] = None,
    dropout: float = 0.0,
    norm_num_groups: int = 8,
    attention_head_dim: int = 32,
    **kwargs: Any,
) -> nn.Module:
    """A diffusers ``UNet2DModel``; ``attention_levels`` lists the resolutions (by index) that get self-attention.

    The default is the digits recipe's UNet: 8x8 -> 4x4, 32/64 channels, attention at 4x4, about 0.5M parameters.
    Under FSDP each down, mid and up block is its own unit (see :class:`BlockPolicy`).
    """
    from diffusers import UNet2DModel
    levels = set(attention_levels)
    n = len(block_out_channels)
    down = tuple('AttnDownBlock2D' if i in levels else 'DownBlock2D' for i in range(n))
    up = tuple('AttnUpBlock2D' if (n - 1 - i) in levels else 'UpBlock2D' for i in range(n))
    unet = UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        num_class_embeds=num_class_embeds,
        dropout=dropout,
        norm_num_groups=norm_num_groups,
        attention_head_dim=attention_head_dim,
        **kwargs,
    )
    blocks = [b for b in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if b is not None]
    unet.fsdp_wrap_fn = unet.activation_checkpointing_fn = BlockPolicy(blocks)
    return unet


def build_dit(
    sample_size: int = 32,
    in_channels: int = 4,
    patch_size: int = 2,
    num_layers: int = 12,
    num_attention_heads: int = 6,
    attention_head_dim: int = 64,
    num_classes: int = 1000,
    **kwargs: Any,
) -> nn.Module:
    """A diffusers ``DiTTransformer2DModel`` (class-conditional; output channels = input channels).

    Under FSDP each transformer block but the first is its own unit (see :class:`BlockPolicy`).
    """
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        patch_size=patch_size,
        num_layers=num_layers,
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        num_embeds_ada_norm=num_classes,
        **kwargs,
    )
    adapter = _DiTAdapter(model)
    blocks = list(model.transformer_blocks)
    # diffusers' DiT calls transformer_blocks[0].norm1.emb again after the last block, when a sharded block 0 would
    # be resharded already: block 0 stays in the denoiser's own unit (gathered for the whole forward).
    adapter.fsdp_wrap_fn = BlockPolicy(blocks[1:])
    adapter.activation_checkpointing_fn = BlockPolicy(blocks)
    return adapter


class BlockPolicy:
    """True for the given blocks of a denoiser: its ``fsdp_wrap_fn`` and ``activation_checkpointing_fn``.

    Composer's FSDP policies (FSDP2 and FSDP1) wrap each direct child of the ComposerModel (here the denoiser) and
    ask that child's ``fsdp_wrap_fn`` about every submodule: each block becomes its own FSDP unit, gathered just
    before it runs and freed after, instead of one unit gathering the whole denoiser. With
    ``activation_checkpointing: true`` the blocks of ``activation_checkpointing_fn`` are recomputed in the backward
    pass. The policy lives on the denoiser, so a deep copy of it (EMA) answers for the copied blocks.
    """

    def __init__(self, blocks: Sequence[nn.Module]):
        self.blocks = list(blocks)

    def __call__(self, module: nn.Module) -> bool:
        return any(module is block for block in self.blocks)

    def __repr__(self) -> str:
        return f'BlockPolicy({len(self.blocks)} blocks)'


class _DiTAdapter(nn.Module):
    """Calls a diffusers DiT with the ``denoiser(x_t, t, class_labels=...)`` signature the model contract uses."""

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        if class_labels is None:
            raise ValueError('The DiT backbone is class-conditional: set label_key so labels reach it.')
        return self.dit(x, timestep=t, class_labels=class_labels).sample


class TimeConditionedConvNet(nn.Module):
    """A tiny conv net with a sinusoidal time embedding: a plain-module denoiser for tests and examples."""

    def __init__(self, in_channels: int = 1, width: int = 32, num_classes: Optional[int] = None):
        super().__init__()
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label_emb = nn.Embedding(num_classes, width) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.block = nn.Sequential(nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1),
                                   nn.GroupNorm(8, width), nn.SiLU(), nn.Conv2d(width, width, 3, padding=1))
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: Optional[torch.Tensor] = None):
        half = self.width // 2
        freqs = torch.exp(-torch.arange(half, device=x.device) * (9.21 / half))
        angles = t.float()[:, None] * freqs[None]
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))
        if self.label_emb is not None and class_labels is not None:
            emb = emb + self.label_emb(class_labels)
        h = self.conv_in(x) + emb[:, :, None, None]
        return self.conv_out(h + self.block(h))

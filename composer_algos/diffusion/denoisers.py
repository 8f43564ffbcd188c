"""Denoiser backbones: diffusers' UNet2DModel, DiT and the text-conditioned UNet2DConditionModel,
SD3Transformer2DModel and PixArtTransformer2DModel, built from small config dicts or a user's saved weights."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    'build_unet',
    'build_dit',
    'build_unet_condition',
    'build_sd3_transformer',
    'build_pixart_transformer',
    'BlockPolicy',
    'KeywordDenoiser',
    'TimeConditionedConvNet',
    'count_parameters',
]


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_unet(
    sample_size: int = 8,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    attention_levels: Sequence[int] = (1,),
    num_class_embeds: int | None = None,
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

    down, up = _unet_block_types(len(block_out_channels), attention_levels, 'Attn')
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
    return _shard_by_block(unet)


def _unet_block_types(n: int, levels: Sequence[int], attention: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The down and up block types of a UNet of ``n`` resolutions: ``<attention>DownBlock2D`` (and up) at the
    resolutions ``levels`` lists (by index, highest first), plain blocks elsewhere."""
    attended = set(levels)
    down = tuple(f'{attention}DownBlock2D' if i in attended else 'DownBlock2D' for i in range(n))
    up = tuple(f'{attention}UpBlock2D' if (n - 1 - i) in attended else 'UpBlock2D' for i in range(n))
    return down, up


def _shard_by_block(unet: Any) -> nn.Module:
    """``unet`` (a diffusers UNet, whose blocks and policy attributes torch's Module typing does not know) with each
    down, mid and up block its own FSDP (and activation checkpointing) unit."""
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
    adapter = _DiTAdapter(model)  # type: ignore[arg-type]  # diffusers' top-level classes type as placeholders
    blocks = list(model.transformer_blocks)  # type: ignore[attr-defined]  # the same placeholder
    # diffusers' DiT calls transformer_blocks[0].norm1.emb again after the last block, when a sharded block 0 would
    # be resharded already: block 0 stays in the denoiser's own unit (gathered for the whole forward).
    adapter.fsdp_wrap_fn = BlockPolicy(blocks[1:])
    adapter.activation_checkpointing_fn = BlockPolicy(blocks)
    return adapter


def _pretrained_or_config(
    cls: Any, pretrained_path: str | None, subfolder: str | None, config: dict[str, Any], where: str
) -> nn.Module:
    """``cls.from_pretrained`` of a local folder (a user's own weights; nothing else may be set then), or ``cls`` with
    random weights from ``config``."""
    if pretrained_path is None:
        return cls(**config)
    import os

    from composer_algos.registry import ConfigError

    folder = os.path.join(pretrained_path, subfolder) if subfolder else pretrained_path
    if not os.path.isfile(os.path.join(folder, 'config.json')):
        raise ConfigError(
            f'{where}.pretrained_path={pretrained_path}: no config.json in {folder}; save the denoiser '
            f'there with {cls.__name__}.save_pretrained (subfolder: unet or transformer in a pipeline '
            'folder).'
        )
    return cls.from_pretrained(pretrained_path, subfolder=subfolder or '', local_files_only=True)


def build_unet_condition(
    sample_size: int = 8,
    in_channels: int = 1,
    out_channels: int | None = None,
    block_out_channels: Sequence[int] = (32, 64),
    layers_per_block: int = 1,
    cross_attention_levels: Sequence[int] = (1,),
    mid_block: bool = True,
    cross_attention_dim: int = 32,
    attention_head_dim: int = 8,
    norm_num_groups: int = 8,
    pretrained_path: str | None = None,
    subfolder: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A diffusers ``UNet2DConditionModel`` (Stable Diffusion's), called as ``unet(x_t, t, encoder_hidden_states,
    encoder_attention_mask=...)``: the ``unet2d_condition`` preset of a text conditioner.

    ``cross_attention_levels`` lists the resolutions (by index) whose blocks cross-attend to the text;
    ``mid_block`` adds the cross-attending middle block; ``cross_attention_dim`` is the text encoder's hidden size.
    ``pretrained_path`` (and ``subfolder``, ``unet`` in a pipeline folder) loads a saved one instead, with nothing
    else set. Under FSDP each down, mid and up block is its own unit (see :class:`BlockPolicy`).
    """
    from diffusers import UNet2DConditionModel

    down, up = _unet_block_types(len(block_out_channels), cross_attention_levels, 'CrossAttn')
    config = dict(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        block_out_channels=tuple(block_out_channels),
        layers_per_block=layers_per_block,
        down_block_types=down,
        up_block_types=up,
        mid_block_type='UNetMidBlock2DCrossAttn' if mid_block else None,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
        **kwargs,
    )
    if pretrained_path is not None and kwargs:
        from composer_algos.registry import ConfigError

        raise ConfigError(f'model.denoiser.pretrained_path loads a saved UNet; remove {sorted(kwargs)}.')
    return _shard_by_block(
        _pretrained_or_config(UNet2DConditionModel, pretrained_path, subfolder, config, 'model.denoiser')
    )


def build_sd3_transformer(
    sample_size: int = 32,
    in_channels: int = 4,
    patch_size: int = 2,
    num_layers: int = 12,
    attention_head_dim: int = 64,
    num_attention_heads: int = 12,
    joint_attention_dim: int = 768,
    caption_projection_dim: int | None = None,
    pooled_projection_dim: int = 768,
    pos_embed_max_size: int | None = None,
    pretrained_path: str | None = None,
    subfolder: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A diffusers ``SD3Transformer2DModel`` (MMDiT), called with ``encoder_hidden_states`` (``joint_attention_dim``
    wide) and ``pooled_projections`` (``pooled_projection_dim``): the ``sd3`` preset of a text conditioner, for a
    flow-matching model (it takes the time as ``sigma * 1000``, as the flow model gives it).

    ``pretrained_path`` (and ``subfolder``, ``transformer`` in a pipeline folder) loads a saved one instead. Under
    FSDP each transformer block is its own unit.
    """
    from diffusers import SD3Transformer2DModel

    inner = num_attention_heads * attention_head_dim
    config = dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=caption_projection_dim or inner,
        pooled_projection_dim=pooled_projection_dim,
        pos_embed_max_size=pos_embed_max_size or sample_size // patch_size,
        **kwargs,
    )
    model = _pretrained_or_config(SD3Transformer2DModel, pretrained_path, subfolder, config, 'model.denoiser')
    return KeywordDenoiser(model)


def build_pixart_transformer(
    sample_size: int = 32,
    in_channels: int = 4,
    patch_size: int = 2,
    num_layers: int = 12,
    attention_head_dim: int = 64,
    num_attention_heads: int = 12,
    caption_channels: int = 768,
    pretrained_path: str | None = None,
    subfolder: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """A diffusers ``PixArtTransformer2DModel`` (PixArt-alpha), called with ``encoder_hidden_states``
    (``caption_channels`` wide) and ``encoder_attention_mask``: the ``pixart`` preset of a text conditioner. Its
    learned-variance channels are dropped by the model. Built without PixArt's resolution and aspect-ratio inputs
    (``use_additional_conditions: false``); ``pretrained_path`` loads a saved one instead (one that uses them
    receives ``None`` for both). Under FSDP each transformer block is its own unit.
    """
    from diffusers import PixArtTransformer2DModel

    inner = num_attention_heads * attention_head_dim
    config = dict(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=2 * in_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        cross_attention_dim=inner,
        caption_channels=caption_channels,
        use_additional_conditions=False,
        **kwargs,
    )
    model = _pretrained_or_config(PixArtTransformer2DModel, pretrained_path, subfolder, config, 'model.denoiser')
    return KeywordDenoiser(model, added_cond_kwargs={'resolution': None, 'aspect_ratio': None})


class KeywordDenoiser(nn.Module):
    """Calls a diffusers transformer whose second argument is not the time (SD3, PixArt) with the
    ``denoiser(x_t, t, **conditioning)`` signature of the model contract: ``model(hidden_states=x_t, timestep=t,
    **conditioning, **extra)``. Its ``config`` is the wrapped model's (the recipe checks read its sizes)."""

    def __init__(self, model: nn.Module, **extra: Any):
        super().__init__()
        self.model = model
        self.extra = extra
        # Under FSDP each transformer block is its own unit.
        blocks = list(model.transformer_blocks)  # type: ignore[arg-type]  # torch types submodules as Tensor | Module
        self.fsdp_wrap_fn = self.activation_checkpointing_fn = BlockPolicy(blocks)

    @property
    def config(self) -> Any:
        return self.model.config

    def forward(self, x: torch.Tensor, t: torch.Tensor, **conditioning: torch.Tensor):
        return self.model(hidden_states=x, timestep=t, **conditioning, **self.extra).sample


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

    # Set by build_dit.
    fsdp_wrap_fn: BlockPolicy
    activation_checkpointing_fn: BlockPolicy

    def __init__(self, dit: nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None):
        if class_labels is None:
            raise ValueError('The DiT backbone is class-conditional: set label_key so labels reach it.')
        return self.dit(x, timestep=t, class_labels=class_labels).sample


class TimeConditionedConvNet(nn.Module):
    """A tiny conv net with a sinusoidal time embedding: a plain-module denoiser for tests and examples.

    ``context_dim`` lets it take text too (``encoder_hidden_states``, ``context_dim`` wide, and an optional
    ``encoder_attention_mask``): their masked mean over the tokens, projected, joins the time embedding.
    """

    def __init__(
        self,
        in_channels: int = 1,
        width: int = 32,
        num_classes: int | None = None,
        context_dim: int | None = None,
    ):
        super().__init__()
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.label_emb = nn.Embedding(num_classes, width) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, width, 3, padding=1)
        self.block = nn.Sequential(
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.GroupNorm(8, width),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1),
        )
        self.conv_out = nn.Conv2d(width, in_channels, 3, padding=1)
        # Made last, so a net without text draws the same initial weights as before it could take any.
        self.context = nn.Linear(context_dim, width) if context_dim else None

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ):
        half = self.width // 2
        freqs = torch.exp(-torch.arange(half, device=x.device) * (9.21 / half))
        angles = t.float()[:, None] * freqs[None]
        emb = self.time_mlp(torch.cat([angles.sin(), angles.cos()], dim=1))
        if self.label_emb is not None and class_labels is not None:
            emb = emb + self.label_emb(class_labels)
        if encoder_hidden_states is not None:
            if self.context is None:
                raise ValueError(
                    "This conv denoiser takes no text: build it with context_dim (the text encoder's hidden size)."
                )
            mask = (
                torch.ones(encoder_hidden_states.shape[:2], device=x.device)
                if encoder_attention_mask is None
                else encoder_attention_mask.to(encoder_hidden_states.dtype)
            )
            pooled = (encoder_hidden_states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            emb = emb + self.context(pooled.float())
        h = self.conv_in(x) + emb[:, :, None, None]
        return self.conv_out(h + self.block(h))

"""Captions as conditioning: a ``transformers`` text encoder (CLIP or T5) and its tokenizer, frozen or trained.

``transformers`` is imported only when a text conditioner is built (the ``composer-algos[text]`` extra), so the
package imports without it. The encoder's outputs reach the denoiser under the keywords a preset names:

============================  ====================================================================================
preset                        keywords
============================  ====================================================================================
``unet2d_condition``          ``encoder_hidden_states``, ``encoder_attention_mask`` (diffusers' UNet2DConditionModel)
``sd3``                       ``encoder_hidden_states``, ``pooled_projections`` (SD3Transformer2DModel)
``pixart``                    ``encoder_hidden_states``, ``encoder_attention_mask`` (PixArtTransformer2DModel)
============================  ====================================================================================

or any mapping ``keywords: {hidden_states: ..., attention_mask: ..., pooled: ...}``. The unconditional input is the
encoding of the empty caption ``''``, in training (caption dropout) and in guidance alike: with a trained encoder
it is encoded by the weights of the moment each time, never cached. Precomputed embeddings (MDS columns
``caption_embedding``, ``caption_mask``, ``caption_pooled``) skip the encoder on training batches; the encoder is
still loaded, to encode ``''`` and the prompts of generation.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

import torch

from composer_algos.diffusion.conditioning import Conditioner, batch_entry
from composer_algos.registry import ConfigError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = [
    'CAPTION_KEY',
    'EMBEDDING_KEYS',
    'KEYWORD_PRESETS',
    'OUTPUTS',
    'TextConditioner',
    'load_text_encoder',
    'load_tokenizer',
    'write_tiny_clip',
]

log = logging.getLogger(__name__)

# What a text encoder gives: per-token hidden states, the tokenizer's attention mask and a pooled vector (CLIP: the
# EOS token's state; T5, which has none: the masked mean of the hidden states).
OUTPUTS = ('hidden_states', 'attention_mask', 'pooled')
KEYWORD_PRESETS = {
    'unet2d_condition': {'hidden_states': 'encoder_hidden_states', 'attention_mask': 'encoder_attention_mask'},
    'sd3': {'hidden_states': 'encoder_hidden_states', 'pooled': 'pooled_projections'},
    'pixart': {'hidden_states': 'encoder_hidden_states', 'attention_mask': 'encoder_attention_mask'},
}
CAPTION_KEY = 'caption'
# The batch keys (MDS columns) of precomputed embeddings.
EMBEDDING_KEYS = {'hidden_states': 'caption_embedding', 'attention_mask': 'caption_mask', 'pooled': 'caption_pooled'}
_T5_TYPES = ('t5', 'mt5', 'umt5')
_CLIP_TYPES = ('clip', 'clip_text_model')
_SAVE_HELP = (
    'save a text encoder and its tokenizer there with save_pretrained (e.g. `CLIPTextModel.from_pretrained('
    "'openai/clip-vit-large-patch14').save_pretrained(PATH)` and the same for CLIPTokenizer on a machine "
    'with internet), or give a hub id'
)


def _folder(path: str, subfolder: str | None) -> str:
    return os.path.join(path, subfolder) if subfolder else path


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id (``owner/name``)."""
    return os.path.isabs(path) or path.startswith(('.', '~')) or path.count('/') > 1 or os.path.exists(path)


def _check_source(path: str, subfolder: str | None, key: str, wanted: str, local_files_only: bool) -> None:
    folder = _folder(os.path.expanduser(path), subfolder)
    if (_looks_local(path) or local_files_only) and not os.path.isfile(os.path.join(folder, wanted)):
        raise ConfigError(
            f'{key}={path}{" (subfolder " + subfolder + ")" if subfolder else ""}: no {wanted} in '
            f'{folder}; {_SAVE_HELP}.'
        )


def load_tokenizer(
    path: str,
    subfolder: str | None = None,
    local_files_only: bool = False,
    key: str = 'model.conditioner.tokenizer_path',
) -> Any:
    """A tokenizer by ``AutoTokenizer.from_pretrained`` from a local folder or a hub id (a missing folder is a
    :class:`ConfigError` naming ``key``)."""
    from transformers import AutoTokenizer

    _check_source(path, subfolder, key, 'tokenizer_config.json', local_files_only)
    try:
        return AutoTokenizer.from_pretrained(
            os.path.expanduser(path), subfolder=subfolder or '', local_files_only=local_files_only
        )
    except OSError as e:
        raise ConfigError(
            f'{key}={path}: the tokenizer cannot be loaded ({str(e).splitlines()[0]}); {_SAVE_HELP}.'
        ) from e


def load_text_encoder(
    path: str,
    subfolder: str | None = None,
    local_files_only: bool = False,
    key: str = 'model.conditioner.pretrained_path',
) -> PreTrainedModel:
    """A ``CLIPTextModel`` or ``T5EncoderModel`` (by the ``model_type`` of its config) from a local folder or a hub
    id; another model type loads with ``AutoModel``."""
    import transformers

    _check_source(path, subfolder, key, 'config.json', local_files_only)
    path = os.path.expanduser(path)
    try:
        config = transformers.AutoConfig.from_pretrained(
            path, subfolder=subfolder or '', local_files_only=local_files_only
        )
        kind = getattr(config, 'model_type', '')
        cls = (
            transformers.CLIPTextModel
            if kind in _CLIP_TYPES
            else transformers.T5EncoderModel
            if kind in _T5_TYPES
            else transformers.AutoModel
        )
        return cls.from_pretrained(path, subfolder=subfolder or '', local_files_only=local_files_only)
    except OSError as e:
        raise ConfigError(
            f'{key}={path}: the text encoder cannot be loaded ({str(e).splitlines()[0]}); {_SAVE_HELP}.'
        ) from e


def _keywords(preset: str | None, keywords: Mapping[str, str] | None) -> dict[str, str]:
    if keywords is not None:
        unknown = sorted(set(keywords) - set(OUTPUTS))
        if unknown or not keywords:
            raise ConfigError(
                f'model.conditioner.keywords={dict(keywords)}: its keys name encoder outputs, some of '
                f'{", ".join(OUTPUTS)}; each value is the denoiser keyword that receives it.'
            )
        return dict(keywords)
    if preset not in KEYWORD_PRESETS:
        raise ConfigError(
            f'model.conditioner.preset={preset!r}: one of {", ".join(KEYWORD_PRESETS)}, or give '
            'model.conditioner.keywords.'
        )
    return dict(KEYWORD_PRESETS[preset])


class TextConditioner(Conditioner):
    """Captions through a ``transformers`` text encoder, passed to the denoiser under ``preset``'s keywords.

    Args:
        pretrained_path: a local folder or hub id of the text encoder (``save_pretrained`` output).
        tokenizer_path: the tokenizer's folder or hub id (default ``pretrained_path``).
        text_encoder_subfolder: sub-folder of ``pretrained_path`` holding the encoder (``text_encoder`` in a Stable
            Diffusion folder).
        tokenizer_subfolder: sub-folder of ``tokenizer_path`` holding the tokenizer (``tokenizer`` there).
        preset: the denoiser family whose keywords receive the outputs (see the module docstring).
        keywords: ``{output: keyword}`` in place of a preset.
        max_length: tokens per caption, padded and truncated to it (default: the tokenizer's, at most 77).
        mask_padding: give the encoder the attention mask of the padding (Stable Diffusion 1.x and 2.x trained their
            CLIP without one: set ``false`` for them).
        trainable: train the encoder with the denoiser (a model without pretrained text weights); frozen otherwise.
        caption_drop_prob: probability that a training sample gets the empty caption (classifier-free guidance).
        caption_key: the batch key of the captions.
        precomputed: the batches hold the encoder's outputs (:data:`EMBEDDING_KEYS`) instead of captions.
        local_files_only: never download (a hub id must be in the local cache).
    """

    kind = 'text'
    has_unconditional = True

    def __init__(
        self,
        pretrained_path: str,
        tokenizer_path: str | None = None,
        text_encoder_subfolder: str | None = None,
        tokenizer_subfolder: str | None = None,
        preset: str = 'unet2d_condition',
        keywords: dict[str, str] | None = None,
        max_length: int | None = None,
        mask_padding: bool = True,
        trainable: bool = False,
        caption_drop_prob: float = 0.0,
        caption_key: str = CAPTION_KEY,
        precomputed: bool = False,
        local_files_only: bool = False,
    ):
        super().__init__()
        if not 0.0 <= caption_drop_prob < 1.0:
            raise ConfigError(
                f'model.conditioner.caption_drop_prob={caption_drop_prob}: a probability in [0, 1) '
                '(0.1 is usual; 0 trains no unconditional input for guidance).'
            )
        if precomputed and trainable:
            raise ConfigError(
                "model.conditioner.precomputed=true stores a frozen encoder's outputs; it cannot train "
                'the encoder: set model.conditioner.trainable=false, or precomputed=false.'
            )
        self.keywords = _keywords(preset, keywords)
        self.pretrained_path = pretrained_path
        key = 'model.conditioner.' + ('tokenizer_path' if tokenizer_path else 'pretrained_path')
        self.tokenizer = load_tokenizer(tokenizer_path or pretrained_path, tokenizer_subfolder, local_files_only, key)
        self.text_encoder = load_text_encoder(pretrained_path, text_encoder_subfolder, local_files_only)
        model_max = getattr(self.tokenizer, 'model_max_length', 77)
        self.max_length = int(max_length) if max_length is not None else int(min(model_max, 77))
        positions = getattr(getattr(self.text_encoder, 'config', None), 'max_position_embeddings', None)
        if positions is not None and self.max_length > positions:
            raise ConfigError(
                f'model.conditioner.max_length={self.max_length}: the text encoder has '
                f'{positions} positions; set max_length to at most {positions}.'
            )
        if self.tokenizer.pad_token is None:
            raise ConfigError(
                f'model.conditioner.tokenizer_path: the tokenizer of {tokenizer_path or pretrained_path} '
                'has no pad token, so captions cannot be padded to one length; save it with pad_token '
                'set.'
            )
        self.mask_padding = bool(mask_padding)
        self.trainable = bool(trainable)
        self.drop_prob = float(caption_drop_prob)
        self.caption_key = caption_key
        self.precomputed = bool(precomputed)
        self.text_encoder.requires_grad_(self.trainable)
        # A trained encoder is its own FSDP unit, so that its gradients are reduced across ranks; a frozen one stays
        # whole on every rank, like the VAE. (torch types a Module's attributes as tensors or modules.)
        self.text_encoder._fsdp_wrap = self.trainable  # type: ignore[assignment]
        if not self.trainable:
            self.text_encoder.eval()
        self._empty: dict[str, torch.Tensor] | None = None

    def train(self, mode: bool = True) -> TextConditioner:
        super().train(mode)
        if not self.trainable:
            self.text_encoder.eval()  # a frozen encoder never runs its dropout
        return self

    @property
    def hidden_size(self) -> int:
        """The width of the encoder's hidden states (the denoiser's ``cross_attention_dim``)."""
        return int(
            self.text_encoder.config.hidden_size
            if hasattr(self.text_encoder.config, 'hidden_size')
            else self.text_encoder.config.d_model
        )

    @property
    def denoiser_keywords(self) -> tuple[str, ...]:
        return tuple(self.keywords.values())

    @property
    def batch_keys(self) -> tuple[str, ...]:
        if self.precomputed:
            return tuple(EMBEDDING_KEYS[o] for o in ('hidden_states', 'attention_mask'))
        return (self.caption_key,)

    # ------------------------------------------------------------------------------------------- encoding
    def encode(self, captions: Sequence[str], device: torch.device | None = None) -> dict[str, torch.Tensor]:
        """The encoder's outputs (:data:`OUTPUTS`) for ``captions``, padded to ``max_length``."""
        if isinstance(captions, str) or not all(isinstance(c, str) for c in captions):
            raise TypeError(f'captions must be a list of strings, got {type(captions).__name__}.')
        device = device or next(self.text_encoder.parameters()).device
        tokens = self.tokenizer(
            list(captions), padding='max_length', max_length=self.max_length, truncation=True, return_tensors='pt'
        )
        ids, mask = tokens['input_ids'].to(device), tokens['attention_mask'].to(device)
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            out = self.text_encoder(input_ids=ids, attention_mask=mask if self.mask_padding else None)
        hidden = out.last_hidden_state
        pooled = getattr(out, 'pooler_output', None)
        if pooled is None:
            weights = mask.to(hidden.dtype)[..., None]
            pooled = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)
        return {'hidden_states': hidden, 'attention_mask': mask, 'pooled': pooled}

    def _as_keywords(self, outputs: Mapping[str, torch.Tensor | None]) -> dict[str, torch.Tensor]:
        missing = [o for o in self.keywords if outputs.get(o) is None]
        if missing:
            raise ConfigError(
                f'model.conditioner: the denoiser keywords {self.keywords} need the outputs {missing}, '
                'which the batch lacks (precomputed shards without caption_pooled?).'
            )
        # None of them is None (checked above).
        return {keyword: cast(torch.Tensor, outputs[output]) for output, keyword in self.keywords.items()}

    def _empty_outputs(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The encoding of ``''``; a frozen encoder's is computed once."""
        if self.trainable:
            return self.encode([''], device)
        if self._empty is None or self._empty['hidden_states'].device != device:
            with torch.no_grad():
                self._empty = self.encode([''], device)
        return self._empty

    # ------------------------------------------------------------------------------------------- conditioner
    def forward(self, batch: Any, drop: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.precomputed:
            return self._as_keywords(self._precomputed(batch, drop))
        captions = batch_entry(batch, self.caption_key)
        if isinstance(captions, str) or not isinstance(captions, (list, tuple)):
            raise ValueError(
                f'The batch key {self.caption_key!r} holds {type(captions).__name__}, not a list of '
                'captions; write the shards with a caption column (recipes/convert_dataset.py).'
            )
        if drop is not None:
            captions = ['' if dropped else caption for caption, dropped in zip(captions, drop.tolist(), strict=False)]
        device = next(self.text_encoder.parameters()).device
        return self._as_keywords(self.encode(captions, device))

    def _precomputed(self, batch: Any, drop: torch.Tensor | None) -> dict[str, torch.Tensor | None]:
        outputs: dict[str, torch.Tensor | None] = {}
        for output, key in EMBEDDING_KEYS.items():
            value = batch.get(key) if isinstance(batch, Mapping) else None
            if value is None and output in self.keywords:
                raise ConfigError(
                    f'model.conditioner.precomputed=true: the batch has no {key!r} (keys: '
                    f'{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}); write '
                    'the shards with --encode-captions and set caption_embeddings: true in the loader.'
                )
            outputs[output] = value
        hidden = outputs['hidden_states']
        if hidden is None:  # needed whatever the keywords: it gives the device and the rows of the dropped samples
            raise ConfigError(
                f'model.conditioner.precomputed=true: the batch has no {EMBEDDING_KEYS["hidden_states"]!r}; write '
                'the shards with --encode-captions and set caption_embeddings: true in the loader.'
            )
        outputs['hidden_states'] = hidden.float()
        if outputs['pooled'] is not None:
            outputs['pooled'] = outputs['pooled'].float()
        if drop is not None and bool(drop.any()):
            empty = self._empty_outputs(hidden.device)
            rows = drop.to(hidden.device)
            for output, value in outputs.items():
                if value is not None:
                    outputs[output] = torch.where(
                        rows.view(-1, *([1] * (value.dim() - 1))), empty[output].to(value.dtype), value
                    )
        return outputs

    def for_generation(
        self,
        num_samples: int,
        device: torch.device,
        labels: torch.Tensor | None = None,
        prompts: Sequence[str] | None = None,
    ) -> dict[str, torch.Tensor]:
        if prompts is None:
            raise ValueError(
                'This model is text-conditioned: give prompts (one per sample, or a list to cycle '
                'through) to generate from it.'
            )
        if len(prompts) != num_samples:
            raise ValueError(f'{len(prompts)} prompts for {num_samples} samples; give one per sample.')
        return self._as_keywords(self.encode(list(prompts), device))

    def unconditional(self, num_samples: int, device: torch.device) -> dict[str, torch.Tensor]:
        empty = self._as_keywords(self._empty_outputs(device))
        return {k: v.expand(num_samples, *v.shape[1:]) for k, v in empty.items()}

    def example_batch(self, batch_size: int) -> dict[str, Any]:
        if not self.precomputed:
            return {self.caption_key: [''] * batch_size}
        with torch.no_grad():
            empty = self._empty_outputs(next(self.text_encoder.parameters()).device)
        return {EMBEDDING_KEYS[o]: v.expand(batch_size, *v.shape[1:]).cpu() for o, v in empty.items()}

    def extra_repr(self) -> str:
        return (
            f'pretrained_path={self.pretrained_path!r}, keywords={self.keywords}, max_length={self.max_length}, '
            f'trainable={self.trainable}, caption_drop_prob={self.drop_prob}, precomputed={self.precomputed}'
        )


def write_tiny_clip(
    folder: str,
    texts: Sequence[str],
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_positions: int = 77,
    seed: int = 0,
) -> str:
    """Write a small ``CLIPTextModel`` with random weights and a word-level tokenizer of ``texts``' words to
    ``folder`` (both by ``save_pretrained``), for a model with no pretrained text encoder; returns ``folder``.

    The tokenizer splits on white space and punctuation, knows every word of ``texts`` (others are ``<unk>``), adds
    ``<bos>`` and ``<eos>`` around each caption and pads with ``<pad>``. The encoder's ``eos_token_id`` is the
    tokenizer's ``<eos>``, so CLIP pools at the end of each caption (with another id it would pool at position 0 or
    at the largest id); its vocabulary and positions cover the tokenizer's. Deterministic in ``seed``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    specials = ['<pad>', '<unk>', '<bos>', '<eos>']
    words = Tokenizer(models.WordLevel(unk_token='<unk>'))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=specials))
    bos, eos = words.token_to_id('<bos>'), words.token_to_id('<eos>')
    words.post_processor = processors.TemplateProcessing(
        single='<bos> $A <eos>', special_tokens=[('<bos>', bos), ('<eos>', eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token='<pad>',
        unk_token='<unk>',
        bos_token='<bos>',
        eos_token='<eos>',
        model_max_length=max_positions,
    )
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = CLIPTextModel(config)
    os.makedirs(folder, exist_ok=True)
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder

"""One-shot evaluation of a model: FID, its real-vs-real floor, bits/dim, a sample grid and, for text-conditioned
models, prompt accuracy and CLIPScore (used by ``recipes/evaluate.py``)."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import torch

from composer_algos.data.convert import digit_prompts
from composer_algos.evaluation.checkpoint_weights import load_checkpoint_weights
from composer_algos.evaluation.conditioning import build_classifier, class_accuracy, clip_score, collect_captions
from composer_algos.evaluation.consistency import consistency_diagnostic
from composer_algos.evaluation.features import build_feature_extractor
from composer_algos.evaluation.fid import collect_images, fid_from_samples, real_vs_real_fid
from composer_algos.evaluation.generation import eval_mode, generate_samples
from composer_algos.evaluation.likelihood import bits_per_dim
from composer_algos.evaluation.plots import captioned_grid, image_grid, save_png, side_by_side_grid
from composer_algos.registry import ConfigError

__all__ = ['EVALUATION_DEFAULTS', 'evaluate_checkpoint', 'evaluate_model', 'split_overrides', 'write_json']

log = logging.getLogger(__name__)

# Options of an evaluation (``recipes/evaluate.py`` takes them as key=value).
EVALUATION_DEFAULTS: dict[str, Any] = {
    'num_samples': 1000,  # generated samples for FID
    'num_steps': 50,  # DDIM steps (flow matching: ODE steps)
    'eta': 0.0,  # 0 = deterministic DDIM (flow matching: must be 0)
    'seed': 0,  # sample i starts from the noise of (seed, i)
    'batch_size': 256,
    'num_classes': None,  # labels i % num_classes for class-conditional models
    'feature': 'auto',  # auto | digits | mnist | inception
    'inception_weights': None,  # local Inception weights file (air-gapped machines)
    'classifier_cache_dir': None,  # digit classifier cache (default ~/.cache/composer_algos)
    'max_real_samples': None,  # cap on real images read from the eval loader
    'bpd_images': 256,  # validation images for bits/dim (DDPM models only)
    'bpd_terms': 100,  # timesteps of the stratified VLB estimate; null = all T
    'grid_samples': 64,
    'grid_scale': 4,  # pixel repeat in the PNG grid
    'weights': 'ema',  # ema | live
    'consistency_samples': 256,  # same-noise pairs for --compare
    'device': None,  # default: cuda if available, else cpu
    # Text-conditioned models:
    'prompts': None,  # prompts of the FID samples, cycled; default: the real images' captions
    'guidance_scale': 1.0,  # classifier-free guidance of the FID samples and the grid (1: none)
    'prompt_accuracy_guidance': [1.0, 3.0],  # guidance scales of prompt accuracy (the digits' prompts)
    'prompt_accuracy_samples': 500,
    'prompt_classifier': 'auto',  # auto (digits for 1x8x8 images, else none) | digits | mnist | null
    'clip_score_model': None,  # local folder of a full CLIP model and processor: CLIPScore of the FID samples
}


@torch.no_grad()
def evaluate_model(
    model: Any,
    real_images: torch.Tensor,
    out_dir: str,
    real_conditioning: dict[str, torch.Tensor] | None = None,
    progress: bool = True,
    real_captions: list[str] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """FID (with its real-vs-real floor), bits/dim and a sample grid of ``model`` against ``real_images``; for a
    text-conditioned model, its samples follow ``prompts`` (default the ``real_captions``) with ``guidance_scale``,
    and prompt accuracy and CLIPScore are measured too (:func:`text_results`).

    Writes ``out_dir/samples.png`` and returns the numbers (see :data:`EVALUATION_DEFAULTS` for ``options``).
    """
    unknown = sorted(set(options) - set(EVALUATION_DEFAULTS))
    if unknown:
        raise ValueError(f'Unknown evaluation options {unknown}; known: {sorted(EVALUATION_DEFAULTS)}.')
    opt = {**EVALUATION_DEFAULTS, **options}
    model.to(_device(opt['device']))
    shape = tuple(real_images.shape[1:])
    feature = build_feature_extractor(opt['feature'], shape, opt['inception_weights'], opt['classifier_cache_dir'])
    results: dict[str, Any] = {'num_real': int(real_images.shape[0]), 'num_samples': int(opt['num_samples'])}
    if hasattr(feature, 'accuracy'):
        results['feature_classifier_val_accuracy'] = feature.accuracy
    if getattr(feature, 'sha256', None):
        results['feature_sha256'] = feature.sha256
    text = getattr(getattr(model, 'conditioner', None), 'kind', None) == 'text'
    prompts = (opt['prompts'] or real_captions) if text else None
    if text and not prompts:
        raise ConfigError(
            'The model is text-conditioned: give prompts=[...] (or an eval_loader whose shards have '
            'captions) for its samples.'
        )
    guidance: dict[str, Any] = (
        {'guidance_scale': float(opt['guidance_scale'])} if float(opt['guidance_scale']) != 1.0 else {}
    )
    results.update(guidance)
    with eval_mode(model):
        samples = generate_samples(
            model,
            range(opt['num_samples']),
            shape,
            num_steps=opt['num_steps'],
            eta=opt['eta'],
            seed=opt['seed'],
            num_classes=opt['num_classes'],
            batch_size=opt['batch_size'],
            progress=progress,
            prompts=prompts,
            **guidance,
        )
        results['FID'] = fid_from_samples(real_images, samples, feature, opt['batch_size'])
        results['FID_real_vs_real'] = real_vs_real_fid(
            real_images, feature, opt['seed'], opt['batch_size'], num_samples=opt['num_samples']
        )
        # Bits/dim sums the DDPM variational bound; flow-matching models have none.
        n_bpd = min(int(opt['bpd_images']), real_images.shape[0])
        if n_bpd > 0 and getattr(model, 'objective', 'ddpm') == 'ddpm':
            cond = {k: v[:n_bpd] for k, v in (real_conditioning or {}).items()}
            bpd = bits_per_dim(
                model,
                real_images[:n_bpd],
                cond,
                num_terms=opt['bpd_terms'],
                seed=opt['seed'],
                batch_size=opt['batch_size'],
                progress=progress,
            )
            results['bits_per_dim'] = float(bpd.mean())
            results['bits_per_dim_images'] = n_bpd
        if text:
            assert prompts is not None  # checked above
            results.update(text_results(model, samples, prompts, shape, opt, progress))
    if text:
        assert prompts is not None  # checked above
        # One row per prompt: the first prompts, each with (up to as many as there are rows of) the samples it had.
        count = len(prompts)
        rows = max(1, min(count, samples.shape[0], math.isqrt(opt['grid_samples'])))
        per_row = max(1, min(rows, len(range(rows - 1, samples.shape[0], count))))
        picked = samples[[p + k * count for p in range(rows) for k in range(per_row)]]
        grid = captioned_grid(picked, prompts[:rows], scale=opt['grid_scale'])
    else:
        grid = image_grid(samples[: opt['grid_samples']], scale=opt['grid_scale'])
    results['grid'] = save_png(grid, os.path.join(out_dir, 'samples.png'))
    return results


def text_results(
    model: Any, samples: torch.Tensor, prompts: list[str], shape: tuple[int, ...], opt: dict[str, Any], progress: bool
) -> dict[str, Any]:
    """A text-conditioned model's prompt accuracy (the digits' prompts, at each of ``prompt_accuracy_guidance``,
    scored by ``prompt_classifier``) and the CLIPScore of ``samples`` against their ``prompts`` (with a
    ``clip_score_model``)."""
    results: dict[str, Any] = {}
    classifier = opt['prompt_classifier']
    if classifier == 'auto':
        classifier = 'digits' if tuple(shape) == (1, 8, 8) else None
    if classifier is not None:
        module = build_classifier(classifier, shape, opt['classifier_cache_dir']).to(samples.device)
        digit_texts, digits = digit_prompts()
        count = int(opt['prompt_accuracy_samples'])
        targets = torch.tensor([digits[i % len(digits)] for i in range(count)])
        accuracy = {}
        for scale in opt['prompt_accuracy_guidance']:
            extra: dict[str, Any] = {'guidance_scale': float(scale)} if float(scale) != 1.0 else {}
            generated = generate_samples(
                model,
                range(count),
                shape,
                num_steps=opt['num_steps'],
                eta=opt['eta'],
                seed=opt['seed'],
                batch_size=opt['batch_size'],
                progress=progress,
                prompts=digit_texts,
                **extra,
            )
            accuracy[f'guidance_{float(scale):g}'] = class_accuracy(module, generated, targets, opt['batch_size'])
        results['prompt_accuracy'] = accuracy
        results['prompt_accuracy_samples'] = count
        classifier_accuracy = getattr(module, 'accuracy', None)
        if classifier_accuracy is not None:
            results['prompt_classifier_val_accuracy'] = float(classifier_accuracy)
    if opt['clip_score_model'] is not None:
        texts = [prompts[i % len(prompts)] for i in range(samples.shape[0])]
        results['CLIPScore'] = clip_score(samples, texts, opt['clip_score_model'], opt['batch_size'])
    return results


def write_json(results: dict[str, Any], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'w') as f:
        json.dump(results, f, indent=2, sort_keys=True)
    return path


def _device(name: str | None) -> torch.device:
    return torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))


def split_overrides(pairs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """``key=value`` pairs -> (evaluation options, recipe overrides). Values are parsed as YAML."""
    import yaml

    options, overrides = {}, []
    for pair in pairs:
        key, sep, value = pair.partition('=')
        if not sep:
            raise ConfigError(f'Expected key=value, got {pair!r}.')
        if key in EVALUATION_DEFAULTS:
            options[key] = yaml.safe_load(value)
        else:
            overrides.append(pair)
    return options, overrides


def evaluate_checkpoint(
    checkpoint: str,
    make_model: Callable[[], torch.nn.Module],
    real_loader: Iterable[Any],
    out_dir: str,
    compare: str | None = None,
    progress: bool = True,
    model_config: dict[str, Any] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Evaluate ``checkpoint`` loaded into ``make_model()`` against the real images of ``real_loader`` (see
    :func:`evaluate_model`); with ``compare``, also run the consistency diagnostic against that second checkpoint.
    ``model_config``: the settings ``make_model`` builds from, named in the error when a checkpoint does not fit
    (see :func:`load_checkpoint_weights`).

    Writes ``out_dir/samples.png``, ``out_dir/consistency.png`` (with ``compare``) and ``out_dir/evaluation.json``.
    """
    opt = {**EVALUATION_DEFAULTS, **options}
    device = _device(opt['device'])
    model = make_model().to(device)
    info = load_checkpoint_weights(model, checkpoint, opt['weights'], model_config)
    real, conditioning = collect_images(real_loader, model, opt['max_real_samples'], with_conditioning=True)
    captions = None
    conditioner: Any = getattr(model, 'conditioner', None)
    if getattr(conditioner, 'kind', None) == 'text' and not opt['prompts']:
        captions = collect_captions(real_loader, min(opt['num_samples'], real.shape[0]), conditioner.caption_key)
    results = {'checkpoint': checkpoint, 'step': info['step'], 'weights': info['weights']}
    results.update(evaluate_model(model, real, out_dir, conditioning, progress, captions, **options))
    if compare is not None:
        other = make_model().to(device)
        other_info = load_checkpoint_weights(other, compare, opt['weights'], model_config)
        feature = build_feature_extractor(
            opt['feature'], tuple(real.shape[1:]), opt['inception_weights'], opt['classifier_cache_dir']
        )
        diag = consistency_diagnostic(
            model,
            other,
            opt['consistency_samples'],
            tuple(real.shape[1:]),
            feature,
            num_steps=opt['num_steps'],
            seed=opt['seed'],
            num_classes=opt['num_classes'],
            batch_size=opt['batch_size'],
            progress=progress,
        )
        grid = side_by_side_grid(
            diag['samples_a'][: opt['grid_samples']], diag['samples_b'][: opt['grid_samples']], scale=opt['grid_scale']
        )
        results['consistency'] = {
            'compare': compare,
            'compare_step': other_info['step'],
            'num_samples': diag['num_samples'],
            'pixels': diag['pixels'],
            'features': diag['features'],
            'grid': save_png(grid, os.path.join(out_dir, 'consistency.png')),
        }
    write_json(results, os.path.join(out_dir, 'evaluation.json'))
    return results

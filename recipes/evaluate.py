"""Evaluate a checkpoint: FID (with the real-vs-real floor), bits/dim and a sample grid.

    python recipes/evaluate.py CHECKPOINT --config RECIPE.yaml [key=value ...] [--compare CHECKPOINT_B] [--out DIR]

The recipe is the one the checkpoint was trained with: its ``model`` section rebuilds the network and its
``eval_loader`` names the real images. ``key=value`` pairs whose key is an evaluation option set it (for example
``num_samples=5000 feature=inception inception_weights=/models/inception.pth bpd_terms=null``); other pairs
override the recipe (``eval_loader.local=/data/digits``). The EMA weights are evaluated when the checkpoint has
them (``weights=live`` for the training weights). ``--compare`` adds the consistency diagnostic: both checkpoints
generate from the same noise with their deterministic sampler (DDIM, or the ODE of a flow-matching model), side by
side in ``consistency.png``. Bits/dim is reported for DDPM models only (flow matching has no variational bound here).

A text-conditioned model samples from the evaluation captions (or ``prompts=[...]``), guided by ``guidance_scale``
(classifier-free, Ho & Salimans 2022); its grid shows each row's prompt, and it also gets prompt accuracy (the
digits' prompts at each of ``prompt_accuracy_guidance``) and, with ``clip_score_model=FOLDER`` (a CLIP model and
processor saved with ``save_pretrained``), torchmetrics' CLIPScore.

Options and defaults: see ``composer_algos.evaluation.EVALUATION_DEFAULTS``. An error is one line on stderr,
``error: ...`` (exit code 2 for a recipe that cannot be used, a checkpoint of another model included; 1 for an
evaluation that failed; see :mod:`composer_algos.cli`); ``--debug`` (or ``COMPOSER_ALGOS_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from composer_algos import cli
from composer_algos.config import ConfigError, build_dataloader, build_model, load_config
from composer_algos.evaluation.report import EVALUATION_DEFAULTS, evaluate_checkpoint, split_overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('checkpoint', help='a Composer checkpoint file, e.g. runs/<run>/checkpoints/latest-rank0.pt')
    parser.add_argument('--config', help='the YAML recipe the checkpoint was trained with')
    parser.add_argument('--compare', help='a second checkpoint for the consistency diagnostic')
    parser.add_argument('--out', help='output folder (default: <checkpoint>_eval next to the checkpoint)')
    parser.add_argument(
        'pairs',
        nargs='*',
        metavar='key=value',
        help=f'evaluation options ({", ".join(sorted(EVALUATION_DEFAULTS))}) or recipe overrides',
    )
    cli.add_debug_flag(parser)
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    return cli.run_guarded(lambda stage: _evaluate(args, stage), cli.debug_requested(args))


def _evaluate(args: argparse.Namespace, stage: cli.Stage) -> int:
    if args.config is None:
        raise ConfigError(
            '--config is required: a checkpoint holds weights, not the architecture; pass the recipe it '
            'was trained with.'
        )
    options, overrides = split_overrides(args.pairs)
    cfg = load_config(args.config, overrides)
    stage.recipe = cfg
    if 'eval_loader' not in cfg:
        raise ConfigError(
            'The recipe has no eval_loader section: it names the real images (validation split) that '
            'FID and bits/dim are measured on.'
        )
    loader = build_dataloader(cfg['eval_loader'], 'eval_loader')
    out = args.out or os.path.splitext(args.checkpoint)[0] + '_eval'
    stage.started(out)
    results = evaluate_checkpoint(
        args.checkpoint,
        lambda: build_model(cfg['model']),
        loader,
        out,
        compare=args.compare,
        model_config=cfg['model'],
        **options,
    )
    print(json.dumps(results, indent=2, sort_keys=True))
    return 0


if __name__ == '__main__':
    sys.exit(main())

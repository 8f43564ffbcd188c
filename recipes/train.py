"""Train a diffusion model from a YAML recipe: ``python recipes/train.py RECIPE.yaml [key=value ...]``.

Launch on several processes or nodes with Composer's launcher: ``composer -n 8 recipes/train.py RECIPE.yaml``.

A mistake in the recipe, its data or the checkpoint it loads stops the run before training with one line on
stderr, ``error: ...``, naming the key or file and the fix (exit code 2); a NaN or infinite loss, corrupt data or
any other error met during training ends it the same way (exit code 1), with the traceback of an unexpected error
in ``runs/<run_name>/error.log`` (:mod:`composer_algos.cli`). ``--debug`` (or ``COMPOSER_ALGOS_DEBUG=1``) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from composer.utils import dist

from composer_algos import cli
from composer_algos.callbacks.summary import run_summary
from composer_algos.config import build_trainer, load_config

__all__ = ['main']


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('recipe', help='YAML recipe, e.g. yamls/digits/uniform.yaml')
    parser.add_argument('overrides', nargs='*', help='key=value overrides, e.g. max_duration=500ba optimizer.lr=1e-3')
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    # Composer warns at every evaluation whose last batch is smaller than the microbatch size; nothing is wrong then.
    warnings.filterwarnings('ignore', message='Cannot split (tensor|list) of length')
    return cli.run_guarded(lambda stage: _train(args, stage), cli.debug_requested(args))


def _train(args: argparse.Namespace, stage: cli.Stage) -> int:
    cfg = load_config(args.recipe, args.overrides)
    stage.recipe = cfg
    trainer = build_trainer(cfg)
    stage.training(trainer.state)
    state = trainer.state
    if state.max_duration is not None and state.timestamp.get(state.max_duration.unit) >= state.max_duration:
        # A relaunched job (autoresume) that had already finished: nothing to do, and not an error.
        print(
            f'The run is already at {state.timestamp.get(state.max_duration.unit)} of max_duration='
            f'{state.max_duration}; nothing to train.',
            file=sys.stderr,
        )
        trainer.close()
        return 0
    trainer.fit()
    trainer.close()
    if dist.get_global_rank() == 0:
        # After the progress bar: what the run reached and where its files are.
        print('\n' + '\n'.join(run_summary(trainer)), flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())

"""Train a diffusion model from a YAML recipe: ``python recipes/train.py RECIPE.yaml [key=value ...]``.

Launch on several processes or nodes with Composer's launcher: ``composer -n 8 recipes/train.py RECIPE.yaml``.
"""

from __future__ import annotations

import argparse
import logging
import sys

from composer_algos.config import ConfigError, build_trainer, load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('recipe', help='YAML recipe, e.g. yamls/digits/uniform.yaml')
    parser.add_argument('overrides', nargs='*', help='key=value overrides, e.g. max_duration=500ba optimizer.lr=1e-3')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format='%(levelname)s %(name)s: %(message)s')
    try:
        cfg = load_config(args.recipe, args.overrides)
        trainer = build_trainer(cfg)
    except ConfigError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    trainer.fit()
    trainer.close()
    return 0


if __name__ == '__main__':
    sys.exit(main())

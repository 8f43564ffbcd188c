"""Train a recipe and record, per rank, the loss of every batch and every algorithm's final state.

    composer -n 2 tests/distributed_run.py RECIPE.yaml OUT_DIR [key=value ...]

Writes ``OUT_DIR/rank{r}.pt`` with ``{'losses': [...], 'algorithms': {class name: state_dict}, 'world_size': n}``.
"""

from __future__ import annotations

import os
import sys

import torch
from composer.core import Callback
from composer.utils import dist

from composer_algos.config import build_trainer, load_config


class Recorder(Callback):

    def __init__(self):
        self.losses: list[float] = []

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss.detach()))


def main() -> None:
    recipe, out_dir, *overrides = sys.argv[1:]
    torch.set_num_threads(1)
    trainer = build_trainer(load_config(recipe, overrides))
    recorder = Recorder()
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    states = {type(a).__name__: a.state_dict() for a in trainer.state.algorithms}
    os.makedirs(out_dir, exist_ok=True)
    torch.save({'losses': recorder.losses, 'algorithms': states, 'world_size': dist.get_world_size(),
                'rank': dist.get_global_rank()}, os.path.join(out_dir, f'rank{dist.get_global_rank()}.pt'))
    trainer.close()


if __name__ == '__main__':
    main()

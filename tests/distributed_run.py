"""Train a recipe and record, per rank, the loss of every batch and every algorithm's final state.

    composer -n 2 tests/distributed_run.py RECIPE.yaml OUT_DIR [key=value ...]
    composer -n 2 tests/distributed_run.py --each RECIPES.txt OUT_DIR

Writes ``OUT_DIR/rank{r}.pt`` with ``{'losses': [...], 'algorithms': {class name: state_dict}, 'world_size': n}``,
``'callbacks'`` (the timestep heatmap's record) and ``'sharding'``: how the trained model is laid out on this rank
(see :func:`sharding_report`). With ``--each``, every recipe listed in RECIPES.txt (one path a line) is trained in
turn in the same process group, into ``OUT_DIR/<recipe file name>/rank{r}.pt``. With ``STRICT_DEVICES=1`` in the
environment, every run enforces the GPU placement rules of :mod:`strict_devices`.
"""

from __future__ import annotations

import contextlib
import os
import sys

import torch
from composer.core import Callback
from composer.utils import dist

from composer_algos.config import build_trainer, load_config
from strict_devices import strict_devices


class Recorder(Callback):
    def __init__(self):
        self.losses: list[float] = []
        self.batch_sums: list[float] = []  # which images each step trained on, in a number

    def after_train_batch(self, state, logger):
        self.losses.append(float(state.loss.detach()))
        images = state.batch['image'] if isinstance(state.batch, dict) else state.batch[0]
        self.batch_sums.append(float(images.double().sum()))


def sharding_report(model: torch.nn.Module) -> dict:
    """``params``: name -> (local numel, full numel, is a DTensor); ``fsdp_units``: modules FSDP2 sharded as one
    unit; ``checkpointed``: modules wrapped for activation checkpointing. Names omit the checkpoint wrapper's prefix."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    def clean(name: str) -> str:
        return name.replace('._checkpoint_wrapped_module', '').replace('_checkpoint_wrapped_module.', '')

    return {
        'params': {
            clean(n): (p.to_local().numel() if isinstance(p, DTensor) else p.numel(), p.numel(), isinstance(p, DTensor))
            for n, p in model.named_parameters()
        },
        'fsdp_units': [clean(n) for n, m in model.named_modules() if isinstance(m, FSDPModule)],
        'checkpointed': [clean(n) for n, m in model.named_modules() if isinstance(m, CheckpointWrapper)],
    }


def run(recipe: str, out_dir: str, overrides: list[str]) -> None:
    with strict_devices() if os.environ.get('STRICT_DEVICES') == '1' else contextlib.nullcontext():
        _run(recipe, out_dir, overrides)


def _run(recipe: str, out_dir: str, overrides: list[str]) -> None:
    trainer = build_trainer(load_config(recipe, overrides))
    recorder = Recorder()
    trainer.state.callbacks.append(recorder)
    trainer.fit()
    states = {type(a).__name__: a.state_dict() for a in trainer.state.algorithms}
    callbacks = {
        type(c).__name__: c.state_dict() for c in trainer.state.callbacks if type(c).__name__ == 'TimestepHeatmap'
    }
    os.makedirs(out_dir, exist_ok=True)
    torch.save(
        {
            'losses': recorder.losses,
            'batch_sums': recorder.batch_sums,
            'algorithms': states,
            'world_size': dist.get_world_size(),
            'rank': dist.get_global_rank(),
            'sharding': sharding_report(trainer.state.model),
            'callbacks': callbacks,
        },
        os.path.join(out_dir, f'rank{dist.get_global_rank()}.pt'),
    )
    trainer.close()


def main() -> None:
    torch.set_num_threads(1)
    if sys.argv[1] == '--each':
        listing, out_dir = sys.argv[2:4]
        with open(listing) as f:
            recipes = [line.strip() for line in f if line.strip()]
        for recipe in recipes:
            run(recipe, os.path.join(out_dir, os.path.basename(recipe)), [])
        return
    recipe, out_dir, *overrides = sys.argv[1:]
    run(recipe, out_dir, overrides)


if __name__ == '__main__':
    main()

"""Under FSDP2 with bf16 parameters, the adaptive sampler's probes see fp32 weights.

    composer -n 2 tests/probe_precision_run.py DIGITS_MDS OUT_DIR

Trains the adaptive sampler for 3 steps on 2 ranks with FSDP2 casting parameters to bf16 for compute, then, on
every rank, evaluates the same VLB terms three ways: through the sampler's fp32 replica, through the live sharded
model (bf16 weights), and through a fresh unsharded copy loaded from the full fp32 state dict (the reference).
Writes ``OUT_DIR/rank{r}.pt`` with the three results and the sampler's update count.
"""

from __future__ import annotations

import os
import sys

import torch
from composer.utils import dist

from composer_algos.config import build_trainer


def main() -> None:
    torch.set_num_threads(1)
    data, out_dir = sys.argv[1:3]
    denoiser = {
        'name': 'unet',
        'sample_size': 8,
        'in_channels': 1,
        'block_out_channels': [16, 32],
        'layers_per_block': 1,
        'attention_levels': [],
        'norm_num_groups': 8,
    }
    cfg = {
        'max_duration': '3ba',
        'device': 'cpu',
        'precision': 'fp32',
        'seed': 3,
        'progress_bar': False,
        'model': {'denoiser': denoiser, 'noise_schedule': {'num_timesteps': 100}},
        'train_loader': {'local': data, 'split': 'train', 'global_batch_size': 16, 'channels': 1, 'image_size': 8},
        'optimizer': {'name': 'adam', 'lr': 1e-3},
        'algorithms': {'adaptive_timestep_sampling': {'update_every': 1, 'num_probe_timesteps': 6}},
        'parallelism_config': {'fsdp': {'mixed_precision': {'param_dtype': 'bf16', 'reduce_dtype': 'fp32'}}},
    }
    trainer = build_trainer(cfg)
    trainer.fit()
    adaptive = trainer.state.algorithms[0]
    model = trainer.state.model

    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from composer_algos.config import build_model

    full_state = get_model_state_dict(model.denoiser, options=StateDictOptions(full_state_dict=True))
    reference = build_model({'denoiser': denoiser, 'noise_schedule': {'num_timesteps': 100}})
    reference.denoiser.load_state_dict({k.replace('_checkpoint_wrapped_module.', ''): v for k, v in full_state.items()})
    reference.eval()

    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand((8, 1, 8, 8), generator=gen) * 2 - 1
    t = torch.tensor([0, 1, 5, 20, 40, 60, 80, 99])
    noise = torch.randn(x0.shape, generator=gen)
    model.eval()
    with torch.no_grad():
        replica = model.vlb_terms(x0, t, noise, denoiser=adaptive.prober.replica.refresh(model.denoiser))
        live = model.vlb_terms(x0, t, noise)
        ref = reference.vlb_terms(x0, t, noise)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(
        {
            'replica': replica,
            'live': live,
            'reference': ref,
            'num_updates': adaptive.num_updates,
            'has_replica': adaptive.prober.replica is not None,
        },
        os.path.join(out_dir, f'rank{dist.get_global_rank()}.pt'),
    )
    trainer.close()


if __name__ == '__main__':
    main()

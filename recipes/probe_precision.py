"""Does the adaptive sampler's reward survive low-precision weights? fp32 against bf16 and TF32-rounded weights.

    python recipes/probe_precision.py [--steps 2000] [--lrs 1e-4,2e-5]

Trains the digits UNet (``yamls/digits/uniform.yaml``'s denoiser) for ``--steps`` steps at lr 2e-3, then for each
probe learning rate takes one Adam step on a batch of 128 and computes each sample's reward, the VLB change at
timesteps (10, 100, 400) with common noise, three ways: fp32 weights, weights cast to bf16 (what FSDP's bf16 mixed
precision does in every forward) and weights rounded to TF32's 10-bit mantissa (what TF32 matmuls see). Prints the
rank correlation of the bf16 and TF32 rewards with the fp32 ones.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def tf32_round(weights: torch.Tensor) -> torch.Tensor:
    """fp32 values rounded to nearest at TF32's 10 mantissa bits."""
    bits = weights.detach().float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    ranks = torch.stack([a.argsort().argsort(), b.argsort().argsort()]).double()
    return float(torch.corrcoef(ranks)[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--steps', type=int, default=2000)
    parser.add_argument('--lrs', default='1e-4,2e-5')
    args = parser.parse_args()
    torch.set_num_threads(1)

    from composer_algos.config import build_model, load_config
    from composer_algos.diffusion import DiffusionModel
    from composer_algos.evaluation.features import digits_arrays

    torch.manual_seed(0)
    images, _ = digits_arrays('train')
    images = images[:, None] if images.dim() == 3 else images
    model = build_model(load_config(os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml'))['model'])
    assert isinstance(model, DiffusionModel)  # the digits recipe's model
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(args.steps):
        batch = {'image': images[torch.randint(0, images.shape[0], (128,), generator=gen)]}
        loss = model.loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x0 = images[torch.randint(0, images.shape[0], (128,), generator=gen)]
    tau = torch.tensor([10, 100, 400])
    xs, ts = x0.repeat(len(tau), 1, 1, 1), tau.repeat_interleave(x0.shape[0])
    noise = torch.randn(xs.shape, generator=gen)

    def vlb(weights_of: str) -> torch.Tensor:
        probe = copy.deepcopy(model).eval()
        if weights_of == 'bf16':
            probe.denoiser.to(torch.bfloat16)
            forward = probe.denoiser.forward
            probe.denoiser.forward = lambda x, t, **kw: forward(x.to(torch.bfloat16), t, **kw)
        elif weights_of == 'tf32':
            with torch.no_grad():
                for p in probe.parameters():
                    p.copy_(tf32_round(p))
        return probe.vlb_terms(xs, ts, noise).double().view(len(tau), -1).sum(0)

    state = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    for lr in (float(v) for v in args.lrs.split(',')):
        model.load_state_dict(state[0])
        optimizer.load_state_dict(state[1])
        before = {kind: vlb(kind) for kind in ('fp32', 'bf16', 'tf32')}
        for group in optimizer.param_groups:
            group['lr'] = lr
        batch = {'image': x0}
        loss = model.loss(model(batch), batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        reward = {kind: before[kind] - vlb(kind) for kind in before}
        print(
            f'lr {lr:g}: rank correlation with the fp32 rewards: bf16 weights '
            f'{rank_correlation(reward["fp32"], reward["bf16"]):.2f}, TF32-rounded weights '
            f'{rank_correlation(reward["fp32"], reward["tf32"]):.2f}'
        )


if __name__ == '__main__':
    main()

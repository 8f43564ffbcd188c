"""What a GPU would refuse, caught on CPU; probes in fp32 under bf16 FSDP; the same run on one rank or two.

The 2-rank runs enforce CUDA's and NCCL's placement rules with ``STRICT_DEVICES=1`` (see ``strict_devices.py``):
batches start in host memory, a kernel that mixes host and device tensors fails, and so does a collective on a host
tensor.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml

from composer_algos.config import load_config
from strict_devices import HostTensor, StrictDeviceError, _check_collective, strict_devices, to_host
from test_recipes import _cpu_overrides, write_recipe_listing
from two_ranks import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')


def _composer(n: int, *args: str, cwd: str, strict: bool = False, timeout: int = 900) -> None:
    os.makedirs(cwd, exist_ok=True)
    env = dict(os.environ, FSDP_VERSION='2', STRICT_DEVICES='1' if strict else '0')
    run_ranks(*args, timeout=timeout, ranks=n, env=env, cwd=cwd)


def _results(out_dir, n: int) -> list[dict]:
    return [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=False) for r in range(n)]


# ------------------------------------------------------------------------------------------------ the harness
def test_strict_mode_rejects_what_cuda_and_nccl_reject():
    linear = torch.nn.Linear(3, 2)
    with strict_devices():
        host = to_host(torch.randn(4, 3))
        with pytest.raises(StrictDeviceError, match='mixes host tensors'):
            linear(host)
        moved = host.to(torch.device('cpu'))  # as Device.batch_to_device moves a batch
        assert not isinstance(moved, HostTensor) and linear(moved).shape == (4, 2)
        assert isinstance(host * 2, HostTensor)  # host-only arithmetic stays on the host
        assert isinstance(moved.cpu(), HostTensor) and isinstance(moved.to('cpu'), HostTensor)
        assert not isinstance(moved + torch.tensor(1.0).cpu(), HostTensor)  # a 0-d host scalar is allowed
        device = torch.zeros(4, 3)
        device[0] = host[1]  # indexing and copies may cross devices
        # Batches from any DataLoader start on the host.
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(4, 3)), batch_size=2)
        assert isinstance(next(iter(loader))[0], HostTensor)
    calls = []
    checked = _check_collective('all_reduce', lambda tensor, **kwargs: calls.append(tensor))
    with pytest.raises(StrictDeviceError, match='NCCL only takes CUDA tensors'):
        checked(to_host(torch.ones(2)))
    checked(torch.ones(2))
    assert len(calls) == 1


def _strict_configs(data: str, latents: str, vae: str, folder: str) -> dict[str, dict]:
    """The scale-out recipes (and the digits adaptive recipe with FID) shrunk to run here, with their FSDP settings,
    evaluation every step and the evaluation callbacks that apply to them."""
    configs = {}
    for rel in (
        'cifar10/uniform',
        'cifar10/adaptive',
        'cifar10/adaptive_clts_md',
        'latent256/uniform',
        'latent256/adaptive',
        'latent256/adaptive_clts_md',
        'latent256/adaptive_clts_md_latents',
        'latent256/flow_adaptive_clts_md',
    ):
        cfg = load_config(os.path.join(ROOT, 'yamls', f'{rel}.yaml'))
        fsdp = cfg['parallelism_config']
        precomputed = cfg['train_loader'].get('latents', False)
        cfg = _cpu_overrides(cfg, latents if precomputed else data, vae, update_every=1, num_probe_timesteps=6)
        cfg['parallelism_config'] = fsdp
        cfg.update(max_duration='2ba', eval_interval='1ba')
        cfg['callbacks'] = {
            'loss_bands': {},
            'bits_per_dim': {'num_images': 8, 'num_terms': 4},
            'timestep_heatmap': {'interval': '1ba', 'folder': folder},
        }
        if cfg['model'].get('objective') == 'flow_matching':
            del cfg['callbacks']['bits_per_dim']  # no variational bound on a flow model
        if 'cifar10' in rel:
            cfg['callbacks']['sample_grid'] = {'num_samples': 4, 'num_steps': 2, 'folder': folder}
        configs[rel.replace('/', '-')] = cfg
    # The CIFAR-10 recipe with bf16 parameters in FSDP's forward (CPU runs fp32 otherwise): probes use the replica.
    bf16 = yaml.safe_load(yaml.safe_dump(configs['cifar10-adaptive_clts_md']))
    bf16['parallelism_config']['fsdp']['mixed_precision'] = {'param_dtype': 'bf16', 'reduce_dtype': 'fp32'}
    # diffusers' UNet casts its time embedding to the parameters' dtype (CPU runs without autocast).
    bf16['model']['denoiser'] = {
        'name': 'unet',
        'sample_size': 8,
        'in_channels': 3,
        'block_out_channels': [16, 32],
        'layers_per_block': 1,
        'attention_levels': [],
        'norm_num_groups': 8,
    }
    configs['cifar10-adaptive_clts_md-bf16'] = bf16
    digits = load_config(
        os.path.join(ROOT, 'yamls', 'digits', 'adaptive_clts_md.yaml'),
        [
            f'train_loader.local={data}',
            f'eval_loader.local={data}',
            'max_duration=2ba',
            'eval_interval=1ba',
            'eval_subset_num_batches=1',
            'progress_bar=false',
            'save_folder=null',
            'train_loader.global_batch_size=16',
        ],
    )
    digits['model']['denoiser'] = {'name': 'conv', 'width': 16}
    digits.pop('scheduler', None)  # no warm-up: the adaptive sampler probes only steps with a non-zero lr
    digits['model']['noise_schedule'] = {'num_timesteps': 100}
    digits['algorithms']['adaptive_timestep_sampling'].update(update_every=1, num_probe_timesteps=6)
    digits['callbacks'] = {
        'fid': {
            'num_samples': 8,
            'num_steps': 2,
            'folder': folder,
            'classifier_cache_dir': os.path.join(folder, 'cache'),
        },
        'bits_per_dim': {'num_images': 8, 'num_terms': 4},
        'loss_bands': {},
        'sample_grid': {'num_samples': 4, 'num_steps': 2, 'folder': folder},
        'timestep_heatmap': {'interval': '1ba', 'folder': folder},
    }
    digits['parallelism_config'] = {'fsdp': {'state_dict_type': 'sharded'}}
    configs['digits-adaptive_clts_md'] = digits
    return configs


def test_scale_out_recipes_follow_gpu_rules_on_two_ranks(digits_mds, latent_mds, tiny_vae_dir, tmp_path):
    from composer_algos.evaluation.features import load_or_train_digit_classifier

    configs = _strict_configs(digits_mds, latent_mds, tiny_vae_dir, str(tmp_path / 'pictures'))
    # The FID classifier trains on the CPU once and is cached (a CPU-only job the harness cannot tell apart from
    # device work); the runs load it and move it to their device.
    load_or_train_digit_classifier(str(tmp_path / 'pictures' / 'cache'))
    listing = write_recipe_listing(tmp_path, {f'{name}.yaml': cfg for name, cfg in configs.items()})
    out = tmp_path / 'out'
    _composer(
        2,
        os.path.join(TESTS, 'distributed_run.py'),
        '--each',
        listing,
        str(out),
        cwd=str(out),
        strict=True,
        timeout=1500,
    )
    for name, cfg in configs.items():
        ranks = _results(out / f'{name}.yaml', 2)
        for result in ranks:
            assert len(result['losses']) == 2 and all(np.isfinite(result['losses'])), name
            assert result['callbacks']['TimestepHeatmap']['steps'] == [1, 2], name
        adaptive = ranks[0]['algorithms'].get('AdaptiveTimestepSampling')
        assert (adaptive is not None) == ('adaptive_timestep_sampling' in cfg['algorithms']), name
        if adaptive is not None:
            assert adaptive['num_updates'] == 2, name


def test_probes_see_fp32_weights_when_fsdp_computes_in_bf16(digits_mds, tmp_path):
    out = tmp_path / 'out'
    _composer(2, os.path.join(TESTS, 'probe_precision_run.py'), digits_mds, str(out), cwd=str(tmp_path))
    for result in _results(out, 2):
        assert result['has_replica'] and result['num_updates'] == 3
        # The probe equals an unsharded fp32 copy of the trained weights; the bf16 forward does not.
        torch.testing.assert_close(result['replica'], result['reference'], rtol=1e-6, atol=1e-7)
        assert float((result['live'] - result['reference']).abs().max()) > 1e-4


# ------------------------------------------------------------------------------------------------ rank counts
def _cross_rank_recipe(tmp_path, data: str, objective: str = 'ddpm') -> str:
    model = (
        {'objective': 'flow_matching', 'flow': {'num_cells': 100}}
        if objective == 'flow_matching'
        else {'noise_schedule': {'num_timesteps': 100}}
    )
    recipe = {
        'max_duration': '8ba',
        'device': 'cpu',
        'precision': 'fp32',
        'seed': 5,
        'progress_bar': False,
        'model': {'denoiser': {'name': 'conv', 'width': 16}, **model},
        'train_loader': {'local': data, 'split': 'train', 'global_batch_size': 16, 'channels': 1, 'image_size': 8},
        'optimizer': {'name': 'adam', 'lr': 1e-3},
        'algorithms': {
            'ema': {'half_life': '2ba'},
            'adaptive_timestep_sampling': {'update_every': 3, 'num_probe_timesteps': 7},
            'curriculum_timestep_schedule': {'ramp_end': '6ba', 'ramp_start': '0ba'},
            'momentum_decay': {'beta_end': 0.5, 'compensate_lr': True},
        },
        'save_folder': str(tmp_path / 'ckpt-{run_name}'),
        'save_interval': '4ba',
        'save_overwrite': True,
        'parallelism_config': {'fsdp': {'state_dict_type': 'sharded'}},
    }
    path = tmp_path / 'recipe.yaml'
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def _global_losses(results: list[dict]) -> np.ndarray:
    # Each rank's loss is the mean over its half of the global batch; their mean is the global batch's loss.
    return np.mean([r['losses'] for r in results], axis=0)


@pytest.mark.parametrize('objective', ['ddpm', 'flow_matching'])
def test_a_run_and_its_resumes_are_the_same_on_one_and_two_ranks(digits_mds, tmp_path, objective):
    """FSDP2 sharded checkpoints; t (or sigma), noise and probe noise keyed by each sample's place in the global
    batch. The recipe has the adaptive policy tilted by the curriculum, with momentum decay and the EMA."""
    recipe = _cross_rank_recipe(tmp_path, digits_mds, objective)
    runner = os.path.join(TESTS, 'distributed_run.py')
    runs = {
        'one': (1, []),
        'two': (2, []),
        'two_to_one': (1, [f'load_path={tmp_path / "ckpt-two" / "ep0-ba4"}']),
        'one_to_two': (2, [f'load_path={tmp_path / "ckpt-one" / "ep0-ba4"}']),
    }
    results = {}
    for name, (ranks, overrides) in runs.items():
        _composer(ranks, runner, recipe, str(tmp_path / name), f'run_name={name}', *overrides, cwd=str(tmp_path))
        results[name] = _results(tmp_path / name, ranks)
    one, two = _global_losses(results['one']), _global_losses(results['two'])
    assert len(one) == 8
    # The same global batches in the same order, each sample with the same t and noise: the same run, up to the
    # order of floating-point sums.
    assert results['one'][0]['batch_sums'] == pytest.approx(
        np.sum([r['batch_sums'] for r in results['two']], axis=0).tolist(), rel=1e-9
    )
    np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_global_losses(results['two_to_one']), one[4:], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_global_losses(results['one_to_two']), one[4:], rtol=1e-5, atol=1e-6)
    policy = [results[name][0]['algorithms']['AdaptiveTimestepSampling']['policy'] for name in runs]
    for other in policy[1:]:
        for key in policy[0]:
            # Adam normalises the policy's small gradients, which amplifies summation-order noise a little.
            torch.testing.assert_close(other[key], policy[0][key], rtol=1e-3, atol=1e-4)


def test_fsdp2_on_gloo_averages_gradients(digits_mds, tmp_path):
    """Plain SGD (no Adam to hide a scale): 2 FSDP2 ranks train exactly as 1 rank and as 2 DDP ranks."""
    recipe = yaml.safe_load(open(_cross_rank_recipe(tmp_path, digits_mds)))
    recipe.update(max_duration='4ba', save_folder=None, algorithms={}, optimizer={'name': 'sgd', 'lr': 0.05})
    path = tmp_path / 'sgd.yaml'
    path.write_text(yaml.safe_dump(recipe))
    runner = os.path.join(TESTS, 'distributed_run.py')
    losses = {}
    for name, ranks, overrides in (('fsdp2', 2, []), ('one', 1, []), ('ddp', 2, ['parallelism_config=null'])):
        _composer(ranks, runner, str(path), str(tmp_path / name), *overrides, cwd=str(tmp_path))
        losses[name] = _global_losses(_results(tmp_path / name, ranks))
    np.testing.assert_allclose(losses['fsdp2'], losses['one'], rtol=1e-5)
    np.testing.assert_allclose(losses['ddp'], losses['one'], rtol=1e-5)


# ------------------------------------------------------------------------------------------------ encoders
class _Bf16Encoder(torch.nn.Module):
    """A frozen encoder that returns bf16 latents, as a VAE does under autocast."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images[:, :1] * 0.9 + 0.05).to(torch.bfloat16)


def test_latents_from_a_bf16_encoder_are_noised_in_fp32():
    from composer_algos.diffusion import DiffusionModel, NoiseSchedule, TimeConditionedConvNet

    model = DiffusionModel(
        TimeConditionedConvNet(in_channels=1, width=8),
        NoiseSchedule('linear', 1000),
        encoder=_Bf16Encoder(),
        latent_scale=1.3,
    )
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    x0 = model.images({'image': images})
    assert x0.dtype == torch.float32
    torch.testing.assert_close(x0, (images[:, :1] * 0.9 + 0.05).to(torch.bfloat16).float() * 1.3)
    noise = torch.randn(x0.shape)
    for t in (0, 2, 5, 7):  # sqrt(1 - alphabar_t) = 0.01 ... 0.03: lost against x0 in bf16
        x_t = model.noise_schedule.add_noise(x0, noise, torch.full((4,), t))
        assert not torch.equal(x_t, x0), t
    assert torch.isfinite(model.loss(model({'image': images}), None))


def test_an_encoder_returning_a_plain_tensor_gives_its_latents():
    from composer_algos.diffusion import DiffusionModel, NoiseSchedule, TimeConditionedConvNet

    class Halve(torch.nn.Module):
        def forward(self, images):
            return images[:, :1] / 2

    model = DiffusionModel(
        TimeConditionedConvNet(in_channels=1, width=8), NoiseSchedule('linear', 100), encoder=Halve(), latent_scale=2.0
    )
    images = torch.rand(2, 3, 8, 8)
    # Every tensor has a .mode() (the statistical mode): it must not be mistaken for a posterior.
    torch.testing.assert_close(model.images({'image': images}), images[:, :1])

"""Every recipe in yamls/ builds from YAML and trains a few steps (tiny model, shrunk callbacks), in one process and
on two FSDP2 ranks; the scale-out recipes' settings are checked as written."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from composer_algos import registry
from composer_algos.config import build_trainer, call_with_config, load_config
from two_ranks import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Text-to-image recipes (t2i_*) need captioned data: tests/test_text_to_image.py trains them.
T2I_RECIPES = sorted(glob.glob(os.path.join(ROOT, 'yamls', '*', 't2i_*.yaml')))
DIGITS_RECIPES = sorted(p for p in glob.glob(os.path.join(ROOT, 'yamls', 'digits', '*.yaml')) if p not in T2I_RECIPES)
MNIST_RECIPES = sorted(glob.glob(os.path.join(ROOT, 'yamls', 'mnist', '*.yaml')))


def _hundred_timesteps(model: dict) -> None:
    """A schedule of 100 timesteps (DDPM) or cells of sigma (flow matching), so the tiny runs stay fast."""
    if model.get('objective') == 'flow_matching':
        model['flow'] = dict(model.get('flow') or {}, num_cells=100)
    else:
        model['noise_schedule'] = {'num_timesteps': 100}


@pytest.mark.parametrize(
    'recipes, tier_only', [(DIGITS_RECIPES, set()), (MNIST_RECIPES, {'low_discrepancy'})], ids=['digits', 'mnist']
)
def test_there_is_a_recipe_per_method(recipes, tier_only):
    names = {os.path.basename(p)[:-5] for p in recipes}
    assert {
        'uniform',
        'adaptive',
        'clts',
        'md',
        'clts_md',
        'adaptive_clts_md',
        'loss_second_moment_sampling',
        'min_snr_weighting',
        'p2_weighting',
        'speed',
        'logit_normal_sampling',
        'log_normal_sampling',
        'noise_assignment',
        'flow_noise_assignment',
    } | tier_only <= names


def _small_trainer(recipe: str, data: str):
    """The recipe with its algorithms and EMA on ``data``, with a tiny denoiser, batch 16, for 3 steps."""
    cfg = load_config(
        recipe,
        [
            f'train_loader.local={data}',
            f'eval_loader.local={data}',
            'max_duration=3ba',
            'eval_interval=3ba',
            'progress_bar=false',
            'save_folder=null',
            'train_loader.global_batch_size=16',
        ],
    )
    cfg['model']['denoiser'] = {'name': 'conv', 'width': 16}
    _hundred_timesteps(cfg['model'])
    cfg['callbacks'] = {'sample_grid': {'num_samples': 4, 'num_steps': 2}}
    trainer = build_trainer(cfg)
    names = {type(a).__name__ for a in trainer.state.algorithms}
    assert 'WarmupEMA' in names and len(names) == len(cfg['algorithms'])
    return trainer


def _fit_three_steps(trainer) -> None:
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3
    assert torch.isfinite(trainer.state.loss)


def write_recipe_listing(folder, configs: dict[str, dict]) -> str:
    """Write each config to ``folder/recipes/<name>`` and their paths, one a line, to ``folder/recipes.txt``
    (what ``distributed_run.py --each`` reads); return the listing's path."""
    paths = []
    for name, cfg in configs.items():
        path = folder / 'recipes' / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        paths.append(str(path))
    listing = folder / 'recipes.txt'
    listing.write_text('\n'.join(paths) + '\n')
    return str(listing)


@pytest.mark.parametrize('recipe', DIGITS_RECIPES, ids=lambda p: os.path.basename(p))
def test_recipe_trains(recipe, digits_mds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _fit_three_steps(_small_trainer(recipe, digits_mds))


# ------------------------------------------------------------------------------------------------ MNIST tier
@pytest.mark.parametrize('recipe', MNIST_RECIPES, ids=lambda p: os.path.basename(p))
def test_mnist_recipe_trains(recipe, mnist_mds, tmp_path, monkeypatch):
    """Each MNIST recipe as written (16x16 data, its algorithms and EMA), with a tiny denoiser, for 3 steps."""
    from conftest import MNIST_SIZE

    monkeypatch.chdir(tmp_path)
    as_written = load_config(recipe)
    assert as_written['prepare_data'] == 'mnist5k'
    assert as_written['model']['denoiser']['sample_size'] == as_written['train_loader']['image_size'] == MNIST_SIZE
    assert as_written['callbacks']['fid']['feature'] == 'mnist'
    trainer = _small_trainer(recipe, mnist_mds)
    batch = next(iter(trainer.state.train_dataloader))
    assert batch['image'].shape == (16, 1, MNIST_SIZE, MNIST_SIZE)
    assert trainer.state.model.low_discrepancy == (os.path.basename(recipe) == 'low_discrepancy.yaml')
    if 'noise_assignment' in as_written['algorithms']:
        assert trainer.state.model.noise_coupling_owner == 'NoiseAssignment'
    _fit_three_steps(trainer)


def test_mnist_recipe_converts_its_data_when_missing(tmp_path, monkeypatch):
    """From a fresh checkout: the recipe's prepare_data writes the shards where train_loader.local says."""
    monkeypatch.chdir(tmp_path)
    cfg = load_config(
        os.path.join(ROOT, 'yamls', 'mnist', 'uniform.yaml'),
        [
            'max_duration=1ba',
            'progress_bar=false',
            'save_folder=null',
            'eval_loader=null',
            'train_loader.global_batch_size=8',
            'callbacks=null',
            'loggers=null',
        ],
    )
    cfg['model']['denoiser'] = {'name': 'conv', 'width': 8}
    assert not os.path.exists(cfg['train_loader']['local'])
    trainer = build_trainer(cfg)
    trainer.fit()
    for split, count in (('train', 4000), ('val', 1000)):
        index = yaml.safe_load((tmp_path / cfg['train_loader']['local'] / split / 'index.json').read_text())
        assert sum(shard['samples'] for shard in index['shards']) == count
    assert int(trainer.state.timestamp.batch) == 1


# ------------------------------------------------------------------------------------------------ scale-out recipes
# Every other recipe (CIFAR-10, latent 256x256, ...) is built from its YAML with CPU overrides (a tiny denoiser,
# fp32, no parallelism_config, the digits shards) and trains 2 steps; its scale-out settings are checked as written.

SCALE_RECIPES = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, 'yamls', '*', '*.yaml'))
    if os.path.basename(os.path.dirname(p)) not in ('algorithms', 'digits', 'mnist') and p not in T2I_RECIPES
)
ALGORITHM_CLASSES = {
    'adaptive_timestep_sampling': 'AdaptiveTimestepSampling',
    'curriculum_timestep_schedule': 'CurriculumTimestepSchedule',
    'momentum_decay': 'MomentumDecay',
    'ema': 'WarmupEMA',
    'gradient_clipping': 'GradientClipping',
}
EXPECTED_ALGORITHMS = {
    'base': set(),
    'uniform': set(),
    'adaptive': {'adaptive_timestep_sampling'},
    'clts_md': {'curriculum_timestep_schedule', 'momentum_decay'},
    'adaptive_clts_md': {'adaptive_timestep_sampling', 'curriculum_timestep_schedule', 'momentum_decay'},
    'adaptive_clts_md_latents': {'adaptive_timestep_sampling', 'curriculum_timestep_schedule', 'momentum_decay'},
    'flow_uniform': set(),
    'flow_adaptive_clts_md': {'adaptive_timestep_sampling', 'curriculum_timestep_schedule', 'momentum_decay'},
}


def test_every_recipe_is_tested():
    every = sorted(
        p
        for p in glob.glob(os.path.join(ROOT, 'yamls', '*', '*.yaml'))
        if os.path.basename(os.path.dirname(p)) != 'algorithms'
    )
    assert every == sorted(DIGITS_RECIPES + MNIST_RECIPES + SCALE_RECIPES + T2I_RECIPES)
    names = {os.path.relpath(p, os.path.join(ROOT, 'yamls'))[:-5] for p in SCALE_RECIPES}
    for dataset in ('cifar10', 'latent256'):
        assert {f'{dataset}/{r}' for r in ('uniform', 'adaptive', 'clts_md', 'adaptive_clts_md')} <= names


def _cpu_overrides(cfg: dict, data_root: str, vae_dir: str, **adaptive: int) -> dict:
    """Shrink a scale-out recipe to run here: tiny denoiser and VAE, digits data, fp32 CPU, no FSDP, no saving."""
    cfg = dict(cfg)
    cfg.pop('parallelism_config')
    # A warm-up of thousands of steps would keep the lr at 0 for the 2 steps run here (the adaptive sampler does not
    # probe a step with lr 0).
    cfg.pop('scheduler', None)
    cfg.update(
        device='cpu',
        precision='fp32',
        max_duration='2ba',
        eval_interval='2ba',
        eval_subset_num_batches=1,
        device_train_microbatch_size=4,
        progress_bar=False,
        log_to_console=False,
        save_folder=None,
        autoresume=False,
    )
    model = cfg['model']
    encoder = model.get('encoder')
    if model['denoiser']['name'] == 'dit':
        model['denoiser'] = {
            'name': 'dit',
            'sample_size': 8,
            'in_channels': 4,
            'num_layers': 2,
            'num_attention_heads': 2,
            'attention_head_dim': 8,
            'num_classes': 10,
        }
    else:
        model['denoiser'] = {'name': 'conv', 'in_channels': 3, 'width': 16}
    if encoder is not None and not encoder.get('precomputed'):
        model['encoder'] = {'name': 'vae', 'pretrained_path': vae_dir}
    _hundred_timesteps(model)
    for key in ('train_loader', 'eval_loader'):
        loader = cfg[key]
        loader.update(
            remote=None,
            local=data_root,
            num_workers=0,
            global_batch_size=8,
            image_size=8 if loader.get('image_size') else None,
        )
    algorithms = cfg['algorithms']
    if 'adaptive_timestep_sampling' in algorithms:
        algorithms['adaptive_timestep_sampling'].update(adaptive)
    cfg['callbacks'] = {'loss_bands': {}}
    return cfg


@pytest.mark.parametrize('recipe', SCALE_RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, 'yamls')))
def test_scale_recipe_trains(recipe, digits_mds, latent_mds, tiny_vae_dir, tmp_path, monkeypatch):
    from composer_algos.config import build_callbacks
    from composer_algos.data.latents import PrecomputedLatents, VAEEncoder

    monkeypatch.chdir(tmp_path)
    cfg = load_config(recipe)
    # The scale-out settings, as written.
    fsdp = cfg['parallelism_config']['fsdp']
    assert fsdp['state_dict_type'] == 'sharded' and fsdp['mixed_precision'] == 'DEFAULT'
    assert {'reshard_after_forward', 'activation_checkpointing'} <= set(fsdp)
    assert cfg['precision'] == 'amp_bf16' and cfg['device'] == 'gpu' and cfg['device_train_microbatch_size'] >= 1
    assert cfg['autoresume'] is True and '://' in cfg['save_folder'] and '{run_name}' in cfg['save_folder']
    for key in ('train_loader', 'eval_loader'):
        assert '://' in cfg[key]['remote'] and cfg[key]['local']
    assert cfg['train_loader']['num_canonical_nodes'] >= 1
    # A node-local cache without a cap fills the disk; the cap must hold at least 4 shards of 64 MB.
    from streaming.base.util import bytes_to_int

    assert bytes_to_int(cfg['train_loader']['cache_limit']) >= 4 * 64 * 2**20
    # The recipe's own callbacks construct (FID and Inception need a GPU-sized run; they are swapped out below).
    assert len(build_callbacks(cfg['callbacks'])) == len(cfg['callbacks'])
    name = os.path.basename(recipe)[:-5]
    assert set(cfg['algorithms']) == {'ema'} | EXPECTED_ALGORITHMS[name] | (
        {'gradient_clipping'} if 'cifar10' in recipe else set()
    )
    latents = cfg['train_loader'].get('latents', False)
    cfg = _cpu_overrides(
        cfg, latent_mds if latents else digits_mds, tiny_vae_dir, update_every=1, num_probe_timesteps=6
    )
    trainer = build_trainer(cfg)
    model = trainer.state.model
    assert sorted(type(a).__name__ for a in trainer.state.algorithms) == sorted(
        ALGORITHM_CLASSES[a] for a in cfg['algorithms']
    )
    if 'latent256' in recipe:
        assert isinstance(model.encoder, PrecomputedLatents if latents else VAEEncoder)
        assert model.label_key == 'label' and model.latent_scale == pytest.approx(0.18215)
    else:
        assert model.encoder is None
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2
    assert torch.isfinite(trainer.state.loss)
    adaptive = next((a for a in trainer.state.algorithms if type(a).__name__ == 'AdaptiveTimestepSampling'), None)
    if adaptive is not None:
        assert adaptive.state_dict()['num_updates'] == 2  # the policy was updated at each step


def _denoiser(cfg_path: str):
    """The recipe's real denoiser, built on the meta device (no memory, no initialisation)."""
    cfg = dict(load_config(cfg_path)['model']['denoiser'])
    with torch.device('meta'):
        return call_with_config(registry.resolve(registry.denoisers, cfg.pop('name'), 'denoiser'), cfg, 'denoiser')


def test_recipe_denoisers_have_the_papers_sizes_and_shard_by_block():
    from composer_algos.diffusion import count_parameters

    unet = _denoiser(os.path.join(ROOT, 'yamls', 'cifar10', 'base.yaml'))
    assert count_parameters(unet) == 35_746_307  # DDPM's CIFAR-10 model: 35.7M
    wrapped = [n for n, m in unet.named_modules() if unet.fsdp_wrap_fn(m)]
    assert wrapped == [f'down_blocks.{i}' for i in range(4)] + [f'up_blocks.{i}' for i in range(4)] + ['mid_block']
    assert [n for n, m in unet.named_modules() if unet.activation_checkpointing_fn(m)] == wrapped
    dit = _denoiser(os.path.join(ROOT, 'yamls', 'latent256', 'base.yaml'))
    # DiT-XL/2 in diffusers' layout (a timestep/label embedder per block): 749.8M against the paper's 675M.
    assert count_parameters(dit) == 749_808_016
    # Block 0 stays in the denoiser's unit: diffusers' DiT reuses its embedder after the last block.
    assert [n for n, m in dit.named_modules() if dit.fsdp_wrap_fn(m)] == [
        f'dit.transformer_blocks.{i}' for i in range(1, 28)
    ]
    assert [n for n, m in dit.named_modules() if dit.activation_checkpointing_fn(m)] == [
        f'dit.transformer_blocks.{i}' for i in range(28)
    ]


def test_block_policy_follows_deep_copies():
    import copy

    from composer_algos.diffusion import build_unet

    unet = build_unet()
    twin = copy.deepcopy(unet)
    assert twin.fsdp_wrap_fn(twin.mid_block) and not twin.fsdp_wrap_fn(unet.mid_block)
    assert sum(map(twin.fsdp_wrap_fn, twin.modules())) == sum(map(unet.fsdp_wrap_fn, unet.modules())) == 5


def test_missing_vae_weights_say_how_to_get_them(tmp_path):
    from composer_algos.config import build_model

    model_cfg = load_config(os.path.join(ROOT, 'yamls', 'latent256', 'uniform.yaml'))['model']
    model_cfg['encoder']['pretrained_path'] = str(tmp_path / 'no-such-vae')
    model_cfg['denoiser'] = {'name': 'conv', 'in_channels': 4, 'width': 8}
    with pytest.raises(
        FileNotFoundError, match=r'VAE weights not found.*save_pretrained.*model\.encoder\.pretrained_path'
    ):
        build_model(model_cfg)
    from composer_algos.data import build_vae_encoder

    with pytest.raises(ValueError, match='exactly one of pretrained_path'):
        build_vae_encoder()


def test_vae_encoder_matches_diffusers_and_loads_locally(tiny_vae_dir):
    from diffusers import AutoencoderKL

    from composer_algos.data import build_vae_encoder

    encoder = build_vae_encoder(tiny_vae_dir)
    vae = AutoencoderKL.from_pretrained(tiny_vae_dir, local_files_only=True)
    assert not any('decoder' in n for n, _ in encoder.named_parameters())
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(encoder(x).mode(), vae.encode(x).latent_dist.mode())


def test_a_latent_scale_unlike_the_vaes_is_reported(tiny_vae_dir, caplog):
    from composer_algos.config import build_model

    model_cfg = {
        'denoiser': {'name': 'conv', 'in_channels': 4, 'width': 8},
        'encoder': {'name': 'vae', 'pretrained_path': tiny_vae_dir},
    }
    with caplog.at_level('WARNING', logger='composer_algos.diffusion.build'):
        build_model(dict(model_cfg, latent_scale=0.18215))
        assert not [r for r in caplog.records if r.name == 'composer_algos.diffusion.build']
        build_model(dict(model_cfg, latent_scale=0.13025))
    assert [r.getMessage() for r in caplog.records if r.name == 'composer_algos.diffusion.build'] == [
        'model.latent_scale=0.13025 but the VAE was trained with scaling_factor=0.18215.'
    ]


def test_precomputed_latents_load_unscaled_and_skip_the_vae(latent_mds, tiny_vae_dir, digits_mds):
    from composer_algos.config import build_model
    from composer_algos.data import StreamingImageDataset, build_vae_encoder
    from composer_algos.data.convert import digits_images

    ds = StreamingImageDataset(
        local=latent_mds, split='train', shuffle=False, batch_size=4, latents=True, channels=4, image_size=8
    )
    image, label = digits_images('train')[5]
    x = torch.from_numpy(np.asarray(image.convert('RGB'), dtype=np.float32).transpose(2, 0, 1).copy()) / 127.5 - 1
    with torch.no_grad():
        expected = build_vae_encoder(tiny_vae_dir)(x[None]).mode()[0]
    assert ds[5]['label'] == label
    torch.testing.assert_close(ds[5]['image'], expected, atol=2e-3, rtol=2e-3)  # stored as float16
    model = build_model(
        {
            'denoiser': {'name': 'conv', 'in_channels': 4, 'width': 8},
            'latent_scale': 0.5,
            'encoder': {'name': 'vae', 'pretrained_path': '/not/needed', 'precomputed': True},
        }
    )
    batch = {'image': torch.stack([ds[i]['image'] for i in range(3)])}
    torch.testing.assert_close(model.images(batch), batch['image'] * 0.5)
    with pytest.raises(ValueError, match='random_flip'):
        StreamingImageDataset(local=latent_mds, split='train', latents=True, random_flip=True)
    with pytest.raises(ValueError, match='latents: true'):
        StreamingImageDataset(local=latent_mds, split='train', shuffle=False)[0]
    with pytest.raises(ValueError, match='no latents column'):
        StreamingImageDataset(local=digits_mds, split='train', shuffle=False, latents=True)[0]


def test_loader_streams_remote_into_local_and_passes_streaming_options(digits_mds, tmp_path):
    from composer_algos.config import build_dataloader

    # A local folder works as the remote: streaming copies shards into the cache as it would download them.
    loader = build_dataloader(
        {
            'remote': digits_mds,
            'local': str(tmp_path / 'cache'),
            'split': 'train',
            'global_batch_size': 16,
            'shuffle': False,
            'channels': 1,
            'num_canonical_nodes': 3,
            'predownload': 32,
            'cache_limit': '1mb',
        }
    )
    assert loader.dataset.num_canonical_nodes == 3 and loader.dataset.predownload == 32
    assert loader.dataset.cache_limit == 2**20
    reference = build_dataloader(
        {
            'local': digits_mds,
            'split': 'train',
            'global_batch_size': 16,
            'shuffle': False,
            'channels': 1,
            'num_canonical_nodes': 3,
        }
    )
    torch.testing.assert_close(next(iter(loader))['image'], next(iter(reference))['image'])
    assert os.path.exists(tmp_path / 'cache' / 'train' / 'index.json')


def _image_folder(root, sizes) -> list[tuple[np.ndarray, int]]:
    from PIL import Image

    rng = np.random.default_rng(0)
    arrays = []
    for label, cls in enumerate(('ant', 'bee')):
        os.makedirs(root / cls)
        for i, (h, w) in enumerate(sizes):
            array = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / cls / f'{i:02d}.png')
            arrays.append((array, label))
    return arrays


def _convert(*args: str) -> None:
    """``python recipes/convert_dataset.py ARGS``, in this process (it spares importing Composer again)."""
    import importlib.util

    path = os.path.join(ROOT, 'recipes', 'convert_dataset.py')
    spec = importlib.util.spec_from_file_location('convert_dataset', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(['--dataset', 'folder', '--no-progress', *args]) == 0


def test_convert_folder_in_parallel_keeps_file_order_and_center_crops(tmp_path):
    from composer_algos.data import StreamingImageDataset
    from composer_algos.data.convert import center_crop
    from PIL import Image

    sizes = [(12, 20), (40, 16), (16, 16), (33, 47), (16, 64)]
    arrays = _image_folder(tmp_path / 'src', sizes)
    _convert(
        '--src',
        str(tmp_path / 'src'),
        '--out',
        str(tmp_path / 'par'),
        '--resize',
        '16',
        '--workers',
        '2',
        '--part-size',
        '3',
    )
    _convert('--src', str(tmp_path / 'src'), '--out', str(tmp_path / 'one'), '--resize', '16', '--workers', '1')
    parts = sorted(d for d in os.listdir(tmp_path / 'par') if d.startswith('part-'))
    assert len(parts) == 4  # 10 images, 3 per part, merged into one index
    par = StreamingImageDataset(local=str(tmp_path / 'par'), shuffle=False, batch_size=1, channels=3)
    one = StreamingImageDataset(local=str(tmp_path / 'one'), shuffle=False, batch_size=1, channels=3)
    assert len(par) == len(one) == len(arrays)
    for i, (array, label) in enumerate(arrays):
        expected = np.asarray(center_crop(Image.fromarray(array), 16), dtype=np.float32).transpose(2, 0, 1)
        torch.testing.assert_close(par[i]['image'], torch.from_numpy(expected.copy()) / 127.5 - 1)
        torch.testing.assert_close(one[i]['image'], par[i]['image'])
        assert par[i]['label'] == one[i]['label'] == label


def test_center_crop_is_the_centre_square():
    from composer_algos.data.convert import center_crop
    from PIL import Image

    array = np.zeros((20, 40, 3), dtype=np.uint8)
    array[:, 10:30] = 255  # the centre 20x20 square is white, the sides black
    cropped = np.asarray(center_crop(Image.fromarray(array), 10))
    assert cropped.shape == (10, 10, 3) and cropped.min() == 255
    large = center_crop(Image.fromarray(np.zeros((300, 500, 3), dtype=np.uint8)), 64)
    assert large.size == (64, 64)


def test_convert_folder_to_latents(tmp_path, tiny_vae_dir):
    from composer_algos.data import StreamingImageDataset, build_vae_encoder
    from composer_algos.data.convert import load_image

    _image_folder(tmp_path / 'src', [(8, 8), (10, 12), (9, 9)])
    _convert(
        '--src',
        str(tmp_path / 'src'),
        '--out',
        str(tmp_path / 'lat'),
        '--resize',
        '8',
        '--encode-latents',
        tiny_vae_dir,
        '--batch-size',
        '4',
        '--workers',
        '2',
    )
    ds = StreamingImageDataset(local=str(tmp_path / 'lat'), shuffle=False, batch_size=1, latents=True)
    assert len(ds) == 6 and [ds[i]['label'] for i in range(6)] == [0, 0, 0, 1, 1, 1]
    image = load_image(str(tmp_path / 'src' / 'bee' / '01.png'), resize=8)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()) / 127.5 - 1
    with torch.no_grad():
        expected = build_vae_encoder(tiny_vae_dir)(x[None]).mode()[0]
    assert ds[4]['image'].shape == (4, 8, 8)
    torch.testing.assert_close(ds[4]['image'], expected, atol=2e-3, rtol=2e-3)


RUNNER = os.path.join(ROOT, 'tests', 'distributed_run.py')


def _run_two_ranks(out_dir: str, *args: str, timeout: int = 600) -> None:
    """``composer -n 2 tests/distributed_run.py ARGS`` with FSDP2, run in ``out_dir`` (recipes' file loggers write
    under runs/)."""
    os.makedirs(out_dir, exist_ok=True)
    run_ranks(RUNNER, *args, timeout=timeout, env=dict(os.environ, FSDP_VERSION='2'), cwd=out_dir)


def _launch_two_ranks(recipe: str, out_dir: str, *overrides: str) -> list[dict]:
    _run_two_ranks(out_dir, recipe, out_dir, *overrides)
    return [torch.load(os.path.join(out_dir, f'rank{r}.pt'), weights_only=False) for r in range(2)]


def test_cifar10_recipe_on_two_fsdp2_ranks_shards_each_block_and_resumes_exactly(digits_mds, tiny_vae_dir, tmp_path):
    """The CIFAR-10 adaptive+CLTS+MD recipe, with its FSDP2 settings and activation checkpointing on, on 2 CPU ranks."""
    cfg = _cpu_overrides(
        load_config(os.path.join(ROOT, 'yamls', 'cifar10', 'adaptive_clts_md.yaml')),
        digits_mds,
        tiny_vae_dir,
        update_every=3,
        num_probe_timesteps=7,
    )
    cfg['parallelism_config'] = load_config(os.path.join(ROOT, 'yamls', 'cifar10', 'base.yaml'))['parallelism_config']
    cfg['parallelism_config']['fsdp']['activation_checkpointing'] = True
    cfg['model']['denoiser'] = {
        'name': 'unet',
        'sample_size': 8,
        'in_channels': 3,
        'block_out_channels': [16, 32],
        'layers_per_block': 1,
        'attention_levels': [1],
        'norm_num_groups': 8,
        'attention_head_dim': 16,
        'dropout': 0.1,
    }  # the recipe's dropout
    cfg['train_loader']['global_batch_size'] = 16
    cfg.update(
        max_duration='8ba',
        eval_interval='4ba',
        save_folder=str(tmp_path / 'ckpt'),
        save_interval='4ba',
        save_overwrite=True,
    )
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(cfg))
    full = _launch_two_ranks(str(recipe), str(tmp_path / 'full'))
    resumed = _launch_two_ranks(
        str(recipe),
        str(tmp_path / 'resumed'),
        f'load_path={tmp_path / "ckpt" / "ep0-ba4"}',
        f'save_folder={tmp_path / "ckpt_resumed"}',
    )

    blocks = [
        'denoiser.down_blocks.0',
        'denoiser.down_blocks.1',
        'denoiser.mid_block',
        'denoiser.up_blocks.0',
        'denoiser.up_blocks.1',
    ]
    for rank in range(2):
        sharding = full[rank]['sharding']
        # Each block is its own FSDP unit (and the denoiser holds the rest); the blocks are activation-checkpointed.
        assert set(blocks) | {'denoiser'} <= set(sharding['fsdp_units'])
        assert sorted(sharding['checkpointed']) == sorted(blocks)
        block_params = {n: v for n, v in sharding['params'].items() if any(n.startswith(b + '.') for b in blocks)}
        assert len(block_params) > 50 and all(is_dtensor for _, _, is_dtensor in block_params.values())
        local = sum(v[0] for v in block_params.values())
        full_size = sum(v[1] for v in block_params.values())
        assert 0.4 * full_size < local < 0.6 * full_size  # about half of every block lives on each rank
    for name, (local0, size, _) in full[0]['sharding']['params'].items():
        if name.startswith('denoiser.'):
            assert local0 + full[1]['sharding']['params'][name][0] == size, name  # the two shards make the tensor

    assert len(full[0]['losses']) == 8 and full[0]['losses'] != full[1]['losses']
    adaptive = [r['algorithms']['AdaptiveTimestepSampling'] for r in full]
    assert adaptive[0]['num_updates'] == 3
    torch.testing.assert_close(adaptive[0]['queue_x'], adaptive[1]['queue_x'])
    for rank in range(2):
        assert resumed[rank]['losses'] == full[rank]['losses'][4:], f'rank {rank}'
        for key in ('policy', 'queue_x', 'selected', 'num_updates'):
            a, b = (
                full[rank]['algorithms']['AdaptiveTimestepSampling'][key],
                resumed[rank]['algorithms']['AdaptiveTimestepSampling'][key],
            )
            assert str(a) == str(b) if not torch.is_tensor(a) else torch.equal(a, b), key
        assert full[rank]['algorithms']['MomentumDecay'] == resumed[rank]['algorithms']['MomentumDecay']


def test_flow_recipe_on_two_fsdp2_ranks_resumes_exactly(digits_mds, tmp_path):
    """The flow-matching adaptive+CLTS+MD digits recipe (tiny denoiser) on 2 FSDP2 ranks with sharded checkpoints:
    resumed at step 4, every rank repeats its losses and ends with the same sampler, curriculum and momentum state."""
    cfg = _digits_overrides(os.path.join(ROOT, 'yamls', 'digits', 'flow_adaptive_clts_md.yaml'), digits_mds)
    assert cfg['model']['objective'] == 'flow_matching'
    cfg['algorithms']['adaptive_timestep_sampling'].update(update_every=2)
    cfg.update(
        max_duration='8ba',
        eval_interval='4ba',
        save_folder=str(tmp_path / 'ckpt'),
        save_interval='4ba',
        save_overwrite=True,
    )
    recipe = tmp_path / 'recipe.yaml'
    recipe.write_text(yaml.safe_dump(cfg))
    full = _launch_two_ranks(str(recipe), str(tmp_path / 'full'))
    resumed = _launch_two_ranks(
        str(recipe),
        str(tmp_path / 'resumed'),
        f'load_path={tmp_path / "ckpt" / "ep0-ba4"}',
        f'save_folder={tmp_path / "ckpt_resumed"}',
    )
    assert len(full[0]['losses']) == 8 and full[0]['losses'] != full[1]['losses']
    assert full[0]['algorithms']['AdaptiveTimestepSampling']['num_updates'] == 4
    for rank in range(2):
        assert resumed[rank]['losses'] == full[rank]['losses'][4:], f'rank {rank}'
        for key in ('policy', 'queue_x', 'selected', 'num_updates'):
            a, b = (
                full[rank]['algorithms']['AdaptiveTimestepSampling'][key],
                resumed[rank]['algorithms']['AdaptiveTimestepSampling'][key],
            )
            assert str(a) == str(b) if not torch.is_tensor(a) else torch.equal(a, b), key
        for name in ('CurriculumTimestepSchedule', 'MomentumDecay'):
            assert full[rank]['algorithms'][name] == resumed[rank]['algorithms'][name], name


def test_latent_recipe_under_fsdp2_wraps_dit_blocks_and_keeps_the_vae_whole(
    digits_mds, tiny_vae_dir, tmp_path, monkeypatch
):
    """The latent recipe's FSDP2 settings (one rank, in this process): DiT blocks sharded, VAE whole, trains."""
    from distributed_run import sharding_report

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('FSDP_VERSION', '2')
    cfg = _cpu_overrides(
        load_config(os.path.join(ROOT, 'yamls', 'latent256', 'adaptive_clts_md.yaml')),
        digits_mds,
        tiny_vae_dir,
        update_every=1,
        num_probe_timesteps=7,
    )
    cfg['parallelism_config'] = load_config(os.path.join(ROOT, 'yamls', 'latent256', 'base.yaml'))['parallelism_config']
    cfg['parallelism_config']['fsdp']['activation_checkpointing'] = True
    cfg['model']['denoiser']['num_layers'] = 3
    trainer = build_trainer(cfg)
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2 and torch.isfinite(trainer.state.loss)
    sharding = sharding_report(trainer.state.model)
    blocks = [f'denoiser.dit.transformer_blocks.{i}' for i in range(3)]
    # Block 0 stays in the denoiser's unit: diffusers' DiT calls its embedder again after the last block, which
    # fails ("mixed torch.Tensor and DTensor") when block 0 is a unit of its own.
    assert sorted(sharding['fsdp_units']) == ['denoiser'] + blocks[1:]
    assert sorted(sharding['checkpointed']) == blocks
    vae = [is_dtensor for name, (_, _, is_dtensor) in sharding['params'].items() if name.startswith('encoder.')]
    assert vae and not any(vae)
    assert all(is_dtensor for name, (_, _, is_dtensor) in sharding['params'].items() if name.startswith(blocks[2]))


def test_memory_plan_counts_saved_activations_exactly():
    import importlib.util

    spec = importlib.util.spec_from_file_location('memory_plan', os.path.join(ROOT, 'recipes', 'memory_plan.py'))
    memory_plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(memory_plan)
    block = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh())
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), block, torch.nn.Linear(8, 2))
    saved = memory_plan.measure(net, [block], torch.randn(3, 4))
    # bf16, 2 B per value. Outside the block the first Linear saves x (3x4); in the block its Linear saves its
    # input (3x8) and Tanh its output (3x8), which the last Linear saves again (counted once).
    assert saved.per_block() == [2 * (24 + 24)]
    assert saved.total() == 2 * (12 + 24 + 24)
    # Checkpointed: x, the block's input, and the block's own tensors while it is recomputed.
    assert saved.checkpointed() == 2 * (12 + 24) + 2 * (24 + 24)


def _digits_overrides(recipe: str, data_root: str) -> dict:
    """A digits (or MNIST) recipe with a tiny denoiser, 2 steps and an evaluation, every algorithm as configured."""
    cfg = load_config(
        recipe,
        [
            f'train_loader.local={data_root}',
            f'eval_loader.local={data_root}',
            'max_duration=2ba',
            'eval_interval=2ba',
            'eval_subset_num_batches=1',
            'progress_bar=false',
            'save_folder=null',
            'train_loader.global_batch_size=16',
        ],
    )
    cfg['model']['denoiser'] = {'name': 'conv', 'width': 16}
    _hundred_timesteps(cfg['model'])
    cfg['callbacks'] = {'loss_bands': {}}
    cfg.pop('scheduler', None)  # no warm-up: the adaptive sampler probes only steps with a non-zero lr
    if 'adaptive_timestep_sampling' in cfg['algorithms']:
        cfg['algorithms']['adaptive_timestep_sampling'].update(update_every=1, num_probe_timesteps=6)
    cfg['parallelism_config'] = {'fsdp': {'state_dict_type': 'sharded'}}
    return cfg


def test_every_recipe_on_two_fsdp2_ranks(digits_mds, mnist_mds, latent_mds, tiny_vae_dir, tmp_path):
    """Every YAML of yamls/ (CPU overrides) trains on 2 ranks with FSDP2, in one process group: the denoiser is
    sharded, every algorithm of the recipe runs on the sharded model, and the adaptive policy stays the same on both
    ranks. The scale-out recipes keep their own FSDP settings (activation checkpointing as written). Of the MNIST
    tier, uniform, adaptive + CLTS + MD (16x16 images through the policy network) and the low-discrepancy draw (its
    batch spans both ranks); its other recipes differ from their digits twins only in the data."""
    configs = {}
    for recipe in DIGITS_RECIPES:
        configs[f'digits-{os.path.basename(recipe)}'] = _digits_overrides(recipe, digits_mds)
    for name in ('uniform', 'adaptive_clts_md', 'low_discrepancy'):
        configs[f'mnist-{name}.yaml'] = _digits_overrides(
            os.path.join(ROOT, 'yamls', 'mnist', f'{name}.yaml'), mnist_mds
        )
    for recipe in SCALE_RECIPES:
        cfg = load_config(recipe)
        latents = cfg['train_loader'].get('latents', False)
        fsdp = cfg['parallelism_config']
        cfg = _cpu_overrides(
            cfg, latent_mds if latents else digits_mds, tiny_vae_dir, update_every=1, num_probe_timesteps=6
        )
        cfg['parallelism_config'] = fsdp
        dataset = os.path.basename(os.path.dirname(recipe))
        configs[f'{dataset}-{os.path.basename(recipe)}'] = cfg
    listing = write_recipe_listing(tmp_path, configs)
    out = tmp_path / 'out'
    _run_two_ranks(str(out), '--each', listing, str(out), timeout=900)

    for name, cfg in configs.items():
        ranks = [torch.load(out / name / f'rank{r}.pt', weights_only=False) for r in range(2)]
        for result in ranks:
            assert result['world_size'] == 2
            assert len(result['losses']) == 2 and all(np.isfinite(result['losses'])), name
            denoiser = {n: v for n, v in result['sharding']['params'].items() if n.startswith('denoiser.')}
            assert denoiser and all(is_dtensor for _, _, is_dtensor in denoiser.values()), name
            assert len(result['algorithms']) == len(cfg['algorithms']), name
        assert ranks[0]['losses'] != ranks[1]['losses'], name  # each rank trains on its own samples
        adaptive = [r['algorithms'].get('AdaptiveTimestepSampling') for r in ranks]
        assert (adaptive[0] is not None) == ('adaptive_timestep_sampling' in cfg['algorithms']), name
        if adaptive[0] is not None:
            assert adaptive[0]['num_updates'] == 2, name
            for key in ('policy', 'queue_x', 'selected'):
                torch.testing.assert_close(adaptive[0][key], adaptive[1][key], msg=f'{name}: ranks differ in {key}')


def test_the_main_job_ends_with_what_it_reached_and_where_its_files_are(digits_mds, tmp_path):
    recipe = os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml')
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(ROOT, 'recipes', 'train.py'),
            recipe,
            'max_duration=4ba',
            'eval_interval=2ba',
            f'train_loader.local={digits_mds}',
            f'eval_loader.local={digits_mds}',
            'callbacks.fid.num_samples=32',
            'callbacks.fid.num_steps=3',
            'callbacks.bits_per_dim.num_images=8',
            'callbacks.bits_per_dim.num_terms=3',
            'callbacks.sample_grid.num_samples=4',
            'callbacks.sample_grid.num_steps=3',
            'save_interval=2ba',
            'progress_bar=false',
            'run_name=main-job',
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    summary = lines[lines.index("Run 'main-job' finished at step 4.") :]
    assert summary[1].startswith('FID ') and 'real-vs-real floor at these sample sizes' in summary[1]
    assert summary[2].startswith('Bits/dim ')
    files = dict(line.split(': ', 1) for line in summary[3:])
    assert files['samples'] == os.path.join('runs', 'main-job', 'eval', 'samples_ba0000004.png')
    assert files['checkpoints'] == os.path.join('runs', 'main-job', 'checkpoints')
    assert files['log'] == os.path.join('runs', 'main-job', 'log.txt')
    for path in (files['samples'], files['FID curve'], files['timestep distribution'], files['log']):
        assert (tmp_path / path).is_file(), path

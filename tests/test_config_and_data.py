"""YAML recipes -> Trainer, their errors, and the streaming digits data."""

import os

import numpy as np
import pytest
import torch
import yaml
from conftest import digits_loader

from composer_algos.config import ConfigError, build_trainer, load_config
from composer_algos.data import StreamingImageDataset
from composer_algos.data.convert import digits_images, folder_images, write_mds

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNIFORM = os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml')


def _tiny_overrides(digits_mds, tmp_path):
    return [
        f'train_loader.local={digits_mds}',
        f'eval_loader.local={digits_mds}',
        'max_duration=4ba',
        'eval_interval=4ba',
        'progress_bar=false',
        f'save_folder={tmp_path}/ckpt',
        'save_interval=4ba',
        'train_loader.global_batch_size=32',
        'eval_loader.global_batch_size=64',
        'callbacks=null',
    ]


def test_default_recipe_builds_and_trains(digits_mds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the recipe writes its pictures and log under runs/
    overrides = [o for o in _tiny_overrides(digits_mds, tmp_path) if o != 'callbacks=null'] + [
        'callbacks.fid.num_samples=32',
        'callbacks.fid.num_steps=3',
        'callbacks.bits_per_dim.num_images=16',
        'callbacks.bits_per_dim.num_terms=4',
        'callbacks.sample_grid.num_samples=4',
        'callbacks.sample_grid.num_steps=3',
        'callbacks.timestep_heatmap.interval=2ba',
    ]
    trainer = build_trainer(load_config(UNIFORM, overrides))
    trainer.fit()
    trainer.close()
    assert int(trainer.state.timestamp.batch) == 4
    assert os.path.exists(tmp_path / 'ckpt' / 'ep0-ba4-rank0.pt')
    eval_dir = tmp_path / 'runs' / 'digits-uniform' / 'eval'
    for picture in ('samples_ba0000004.png', 'timestep_heatmap.png', 'fid.png'):
        assert (eval_dir / picture).stat().st_size > 0, picture
    assert 'FID' in (tmp_path / 'runs' / 'digits-uniform' / 'log.txt').read_text()
    assert torch.isfinite(trainer.state.eval_metric_values['DiffusionLoss'])
    assert sum(p.numel() for p in trainer.state.model.parameters()) < 1_000_000


@pytest.mark.parametrize(
    'override, message',
    [
        ('modle.prediction_type=epsilon', "Unknown key 'modle'. Did you mean 'model'?"),
        ('model.predicton_type=epsilon', "Unknown key 'model.predicton_type'. Did you mean 'model.prediction_type'?"),
        ('optimizer.lrate=0.1', "Unknown key 'optimizer.lrate'"),
        ('algorithms.min_snr_weigting={}', "Unknown algorithm 'min_snr_weigting'"),
        ('model.denoiser.name=unett', "Unknown denoiser 'unett'. Did you mean 'unet'?"),
        ('model.prediction_type=noise', 'prediction_type must be one of'),
        ('scheduler.name=cosin', "Unknown scheduler 'cosin'. Did you mean 'cosine'?"),
        ('optimizer.name=adamm', "Unknown optimizer 'adamm'. Did you mean 'adam'"),
        ('loggers.fille={}', "Unknown logger 'fille'. Did you mean 'file'?"),
        ('algorithms.speed.lam=5', 'lam must be in [0, 1]'),
    ],
)
def test_bad_recipe_keys_are_named(digits_mds, tmp_path, override, message):
    with pytest.raises(ConfigError) as e:
        build_trainer(load_config(UNIFORM, _tiny_overrides(digits_mds, tmp_path) + [override]))
    assert message in str(e.value)


def test_missing_dataset_is_a_clear_error(tmp_path):
    cfg = load_config(UNIFORM, [f'train_loader.local={tmp_path}/nowhere', 'prepare_data=false'])
    with pytest.raises(ConfigError, match='train_loader.local=.*recipes/convert_dataset.py'):
        build_trainer(cfg)


def test_includes_merge_and_cycles(tmp_path):
    (tmp_path / 'frag.yaml').write_text(yaml.safe_dump({'algorithms': {'ema': {'half_life': '10ba'}}, 'seed': 1}))
    (tmp_path / 'main.yaml').write_text(yaml.safe_dump({'includes': ['frag.yaml'], 'seed': 2}))
    cfg = load_config(str(tmp_path / 'main.yaml'))
    assert cfg == {'algorithms': {'ema': {'half_life': '10ba'}}, 'seed': 2}
    (tmp_path / 'a.yaml').write_text(yaml.safe_dump({'includes': ['b.yaml']}))
    (tmp_path / 'b.yaml').write_text(yaml.safe_dump({'includes': ['a.yaml']}))
    with pytest.raises(ConfigError, match='cycle'):
        load_config(str(tmp_path / 'a.yaml'))
    with pytest.raises(ConfigError, match='key=value'):
        load_config(str(tmp_path / 'main.yaml'), ['seed'])


def test_digits_shards_round_trip(digits_mds):
    ds = StreamingImageDataset(local=digits_mds, split='train', shuffle=False, batch_size=8, channels=1, image_size=8)
    reference = digits_images('train')
    assert len(ds) == len(reference) == 1437
    sample = ds[3]
    expected = np.asarray(reference[3][0], dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(sample['image'][0].numpy(), expected, atol=1e-6)
    assert sample['label'] == reference[3][1]
    assert sample['image'].min() >= -1 and sample['image'].max() <= 1


def test_wrong_image_size_is_a_clear_error(digits_mds):
    ds = StreamingImageDataset(local=digits_mds, split='val', shuffle=False, batch_size=8, image_size=32)
    with pytest.raises(ValueError, match='image_size=32'):
        ds[0]


def test_streaming_resume_mid_epoch_gives_the_same_batches(digits_mds):
    loader = digits_loader(digits_mds, batch_size=32, seed=3)
    batches = []
    for i, batch in enumerate(loader):
        batches.append(batch['image'])
        if i == 5:
            break
    # The state streaming would checkpoint after 3 batches (3 * 32 samples seen).
    state = loader.dataset.state_dict(num_samples=3 * 32, from_beginning=False)
    resumed_loader = digits_loader(digits_mds, batch_size=32, seed=3)
    resumed_loader.dataset.load_state_dict(state)
    resumed = [b['image'] for _, b in zip(range(3), resumed_loader)]
    for expected, got in zip(batches[3:6], resumed):
        torch.testing.assert_close(got, expected)


def test_image_folder_conversion(tmp_path):
    from PIL import Image

    for cls in ('cat', 'dog'):
        os.makedirs(tmp_path / 'src' / cls)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / 'src' / cls / f'{i}.png')
    images, count, classes = folder_images(str(tmp_path / 'src'), workers=2)
    assert count == 6 and classes == ['cat', 'dog']
    write_mds(images, str(tmp_path / 'mds'), progress=False)
    ds = StreamingImageDataset(local=str(tmp_path / 'mds'), shuffle=False, batch_size=2, channels=3)
    assert len(ds) == 6 and ds[5]['label'] == 1 and ds[5]['image'].shape == (3, 8, 8)
    with pytest.raises(ValueError, match='No images'):
        folder_images(str(tmp_path / 'mds'))

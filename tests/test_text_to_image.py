"""Text-to-image: a tiny CLIP loaded from a saved folder, captions in MDS, caption dropout, guidance, the recipe."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
from conftest import LossRecorder, make_trainer
from PIL import Image

from composer_algos.diffusion import NoiseSchedule
from composer_algos.diffusion.conditioning import (
    ClassLabelConditioner,
    Guidance,
    caption_drop_mask,
    check_guidance_scale,
)
from composer_algos.registry import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ['a handwritten seven', 'the digit 7', 'a handwritten one', 'the number two']


@pytest.fixture(scope='session')
def tiny_clip_dir(tmp_path_factory) -> str:
    """A CLIPTextModel from a CLIPTextConfig and a WordLevel tokenizer trained in memory, saved with
    save_pretrained (what a downloaded one looks like)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast

    folder = str(tmp_path_factory.mktemp('tiny_clip'))
    words = Tokenizer(models.WordLevel(unk_token='<unk>'))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(CAPTIONS, trainers.WordLevelTrainer(special_tokens=['<pad>', '<unk>', '<bos>', '<eos>']))
    bos, eos = words.token_to_id('<bos>'), words.token_to_id('<eos>')
    words.post_processor = processors.TemplateProcessing(
        single='<bos> $A <eos>', special_tokens=[('<bos>', bos), ('<eos>', eos)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=words,
        pad_token='<pad>',
        unk_token='<unk>',
        bos_token='<bos>',
        eos_token='<eos>',
        model_max_length=16,
    )
    torch.manual_seed(0)
    config = CLIPTextConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=bos,
        eos_token_id=eos,
    )
    CLIPTextModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope='session')
def captions_mds(tmp_path_factory) -> str:
    """``<dir>/{train,val}`` of the captioned digits and ``<dir>/text_encoder``, as ``prepare_data`` writes them."""
    from composer_algos.data.convert import convert_digits_captions

    root = str(tmp_path_factory.mktemp('digits_captions'))
    convert_digits_captions(root)
    return root


def text_conditioner(path: str, **kwargs):
    from composer_algos.diffusion.text_conditioning import TextConditioner

    return TextConditioner(path, local_files_only=True, **kwargs)


def text_model(path: str, seed: int = 17, **kwargs):
    """A DiffusionModel: a small UNet2DConditionModel cross-attending to the text encoder at ``path``."""
    from composer_algos.diffusion import DiffusionModel
    from composer_algos.diffusion.denoisers import build_unet_condition

    conditioner = text_conditioner(path, **kwargs)
    torch.manual_seed(seed)
    unet = build_unet_condition(
        block_out_channels=(16, 32), cross_attention_dim=conditioner.hidden_size, norm_num_groups=8
    )
    return DiffusionModel(unet, NoiseSchedule('linear', 100), seed=seed, conditioner=conditioner)


# ------------------------------------------------------------------------------------------------ the text encoder
def test_the_saved_clip_loads_back_and_pools_at_each_captions_end(tiny_clip_dir):
    from transformers import CLIPTextModel

    conditioner = text_conditioner(tiny_clip_dir)
    assert isinstance(conditioner.text_encoder, CLIPTextModel) and conditioner.max_length == 16
    assert not any(p.requires_grad for p in conditioner.text_encoder.parameters())
    out = conditioner.encode(['a handwritten seven', 'the digit'])
    ids = conditioner.tokenizer(['a handwritten seven', 'the digit'])['input_ids']
    assert [len(i) for i in ids] == [5, 4]  # <bos> and <eos> around the words
    assert out['hidden_states'].shape == (2, 16, 32)
    assert out['attention_mask'].sum(1).tolist() == [5, 4]
    # CLIP's pooled output is the hidden state at <eos>, not at position 0.
    torch.testing.assert_close(out['pooled'], out['hidden_states'][[0, 1], [4, 3]])


def test_a_missing_folder_is_one_line_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r'model.conditioner.pretrained_path=.*save_pretrained') as info:
        text_conditioner(str(tmp_path / 'absent'))
    assert '\n' not in str(info.value)


@pytest.mark.parametrize(
    'preset,keywords',
    [
        ('unet2d_condition', {'encoder_hidden_states', 'encoder_attention_mask'}),
        ('sd3', {'encoder_hidden_states', 'pooled_projections'}),
        ('pixart', {'encoder_hidden_states', 'encoder_attention_mask'}),
    ],
)
def test_each_preset_passes_diffusers_keyword_names(tiny_clip_dir, preset, keywords):
    conditioner = text_conditioner(tiny_clip_dir, preset=preset)
    assert set(conditioner({'caption': CAPTIONS[:2]})) == keywords


@pytest.mark.parametrize('name', ['unet_condition', 'sd3_transformer', 'pixart_transformer'])
def test_each_diffusers_denoiser_trains_on_the_text_keywords(tiny_clip_dir, name):
    from composer_algos.diffusion import DiffusionModel, FlowMatchingModel, denoisers

    preset = {'unet_condition': 'unet2d_condition', 'sd3_transformer': 'sd3', 'pixart_transformer': 'pixart'}[name]
    conditioner = text_conditioner(tiny_clip_dir, preset=preset, caption_drop_prob=0.5)
    small = dict(sample_size=8, in_channels=1, patch_size=2, num_layers=1, attention_head_dim=8, num_attention_heads=2)
    torch.manual_seed(0)
    if name == 'unet_condition':
        net = denoisers.build_unet_condition(block_out_channels=(16, 32), cross_attention_dim=32)
        model = DiffusionModel(net, NoiseSchedule('linear', 100), conditioner=conditioner)
    elif name == 'sd3_transformer':
        net = denoisers.build_sd3_transformer(joint_attention_dim=32, pooled_projection_dim=32, **small)
        model = FlowMatchingModel(net, conditioner=conditioner)
    else:
        net = denoisers.build_pixart_transformer(caption_channels=32, **small)
        model = DiffusionModel(net, NoiseSchedule('linear', 100), conditioner=conditioner)
    batch = {'image': torch.rand(4, 1, 8, 8) * 2 - 1, 'caption': CAPTIONS}
    loss = model.loss(model(batch), batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    samples = model.generate(2, (1, 8, 8), num_steps=2, prompts=CAPTIONS[:2], guidance_scale=3.0)
    assert samples.shape == (2, 1, 8, 8) and bool(torch.isfinite(samples).all())


def test_a_denoiser_without_the_keywords_is_refused_when_built(tiny_clip_dir):
    from composer_algos.diffusion import DiffusionModel, build_unet

    with pytest.raises(
        ConfigError, match=r'model.conditioner \(text\) passes encoder_hidden_states.*UNet2DModel'
    ) as info:
        DiffusionModel(
            build_unet(block_out_channels=(16, 32), norm_num_groups=8),
            NoiseSchedule('linear', 100),
            conditioner=text_conditioner(tiny_clip_dir),
        )
    assert '\n' not in str(info.value)


# ------------------------------------------------------------------------------------------------ captions in MDS
def test_the_captioned_digits_read_back_through_streaming(captions_mds):
    from streaming import StreamingDataset

    from composer_algos.data.convert import digit_caption
    from conftest import digits_loader

    batch = next(iter(digits_loader(os.path.join(captions_mds), batch_size=16, shuffle=False)))
    assert batch['caption'] == [digit_caption(int(label), i) for i, label in enumerate(batch['label'])]
    raw = StreamingDataset(local=os.path.join(captions_mds, 'val'), batch_size=1)
    offset = 1797 - raw.num_samples
    assert [raw[i]['caption'] for i in range(5)] == [digit_caption(raw[i]['label'], offset + i) for i in range(5)]
    assert len({digit_caption(7, i) for i in range(60)}) > 3  # several phrasings per digit
    assert os.path.isfile(os.path.join(captions_mds, 'text_encoder', 'config.json'))


def test_an_image_folder_with_sidecars_and_a_jsonl_writes_its_captions(tmp_path):
    from streaming import StreamingDataset

    from composer_algos.data.convert import write_folder_mds

    src = tmp_path / 'src'
    src.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(src / f'img{i}.png')
    (src / 'img0.txt').write_text('a red square\n')
    (src / 'img1.txt').write_text('a blue square')
    (src / 'captions.jsonl').write_text(
        '\n'.join(json.dumps({'file': f'img{i}.png', 'caption': f'jsonl {i}'}) for i in (1, 2, 3))
    )
    write_folder_mds(str(src), str(tmp_path / 'out'), processes=1, captions=True, progress=False)
    dataset = StreamingDataset(local=str(tmp_path / 'out'), batch_size=1, shuffle=False)
    # The sidecar wins over the jsonl line.
    assert [dataset[i]['caption'] for i in range(4)] == ['a red square', 'a blue square', 'jsonl 2', 'jsonl 3']
    (src / 'captions.jsonl').unlink()
    with pytest.raises(ValueError, match=r'img2.png has no caption: write it to .*img2.txt'):
        write_folder_mds(str(src), str(tmp_path / 'out2'), processes=1, captions=True, progress=False)


def test_stored_text_embeddings_condition_like_the_encoder(tiny_clip_dir, tmp_path):
    from composer_algos.data import build_streaming_image_dataloader
    from composer_algos.data.convert import digits_caption_images, write_mds

    encoder = text_conditioner(tiny_clip_dir)
    samples = [(image, label, CAPTIONS[i % 4]) for i, (image, label, _) in enumerate(digits_caption_images('val')[:16])]
    write_mds(samples, str(tmp_path / 'val'), progress=False, captions=True, caption_encoder=encoder)
    loader = build_streaming_image_dataloader(
        global_batch_size=8,
        local=str(tmp_path),
        split='val',
        shuffle=False,
        channels=1,
        image_size=8,
        caption_embeddings=True,
    )
    batch = next(iter(loader))
    stored = text_conditioner(tiny_clip_dir, precomputed=True)(batch)
    encoded = encoder(batch)
    assert set(stored) == set(encoded) == {'encoder_hidden_states', 'encoder_attention_mask'}
    torch.testing.assert_close(
        stored['encoder_hidden_states'], encoded['encoder_hidden_states'], atol=2e-3, rtol=2e-3
    )  # stored as float16
    assert torch.equal(stored['encoder_attention_mask'].long(), encoded['encoder_attention_mask'].long())


# ------------------------------------------------------------------------------------------------ caption dropout
def test_caption_dropout_is_keyed_by_the_draw():
    a, b = caption_drop_mask(17, 5, 64, 0.25), caption_drop_mask(17, 5, 64, 0.25)
    assert torch.equal(a, b) and not torch.equal(a, caption_drop_mask(17, 6, 64, 0.25))
    rate = float(torch.cat([caption_drop_mask(17, i, 64, 0.25) for i in range(50)]).double().mean())
    assert abs(rate - 0.25) < 0.03
    assert not caption_drop_mask(17, 5, 64, 0.0).any()


def test_a_dropped_sample_trains_on_the_empty_caption(tiny_clip_dir):
    model = text_model(tiny_clip_dir, caption_drop_prob=0.5)
    model.train()
    batch = {'image': torch.zeros(8, 1, 8, 8), 'caption': ['a handwritten seven'] * 8}
    record = model(batch)['draw']
    hidden = record.conditioning['encoder_hidden_states']
    empty = model.conditioner.encode([''])['hidden_states'][0]
    full = model.conditioner.encode(['a handwritten seven'])['hidden_states'][0]
    dropped = torch.tensor([torch.allclose(h, empty) for h in hidden])
    assert 0 < int(dropped.sum()) < 8
    assert all(torch.allclose(h, full) for h in hidden[~dropped])
    # Evaluation and the contract's conditioning never drop.
    assert torch.allclose(model.conditioning(batch)['encoder_hidden_states'], full.expand(8, -1, -1))


def test_text_training_with_caption_dropout_resumes_exactly(tiny_clip_dir, captions_mds, tmp_path):
    """A trained encoder and dropout keyed by the draw: the resumed run repeats the uninterrupted one's losses."""
    save = str(tmp_path / 'ckpt')
    full = LossRecorder()
    make_trainer(
        captions_mds,
        max_duration='4ba',
        batch_size=16,
        callbacks=[full],
        save_folder=save,
        save_interval='2ba',
        save_filename='ba{batch}.pt',
        model=text_model(tiny_clip_dir, trainable=True, caption_drop_prob=0.3),
    ).fit()
    resumed = LossRecorder()
    make_trainer(
        captions_mds,
        max_duration='4ba',
        batch_size=16,
        callbacks=[resumed],
        load_path=f'{save}/ba2.pt',
        model=text_model(tiny_clip_dir, seed=99, trainable=True, caption_drop_prob=0.3),
    ).fit()
    assert len(full.losses) == 4 and resumed.losses == full.losses[2:]


# ------------------------------------------------------------------------------------------------ guidance
def test_guidance_combines_the_two_predictions():
    """Ho & Salimans 2022: uncond + s (cond - uncond), from one call on both halves."""
    calls = []

    def denoise(x, t, cond):
        calls.append(x.shape[0])
        return x * 0 + cond['c'][:, None, None, None]

    x, t = torch.zeros(3, 1, 2, 2), torch.zeros(3, dtype=torch.long)
    guided = Guidance({'c': torch.tensor([1.0, 2.0, 3.0])}, {'c': torch.zeros(3)}, 3.0)(denoise, x, t)
    torch.testing.assert_close(guided[:, 0, 0, 0], torch.tensor([3.0, 6.0, 9.0]))
    assert calls == [6]
    plain = Guidance({'c': torch.tensor([1.0, 2.0, 3.0])}, {'c': torch.zeros(3)}, 1.0)(denoise, x, t)
    torch.testing.assert_close(plain[:, 0, 0, 0], torch.tensor([1.0, 2.0, 3.0]))
    assert calls == [6, 3]


def test_guidance_needs_an_unconditional_input():
    with pytest.raises(
        ConfigError,
        match=r'guidance_scale=3.0 needs a model with an unconditional input.*set '
        r'guidance_scale=1',
    ):
        check_guidance_scale(3.0, ClassLabelConditioner())
    with pytest.raises(ConfigError, match='at least 1'):
        check_guidance_scale(0.5, None)


def test_guided_sampling_from_prompts_is_seeded(tiny_clip_dir):
    model = text_model(tiny_clip_dir, caption_drop_prob=0.1).eval()
    a = model.generate(4, (1, 8, 8), num_steps=3, seed=1, prompts=CAPTIONS, guidance_scale=3.0)
    b = model.generate(4, (1, 8, 8), num_steps=3, seed=1, prompts=CAPTIONS, guidance_scale=3.0)
    c = model.generate(4, (1, 8, 8), num_steps=3, seed=1, prompts=CAPTIONS, guidance_scale=1.0)
    assert torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ValueError, match='give prompts'):
        model.generate(4, (1, 8, 8), num_steps=3)


# ------------------------------------------------------------------------------------------------ the recipe
def test_the_t2i_recipe_trains_on_its_captioned_digits_and_scores_prompts(captions_mds, tmp_path):
    from composer_algos.callbacks.prompt_accuracy import PromptAccuracy
    from composer_algos.config import build_trainer, load_config

    cfg = load_config(
        os.path.join(ROOT, 'yamls', 'digits', 't2i_uniform.yaml'),
        [
            f'train_loader.local={captions_mds}',
            f'eval_loader.local={captions_mds}',
            f'model.conditioner.pretrained_path={captions_mds}/text_encoder',
            'max_duration=3ba',
            'eval_interval=3ba',
            'progress_bar=false',
            'save_folder=null',
            'train_loader.global_batch_size=16',
            'prepare_data=false',
            f'run_name={tmp_path.name}',
            'loggers={}',
        ],
    )
    cfg['callbacks'] = {
        'prompt_accuracy': {'num_samples': 20, 'num_steps': 2, 'guidance_scales': [1.0, 3.0], 'folder': str(tmp_path)},
        'sample_grid': {
            'num_samples': 4,
            'num_steps': 2,
            'guidance_scale': 3.0,
            'prompts': ['a handwritten one', 'the digit 7'],
            'folder': str(tmp_path),
        },
    }
    trainer = build_trainer(cfg)
    model = trainer.state.model
    assert model.conditioner.kind == 'text' and model.conditioner.trainable
    assert type(model.denoiser).__name__ == 'UNet2DConditionModel'
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3 and torch.isfinite(trainer.state.loss)
    scorer = next(c for c in trainer.state.callbacks if isinstance(c, PromptAccuracy))
    assert scorer.steps == [3] and set(scorer.values) == {1.0, 3.0}
    assert all(0.0 <= v[0] <= 1.0 for v in scorer.values.values())


T2I_RECIPES = sorted(glob.glob(os.path.join(ROOT, 'yamls', '*', 't2i_*.yaml')))


def _t2i_cpu_config(recipe, captions_mds, tiny_clip_dir, tiny_vae_dir, keep_fsdp=False):
    """A t2i recipe as written, on the captioned digits for 2 steps on the CPU; the 256px ones with a tiny VAE, UNet
    and CLIP of random weights (their FSDP settings kept with ``keep_fsdp``)."""
    from composer_algos.config import load_config

    cfg = load_config(recipe)
    model, conditioner = cfg['model'], cfg['model']['conditioner']
    assert conditioner['name'] == 'text' and conditioner['caption_drop_prob'] > 0
    assert model['denoiser']['name'] == 'unet_condition'
    if 'latent256' in recipe:
        fsdp = cfg['parallelism_config']['fsdp'] if keep_fsdp else cfg.pop('parallelism_config')['fsdp']
        assert fsdp['state_dict_type'] == 'sharded' and cfg['precision'] == 'amp_bf16'
        assert model['encoder']['name'] == 'vae' and not conditioner.get('trainable', False)
        assert model['denoiser']['cross_attention_dim'] == 768
        cfg.update(device='cpu', precision='fp32', device_train_microbatch_size=4, autoresume=False)
        model['denoiser'] = {
            'name': 'unet_condition',
            'sample_size': 8,
            'in_channels': 4,
            'block_out_channels': [16, 32],
            'cross_attention_dim': 32,
            'norm_num_groups': 8,
        }
        model['encoder']['pretrained_path'] = tiny_vae_dir
        conditioner.update(pretrained_path=tiny_clip_dir, max_length=16)
    else:
        assert conditioner['trainable'] is True and cfg['prepare_data'] == 'digits_captions'
        conditioner['pretrained_path'] = os.path.join(captions_mds, 'text_encoder')
        cfg['prepare_data'] = False
    model['noise_schedule']['num_timesteps'] = 100
    for key in ('train_loader', 'eval_loader'):
        cfg[key].update(remote=None, local=captions_mds, num_workers=0, global_batch_size=8, image_size=8)
    if 'adaptive_timestep_sampling' in cfg.get('algorithms', {}):
        cfg['algorithms']['adaptive_timestep_sampling'].update(update_every=1, num_probe_timesteps=6)
    cfg.update(
        max_duration='2ba',
        eval_interval='2ba',
        eval_subset_num_batches=1,
        progress_bar=False,
        log_to_console=False,
        save_folder=None,
        loggers={},
        callbacks={'loss_bands': {}},
    )
    cfg.pop('scheduler', None)
    return cfg


@pytest.mark.parametrize('recipe', T2I_RECIPES, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, 'yamls')))
def test_each_t2i_recipe_resolves_to_a_trainer_and_trains(
    recipe, captions_mds, tiny_clip_dir, tiny_vae_dir, tmp_path, monkeypatch
):
    """Digits recipes as written on the captioned digits; the 256px ones with a tiny VAE, UNet and CLIP of random
    weights, on CPU without FSDP; 2 steps each."""
    from diffusers import UNet2DConditionModel

    from composer_algos.config import build_trainer

    monkeypatch.chdir(tmp_path)
    trainer = build_trainer(_t2i_cpu_config(recipe, captions_mds, tiny_clip_dir, tiny_vae_dir))
    assert isinstance(trainer.state.model.denoiser, UNet2DConditionModel)
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2 and torch.isfinite(trainer.state.loss)


@pytest.mark.parametrize(
    'recipe',
    [r for r in T2I_RECIPES if 'latent256' in r],
    ids=lambda p: os.path.relpath(p, os.path.join(ROOT, 'yamls')),
)
def test_the_latent_t2i_recipes_train_under_their_fsdp2_settings(
    recipe, captions_mds, tiny_clip_dir, tiny_vae_dir, tmp_path, monkeypatch
):
    """Their FSDP2 settings (one rank, in this process): the UNet sharded block by block, the frozen VAE and text
    encoder whole, 2 steps."""
    from distributed_run import sharding_report

    from composer_algos.config import build_trainer

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv('FSDP_VERSION', '2')
    trainer = build_trainer(_t2i_cpu_config(recipe, captions_mds, tiny_clip_dir, tiny_vae_dir, keep_fsdp=True))
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 2 and torch.isfinite(trainer.state.loss)
    sharding = sharding_report(trainer.state.model)
    assert 'denoiser' in sharding['fsdp_units'] and len(sharding['fsdp_units']) > 1, sharding['fsdp_units']
    assert all(unit == 'denoiser' or unit.startswith('denoiser.') for unit in sharding['fsdp_units'])
    params = sharding['params']
    assert all(is_dtensor for name, (_, _, is_dtensor) in params.items() if name.startswith('denoiser.'))
    frozen = [is_dtensor for name, (_, _, is_dtensor) in params.items() if not name.startswith('denoiser.')]
    assert frozen and not any(frozen)


# ------------------------------------------------------------------------------------------------ every algorithm
def conv_text_model(path: str, objective: str, seed: int = 17):
    """A small conv denoiser that takes the text (its masked mean), DDPM or flow matching, with caption dropout."""
    from composer_algos.diffusion import DiffusionModel, FlowMatchingModel, FlowSchedule, TimeConditionedConvNet

    conditioner = text_conditioner(path, trainable=True, caption_drop_prob=0.2)
    torch.manual_seed(seed)
    net = TimeConditionedConvNet(in_channels=1, width=16, context_dim=conditioner.hidden_size)
    if objective == 'flow_matching':
        return FlowMatchingModel(net, FlowSchedule(num_cells=100), seed=seed, conditioner=conditioner)
    return DiffusionModel(net, NoiseSchedule('linear', 100), seed=seed, conditioner=conditioner)


def _algorithm_cases():
    from composer_algos.algorithms.base import DiffusionAlgorithm
    from composer_algos.registry import algorithms

    classes = {
        name: kind
        for name, kind in algorithms.get_all().items()
        if isinstance(kind, type) and issubclass(kind, DiffusionAlgorithm)
    }
    return [
        (name, objective)
        for name, kind in sorted(classes.items())
        for objective in ('ddpm', 'flow_matching')
        if objective in kind.objectives
    ]


@pytest.mark.parametrize('name,objective', _algorithm_cases())
def test_every_algorithm_trains_the_text_conditioned_model(name, objective, tiny_clip_dir, captions_mds):
    from composer_algos.registry import algorithms

    kind = algorithms.get(name)
    algorithm = kind(update_every=1, num_probe_timesteps=6) if name == 'adaptive_timestep_sampling' else kind()
    model = conv_text_model(tiny_clip_dir, objective)
    trainer = make_trainer(captions_mds, [algorithm], max_duration='2ba', batch_size=16, model=model)
    trainer.fit()
    assert torch.isfinite(trainer.state.loss)


@pytest.mark.parametrize('objective', ['ddpm', 'flow_matching'])
def test_adaptive_curriculum_and_momentum_decay_resume_exactly_on_text(
    objective, tiny_clip_dir, captions_mds, tmp_path
):
    from composer_algos.algorithms import AdaptiveTimestepSampling, CurriculumTimestepSchedule, MomentumDecay

    def algorithms():
        return [
            AdaptiveTimestepSampling(update_every=1, num_probe_timesteps=6),
            CurriculumTimestepSchedule(),
            MomentumDecay(),
        ]

    save = str(tmp_path / 'ckpt')
    full = LossRecorder()
    make_trainer(
        captions_mds,
        algorithms(),
        max_duration='4ba',
        batch_size=16,
        callbacks=[full],
        save_folder=save,
        save_interval='2ba',
        save_filename='ba{batch}.pt',
        model=conv_text_model(tiny_clip_dir, objective),
    ).fit()
    resumed = LossRecorder()
    make_trainer(
        captions_mds,
        algorithms(),
        max_duration='4ba',
        batch_size=16,
        callbacks=[resumed],
        load_path=f'{save}/ba2.pt',
        model=conv_text_model(tiny_clip_dir, objective, seed=99),
    ).fit()
    assert len(full.losses) == 4 and resumed.losses == full.losses[2:]


# ------------------------------------------------------------------------------------------------ evaluation
class AlwaysSeven(torch.nn.Module):
    """A classifier that answers 7 whatever the image: prompt accuracy is then the share of prompts naming 7."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(10))

    def forward(self, images):
        return torch.nn.functional.one_hot(torch.full((images.shape[0],), 7), 10).float() + self.bias


def test_prompt_accuracy_scores_each_sample_against_its_prompts_class(captions_mds, tiny_clip_dir, tmp_path):
    from composer_algos.callbacks.prompt_accuracy import PromptAccuracy
    from composer_algos.data.convert import digit_prompts

    prompts, labels = digit_prompts()
    assert len(prompts) == 60 and labels[:10] == list(range(10)) and prompts[7] == 'a handwritten seven'
    scorer = PromptAccuracy(
        num_samples=40,
        num_steps=2,
        guidance_scales=[1.0, 3.0],
        classifier=AlwaysSeven(),
        interval='2ba',
        folder=str(tmp_path),
    )
    assert scorer.targets(12).tolist() == list(range(10)) + [0, 1]
    model = conv_text_model(tiny_clip_dir, 'ddpm')
    make_trainer(captions_mds, max_duration='2ba', batch_size=16, model=model, callbacks=[scorer]).fit()
    assert scorer.steps == [2] and scorer.values == {1.0: [0.1], 3.0: [0.1]}
    again = PromptAccuracy(guidance_scales=[1.0, 3.0])
    again.load_state_dict(scorer.state_dict())
    assert again.values == scorer.values and again.steps == [2]


def test_prompt_accuracy_refuses_a_model_without_text(digits_mds, tmp_path):
    from composer_algos.callbacks.prompt_accuracy import PromptAccuracy

    with pytest.raises(ConfigError, match=r'callbacks.prompt_accuracy .*conditioned on nothing.*model.conditioner'):
        make_trainer(
            digits_mds, max_duration='1ba', callbacks=[PromptAccuracy(interval='1ba', folder=str(tmp_path))]
        ).fit()


@pytest.fixture(scope='session')
def tiny_full_clip_dir(tmp_path_factory) -> str:
    """A CLIPModel (text and vision) and its CLIPProcessor with random weights, saved like a downloaded one: a BPE
    tokenizer of single characters (no merges) and an image processor at 32 pixels."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTextConfig,
        CLIPTokenizer,
        CLIPVisionConfig,
    )
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    folder = tmp_path_factory.mktemp('tiny_full_clip')
    chars = list(bytes_to_unicode().values())
    vocab = {
        token: i for i, token in enumerate(chars + [c + '</w>' for c in chars] + ['<|startoftext|>', '<|endoftext|>'])
    }
    (folder / 'vocab.json').write_text(json.dumps(vocab))
    (folder / 'merges.txt').write_text('#version: 0.2\n')
    tokenizer = CLIPTokenizer(str(folder / 'vocab.json'), str(folder / 'merges.txt'), model_max_length=32)
    images = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    torch.manual_seed(0)
    text = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        eos_token_id=vocab['<|endoftext|>'],
        bos_token_id=vocab['<|startoftext|>'],
        pad_token_id=vocab['<|endoftext|>'],
    )
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
    )
    config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16)
    CLIPModel(config).save_pretrained(str(folder))
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(str(folder))
    return str(folder)


def test_clip_score_reads_a_local_clip_through_torchmetrics_callable_form(tiny_full_clip_dir, tmp_path):
    from composer_algos.evaluation.conditioning import clip_score, load_clip_score_model

    images = torch.rand(3, 1, 8, 8) * 2 - 1
    score = clip_score(images, ['a handwritten seven', 'the digit 1', 'two'], tiny_full_clip_dir)
    assert 0.0 <= score <= 100.0
    assert score == clip_score(images, ['a handwritten seven', 'the digit 1', 'two'], tiny_full_clip_dir)
    with pytest.raises(ConfigError, match=r'clip_score_model=.*save_pretrained'):
        load_clip_score_model(str(tmp_path / 'absent'))

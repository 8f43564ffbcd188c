"""Schedule-free AdamW: the switch against the package's, checked arguments from YAML, which weights each part of a
run sees, the refusal of momentum decay, and exact resume on 1 and 2 ranks."""

import copy
import os

import pytest
import torch
from composer import Trainer
from composer.algorithms.warnings import NoEffectWarning
from composer.core import Callback
from conftest import LossRecorder, digits_loader, tiny_model
from schedulefree import AdamWScheduleFree

from composer_algos.algorithms.ema import WarmupEMA, warmup_smoothing
from composer_algos.algorithms.momentum_decay import MomentumDecay
from composer_algos.algorithms.schedule_free import ScheduleFree, schedulefree_adamw, to_eval_weights, to_train_weights
from composer_algos.config import ConfigError, build_optimizer, build_trainer, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETA1 = 0.9


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).clone() for t in tensors])


def _stepped_optimizer(steps: int = 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optimizer = schedulefree_adamw(model.parameters(), lr=0.1, betas=(BETA1, 0.99), warmup_steps=2)
    optimizer.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(16, 4)).pow(2).mean().backward()
        optimizer.step()
    return model, optimizer


def test_the_switch_is_the_packages_and_creates_no_empty_state():
    model, optimizer = _stepped_optimizer()
    twin_model = copy.deepcopy(model)
    twin = schedulefree_adamw(twin_model.parameters(), lr=0.1, betas=(BETA1, 0.99))
    twin.load_state_dict(optimizer.state_dict())
    y = _flat(model.parameters())

    assert to_eval_weights(optimizer) and not to_eval_weights(optimizer)  # the second is a no-op
    twin.eval()
    x = _flat(model.parameters())
    assert torch.equal(x, _flat(twin_model.parameters()))
    assert (x - y).abs().max() > 1e-3  # x and y really differ after 3 steps
    assert to_train_weights(optimizer) and not to_train_weights(optimizer)
    twin.train()
    assert torch.equal(_flat(model.parameters()), _flat(twin_model.parameters()))
    torch.testing.assert_close(_flat(model.parameters()), y)  # back at y, up to rounding

    # A fresh optimizer: only the mode changes. The package's train() leaves an empty state entry per parameter,
    # after which torch.distributed.checkpoint cannot load a full optimizer state dict into it.
    fresh = schedulefree_adamw(torch.nn.Linear(2, 2).parameters())
    assert to_train_weights(fresh) and fresh.param_groups[0]['train_mode'] and len(fresh.state) == 0
    package = schedulefree_adamw(torch.nn.Linear(2, 2).parameters())
    package.train()
    assert len(package.state) == 2


@pytest.mark.parametrize(
    'kwargs, message',
    [
        ({'betas': (0.0, 0.999)}, r'betas\[0\] \(beta1\) must be in \(0, 1\]'),
        ({'betas': (0.9, 1.0)}, r'betas\[1\] \(beta2\) must be in \[0, 1\)'),
        ({'lr': -1e-3}, 'lr must be non-negative'),
        ({'warmup_steps': 2.5}, 'warmup_steps must be a non-negative whole number'),
        ({'weight_decay': -0.1}, 'weight_decay must be non-negative'),
    ],
)
def test_schedulefree_adamw_checks_its_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        schedulefree_adamw(torch.nn.Linear(2, 2).parameters(), **kwargs)


def test_yaml_builds_the_optimizer_and_a_bad_argument_is_one_line():
    model = tiny_model()
    optimizer = build_optimizer(
        {'name': 'schedulefree_adamw', 'lr': 1e-3, 'betas': [0.95, 0.99], 'warmup_steps': 10}, model
    )
    assert isinstance(optimizer, AdamWScheduleFree)
    group = optimizer.param_groups[0]
    assert (group['lr'], group['betas'], group['warmup_steps']) == (1e-3, (0.95, 0.99), 10)
    for cfg, message in [
        ({'warmup': 10}, "Unknown key 'optimizer.warmup'. Did you mean 'optimizer.warmup_steps'?"),
        ({'warmup_steps': 'ten'}, 'optimizer.warmup_steps=ten: expected'),
        ({'betas': [0.0, 0.999]}, 'betas[0] (beta1) must be in (0, 1]'),
    ]:
        with pytest.raises(ConfigError) as error:
            build_optimizer({'name': 'schedulefree_adamw', **cfg}, model)
        assert message in str(error.value) and '\n' not in str(error.value), str(error.value)


def _trainer(root, algorithms, callbacks=(), model=None, max_duration='6ba', **kwargs) -> Trainer:
    model = model if model is not None else tiny_model()
    optimizer = schedulefree_adamw(model.parameters(), lr=1e-2, betas=(BETA1, 0.999), warmup_steps=2)
    return Trainer(
        model=model,
        train_dataloader=digits_loader(root, 16),
        optimizers=optimizer,
        algorithms=algorithms,
        callbacks=list(callbacks),
        max_duration=max_duration,
        device='cpu',
        precision='fp32',
        seed=17,
        progress_bar=False,
        log_to_console=False,
        **kwargs,
    )


class WeightsSeen(Callback):
    """Records the model's weights around each optimizer step, in every denoiser forward, at ``BATCH_END`` and at
    ``BATCH_CHECKPOINT``, and ``z`` after each step. Its step hooks are registered at ``INIT``, before the
    algorithm's (at ``FIT_START``), so they run first: before the switch to ``y`` and before the switch to ``x``."""

    def __init__(self):
        self.before_step, self.after_step, self.z = [], [], []
        self.training_forwards, self.sampling_forwards = [], []
        self.at_batch_end, self.at_checkpoint = {}, {}

    def init(self, state, logger):
        params = list(state.model.parameters())
        optimizer = state.optimizers[0]
        optimizer.register_step_pre_hook(
            lambda *_: self.before_step.append(
                (_flat(params), _flat(optimizer.state[p]['z'] for p in params) if optimizer.state else None)
            )
        )
        optimizer.register_step_post_hook(
            lambda *_: (
                self.after_step.append(_flat(params)),
                self.z.append(_flat(optimizer.state[p]['z'] for p in params)),
            )
        )
        state.model.denoiser.register_forward_pre_hook(
            lambda module, args: (self.training_forwards if module.training else self.sampling_forwards).append(
                (int(state.timestamp.batch), _flat(params))
            )
        )

    def batch_end(self, state, logger):
        self.at_batch_end[int(state.timestamp.batch)] = _flat(state.model.parameters())

    def batch_checkpoint(self, state, logger):
        self.at_checkpoint[int(state.timestamp.batch)] = _flat(state.model.parameters())


def _x(y: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.lerp(y, z, 1 - 1 / BETA1)


def _y(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.lerp(x, z, 1 - BETA1)


def test_training_sees_y_and_everything_after_the_step_sees_x(digits_mds, tmp_path):
    from composer_algos.callbacks.fid import FID

    seen = WeightsSeen()
    fid = FID(
        num_samples=4,
        num_steps=2,
        batch_size=4,
        interval='2ba',
        use_ema=False,
        classifier_cache_dir=str(tmp_path / 'cache'),
        real_loader={
            'local': digits_mds,
            'split': 'val',
            'global_batch_size': 64,
            'channels': 1,
            'image_size': 8,
            'shuffle': False,
        },
    )
    trainer = _trainer(
        digits_mds,
        [ScheduleFree()],
        [seen, fid],
        save_folder=str(tmp_path / 'ckpt'),
        save_interval='2ba',
        save_filename='ba{batch}.pt',
    )
    trainer.fit()
    assert len(seen.before_step) == len(seen.after_step) == len(seen.training_forwards) == 6

    for step in range(6):
        x_before, z_before = seen.before_step[step]
        forward_step, forward_weights = seen.training_forwards[step]
        assert forward_step == step
        # The forward sees y: x before the first step (no z yet: x = y), else y recomputed from x and z.
        expected_y = x_before if z_before is None else _y(x_before, z_before)
        assert torch.equal(forward_weights, expected_y), step
        # After the step, BATCH_END sees x of the step's y and z, and x is not y.
        x_after = seen.at_batch_end[step + 1]
        assert torch.equal(x_after, _x(seen.after_step[step], seen.z[step])), step
        if step > 0:  # the first step averages nothing yet (c_1 = 1): x_1 = z_1 = y_1
            assert (x_after - seen.after_step[step]).abs().max() > 1e-4, step
        if step + 1 < 6:
            assert torch.equal(seen.before_step[step + 1][0], x_after)  # x stays in until the next step

    # FID sampled x at steps 2, 4 and 6 (2 DDIM steps each), and logged a finite value each time.
    assert sorted({step for step, _ in seen.sampling_forwards}) == [2, 4, 6]
    for step, weights in seen.sampling_forwards:
        assert torch.equal(weights, seen.at_batch_end[step]), step
    assert fid.steps == [2, 4, 6] and all(torch.isfinite(torch.tensor(fid.values)))
    # Checkpoints hold x, as the model had it at BATCH_CHECKPOINT, and the optimizer in eval mode.
    for step in (2, 4, 6):
        assert torch.equal(seen.at_checkpoint[step], seen.at_batch_end[step])
        saved = torch.load(tmp_path / 'ckpt' / f'ba{step}.pt', weights_only=False)['state']
        names = [name for name, _ in trainer.state.model.named_parameters()]
        assert torch.equal(_flat(saved['model'][name] for name in names), seen.at_batch_end[step])
        groups = saved['optimizers']['AdamWScheduleFree']['param_groups']
        assert [g['train_mode'] for g in groups] == [False] and groups[0]['k'] == step
    # After fit the model holds x.
    assert torch.equal(_flat(trainer.state.model.parameters()), seen.at_batch_end[6])


def test_ema_averages_x_whatever_the_order_of_the_algorithms(digits_mds):
    seen = WeightsSeen()
    ema = WarmupEMA(half_life='4ba')
    # The EMA listed first: it runs before ScheduleFree at BATCH_END; the step's post-hook has put x in already.
    _trainer(digits_mds, [ema, ScheduleFree()], [seen]).fit()
    # Composer's EMA starts at the first BATCH_END from the model as it is then: x after the first step.
    average = seen.at_batch_end[1]
    for step in range(6):
        average = torch.lerp(average, seen.at_batch_end[step + 1], 1 - warmup_smoothing(ema.target_smoothing, step))
    averaged = _flat(ema.ema_model.named_parameters_dict.values())
    torch.testing.assert_close(averaged, average, rtol=1e-6, atol=1e-7)
    # An average of y would be far from it.
    average_of_y = seen.after_step[0]
    for step in range(6):
        average_of_y = torch.lerp(average_of_y, seen.after_step[step], 1 - warmup_smoothing(ema.target_smoothing, step))
    assert (averaged - average_of_y).abs().max() > 1e-3


def test_momentum_decay_is_refused(digits_mds):
    with pytest.raises(ConfigError, match='MomentumDecay does not apply to AdamWScheduleFree: .*not a momentum'):
        _trainer(digits_mds, [ScheduleFree(), MomentumDecay(beta_end=0.5)])
    # From YAML the algorithm comes with the optimizer, and so does the refusal; the message is one line.
    cfg = load_config(
        os.path.join(ROOT, 'yamls', 'digits', 'md.yaml'),
        [
            f'train_loader.local={digits_mds}',
            'eval_loader=null',
            'callbacks=null',
            'loggers=null',
            'save_folder=null',
            'optimizer.name=schedulefree_adamw',
            'scheduler=null',
        ],
    )
    cfg['model']['denoiser'] = {'name': 'conv', 'width': 8}
    with pytest.raises(ConfigError) as error:
        build_trainer(cfg)
    assert 'MomentumDecay does not apply to AdamWScheduleFree' in str(error.value) and '\n' not in str(error.value)


def test_a_recipe_gets_the_algorithm_with_the_optimizer_and_nothing_else_does(digits_mds, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    overrides = [
        f'train_loader.local={digits_mds}',
        'eval_loader=null',
        'callbacks=null',
        'loggers=null',
        'save_folder=null',
        'max_duration=2ba',
        'progress_bar=false',
        'scheduler=null',
    ]
    cfg = load_config(
        os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml'),
        overrides + ['optimizer.name=schedulefree_adamw', 'optimizer.warmup_steps=1'],
    )
    cfg['model']['denoiser'] = {'name': 'conv', 'width': 8}
    trainer = build_trainer(cfg)
    assert [type(a).__name__ for a in trainer.state.algorithms] == ['ScheduleFree', 'WarmupEMA']
    trainer.fit()
    assert trainer.state.optimizers[0].param_groups[0]['k'] == 2
    assert not trainer.state.optimizers[0].param_groups[0]['train_mode']
    cfg = load_config(os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml'), overrides)
    cfg['model']['denoiser'] = {'name': 'conv', 'width': 8}
    assert [type(a).__name__ for a in build_trainer(cfg).state.algorithms] == ['WarmupEMA']
    model = tiny_model()
    with pytest.warns(NoEffectWarning, match='no schedule-free optimizer'):
        Trainer(
            model=model,
            train_dataloader=digits_loader(digits_mds, 16),
            max_duration='1ba',
            optimizers=torch.optim.Adam(model.parameters()),
            algorithms=[ScheduleFree()],
            device='cpu',
        )


def test_the_mnist_recipe_as_written():
    cfg = load_config(os.path.join(ROOT, 'yamls', 'mnist', 'schedulefree.yaml'))
    uniform = load_config(os.path.join(ROOT, 'yamls', 'mnist', 'uniform.yaml'))
    assert cfg['optimizer'] == {
        'name': 'schedulefree_adamw',
        'lr': 2.5e-3,
        'betas': [0.9, 0.999],
        'weight_decay': 0.0,
        'warmup_steps': 140,
    }
    assert cfg['scheduler'] is None and set(cfg['algorithms']) == {'ema', 'schedule_free'}
    differs = {key for key in set(cfg) | set(uniform) if cfg.get(key) != uniform.get(key)}
    assert differs == {'run_name', 'optimizer', 'scheduler', 'algorithms'}


def test_resume_is_exact_and_saving_changes_nothing(digits_mds, tmp_path):
    def run(**kwargs):
        recorder = LossRecorder()
        trainer = _trainer(
            digits_mds, [WarmupEMA(half_life='2ba'), ScheduleFree()], [recorder], max_duration='8ba', **kwargs
        )
        trainer.fit()
        return trainer, recorder.losses

    def x_and_ema(trainer):
        """x and the EMA of x, wherever each is: at a checkpoint Composer's EMA swaps its weights into the model."""
        ema = next(a for a in trainer.state.algorithms if isinstance(a, WarmupEMA))
        model, stored = _flat(trainer.state.model.parameters()), _flat(ema.ema_model.named_parameters_dict.values())
        return (stored, model) if ema.ema_weights_active else (model, stored)

    plain, plain_losses = run()
    full, full_losses = run(save_folder=str(tmp_path / 'ckpt'), save_interval='4ba', save_filename='ba{batch}.pt')
    # A new model with another seed: everything must come from the checkpoint (which holds the EMA's weights in the
    # model, x in the EMA, z and the step counters in the optimizer).
    resumed, resumed_losses = run(
        model=tiny_model(seed=99),
        load_path=str(tmp_path / 'ckpt' / 'ba4.pt'),
        save_folder=str(tmp_path / 'resumed'),
        save_interval='4ba',
    )
    assert len(full_losses) == 8 and plain_losses == full_losses
    assert resumed_losses == full_losses[4:]
    for x, ema in (x_and_ema(plain), x_and_ema(resumed)):
        assert torch.equal(x, x_and_ema(full)[0]) and torch.equal(ema, x_and_ema(full)[1])
    for a, b in zip(full.state.optimizers[0].state.values(), resumed.state.optimizers[0].state.values()):
        assert torch.equal(a['z'], b['z']) and torch.equal(a['exp_avg_sq'], b['exp_avg_sq'])


@pytest.mark.parametrize('strategy', ['ddp', 'fsdp2'])
def test_two_rank_resume_is_exact(tmp_path, digits_mds, strategy):
    """The 2-rank harness of test_distributed.py with the optimizer named in YAML (the algorithm comes with it)."""
    from test_distributed import _launch, _recipe

    fsdp = strategy == 'fsdp2'
    recipe = _recipe(tmp_path, digits_mds, {'ema': {'half_life': '2ba'}}, fsdp)
    optimizer = ['optimizer.name=schedulefree_adamw', 'optimizer.lr=1e-2', 'optimizer.warmup_steps=2']
    full = _launch(recipe, str(tmp_path / 'full'), fsdp, *optimizer)
    ckpt = tmp_path / 'ckpt' / ('ep0-ba4' if fsdp else 'ep0-ba4-rank0.pt')
    resumed = _launch(
        recipe,
        str(tmp_path / 'resumed'),
        fsdp,
        *optimizer,
        f'load_path={ckpt}',
        f'save_folder={tmp_path / "ckpt_resumed"}',
    )
    assert set(full[0]['algorithms']) == {'ScheduleFree', 'WarmupEMA'}
    assert len(full[0]['losses']) == 8 and full[0]['losses'] != full[1]['losses']
    for rank in range(2):
        assert resumed[rank]['losses'] == full[rank]['losses'][4:], f'rank {rank}'

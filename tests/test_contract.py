"""The model contract and the algorithms' base class: the check at install, the objectives, re-installing, what each
algorithm declares it owns."""

import os

import torch
from composer.core import Event, State
from composer.loggers import InMemoryLogger, Logger
from conftest import tiny_model

import composer_algos.algorithms as algorithms_package
from composer_algos.algorithms import (
    AdaptiveTimestepSampling,
    CurriculumTimestepSchedule,
    LossSecondMomentSampling,
    MinSNRWeighting,
    MomentumDecay,
    SpeeD,
)
from composer_algos.algorithms.base import DiffusionAlgorithm, timestep_sampler_owners
from composer_algos.diffusion import FlowMatchingModel, FlowSchedule, NoiseSchedule, TimeConditionedConvNet
from composer_algos.diffusion.contract import CONTRACT_MEMBERS
from composer_algos.registry import ConfigError
from composer_algos.registry import algorithms as algorithm_registry


def state_of(model) -> State:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    return State(
        model=model,
        rank_zero_seed=0,
        run_name='x',
        device='cpu',
        optimizers=opt,
        max_duration='10ba',
        dataloader=[None],
        dataloader_label='train',
    )


def init(algorithm, model) -> dict:
    destination = InMemoryLogger()
    state = state_of(model)
    algorithm.apply(Event.INIT, state, Logger(state, [destination]))
    return destination.hyperparameters


class MyModel(torch.nn.Module):
    """A user's model with some of the contract: a schedule and T, no weighting chain and no prediction type."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 1)
        self.noise_schedule = NoiseSchedule('linear', 100)
        self.num_timesteps = 100


def test_a_model_lacking_members_is_refused_in_one_line_naming_them():
    try:
        init(MinSNRWeighting(), MyModel())
    except ConfigError as error:
        message = str(error)
    else:
        raise AssertionError('MinSNRWeighting installed on a model without add_loss_weighting')
    assert message.startswith(
        'MinSNRWeighting needs the model to provide add_loss_weighting, noise_schedule, '
        'num_timesteps, prediction_type; MyModel lacks add_loss_weighting, prediction_type'
    )
    assert '\n' not in message
    # Behind DDP's wrapper the model is found.
    wrapper = torch.nn.Module()
    wrapper.module = tiny_model()
    init(MinSNRWeighting(), wrapper)
    assert wrapper.module.loss_weighting_owners == ['MinSNRWeighting']


def test_every_algorithm_needs_only_contract_members_and_declares_what_it_owns():
    classes = {
        name: kind
        for name, kind in algorithm_registry.get_all().items()
        if isinstance(kind, type) and issubclass(kind, DiffusionAlgorithm)
    }
    # Every algorithm folder of the package but the two that act on the optimizer's or Composer's own state (EMA,
    # schedule-free AdamW's switching); a new folder is checked without editing this test.
    folders = {
        name
        for name in os.listdir(os.path.dirname(algorithms_package.__file__))
        if os.path.isfile(os.path.join(os.path.dirname(algorithms_package.__file__), name, '__init__.py'))
    }
    assert folders - {'ema', 'schedule_free'} <= set(classes), folders - set(classes)
    for kind in classes.values():
        instance = kind()
        assert set(instance.needs) <= set(CONTRACT_MEMBERS), kind
        assert ' at 0x' not in repr(instance)
    owners = timestep_sampler_owners(classes.values())
    assert {
        'AdaptiveTimestepSampling',
        'CosMapSampling',
        'LogNormalSampling',
        'LogitNormalSampling',
        'LossSecondMomentSampling',
        'ModeSampling',
        'SpeeD',
    } <= set(owners)
    assert not {'MinSNRWeighting', 'P2Weighting', 'CurriculumTimestepSchedule', 'MomentumDecay'} & set(owners)
    # A curriculum tilts whichever sampler is active: it never counts as an owner.
    assert CurriculumTimestepSchedule.adds_timestep_prior and not CurriculumTimestepSchedule.owns_timestep_sampler
    assert timestep_sampler_owners([CurriculumTimestepSchedule(), AdaptiveTimestepSampling()]) == [
        'AdaptiveTimestepSampling'
    ]
    assert SpeeD.adds_loss_weighting and MinSNRWeighting.adds_loss_weighting
    assert not any(
        getattr(MomentumDecay, flag) for flag in ('owns_timestep_sampler', 'adds_timestep_prior', 'adds_loss_weighting')
    )


def test_installing_twice_changes_nothing():
    model = tiny_model(num_timesteps=100)
    lsm, clts, weighting = LossSecondMomentSampling(history=1), CurriculumTimestepSchedule(), MinSNRWeighting()
    for algorithm in (lsm, clts, weighting):
        init(algorithm, model)
    lsm.sampler.update(torch.arange(100), torch.ones(100, dtype=torch.float64))
    sampler, counts = lsm.sampler, lsm.sampler.counts.clone()
    for algorithm in (lsm, clts, weighting):
        init(algorithm, model)
    assert lsm.sampler is sampler and torch.equal(lsm.sampler.counts, counts) and lsm.sampler.warm()
    assert model.timestep_sampler is sampler and model.loss_weighting_owners == ['MinSNRWeighting']
    assert len(model.timestep_priors()) == 1
    # On a model with another T (a rebuilt Trainer around a new model) the curriculum follows the new grid.
    other = tiny_model(num_timesteps=50)
    init(clts, other)
    assert other.timestep_priors()[0].shape == (50,)

    model = tiny_model(num_timesteps=100)
    adaptive = AdaptiveTimestepSampling(num_probe_timesteps=8, policy='global')
    init(adaptive, model)
    with torch.no_grad():
        adaptive.policy.logits[3] = 2.0
    policy, optimizer = adaptive.policy, adaptive.optimizer
    init(adaptive, model)
    assert adaptive.policy is policy and adaptive.optimizer is optimizer and float(policy.logits[3]) == 2.0
    assert model.timestep_sampler is adaptive.sampler


def test_objectives_are_declared_and_refused_with_why_and_instead():
    flow = FlowMatchingModel(TimeConditionedConvNet(in_channels=1, width=8), FlowSchedule(num_cells=100))
    try:
        init(SpeeD(), flow)
    except ConfigError as error:
        message = str(error)
    else:
        raise AssertionError('SpeeD installed on a flow-matching model')
    assert message.startswith('SpeeD does not apply to flow-matching models (DDPM models only): its threshold tau')
    assert 'Remove it, or draw sigma from logit_normal_sampling or mode_sampling' in message
    assert init(CurriculumTimestepSchedule(), flow) is not None  # applies to both objectives

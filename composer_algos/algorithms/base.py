"""DiffusionAlgorithm: the install at Event.INIT that every algorithm here shares, and what each one declares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from composer.core import Algorithm, Event, State
from composer.loggers import Logger

from composer_algos.algorithms.common import ReprMixin, objective_of
from composer_algos.diffusion.contract import OBJECTIVES, get_diffusion_model
from composer_algos.registry import ConfigError

__all__ = ['DiffusionAlgorithm', 'check_timestep_sampler_owners', 'timestep_sampler_owners']

_OBJECTIVE_NAMES = {'ddpm': 'DDPM', 'flow_matching': 'flow-matching'}


class DiffusionAlgorithm(ReprMixin, Algorithm):
    """Base class of the package's algorithms: the install at ``Event.INIT``, done once here for all of them.

    At ``Event.INIT`` it finds the diffusion model behind ``state.model``, checks that the model provides the
    contract members the algorithm ``needs`` (:class:`~composer_algos.diffusion.contract.DiffusionContract`; a
    one-line ``ConfigError`` naming the algorithm and what the model lacks), refuses a model whose ``objective`` is
    not among ``objectives`` (saying ``why`` and what to use ``instead``), calls :meth:`install` and logs the
    hyperparameters it returns. At the other ``events`` it declares it calls :meth:`act`. Its ``__repr__`` shows the
    constructor's arguments.

    A second ``Event.INIT`` (a Trainer rebuilt around the same algorithm) installs again and changes nothing: the
    model keys the sampler, priors and weightings by the algorithm's name (:attr:`owner`), so the new installation
    replaces the old one, and a stateful algorithm builds its state in :meth:`install` only the first time (or when
    the model's T changes), so what it learned and what a checkpoint restored survive.

    Class attributes a subclass sets:

    * ``needs``: the contract members it uses;
    * ``objectives``: the objectives it applies to (default: all), with ``why`` it refuses the others and what to use
      ``instead`` (both sentences, completing the error message);
    * ``events``: the events besides ``INIT`` it acts on;
    * what it installs, read before any model exists (a recipe's check, :func:`timestep_sampler_owners`):
      ``owns_timestep_sampler`` (it replaces the model's sampler: at most one algorithm of a recipe may),
      ``adds_timestep_prior`` (it tilts whichever sampler is active: a curriculum, which therefore composes with any
      owner, and alone tilts the default sampler) and ``adds_loss_weighting`` (weightings multiply, any number).
    """

    if TYPE_CHECKING:
        # Read-only to its users, so that a subclass may compute it (a property) instead of setting it.
        @property
        def needs(self) -> tuple[str, ...]: ...
    else:
        needs: ClassVar[tuple[str, ...]] = ()
    objectives: ClassVar[tuple[str, ...]] = OBJECTIVES
    why: ClassVar[str] = ''
    instead: ClassVar[str] = ''
    events: ClassVar[tuple[Event, ...]] = ()
    owns_timestep_sampler: ClassVar[bool] = False
    adds_timestep_prior: ClassVar[bool] = False
    adds_loss_weighting: ClassVar[bool] = False

    @property
    def owner(self) -> str:
        """The name the model keys this algorithm's installations by (its class name, as checkpoints key its state)."""
        return type(self).__name__

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT or event in self.events

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event != Event.INIT:
            self.act(event, state, logger)
            return
        model = self.diffusion_model(state)
        objective = objective_of(model)
        if objective not in self.objectives:
            allowed = ' or '.join(_OBJECTIVE_NAMES.get(o, o) for o in self.objectives)
            raise ConfigError(
                f'{self.owner} does not apply to {_OBJECTIVE_NAMES.get(objective, objective)} models '
                f'({allowed} models only): {self.why} Remove it, or {self.instead} '
                '(docs/flow_matching.md lists what applies to which objective).'
            )
        hyperparameters = self.install(model, state, logger)
        if hyperparameters:
            logger.log_hyperparameters(dict(hyperparameters))

    def diffusion_model(self, state: State) -> Any:
        """The model behind ``state.model`` (unwrapped from DDP), checked for the members this algorithm ``needs``."""
        return get_diffusion_model(state.model, self, self.needs)

    def install(self, model: Any, state: State, logger: Logger) -> Mapping[str, Any] | None:
        """Install on ``model`` at ``Event.INIT``; return the hyperparameters to log (or ``None``).

        Must be idempotent: a second call replaces the first installation and keeps the algorithm's state.
        """
        return None

    def act(self, event: Event, state: State, logger: Logger) -> None:
        """What the algorithm does at one of its ``events``."""
        raise NotImplementedError(f'{self.owner} declares the events {self.events} but does not act on them.')


def timestep_sampler_owners(algorithms: Iterable[Any]) -> list[str]:
    """The names of the algorithms (classes or instances) that own the timestep sampler; more than one is an error.

    A curriculum (``adds_timestep_prior``) never counts: it tilts whichever sampler is active.

    Example:
        >>> from composer_algos.algorithms import AdaptiveTimestepSampling, CurriculumTimestepSchedule
        >>> timestep_sampler_owners([AdaptiveTimestepSampling, CurriculumTimestepSchedule])
        ['AdaptiveTimestepSampling']
    """
    owners = []
    for algorithm in algorithms:
        kind = algorithm if isinstance(algorithm, type) else type(algorithm)
        if getattr(kind, 'owns_timestep_sampler', False):
            owners.append(kind.__name__)
    return owners


def check_timestep_sampler_owners(algorithms: Iterable[tuple[str, Any]]) -> None:
    """Refuse two owners of the timestep sampler among ``(name, class or instance)`` pairs, named as the error
    should name them (``algorithms.log_normal_sampling`` for a recipe), before any model is built.

    Raises:
        ConfigError: naming the first two owners.

    Example:
        >>> from composer_algos.algorithms import CurriculumTimestepSchedule, SpeeD
        >>> check_timestep_sampler_owners([('speed', SpeeD), ('clts', CurriculumTimestepSchedule)])
    """
    owners = [name for name, part in algorithms if timestep_sampler_owners([part])]
    if len(owners) > 1:
        raise ConfigError(
            f'{owners[0]} and {owners[1]} both own the timestep sampler (each draws t from its own '
            'distribution); keep one of them. A curriculum (curriculum_timestep_schedule) composes with '
            'either: it tilts whichever sampler is active.'
        )

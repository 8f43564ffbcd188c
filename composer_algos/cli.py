"""The error rule of every entry point: an exception that escapes is one ``error:`` line, its traceback a file."""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import datetime
import inspect
import logging
import os
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

from composer_algos import registry

__all__ = [
    'BUILD_FAILED',
    'DEBUG_ENV',
    'RUN_FAILED',
    'Stage',
    'add_debug_flag',
    'debug_requested',
    'run_folder_of',
    'run_guarded',
]

log = logging.getLogger(__name__)

DEBUG_ENV = 'COMPOSER_ALGOS_DEBUG'
BUILD_FAILED = 2
RUN_FAILED = 1
# The recipe sections whose parts are named by registry name; a traceback through one of them names its key.
_PART_SECTIONS = ('algorithms', 'callbacks', 'loggers')
# A message longer than this (load_state_dict lists every tensor) is cut: the traceback file has all of it.
_MAX_MESSAGE = 400
_FAILURE_KEY = 'composer_algos/failed'
# How long a claim in the store may take: the store lives in rank 0, which may be gone.
_STORE_TIMEOUT = datetime.timedelta(seconds=10)
# How long a rank other than 0 that failed before the process group existed waits for the launcher to end it.
_WAIT_FOR_LAUNCHER_SECONDS = 20.0
# How long rank 0 keeps its store up for the claims of ranks that failed with it (the same error after a broadcast,
# say); ranks blocked in a collective fail only when rank 0 exits, with an error that says so (_PEER_GONE).
_CLAIMS_TIMEOUT_SECONDS = 2.0
# What gloo and NCCL say when a peer process has exited.
_PEER_GONE = ('Connection closed by peer', 'Connection reset by peer', 'Broken pipe', 'remote process exited')


@dataclasses.dataclass
class Stage:
    """How far an entry point got: what an exception escaping it is reported against.

    Attributes:
        exit_code: the exit code of a failure now (:data:`BUILD_FAILED` until :meth:`started`).
        recipe: the loaded recipe, to name the key of the part a failure was raised in.
        run_folder: where ``error.log`` goes (``None``: the run has no folder yet).
        progress: how far the run is, for the error line (for example ``at batch 12``).
    """

    exit_code: int = BUILD_FAILED
    recipe: dict[str, Any] | None = None
    run_folder: str | None = None
    progress: Callable[[], str] = lambda: ''

    def started(self, run_folder: str | None = None, progress: Callable[[], str] | None = None) -> None:
        """Everything is built and the work begins: failures from now on are the run's (:data:`RUN_FAILED`)."""
        self.exit_code = RUN_FAILED
        self.run_folder = run_folder
        if progress is not None:
            self.progress = progress

    def training(self, state: Any) -> None:
        """:meth:`started`, for a Composer run: ``state`` is its ``State``, its folder ``runs/<run_name>``."""
        self.started(run_folder_of(state.run_name), lambda: f'at batch {int(state.timestamp.batch)}')


def run_folder_of(run_name: str) -> str:
    """The folder of the run named ``run_name``, as the recipes lay it out: ``runs/<run_name>``."""
    return os.path.join('runs', run_name)


def add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--debug`` to an entry point's arguments."""
    parser.add_argument(
        '--debug',
        action='store_true',
        help=f'raise an error with its traceback instead of one line (or set {DEBUG_ENV}=1)',
    )


def debug_requested(args: argparse.Namespace) -> bool:
    """Whether ``--debug`` was given or ``COMPOSER_ALGOS_DEBUG=1`` is set."""
    return bool(getattr(args, 'debug', False)) or os.environ.get(DEBUG_ENV) == '1'


def run_guarded(body: Callable[[Stage], int], debug: bool = False) -> int:
    """``body(stage)``'s exit code, or the report of an exception escaping it and ``stage.exit_code``.

    The report is one line on stderr, and the exit code 2 while the recipe is being built (:data:`BUILD_FAILED`),
    1 once the run has started (:data:`RUN_FAILED`). A :class:`~composer_algos.registry.ConfigError` (exit code 2
    whenever it comes), :class:`~composer_algos.data.integrity.DataError` or ``FloatingPointError`` (the loss
    check's) was written for the user, naming the key or file and the fix, and is printed as it is. Any other
    exception is printed as its type and message, the recipe key of the algorithm, callback or logger it was raised
    in, the training step, and the path of a file holding its traceback: ``runs/<run_name>/error.log`` once the run
    has a folder, else a temporary file. With ``debug`` the exception is raised instead. ``SystemExit`` and
    ``KeyboardInterrupt`` pass through (argparse's usage errors, the launcher's SIGTERM).

    Under ``composer -n N`` the line is printed once, by the rank that failed first: each failing rank claims the
    failure in the process group's key-value store and only the first claim prints; a rank that failed because a
    peer is gone (gloo's ``Connection closed by peer``) leaves the report to that peer. Every rank writes its own
    traceback file (``error-rank<r>.log``). The rank then destroys the process group, so that no collective at exit
    waits for a peer, and ends its process here instead of returning (:func:`_exit_now`): the peers waiting in a
    collective fail as soon as it is gone, and the launcher ends the rest. Before the process
    group exists every rank reads the same recipe and fails the same way: rank 0 prints, and the other ranks wait
    for the launcher to end them (it does once rank 0 has exited), printing only when it does not, when their
    failure was their own.

    Args:
        body: the entry point's work, given the :class:`Stage` to update as it goes.
        debug: raise instead of reporting (``--debug``, see :func:`debug_requested`).

    Example:
        >>> run_guarded(lambda stage: 0)
        0
    """
    stage = Stage()
    try:
        return body(stage)
    except Exception as error:
        if debug:
            raise
        if isinstance(error, registry.ConfigError):
            # A recipe (or data or a checkpoint it names) that cannot be used, found early or late: the same fix.
            stage.exit_code = BUILD_FAILED
        _report(error, stage)
        return stage.exit_code


def _report(error: Exception, stage: Stage) -> None:
    from composer_algos.data.integrity import DataError
    from composer_algos.distributed import rank_world

    rank, world_size = rank_world()
    store = _failure_store(world_size)
    if store is not None:
        # From here this rank only reports and leaves, in a bounded time. The launcher's SIGTERM, sent because
        # another rank exited, would cut that short (Composer turns it into a SystemExit wherever it lands).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # These were written for the user: printed as they are, without a traceback file.
    explained = isinstance(error, (registry.ConfigError, DataError, FloatingPointError))
    log_path = None if explained else _write_traceback(error, stage, rank)
    line = 'error: ' + _describe(error, stage, explained)
    if log_path is not None:
        line += f'; traceback: {log_path}'
    # A rank that failed because another is gone leaves the report to that rank, and does not need the store.
    consequence = _peer_gone(error)
    if not consequence and _first_to_fail(store, rank):
        print(line, file=sys.stderr, flush=True)
    if store is not None:
        _leave_process_group()
        if rank == 0 and not consequence:
            _wait_for_claims(store, world_size)
        _exit_now(stage.exit_code)


def _describe(error: Exception, stage: Stage, explained: bool) -> str:
    message = ' '.join(str(error).split())
    if explained:
        return message
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + ' ...'
    context = [part for part in (_part_key(error, stage.recipe), stage.progress()) if part]
    where = f' (in {", ".join(context)})' if context else ''
    return f'{type(error).__name__}: {message}{where}' if message else f'{type(error).__name__}{where}'


def _part_key(error: BaseException, recipe: dict[str, Any] | None) -> str | None:
    """The recipe key (``callbacks.fid``) of the innermost algorithm, callback or logger the traceback runs in."""
    if not recipe:
        return None
    keys: dict[type, str] = {}
    for section in _PART_SECTIONS:
        known = registry.KINDS[section].get_all()
        try:
            named = registry.named_items(recipe.get(section), section)
        except registry.ConfigError:
            continue
        for name, _ in named:
            if inspect.isclass(known.get(name)):
                keys.setdefault(known[name], f'{section}.{name}')
    found = None
    frame_tb = error.__traceback__
    while frame_tb is not None:
        owner = frame_tb.tb_frame.f_locals.get('self')
        if owner is not None:
            found = next((keys[kind] for kind in type(owner).__mro__ if kind in keys), found)
        frame_tb = frame_tb.tb_next
    return found


def _write_traceback(error: Exception, stage: Stage, rank: int) -> str | None:
    """Write the traceback to the run's ``error.log`` (``error-rank<r>.log`` on other ranks) or a temporary file."""
    text = ''.join(traceback.format_exception(type(error), error, error.__traceback__))
    name = 'error.log' if rank == 0 else f'error-rank{rank}.log'
    folder = stage.run_folder
    if folder is None and stage.recipe and stage.recipe.get('run_name'):
        # A run that failed to build again: its folder from an earlier launch, if there is one.
        existing = run_folder_of(str(stage.recipe['run_name']))
        folder = existing if os.path.isdir(existing) else None
    try:
        if folder is not None:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, 'w') as f:
                f.write(text)
            return path
        handle, path = tempfile.mkstemp(prefix='composer_algos-', suffix=f'-{name}')
        with os.fdopen(handle, 'w') as f:
            f.write(text)
        return path
    except OSError as e:
        log.warning('could not write the traceback (%s)', e)
        return None


def _failure_store(world_size: int) -> Any:
    """The process group's key-value store, in a job of several ranks whose process group exists; else ``None``."""
    import torch.distributed as torch_dist

    if world_size == 1 or not (torch_dist.is_available() and torch_dist.is_initialized()):
        return None
    store = torch_dist.distributed_c10d._get_default_store()
    store.set_timeout(_STORE_TIMEOUT)
    return store


def _first_to_fail(store: Any, rank: int) -> bool:
    """Whether this rank is the first of the job to fail (always, on one process)."""
    if store is not None:
        try:
            return store.add(_FAILURE_KEY, 1) == 1
        except Exception:  # the store went with rank 0, which failed first
            return False
    if rank == 0:
        return True
    # Before the process group exists: rank 0 reads the same recipe, and if it fails the same way the launcher
    # ends this process within a second of its exit.
    time.sleep(_WAIT_FOR_LAUNCHER_SECONDS)
    return True


def _peer_gone(error: BaseException | None) -> bool:
    """Whether ``error`` (or an error it was raised from) says that another rank is gone: a consequence of that
    rank's failure, which it reports. Gloo raises a plain ``RuntimeError`` for it, hence the messages."""
    while error is not None:
        if any(sign in str(error) for sign in _PEER_GONE):
            return True
        error = error.__cause__ or error.__context__
    return False


def _wait_for_claims(store: Any, world_size: int) -> None:
    """Keep rank 0's store up until every rank has claimed its failure (or a while has passed), so that no rank
    finds the store gone and prints the failure again."""
    deadline = time.monotonic() + _CLAIMS_TIMEOUT_SECONDS
    try:
        while store.add(_FAILURE_KEY, 0) < world_size and time.monotonic() < deadline:
            time.sleep(0.05)
    except Exception as e:  # a store that fails now has nothing left to coordinate
        log.debug('waiting for the other ranks failed: %s', e)


def _leave_process_group() -> None:
    """Destroy the process group, so that a collective in an exit hook fails at once instead of waiting for a peer
    that is gone or stuck (the peers' own collectives fail when this process exits and its connections close)."""
    from composer_algos.distributed import destroy_process_group

    try:
        destroy_process_group()
    except Exception as e:  # leaving is best effort: the process exits next
        log.debug('destroy_process_group failed: %s', e)


def _exit_now(code: int) -> None:
    """Run the exit hooks (Composer closes its callbacks, streaming frees its shared memory), then end the process
    without the interpreter's teardown, which takes seconds after a run: the sooner a failed rank exits, the sooner
    the launcher ends the others (their collectives fail at once when this process is gone)."""
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

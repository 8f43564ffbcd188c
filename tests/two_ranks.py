"""Launch a script on two gloo ranks with ``composer -n 2``, and stop every rank if it runs too long."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

COMPOSER = os.path.join(os.path.dirname(sys.executable), 'composer')


def launch_two_ranks(script: str, *args: str, timeout: float) -> tuple[int | None, str, str]:
    """``composer -n 2 script args...`` with one thread per rank: its exit code (None when it ran past ``timeout``
    and was stopped), stdout and stderr."""
    env = dict(os.environ, OMP_NUM_THREADS='1')
    # In a session of its own, so that a hung run's ranks are stopped with the launcher rather than left behind.
    proc = subprocess.Popen(
        [COMPOSER, '-n', '2', script, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        return None, stdout, stderr
    return proc.returncode, stdout, stderr

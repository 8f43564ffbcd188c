"""A few steps of every scale-out recipe, resumed from a checkpoint: the first command to run on new hardware.

    FSDP_VERSION=2 composer -n 8 recipes/gpu_smoke.py [RECIPE.yaml ...] [--steps 4] [--work DIR] [--vae PATH]
        [--inception-weights PATH] [--tiny]

Every recipe (default: every YAML of the scale-out folders, yamls/cifar10 and yamls/latent256, except base.yaml)
runs in turn in one process group, as written (device, precision, FSDP settings, model sizes, algorithms) except:

* data: scikit-learn's digits (no download), resized to the recipe's image size as RGB and written once per size
  as MDS shards under ``--work`` (rank 0 writes, the others wait); the precomputed-latents recipe gets the digits'
  latents under the VAE in use. ``remote`` is dropped, ``local`` points at these shards;
* VAE: ``--vae``, else the recipe's ``model.encoder.pretrained_path`` if it exists, else a randomly initialised
  ``AutoencoderKL`` with Stable Diffusion's VAE architecture, saved under ``--work`` (the line then says so: the
  run checks the plumbing, not sample quality);
* FID: kept with 64 samples if the Inception weights file (the recipe's or ``--inception-weights``) exists, else
  dropped (the line says so); bits/dim, loss bands and sample grids shrink, a timestep heatmap is added;
* run A trains ``--steps`` steps, evaluates and saves a checkpoint every 2 steps, the adaptive sampler probing every
  step; run B resumes from A's step-2 checkpoint and trains to ``--steps``: its losses must equal A's, on every
  rank, bit for bit (as must the algorithms' final states and the evaluations both runs made);
* on a GPU, deterministic kernels (cuDNN, cuBLAS, ``torch.use_deterministic_algorithms(warn_only=True)``), so that
  an exact comparison means something; the step times are measured with them.

Rank 0 prints one line per recipe, ``RECIPE: ok | ...`` or ``RECIPE: FAILED: <reason>``, then ``N/M recipes ok``,
and writes ``--work/smoke.json`` (per recipe: losses of both runs on every rank, evaluation steps, step time, peak
memory). A failed recipe does not stop the next one; the exit status is 1 if any failed. A failure on some ranks
only (say, out of memory on one GPU) leaves the others waiting in a collective until ``--timeout``; a streaming
dataset that loses a shared-memory race against another process on the machine is built again on every rank
(:func:`build_agreed_streaming_loader`).

``--tiny`` makes it CPU-sized: device cpu, fp32, a tiny denoiser of the recipe's kind, a tiny random VAE, 8x8
images (8x8 latents), global batch 8; each recipe's ``parallelism_config`` stays as written. With several nodes,
``--work`` must be a folder every node sees.
"""

from __future__ import annotations

import os

# FSDP2 is what the recipes are written for; cuBLAS needs this before its first handle for deterministic results.
os.environ.setdefault('FSDP_VERSION', '2')
os.environ.setdefault('CUBLAS_WORKSPACE_CONFIG', ':4096:8')

import argparse
import atexit
import copy
import dataclasses
import gc
import glob
import hashlib
import json
import math
import re
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist, get_device
from memory_plan import SD_VAE  # Stable Diffusion's VAE architecture (recipes/memory_plan.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
YAMLS = os.path.join(ROOT, 'yamls')
NOT_SCALE_OUT = ('algorithms', 'digits')
RESUME_STEP = 2  # checkpoints and evaluations every 2 steps; run B starts from the first checkpoint
# The tiny VAE of the tests: one down block, 8x8 images -> 4x8x8 latents.
TINY_VAE = {
    'block_out_channels': [8],
    'down_block_types': ['DownEncoderBlock2D'],
    'up_block_types': ['UpDecoderBlock2D'],
    'latent_channels': 4,
    'norm_num_groups': 8,
    'sample_size': 8,
}
TINY_SIZE = 8
TINY_BATCH = 8
FID_SAMPLES = 64
GB = 1e9


# ----------------------------------------------------------------------------------------------- records
@dataclasses.dataclass
class RunRecord:
    """What one training run did on this rank."""

    losses: list[float]
    step_seconds: list[float]
    eval_steps: list[int]
    evaluations: dict[str, dict[int, Any]]  # metric -> step -> value
    algorithms: dict[str, Any]  # class name -> state_dict at the end (the EMA's, as large as the model, left out)
    peak_bytes: int | None


@dataclasses.dataclass
class Outcome:
    """One recipe's result, as printed and written to smoke.json."""

    recipe: str
    ok: bool = False
    reason: str = ''
    notes: list[str] = dataclasses.field(default_factory=list)
    steps: int = 0
    resumed_from: int = RESUME_STEP
    losses_a: list[list[float]] = dataclasses.field(default_factory=list)  # [rank][step]
    losses_b: list[list[float]] = dataclasses.field(default_factory=list)
    eval_steps_a: list[int] = dataclasses.field(default_factory=list)
    eval_steps_b: list[int] = dataclasses.field(default_factory=list)
    evaluations_a: dict[str, dict[int, Any]] = dataclasses.field(default_factory=dict)
    evaluations_b: dict[str, dict[int, Any]] = dataclasses.field(default_factory=dict)
    adaptive_probes: list[int] | None = None  # (run A, run B) probes of the adaptive sampler
    ms_per_step: float | None = None
    peak_bytes: int | None = None
    line: str = ''


class Recorder(Callback):
    """Per-step training loss, step time (BATCH_START to BATCH_END, evaluation excluded), evaluation steps and the
    evaluation metrics (validation loss and its timestep bands)."""

    def __init__(self, synchronize: Callable[[], None]):
        self.synchronize = synchronize
        self.losses: list[float] = []
        self.step_seconds: list[float] = []
        self.eval_steps: list[int] = []
        self.metrics: dict[str, dict[int, Any]] = {}
        self._start = 0.0

    def batch_start(self, state: State, logger: Logger) -> None:
        self.synchronize()
        self._start = time.perf_counter()

    def after_train_batch(self, state: State, logger: Logger) -> None:
        assert isinstance(state.loss, torch.Tensor)  # a diffusion model's loss
        self.losses.append(float(state.loss.detach()))

    def batch_end(self, state: State, logger: Logger) -> None:
        self.synchronize()
        self.step_seconds.append(time.perf_counter() - self._start)

    def eval_after_all(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        if step not in self.eval_steps:
            self.eval_steps.append(step)
        for label, metrics in state.eval_metrics.items():
            for name, metric in metrics.items():
                # Composer computed (and synchronised) them at EVAL_END; compute() returns that value.
                self.metrics.setdefault(f'{label}/{name}', {})[step] = torch.as_tensor(metric.compute()).tolist()


# ----------------------------------------------------------------------------------------------- checks
def compare_resumed(
    losses_a: list[list[float]], losses_b: list[list[float]], steps: int, resumed_from: int = RESUME_STEP
) -> str | None:
    """Why run B's per-rank losses are not run A's from step ``resumed_from + 1`` on, or ``None`` if they are."""
    for rank, (a, b) in enumerate(zip(losses_a, losses_b, strict=False)):
        if len(a) != steps or len(b) != steps - resumed_from:
            return f'rank {rank} recorded {len(a)} and {len(b)} losses, expected {steps} and {steps - resumed_from}'
        bad = [x for x in a + b if not math.isfinite(x)]
        if bad:
            return f'rank {rank}: non-finite loss {bad[0]}'
        for i, (x, y) in enumerate(zip(a[resumed_from:], b, strict=True)):
            if x != y:
                return (
                    f'rank {rank}, step {resumed_from + 1 + i}: resumed loss {y!r} != uninterrupted {x!r} '
                    f'(difference {y - x:.3g})'
                )
    if len(losses_a) != len(losses_b) or not losses_a:
        return f'losses from {len(losses_a)} and {len(losses_b)} ranks'
    return None


def _plain(value: Any) -> Any:
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def first_difference(a: Any, b: Any, where: str = '') -> str | None:
    """The path of the first entry where two nested states differ (tensors bit for bit), or ``None``."""
    a, b = _plain(a), _plain(b)
    if torch.is_tensor(a) or torch.is_tensor(b):
        same = (
            torch.is_tensor(a)
            and torch.is_tensor(b)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a.cpu(), b.cpu())
        )
        return None if same else where or 'value'
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return f'{where} keys'
        for key in a:
            found = first_difference(a[key], b[key], f'{where}.{key}' if where else str(key))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f'{where} length'
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            found = first_difference(x, y, f'{where}[{i}]')
            if found:
                return found
        return None
    return None if a == b else where or 'value'


def check_runs(out: Outcome) -> str | None:
    """The checks on what every rank gathered (losses, evaluations, probes): the first failure, or ``None``."""
    reason = compare_resumed(out.losses_a, out.losses_b, out.steps)
    if reason:
        return reason
    expected = sorted({*range(RESUME_STEP, out.steps + 1, RESUME_STEP), out.steps})
    if out.eval_steps_a != expected or out.eval_steps_b != [s for s in expected if s > RESUME_STEP]:
        return f'evaluations at steps {out.eval_steps_a} and, resumed, {out.eval_steps_b}; expected {expected}'
    for name, by_step in out.evaluations_a.items():
        for step, value in by_step.items():
            resumed = out.evaluations_b.get(name, {}).get(step)
            if step > RESUME_STEP and resumed is not None and resumed != value:
                return f'{name} at step {step}: resumed {resumed} != uninterrupted {value}'
    if out.adaptive_probes is not None and out.adaptive_probes != [out.steps, out.steps]:
        return f'the adaptive sampler probed {out.adaptive_probes} times (runs A, B), expected {out.steps} each'
    return None


def check_states(a: RunRecord, b: RunRecord) -> str | None:
    """This rank's algorithm states at the end of both runs, bit for bit; the first difference, or ``None``."""
    for name, state in a.algorithms.items():
        # Composer's default state_dict holds the algorithm's repr, which may contain its memory address.
        where = first_difference(
            {k: v for k, v in state.items() if k != 'repr'},
            {k: v for k, v in (b.algorithms.get(name) or {}).items() if k != 'repr'},
        )
        if where:
            return f'{name} state differs after resuming ({where})'
    return None


# ----------------------------------------------------------------------------------------------- set-up
def collective_ok(error: str | None) -> str | None:
    """A barrier that carries errors: every rank gets the first rank's error (or ``None``).

    The error is also written to this rank's stderr at once: if the other ranks are stuck in another collective,
    that line is what tells why.
    """
    if error:
        print(f'gpu_smoke: rank {dist.get_global_rank()}: {error}', file=sys.stderr, flush=True)
    errors = dist.all_gather_object(error)
    return next((f'rank {r}: {e}' if len(errors) > 1 else e for r, e in enumerate(errors) if e), None)


def on_rank_zero(fn: Callable[[], None]) -> None:
    """``fn()`` on global rank 0 while the others wait; an error on rank 0 is raised on every rank."""
    error = None
    if dist.get_global_rank() == 0:
        try:
            fn()
        except Exception as e:  # reported on every rank below
            error = one_line(e)
    error = collective_ok(error)
    if error:
        raise RuntimeError(error)


def one_line(e: BaseException) -> str:
    text = ' '.join(str(e).split())
    text = f'{type(e).__name__}: {text}' if text else type(e).__name__
    return text if len(text) <= 300 else text[:297] + '...'


def write_once(folder: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` into a fresh temporary folder renamed to ``folder``; nothing if ``folder`` already exists."""
    if os.path.isdir(folder):
        return
    tmp = f'{folder}.tmp-{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    os.rename(tmp, folder)


def digits(split: str, size: int) -> list:
    """The digits of ``split`` as ``size`` x ``size`` RGB images (bicubic from 8x8)."""
    from PIL import Image

    from composer_algos.data.convert import digits_images

    images = []
    for digit, label in digits_images(split):
        image = digit.convert('RGB')
        if image.size != (size, size):
            # (Pillow sets its filter constants at import, unseen by type checkers.)
            image = image.resize((size, size), resample=Image.BICUBIC)  # type: ignore[attr-defined]
        images.append((image, label))
    return images


class Workspace:
    """The shards, VAEs and per-recipe folders under ``--work``; each is made once, by rank 0."""

    def __init__(self, root: str, tiny: bool):
        self.root = os.path.abspath(root)
        self.tiny = tiny

    def images(self, size: int) -> str:
        folder = os.path.join(self.root, 'data', f'digits-rgb-{size}px')

        def write(tmp: str) -> None:
            from composer_algos.data import write_mds

            for split in ('train', 'val'):
                write_mds(digits(split, size), os.path.join(tmp, split), progress=False)

        on_rank_zero(lambda: write_once(folder, write))
        return folder

    def random_vae(self) -> str:
        kind = 'tiny' if self.tiny else 'stable-diffusion'
        folder = os.path.join(self.root, 'vae', f'random-{kind}')

        def write(tmp: str) -> None:
            from diffusers import AutoencoderKL

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                # (diffusers' top-level classes type as placeholders.)
                AutoencoderKL(**(TINY_VAE if self.tiny else SD_VAE)).save_pretrained(tmp)  # type: ignore[attr-defined]

        on_rank_zero(lambda: write_once(folder, write))
        return folder

    def latents(self, size: int, vae_path: str, subfolder: str | None, tag: str) -> str:
        folder = os.path.join(self.root, 'data', f'digits-latents-{size}px-{tag}')

        def write(tmp: str) -> None:
            from composer_algos.data import build_vae_encoder, write_latents_mds

            encoder = build_vae_encoder(vae_path, subfolder=subfolder)
            device = 'cuda' if torch.cuda.is_available() and not self.tiny else 'cpu'
            for split in ('train', 'val'):
                write_latents_mds(
                    digits(split, size), os.path.join(tmp, split), encoder, batch_size=64, device=device, progress=False
                )
            del encoder
            if device == 'cuda':
                torch.cuda.empty_cache()

        on_rank_zero(lambda: write_once(folder, write))
        return folder

    def recipe_folder(self, slug: str) -> str:
        folder = os.path.join(self.root, 'recipes', slug)
        on_rank_zero(lambda: shutil.rmtree(folder, ignore_errors=True))
        return folder


def vae_tag(kind: str, path: str, subfolder: str | None) -> str:
    """Names the latent shards of a VAE: its kind, and for a given or the recipe's VAE, a digest of its files."""
    if kind == 'random':
        return os.path.basename(path)
    folder = os.path.realpath(os.path.join(path, subfolder or ''))
    files = sorted(
        (n, os.path.getsize(os.path.join(folder, n)), int(os.path.getmtime(os.path.join(folder, n))))
        for n in os.listdir(folder)
        if os.path.isfile(os.path.join(folder, n))
    )
    return f'{kind}-' + hashlib.sha1(repr((folder, files)).encode()).hexdigest()[:12]


def vae_config(path: str, subfolder: str | None) -> dict:
    with open(os.path.join(path, subfolder or '', 'config.json')) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------- data loaders
AGREED_LOADER = 'streaming_image_agreed'
SHM_RETRIES = 5


def barriers_skipped(error: BaseException) -> int | None:
    """How many of a StreamingDataset's barriers a rank skipped when it failed on a shared-memory race, or ``None``
    if ``error`` is not such a failure.

    Building a dataset on local shards runs three barriers: two around the registration of its shared-memory prefix
    and one at the end. Its leader creates the prefix's ``locals`` block between the first two (``FileExistsError``
    when another process took it since the scan); the other ranks look it up after the second (``RuntimeError:
    Internal error: shared memory ...`` when they found another prefix); every rank then creates or attaches the
    other blocks (``FileNotFoundError`` when another process unlinked one between the two).
    """
    text = str(error)
    if isinstance(error, FileExistsError) and re.search(r"'/\d{6}_locals'", text):
        return 2
    if isinstance(error, FileNotFoundError) and re.search(r"'/\d{6}_\w+'", text):
        return 1
    if isinstance(error, RuntimeError) and text.startswith('Internal error: shared memory'):
        return 1
    return None


def shared_blocks(loader: Any) -> list[tuple[str, bool]]:
    """``(name, created here)`` of each shared-memory block of a loader's StreamingDataset (streaming 0.13)."""
    dataset: Any = getattr(loader, 'dataset', None)  # None, or a dataset without them: AttributeError below
    try:
        blocks = [
            dataset._locals_shm,
            dataset._shared_barrier._arr.shm,
            dataset._next_epoch.arr.shm,
            dataset._cache_usage.arr.shm,
            dataset._shard_states.shm,
            dataset._shard_access_times.shm,
        ]
    except AttributeError:
        return []
    return [(block.shm.name, bool(block.created_shms)) for block in blocks]


def foreign_blocks(gathered: list[tuple[int, list[tuple[str, bool]]]]) -> list[str]:
    """Blocks that no rank of their node created: another process's, attached by mistake."""
    created: dict[tuple[int, str], bool] = {}
    for node, blocks in gathered:
        for name, here in blocks:
            created[node, name] = created.get((node, name), False) or here
    return sorted(name for (_, name), here in created.items() if not here)


def build_agreed_streaming_loader(**kwargs: Any) -> Any:
    """``streaming_image``'s loader, built again on every rank when streaming lost a race for its shared memory.

    StreamingDataset names its shared memory by a prefix no live process holds, found by a scan, and claims it
    only later: another process on the machine that starts or drops a dataset at that moment can take or unlink
    it. The rank that notices fails alone while the others wait in the dataset's barriers: here it makes up the
    barriers it skipped (:func:`barriers_skipped`). A block of the other process's that a rank attached to instead
    of creating its own fails nothing, and would mix the two datasets' state: no rank of the node created it
    (:func:`foreign_blocks`). Either way every rank learns of it and all build again.
    """
    from composer_algos.data import build_streaming_image_dataloader

    for attempt in range(1, SHM_RETRIES + 1):
        loader, lost = None, False
        try:
            loader = build_streaming_image_dataloader(**kwargs)
        except (FileExistsError, FileNotFoundError, RuntimeError) as e:
            skipped = barriers_skipped(e)
            if skipped is None:
                raise
            for _ in range(skipped):
                dist.barrier()
            lost = True
        gathered = dist.all_gather_object((lost, dist.get_node_rank(), shared_blocks(loader)))
        foreign = foreign_blocks([(node, blocks) for _, node, blocks in gathered])
        if not foreign and not any(lost for lost, _, _ in gathered):
            return loader
        del loader
        what = f'attached to its blocks {foreign}' if foreign else 'took or dropped its shared memory'
        print(
            f'gpu_smoke: rank {dist.get_global_rank()}: a streaming dataset lost a race against another process '
            f'on this machine ({what}, attempt {attempt}); building it again',
            file=sys.stderr,
            flush=True,
        )
        time.sleep(0.5 * attempt)
    raise RuntimeError(f'streaming lost the race for shared memory {SHM_RETRIES} times')


# ----------------------------------------------------------------------------------------------- recipe -> runs
def display_name(recipe: str) -> str:
    path = os.path.abspath(recipe)
    return os.path.relpath(path, YAMLS) if path.startswith(YAMLS + os.sep) else recipe


def default_recipes() -> list[str]:
    return sorted(
        p
        for p in glob.glob(os.path.join(YAMLS, '*', '*.yaml'))
        if os.path.basename(os.path.dirname(p)) not in NOT_SCALE_OUT and os.path.basename(p) != 'base.yaml'
    )


def shrink_denoiser(denoiser: dict, size: int) -> None:
    """A denoiser of the recipe's kind, small enough for a CPU; everything else of the recipe's stays."""
    name = denoiser.get('name', 'unet')
    if name == 'unet':
        denoiser.update(
            sample_size=size,
            block_out_channels=[16, 32],
            layers_per_block=1,
            attention_levels=[1],
            norm_num_groups=8,
            attention_head_dim=16,
        )
    elif name == 'dit':
        denoiser.update(sample_size=size, num_layers=2, num_attention_heads=2, attention_head_dim=8)
    elif name == 'conv':
        denoiser.update(width=16)


def smoke_configs(
    cfg: dict, args: argparse.Namespace, space: Workspace, folder: str, notes: list[str]
) -> tuple[dict, dict]:
    """Recipe -> (run A, run B) configs; writes the data and VAE they need; appends what changed to ``notes``."""
    cfg = copy.deepcopy(cfg)
    model = cfg['model']
    encoder = model.get('encoder')
    train, evaluation = cfg['train_loader'], cfg.get('eval_loader')
    latents = bool(train.get('latents'))
    if args.tiny:
        cfg.update(device='cpu', precision='fp32', device_train_microbatch_size=TINY_BATCH // 2)
        train['global_batch_size'] = TINY_BATCH
        if evaluation:
            evaluation['global_batch_size'] = TINY_BATCH
        for loader in (train, evaluation):
            if loader:
                loader['num_workers'] = 0

    # The VAE: given, the recipe's if present (full size only: it is sized for 256x256 images), else random.
    vae_path = subfolder = None
    factor = 1  # pixels per latent a side
    if encoder is not None:
        subfolder = encoder.get('subfolder')
        recipe_path = encoder.get('pretrained_path')
        if args.vae:
            vae_path, subfolder, tag = os.path.abspath(args.vae), None, 'given'
            notes.append(f'VAE {args.vae}')
        elif (
            not args.tiny and recipe_path and os.path.isfile(os.path.join(recipe_path, subfolder or '', 'config.json'))
        ):
            vae_path, tag = recipe_path, 'recipe'
            notes.append(f'VAE {recipe_path}')
        else:
            vae_path, subfolder, tag = space.random_vae(), None, 'random'
            notes.append('VAE random (untrained weights: a plumbing check, not a quality check)')
        encoder['pretrained_path'] = vae_path
        encoder.pop('subfolder', None)
        if subfolder:
            encoder['subfolder'] = subfolder
        factor = 2 ** (len(vae_config(vae_path, subfolder)['block_out_channels']) - 1)

    # Data: the recipe's image (or latent) size; digits as RGB, or their latents under this VAE.
    if latents:
        size = TINY_SIZE if args.tiny else int(train['image_size'])
        if vae_path is None:
            raise ValueError('the loader reads latents but model.encoder names no VAE')
        local = space.latents(size * factor, vae_path, subfolder, vae_tag(tag, vae_path, subfolder))
    else:
        size = TINY_SIZE * (factor if encoder is not None else 1) if args.tiny else int(train['image_size'])
        local = space.images(size)
    for loader in (train, evaluation):
        if loader:
            loader.update(remote=None, local=local)
            if loader.get('name', 'streaming_image') == 'streaming_image':
                loader['name'] = AGREED_LOADER
            if loader.get('image_size'):
                loader['image_size'] = size
    if args.tiny:
        shrink_denoiser(model['denoiser'], size // factor if encoder is not None and not latents else size)

    # Evaluation: FID if its weights are here, the rest small, plus a timestep heatmap.
    callbacks = dict(cfg.get('callbacks') or {})
    if 'fid' in callbacks:
        fid = callbacks['fid'] or {}
        weights = args.inception_weights or fid.get('inception_weights')
        if weights and os.path.isfile(weights):
            callbacks['fid'] = dict(
                fid,
                inception_weights=weights,
                num_samples=FID_SAMPLES,
                max_real_samples=FID_SAMPLES,
                num_steps=10,
                batch_size=FID_SAMPLES,
            )
        else:
            del callbacks['fid']
            notes.append(
                f'FID dropped (no Inception weights at {weights})'
                if weights
                else 'FID dropped (no Inception weights file)'
            )
    if 'bits_per_dim' in callbacks:
        callbacks['bits_per_dim'] = dict(callbacks['bits_per_dim'] or {}, num_images=16, num_terms=10, batch_size=16)
    if 'sample_grid' in callbacks:
        callbacks['sample_grid'] = dict(callbacks['sample_grid'] or {}, num_samples=8, num_steps=10, batch_size=8)
    callbacks['timestep_heatmap'] = dict(callbacks.get('timestep_heatmap') or {}, interval='1ba')
    cfg['callbacks'] = callbacks

    scheduler = cfg.get('scheduler')
    if isinstance(scheduler, dict) and 't_warmup' in scheduler:
        # The recipes warm up over thousands of steps: a few steps from lr 0 would train nothing, and the adaptive
        # sampler does not probe a step whose lr is 0.
        cfg['scheduler'] = dict(scheduler, t_warmup='0ba')
        notes.append('no lr warm-up')

    algorithms = cfg.get('algorithms') or {}
    if isinstance(algorithms, dict) and 'adaptive_timestep_sampling' in algorithms:
        algorithms['adaptive_timestep_sampling'] = dict(algorithms['adaptive_timestep_sampling'] or {}, update_every=1)

    cfg.update(
        max_duration=f'{args.steps}ba',
        eval_interval=f'{RESUME_STEP}ba',
        eval_subset_num_batches=1,
        save_interval=f'{RESUME_STEP}ba',
        save_overwrite=True,
        save_num_checkpoints_to_keep=-1,
        autoresume=False,
        load_path=None,
        progress_bar=False,
        log_to_console=False,
        dist_timeout=float(args.timeout),
    )

    def place(run_cfg: dict, run: str) -> dict:
        run_cfg = copy.deepcopy(run_cfg)
        out = os.path.join(folder, run)
        for name in ('fid', 'sample_grid', 'timestep_heatmap'):
            if name in run_cfg['callbacks']:
                run_cfg['callbacks'][name]['folder'] = os.path.join(out, 'eval')
        loggers = run_cfg.get('loggers') or {}
        if isinstance(loggers, dict) and 'file' in loggers:
            loggers['file'] = dict(loggers['file'] or {}, filename=os.path.join(out, 'log-rank{rank}.txt'))
        return run_cfg

    run_a = place(dict(cfg, save_folder=os.path.join(folder, 'checkpoints')), 'A')
    run_b = place(dict(cfg, save_folder=None), 'B')
    return run_a, run_b


def checkpoint_at(save_folder: str, step: int) -> str:
    """Run A's checkpoint of ``step``: a folder of shards (``state_dict_type: sharded``) or one file."""
    found = sorted(
        glob.glob(os.path.join(save_folder, f'ep*-ba{step}'))
        + glob.glob(os.path.join(save_folder, f'ep*-ba{step}-rank0.pt'))
    )
    if not found:
        present = sorted(os.listdir(save_folder)) if os.path.isdir(save_folder) else []
        raise FileNotFoundError(f'no checkpoint of step {step} in {save_folder} (found {present})')
    return found[0]


def release(trainer: Any) -> None:
    """Close a Trainer and drop what would keep it (and its device memory) alive until exit."""
    trainer.close()
    # Composer's Engine registers its close in atexit, which holds the State (model, optimizer) until exit.
    atexit.unregister(trainer.engine._close)
    loaders = [trainer.state.train_dataloader] + [e.dataloader.dataloader for e in trainer.state.evaluators]
    for loader in loaders:
        # A StreamingDataset whose epoch was cut short keeps its prefetch threads running.
        iterator = getattr(getattr(loader, 'dataset', None), '_iterator', None)
        if iterator is not None:
            iterator.exit()


def train(cfg: dict, on_gpu: bool) -> RunRecord:
    from composer_algos.config import build_trainer

    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    recorder = Recorder(torch.cuda.synchronize if on_gpu else lambda: None)
    trainer = build_trainer(copy.deepcopy(cfg))
    try:
        trainer.state.callbacks.insert(0, recorder)
        trainer.fit()
        evaluations = dict(recorder.metrics)
        for callback in trainer.state.callbacks:
            if hasattr(callback, 'steps') and hasattr(callback, 'values') and callback.values:
                evaluations[type(callback).__name__] = dict(zip(callback.steps, callback.values, strict=False))
        # WarmupEMA's state is a full copy of the weights (gathered to every rank); the evaluations above, which
        # sample from the EMA weights, stand for it.
        algorithms = {
            type(a).__name__: a.state_dict() for a in trainer.state.algorithms if type(a).__name__ != 'WarmupEMA'
        }
    finally:
        release(trainer)
    del trainer
    gc.collect()
    peak = torch.cuda.max_memory_allocated() if on_gpu else None
    return RunRecord(recorder.losses, recorder.step_seconds, recorder.eval_steps, evaluations, algorithms, peak)


def gather(record: RunRecord | None) -> list[RunRecord | None]:
    # Algorithm states stay on their rank (compared there); the rest goes to every rank.
    light = None if record is None else dataclasses.replace(record, algorithms={})
    return dist.all_gather_object(light)


def smoke(recipe: str, args: argparse.Namespace, space: Workspace, on_gpu: bool) -> Outcome:
    """Run A, run B and the checks for one recipe. Collective: every rank calls it with the same arguments."""
    from composer_algos.config import load_config

    name = display_name(recipe)
    out = Outcome(recipe=name, steps=args.steps)
    slug = os.path.splitext(name)[0].replace(os.sep, '_').replace('.', '_').strip('_') or 'recipe'
    try:
        folder = space.recipe_folder(slug)
        run_a, run_b = smoke_configs(load_config(recipe), args, space, folder, out.notes)
    except Exception as e:  # the same on every rank: configs are built from the same files
        out.reason = one_line(e)
        return out

    records: dict[str, list[RunRecord]] = {}
    own: dict[str, RunRecord] = {}
    for run, cfg in (('A', run_a), ('B', run_b)):
        error, record = None, None
        try:
            if run == 'B':
                cfg['load_path'] = checkpoint_at(run_a['save_folder'], RESUME_STEP)
            record = train(cfg, on_gpu)
        except Exception as e:
            error = one_line(e)
        error = collective_ok(f'run {run}: {error}' if error else None)
        if error:
            out.reason = error
            return out
        assert record is not None
        own[run] = record
        records[run] = gather(record)  # type: ignore[assignment]

    a, b = records['A'], records['B']
    out.losses_a = [r.losses for r in a]
    out.losses_b = [r.losses for r in b]
    out.eval_steps_a, out.eval_steps_b = a[0].eval_steps, b[0].eval_steps
    out.evaluations_a, out.evaluations_b = a[0].evaluations, b[0].evaluations
    timed = a[0].step_seconds[1:] or a[0].step_seconds  # the first step pays for allocation and warm-up
    out.ms_per_step = 1000 * statistics.median(timed) if timed else None
    peaks = [r.peak_bytes for r in a if r.peak_bytes is not None]
    out.peak_bytes = max(peaks) if peaks else None
    adaptive_a, adaptive_b = (own[run].algorithms.get('AdaptiveTimestepSampling') for run in ('A', 'B'))
    if adaptive_a is not None and adaptive_b is not None:
        out.adaptive_probes = [int(s['num_probes']) for s in (adaptive_a, adaptive_b)]
    # Algorithm states are compared on each rank; the verdicts are gathered.
    out.reason = check_runs(out) or collective_ok(check_states(own['A'], own['B'])) or ''
    out.ok = not out.reason
    return out


def format_line(out: Outcome) -> str:
    if not out.ok:
        return f'{out.recipe}: FAILED: {out.reason}' + (f' | {" | ".join(out.notes)}' if out.notes else '')
    evals = out.eval_steps_a
    evals_text = ', '.join(map(str, evals[:-1])) + f' and {evals[-1]}' if len(evals) > 1 else str(evals[0])
    parts = [f'{out.steps} steps, eval at {evals_text}, resumed from {out.resumed_from} with identical losses']
    if out.adaptive_probes is not None:
        parts[0] += ', adaptive sampler probed every step'
    parts.append(f'{out.ms_per_step:.0f} ms/step' if out.ms_per_step is not None else 'no step time')
    parts.append(f'peak {out.peak_bytes / GB:.1f} GB' if out.peak_bytes is not None else 'peak n/a on CPU')
    return f'{out.recipe}: ok | ' + ' | '.join(parts + out.notes)


# ----------------------------------------------------------------------------------------------- main
def deterministic_kernels() -> None:
    """Bit-identical repeats on a GPU: deterministic cuDNN and cuBLAS; an op without a deterministic kernel
    warns (and may then make a resumed run differ: the warning names it)."""
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('recipes', nargs='*', help='YAML recipes (default: every scale-out recipe)')
    parser.add_argument('--steps', type=int, default=4, help='steps of run A (run B resumes from step 2)')
    parser.add_argument('--work', default='gpu_smoke', help='folder for shards, VAE, checkpoints and smoke.json')
    parser.add_argument('--vae', help='VAE folder (AutoencoderKL.save_pretrained) for the latent recipes')
    parser.add_argument('--inception-weights', help="Inception weights file for FID (else the recipe's)")
    parser.add_argument('--tiny', action='store_true', help='CPU-sized: cpu, fp32, tiny models, 8x8 images')
    parser.add_argument(
        '--timeout', type=float, default=900.0, help='seconds a collective may wait (data writing on rank 0 included)'
    )
    args = parser.parse_args(argv)
    if args.steps < RESUME_STEP + 1:
        parser.error(f'--steps must be at least {RESUME_STEP + 1}: run B resumes from step {RESUME_STEP}.')
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    recipes = args.recipes or default_recipes()
    on_gpu = not args.tiny
    if on_gpu and not torch.cuda.is_available():
        print('gpu_smoke: no GPU here; --tiny runs the same checks CPU-sized.', file=sys.stderr)
        return 2
    if args.tiny:
        torch.set_num_threads(1)
    dist.initialize_dist(get_device('cpu' if args.tiny else 'gpu'), timeout=args.timeout)
    from composer_algos import registry

    registry.datasets.register(AGREED_LOADER, func=build_agreed_streaming_loader)
    if on_gpu:
        deterministic_kernels()
    space = Workspace(args.work, args.tiny)
    rank = dist.get_global_rank()
    world = dist.get_world_size()
    if rank == 0:
        kind = 'cpu, --tiny' if args.tiny else f'gpu, {torch.cuda.get_device_name()}'
        print(
            f'gpu_smoke: {len(recipes)} recipes on {world} ranks ({kind}), {args.steps} steps each, work {space.root}',
            flush=True,
        )
    outcomes = []
    for recipe in recipes:
        out = smoke(recipe, args, space, on_gpu)
        out.line = format_line(out)
        outcomes.append(out)
        if rank == 0:
            print(out.line, flush=True)
            report = {
                'world_size': world,
                'tiny': args.tiny,
                'steps': args.steps,
                'device': 'cpu' if args.tiny else torch.cuda.get_device_name(),
                'recipes': {o.recipe: dataclasses.asdict(o) for o in outcomes},
            }
            path = os.path.join(space.root, 'smoke.json')
            with open(path + '.tmp', 'w') as f:
                json.dump(report, f, indent=1)
            os.replace(path + '.tmp', path)
    passed = sum(o.ok for o in outcomes)
    if rank == 0:
        print(f'{passed}/{len(outcomes)} recipes ok', flush=True)
    return 0 if passed == len(outcomes) else 1


if __name__ == '__main__':
    sys.exit(main())

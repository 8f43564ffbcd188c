"""recipes/gpu_smoke.py: the scale-out recipes' first-GPU check, run CPU-sized (--tiny) on two FSDP2 ranks."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'recipes', 'gpu_smoke.py')
# One recipe per family: the CIFAR-10 UNet with the adaptive sampler (bits/dim, sample grids, FID dropped) and the
# latent DiT with the curriculum and momentum decay, its VAE random and run inside the model.
RECIPES = ['cifar10/adaptive.yaml', 'latent256/clts_md.yaml']


@pytest.fixture(scope='module')
def gpu_smoke():
    sys.path.insert(0, os.path.dirname(SCRIPT))
    try:
        import gpu_smoke
    finally:
        sys.path.remove(os.path.dirname(SCRIPT))
    return gpu_smoke


def test_resumed_losses_must_match_bit_for_bit(gpu_smoke):
    full = [[1.0, 0.9, 0.8, 0.7], [1.1, 1.0, 0.95, 0.75]]
    assert gpu_smoke.compare_resumed(full, [[0.8, 0.7], [0.95, 0.75]], steps=4) is None
    off = gpu_smoke.compare_resumed(full, [[0.8, 0.7], [0.95, math.nextafter(0.75, 1.0)]], steps=4)
    assert off is not None and off.startswith('rank 1, step 4:')
    assert 'expected 4 and 2' in gpu_smoke.compare_resumed(full, [[0.8], [0.95]], steps=4)
    assert 'non-finite' in gpu_smoke.compare_resumed([[1.0, math.nan, 0.8, 0.7]], [[0.8, 0.7]], steps=4)


def test_algorithm_states_are_compared_exactly(gpu_smoke):
    import torch

    a = {'policy': {'w': torch.tensor([1.0, 2.0])}, 'selected': torch.tensor([0, 3]), 'num_updates': 4}
    assert (
        gpu_smoke.first_difference(
            a, {'policy': {'w': torch.tensor([1.0, 2.0])}, 'selected': torch.tensor([0, 3]), 'num_updates': 4}
        )
        is None
    )
    b = {'policy': {'w': torch.tensor([1.0, 2.0000002])}, 'selected': torch.tensor([0, 3]), 'num_updates': 4}
    assert gpu_smoke.first_difference(a, b) == 'policy.w'
    assert gpu_smoke.first_difference(a, dict(a, num_updates=3)) == 'num_updates'


def test_shared_memory_races_are_told_apart_from_other_errors(gpu_smoke):
    assert gpu_smoke.barriers_skipped(FileExistsError(17, 'File exists', '/001169_locals')) == 2
    assert gpu_smoke.barriers_skipped(FileNotFoundError(2, 'No such file or directory', '/001204_next_epoch')) == 1
    assert gpu_smoke.barriers_skipped(RuntimeError('Internal error: shared memory registered does not match')) == 1
    assert (
        gpu_smoke.barriers_skipped(FileNotFoundError(2, 'No such file or directory', '/data/train/index.json')) is None
    )
    assert gpu_smoke.barriers_skipped(RuntimeError('CUDA out of memory')) is None
    # Node 0's ranks created every block between them; on node 1 nobody created 000007_barrier: another process's.
    gathered = [
        (0, [('000003_locals', True), ('000003_barrier', False)]),
        (0, [('000003_locals', False), ('000003_barrier', True)]),
        (1, [('000007_locals', True), ('000007_barrier', False)]),
    ]
    assert gpu_smoke.foreign_blocks(gathered) == ['000007_barrier']


def test_a_streaming_loader_names_the_shared_memory_it_created(gpu_smoke, tmp_path):
    """The blocks the race check inspects are found on a real StreamingDataset (one process creates them all)."""
    from composer_algos.data import build_streaming_image_dataloader, write_mds
    from composer_algos.data.convert import digits_images

    write_mds(digits_images('val')[:16], str(tmp_path / 'val'), progress=False)
    loader = build_streaming_image_dataloader(global_batch_size=4, local=str(tmp_path), split='val')
    blocks = gpu_smoke.shared_blocks(loader)
    suffixes = sorted(name.split('_', 1)[1] for name, _ in blocks)
    assert suffixes == ['barrier', 'cache_usage', 'locals', 'next_epoch', 'shard_access_times', 'shard_states']
    assert all(created for _, created in blocks) and len({name[:6] for name, _ in blocks}) == 1
    assert gpu_smoke.foreign_blocks([(0, blocks)]) == []


def test_tiny_smoke_on_two_fsdp2_ranks(tmp_path):
    """Two recipes pass, resumed losses equal the uninterrupted run's on both ranks, and a broken recipe between
    them fails alone (its line says why, the next recipe still runs, the exit status is 1)."""
    broken = tmp_path / 'broken.yaml'
    broken.write_text(
        f'includes: [{os.path.join(ROOT, "yamls", "cifar10", "uniform.yaml")}]\n'
        'model: {denoiser: {dropout_rate: 0.1}}\n'
    )
    recipes = [os.path.join(ROOT, 'yamls', RECIPES[0]), str(broken), os.path.join(ROOT, 'yamls', RECIPES[1])]
    work = tmp_path / 'work'
    env = dict(os.environ, OMP_NUM_THREADS='1', FSDP_VERSION='2')
    composer = os.path.join(os.path.dirname(sys.executable), 'composer')
    proc = subprocess.run(
        [composer, '-n', '2', SCRIPT, *recipes, '--tiny', '--work', str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    context = proc.stdout[-3000:] + proc.stderr[-4000:]
    assert proc.returncode != 0, context
    results = [line for line in lines if ': ok |' in line or ': FAILED' in line]
    assert len(results) == 3 and '2/3 recipes ok' in lines, context
    cifar, failed, latent = results
    assert cifar.startswith(
        'cifar10/adaptive.yaml: ok | 4 steps, eval at 2 and 4, resumed from 2 with identical losses'
    ), cifar
    assert 'FID dropped' in cifar and 'peak n/a on CPU' in cifar
    assert failed.startswith(f'{broken}: FAILED: ') and 'dropout_rate' in failed, failed
    assert latent.startswith('latent256/clts_md.yaml: ok |') and 'VAE random' in latent, latent

    report = json.loads((work / 'smoke.json').read_text())
    assert report['world_size'] == 2 and report['tiny'] is True and report['steps'] == 4
    assert report['recipes'][str(broken)]['ok'] is False
    for name in RECIPES:
        result = report['recipes'][name]
        assert result['ok'] is True, result['reason']
        a, b = result['losses_a'], result['losses_b']
        assert len(a) == len(b) == 2
        for rank in range(2):
            assert len(a[rank]) == 4 and all(math.isfinite(x) for x in a[rank])
            assert b[rank] == a[rank][2:], f'{name}, rank {rank}'  # bit for bit (JSON keeps every float exactly)
        assert a[0] != a[1]  # each rank trains on its own samples
        assert result['eval_steps_a'] == [2, 4] and result['eval_steps_b'] == [4]
        resumed_eval = result['evaluations_b']['eval/DiffusionLoss']['4']
        assert resumed_eval == result['evaluations_a']['eval/DiffusionLoss']['4']  # the EMA weights resumed too
        assert result['ms_per_step'] > 0
        recipe_dir = work / 'recipes' / name[:-5].replace('/', '_')
        shards = sorted(os.listdir(recipe_dir / 'checkpoints' / 'ep0-ba2'))
        assert [s for s in shards if s.endswith('.distcp')] == ['__0_0.distcp', '__1_0.distcp']  # sharded, 2 ranks
    cifar_result = report['recipes'][RECIPES[0]]
    assert cifar_result['adaptive_probes'] == [4, 4]
    assert cifar_result['evaluations_b']['BitsPerDim']['4'] == cifar_result['evaluations_a']['BitsPerDim']['4']
    grids = [work / 'recipes' / 'cifar10_adaptive' / run / 'eval' / 'samples_ba0000004.png' for run in 'AB']
    assert grids[0].read_bytes() == grids[1].read_bytes()  # the same EMA samples after resuming

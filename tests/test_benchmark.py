"""The benchmark harness end to end in its --quick modes: the race (2 methods, 1 seed, 40 steps) and the loop
overhead measurement (2 blocks of 5 steps)."""

import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'recipes'))

import benchmark  # noqa: E402


def test_steps_to_reach_interpolates():
    assert benchmark.steps_to_reach([10, 20, 30], [9.0, 5.0, 3.0], 4.0) == 25.0
    assert benchmark.steps_to_reach([10, 20], [9.0, 5.0], 1.0) is None
    assert benchmark.steps_to_reach([10, 20], [3.0, 1.0], 4.0) == 10.0


def test_quick_benchmark_writes_table_plot_and_raw_numbers(digits_mds, tmp_path):
    out = tmp_path / 'bench'
    assert benchmark.main(['--quick', '--workers', '1', '--data', digits_mds, '--out', str(out)]) == 0
    results = json.loads((out / 'results.json').read_text())
    table = results['summary']['table']
    assert set(table) == {'uniform', 'adaptive_clts_md'}
    assert table['uniform']['step_time_ratio'] == 1.0
    for row in table.values():
        assert row['final_fid_mean'] > 0 and row['bits_per_dim_mean'] > 0
    assert [r['fid_steps'] for r in results['runs']] == [[20, 40], [20, 40]]
    assert (out / 'fid.png').stat().st_size > 0
    assert '| uniform |' in (out / 'results.md').read_text()
    # What the sampler did: the adaptive run's logged record and a heatmap per run; uniform logs no sampler record.
    traces = {r['method']: r['sampler_trace'] for r in results['runs']}
    assert traces['uniform'] == {}
    mean_t = traces['adaptive_clts_md']['adaptive/mean_t']
    # Probes run every 40 optimizer steps from the first: one update, logged once that step is done.
    assert [step for step, _ in mean_t] == [1] and 0 < mean_t[0][1] < 1000
    assert 'The adaptive sampler over training' in (out / 'results.md').read_text()
    for run in ('uniform-s0', 'adaptive_clts_md-s0'):
        assert (out / 'runs' / run / 'timestep_heatmap.png').stat().st_size > 0


def test_a_variant_is_its_method_with_overrides():
    assert benchmark.split_variant('adaptive') == ('adaptive', [])
    assert benchmark.split_variant('adaptive@algorithms.adaptive_timestep_sampling.entropy_coef=0.5;seed=3') == (
        'adaptive', ['algorithms.adaptive_timestep_sampling.entropy_coef=0.5', 'seed=3'])
    with tempfile.TemporaryDirectory() as tmp:
        from composer_algos.config import load_config
        variant = 'adaptive@algorithms.adaptive_timestep_sampling.entropy_coef=0.5'
        cfg = load_config(benchmark._recipe(variant, tmp), benchmark.split_variant(variant)[1])
    assert cfg['algorithms']['adaptive_timestep_sampling']['entropy_coef'] == 0.5


def test_loop_overhead_quick_prints_a_ratio_last(digits_mds, capsys):
    import math
    import re
    assert benchmark.main(['--loop-overhead', '--quick', '--data', digits_mds]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    match = re.fullmatch(r'loop overhead, wall time per step, recipe / bare \(median over blocks\): (\d+\.\d+)',
                         lines[-1])
    assert match and math.isfinite(float(match.group(1))) and float(match.group(1)) > 0
    per_block = next(line for line in lines if line.startswith('per-block ratios'))
    assert len(per_block.split(':')[1].split()) == 2  # --quick: 2 measured blocks

"""The benchmark harness: its speed-up arithmetic against closed forms, end to end in its --quick mode (2 methods,
1 seed, 40 steps) on both tiers, and the loop overhead measurement (2 blocks of 5 steps)."""

import json
import math
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'recipes'))

import benchmark  # noqa: E402
import pytest  # noqa: E402


def test_steps_to_reach_interpolates():
    assert benchmark.steps_to_reach([10, 20, 30], [9.0, 5.0, 3.0], 4.0) == 25.0
    assert benchmark.steps_to_reach([10, 20], [9.0, 5.0], 1.0) is None
    assert benchmark.steps_to_reach([10, 20], [3.0, 1.0], 4.0) == 10.0


def test_quick_benchmark_writes_table_plot_and_raw_numbers(digits_mds, tmp_path, capsys):
    out = tmp_path / 'bench'
    assert benchmark.main(['--quick', '--workers', '1', '--data', digits_mds, '--out', str(out)]) == 0
    results = json.loads((out / 'results.json').read_text())
    # The same command again finds every run's record and trains nothing; another budget trains again.
    capsys.readouterr()
    assert benchmark.main(['--quick', '--workers', '1', '--data', digits_mds, '--out', str(out)]) == 0
    assert '2 of 2 runs are already in' in capsys.readouterr().out
    assert json.loads((out / 'results.json').read_text())['summary'] == results['summary']
    job = json.loads((out / 'runs' / 'uniform-s0' / 'run.json').read_text())['job']
    assert benchmark.finished_run(job) is not None and benchmark.finished_run(dict(job, steps=80)) is None
    assert results['tier'] == 'digits'
    table = results['summary']['table']
    assert set(table) == {'uniform', 'adaptive_clts_md'}
    assert table['uniform']['step_time_ratio'] == 1.0 and table['uniform']['speedup'] == 1.0
    for row in table.values():
        assert row['final_fid_mean'] > 0 and row['bits_per_dim_mean'] > 0
        assert set(row['thresholds']) == {'25%', '50%', '75%', '100%'}
        # 25% of 40 steps is before the first evaluation (step 20): no target there.
        assert row['thresholds']['25%']['target'] is None
    assert [r['fid_steps'] for r in results['runs']] == [[20, 40], [20, 40]]
    assert results['uniform_final_fid'] == table['uniform']['final_fid_mean']
    assert results['fid_floor'] == results['runs'][0]['fid_floor'] > 0
    assert results['feature_val_accuracy'] >= 0.95
    assert (out / 'fid.png').stat().st_size > 0
    assert '| uniform |' in (out / 'results.md').read_text()
    # What the sampler did: the adaptive run's logged record and a heatmap per run; uniform logs no sampler record.
    traces = {r['method']: r['sampler_trace'] for r in results['runs']}
    assert traces['uniform'] == {}
    mean_t = traces['adaptive_clts_md']['adaptive/mean_t']
    # Probes are due every 40 optimizer steps from the first; the recipe's warm-up trains steps 0 and 1 at lr 0, so
    # the first probe waits for step 2: one update, logged once that step is done.
    assert [step for step, _ in mean_t] == [3] and 0 < mean_t[0][1] < 1000
    assert 'The adaptive sampler over training' in (out / 'results.md').read_text()
    for run in ('uniform-s0', 'adaptive_clts_md-s0'):
        assert (out / 'runs' / run / 'timestep_heatmap.png').stat().st_size > 0


def test_quick_benchmark_on_the_mnist_tier(mnist_mds, mnist_classifier_cache, tmp_path, monkeypatch):
    from conftest import MNIST_SIZE

    from composer_algos.evaluation.features import load_or_train_digit_classifier
    monkeypatch.setenv('COMPOSER_ALGOS_CACHE', mnist_classifier_cache)  # the workers inherit it: trained once
    assert benchmark.TIERS['mnist'].image_size == MNIST_SIZE
    out = tmp_path / 'bench'
    assert benchmark.main(['--tier', 'mnist', '--quick', '--workers', '1', '--data', mnist_mds,
                           '--out', str(out)]) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['tier'] == 'mnist' and results['args']['steps'] == 40
    # The FID features are the MNIST classifier's: its validation accuracy is the one reported.
    mnist = load_or_train_digit_classifier(mnist_classifier_cache, {'dataset': 'mnist5k', 'image_size': MNIST_SIZE})
    assert results['feature_val_accuracy'] == mnist.accuracy
    assert results['fid_floor'] > 0 and results['uniform_final_fid'] > results['fid_floor']
    table = results['summary']['table']
    assert set(table) == {'uniform', 'adaptive_clts_md'}
    assert all(row['speedup'] is None or row['speedup'] > 0 for row in table.values())
    assert [r['fid_steps'] for r in results['runs']] == [[20, 40], [20, 40]]
    assert 'Tier mnist' in (out / 'results.md').read_text()


def test_quick_benchmark_races_the_flow_matching_recipes(digits_mds, tmp_path):
    out = tmp_path / 'bench'
    assert benchmark.main(['--quick', '--objective', 'flow_matching', '--workers', '1', '--data', digits_mds,
                           '--out', str(out)]) == 0
    results = json.loads((out / 'results.json').read_text())
    assert results['objective'] == 'flow_matching' and results['tier'] == 'digits'
    table = results['summary']['table']
    assert set(table) == {'uniform', 'adaptive_clts_md'} and table['uniform']['speedup'] == 1.0
    # No VLB, so no bits/dim; FID from Euler samples like any other run.
    assert all(row['bits_per_dim_mean'] is None and row['final_fid_mean'] > 0 for row in table.values())
    # The adaptive policy over sigma probed once the lr warm-up allowed (step 2), as on the DDPM recipe.
    trace = {r['method']: r['sampler_trace'] for r in results['runs']}['adaptive_clts_md']
    assert [step for step, _ in trace['adaptive/mean_t']] == [3]
    assert benchmark.TIERS['digits'].recipe_for('flow_matching') == 'yamls/digits/flow_uniform.yaml'


# Closed forms. Straight-line curves make linear interpolation exact: if a method's curve is uniform's with time
# running r times faster, M(s) = U(r s), it reaches uniform's FID at any step s after s / r steps.
STEPS = list(range(100, 1001, 100))


def _line(start: float, slope: float) -> list[float]:
    return [start - slope * s for s in STEPS]


def _run(method: str, seed: int, fid: list[float], floor: float = 1.0) -> dict:
    return {'method': method, 'seed': seed, 'fid_steps': STEPS, 'fid': fid, 'fid_floor': floor,
            'bits_per_dim': 1.0, 'mean_step_time': 0.1}


def test_value_at_and_speedup_at_interpolate():
    assert benchmark.value_at([10, 20], [9.0, 5.0], 15) == 7.0
    assert benchmark.value_at([10, 20], [9.0, 5.0], 20) == 5.0
    assert benchmark.value_at([10, 20], [9.0, 5.0], 5) is None
    uniform, method = _line(100, 0.05), _line(100, 0.1)  # the method learns twice as fast
    at = benchmark.speedup_at(STEPS, uniform, STEPS, method, 250)
    assert at == {'target': 87.5, 'reference_steps': 250.0, 'steps': 125.0, 'speedup': 2.0}
    never = benchmark.speedup_at(STEPS, uniform, STEPS, _line(100, 0.01), 1000)
    assert never['target'] == 50.0 and never['steps'] is None and never['speedup'] is None


def test_speedups_on_the_mean_curve_and_paired_per_seed():
    # Seed 0: the method is 2x as fast as uniform; seed 1: 4/3x. Paired per seed: those ratios at every fraction of
    # the budget, geometric mean sqrt(2 * 4/3). Mean curves: uniform 160 - 0.055 s, method 160 - 0.09 s, so the
    # mean-curve speed-up is 0.09 / 0.055 = 18/11 at every fraction.
    results = [_run('uniform', 0, _line(150, 0.05)), _run('fast', 0, _line(150, 0.1)),
               _run('uniform', 1, _line(170, 0.06)), _run('fast', 1, _line(170, 0.08))]
    summary = benchmark.summarize(results, budget=1000)
    assert summary['target_fid'] == pytest.approx(105.0)
    row = summary['table']['fast']
    assert row['speedup'] == pytest.approx(18 / 11)
    for key, fraction in (('25%', 0.25), ('50%', 0.5), ('75%', 0.75), ('100%', 1.0)):
        threshold = row['thresholds'][key]
        assert threshold['target'] == pytest.approx(160 - 0.055 * 1000 * fraction)
        assert threshold['steps'] == pytest.approx(1000 * fraction * 11 / 18)
        assert threshold['speedup'] == pytest.approx(18 / 11)
        paired = threshold['paired']
        assert paired['per_seed'] == pytest.approx([2.0, 4 / 3])
        assert paired['geomean'] == pytest.approx(math.sqrt(8 / 3))
        assert (paired['min'], paired['max'], paired['reached']) == (pytest.approx(4 / 3), pytest.approx(2.0), 2)
        assert paired['targets'] == pytest.approx([150 - 0.05 * 1000 * fraction, 170 - 0.06 * 1000 * fraction])
    assert summary['table']['uniform']['speedup'] == pytest.approx(1.0)


def test_a_seed_that_never_reaches_the_target_is_counted_not_averaged():
    results = [_run('uniform', 0, _line(150, 0.05)), _run('slow', 0, _line(150, 0.04)),
               _run('uniform', 1, _line(150, 0.05)), _run('slow', 1, _line(150, 0.1))]
    paired = benchmark.summarize(results)['table']['slow']['thresholds']['100%']['paired']
    # Uniform ends at 100. Seed 0 ends at 110 (never there); seed 1 gets there at step 500.
    assert paired['per_seed'] == [None, pytest.approx(2.0)] and paired['reached'] == 1
    assert paired['geomean'] is None and paired['min'] == paired['max'] == pytest.approx(2.0)
    assert benchmark._fmt_spread(paired) == '1/2: 2.00-2.00x'


def test_log_fid_area_ratio_in_closed_form():
    # ln(FID / floor) = a - b s is a straight line, so the trapezoid rule is exact: the area per step over
    # [100, 1000] is a - b * 550. Uniform: 3 - 0.002 s (area 1.9); method: 2 - 0.002 s (area 0.9).
    floor = 4.0
    uniform = [floor * math.exp(3 - 0.002 * s) for s in STEPS]
    method = [floor * math.exp(2 - 0.002 * s) for s in STEPS]
    assert benchmark.log_fid_area(STEPS, uniform, floor) == pytest.approx(1.9)
    # Without the floor the area carries ln(floor): the constant that the floor-relative ratio leaves out.
    assert benchmark.log_fid_area(STEPS, uniform) == pytest.approx(1.9 + math.log(floor))
    summary = benchmark.summarize([_run('uniform', 0, uniform, floor), _run('m', 0, method, floor)])
    assert summary['fid_floor'] == floor
    assert summary['table']['m']['log_fid_area_ratio'] == pytest.approx(0.9 / 1.9)
    assert summary['table']['m']['log_fid_area_ratio_paired']['per_seed'] == [pytest.approx(0.9 / 1.9)]
    assert summary['table']['uniform']['log_fid_area_ratio'] == pytest.approx(1.0)


def test_methods_split_outside_brackets():
    assert benchmark.split_methods('uniform,clts@model.denoiser.block_out_channels=[32,64];seed=1,md') == [
        'uniform', 'clts@model.denoiser.block_out_channels=[32,64];seed=1', 'md']


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


def _race(folder, runs, **args):
    folder.mkdir()
    settings = {'steps': 1000, 'eval_every': 100, 'fid_samples': 500, 'ddim_steps': 25, 'bpd_images': 128,
                'bpd_terms': 50, 'seeds': '0,1', **args}
    (folder / 'results.json').write_text(json.dumps({'tier': 'mnist', 'args': settings, 'runs': runs}))
    return str(folder)


def test_races_with_the_same_uniform_runs_combine_and_others_refuse(tmp_path):
    uniform = [_run('uniform', s, _line(100 + s, 0.05)) for s in (0, 1)]
    fast = [_run('fast', s, [v / 2 for v in _line(100 + s, 0.05)]) for s in (0, 1)]
    slow = [_run('slow', s, _line(200, 0.05)) for s in (0, 1)]
    a = _race(tmp_path / 'a', uniform + fast)
    b = _race(tmp_path / 'b', uniform + slow + [_run('fast', 0, _line(1, 0))])
    first, runs = benchmark.combine_races([a, b])
    # uniform once, each method from the first race that has it.
    assert [(r['method'], r['seed']) for r in runs] == [('uniform', 0), ('uniform', 1), ('fast', 0), ('fast', 1),
                                                         ('slow', 0), ('slow', 1)]
    assert runs[2]['fid'] == fast[0]['fid']
    out = tmp_path / 'combined'
    assert benchmark.main(['--combine', f'{a},{b}', '--out', str(out)]) == 0
    combined = json.loads((out / 'results.json').read_text())
    assert set(combined['summary']['table']) == {'uniform', 'fast', 'slow'}
    assert combined['uniform_final_fid'] == pytest.approx((50 + 51) / 2)
    other = _race(tmp_path / 'c', [_run('uniform', 0, _line(100, 0.05)), _run('uniform', 1, _line(99, 0.05))])
    with pytest.raises(ValueError, match='uniform runs are not those'):
        benchmark.combine_races([a, other])
    longer = _race(tmp_path / 'd', uniform, steps=2000)
    with pytest.raises(ValueError, match=r"differs .* in \['steps'\]"):
        benchmark.combine_races([a, longer])

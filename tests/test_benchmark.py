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

from composer_algos.machine import fingerprint_key  # noqa: E402


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
    assert '2 finished runs in' in capsys.readouterr().out
    assert json.loads((out / 'results.json').read_text())['summary'] == results['summary']
    machine = fingerprint_key(benchmark.current_fingerprint())
    job = json.loads((out / 'runs' / f'uniform-s0-{machine}' / 'run.json').read_text())['job']
    assert benchmark.finished_run(job) is not None and benchmark.finished_run(dict(job, steps=80)) is None
    # Each run names its machine and the FID weights it was measured on.
    assert {r['fingerprint_key'] for r in results['runs']} == {machine}
    assert {r['feature_sha256'] for r in results['runs']} == {benchmark.TIERS['digits'].feature_sha256}
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
        assert (out / 'runs' / f'{run}-{machine}' / 'timestep_heatmap.png').stat().st_size > 0


def test_quick_benchmark_on_the_mnist_tier(mnist_mds, mnist_classifier_cache, tmp_path):
    from conftest import MNIST_SIZE

    from composer_algos.evaluation.features import load_or_train_digit_classifier

    assert benchmark.TIERS['mnist'].image_size == MNIST_SIZE
    out = tmp_path / 'bench'
    assert benchmark.main(['--tier', 'mnist', '--quick', '--workers', '1', '--data', mnist_mds, '--out', str(out)]) == 0
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
    assert (
        benchmark.main(
            ['--quick', '--objective', 'flow_matching', '--workers', '1', '--data', digits_mds, '--out', str(out)]
        )
        == 0
    )
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
    return {
        'method': method,
        'seed': seed,
        'fid_steps': STEPS,
        'fid': fid,
        'fid_floor': floor,
        'bits_per_dim': 1.0,
        'mean_step_time': 0.1,
    }


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
    results = [
        _run('uniform', 0, _line(150, 0.05)),
        _run('fast', 0, _line(150, 0.1)),
        _run('uniform', 1, _line(170, 0.06)),
        _run('fast', 1, _line(170, 0.08)),
    ]
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
    results = [
        _run('uniform', 0, _line(150, 0.05)),
        _run('slow', 0, _line(150, 0.04)),
        _run('uniform', 1, _line(150, 0.05)),
        _run('slow', 1, _line(150, 0.1)),
    ]
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
        'uniform',
        'clts@model.denoiser.block_out_channels=[32,64];seed=1',
        'md',
    ]


def test_a_variant_is_its_method_with_overrides():
    assert benchmark.split_variant('adaptive') == ('adaptive', [])
    assert benchmark.split_variant('adaptive@algorithms.adaptive_timestep_sampling.entropy_coef=0.5;seed=3') == (
        'adaptive',
        ['algorithms.adaptive_timestep_sampling.entropy_coef=0.5', 'seed=3'],
    )
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
    match = re.fullmatch(
        r'loop overhead, wall time per step, recipe / bare \(median over blocks\): (\d+\.\d+)', lines[-1]
    )
    assert match and math.isfinite(float(match.group(1))) and float(match.group(1)) > 0
    per_block = next(line for line in lines if line.startswith('per-block ratios'))
    assert len(per_block.split(':')[1].split()) == 2  # --quick: 2 measured blocks


def _race(folder, runs, **args):
    folder.mkdir()
    settings = {
        'steps': 1000,
        'eval_every': 100,
        'fid_samples': 500,
        'ddim_steps': 25,
        'bpd_images': 128,
        'bpd_terms': 50,
        'seeds': '0,1',
        **args,
    }
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
    assert [(r['method'], r['seed']) for r in runs] == [
        ('uniform', 0),
        ('uniform', 1),
        ('fast', 0),
        ('fast', 1),
        ('slow', 0),
        ('slow', 1),
    ]
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


def test_paired_speedup_counts_a_miss_at_the_budgets_end():
    uniform = _line(100, 0.05)  # ends at 50 at step 1000
    assert benchmark.paired_speedup(STEPS, uniform, STEPS, _line(100, 0.1), 1000, 1000) == (pytest.approx(2.0), True)
    # Never reaches 50: counted as reaching it at step 1000, so at most 1000 / 1000.
    assert benchmark.paired_speedup(STEPS, uniform, STEPS, _line(100, 0.01), 1000, 1000) == (1.0, False)
    # Uniform's FID at 75% of the budget (62.5) is reached at step 750 by uniform, 375 by the method.
    assert benchmark.paired_speedup(STEPS, uniform, STEPS, _line(100, 0.1), 750, 1000) == (pytest.approx(2.0), True)


def test_geomean_interval_and_the_detectable_speedup():
    from composer_algos.evaluation.speedup import geomean_ci, min_detectable_speedup

    point, low, high = geomean_ci([1.1, 1.2, 1.3, 1.25, 1.15])
    assert point == pytest.approx(math.exp(sum(math.log(r) for r in (1.1, 1.2, 1.3, 1.25, 1.15)) / 5))
    assert 1.1 <= low < point < high <= 1.3
    assert geomean_ci([1.5, 1.5, 1.5]) == pytest.approx((1.5, 1.5, 1.5))
    # (t_0.975,4 + t_0.8,4) sd / sqrt(5) = (2.7764 + 0.9410) * 0.1 / 2.2361 on the log scale.
    assert math.log(min_detectable_speedup(0.1, 5)) == pytest.approx((2.7764 + 0.9410) * 0.1 / math.sqrt(5), rel=1e-3)
    assert min_detectable_speedup(0.1, 10) < min_detectable_speedup(0.1, 5)


def test_leaderboard_pairs_each_seed_and_reports_the_aa_null():
    runs = []
    for seed, (start, slope) in enumerate([(150, 0.05), (170, 0.06), (160, 0.055)]):
        runs += [
            _run('uniform', seed, _line(start, slope)),
            _run('min_snr', seed, _line(start, 2 * slope)),
            _run('uniform_aa', seed, _line(start, slope * (1 + 0.02 * (seed - 1)))),
            _run('clts_md', seed, _line(start, slope * 0.5)),
        ]
    board = benchmark.leaderboard(runs, 1000, {'min_snr': {'overrides': ['g=2']}}, {'min_snr': 1.01})
    methods = board['methods']
    assert set(methods) == {'uniform', 'uniform_aa', 'min_snr_weighting', 'curriculum_timestep_schedule+momentum_decay'}
    fast = methods['min_snr_weighting']
    assert fast['speedup_u100']['per_seed'] == pytest.approx([2.0, 2.0, 2.0])
    assert fast['speedup_u100']['reached'] == 3 and fast['speedup_u100']['ci95'] == pytest.approx([2.0, 2.0])
    assert fast['speedup_u75']['geomean'] == pytest.approx(2.0) and fast['step_time_ratio'] == 1.01
    assert fast['config'] == {'overrides': ['g=2']} and fast['seeds'] == [0, 1, 2]
    # Half as fast never reaches uniform's final FID: counted at the budget's end, so 1.0, none reached.
    slow = methods['curriculum_timestep_schedule+momentum_decay']['speedup_u100']
    assert slow['per_seed'] == pytest.approx([1.0, 1.0, 1.0]) and slow['reached'] == 0
    low, high = board['null_speedup_ci']
    assert low <= 1.0 <= high and board['power']['seeds'] == 3
    assert board['power']['min_detectable_speedup_u100'] > 1.0
    assert board['uniform_final_fid'] == pytest.approx((100 + 110 + 105) / 3)


def _finished(out, method, seed, machine, fid, job_args):
    job = benchmark.make_job(job_args, method, seed)
    folder = out / 'runs' / f'{method}-s{seed}-{machine}'
    folder.mkdir(parents=True)
    result = dict(
        _run(method, seed, fid), fingerprint_key=machine, feature_sha256=benchmark.TIERS['digits'].feature_sha256
    )
    (folder / 'run.json').write_text(json.dumps({'job': benchmark._portable(job), 'result': result}))
    return job


def test_runs_pair_only_within_one_machine_fingerprint(tmp_path):
    import argparse

    args = argparse.Namespace(
        steps=1000,
        eval_every=100,
        fid_samples=64,
        ddim_steps=5,
        bpd_images=8,
        bpd_terms=4,
        data=str(tmp_path / 'data'),
        out=str(tmp_path),
        tier='digits',
        objective='ddpm',
    )
    # Another machine ran uniform and min_snr on seed 0, and only min_snr on seed 1.
    _finished(tmp_path, 'uniform', 0, 'aaaa0000', _line(100, 0.05), args)
    _finished(tmp_path, 'min_snr', 0, 'aaaa0000', _line(100, 0.1), args)
    _finished(tmp_path, 'min_snr', 1, 'aaaa0000', _line(100, 0.1), args)
    jobs = [benchmark.make_job(args, m, s) for s in (0, 1) for m in ('uniform', 'min_snr', 'p2')]
    todo, chosen = benchmark.plan_runs(jobs, 'bbbb1111')
    # Seed 0's min_snr pairs with that machine's uniform; p2 is new, so it trains here with uniform seed 0 again.
    # Seed 1's min_snr has no uniform of its machine: it trains here, with uniform, as does p2.
    assert [(j['method'], j['seed']) for j in todo] == [
        ('uniform', 0),
        ('p2', 0),
        ('uniform', 1),
        ('min_snr', 1),
        ('p2', 1),
    ]
    assert [(r['method'], r['seed'], r['fingerprint_key']) for r in chosen] == [
        ('uniform', 0, 'aaaa0000'),
        ('min_snr', 0, 'aaaa0000'),
    ]
    # Other FID weights do not count as a finished run.
    record = json.loads((tmp_path / 'runs' / 'min_snr-s0-aaaa0000' / 'run.json').read_text())
    record['result']['feature_sha256'] = 'retrained'
    (tmp_path / 'runs' / 'min_snr-s0-aaaa0000' / 'run.json').write_text(json.dumps(record))
    assert benchmark.finished_runs(jobs[1]) == {}


def test_combining_races_of_two_machines_is_refused(tmp_path):
    here = [dict(_run('uniform', s, _line(100 + s, 0.05)), fingerprint_key='aaaa0000') for s in (0, 1)]
    there = [dict(r, fingerprint_key='bbbb1111') for r in here]
    a = _race(tmp_path / 'a', here)
    b = _race(tmp_path / 'b', there + [dict(_run('fast', 0, _line(50, 0.01)), fingerprint_key='bbbb1111')])
    with pytest.raises(ValueError, match='other machines'):
        benchmark.combine_races([a, b])


def test_tuning_then_leaderboard_end_to_end(digits_mds, tmp_path, monkeypatch, capsys):
    # A grid of two settings per stage, one seed, 40 steps: the harness, not the numbers.
    monkeypatch.setattr(benchmark, 'TUNING_LR', benchmark.TUNING_LR[:2])
    monkeypatch.setattr(benchmark, 'TUNING_EMA', benchmark.TUNING_EMA[:2])
    grid = benchmark.TUNING_GRIDS['ddpm']
    monkeypatch.setitem(benchmark.TUNING_GRIDS, 'ddpm', {'min_snr': grid['min_snr'][:2], 'md': grid['md'][:1]})
    common = [
        '--tier',
        'digits',
        '--steps',
        '40',
        '--eval-every',
        '20',
        '--fid-samples',
        '48',
        '--ddim-steps',
        '4',
        '--bpd-images',
        '16',
        '--bpd-terms',
        '4',
        '--workers',
        '1',
        '--data',
        digits_mds,
    ]
    tuning = tmp_path / 'tuning'
    assert benchmark.main(['--tune', *common, '--seeds', '100', '--out', str(tuning)]) == 0
    record = json.loads((tuning / 'results.json').read_text())
    assert record['steps'] == 20 and record['seeds'] == [100] and record['complete']
    lr_stage = record['stages']['uniform: learning rate']
    assert set(lr_stage['settings']) == set(benchmark.TUNING_LR[:2])
    best = min(lr_stage['settings'].items(), key=lambda kv: kv[1]['score'])[0]
    assert lr_stage['winner'] == best and record['winners']['base'][0] == best
    assert record['winners']['md'] == ['algorithms.momentum_decay.beta_end=0.5']
    assert '**winner**' in (tuning / 'results.md').read_text()
    board = tmp_path / 'board'
    # A method whose tuning has not finished is refused by name.
    with pytest.raises(SystemExit):
        benchmark.main(['--leaderboard', *common, '--tuning', str(tuning), '--methods', 'speed', '--out', str(board)])
    assert "no tuning winner yet for ['speed']" in capsys.readouterr().err
    assert (
        benchmark.main(
            [
                '--leaderboard',
                *common,
                '--tuning',
                str(tuning),
                '--seeds',
                '0',
                '--methods',
                'uniform_aa,min_snr',
                '--out',
                str(board),
            ]
        )
        == 0
    )
    result = json.loads((board / 'results.json').read_text())
    assert set(result['methods']) == {'uniform', 'uniform_aa', 'min_snr_weighting'}
    assert result['methods']['min_snr_weighting']['config']['overrides'][:2] == record['winners']['base']
    assert result['methods']['min_snr_weighting']['config']['overrides'][2:] == record['winners']['min_snr']
    for key in (
        'tier',
        'objective',
        'steps',
        'fid_samples',
        'seeds',
        'uniform_final_fid',
        'fid_floor',
        'null_speedup_ci',
    ):
        assert key in result, key
    # Uniform's final weights were scored from 4 more noise seeds; the A/A run keyed its draws apart.
    uniform = next(r for r in result['runs'] if r['method'] == 'uniform')
    assert sorted(uniform['fid_noise_seeds']) == ['1', '2', '3', '4']
    aa = next(r for r in result['runs'] if r['method'] == 'uniform_aa')
    assert aa['fid'] != uniform['fid']
    assert result['fid_noise']['noise_seeds'] == 5 and result['fid_noise']['noise_sd_relative'] > 0
    assert (board / 'fid.png').stat().st_size > 0 and '| min_snr_weighting |' in (board / 'results.md').read_text()


def test_the_objective_as_a_row_pairs_flow_and_ddpm_uniform_by_seed():
    ddpm = [dict(_run('uniform', s, _line(150, 0.05)), fingerprint_key='m') for s in (0, 1)]
    flow = [dict(_run('uniform', s, _line(150, 0.1)), fingerprint_key='m') for s in (0, 1)]
    flow.append(dict(_run('uniform', 2, _line(150, 0.1)), fingerprint_key='m'))  # no DDPM partner: left out
    comparison = benchmark.objective_comparison(ddpm, flow, 1000)
    assert comparison['seeds'] == [0, 1]
    assert comparison['flow_speedup_to_ddpm_final']['per_seed'] == pytest.approx([2.0, 2.0])
    assert comparison['final_fid_ratio_flow_over_ddpm']['geomean'] == pytest.approx(50 / 100)
    assert benchmark.objective_comparison(ddpm, [dict(flow[0], fingerprint_key='other')], 1000)['seeds'] == []


def test_a_composition_of_methods_adds_every_fragment():
    method = 'log_normal+min_snr@algorithms.min_snr_weighting.gamma=2.0'
    assert benchmark.known_method(method) and not benchmark.known_method('log_normal+nothing')
    assert benchmark.fragments(method) == ['log_normal_sampling', 'min_snr_weighting']
    assert benchmark.leaderboard_name(method) == 'log_normal_sampling+min_snr_weighting'
    assert benchmark.components(method) == ['log_normal', 'min_snr']
    assert benchmark.split_variant('adaptive_paper+min_snr')[1] == [
        'algorithms.adaptive_timestep_sampling.reward=paper'
    ]
    with tempfile.TemporaryDirectory() as tmp:
        from composer_algos.config import load_config

        cfg = load_config(benchmark._recipe(method, tmp), benchmark.split_variant(method)[1])
    assert cfg['algorithms']['min_snr_weighting']['gamma'] == 2.0 and 'log_normal_sampling' in cfg['algorithms']


def test_each_adaptive_setting_is_its_own_leaderboard_method_with_its_own_tuning():
    assert benchmark.leaderboard_name('adaptive_frozen_average') == 'adaptive_timestep_sampling_frozen_average'
    assert benchmark.leaderboard_name('adaptive_importance') == 'adaptive_timestep_sampling_importance'
    assert benchmark.leaderboard_name('adaptive') == 'adaptive_timestep_sampling'
    # A setting takes its own winners: the published one is not tuned on the default setting's.
    assert benchmark.components('adaptive_paper') == ['adaptive_paper']
    assert benchmark.components('adaptive_clts_md') == ['adaptive', 'clts', 'md']
    for objective, methods in benchmark.LEADERBOARD_METHODS.items():
        for method in methods:
            if benchmark.fragments(method):
                assert all(c in benchmark.TUNING_GRIDS[objective] for c in benchmark.components(method)), method
    assert 1 < len(benchmark.TUNING_GRIDS['ddpm']['adaptive']) <= 3
    with tempfile.TemporaryDirectory() as tmp:
        from composer_algos.config import load_config

        method = 'adaptive_importance'
        cfg = load_config(benchmark._recipe(method, tmp), benchmark.split_variant(method)[1])
    assert cfg['algorithms']['adaptive_timestep_sampling']['importance_weighted'] is True


def test_the_frozen_average_trains_after_the_adaptive_run_it_averages(tmp_path):
    import argparse

    from composer_algos.registry import ConfigError

    args = argparse.Namespace(
        steps=1000,
        eval_every=100,
        fid_samples=64,
        ddim_steps=5,
        bpd_images=8,
        bpd_terms=4,
        data=str(tmp_path / 'data'),
        out=str(tmp_path),
        tier='digits',
        objective='ddpm',
    )
    machine = 'aaaa0000'
    jobs = [benchmark.make_job(args, m, s) for s in (0, 1) for m in ('uniform', 'adaptive_frozen_average', 'adaptive')]
    stages = benchmark.dependency_stages(jobs, machine)
    assert [[(j['method'], j['seed']) for j in stage] for stage in stages] == [
        [('uniform', 0), ('adaptive', 0), ('uniform', 1), ('adaptive', 1)],
        [('adaptive_frozen_average', 0), ('adaptive_frozen_average', 1)],
    ]
    # Without the adaptive run of its seed, in the race or finished on this machine, it is refused before training.
    frozen = [j for j in jobs if j['method'] == 'adaptive_frozen_average']
    with pytest.raises(ConfigError, match='adaptive run of seed 0 of this race on this machine'):
        benchmark.dependency_stages(frozen, machine)
    # Finished earlier on this machine (its run.json and heatmap): the override points at its heatmap.
    _finished(tmp_path, 'adaptive', 0, machine, _line(100, 0.05), args)
    folder = tmp_path / 'runs' / f'adaptive-s0-{machine}'
    (folder / 'timestep_heatmap.npz').write_bytes(b'')
    assert benchmark.dependency_overrides(frozen[0], machine) == [
        f'algorithms.adaptive_timestep_sampling.frozen_average={folder}/timestep_heatmap.npz'
    ]
    with pytest.raises(ConfigError, match='seed 0'):
        benchmark.dependency_overrides(frozen[0], 'bbbb1111')  # another machine's run does not count
    with pytest.raises(ConfigError, match='adaptive run of seed 1'):
        benchmark.dependency_stages(frozen, machine)
    with pytest.raises(ConfigError, match='fixed sampler'):
        benchmark.step_overhead('digits', ['adaptive_frozen_average'], str(tmp_path), 1, 1)


def test_the_noise_methods_and_the_low_discrepancy_draw_race_under_their_names():
    assert benchmark.leaderboard_name('noise_assignment') == 'noise_assignment'
    assert benchmark.leaderboard_name('noise_assignment_knn') == 'noise_assignment_knn'
    assert benchmark.leaderboard_name('low_discrepancy') == 'low_discrepancy'
    assert benchmark.leaderboard_name('adaptive_paper') == 'adaptive_timestep_sampling_paper'
    # KNN is tuned on its own grid (k), not on the assignment's cost.
    assert benchmark.components('noise_assignment_knn') == ['noise_assignment_knn']
    assert benchmark.components('low_discrepancy') == [] and benchmark.components('clts_md') == ['clts', 'md']
    for objective in ('ddpm', 'flow_matching'):
        grid = benchmark.TUNING_GRIDS[objective]
        assert grid['noise_assignment'][0] == ('algorithms.noise_assignment.cost=l2',)
        assert len(grid['noise_assignment_knn']) == 3
        assert {'noise_assignment', 'noise_assignment_knn'} <= set(benchmark.LEADERBOARD_METHODS[objective])
    assert 'low_discrepancy' in benchmark.LEADERBOARD_METHODS['ddpm']
    knn = benchmark.method_config(
        'noise_assignment_knn@algorithms.noise_assignment.k=16', 'digits', 'ddpm', 'data', 10, 'x'
    )
    assert knn['algorithms']['noise_assignment'] == {
        'mode': 'knn',
        'cost': 'l2',
        'scope': 'global',
        'by_condition': False,
        'k': 16,
    }
    drawn = benchmark.method_config('low_discrepancy', 'mnist', 'ddpm', 'data', 10, 'x')
    assert drawn['model']['low_discrepancy'] is True and set(drawn['algorithms']) == {'ema'}
    flow = benchmark.method_config('noise_assignment', 'mnist', 'flow_matching', 'data', 10, 'x')
    assert flow['model']['objective'] == 'flow_matching'
    assert flow['algorithms']['noise_assignment']['mode'] == 'hungarian'


def test_schedule_free_races_with_its_own_learning_rate_over_the_tuned_base():
    # Uniform's tuned AdamW rate comes first in a race's overrides; schedule-free's own setting must win over it.
    base = ['optimizer.lr=4.0e-3', 'algorithms.ema.half_life=50ba']
    for objective in ('ddpm', 'flow_matching'):
        grid = benchmark.TUNING_GRIDS[objective]['schedule_free']
        assert grid[0] == ('optimizer.lr=2.5e-3',) and len(grid) == 3
        assert 'schedule_free' in benchmark.LEADERBOARD_METHODS[objective]
        cfg = benchmark.method_config(
            benchmark._variant('schedule_free', grid[2]), 'mnist', objective, 'data', 10, 'x', base
        )
        assert cfg['optimizer']['name'] == 'schedulefree_adamw' and cfg['optimizer']['lr'] == 1.0e-2
        assert cfg['scheduler'] is None and cfg['algorithms']['ema']['half_life'] == '50ba'
        assert 'schedule_free' in cfg['algorithms']
    assert benchmark.leaderboard_name('schedule_free') == 'schedule_free'
    assert benchmark.components('schedule_free') == ['schedule_free']

"""The variable-length all-gather, on one process and on two gloo ranks launched by ``composer -n 2``.

Run as a script under the launcher (``composer -n 2 tests/test_collectives.py OUT_DIR``), each rank gathers the
cases below and saves what it received to ``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import os
import sys

import torch
from two_ranks import launch_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cases(rank: int) -> dict[str, torch.Tensor]:
    """What rank ``rank`` contributes to each case: lengths that differ, an empty rank, all ranks empty, equal."""
    return {
        'rows': torch.arange(6 - 4 * rank, dtype=torch.float64).view(-1, 2) + 100 * rank,  # 3 rows, then 1
        'one_empty': torch.arange(2 * rank, dtype=torch.long) + 7,  # 0 elements, then 2
        'all_empty': torch.zeros((0, 3), dtype=torch.float32),
        'equal': torch.full((2, 2, 2), float(rank)),
    }


def _expected(world_size: int) -> dict[str, list[torch.Tensor]]:
    per_rank = [_cases(r) for r in range(world_size)]
    return {name: [cases[name] for cases in per_rank] for name in per_rank[0]}


def test_one_process_returns_the_tensor_itself():
    from composer_algos.distributed import all_gather_variable

    rows = torch.arange(6.0).view(3, 2)
    (gathered,) = all_gather_variable(rows)
    assert gathered is rows


def test_two_gloo_ranks_gather_every_rank_trimmed_to_its_length(tmp_path):
    code, stdout, stderr = launch_ranks(os.path.abspath(__file__), str(tmp_path), timeout=300)
    assert code == 0, stdout[-3000:] + stderr[-6000:]
    expected = _expected(2)
    for rank in range(2):
        received = torch.load(tmp_path / f'rank{rank}.pt')
        assert set(received) == set(expected), rank
        for name, parts in expected.items():
            got = received[name]
            assert len(got) == 2, (rank, name)
            for part, want in zip(got, parts):
                assert part.dtype == want.dtype and part.shape == want.shape and torch.equal(part, want), (
                    rank,
                    name,
                    part,
                    want,
                )


def _rounds(folder, rank: int) -> int:
    path = folder / f'rank{rank}.txt'
    return len(path.read_text().split()) if path.exists() else 0


def test_a_gloo_group_torn_down_right_after_gathering_never_hangs(tmp_path):
    # Torch 2.7 can hang destroying a gloo group a moment after a collective; the script makes that moment likely.
    # The package's collectives and teardown go through 30 rounds; the same rounds through torch.distributed alone
    # hang within a few (the control shows the script does provoke the hang, so the first half can fail).
    script = os.path.join(ROOT, 'tests', 'gloo_teardown_run.py')
    (tmp_path / 'package').mkdir()
    code, stdout, stderr = launch_ranks(script, str(tmp_path / 'package'), 'package', '30', timeout=240)
    assert code == 0, f'exit {code}: ' + stdout[-2000:] + stderr[-4000:]
    assert [_rounds(tmp_path / 'package', rank) for rank in range(2)] == [30, 30]
    (tmp_path / 'torch').mkdir()
    code, _, _ = launch_ranks(script, str(tmp_path / 'torch'), 'torch', '30', timeout=60)
    assert code is None and min(_rounds(tmp_path / 'torch', rank) for rank in range(2)) < 30


def _rank_main(out_dir: str) -> None:
    import torch.distributed as torch_dist

    from composer_algos.distributed import all_gather_variable, destroy_process_group

    torch_dist.init_process_group('gloo')
    try:
        rank = torch_dist.get_rank()
        received = {name: all_gather_variable(tensor) for name, tensor in _cases(rank).items()}
        torch.save(received, os.path.join(out_dir, f'rank{rank}.pt'))
        # Tearing the group down while the other rank is still gathering can leave rank 0 waiting forever.
        torch_dist.barrier()
    finally:
        destroy_process_group()


if __name__ == '__main__':
    _rank_main(sys.argv[1])

"""Noise assignment: the assignment against brute force for both costs, KNN's nearest candidate, the batch's noises
permuted and labels kept, the refusal of single-sample batches, degenerate batches in the log, Trainer runs on both
objectives with exact resume, and one global batch paired alike on 1 and 2 ranks."""

import itertools
import logging
import os
import sys

import pytest
import torch
from composer.core import Event, State
from composer.loggers import InMemoryLogger, Logger
from conftest import LossRecorder, make_trainer, tiny_model

from composer_algos.algorithms.noise_assignment import (
    NoiseAssignment,
    candidate_costs,
    hungarian_assignment,
    pairwise_cost,
)
from composer_algos.diffusion import FlowMatchingModel, FlowSchedule, TimeConditionedConvNet
from composer_algos.diffusion.draw import NoiseDraw, training_randoms
from composer_algos.registry import ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _draw(batch: int = 8, labels=None, seed: int = 0, index: int = 0) -> NoiseDraw:
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.randn((batch, 1, 4, 4), generator=gen)
    _, noise = training_randoms(seed, index, x0)
    return NoiseDraw(x0, noise, labels, seed, index)


def _total(cost: torch.Tensor, perm) -> float:
    return float(cost[torch.arange(cost.shape[0]), torch.as_tensor(perm)].sum())


def init(algorithm, model) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    state = State(
        model=model,
        rank_zero_seed=0,
        run_name='x',
        device='cpu',
        optimizers=opt,
        max_duration='10ba',
        dataloader=[None],
        dataloader_label='train',
    )
    algorithm.apply(Event.INIT, state, Logger(state))


# ------------------------------------------------------------------------------------------- the functional forms
@pytest.mark.parametrize('cost', ['l2', 'sq_l2'])
@pytest.mark.parametrize('batch', [2, 3, 5, 7])
def test_the_assignment_is_the_brute_force_optimum(cost, batch):
    for seed in range(3):
        draw = _draw(batch, seed=seed)
        matrix = pairwise_cost(draw.x0, draw.noise, cost)
        best = min(_total(matrix, p) for p in itertools.permutations(range(batch)))
        perm = hungarian_assignment(matrix)
        assert sorted(perm.tolist()) == list(range(batch))
        assert _total(matrix, perm) == pytest.approx(best, rel=1e-12)
        assert _total(matrix, perm) <= _total(matrix, range(batch))


def test_the_costs_in_closed_form():
    x0, noise = torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([[3.0, 4.0], [1.0, 2.0]])
    expected = torch.tensor([[5.0, 5**0.5], [13**0.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(pairwise_cost(x0, noise, 'l2'), expected)
    torch.testing.assert_close(pairwise_cost(x0, noise, 'sq_l2'), expected.square())
    # The two costs can disagree: distances 0 and 10 sum to less than 5.5 and 5.5, their squares to more.
    a = 5.25**0.5
    x0, noise = torch.tensor([[0.0, 0.0], [a, 5.0]]), torch.tensor([[0.0, 0.0], [a, -5.0]])
    assert hungarian_assignment(pairwise_cost(x0, noise, 'l2')).tolist() == [0, 1]
    assert hungarian_assignment(pairwise_cost(x0, noise, 'sq_l2')).tolist() == [1, 0]


def test_by_condition_assigns_within_each_class_at_its_optimum():
    draw = _draw(7, seed=4)
    groups = torch.tensor([0, 1, 0, 2, 1, 0, 1])
    matrix = pairwise_cost(draw.x0, draw.noise, 'l2')
    perm = hungarian_assignment(matrix, groups)
    assert torch.equal(groups[perm], groups) and perm[3] == 3  # a class of one keeps its noise
    within = [p for p in itertools.permutations(range(7)) if torch.equal(groups[list(p)], groups)]
    assert _total(matrix, perm) == pytest.approx(min(_total(matrix, p) for p in within), rel=1e-12)


def test_knn_keeps_the_nearest_of_its_candidates():
    draw = _draw(6, seed=2, index=3)
    noise, pairing = NoiseAssignment(mode='knn', k=5)(draw)
    candidates = torch.cat([draw.noise[:, None], draw.candidates(4)], dim=1)
    distances = (draw.x0[:, None] - candidates).flatten(2).double().norm(dim=2)
    assert pairing.kind == 'candidates' and torch.equal(pairing.source, distances.argmin(1))
    assert torch.equal(noise, candidates[torch.arange(6), distances.argmin(1)])
    torch.testing.assert_close(pairing.cost_assigned, distances.min(1).values)
    torch.testing.assert_close(pairing.cost_drawn, distances[:, 0])
    torch.testing.assert_close(candidate_costs(draw.x0, candidates), distances)
    # Candidate 0 is the sample's own draw; the others are keyed (the same numbers when drawn again).
    assert torch.equal(draw.candidates(4), candidates[:, 1:])
    assert not torch.equal(_draw(6, seed=2, index=4).candidates(4), candidates[:, 1:])


def test_single_sample_batches_are_refused():
    with pytest.raises(ValueError, match='a batch of 1 sample has nothing to permute'):
        hungarian_assignment(torch.zeros(1, 1))
    with pytest.raises(ValueError, match='non-finite'):
        hungarian_assignment(torch.tensor([[0.0, float('nan')], [1.0, 0.0]]))
    for bad in ({'mode': 'sinkhorn'}, {'cost': 'l1'}, {'scope': 'node'}, {'k': 1}, {'k': 2.5}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            NoiseAssignment(**bad)


# ------------------------------------------------------------------------------------------- through the model
def test_the_model_trains_on_a_permutation_of_its_drawn_noise_and_labels_stay():
    torch.manual_seed(0)
    model = tiny_model(label_key='label', width=8)
    model.denoiser = TimeConditionedConvNet(in_channels=1, width=8, num_classes=3)
    init(NoiseAssignment(by_condition=True), model)
    assert model.noise_coupling_owner == 'NoiseAssignment'
    x0, labels = torch.randn(12, 1, 8, 8), torch.arange(12) % 3
    record = model({'image': x0, 'label': labels})['draw']
    model.num_draws = 0
    _, drawn = model.draw_randoms(x0)
    pairing = record.noise_pairing
    assert pairing.kind == 'permutation' and sorted(pairing.source.tolist()) == list(range(12))
    assert torch.equal(record.noise, drawn[pairing.source])  # the batch's noises, permuted
    assert torch.equal(record.conditioning['class_labels'], labels)  # each image keeps its label
    assert torch.equal(labels[pairing.source], labels)  # by_condition: noise only moves within a class
    assert float(pairing.cost_assigned.sum()) <= float(pairing.cost_drawn.sum())
    # Evaluation draws its own noise, as without the algorithm.
    plain = tiny_model(label_key='label', width=8)
    plain.denoiser = model.denoiser
    evaluated, unpaired = (m.eval_forward({'image': x0, 'label': labels})['draw'] for m in (model, plain))
    assert evaluated.noise_pairing is None
    torch.testing.assert_close(evaluated.noise, unpaired.noise)
    torch.testing.assert_close(evaluated.per_sample_loss, unpaired.per_sample_loss)
    with pytest.raises(ConfigError, match='Other and NoiseAssignment both pair the noise'):
        model.set_noise_coupling(NoiseAssignment(), 'Other')


def test_by_condition_needs_class_labels():
    with pytest.raises(
        ConfigError, match='by_condition assigns noise within each class, but the model is unconditional'
    ):
        init(NoiseAssignment(by_condition=True), tiny_model(width=8))
    # Labels that are no class labels (a float tensor, as an embedding would be) are refused at the first batch.
    model = tiny_model(width=8, label_key='label')
    init(NoiseAssignment(by_condition=True), model)
    with pytest.raises(ConfigError, match='by_condition assigns noise within each class and needs integer class'):
        model({'image': torch.randn(4, 1, 8, 8), 'label': torch.randn(4, 3)})


def test_a_degenerate_batch_keeps_its_noise_and_says_so(caplog):
    algorithm = NoiseAssignment()
    draw = _draw(6)
    same = NoiseDraw(draw.x0[:1].expand(6, -1, -1, -1).clone(), draw.noise, None, 0, 0)
    with caplog.at_level(logging.WARNING):
        noise, pairing = algorithm(same)
        algorithm(same)
    assert torch.equal(noise, draw.noise) and pairing.degenerate.startswith('every pairing costs the same')
    assert caplog.text.count('keeps its drawn noise') == 1 and algorithm._degenerate == 2
    one = NoiseDraw(draw.x0[:1], draw.noise[:1], None, 0, 0)
    noise, pairing = algorithm(one)
    assert torch.equal(noise, draw.noise[:1]) and 'a batch of 1 sample' in pairing.degenerate


def test_a_trainer_with_batches_of_one_is_refused_in_one_line(digits_mds):
    trainer = make_trainer(digits_mds, algorithms=[NoiseAssignment(scope='rank')], batch_size=1, max_duration='2ba')
    with pytest.raises(ConfigError) as error:
        trainer.fit()
    assert "each rank's batch, which holds 1 sample here" in str(error.value) and '\n' not in str(error.value)
    make_trainer(digits_mds, algorithms=[NoiseAssignment(mode='knn')], batch_size=1, max_duration='1ba').fit()


@pytest.mark.parametrize(
    'objective, mode', [('ddpm', 'hungarian'), ('flow_matching', 'knn'), ('flow_matching', 'hungarian')]
)
def test_resume_is_exact_and_the_assignment_is_logged(digits_mds, tmp_path, objective, mode):
    def model(seed):
        if objective == 'ddpm':
            return tiny_model(num_timesteps=50, seed=seed, low_discrepancy=True)
        torch.manual_seed(seed)
        return FlowMatchingModel(TimeConditionedConvNet(in_channels=1, width=16), FlowSchedule(num_cells=50), seed=seed)

    def run(seed, **kwargs):
        recorder, memory = LossRecorder(), InMemoryLogger()
        trainer = make_trainer(
            digits_mds,
            algorithms=[NoiseAssignment(mode=mode, cost='sq_l2')],
            model=model(seed),
            max_duration='6ba',
            callbacks=[recorder],
            loggers=[memory],
            **kwargs,
        )
        trainer.fit()
        return recorder.losses, memory

    save = str(tmp_path / 'ckpt')
    full, memory = run(17, save_folder=save, save_interval='3ba', save_filename='ba{batch}.pt')
    resumed, _ = run(99, load_path=f'{save}/ba3.pt')
    assert len(full) == 6 and resumed == full[3:]
    drawn = [v for _, v in memory.data['noise_assignment/cost_drawn']]
    assigned = [v for _, v in memory.data['noise_assignment/cost_assigned']]
    moved = [v for _, v in memory.data['noise_assignment/moved']]
    assert len(drawn) == 6 and all(a < d for a, d in zip(assigned, drawn)) and all(0 < m <= 1 for m in moved)
    assert memory.hyperparameters['noise_assignment/mode'] == mode


def test_two_ranks_pair_a_global_batch_as_one_rank_does(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, 'tests'))
    from noise_assignment_run import pair

    one = pair(0, 1)
    from two_ranks import launch_ranks

    code, stdout, stderr = launch_ranks(
        os.path.join(ROOT, 'tests', 'noise_assignment_run.py'), str(tmp_path), timeout=300
    )
    assert code == 0, f'exit {code}: ' + stdout[-3000:] + stderr[-3000:]
    two = [torch.load(tmp_path / f'rank{r}.pt') for r in range(2)]
    for name in ('global', 'global_by_condition'):
        for rank in range(2):
            assert torch.equal(two[rank][name]['noise'], one[name]['noise'][rank::2]), (name, rank)
            assert torch.equal(two[rank][name]['source'], one[name]['source'][rank::2]), (name, rank)
    # Each rank alone pairs within its own half: its noises come from its own positions only.
    for rank in range(2):
        assert sorted(two[rank]['rank']['source'].tolist()) == list(range(rank, 16, 2))
    # The global assignment does move noise between the ranks' halves.
    assert any(source % 2 != position % 2 for position, source in enumerate(one['global']['source'].tolist()))

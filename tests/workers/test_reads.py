"""Reads computed on the device: ARGMAX (with Gumbel-max noise), PROB, SAMPLE, LOGITS; per-sequence seeds."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import result_logits, segment  # noqa: E402
from workers.batch import Read, ReadKind, Sampling  # noqa: E402
from workers.reads import sampling_probs  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

A, P, S, L = ReadKind.ARGMAX, ReadKind.PROB, ReadKind.SAMPLE, ReadKind.LOGITS


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(tiny_model_dir, device="cpu", block_size=4, num_blocks=64)


@pytest.fixture(autouse=True)
def free_all(runner):
    yield
    for seq in runner.sequences():
        runner.free(seq)


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def _with_logits(reads: list[Read]) -> list[Read]:
    """The reads followed by LOGITS reads of the same rows (logits draw no randomness)."""
    return reads + [Read(r.row, L) for r in reads]


def test_greedy_argmax_and_prob(runner):
    ids = _ids(6, 0)
    reads = [Read(1, A), Read(4, A), Read(2, P, token=17), Read(5, L)]
    [res] = runner.execute([segment("g", 0, ids, reads=_with_logits(reads[:3]) + reads[3:])])
    logits = result_logits(res)  # rows 1, 4, 2, 5
    probs = logits.softmax(-1)
    for k, row in enumerate([0, 1]):
        assert res.values[k][0] == int(logits[row].argmax())
        assert math.isclose(res.values[k][1], float(probs[row].max()), rel_tol=1e-6)
    assert res.values[2][0] == -1 and math.isclose(res.values[2][1], float(probs[2, 17]), rel_tol=1e-6)
    assert res.values[6][0] == -1 and math.isnan(res.values[6][1]) and len(res.logits[6]) == 384


def _expected_gumbel(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> list[int]:
    u = torch.stack([torch.rand(logits.shape[-1], generator=gen, dtype=torch.float64) for _ in logits])
    tokens = (logits.double() - temperature * torch.log(-torch.log(u))).argmax(-1)
    paper = (logits.double().exp() / (-torch.log(u)) ** temperature).argmax(-1)  # ReFusion's formula
    assert torch.equal(tokens, paper)
    return tokens.tolist()


def test_gumbel_argmax_draws_from_the_sequence_generator_in_row_order(runner):
    ids, sampling = _ids(5, 1), Sampling(temperature=1.5, seed=42, gumbel=True)
    reads = [Read(3, A), Read(0, A), Read(2, A)]  # listed out of row order on purpose
    gen = torch.Generator().manual_seed(42)
    for step in range(2):  # the stream continues across segments
        [res] = runner.execute([segment("gum", 0, ids, keep=False, reads=_with_logits(reads), sampling=sampling)])
        logits = result_logits(res)  # rows 3, 0, 2
        by_row = _expected_gumbel(logits[[1, 2, 0]], 1.5, gen)  # rows 0, 2, 3 draw in that order
        assert [v[0] for v in res.values[:3]] == [by_row[2], by_row[0], by_row[1]]
        probs = logits.softmax(-1)
        for k in range(3):  # probability without noise
            assert math.isclose(res.values[k][1], float(probs[k, res.values[k][0]]), rel_tol=1e-6)


def test_draws_do_not_depend_on_batch_company_and_free_resets(runner):
    ids, sampling = _ids(4, 2), Sampling(temperature=2.0, seed=7, gumbel=True)
    reads = [Read(r, A) for r in range(4)]
    noise_seg = lambda sid: segment(sid, 0, _ids(5, 3), keep=False, reads=[Read(0, A), Read(1, S)],  # noqa: E731
                                    sampling=Sampling(temperature=1.0, seed=99, gumbel=True))
    [alone] = runner.execute([segment("x", 0, ids, keep=False, reads=reads, sampling=sampling)])
    other, batched = runner.execute([noise_seg("o"), segment("y", 0, ids, keep=False, reads=reads, sampling=sampling)])
    assert alone.values == batched.values
    [second] = runner.execute([segment("x", 0, ids, keep=False, reads=reads, sampling=sampling)])
    assert second.values != alone.values  # the stream moved on (4 rows x 384 draws: no accidental repeat)
    runner.free("x")
    [again] = runner.execute([segment("x", 0, ids, keep=False, reads=reads, sampling=sampling)])
    assert again.values == alone.values


def test_sample_reads(runner):
    ids = _ids(5, 4)
    seg = lambda sid, s: segment(sid, 0, ids, keep=False, reads=_with_logits([Read(4, S)]), sampling=s)  # noqa: E731
    [greedy] = runner.execute([seg("s0", Sampling(temperature=0.0))])
    row = result_logits(greedy)[0]
    assert greedy.values[0][0] == int(row.argmax())
    assert math.isclose(greedy.values[0][1], float(row.softmax(-1).max()), rel_tol=1e-6)
    [top1] = runner.execute([seg("s1", Sampling(temperature=1.0, top_k=1, seed=3))])
    assert top1.values[0] == (int(row.argmax()), 1.0)
    s = Sampling(temperature=0.8, top_k=50, top_p=0.9, seed=5)
    [res] = runner.execute([seg("s2", s)])
    dist = sampling_probs(row[None], s)[0]
    expected = int(torch.multinomial(dist, 1, generator=torch.Generator().manual_seed(5)))
    assert res.values[0][0] == expected
    assert math.isclose(res.values[0][1], float(dist[expected]), rel_tol=1e-6)


def test_sampling_probs_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    nonzero = lambda s: (sampling_probs(logits, s)[0] > 0).tolist()  # noqa: E731
    assert nonzero(Sampling(temperature=1.0)) == [True] * 4
    assert nonzero(Sampling(temperature=1.0, top_k=2)) == [True, True, False, False]
    assert nonzero(Sampling(temperature=1.0, top_p=0.5)) == [True, False, False, False]
    assert nonzero(Sampling(temperature=1.0, top_p=0.7)) == [True, True, False, False]
    torch.testing.assert_close(sampling_probs(logits, Sampling(temperature=0.5))[0], (logits[0] * 2).softmax(-1))

"""Reads computed on the device in one batched pass: argmax (with Gumbel-max noise), prob, sample,
logits; counter-based draws keyed by (seed, step, logical position)."""

from __future__ import annotations

import dataclasses
import math
import random

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import result_logits, segment  # noqa: E402
from workers.batch import SEED_MAX, Reads, Sampling  # noqa: E402
from workers.reads import ReadParams, compute_reads, filter_top_k_top_p, uniform  # noqa: E402
from workers.runner import ModelRunner, SegmentError  # noqa: E402
from workers.session import RunnerSession  # noqa: E402


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(tiny_model_dir, device="cpu", block_size=4, num_blocks=64)


@pytest.fixture
def session(runner):
    session = RunnerSession(runner)
    yield session
    session.free_all()


def _ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 384) for _ in range(n)]


def _dropped(seq_id: str, ids: list[int], reads: Reads, sampling: Sampling, context_len: int = 0):
    """A segment whose rows are all read as logits too (logits draw no randomness), nothing kept."""
    rows = reads.rows()
    return segment(seq_id, context_len, ids, keep=False, reads=Reads(reads.argmax, reads.prob, reads.prob_tokens,
                                                                       reads.sample, logits=rows), sampling=sampling)


def test_greedy_argmax_and_prob(session):
    ids = _ids(6, 0)
    [res] = session.execute([_dropped("g", ids, Reads(argmax=(1, 4), prob=(2,), prob_tokens=(17,)), Sampling())])
    probs = result_logits(res).softmax(-1)  # rows 1, 4, 2
    for k in range(2):
        assert res.tokens[k] == int(probs[k].argmax())
        assert math.isclose(res.probs[k], float(probs[k].max()), rel_tol=1e-6)
    assert res.tokens[2] == 17 and math.isclose(res.probs[2], float(probs[2, 17]), rel_tol=1e-6)
    assert len(res.logits) == 3 and len(res.logits[0]) == 384


def test_uniform_is_open_unit_interval_and_keyed():
    keys = torch.tensor([0, 1, SEED_MAX]), torch.tensor([0, 0, 5]), torch.tensor([3, 3, 2**40])
    u = uniform(*keys, 4096)  # [3, 4096] float64
    assert u.dtype == torch.float64 and bool((u > 0).all()) and bool((u < 1).all())
    assert abs(float(u.mean()) - 0.5) < 0.01 and abs(float(u.var()) - 1 / 12) < 0.003
    assert not torch.equal(u[0], u[1])  # the seed matters
    assert torch.equal(uniform(*keys, 4096), u)  # a pure function of its keys
    assert not torch.equal(uniform(keys[0], keys[1] + 1, keys[2], 64), u[:, :64])  # the step matters
    assert not torch.equal(uniform(keys[0], keys[1], keys[2] + 1, 64), u[:, :64])  # the position matters


def test_gumbel_argmax_is_refusion_drafting_keyed_by_position(session):
    ids, sampling = _ids(5, 1), Sampling(temperature=1.5, seed=42, gumbel=True, step=3)
    [res] = session.execute([_dropped("gum", ids, Reads(argmax=(3, 0, 2)), sampling, context_len=0)])
    logits = result_logits(res).double()  # rows 3, 0, 2 at positions 3, 0, 2
    u = uniform(torch.full((3,), 42), torch.full((3,), 3), torch.tensor([3, 0, 2]), logits.shape[-1])
    expected = (logits - 1.5 * torch.log(-torch.log(u))).argmax(-1)
    paper = (logits.exp() / (-torch.log(u)) ** 1.5).argmax(-1)  # ReFusion's formula
    assert torch.equal(expected, paper) and res.tokens == expected.tolist()
    probs = logits.softmax(-1)
    for k in range(3):  # the probability has no noise
        assert math.isclose(res.probs[k], float(probs[k, res.tokens[k]]), rel_tol=1e-6)


def test_top_k_top_p_and_min_p_restrict_the_gumbel_draft_not_its_confidence(session):
    # A ReFusion request's top_k / top_p / min_p had no effect (helper-124): the draft draws from what they
    # leave, with the same noise, and its probability stays the plain softmax (the thresholds' confidence)
    ids = _ids(6, 3)
    for filters in ({"top_k": 5}, {"top_p": 0.3}, {"min_p": 0.2}, {"top_k": 1}):
        sampling = Sampling(temperature=2.5, seed=7, gumbel=True, step=1, **filters)
        [res] = session.execute([_dropped("f", ids, Reads(argmax=(0, 1, 2, 3, 4, 5)), sampling)])
        logits = result_logits(res).double()
        k, p = filters.get("top_k", 0), filters.get("top_p", 1.0)
        params = (torch.full((6,), k), torch.full((6,), p, dtype=torch.float64), torch.full((6,), 2.5, dtype=torch.float64),
                  torch.full((6,), filters.get("min_p", 0.0), dtype=torch.float64))
        kept = filter_top_k_top_p(logits, *params)
        u = uniform(torch.full((6,), 7), torch.full((6,), 1), torch.arange(6), logits.shape[-1])
        assert res.tokens == (kept - 2.5 * torch.log(-torch.log(u))).argmax(-1).tolist(), filters
        if filters == {"top_k": 1}:
            assert res.tokens == logits.argmax(-1).tolist()  # the greedy draft, whatever the noise
        probs = logits.softmax(-1)
        for row in range(6):
            assert math.isclose(res.probs[row], float(probs[row, res.tokens[row]]), rel_tol=1e-6)
    unfiltered = Sampling(temperature=2.5, seed=7, gumbel=True, step=1)
    [res] = session.execute([_dropped("u", ids, Reads(argmax=(0, 1, 2, 3, 4, 5)), unfiltered)])
    assert res.tokens != result_logits(res).argmax(-1).tolist()  # (the noise does move drafts at this temperature)


def test_draws_independent_of_the_batch_repeatable_and_keyed_by_step(session):
    ids = _ids(4, 2)
    reads = Reads(argmax=(0, 1, 2, 3))
    sampling = Sampling(temperature=2.0, seed=7, gumbel=True, step=1)
    noise = _dropped("o", _ids(5, 3), Reads(argmax=(0,), sample=(1,)), Sampling(temperature=1.0, seed=99, gumbel=True))
    first = _dropped("x", ids, reads, sampling)
    [alone] = session.execute([first])
    other, batched = session.execute([noise, _dropped("y", ids, reads, sampling)])
    [*_, last] = session.execute([_dropped("p", _ids(3, 4), Reads(argmax=(1,)), Sampling()), noise,
                                  _dropped("z", ids, reads, sampling)])
    for res in (batched, last):
        assert res.tokens == alone.tokens
        assert all(math.isclose(a, b, rel_tol=1e-5) for a, b in zip(res.probs, alone.probs))
    [again] = session.execute([first])
    assert again.tokens == alone.tokens and again.probs == alone.probs
    steps = {tuple(session.execute([_dropped("x", ids, reads, Sampling(2.0, seed=7, gumbel=True, step=s))])[0].tokens)
             for s in range(6)}
    assert len(steps) > 1  # other steps draw other noise (4 rows at T=2: a repeat of all 6 is implausible)


def test_greedy_probabilities_do_not_depend_on_a_sampled_neighbour(session):
    """A greedy segment's argmax and prob reads come back the same whether its step is greedy-only or
    shares it with a sampled (noise, top-k/top-p) segment: the thresholds ReFusion compares them with
    must not see the batch beyond floating-point noise (spec, "Batching across requests"). The two
    steps differ in size, which on the CPU (exact shapes) may change a matmul's rounding."""
    greedy = _dropped("g", _ids(6, 0), Reads(argmax=(1, 3, 5), prob=(2, 4), prob_tokens=(17, 9)), Sampling())
    sampled = _dropped("s", _ids(5, 3), Reads(sample=(0, 2)), Sampling(temperature=0.8, seed=3, top_k=50, top_p=0.9))
    [alone] = session.execute([greedy])
    _, shared = session.execute([sampled, greedy])
    assert shared.tokens == alone.tokens and shared.probs == pytest.approx(alone.probs, rel=1e-5)


def test_a_prob_read_of_token_zero_gives_token_zero(session):
    """Token id 0 is a token like any other for a prob read, in a greedy step and in one that draws noise
    (the `given` marker of rows without a given token is -1, not 0)."""
    ids = _ids(5, 6)
    reads = Reads(argmax=(0,), prob=(1, 3), prob_tokens=(0, 0))
    for sampling in (Sampling(), Sampling(temperature=1.0, seed=5, gumbel=True, top_k=20)):
        [res] = session.execute([_dropped("z", ids, reads, sampling)])
        probs = result_logits(res).softmax(-1)  # rows 0, 1, 3
        assert int(probs[1].argmax()) != 0 and int(probs[2].argmax()) != 0  # (so an argmax would differ)
        assert res.tokens[1:] == [0, 0], sampling
        for k in (1, 2):
            assert math.isclose(res.probs[k], float(probs[k, 0]), rel_tol=1e-6)


def test_a_logit_bias_moves_the_chosen_tokens_not_the_prob_reads(session):
    """Segment.logit_bias applies to argmax and sample rows; a prob row of the same segment gives the
    token's probability under the logits without it (workers/batch.py)."""
    ids = _ids(5, 7)
    reads = Reads(argmax=(1,), prob=(2, 3), prob_tokens=(17, 40))
    [plain] = session.execute([_dropped("p", ids, reads, Sampling())])
    banned = int(result_logits(plain)[0].argmax())
    bias = ((banned, -100.0), (17, 25.0), (40, -25.0))
    [res] = session.execute([dataclasses.replace(_dropped("b", ids, reads, Sampling()), logit_bias=bias)])
    probs = result_logits(res).softmax(-1)  # rows 1, 2, 3: the raw logits
    assert res.tokens[0] != banned
    assert res.tokens[1:] == [17, 40]
    for k, token in ((1, 17), (2, 40)):
        assert math.isclose(res.probs[k], float(probs[k, token]), rel_tol=1e-6)
    assert res.probs[1:] == pytest.approx(plain.probs[1:], rel=1e-6)


def test_logits_rows_are_those_of_the_rows_read_as_logits(session):
    """A segment's logits reads answer their own rows, also beside token reads of other rows."""
    ids = _ids(6, 8)
    [alone] = session.execute([segment("l", 0, ids, keep=False)])  # logits of rows 0..5
    every = result_logits(alone)
    reads = Reads(argmax=(0, 1), prob=(2,), prob_tokens=(9,), logits=(4, 5))
    [mixed] = session.execute([segment("m", 0, ids, keep=False, reads=reads)])
    torch.testing.assert_close(result_logits(mixed), every[[4, 5]], rtol=1e-5, atol=1e-5)


def test_sample_reads(session):
    ids = _ids(5, 4)
    seg = lambda sid, s: _dropped(sid, ids, Reads(sample=(4,)), s)  # noqa: E731
    [greedy] = session.execute([seg("s0", Sampling(temperature=0.0))])
    row = result_logits(greedy)[0]
    assert greedy.tokens[0] == int(row.argmax())
    assert math.isclose(greedy.probs[0], float(row.softmax(-1).max()), rel_tol=1e-6)
    [top1] = session.execute([seg("s1", Sampling(temperature=1.0, top_k=1, seed=3))])
    assert (top1.tokens[0], top1.probs[0]) == (int(row.argmax()), 1.0)
    s = Sampling(temperature=0.8, top_k=50, top_p=0.9, seed=5)
    [res] = session.execute([seg("s2", s)])
    kept = filter_top_k_top_p(row.double()[None], torch.tensor([50]), torch.tensor([0.9], dtype=torch.float64),
                              torch.tensor([0.8], dtype=torch.float64))[0]
    dist = (kept / 0.8).softmax(-1)
    assert dist[res.tokens[0]] > 0 and math.isclose(res.probs[0], float(dist[res.tokens[0]]), rel_tol=1e-6)


def _params(r: int, temperature: float, top_k: int = 0, top_p: float = 1.0, sample: bool = True,
            min_p: float = 0.0) -> ReadParams:
    long = lambda v: torch.full((r,), v, dtype=torch.long)  # noqa: E731
    dbl = lambda v: torch.full((r,), v, dtype=torch.float64)  # noqa: E731
    return ReadParams(given=long(-1), temperature=dbl(temperature), top_k=long(top_k), top_p=dbl(top_p), min_p=dbl(min_p),
                      gumbel=long(0), sample=long(int(sample)), seed=long(11), step=torch.arange(r),
                      position=long(0))


def test_top_p_sampling_distribution():
    """Many draws of one row (steps 0..N-1): every draw inside the nucleus, frequencies match it."""
    logits = torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0]]).repeat(4000, 1)
    out = compute_reads(logits, _params(4000, temperature=1.0, top_p=0.8), needs_noise=True, needs_sort=True)
    tokens = out[0].long()
    probs = logits[0].softmax(-1)
    nucleus = 3  # 0.394 + 0.239 < 0.8 <= + 0.145
    assert float(probs[:2].sum()) < 0.8 <= float(probs[:3].sum())
    assert int(tokens.max()) < nucleus
    expected = probs[:nucleus] / probs[:nucleus].sum()
    freq = torch.bincount(tokens, minlength=nucleus).double() / len(tokens)
    assert (freq - expected).abs().max() < 0.03
    torch.testing.assert_close(out[1], expected[tokens].double(), rtol=1e-6, atol=0)
    greedy = compute_reads(logits[:4], _params(4, temperature=0.0, sample=False), needs_noise=False, needs_sort=False)
    assert greedy[0].tolist() == [0.0] * 4


def test_top_k_top_p_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)

    def kept(top_k=0, top_p=1.0, temperature=1.0):
        x = filter_top_k_top_p(logits, torch.tensor([top_k]), torch.tensor([top_p], dtype=torch.float64),
                               torch.tensor([temperature], dtype=torch.float64))
        return torch.isfinite(x[0]).tolist()

    assert kept() == [True] * 4
    assert kept(top_k=2) == [True, True, False, False]
    assert kept(top_k=9) == [True] * 4
    assert kept(top_p=0.5) == [True, False, False, False]
    assert kept(top_p=0.7) == [True, True, False, False]
    assert kept(top_k=1, top_p=0.99) == [True, False, False, False]
    assert kept(top_p=0.7, temperature=10.0) == [True, True, True, False]  # measured on the tempered distribution
    # A token whose higher-ranked tokens hold exactly top_p is out (the nucleus is the smallest set reaching
    # top_p, as vLLM's): probabilities 1/2, 1/4, 1/4 are exact in float64, so top_p = 1/2 keeps the first only
    halves = torch.tensor([[math.log(2.0), 0.0, 0.0]], dtype=torch.float64)
    x = filter_top_k_top_p(halves, torch.tensor([0]), torch.tensor([0.5], dtype=torch.float64),
                           torch.tensor([1.0], dtype=torch.float64))
    assert torch.isfinite(x[0]).tolist() == [True, False, False]


def test_min_p_keeps_tokens_within_a_share_of_the_top_tokens_tempered_probability():
    """vLLM's min_p: p(token) >= min_p x p(top), measured after temperature; 0 is off; with top-k/top-p
    the stricter filter wins; the first token always stays."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]], dtype=torch.float64)

    def kept(min_p, temperature=1.0, top_k=0, top_p=1.0):
        x = filter_top_k_top_p(logits, torch.tensor([top_k]), torch.tensor([top_p], dtype=torch.float64),
                               torch.tensor([temperature], dtype=torch.float64), torch.tensor([min_p], dtype=torch.float64))
        return torch.isfinite(x[0]).tolist()

    # ratios to the top: e^-1 = 0.368, e^-2 = 0.135, e^-3 = 0.050
    assert kept(0.0) == [True] * 4
    assert kept(0.3) == [True, True, False, False]
    assert kept(0.1) == [True, True, True, False]
    assert kept(1.0) == [True, False, False, False]
    assert kept(0.5, temperature=4.0) == [True, True, True, False]  # tempered: ratios e^-0.25, e^-0.5, e^-0.75
    assert kept(0.1, top_k=2) == [True, True, False, False]
    draws = compute_reads(torch.tensor([[3.0, 2.5, 2.0, 1.0, 0.0]]).repeat(2000, 1),
                          _params(2000, temperature=1.0, min_p=0.5), needs_noise=True, needs_sort=True)
    assert set(draws[0].long().tolist()) == {0, 1}  # e^-0.5 = 0.61 >= 0.5 > e^-1 = 0.37


def test_seed_range(session):
    ids = _ids(3, 5)
    reads = Reads(sample=(2,))
    [res] = session.execute([_dropped("m", ids, reads, Sampling(temperature=1.0, seed=SEED_MAX))])
    assert 0 <= res.tokens[0] < 384 and 0 < res.probs[0] <= 1
    with pytest.raises(SegmentError) as err:
        session.execute([_dropped("m2", ids, reads, Sampling(temperature=1.0, seed=SEED_MAX + 1))])
    assert err.value.field == "seed" and err.value.seq_id == "m2"


# ---- grammar-constrained reads (Segment.token_bitmask) -----------------------------------------------

def _bitmask(allowed: list[int], vocab: int = 384) -> bytes:
    mask = bytearray(-(-vocab // 8))
    for t in allowed:
        mask[t // 8] |= 1 << (t % 8)
    return bytes(mask)


ALLOWED = [5, 77, 200, 383]


def test_token_bitmask_restricts_argmax_to_the_allowed_tokens(session):
    import dataclasses

    ids = _ids(6, 3)
    free = _dropped("free", _ids(5, 4), Reads(argmax=(1, 4)), Sampling())
    [alone] = session.execute([free])
    masked = dataclasses.replace(_dropped("m", ids, Reads(argmax=(2, 5)), Sampling()), token_bitmask=_bitmask(ALLOWED))
    res, free_res = session.execute([masked, free])
    raw = result_logits(res)  # logits rows are never masked: the model's own distribution
    for k in range(2):
        sub = raw[k, ALLOWED]
        assert res.tokens[k] == ALLOWED[int(sub.argmax())]
        assert raw[k].argmax().item() not in ALLOWED or res.tokens[k] == raw[k].argmax().item()
        # the probability is under the masked distribution (the one the token was chosen from)
        assert math.isclose(res.probs[k], float(sub.softmax(-1).max()), rel_tol=1e-6)
    assert free_res.tokens == alone.tokens and free_res.probs == pytest.approx(alone.probs, rel=1e-6)


def test_token_bitmask_restricts_sample_rows(session):
    import dataclasses

    ids = _ids(4, 5)
    seen = set()
    for seed in range(24):
        seg = dataclasses.replace(segment(f"s{seed}", 0, ids, keep=False, reads=Reads(sample=(3,))),
                                  sampling=Sampling(temperature=2.0, seed=seed), token_bitmask=_bitmask(ALLOWED))
        [res] = session.execute([seg])
        assert res.tokens[0] in ALLOWED
        seen.add(res.tokens[0])
    assert len(seen) >= 2  # it samples among them, not a fixed pick


def test_a_bitmask_allowing_no_token_is_refused(session):
    import dataclasses

    seg = _dropped("none", _ids(3, 6), Reads(argmax=(2,)), Sampling())
    for mask in (bytes(48), bytes(48) + b"\xff", b"\xff" * 47):  # nothing below the vocab of 384; too short
        with pytest.raises(SegmentError) as err:
            session.execute([dataclasses.replace(seg, token_bitmask=mask)])
        assert err.value.seq_id == "none" and err.value.field == "token_bitmask"


def test_logprob_reads_are_the_raw_log_softmax_of_each_row(session):
    """Segment.logprobs: every read kind reports log_softmax(logits)[token] of the model's own row (no
    temperature, top-k or top-p) and the top alternatives; rows of a constrained segment are under the
    grammar's mask, so a mask of 3 tokens leaves 3 alternatives; other segments of the step are
    unchanged and get no log probabilities; a segment with no reads gets an empty list."""
    import dataclasses

    few = [5, 77, 300]
    plain = _dropped("plain", _ids(5, 7), Reads(argmax=(1,), sample=(3,)), Sampling(temperature=1.5, top_k=3, seed=2))
    [alone] = session.execute([plain])
    mixed = _dropped("mixed", _ids(6, 8), Reads(argmax=(0,), prob=(2,), prob_tokens=(11,), sample=(4,)),
                     Sampling(temperature=0.7, top_p=0.5, seed=1))
    masked = dataclasses.replace(_dropped("masked", _ids(4, 9), Reads(argmax=(3,)), Sampling()),
                                 token_bitmask=_bitmask(few))
    silent = segment("silent", 0, _ids(3, 10), keep=False, reads=Reads())
    res_plain, res, res_masked, res_silent = session.execute(
        [plain, dataclasses.replace(mixed, logprobs=4), dataclasses.replace(masked, logprobs=20),
         dataclasses.replace(silent, logprobs=2)])
    assert res_plain.logprobs is None and res_silent.logprobs == []
    assert res_plain.tokens == alone.tokens and res_plain.probs == pytest.approx(alone.probs, rel=1e-6)
    rows = result_logits(res).log_softmax(-1)  # argmax, prob, sample rows
    for k, entry in enumerate(res.logprobs):
        assert entry.token == res.tokens[k]
        assert entry.logprob == pytest.approx(float(rows[k, res.tokens[k]]), abs=1e-5)
        top = rows[k].topk(4)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-5)
    assert res.tokens[1] == 11  # the prob row's given token
    assert math.log(res.probs[2]) != pytest.approx(res.logprobs[2].logprob, abs=1e-3)  # tempered vs raw
    [entry] = res_masked.logprobs
    sub = result_logits(res_masked)[0, few].log_softmax(-1)
    assert entry.token in few and sorted(t for t, _ in entry.top) == few
    assert entry.logprob == pytest.approx(float(sub.max()), abs=1e-5)
    assert sum(math.exp(v) for _, v in entry.top) == pytest.approx(1.0, abs=1e-5)


def test_ranks_are_computed_only_for_segments_that_ask(session):
    """Segment.ranks (prompt scoring, vLLM's prompt_logprobs): each read token's rank is 1 + the tokens
    of its row with a larger log probability; a segment with logprobs but not ranks gets rank None, in
    the same step and in a step where no segment asks (the pass over the vocabulary is skipped)."""
    import dataclasses

    given = (11, 200, 7)
    scored = dataclasses.replace(_dropped("scored", _ids(5, 11), Reads(argmax=(0,), prob=(1, 2, 3), prob_tokens=given),
                                          Sampling()), logprobs=2, ranks=True)
    other = dataclasses.replace(_dropped("other", _ids(4, 12), Reads(argmax=(3,)), Sampling()), logprobs=2)
    res_scored, res_other = session.execute([scored, other])
    rows = result_logits(res_scored).log_softmax(-1)
    for k, entry in enumerate(res_scored.logprobs):
        value = float(rows[k, entry.token])  # within float noise of the engine's own log_softmax
        assert 1 + int((rows[k] > value + 1e-5).sum()) <= entry.rank <= 1 + int((rows[k] > value - 1e-5).sum())
    assert res_scored.logprobs[0].rank == 1  # the argmax row
    assert max(e.rank for e in res_scored.logprobs[1:]) > 1  # given tokens are rarely the most likely
    assert [e.rank for e in res_other.logprobs] == [None]
    [alone] = session.execute([dataclasses.replace(other, seq_id="alone")])
    assert [e.rank for e in alone.logprobs] == [None] and alone.tokens == res_other.tokens
    ask_without_logprobs = session.execute([dataclasses.replace(scored, seq_id="nolp", logprobs=None)])[0]
    assert ask_without_logprobs.logprobs is None


def test_the_mask_token_is_never_listed_among_the_alternatives(session, runner):
    """The mask token (an input marker, never text) is left out of each read's top alternatives and the
    next one takes its place; the log probabilities are the model's (here under a grammar mask allowing
    the mask token and two others, so it is surely among the top)."""
    import dataclasses

    mask = runner.info.mask_token_id
    allowed = [mask, 77, 300]
    seg = dataclasses.replace(_dropped("m", _ids(4, 13), Reads(argmax=(3,)), Sampling()), token_bitmask=_bitmask(allowed))
    one, three = (session.execute([dataclasses.replace(seg, seq_id=f"m{n}", logprobs=n)])[0].logprobs[0] for n in (1, 3))
    sub = dict(zip(allowed, result_logits(session.execute([dataclasses.replace(seg, seq_id="raw")])[0])[0, allowed]
                   .log_softmax(-1).tolist()))
    best = sorted((77, 300), key=lambda t: -sub[t])
    assert [t for t, _ in three.top] == best and [t for t, _ in one.top] == best[:1]
    assert [v for _, v in three.top] == pytest.approx([sub[t] for t in best], abs=1e-5)


def test_twenty_alternatives_without_the_mask_token(session, runner):
    """top_logprobs 20 (the most a request may ask) lists 20 even when the mask token is among the 20
    most likely: the reads compute one more (workers.reads.READ_TOP_LOGPROBS). A grammar mask allows the
    mask token and 20 others, so the 20 listed must be exactly those others, best first."""
    import dataclasses

    mask = runner.info.mask_token_id
    allowed = [mask, *range(50, 70)]
    seg = dataclasses.replace(_dropped("t", _ids(4, 14), Reads(argmax=(3,)), Sampling()), token_bitmask=_bitmask(allowed),
                              logprobs=20)
    [entry] = session.execute([seg])[0].logprobs
    raw = result_logits(session.execute([dataclasses.replace(seg, seq_id="raw", logprobs=None)])[0])[0]
    assert raw[allowed].argsort(descending=True).tolist().index(0) < 20  # the mask is among the allowed top 20
    others = sorted(allowed[1:], key=lambda t: -raw[t].item())
    assert [t for t, _ in entry.top] == others


def test_a_bias_is_applied_in_place_and_taken_out_again():
    """compute_reads adds a logit bias to the logits in place (no [R, V] copy) and puts the saved entries
    back: the tokens follow the bias, the caller's logits and the log probabilities are the raw ones."""
    import torch

    logits = torch.randn(3, 50)
    logits[:, 7] = 30.0  # the greedy token everywhere, until banned
    raw = logits.clone()
    z = torch.zeros(3, dtype=torch.float64)
    params = ReadParams(given=torch.full((3,), -1), temperature=z, top_k=torch.zeros(3, dtype=torch.int64),
                        top_p=torch.ones(3, dtype=torch.float64), min_p=z, gumbel=torch.zeros(3, dtype=torch.bool),
                        sample=torch.zeros(3, dtype=torch.bool), seed=torch.zeros(3, dtype=torch.int64),
                        step=torch.zeros(3, dtype=torch.int64), position=torch.zeros(3, dtype=torch.int64))
    ids = torch.tensor([[7, 0], [7, 7], [0, 0]])  # row 1 names the token twice; row 2 is padding only
    values = torch.tensor([[-1e9, 0.0], [-5e8, -5e8], [0.0, 0.0]], dtype=torch.float64)
    out = compute_reads(logits, params, False, False, logprobs=True, bias=(ids, values))
    assert out[0].tolist()[:2] == [float(t) for t in raw[:2].index_fill(1, torch.tensor([7]), -1e9).argmax(-1)]
    assert out[0, 2].item() == 7 and torch.equal(logits, raw)
    assert out[2].tolist() == pytest.approx(raw.log_softmax(-1).gather(1, out[0].long()[:, None])[:, 0].tolist(), abs=1e-5)

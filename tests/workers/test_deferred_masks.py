"""Grammar bitmasks given after launch (Segment.deferred_mask, ModelRunner.finish_reads): the step keeps the
deferred rows' logits and makes their reads once the bitmasks arrive. Tokens, probabilities, log
probabilities and K/V equal those of the same step with each bitmask given at launch; a step launched
behind it feeds back the masked reads."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import segment  # noqa: E402
from workers.batch import Reads, Sampling  # noqa: E402
from workers.runner import ModelRunner, SegmentError  # noqa: E402
from workers.session import RunnerSession  # noqa: E402

# (the deferred rows are not the step's first ones)
PROMPTS = {"d": [4, 4, 4], "a": [5, 9, 14, 3, 77], "c": [200, 17, 6, 91, 33, 2], "b": [8, 8, 120, 41]}
# a: greedy with log probabilities and a logit bias; b: sampled, top-k and top-p; c: sampled, its bitmask
# given at launch; d: greedy, unconstrained
SAMPLING = {"a": Sampling(), "b": Sampling(temperature=0.9, top_k=40, top_p=0.9, seed=7),
            "c": Sampling(temperature=1.3, seed=3), "d": Sampling()}
DEFERRED = ("a", "b")


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(tiny_model_dir, device="cpu", block_size=4, num_blocks=64)


def _reads(seq: str, row: int) -> Reads:
    return Reads(argmax=(row,)) if SAMPLING[seq].temperature == 0 else Reads(sample=(row,))


def _prefill(session: RunnerSession) -> None:
    session.execute([segment(s, 0, p, reads=Reads()) for s, p in PROMPTS.items()])


def _step(seq: str, token: int, k: int, mask: bytes | None = None, deferred: bool = False, feedback: bool = False):
    """Decode step k (1, 2, ...) of `seq`: `token` fed at the next position, one read after it."""
    s = SAMPLING[seq]
    return segment(seq, len(PROMPTS[seq]) + k - 1, [0 if feedback else token], reads=_reads(seq, 0),
                   sampling=dataclasses.replace(s, step=k), token_bitmask=mask, deferred_mask=deferred,
                   feedback=feedback, logprobs=3 if seq == "a" else None,
                   logit_bias=((10, 3.0), (11, -2.0)) if seq == "a" else ())


def _by(**masks) -> list:
    """finish_reads' bitmasks, in PROMPTS order."""
    return [masks.get(s) for s in PROMPTS]


def _outcome(results) -> list:
    return [(r.seq_id, r.tokens, r.probs, r.logprobs) for r in results]


def _kv(session: RunnerSession, seq: str) -> torch.Tensor:
    runner, bs, table = session.runner, session.info.block_size, session.block_table(seq)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(session.cached_len(seq))])
    return torch.stack([runner.kv.flat_k(i)[slots] for i in range(runner.info.num_layers)])


def _without(vocab: int, banned: set[int]) -> bytes:
    """A bitmask allowing every token id below `vocab` but `banned` and ids 0..2."""
    bits = bytearray(b"\xff" * (-(-vocab // 8)))
    for t in banned | {0, 1, 2}:
        bits[t // 8] &= ~(1 << (t % 8)) & 0xFF
    return bytes(bits)


def assert_deferred_masks_equal_masks_at_launch(runner, steps: int = 4) -> None:
    """Decode steps 1..steps of four sequences. Serially, every bitmask is given at launch; pipelined,
    those of "a" and "b" are given by finish_reads after launch, and each step is launched before the
    previous one is collected, its tokens fed back on the device from the finished reads. Each bitmask
    bans the token the row reads without it, so the comparison sees the mask. (tests/gpu runs this on
    CUDA with graphs.)"""
    vocab = runner.info.vocab_size
    # The unconstrained reads first (a step collected without finish_reads: every read unconstrained,
    # equal to a step without deferred masks), to build masks that change them
    probe = RunnerSession(runner)
    _prefill(probe)
    free = {}
    tokens = {s: 3 + i for i, s in enumerate(PROMPTS)}
    for k in range(1, steps + 1):
        segs = [_step(s, tokens[s], k, deferred=s in DEFERRED) for s in PROMPTS]
        unfinished = runner.collect(runner.launch(segs, probe.tables.prepare(segs)))
        plain = probe.execute([_step(s, tokens[s], k) for s in PROMPTS])  # (rewrites the same K/V)
        assert _outcome(unfinished) == _outcome(plain)
        free[k] = {r.seq_id: r.tokens[0] for r in plain}
        tokens = free[k]
    probe.free_all()
    masks = {(s, k): _without(vocab, {free[k][s], 10}) for k in free for s in ("a", "b", "c")}

    serial = RunnerSession(runner)
    _prefill(serial)
    want, tokens = [], {s: 3 + i for i, s in enumerate(PROMPTS)}
    for k in range(1, steps + 1):
        results = serial.execute([_step(s, tokens[s], k, masks.get((s, k))) for s in PROMPTS])
        want.append(_outcome(results))
        tokens = {r.seq_id: r.tokens[0] for r in results}
    want_kv = {s: _kv(serial, s) for s in PROMPTS}
    serial.free_all()
    assert want[0][1][1] != [free[1]["a"]] and want[0][1][1] != [10]  # the mask decided "a"'s first read

    piped = RunnerSession(runner)
    _prefill(piped)
    got, pending = [], None
    for k in range(1, steps + 1):
        segs = [_step(s, 3 + i, k, masks.get((s, k)) if s not in DEFERRED else None, deferred=s in DEFERRED,
                      feedback=k > 1) for i, s in enumerate(PROMPTS)]
        launched = runner.launch(segs, piped.tables.prepare(segs))
        if pending is not None:
            got.append(_outcome(runner.collect(pending)))
        runner.finish_reads(launched, _by(a=masks[("a", k)], b=masks[("b", k)]))
        pending = launched
    got.append(_outcome(runner.collect(pending)))
    assert got == want
    assert all(torch.equal(_kv(piped, s), want_kv[s]) for s in PROMPTS)
    piped.free_all()


def test_deferred_bitmasks_give_the_reads_of_bitmasks_at_launch_and_feed_the_next_step(runner):
    assert_deferred_masks_equal_masks_at_launch(runner)


def test_bad_deferred_masks_and_calls_out_of_order_are_refused_before_device_work(runner):
    session = RunnerSession(runner)
    _prefill(session)
    vocab = runner.info.vocab_size
    segs = [_step(s, 7, 1, deferred=s in DEFERRED) for s in PROMPTS]
    with pytest.raises(SegmentError, match="deferred_mask") as err:
        runner.execute(segs, session.tables.prepare(segs))
    assert err.value.seq_id == "a"
    launched = runner.launch(segs, session.tables.prepare(segs))
    follow = [_step(s, 0, 2, feedback=True) for s in PROMPTS]
    with pytest.raises(RuntimeError, match="finish_reads"):  # its tokens are not chosen yet
        runner.launch(follow, session.tables.prepare(follow))
    good = _without(vocab, set())
    cases = [
        (_by(a=good, b=good, c=good), SegmentError, "c.*deferred_mask"),  # "c" chose at launch
        (_by(a=good, b=good[:4]), SegmentError, "b.*token_bitmask.*bits"),  # too short
        (_by(a=bytes(len(good)), b=good), SegmentError, "a.*token_bitmask.*allows no token"),
        ([good, good], ValueError, "2 bitmasks for a step of 4 segments"),
    ]
    for bitmasks, kind, message in cases:
        with pytest.raises(kind, match=message):
            runner.finish_reads(launched, bitmasks)
    runner.finish_reads(launched, _by(a=good))  # None: every token
    with pytest.raises(RuntimeError, match="no deferred reads"):
        runner.finish_reads(launched, _by(a=good))
    first = runner.collect(launched)
    ahead = runner.launch(follow, session.tables.prepare(follow))  # (finished: it may feed back now)
    assert [r.tokens for r in runner.collect(ahead)] and len(first) == 4
    session.free_all()


def test_a_failed_finish_leaves_the_step_unfinished_and_a_foreign_or_odd_call_is_named(runner, tiny_model_dir,
                                                                                        monkeypatch):
    # (a break-test: a failure inside the reads left the step neither finished nor finishable, collect then
    # raised AttributeError; another runner's finish_reads wedged the owner; odd bitmask types raised
    # AttributeError / TypeError naming nothing)
    import numpy as np

    import workers.deferred as deferred_module

    session = RunnerSession(runner)
    _prefill(session)
    segs = [_step(s, 7, 1, deferred=s in DEFERRED) for s in PROMPTS]
    launched = runner.launch(segs, session.tables.prepare(segs))
    good = _without(runner.info.vocab_size, set())
    other = ModelRunner(tiny_model_dir, device="cpu", block_size=4, num_blocks=8)
    with pytest.raises(RuntimeError, match="launched by another runner"):
        other.finish_reads(launched, _by(a=good))
    for bitmasks, kind, message in [
        (_by(a=np.frombuffer(good, dtype=np.uint8)), SegmentError, "a.*token_bitmask.*must be bytes.*ndarray"),
        (_by(b="xyz"), SegmentError, "b.*token_bitmask.*must be bytes.*str"),
        (None, ValueError, "NoneType for a step of 4 segments"),
    ]:
        with pytest.raises(kind, match=message):
            runner.finish_reads(launched, bitmasks)
    compute_reads, calls = deferred_module.compute_reads, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device fault")
        return compute_reads(*args, **kwargs)

    monkeypatch.setattr(deferred_module, "compute_reads", failing)
    with pytest.raises(RuntimeError, match="device fault"):
        runner.finish_reads(launched, _by(a=bytearray(good), b=memoryview(good)))
    follow = [_step(s, 0, 2, feedback=True) for s in PROMPTS]
    with pytest.raises(RuntimeError, match="finish_reads"):  # still unfinished: its tokens are not chosen
        runner.launch(follow, session.tables.prepare(follow))
    runner.finish_reads(launched, _by(a=bytearray(good), b=memoryview(good)))  # (bytes-like bitmasks)
    assert len(runner.collect(launched)) == 4 and len(calls) == 2
    assert len(runner.collect(runner.launch(follow, session.tables.prepare(follow)))) == 4
    session.free_all()


def test_a_deferred_mask_needs_reads_it_can_mask():
    from workers.batch import Segment

    for fields in ({"token_bitmask": b"\xff" * 48}, {"reads": Reads(logits=(0,), argmax=(0,))}, {"reads": Reads()}):
        base = {"reads": Reads(argmax=(0,)), **fields}
        with pytest.raises(ValueError, match="deferred_mask needs argmax or sample reads"):
            Segment("s", 0, [1], [0], 1, deferred_mask=True, **base)

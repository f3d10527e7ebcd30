"""ModelRunner.launch / collect and device-side token feedback (Segment.feedback): a step launched before
the previous one is collected, its first tokens taken on the device from that step's reads, gives the
tokens, probabilities and K/V of the same steps run one by one with the tokens given on the host."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import segment  # noqa: E402
from workers.batch import FeedbackPenalty, Reads, Sampling  # noqa: E402
from workers.runner import ModelRunner, SegmentError  # noqa: E402
from workers.session import RunnerSession  # noqa: E402

PROMPTS = {"a": [5, 9, 14, 3, 77], "b": [8, 8, 120, 41], "c": [200, 17, 6, 91, 33, 2]}
SAMPLING = {"a": Sampling(), "b": Sampling(temperature=0.9, top_k=40, seed=7), "c": Sampling(temperature=1.3, seed=3)}


@pytest.fixture(scope="module")
def runner(tiny_model_dir):
    return ModelRunner(tiny_model_dir, device="cpu", block_size=4, num_blocks=64)


def _decode(seq: str, context: int, token: int, step: int, feedback: bool = False):
    sampling = SAMPLING[seq]
    reads = Reads(argmax=(0,)) if sampling.temperature == 0 else Reads(sample=(0,))
    return segment(seq, context, [0 if feedback else token], reads=reads, feedback=feedback,
                   sampling=Sampling(sampling.temperature, sampling.top_k, seed=sampling.seed, step=step))


def _first_step(session: RunnerSession) -> dict[str, int]:
    """Prefill every prompt and read its next token: {seq: token}."""
    segs = [segment(s, 0, p, reads=Reads(argmax=(len(p) - 1,)) if SAMPLING[s].temperature == 0
                    else Reads(sample=(len(p) - 1,)), sampling=SAMPLING[s]) for s, p in PROMPTS.items()]
    return {r.seq_id: r.tokens[0] for r in session.execute(segs)}


def _kv(session: RunnerSession, seq: str) -> torch.Tensor:
    runner, bs, table = session.runner, session.info.block_size, session.block_table(seq)
    slots = torch.tensor([table[p // bs] * bs + p % bs for p in range(session.cached_len(seq))])
    return torch.stack([runner.kv.flat_k(i)[slots] for i in range(runner.info.num_layers)])


def test_pipelined_feedback_steps_equal_serial_steps(runner):
    assert_pipelined_equals_serial(runner)


def assert_pipelined_equals_serial(runner, steps: int = 6) -> None:
    """(tests/gpu runs this on CUDA with graphs: feedback read from a graph's own values buffer)"""
    serial = RunnerSession(runner)
    last = _first_step(serial)
    want = []
    for k in range(steps):
        segs = [_decode(s, len(p) + k, last[s], k + 1) for s, p in PROMPTS.items()]
        results = serial.execute(segs)
        want.append([(r.tokens, r.probs) for r in results])
        last = {r.seq_id: r.tokens[0] for r in results}
    want_kv = {s: _kv(serial, s) for s in PROMPTS}
    serial.free_all()

    piped = RunnerSession(runner)
    known = _first_step(piped)
    got, pending = [], None
    for k in range(steps):
        # Odd steps are launched before the previous one is collected: every token comes from its reads on
        # the device. Even steps collect first, then feed "a" from the host and the others by feedback.
        if k % 2 == 0 and pending is not None:
            results = runner.collect(pending)
            got.append([(r.tokens, r.probs) for r in results])
            known, pending = {r.seq_id: r.tokens[0] for r in results}, None
        segs = [_decode(s, len(p) + k, known.get(s, 0), k + 1, feedback=s not in known or (s != "a" and k > 0))
                for s, p in PROMPTS.items()]
        launched = runner.launch(segs, piped.tables.prepare(segs))
        if pending is not None:
            got.append([(r.tokens, r.probs) for r in runner.collect(pending)])
        pending, known = launched, {}
    got.append([(r.tokens, r.probs) for r in runner.collect(pending)])
    assert got == want
    assert all(torch.equal(_kv(piped, s), want_kv[s]) for s in PROMPTS)
    piped.free_all()


def assert_first_step_feedback_equals_serial(runner) -> None:
    """The decode step after the first generation step (prompt rows, the last one read), launched
    before that step is collected, its token fed back on the device from the first step's read
    (ARDecoder.plan_ahead after a request's first step; tests/gpu runs this on CUDA with graphs)."""
    serial = RunnerSession(runner)
    last = _first_step(serial)
    want = [(r.tokens, r.probs) for r in serial.execute([_decode(s, len(p), last[s], 1) for s, p in PROMPTS.items()])]
    want_kv = {s: _kv(serial, s) for s in PROMPTS}
    serial.free_all()

    piped = RunnerSession(runner)
    first = [segment(s, 0, p, reads=Reads(argmax=(len(p) - 1,)) if SAMPLING[s].temperature == 0
                     else Reads(sample=(len(p) - 1,)), sampling=SAMPLING[s]) for s, p in PROMPTS.items()]
    launched = runner.launch(first, piped.tables.prepare(first))
    segs = [_decode(s, len(p), 0, 1, feedback=True) for s, p in PROMPTS.items()]
    ahead = runner.launch(segs, piped.tables.prepare(segs))
    assert {r.seq_id: r.tokens[0] for r in runner.collect(launched)} == last
    assert [(r.tokens, r.probs) for r in runner.collect(ahead)] == want
    assert all(torch.equal(_kv(piped, s), want_kv[s]) for s in PROMPTS)
    piped.free_all()


def test_the_first_generation_steps_read_feeds_the_step_launched_behind_it(runner):
    assert_first_step_feedback_equals_serial(runner)


def assert_feedback_penalties_equal_serial(runner, rotation: int = 0) -> None:
    """The presence and frequency penalties of a fed-back token t, added on the device
    (Segment.feedback_penalty), give the tokens and probabilities of a serial step whose logit bias
    counts t. Three cases, one per sequence, rotated so that greedy and sampled rows meet each: t has no
    pair (the runner adds one), t has a user bias but was not generated (presence and frequency), t was
    generated before (frequency only). Each case's pairs without t's penalty give other results, so
    the penalty is what the comparison sees. (tests/gpu runs this on CUDA with graphs.)"""
    presence, frequency = 1.5, 2.0
    session = RunnerSession(runner)
    last = _first_step(session)  # what each first step reads: the tokens fed back below
    session.free_all()
    host, serial = {}, {}  # per sequence: the pairs the host states ahead; those a serial step has
    for k, s in enumerate(PROMPTS):
        t, other = last[s], (last[s] + 1) % runner.info.vocab_size
        case = (k + rotation) % 3
        if case == 0:  # t has no pair: the runner adds (t, -presence - frequency)
            host[s], unseen = ((other, -presence - frequency),), 0  # (other was generated before)
            serial[s] = tuple(sorted({other: -presence - frequency, t: -presence - frequency}.items()))
        elif case == 1:  # a user bias on t, which was not generated before
            host[s], unseen = ((t, 4.0),), 1
            serial[s] = ((t, 4.0 - presence - frequency),)
        else:  # t was generated once before
            host[s], unseen = ((t, 4.0 - presence - frequency),), 0
            serial[s] = ((t, 4.0 - presence - 2 * frequency),)
        host[s] = (host[s], FeedbackPenalty(presence, frequency, unseen))

    def serial_step(biases):
        session = RunnerSession(runner)
        _first_step(session)
        segs = [dataclasses.replace(_decode(s, len(p), last[s], 1), logit_bias=biases[s]) for s, p in PROMPTS.items()]
        out = [(r.tokens, r.probs) for r in session.execute(segs)]
        session.free_all()
        return out

    want = serial_step(serial)
    without = serial_step({s: host[s][0] for s in PROMPTS})  # t's own penalty left out
    assert all(w != o for w, o in zip(want, without))

    piped = RunnerSession(runner)
    first = [segment(s, 0, p, reads=Reads(argmax=(len(p) - 1,)) if SAMPLING[s].temperature == 0
                     else Reads(sample=(len(p) - 1,)), sampling=SAMPLING[s]) for s, p in PROMPTS.items()]
    launched = runner.launch(first, piped.tables.prepare(first))
    segs = [dataclasses.replace(_decode(s, len(p), 0, 1, feedback=True), logit_bias=host[s][0],
                                feedback_penalty=host[s][1]) for s, p in PROMPTS.items()]
    ahead = runner.launch(segs, piped.tables.prepare(segs))
    assert {r.seq_id: r.tokens[0] for r in runner.collect(launched)} == last
    assert [(r.tokens, r.probs) for r in runner.collect(ahead)] == want
    piped.free_all()


@pytest.mark.parametrize("rotation", [0, 1, 2])
def test_a_fed_back_tokens_penalties_are_added_on_the_device_as_the_host_would(runner, rotation):
    assert_feedback_penalties_equal_serial(runner, rotation)


def test_a_fed_back_tokens_penalty_is_added_once_when_a_caller_names_it_twice(runner):
    # (a decoder's pairs name each token once; a caller's duplicate pairs add up, and the penalty is
    # added to the first of them only, as a host step with the same pairs and one penalty)
    session = RunnerSession(runner)
    t = _first_step(session)["a"]
    session.free_all()

    def run(pairs, piped):
        session = RunnerSession(runner)
        first = [segment("a", 0, PROMPTS["a"], reads=Reads(argmax=(len(PROMPTS["a"]) - 1,)))]
        launched = runner.launch(first, session.tables.prepare(first))
        seg = dataclasses.replace(_decode("a", len(PROMPTS["a"]), 0 if piped else t, 1, feedback=piped), logit_bias=pairs,
                                  feedback_penalty=FeedbackPenalty(1.0, 1.0, unseen=len(pairs)) if piped else None)
        ahead = runner.launch([seg], session.tables.prepare([seg]))
        runner.collect(launched)
        out = [(r.tokens, r.probs) for r in runner.collect(ahead)]
        session.free_all()
        return out

    assert run(((t, 4.0), (t, 1.0)), piped=True) == run(((t, 4.0 - 2.0), (t, 1.0)), piped=False)


def test_feedback_takes_the_first_read_and_leaves_token_zero_of_the_step_alone(runner):
    """A fed-back token is the one its sequence's first read returned, also when that step read more rows
    ("a" reads its last prompt row, then its first); token id 0 elsewhere in the feedback step ("b"'s
    first token) is a token, not a marker: the step equals the serial one with the token given."""
    a, b = PROMPTS["a"], PROMPTS["b"]
    first = [segment("a", 0, a, reads=Reads(argmax=(len(a) - 1, 0))),
             segment("b", 0, b, reads=Reads(argmax=(len(b) - 1,)))]

    def second(token: int | None):
        return [_decode("a", len(a), 0 if token is None else token, 1, feedback=token is None),
                segment("b", len(b), [0, 7], reads=Reads(argmax=(0, 1)))]

    serial = RunnerSession(runner)
    got_first = serial.execute(first)
    t = got_first[0].tokens[0]
    assert got_first[0].tokens[1] != t  # (so the second read's token would differ)
    want = [(r.tokens, r.probs) for r in serial.execute(second(t))]
    serial.free_all()

    piped = RunnerSession(runner)
    launched = runner.launch(first, piped.tables.prepare(first))
    segs = second(None)
    ahead = runner.launch(segs, piped.tables.prepare(segs))
    assert [r.tokens for r in runner.collect(launched)] == [r.tokens for r in got_first]
    assert [(r.tokens, r.probs) for r in runner.collect(ahead)] == want
    piped.free_all()


def test_a_feedback_penalty_needs_a_fed_back_token_and_numbers(runner):
    with pytest.raises(ValueError, match="feedback_penalty"):
        segment("a", 3, [7], reads=Reads(argmax=(0,)), feedback_penalty=FeedbackPenalty(0.5, 0.5))
    for bad in (FeedbackPenalty("x", 0.5), FeedbackPenalty(0.5, 0.5, unseen=None), FeedbackPenalty(float("nan"), 0.5)):
        seg = segment("a", 0, [7], reads=Reads(argmax=(0,)), logit_bias=((3, 1.0),), feedback=True, feedback_penalty=bad)
        with pytest.raises(SegmentError) as err:
            runner.pack([seg], [[0]])
        assert (err.value.seq_id, err.value.field) == ("a", "feedback_penalty")


def test_feedback_without_a_read_in_the_previous_step_is_refused(runner):
    session = RunnerSession(runner)
    _first_step(session)
    session.execute([segment("x", 0, [4, 5], reads=Reads())])  # the last step read nothing for "a"
    segs = [_decode("a", len(PROMPTS["a"]), 0, 1, feedback=True)]
    with pytest.raises(SegmentError) as err:
        runner.launch(segs, session.tables.prepare(segs))
    assert (err.value.seq_id, err.value.field) == ("a", "feedback")
    session.free_all()

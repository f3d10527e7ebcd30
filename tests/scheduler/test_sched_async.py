"""Asynchronous scheduling (EngineConfig.async_scheduling, Engine._execute, Scheduler.plan_ahead): the next
step is planned and launched before the current one's results reach the host, its tokens fed back on
the device. On the shipped model, forced on (the CPU default is off): the same text, ids, log
probabilities and finish reasons as one step after the other, for every way a request can end while a
step of it is launched ahead, with every KV block back at the end."""

from __future__ import annotations

import asyncio
import dataclasses
import re
from pathlib import Path

import pytest

from sched_fakes import collect, serve_all
from scheduler.api import FinishReason, GenerationRequest, Mode, Priority
from scheduler.config import EngineConfig, RoutingConfig

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="models/refusion-tiny-code not present"),
]
PROMPTS = ["data = {\n", "def read_lines(path):\n    \"\"\"Return the lines of the file at path.\"\"\"\n",
           "import os\nimport sys\nimport re\n", "class A:\n    pass\n\n\nclass B:\n", "x = ["]
ROUTING = RoutingConfig(calibrate=False)
RUN_ON_PROMPTS = ["        self.", "        with open(", "class _"]  # the shipped model writes 64 tokens after each


@pytest.fixture(scope="module")
def runner():
    from workers.runner import ModelRunner

    return ModelRunner(SHIPPED, device="cpu", num_blocks=512)


def _request(runner, rid, i=0, params=(), mode=Mode.AR, **fields) -> GenerationRequest:
    return GenerationRequest(rid, runner.tokenizer.encode(PROMPTS[i % len(PROMPTS)]),
                             {"gen_length": 64, "seed": i, **dict(params)}, mode=mode, **fields)


def _mixed(runner, n=8) -> list[GenerationRequest]:
    """Greedy and sampled AR requests; stop strings, token caps and log probabilities."""
    specs = []
    for i in range(n):
        params = {"temperature": 0.8, "top_k": 20, "top_p": 0.9} if i % 2 else {}
        if i == 3:
            params["logprobs"] = 2
        fields = {"stop": ["\n\n", "return", "(self"]} if i % 3 == 0 else {"max_tokens": 4 + 3 * i} if i % 3 == 1 else {}
        specs.append(_request(runner, f"r{i}", i, params, **fields))
    return specs


async def _run(runner, specs, pipelined: bool, config=()):
    """Every request's deltas and the engine, on a fresh engine (sched_fakes.serve_all)."""
    from scheduler.engine import Engine

    engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=pipelined, routing=ROUTING, **dict(config)))
    results = await serve_all(engine, specs)
    assert all(req.in_flight == 0 for req in engine.scheduler.running + engine.scheduler.waiting)
    return results, engine


class _Near(float):
    """A log probability that equals another within 1e-4. (Rounding both to 4 places, as before, failed
    where two values 1e-5 apart straddle a rounding boundary: -3.31055 and -3.31054.)"""

    def __eq__(self, other) -> bool:
        return isinstance(other, float) and (float.__eq__(self, other) or abs(self - other) <= 1e-4)

    __hash__ = float.__hash__


def _outcome(deltas) -> tuple:
    """What a client sees: text, ids, log probabilities (tokens exact, values within 1e-4: a step's float
    sums depend on which rows share it, and a request's segment in a step launched ahead that its end
    wastes is such a row), finish reason, generated token count."""
    logprobs = [(e.token, _Near(e.logprob), tuple((t, _Near(v)) for t, v in e.top))
                for d in deltas for e in d.logprobs or ()]
    return ("".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], logprobs,
            deltas[-1].finish_reason, deltas[-1].stats["generated_tokens"])


def _assert_same(specs, serial, pipelined) -> None:
    for spec, a, b in zip(specs, serial, pipelined):
        assert _outcome(b) == _outcome(a), spec.request_id


async def test_concurrent_ar_requests_stream_the_same_as_one_step_after_the_other(runner):
    specs = _mixed(runner)
    serial, plain = await _run(runner, specs, pipelined=False)
    pipelined, engine = await _run(runner, specs, pipelined=True)
    _assert_same(specs, serial, pipelined)
    assert plain.ahead_steps == 0 and engine.ahead_steps >= engine.forwards // 2, (engine.ahead_steps, engine.forwards)
    assert engine.stats()["async_scheduling"] is True and engine.stats()["ahead_steps"] == engine.ahead_steps
    reasons = {d[-1].finish_reason for d in pipelined}
    assert {FinishReason.STOP, FinishReason.LENGTH} <= reasons
    assert any(d[-1].stats["stop_word"] for d in pipelined)  # a stop string ended one with a step ahead


async def test_requests_that_cannot_plan_ahead_run_beside_it_unchanged(runner):
    # ReFusion and a grammar stop the pipeline while they run; it resumes after (a penalty does not)
    from llguidance import LLMatcher

    from decoding.grammar import GrammarSpec

    specs = _mixed(runner, 6) + [
        _request(runner, "refusion", 1, mode=Mode.REFUSION),
        _request(runner, "penalty", 2, {"frequency_penalty": 0.5}, max_tokens=12),
        _request(runner, "json", 3, max_tokens=20, grammar=GrammarSpec(LLMatcher.grammar_from_regex(r"[a-z]{3,9}[0-9]{2}"))),
    ]
    serial, _ = await _run(runner, specs, pipelined=False)
    pipelined, engine = await _run(runner, specs, pipelined=True)
    _assert_same(specs, serial, pipelined)
    assert engine.ahead_steps > 0


async def test_a_full_engine_keeps_the_pipeline_and_admits_when_a_slot_frees(runner):
    # 3 running slots for 7 requests: while all are taken, the waiting ones cannot start and the steps
    # stay pipelined; a request's end drains the pipeline so that the next one starts
    specs = _mixed(runner, 7)
    serial, plain = await _run(runner, specs, pipelined=False, config={"max_running": 3})
    pipelined, engine = await _run(runner, specs, pipelined=True, config={"max_running": 3})
    _assert_same(specs, serial, pipelined)
    # (a request starts at most one step later than it would have: the step after a slot freed was
    # launched already; none waits for the whole batch to end)
    assert engine.forwards <= plain.forwards + len(specs), (engine.forwards, plain.forwards)
    assert engine.ahead_steps >= engine.forwards // 2, (engine.ahead_steps, engine.forwards)


async def test_interactive_requests_waiting_with_no_one_to_preempt_keep_the_pipeline(runner):
    """An editor-only load: every request INTERACTIVE, 3 running slots for 7. A waiting INTERACTIVE
    request may preempt only a BATCH one; with none running the steps stay pipelined while it waits, as
    for waiting BATCH requests: each end admits the next request into the step planned ahead (it
    drained the pipeline at each end: 28 of 33 forwards ahead, 32 now)."""
    specs = [dataclasses.replace(s, priority=Priority.INTERACTIVE) for s in _mixed(runner, 7)]
    serial, _ = await _run(runner, specs, pipelined=False, config={"max_running": 3})
    pipelined, engine = await _run(runner, specs, pipelined=True, config={"max_running": 3})
    _assert_same(specs, serial, pipelined)
    assert engine.ahead_steps >= engine.forwards - 2, (engine.ahead_steps, engine.forwards)


async def test_an_interactive_arrival_preempts_a_pipelined_batch_request(runner):
    # Submitted at the 6th forward while 2 BATCH requests fill both slots and pipeline: the pipeline
    # drains, the youngest is sent back to the queue, and every output is still the serial one
    batch = [_request(runner, f"b{i}", 2 * i, {}, priority=Priority.BATCH) for i in range(2)]
    urgent = _request(runner, "urgent", 2, max_tokens=16, priority=Priority.INTERACTIVE)
    outcomes = {}
    for pipelined in (False, True):
        from scheduler.engine import Engine

        engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=pipelined, max_running=2,
                                                               routing=ROUTING))
        await engine.start()
        tasks = [asyncio.create_task(collect(engine, spec)) for spec in batch]
        while engine.forwards < 6:
            await asyncio.sleep(0.001)
        assert len(engine.scheduler.running) == 2 and (engine.ahead_steps > 0) == pipelined
        results = await asyncio.gather(collect(engine, urgent), *tasks)
        await engine.stop()
        assert engine.kv.pool().num_free == engine.kv.pool().num_total
        assert engine.metrics.preemptions.labels(cause="interactive")._value.get() >= 1
        outcomes[pipelined] = [_outcome(d) for d in results]
    assert outcomes[True] == outcomes[False]


async def test_a_request_cancelled_with_two_steps_in_flight_frees_its_kv_after_both(runner):
    # The cancel comes right after the 8th step's next step was planned ahead: the request has both
    # steps launched. Its blocks stay held until both are collected, then all come back
    from scheduler.engine import Engine

    specs = [_request(runner, f"c{i}", i) for i in range(3)]
    engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=True, routing=ROUTING))
    plan_ahead, seen = engine.scheduler.plan_ahead, []

    def cancelling_plan_ahead(plan):
        ahead = plan_ahead(plan)
        if ahead is not None and len(seen) < 1 and engine.forwards >= 8:
            req = next(r for r, _ in ahead.items if r.id == "c1")
            seen.append((req.in_flight, len(engine.kv.tables["main"].table("c1"))))
            engine.cancel("c1")
            seen.append(engine.kv.tables["main"].table("c1") != [])
        return ahead

    engine.scheduler.plan_ahead = cancelling_plan_ahead
    await engine.start()
    results = await asyncio.gather(*[collect(engine, spec) for spec in specs])
    await engine.stop()
    assert seen and seen[0][0] == 1 and seen[1] is True  # held while its steps are launched
    assert results[1][-1].finish_reason is FinishReason.CANCELLED
    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
    serial, _ = await _run(runner, [specs[0], specs[2]], pipelined=False)
    _assert_same([specs[0], specs[2]], serial, [results[0], results[2]])


async def test_logit_bias_ignore_eos_and_min_tokens_keep_the_pipeline(runner):
    # They depend on how many tokens are generated, not on which, so the step after the one in flight
    # carries them as well (benchmark clients send vLLM's ignore_eos with every request). Each changes
    # the output here: the bias'd token appears more or never, ignore_eos runs to the cap past the EOS
    # the model reads, min_tokens holds that EOS back until its count; and a min_tokens equal to the
    # plain length lets the EOS come exactly where it did (the step ahead counts the token in flight)
    newline = runner.tokenizer.encode("\n")[0]
    plain = [_request(runner, "plain0", 0, max_tokens=24), _request(runner, "plain4", 4, max_tokens=40),
             _request(runner, "plain1", 1, max_tokens=24)]
    baseline, _ = await _run(runner, plain, pipelined=False)
    natural = _outcome(baseline[1])[4]
    assert natural < 30 and baseline[1][-1].finish_reason is FinishReason.STOP
    specs = [
        _request(runner, "bias", 0, {"logit_bias": {newline: 6.0}}, max_tokens=24),
        _request(runner, "ban", 1, {"logit_bias": {newline: -100.0}}, max_tokens=24),
        _request(runner, "bias_sampled", 1, {"logit_bias": {newline: -100.0}, "temperature": 0.8}, max_tokens=24),
        _request(runner, "ignore_eos", 4, {"ignore_eos": True}, max_tokens=40),
        _request(runner, "min_tokens", 4, {"min_tokens": 30}, max_tokens=40),
        _request(runner, "min_tokens_at_eos", 4, {"min_tokens": natural}, max_tokens=40),
    ]
    serial, _ = await _run(runner, specs, pipelined=False)
    pipelined, engine = await _run(runner, specs, pipelined=True)
    _assert_same(specs, serial, pipelined)
    assert engine.ahead_steps >= engine.forwards // 2, (engine.ahead_steps, engine.forwards)
    ids, plain_ids = [_outcome(d)[1] for d in pipelined], [_outcome(d)[1] for d in baseline]
    assert ids[0].count(newline) > plain_ids[0].count(newline)
    assert newline in plain_ids[2] and newline not in ids[1] and newline not in ids[2]
    assert _outcome(pipelined[3])[4] == 40  # EOS ignored
    assert _outcome(pipelined[4])[4] >= 30  # EOS held back until min_tokens
    assert _outcome(pipelined[5]) == _outcome(baseline[1])


async def test_presence_and_frequency_penalties_keep_the_pipeline(runner):
    # The step ahead holds the penalties of the tokens on the host in its logit bias, and the runner adds
    # the fed-back token's own on the device (Segment.feedback_penalty): the same text as serial steps,
    # greedy and sampled, with a logit bias and min_tokens beside them, and the penalties change it
    plain = [_request(runner, "plain0", 0, max_tokens=40), _request(runner, "plain2", 2, max_tokens=40)]
    baseline, _ = await _run(runner, plain, pipelined=False)
    newline = runner.tokenizer.encode("\n")[0]
    specs = [
        _request(runner, "frequency", 0, {"frequency_penalty": 1.5}, max_tokens=40),
        _request(runner, "presence", 2, {"presence_penalty": 2.0}, max_tokens=40),
        _request(runner, "both_sampled", 1, {"presence_penalty": 0.7, "frequency_penalty": 0.4, "temperature": 0.8},
                 max_tokens=40),
        _request(runner, "with_bias", 3, {"frequency_penalty": 1.0, "logit_bias": {newline: 3.0}, "min_tokens": 20},
                 max_tokens=40),
        _request(runner, "negative", 4, {"frequency_penalty": -1.0}, max_tokens=40),
    ]
    serial, _ = await _run(runner, specs, pipelined=False)
    pipelined, engine = await _run(runner, specs, pipelined=True)
    _assert_same(specs, serial, pipelined)
    assert engine.ahead_steps >= engine.forwards // 2, (engine.ahead_steps, engine.forwards)
    for penalized, unpenalized in zip(pipelined[:2], baseline):
        ids, plain_ids = _outcome(penalized)[1], _outcome(unpenalized)[1]
        assert ids != plain_ids and len(set(ids)) / len(ids) > len(set(plain_ids)) / len(plain_ids)


def _json_grammar():
    """A JSON object of three keys with bounded values (no free whitespace, as the API compiles schemas):
    it completes within the token cap whatever the model prefers, and each key after the first is forced
    text after a value (jump-forward)."""
    from llguidance import LLMatcher

    from decoding.grammar import GrammarSpec

    schema = {"type": "object", "additionalProperties": False, "required": ["name", "size", "ok"],
              "properties": {"name": {"type": "string", "maxLength": 4},
                             "size": {"type": "integer", "minimum": 0, "maximum": 99}, "ok": {"type": "boolean"}}}
    return GrammarSpec(LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False}))


def _regex_grammar():
    """Words and a forced "id-" after each dash: forced runs all along, for 30-odd tokens."""
    from llguidance import LLMatcher

    from decoding.grammar import GrammarSpec

    return GrammarSpec(LLMatcher.grammar_from_regex(r"([a-z]{2,5}-id-){6}"))


async def test_grammar_requests_keep_the_pipeline_with_their_bitmasks_given_after_launch(runner, monkeypatch):
    # A grammar request's step planned ahead gets its bitmask once the token in flight is absorbed
    # (Segment.deferred_mask, ModelRunner.finish_reads); when that token brings forced tokens (a JSON
    # key), that step's read is discarded and the forced run is fed from the host. Greedy, sampled, with
    # log probabilities and with a penalty, beside plain requests: the serial outputs, most steps ahead
    import json

    from decoding.ar import ARDecoder

    grammar = _json_grammar()
    specs = _mixed(runner, 3) + [
        _request(runner, "json", 1, grammar=grammar),
        _request(runner, "json_sampled", 2, {"temperature": 0.9, "top_p": 0.95}, grammar=grammar),
        _request(runner, "json_logprobs", 3, {"logprobs": 2}, grammar=grammar),
        _request(runner, "json_penalty", 4, {"frequency_penalty": 1.0}, grammar=grammar),
        _request(runner, "regex", 0, grammar=_regex_grammar()),
    ]
    serial, _ = await _run(runner, specs, pipelined=False)
    asked, deferred_bitmask = [], ARDecoder.deferred_bitmask

    def recording(decoder, segment):
        mask = deferred_bitmask(decoder, segment)
        asked.append((decoder.seq_id, mask is None))
        return mask

    monkeypatch.setattr(ARDecoder, "deferred_bitmask", recording)
    pipelined, engine = await _run(runner, specs, pipelined=True)
    _assert_same(specs, serial, pipelined)
    assert {seq for seq, discarded in asked if not discarded} == {"json", "json_sampled", "json_logprobs", "json_penalty",
                                                                   "regex"}
    assert any(discarded for _, discarded in asked)  # a forced key: a read planned ahead discarded
    assert engine.ahead_steps >= engine.forwards // 2, (engine.ahead_steps, engine.forwards)
    for deltas in pipelined[3:7]:
        assert set(json.loads(_outcome(deltas)[0])) == {"name", "size", "ok"}
    assert re.fullmatch(r"([a-z]{2,5}-id-){6}", _outcome(pipelined[7])[0]) and _outcome(pipelined[7])[4] > 20


async def test_grammar_forced_runs_longer_than_the_step_budget_plan_ahead_as_serially(runner):
    # A small token budget: the prompts are fed in chunks and each forced run ("-a-long-fixed-name-",
    # ~10 tokens) is longer than what a step has left, so the grammar request sits steps out and feeds
    # catch-up chunks; outputs equal the serial ones
    from llguidance import LLMatcher

    from decoding.grammar import GrammarSpec

    long_runs = GrammarSpec(LLMatcher.grammar_from_regex(r"([a-z]{1,4}-a-long-fixed-name-){4}"))
    specs = _mixed(runner, 3) + [_request(runner, "runs", 1, grammar=long_runs),
                                 _request(runner, "runs_sampled", 2, {"temperature": 0.9}, grammar=long_runs)]
    config = {"token_budget": 8}
    serial, _ = await _run(runner, specs, pipelined=False, config=config)
    pipelined, engine = await _run(runner, specs, pipelined=True, config=config)
    _assert_same(specs, serial, pipelined)
    assert all(re.fullmatch(r"([a-z]{1,4}-a-long-fixed-name-){4}", _outcome(d)[0]) for d in pipelined[3:])
    assert engine.ahead_steps >= engine.forwards // 2, (engine.ahead_steps, engine.forwards)


async def test_a_grammar_that_dead_ends_when_its_bitmask_is_due_after_launch_fails_its_request_alone(runner, monkeypatch):
    from decoding.api import DecodeParamError
    from decoding.ar import ARDecoder

    specs = _mixed(runner, 3) + [_request(runner, "json", 1, grammar=_json_grammar())]
    serial, _ = await _run(runner, specs, pipelined=False)
    calls, deferred_bitmask = [0], ARDecoder.deferred_bitmask

    def dead_end(decoder, segment):
        calls[0] += 1
        if calls[0] == 1:
            raise DecodeParamError("response_format", "no text can continue what the grammar has matched so far")
        return deferred_bitmask(decoder, segment)

    monkeypatch.setattr(ARDecoder, "deferred_bitmask", dead_end)
    pipelined, engine = await _run(runner, specs, pipelined=True)
    assert calls[0] >= 1
    _assert_same(specs[:3], serial[:3], pipelined[:3])
    last = pipelined[3][-1]
    assert last.finish_reason is FinishReason.ERROR and last.error_field == "response_format"
    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total


@pytest.mark.parametrize("fault", ["launch", "collect"])
async def test_a_failed_step_ahead_is_planned_again_from_the_host(runner, fault):
    # The 6th launch of a step with fed-back tokens fails (fault "launch": the step after is planned
    # from the host's view instead), or the 6th such step fails on the device after its launch (fault
    # "collect": it is re-run item by item with the fed-back tokens given from the host). No request
    # sees an error and every output is the serial one (a penalized request and a grammar request among
    # them; the penalized re-run step's bias is checked exactly in tests/decoding/test_penalties.py).
    specs = _mixed(runner, 4) + [_request(runner, "penalty", 0, {"frequency_penalty": 2.0}, max_tokens=30),
                                 _request(runner, "regex", 1, grammar=_regex_grammar())]
    serial, _ = await _run(runner, specs, pipelined=False)
    launch, collect, count = runner.launch, runner.collect, [0]

    def failing_launch(segments, tables):
        if any(s.feedback for s in segments):
            count[0] += 1
            if count[0] == 6 and fault == "launch":
                raise RuntimeError("launch fault")
        return launch(segments, tables)

    def failing_collect(step):
        results = collect(step)
        if fault == "collect" and count[0] == 6 and not getattr(failing_collect, "done", False):
            failing_collect.done = True
            assert step.step.layout.deferred_reads  # the grammar request's step in it is re-run from the host
            raise RuntimeError("device fault")
        return results

    runner.launch, runner.collect = failing_launch, failing_collect
    try:
        pipelined, engine = await _run(runner, specs, pipelined=True)
    finally:
        del runner.launch, runner.collect
    assert count[0] >= 6
    _assert_same(specs, serial, pipelined)
    assert all(d[-1].finish_reason is not FinishReason.ERROR for d in pipelined)


async def test_async_scheduling_is_on_by_default_only_for_runners_that_wait_on_a_device(runner, monkeypatch):
    from scheduler.engine import Engine
    from workers.runner import ModelRunner

    assert Engine(runner, runner.tokenizer, EngineConfig(routing=ROUTING)).async_scheduling is False
    monkeypatch.setattr(ModelRunner, "asynchronous", property(lambda self: True))
    assert Engine(runner, runner.tokenizer, EngineConfig(routing=ROUTING)).async_scheduling is True
    assert Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=False, routing=ROUTING)).async_scheduling is False

    class ExecuteOnly:  # a runner with execute only (tests' fakes, wrappers)
        def __init__(self, inner):
            self.info, self.execute, self.asynchronous = inner.info, inner.execute, True

    only = ExecuteOnly(runner)
    assert Engine(only, runner.tokenizer, EngineConfig(routing=ROUTING)).async_scheduling is False
    with pytest.raises(ValueError, match="async_scheduling"):
        Engine(only, runner.tokenizer, EngineConfig(async_scheduling=True, routing=ROUTING))


async def test_auto_requests_pipeline_between_block_boundaries_and_switch_mode_as_serially(runner):
    # The router is made to start each AUTO request in AR and to flip its mode at every re-route (every
    # block boundary, switch_interval_tokens 8 = the block length): a step is planned ahead only where
    # absorbing the step in flight cannot bring a switch (mode_switch.switch_may_follow), so every
    # request switches at the same tokens as serially, with the same text
    from sched_fakes import flip_modes

    from scheduler.engine import Engine

    specs = [_request(runner, f"a{i}", i, mode=Mode.AUTO) for i in range(5)]
    outcomes = {}
    for pipelined in (False, True):
        engine = Engine(runner, runner.tokenizer, EngineConfig(
            async_scheduling=pipelined, routing=RoutingConfig(calibrate=False, switch_interval_tokens=8)))
        flip_modes(engine, Mode.AR)
        results = await serve_all(engine, specs)
        outcomes[pipelined] = [(_outcome(d), d[-1].stats["modes"]) for d in results]
        if pipelined:
            assert engine.ahead_steps > 0
    assert outcomes[True] == outcomes[False]
    assert any(len(modes) > 2 for _, modes in outcomes[True]), outcomes[True]  # AR -> ReFusion -> AR


async def _staggered(engine, specs, after_tokens=3) -> list:
    """Serve `specs` one after another: each next request is submitted once the one before has streamed
    `after_tokens` tokens (or ended), so their block boundaries fall on different steps, as for requests
    arriving at random times."""
    await engine.start()
    started, results = [asyncio.Event() for _ in specs], [None] * len(specs)
    started[0].set()

    async def run(i):
        await started[i].wait()
        deltas = []
        async for delta in engine.submit(specs[i]):
            deltas.append(delta)
            if sum(len(d.token_ids) for d in deltas) >= after_tokens and i + 1 < len(specs):
                started[i + 1].set()
        if i + 1 < len(specs):
            started[i + 1].set()
        results[i] = deltas

    try:
        await asyncio.wait_for(asyncio.gather(*[run(i) for i in range(len(specs))]), 120)  # (a hang fails)
    finally:
        await engine.stop(drain_timeout_s=0)
    assert engine.kv.sequences() == [] and engine.kv.pool().num_free == engine.kv.pool().num_total
    return results


async def test_an_auto_request_at_its_block_boundary_sits_out_a_step_while_the_others_keep_the_pipeline(runner):
    # AUTO requests decoding AR are re-routed at block boundaries (every 8 tokens here; the router keeps
    # them in AR). The one whose step in flight brings it to its boundary is left out of the step
    # planned ahead and planned from the host the step after, so the others keep the pipeline. Before,
    # each boundary drained it for everyone: with staggered arrivals, most steps of an AUTO batch
    from scheduler.engine import Engine

    def keep_ar(engine):
        decide = engine.router.decide

        def decided(requested, priority, load, current=None, request_key=None):
            decision = decide(requested, priority, load, current=current, request_key=request_key)
            return dataclasses.replace(decision, mode=Mode.AR) if requested is Mode.AUTO else decision

        engine.router.decide = decided

    runs = {}
    for name, mode, pipelined in (("serial", Mode.AUTO, False), ("auto", Mode.AUTO, True), ("ar", Mode.AR, True)):
        specs = [GenerationRequest(f"s{i}", runner.tokenizer.encode(prompt), {"gen_length": 64}, mode=mode)
                 for i, prompt in enumerate(RUN_ON_PROMPTS)]  # (ignore_eos would pin them to AR)
        engine = Engine(runner, runner.tokenizer, EngineConfig(
            async_scheduling=pipelined, routing=RoutingConfig(calibrate=False, switch_interval_tokens=8)))
        keep_ar(engine)
        results = await _staggered(engine, specs)
        runs[name] = ([_outcome(d) for d in results], engine.forwards - engine.ahead_steps, engine.forwards)
    assert runs["auto"][0] == runs["serial"][0]
    assert [outcome[4] for outcome in runs["auto"][0]] == [64] * 3  # each ran to its length: 8 boundaries
    drains_auto, drains_ar = runs["auto"][1], runs["ar"][1]
    # (a boundary drains only when no other request is in flight: the first's alone, the last's alone)
    assert drains_auto <= drains_ar + 2, (runs["auto"][1:], runs["ar"][1:])


async def test_arrivals_and_ends_keep_the_pipeline(runner):
    # A request arriving while steps are pipelined is admitted into the step planned ahead (its first
    # step stated from the host), its next step is fed back from that first one, and a request whose
    # step in flight is its last plans nothing: only the very first step runs without one ahead of it.
    # Before, each arrival drained the pipeline twice and each end once
    from scheduler.engine import Engine

    specs = [GenerationRequest(f"j{i}", runner.tokenizer.encode(RUN_ON_PROMPTS[i % 3]), {"gen_length": 64, "seed": i,
                                                                                        "temperature": 0.7 * (i % 2)},
                               mode=Mode.AR, max_tokens=24 + 4 * i if i % 2 else None) for i in range(5)]
    # (the uncapped ones run to gen_length: their last step reads the span's last token)
    runs = {}
    for pipelined in (False, True):
        engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=pipelined, routing=ROUTING))
        results = await _staggered(engine, specs)
        runs[pipelined] = ([_outcome(d) for d in results], engine)
    assert runs[True][0] == runs[False][0]
    assert [outcome[4] for outcome in runs[True][0]][::2] == [64] * 3  # the greedy, uncapped ones ran to the end
    engine = runs[True][1]
    assert engine.forwards - engine.ahead_steps == 1, (engine.forwards, engine.ahead_steps)


async def test_a_prompt_longer_than_the_budget_is_fed_in_chunks_planned_ahead(runner):
    # With a 24-token step budget, a 120-token prompt arriving while two requests decode is fed in
    # chunks; each next chunk (and then the first generation step) is stated ahead from the host with the
    # budget the decode steps leave (vLLM's chunked prefill), so no chunk drains the pipeline
    from scheduler.engine import Engine

    tok = runner.tokenizer
    long_prompt = (tok.encode("def f(x):\n    return x + 1\n\n") * 12)[:110] + tok.encode("class _")
    specs = [GenerationRequest(f"c{i}", tok.encode(RUN_ON_PROMPTS[i]), {"gen_length": 64}, mode=Mode.AR)
             for i in range(2)] + [GenerationRequest("long", long_prompt, {"gen_length": 64, "seed": 1,
                                                                            "temperature": 0.8}, mode=Mode.AR)]
    runs = {}
    for pipelined in (False, True):
        engine = Engine(runner, tok, EngineConfig(async_scheduling=pipelined, routing=ROUTING, token_budget=24))
        results = await _staggered(engine, specs)
        runs[pipelined] = ([_outcome(d) for d in results], engine)
    assert runs[True][0] == runs[False][0]
    engine = runs[True][1]
    assert engine.forwards - engine.ahead_steps == 1, (engine.forwards, engine.ahead_steps)
    assert runs[True][0][2][4] > 0


async def test_a_prompt_chunk_planned_ahead_is_offered_to_the_prefix_cache_only_once_computed(runner):
    # A's prompt is fed in 16-token chunks; the step holding its chunk at 32..47 fails on the device (and
    # again when re-run alone), so A ends with the error and that chunk is never computed. Its blocks
    # were in A's table already (grown when the chunk was planned ahead), and absorbing chunk 16..31
    # offered them to the prefix cache: B, with the same prompt, started on 48 cached tokens and read
    # 16 it should not have (found by a break-test). B starts on the 32 computed ones, as serially
    from scheduler.engine import Engine

    prompt = runner.tokenizer.encode("def add(a, b):\n    return a + b\n" * 20)[:100]
    specs = [GenerationRequest(name, prompt, {"gen_length": 64, "logprobs": 1}, mode=Mode.AR, max_tokens=12)
             for name in ("A", "B")]

    class Faulted:  # a launched step whose device work failed
        pass

    launch, collect_step = runner.launch, runner.collect

    def faulty_launch(segments, tables):
        if any(seg.seq_id == "A" and seg.context_len == 32 for seg in segments):
            return Faulted()
        return launch(segments, tables)

    def faulty_collect(launched):
        if isinstance(launched, Faulted):
            raise RuntimeError("device fault on A's chunk at 32")
        return collect_step(launched)

    outcomes = {}
    runner.launch, runner.collect = faulty_launch, faulty_collect
    try:
        for pipelined in (False, True):
            engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=pipelined, routing=ROUTING,
                                                                   token_budget=16))
            await engine.start()
            a = await asyncio.wait_for(collect(engine, specs[0]), 60)
            b = await asyncio.wait_for(collect(engine, specs[1]), 60)
            await engine.stop()
            assert engine.kv.pool().num_free == engine.kv.pool().num_total
            outcomes[pipelined] = (a[-1].finish_reason, b[-1].stats["cached_prompt_tokens"], _outcome(b))
    finally:
        del runner.launch, runner.collect
    assert outcomes[True] == outcomes[False]
    assert outcomes[True][:2] == (FinishReason.ERROR, 32)


async def test_a_request_admitted_ahead_whose_decoder_cannot_be_built_fails_alone(runner):
    # Admission while a step is in flight (Scheduler.plan_ahead) meets a decoder that cannot be built for
    # the third request: it ends with its error once the step planned ahead comes up, the others stream
    # as serially, and every block comes back
    from scheduler.engine import Engine

    specs = [GenerationRequest(f"b{i}", runner.tokenizer.encode(RUN_ON_PROMPTS[i]), {"gen_length": 64},
                               mode=Mode.AR) for i in range(3)]
    serial, _ = await _run(runner, [specs[0], specs[1]], pipelined=False)
    engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=True, routing=ROUTING))
    factory, seen = engine.scheduler.factories["main"], []
    create, plan_ahead = factory.create, engine.scheduler.plan_ahead

    def failing_create(mode, request_id, *args, **kwargs):
        if request_id == "b2":
            seen.append(engine.scheduler._planning_ahead)
            raise RuntimeError("no decoder for this one")
        return create(mode, request_id, *args, **kwargs)

    def marked_plan_ahead(plan):
        engine.scheduler._planning_ahead = True
        try:
            return plan_ahead(plan)
        finally:
            engine.scheduler._planning_ahead = False

    engine.scheduler._planning_ahead = False
    factory.create, engine.scheduler.plan_ahead = failing_create, marked_plan_ahead
    results = await _staggered(engine, specs)
    assert seen == [True]  # it was admitted ahead, while a step ran
    assert results[2][-1].finish_reason is FinishReason.ERROR and "no decoder for this one" in results[2][-1].error
    _assert_same(specs[:2], serial, results[:2])


async def test_a_failed_launch_of_a_step_holding_an_admitted_request_plans_it_again_from_the_host(runner):
    # The first launch of a step planned ahead that holds both fed-back steps and an arrival's first
    # step (stated from the host) fails: the fed-back steps are forgotten, the arrival's step is held for
    # the scheduler (pending_segment), and every output is the serial one
    from scheduler.engine import Engine

    specs = [GenerationRequest(f"h{i}", runner.tokenizer.encode(RUN_ON_PROMPTS[i]), {"gen_length": 64},
                               mode=Mode.REFUSION if i == 1 else Mode.AR) for i in range(3)]  # (a ReFusion
    serial, _ = await _run(runner, specs, pipelined=False)                 # decoder has no drop_ahead)
    launch, failed = runner.launch, []

    def failing_launch(segments, tables):
        if not failed and any(s.feedback for s in segments) and any(not s.feedback for s in segments):
            failed.append([s.seq_id for s in segments if not s.feedback])
            raise RuntimeError("launch fault")
        return launch(segments, tables)

    runner.launch = failing_launch
    try:
        engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=True, routing=ROUTING))
        results = await _staggered(engine, specs)
    finally:
        del runner.launch
    assert failed and failed[0] == ["h1"]
    _assert_same(specs, serial, results)


async def test_a_request_waiting_for_blocks_an_ending_request_frees_after_its_step_ahead_starts_then():
    # X ends by max_tokens with its next step launched ahead, so its blocks come back only once that step
    # is collected, after admission ahead (Scheduler._admit_ahead) looked at the queue and found W short.
    # That free counts as a change of the queue (Scheduler.blocks_freed): W starts a step or two after
    # X ends, as serially, not once the long Y ends (a break-test saw it wait ~250 steps)
    from workers.runner import ModelRunner

    from scheduler.engine import Engine

    runner = ModelRunner(SHIPPED, device="cpu", num_blocks=29)  # Y 18 blocks, X 11 (7 of them prompt), W 6
    tok = runner.tokenizer
    long_y = GenerationRequest("Y", tok.encode("        self."), {"gen_length": 256, "ignore_eos": True}, mode=Mode.AR)
    x = GenerationRequest("X", (tok.encode("class _") * 40)[:100], {"gen_length": 64, "ignore_eos": True},
                          mode=Mode.AR, max_tokens=8)
    w = GenerationRequest("W", tok.encode("        with open("), {"gen_length": 64}, mode=Mode.AR)
    starts = {}
    for pipelined in (False, True):
        engine = Engine(runner, tok, EngineConfig(async_scheduling=pipelined, routing=ROUTING, kv_reserve_fraction=0.0,
                                                  max_running=8))
        await engine.start()
        marks = {}

        async def run(spec, when_two=None):
            async for delta in engine.submit(spec):
                if delta.token_ids and spec.request_id not in marks:
                    marks[spec.request_id] = engine.forwards
                if when_two is not None and delta.token_ids:
                    when_two.set()
            marks[spec.request_id + " end"] = engine.forwards

        x_started = asyncio.Event()
        tasks = [asyncio.create_task(run(long_y))]
        await asyncio.sleep(0)
        tasks.append(asyncio.create_task(run(x, x_started)))
        await x_started.wait()
        tasks.append(asyncio.create_task(run(w)))
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        await engine.stop()
        assert engine.kv.pool().num_free == engine.kv.pool().num_total
        starts[pipelined] = marks
    for marks in starts.values():
        assert marks["X end"] < marks["W"] < marks["Y end"] - 100, starts  # W waited for X's blocks, not Y's
    assert starts[True]["W"] - starts[True]["X end"] <= 4, starts


def _victim_fails(runner, monkeypatch, method: str, exc: Exception) -> list[GenerationRequest]:
    """ARDecoder.<method> raises `exc` for the request "victim"; returns the requests b0, b1 and victim (AR,
    gen_length 64, on RUN_ON_PROMPTS)."""
    from decoding.ar import ARDecoder

    original = getattr(ARDecoder, method)

    def failing(self, *args):
        if self.seq_id == "victim":
            raise exc
        return original(self, *args)

    monkeypatch.setattr(ARDecoder, method, failing)
    return [GenerationRequest(rid, runner.tokenizer.encode(RUN_ON_PROMPTS[i]), {"gen_length": 64}, mode=Mode.AR)
            for i, rid in enumerate(("b0", "b1", "victim"))]


async def test_a_decoder_failing_when_planned_ahead_from_the_host_fails_its_request_alone(runner, monkeypatch):
    # next_segment raises for "victim" (admitted ahead while two requests pipeline): it ends with its own
    # error, as serially, and the others are not failed with it (they were: "internal error in engine step")
    from decoding.api import DecodeParamError
    from scheduler.engine import Engine

    specs = _victim_fails(runner, monkeypatch, "next_segment",
                          DecodeParamError("grammar", "no text can continue (injected)"))

    outcomes = {}
    for pipelined in (False, True):
        engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=pipelined, routing=ROUTING))
        results = await _staggered(engine, specs)
        outcomes[pipelined] = [(d[-1].finish_reason, d[-1].error) for d in results]
    assert outcomes[True] == outcomes[False]
    assert outcomes[True][:2] == [(FinishReason.LENGTH, None)] * 2
    assert outcomes[True][2][0] is FinishReason.ERROR and "no text can continue" in outcomes[True][2][1]


async def test_requests_waiting_for_kv_keep_the_pipeline_until_a_request_ends():
    from workers.runner import ModelRunner

    runner = ModelRunner(SHIPPED, device="cpu", num_blocks=14)
    # A KV cache that holds about 3 of the 7 requests at once, slots for all of them: the waiting ones
    # cannot start until a running one ends, so the steps between ends stay pipelined (with a free slot
    # it would otherwise drain at every step), and each end lets the next one start
    from scheduler.engine import Engine

    specs = _mixed(runner, 7)
    config = {"max_running": 64, "kv_reserve_fraction": 0.0}
    serial, plain = await _run(runner, specs, pipelined=False, config=config)
    engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=True, routing=ROUTING, **config))
    loads, gauges = [], engine.metrics.update_gauges  # (running, waiting) after each step

    def noted(running: int, waiting: int, *rest) -> None:
        loads.append((running, waiting))
        gauges(running, waiting, *rest)

    engine.metrics.update_gauges = noted
    pipelined = await serve_all(engine, specs)
    assert all(req.in_flight == 0 for req in engine.scheduler.running + engine.scheduler.waiting)
    _assert_same(specs, serial, pipelined)
    # they waited for KV: 3 or more waiting beside running ones, with 64 running slots (it read queue times
    # over 50 ms, which a fast enough machine could have missed: helper-233)
    assert max(waiting for running, waiting in loads if running) >= 3, loads
    assert engine.ahead_steps >= engine.forwards // 3, (engine.ahead_steps, engine.forwards)
    assert engine.forwards <= plain.forwards + len(specs), (engine.forwards, plain.forwards)


async def test_slow_grammars_take_turns_with_steps_planned_ahead(runner, monkeypatch):
    # scheduler.Scheduler._grammar_turns under asynchronous scheduling: three grammar requests whose
    # matching costs 30 ms of (ticking) CPU per token, a step budget of 40 ms: steps planned ahead take
    # one of them at a time too (a request that sits out is planned from the host on its turn), and every
    # output is the serial one.
    import scheduler.engine as engine_module
    from decoding.grammar import GrammarTokenizer
    from scheduler.grammars import GrammarCompiler

    class Tick:
        def __init__(self):
            self.now = 0.0

        def __call__(self):
            self.now += 0.010
            return self.now

    grammars = GrammarCompiler(GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id), 0,
                               clock=Tick())
    monkeypatch.setattr(engine_module, "GrammarCompiler", lambda tokenizer, token_ms: grammars)
    # (the free requests outlast the slow ones: with only slow requests left nobody sits out)
    specs = [_request(runner, f"free{i}", i, {"ignore_eos": True, "temperature": 0.8 * (i % 2)}) for i in range(3)]
    specs += [_request(runner, f"slow{i}", i, grammar=_regex_grammar()) for i in range(3)]
    config = {"grammar_token_ms": 0, "grammar_step_ms": 40}
    # Each run compiles the grammar before the requests come (Engine.stop drops the cache), so all six start
    # in the same step: a compile still running on its thread while the free requests step on (a loaded
    # machine) left the slow ones alone at the end, where nobody sits out
    await grammars.compile(specs[3].grammar, specs[3].prompt_ids, max_forced=64)
    serial, _ = await _run(runner, specs, pipelined=False, config=config)
    slow_rows, launch = [], runner.launch

    def counted(segments, tables):
        slow_rows.append(sum(s.token_bitmask is not None or s.deferred_mask for s in segments))
        return launch(segments, tables)

    monkeypatch.setattr(runner, "launch", counted)
    await grammars.compile(specs[3].grammar, specs[3].prompt_ids, max_forced=64)
    pipelined, engine = await _run(runner, specs, pipelined=True, config=config)
    _assert_same(specs, serial, pipelined)
    assert engine.ahead_steps > 0 and sum(rows > 1 for rows in slow_rows) <= 2, slow_rows
    assert grammars.compiles == 2  # the requests took the grammar compiled before them, each time


async def test_a_decoder_failing_to_restate_a_failed_step_from_the_host_fails_its_request_alone(runner, monkeypatch):
    # A step launched ahead fails on the device, so each request's fed-back step is stated again from the
    # host (host_segment) and re-run alone; "victim"'s decoder raises there: it ends with its own error and
    # the others stream as serially (host_segment ran outside any guard: the step failed and every
    # running request ended with "internal error in engine step", helper-191)
    from scheduler.engine import Engine

    specs = _victim_fails(runner, monkeypatch, "host_segment", RuntimeError("cannot restate this step (injected)"))
    serial, _ = await _run(runner, specs[:2], pipelined=False)
    launch_step, collect_step, feeding, failed = runner.launch, runner.collect, set(), []

    def recording_launch(segments, tables):
        launched = launch_step(segments, tables)
        if {"b0", "b1", "victim"} <= {s.seq_id for s in segments if s.feedback}:
            feeding.add(id(launched))
        return launched

    def failing_collect(launched):  # once: a step that feeds all three back on the device
        if not failed and id(launched) in feeding:
            failed.append(True)
            collect_step(launched)
            raise RuntimeError("device fault (injected)")
        return collect_step(launched)

    runner.launch, runner.collect = recording_launch, failing_collect
    try:
        engine = Engine(runner, runner.tokenizer, EngineConfig(async_scheduling=True, routing=ROUTING))
        results = await _staggered(engine, specs)
    finally:
        del runner.launch, runner.collect
    assert failed
    assert results[2][-1].finish_reason is FinishReason.ERROR and "cannot restate this step" in results[2][-1].error
    _assert_same(specs[:2], serial, results[:2])
    assert engine.kv.pool().num_free == engine.kv.pool().num_total

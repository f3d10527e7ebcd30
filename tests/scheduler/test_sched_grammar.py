"""Structured output in the engine (decoding.grammar): grammar requests on a real ModelRunner (tiny random
Qwen3 on CPU) always produce text their grammar accepts, run on the AR path, share forwards with free
requests without changing them, and survive a forced preemption with the same output."""

from __future__ import annotations

import asyncio
import copy
import json
import re

import pytest
from sched_fakes import FakeCpuClock, ForwardGate

from decoding.api import DecodeParamError
from decoding.grammar import Grammar, GrammarSpec, GrammarTokenizer
from scheduler.api import FinishReason, GenerationRequest, InvalidRequestError, Mode, Priority

llguidance = pytest.importorskip("llguidance")
LLMatcher = llguidance.LLMatcher

# Bounded values, so every output completes within GEN tokens whatever a random model prefers.
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "size", "ok"],
          "properties": {"name": {"type": "string", "maxLength": 4},
                         "size": {"type": "integer", "minimum": 0, "maximum": 99},
                         "ok": {"type": "boolean"}}}
# No free whitespace (as the API compiles schemas): a random model would otherwise pad forever.
JSON_GRAMMAR = GrammarSpec(LLMatcher.grammar_from_json_schema(SCHEMA, overrides={"whitespace_flexible": False}))
GEN = 96
PROMPTS = ["def parse(self, text):\n    return", "class Wrapper:\n    def __init__(self", "import json\n"]


@pytest.fixture
def runner(tiny_model_dir):
    from workers.runner import ModelRunner

    return ModelRunner(tiny_model_dir, device="cpu", num_blocks=256, block_size=16)


async def _run(engine, spec) -> tuple[str, list[int], object]:
    text, ids, last = "", [], None
    async for delta in engine.submit(spec):
        text, ids, last = text + delta.text, ids + delta.token_ids, delta
    return text, ids, last


def _matches_schema(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "size", "ok"} and isinstance(value["name"], str) and len(value["name"]) <= 4
            and type(value["size"]) is int and 0 <= value["size"] <= 99 and isinstance(value["ok"], bool))


def _ids(runner, text: str) -> list[int]:
    return runner.tokenizer.encode(text, add_special_tokens=False)


async def test_json_schema_output_always_parses_and_ends_when_the_grammar_does(engine_factory, runner):
    engine = await engine_factory()
    fresh_ar_stats = copy.deepcopy(engine.router.stats_for(Mode.AR, Priority.BATCH))
    specs = [GenerationRequest(f"j{i}", _ids(runner, p), {"gen_length": GEN, **({"temperature": 1.0, "seed": i} if i % 2 else {})},
                               mode=(Mode.AUTO, Mode.AR)[i % 2], grammar=JSON_GRAMMAR)
             for i, p in enumerate(PROMPTS * 2)]
    results = await asyncio.gather(*(_run(engine, s) for s in specs))
    for text, ids, last in results:
        assert _matches_schema(text), text
        assert last.finish_reason is FinishReason.STOP and last.mode is Mode.AR
        assert len(ids) < GEN  # ended by the grammar, not by the cap
    # the router's AR estimates learn nothing from grammar requests (AR by necessity, jump-forward TPF)
    assert engine.router.stats_for(Mode.AR, Priority.BATCH) == fresh_ar_stats
    # without the grammar the random model writes no JSON at all
    free, _, _ = await _run(engine, GenerationRequest("free", _ids(runner, PROMPTS[0]), {"gen_length": 32}, mode=Mode.AR))
    with pytest.raises(ValueError):
        json.loads(free)


async def test_regex_and_choice_grammars(engine_factory, runner):
    engine = await engine_factory()
    regex = GrammarSpec(LLMatcher.grammar_from_regex(r"[0-9]{3}-[a-z]{2,5}"))
    choice = GrammarSpec(LLMatcher.grammar_from_lark('start: "alpha" | "beta" | "gamma"'))
    for i, prompt in enumerate(PROMPTS):
        text, _, _ = await _run(engine, GenerationRequest(f"r{i}", _ids(runner, prompt), {"gen_length": 32}, grammar=regex))
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", text), text
        text, _, _ = await _run(engine, GenerationRequest(f"c{i}", _ids(runner, prompt), {"gen_length": 32}, grammar=choice))
        assert text in ("alpha", "beta", "gamma")


async def test_an_output_the_grammar_forces_entirely_runs_no_forward_and_has_no_tpf(engine_factory, runner):
    engine = await engine_factory()
    literal = GrammarSpec(LLMatcher.grammar_from_lark('start: "return value + 1"'))
    text, _, last = await _run(engine, GenerationRequest("lit", _ids(runner, PROMPTS[0]), {"gen_length": 32}, grammar=literal))
    assert text == "return value + 1" and last.finish_reason == FinishReason.STOP
    assert last.stats["forwards"] == 0 and last.stats["tokens_per_forward"] is None  # undefined, not 0.0


async def test_a_forced_output_cut_by_gen_length_is_a_length_finish(engine_factory, runner):
    """A grammar that forces more than gen_length tokens: the cut text is not the grammar's end, so the
    finish is LENGTH (it was STOP: the matcher had consumed the whole forced start, so the decoder took
    the grammar as complete and a client read truncated JSON as finished)."""
    engine = await engine_factory()
    literal = GrammarSpec(LLMatcher.grammar_from_lark('start: "return value + 1 if value else other_value - 2"'))
    prompt = _ids(runner, PROMPTS[0])
    whole, ids, last = await _run(engine, GenerationRequest("all", prompt, {"gen_length": 32}, grammar=literal))
    assert whole == "return value + 1 if value else other_value - 2" and last.finish_reason == FinishReason.STOP
    span = len(ids) - 2
    cut, _, last = await _run(engine, GenerationRequest("cut", prompt, {"gen_length": span, "slot_size": span, "serial_num_blocks": 1},
                                                        grammar=literal))
    assert whole.startswith(cut) and cut != whole and last.finish_reason == FinishReason.LENGTH
    exact, _, last = await _run(engine, GenerationRequest("exact", prompt, {"gen_length": len(ids), "slot_size": len(ids), "serial_num_blocks": 1},
                                                          grammar=literal))
    assert exact == whole and last.finish_reason == FinishReason.STOP  # the grammar ends at gen_length itself


async def test_forced_text_that_spells_special_tokens_comes_out_as_text(engine_factory, runner):
    """A literal the grammar forces may spell a special token ("<|mask|>", the EOS's "<|endoftext|>"):
    llguidance's fast-forward tokenizes it into that token, which the matcher refuses (the request
    failed with "forced tokens were refused"; found by a break-test). The forced run stops before it
    and the model writes it with ordinary tokens, as it writes such text when it is a choice."""
    engine = await engine_factory()
    special = set(runner.tokenizer.all_special_ids)
    assert {runner.tokenizer.convert_tokens_to_ids(t) for t in ("<|mask|>", "<|endoftext|>")} <= special
    literal = "x = '<|mask|>' + '<|endoftext|>'"
    spec = GrammarSpec(LLMatcher.grammar_from_lark(f'start: "{literal}"'))
    text, ids, last = await _run(engine, GenerationRequest("sp", _ids(runner, PROMPTS[0]), {"gen_length": 32},
                                                           grammar=spec))
    assert text == literal and last.finish_reason == FinishReason.STOP
    assert not special & set(ids)


async def test_free_requests_in_the_same_forwards_are_unchanged(engine_factory, runner):
    engine = await engine_factory()
    free = [GenerationRequest(f"f{i}", _ids(runner, p), {"gen_length": 32}, mode=Mode.AR) for i, p in enumerate(PROMPTS)]
    alone = [await _run(engine, f) for f in free]
    free = [GenerationRequest(f"g{i}", f.prompt_ids, f.params, mode=Mode.AR) for i, f in enumerate(free)]
    constrained = [GenerationRequest(f"k{i}", _ids(runner, p), {"gen_length": GEN}, grammar=JSON_GRAMMAR)
                   for i, p in enumerate(PROMPTS)]
    together = await asyncio.gather(*(_run(engine, s) for s in free + constrained))
    assert [ids for _, ids, _ in together[:3]] == [ids for _, ids, _ in alone]
    assert all(_matches_schema(text) for text, _, _ in together[3:])


async def test_a_preempted_grammar_request_reruns_to_the_same_valid_output(engine_factory, runner, monkeypatch, wait_until):
    engine = await engine_factory(max_running=1)
    spec = GenerationRequest("g", _ids(runner, PROMPTS[1]), {"gen_length": GEN}, priority=Priority.BATCH, grammar=JSON_GRAMMAR)
    reference, ref_ids, _ = await _run(engine, spec)
    gate = ForwardGate(runner.execute, hold_from=1)  # held: the 2nd forward, the grammar already advanced
    monkeypatch.setattr(runner, "execute", gate)
    preempted, requeue = [], engine.scheduler.requeue
    monkeypatch.setattr(engine.scheduler, "requeue", lambda victim, reason: (preempted.append(victim.id), requeue(victim, reason)))
    task = asyncio.create_task(_run(engine, GenerationRequest("g2", spec.prompt_ids, spec.params, grammar=JSON_GRAMMAR)))
    try:
        await wait_until(gate.entered.is_set, "the held forward")
        (running,) = engine.scheduler.running
        assert running.id == "g2" and running.decoder.generated and not running.decoder.finished
        urgent = asyncio.create_task(_run(engine, GenerationRequest("u", _ids(runner, PROMPTS[0]), {"gen_length": 32},
                                                                    mode=Mode.AR, priority=Priority.INTERACTIVE)))
        await wait_until(lambda: any(r.id == "u" for r in engine.scheduler.waiting), "the interactive request to queue")
    finally:
        gate.release()
    (text, ids, last), _ = await asyncio.gather(task, urgent)
    assert preempted == ["g2"]
    assert (text, ids) == (reference, ref_ids) and _matches_schema(text)
    assert last.finish_reason is FinishReason.STOP


async def test_grammar_requests_refuse_refusion_mode_and_bad_grammars(engine_factory, runner):
    engine = await engine_factory()
    prompt = _ids(runner, PROMPTS[0])
    cases = [
        (GenerationRequest("m", prompt, {}, mode=Mode.REFUSION, grammar=JSON_GRAMMAR), "mode"),
        (GenerationRequest("b", prompt, {}, grammar=GrammarSpec(LLMatcher.grammar_from_lark("start: nothing"))), "grammar"),
        (GenerationRequest("p", prompt, {}, grammar=GrammarSpec(JSON_GRAMMAR.grammar, prefill_tokens=2)), "grammar"),
        (GenerationRequest("t", prompt, {}, grammar='{"type": "object"}'), "grammar"),
    ]
    for spec, field in cases:
        with pytest.raises(InvalidRequestError) as err:
            await _run(engine, spec)
        assert err.value.field == field, err.value
    assert not engine.scheduler.waiting and not engine.scheduler.running


@pytest.mark.parametrize("lark, token", [
    ("start: <|endoftext|>", "<|endoftext|>"),
    ('start: "a" <|mask|> "b"', "<|mask|>"),
    ("start: <[{mask}]>", "<|mask|>"),  # by id
    ('start: "<|mask|>" <|endoftext|>', "<|endoftext|>"),  # the quoted literal is text; the token is not
])
def test_a_grammar_that_forces_a_special_token_itself_is_refused_naming_it(runner, lark, token):
    """Lark's `<|endoftext|>` / `<[id]>` ask for the special token itself, never generated here. Where
    the grammar forces one, its ordinary spelling was tried and refused, and the error read "7 forced
    tokens were refused: Parser Error: token "<" doesn't satisfy the grammar; forced bytes: got 'ÿ'"
    (a break-test): it names the token, and what to write instead."""
    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    mask = runner.tokenizer.convert_tokens_to_ids("<|mask|>")
    spec = GrammarSpec(LLMatcher.grammar_from_lark(lark.format(mask=mask)), source="structured_outputs.grammar")
    with pytest.raises(DecodeParamError) as err:
        Grammar(tokenizer, spec, _ids(runner, "x"))
    assert err.value.field == "structured_outputs.grammar"
    assert f"requires the special token {token}" in err.value.message, err.value.message
    assert f'quote it ("{token}")' in err.value.message


def test_each_run_gets_a_fresh_matcher_and_prefill_tokens_are_consumed(runner):
    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    lark = GrammarSpec(LLMatcher.grammar_from_lark('start: "<call>" /[a-z]+/ "</call>"'))
    grammar = Grammar(tokenizer, lark, _ids(runner, "x"))
    first, second = grammar.constraint(), grammar.constraint()
    assert runner.tokenizer.decode(first.initial_forced) == "<call>"  # the forced start, computed at compile
    start = second.bitmask()
    for token in _ids(runner, "ab"):
        first.consume(token)
    assert second.bitmask() == start != first.bitmask()  # a rerun (preemption) starts from the beginning
    # the API prefills a forced opening: the grammar consumes the prompt's last tokens first
    prompt = _ids(runner, "question: <call>")
    opening = len(_ids(runner, "<call>"))
    assert prompt[-opening:] == _ids(runner, "<call>")
    prefilled = Grammar(tokenizer, GrammarSpec(lark.grammar, prefill_tokens=opening), prompt).constraint()
    with pytest.raises(DecodeParamError) as err:
        prefilled.consume(_ids(runner, "<")[0])  # the opening is behind it: "<" is not allowed again
    assert err.value.field == "grammar" and "<state>" not in err.value.message  # no parser dump
    with pytest.raises(DecodeParamError) as err:
        Grammar(tokenizer, GrammarSpec(lark.grammar, prefill_tokens=3), _ids(runner, "abc def"))
    assert err.value.field == "grammar"


def test_a_grammar_decides_where_its_text_ends_not_the_models_plain_end_ids(runner):
    """An end id that is a plain token ("." in a generation_config's eos_token_id list) is text under a
    grammar: the grammar decides where its text ends (ar.py drops the end ids), so "." chosen there
    does not end ".x;" at its first token."""
    import dataclasses

    from decoding.ar import ARDecoder
    from decoding.loop import decode_batch
    from scheduler.decoders import ModelDecoderFactory
    from workers.session import RunnerSession

    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    [dot] = _ids(runner, ".")
    lark = GrammarSpec(LLMatcher.grammar_from_lark('start: ("." | ",") "x;"'))
    prompt = _ids(runner, PROMPTS[0])
    params = ModelDecoderFactory(runner).parse_params({"gen_length": 16, "slot_size": 1, "serial_num_blocks": 1,
                                                       "logit_bias": {dot: 100}})
    params = dataclasses.replace(params, end_token_ids=(*params.end_token_ids, dot))
    decoder = ARDecoder("g", prompt, params, constraint=Grammar(tokenizer, lark, prompt).constraint())
    [ids] = decode_batch(RunnerSession(runner), [decoder], budget=16)
    assert runner.tokenizer.decode(ids) == ".x;" and decoder.ended_on_eos


def test_forced_tokens_are_fed_without_forwards_of_their_own(runner):
    # Jump-forward: the grammar fixes most of the text; the decoder appends forced runs and feeds them with
    # the next read, so it needs far fewer forwards than tokens, whatever the step budget (a run longer
    # than the budget is fed in kept chunks first) and with the same output.
    from decoding.ar import ARDecoder
    from decoding.loop import decode_batch
    from scheduler.decoders import ModelDecoderFactory
    from workers.session import RunnerSession

    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    fixed = "def handler(request, response):\n    return dispatch(request"
    lark = GrammarSpec(LLMatcher.grammar_from_lark(
        f'start: {json.dumps(fixed)} /[a-z]{{1,3}}/ ", " {json.dumps(fixed)} /[a-z]{{1,3}}/ ")\\n"'))
    pattern = re.escape(fixed) + r"[a-z]{1,3}, " + re.escape(fixed) + r"[a-z]{1,3}\)\n"
    prompt = _ids(runner, PROMPTS[0])
    factory = ModelDecoderFactory(runner)
    for sampling in ({}, {"temperature": 1.5, "seed": 11}):  # seeded draws too: the same whatever the budget
        params = factory.parse_params({"gen_length": 96, "slot_size": 1, "serial_num_blocks": 1, **sampling})
        outputs = []
        for budget in (96, 4, 1):
            decoder = ARDecoder(f"ff{budget}", prompt, params, constraint=Grammar(tokenizer, lark, prompt).constraint())
            [ids] = decode_batch(RunnerSession(runner), [decoder], budget=budget)
            text = runner.tokenizer.decode(ids)
            assert re.fullmatch(pattern, text), text
            outputs.append(ids)
            forwards = decoder.stats.forwards
            assert len(ids) >= 24 and (forwards <= 8 if budget == 96 else forwards > 8), (budget, forwards, len(ids))
        assert outputs[0] == outputs[1] == outputs[2], sampling


async def test_a_parser_limit_in_the_forced_start_is_refused_at_submit(engine_factory, runner):
    # The grammar's fixed start ("xy a") pushes an Earley row past llguidance's 2,000 items. The forced
    # start is computed when the grammar compiles (off the loop), so this is an InvalidRequestError naming
    # the grammar's source at submit; it was a nameless engine error (an HTTP 500) from inside the step.
    n = 3000
    alternatives = " | ".join(f"r{i}" for i in range(n))
    rules = "\n".join(f"r{i}: A B{i}" for i in range(n))
    lexemes = "\n".join(f'B{i}: "b{i}"' for i in range(n))
    lark = f'start: X s\nX: "xy"\ns: {alternatives}\n{rules}\nA: "a"\n{lexemes}'
    grammar = GrammarSpec(LLMatcher.grammar_from_lark(lark), source="structured_outputs.grammar")
    engine = await engine_factory()
    with pytest.raises(InvalidRequestError) as err:
        await _run(engine, GenerationRequest("limit", _ids(runner, PROMPTS[0]), {"gen_length": 32}, grammar=grammar))
    assert err.value.field == "structured_outputs.grammar" and "2000" in str(err.value)
    text, _, last = await _run(engine, GenerationRequest("after", _ids(runner, PROMPTS[0]), {"gen_length": 32},
                                                         grammar=JSON_GRAMMAR))
    assert _matches_schema(text) and last.finish_reason is FinishReason.STOP  # the engine serves on


def test_a_grammar_step_planned_ahead_takes_its_bitmask_after_the_token_in_flight(runner):
    # Asynchronous scheduling (decoding.ar.ARDecoder.plan_ahead with a grammar): the step after the one in
    # flight is stated before that one's token is known, so its bitmask is given later
    # (Segment.deferred_mask, deferred_bitmask) from the grammar's state after that token. When the token
    # brings forced text, the step ahead fed it alone: its read is discarded, and the step after it, known
    # on the host, feeds the forced run with the next read, as a serial step would (or the request sits
    # that step out when the run does not fit the budget).
    from decoding.ar import ARDecoder
    from scheduler.decoders import ModelDecoderFactory
    from workers.batch import SegmentResult

    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    lark = GrammarSpec(LLMatcher.grammar_from_lark('start: /[a-z]{1,3}/ "-id=" /[a-z]{1,3}/ ";"'))
    prompt = _ids(runner, "x")
    params = ModelDecoderFactory(runner).parse_params({"gen_length": 32})
    decoder = ARDecoder("g", prompt, params, constraint=Grammar(tokenizer, lark, prompt).constraint())
    [a], [dash] = _ids(runner, "a"), _ids(runner, "-")
    first = decoder.next_segment(64)  # the first generation step: its bitmask from the host
    assert first.token_bitmask is not None and not first.deferred_mask and not decoder.sits_out_ahead()
    ahead = decoder.plan_ahead(64)
    assert ahead.feedback and ahead.deferred_mask and ahead.token_bitmask is None
    with pytest.raises(RuntimeError):
        decoder.deferred_bitmask(first)
    decoder.absorb(SegmentResult("g", [a], [1.0]))
    after_a = decoder.constraint.bitmask()  # letters or "-"
    assert decoder.deferred_bitmask(ahead) == after_a != first.token_bitmask
    rerun = decoder.host_segment(ahead)  # (a failed step re-run from the host)
    assert (rerun.token_ids, rerun.token_bitmask, rerun.deferred_mask, rerun.feedback) == ([a], after_a, False, False)

    moot = decoder.plan_ahead(64)
    assert moot.deferred_mask and moot.positions == [ahead.positions[0] + 1]
    decoder.absorb(SegmentResult("g", [dash], [1.0]))  # "-": the grammar forces "id="
    forced = decoder.generated[2:]
    assert runner.tokenizer.decode(forced) == "id=" and decoder.generated[:2] == [a, dash]
    assert decoder.deferred_bitmask(moot) is None
    assert decoder.host_segment(moot).token_ids == [dash]  # the token it feeds, not the last forced one
    assert decoder.sits_out_ahead(len(forced)) and not decoder.sits_out_ahead(len(forced) + 1)  # (run + read)
    step = decoder.plan_ahead(64)  # the forced run, read after its last token under the host's bitmask
    assert step.token_ids == forced and step.reads.argmax == (len(forced) - 1,) and step.num_kept == len(forced)
    assert not (step.deferred_mask or step.feedback) and step.token_bitmask == decoder.constraint.bitmask()
    assert step.positions[0] == moot.positions[0] + 1 and step.context_len == moot.context_len + 1
    forwards = decoder.stats.forwards
    decoder.absorb(SegmentResult("g", [a], [0.5]))  # its read ("a") is discarded: "-" is cached, nothing added
    assert decoder.generated == [a, dash] + forced and decoder.gen_cached == 2
    assert decoder.stats.forwards == forwards + 1
    decoder.absorb(SegmentResult("g", [a], [0.5]))  # the forced run's step: "a" follows "id="
    assert decoder.generated == [a, dash] + forced + [a] and decoder.gen_cached == 2 + len(forced)


async def test_a_token_cap_inside_a_forced_run_counts_the_tokens_returned(engine_factory, runner):
    # max_tokens cuts the stream inside a run the grammar forced (appended whole, without a forward): the
    # stats (usage of the infill route, tokens per forward, the metrics) counted the whole run (12 tokens
    # for max_tokens 4, from a break-test), now the 4 returned
    engine = await engine_factory()
    fixed = '{"a_long_key_the_grammar_forces_whole": '
    lark = GrammarSpec(LLMatcher.grammar_from_lark(f'start: {json.dumps(fixed)} /[0-9]{{1,3}}/ "}}"'))
    compile_grammar, forced = engine.grammars.compile, []

    async def compile_noting(spec, prompt_ids, max_forced):
        forced.append(max_forced)
        return await compile_grammar(spec, prompt_ids, max_forced)

    # The forced start is fed before the cap is checked: compiled no longer than the cap, so an AR
    # request's KV stays inside its estimate, which counts max_tokens (helper-155)
    engine.grammars.compile = compile_noting
    for cap in (2, 5):
        spec = GenerationRequest(f"cap{cap}", _ids(runner, PROMPTS[0]), {"gen_length": GEN}, mode=Mode.AR,
                                 grammar=lark, max_tokens=cap)
        text, ids, last = await _run(engine, spec)
        assert len(_ids(runner, fixed)) > cap  # (the cap falls inside the forced start)
        assert len(ids) == cap == last.stats["generated_tokens"] and last.finish_reason is FinishReason.LENGTH
        assert fixed.startswith(text)
    assert forced == [2, 5]


class _TickClock:
    """A CPU clock for TokenConstraint that moves on `tick` seconds at each reading: each llguidance
    call (read before it and after it) costs exactly `tick`."""

    def __init__(self, tick: float):
        self.now, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def test_a_tokens_matching_time_counts_consume_forced_tokens_and_bitmask_against_the_budget(runner):
    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    spec = GrammarSpec(LLMatcher.grammar_from_lark('start: /[a-z]+/ "(x)" /[a-z]+/'), source="structured_outputs.grammar")
    prompt, letters = _ids(runner, "x"), _ids(runner, "ab")
    clock = _TickClock(0.001)  # each call (consume, fast_forward, bitmask) costs 1 ms
    constraint = Grammar(tokenizer, spec, prompt, token_ms=3.5, clock=clock).constraint()
    constraint.bitmask()
    for _ in range(10):  # 3 ms per token, under 3.5: the budget is per token, not summed over tokens
        constraint.consume(letters[0])
        assert constraint.fast_forward(8) == []
        constraint.bitmask()
    constraint.consume(letters[1])
    clock.tick = 0.002  # now 2 ms per call
    assert constraint.fast_forward(8) == []  # 1 + 2 ms so far for this token: under 3.5
    with pytest.raises(DecodeParamError) as err:  # + 2 ms
        constraint.bitmask()
    assert err.value.field == "structured_outputs.grammar"
    assert "5.00 ms of CPU time for one token" in err.value.message and "grammar_token_ms" in err.value.message
    unbounded = Grammar(tokenizer, spec, prompt, token_ms=0, clock=_TickClock(1.0)).constraint()
    for token in letters:
        unbounded.consume(token)
        unbounded.bitmask()  # 0: no budget, whatever the calls cost


class _SlowConsume:
    """An llguidance matcher whose consume_token first runs `work`: the time a token's matching takes."""

    def __init__(self, matcher, work):
        self._matcher, self._work = matcher, work

    def __getattr__(self, name: str):
        return getattr(self._matcher, name)

    def consume_token(self, token: int) -> bool:
        self._work()
        return self._matcher.consume_token(token)


@pytest.mark.parametrize("built_by", ["Grammar", "GrammarCompiler"])
def test_a_garbage_collection_inside_a_timed_call_is_not_charged_to_the_grammar(runner, monkeypatch, built_by):
    """The budget's default clock leaves garbage collections out (decoding.cpu_clock.cpu_time_without_gc):
    a full collection starting inside an llguidance call (150 ms of CPU with torch and Ray loaded,
    helper-233) failed a valid request with a 400 blaming its grammar. Here the CPU clock is a fake
    that a collection moves on by 100 ms (FakeCpuClock), so the same 100 ms
    is charged when it is the call's own work and not when a real gc.collect() took it. The engine builds
    its grammars with GrammarCompiler's default clock: that default is this one too."""
    import gc

    cpu = FakeCpuClock(monkeypatch)  # a collection: 100 ms
    def own_work() -> None:
        cpu.now += 0.1

    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    spec = GrammarSpec(LLMatcher.grammar_from_lark("start: /[a-z]+/"), source="structured_outputs.grammar")
    if built_by == "Grammar":
        grammar = Grammar(tokenizer, spec, _ids(runner, "x"), token_ms=50)
    else:
        grammar = _compiled_as_the_engine_does(tokenizer, spec, _ids(runner, "x"), token_ms=50)
    letter = _ids(runner, "a")[0]
    collected = grammar.constraint()
    collected._matcher = _SlowConsume(collected._matcher, gc.collect)
    with cpu.slow_collections():
        collected.bitmask()
        before = cpu.now
        collected.consume(letter)
        assert cpu.now - before >= 0.1  # the collection ran inside the timed call and took 100 ms
        collected.bitmask()  # no error: under 50 ms
        assert collected.last_token_ms < 50  # nor is it counted as a slow grammar's (grammar_step_ms)
    worked = grammar.constraint()
    worked._matcher = _SlowConsume(worked._matcher, own_work)
    worked.bitmask()
    with pytest.raises(DecodeParamError, match="100.00 ms of CPU time for one token"):  # its own 100 ms counts
        worked.consume(letter)


def _compiled_as_the_engine_does(tokenizer, spec, prompt_ids, token_ms):
    """The grammar GrammarCompiler builds on its compile thread, with its default clock (as Engine's)."""
    from decoding.grammar import MAX_GRAMMAR_CHARS
    from scheduler.grammars import GrammarCompiler

    compiler = GrammarCompiler(tokenizer, token_ms)
    try:
        return asyncio.run(compiler.compile(spec, prompt_ids, MAX_GRAMMAR_CHARS))
    finally:
        compiler.close()


def test_a_garbage_collection_in_another_thread_is_not_taken_off_this_ones_clock(monkeypatch):
    """cpu_time_without_gc is per thread, as time.thread_time is: a collection on a grammar compile thread is
    that thread's, and taken off the engine thread's clock too it would make that clock run backwards.
    The fake CPU clock here is per thread; a collection moves its own thread's on by 100 ms."""
    import collections
    import gc
    import threading
    import types

    import decoding.cpu_clock as cpu_clock_module
    from decoding.cpu_clock import cpu_time_without_gc

    clocks = collections.defaultdict(float)
    monkeypatch.setattr(cpu_clock_module, "time",
                        types.SimpleNamespace(thread_time=lambda: clocks[threading.get_ident()]))

    def collection_takes_100_ms(phase: str, _info: dict) -> None:
        if phase == "stop":
            clocks[threading.get_ident()] += 0.1

    def collect_elsewhere() -> None:
        before = cpu_time_without_gc()
        gc.collect()
        elsewhere.append((clocks[threading.get_ident()], cpu_time_without_gc() - before))

    elsewhere: list[tuple[float, float]] = []
    gc.callbacks.insert(0, collection_takes_100_ms)  # (before the module's: the stop it reads is 100 ms on)
    try:
        here = cpu_time_without_gc()
        worker = threading.Thread(target=collect_elsewhere)
        worker.start()
        worker.join()
        assert cpu_time_without_gc() == pytest.approx(here)
    finally:
        gc.callbacks.remove(collection_takes_100_ms)
    (clock, spent), = elsewhere
    assert clock >= 0.1 and spent == pytest.approx(0.0)  # the collection was that thread's, and left out there


async def test_a_grammar_whose_matching_outgrows_its_cpu_budget_fails_alone(engine_factory, runner, monkeypatch):
    # One character per lexeme and an ambiguous rule: llguidance's per-mask work stays under its own limits
    # while the time per token grows with the text (2 s per token after ~400 characters on the CI CPU), and
    # the engine computes every bitmask before each step, so every request in the batch waited for it. With
    # a budget of 2 ms per token it fails alone, with a 400 naming its field, wherever the machine's speed
    # puts that token (the time grows without bound; 2 ms was reached within ~45 characters here, and the
    # first tokens take ~0.04 ms).
    ambiguous = GrammarSpec(LLMatcher.grammar_from_lark('start: s\ns: s s | s s s | C\nC: /[a-z ]/'),
                            source="response_format.grammar")
    engine = await engine_factory(grammar_token_ms=2.0)
    free = [GenerationRequest(f"f{i}", _ids(runner, p), {"gen_length": 32}, mode=Mode.AR) for i, p in enumerate(PROMPTS)]
    alone = [await _run(engine, f) for f in free]
    free = [GenerationRequest(f"g{i}", f.prompt_ids, f.params, mode=Mode.AR) for i, f in enumerate(free)]
    heavy = GenerationRequest("heavy", _ids(runner, PROMPTS[0]), {"gen_length": 2048, "ignore_eos": True},
                              grammar=ambiguous)
    *together, (text, ids, last) = await asyncio.gather(*(_run(engine, s) for s in free + [heavy]))
    assert [ids for _, ids, _ in together] == [ids for _, ids, _ in alone]
    assert last.finish_reason is FinishReason.ERROR and last.error_field == "response_format.grammar"
    assert "grammar_token_ms" in last.error and 0 < len(ids) < 2048 and re.fullmatch("[a-z ]*", text)
    # The request after it is timed on a CPU clock that stands still (FakeCpuClock): that the engine serves
    # a grammar on is the point here, and a JSON token's ~0.1 ms against the 2 ms budget was a margin on
    # the machine's speed (one 10x slower failed it).
    FakeCpuClock(monkeypatch)
    text, _, last = await _run(engine, GenerationRequest("after", _ids(runner, PROMPTS[0]), {"gen_length": GEN},
                                                         grammar=JSON_GRAMMAR))
    assert _matches_schema(text) and last.finish_reason is FinishReason.STOP  # the engine serves on


def test_the_forced_start_consumed_at_compile_is_bounded_by_max_forced(runner):
    # llguidance matches forced tokens holding the GIL: a grammar forcing thousands of tokens stalled the
    # engine loop for seconds while it compiled, for a request that could return a few of them
    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    fixed = "".join(f"item_{i}, " for i in range(300))
    spec = GrammarSpec(LLMatcher.grammar_from_lark(f'start: {json.dumps(fixed)} /[a-z]+/'))
    full = Grammar(tokenizer, spec, _ids(runner, "x"))
    cut = Grammar(tokenizer, spec, _ids(runner, "x"), max_forced=8)
    assert len(full.initial_forced) > 300 and cut.initial_forced == full.initial_forced[:8]
    constraint = cut.constraint()
    assert not constraint.stopped and constraint.fast_forward(4) == full.initial_forced[8:12]  # it goes on from there


async def test_a_forced_start_longer_than_gen_length_ends_on_length_with_its_first_tokens(engine_factory, runner):
    engine = await engine_factory()
    fixed = "".join(f"item_{i}, " for i in range(300))
    spec = GenerationRequest("long", _ids(runner, PROMPTS[0]), {"gen_length": 16, "serial_num_blocks": 1},
                             grammar=GrammarSpec(LLMatcher.grammar_from_lark(f'start: {json.dumps(fixed)} /[a-z]+/')))
    text, ids, last = await _run(engine, spec)
    assert len(ids) == 16 and fixed.startswith(text) and last.finish_reason is FinishReason.LENGTH


async def test_a_whole_forced_grammar_cut_by_gen_length_ends_on_length(engine_factory, runner):
    """A grammar that forces all of its text (a constant) is complete once forced; cut by gen_length,
    it is not: the finish reason is LENGTH, as for any text the cap cut (and STOP when it fits)."""
    engine = await engine_factory()
    fixed = "".join(f"item_{i}, " for i in range(12))
    grammar = GrammarSpec(LLMatcher.grammar_from_lark(f"start: {json.dumps(fixed)}"))
    cut = GenerationRequest("cut", _ids(runner, PROMPTS[0]), {"gen_length": 8, "serial_num_blocks": 1}, grammar=grammar)
    text, ids, last = await _run(engine, cut)
    assert len(ids) == 8 and fixed.startswith(text) and last.finish_reason is FinishReason.LENGTH
    whole = GenerationRequest("whole", _ids(runner, PROMPTS[0]), {"gen_length": 128, "serial_num_blocks": 1},
                              grammar=grammar)
    text, ids, last = await _run(engine, whole)
    assert text == fixed and last.finish_reason is FinishReason.STOP
    # The engine forces at most the cap at compile; a decoder given a longer forced start cuts it too
    from decoding.ar import ARDecoder
    from scheduler.decoders import ModelDecoderFactory

    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    compiled = Grammar(tokenizer, grammar, _ids(runner, PROMPTS[0]))  # forced whole: complete at compile
    assert compiled.constraint().stopped and len(compiled.initial_forced) > 8
    factory = ModelDecoderFactory(runner)
    for gen_length, complete in ((8, False), (len(compiled.initial_forced), True)):
        params = factory.parse_params({"gen_length": gen_length, "slot_size": 1, "serial_num_blocks": 1})
        decoder = ARDecoder("d", _ids(runner, PROMPTS[0]), params, constraint=compiled.constraint())
        assert decoder.finished and decoder.ended_on_eos is complete
        assert decoder.output_ids() == compiled.initial_forced[:gen_length]


async def test_requests_with_the_same_grammar_share_one_compile_on_the_compile_threads(engine_factory, runner, monkeypatch):
    import threading

    import decoding.grammar as grammar_module

    threads, init = [], grammar_module.Grammar.__init__

    def recorded(self, *args, **kwargs):
        threads.append(threading.current_thread().name)
        init(self, *args, **kwargs)

    monkeypatch.setattr(grammar_module.Grammar, "__init__", recorded)
    engine = await engine_factory()
    specs = [GenerationRequest(f"s{i}", _ids(runner, p), {"gen_length": GEN, "temperature": 1.0, "seed": i},
                               grammar=JSON_GRAMMAR) for i, p in enumerate(PROMPTS * 2)]
    outputs = await asyncio.gather(*(_run(engine, s) for s in specs))  # (n choices of one request, say)
    assert all(_matches_schema(text) for text, _, _ in outputs)
    assert engine.grammars.compiles == 1 and len(threads) == 1 and threads[0].startswith("grammar-compile")
    other = GrammarSpec(JSON_GRAMMAR.grammar, source="response_format.json_schema.schema")  # named apart in errors
    text, _, _ = await _run(engine, GenerationRequest("o", _ids(runner, PROMPTS[0]), {"gen_length": GEN}, grammar=other))
    assert _matches_schema(text) and engine.grammars.compiles == 2
    refused = GrammarSpec(LLMatcher.grammar_from_lark("start: nothing"), source="structured_outputs.grammar")
    for i in range(2):  # a refused grammar is refused again from the cache
        with pytest.raises(InvalidRequestError) as err:
            await _run(engine, GenerationRequest(f"r{i}", _ids(runner, PROMPTS[0]), {}, grammar=refused))
        assert err.value.field == "structured_outputs.grammar"
    assert engine.grammars.compiles == 3


async def test_slow_grammars_take_turns_within_the_step_budget(engine_factory, runner):
    # Three grammar requests whose matching costs 30 ms of (ticking) CPU per token (consume, forced tokens,
    # mask: 10 ms per llguidance call), under the per-token budget but 90 ms together: with a step budget
    # of 40 ms one of them runs per step, by turns, beside the free requests; the outputs are those of
    # the same requests without a step budget (16 such requests made every step 0.7 s: helper-122).
    from scheduler.grammars import GrammarCompiler

    tokenizer = GrammarTokenizer(runner.tokenizer, runner.info.vocab_size, runner.info.eos_token_id)
    regex = GrammarSpec(LLMatcher.grammar_from_regex("[a-z]{12}"))
    outputs, crowded, execute = {}, {}, runner.execute
    for step_ms in (0.0, 40.0):
        engine = await engine_factory(grammar_token_ms=0, grammar_step_ms=step_ms)
        engine.grammars = GrammarCompiler(tokenizer, 0, clock=_TickClock(0.010))
        # compiled before the requests come, so all six start in the same step: a compile still running on
        # its thread while the free requests step on (a loaded machine) put the slow ones behind, and alone
        # once the free ones ended (nobody sits out then: a crowded step per token; CI met it)
        await engine.grammars.compile(regex, _ids(runner, PROMPTS[0]), max_forced=32)
        grammar_rows = []

        def counted(segments, tables, grammar_rows=grammar_rows):
            grammar_rows.append(sum(s.token_bitmask is not None for s in segments))
            return execute(segments, tables)

        runner.execute = counted
        try:
            specs = [GenerationRequest(f"slow{i}", _ids(runner, p), {"gen_length": 32}, grammar=regex)
                     for i, p in enumerate(PROMPTS)]
            specs += [GenerationRequest(f"free{i}", _ids(runner, p), {"gen_length": 32}, mode=Mode.AR)
                      for i, p in enumerate(PROMPTS)]
            outputs[step_ms] = await asyncio.gather(*(_run(engine, s) for s in specs))
        finally:
            runner.execute = execute
        assert all(re.fullmatch("[a-z]{12}", text) for text, _, _ in outputs[step_ms][:3])
        assert all(last.finish_reason is not FinishReason.ERROR for _, _, last in outputs[step_ms])
        assert engine.grammars.compiles == 1  # the requests took the grammar compiled before them
        crowded[step_ms] = sum(rows > 1 for rows in grammar_rows)  # steps with more than one slow request
    assert crowded[0.0] >= 6 and crowded[40.0] <= 2, crowded  # (the first steps: no cost measured yet)
    assert [ids for _, ids, _ in outputs[40.0]] == [ids for _, ids, _ in outputs[0.0]]  # batched differently
    # Only slow requests running: turns would protect no one, so all three go in every step
    engine = await engine_factory(grammar_token_ms=0, grammar_step_ms=40.0)
    engine.grammars = GrammarCompiler(tokenizer, 0, clock=_TickClock(0.010))
    grammar_rows = []
    runner.execute = lambda segments, tables: (grammar_rows.append(sum(s.token_bitmask is not None for s in segments)),
                                               execute(segments, tables))[1]
    try:
        alone = await asyncio.gather(*(_run(engine, GenerationRequest(f"only{i}", _ids(runner, p), {"gen_length": 32},
                                                                       grammar=regex)) for i, p in enumerate(PROMPTS)))
    finally:
        runner.execute = execute
    assert [ids for _, ids, _ in alone] == [ids for _, ids, _ in outputs[0.0][:3]]
    assert sum(rows == 3 for rows in grammar_rows) >= 6, grammar_rows

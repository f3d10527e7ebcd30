"""Log probabilities through the engine (GenerationRequest.params["logprobs"]) on a real ModelRunner
(the shipped model, CPU: its text has stop strings to cut at and ReFusion accepts slots at verify): each Delta carries one TokenLogprob per token id, in both modes, cut with the
text at stop strings and max_tokens, unchanged by a forced preemption, 0.0 for tokens a grammar forces;
asking for them changes no token."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sched_fakes import ForwardGate

from scheduler.api import GenerationRequest, Mode, Priority

SHIPPED_MODEL = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = pytest.mark.skipif(not (SHIPPED_MODEL / "config.json").is_file(), reason="models/refusion-tiny-code not present")
PROMPTS = ["def parse(self, text):\n    return", "class Wrapper:\n    def __init__(self"]


@pytest.fixture(scope="module")
def runner():
    from workers.runner import ModelRunner

    return ModelRunner(SHIPPED_MODEL, device="cpu", num_blocks=256)


async def _run(engine, spec):
    text, ids, entries, deltas = "", [], [], []
    async for delta in engine.submit(spec):
        assert (delta.logprobs is None) == ("logprobs" not in spec.params)
        if delta.logprobs is not None:
            assert len(delta.logprobs) == len(delta.token_ids)  # per delta, not only in total
            entries += delta.logprobs
        text, ids = text + delta.text, ids + delta.token_ids
        deltas.append(delta)
    return text, ids, entries, deltas


def _ids(runner, text: str) -> list[int]:
    return runner.tokenizer.encode(text, add_special_tokens=False)


def _check_entries(entries, ids, num_top):
    assert [e.token for e in entries] == ids
    for e in entries:
        assert e.logprob <= 0 and len(e.top) == num_top
        values = [v for _, v in e.top]
        assert values == sorted(values, reverse=True) and e.logprob <= values[0] + 1e-6
        assert e.logprob == pytest.approx(dict(e.top)[e.token], abs=1e-6) if e.token in dict(e.top) else True


@pytest.mark.parametrize("mode", [Mode.AR, Mode.REFUSION])
async def test_each_delta_carries_its_tokens_logprobs_and_nothing_changes(engine_factory, runner, mode):
    engine = await engine_factory()
    for prompt in PROMPTS:
        base = {"gen_length": 64, "temperature": 0.9, "seed": 4}
        plain = GenerationRequest("p", _ids(runner, prompt), dict(base), mode=mode)
        asked = GenerationRequest("l", _ids(runner, prompt), base | {"logprobs": 3}, mode=mode)
        (text, ids, _, _), (text_l, ids_l, entries, deltas) = await asyncio.gather(_run(engine, plain), _run(engine, asked))
        assert (text_l, ids_l) == (text, ids) and len(ids) >= 8
        _check_entries(entries, ids, 3)
        if mode is Mode.AR:  # (the random model's ReFusion text is held back whole: a broken UTF-8 sequence)
            assert len([d for d in deltas if d.token_ids]) > 1  # streamed in pieces


async def test_logprobs_are_cut_with_the_text(engine_factory, runner):
    engine = await engine_factory()
    prompt = _ids(runner, PROMPTS[1])  # AR writes 45 tokens after it
    _, full_ids, full, _ = await _run(engine, GenerationRequest("f", prompt, {"gen_length": 64, "logprobs": 1}, mode=Mode.AR))
    _, capped_ids, capped, deltas = await _run(engine, GenerationRequest(
        "c", prompt, {"gen_length": 64, "logprobs": 1}, mode=Mode.REFUSION, max_tokens=5))
    assert len(capped_ids) == len(capped) == 5 and deltas[-1].finish_reason.value == "length"  # cut inside a slot
    stop = runner.tokenizer.decode(full_ids[16:18])
    assert stop.strip()
    text, ids, entries, _ = await _run(engine, GenerationRequest(
        "s", prompt, {"gen_length": 64, "logprobs": 1}, mode=Mode.AR, stop=[stop]))
    assert stop not in text and ids == full_ids[:len(ids)] and len(ids) < 64
    assert entries == full[:len(ids)]


async def _preempted_copy(engine, runner, monkeypatch, wait_until, consume, spec, hold_from: int):
    """Run a copy of `spec` (id "r2") with `consume` on an engine of one running slot, preempted for sure:
    its forward number `hold_from` is held until an interactive request is queued behind it. Returns
    what `consume` returned and the ids of the requests preempted."""
    gate = ForwardGate(runner.execute, hold_from=hold_from)
    monkeypatch.setattr(runner, "execute", gate)
    preempted, requeue = [], engine.scheduler.requeue
    monkeypatch.setattr(engine.scheduler, "requeue", lambda victim, reason: (preempted.append(victim.id), requeue(victim, reason)))
    task = asyncio.create_task(consume(engine, GenerationRequest("r2", spec.prompt_ids, spec.params, mode=spec.mode)))
    try:
        await wait_until(gate.entered.is_set, "the held forward")
        urgent = asyncio.create_task(_run(engine, GenerationRequest("u", _ids(runner, PROMPTS[0]), {"gen_length": 64},
                                                                    mode=Mode.AR, priority=Priority.INTERACTIVE)))
        await wait_until(lambda: any(r.id == "u" for r in engine.scheduler.waiting), "the interactive request to queue")
    finally:
        gate.release()
    result, _ = await asyncio.gather(task, urgent)
    return result, preempted


async def test_a_preempted_request_reports_the_same_logprobs(engine_factory, runner, monkeypatch, wait_until):
    engine = await engine_factory(max_running=1)
    spec = GenerationRequest("r", _ids(runner, PROMPTS[1]), {"gen_length": 64, "logprobs": 2}, mode=Mode.REFUSION)
    _, ref_ids, reference, _ = await _run(engine, spec)
    (_, ids, entries, _), preempted = await _preempted_copy(engine, runner, monkeypatch, wait_until, _run, spec, 3)
    assert preempted == ["r2"]
    assert ids == ref_ids
    assert [e.token for e in entries] == [e.token for e in reference]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in reference], abs=1e-5)


async def test_tokens_a_grammar_forces_have_logprob_zero(engine_factory, runner):
    llguidance = pytest.importorskip("llguidance")
    from decoding.grammar import GrammarSpec

    engine = await engine_factory()
    grammar = GrammarSpec(llguidance.LLMatcher.grammar_from_regex(r"return self\.value [ab]"))
    text, ids, entries, _ = await _run(engine, GenerationRequest(
        "g", _ids(runner, PROMPTS[0]), {"gen_length": 64, "logprobs": 2}, grammar=grammar))
    assert text in ("return self.value a", "return self.value b") and [e.token for e in entries] == ids
    forced = [e for e in entries if e.top == ((e.token, 0.0),)]
    assert forced and all(e.logprob == 0.0 for e in forced)  # jump-forward: probability 1 under the mask
    read = [e for e in entries if e not in forced]
    assert read and all(1 <= len(e.top) <= 2 and e.logprob <= 0 for e in read)  # the choices the model made


async def _scored(engine, spec):
    """(ids, prompt scores, finish reason, final stats) of a prompt-scoring request; exactly one delta
    carries the scores."""
    ids, carriers, last = [], [], None
    async for delta in engine.submit(spec):
        ids += delta.token_ids
        if delta.prompt_logprobs is not None:
            carriers.append(delta)
        last = delta
    assert len(carriers) == 1
    return ids, carriers[0].prompt_logprobs, last.finish_reason.value, last.stats


@pytest.mark.parametrize("mode", [Mode.AR, Mode.REFUSION])
async def test_prompt_scores_come_once_never_from_the_prefix_cache_and_change_nothing(engine_factory, runner, mode):
    """The same prompt twice (the first run fills the prefix cache): both runs score every prompt token
    alike, neither starts on cached tokens, and the text is that of a request that scores nothing."""
    engine = await engine_factory()
    prompt = _ids(runner, PROMPTS[0] + "\n" + PROMPTS[1])  # a full KV block and more
    params = {"gen_length": 64, "temperature": 0.7, "seed": 5}
    _, plain_ids, _, _ = await _run(engine, GenerationRequest("p", prompt, dict(params), mode=mode))
    runs = [await _scored(engine, GenerationRequest(f"s{i}", prompt, params | {"prompt_logprobs": 2}, mode=mode))
            for i in range(2)]
    for ids, scores, _, stats in runs:
        assert ids == plain_ids and stats["cached_prompt_tokens"] == 0
        assert [e.token for e in scores] == prompt[1:]
        assert all(e.logprob <= 0 and len(e.top) == 2 for e in scores)
    assert [e.logprob for e in runs[0][1]] == pytest.approx([e.logprob for e in runs[1][1]], abs=1e-5)
    again = [d async for d in engine.submit(GenerationRequest("c", prompt, dict(params), mode=mode))]
    assert again[-1].stats["cached_prompt_tokens"] > 0  # the cache was filled; scoring only bypassed it


async def test_max_tokens_0_scores_the_prompt_and_generates_nothing(engine_factory, runner):
    """OpenAI's echo with max_tokens 0: the request ends once its prompt is scored, with no token, as
    `length`; without prompt scoring max_tokens 0 is refused naming the field."""
    from scheduler.api import InvalidRequestError

    engine = await engine_factory()
    prompt = _ids(runner, PROMPTS[1])
    ids, scores, reason, stats = await _scored(engine, GenerationRequest(
        "z", prompt, {"gen_length": 64, "prompt_logprobs": 0}, mode=Mode.REFUSION, max_tokens=0))
    assert ids == [] and reason == "length" and stats["generated_tokens"] == 0 and stats["forwards"] == 0
    assert [e.token for e in scores] == prompt[1:]
    with pytest.raises(InvalidRequestError) as err:
        await _run(engine, GenerationRequest("n", prompt, {"gen_length": 64}, max_tokens=0))
    assert err.value.field == "max_tokens"


async def test_a_preempted_scoring_request_sends_its_scores_once(engine_factory, runner, monkeypatch, wait_until):
    """Preempted after its prompt was scored and its first tokens sent, the rerun scores again: the client
    still gets one set of scores, equal to an undisturbed run's, and the same tokens."""
    engine = await engine_factory(max_running=1)
    spec = GenerationRequest("r", _ids(runner, PROMPTS[1]), {"gen_length": 64, "prompt_logprobs": 1}, mode=Mode.AR)
    ref_ids, reference, _, _ = await _scored(engine, spec)
    (ids, scores, _, stats), preempted = await _preempted_copy(engine, runner, monkeypatch, wait_until, _scored, spec, 4)
    assert preempted == ["r2"] and stats["preemptions"] == 1
    assert ids == ref_ids
    assert [e.logprob for e in scores] == pytest.approx([e.logprob for e in reference], abs=1e-5)


async def test_a_grammar_request_scores_its_prompt_too(engine_factory, runner):
    """Prompt scoring with a grammar (echo with structured output): the scores equal an unconstrained
    request's (prob reads are never masked) and the constrained text is unchanged by asking."""
    llguidance = pytest.importorskip("llguidance")
    from decoding.grammar import GrammarSpec

    engine = await engine_factory()
    prompt = _ids(runner, PROMPTS[0])
    grammar = GrammarSpec(llguidance.LLMatcher.grammar_from_regex(r"return self\.value [ab]"))
    plain = [d async for d in engine.submit(GenerationRequest("g0", prompt, {"gen_length": 64}, grammar=grammar))]
    ids, scores, _, _ = await _scored(engine, GenerationRequest("g1", prompt, {"gen_length": 64, "prompt_logprobs": 1},
                                                                grammar=grammar))
    _, free, _, _ = await _scored(engine, GenerationRequest("f", prompt, {"gen_length": 64, "prompt_logprobs": 1},
                                                            mode=Mode.AR))
    assert ids == [t for d in plain for t in d.token_ids]
    assert [(e.token, e.top[0][0]) for e in scores] == [(e.token, e.top[0][0]) for e in free]
    assert [e.logprob for e in scores] == pytest.approx([e.logprob for e in free], abs=1e-5)


@pytest.mark.parametrize("mode", [Mode.AR, Mode.REFUSION])
async def test_an_eos_ending_carries_the_eos_logprob_on_the_final_delta(engine_factory, runner, mode):
    """The text ends on EOS (the shipped model ends its text after PROMPTS[1] with EOS in both modes): the final delta
    carries that EOS's entry, apart from the tokens; ended by a stop string or with no room left under
    max_tokens, none; without logprobs, none."""
    engine = await engine_factory()
    prompt, eos = _ids(runner, PROMPTS[1]), runner.info.eos_token_id
    _, ids, entries, deltas = await _run(engine, GenerationRequest("e", prompt, {"gen_length": 64, "logprobs": 2},
                                                                   mode=mode))
    assert len(ids) < 64 and deltas[-1].finish_reason.value == "stop" and eos not in ids
    entry = deltas[-1].eos_logprob
    assert entry.token == eos and entry.logprob <= 0 and len(entry.top) == 2
    assert all(d.eos_logprob is None for d in deltas[:-1])
    half = len(ids) // 2
    stop = runner.tokenizer.decode(ids[half:half + 2])
    assert stop.strip(), ids
    for spec in (GenerationRequest("s", prompt, {"gen_length": 64, "logprobs": 2}, mode=mode, stop=[stop]),
                 GenerationRequest("c", prompt, {"gen_length": 64, "logprobs": 2}, mode=mode, max_tokens=len(ids)),
                 GenerationRequest("n", prompt, {"gen_length": 64}, mode=mode)):
        *_, last = await _run(engine, spec)
        assert last[-1].eos_logprob is None, spec.request_id


async def test_neither_a_scoring_request_nor_the_servers_own_counts_in_the_prefix_hit_rate(engine_factory, runner):
    """The hit rate counts the lookups of client requests that can use a hit: a prompt-scoring request
    reads no cached block (every prompt row is computed), and the server's own requests (health probes)
    would drag an idle server's rate towards 0. A plain request after them counts again."""
    engine = await engine_factory()
    prompt = _ids(runner, PROMPTS[0] * 6)  # several full KV blocks
    await _run(engine, GenerationRequest("warm", prompt, {"gen_length": 8, "serial_num_blocks": 1}, mode=Mode.AR))
    cache = engine.prefix_cache
    counted = (cache.lookup_tokens, cache.hit_tokens)
    await _scored(engine, GenerationRequest("scored", prompt, {"gen_length": 8, "serial_num_blocks": 1, "prompt_logprobs": 1}, mode=Mode.AR))
    await _run(engine, GenerationRequest("probe", prompt, {"gen_length": 8, "serial_num_blocks": 1}, mode=Mode.AR, internal=True))
    assert (cache.lookup_tokens, cache.hit_tokens) == counted
    await _run(engine, GenerationRequest("again", prompt, {"gen_length": 8, "serial_num_blocks": 1}, mode=Mode.AR))
    assert cache.lookup_tokens == counted[0] + len(prompt) and cache.hit_tokens > counted[1]


async def test_a_scoring_request_evicts_the_prefix_cache_for_room(engine_factory, runner):
    """The prefix cache holds most of the KV pool (earlier distinct prompts): a prompt-scoring request,
    which reads no cached block, still evicts cached blocks to start, as any request (it waited
    forever before; found by bench/logprobs.py's scoring rounds)."""
    import random

    engine = await engine_factory()
    rng = random.Random(0)
    block = engine.kv.pool().block_size

    def prompt(n: int) -> list[int]:
        return [rng.randrange(3, runner.info.vocab_size) for _ in range(n)]

    while engine.kv.pool().num_free >= 1000 // block + 4:  # fill the pool with cached prompt blocks
        await _run(engine, GenerationRequest(f"fill-{rng.random()}", prompt(700), {"gen_length": 8,
                                                                                    "serial_num_blocks": 1},
                                             mode=Mode.AR, max_tokens=1))
    assert engine.prefix_cache.num_blocks > engine.kv.pool().num_free
    ids, scores, reason, _ = await asyncio.wait_for(_scored(engine, GenerationRequest(
        "score", prompt(1000), {"gen_length": 8, "serial_num_blocks": 1, "prompt_logprobs": 0},
        mode=Mode.AR, max_tokens=0)), 120)  # a bound for a hang, not a speed target
    assert reason == "length" and ids == [] and len(scores) == 999

"""The engine on the shipped trained model: ReFusion really accepts slots at verify here (random weights
almost never do), so packed batching is checked on the accept-and-keep-KV paths too."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest

from scheduler.api import FinishReason, GenerationRequest, Mode
from scheduler.config import EngineConfig, RoutingConfig

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="models/refusion-tiny-code not present"),
]

# A slot is accepted at verify when every drafted token's probability passes token_threshold; set far
# below the shipped refusion.json's so that whichever stage ships takes the accept path on these prompts
# (measured: a slot accepted on each with the stage-4 model; at the shipped 0.01, on two of them).
PARAMS = {"token_threshold": 0.001}
PROMPTS = [
    "class Stack:\n    def __init__(self):\n",
    "import sys\n\n\ndef main():\n",
    "    def __init__(self, name):\n        self.name = name\n",
    "for i in range(10):\n",
]


async def test_concurrent_requests_on_the_shipped_model_equal_their_solo_runs():
    from decoding.loop import decode_batch
    from scheduler.decoders import ModelDecoderFactory
    from scheduler.engine import Engine
    from workers.runner import ModelRunner
    from workers.session import RunnerSession

    runner = ModelRunner(SHIPPED, device="cpu", num_blocks=512)
    tokenizer, factory = runner.tokenizer, ModelDecoderFactory(runner)
    specs = [GenerationRequest(f"s{i}", tokenizer.encode(PROMPTS[i % 4]), dict(PARAMS), mode=(Mode.REFUSION, Mode.AR)[i // 4 % 2])
             for i in range(8)]
    solo = {}
    for spec in specs:
        decoder = factory.create(spec.mode, f"solo-{spec.request_id}", spec.prompt_ids, factory.parse_params(PARAMS), None)
        solo[spec.request_id] = decode_batch(RunnerSession(runner), [decoder])[0]
    engine = Engine(runner, tokenizer, EngineConfig(routing=RoutingConfig(calibrate=False)))
    await engine.start()
    results = await asyncio.gather(*[_collect(engine, s) for s in specs])
    await engine.stop()
    for spec, deltas in zip(specs, results):
        assert deltas[-1].finish_reason in (FinishReason.STOP, FinishReason.LENGTH)
        assert [t for d in deltas for t in d.token_ids] == solo[spec.request_id], spec.request_id
    accepted = sum(d[-1].stats["slots_accepted_at_verify"] for s, d in zip(specs, results) if s.mode is Mode.REFUSION)
    assert accepted > 0  # slots were accepted at verify (KV kept from the verify forward), not only completed
    assert engine.kv.pool().num_free == engine.kv.pool().num_total


async def _collect(engine, spec):
    return [d async for d in engine.submit(spec)]


async def test_the_router_is_told_every_token_and_forward_of_a_refusion_request():
    # A ReFusion slot's last branch verify reads nothing (every drafted token's predecessor is already
    # verified) and commits the slot. The engine reported only steps with reads, so the router never saw
    # those tokens: its ReFusion estimate was ~0.86 tokens per forward against a measured 1.45, and
    # mode "auto" chose AR where ReFusion is faster.
    from scheduler.engine import Engine
    from workers.runner import ModelRunner

    runner = ModelRunner(SHIPPED, device="cpu", num_blocks=512)
    readless = []
    execute = runner.execute

    def recording(segments, tables):
        readless.extend(s.seq_id for s in segments if not s.reads and s.seq_id == "long")
        return execute(segments, tables)

    runner.execute = recording
    engine = Engine(runner, runner.tokenizer, EngineConfig(routing=RoutingConfig(calibrate=False)))
    seen = []
    observe = engine.router.observe
    engine.router.observe = lambda *args, **kw: (seen.append(args), observe(*args, **kw))[-1]
    await engine.start()
    # An opening the shipped model writes on to gen_length with ReFusion (bench/concurrency.py --prompts long)
    deltas = await _collect(engine, GenerationRequest("long", runner.tokenizer.encode("class _"), {"gen_length": 128},
                                                      mode=Mode.REFUSION))
    await engine.stop()
    stats = deltas[-1].stats
    assert readless, "no read-less decode forward: the case this test is about did not occur"
    assert sum(tokens for _mode, _priority, tokens, _forwards, _packed in seen) == stats["generated_tokens"]
    assert len(seen) == stats["forwards"]
    assert all(mode is Mode.REFUSION for mode, *_ in seen)


async def test_a_second_end_token_in_generation_config_ends_the_text(tmp_path):
    """generation_config.json's eos_token_id list (a Qwen3 chat checkpoint lists <|im_end|> and
    <|endoftext|>; config.json names one): every id in it ends the text as EOS does, through the real
    engine, AR and ReFusion, and ignore_eos bans each. The second end token here is a token the model
    writes in its own greedy text, so the text must stop right before it (it ran on past it)."""
    import shutil

    from workers.runner import ModelRunner

    prompt, params = "def fib(n):\n", {"gen_length": 32, "serial_num_blocks": 2, "temperature": 0}
    runner = ModelRunner(SHIPPED, device="cpu", num_blocks=256)
    free = await _run_engine(runner, prompt, params)
    model = Path(shutil.copytree(SHIPPED, tmp_path / "model"))
    text = free[Mode.AR].token_ids
    end = next(t for i, t in enumerate(text) if i >= 3 and t not in text[:i])  # first written at index >= 3
    config = json.loads((model / "generation_config.json").read_text())
    (model / "generation_config.json").write_text(json.dumps({**config, "eos_token_id": [runner.info.eos_token_id, end]}))
    runner = ModelRunner(model, device="cpu", num_blocks=256)
    assert runner.info.end_token_ids == (end,)
    ended = await _run_engine(runner, prompt, params)
    assert ended[Mode.AR].token_ids == text[: text.index(end)]
    assert ended[Mode.AR].forwards == text.index(end) + 1  # it stopped at the end token (not just cut the text)
    assert ended[Mode.AR].finish_reason is FinishReason.STOP
    if end in free[Mode.REFUSION].token_ids:  # ReFusion wrote it too: now the text ends there
        assert end not in ended[Mode.REFUSION].token_ids and ended[Mode.REFUSION].finish_reason is FinishReason.STOP
    banned = await _run_engine(runner, prompt, {**params, "ignore_eos": True}, modes=(Mode.AR,))
    assert end not in banned[Mode.AR].token_ids and len(banned[Mode.AR].token_ids) == 32


async def test_a_plain_end_token_is_grammar_text_in_a_structured_request(tmp_path):
    """An end id that is a plain token ("." here) listed in generation_config.json: a grammar request's text
    follows its grammar and ends where the grammar does (the model's "lib.get..." came back "lib", finish stop,
    not matching; a "." the grammar forced was cut likewise)."""
    import shutil

    from decoding.grammar import GrammarSpec
    from scheduler.engine import Engine
    from workers.runner import ModelRunner

    llguidance = pytest.importorskip("llguidance")
    model = Path(shutil.copytree(SHIPPED, tmp_path / "model"))
    dot = ModelRunner(SHIPPED, device="cpu", num_blocks=16).tokenizer.convert_tokens_to_ids(".")
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [0, dot]}))
    runner = ModelRunner(model, device="cpu", num_blocks=256)
    assert runner.info.end_token_ids == (dot,)
    engine = Engine(runner, runner.tokenizer, EngineConfig(routing=RoutingConfig(calibrate=False)))
    await engine.start()
    texts = {}
    # "." forced by the grammar; then chosen by the model among letters (it writes "lib.get...")
    for prompt, regex in (("x = ", r"3\.14"), ("import os\nx = ", r"[a-z]+\.[a-z]+")):
        grammar = GrammarSpec(llguidance.LLMatcher.grammar_from_regex(regex))
        deltas = await _collect(engine, GenerationRequest(prompt, runner.tokenizer.encode(prompt),
                                                          {"gen_length": 16, "serial_num_blocks": 2}, mode=Mode.AR,
                                                          grammar=grammar))
        texts[regex] = "".join(d.text for d in deltas)
        assert re.fullmatch(regex, texts[regex]), texts
    await engine.stop()
    assert texts[r"3\.14"] == "3.14" and deltas[-1].finish_reason is FinishReason.LENGTH  # not ended by the "."


async def _run_engine(runner, prompt: str, params: dict, modes=(Mode.AR, Mode.REFUSION)) -> dict:
    """{mode: the request's generated token ids, finish reason and forwards} from a fresh engine on `runner`."""
    from types import SimpleNamespace

    from scheduler.engine import Engine

    engine = Engine(runner, runner.tokenizer, EngineConfig(routing=RoutingConfig(calibrate=False)))
    await engine.start()
    out = {}
    for mode in modes:
        deltas = await _collect(engine, GenerationRequest(f"r-{mode.value}", runner.tokenizer.encode(prompt),
                                                          dict(params), mode=mode))
        out[mode] = SimpleNamespace(token_ids=[t for d in deltas for t in d.token_ids], finish_reason=deltas[-1].finish_reason,
                                    forwards=deltas[-1].stats["forwards"])
    await engine.stop()
    return out

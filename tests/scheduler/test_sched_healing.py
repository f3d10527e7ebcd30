"""Token healing on the shipped trained model: a text prompt's trailing blanks, left out of its prompt ids
(GenerationRequest.healed), are written by the model's first tokens, so the client's prompt + text is the
model's text. A new-user test found "import " completed as "_name()": the client read "import _name()"
where the model wrote "import_name()" (and "def " as "def (1, 2) ==", the model's "def(1, 2) =="); after
"import os\\n    " the model wrote three of the four blanks and a newline. Now every read is masked until
the blanks are written (decoding/healing.py), serially and with steps planned ahead."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

import pytest
import structlog
from sched_fakes import ForwardGate

import scheduler.engine_output as engine_output
from scheduler.api import GenerationRequest, Mode, Priority
from scheduler.config import RoutingConfig

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="models/refusion-tiny-code not present"),
]
PROMPTS = ["import ", "def ", "import os\n    ", "def f():\n    "]


@pytest.fixture(scope="module")
def runner():
    from workers.runner import ModelRunner

    return ModelRunner(SHIPPED, device="cpu", num_blocks=256)


async def _complete(engine, prompt: str, mode: Mode = Mode.AR) -> tuple[str, list[int], list]:
    """(text the client gets, generated ids, deltas) of a greedy completion of `prompt` healed as the
    OpenAI layer heals it (integrations/openai_requests.py: its trailing spaces and tabs left out)."""
    kept = prompt.rstrip(" \t")
    spec = GenerationRequest(f"h{abs(hash((prompt, mode)))}", engine.tokenizer.encode(kept), {"temperature": 0},
                             mode=mode, max_tokens=8, healed=prompt[len(kept):])
    deltas = [d async for d in engine.submit(spec)]
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], deltas


@pytest.mark.parametrize("async_scheduling", [False, True])
async def test_the_model_writes_the_healed_blanks_and_the_client_reads_its_text(engine_factory, async_scheduling):
    engine = await engine_factory(routing=RoutingConfig(calibrate=False), async_scheduling=async_scheduling)
    for prompt in PROMPTS:
        kept, healed = prompt.rstrip(" "), prompt[len(prompt.rstrip(" ")):]
        text, ids, _ = await _complete(engine, prompt)
        written = engine.tokenizer.decode(ids, skip_special_tokens=True)
        assert written.strip(), (prompt, written)  # (these prompts get a completion, not an immediate EOS)
        assert written.startswith(healed), (prompt, [engine.tokenizer.decode([t]) for t in ids])
        assert prompt + text == kept + written, (prompt, text, written)


async def test_an_auto_request_writes_its_healed_blanks_in_ar_then_is_routed_as_any(engine_factory):
    """AUTO: started in AR for its blanks (reason "healing", where the router would choose ReFusion on
    this idle engine), its text the one AR gives."""
    engine = await engine_factory(routing=RoutingConfig(calibrate=False, explore_every=0))
    with structlog.testing.capture_logs() as logs:
        auto_text, auto_ids, deltas = await _complete(engine, "import ", Mode.AUTO)
        plain = await _complete(engine, "import", Mode.AUTO)
    routes = {e["request_id"]: e["reason"] for e in logs if e["event"] == "route"}
    assert list(routes.values()) == ["healing", "refusion_faster"]
    assert deltas[0].mode is Mode.AR
    ar_text, ar_ids, _ = await _complete(engine, "import ", Mode.AR)
    assert (auto_text, auto_ids) == (ar_text, ar_ids)
    assert plain[2][-1].mode is Mode.REFUSION


async def test_refusion_asked_for_is_not_constrained(engine_factory):
    """ReFusion takes no token mask (docs/api.md "Token healing"): a healed prompt asked in mode "refusion"
    decodes as before, unconstrained; the blanks are dropped as far as the model wrote them."""
    engine = await engine_factory(routing=RoutingConfig(calibrate=False))
    text, ids, deltas = await _complete(engine, "import ", Mode.REFUSION)
    assert deltas[-1].stats["modes"] == ["refusion"]
    assert text == engine.tokenizer.decode(ids, skip_special_tokens=True).removeprefix(" ")


@pytest.mark.parametrize("prompt", ["import os\n    ", "def f():\n    "])
async def test_a_request_preempted_mid_healing_reruns_to_the_same_text(engine_factory, runner, monkeypatch, wait_until, prompt):
    """A BATCH request preempted by an INTERACTIVE one after its first token (greedy on the shipped model
    that token is 3 of the 4 blanks, so the healing is still pending) and retraced from it has its
    constraint fed the replayed id (scheduler/replay.py): it ends with the text it gets alone. Unfed,
    the constraint starts again at column 0 and the text was empty."""
    engine = await engine_factory(routing=RoutingConfig(calibrate=False), max_running=1)
    kept = prompt.rstrip(" ")
    spec = GenerationRequest("alone", engine.tokenizer.encode(kept), {"temperature": 0}, mode=Mode.AR,
                             max_tokens=12, healed=prompt[len(kept):], priority=Priority.BATCH)
    alone = [d async for d in engine.submit(spec)]
    gate = ForwardGate(runner.execute, hold_from=0)  # held: the prefill, which reads the first token
    monkeypatch.setattr(runner, "execute", gate)
    preempted, requeue = [], engine.scheduler.requeue
    monkeypatch.setattr(engine.scheduler, "requeue", lambda victim, reason: (preempted.append(victim.id), requeue(victim, reason)))

    # A rerun retraces the streamed ids only where it parts from them (scheduler/replay.py), which on the
    # CPU it does not: it retraces at its first check here, as a rerun parting at a near-tie would
    retraced, diverged = [], engine_output.replay_diverged

    def diverge_once(req) -> bool:
        if retraced:
            return diverged(req)
        retraced.append(list(req.replay_ids))
        return True

    monkeypatch.setattr(engine_output, "replay_diverged", diverge_once)

    async def collect(request):
        return [d async for d in engine.submit(request)]

    task = asyncio.create_task(collect(dataclasses.replace(spec, request_id="victim")))
    try:
        await wait_until(gate.entered.is_set, "the held forward")
        (running,) = engine.scheduler.running
        assert running.id == "victim" and running.decoder.healing_pending
        urgent = asyncio.create_task(collect(GenerationRequest("u", engine.tokenizer.encode("import json\n"), {},
                                                               mode=Mode.AR, max_tokens=4, priority=Priority.INTERACTIVE)))
        await wait_until(lambda: any(r.id == "u" for r in engine.scheduler.waiting), "the interactive request to queue")
    finally:
        gate.release()
    victim, _ = await asyncio.gather(task, urgent)

    text, ids = "".join(d.text for d in victim), [t for d in victim for t in d.token_ids]
    assert preempted == ["victim"] and retraced == [ids[:1]]
    assert (text, ids) == ("".join(d.text for d in alone), [t for d in alone for t in d.token_ids])
    assert prompt + text == kept + engine.tokenizer.decode(ids, skip_special_tokens=True)

"""The whole engine on CUDA against the whole engine on the CPU: AR and ReFusion requests, four at a time,
give the same tokens on every runner variant (float32, greedy). The decoders' real steps run here
(prefill chunks, decode, plan, verify, branches, remasking, mixed batches), so this covers what the
runner-level tests in test_cuda_runner.py build by hand, and with cuda_graphs it runs them from graphs
captured at start-up and while serving. With llguidance installed, four grammar-constrained (JSON
schema) AR requests run too: the token bitmask reaches the device and masks there as on the CPU. Half
of the AR and ReFusion requests ask for log probabilities (3 alternatives): the steps that carry them
take the reads' top-k stage (its own graphs), and their values match the CPU's; they also score their
prompts (prompt_logprobs 2: prefill steps with a read on every row), which match the CPU's too.
Skipped without a GPU."""

from __future__ import annotations

import asyncio
import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from scheduler.api import GenerationRequest, Mode  # noqa: E402
from scheduler.config import EngineConfig, RoutingConfig  # noqa: E402
from scheduler.engine import Engine  # noqa: E402
from workers.loader import load_tokenizer, read_config  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

PROMPTS = ["def add(a, b):\n    return", "import os\n\nclass Config:\n", "for i in range(10):\n    print(", "x = ["]
PARAMS = {  # ReFusion: blocks of 16 tokens, 4 slots of 4: parallel plans, verification, branches, remasks
    Mode.AR: {"gen_length": 24, "slot_size": 1, "serial_num_blocks": 1, "temperature": 0.0},
    Mode.REFUSION: {"gen_length": 32, "slot_size": 4, "serial_num_blocks": 2, "temperature": 0.0,
                    "slot_threshold": 0.05, "token_threshold": 0.01},
}
VARIANTS = {  # every option named: on CUDA the runner's defaults are compiled layers and graphs
    "eager": {"cuda_graphs": False, "compile_layers": False},
    "graphs": {"cuda_graphs": True, "compile_layers": False},
    "compiled+graphs": {"cuda_graphs": True, "compile_layers": True},
    "flex+graphs": {"attention": "flex", "cuda_graphs": True, "compile_layers": False},
    "paged+compiled+graphs": {"attention": "paged", "cuda_graphs": True, "compile_layers": True},
}


LOGPROBS: dict = {}  # (device, mode, request index) -> [(token, logprob, top ids)] of the requests that ask
PROMPT_LOGPROBS: dict = {}  # the same keys -> the prompt's scores, as LOGPROBS's entries


async def _run(runner: ModelRunner) -> dict[tuple[str, int], list[int]]:
    engine = Engine(runner, runner.tokenizer, EngineConfig(routing=RoutingConfig(calibrate=False)))
    await engine.start()
    device = runner.device.type

    async def one(mode: Mode, i: int) -> list[int]:
        params = dict(PARAMS[mode], **({"logprobs": 3, "prompt_logprobs": 2} if i % 2 else {}))
        spec = GenerationRequest(f"{mode.value}-{i}", runner.tokenizer.encode(PROMPTS[i]), params, mode=mode)
        ids, last, entries, scores = [], None, [], []
        async for delta in engine.submit(spec):
            ids += delta.token_ids
            entries += delta.logprobs or []
            scores += delta.prompt_logprobs or []
            last = delta
        assert last is not None and last.finished and last.error is None, last
        if i % 2:
            assert [e.token for e in entries] == ids
            LOGPROBS[(device, mode.value, i)] = [(e.token, e.logprob, [t for t, _ in e.top]) for e in entries]
            assert [e.token for e in scores] == spec.prompt_ids[1:]
            PROMPT_LOGPROBS[(device, mode.value, i)] = [(e.token, e.logprob, [t for t, _ in e.top]) for e in scores]
        return ids

    async def constrained(i: int) -> list[int]:
        from llguidance import LLMatcher

        from decoding.grammar import GrammarSpec

        schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                                   "s": {"type": "string", "maxLength": 5}},
                  "required": ["n", "s"], "additionalProperties": False}
        grammar = GrammarSpec(LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_flexible": False}))
        spec = GenerationRequest(f"grammar-{i}", runner.tokenizer.encode(PROMPTS[i]), dict(PARAMS[Mode.AR], gen_length=48),
                                 mode=Mode.AR, grammar=grammar)
        ids = []
        async for delta in engine.submit(spec):
            ids += delta.token_ids
        return ids

    try:
        out = {}
        for mode in PARAMS:
            ids = await asyncio.gather(*(one(mode, i) for i in range(len(PROMPTS))))
            out.update({(mode.value, i): t for i, t in enumerate(ids)})
        if importlib.util.find_spec("llguidance") is not None:
            ids = await asyncio.gather(*(constrained(i) for i in range(len(PROMPTS))))
            out.update({("grammar", i): t for i, t in enumerate(ids)})
    finally:
        await engine.stop(drain_timeout_s=0)
    assert engine.kv.pool("main").num_free == engine.kv.pool("main").num_total  # no leaked KV block
    return out


def _outputs(model_dir, device: str, **options) -> tuple[dict, ModelRunner]:
    """The engine's tokens on a random model with varied greedy output (the tiny model directory's own
    weights predict one token everywhere): the same weights on every device (drawn on the CPU)."""
    cfg = read_config(model_dir)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=1, std=0.2).to(device)
    runner = ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, tokenizer=load_tokenizer(model_dir),
                                    block_size=16, num_blocks=256, **options)
    return asyncio.run(_run(runner)), runner


@pytest.fixture(scope="module")
def cpu_reference(tiny_model_dir):
    return _outputs(tiny_model_dir, "cpu")[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_engine_on_cuda_gives_the_cpu_engines_tokens(tiny_model_dir, cpu_reference, variant):
    got, runner = _outputs(tiny_model_dir, "cuda", **VARIANTS[variant])
    assert got == cpu_reference
    for (device, mode, i), cuda_entries in [(k, v) for k, v in LOGPROBS.items() if k[0] == "cuda"]:
        cpu_entries = LOGPROBS[("cpu", mode, i)]
        assert [e[0] for e in cuda_entries] == [e[0] for e in cpu_entries]
        assert [e[1] for e in cuda_entries] == pytest.approx([e[1] for e in cpu_entries], abs=1e-3)
        assert [e[2][0] for e in cuda_entries] == [e[2][0] for e in cpu_entries]  # the best alternative
    assert any(k[0] == "cuda" for k in LOGPROBS)
    for key, cuda_scores in [(k, v) for k, v in PROMPT_LOGPROBS.items() if k[0] == "cuda"]:
        cpu_scores = PROMPT_LOGPROBS[("cpu",) + key[1:]]
        assert [e[1] for e in cuda_scores] == pytest.approx([e[1] for e in cpu_scores], abs=1e-3)
        assert [e[2][0] for e in cuda_scores] == [e[2][0] for e in cpu_scores]
    assert all(cpu_reference[key] for key in cpu_reference)  # every request generated something
    stats = runner.stats()["cuda_graphs"]
    if VARIANTS[variant].get("cuda_graphs"):
        assert stats["startup"]["graphs"] > 0 and stats["replays"] > 0, stats

"""The baselines part of bench/gpu_check.py: the engine vs transformers at batch 1, on the same tensors.

One prompt (bench/concurrency.py's first, encoded by the shipped tokenizer), one request per mode:
    ReFusion  the engine (scheduler.engine.Engine) vs tests/decoding/oracle.py's refusion_oracle, the
              spec followed literally on transformers' Qwen3ForCausalLM with a DynamicCache at batch 1
    AR        the engine vs transformers' `generate` (greedy)
Reported: ms per forward (engine steps; the oracle's engine-equivalent forward count; one per generated
token for `generate`), tokens/s and their ratios, and whether the tokens are identical. They are
expected identical for ReFusion in float32 on the CPU (tests/decoding/test_refusion_oracle.py holds
that); in bf16 on a GPU the two kernels' rounding differs and the texts may part. AR is never expected
identical: the engine reads AR's first token from a mask row (decoding/ar.py), `generate` from the last
prompt row.

The transformers model (`transformers_twin`) is built on the meta device and assigned the engine
model's state dict, so both hold the very same weight tensors: an 8B bf16 shape sits in memory once.
"""

from __future__ import annotations

import asyncio
import sys
import time

import torch

from gpu_check_parts import ROOT, SERIAL_NUM_BLOCKS, SLOT_SIZE, Row, Workbench, new_engine
from workers.model import Qwen3

REFUSION_STEP_TARGET = 8.0  # issue "CUDA fast path": the batch-1 transformers ReFusion step over the engine's


def transformers_twin(model: Qwen3):
    """transformers' Qwen3ForCausalLM holding `model`'s very tensors (built on the meta device, the
    state dict assigned, no copy); only the rotary tables (non-persistent buffers) are computed anew."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    cfg, device = model.cfg, model.lm_head.weight.device
    config = Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.eos_token_id,
        bos_token_id=None, dtype=model.lm_head.weight.dtype,
        attn_implementation="sdpa",  # named: the baseline must not fall back to eager attention
    )
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(config)
    missing, unexpected = hf.load_state_dict(model.unfused_state_dict(), strict=False, assign=True)
    if cfg.tie_word_embeddings:
        hf.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(hf.config)
    on_meta = [n for n, t in [*hf.named_parameters(), *hf.named_buffers()] if t.is_meta]
    if missing or unexpected or on_meta:
        raise RuntimeError(f"transformers twin: missing {missing}, unexpected {unexpected}, still on meta {on_meta}")
    if hf.model.embed_tokens.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise RuntimeError("transformers twin copied the weights instead of sharing them")
    return hf.eval()


def twin(bench: Workbench):
    """The run's transformers twin of the shared model (built on first use)."""
    return bench.shared("twin", lambda: transformers_twin(bench.model()))


def part_baselines(bench: Workbench) -> tuple[dict, list[Row]]:
    """One request at batch 1 on the engine and on transformers, same weights, prompt and parameters."""
    from concurrency import PROMPTS

    prompt_ids = bench.tokenizer().encode(PROMPTS[0])
    engine = asyncio.run(_engine_batch1(bench, prompt_ids))
    refusion = _refusion_oracle_run(bench, prompt_ids)
    ar = _generate_run(bench, prompt_ids)
    exact = bench.device.type == "cpu" and bench.dtype == torch.float32
    results = {"prompt_ids": prompt_ids, "exact_expected": exact, "engine": engine,
               "attn_implementation": twin(bench).config._attn_implementation,
               "transformers": {"refusion": refusion, "ar": ar}}
    rows = []
    for mode, base in (("refusion", refusion), ("ar", ar)):
        ours = engine[mode]
        base["step_ratio"] = base["ms_per_step"] / ours["ms_per_step"]
        base["tok_s_ratio"] = ours["tok_s"] / base["tok_s"]
        base["same_tokens"] = base["ids"] == ours["ids"]
        same = f"same tokens: {'yes' if base['same_tokens'] else 'no'}" + (
            "" if mode == "refusion" else " (not expected: the engine reads AR's first token from a mask row)")
        value = (f"engine {ours['ms_per_step']:.1f} ms/step, {ours['tok_s']:.0f} tok/s; transformers "
                 f"{base['ms_per_step']:.1f} ms/step, {base['tok_s']:.0f} tok/s; transformers step / engine step "
                 f"{base['step_ratio']:.2f}x, engine tok/s / transformers {base['tok_s_ratio']:.2f}x; {same}")
        if mode == "refusion":
            met = base["step_ratio"] >= REFUSION_STEP_TARGET
            rows.append(Row("ReFusion step vs the batch-1 transformers baseline (refusion_oracle)", value,
                            f">= {REFUSION_STEP_TARGET:.0f}x faster", met))
        else:
            rows.append(Row("AR decode batch 1 vs transformers generate (greedy)", value))
    return results, rows


async def _engine_batch1(bench: Workbench, prompt_ids: list[int]) -> dict:
    """Per mode: one warm-up request, then one timed request alone on the engine (ids, steps, wall)."""
    from scheduler.api import GenerationRequest, Mode

    engine, params, out = new_engine(bench), bench.decode_params(), {}
    await engine.start()
    try:
        for mode in (Mode.REFUSION, Mode.AR):
            final = None
            for tag in ("warm", "timed"):
                engine.clear_prefix_cache()
                steps, ids, start = engine.forwards, [], time.perf_counter()
                request = GenerationRequest(f"{tag}-{mode.value}", prompt_ids, dict(params), mode=mode)
                async for delta in engine.submit(request):
                    ids += delta.token_ids
                    final = delta
                wall, steps = time.perf_counter() - start, engine.forwards - steps
            if final.error:
                raise RuntimeError(f"engine {mode.value} request failed: {final.error}")
            out[mode.value] = {"ids": ids, "steps": steps, "wall_s": wall, "ms_per_step": wall / steps * 1e3,
                               "tok_s": len(ids) / wall, "forwards": final.stats["forwards"]}
    finally:
        await engine.stop(drain_timeout_s=0)
    return out


class _OnDevice:
    """The transformers model called with the oracle's host tensors moved to its device."""

    def __init__(self, model, device: torch.device):
        self.model, self.device = model, device

    def __call__(self, **kwargs):
        return self.model(**{k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()})


def _refusion_oracle_run(bench: Workbench, prompt_ids: list[int]) -> dict:
    sys.path.insert(0, str(ROOT / "tests" / "decoding"))
    from oracle import refusion_oracle

    p, cfg = bench.decode_params(), bench.cfg
    model = _OnDevice(twin(bench), bench.device)
    run = lambda gen: refusion_oracle(  # noqa: E731
        model, prompt_ids, gen_length=gen, slot_size=p["slot_size"], serial_num_blocks=p["serial_num_blocks"],
        slot_threshold=p["slot_threshold"], token_threshold=p["token_threshold"], eos_id=cfg.eos_token_id,
        mask_id=cfg.mask_token_id)
    run(SLOT_SIZE * SERIAL_NUM_BLOCKS)  # warm-up
    start = time.perf_counter()
    result = run(p["gen_length"])
    wall = time.perf_counter() - start
    return {"ids": result.output_ids, "steps": result.forwards, "wall_s": wall,
            "ms_per_step": wall / result.forwards * 1e3, "tok_s": len(result.output_ids) / wall,
            "events": dict(result.events)}


def _generate_run(bench: Workbench, prompt_ids: list[int]) -> dict:
    hf, eos = twin(bench), bench.cfg.eos_token_id
    inputs = torch.tensor([prompt_ids], device=bench.device)

    def generate(n: int) -> list[int]:
        with torch.inference_mode():
            out = hf.generate(input_ids=inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=n,
                              do_sample=False, eos_token_id=eos, pad_token_id=eos)
        ids = out[0, len(prompt_ids):].tolist()  # .tolist() waits for the device
        return ids[: ids.index(eos)] if eos in ids else ids

    generate(4)  # warm-up (returns host ids: the device is idle after it)
    start = time.perf_counter()
    ids = generate(bench.args.gen_length)
    wall = time.perf_counter() - start
    steps = max(len(ids), 1)  # one forward per generated token (the first one is the prompt's)
    return {"ids": ids, "steps": steps, "wall_s": wall, "ms_per_step": wall / steps * 1e3,
            "tok_s": len(ids) / wall}

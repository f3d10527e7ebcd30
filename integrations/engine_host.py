"""Building, warming up and probing one scheduler Engine: shared by the Ray Serve engine replica
(`serve_engine.EngineDeployment`) and in-process hosts (`LocalEngineClient`, tests).

Heavy imports (torch through workers.runner) happen inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path
from typing import Callable

from scheduler.api import Delta, GenerationRequest, Mode, OverloadedError, Priority
from workers.kv_blocks import DEFAULT_BLOCK_SIZE, FLEX_BLOCK_SIZES, flex_tileable


class EngineUnhealthyError(RuntimeError):
    """The engine did not finish a one-token request in time: the replica should be replaced."""


# workers.runner.ModelRunner's keyword arguments (tests/integrations/test_serve_units.py pins this to its
# signature), so a config's `runner:` keys are checked where the config is read, without importing torch.
RUNNER_OPTIONS = ("dtype", "device", "block_size", "num_blocks", "kv_memory_bytes", "cuda_graphs", "attention",
                  "compile_layers")


RUNNER_DTYPES = ("float32", "bfloat16", "float16")  # workers.runner_options.DTYPES's names (no torch import here)
RUNNER_ATTENTION = ("sdpa", "flex", "paged")  # workers.runner_options.ATTENTION's names (the same test pins both)
RUNNER_DEVICES = ("cpu", "cuda")  # the device types workers.runner_options.device_and_dtype takes


def check_runner_options(options: dict) -> None:
    """Raises ValueError naming the first key of `options` that ModelRunner does not take, or a `dtype`,
    `attention` or `device` it does not know, or CUDA graphs with device cpu (checked here so that a bad
    config fails before any replica starts; whether a known backend can run on the replicas' device when
    the config leaves the device to them is for whoever knows the cluster: this machine may have no GPU,
    cli_serve._local_ray_problem for a local Ray; kv_memory_bytes against the model, check_kv_budget)."""
    unknown = sorted(set(options) - set(RUNNER_OPTIONS))
    if unknown:
        raise ValueError(f"runner.{unknown[0]}: unknown setting; known: {', '.join(RUNNER_OPTIONS)}")
    dtype = options.get("dtype")
    if dtype is not None and (not isinstance(dtype, str) or dtype.removeprefix("torch.") not in RUNNER_DTYPES):
        raise ValueError(f"runner.dtype: {dtype!r} is not supported; use one of {', '.join(RUNNER_DTYPES)}")
    attention = options.get("attention")
    if isinstance(attention, str) and attention not in RUNNER_ATTENTION:
        raise ValueError(f"runner.attention: {attention!r} is not a backend; use one of {', '.join(RUNNER_ATTENTION)}")
    for name in ("block_size", "num_blocks", "kv_memory_bytes"):  # a string here failed each replica after a minute
        value = options.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"runner.{name}: expected a positive integer, got {value!r}")
    block_size = options.get("block_size") or DEFAULT_BLOCK_SIZE
    device = options.get("device")
    if isinstance(device, str) and not runner_device(device):  # (torch's RuntimeError in each replica, or worse)
        raise ValueError(f"runner.device: {device!r} is not a device the runner runs on; use cpu, cuda or cuda:N "
                         "(the Nth GPU), or leave it unset: cuda where the replica has a GPU, else cpu")
    on_cpu = isinstance(device, str) and device.split(":")[0] == "cpu"  # ("cpu:0" too, as torch.device reads it)
    if on_cpu and options.get("cuda_graphs") not in (None, False):
        raise ValueError(f"runner.cuda_graphs: needs a CUDA device; runner.device is {device}: remove cuda_graphs "
                         "(or set it false), or run on cuda")
    if attention == "flex" and not on_cpu and not flex_tileable(block_size):  # (else in each replica)
        raise ValueError(f"runner.block_size: {block_size} with attention 'flex' (compiled on CUDA, which tiles the "
                         f"KV block) must be {FLEX_BLOCK_SIZES}: change it, or use attention 'sdpa' or 'paged'")
    if options.get("num_blocks") is not None and options.get("kv_memory_bytes") is not None:
        raise ValueError("runner.kv_memory_bytes: give num_blocks or kv_memory_bytes, not both")
    least = min_kv_blocks(block_size)
    if options.get("num_blocks") is not None and options["num_blocks"] < least:
        raise ValueError(f"runner.num_blocks: the KV cache needs at least {least} blocks of {block_size} "
                         f"tokens (the start-up warm-up requests), got {options['num_blocks']}; size it for the requests you serve")
    for name, kinds in (("device", (str,)), ("attention", (str,)), ("compile_layers", (bool,)),
                        ("cuda_graphs", (bool, dict))):
        value = options.get(name)
        if value is not None and not isinstance(value, kinds):
            raise ValueError(f"runner.{name}: expected {' or '.join(k.__name__ for k in kinds)}, got {value!r}")


def runner_device(device: str) -> bool:
    """Whether `device` names a device the runner runs on: a RUNNER_DEVICES type, with an index or not
    ("cuda:1", "cpu:0"), as torch.device reads it."""
    kind, colon, index = device.partition(":")
    return kind in RUNNER_DEVICES and (not colon or index.isdigit())


def check_kv_budget(options: dict, model_dir: str | Path) -> None:
    """Raises ValueError when `options`' kv_memory_bytes holds fewer KV blocks of the model at
    `model_dir` (its config.json: layers, KV heads, head size) than the start-up warm-up needs
    (min_kv_blocks), which build_engine would find in every replica. The dtype is the options' own, else
    float32 with device cpu, else bfloat16 (the smallest, where the replica's device decides)."""
    import torch

    from workers.kv_cache import bytes_per_block
    from workers.loader import read_config

    budget = options.get("kv_memory_bytes")
    if budget is None:
        return
    block_size = options.get("block_size") or DEFAULT_BLOCK_SIZE
    device = str(options.get("device") or "")
    dtype = (options.get("dtype") or "").removeprefix("torch.") or ("float32" if device.startswith("cpu") else "bfloat16")
    per_block = bytes_per_block(read_config(Path(model_dir)), block_size, getattr(torch, dtype))
    blocks = min_kv_blocks(block_size)
    if budget < blocks * per_block:
        raise ValueError(f"runner.kv_memory_bytes: {budget} bytes hold fewer than the {blocks} KV blocks of "
                         f"{block_size} tokens the start-up warm-up requests need ({per_block} bytes each for this "
                         f"model in {dtype}): give at least {blocks * per_block}, or leave it unset")


def build_engine(model_dir: str | Path, runner_options: dict | None = None, engine_options: dict | None = None):
    """Load the model and build an (unstarted) Engine. Returns (engine, tokenizer).

    runner_options go to workers.runner.ModelRunner (RUNNER_OPTIONS); engine_options to scheduler.engine's
    config dataclass, validated there.
    """
    from scheduler.engine import Engine
    from workers.runner import ModelRunner

    runner = ModelRunner(str(model_dir), **(runner_options or {}))
    engine = Engine(runner, runner.tokenizer, engine_config(engine_options))
    kv = engine.scheduler.kv
    if kv.capacity() < min_kv_blocks(kv.pool().block_size):  # a kv_memory_bytes that holds too few blocks
        raise ValueError(f"runner.kv_memory_bytes: the KV cache holds {kv.capacity()} usable blocks of "
                         f"{kv.pool().block_size} tokens; the start-up warm-up requests need "
                         f"{min_kv_blocks(kv.pool().block_size)}: raise it")
    return engine, runner.tokenizer


def engine_config(options: dict | None):
    """scheduler.config.EngineConfig from plain data (YAML / JSON): `routing` may be a nested mapping."""
    from dataclasses import fields

    from scheduler.config import EngineConfig, EngineConfigError, RoutingConfig

    options = dict(options or {})
    for name, cls, given in (("engine", EngineConfig, options), ("engine.routing", RoutingConfig, options.get("routing") or {})):
        unknown = sorted(set(given) - {f.name for f in fields(cls)})
        if unknown:
            raise EngineConfigError(f"{name}.{unknown[0]}", f"unknown setting; known: {sorted(f.name for f in fields(cls))}")
    routing = options.pop("routing", None)
    if isinstance(routing, dict):
        if routing.get("calibration_tokens") is not None:
            routing["calibration_tokens"] = tuple(routing["calibration_tokens"])
        routing = RoutingConfig(**routing)
    return EngineConfig(**options, **({"routing": routing} if routing is not None else {}))


def kv_short_of_context(engine, context_length: int) -> str | None:
    """Why the engine's KV cache cannot hold one request of the whole context served (`context_length`
    tokens, ServeConfig.max_model_len or the model's), or None when it can. The largest request it
    holds is (capacity - 1) blocks of text and tentative tokens (scheduler.kv.KVOwner.blocks_needed);
    past it a request is a 400 "shorten the prompt", which an editor's infill, whose prompt the server
    builds to the context, cannot act on. vLLM refuses to start then; here it is said once, at start."""
    kv = engine.kv
    block_size = kv.pool().block_size
    holds = (kv.capacity() - 1) * block_size
    if not context_length or holds >= context_length:
        return None
    return (f"the KV cache holds {kv.capacity()} usable blocks of {block_size} tokens: a request of at most "
            f"{holds} tokens with its ReFusion block's tentative ones (gen_length / serial_num_blocks), less than "
            f"the context served ({context_length} tokens); longer ones are refused with a 400 (an editor's infill "
            f"in a large file among them): set max_model_len to at most {holds} less that block, or raise the "
            "runner's num_blocks or kv_memory_bytes")


def engine_metrics_text(engine) -> bytes:
    """The engine's Prometheus exposition text (engine.metrics.render()), or b"" if it has none."""
    metrics = getattr(engine, "metrics", None)
    return metrics.render() if metrics is not None else b""


def probe_request(tokenizer) -> GenerationRequest:
    """A one-token AR request at BATCH priority: exercises admission, one forward and streaming.
    (INTERACTIVE would preempt a running BATCH request whenever the engine is full.)"""
    prompt_ids = tokenizer.encode("\n") or [tokenizer.eos_token_id]
    return GenerationRequest(
        request_id=f"health-{uuid.uuid4().hex[:12]}",
        prompt_ids=list(prompt_ids),
        params={"gen_length": 1, "slot_size": 1, "serial_num_blocks": 1, "temperature": 0.0},
        mode=Mode.AR,
        priority=Priority.BATCH,
        internal=True,  # not traffic: kept out of the metrics and the router's estimates
    )


# Warm-up requests, one per decoding path: AR steps, and a ReFusion plan/verify/slot-completion round.
WARMUP_PARAMS = {
    Mode.AR: {"gen_length": 4, "slot_size": 1, "serial_num_blocks": 1, "temperature": 0.0},
    Mode.REFUSION: {"gen_length": 16, "slot_size": 8, "serial_num_blocks": 1, "temperature": 0.0},
}


WARMUP_PROMPT = "def main():\n"
WARMUP_PROMPT_TOKENS = len(WARMUP_PROMPT.encode())  # at most one token per byte, whatever the tokenizer


def min_kv_blocks(block_size: int) -> int:
    """KV blocks (of `block_size` tokens) the warm-up requests need, so the fewest a replica can start
    with: prompt + gen_length + one ReFusion pool, plus one (scheduler.kv.KVOwner.blocks_needed)."""
    most = max(WARMUP_PROMPT_TOKENS + 2 * p["gen_length"] for p in WARMUP_PARAMS.values())
    return -(-most // block_size) + 1


async def warm_up(client, timeout_s: float = 120.0) -> dict:
    """Run one short request per decoding path through the engine before it takes traffic, so the first
    real request does not pay for first use (allocator growth, kernel selection, lazily built state:
    seconds on a fresh replica). Returns {"requests", "forwards", "seconds"}; raises EngineUnhealthyError
    when a warm-up request fails, so a replica that cannot serve never reports ready."""
    start, forwards = time.perf_counter(), 0
    prompt_ids = client.tokenizer.encode(WARMUP_PROMPT) or [client.tokenizer.eos_token_id]
    for mode, params in WARMUP_PARAMS.items():
        req = GenerationRequest(request_id=f"warmup-{mode.value}-{uuid.uuid4().hex[:8]}", prompt_ids=list(prompt_ids),
                                params=dict(params), mode=mode, priority=Priority.BATCH, internal=True)
        try:
            last = await asyncio.wait_for(_last_delta(client, req), timeout_s)
        except (asyncio.TimeoutError, OverloadedError) as exc:
            raise EngineUnhealthyError(f"warm-up request ({mode.value}) did not run: {exc or 'timed out'}") from exc
        if last is None or not last.finished or last.error:
            raise EngineUnhealthyError(f"warm-up request ({mode.value}) failed: {last.error if last else 'no output'}")
        forwards += int(last.stats.get("forwards", 0)) + int(last.stats.get("prefill_forwards", 0))
    return {"requests": len(WARMUP_PARAMS), "forwards": forwards, "seconds": round(time.perf_counter() - start, 3)}


async def one_token_probe(client, timeout_s: float = 30.0, forwards: Callable[[], int] | None = None,
                          paused: Callable[[], bool] | None = None) -> None:
    """Run one one-token request through `client.stream`; raise EngineUnhealthyError if the engine is
    wedged.

    Busy is not wedged: an OverloadedError answer (queue full) is healthy, and so is a probe still
    queued at the timeout while `forwards()` (the engine's forward count) has advanced meanwhile. Held
    is not wedged either: while `paused()` (Engine.pause) no probe runs, and one the pause caught
    waiting is healthy.
    """
    if paused is not None and paused():
        return
    req = probe_request(client.tokenizer)
    forwards_before = forwards() if forwards else None
    try:
        last = await asyncio.wait_for(_last_delta(client, req), timeout_s)
    except OverloadedError:
        return
    except asyncio.TimeoutError as exc:
        if (forwards is not None and forwards() > forwards_before) or (paused is not None and paused()):
            return
        raise EngineUnhealthyError(f"one-token health probe did not finish within {timeout_s:.0f} s "
                                   "and the engine ran no forward meanwhile") from exc
    if last is None or not last.finished or last.error:
        detail = last.error if last is not None else "no output"
        raise EngineUnhealthyError(f"one-token health probe failed: {detail}")


async def _last_delta(client, req: GenerationRequest) -> Delta | None:
    """Run `req` through `client.stream` to its end; its last delta (None if there was none)."""
    last = None
    async for last in client.stream(req):
        pass
    return last

"""The in-process parts of bench/gpu_check.py and the Workbench they share (the baselines part: its own module).

    forward    bench/forward_latency.py's measurement: ms per batch-1 forward vs the weight-read floor
    engine     scheduler.engine.Engine, AR and ReFusion, at each concurrency level (bench/concurrency.py's
               run_level): tokens/s, tokens per forward, median ITL, ms per engine step
    profile    torch.profiler over eager forwards: device kernels per forward and their summed time
    features, host   (below)

Each part returns (results for the JSON, table rows). The model is built once, on the device, by
workers.model.random_model (bench/gpu_check_baselines.py gives transformers the same tensors). Prompts
are the shipped model's tokenizer's encodings of bench/concurrency.py's PROMPTS. That tokenizer knows
4096 ids, the 8B shape's random model emits up to 151,936: `clipped_tokenizer`'s decode drops the ids it
does not know. (tokenizers 0.23.3 skips them silently too, so the engine would not crash without it;
the wrapper makes that independent of the version. Only the streamed text, which no part measures,
loses them; token counts come from the ids.)
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402

import forward_latency  # noqa: E402
from workers.attention_paged import unavailable_reason  # noqa: E402
from workers.loader import ModelConfig, load_tokenizer  # noqa: E402
from workers.model import Qwen3, random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402

SHIPPED_MODEL = ROOT / "models" / "refusion-tiny-code"
CONFIGS = {
    **forward_latency.CONFIGS,
    # The CPU dry run: a few ms per forward on one core; its vocabulary is the shipped tokenizer's.
    "tiny": ModelConfig(vocab_size=4096, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                        num_kv_heads=2, head_dim=16, rope_theta=1e6, rms_norm_eps=1e-6,
                        tie_word_embeddings=False, eos_token_id=0, mask_token_id=2),
}
SLOT_SIZE, SERIAL_NUM_BLOCKS = 8, 4  # decoding.params.SERVING_DEFAULTS; gen_length must be a multiple of 32
FORWARD_TARGETS = {1: 1.25, 8: 1.25, 32: 1.25, 128: 1.6}  # issue "CUDA fast path": latency / floor at most
AR_TARGETS = {1: 200.0, 32: 4000.0}  # engine AR tokens/s at least, by concurrency


@dataclass
class Row:
    """One line of the summary table: a measurement, its value, the issue's target and whether it is met."""

    measurement: str
    value: str
    target: str = "-"
    met: bool | None = None


def clipped_tokenizer(tokenizer):
    """The shipped tokenizer for a model with a larger vocabulary: a shallow copy whose `decode` drops ids
    >= its size. Still the transformers fast tokenizer it was, so grammars (llguidance) build on it."""
    known, decode = len(tokenizer), tokenizer.decode
    clipped = copy.copy(tokenizer)

    def clipped_decode(ids, *args, **kwargs) -> str:
        return decode([i for i in ids if i < known], *args, **kwargs)

    clipped.decode = clipped_decode
    return clipped


class Workbench:
    """What the parts share: device, shape, the time budget, and the model, tokenizer, engine runner and
    transformers twin, each built on first use (a part that fails to build one records the error)."""

    def __init__(self, args):
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.cfg = CONFIGS[args.config]
        self.deadline = time.monotonic() + args.budget_s
        self._built: dict = {}
        self.forward_results: dict[str, dict] = {}  # variant -> the forward part's measurements

    def time_left(self) -> float:
        return self.deadline - time.monotonic()

    def shared(self, name: str, build):
        """The object built once under `name` (by `build()` on first use)."""
        if name not in self._built:
            self._built[name] = build()
        return self._built[name]

    def model(self) -> Qwen3:
        return self.shared("model", lambda: random_model(self.cfg, dtype=self.dtype, device=self.device))

    def tokenizer(self):
        return self.shared("tokenizer", lambda: clipped_tokenizer(load_tokenizer(SHIPPED_MODEL)))

    def engine_variant(self) -> str:
        """The forward variant the engine and baselines parts run: --engine-variant, or with "fastest" the
        variant whose forward part medians summed over the token counts are lowest; when the forward part
        has not run (or measured nothing) before the first call, the runner's defaults on this device
        (compiled+graphs on CUDA, eager elsewhere), recorded as such (`engine_variant_from`). Fixed at
        the first call."""
        def choose() -> str:
            if self.args.engine_variant != "fastest":
                self._built["engine_variant_from"] = "given"
                return self.args.engine_variant
            sums = {name: sum(t["median_ms"] for t in found["tokens"].values())
                    for name, found in self.forward_results.items() if found.get("tokens")}
            if sums:
                self._built["engine_variant_from"] = "fastest forward"
                return min(sums, key=sums.get)
            self._built["engine_variant_from"] = "runner defaults (no forward measured before it)"
            return "compiled+graphs" if self.device.type == "cuda" else "eager"
        return self.shared("engine_variant", choose)

    def engine_runner(self) -> ModelRunner:
        # Room for every request of the largest level at once (prompt, generation, slack), prefix cache aside.
        per_request = (64 + self.args.gen_length) // 16 + 4
        blocks = max(self.args.levels) * per_request + 64
        options = {**FORWARD_VARIANTS[self.engine_variant()], **self.args.runner_options}
        return self.shared("runner", lambda: ModelRunner.from_model(
            self.model(), mask_token_id=self.cfg.mask_token_id, num_blocks=blocks, **options))

    def decode_params(self) -> dict:
        """Request parameters: the serving defaults, with this run's gen_length, all named explicitly."""
        from decoding.params import SERVING_DEFAULTS

        names = ("slot_threshold", "token_threshold")
        return {"gen_length": self.args.gen_length, "slot_size": SLOT_SIZE, "serial_num_blocks": SERIAL_NUM_BLOCKS,
                **{k: SERVING_DEFAULTS[k] for k in names}}


class PartSkipped(Exception):
    """A part that cannot run here (no CUDA, a missing optional package): recorded as skipped, not failed."""


class PartFailed(Exception):
    """A part that ran and measured, but failed: its results and rows are kept."""

    def __init__(self, results: dict, rows: list[Row], message: str):
        super().__init__(message)
        self.results, self.rows = results, rows


# ---- part: forward ---------------------------------------------------------------------------------
# Every option named: the runner's defaults on CUDA are compile_layers and cuda_graphs on (workers.runner).
_EAGER = {"attention": "sdpa", "cuda_graphs": False, "compile_layers": False}
FORWARD_VARIANTS = {"eager": _EAGER, "flex": {**_EAGER, "attention": "flex"}, "graphs": {**_EAGER, "cuda_graphs": True},
                    "flex+graphs": {**_EAGER, "attention": "flex", "cuda_graphs": True},
                    "compiled": {**_EAGER, "compile_layers": True},
                    "compiled+graphs": {**_EAGER, "compile_layers": True, "cuda_graphs": True},
                    "flex+compiled+graphs": {"attention": "flex", "compile_layers": True, "cuda_graphs": True},
                    "paged": {**_EAGER, "attention": "paged"},
                    "paged+compiled": {**_EAGER, "attention": "paged", "compile_layers": True},
                    "paged+compiled+graphs": {"attention": "paged", "compile_layers": True, "cuda_graphs": True}}


def part_forward(bench: Workbench) -> tuple[dict, list[Row]]:
    """forward_latency's measurement on the shared model: one sequence, `context` cached tokens, N dropped
    query tokens with an argmax read on every row; median ms vs weight bytes / measured bandwidth. Once
    per runner variant (FORWARD_VARIANTS: the attention backend, compiled layer kernels, CUDA graphs), each
    over --runner-options;
    the first timed forward of a graph variant is preceded by an untimed one (time_forward warms up)."""
    args, model = bench.args, bench.model()
    weight_bytes = forward_latency.weight_read_bytes(model)
    copy_bytes = 512 * 2**20 if bench.device.type == "cuda" else 64 * 2**20
    bandwidth = (args.bandwidth_gbs * 1e9 if args.bandwidth_gbs
                 else forward_latency.measure_bandwidth(bench.device, copy_bytes))
    floor_ms = weight_bytes / bandwidth * 1e3
    results = {"weight_gb": weight_bytes / 1e9, "bandwidth_gbs": bandwidth / 1e9, "floor_ms": floor_ms,
               "context": args.context, "variants": {}}
    rows = [Row("weight-read floor", f"{weight_bytes / 1e9:.3g} GB / {bandwidth / 1e9:.0f} GB/s = {floor_ms:.3g} ms")]
    for variant in args.forward_variants:
        if bench.time_left() <= 0:  # each variant builds a runner (graph capture, compile): not started late
            results["variants"][variant] = {"skipped": "time budget spent"}
            rows.append(Row(f"forward [{variant}]", "skipped: --budget-s spent", "-", None))
            continue
        try:
            found, variant_rows = _forward_variant(bench, {**FORWARD_VARIANTS[variant], **args.runner_options}, floor_ms)
        except Exception as exc:  # one variant failing (e.g. flex not compiling) must not hide the others
            results["variants"][variant] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            rows.append(Row(f"forward [{variant}]", f"FAILED: {type(exc).__name__}: {str(exc)[:120]}", "-", False))
            continue
        results["variants"][variant] = bench.forward_results[variant] = found
        rows += [dataclasses.replace(row, measurement=f"{row.measurement} [{variant}]") for row in variant_rows]
    failed = [name for name, found in results["variants"].items() if "error" in found]
    if failed:  # the others' numbers stand (and the engine part runs on the fastest of them)
        raise PartFailed(results, rows, f"forward variants failed: {', '.join(failed)}")
    return results, rows


def _mixed_step(runner: ModelRunner, mixed: list[int], repeats: int) -> tuple[dict, Row]:
    """One step of a `chunk`-token prompt chunk after `context` cached tokens beside `count` one-token
    decode steps at `decode_context` (chunked prefill beside running requests), timed with attention
    groups (workers.attention_groups) and whole: median ms each."""
    chunk, context, count, decode_context = mixed
    session = forward_latency.prefilled_session(runner, context)
    beside = forward_latency.decodes_beside(session, count, decode_context)
    try:
        grouped = statistics.median(forward_latency.time_forward(session, context, chunk, repeats, beside)) * 1e3
        runner.group_attention = False
        whole = statistics.median(forward_latency.time_forward(session, context, chunk, repeats, beside)) * 1e3
    finally:
        runner.group_attention = True
        for seq in ["bench"] + [seg.seq_id for seg in beside]:
            session.free(seq)
    return ({"chunk": chunk, "context": context, "decodes": count, "decode_context": decode_context,
             "grouped_ms": grouped, "whole_ms": whole},
            Row(f"forward, a {chunk}-token prompt chunk beside {count} decode steps",
                f"{grouped:.2f} ms with attention groups, {whole:.2f} ms whole"))


def _forward_variant(bench: Workbench, options: dict, floor_ms: float) -> tuple[dict, list[Row]]:
    args, model = bench.args, bench.model()
    context, tokens, long_context = args.context, args.forward_tokens, args.long_context
    start = time.perf_counter()
    mixed = args.mixed_step if args.mixed_step != [0] else None
    mixed_blocks = (mixed[0] + mixed[1]) // 16 + 2 + mixed[2] * (mixed[3] // 16 + 2) if mixed else 0
    runner = ModelRunner.from_model(model, mask_token_id=bench.cfg.mask_token_id,
                                    num_blocks=(max(context, long_context) + max(tokens)) // 16 + 2 + mixed_blocks,
                                    **options)
    results, rows = {"options": options, "tokens": {}, "build_s": time.perf_counter() - start}, []
    session = forward_latency.prefilled_session(runner, context)
    for n in tokens:
        if bench.time_left() <= 0:  # a compiling variant (flex: one compile per shape) must not eat the lease
            results["tokens_skipped"] = [m for m in tokens if m not in results["tokens"]]
            rows.append(Row(f"forward batch 1, {n}+ query tokens", "skipped: --budget-s spent"))
            break
        start = time.perf_counter()
        times = forward_latency.time_forward(session, context, n, args.repeats)
        results.setdefault("warmup_s", {})[n] = time.perf_counter() - start - sum(times)  # compiles land here
        med = statistics.median(times) * 1e3
        ratio = med / floor_ms
        results["tokens"][n] = {"median_ms": med, "min_ms": min(times) * 1e3, "over_floor": ratio}
        target = FORWARD_TARGETS.get(n)
        rows.append(Row(f"forward batch 1, {n} query tokens", f"{med:.2f} ms = {ratio:.2f}x floor",
                        f"<= {target}x floor" if target else "-", ratio <= target if target else None))
    if long_context and bench.time_left() > 0:  # one decode row at an editor's long file (context splits)
        session.free("bench")
        session = forward_latency.prefilled_session(runner, long_context)
        times = forward_latency.time_forward(session, long_context, 1, args.repeats)
        med = statistics.median(times) * 1e3
        results["long_context"] = {"context": long_context, "median_ms": med, "over_floor": med / floor_ms}
        rows.append(Row(f"forward batch 1, 1 query token after {long_context} cached tokens",
                        f"{med:.2f} ms = {med / floor_ms:.2f}x floor"))
    session.free("bench")
    if mixed and runner.group_attention and bench.time_left() > 0:
        results["mixed_step"], row = _mixed_step(runner, mixed, args.repeats)
        rows.append(row)
    rows.append(Row("runner build (start-up graph capture) / warm-ups (compiles)",
                    f"{results['build_s']:.1f} s / {sum(results.get('warmup_s', {}).values()):.1f} s"))
    graphs = runner.stats().get("cuda_graphs")
    if isinstance(graphs, dict):
        results["cuda_graphs"] = graphs
        startup = graphs["startup"] or {"graphs": 0, "seconds": 0.0, "bytes": 0}
        gb = startup["bytes"] / 2**30
        rows.append(Row("CUDA-graph capture at start-up",
                        f"{startup['graphs']} graphs, {startup['seconds']:.1f} s, {gb:.2f} GiB",
                        "< 60 s, < 4 GB", startup["seconds"] < 60 and startup["bytes"] < 4e9))
    return results, rows


# ---- part: engine ----------------------------------------------------------------------------------
def part_engine(bench: Workbench) -> tuple[dict, list[Row]]:
    """AR and ReFusion through the engine at each level: c closed-loop clients, max(c, 2) requests in all,
    run once untimed first (kernel selection, allocator growth, CUDA graph captures stay out of the time)."""
    from scheduler.api import Mode

    results, rows = {}, []
    for mode in (Mode.AR, Mode.REFUSION):
        levels = asyncio.run(_engine_levels(bench, mode))
        results[mode.value] = levels
        for c, r in levels.items():
            if "skipped" in r:
                rows.append(Row(f"engine {mode.value}, {c} request(s)", f"skipped: {r['skipped']}"))
                continue
            target = AR_TARGETS.get(c) if mode is Mode.AR else None
            rows.append(Row(f"engine {mode.value}, {c} request(s)",
                            f"{r['tok_s']:.0f} tok/s, {r['tpf']:.2f} tok/forward, ITL p50 {r['itl_ms']:.1f} ms, "
                            f"{r['ms_per_step']:.1f} ms/step",
                            f">= {target:,.0f} tok/s" if target else "-", r["tok_s"] >= target if target else None))
    runner = bench.engine_runner()
    results["runner_stats"] = runner.stats() if hasattr(runner, "stats") else {}
    return results, rows


def new_engine(bench: Workbench):
    """An engine on the shared runner, routing not calibrated (both modes here are fixed)."""
    from scheduler.config import EngineConfig, RoutingConfig
    from scheduler.engine import Engine

    config = EngineConfig(max_running=max(64, max(bench.args.levels)), token_budget=bench.args.token_budget,
                          routing=RoutingConfig(calibrate=False))
    return Engine(bench.engine_runner(), bench.tokenizer(), config)


def requests_ended_by_error(engine) -> int:
    """Requests the engine has ended with an error: a forward that raises (out of memory, say) ends its
    requests with an error delta instead of raising, so a level that looks finished may not be."""
    value = engine.metrics.registry.get_sample_value("refusion_requests_finished_total", {"reason": "error"})
    return int(value or 0)


async def _engine_levels(bench: Workbench, mode) -> dict:
    from concurrency import run_level, summarize

    engine, tokenizer, params = new_engine(bench), bench.tokenizer(), bench.decode_params()
    await engine.start()
    levels = {}
    try:
        for c in bench.args.levels:
            if bench.time_left() < 0:
                levels[c] = {"skipped": "time budget spent"}
                continue
            engine.clear_prefix_cache()
            await run_level(engine, tokenizer, mode, c, max(c, 2), params, f"warm{c}")  # the same steps, untimed
            engine.clear_prefix_cache()
            steps = engine.forwards
            run = await run_level(engine, tokenizer, mode, c, max(c, 2), params, f"c{c}")
            steps = engine.forwards - steps
            if errors := requests_ended_by_error(engine):
                raise RuntimeError(f"{errors} {mode.value} request(s) ended with an error by c={c} (the engine's "
                                   f"forward_failed log line says why)")
            summary = summarize([run])
            levels[c] = {"tok_s": summary["tok_s"], "tpf": summary["tpf"], "itl_ms": summary["itl_ms"],
                         "e2e_ms": summary["e2e_ms"], "ttft_ms": summary["ttft_ms"], "steps": steps,
                         "tokens": sum(r["tokens"] for r in run["records"]), "wall_s": run["wall"],
                         "ms_per_step": run["wall"] / max(steps, 1) * 1e3}
    finally:
        await engine.stop(drain_timeout_s=0)
    return levels


# ---- part: features ----------------------------------------------------------------------------------
FEATURES = {"plain": {}, "plain, synchronous scheduling": {}, "plain, synchronous, serial streaming": {},
            "logprobs 5": {"logprobs": 5}, "frequency_penalty 1": {"frequency_penalty": 1.0},
            "min_p 0.05, T 0.8": {"temperature": 0.8, "min_p": 0.05, "seed": 1}}
# engine attributes a feature run changes (restored after it): the A/B ladder of the overlaps, both on by
# default for CUDA. Synchronous scheduling: EngineConfig.async_scheduling off, each step planned after the
# last one's results are back (its text still streamed during the next forward); serial streaming:
# EngineConfig.overlap_streaming off too, the text streamed before the next step is planned
FEATURE_ENGINE = {"plain, synchronous scheduling": {"async_scheduling": False},
                  "plain, synchronous, serial streaming": {"async_scheduling": False, "overlap_streaming": False},
                  "regex, synchronous scheduling": {"async_scheduling": False}}
# structured output on every request (llguidance; a run that cannot build or run the grammar is recorded as
# skipped): a bitmask per step, given after launch under asynchronous scheduling (Segment.deferred_mask);
# the synchronous run is how every grammar request ran before that
FEATURE_GRAMMAR = {"regex": "[a-z ]+", "regex, synchronous scheduling": "[a-z ]+"}
FEATURES.update({name: {} for name in FEATURE_GRAMMAR})


def part_features(bench: Workbench) -> tuple[dict, list[Row]]:
    """What the per-request options cost on the device: AR at the largest engine level, plain against log
    probabilities (the reads' top-k stage), a frequency penalty (the logit-bias scatter) and min_p
    sampling (the filter stage), and structured output (a regex on every request, with and without
    asynchronous scheduling), each run once untimed first. tok/s and its ratio to plain. Also plain
    with synchronous scheduling (EngineConfig.async_scheduling false) and then serial streaming too
    (EngineConfig.overlap_streaming false): what planning the next step while the device runs, and
    streaming a step's text during the next forward, gain on this host and device."""
    results = asyncio.run(_feature_runs(bench))
    plain = results.get("plain", {}).get("tok_s")
    rows = [Row(f"engine ar, {r['requests']} request(s), {name}", f"{r['tok_s']:.0f} tok/s, {r['ms_per_step']:.1f} ms/step"
                + (f" ({r['tok_s'] / plain:.2f}x plain)" if plain and name != "plain" else "")
                + f", {r['ahead']:.0%} of steps launched ahead")
            for name, r in results.items() if "tok_s" in r]
    rows += [Row(f"engine ar, {name}", f"skipped: {r['skipped']}") for name, r in results.items() if "skipped" in r]
    return results, rows


async def _feature_runs(bench: Workbench) -> dict:
    from concurrency import run_level, summarize

    from scheduler.api import Mode

    engine, tokenizer = new_engine(bench), bench.tokenizer()
    c = max(bench.args.levels)
    await engine.start()
    out = {}
    try:
        for name, extra in FEATURES.items():
            if bench.time_left() < 0:
                out[name] = {"skipped": "time budget spent"}
                continue
            params = {**bench.decode_params(), **extra}
            grammar = None
            if name in FEATURE_GRAMMAR:
                try:
                    from llguidance import LLMatcher

                    from decoding.grammar import GrammarSpec

                    grammar = GrammarSpec(LLMatcher.grammar_from_regex(FEATURE_GRAMMAR[name]))
                except Exception as exc:  # noqa: BLE001 - recorded; the other rows stand
                    out[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                    continue
            settings = FEATURE_ENGINE.get(name, {})
            saved = {key: getattr(engine, key) for key in settings}
            for key, value in settings.items():
                setattr(engine, key, value)
            try:
                engine.clear_prefix_cache()
                await run_level(engine, tokenizer, Mode.AR, c, c, params, f"fw-{len(out)}",
                                grammar=grammar)  # untimed: graphs, kernels
                engine.clear_prefix_cache()
                steps, ahead, failed = engine.forwards, engine.ahead_steps, requests_ended_by_error(engine)
                run = await run_level(engine, tokenizer, Mode.AR, c, c, params, f"f-{len(out)}", grammar=grammar)
            except Exception as exc:  # (InvalidRequestError: the grammar refused at submit)
                if grammar is None:
                    raise
                out[name] = {"skipped": f"{type(exc).__name__}: {exc}"}
                continue
            finally:
                for key, value in saved.items():
                    setattr(engine, key, value)
            if errors := requests_ended_by_error(engine) - failed:
                if grammar is not None:
                    out[name] = {"skipped": f"{errors} request(s) ended with an error"}
                    continue
                raise RuntimeError(f"{errors} request(s) ended with an error ({name})")
            graphs = bench.engine_runner().stats().get("cuda_graphs") or {}
            out[name] = {"requests": c, "tok_s": summarize([run])["tok_s"],
                         "ms_per_step": run["wall"] / max(engine.forwards - steps, 1) * 1e3,
                         "ahead": (engine.ahead_steps - ahead) / max(engine.forwards - steps, 1),
                         "graphs_after": graphs.get("graphs"), "eager_steps_after": graphs.get("eager_steps")}
    finally:
        await engine.stop(drain_timeout_s=0)
    return out


# ---- part: host ------------------------------------------------------------------------------------
def part_host(bench: Workbench) -> tuple[dict, list[Row]]:
    """bench/engine_overhead.py on this machine's device: the engine's host time per step on a zero-cost
    model (AR and confident ReFusion at the engine part's levels and gen_length), i.e. what a step costs
    besides the model."""
    import engine_overhead

    args = engine_overhead.parse_args(["--device", str(bench.device), "--confidence", "confident", "--levels",
                                       ",".join(map(str, bench.args.levels)), "--gen-length", str(bench.args.gen_length)])
    rows = engine_overhead.run(args)
    return {"rows": rows, "table": engine_overhead.table(rows, args)}, [
        Row(f"engine host time, {r['mode']}, {r['requests']} request(s)",
            f"{r['ms_per_step']:.2f} ms/step ({r['runner_ms']:.2f} in runner.execute, {r['outside_ms']:.2f} outside)")
        for r in rows]


# ---- part: profile ---------------------------------------------------------------------------------
PROFILE_VARIANTS = ("eager", "compiled", "paged+compiled")  # eager: a graph replays the same kernels, one launch


def part_profile(bench: Workbench) -> tuple[dict, list[Row]]:
    """torch.profiler over `repeats` eager forwards of 1 query token after `context` cached tokens, per
    variant in PROFILE_VARIANTS (compiled: the fused layer kernels): device kernels per forward, their
    summed device time per forward (busy ms: what a CUDA graph replay of that step cannot beat; the gap
    between it and a replay's time is the launch gaps a graph leaves) and the kernels taking most time.
    On the CPU (dry run) the leaf operators stand in for kernels."""
    from torch.profiler import ProfilerActivity, profile

    args, model = bench.args, bench.model()
    cuda = bench.device.type == "cuda"
    results, rows, repeats = {}, [], 3
    for variant in PROFILE_VARIANTS:
        if bench.time_left() <= 0:
            rows.append(Row(f"profile [{variant}]", "skipped: --budget-s spent"))
            continue
        reason = unavailable_reason(bench.device) if FORWARD_VARIANTS[variant]["attention"] == "paged" else None
        if reason:
            rows.append(Row(f"profile [{variant}]", f"skipped: {reason}"))
            continue
        runner = ModelRunner.from_model(model, mask_token_id=bench.cfg.mask_token_id,
                                        num_blocks=args.context // 16 + 4, **FORWARD_VARIANTS[variant])
        session = forward_latency.prefilled_session(runner, args.context)
        forward_latency.time_forward(session, args.context, 1, 1)  # compiles, warms; the profile below is warm
        activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
        with profile(activities=[activity]) as prof:
            forward_latency.time_forward(session, args.context, 1, repeats)
        kernels = [e for e in prof.events() if (e.device_type.name == "CUDA") == cuda and (cuda or not e.cpu_children)]
        total_us: dict[str, float] = {}
        for e in kernels:
            total_us[e.name] = total_us.get(e.name, 0.0) + e.time_range.elapsed_us()
        runs = repeats + 2  # time_forward's two warm-ups run inside the profile too
        busy_ms = sum(total_us.values()) / runs / 1e3
        top = sorted(total_us.items(), key=lambda kv: -kv[1])[:12]
        results[variant] = {"kernels_per_forward": len(kernels) / runs, "busy_ms_per_forward": busy_ms,
                            "top": [{"name": n[:120], "ms_per_forward": us / runs / 1e3} for n, us in top]}
        rows.append(Row(f"profile [{variant}], 1 query token, eager",
                        f"{len(kernels) / runs:.0f} {'kernels' if cuda else 'leaf ops'} per forward, busy "
                        f"{busy_ms:.2f} ms per forward; top: " + ", ".join(f"{n[:40]} {us / runs / 1e3:.2f} ms"
                                                                          for n, us in top[:4])))
        del runner, session
    return results, rows

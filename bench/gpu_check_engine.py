"""The engine, features and host parts of bench/gpu_check.py, on the Workbench's shared runner
(gpu_check_parts.py).

    engine     scheduler.engine.Engine, AR and ReFusion, at each concurrency level (bench/concurrency.py's
               run_level): tokens/s, tokens per forward, median ITL, ms per engine step
    features   AR at the largest level with per-request options (log probabilities, a frequency penalty,
               min_p, a regex) and with the overlaps of host work and device off, against plain
    host       bench/engine_overhead.py: the engine's host time per step on a zero-cost model

Each part returns (results for the JSON, table rows).
"""

from __future__ import annotations

import asyncio

from gpu_check_parts import Row, Workbench, new_engine, requests_ended_by_error


# ---- part: engine ----------------------------------------------------------------------------------
AR_TARGETS = {1: 200.0, 32: 4000.0}  # engine AR tokens/s at least, by concurrency


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

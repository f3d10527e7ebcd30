"""The forward and profile parts of bench/gpu_check.py, on the Workbench's shared model (gpu_check_parts.py).

    forward    bench/forward_latency.py's measurement: ms per batch-1 forward vs the weight-read floor, per
               runner variant (gpu_check_parts.FORWARD_VARIANTS), with one step of a prompt chunk beside
               decode steps (attention groups and whole) and the CUDA-graph capture at start-up
    profile    torch.profiler over eager forwards: device kernels per forward and their summed time

Each part returns (results for the JSON, table rows).
"""

from __future__ import annotations

import dataclasses
import statistics
import time

from gpu_check_parts import FORWARD_VARIANTS, PartFailed, Row, Workbench  # (first: it puts the repository on sys.path)

import forward_latency
from workers.attention_paged import unavailable_reason
from workers.runner import ModelRunner


# ---- part: forward ---------------------------------------------------------------------------------
FORWARD_TARGETS = {1: 1.25, 8: 1.25, 32: 1.25, 128: 1.6}  # issue "CUDA fast path": latency / floor at most


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

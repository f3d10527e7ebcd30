"""One command for a GPU session: CUDA tests, forward latency, engine throughput and transformers baselines.

Parts (`--parts`: default all, in this order; given, in the order given; each one's failure is recorded
and the next one runs):
    gpu_tests    `pytest tests/gpu` in a subprocess: pass / fail / skip counts (on CPU: skipped, no CUDA)
    forward      bench/forward_latency.py's measurement at 1/8/32/128 query tokens vs the weight-read floor
                 (and one token after --long-context cached tokens; for sdpa variants, one step of a
                 prompt chunk beside decode steps, --mixed-step, with attention groups and whole),
                 per runner variant (--forward-variants): eager (sdpa attention), paged (the Triton kernel
                 that reads the paged cache in place, workers/attention_paged.py), flex (flex_attention
                 over the paged cache, workers/attention_flex.py), graphs (cuda_graphs, workers/graphs.py),
                 compiled (compile_layers: fused kernels around attention, workers.model), and combinations
    attention    one layer's attention alone (bench/gpu_check_attention.py): sdpa vs the paged kernel at
                 each of its tile settings, at AR decode, long-context and ReFusion step shapes
    engine       the engine, AR and ReFusion, at 1/8/32 concurrent requests: tok/s, tok/forward, ITL p50;
                 on the forward part's fastest runner variant (--engine-variant), as are the baselines
    baselines    one request at batch 1, engine vs transformers on the same weight tensors and tokens:
                 `generate` (AR) and tests/decoding/oracle.py's refusion_oracle (ReFusion, dynamic cache)
    concurrency  bench/concurrency.py on the shipped model, short (subprocess; skipped without structlog)
    host         bench/engine_overhead.py: the engine's host time per step on a zero-cost model at the
                 engine levels (what a step costs besides the model, on this machine's CPU and device)
    features     AR at the largest engine level with log probabilities, a frequency penalty, min_p
                 sampling, a regex on every request (with and without asynchronous scheduling; needs
                 llguidance), against plain: what those per-request options cost on the device; and plain
                 with synchronous scheduling (EngineConfig.async_scheduling false), then serial streaming
                 too (overlap_streaming false): what each overlap of host work with the device gains
    profile      torch.profiler over eager 1-token forwards, plain, compiled layers, and compiled layers
                 with the paged kernel (skipped where it cannot run): device kernels
                 per forward, their summed time (what a graph replay cannot beat), the costliest kernels
forward/engine/baselines share one random-weight model built on the device (workers.model.random_model;
8B shape in bf16 on CUDA) and the shipped model's tokenizer (bench/gpu_check_parts.py says how ids of
the larger random vocabulary are decoded). Targets of issue "CUDA fast path" stand beside the numbers:
forward batch 1 <= 1.25x floor at 1-32 query tokens and <= 1.6x at 128; engine AR >= 200 tok/s alone
and >= 4,000 tok/s at 32 requests; a ReFusion step >= 8x faster than the batch-1 transformers one (a
run on the CPU marks them n/a: its numbers neither meet nor miss a GPU's target).
`--budget-s` (default 450) stops starting parts, and forward variants, once spent (recorded as skipped).
Prints one table and writes one JSON file, rewritten after every part (a run cut short by the device
tool's timeout keeps what it measured); exits 1 if any part failed (unmet targets are not failures).

    python bench/gpu_check.py --json gpu_check.json                  # CUDA: 8b config, bf16
    ... --runner-options '{"cuda_graphs": true}'                     # options on top of every runner variant
    ... --engine-variant compiled+graphs                             # engine/baselines runner (default: fastest forward)
    OMP_NUM_THREADS=1 python bench/gpu_check.py --device cpu         # dry run: tiny config, well under a minute

The GPU machine (device tool) has torch, transformers and pytest but neither structlog (the engine
imports it; without it the engine, baselines, host and features parts fail and concurrency skips, recorded) nor pydantic
(not needed here). Once, here, in the repo root, fetch structlog's wheel (pure Python, 74 kB) and
llguidance's (abi3, 3 MB; tests/gpu then also checks grammar-constrained requests on CUDA):
    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux2014_x86_64 --platform manylinux_2_31_x86_64 -d .whl structlog==26.1.0 llguidance==1.9.1
then call the device tool's `run` with carry [".whl"], timeout_s 590 and this command:
    set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; PYTHONUNBUFFERED=1 \
        python3 bench/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log
The table is printed last (the reply's output tail); the JSON and the whole log come back from $OUT.

Seen on an H200 (2026-12-04, bench/results/h200-2026-12-04): a machine starts in about 40 s of device
time; the parts took gpu_tests 75-109 s, forward 32-47 s (two to four variants; compiled+graphs builds
in 17 s), engine 33-58 s (gen_length 64), baselines 25-32 s, features 11-28 s, concurrency 27 s,
host 3 s, profile 3 s. A default run (gen_length 128) then ended in about 6 minutes. Since then (not
yet run on a GPU) tests/gpu checks the paged kernel too (up to 180 s now), the forward part runs the two
paged variants and a long-context row, and the attention part (an estimated 30-60 s: Triton compiles
its tile settings) runs after it, so expect about 7-8 minutes within `timeout_s` 590; the default
`--budget-s` 450 stops starting parts after 7.5 minutes (the later ones recorded as skipped), and the
JSON is rewritten after every part. A 15-minute lease then has no room for a whole rerun: rerun only
what failed, with `--parts` in priority order.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from bench_args import append_section, at_most, count, positive_float, positive_int, positive_ints, torch_device, writable_file  # noqa: E402
from gpu_check_attention import part_attention  # noqa: E402
from gpu_check_baselines import part_baselines  # noqa: E402
from gpu_check_engine import part_engine, part_features, part_host  # noqa: E402
from gpu_check_forward import part_forward, part_profile  # noqa: E402
from gpu_check_parts import CONFIGS, FORWARD_VARIANTS, PartFailed, PartSkipped, Row, Workbench  # noqa: E402

GPU_TESTS_MAX_S = 180
GPU_TEST_FILES = ["tests/gpu/test_cuda_runner.py"] + sorted(
    str(p.relative_to(ROOT)) for p in (ROOT / "tests" / "gpu").glob("test_*.py") if p.name != "test_cuda_runner.py")
PART_NAMES = ("gpu_tests", "forward", "attention", "engine", "baselines", "concurrency", "host", "features", "profile")
# Per device type: defaults of the options left unset (the CPU ones make the dry run).
DEFAULTS = {
    "cuda": {"config": "8b", "forward_tokens": [1, 8, 32, 128], "context": 256, "long_context": 4096, "repeats": 10,
             "mixed_step": [434, 1500, 63, 150],
             "levels": [1, 8, 32],
             # flex and graphs alone were measured on 2026-12-04 (docs/benchmarks.md); flex+graphs variants are
             # left out: flex compiles once per layout, so start-up capture takes minutes
             "forward_variants": ["eager", "paged", "compiled+graphs", "paged+compiled+graphs"],
             "gen_length": 128, "concurrency_args": "--levels 1,8,32 --rounds 1 --requests 8 --gen-length 64"},
    "cpu": {"config": "tiny", "forward_tokens": [1, 8], "context": 32, "long_context": 64, "repeats": 3,
            "mixed_step": [64, 256, 15, 16],
            "levels": [1, 2],
            "forward_variants": ["eager", "flex"],
            "gen_length": 32, "concurrency_args": "--levels 1,2 --rounds 1 --requests 2 --gen-length 64 "
                                                  "--token-budget 64 --num-blocks 256"},
}


def part_gpu_tests(bench: Workbench) -> tuple[dict, list[Row]]:
    """`pytest tests/gpu` in a subprocess; counts from its JUnit XML."""
    if bench.device.type != "cuda":
        raise PartSkipped("no CUDA")
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--show-capture=no", "--tb=short",
               # the runner-level tests first, in that order: they check each attention backend on its own,
               # so a run the limit cuts short still says whether the kernels are right
               *GPU_TEST_FILES, f"--junitxml={report}"]
        # At most 40% of the default budget: on a fresh machine every compiled shape (flex, layer kernels)
        # is an inductor + Triton compile, and the 8B measurements after it hold the targets.
        limit = max(30, min(GPU_TESTS_MAX_S, bench.time_left()))
        if importlib.util.find_spec("pytest_timeout"):  # on the GPU image: one hung test fails alone
            cmd.append(f"--timeout={max(60, int(limit) * 2 // 3)}")
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired as exc:  # -v: the tail names the tests that finished and the one running
            tail = (exc.stdout or b"")[-3000:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
            raise PartFailed({"output_tail": tail}, [Row("pytest tests/gpu", f"timed out after {limit:.0f} s", "all pass",
                                                         False)], f"timed out after {limit:.0f} s") from None
        if not report.is_file():
            raise RuntimeError(f"pytest wrote no report (exit {proc.returncode}): {(proc.stdout + proc.stderr)[-2000:]}")
        root = ET.parse(report).getroot()
        counts = {k: 0 for k in ("tests", "failures", "errors", "skipped")}
        for suite in root.iter("testsuite"):
            for key in counts:
                counts[key] += int(suite.get(key, 0))
        failed = [{"test": f"{case.get('classname')}::{case.get('name')}", "message": (bad.get("message") or "")[:400],
                   "text": (bad.text or "")[-2500:]}
                  for case in root.iter("testcase") for bad in case if bad.tag in ("failure", "error")]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    results = {**counts, "exit_code": proc.returncode, "failed": failed, "output_tail": proc.stdout[-3000:]}
    bad = counts["failures"] + counts["errors"]
    value = f"{counts['passed']} passed, {bad} failed, {counts['skipped']} skipped"
    if bad:
        rows = [Row("pytest tests/gpu", value, "all pass", False)]
        rows += [Row(f"FAILED {f['test'].split('.')[-1]}", f["message"][:200].replace("|", "/").replace("\n", " "))
                 for f in failed]
        raise PartFailed(results, rows, f"{bad} of {counts['tests']} failed")
    return results, [Row("pytest tests/gpu", value, "all pass", counts["skipped"] == 0)]


# A level's row of bench/concurrency.py's table: c, mode, tok/s, tok/CPU-s, TTFT, ITL, e2e, TPF.
CONCURRENCY_ROW = re.compile(r"^\| (\d+) \| (\w+) \|" + r" ([\d.]+) \|" * 6)


def part_concurrency(bench: Workbench) -> tuple[dict, list[Row]]:
    """bench/concurrency.py on the shipped model with a short setting, in a subprocess."""
    if importlib.util.find_spec("structlog") is None:
        raise PartSkipped("structlog is not installed (bench/concurrency.py needs it): carry its wheel, see the docstring")
    cmd = [sys.executable, "bench/concurrency.py", *bench.args.concurrency_args.split()]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(30, min(300, bench.time_left())))
    if proc.returncode:
        raise RuntimeError(f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-2000:]}")
    levels, rows = [], []
    for line in proc.stdout.splitlines():
        if match := CONCURRENCY_ROW.match(line):
            c, mode, tok_s, _, ttft, itl, _, tpf = match.groups()
            levels.append({"concurrency": int(c), "mode": mode, "tok_s": float(tok_s), "ttft_ms": float(ttft),
                           "itl_ms": float(itl), "tpf": float(tpf)})
            rows.append(Row(f"concurrency.py, shipped model, {mode}, {c} client(s)",
                            f"{float(tok_s):.0f} tok/s, {float(tpf):.2f} tok/forward, ITL p50 {float(itl):.1f} ms"))
    if not levels:
        raise RuntimeError(f"no table rows in its output: {proc.stdout[-2000:]}")
    return {"command": " ".join(cmd[1:]), "levels": levels, "output_tail": proc.stdout[-3000:]}, rows


PARTS = {"gpu_tests": part_gpu_tests, "forward": part_forward, "engine": part_engine, "baselines": part_baselines,
         "concurrency": part_concurrency, "host": part_host, "features": part_features, "profile": part_profile, "attention": part_attention}


def run_part(bench: Workbench, name: str) -> dict:
    """Run one part; any exception (OOM, missing package, a bug) becomes its record, never the run's end."""
    start = time.perf_counter()
    record = {"status": "passed", "results": {}, "rows": []}
    try:
        record["results"], record["rows"] = PARTS[name](bench)
    except PartSkipped as exc:
        record.update(status="skipped", error=str(exc))
    except PartFailed as exc:
        record.update(status="failed", error=str(exc), results=exc.results, rows=exc.rows)
    except Exception as exc:  # noqa: BLE001 - recorded, and the next part runs
        hint = " (carry it as a wheel: see bench/gpu_check.py's docstring)" if isinstance(exc, ImportError) else ""
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}{hint}", traceback=traceback.format_exc(limit=8))
    finally:
        if torch.cuda.is_available():
            try:  # after a sticky CUDA error (an illegal access) this raises too: keep the part's record
                torch.cuda.empty_cache()
            except Exception as exc:  # noqa: BLE001
                record.setdefault("error", f"torch.cuda.empty_cache after the part: {type(exc).__name__}: {exc}")
    record["seconds"] = time.perf_counter() - start
    return record


def machine(bench: Workbench) -> dict:
    import transformers

    info = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(bench.device), "dtype": str(bench.dtype).removeprefix("torch."), "config": bench.args.config,
            "runner_options": bench.args.runner_options,
            "engine_variant": bench.engine_variant() if "runner" in bench._built else None,
            "engine_variant_from": bench._built.get("engine_variant_from"),
            "engine_variant_rule": bench.args.engine_variant,
            "cpu_cores": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if bench.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(bench.device)
        info["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated(bench.device) / 1e9
    return info


def table(info: dict, records: dict) -> str:
    cfg, engine = CONFIGS[info["config"]], ""
    if info.get("engine_variant"):
        source = info.get("engine_variant_from") or ""
        chosen = f" ({'the fastest forward' if source == 'fastest forward' else source})" if source != "given" else ""
        engine = f"; engine and baselines on the forward variant `{info['engine_variant']}`{chosen}"
    lines = [f"Machine: {info.get('gpu', platform.machine() + ' CPU')}, torch {info['torch']}, transformers "
             f"{info['transformers']}. Model: {info['config']} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, "
             f"vocab {cfg.vocab_size}, {info['dtype']}), random weights. Runner options: "
             f"{json.dumps(info['runner_options']) if info['runner_options'] else 'defaults'}{engine}.", "",
             "| part | status | measurement | value | target | verdict |", "|---|---|---|---|---|---|"]
    on_gpu = info["device"].startswith("cuda")
    for name, rec in records.items():
        status = f"{rec['status']} ({rec.get('seconds', 0):.0f} s)"
        if rec.get("error"):
            label = "why" if rec["status"] == "skipped" else "error"
            lines.append(f"| {name} | {status} | {label} | {rec['error'][:300]} | - | - |")
        for row in rec["rows"]:
            verdict = "-" if row.met is None else "met" if row.met else "NOT met"
            if row.met is not None and not on_gpu:  # the targets are the GPU's: a CPU run neither meets nor misses them
                verdict = f"n/a ({info['device']})"
            lines.append(f"| {name} | {status} | {row.measurement} | {row.value} | {row.target} | {verdict} |")
    if not on_gpu:
        lines += ["", f"The targets are for a CUDA GPU (issue \"CUDA fast path\"); on {info['device']} the verdicts are n/a."]
    lines += ["", "Random weights: drafts are never confident at the serving thresholds, so ReFusion runs the "
              "single-slot fallback and completes slots token by token (about 0.5 tokens per forward); "
              "compare its time per step, not its tokens per forward."]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", type=torch_device,
                        help="cuda (the default where this machine has it) or cpu (a dry run of every part)")
    parser.add_argument("--config", choices=sorted(CONFIGS), help="default: 8b on cuda, tiny on cpu")
    parser.add_argument("--parts", type=lambda s: s.split(","), default=list(PART_NAMES),
                        help=f"parts to run, in this order (default {','.join(PART_NAMES)})")
    parser.add_argument("--budget-s", type=positive_float, default=450.0,
                        help="start no part after this many seconds (above 0)")
    parser.add_argument("--json", type=writable_file, default="gpu_check.json",
                        help="where to write the results (checked before any part runs)")
    parser.add_argument("--append", type=writable_file, help="also append the table to this markdown file")
    parser.add_argument("--forward-tokens", type=positive_ints, help="query tokens per forward (default 1,8,32,128)")
    parser.add_argument("--context", type=at_most(32768),
                        help="cached tokens before the timed forwards, 1-32768 (default 256 on CUDA, 32 on CPU)")
    parser.add_argument("--long-context", type=at_most(32768, count),
                        help="cached tokens before one more 1-token forward per variant, an editor's long file "
                             "(0-32768; default 4096 on CUDA, 64 on CPU; 0 leaves it out)")
    parser.add_argument("--mixed-step", type=positive_ints,
                        help="CHUNK,CONTEXT,DECODES,DECODE_CONTEXT: one more forward per sdpa variant, a CHUNK-token "
                             "prompt chunk after CONTEXT cached tokens beside DECODES one-token decode steps at "
                             "DECODE_CONTEXT, with attention groups and whole (default 434,1500,63,150 on CUDA, "
                             "64,256,15,16 on CPU; 0 leaves it out)")
    parser.add_argument("--forward-variants", type=lambda s: s.split(","),
                        help="runner variants of the forward part: eager, flex (attention), graphs (cuda_graphs), "
                             "compiled (compile_layers) and the combinations in gpu_check_parts.FORWARD_VARIANTS "
                             "(default on CUDA: eager,paged,compiled+graphs,paged+compiled+graphs; on CPU: eager,flex)")
    parser.add_argument("--repeats", type=positive_int, help="timed forwards per token count (default 10)")
    parser.add_argument("--bandwidth-gbs", type=positive_float,
                        help="memory bandwidth in GB/s (above 0) for the floor, instead of measuring it (the default)")
    parser.add_argument("--levels", type=positive_ints, help="engine concurrency levels (default 1,8,32)")
    parser.add_argument("--gen-length", type=positive_int,
                        help="tokens per request, a multiple of 32 (default 128 on CUDA, 32 on CPU)")
    parser.add_argument("--token-budget", type=positive_int, default=512, help="engine query tokens per forward")
    parser.add_argument("--concurrency-args", help="arguments of bench/concurrency.py")
    parser.add_argument("--engine-variant", default="fastest",
                        help="forward variant the engine and baselines parts run on: a variant name, or fastest "
                             "(lowest forward medians of this run; default when the forward part did not run)")
    parser.add_argument("--runner-options", type=json.loads, default={},
                        help='JSON of ModelRunner options for forward/engine/baselines, e.g. \'{"cuda_graphs": true}\'')
    args = parser.parse_args(argv)
    for key, value in DEFAULTS["cuda" if args.device.startswith("cuda") else "cpu"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if unknown := set(args.parts) - set(PART_NAMES):
        parser.error(f"unknown parts {sorted(unknown)}; choose from {','.join(PART_NAMES)}")
    if len(set(args.parts)) != len(args.parts):
        parser.error(f"--parts {','.join(args.parts)}: name each part once")
    if args.engine_variant != "fastest" and args.engine_variant not in FORWARD_VARIANTS:
        parser.error(f"--engine-variant {args.engine_variant}: choose fastest or one of {','.join(FORWARD_VARIANTS)}")
    if unknown := set(args.forward_variants) - set(FORWARD_VARIANTS):
        parser.error(f"unknown forward variants {sorted(unknown)}; choose from {','.join(FORWARD_VARIANTS)}")
    if args.mixed_step != [0] and (len(args.mixed_step) != 4 or min(args.mixed_step) < 1):
        parser.error(f"--mixed-step {','.join(map(str, args.mixed_step))}: give four positive numbers "
                     "CHUNK,CONTEXT,DECODES,DECODE_CONTEXT, or 0")
    if args.gen_length % 32:
        parser.error(f"--gen-length {args.gen_length}: use a multiple of 32 (slot size 8, 4 serial blocks)")
    if args.device == "cpu" and args.config == "8b":
        parser.error("the 8b config is for CUDA only (16 GB of bf16 weights); use --config tiny or small on CPU")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench = Workbench(args)
    records = {}
    for name in args.parts:  # in the order given: a short lease measures what matters most first
        if bench.time_left() <= 0:
            records[name] = {"status": "skipped", "error": f"time budget of {args.budget_s:.0f} s spent", "rows": []}
            continue
        print(f"[gpu_check] {name} ...", flush=True)
        records[name] = run_part(bench, name)
        if "traceback" in records[name]:
            print(records[name]["traceback"], file=sys.stderr, flush=True)
        print(f"[gpu_check] {name}: {records[name]['status']} in {records[name]['seconds']:.1f} s "
              f"{records[name].get('error', '')}", flush=True)
        write_report(bench, records)  # after every part: a run the device tool cuts short keeps what it measured
    text = write_report(bench, records)
    print(text)
    append_section(args.append, text)
    failed = [name for name, rec in records.items() if rec["status"] == "failed"]
    print(f"results: {args.json}; failed parts: {', '.join(failed) or 'none'}")
    return 1 if failed else 0


def write_report(bench: Workbench, records: dict) -> str:
    """Write the JSON report of the parts run so far (--json: machine, args, parts with their rows, the
    table); returns the table."""
    info = machine(bench)
    text = table(info, records)
    parts = {name: {**rec, "rows": [vars(row) for row in rec["rows"]]} for name, rec in records.items()}
    report = {"machine": info, "args": vars(bench.args), "parts": parts, "table": text}
    bench.args.json.write_text(json.dumps(report, indent=1, default=str))
    return text


def quiet_engine_logs() -> None:
    """The engine logs every request at info level through structlog: warnings only (as bench/concurrency.py)."""
    try:
        import structlog
    except ImportError:
        return  # the engine parts record the missing package
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


if __name__ == "__main__":
    quiet_engine_logs()
    sys.exit(main())

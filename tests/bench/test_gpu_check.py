"""bench/gpu_check.py: the CPU dry run end to end, a failing part recorded while the next one runs, and
the time budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import gpu_check  # noqa: E402
import torch  # noqa: E402

from workers.attention_paged import unavailable_reason  # noqa: E402

PARTS = ["gpu_tests", "forward", "attention", "engine", "baselines", "concurrency", "host", "features", "profile"]


def test_cpu_dry_run_reports_every_part_with_numbers(tmp_path):
    out = tmp_path / "gpu_check.json"
    # About 25 s alone on 2 cores; 180 s ran out once with the CPUs oversubscribed four times over (a CI
    # run beside other test runs): the limit only guards against a hang
    proc = subprocess.run([sys.executable, "bench/gpu_check.py", "--device", "cpu", "--json", str(out)], cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert list(parts) == PARTS
    assert parts["gpu_tests"]["status"] == "skipped" and parts["gpu_tests"]["error"] == "no CUDA"
    for name in PARTS[1:]:
        assert parts[name]["status"] == "passed", (name, parts[name].get("error"))

    forward = parts["forward"]["results"]
    assert forward["floor_ms"] > 0 and set(forward["variants"]) == {"eager", "flex"}  # the CPU variants
    for variant in forward["variants"].values():
        assert set(variant["tokens"]) == {"1", "8"}
        assert all(t["median_ms"] > 0 and t["over_floor"] > 0 for t in variant["tokens"].values())
        assert variant["long_context"]["context"] == 64 and variant["long_context"]["median_ms"] > 0
    mixed = forward["variants"]["eager"]["mixed_step"]  # (sdpa only: flex reads the cache in place)
    assert mixed["chunk"] == 64 and mixed["decodes"] == 15 and mixed["grouped_ms"] > 0 and mixed["whole_ms"] > 0
    assert "mixed_step" not in forward["variants"]["flex"]
    # engine and baselines run on the forward variant with the lowest summed medians of this run
    sums = {name: sum(t["median_ms"] for t in v["tokens"].values()) for name, v in forward["variants"].items()}
    assert report["machine"]["engine_variant"] == min(sums, key=sums.get)
    assert parts["engine"]["results"]["runner_stats"]["attention"] == forward["variants"][min(sums, key=sums.get)][
        "options"].get("attention", "sdpa")
    for mode in ("ar", "refusion"):
        levels = parts["engine"]["results"][mode]
        assert set(levels) == {"1", "2"}
        assert all(r["tok_s"] > 0 and r["tpf"] > 0 and r["itl_ms"] > 0 and r["ms_per_step"] > 0 for r in levels.values())
    host = parts["host"]["results"]["rows"]  # engine host time on the zero-cost model, AR and ReFusion
    assert {(r["mode"], r["requests"]) for r in host} == {(m, c) for m in ("ar", "refusion") for c in (1, 2)}
    assert all(r["ms_per_step"] > 0 and r["steps"] > 0 for r in host)
    concurrency = parts["concurrency"]["results"]["levels"]
    expected = {(c, m) for c in (1, 2) for m in ("refusion", "ar", "auto")}
    assert {(r["concurrency"], r["mode"]) for r in concurrency} == expected
    assert all(r["tok_s"] > 0 for r in concurrency)
    features = parts["features"]["results"]  # AR with per-request options against plain
    assert set(features) == {"plain", "plain, synchronous scheduling", "plain, synchronous, serial streaming",
                             "logprobs 5", "frequency_penalty 1", "min_p 0.05, T 0.8", "regex",
                             "regex, synchronous scheduling"}
    assert all(r["tok_s"] > 0 and r["requests"] == 2 and 0 <= r["ahead"] <= 1 for r in features.values())
    assert features["plain, synchronous scheduling"]["ahead"] == features["regex, synchronous scheduling"]["ahead"] == 0
    # the paged kernel's rows where it can run: here under Triton's interpreter (tests/conftest.py)
    paged_runs = unavailable_reason(torch.device("cpu")) is None
    cases = parts["attention"]["results"]["cases"]  # one layer's attention per backend
    assert [(c["sequences"], c["query_tokens"], c["context"]) for c in cases] == [(1, 1, 64), (2, 8, 32)]
    assert all(c["us"]["sdpa"] > 0 for c in cases)
    if paged_runs:
        assert all(c["us"]["paged 32/4"] > 0 and c["max_abs_diff"] < 1e-5 for c in cases)  # float32 on the CPU
    profiled = parts["profile"]["results"]  # eager forwards under torch.profiler (leaf operators on the CPU)
    assert set(profiled) == {"eager", "compiled"} | ({"paged+compiled"} if paged_runs else set())
    assert all(p["kernels_per_forward"] > 10 and p["busy_ms_per_forward"] > 0 and p["top"] for p in profiled.values())

    # Float32 on the CPU, same tensors: the engine's ReFusion equals the spec oracle on transformers token
    # for token and forward for forward (as tests/decoding/test_refusion_oracle.py holds). AR is not
    # compared: the engine reads its first token from a mask row, `generate` from the last prompt row.
    baselines = parts["baselines"]["results"]
    oracle, engine = baselines["transformers"]["refusion"], baselines["engine"]["refusion"]
    assert baselines["exact_expected"] and oracle["same_tokens"]
    assert oracle["ids"] == engine["ids"] and len(engine["ids"]) > 0
    assert oracle["steps"] == engine["forwards"]
    assert oracle["step_ratio"] > 0 and baselines["transformers"]["ar"]["tok_s"] > 0

    table = report["table"]
    for target in ("<= 1.25x floor", ">= 200 tok/s", ">= 8x faster"):
        assert target in table
    assert table in proc.stdout


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    def out_of_memory(bench):
        raise RuntimeError("CUDA out of memory (simulated)")

    def measured(bench):
        return {"tok_s": 1.0}, [gpu_check.Row("engine ar, 32 request(s)", "1 tok/s", ">= 4,000 tok/s", False)]

    monkeypatch.setitem(gpu_check.PARTS, "forward", out_of_memory)
    monkeypatch.setitem(gpu_check.PARTS, "engine", measured)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--parts", "forward,engine", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    forward, engine = report["parts"]["forward"], report["parts"]["engine"]
    assert forward["status"] == "failed" and "out of memory" in forward["error"]
    assert engine["status"] == "passed" and engine["results"] == {"tok_s": 1.0}
    assert "| engine ar, 32 request(s) | 1 tok/s | >= 4,000 tok/s | n/a (cpu) |" in report["table"]  # a GPU's target


def test_engine_before_forward_runs_on_the_runner_defaults_and_says_so(tmp_path):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--parts", "engine,forward", "--levels", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert list(report["parts"]) == ["engine", "forward"]
    assert report["machine"]["engine_variant"] == "eager"  # the CPU's defaults: no forward measured before it
    assert "runner defaults" in report["machine"]["engine_variant_from"]
    assert "fastest forward" not in report["table"] and "runner defaults" in report["table"]


def test_parts_past_the_time_budget_are_skipped(tmp_path):
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--parts", "forward,baselines", "--budget-s", "1e-9", "--json", str(out)]) == 0
    parts = json.loads(out.read_text())["parts"]
    assert list(parts) == ["forward", "baselines"]
    assert all(p["status"] == "skipped" and "budget" in p["error"] for p in parts.values())


def test_the_report_is_written_after_every_part(tmp_path, monkeypatch):
    """The JSON was written only at the end: a run the device tool cut at its timeout lost every number."""
    out = tmp_path / "report.json"
    seen = {}

    def forward(bench):
        return {"floor_ms": 1.0}, [gpu_check.Row("weight-read floor", "1 ms")]

    def engine(bench):  # what a cut run would leave on disk at this point
        seen.update(json.loads(out.read_text())["parts"])
        return {}, []

    monkeypatch.setitem(gpu_check.PARTS, "forward", forward)
    monkeypatch.setitem(gpu_check.PARTS, "engine", engine)
    assert gpu_check.main(["--device", "cpu", "--parts", "forward,engine", "--json", str(out)]) == 0
    assert list(seen) == ["forward"] and seen["forward"]["results"] == {"floor_ms": 1.0}
    assert seen["forward"]["rows"] == [{"measurement": "weight-read floor", "value": "1 ms", "target": "-", "met": None}]
    assert list(json.loads(out.read_text())["parts"]) == ["forward", "engine"]


def test_forward_variants_past_the_budget_are_skipped(tmp_path, monkeypatch):
    """The budget was checked only between parts, and the forward part builds a runner per variant (graph
    capture, compiling): once spent, the remaining variants are not started."""
    left = iter([100.0])  # main's check before the part; every later look finds the budget spent
    monkeypatch.setattr(gpu_check.Workbench, "time_left", lambda self: next(left, 0.0))
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--parts", "forward", "--forward-variants", "eager,flex",
                           "--json", str(out)]) == 0
    forward = json.loads(out.read_text())["parts"]["forward"]
    assert forward["results"]["variants"] == {"eager": {"skipped": "time budget spent"},
                                              "flex": {"skipped": "time budget spent"}}
    assert [r["value"] for r in forward["rows"][1:]] == ["skipped: --budget-s spent"] * 2


def test_a_failing_forward_variant_fails_the_part_and_keeps_the_others(tmp_path, monkeypatch):
    """A variant that cannot build (here the paged kernel, refused as off the interpreter) was a FAILED row
    inside a part reported passed, and the summary said "failed parts: none" (a break-test): the part
    now fails, exit 1, and the other variant's numbers stay in the report."""
    from workers import attention_paged

    monkeypatch.setattr(attention_paged, "_interpreted", lambda: False)
    out = tmp_path / "report.json"
    assert gpu_check.main(["--device", "cpu", "--parts", "forward", "--forward-variants", "eager,paged",
                           "--long-context", "0", "--repeats", "1", "--json", str(out)]) == 1
    forward = json.loads(out.read_text())["parts"]["forward"]
    assert forward["status"] == "failed" and forward["error"] == "forward variants failed: paged"
    assert "runs on CUDA" in forward["results"]["variants"]["paged"]["error"]
    assert forward["results"]["variants"]["eager"]["tokens"]["1"]["median_ms"] > 0


def test_engine_variant_given_by_name_builds_that_runner():
    args = gpu_check.parse_args(["--device", "cpu", "--engine-variant", "flex", "--runner-options", '{"block_size": 8}'])
    runner = gpu_check.Workbench(args).engine_runner()
    assert runner.stats()["attention"] == "flex" and runner.info.block_size == 8


def test_verdicts_against_the_gpu_targets_are_given_on_cuda_only():
    """A CPU dry run marked "engine ar, 1 request 620 tok/s" as met against the GPU's >= 200 tok/s."""
    rows = [gpu_check.Row("engine ar, 1 request(s)", "620 tok/s", ">= 200 tok/s", True),
            gpu_check.Row("engine ar, 32 request(s)", "1 tok/s", ">= 4,000 tok/s", False),
            gpu_check.Row("weight-read floor", "1 ms")]
    records = {"engine": {"status": "passed", "seconds": 1.0, "rows": rows}}
    info = {"config": "tiny", "torch": "x", "transformers": "y", "dtype": "float32", "runner_options": {}}
    cpu = gpu_check.table({**info, "device": "cpu"}, records)
    assert "| 620 tok/s | >= 200 tok/s | n/a (cpu) |" in cpu and "| 1 tok/s | >= 4,000 tok/s | n/a (cpu) |" in cpu
    assert "| 1 ms | - | - |" in cpu and "met" not in cpu.replace("n/a", "")
    gpu = gpu_check.table({**info, "device": "cuda:0", "gpu": "NVIDIA H200"}, records)
    assert "| 620 tok/s | >= 200 tok/s | met |" in gpu and "| 1 tok/s | >= 4,000 tok/s | NOT met |" in gpu


def test_unknown_engine_variant_is_refused(capsys):
    import pytest

    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--device", "cpu", "--engine-variant", "turbo"])
    assert "--engine-variant turbo: choose fastest or one of eager,flex" in capsys.readouterr().err


def test_gpu_tests_past_their_time_limit_fail_with_the_output_tail(monkeypatch):
    import subprocess

    import pytest
    import torch

    def too_slow(cmd, **kwargs):
        raise subprocess.TimeoutExpired(cmd, kwargs["timeout"], output=b"tests/gpu/test_cuda_runner.py::test_a PASSED\n")

    monkeypatch.setattr(gpu_check.subprocess, "run", too_slow)
    bench = gpu_check.Workbench(gpu_check.parse_args(["--device", "cpu"]))
    bench.device = torch.device("cuda")  # only its type is read before pytest would start
    with pytest.raises(gpu_check.PartFailed) as failed:
        gpu_check.part_gpu_tests(bench)
    assert "timed out" in str(failed.value) and "test_a PASSED" in failed.value.results["output_tail"]
    assert failed.value.rows[0].met is False

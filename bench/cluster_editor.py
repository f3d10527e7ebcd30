"""Prefix-affinity routing vs Ray Serve's default router, 2 (`--replicas`) CPU engine replicas, in one run.

An editor workload (users typing in many open files) plus agent conversations, measured as prefix-cache
hit rate, time to a one-line suggestion, agent turn latency and throughput, per router policy.

Workload (seeded, identical for both policies): `--documents` Python files of the standard library
(encodings tables left out), each opened at a cursor line with 400-1,300 tokens before it, spread over
`--editors` simulated users (one WebSocket connection each, native editor protocol). A user types in one
of their files at a time: a burst of `--burst` requests, each after retyping 2-6 characters of the file's
own text at the cursor (the cursor moves on to the next line when one is done), waiting for the
one-line suggestion and pausing `--pace-ms` (jittered); then the next of their files, round after round,
until every document has had `--keystrokes` requests. Users run concurrently with staggered starts, so
all documents stay open and are returned to while the others are edited. Beside them `--agents`
conversations post `--turns` turns each to /v1/chat/completions, every turn re-sending the growing
history (first turn: a file of their own plus a request), with `--think-ms` between turns; chat runs at
the API's default batch priority, so editor completions (interactive) may preempt agent turns.

Per policy the app "refusion" is deployed afresh (`--replicas` engine replicas, torch_threads 1), so both
start with empty prefix caches, and deleted afterwards. The hit rate is the delta of the service's summed
counters (refusion_service_prefix_cache_{hit,lookup}_tokens_total) over the workload. KV cache size
`--num-blocks` (16-token blocks, per replica): at the defaults (Python 3.11's stdlib) the working set
is ~1,250 blocks of documents + ~180 of conversations; the default 1,000 holds a little over half of it
plus the running requests' own blocks (suffix, gap), so two replicas together hold all of it but one
replica cannot: the many-open-files case affinity routing is for. The working set is printed to check
that. `--replicas` 4 shows how the default router's hit rate falls as replicas are added. Every error
answer counts as a failure and is reported.

    OMP_NUM_THREADS=1 python bench/cluster_editor.py          # both policies, a few minutes on 2 cores
    OMP_NUM_THREADS=1 python bench/cluster_editor.py --quick  # smoke run: 2 documents, 1 agent
    ... --append docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import math
import os
import platform
import random
import shlex
import socket
import sys
import time
import urllib.request
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_args import (append_section, at_most, count, model_dir, positive_float, positive_int, serve_num_blocks,  # noqa: E402
                              writable_file)
from bench.editor_latency import pct  # noqa: E402
from integrations.editor.protocol import Limits  # noqa: E402
from integrations.lsp.backend import EditorBackend  # noqa: E402
from workers.kv_blocks import DEFAULT_BLOCK_SIZE  # noqa: E402  (the runner's; sizes the printed working set)

POLICIES = ("prefix_affinity", "power_of_two")
# Ray Serve gives a starting HTTP proxy 5 s to report ready; a loaded 2-core machine needs longer
# (tests/integrations/conftest.py). Ray's processes inherit these, so they are set before ray.init().
RAY_SERVE_ENV = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "120", "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60"}
FOLLOW_UPS = ["Add type hints to it.", "Now handle the empty input case.", "Write a unit test for it.",
              "Rename the helper to something clearer.", "Make it a method of the class above.", "Add a docstring."]
# --quick: a smoke run's sizes, as defaults (flags given beside it win)
QUICK = {"documents": 2, "keystrokes": 4, "burst": 2, "editors": 1, "agents": 1, "turns": 2}


def make_document(path: Path, rng: random.Random, tokenizer, keystrokes: int) -> dict:
    """A file opened at a code line with 400-1,300 tokens before it, and the (prefix, suffix) the editor
    sends at each keystroke burst: the user retypes the file from there, 2-6 characters per burst."""
    text = path.read_text(encoding="utf-8", errors="replace")
    offsets = tokenizer(text[:12_000], return_offsets_mapping=True)["offset_mapping"]
    target = min(rng.randint(400, 1300), len(offsets) - 100)
    start = text.index("\n", offsets[target][0]) + 1
    while not text[start:text.index("\n", start)].strip():  # a non-blank line to write
        start = text.index("\n", start) + 1
    pos = start + len(text[start:]) - len(text[start:].lstrip(" "))
    steps = []
    for _ in range(keystrokes):
        line_end = text.index("\n", pos)
        steps.append((text[:pos], text[line_end:]))
        pos += rng.randint(2, 6)
        if pos >= line_end:  # line done: the editor auto-indents the next one
            pos = line_end + 1 + len(text[line_end + 1:]) - len(text[line_end + 1:].lstrip(" "))
    return {"uri": path.as_uri(), "steps": steps, "prompt_tokens": len(tokenizer(steps[-1][0])["input_ids"])}


def make_conversation(path: Path, rng: random.Random, tokenizer, turns: int, max_tokens: int) -> dict:
    """An agent session: a file of 500-900 tokens and a request, then short follow-ups."""
    text = path.read_text(encoding="utf-8", errors="replace")
    offsets = tokenizer(text[:8_000], return_offsets_mapping=True)["offset_mapping"]
    code = text[: offsets[min(rng.randint(500, 900), len(offsets) - 1)][1]]
    first = f"Here is {path.name}:\n```python\n{code}\n```\nAdd a function that checks the first function's inputs."
    users = [first] + rng.sample(FOLLOW_UPS, turns - 1)
    tokens = len(tokenizer(first)["input_ids"]) + (turns - 1) * (max_tokens + 16)
    return {"users": users, "prompt_tokens": tokens}


def stdlib_pool() -> list[Path]:
    """The standard library's files a document or a conversation is drawn from: real code of 4-60 kB, not
    the codec tables (286 files on this machine's Python 3.11)."""
    from training.corpus import source_files

    return [p for _, p in source_files(["stdlib"]) if "encodings" not in p.parts and 4e3 <= p.stat().st_size <= 6e4]


def build_workload(args) -> dict:
    """Documents, each user's schedule of requests and the conversations; the same for every policy."""
    from workers.loader import load_tokenizer

    rng, tokenizer = random.Random(args.seed), load_tokenizer(Path(args.model))
    files = rng.sample(stdlib_pool(), args.documents + args.agents)
    # each file draws from its own generator, so its cursor does not depend on the other files' keystrokes
    own = [random.Random(f"{args.seed}/{p.parent.name}/{p.name}") for p in files]
    docs = [make_document(p, r, tokenizer, args.keystrokes) for p, r in zip(files[: args.documents], own)]
    editors = []
    for e in range(args.editors):
        mine, schedule = docs[e :: args.editors], []
        for first in range(0, args.keystrokes, args.burst):  # a round: a burst in each of the user's files
            schedule += [(doc, k) for doc in mine for k in range(first, min(first + args.burst, args.keystrokes))]
        editors.append({"start_s": rng.uniform(0, 2.0), "schedule": schedule,
                        "pauses_s": [args.pace_ms / 1000 * rng.uniform(0.5, 1.5) for _ in schedule]})
    convs = [make_conversation(p, r, tokenizer, args.turns, args.agent_max_tokens)
             for p, r in zip(files[args.documents:], own[args.documents:])]
    blocks = {kind: sum(math.ceil(x["prompt_tokens"] / DEFAULT_BLOCK_SIZE) for x in items)
              for kind, items in (("documents", docs), ("conversations", convs))}
    return {"docs": docs, "editors": editors, "convs": convs, "blocks": blocks}


async def run_editor(url: str, editor: dict, args, stats: dict) -> None:
    """One user: the editor's schedule of (document, keystroke) requests, one at a time, on one connection."""
    backend = EditorBackend(url)
    await asyncio.sleep(editor["start_s"])
    try:
        for (doc, k), pause in zip(editor["schedule"], editor["pauses_s"]):
            prefix, suffix = doc["steps"][k]
            params = {"uri": doc["uri"], "prefix": prefix, "suffix": suffix, "version": k, "language": "python",
                      "multiline": False, "max_tokens": args.editor_max_tokens}
            start = time.perf_counter()
            try:
                result = await asyncio.wait_for(backend.complete(params), args.timeout_s)
                if result["stop_reason"] in ("error", "cancelled"):  # the engine ended it: no suggestion
                    stats["failures"][f"editor stop_reason {result['stop_reason']}"] += 1
                else:
                    stats["editor_ms"].append((time.perf_counter() - start) * 1000)
            except Exception as exc:  # noqa: BLE001 - every error answer is counted, by kind
                stats["failures"][f"editor {getattr(exc, 'code', None) or type(exc).__name__}"] += 1
            await asyncio.sleep(pause)
    finally:
        await backend.close()


async def run_agent(client, base_url: str, model: str, conv: dict, args, stats: dict) -> None:
    messages = [{"role": "system", "content": "You are a coding agent. Answer with Python code."}]
    for user in conv["users"]:
        messages.append({"role": "user", "content": user})
        body = {"model": model, "messages": messages, "max_tokens": args.agent_max_tokens, "temperature": 0}
        start = time.perf_counter()
        try:
            response = await client.post(base_url + "/v1/chat/completions", json=body, timeout=args.timeout_s)
            if response.status_code != 200:
                stats["failures"][f"agent HTTP {response.status_code}"] += 1
            else:
                stats["agent_ms"].append((time.perf_counter() - start) * 1000)
                messages.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})
        except Exception as exc:  # noqa: BLE001 - every error answer is counted, by kind
            stats["failures"][f"agent {type(exc).__name__}"] += 1
        await asyncio.sleep(args.think_ms / 1000)


async def run_workload(base_url: str, workload: dict, args) -> dict:
    import httpx

    stats, ws_url = {"editor_ms": [], "agent_ms": [], "failures": Counter()}, "ws" + base_url[4:] + "/v1/editor"
    start = time.perf_counter()
    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(run_editor(ws_url, editor, args, stats) for editor in workload["editors"]),
                             *(run_agent(client, base_url, Path(args.model).name, conv, args, stats)
                               for conv in workload["convs"]))
    stats["wall_s"] = time.perf_counter() - start
    return stats


def scrape(base_url: str, replicas: int = 2, tries: int = 30) -> dict:
    """Service counters from /metrics (summed prefix-cache tokens, router decisions, answering replicas),
    asked again for up to `tries` seconds until `replicas` engine replicas answer."""
    from prometheus_client.parser import text_string_to_metric_families

    for _ in range(tries):
        with urllib.request.urlopen(base_url + "/metrics", timeout=60) as response:
            text = response.read().decode()
        out = {"hit": 0.0, "lookup": 0.0, "answering": 0, "decisions": Counter(), "finished": Counter()}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "refusion_service_prefix_cache_hit_tokens_total":
                    out["hit"] = s.value
                elif s.name == "refusion_service_prefix_cache_lookup_tokens_total":
                    out["lookup"] = s.value
                elif s.name == "refusion_service_replicas" and s.labels.get("state") == "answering":
                    out["answering"] = int(s.value)
                elif s.name == "refusion_requests_finished_total":  # per replica: the load split
                    out["finished"][s.labels["replica"]] += int(s.value)
                elif s.name == "refusion_router_decisions_total" and s.labels["decision"] != "targeted":
                    out["decisions"][s.labels["decision"]] = int(s.value)  # targeted = the /metrics fan-out
        if out["answering"] >= replicas:
            break
        time.sleep(1.0)
    return out


@contextlib.contextmanager
def local_serve():
    """A local Ray (num_cpus 2) with Serve's HTTP proxy on a free port; yields its base URL, and shuts both
    down afterwards."""
    os.environ.update(RAY_SERVE_ENV)
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=100 * 1024 * 1024, configure_logging=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def measure_policy(policy: str, base_url: str, workload: dict, args) -> dict:
    """Deploy a fresh app with `policy`, run the workload, delete the app; one table row."""
    from ray import serve

    from integrations.serve_app import build_app

    config = {"model": str(args.model), "runner": {"num_blocks": args.num_blocks},
              "engine": {"routing": {"calibrate": False}}, "drain_timeout_s": 2.0,
              "engine_deployment": {"num_replicas": args.replicas, "num_cpus": 1 / args.replicas, "torch_threads": 1, "health_check_period_s": 5,
                                    "graceful_shutdown_timeout_s": 5, "router": {"policy": policy, "imbalanced_threshold": args.imbalanced_threshold}}}
    started = time.perf_counter()
    serve.run(build_app(config), name="refusion", route_prefix="/")  # returns once every replica is up
    print(f"{policy}: deployed in {time.perf_counter() - started:.0f} s", flush=True)
    try:
        before = scrape(base_url, args.replicas)
        stats = asyncio.run(run_workload(base_url, workload, args))
        after = scrape(base_url, args.replicas)
    finally:
        serve.delete("refusion")
    if min(before["answering"], after["answering"]) < args.replicas:  # a missing replica's counters would skew the delta
        stats["failures"]["metrics: a replica did not answer /metrics"] += 1
    lookup = after["lookup"] - before["lookup"]
    stats.update(policy=policy, hit_rate=(after["hit"] - before["hit"]) / lookup if lookup else float("nan"),
                 lookup_tokens=lookup, decisions=after["decisions"] - before["decisions"],
                 split=sorted((after["finished"] - before["finished"]).values(), reverse=True))
    print(f"{policy}: workload {stats['wall_s']:.0f} s", flush=True)
    return stats


def table(rows: list[dict], workload: dict, args) -> str:
    requests = sum(len(d["steps"]) for d in workload["docs"]) + len(workload["convs"]) * args.turns
    lines = ["| router policy | requests | prefix-cache hit rate | lookup tokens | editor p50 / p95 ms | "
             "agent turn p50 / p95 ms | completed req/s | failures | routing decisions | engine requests per replica |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        done = len(r["editor_ms"]) + len(r["agent_ms"])
        failures = f"{sum(r['failures'].values())} {dict(r['failures'])}" if r["failures"] else "0"
        lines.append(
            f"| {r['policy']} | {requests} | {r['hit_rate']:.1%} | {r['lookup_tokens']:.0f} | "
            f"{pct(r['editor_ms'], 50):.0f} / {pct(r['editor_ms'], 95):.0f} | "
            f"{pct(r['agent_ms'], 50):.0f} / {pct(r['agent_ms'], 95):.0f} | {done / r['wall_s']:.2f} | {failures} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(r['decisions'].items()))} | {' / '.join(map(str, r['split']))} |")
    return "\n".join(lines)


def report(rows: list[dict], workload: dict, args, argv: list[str]) -> str:
    import torch

    blocks = workload["blocks"]
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return "\n".join([
        f"### Cluster editor workload: prefix-affinity vs default router ({datetime.date.today().isoformat()})",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, torch "
        f"{torch.__version__}, no GPU; local Ray (num_cpus 2), {args.replicas} engine replicas x 1 torch thread. Model "
        f"`{Path(args.model).name}`.",
        f"Command: `{threads}{shlex.join(['python', 'bench/cluster_editor.py', *argv])}`",
        "",
        f"Workload (seed {args.seed}): {args.documents} stdlib documents x {args.keystrokes} one-line completions "
        f"(max_tokens {args.editor_max_tokens}) by {args.editors} users typing in one file at a time, {args.burst} "
        f"requests per visit, ~{args.pace_ms} ms pause after each suggestion; plus {args.agents} agent conversations x "
        f"{args.turns} chat turns (max_tokens {args.agent_max_tokens}). Working set ~{blocks['documents']} blocks of "
        f"documents + ~{blocks['conversations']} of conversations; KV cache {args.num_blocks} blocks per replica: "
        f"{args.replicas} replicas {'hold' if args.replicas * args.num_blocks >= sum(blocks.values()) else 'cannot hold'} the working set, "
        f"one {'can' if args.num_blocks >= blocks['documents'] else 'cannot'} hold every document. Hit rate: delta "
        f"of the summed prefix-cache counters over the workload; latencies measured at the client.",
        "",
        table(rows, workload, args),
    ])


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags, each refused before any file is read or Ray starts when the run could not use it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=model_dir, default=str(REPO / "models" / "refusion-tiny-code"))
    parser.add_argument("--documents", type=positive_int, default=24)
    parser.add_argument("--keystrokes", type=positive_int, default=9, help="requests per document")
    parser.add_argument("--burst", type=positive_int, default=3, help="requests in one file before the user switches files")
    parser.add_argument("--editors", type=positive_int, default=6, help="users (one editor connection each)")
    parser.add_argument("--agents", type=count, default=3)
    parser.add_argument("--turns", type=at_most(len(FOLLOW_UPS) + 1), default=4,
                        help=f"chat turns per agent conversation (1-{len(FOLLOW_UPS) + 1}: a request, then follow-ups)")
    parser.add_argument("--pace-ms", type=count, default=400, help="pause after a suggestion before the next edit")
    parser.add_argument("--think-ms", type=count, default=500, help="agent pause between turns")
    parser.add_argument("--editor-max-tokens", type=at_most(Limits().max_tokens), default=24,
                        help=f"max_tokens of each one-line completion (1-{Limits().max_tokens}, the editor protocol's)")
    parser.add_argument("--agent-max-tokens", type=positive_int, default=48)
    parser.add_argument("--replicas", type=positive_int, default=2, help="engine replicas (they share the 2 CPUs Ray is given)")
    parser.add_argument("--num-blocks", type=serve_num_blocks, default=1000, help=f"KV blocks per replica ({DEFAULT_BLOCK_SIZE} tokens each)")
    parser.add_argument("--imbalanced-threshold", type=float, default=2.0,
                        help="router setting: ongoing-request gap that overrides affinity (ServeConfig default 2; >= 0)")
    parser.add_argument("--timeout-s", type=positive_float, default=60.0, help="a request slower than this is a failure")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 2 documents x 4, 1 agent x 2 turns (flags given beside it win)")
    parser.add_argument("--append", type=writable_file, help="append the dated section to this markdown file")
    args = parser.parse_args(argv)
    if args.quick:  # its sizes become the defaults, so that an explicit flag keeps its value
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    if args.documents + args.agents > (files := len(stdlib_pool())):  # each draws a file of its own
        parser.error(f"--documents {args.documents} + --agents {args.agents}: each takes a standard library file "
                     f"of its own, and {files} are there to draw from; ask for at most {files} in all")
    if not 0 <= args.imbalanced_threshold < float("inf"):
        parser.error(f"--imbalanced-threshold {args.imbalanced_threshold}: give a number >= 0 (the router's "
                     "ongoing-request gap)")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    workload = build_workload(args)
    print(f"working set: {workload['blocks']} blocks of {DEFAULT_BLOCK_SIZE} tokens; KV cache {args.num_blocks} blocks "
          f"per replica", flush=True)
    with local_serve() as base_url:
        rows = [measure_policy(policy, base_url, workload, args) for policy in POLICIES]
    text = report(rows, workload, args, argv)
    print(text)
    append_section(args.append, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

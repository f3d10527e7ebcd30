"""bench/rebalance.py says why a row's requests failed: a row whose every request failed (its numbers all
nan) was printed with exit 0 and the reason nowhere; now its first failure's reason goes to stderr and the
run exits 1. Neither test starts Ray: a local HTTP server answers the burst, a stand-in measures the rows."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import rebalance  # noqa: E402


class Unavailable(http.server.BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"error": {"message": "engine overloaded; retry later"}}).encode()
        self.send_response(503)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_a_burst_whose_requests_all_fail_keeps_the_first_reason():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        result = asyncio.run(rebalance.burst(url, SimpleNamespace(timeout_s=30, requests=3, max_tokens=4)))
    finally:
        server.shutdown()
        server.server_close()
    assert result["failures"] == 3 and result["e2e"] == []
    assert result["first_failure"].startswith("HTTP 503: ") and "engine overloaded" in result["first_failure"]


def test_a_row_whose_every_request_failed_is_named_on_stderr_and_the_run_exits_1(monkeypatch, capsys):
    @contextlib.contextmanager
    def no_ray():
        yield "http://127.0.0.1:1"

    def measure(url, threshold, after, args):  # the first threshold's rows all failed, the second's did not
        failed = threshold == 1000
        return {"makespan_s": float("nan") if failed else 1.0, "ttft": [] if failed else [0.1], "e2e": [] if failed else [1.0],
                "failures": args.requests * args.repeats if failed else 0, "requests": args.requests * args.repeats,
                "first_failure": "HTTP 500: boom" if failed else None, "threshold": threshold,
                "rebalance_after_s": after, "split": [2, 0], "moved": 0}

    monkeypatch.setattr(rebalance, "local_serve", no_ray)
    monkeypatch.setattr(rebalance, "measure", measure)
    assert rebalance.main(["--requests", "2", "--repeats", "1"]) == 1
    out, err = capsys.readouterr()
    assert "| 1000 | 0 (off) | nan |" in out
    assert err.count("rebalance: every request of the row threshold 1000, rebalance_after_s") == 2
    assert "failed (2); the first: HTTP 500: boom" in err and "threshold 2," not in err


def test_a_kv_cache_too_small_for_a_replica_to_start_is_refused_before_ray_starts(capsys):
    """It was the serving config's traceback from inside the deployment, after Ray had started."""
    import pytest

    with pytest.raises(SystemExit) as exited:
        rebalance.main(["--num-blocks", "3"])
    assert exited.value.code == 2
    assert "argument --num-blocks: runner.num_blocks: the KV cache needs at least 4 blocks" in capsys.readouterr().err

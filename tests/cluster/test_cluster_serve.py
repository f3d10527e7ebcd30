"""The service on a real two-node Ray cluster (tests/cluster/ray_cluster.py): placement over both nodes,
prefix-affinity routing, service-wide metrics, autoscaling up and a drain-safe scale-down, node loss
with typed errors, and `refusion serve --address`. The tests run in file order and each one deploys
what it needs, so any one of them also runs alone.
"""

from __future__ import annotations

import asyncio

import json
import os
import signal
import subprocess
import threading

import httpx
from prometheus_client.parser import text_string_to_metric_families

from integrations.chat import conversation_key
from integrations.openai_models import ChatMessage
from integrations.serve_router import affinity_key, rendezvous_order
from ray_cluster import BIN, ENV, get_text, wait_for
from scheduler.api import GenerationRequest

LONG = 2500  # tokens of a stream that must outlast a node loss (greedy, random model: no EOS)


def metrics(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(get_text(url + "/metrics")) for s in f.samples}


def replicas(url: str) -> dict[str, str]:
    """Engine replicas that answered this scrape: {replica id: node name}."""
    return {dict(labels)["replica"]: dict(labels)["node"]
            for (name, labels), _ in metrics(url).items() if name == "refusion_requests_running"}


def per_replica(url: str, sample: str, **labels) -> dict[str, float]:
    out = {}
    for (name, got), value in metrics(url).items():
        got = dict(got)
        if name == sample and all(got.get(k) == v for k, v in labels.items()):
            out[got["replica"]] = out.get(got["replica"], 0.0) + value
    return out


def deploy(cluster, expected_replicas: int, **engine_deployment) -> dict[str, str]:
    """Deploy and wait until the application has settled on this config with `expected_replicas` engine
    replicas, and exactly those answer /metrics (a test that redeploys would otherwise catch a replica of
    the previous config on its way out)."""
    old = cluster.engine_replicas_settled()
    cluster.serve_deploy(cluster.app_config(**engine_deployment))
    # Serve may still read RUNNING with the old replicas for a moment after `serve deploy` returns (its
    # control loop has not taken the config up yet), and `settled` would return replicas about to be
    # replaced (the likeliest cause of a hand-back test that found nothing queued: its streams went to
    # the new ones). Wait until the application leaves that state or its replicas change; a config that
    # changes neither (in place, same replicas) is waited for 30 s at most
    try:
        wait_for(lambda: cluster.engine_replicas_settled() != old, 30, "Serve to take the new config up")
    except AssertionError:
        pass
    return settled(cluster, expected_replicas)


def settled(cluster, expected_replicas: int) -> dict[str, str]:
    """{replica id: node} once the application has settled with `expected_replicas` engine replicas, all
    of them answering /metrics."""
    def check():
        live = cluster.engine_replicas_settled()
        answering = replicas(cluster.url)
        return live is not None and len(live) == expected_replicas and set(answering) == live and answering

    return wait_for(check, 300, f"the application settled with {expected_replicas} engine replicas answering /metrics")


def conversation(i: int) -> list[ChatMessage]:
    return [ChatMessage(role="system", content="You write Python."), ChatMessage(role="user", content=f"Task {i}: sort a list.")]


def conversations_on(replica: str, live: list[str], n: int) -> list[list[ChatMessage]]:
    """n conversations whose routing key prefers `replica` among `live` (the router's own rule)."""
    found, i = [], 0
    while len(found) < n:
        messages = conversation(i)
        key = affinity_key(GenerationRequest("-", [0], affinity_key=conversation_key(messages)), 256)
        if rendezvous_order(key, live)[0] == replica:
            found.append(messages)
        i += 1
    return found


async def stream_completion(url: str, max_tokens: int, prompt: str = "", started: asyncio.Event | None = None,
                            messages: list[ChatMessage] | None = None) -> dict:
    """One streamed greedy AR request that runs to max_tokens (vLLM's ignore_eos: on chat the template's
    turn end is ignored too; the random model may write either early); returns {"chunks",
    "finish_reason", "error", "status"} once it ends."""
    body = {"max_tokens": max_tokens, "temperature": 0, "mode": "ar", "stream": True, "ignore_eos": True}
    path = "/v1/completions"
    if messages is not None:
        path, body["messages"] = "/v1/chat/completions", [m.model_dump(exclude_none=True) for m in messages]
    else:
        body["prompt"] = prompt
    out = {"chunks": 0, "finish_reason": None, "error": None, "status": None}
    async with httpx.AsyncClient(timeout=300) as client:
        async with client.stream("POST", url + path, json=body) as response:
            out["status"] = response.status_code
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    out["error"] = chunk["error"]
                    continue
                out["chunks"] += 1
                if started is not None:
                    started.set()
                reason = chunk["choices"][0].get("finish_reason")
                out["finish_reason"] = reason or out["finish_reason"]
    return out


def test_serve_deploy_spreads_two_replicas_over_both_nodes(cluster):
    placed = deploy(cluster, 2, num_replicas=2)
    assert sorted(placed.values()) == ["head", "node-b"]
    assert httpx.get(cluster.url + "/health", timeout=30).status_code == 200


def test_affinity_routing_keeps_a_conversation_on_its_replica_and_metrics_sum_up(cluster):
    placed = deploy(cluster, 2, num_replicas=2)
    live = sorted(placed)
    target, other = live[0], live[1]
    before = per_replica(cluster.url, "refusion_requests_finished_total")
    hits_before = metrics(cluster.url).get(("refusion_service_prefix_cache_hit_tokens_total", ()), 0.0)
    turns = 0
    for messages in conversations_on(target, live, 3):  # each conversation: three turns, history re-sent
        for turn in range(3):
            reply = httpx.post(cluster.url + "/v1/chat/completions", timeout=120, json={
                "messages": [m.model_dump(exclude_none=True) for m in messages], "max_tokens": 8, "temperature": 0, "mode": "ar"})
            assert reply.status_code == 200, reply.text
            messages = messages + [ChatMessage(role="assistant", content=reply.json()["choices"][0]["message"]["content"]),
                                   ChatMessage(role="user", content=f"Now step {turn}.")]
            turns += 1
    after = per_replica(cluster.url, "refusion_requests_finished_total")
    assert after.get(target, 0) - before.get(target, 0) == turns  # every turn of every conversation on its replica
    assert after.get(other, 0) - before.get(other, 0) == 0
    scraped = metrics(cluster.url)
    assert scraped[("refusion_service_prefix_cache_hit_tokens_total", ())] > hits_before  # later turns reuse the prompt
    assert scraped[("refusion_router_decisions_total", (("decision", "affinity"),))] >= turns
    total = sum(v for (name, labels), v in scraped.items() if name == "refusion_requests_finished_total")
    service = sum(v for (name, labels), v in scraped.items() if name == "refusion_service_requests_finished_total")
    assert service == total
    assert scraped[("refusion_service_replicas", (("state", "answering"),))] == 2
    used = sum(v for (name, _), v in scraped.items() if name == "refusion_kv_blocks_used")
    capacity = sum(v for (name, _), v in scraped.items() if name == "refusion_kv_blocks_capacity")
    assert scraped[("refusion_service_kv_cache_usage_ratio", ())] == used / capacity


async def test_autoscaling_scales_up_under_a_ramp_and_drains_on_scale_down(cluster):
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1, "target_ongoing_requests": 2,
                   "upscale_delay_s": 0, "downscale_delay_s": 2, "metrics_interval_s": 0.5, "look_back_period_s": 1}
    # Strict affinity (no load fallback): each long stream below stays on the replica its key prefers.
    first = deploy(cluster, 1, autoscaling=autoscaling, router={"imbalanced_threshold": 1000})
    stop_ramp = asyncio.Event()

    async def ramp(i: int) -> None:  # six streams, renewed until the second replica is up
        while not stop_ramp.is_set():
            await stream_completion(cluster.url, 600, prompt=f"def ramp_{i}(x):")

    ramps = [asyncio.create_task(ramp(i)) for i in range(6)]
    placed = await asyncio.to_thread(wait_for, lambda: (r := replicas(cluster.url)) and len(r) == 2 and r, 240,
                                     "a second replica under the ramp")
    assert set(first) < set(placed)
    # Streams pinned to each replica, back to back, until the scale-down: whichever replica it removes is
    # serving one of them then (it is idle only between two of its streams), and that one must finish.
    live, keys, i = sorted(placed), {}, 0
    while len(keys) < 2:
        messages = [ChatMessage(role="user", content=f"Write module {i}.")]
        key = affinity_key(GenerationRequest("-", [0], affinity_key=conversation_key(messages)), 256)
        keys.setdefault(rendezvous_order(key, live)[0], messages)
        i += 1
    stop_holders, results = asyncio.Event(), []

    async def hold(messages) -> None:
        while not stop_holders.is_set():
            results.append(await stream_completion(cluster.url, 1000, messages=messages))

    holders = [asyncio.create_task(hold(m)) for m in keys.values()]
    await asyncio.to_thread(wait_for, lambda: (n := per_replica(cluster.url, "refusion_requests_running"))
                            and all(n.get(r, 0) >= 1 for r in live), 120, "a running stream on each replica")
    stop_ramp.set()
    for task in ramps:  # the ramp's streams in flight are closed by the client: no longer load
        task.cancel()
    await asyncio.gather(*ramps, return_exceptions=True)
    await asyncio.to_thread(wait_for, lambda: len(replicas(cluster.url)) == 1, 300, "the scale-down to one replica")
    stop_holders.set()
    await asyncio.wait_for(asyncio.gather(*holders), 300)
    assert results, "no pinned stream finished"
    for result in results:
        assert result["status"] == 200 and result["error"] is None, result
        assert result["finish_reason"] == "length", result  # none cut: each ran to max_tokens


async def test_a_queue_moves_to_a_replica_with_free_slots(cluster):
    """Queue rebalancing (integrations/serve_rebalance.py). One running slot per replica: a long stream
    holds replica A's slot and three short requests queue behind it there; then the autoscaler's replica
    B comes up (before rebalancing they waited out the long stream: a replica added by the autoscaler
    served nothing for 190 s while 28 requests waited in the first, helper-144). They move to B and finish
    there while the long stream still runs on A. A is paused (POST /pause) before the three are sent, so
    the long stream holds its slot however long the moves take (with A running, it raced them: a 60-token
    stream ended first and the three ran on A); B, started after the pause, runs unpaused. The stream
    (~25 s) outlasts only the pause's answer; paused before it starts, it would be first in A's queue and
    move itself."""
    settings = dict(engine={"max_running": 1}, args={"rebalance_after_s": 0.2, "pause_endpoints": True})
    [source] = deploy(cluster, 1, deployments=[{"name": "RefusionEngine", "num_replicas": 1}], **settings)
    messages = conversation(0)
    started = asyncio.Event()
    long_stream = asyncio.create_task(stream_completion(cluster.url, 4000, messages=messages, started=started))
    shorts: list[asyncio.Task] = []
    try:
        await asyncio.wait_for(started.wait(), 120)
        paused = await asyncio.to_thread(httpx.post, cluster.url + "/pause", params={"mode": "keep"}, timeout=120)
        assert paused.status_code == 200 and paused.json()["replicas"] == {source: True}, paused.text
        finished_before = per_replica(cluster.url, "refusion_requests_finished_total")
        moved_before = per_replica(cluster.url, "refusion_requests_moved_total")
        decisions_before = metrics(cluster.url).get(("refusion_router_decisions_total", (("decision", "moved"),)), 0)
        shorts = [asyncio.create_task(stream_completion(cluster.url, 8, messages=messages)) for _ in range(3)]
        await asyncio.to_thread(wait_for, lambda: per_replica(cluster.url, "refusion_requests_waiting").get(source) == 3,
                                120, "the three queued on A")
        await asyncio.to_thread(cluster.serve_deploy, cluster.app_config(
            deployments=[{"name": "RefusionEngine", "num_replicas": 2}], **settings))
        [target] = set(await asyncio.to_thread(settled, cluster, 2)) - {source}  # rescaled in place: A kept
        results = await asyncio.wait_for(asyncio.gather(*shorts), 240)
        assert not long_stream.done(), long_stream.result()  # they did not wait for it (it cannot end: paused)
        for result in results:
            assert result["status"] == 200 and result["error"] is None and result["finish_reason"] == "length", result
        finished = per_replica(cluster.url, "refusion_requests_finished_total")
        assert finished.get(target, 0) - finished_before.get(target, 0) == 3, (finished_before, finished)
        assert finished.get(source, 0) - finished_before.get(source, 0) == 0  # (the long stream still runs)
        moved = per_replica(cluster.url, "refusion_requests_moved_total")
        assert (moved[source] - moved_before.get(source, 0), moved[target]) == (3, 0)
        decisions = metrics(cluster.url)[("refusion_router_decisions_total", (("decision", "moved"),))]
        assert decisions - decisions_before >= 3  # each sent again, to B first (a retry of the routing counts too)
    finally:
        for task in [long_stream, *shorts]:
            task.cancel()
        await asyncio.gather(long_stream, *shorts, return_exceptions=True)
        await asyncio.to_thread(httpx.post, cluster.url + "/resume", timeout=120)


async def test_a_replica_removed_by_a_scale_down_hands_its_queue_back(cluster):
    """Ray Serve removes a replica by routing nothing more to it and killing it after
    graceful_shutdown_timeout_s; requests queued there behind a long stream were cut then, while the other
    replica idled (helper-153). The removed replica hands every waiting request back, and they finish on
    the one kept. Rebalancing is off here, so only the hand-back can move them. Both replicas are paused
    (POST /pause, integrations/pause_api.py) once their long streams run, so the streams hold their
    slots however slowly the requests behind them arrive (a set-up that let them run out raced their
    end on a loaded CI machine: 0 + 0 waiting, 4 fresh-clone failures); the kept one resumes at the end."""
    settings = dict(engine={"max_running": 1}, router={"imbalanced_threshold": 1000}, graceful_shutdown_timeout_s=10,
                    args={"rebalance_after_s": 0, "drain_timeout_s": 3, "pause_endpoints": True})
    before = deploy(cluster, 2, deployments=[{"name": "RefusionEngine", "num_replicas": 2}], **settings)
    live = sorted(before)
    keys = {r: conversations_on(r, live, 1)[0] for r in live}
    longs, started = {}, {}
    for replica, messages in keys.items():
        started[replica] = asyncio.Event()
        longs[replica] = asyncio.create_task(stream_completion(cluster.url, 4000, messages=messages, started=started[replica]))
    shorts: list[asyncio.Task] = []
    try:
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started.values())), 120)
        paused = await asyncio.to_thread(httpx.post, cluster.url + "/pause", params={"mode": "keep"}, timeout=120)
        assert paused.status_code == 200 and paused.json()["replicas"] == {r: True for r in live}, paused.text
        assert not any(task.done() for task in longs.values())  # each holds its replica's one slot until cancelled
        shorts = [asyncio.create_task(stream_completion(cluster.url, 8, messages=m)) for m in keys.values() for _ in range(2)]
        seen: list[dict] = []  # (what the replicas said last: the failure message shows it)

        def queued() -> bool:  # all four waiting, some on each replica: whichever Ray removes has some to hand back
            seen.append(per_replica(cluster.url, "refusion_requests_waiting"))
            return sum(seen[-1].values()) == 4 and all(seen[-1].get(r, 0) >= 1 for r in live)

        try:
            await asyncio.to_thread(wait_for, queued, 120, "the four requests queued, some on each replica")
        except AssertionError as exc:
            state = {"longs_done": [t.done() for t in longs.values()], "shorts_done": [t.done() for t in shorts]}
            raise AssertionError(f"{exc}; waiting per replica, last: {seen[-1:]}; {state}") from None
        await asyncio.to_thread(cluster.serve_deploy, cluster.app_config(
            deployments=[{"name": "RefusionEngine", "num_replicas": 1}], **settings))
        kept = await asyncio.to_thread(settled, cluster, 1)
        [replica] = kept
        assert set(kept) < set(before)  # rescaled in place: one removed, one kept
        assert not any(task.done() for task in shorts)  # the removed replica's two wait on the kept one, paused
        longs[replica].cancel()  # the kept replica's slot is free for the four now
        resumed = await asyncio.to_thread(httpx.post, cluster.url + "/resume", timeout=120)
        assert resumed.status_code == 200 and resumed.json()["replicas"] == {replica: False}, resumed.text
        results = await asyncio.wait_for(asyncio.gather(*shorts), 240)
    finally:
        for task in [*longs.values(), *shorts]:
            task.cancel()
        await asyncio.gather(*longs.values(), *shorts, return_exceptions=True)
    for result in results:
        assert result["status"] == 200 and result["error"] is None and result["finish_reason"] == "length", result


async def test_a_replica_count_change_rescales_in_place(cluster):
    """config/serve.yaml keeps the replica count in Ray's `deployments:` section: `serve deploy` with a new
    count rescales the running application (a change under `args` would be a new version, replacing
    every replica, the ingress too, and cutting streams). The ingress and the kept engine replica are the
    same replicas before and after, and a stream running through the change finishes."""
    before = deploy(cluster, 2, deployments=[{"name": "RefusionEngine", "num_replicas": 2}])
    ingress = cluster.replicas_settled("RefusionIngress")
    started = asyncio.Event()
    stream = asyncio.create_task(stream_completion(cluster.url, 600, prompt="def rescale(x):", started=started))
    await asyncio.wait_for(started.wait(), 120)
    await asyncio.to_thread(cluster.serve_deploy, cluster.app_config(deployments=[{"name": "RefusionEngine", "num_replicas": 1}]))
    after = await asyncio.to_thread(settled, cluster, 1)
    result = await asyncio.wait_for(stream, 300)
    assert set(after) < set(before), (before, after)  # one of the two kept, none replaced
    assert cluster.replicas_settled("RefusionIngress") == ingress  # the ingress was not restarted
    assert result["status"] == 200 and result["error"] is None and result["finish_reason"] == "length", result


def kill_drain_signal(cluster) -> None:
    """SIGKILL the process of the application's drain signal actor behind `refusion serve`'s back (a
    crash or OOM kill; a node loss took it when it could live on any node)."""
    pids = [pid for node in cluster.nodes for pid in cluster.node_processes(node, "DrainSignal")]
    assert pids, "no drain signal actor process found"
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def serve_on(cluster, config) -> tuple[subprocess.Popen, list[str], threading.Thread]:
    """`refusion serve --address` onto the cluster with `config` on its HTTP port: the process, the lines
    of its output as they come (a reader thread fills them), and that thread."""
    proc = subprocess.Popen([str(BIN / "refusion"), "serve", "--address", cluster.gcs_address, "--config", str(config),
                             "--port", str(cluster.http_port)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    return proc, lines, reader


def test_refusion_serve_address_deploys_onto_the_cluster_and_drains_on_sigterm(cluster):
    config = cluster.write_config(cluster.app_config(num_replicas=2), "cli.yaml")
    if not cluster.serve_proxies():  # run alone: Serve is not up there yet (the tests above leave it up)
        cluster.serve_deploy(cluster.app_config(num_replicas=1))
        wait_for(lambda: cluster.serve_proxies(), 120, "Serve's proxy on the cluster")
    # Serve runs there already: another --port would be ignored by Ray, and "ready at" named a port
    # nothing listened on (helper-144); refused, and Serve there is left running
    other = subprocess.run([str(BIN / "refusion"), "serve", "--address", cluster.gcs_address, "--config", str(config),
                            "--port", str(cluster.http_port + 1)], env=ENV, capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "Serve already runs on this cluster, its proxies on" in other.stderr, \
        other.stderr[-2000:]
    assert f":{cluster.http_port} " in other.stderr and cluster.serve_proxies(), other.stderr[-2000:]
    proc, lines, reader = serve_on(cluster, config)
    try:
        wait_for(lambda: any("ready at" in line for line in lines) or proc.poll() is not None, 300, "refusion serve ready")
        assert proc.poll() is None, "".join(lines)[-2000:]
        placed = settled(cluster, 2)
        assert sorted(placed.values()) == ["head", "node-b"]
        reply = httpx.post(cluster.url + "/v1/completions", timeout=120, json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["finish_reason"] == "length", reply.text
        # The file's proxy_location (HeadOnly) is honoured: one proxy, not one per node
        assert len(cluster.serve_proxies()) == 1, cluster.serve_proxies()
        kill_drain_signal(cluster)  # the drain must still happen (the signal restarts), not fail and cut streams
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    # Ray's log thread prints replicas' lines to the same stdout as a line's text and its newline in two
    # writes, so refusion serve's own line may land after another's text: look for it anywhere in a line
    said = [line for line in lines if "refusion serve:" in line]  # (the tail alone was Ray's log)
    assert any("refusion serve: drained" in line for line in lines), ("".join(said), "".join(lines)[-2000:])


async def test_refusion_serve_drains_the_replicas_up_while_another_waits_for_room(cluster):
    """Three engine replicas of one CPU on two one-CPU nodes: two run and serve, the third waits for room,
    so the application never becomes RUNNING and `refusion serve` is never "ready". A SIGTERM then removed
    the application at once, cutting the streams the two replicas were serving (helper-184, with --replicas
    3 on a 2-CPU machine); now the replicas that answer are drained as after "ready at"."""
    config = cluster.write_config(cluster.app_config(num_replicas=3), "partial.yaml")
    proc, lines, reader = serve_on(cluster, config)
    try:
        await asyncio.to_thread(wait_for, lambda: len(replicas(cluster.url)) == 2 or proc.poll() is not None, 300,
                                "two engine replicas answering /metrics")
        assert proc.poll() is None, "".join(lines)[-2000:]
        started = [asyncio.Event() for _ in range(2)]
        streams = [asyncio.create_task(stream_completion(cluster.url, 200, prompt=f"def busy_{i}(x):", started=e))
                   for i, e in enumerate(started)]
        await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
        app = cluster.serve_application()
        assert app["status"] == "DEPLOYING", app["status"]  # the third replica still has no room
        proc.send_signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*streams), 180)
        for out in results:
            assert out["error"] is None and out["finish_reason"] == "length" and out["chunks"] >= 1, out
        assert await asyncio.to_thread(proc.wait, 180) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    reader.join(timeout=30)
    said = "".join(line for line in lines if "refusion serve:" in line)
    assert "ready at" not in said and "the replicas running serve requests, so they are drained" in said, said
    assert "refusion serve: drained" in said, said


async def test_requests_of_a_dead_ingress_are_cancelled_in_the_engine(cluster):
    """Ray does not end an engine replica's streaming call when the ingress replica that made it dies, so
    its requests would decode to max_tokens for nobody. The engine replica looks its callers up (every
    caller_check_s) and cancels a dead one's requests: the stream's request ends "cancelled", long
    before its LONG tokens, once the ingress replica is killed."""
    config = cluster.app_config(num_replicas=1)
    config["applications"][0]["args"]["caller_check_s"] = 0.2
    await asyncio.to_thread(cluster.serve_deploy, config)
    await asyncio.to_thread(settled, cluster, 1)

    def engine_info() -> dict:
        return json.loads(get_text(cluster.url + "/v1/engine"))

    before = engine_info()["cancelled_caller_died"]
    started = asyncio.Event()
    stream = asyncio.create_task(stream_completion(cluster.url, LONG, prompt="def orphan(x):", started=started))
    await asyncio.wait_for(started.wait(), 120)
    [ingress] = cluster.node_processes("head", "ServeReplica:refusion:RefusionIngress")
    os.kill(ingress, signal.SIGKILL)
    try:
        cut = await asyncio.wait_for(stream, 120)
    except httpx.HTTPError:  # the connection went with the ingress
        cut = None
    assert cut is None or cut["finish_reason"] != "length", cut  # it did not run to its end meanwhile

    def orphan_cancelled():  # the replacement ingress answers again; the engine holds no request
        info = engine_info()
        return info["cancelled_caller_died"] > before and info["engine"]["running"] == 0 and info

    info = await asyncio.to_thread(wait_for, orphan_cancelled, 180, "the dead ingress's request cancelled in the engine")
    assert info["cancelled_caller_died"] == before + 1


async def test_node_loss_gives_typed_errors_and_the_service_keeps_answering(cluster):
    placed = deploy(cluster, 2, num_replicas=2)
    by_node = {node: replica for replica, node in placed.items()}
    live = sorted(placed)
    doomed = conversations_on(by_node["node-b"], live, 2)
    safe = conversations_on(by_node["head"], live, 1)
    started = [asyncio.Event() for _ in doomed]
    tasks = [asyncio.create_task(stream_completion(cluster.url, LONG, messages=m, started=e)) for m, e in zip(doomed, started)]
    tasks += [asyncio.create_task(stream_completion(cluster.url, 300, messages=m)) for m in safe]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in started)), 120)
    replica_pids = cluster.node_processes("node-b", "ServeReplica:refusion:RefusionEngine")
    assert replica_pids, "node-b runs no engine replica process"
    for pid in replica_pids:  # frozen first: its streams cannot finish before the node goes
        os.kill(pid, signal.SIGSTOP)
    assert not any(t.done() for t in tasks[: len(doomed)])
    cluster.stop_node("node-b")
    results = await asyncio.wait_for(asyncio.gather(*tasks), 180)
    for cut in results[: len(doomed)]:
        assert cut["error"] is not None and cut["error"]["code"] == "engine_unavailable", cut
    assert results[-1]["error"] is None and results[-1]["finish_reason"] == "length", results[-1]
    after = httpx.post(cluster.url + "/v1/completions", timeout=120, json={"prompt": "def f(x):", "max_tokens": 8, "temperature": 0})
    assert after.status_code == 200, after.text
    assert set(replicas(cluster.url).values()) == {"head"}

"""The engine router's choice rules (integrations/serve_router.py) and the conversation key: pure
functions, no Ray cluster (tests/cluster routes real requests through real replicas)."""

from __future__ import annotations

from collections import Counter

from integrations.chat import conversation_key
from integrations.openai_models import ChatMessage
from integrations.serve_router import affinity_key, is_imbalanced, rendezvous_order
from scheduler.api import GenerationRequest

REPLICAS = ["a1b2c3d4", "e5f6g7h8", "i9j0k1l2"]


def _req(prompt_ids, key=None) -> GenerationRequest:
    return GenerationRequest(request_id="r", prompt_ids=list(prompt_ids), affinity_key=key)


def test_same_key_same_replica_in_any_process_order():
    key = affinity_key(_req([1, 2, 3], key="editor:file:///src/app.py"), 256)
    first = rendezvous_order(key, REPLICAS)[0]
    assert rendezvous_order(key, list(reversed(REPLICAS)))[0] == first
    assert rendezvous_order(key, sorted(REPLICAS))[0] == first


def test_removing_another_replica_keeps_a_keys_replica():
    moved = 0
    for i in range(200):
        key = f"k{i}".encode()
        preferred = rendezvous_order(key, REPLICAS)[0]
        others = [r for r in REPLICAS if r != preferred]
        for gone in others:
            left = [r for r in REPLICAS if r != gone]
            moved += rendezvous_order(key, left)[0] != preferred
    assert moved == 0


def test_keys_spread_over_replicas():
    counts = Counter(rendezvous_order(f"doc{i}".encode(), REPLICAS)[0] for i in range(600))
    assert set(counts) == set(REPLICAS)
    assert min(counts.values()) > 600 / len(REPLICAS) * 0.7


def test_key_falls_back_to_the_prompt_head():
    head = list(range(100, 356))
    assert affinity_key(_req(head + [1, 2]), 256) == affinity_key(_req(head + [9, 9, 9]), 256)
    assert affinity_key(_req(head[:10] + [1]), 256) != affinity_key(_req(head[:10] + [2]), 256)
    assert affinity_key(_req(head, key="editor:a.py"), 256) == affinity_key(_req([7], key="editor:a.py"), 256)
    assert affinity_key(_req(head, key="editor:a.py"), 256) != affinity_key(_req(head, key="editor:b.py"), 256)


def test_imbalance_threshold():
    assert not is_imbalanced(10, [3, 4], 8)
    assert is_imbalanced(12, [3, 9], 8)
    assert not is_imbalanced(None, [0], 8)  # unknown preferred load: keep affinity
    assert not is_imbalanced(50, [None, None], 8)  # nothing known to compare with


def test_conversation_key_is_stable_over_turns_and_tells_conversations_apart():
    system = ChatMessage(role="system", content="You write Python.")
    ask = ChatMessage(role="user", content="Write is_prime(n).")
    turn1 = [system, ask]
    turn3 = turn1 + [ChatMessage(role="assistant", content="def is_prime(n): ..."),
                     ChatMessage(role="user", content="Now add a docstring.")]
    other = [system, ChatMessage(role="user", content="Write fib(n).")]
    assert conversation_key(turn1) == conversation_key(turn3)
    assert conversation_key(turn1) != conversation_key(other)
    assert conversation_key(turn1).startswith("chat:")


# --- Routing a burst through Ray Serve's own routing loop -------------------------------------------
# Ray's RequestRouter routes queued requests in a loop that does not yield between them, and its
# queue-length cache grows only when a routed caller resumes and sends (Router._route_and_send_request_
# once: `_choose_replica_for_request`, then `on_send_request`). These tests drive that real loop with
# Ray's in-memory replica stand-in and a caller that does exactly those two steps.
# The router reads the time from a clock the test owns (`clock`, frozen unless a test moves it): its
# unsent choices count for UNSENT_TTL_S of that clock, and on the wall clock a burst routed by a
# nice-19 xdist worker on a loaded 2-core machine can take longer than that (one stall of just over
# 1 s part-way through a burst sent most of it to one replica), so no test depends on the machine's speed.

import asyncio  # noqa: E402

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata  # noqa: E402
from ray.serve._private.test_utils import FakeRunningReplica  # noqa: E402
from ray.serve.request_router import PendingRequest  # noqa: E402

from integrations.serve_router import UNSENT_TTL_S, EngineRouter  # noqa: E402


def _router(queue_lens: dict[str, int], policy: str = "prefix_affinity", clock=None) -> tuple[EngineRouter, dict]:
    """A router on stand-in replicas reporting `queue_lens`; `clock` (seconds): the router's time and Ray's
    cache's, frozen at 1000.0 unless given."""
    router = EngineRouter(deployment_id=DeploymentID(name="engine", app_name="refusion"),
                          handle_source=DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True,
                          get_curr_time_s=clock or (lambda: 1000.0))
    router.initialize_state(policy=policy, prefix_tokens=256, imbalanced_threshold=2.0)
    replicas = {}
    for name, queue_len in queue_lens.items():
        replica = FakeRunningReplica(name, max_ongoing_requests=64)
        replica.set_queue_len_response(queue_len)
        replicas[name] = replica
    router.update_replicas(list(replicas.values()))
    return router, replicas


async def _route_burst(router: EngineRouter, requests: list[GenerationRequest]) -> Counter:
    async def send(i: int, req: GenerationRequest) -> str:
        pending = PendingRequest(args=[req], kwargs={}, metadata=RequestMetadata(request_id=f"r{i}",
                                                                                 internal_request_id=f"i{i}"))
        replica = await router._choose_replica_for_request(pending)
        router.on_send_request(replica.replica_id)
        return replica.replica_id.unique_id

    return Counter(await asyncio.gather(*(send(i, req) for i, req in enumerate(requests))))


async def test_a_burst_on_one_prompt_head_spreads_once_the_guard_trips():
    router, _ = _router({"old": 0, "new": 0})
    burst = [_req(list(range(300)) + [i]) for i in range(12)]  # one shared head, one affinity key
    counts = await _route_burst(router, burst)
    assert sum(counts.values()) == 12
    assert max(counts.values()) - min(counts.values(), default=0) <= 3, counts
    assert len(counts) == 2, counts


async def test_a_burst_after_scale_up_fills_the_new_replica_only_up_to_the_old_ones_load():
    router, _ = _router({"old": 10, "new": 0})
    counts = await _route_burst(router, [_req([i, 7, 7], key=f"doc{i}") for i in range(20)])
    # 30 requests in all, 15 each when even: the new replica must not take the whole burst.
    assert counts["new"] <= 15 + 2, counts


async def test_power_of_two_policy_also_counts_requests_routed_in_the_same_burst():
    router, _ = _router({"old": 10, "new": 0}, policy="power_of_two")
    counts = await _route_burst(router, [_req([i]) for i in range(20)])
    assert counts["new"] <= 15 + 2, counts


async def test_a_choice_never_sent_stops_counting_after_the_ttl():
    now = [1000.0]
    router, _ = _router({"x": 0, "y": 0}, clock=lambda: now[0])
    req = _req([1, 2, 3], key="editor:file:///a.py")

    async def first_choice() -> list[str]:
        groups = await router.choose_replicas(router._replicas_list, PendingRequest(
            args=[req], kwargs={}, metadata=RequestMetadata(request_id="r", internal_request_id="i")))
        return [r.replica_id.unique_id for r in groups[0]]

    preferred = (await first_choice())[0]
    for _ in range(2):  # chosen three times in all, none of them sent (e.g. cancelled before sending)
        assert await first_choice() == [preferred]
    assert preferred not in await first_choice()  # 3 unsent above the other's 0: the guard trips
    now[0] += UNSENT_TTL_S + 0.5
    # Forgotten, every one (the other replica's one unsent choice too): affinity again, three times over as
    # at the start. (One choice alone passed with the unsent choices never expiring: 3 against the other's
    # 1 is within the guard's 2.)
    for _ in range(3):
        assert await first_choice() == [preferred]


async def test_a_moved_request_goes_to_the_replica_it_was_released_to_first():
    """Queue rebalancing (integrations/serve_rebalance.py) sends a released request again with
    `prefer=`: that replica first, whatever its key prefers; the others after it (Ray tries them when
    it refuses); a preferred replica that is gone leaves the usual choice."""
    router, _ = _router({"x": 0, "y": 0})
    req = _req([1, 2, 3], key="editor:file:///a.py")

    async def groups(**kwargs) -> list[list[str]]:
        chosen = await router.choose_replicas(router._replicas_list, PendingRequest(
            args=[req], kwargs=kwargs, metadata=RequestMetadata(request_id="r", internal_request_id="i")))
        return [[r.replica_id.unique_id for r in group] for group in chosen]

    usual = (await groups())[0][0]
    other = "y" if usual == "x" else "x"
    assert await groups(prefer=other) == [[other], [usual]]
    assert (await groups(prefer="gone"))[0] == [usual]
    assert router._decisions["moved"] == 1


async def test_every_choice_tells_ray_to_back_off_before_retrying():
    """A chosen replica can refuse (full) or be gone by the time Ray sends; Ray then retries at once
    unless the request's routing context says to back off, a busy loop. The affinity, `replica=` and
    `prefer=` paths all set it (on the power-of-two path Ray's locality step decides it again)."""
    router, _ = _router({"x": 0, "y": 0})
    req = _req([1, 2, 3], key="editor:file:///a.py")
    for kwargs in ({}, {"replica": "x"}, {"prefer": "y"}, {"replica": "gone"}):
        pending = PendingRequest(args=[req], kwargs=kwargs,
                                 metadata=RequestMetadata(request_id="r", internal_request_id="i"))
        assert pending.routing_context.should_backoff is False
        await router.choose_replicas(router._replicas_list, pending)
        assert pending.routing_context.should_backoff is True, kwargs


async def test_a_sent_choice_stops_counting_at_once_oldest_first():
    """When the caller sends (on_send_request), Ray's cache counts the request, so the router's own count
    of that replica's unsent choices drops by one at once, not after the TTL (counted twice otherwise),
    and the one dropped is the oldest: the newer choice still counts after the older one's TTL ends."""
    now = [1000.0]
    router, replicas = _router({"x": 0}, clock=lambda: now[0])
    replica = replicas["x"]
    router._note_chosen(replica)
    router.on_send_request(replica.replica_id)
    assert router._unsent_count(replica.replica_id) == 0  # the clock has not moved: sent, not expired
    router._note_chosen(replica)
    now[0] += 0.8
    router._note_chosen(replica)
    router.on_send_request(replica.replica_id)
    assert router._unsent_count(replica.replica_id) == 1
    now[0] += 0.7  # past the first choice's TTL, within the second's
    assert router._unsent_count(replica.replica_id) == 1

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

"""Prefix-affinity request routing for the engine deployment, through Ray Serve's request-router API.

Ray Serve's default router (power of two choices) sends each call to the less loaded of two random
replicas, so an editor's keystrokes on one file and an agent's turns of one conversation land on
different replicas, and each replica prefills the same long prompt again. `EngineRouter` sends
requests with the same affinity key to the same replica, whose prefix cache already holds the prompt:

    key        = GenerationRequest.affinity_key (editor: the document URI; chat: the conversation's
                 first turn), else the first `prefix_tokens` prompt ids (a file's head, a system prompt)
    preferred  = argmax over live replicas r of blake2b(key | r)          (rendezvous hashing)
    load guard = if the preferred replica's ongoing requests exceed the least loaded replica's by more
                 than `imbalanced_threshold`, power of two choices decides instead
    spill      = a preferred replica that refuses (max_ongoing_requests reached) passes the request to
                 the least loaded of the others
    load       = Ray's cached ongoing-request count of a replica plus the requests this router has chosen
                 it for whose callers have not sent yet

The second term matters for bursts. Ray's routing loop routes every queued request in one pass without
yielding, and its cache grows only when a routed caller resumes and sends (`on_send_request`), so
without it every decision of a burst reads the same counts: a burst sharing one prompt head went to one
replica past the guard, and a burst after a scale-up (or through power of two choices) all went to the
new, idle replica. A choice is counted until its caller sends to that replica, or for
`UNSENT_TTL_S` at most (a choice refused by a full replica and sent elsewhere, or cancelled before it
was sent, is forgotten then).

Rendezvous hashing needs no shared state: every process holding a handle (each ingress replica, the
proxy) maps a key to the same engine replica without a lookup actor, and adding or removing a replica
moves only the keys that replica wins or held. Calls with a `replica=` keyword (the service-wide
/metrics fan-out, integrations/service_metrics.py; queue rebalancing's load and release calls) go to
exactly that replica; a call with `prefer=` (a request moved by queue rebalancing,
integrations/serve_rebalance.py) goes to that replica first, and past it (gone, or full) to the others.

policy "power_of_two" is Ray Serve's default behaviour (with bursts counted as above), kept so the two
can be compared in one run (bench/cluster_editor.py). docs/cluster.md says why this is not ray.serve.llm.PrefixCacheAffinityRouter.

Configured by ServeConfig.engine_deployment.router (config/serve.yaml); Ray Serve calls
`initialize_state(**request_router_kwargs)` once per handle.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import Counter, deque
from typing import Optional

from ray.serve.request_router import LocalityMixin, MultiplexMixin, PendingRequest, RequestRouter, RunningReplica

from integrations import routing_state
from scheduler.api import GenerationRequest

ROUTER_CLASS = "integrations.serve_router.EngineRouter"
POLICIES = ("prefix_affinity", "power_of_two")
UNSENT_TTL_S = 1.0  # seconds a choice counts toward its replica's load if its caller never sends there

def affinity_key(req: GenerationRequest, prefix_tokens: int) -> bytes:
    """The bytes requests are grouped by: the request's affinity_key, else its first prompt ids."""
    if req.affinity_key:
        return b"k:" + req.affinity_key.encode()
    return b"p:" + array("q", req.prompt_ids[:prefix_tokens]).tobytes()


def rendezvous_order(key: bytes, replica_ids: list[str]) -> list[str]:
    """`replica_ids` sorted by preference for `key`, best first (highest-random-weight hashing with
    blake2b, so every process agrees; Python's hash() is salted per process)."""

    def weight(replica_id: str) -> bytes:
        return hashlib.blake2b(key + b"|" + replica_id.encode(), digest_size=8).digest()

    return sorted(replica_ids, key=weight, reverse=True)


def is_imbalanced(preferred_len: int | None, lens: list[int | None], threshold: float) -> bool:
    """True when the preferred replica's ongoing requests exceed the least loaded known replica's by
    more than `threshold`. Unknown lengths (None) never trigger the fallback."""
    known = [n for n in lens if n is not None]
    return preferred_len is not None and bool(known) and preferred_len - min(known) > threshold


class EngineRouter(LocalityMixin, MultiplexMixin, RequestRouter):
    """Ray Serve request router of the engine deployment (module docstring). No FIFOMixin: a replica
    chosen for a request serves that request, not whichever one waited longest."""

    def initialize_state(self, policy: str = "prefix_affinity", prefix_tokens: int = 256,
                         imbalanced_threshold: float = 2.0) -> None:
        """Ray Serve passes `request_router_kwargs` here. Raises ValueError for an unknown policy."""
        if policy not in POLICIES:
            raise ValueError(f"router.policy: {policy!r} is not one of {POLICIES}")
        self.policy, self.prefix_tokens, self.imbalanced_threshold = policy, prefix_tokens, imbalanced_threshold
        self._where = (self._deployment_id.app_name, self._deployment_id.name)
        self._decisions = routing_state.DECISIONS.setdefault(self._where, Counter())
        self._unsent: dict = {}  # ReplicaID -> deque of the times (Ray's clock, s) it was chosen, not yet sent

    def on_send_request(self, replica_id) -> None:
        """Ray's Router calls this when a routed caller sends: its cache now counts the request, so
        the oldest choice of that replica stops counting here."""
        super().on_send_request(replica_id)
        times = self._unsent.get(replica_id)
        if times:
            times.popleft()

    def _note_chosen(self, replica: RunningReplica) -> None:
        self._unsent.setdefault(replica.replica_id, deque()).append(self._get_curr_time_s())

    def _unsent_count(self, replica_id) -> int:
        times = self._unsent.get(replica_id)
        if not times:
            return 0
        oldest = self._get_curr_time_s() - UNSENT_TTL_S
        while times and times[0] < oldest:
            times.popleft()
        return len(times)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        self._publish()

    def on_replica_actor_died(self, replica_id) -> None:
        """Ray's router drops a dead replica before the controller's next update; so does /metrics."""
        super().on_replica_actor_died(replica_id)
        self._publish()

    def _publish(self) -> None:
        routing_state.LIVE_REPLICAS[self._where] = tuple(sorted(r.unique_id for r in self.curr_replicas))
        for gone in set(self._unsent) - set(self.curr_replicas):
            del self._unsent[gone]

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: Optional[PendingRequest] = None) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is not None:
            # Ray Serve retries a refused choice at once unless told to back off (its locality step sets
            # this too); without it a full or vanished target would be retried in a busy loop.
            pending_request.routing_context.should_backoff = True
        kwargs = pending_request.kwargs if pending_request is not None else {}
        target, preferred = kwargs.get("replica"), kwargs.get("prefer")
        if preferred is not None:  # moved by queue rebalancing (serve_rebalance.py): there first, else as usual
            first = [r for r in candidate_replicas if r.replica_id.unique_id == preferred]
            if first:
                self._decisions["moved"] += 1
                self._note_chosen(first[0])
                return [first, [r for r in candidate_replicas if r is not first[0]]]
        if target is not None:
            self._decisions["targeted"] += 1
            chosen = [r for r in candidate_replicas if r.replica_id.unique_id == target]
            for r in chosen:
                self._note_chosen(r)
            return [chosen]
        req = _generation_request(pending_request)
        if self.policy != "prefix_affinity" or req is None:
            self._decisions["power_of_two"] += 1
            return await self._two_choices(candidate_replicas, pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        ranked = [by_id[i] for i in rendezvous_order(affinity_key(req, self.prefix_tokens), list(by_id))]
        if len(ranked) > 1:
            loads = await self._loads(ranked)
            if is_imbalanced(loads[0], loads[1:], self.imbalanced_threshold):
                self._decisions["fallback_imbalanced"] += 1
                return await self._two_choices(candidate_replicas, pending_request)
        self._decisions["affinity"] += 1
        self._note_chosen(ranked[0])
        return [[ranked[0]], ranked[1:]]

    async def _loads(self, replicas: list[RunningReplica]) -> list[int | None]:
        """Each replica's load (module docstring), None where it is unknown. Replicas missing from
        Ray's cache are asked first (one short RPC each, as Ray's own routers do), filling the cache."""
        cache = self.replica_queue_len_cache
        lens = {r.replica_id: cache.get(r.replica_id) for r in replicas}
        missing = [r for r in replicas if lens[r.replica_id] is None]
        if missing:
            for r, queue_len in await self._probe_queue_lens(missing, 0):
                lens[r.replica_id] = queue_len
        return [None if lens[r.replica_id] is None else lens[r.replica_id] + self._unsent_count(r.replica_id)
                for r in replicas]

    async def _two_choices(self, candidates: list[RunningReplica],
                           pending_request: Optional[PendingRequest]) -> list[list[RunningReplica]]:
        """Ray Serve's default: two random replicas (same node first), the less loaded one wins,
        by the load above. When a load is unknown (the replica did not answer), Ray chooses between
        the two as it does by default."""
        local = self.apply_locality_routing(pending_request) if pending_request is not None else None
        pool = [self._replicas[i] for i in local if i in self._replicas] if local else candidates
        pair = random.sample(pool, min(2, len(pool)))
        loads = await self._loads(pair)
        if None in loads:
            return [pair]
        if len(pair) == 2 and loads[1] < loads[0]:
            pair.reverse()
        self._note_chosen(pair[0])
        return [[r] for r in pair]


def _generation_request(pending_request: Optional[PendingRequest]) -> GenerationRequest | None:
    if pending_request is None:
        return None
    return next((a for a in pending_request.args if isinstance(a, GenerationRequest)), None)

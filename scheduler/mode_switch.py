"""Switching a running AUTO request between ReFusion and AR at a block boundary.

At a boundary no slot, branch or tentative KV is in flight, so the decoder's `handoff()` (text so far,
how much of it is cached) is all the other decoder needs. On the same runner the KV stays where it is;
moving to a separate AR model frees the old sequence and the new decoder prefills the text there.
"""

from __future__ import annotations

import dataclasses

from scheduler.api import Mode
from scheduler.request import Request


def switch_due(scheduler, req: Request) -> bool:
    """Whether `req` is re-routed now (maybe_switch asks the router): AUTO, switching allowed, not a
    preempted rerun still retracing the ids it sent (`replay_ids`: it runs in its first run's last
    mode until it has made them; then it is re-routed as any other), at a block boundary at least
    switch_interval_tokens after its last routing."""
    cfg = scheduler.config.routing
    if req.spec.mode is not Mode.AUTO or not cfg.allow_switch or req.finished or req.decoder.finished:
        return False
    if req.replay_ids:  # (scheduler/replay.py checks them against this mode's ids)
        return False
    generated = req.generated_tokens()
    return generated - req.tokens_at_last_route >= cfg.switch_interval_tokens and req.decoder.at_block_boundary()


def switch_may_follow(scheduler, req: Request) -> bool:
    """Whether `req` may be due for re-routing (switch_due) right after its step in flight is absorbed:
    AUTO, switching allowed, not a preempted rerun still retracing, at least switch_interval_tokens past
    its last routing with that step's token, and that token brings it to a block boundary (the decoder's
    `boundary_after_step`; a decoder without it: always may). Scheduler.plan_ahead plans no step ahead
    for such a request: a step in flight keeps a decoder off its boundary, so the switch would never come."""
    cfg = scheduler.config.routing
    if req.spec.mode is not Mode.AUTO or not cfg.allow_switch or req.replay_ids:
        return False
    if req.generated_tokens() + 1 - req.tokens_at_last_route < cfg.switch_interval_tokens:
        return False
    boundary = getattr(req.decoder, "boundary_after_step", None)
    return boundary is None or boundary()


def maybe_switch(scheduler, req: Request) -> bool:
    """Re-route `req` if it is AUTO, at a block boundary, and the router now prefers the other mode
    (on a separate AR model, only when that model's pool has room for it: KVOwner.available). Returns
    True when the request changed mode."""
    if not switch_due(scheduler, req):
        return False
    generated = req.generated_tokens()
    req.tokens_at_last_route = generated
    # Weighed with the other AUTO requests of its decoder and class: they decide alike at their own block
    # boundaries. Weighed alone against them staying put, each one moved and the whole batch with it:
    # 31 of 32 AR requests switched to ReFusion within a few steps, and back 32 tokens later.
    herd = [r for r in scheduler.running if r is not req and r.mode is req.mode and r.spec.mode is Mode.AUTO
            and not r.replay_ids and r.priority is req.priority and not r.finished]
    load = scheduler.load_snapshot(exclude=req, together=herd)
    decision = scheduler.router.decide(Mode.AUTO, req.priority, load, current=req.mode)
    if decision.mode is req.mode:
        return False
    new_key = scheduler.kv.runner_for(req, decision.mode is Mode.AR)
    if new_key != req.runner_key and scheduler.kv.available(scheduler.running, new_key) < req.kv_blocks:
        # The other model's pool cannot hold it beside what its running requests were promised: moved
        # anyway, it overcommitted that pool and one of them failed with "KV cache full" (helper-170;
        # then a request that switched mode was never preempted). It stays where its blocks are.
        return False
    handoff = req.decoder.handoff()
    if new_key != req.runner_key:
        scheduler.kv.free(req)  # the other model has none of this KV
        handoff = dataclasses.replace(handoff, cached_len=0, suffix_cached_len=0)
    factory = scheduler.factories[new_key]
    req.decoder = factory.from_handoff(decision.mode, req.id, handoff, req.params)
    req.mode, req.runner_key = decision.mode, new_key
    req.mode_history.append(decision.mode.value)
    scheduler.record_decision(req, decision, "mode_switch", generated_tokens=generated)
    return True

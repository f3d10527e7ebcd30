"""A preempted request's rerun retracing the text it already streamed.

A preempted request restarts from scratch (Scheduler.requeue) and its stream resumes where it stopped:
the rerun's first tokens are assumed to be the ones already sent. Its random draws are the same (they
depend on its seed, step and position only: workers/reads.py), but its logits are not bit-identical
beside other requests (a step's other sequences change a read by ~1e-7 on the CPU, more in bf16 on a
GPU), so at a near-tie the rerun can choose another token; its stream then continued from the rerun's
text at the old index, and the client got text neither run wrote (helper-170).

So the ids the stream had taken when the request was preempted (`Request.replay_ids`) are checked
against the rerun's as it makes them (`replay_diverged`). While they agree nothing changes: the rerun
is the unpreempted run, and its text equals a run never preempted. Where they part, the rerun's
decoder is replaced by one continuing the sent ids (`retrace`: the rerun's KV cut back to the prompt
and suffix, the sent ids fed after them), so the text goes on from what the client has; vLLM's
recompute preemption prefills prompt + output the same way. An AR continuation is then the run never
preempted (it reads each token after the last as that run did); a ReFusion one may not be, as its
committed tokens' KV was computed beside the drafts of their verify and is prefilled clean here.
A request that switched mode (scheduler/mode_switch.py) reruns in its last mode, which as a rule parts
from the ids its other mode made at once: it continues the sent ids in that mode.
"""

from __future__ import annotations

import structlog

from decoding.api import Handoff
from scheduler.api import Mode
from scheduler.request import Request

log = structlog.get_logger("scheduler")


def replay_diverged(req: Request) -> bool:
    """Whether `req`'s rerun made ids other than the ones it streamed before its preemption, or ended
    before making them all. Clears `req.replay_ids` once the rerun has made them all (nothing to check
    after that)."""
    replay, ids = req.replay_ids, req.stream_ids()
    shared = min(len(ids), len(replay))
    if ids[:shared] != replay[:shared] or (len(ids) < len(replay) and req.decoder.finished):
        return True
    if len(ids) >= len(replay):
        req.replay_ids = []
    return False


def retrace(scheduler, req: Request) -> None:
    """Give `req` a decoder that continues the ids it streamed before its preemption, in its mode on its
    runner (the factory's `resume`): its sequence's KV is cut back to its context (prompt and infill
    suffix, which the cache holds first), the streamed ids are fed again after it, and AR reads the next
    token after them as the first run did. Its stats (the step counter its random draws use) carry
    over, and ReFusion's block boundaries stay where they were (Handoff.block_done). A ReFusion span
    left that is no whole number of slots (it cannot happen: ReFusion streams whole slots) runs AR. A
    grammar request's matcher is rebuilt and fed the streamed ids, and so is a healed prompt's
    constraint (decoding.healing) on the AR path."""
    replay, decoder = req.replay_ids, req.decoder
    prompt, suffix = list(req.spec.prompt_ids), list(req.spec.suffix_ids or [])
    scheduler.kv.tables[req.runner_key].truncate(req.id, len(prompt) + len(suffix))
    logprobs = req.logprobs[: len(replay)] if req.top_logprobs is not None else []
    block_length = int(getattr(req.params, "block_length", 1) or 1)
    handoff = Handoff(prompt, list(replay), cached_len=len(prompt), remaining=int(req.params.gen_length) - len(replay),
                      stats=decoder.stats, suffix_ids=suffix, suffix_cached_len=len(suffix),
                      generated_logprobs=logprobs, block_done=len(replay) % block_length)
    mode = req.mode
    if mode is Mode.REFUSION and handoff.remaining % int(req.params.slot_size):
        mode = Mode.AR
    constraints = {}
    if req.grammar is not None:
        constraint = constraints["constraint"] = req.grammar.constraint()
        for token in replay[len(constraint.initial_forced):]:
            constraint.consume(token)
    if req.healing is not None and mode is Mode.AR:
        healing = constraints["healing"] = req.healing.constraint()
        for token in replay:
            healing.consume(token)
    factory = scheduler.factories[req.runner_key]
    req.decoder = factory.resume(mode, req.id, handoff, req.params, **constraints)
    if mode is not req.mode:
        req.mode_history.append(mode.value)
    req.mode, req.replay_ids, req.pending_segment = mode, [], None  # (a segment the old decoder stated goes too)
    log.info("retraced", request_id=req.id, sent=len(replay), mode=mode.value)

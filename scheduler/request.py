"""The engine's one request object and its one status enum."""

from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

from scheduler.api import Delta, FinishReason, GenerationRequest, Mode, Priority
from scheduler.detokenizer import TextStream


class RequestStatus(Enum):
    """WAITING (queued, no KV) -> RUNNING (has a decoder and KV) -> FINISHED (KV freed, stream closed)."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """One request inside the engine: the caller's GenerationRequest plus scheduling and output state.

    order: arrival number; FCFS within a priority class.
    kv_blocks: most KV blocks this request can hold at once (admission estimate).
    mode: the mode serving it now (REFUSION or AR), set when it starts running.
    runner_key: which runner holds its KV ("main", or "ar" for a separate AR model).
    in_flight: launched steps holding a segment of it whose results are not collected yet (0, 1, or 2 under
        asynchronous scheduling); its KV must not be freed before they are.
    skipped: steps in a row it was passed over (budget spent, or its unsplittable step did not fit);
        the most-skipped go first within their priority class, so no running request starves.
    passed_over: later requests that started while it waited; with `skipped`, what ages it into the
        first class (rank_class). Never reset: a request aged while waiting keeps the rank to its end.
    overtook: it started while an earlier request of its class waited for KV (scheduler backfilling).
    kv_wait: (runner key, blocks short) when it last failed to start for lack of KV; else None.
    """

    spec: GenerationRequest
    params: Any
    kv_blocks: int
    stream: TextStream
    order: int = 0
    status: RequestStatus = RequestStatus.WAITING
    mode: Mode | None = None
    runner_key: str = "main"
    decoder: Any = None
    in_flight: int = 0
    skipped: int = 0
    grammar_waits: int = 0  # steps in a row it sat out for the step's grammar time (Scheduler._grammar_turns)
    queued_turn: int = 0  # requests started before it was queued (the fair share's clock: Scheduler._fair_order)
    passed_over: int = 0
    aged_after: int = 0  # EngineConfig.aging_after (0: never aged)
    finish_reason: FinishReason | None = None
    outbox: asyncio.Queue = field(default_factory=asyncio.Queue)
    final_sent: bool = False  # its last delta (finished=True) is in the outbox
    arrival_s: float = field(default_factory=time.monotonic)
    started_s: float = 0.0
    first_token_s: float = 0.0
    last_token_s: float = 0.0
    finished_s: float = 0.0
    cached_prompt_tokens: int = 0  # prompt tokens served by the prefix cache at start
    prompt_blocks_shared: int = 0  # full prompt blocks offered to the prefix cache so far
    mode_history: list[str] = field(default_factory=list)
    tokens_at_last_route: int = 0
    host_s: float = 0.0  # engine-thread CPU seconds spent on it in the current step (routing.HostCost)
    pinned_mode: Mode | None = None  # set when preempted: the rerun keeps the mode it had
    kv_fit_ar: bool = False  # an AUTO request the KV cache holds only as AR (Submission.fitted): spec.mode is AR
    tokens_before_requeue: int = 0  # generated ids when last preempted (its rerun makes them again)
    # the ids its stream had taken when last preempted, until its rerun has made them all (scheduler/replay.py)
    replay_ids: list[int] = field(default_factory=list)
    overtook: bool = False
    kv_wait: tuple[str, int] | None = None
    start_reported: bool = False  # a delta carried cached_prompt_tokens (see delta())
    prefix_wait: str | None = None  # the running request whose prompt prefill it waits for (Scheduler._try_start)
    prefix_waits: int = 0  # steps it spent waiting so (final stats)
    preemptions: int = 0
    pending_segment: Any = None  # stated by the decoder but not run yet (did not fit the budget)
    grammar: Any = None  # decoding.grammar.Grammar of a structured-output request (AR only); else None
    healing: Any = None  # decoding.healing.Healing of a healed prompt (constrains AR; starts AUTO in AR); else None
    error: str | None = None
    error_field: str | None = None  # the request field that caused `error` (scheduler.api.Delta.error_field)
    # params.logprobs set: TokenLogprob of every id handed to `stream` so far (kept here, not read back
    # from the decoder, because a preempted request's held-back ids outlive the decoder that made them)
    logprobs: list = field(default_factory=list)
    # params.prompt_logprobs set: the prompt's TokenLogprob entries (tokens 1 .. P-1) once scored, kept
    # here (a preempted rerun scores again but they are sent once); prompt_scores_sent: a delta carried them
    prompt_logprobs: list | None = None
    prompt_scores_sent: bool = False
    eos_logprob: Any = None  # set when it finishes on EOS with logprobs asked (scheduler.api.Delta.eos_logprob)

    @property
    def id(self) -> str:
        return self.spec.request_id

    @property
    def priority(self) -> Priority:
        return self.spec.priority

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def top_logprobs(self) -> int | None:
        """Alternatives per token when the request asks for log probabilities (params.logprobs), else None."""
        return getattr(self.params, "logprobs", None)

    @property
    def scores_prompt(self) -> bool:
        """The request asks for its prompt's log probabilities (params.prompt_logprobs): every prompt row
        is computed, so it neither starts on the prefix cache nor counts in its hit rate."""
        return getattr(self.params, "prompt_logprobs", None) is not None

    @property
    def deadline_s(self) -> float | None:
        """Monotonic time of max_time_ms, counted from submit."""
        if self.spec.max_time_ms is None:
            return None
        return self.arrival_s + self.spec.max_time_ms / 1000.0

    @cached_property
    def route_key(self) -> int:
        """A 64-bit digest of everything that decides this request's text: prompt and suffix ids, the
        parsed decoding parameters (the seed included, a drawn one when the client sent none; left out
        when greedy, which reads no random numbers; logprobs left out: they report on the tokens, they do
        not choose them, prompt_logprobs likewise), max_tokens, stop strings and the healed blanks (their
        mask chooses the first tokens: decoding/healing.py; "def " and "def" share prompt ids). Identical requests
        share it; the router's exploration uses it (Router.decide) so that a repeated seeded or greedy
        request is routed alike."""
        spec = self.spec
        params = dict(vars(self.params))
        params.pop("logprobs", None)  # what is reported about the tokens, not what they are
        params.pop("prompt_logprobs", None)
        if params.get("temperature") == 0.0:
            params["seed"] = 0  # greedy reads no random numbers: a drawn seed must not change the key
        text = repr((spec.prompt_ids, spec.suffix_ids, sorted(params.items()), spec.max_tokens, spec.stop, spec.healed))
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")

    def sort_key(self) -> tuple:
        """Scheduling order: priority class, then the most-skipped, then FCFS (by `arrival_s`, which a
        request moved from another replica backdates to its first arrival; then arrival order)."""
        return (int(self.priority), -self.skipped, self.arrival_s, self.order)

    @property
    def rank_class(self) -> Priority:
        """The class it is ranked with: its own, or the first once passed over `aged_after` times (aging:
        running, `skipped` steps in a row; waiting, `passed_over` later requests that started first),
        so a BATCH request still gets a share of slots, KV and the token budget under a steady
        INTERACTIVE stream; an aged request is no preemption victim (scheduler._preempt_for). KV
        victims go by sort_key (`priority`)."""
        aged = self.aged_after and max(self.skipped, self.passed_over) >= self.aged_after
        return Priority.INTERACTIVE if aged else self.priority

    def rank_key(self) -> tuple:
        """Admission and step-planning order: rank_class, then the most-skipped, then FCFS (as sort_key)."""
        return (int(self.rank_class), -self.skipped, self.arrival_s, self.order)

    def stream_ids(self) -> list[int]:
        """Final generated ids so far (a decoder built from a handoff includes the handed-off text)."""
        return self.decoder.stream_ids() if self.decoder is not None else []

    def generated_tokens(self) -> int:
        """Tokens generated so far, at most max_tokens: what the stream returns (a grammar's forced run,
        appended without a forward, or a ReFusion slot may run past the cap, which the stream cuts;
        counted whole, stats and metrics said 12 tokens for a request of max_tokens 4). Once it has
        finished, the ids its stream sent: ReFusion's committed slots past a stop string, a deadline's
        cut or its stream's gap went unsent, and a preempted run's unsent slots are redone by the rerun
        (helper-170, -172, -173: usage 8 for 1 id, 7 for 6, 7 for 4)."""
        if self.finished and self.stream is not None:
            return self.stream.sent_ids
        made = len(self.decoder.output_ids()) if self.decoder is not None else 0
        cap = self.spec.max_tokens
        return made if cap is None else min(made, cap)

    def forwards(self) -> int:
        """Decode forwards (prefill chunks excluded, as in DecodeStats); the stats travel with a handoff."""
        return self.decoder.stats.forwards if self.decoder is not None else 0

    def final_stats(self) -> dict:
        """The stats dict of the last Delta. A preempted request ended before its rerun caught up still
        counts the ids it generated before (the infill route's usage is `generated_tokens`) and its
        mode; forwards and tokens_per_forward are the rerun's."""
        made = self.generated_tokens()
        forwards = self.forwards()
        end = self.finished_s or time.monotonic()
        modes = self.mode_history or ([self.pinned_mode.value] if self.preemptions and self.pinned_mode else [])
        return {
            "prompt_tokens": len(self.spec.prompt_ids),
            # (once finished, the ids sent, across a preemption too: the stream outlives the runs)
            "generated_tokens": made if self.finished and self.stream is not None
            else max(made, self.tokens_before_requeue),
            "forwards": forwards,
            "prefill_forwards": self.decoder.stats.prefill_forwards if self.decoder is not None else 0,
            "slots_accepted_at_verify": self.decoder.stats.slots_accepted_at_verify if self.decoder is not None else 0,
            "tokens_per_forward": made / forwards if forwards else None,  # None: no forward ran (all forced)
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "queue_time_s": (self.started_s or end) - self.arrival_s,
            "time_to_first_token_s": (self.first_token_s - self.arrival_s) if self.first_token_s else None,
            "e2e_latency_s": end - self.arrival_s,
            "modes": list(modes),
            "preemptions": self.preemptions,
            "prefix_waits": self.prefix_waits,
            "stop_word": self.stream.stop_word if self.stream is not None else None,
        }

    def delta(self, text: str, token_ids: list[int], *, finished: bool = False, logprobs: list | None = None) -> Delta:
        """A Delta of this request: the final one carries the finish reason and stats; the first one with
        tokens carries {"cached_prompt_tokens"} (known from the start, so a consumer that stops reading
        early, e.g. an editor rule cut, still has it: llama.cpp's tokens_cached). The prompt's scores
        (params.prompt_logprobs) ride on the first delta with tokens, or on the final one."""
        prompt_logprobs = None
        if self.prompt_logprobs is not None and not self.prompt_scores_sent and (token_ids or finished):
            prompt_logprobs, self.prompt_scores_sent = self.prompt_logprobs, True
        if finished:
            stats = self.final_stats()
        elif token_ids and not self.start_reported:
            stats, self.start_reported = {"cached_prompt_tokens": self.cached_prompt_tokens}, True
        else:
            stats = {}
        return Delta(
            request_id=self.id,
            text=text,
            token_ids=token_ids,
            finished=finished,
            finish_reason=self.finish_reason if finished else None,
            mode=self.mode,
            stats=stats,
            error=self.error if finished else None,
            error_field=self.error_field if finished else None,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            eos_logprob=self.eos_logprob if finished else None,
        )

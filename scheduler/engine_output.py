"""The engine's output: what a step's decoders absorbed, streamed as text and ended with a reason.

Detokenizing, stop strings and sending run while the next forward runs where nothing waits on them
(EngineConfig.overlap_streaming, `_defer_stream`); a request ends with the reason OpenAI's
`finish_reason` gives it (`_finish`, `_natural_reason`) or its deadline (`_expire_deadlines`).
`EngineOutput` is a part of `scheduler.engine.Engine`, on its state.
"""

from __future__ import annotations

import time

import structlog

from decoding.api import DecodeParamError
from scheduler.api import Delta, FinishReason
from scheduler.detokenizer import TextUpdate
from scheduler.mode_switch import switch_due
from scheduler.replay import replay_diverged, retrace
from scheduler.request import Request, RequestStatus

log = structlog.get_logger("engine")


class EngineOutput:
    """Streaming and ending requests (the engine's output side)."""

    def _defer_stream(self, req: Request, now: float) -> bool:
        """Whether the text `req` just absorbed is streamed while the next forward runs rather than now.

        Detokenizing, the stop-string check and sending cost the host about a third of its time between
        forwards (bench/engine_overhead.py --profile), and nothing the next step plans depends on them
        except a stop string. So a request that ends without one (its decoder finished, max_tokens
        reached by count, its deadline past) is streamed and ended now, as is one that has sent nothing
        yet (its time to first token stays that of serial streaming) and an AUTO one due for re-routing
        (mode_switch.switch_due: a stop string must end it before it switches); any other is planned for the
        next step and its text checked during that step's forward. One found there ends the request
        while its segment runs: the result is dropped and its KV freed after the forward, as for a
        cancel, so the text, ids and usage are those of serial streaming, at the price of one segment
        of work for the request that stops (vLLM's async scheduling makes the same trade)."""
        if not self.overlap_streaming or req.decoder.finished or not req.first_token_s or req.in_flight:
            # (nothing sent yet: its first text goes out at once, for the time to first token; a step of it
            # launched ahead is running: streaming now overlaps that step already)
            return False
        if switch_due(self.scheduler, req) or req.replay_ids:
            # a stop string in its text must end it before the router may switch its mode; a rerun's ids
            # are checked against those it streamed before its preemption as it makes them (replay.py)
            return False
        cap, deadline = req.spec.max_tokens, req.deadline_s
        if cap is not None and len(req.stream_ids()) >= cap:
            return False
        return deadline is None or now < deadline

    def _flush_streams(self) -> None:
        """Stream the text of every request whose last absorbed step is not streamed yet."""
        if self._unstreamed:
            self._settle_streams(())

    def _settle_streams(self, exclude) -> bool:
        """Stream the deferred text of every request but those whose ids are in `exclude`; True when that
        ended one (a stop string). Scheduler.settle: called before a preemption, which a request ending
        so may make needless (its slot and blocks are free then)."""
        ended = False
        for req, _, _ in [entry for rid, entry in self._unstreamed.items() if rid not in exclude]:
            self._stream_deferred(req)
            ended = ended or req.finished
        return ended

    def _stream_deferred(self, req: Request) -> None:
        """Stream `req`'s deferred text now, if it has any: before it ends otherwise (`_finish`) or is sent
        back to the queue (Scheduler.before_requeue: its decoder, which holds that text, goes then)."""
        deferred = self._unstreamed.pop(req.id, None)
        if deferred is not None:
            self._stream_absorbed(*deferred)

    def _stream_absorbed(self, req: Request, decoder, absorbed_s: float) -> None:
        """`_stream` for a deferred request, as of when its step was absorbed (`absorbed_s`: a deadline
        that passed since then does not cut that text at a newline, as it would not have in serial
        streaming), unless it ended meanwhile or its decoder was replaced. A fault here ends only `req`."""
        if req.finished or req.decoder is not decoder:
            return
        try:
            self._stream(req, absorbed_s)
        except Exception as exc:
            self._fault(req, exc, "stream_failed")

    def _stream(self, req: Request, now: float) -> None:
        """Send newly final text; end the request on a stop string, a passed deadline or max_tokens."""
        if req.replay_ids and replay_diverged(req):
            retrace(self.scheduler, req)  # a rerun that parted from the ids it sent continues those instead
        deadline = req.deadline_s
        past = deadline is not None and now >= deadline
        ids, cap = req.stream_ids(), req.spec.max_tokens
        # At the cap with more to come (or past it: ReFusion's last slot), the request ends here; the
        # ids are cut first, so finish() releases every held-back character of the kept ids.
        # max_tokens 0 (OpenAI's echo of a scored prompt): the request ends once its prompt is scored
        capped = cap is not None and (len(ids) > cap or (len(ids) == cap and not req.decoder.finished))
        capped = capped and not (cap == 0 and req.prompt_logprobs is None)
        ids = ids[:cap] if capped else ids
        if req.top_logprobs is not None and len(ids) > len(req.logprobs):
            req.logprobs += req.decoder.stream_logprobs(len(req.logprobs), len(ids))
        update = req.stream.update(ids, newline_cut=past)
        self._send(req, update, now)
        if update.stopped == "stop":
            self._finish(req, FinishReason.STOP)
        elif update.stopped == "newline" or (past and now >= deadline + self.config.deadline_grace_ms / 1000):
            self._finish(req, FinishReason.DEADLINE)
        elif capped:
            self._finish(req, FinishReason.LENGTH)

    def _send(self, req: Request, update: TextUpdate, now: float, finished: bool = False) -> None:
        text, token_ids = update.text, update.token_ids
        if token_ids or text:
            if not req.spec.internal:
                self.metrics.observe_delta(req, len(token_ids), now)
            req.first_token_s, req.last_token_s = req.first_token_s or now, now
        if token_ids or text or finished:
            logprobs = None
            if req.top_logprobs is not None:
                logprobs = req.logprobs[update.ids_start:update.ids_start + len(token_ids)]
            req.outbox.put_nowait(req.delta(text, token_ids, finished=finished, logprobs=logprobs))
            req.final_sent = req.final_sent or finished

    def _fail(self, req: Request, exc: Exception) -> None:
        """End `req` with the error its own decoder raised; a DecodeParamError (a grammar that dead-ends
        or hits a parser limit) names the request field at fault."""
        if isinstance(exc, DecodeParamError):
            self._finish(req, FinishReason.ERROR, error=exc.message, error_field=exc.field)
        else:
            log.error("decoder_failed", request_id=req.id, error=f"{type(exc).__name__}: {exc}")
            self._finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")

    def _fault(self, req: Request, exc: Exception, event: str) -> None:
        """End `req` alone with `exc`, which handling it raised (absorbing its step, streaming its text,
        ending it without a step), called from the `except` that caught it, so that no other request of
        the step sees it: a DecodeParamError (its own input, e.g. a grammar) names the field (`_fail`);
        anything else is a fault logged as `event` with its traceback."""
        if isinstance(exc, DecodeParamError):
            self._fail(req, exc)
        else:
            log.exception(event, request_id=req.id)
            self._finish(req, FinishReason.ERROR, error=f"{type(exc).__name__}: {exc}")

    def _finish(self, req: Request, reason: FinishReason, error: str | None = None,
                error_field: str | None = None, counted: bool = True) -> None:
        """Close a request: final delta (held-back text flushed), KV freed, metrics (unless not
        `counted`: a request moved to another replica). Text it absorbed but has not streamed yet
        (`_defer_stream`) goes first; when that text holds a stop string, the request ends there, with
        STOP. Never raises: should closing it fail (a fault in the request's own state, e.g. a deadline
        that cannot be computed), it is taken out all the same (`_take_out`), so that its stream still
        ends and the step goes on for every other request. Every path that ends a request comes here;
        raised, such a fault failed the step (the recovery ended every running request), killed the loop
        while paused, or, once the request was marked finished, left its stream waiting forever
        (helper-194, -195)."""
        if req.finished:
            return
        try:
            self._close(req, reason, error, error_field, counted)
        except Exception as exc:  # noqa: BLE001 - the last resort: log it and take the request out
            log.exception("finish_failed", request_id=req.id)
            self._take_out(req, error if reason is FinishReason.ERROR and error else
                           f"internal error closing the request: {type(exc).__name__}: {exc}")

    def _close(self, req: Request, reason: FinishReason, error: str | None, error_field: str | None,
               counted: bool) -> None:
        """`_finish`'s work."""
        if req.id in self._unstreamed:
            self._stream_deferred(req)
            if req.finished:
                return
        now = time.monotonic()
        past = req.deadline_s is not None and now >= req.deadline_s
        update = req.stream.finish(newline_cut=past and reason is not FinishReason.CANCELLED)
        if update.stopped == "stop" and reason in (FinishReason.LENGTH, FinishReason.DEADLINE):
            reason = FinishReason.STOP
        req.finish_reason, req.error, req.error_field, req.finished_s = reason, error, error_field, now
        if reason is FinishReason.STOP and req.top_logprobs is not None:
            req.eos_logprob = self._eos_entry(req)
        self.scheduler.remove(req)
        req.status = RequestStatus.FINISHED
        self._requests.pop(req.id, None)
        self._ids.discard(req.id)
        self._send(req, update, now, finished=True)
        if counted and not req.spec.internal:
            self.metrics.observe_finish(req, now)
            log.info("finished", request_id=req.id, reason=reason.value, error=error, modes=req.mode_history,
                     tokens=req.generated_tokens(), forwards=req.forwards())

    def _take_out(self, req: Request, error: str) -> None:
        """A request whose close failed: out of the scheduler (its KV freed) if it is not yet, and its
        stream ended with one final ERROR delta if it has none (Request.final_sent); no metrics."""
        if req.final_sent:
            return
        if not req.finished:
            req.finish_reason, req.error, req.finished_s = FinishReason.ERROR, error, time.monotonic()
            try:
                self.scheduler.remove(req)
            except Exception:  # noqa: BLE001
                log.exception("remove_failed", request_id=req.id)
            req.status = RequestStatus.FINISHED
        self._requests.pop(req.id, None)
        self._ids.discard(req.id)
        self._unstreamed.pop(req.id, None)
        req.outbox.put_nowait(Delta(req.id, "", [], finished=True, finish_reason=FinishReason.ERROR, mode=req.mode,
                                    error=error))
        req.final_sent = True

    @staticmethod
    def _eos_entry(req: Request):
        """The TokenLogprob of the EOS the text ended on, when it ended so (not on a stop string, a grammar's
        end or the token cap) with room left under max_tokens for the EOS; else None."""
        stop_word = req.stream.stop_word if req.stream is not None else None
        if req.decoder is None or stop_word is not None or not hasattr(req.decoder, "eos_logprob"):
            return None
        cap = req.spec.max_tokens
        return req.decoder.eos_logprob() if cap is None or len(req.stream_ids()) < cap else None

    def _natural_reason(self, req: Request) -> FinishReason:
        """STOP when the decoder ended on EOS (fewer tokens than gen_length, or an AR decoder that says
        so: EOS or its grammar complete at exactly gen_length), else LENGTH. Text that fills max_tokens
        is LENGTH (OpenAI's "length": the cap was reached) even when ReFusion, which decodes whole
        slots, saw the EOS just past it: AR, stopped at the cap, never sees that EOS."""
        if getattr(req.decoder, "ended_on_eos", False):
            return FinishReason.STOP
        cap, generated = req.spec.max_tokens, req.generated_tokens()
        if cap is not None and generated >= cap:
            return FinishReason.LENGTH
        return FinishReason.STOP if generated < int(req.params.gen_length) else FinishReason.LENGTH

    def _expire_deadlines(self, now: float) -> None:
        grace = self.config.deadline_grace_ms / 1000
        queued = len(self.scheduler.waiting)
        for i, req in enumerate(self.scheduler.waiting + self.scheduler.running):
            # The grace lets a decoding request reach a line end; one still queued with nothing sent
            # has no line to finish, so it ends at its deadline (it only waited the grace out, empty).
            own_grace = 0.0 if i < queued and not req.first_token_s else grace
            try:
                expired = req.deadline_s is not None and now >= req.deadline_s + own_grace
            except Exception:  # noqa: BLE001 - its own fault fails it alone (not the step, which ends every request)
                log.exception("deadline_failed", request_id=req.id)
                self._finish(req, FinishReason.ERROR, error="internal error: its deadline (max_time_ms) could not be computed")
                continue
            if expired:
                self._finish(req, FinishReason.DEADLINE)

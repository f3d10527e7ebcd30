"""Submit-time checks: a request that could never fit the KV cache is refused (or, with no length
asked for, fitted to it) and a full queue answers overloaded, before the request is queued.

`Submission` is a part of `scheduler.scheduler.Scheduler` (its state: `kv`, `config`, `waiting`,
`running`).
"""

from __future__ import annotations

import copy
import time
from collections import Counter
from dataclasses import replace

from scheduler.api import InvalidRequestError, Mode, OverloadedError, Priority
from scheduler.request import Request


class Submission:
    """`add`: the checks every request passes before it waits (`fitted`: those of the KV cache)."""

    def add(self, spec, params, stream) -> Request:
        """Queue a validated request. Raises InvalidRequestError when it could never fit in the KV
        cache, OverloadedError (with a retry-after hint) when the bounded queue is full."""
        asked = spec.mode
        spec, params, kv_blocks = self.fitted(spec, params)
        self._check_queue_room(spec)
        self._arrivals += 1
        req = Request(spec=spec, params=params, kv_blocks=kv_blocks, stream=stream, order=self._arrivals,
                      kv_fit_ar=asked is Mode.AUTO and spec.mode is Mode.AR,
                      aged_after=self.config.aging_after, queued_turn=self._starts,
                      arrival_s=time.monotonic() - max(0.0, spec.waited_s))  # (a moved request: when it first arrived)
        self.waiting.append(req)
        self._queue_changed = True
        return req

    def fitted(self, spec, params) -> tuple:
        """(spec, params, kv_blocks) as the request is admitted to the KV cache: an unset length shrunk to
        it (fit_to_kv), the server's shape reshaped to hold max_tokens (default_shape), an AUTO request
        that fits only as AR (which holds no block of tentative tokens) made AR: a prompt near the cache's
        size was told to shorten itself where `mode: ar` was served (helper-219). Raises
        InvalidRequestError when it could never fit, naming the most that does (`_refuse_kv`; an AUTO
        request that fits in neither, AR's most, which is served: ReFusion's was smaller, or none, helper-220).
        Nothing is queued: an admission check (GenerationRequest.admission_check) stops here."""
        try:
            return self._fitted(spec, params)
        except InvalidRequestError:
            if spec.mode is not Mode.AUTO:
                raise
        return self._fitted(replace(spec, mode=Mode.AR), params)

    def _fitted(self, spec, params) -> tuple:
        """fitted() in the request's own mode."""
        suffix_len = len(spec.suffix_ids or [])
        kv_blocks = self.kv.blocks_needed(len(spec.prompt_ids), suffix_len, params, ar_only=spec.mode is Mode.AR,
                                          max_tokens=spec.max_tokens)
        capacity = self.kv.capacity()
        if kv_blocks > capacity and spec.fit_to_kv:
            fitted = self._fit_to_kv(spec, params, capacity)
            if fitted is None:  # the client set no generation length: min_tokens, or the prompt, does not fit
                self._refuse_min_tokens(spec, params, capacity)
                raise InvalidRequestError(
                    "prompt_ids", f"{_text_words(spec)} leaves no room to generate in the engine's KV cache ({capacity} "
                    f"blocks of {self.kv.pool().block_size} tokens; the runner's num_blocks or kv_memory_bytes); "
                    "shorten the prompt", prompt_tokens=len(spec.prompt_ids) + suffix_len,
                    most=self._longest_prompt(spec, params, capacity))
            params = fitted
            spec = replace(spec, max_tokens=min(spec.max_tokens or params.gen_length, params.gen_length))
            kv_blocks = self.kv.blocks_needed(len(spec.prompt_ids), suffix_len, params, ar_only=spec.mode is Mode.AR,
                                          max_tokens=spec.max_tokens)
        if kv_blocks > capacity and spec.default_shape and spec.mode is not Mode.AR:
            reshaped = self._smallest_fitting(spec, params, spec.max_tokens or params.gen_length, capacity)
            if reshaped is not None:  # (the model's shape would not fit; one that holds max_tokens does)
                params, kv_blocks = reshaped, self._kv_need(spec, reshaped)
        if kv_blocks > capacity:
            self._refuse_kv(spec, params, kv_blocks, capacity)
        return spec, params, kv_blocks

    def _check_queue_room(self, spec) -> None:
        """Raise OverloadedError (with a retry-after hint) when the bounded queue has no room for a request
        of `spec.priority`. The queue holds max_queue requests (plus those about to take a free running slot).
        An INTERACTIVE request counts only the waiting INTERACTIVE requests, so BATCH work filling the
        queue (aged or not: aged BATCH requests rank with INTERACTIVE ones, and counting them refused every
        editor completion once the queued batch work had aged) does not refuse an editor's completion; it
        may take max_running places beyond the bound for that. Under the fair share, a request whose
        client (GenerationRequest.client) has fewer requests of its class waiting than another client
        has may take max_running places more: one client's flood, filling the queue before anyone else
        came, does not get every other client refused (the flood is refused at the bound; the others
        start first, `_fair_order`). config/serve.yaml sizes the engine replica's Ray
        max_ongoing_requests to hold them all (3 x max_running + max_queue)."""
        priority, free_slots = spec.priority, max(0, self.config.max_running - len(self.running))
        bound, waiting = self.config.max_queue + free_slots, len(self.waiting)
        if priority is Priority.INTERACTIVE:
            interactive = sum(1 for r in self.waiting if r.priority is Priority.INTERACTIVE)
            most = bound + self.config.max_running  # (past waiting batch work)
            full = interactive >= bound or waiting >= most
            past = f"; an interactive request {self.config.max_running} more past waiting batch ones"
        else:
            most, full, past = bound, waiting >= bound, ""
        if full and self.config.fair_share and waiting < most + self.config.max_running:
            queued = Counter(r.spec.client for r in self.waiting if r.priority is priority)
            full = queued[spec.client] >= max(queued.values(), default=0)  # (not fewer than every other's)
        if full:
            fair = "; a client with fewer requests waiting than another's may queue past it" if self.config.fair_share else ""
            raise OverloadedError(  # waiting counts requests about to take a free running slot too
                f"engine overloaded: {len(self.running)} of {self.config.max_running} running and {waiting} "
                f"waiting, the most it queues (max_queue {self.config.max_queue} + {free_slots} free running "
                f"slots{past}){fair}; retry later",
                retry_after_s=self.retry_after_s(),
            )

    def _kv_need(self, spec, params, max_tokens: int | None = None) -> int:
        """KV blocks the request needs decoded with `params` (and `max_tokens`, else its own)."""
        return self.kv.blocks_needed(len(spec.prompt_ids), len(spec.suffix_ids or []), params,
                                     ar_only=spec.mode is Mode.AR, max_tokens=max_tokens or spec.max_tokens)

    @staticmethod
    def _smaller_shapes(spec, params, tokens: int) -> list:
        """Copies of `params` that decode `tokens` in shapes of less tentative KV than the model's (its
        ReFusion pool is a semi-AR block, gen_length / serial_num_blocks): one slot per block, then one-token
        slots, each block one token (the least: KVOwner.blocks_needed's pool of 1)."""
        slot = int(getattr(params, "slot_size", 1) or 1)
        shapes = []
        for slot_size, blocks in dict.fromkeys(((slot, -(-tokens // slot)), (1, tokens))):
            shaped = copy.copy(params)
            shaped.gen_length, shaped.slot_size, shaped.serial_num_blocks = slot_size * blocks, slot_size, blocks
            shapes.append(shaped)
        return shapes

    def _smallest_fitting(self, spec, params, tokens: int, capacity: int):
        """The first of `_smaller_shapes(spec, params, tokens)` whose KV fits `capacity` blocks, or None."""
        return next((p for p in self._smaller_shapes(spec, params, tokens) if self._kv_need(spec, p) <= capacity), None)

    def _refuse_kv(self, spec, params, kv_blocks: int, capacity: int) -> None:
        """Raise InvalidRequestError for a client's length the KV cache cannot hold: naming gen_length with
        the largest max_tokens that is admitted (AR: max_tokens itself, not whole slots, KVOwner.blocks_needed;
        the server's shape: in the smallest shape, `_smaller_shapes`), or naming min_tokens when it is what
        does not fit (`_refuse_min_tokens`), or the prompt when not even one token does."""
        suffix_len = len(spec.suffix_ids or [])
        ar = spec.mode is Mode.AR
        asked = spec.max_tokens if (ar or spec.default_shape) and spec.max_tokens else \
            params.gen_length if spec.max_tokens in (None, params.gen_length) else \
            f"{spec.max_tokens}, {params.gen_length} in whole slots" if params.gen_length > spec.max_tokens else \
            f"{spec.max_tokens}; this request decodes {params.gen_length}"  # an infill candidate's gap
        need = (f"{_text_words(spec)} + gen_length ({asked}) "
                f"need {kv_blocks} KV blocks but the engine's KV cache has {capacity} (the runner's num_blocks or "
                f"kv_memory_bytes)")
        fitted = None if ar or spec.default_shape else self._fit_to_kv(spec, params, capacity)
        most = fitted.gen_length if fitted is not None else \
            self._most_tokens(spec, params, capacity, reshape=not ar) if ar or spec.default_shape else None
        if most is None:  # not even the shortest generation fits: min_tokens, or the prompt, is what to change
            self._refuse_min_tokens(spec, params, capacity)
            raise InvalidRequestError("prompt_ids", f"{need}; shorten the prompt", prompt_tokens=len(spec.prompt_ids)
                                      + suffix_len, most=self._longest_prompt(spec, params, capacity))
        shape = ("slot_size", "serial_num_blocks")
        if fitted is None or all(getattr(fitted, k, None) == getattr(params, k, None) for k in shape):
            raise InvalidRequestError("gen_length", f"{need}; ask for at most {most}",
                                      asked=spec.max_tokens or params.gen_length, most=most,
                                      prompt_tokens=len(spec.prompt_ids) + suffix_len)
        slot, blocks = (int(getattr(params, k, 1) or 1) for k in shape)
        raise InvalidRequestError("gen_length", f"{need}; steps of slot_size {slot} x serial_num_blocks {blocks} "
                                  f"tokens do not fit: send slot_size {fitted.slot_size} and serial_num_blocks "
                                  f"{fitted.serial_num_blocks} with gen_length at most {most}")

    def _refuse_min_tokens(self, spec, params, capacity: int) -> None:
        """Raise InvalidRequestError naming min_tokens when it, not the prompt, is what does not fit: at
        least min_tokens (an AR request's) do not fit beside the prompt, but one token does. The client was
        told to shorten a 33-token prompt where a smaller min_tokens fit (helper-217)."""
        least = int(getattr(params, "min_tokens", 0) or 0)
        if least <= 1 or spec.mode is not Mode.AR:  # (min_tokens runs AR: decoding.params.AR_ONLY_PARAMS)
            return
        most = _largest(1, least - 1, lambda tokens: self._kv_need(spec, params, tokens) <= capacity)
        if most is not None:
            raise InvalidRequestError("min_tokens", f"{least} tokens do not fit beside this {_text_words(spec)} "
                                      "in the engine's KV cache "
                                      f"({capacity} blocks of {self.kv.pool().block_size} tokens; the runner's "
                                      f"num_blocks or kv_memory_bytes), {most} do: lower min_tokens, and max_tokens, "
                                      f"to at most {most}")

    def _longest_prompt(self, spec, params, capacity: int) -> int | None:
        """The most prompt + suffix tokens (this request's suffix kept) beside which its fewest tokens
        (min_tokens, at least 1) fit `capacity` blocks, in the smallest of `_smaller_shapes` (AR: as
        max_tokens); None when not even an empty prompt leaves room. The "N maximum" of the Messages
        route's "prompt is too long" 400 (http_errors.from_engine_error), which Claude Code reads to
        compact the conversation."""
        suffix_len = len(spec.suffix_ids or [])
        tokens = max(1, int(getattr(params, "min_tokens", 0) or 0))
        shapes = self._smaller_shapes(spec, params, tokens)
        ar = spec.mode is Mode.AR

        def fits(prompt_len: int) -> bool:
            return min(self.kv.blocks_needed(prompt_len, suffix_len, p, ar_only=ar, max_tokens=tokens)
                       for p in shapes) <= capacity

        longest = _largest(0, len(spec.prompt_ids), fits)
        return None if longest is None else longest + suffix_len

    def _most_tokens(self, spec, params, capacity: int, reshape: bool) -> int | None:
        """The most tokens, from min_tokens (at least 1) to gen_length, whose KV fits `capacity` blocks:
        as max_tokens with `params` (reshape False), or in the smallest of `_smaller_shapes`; None when not
        even the fewest fit."""
        def fits(tokens: int) -> bool:
            shapes = self._smaller_shapes(spec, params, tokens) if reshape else [params]
            return min(self._kv_need(spec, p, tokens) for p in shapes) <= capacity

        return _largest(max(1, int(getattr(params, "min_tokens", 0) or 0)), params.gen_length, fits)

    def _fit_to_kv(self, spec, params, capacity: int):
        """A copy of `params` with the largest gen_length whose KV fits `capacity` blocks, at least
        min_tokens; None when none fits. gen_length is a whole number of blocks of whole slots (slot_size
        x serial_num_blocks); when not one such step fits, the most tokens that fit in a smaller shape:
        the server's shape (default_shape) `_smaller_shapes` (one slot a block, then one-token slots);
        another (a client's, an infill gap's) one block (serial_num_blocks 1), then slot_size 1, so a short
        answer still fits where a 64-token step would not (the hint a refusal gives such a request, which
        the route resends in that shape: an infill gap's is the server's own, gap_params)."""
        slot = int(getattr(params, "slot_size", 1) or 1)
        blocks = int(getattr(params, "serial_num_blocks", 1) or 1)
        least = int(getattr(params, "min_tokens", 0) or 0)
        shapes = ((slot, blocks),) if spec.default_shape else dict.fromkeys(((slot, blocks), (slot, 1), (1, 1)))
        for slot_size, num_blocks in shapes:
            step = slot_size * num_blocks

            def trial(steps: int, slot_size=slot_size, num_blocks=num_blocks, step=step):
                shaped = copy.copy(params)
                shaped.gen_length, shaped.slot_size, shaped.serial_num_blocks = steps * step, slot_size, num_blocks
                return shaped

            def fits(steps: int) -> bool:
                return self._kv_need(spec, trial(steps)) <= capacity

            steps = _largest(max(1, -(-least // step)), params.gen_length // step, fits)
            if steps is not None:
                return trial(steps)
        most = self._most_tokens(spec, params, capacity, reshape=True) if spec.default_shape else None
        if most is None:
            return None
        # (with the request's own max_tokens: an AR one counts up to it, and one-token slots hold `most`)
        return self._smallest_fitting(spec, params, most, capacity)


def _text_words(spec) -> str:
    """A request's prompt (and suffix, when it has one) in a KV refusal's words."""
    suffix = f" + suffix ({len(spec.suffix_ids)})" if spec.suffix_ids else ""
    return f"prompt ({len(spec.prompt_ids)} tokens){suffix}"


def _largest(low: int, high: int, fits) -> int | None:
    """The largest n in [low, high] with fits(n), for a `fits` true up to some n and false above (a KV
    need grows with the tokens); None when fits(low) is false or the range is empty. Binary search."""
    if high < low or not fits(low):
        return None
    while low < high:  # invariant: fits(low)
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low

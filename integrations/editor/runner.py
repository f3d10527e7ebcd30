"""Running one editor completion against the engine: candidate gaps in parallel, rules applied as
text streams in, generation stopped as soon as a rule ends it (docs/editor-protocol.md).

Shared by the WebSocket protocol (`session.py`) and llama.cpp's /infill (`llama_compat.py`).
The engine is reached through the EngineClient interface (integrations/engine_client.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Awaitable, Callable

from integrations.editor.document import MODEL_TAB_WIDTH
from integrations.editor.gaps import Candidate, choose_candidate, gap_params
from integrations.editor.infill import MAX_CHARS_PER_TOKEN, MAX_SUFFIX_TOKENS, InfillPrompt, heal_text
from integrations.editor.postprocess import Rules, postprocess, shown_partial
from integrations.engine_client import ShuttingDownError
from scheduler.api import (ENGINE_STOPPED, EngineError, GenerationRequest, InvalidRequestError, Mode, OverloadedError,
                           Priority)
from scheduler.detokenizer import Healer, ids_covering
from scheduler.validation import with_seed

# on_partial(text, token_ids): the text shown so far (document's style) and the generated ids of it
# (text_id_count), both cumulative; each call's are a prefix of the next's and of the chosen result's
PartialCallback = Callable[[str, list[int]], Awaitable[None]]


@dataclass
class CompletionJob:
    """Everything one completion needs; `request_id` prefixes the engine ids of its candidates."""

    request_id: str
    prompt: InfillPrompt
    gaps: tuple[int, ...]
    rules: Rules
    mode: Mode = Mode.AUTO
    priority: Priority = Priority.INTERACTIVE
    stop: list[str] = field(default_factory=list)
    max_time_ms: int | None = None
    max_tokens: int | None = None  # hard cap on generated tokens (the gap may round up past it)
    sampling: dict = field(default_factory=dict)  # temperature, top_k, top_p, min_p, seed
    # llama.cpp's t_max_predict_ms: a candidate ends once this many ms have passed since its first
    # token AND its text has a newline (README, /completion options); None: no such limit.
    predict_limit_ms: int | None = None
    # Requests with the same key go to the same engine replica (integrations/serve_router.py): the
    # editor protocol sets the document URI, so every keystroke of a file finds its prefix cached.
    affinity_key: str | None = None
    # The engine's fair-share key (scheduler.api.GenerationRequest.client): the editor protocol sets its
    # connection's, so one editor's many completions do not queue another editor's behind them.
    client: str | None = None
    # The client set no length (max_tokens, n_predict, gaps): a candidate whose gap the engine's KV cache
    # cannot hold is shrunk to what it holds, as an unset max_tokens is (scheduler.api.GenerationRequest);
    # a length the client set is refused instead, naming it.
    fit_to_kv: bool = False
    # The client chose the gaps (the editor's `gaps`): a candidate whose gap the engine's KV cache cannot
    # hold is dropped where another is answered, as one past the model's context is (gaps.fitting_gaps);
    # with none admitted the refusal (the longest length that fits) is raised.
    drop_unfit_gaps: bool = False

    def __post_init__(self) -> None:
        # One seed for every candidate (a fresh one when the client gave none): a longer gap replaces
        # the shortest only when it extends its text (choose_candidate), and sampled candidates share
        # a prefix only when they share their random stream.
        self.sampling = with_seed(self.sampling)

    def model_rules(self) -> Rules:
        """The rules on the model's text (LF, spaces; document.py): the suffix converted as the prompt
        was, and n_indent in spaces when the document indents with tabs (llama.cpp counts characters).
        The suffix is cut as the prompt's is before tokenizing: the rules read only its first lines and
        as many characters as a completion has, and they run on every delta (a 200,000-character
        suffix cost 3-6 ms a delta)."""
        style = self.prompt.style
        indent = self.rules.indent * MODEL_TAB_WIDTH if style.tabs else self.rules.indent
        suffix = self.rules.suffix[: MAX_SUFFIX_TOKENS * MAX_CHARS_PER_TOKEN]
        return replace(self.rules, suffix=style.to_model(suffix), indent=indent, line_prefix=self.prompt.cursor_line,
                       cut_invalid=self.rules.cut_invalid and not self.prompt.holds_replacement,
                       crlf=style.line_ending != "\n")

    def engine_requests(self) -> list[GenerationRequest]:
        return [
            GenerationRequest(
                request_id=f"{self.request_id}-g{gap}",
                prompt_ids=list(self.prompt.prompt_ids),
                params={**self.sampling, **gap_params(gap)},
                mode=self.mode,
                priority=self.priority,
                stop=self.prompt.style.model_stops(self.stop),
                max_time_ms=self.max_time_ms,
                suffix_ids=list(self.prompt.suffix_ids) if self.prompt.suffix_ids else None,
                max_tokens=self.max_tokens,
                affinity_key=self.affinity_key,
                client=self.client,
                healed=self.prompt.healed,
                **self.prompt.style.engine_fields(at_indent=self.prompt.at_indent),
                fit_to_kv=self.fit_to_kv,
            )
            for gap in self.gaps
        ]


@dataclass
class CompletionOutcome:
    """The chosen completion and what it cost; `tokens` counts the ids the chosen candidate generated,
    `token_ids` are the generated ids of `text` (Candidate.token_ids); `first_token_at`: when the first
    token of any candidate came from the engine (time.perf_counter; None when none came), the request's
    time to first token as a plain completion's, whatever the rules then held back."""

    text: str
    stop_reason: str
    gap: int
    candidates: list[Candidate]
    mode: str | None
    tokens: int
    tokens_per_forward: float | None
    first_partial_ms: float | None
    total_ms: float
    token_ids: list[int] = field(default_factory=list)
    first_token_at: float | None = None

    def timings(self) -> dict:
        return {"first_partial_ms": self.first_partial_ms, "total_ms": round(self.total_ms, 2)}

    def after(self, sent: str, sent_ids: list[int]) -> tuple[str, list[int]]:
        """The text and ids a stream still owes once it has sent the partials `sent` and `sent_ids`
        (on_partial's last); nothing where the result does not extend them, which choose_candidate
        rules out."""
        extends = self.text.startswith(sent) and self.token_ids[: len(sent_ids)] == sent_ids
        return (self.text[len(sent):], self.token_ids[len(sent_ids):]) if extends else ("", [])


def tokens_per_forward(stats: dict) -> float | None:
    """From the final Delta's stats; None when the stream was stopped early (no final stats)."""
    if stats.get("tokens_per_forward") is not None:
        return round(float(stats["tokens_per_forward"]), 3)
    forwards = stats.get("forwards") or 0
    return round(float(stats.get("generated_tokens", 0)) / forwards, 3) if forwards else None


async def decode_candidate(client, req: GenerationRequest, gap: int, job: CompletionJob,
                           on_text: PartialCallback | None = None,
                           on_first_token: Callable[[], None] | None = None) -> Candidate:
    """Stream one candidate; stop early (closing the stream cancels it in the engine) on a rule cut,
    or on the token cap when the engine would go past it. The text has the final-only rules applied.
    Rules run on the model's text; partials and the result are in the document's style (document.py).
    on_first_token is called when its first token comes."""
    raw, ids, reason, stats, mode = "", [], "length", {}, None
    text, shown, capped = "", "", False  # text: raw (as seen from the cursor) with the rules applied
    shown_ids = 0  # how many ids the shown partial's text takes (text_id_count)
    first_token_s: float | None = None
    rules = job.model_rules()
    async with contextlib.aclosing(client.stream(req)) as deltas:
        async for delta in deltas:
            mode = delta.mode or mode
            stats.update(delta.stats)  # cached_prompt_tokens comes early: kept when a rule stops reading
            if first_token_s is None and delta.token_ids:
                first_token_s = _now()
                if on_first_token is not None:
                    on_first_token()
            if not capped:
                raw, ids = raw + delta.text, ids + list(delta.token_ids)
                if job.max_tokens is not None and len(ids) >= job.max_tokens:
                    capped = True
                    if len(ids) > job.max_tokens:
                        ids = ids[: job.max_tokens]
                        raw = heal_text(client.tokenizer.decode(ids, skip_special_tokens=True), job.prompt.healed)
                # raw: the engine dropped the healed blanks (request.healed); at its end (or the cap) a
                # character may be cut short: the final rules
                processed = postprocess(raw, rules, final=capped or delta.finished)
                text = processed.text
                if processed.cut:
                    reason = processed.cut
                    break
                if on_text is not None and (now_shown := _partial(text, rules, job))[0] != shown:
                    shown, model_shown = now_shown
                    shown_ids = text_id_count(client.tokenizer, ids, job, model_shown, shown_ids)
                    await on_text(shown, ids[:shown_ids])
            if delta.finished:
                if not capped:
                    reason = "error" if delta.error else (delta.finish_reason.value if delta.finish_reason else "stop")
                    if delta.error:
                        stats["error"] = delta.error
                break
            if capped and gap > job.max_tokens:
                break  # the engine would generate past the cap: stop it now
            if _past_predict_limit(job, first_token_s, raw):
                reason = "deadline"
                break  # closing the stream cancels the candidate in the engine
    final = postprocess(raw, rules, final=True)  # (once, on the model's text: text may have had them already)
    if final.cut:
        reason = final.cut
    # All the ids when the rules kept all of raw (a stop string's ids included, as the engine counts them)
    kept = len(ids) if final.text == raw else text_id_count(client.tokenizer, ids, job, final.text, shown_ids)
    cand = Candidate(gap=gap, text=job.prompt.to_document(final.text), stop_reason=reason, raw=raw, tokens=len(ids),
                     stats=stats, token_ids=ids[:kept])
    cand.stats["mode"] = mode.value if mode is not None else None
    return cand


def _past_predict_limit(job: CompletionJob, first_token_s: float | None, raw: str) -> bool:
    """llama.cpp's t_max_predict_ms rule: more than the limit since the first token, and a newline
    generated (so a one-line completion is never cut short)."""
    if not job.predict_limit_ms or first_token_s is None or "\n" not in raw:
        return False
    return (_now() - first_token_s) * 1000.0 > job.predict_limit_ms


def _now() -> float:
    """Seconds on the clock of the t_max_predict_ms rule (a test replaces this to move time itself)."""
    return time.monotonic()


def _partial(text: str, rules: Rules, job: CompletionJob) -> tuple[str, str]:
    """What a partial shows, in the document's style and in the model's. Whitespace alone is not shown:
    its indentation (tabs or spaces) is known only once the line has text, and a partial must stay a
    prefix of the result."""
    model_text = shown_partial(text, rules.suffix, crlf=rules.crlf)
    return (job.prompt.to_document(model_text), model_text) if model_text.strip(" \t") else ("", "")


def text_id_count(tokenizer, ids: list[int], job: CompletionJob, text: str, start: int = 0) -> int:
    """How many of the generated `ids` are the ids of `text`, a prefix of their text in the model's style
    (less the blanks token healing dropped, job.prompt.healed): the fewest whose text holds it
    (scheduler.detokenizer.ids_covering; `start`: a count known not to exceed it). A token a
    rule's cut splits is kept: its text starts inside `text`. The ids stay the generated ones whatever
    the document's style makes of their text (CRLF line breaks, tab indentation)."""
    decode = partial(tokenizer.decode, skip_special_tokens=True)
    healer = Healer(job.prompt.healed)
    if not healer.done:  # (a prompt that ended in blanks)
        healer.feed(decode(ids))
    return ids_covering(decode, ids, text, len(text), dropped=healer.dropped, start=start)


async def run_completion(client, job: CompletionJob, on_partial: PartialCallback | None = None,
                         whole: bool = False) -> CompletionOutcome:
    """Decode every candidate gap in parallel; partials come from the first (shortest) gap.

    Cancelling the awaiting task cancels every candidate in the engine. Candidates the engine refuses
    as overloaded are dropped when another was admitted (the editor protocol's latency-first rule,
    docs/editor-protocol.md "Infill strategy"); otherwise the first engine error (InvalidRequestError,
    OverloadedError) propagates. `whole` (the HTTP routes: /infill, completions with `suffix`): every
    candidate or none, so a greedy request's text does not depend on the load (an admitted candidate is
    cancelled at the first refusal, and the OverloadedError becomes the route's 503 with Retry-After);
    a candidate that ended in an error (a failed forward) raises EngineError with its message then, the
    route's 500 as for a plain completion (it answered 200 with empty text). A candidate a stopping engine
    cut raises ShuttingDownError when `whole` or when it is the shortest answered one; a longer one is
    dropped (_answered_candidates).
    """
    start = time.perf_counter()
    first_partial: list[float] = []

    async def forward_partial(text: str, token_ids: list[int]) -> None:
        if not first_partial:
            first_partial.append((time.perf_counter() - start) * 1000.0)
        if on_partial is not None:
            await on_partial(text, token_ids)

    first_token: list[float] = []

    def token_came() -> None:
        if not first_token:
            first_token.append(time.perf_counter())

    tasks = [
        asyncio.ensure_future(decode_candidate(client, req, gap, job, forward_partial if i == 0 else None, token_came))
        for i, (req, gap) in enumerate(zip(job.engine_requests(), job.gaps))
    ]
    candidates = _answered_candidates(await _candidate_results(tasks, whole), whole, job.drop_unfit_gaps)
    chosen = choose_candidate(candidates)
    return CompletionOutcome(
        text=chosen.text,
        stop_reason=chosen.stop_reason,
        gap=chosen.gap,
        candidates=candidates,
        mode=chosen.stats.get("mode"),
        tokens=chosen.tokens,
        tokens_per_forward=tokens_per_forward(chosen.stats),
        first_partial_ms=round(first_partial[0], 2) if first_partial else None,
        total_ms=(time.perf_counter() - start) * 1000.0,
        token_ids=chosen.token_ids,
        first_token_at=first_token[0] if first_token else None,
    )


async def _candidate_results(tasks: list[asyncio.Future], whole: bool) -> list:
    """Every candidate task's result or exception. Cancelled (superseded, client gone), every candidate
    is cancelled; `whole`: the first exception cancels every candidate and is raised."""
    try:
        if whole:  # the first error ends every candidate: no text from part of them
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t.exception() for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
            if failed:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                raise failed[0]
        return await asyncio.gather(*tasks, return_exceptions=True)
    except BaseException:  # cancelled (superseded, client gone), or `whole` failed: cancel every candidate
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _answered_candidates(results: list, whole: bool, drop_unfit: bool = False) -> list[Candidate]:
    """The candidates that were answered. Candidates refused as overloaded, or (`drop_unfit`) as too long
    for the KV cache, are dropped when another was admitted; any other error, or every candidate refused,
    raises the first error. A candidate a stopping
    engine cut (its drain timeout: ENGINE_STOPPED) raises ShuttingDownError, retry after 1 s (HTTP 503
    `shutting_down`, editor OVERLOADED: as a plain completion cut so answers, openai_calls.checked), when
    `whole` or when it is the shortest answered gap's (partials, where shown, are the shortest gap's); a
    longer one is dropped (the latency-first rule). `whole`: a candidate that ended in any other error
    raises EngineError."""
    candidates = [r for r in results if isinstance(r, Candidate)]
    errors = [r for r in results if isinstance(r, BaseException)]
    # Under load some candidates may be refused (OverloadedError): answer with the admitted ones.
    if errors and (not candidates or not all(_droppable(e, drop_unfit) for e in errors)):
        raise errors[0]
    stopped = [c for c in candidates if c.stats.get("error") == ENGINE_STOPPED]  # not the request's fault
    if stopped and (whole or min(candidates, key=lambda c: c.gap) in stopped):
        raise ShuttingDownError(f"request ended early: {ENGINE_STOPPED}; retry", 1.0)
    candidates = [c for c in candidates if c not in stopped]
    failed = [c for c in candidates if c.stop_reason == "error"] if whole else []
    if failed:  # whole: one that failed fails the request, as an engine error does a plain completion
        raise EngineError(failed[0].stats.get("error") or "an infill candidate failed")
    return candidates


def _droppable(error: BaseException, drop_unfit: bool) -> bool:
    """Whether a candidate refused with `error` may be left out when another candidate was answered."""
    unfit = drop_unfit and isinstance(error, InvalidRequestError) and error.field == "gen_length"
    return unfit or isinstance(error, OverloadedError)


async def warm_prefix(client, request_id: str, prompt: InfillPrompt) -> dict:
    """llama.cpp's n_predict == 0: run the prompt through the engine (one AR token, discarded) so the
    prefix cache holds it for the next completion. Returns {"tokens": prompt length, "cached": prompt
    tokens the prefix cache already held}."""
    req = GenerationRequest(
        request_id=request_id,
        prompt_ids=list(prompt.prompt_ids),
        params={"gen_length": 1, "slot_size": 1, "serial_num_blocks": 1, "temperature": 0.0},
        mode=Mode.AR,
        priority=Priority.BATCH,  # background work: never ahead of a completion someone waits for
    )
    last = None
    async with contextlib.aclosing(client.stream(req)) as deltas:
        async for last in deltas:
            pass
    cached = int(((last.stats if last is not None else None) or {}).get("cached_prompt_tokens") or 0)
    return {"tokens": len(prompt.prompt_ids), "cached": cached}

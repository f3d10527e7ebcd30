"""The engine's public contract, used by every front end (CLI, OpenAI API, editor protocol).

    engine = Engine(runner, tokenizer, config)       # scheduler.engine
    await engine.start()
    async for delta in engine.submit(request):       # streams text as it becomes final
        ...
    engine.cancel(request_id)                        # idempotent; frees KV at once
    await engine.stop(drain_timeout_s=...)

Plain Python; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, IntEnum
from typing import Protocol, Sequence

from decoding.grammar import GrammarSpec
from workers.batch import Segment, SegmentResult


class Priority(IntEnum):
    """Lower value runs first; FCFS within a class."""

    INTERACTIVE = 0  # editor completions: latency first
    BATCH = 1  # agent tool calls, API traffic, bulk jobs


class Mode(Enum):
    REFUSION = "refusion"
    AR = "ar"
    AUTO = "auto"


ENGINE_STOPPED = "engine stopped"  # Delta.error of requests a stopping engine ended (FinishReason.CANCELLED)


class FinishReason(Enum):
    STOP = "stop"  # EOS or a stop string
    LENGTH = "length"  # gen_length reached
    DEADLINE = "deadline"  # max_time_ms passed
    CANCELLED = "cancelled"
    ERROR = "error"


class EngineError(Exception):
    """Base of typed engine errors; the HTTP layer maps each to a status code."""


class OverloadedError(EngineError):
    """Queue or KV budget full: retry after `retry_after_s` seconds (HTTP 429/503 + Retry-After)."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class InvalidRequestError(EngineError):
    """Bad request input: `field` names it; the message says what to change (HTTP 400). Where the engine
    knows them (a KV refusal, which the Messages route words as Anthropic does): `prompt_tokens` is the
    request's prompt + suffix tokens; of gen_length, `asked` the value the client sent and `most` the
    largest the engine would accept; of prompt_ids, `most` the most prompt + suffix tokens its KV cache
    holds beside the fewest generated tokens."""

    def __init__(self, field_name: str, message: str, *, asked: int | None = None, most: int | None = None,
                 prompt_tokens: int | None = None):
        super().__init__(f"{field_name}: {message}")
        self.field, self.asked, self.most, self.prompt_tokens = field_name, asked, most, prompt_tokens


# max_time_ms's largest value, 2^31 - 1 ms (about 24.8 days, JavaScript's setTimeout limit): longer is no
# limit in practice, and a value of hundreds of digits overflowed the deadline's float in the engine loop
MAX_TIME_MS = 2**31 - 1
MAX_CLIENT_CHARS = 256  # GenerationRequest.client (integrations.request_limits.client_key digests longer ids)


@dataclass
class GenerationRequest:
    """One completion request. `params` holds decoding parameters by name (gen_length, slot_size,
    serial_num_blocks, slot_threshold, token_threshold, temperature, top_k, top_p, seed); unset ones
    take the model's defaults (refusion.json). Validation happens at submit and raises
    InvalidRequestError naming the field."""

    request_id: str
    prompt_ids: list[int]
    params: dict = field(default_factory=dict)
    mode: Mode = Mode.AUTO
    priority: Priority = Priority.BATCH
    stop: list[str] = field(default_factory=list)
    max_time_ms: int | None = None  # 1..MAX_TIME_MS; None: no limit
    # Infill: the suffix placed after the gap as already-generated text (editor protocol).
    suffix_ids: list[int] | None = None
    # Most generated tokens returned (OpenAI max_tokens). ReFusion decodes whole slots, so gen_length may
    # round past it; the engine streams at most this many ids and then ends the request with LENGTH,
    # text held back for stop strings included. None: gen_length is the cap.
    max_tokens: int | None = None
    # Routing hint for the serving layer (integrations/serve_router.py): requests with the same key go
    # to the same engine replica, whose prefix cache holds their shared prompt. The editor sets the
    # document URI, chat the conversation's first turn; None: the router keys on the prompt's first
    # tokens. The engine itself ignores it.
    affinity_key: str | None = None
    # Who sent it, for the scheduler's fair share (EngineConfig.fair_share): waiting requests of one
    # priority class start client by client, the client holding the fewest running slots first, so one
    # client's many requests do not queue everyone else's behind them. The editor protocol sets one per
    # connection; the HTTP APIs the end-user id the client sends (OpenAI `safety_identifier` or `user`,
    # Anthropic `metadata.user_id`). None: the anonymous client (every request without one counts as one
    # client's). At most MAX_CLIENT_CHARS characters.
    client: str | None = None
    # Structured output: the output must match this grammar (decoding.grammar; JSON schema, regex, Lark).
    # Decoded autoregressively: AUTO runs as AR, REFUSION is refused (field "mode").
    grammar: GrammarSpec | None = None
    # Token healing: the spaces/tabs the client's prompt ended in, left out of prompt_ids so that the
    # model writes them inside its next token (byte-level BPE keeps a word's leading space in the word's
    # token). The engine drops as much leading blank text (scheduler.detokenizer.Healer) before the
    # text is sent and before stop strings are matched; token ids and usage keep the generated tokens.
    # AR reads are masked until the model has written them (decoding.healing; AUTO starts in AR for it);
    # ReFusion (mode REFUSION) is not constrained. Not applied with a grammar.
    healed: str = ""
    # The client's text indents with tabs, which the model's text writes as MODEL_TAB_WIDTH spaces
    # (integrations/editor/document.py): `stop` strings are matched on the text as the client reads it,
    # each line's leading spaces as tabs (scheduler.client_view.TabView; the first line's too with
    # tab_indent_first_line: the client's cursor stood in its line's indentation), so that a "\t" stop
    # ends the text at an indent, never at four spaces inside a line. The text itself stays the model's.
    tab_indent: bool = False
    tab_indent_first_line: bool = False
    # The client's text breaks lines with "\r\n" or "\r", which the model's text writes as "\n", and its
    # `stop` strings come with their line breaks as "\n" (DocumentStyle.model_stops): a "\r\n" the model
    # writes is one line break there too, so stop strings are matched on the text with each "\r\n" read
    # as "\n" (scheduler.client_view.CrlfView): a "\n" stop ends the text before the "\r", and a "\r" the
    # text ends in is sent only once the next character is known. The text itself stays the model's.
    crlf: bool = False
    # The client's text breaks lines with a lone "\r" (a CR-only document; crlf is set too): a lone "\r"
    # the model writes is a line break there as well (DocumentStyle.to_document leaves it as written), so
    # the view reads it as "\n" too, and a "\r" stop ("\n" in the stops' form) ends the text before it.
    cr_only: bool = False
    # gen_length is the server's default, not the client's (OpenAI max_tokens unset): when prompt +
    # gen_length needs more KV blocks than the engine's cache has, gen_length (and max_tokens) shrink to
    # the largest whole blocks of whole slots that fit, instead of a 400, as an unset max_tokens shrinks
    # to the room left in the context (vLLM; integrations/context_fit.py). A client's own value is refused.
    fit_to_kv: bool = False
    # slot_size and serial_num_blocks are the server's (the client set neither): when a client's max_tokens
    # in that shape needs more KV blocks than the engine's cache has, a smaller shape that holds max_tokens
    # (one slot per semi-AR block, then one-token slots) is decoded instead of a 400, as the context check
    # chooses a smaller slot (integrations/context_fit.py). A client's own shape is refused.
    default_shape: bool = False
    # The server's own request (health probe, warm-up): decoded like any other, but not counted in the
    # request metrics, the prefix-cache hit rate, the router's estimates or the log (a probe every 10 s
    # would swamp an idle server's numbers).
    internal: bool = False
    # Seconds it already waited in another engine replica's queue before that replica released it to this
    # one (queue rebalancing, integrations/serve_rebalance.py): its arrival, and so its deadline
    # (max_time_ms), time to first token and queue time, count from when it first arrived. Set by the
    # serving layer, never by a client; >= 0.
    waited_s: float = 0.0
    # Only the submit-time checks (Scheduler.fitted): the engine raises the 400 admission would (the KV
    # cache cannot hold it, naming the most it holds) or ends the request at once, nothing queued or
    # generated. The ingress asks so before it refuses a client's cap over the context, so that its 400
    # names the most both the context and the KV cache admit (openai_requests.kv_bounded_request).
    admission_check: bool = False


@dataclass
class Delta:
    """A piece of a request's output. The last delta has finished=True, finish_reason and stats."""

    request_id: str
    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: FinishReason | None = None
    mode: Mode | None = None  # the mode that served it (REFUSION or AR)
    stats: dict = field(default_factory=dict)
    error: str | None = None
    # The request field whose value caused `error` (a 4xx for the API: e.g. "grammar" for a grammar that
    # dead-ends or hits a parser limit mid-request); None when the error is the server's.
    error_field: str | None = None
    # params["logprobs"] set: one workers.batch.TokenLogprob per id of token_ids (Decoder.stream_logprobs)
    logprobs: list | None = None
    # params["prompt_logprobs"] set: the prompt's scores, one TokenLogprob per prompt token but the first
    # (Decoder.prompt_scores), on one delta only: the first with tokens, or the final one
    prompt_logprobs: list | None = None
    # params["logprobs"] set and the text ended on EOS within max_tokens: that EOS's TokenLogprob, on the
    # final delta only (the token is not in token_ids; OpenAI's completions list it, Decoder.eos_logprob)
    eos_logprob: object | None = None


def merge_deltas(deltas: list[Delta]) -> Delta:
    """One Delta carrying several consecutive ones of the same request (text, ids and log probabilities
    concatenated, the last one's finish fields, every one's stats: a later key wins; the prompt's scores
    of the one that carries them)."""
    if len(deltas) == 1:
        return deltas[0]
    last = deltas[-1]
    return Delta(
        request_id=last.request_id, text="".join(d.text for d in deltas),
        token_ids=[t for d in deltas for t in d.token_ids], finished=last.finished,
        finish_reason=last.finish_reason, mode=last.mode or next((d.mode for d in deltas if d.mode), None),
        stats={k: v for d in deltas for k, v in d.stats.items()}, error=last.error, error_field=last.error_field,
        logprobs=None if all(d.logprobs is None for d in deltas) else [e for d in deltas for e in d.logprobs or ()],
        prompt_logprobs=next((d.prompt_logprobs for d in deltas if d.prompt_logprobs is not None), None),
        eos_logprob=last.eos_logprob,
    )


class RunnerInfo(Protocol):
    """What the scheduler reads about a runner's model and KV cache."""

    vocab_size: int
    eos_token_id: int
    end_token_ids: tuple[int, ...]  # the model's other end tokens (optional: () when absent)
    mask_token_id: int
    block_size: int  # tokens per KV block
    num_kv_blocks: int  # blocks the scheduler may hand out (the runner keeps a scratch block apart)


class Runner(Protocol):
    """Executes one packed step (workers/batch.py). Implemented by workers.runner.ModelRunner and the
    scheduler tests' fakes. The runner owns tensors and the device, never KV blocks: the scheduler
    prepares every segment's block table (workers.kv_blocks.BlockTables.prepare) before the call."""

    info: RunnerInfo
    tokenizer: object

    def execute(self, segments: Sequence[Segment], block_tables: Sequence[list[int]]) -> list[SegmentResult]:
        """Run every segment in one forward; results in segment order. Raises ValueError (a
        workers.runner.SegmentError naming seq_id and field) for a segment it cannot run.

        A runner may also offer `launch(segments, block_tables) -> handle` (queue the step; feedback
        segments, Segment.feedback, take their token from the previous launched step's reads) and
        `collect(handle) -> list[SegmentResult]` (wait for it), with execute = collect(launch(...)):
        EngineConfig.async_scheduling needs them (workers.runner.ModelRunner has them)."""

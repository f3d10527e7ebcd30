"""What a request may carry, checked before any costly work, and tokenizing off the event loop.

Every HTTP route checks its input through this module and integrations/request_body.py (the body:
its size, its pace and its JSON), so one kind of fault has one fix:

    RequestLimits            prompt characters (checked before tokenizing) and the model context (tokens,
                             checked against the generation by integrations/context_fit.py)
    off_loop(fn, ...)        tokenizer work (encode, chat template, infill prompt) in a small thread
                             pool, so a long prompt never stalls other requests; memory freed after
    grammar_off_loop(fn)     a request's output grammar built and checked (llguidance) in a pool of its
                             own, so slow schemas queue behind each other, never before tokenizing

Fronts map `InputError` to their error shape (OpenAI's in http_errors, llama.cpp's in editor/route_errors.py).
Sampling bounds that keep hostile values out of the forward (where one failing request would end
every request of that batch) are here too: MAX_SEED, MIN_TOP_P, GREEDY_BELOW_TEMPERATURE.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

from decoding import params
from scheduler.api import MAX_CLIENT_CHARS
from workers.batch import SEED_MAX

MiB = 1 << 20
DEFAULT_MAX_BODY_BYTES = 8 * MiB  # a 128K-token prompt is ~0.5 MB of text or ~0.9 MB of token ids
PROMPT_CHARS_PER_CONTEXT_TOKEN = 8  # default max_prompt_chars = 8 x context; BPE averages 3-4 chars/token
MAX_JSON_DEPTH = 64  # nested arrays/objects; tool schemas need ~20
# Keys of one JSON object: every field of a route, a 300-token logit_bias and a tool schema's properties fit
# many times over. Each unknown key is one pydantic error built and worded on the event loop: 300k of them
# (a 5 MB body) held every route ~3 s (helper-250).
MAX_OBJECT_KEYS = 4096
# Sampling bounds are the engine's own (decoding.params, workers.batch), checked here too so the HTTP
# layer answers 400 naming the field before a request reaches the engine.
MAX_SEED = SEED_MAX  # signed 64-bit: the device hashes (seed, step, position) in int64
MIN_TOP_P = params.MIN_TOP_P
GREEDY_BELOW_TEMPERATURE = params.GREEDY_BELOW_TEMPERATURE
TOKENIZER_THREADS = 2  # concurrent tokenizations; bounds their memory (one 2M-char encode holds ~0.5 GB)
GRAMMAR_THREADS = 2  # concurrent grammar checks of requests (a 5,000-property schema takes seconds)
TRIM_AFTER_CHARS = 1 << 16  # after tokenizing this much text, give freed memory back to the OS
TRIM_AFTER_BODY_BYTES = 1 * MiB  # likewise after a request with a body this large
DISCARD_UP_TO_BYTES = 64 * MiB  # an over-limit body up to this size is read (and dropped) before the 413
# Seconds a request body may pause (no data) before a 408: a stalled upload would otherwise hold one of
# the ingress replica's max_ongoing_requests call slots for good, and enough of them starve everyone
# (nginx's client_body_timeout is the same rule, 60 s; clients send a JSON body at once).
DEFAULT_BODY_TIMEOUT_S = 10.0


MAX_ERROR_MESSAGE_CHARS = 2000  # an error message quoting a client's value is cut here (a 1 MB `model` came back whole)
# Characters of one stop string, on every route (editor protocol, /v1, /completion, /infill, Messages): far
# past any delimiter a client stops at ("\n\n", "```", "</code>", a line of code). OpenAI documents only
# the count (4), vLLM and llama.cpp no bound; without one an editor's 16 stops of 60,000 characters each
# were taken, each bounded only by the 1 MiB frame.
MAX_STOP_CHARS = 1000


def long_stop_fault(stops) -> str | None:
    """Why `stops` (a list of stop strings) is refused for a string over MAX_STOP_CHARS characters, naming
    the first such and the limit; None when none is."""
    for i, stop in enumerate(stops):
        if isinstance(stop, str) and len(stop) > MAX_STOP_CHARS:
            return (f"string {i} is {len(stop):,} characters long; a stop string may be at most "
                    f"{MAX_STOP_CHARS:,} characters")
    return None


def clipped(text: str, limit: int = MAX_ERROR_MESSAGE_CHARS) -> str:
    """`text`, or its start and how many characters were left out, `limit` characters in all (so a
    message clipped twice, as an InputError and again as the APIError it becomes, is clipped once)."""
    if len(text) <= limit:
        return text
    keep = limit - len(f"... ({len(text):,} more characters)")
    return f"{text[:keep]}... ({len(text) - keep:,} more characters)"


class InputError(Exception):
    """Bad or oversized input. `status`: 400 (malformed), 413 (too large), 415 (a compressed body); `field`: the JSON path
    ("messages.0.content") or None for the body as a whole; the message says what to change (clipped to
    MAX_ERROR_MESSAGE_CHARS, as the field)."""

    def __init__(self, status: int, field: str | None, message: str):
        field = clipped(field, 200) if field else field
        message = clipped(message)
        super().__init__(f"{field}: {message}" if field else message)
        self.status, self.field, self.message = status, field, message


class PromptCharsError(InputError):
    """A prompt over max_prompt_chars (400), with the numbers, for routes that word it their own way."""

    def __init__(self, field: str, chars: int, limit: int, what: str = "is", fix: str = "send less text"):
        super().__init__(400, field, f"{what} {chars:,} characters; the limit is {limit:,} (max_prompt_chars): {fix}")
        self.chars, self.limit = chars, limit


@dataclass(frozen=True)
class RequestLimits:
    """The HTTP front's input limits.

    max_body_bytes: request body size in bytes (413 above it).
    body_timeout_s: seconds a request body may stop arriving before it is answered 408.
    max_prompt_chars: characters of a prompt (or chat messages, suffix, /tokenize content), refused
        before tokenizing; None = PROMPT_CHARS_PER_CONTEXT_TOKEN x context_length (1,000,000 when the
        context is unknown).
    context_length: the model's context in tokens (config.json max_position_embeddings); prompt +
        max_tokens must fit. 0 = unknown, not checked.
    max_sequences: engine requests one HTTP request may start (prompts x n): more than the engine's
        max_running + max_queue can never be admitted, so that is a 400, not a retryable 503.
        0 = unknown, not checked.
    max_editor_connections: editor WebSockets open at once on this ingress replica; one more is closed
        with 1013 ("try again later"). Each open socket holds one of the replica's max_ongoing_requests
        call slots for its whole life, so with no bound idle sockets starved every HTTP route, /health
        included (helper-171). 0 = no bound.
    editor_idle_timeout_s: an editor WebSocket that sent no frame for this long, with no completion in
        flight, is closed with 1001 ("going away"; clients reconnect, as after a drain). 0 = never.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    max_prompt_chars: int | None = None
    context_length: int = 0
    max_sequences: int = 0
    max_editor_connections: int = 0
    editor_idle_timeout_s: float = 0.0

    @property
    def max_array_items(self) -> int | None:
        """The most items a JSON array in a request may hold: the model's context in tokens (a prompt of
        ids, messages, stop strings, a batch of prompts: no request needs more), at least max_sequences.
        None when the context is unknown. Checked while parsing, before validation: validating a list
        of millions of ids blocked the event loop for seconds."""
        return max(self.context_length, self.max_sequences) if self.context_length else None

    @property
    def prompt_chars(self) -> int:
        if self.max_prompt_chars is not None:
            return self.max_prompt_chars
        return PROMPT_CHARS_PER_CONTEXT_TOKEN * self.context_length if self.context_length else 1_000_000

    def as_dict(self) -> dict:
        return {"max_body_bytes": self.max_body_bytes, "body_timeout_s": self.body_timeout_s,
                "max_prompt_chars": self.prompt_chars, "context_length": self.context_length, "max_json_depth": MAX_JSON_DEPTH,
                **({"max_sequences": self.max_sequences} if self.max_sequences else {}),
                **({"max_editor_connections": self.max_editor_connections} if self.max_editor_connections else {}),
                **({"editor_idle_timeout_s": self.editor_idle_timeout_s} if self.editor_idle_timeout_s else {})}

    def check_chars(self, field: str, text: str) -> None:
        """Raise PromptCharsError (an InputError, 400 naming `field`) when `text` is over the prompt
        character limit."""
        if len(text) > self.prompt_chars:
            raise PromptCharsError(field, len(text), self.prompt_chars)

    def check_sequences(self, prompts: int, n: int) -> None:
        """Raise InputError (400 naming `n`, or `prompt` for a batch of one choice each) when prompts x n
        engine requests exceed max_sequences: the engine could never hold them all at once."""
        count = prompts * n
        if self.max_sequences and count > self.max_sequences:
            what = f"{prompts} prompts x n {n}" if prompts > 1 else f"{n} choices"  # the field, n, leads the message
            raise InputError(400, "n" if n > 1 else "prompt",
                             f"{what} = {count} sequences, but this server admits at most {self.max_sequences} "
                             "at once (the engine's max_running + max_queue): lower n or send fewer prompts per request")


def sampling_temperature(value: float | None) -> float | None:
    """The temperature the decoder gets: below GREEDY_BELOW_TEMPERATURE means greedy (0)."""
    return 0.0 if value is not None and value < GREEDY_BELOW_TEMPERATURE else value


def client_key(user: str | None) -> str | None:
    """The engine's fair-share key (scheduler.api.GenerationRequest.client) of a request naming its
    end user: OpenAI's `safety_identifier` (or the older `user` it replaces: "a unique identifier
    representing your end-user"), Anthropic's `metadata.user_id`. None (no id, or an empty one): the
    anonymous client, which every request without an id shares. Ids longer than fit are digested
    (the key only needs to tell users apart)."""
    if not user:
        return None
    key = f"user:{user}"
    if len(key) > MAX_CLIENT_CHARS:
        key = "user#" + hashlib.blake2b(user.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return key


# --------------------------------------------------------------------------------------------------
# Tokenizing off the event loop

_TOKENIZER_POOL = ThreadPoolExecutor(max_workers=TOKENIZER_THREADS, thread_name_prefix="tokenize")


async def off_loop(fn: Callable, *args, chars: int = 0):
    """Run `fn(*args)` (tokenizer-bound work) in the tokenizer pool and return its result; exceptions
    propagate. The event loop stays free meanwhile (HF tokenizers release the GIL while encoding).
    `chars`: the text size involved; at TRIM_AFTER_CHARS or more, freed heap is returned to the OS
    afterwards (glibc keeps it otherwise: a 2M-char encode leaves ~0.5 GB behind)."""
    return await asyncio.get_running_loop().run_in_executor(_TOKENIZER_POOL, _run_and_trim, fn, args, chars)


_GRAMMAR_POOL = ThreadPoolExecutor(max_workers=GRAMMAR_THREADS, thread_name_prefix="grammar-check")


async def grammar_off_loop(fn: Callable, *args):
    """Run `fn(*args)` (building and checking a request's output grammar: openai_sampling.output_grammar,
    chat_run.chat_grammar; llguidance takes milliseconds to seconds per schema) in a pool of its own and
    return its result; exceptions (InputError naming the field) propagate. In the tokenizer pool, a few
    requests with slow schemas held every other request's tokenizing behind them (a break-test: 12
    requests with 5,000-property schemas took a plain chat's first token from 0.04 s to 2.7 s)."""
    return await asyncio.get_running_loop().run_in_executor(_GRAMMAR_POOL, fn, *args)


def _run_and_trim(fn: Callable, args: tuple, chars: int):
    try:
        return fn(*args)
    finally:
        if chars >= TRIM_AFTER_CHARS:
            trim_heap()


def trim_heap() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def encode(tokenizer, text: str, add_special_tokens: bool = False, parse_special: bool = True) -> list[int]:
    """Token ids of `text` (CPU-bound: run it through off_loop). parse_special False: a special token's
    spelling in the text ("<|endoftext|>", "<|mask|>") is plain characters, never that token's id, as
    llama.cpp tokenizes with parse_special false (a document's text, /tokenize's parse_special)."""
    if not (text or add_special_tokens):
        return []
    if parse_special:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    return list(tokenizer.encode(text, add_special_tokens=add_special_tokens, split_special_tokens=True))

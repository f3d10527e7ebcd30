"""Grammar-constrained decoding (structured outputs): a request's grammar, matched token by token.

The grammar engine is llguidance (the one vLLM and SGLang use for JSON schema, regex, Lark and GBNF
grammars): `Grammar` is a compiled grammar plus the tokenizer it masks; each decoder run gets its own
`TokenConstraint` (a fresh matcher) from it. Per generated token the AR decoder asks for the bitmask
of allowed tokens (Segment.token_bitmask; the runner masks the logits before its argmax or sample read)
and reports the token it got. When the grammar is complete (`stopped`) the decoder ends the request as
if the model had produced EOS.

Only AR decoding is constrained: ReFusion fills slots out of left-to-right order (spec, "plan" and
"verify"), and a grammar constrains text left to right, so the engine runs grammar requests on the AR
path (scheduler.engine).

Guards around llguidance (found by a break-test):
  - compiling recurses once per nested rule and overflows an 8 MiB thread stack at ~2,500 chained
    rules (a segfault: the process dies), so every compile runs on a thread with a 512 MiB stack
    (`with_compile_stack`; virtual memory, touched only as deep as needed) and a grammar is at most
    MAX_GRAMMAR_CHARS long (60,000 chained rules, 1.5 MB, compile fine on that stack);
  - special tokens (mask, BOS, ...) are never allowed, and EOS only where the grammar may end: the
    bitmask llguidance computes can offer a special token whose text spells a literal of the grammar,
    which its matcher then refuses; where that text is forced (fast-forward), it is forced as the
    ordinary tokens that spell it, and a grammar that forces the token itself (Lark's `<|mask|>`,
    `<[id]>`: its spelling is refused) is a DecodeParamError naming the token;
  - a grammar that matches no text, or a parser limit met mid-request, ends the request with a
    DecodeParamError naming the grammar's source field (the API answers 400), never an EOS that would
    pass an incomplete text off as complete;
  - llguidance's own limits are counted in work units (Earley items and lexer fuel per mask), and an
    ambiguous grammar can stay under them while its cost grows with the text: `s: s s | s s s | C` over
    one-character terminals spent 2 s per token after ~400 characters, and every request in the batch
    waited for it at each step. So a request's grammar has a CPU-time budget per generated token (matching the
    token, the forced tokens after it and the next bitmask: `TokenConstraint(token_ms=...)`, the engine
    setting grammar_token_ms); past it the request ends with a DecodeParamError naming the grammar's
    source field, and the others go on. The time is the engine thread's CPU time less its garbage
    collections (`cpu_time_without_gc`): a full collection that starts inside a timed llguidance call
    (150 ms in a process with torch and Ray loaded) is no cost of the grammar, and it failed a valid
    request with a 400.

Plain Python over llguidance's host-side matcher: no torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from decoding.api import DecodeParamError
from decoding.cpu_clock import cpu_time_without_gc

MAX_GRAMMAR_CHARS = 1_000_000
COMPILE_STACK_BYTES = 512 << 20
_STACK_LOCK = threading.Lock()  # threading.stack_size is process-wide (with_compile_stack)


@dataclass(frozen=True)
class GrammarSpec:
    """What a front end asks for (GenerationRequest.grammar). `grammar` is an llguidance grammar: the
    string LLMatcher.grammar_from_json_schema / grammar_from_lark / grammar_from_regex returns.
    `prefill_tokens`: how many of the prompt's last tokens are the grammar's first ones (the opening of
    a forced tool call, which the API prefills): the matcher consumes them before decoding starts.
    `source`: the request field the grammar came from ("response_format.json_schema.schema", ...),
    named by every error about it. `open_ended`: the grammar allows free text (a chat template's turn
    end still applies)."""

    grammar: str
    prefill_tokens: int = 0
    source: str = "grammar"
    open_ended: bool = False  # free text around constrained parts (tool calls with tool_choice auto)


def with_compile_stack(fn, *args):
    """fn(*args) on a fresh thread with a COMPILE_STACK_BYTES stack; returns its result or raises its
    exception. For every llguidance call that compiles a grammar (module doc)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc

    with _STACK_LOCK:  # threading.stack_size is process-wide: set it only around this thread's start
        previous = threading.stack_size(COMPILE_STACK_BYTES)
        try:
            thread = threading.Thread(target=target, name="grammar-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def _short(message: str) -> str:
    """llguidance's message without the parser-state and grammar dumps it appends."""
    head = message.split("<state>", 1)[0].split("<grammar>", 1)[0]
    return " ".join(head.split())[:400]


def grammar_error(grammar: str) -> str:
    """'' when llguidance accepts `grammar` (compiled without a tokenizer: schema, regex and Lark
    errors), else its message (shortened)."""
    from llguidance import LLMatcher

    if len(grammar) > MAX_GRAMMAR_CHARS:
        return f"the compiled grammar has {len(grammar):,} characters; at most {MAX_GRAMMAR_CHARS:,} are served"
    message = with_compile_stack(LLMatcher.validate_grammar, grammar, None)
    return "" if message.startswith("WARNING") else _short(message)


class GrammarTokenizer:
    """The tokenizer view llguidance masks with, built on first use (~1 s for a 150k vocabulary) and
    shared by every grammar of one engine. `vocab_size` is the model's (the logits' width), which may
    exceed the tokenizer's: ids past the tokenizer's are never allowed. `keep` [ceil(V / 8)] uint8 has
    every bit set except the special tokens' (EOS included: its bit is set where the grammar may end)."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_id: int):
        self._hf, self.vocab_size, self.eos_token_id = hf_tokenizer, vocab_size, eos_token_id
        self._built = None
        self.keep: np.ndarray | None = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._built is None:
                import llguidance.hf

                built = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size, eos_token=self.eos_token_id)
                special = set(getattr(self._hf, "all_special_ids", []) or []) | {self.eos_token_id}
                special |= {t for t in range(min(built.vocab_size, len(self._hf))) if built.is_special_token(t)}
                keep = np.full(-(-self.vocab_size // 8) + 8, 0xFF, dtype=np.uint8)  # room for llguidance's padding
                for t in special:
                    if 0 <= t < self.vocab_size:
                        keep[t // 8] &= ~np.uint8(1 << (t % 8))
                self.keep, self._built = keep, built
            return self._built

    def text(self, token: int) -> str:
        """A token's text, a special token's included ("<|mask|>")."""
        return self._hf.decode([token], skip_special_tokens=False)

    def spell(self, token: int) -> list[int]:
        """The ordinary tokens that spell a special token's text ("<|mask|>" -> "<", "|", ...)."""
        return self._hf.encode(self.text(token), add_special_tokens=False, split_special_tokens=True)


class Grammar:
    """A compiled grammar for one request. Build it off the engine loop (compiling a large JSON schema
    can take 100 ms and more; it runs on a large-stack thread, module doc). Raises DecodeParamError
    naming spec.source for a grammar llguidance refuses, one that matches no text, or one whose prefill
    tokens it does not accept. `token_ms` and `clock`: each constraint's CPU-time budget per token
    (TokenConstraint); the compile and the forced start are not counted. `max_forced`: the most tokens
    of the forced start consumed here, the request's gen_length (llguidance matches forced tokens
    holding the GIL, the engine loop's too: a schema of 16,000 required constants forces ~350,000 tokens,
    seconds of a stalled loop, for a request that could return 16 of them)."""

    def __init__(self, tokenizer: GrammarTokenizer, spec: GrammarSpec, prompt_ids: list[int], token_ms: float = 0.0,
                 clock=cpu_time_without_gc, max_forced: int = MAX_GRAMMAR_CHARS):
        from llguidance import LLMatcher

        self.source, self.tokenizer, self.token_ms, self._clock = spec.source, tokenizer, token_ms, clock
        if len(spec.grammar) > MAX_GRAMMAR_CHARS:
            raise DecodeParamError(spec.source, f"the compiled grammar has {len(spec.grammar):,} characters; "
                                   f"at most {MAX_GRAMMAR_CHARS:,} are served: simplify it")
        llg_tokenizer = tokenizer.get()
        matcher = with_compile_stack(lambda: LLMatcher(llg_tokenizer, spec.grammar, log_level=0))
        if matcher.is_error():
            raise DecodeParamError(spec.source, _short(matcher.get_error()))
        if not 0 <= spec.prefill_tokens <= len(prompt_ids):
            raise DecodeParamError(spec.source, f"prefill_tokens must lie in 0..{len(prompt_ids)} (the prompt's "
                                   f"length), got {spec.prefill_tokens}")
        prefill = list(prompt_ids[len(prompt_ids) - spec.prefill_tokens:])
        if prefill and not matcher.consume_tokens(prefill):
            raise DecodeParamError(spec.source, f"the prompt's last {len(prefill)} tokens are not a start of the "
                                   f"grammar: {_short(matcher.get_error())}")
        # The text the grammar forces before any choice (a schema's `{"key": `, a fixed opening), here in
        # the compile thread rather than on the engine loop (its cost grows with its length), and the
        # first mask after it: parser and lexer limits met there, and grammars matching nothing, are
        # refused at submit
        first = TokenConstraint(matcher, tokenizer, spec.source)
        self.initial_forced = first.fast_forward(max_forced)
        if not first.stopped:
            first.bitmask()
        self._start = matcher

    def constraint(self) -> "TokenConstraint":
        """A matcher after the grammar's forced start (`initial_forced`, the decoder's first generated
        tokens), for a decoder's first run or a preempted request's rerun, with this grammar's CPU-time
        budget per token (`token_ms`, TokenConstraint)."""
        return TokenConstraint(self._start.deep_copy(), self.tokenizer, self.source, self.initial_forced,
                               token_ms=self.token_ms, clock=self._clock)


class TokenConstraint:
    """One decoder's position in its grammar. Every method raises DecodeParamError naming the grammar's
    source field when the grammar fails mid-request (a parser limit, or no way to go on), or when
    matching one generated token took more than `token_ms` milliseconds of CPU time (module doc): the
    llguidance calls from one bitmask to the next (`consume`, `fast_forward`, `bitmask`), timed with
    `clock` (seconds of the calling thread's CPU time less its garbage collections, cpu_time_without_gc:
    the engine loop's; other threads' load does not count). 0 = no budget."""

    def __init__(self, matcher, tokenizer: GrammarTokenizer, source: str, initial_forced: list[int] = (),
                 token_ms: float = 0.0, clock=cpu_time_without_gc):
        self._matcher, self._tokenizer, self._source = matcher, tokenizer, source
        self.initial_forced = list(initial_forced)  # forced at the start, already consumed (Grammar)
        self._token_ms, self._clock = token_ms, clock
        self._spent = 0.0  # CPU seconds since the last bitmask (this token's matching so far)
        self.last_token_ms = 0.0  # the CPU milliseconds the last token's matching took (0 before one)

    def _charge(self, started: float) -> None:
        """Count the CPU time since `started` against this token's budget."""
        self._spent += self._clock() - started
        if self._token_ms and self._spent * 1000 > self._token_ms:
            raise DecodeParamError(self._source, f"matching the grammar took {self._spent * 1000:.2f} ms of CPU time "
                                   f"for one token, more than the {self._token_ms:g} ms the engine allows "
                                   "(engine setting grammar_token_ms): simplify the grammar; what makes one slow "
                                   "to match is ambiguity (rules such as `s: s s`, overlapping short terminals) "
                                   "or size (thousands of properties or alternatives in one object or rule)")

    def _failed(self, what: str) -> DecodeParamError:
        error = self._matcher.get_error()
        if "Too many items" in error:  # the parser's item limit: what it had to keep track of grew without end
            return DecodeParamError(self._source, "the grammar grows without end here (a rule that only recurses, "
                                    "as a JSON schema only infinitely nested JSON satisfies: an object whose "
                                    "required property is the object again, `{\"$ref\": \"#\"}`): make the "
                                    "recursion optional")
        return DecodeParamError(self._source, f"{what}: {_short(error)}; simplify the grammar")

    def bitmask(self) -> bytes:
        """The tokens allowed next: one bit per token id (byte t // 8, bit t % 8), sized to the vocab
        (Segment.token_bitmask). Special tokens never; EOS only where the grammar may end."""
        started = self._clock()
        raw = self._matcher.compute_bitmask()
        self._charge(started)
        self.last_token_ms, self._spent = self._spent * 1000, 0.0  # the next token's budget starts
        dead_end = DecodeParamError(self._source, "no text can continue what the grammar has matched so far "
                                    "(it matches no text, or dead-ends): check the grammar")
        if self._matcher.is_error():
            if "NoExtensionBias" in self._matcher.get_error():  # llguidance's word for "no token allowed"
                raise dead_end
            raise self._failed("the grammar failed while decoding")
        allowed = np.frombuffer(raw, dtype=np.uint8)
        mask = allowed & self._tokenizer.keep[: len(raw)]
        eos = self._tokenizer.eos_token_id
        if self._matcher.is_accepting() and eos // 8 < len(mask):
            mask[eos // 8] |= np.uint8(1 << (eos % 8))
        if not mask.any():
            if allowed.any():
                raise DecodeParamError(self._source, "the grammar allows only a special token here (a literal "
                                       "that spells one, such as <|mask|>); special tokens are never generated: "
                                       "remove it")
            raise dead_end
        return mask.tobytes()

    def consume(self, token: int) -> None:
        """Advance past `token` (one the last bitmask allowed)."""
        started = self._clock()
        consumed = self._matcher.consume_token(token)
        self._charge(started)
        if not consumed:
            raise self._failed(f"token {token} was refused")

    def fast_forward(self, limit: int) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward tokens: the canonical tokens of
        the bytes no choice can change, without a last token that could still merge with what follows;
        a special token among them respelled with ordinary tokens), at most `limit`, consumed. [] when
        the next token is a real choice."""
        started = self._clock()
        forced = self._matcher.compute_ff_tokens()[: max(0, limit)]
        if self._matcher.is_error():  # llguidance then answers [] and reports itself stopped
            raise self._failed("the grammar failed while decoding")
        # llguidance spells the forced bytes with the tokenizer's own encoding, which reads a special
        # token's text ("<|mask|>") as that token; the matcher then refuses it, and offers nothing else
        # for those bytes. Such a token is forced as the ordinary tokens that spell its text instead.
        keep = self._tokenizer.keep
        if any(not keep[t // 8] >> (t % 8) & 1 for t in forced):
            spelled = [(t, [t] if keep[t // 8] >> (t % 8) & 1 else self._tokenizer.spell(t)) for t in forced]
            forced = [p for _, spelling in spelled for p in spelling][: max(0, limit)]
            self._check_spelled(spelled, self._matcher.validate_tokens(forced), len(forced))
        if forced and not self._matcher.consume_tokens(forced):
            raise self._failed(f"{len(forced)} forced tokens were refused")
        self._charge(started)
        return forced

    def _check_spelled(self, spelled: list[tuple[int, list[int]]], accepted: int, total: int) -> None:
        """DecodeParamError naming the special token whose ordinary spelling the grammar refuses: the
        grammar asks for the token itself (Lark's `<|endoftext|>` or `<[id]>`), not its text, and
        special tokens are never generated. `spelled`: each forced token with the tokens that write it;
        `accepted`: how many of the `total` respelled tokens the matcher takes (validate_tokens)."""
        if accepted >= total:
            return
        end = 0
        for token, spelling in spelled:
            end += len(spelling)
            if end > accepted:
                break
        text = self._tokenizer.text(token)
        raise DecodeParamError(self._source, f"the grammar requires the special token {text} (id {token}) here; "
                               f'special tokens are never generated: remove it, or quote it ("{text}") for its text')

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS)."""
        return self._matcher.is_stopped()

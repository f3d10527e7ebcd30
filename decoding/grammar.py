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

Plain Python over llguidance's host-side matcher: no torch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from decoding.api import DecodeParamError


@dataclass(frozen=True)
class GrammarSpec:
    """What a front end asks for (GenerationRequest.grammar). `grammar` is an llguidance grammar: the
    string LLMatcher.grammar_from_json_schema / grammar_from_lark / grammar_from_regex returns.
    `prefill_tokens`: how many of the prompt's last tokens are the grammar's first ones (the opening of
    a forced tool call, which the API prefills): the matcher consumes them before decoding starts."""

    grammar: str
    prefill_tokens: int = 0


def grammar_error(grammar: str) -> str:
    """'' when llguidance accepts `grammar` (compiled without a tokenizer: schema, regex and Lark
    errors), else its message."""
    from llguidance import LLMatcher

    message = LLMatcher.validate_grammar(grammar, None)
    return "" if message.startswith("WARNING") else message


class GrammarTokenizer:
    """The tokenizer view llguidance masks with, built on first use (~1 s for a 150k vocabulary) and
    shared by every grammar of one engine. `vocab_size` is the model's (the logits' width), which may
    exceed the tokenizer's: ids past the tokenizer's are never allowed."""

    def __init__(self, hf_tokenizer, vocab_size: int, eos_token_id: int):
        self._hf, self.vocab_size, self.eos_token_id = hf_tokenizer, vocab_size, eos_token_id
        self._built = None
        self._lock = threading.Lock()

    def get(self):
        with self._lock:
            if self._built is None:
                import llguidance.hf

                self._built = llguidance.hf.from_tokenizer(self._hf, n_vocab=self.vocab_size,
                                                           eos_token=self.eos_token_id)
            return self._built


class Grammar:
    """A compiled grammar for one request. Build it off the engine loop (compiling a large JSON schema
    can take 100 ms and more). Raises DecodeParamError("grammar", ...) for a grammar llguidance
    refuses, or whose prefill tokens it does not accept."""

    def __init__(self, tokenizer: GrammarTokenizer, spec: GrammarSpec, prompt_ids: list[int]):
        from llguidance import LLMatcher

        matcher = LLMatcher(tokenizer.get(), spec.grammar, log_level=0)
        if matcher.is_error():
            raise DecodeParamError("grammar", matcher.get_error())
        if not 0 <= spec.prefill_tokens <= len(prompt_ids):
            raise DecodeParamError("grammar", f"prefill_tokens must lie in 0..{len(prompt_ids)} (the prompt's "
                                   f"length), got {spec.prefill_tokens}")
        prefill = list(prompt_ids[len(prompt_ids) - spec.prefill_tokens:])
        if prefill and not matcher.consume_tokens(prefill):
            raise DecodeParamError("grammar", f"the prompt's last {len(prefill)} tokens are not a start of the "
                                   f"grammar: {matcher.get_error()}")
        self._pristine = matcher

    def constraint(self) -> "TokenConstraint":
        """A matcher at the grammar's start (a decoder's first run, or a preempted request's rerun)."""
        return TokenConstraint(self._pristine.deep_copy())


class TokenConstraint:
    """One decoder's position in its grammar."""

    def __init__(self, matcher):
        self._matcher = matcher

    def bitmask(self) -> bytes:
        """The tokens allowed next: one bit per token id (byte t // 8, bit t % 8), sized to the vocab
        (Segment.token_bitmask)."""
        return self._matcher.compute_bitmask()

    def consume(self, token: int) -> None:
        """Advance past `token`. Raises RuntimeError if the grammar does not allow it (the runner masked
        the read, so this is a bug, never user input)."""
        if not self._matcher.consume_token(token):
            raise RuntimeError(f"token {token} is not allowed by the grammar: {self._matcher.get_error()}")

    def fast_forward(self, limit: int) -> list[int]:
        """The tokens the grammar forces next (llguidance's fast-forward tokens: the canonical tokens of
        the bytes no choice can change, without a last token that could still merge with what follows),
        at most `limit`, consumed. [] when the next token is a real choice."""
        forced = self._matcher.compute_ff_tokens()[: max(0, limit)]
        if forced and not self._matcher.consume_tokens(forced):
            raise RuntimeError(f"forced tokens {forced} refused: {self._matcher.get_error()}")
        return forced

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS)."""
        return self._matcher.is_stopped()

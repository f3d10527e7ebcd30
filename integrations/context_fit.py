"""Prompt + generation against the model's context, counted as the engine will really generate it.

OpenAI's rule is prompt tokens + max_tokens <= the model's context, else 400 naming the field to change
(its message: "This model's maximum context length is N tokens. However, you requested M tokens ...").
Here the engine decodes gen_length rounded up to whole slots (decoding.params.DecodeParams, in AR and
ReFusion alike), so the check is made on ceil(max_tokens / slot_size) * slot_size:

    a requested max_tokens over the room left           -> InputError(400, "max_tokens" or the chat alias;
                                                            "at most" the KV cache's number where it holds
                                                            fewer: openai_requests.kv_bounded_request)
    an unset max_tokens                                  -> shrinks to the room left (as vLLM does; in a
                                                            shape the client set, whole steps of it); the
                                                            engine shrinks it to its KV cache too (fit_to_kv)
    a requested slot_size whose rounding overflows       -> InputError(400, "slot_size")
    the model's slot_size whose rounding overflows       -> a smaller slot_size is chosen (GenerationFit)
    a prompt that leaves no room                         -> InputError(400, the prompt's field)

(the first and last: ContextLengthError, an InputError carrying the numbers).
"""

from __future__ import annotations

from dataclasses import dataclass

from integrations.request_limits import InputError


class ContextLengthError(InputError):
    """Prompt + max_tokens over the context (400), with the numbers, for routes that word it their own
    way (Anthropic's Messages API). max_tokens None: the prompt alone leaves no room. most: the largest
    max_tokens admitted (max_tokens set), the context's or, where the engine's KV cache holds fewer beside
    this prompt, the cache's (`kv_bounded`); `limit`: prompt + most, the total a retry may ask for.
    longest_prompt: the longest prompt that leaves room to generate, where it is the engine's KV cache's
    (fewer than the context's less one; None: the context's)."""

    def __init__(self, field: str, message: str, prompt_tokens: int, max_tokens: int | None, context_length: int,
                 most: int | None = None, longest_prompt: int | None = None):
        super().__init__(400, field, message)
        self.prompt_tokens, self.max_tokens, self.context_length = prompt_tokens, max_tokens, context_length
        self.most, self.longest_prompt = most, longest_prompt

    @property
    def limit(self) -> int:
        return self.context_length if self.most is None else min(self.context_length, self.prompt_tokens + self.most)


def over_context(field: str, context_length: int, prompt_tokens: int, max_tokens: int, most: int,
                 kv_most: int | None = None, min_tokens: int = 0) -> ContextLengthError:
    """The 400 for a client's cap (`field`, `max_tokens`) over the room the context leaves after the
    prompt: "ask for at most `most`" (whole steps of a client's shape), or `kv_most` where the engine's KV
    cache holds fewer beside this prompt (the most its admission check takes: Scheduler.fitted), so that
    the number given is one the engine takes (the context's number was refused again by the KV cache).
    A `min_tokens` over the number given is named too (it must be at most max_tokens: generation_request)."""
    kv = "" if kv_most is None or kv_most >= most else \
        (f", and the engine's KV cache holds at most {kv_most:,} generated token{'s' if kv_most != 1 else ''} beside "
         "this prompt (the runner's num_blocks or kv_memory_bytes)")
    least = most if not kv else kv_most
    lower = f", and lower min_tokens ({min_tokens:,}) to at most that" if min_tokens > least else ""
    return ContextLengthError(field, f"{over_lead(field, context_length, prompt_tokens, max_tokens)}{kv}: ask for at "
                              f"most {least:,} or shorten the prompt{lower}", prompt_tokens, max_tokens,
                              context_length, least)


def over_lead(field: str, context_length: int, prompt_tokens: int, max_tokens: int) -> str:
    """How a cap goes over the context, the start of its 400 (OpenAI's words): "the model's maximum
    context length is C tokens; the prompt (P tokens) + max_tokens (M) is P + M"."""
    return (f"the model's maximum context length is {context_length:,} tokens; the prompt ({prompt_tokens:,} tokens) "
            f"+ {field} ({max_tokens:,}) is {prompt_tokens + max_tokens:,}")


@dataclass(frozen=True)
class GenerationFit:
    """What to ask the engine for. gen_length: tokens (prompt + gen_length rounded to whole slots fits
    the context); slot_size: a slot size chosen so that it fits, or None to keep the request's."""

    gen_length: int
    slot_size: int | None = None


def whole_slots(tokens: int, slot_size: int) -> int:
    """Tokens the engine generates for gen_length `tokens` (rounded up to a multiple of slot_size)."""
    return -(-tokens // slot_size) * slot_size


def fit_generation(context_length: int, prompt_tokens: int, max_tokens: int, *, requested: bool, slot_size: int = 1,
                   slot_requested: bool = False, blocks: int | None = None, prompt_field: str = "prompt",
                   max_tokens_field: str = "max_tokens") -> GenerationFit:
    """Fit max_tokens (and its rounding to slot_size) into context_length - prompt_tokens.

    context_length 0 means unknown: nothing is checked. `requested` / `slot_requested`: whether the
    client set max_tokens / slot_size (a default may shrink; a requested value is refused instead);
    `blocks`: the client's serial_num_blocks, if it set one. Raises InputError(400) naming prompt_field,
    max_tokens_field or "slot_size", with the largest value that would fit (a fitting slot_size for a
    requested one). In a shape the client set, the engine generates whole steps of it (slot_size x
    serial_num_blocks tokens; openai_sampling.SamplingFields.decode_params rounds gen_length up so, and
    the engine stops at max_tokens): those must fit, "at most N" is the most whose steps do, a default
    shrinks to that, and a shape of which not one step fits names slot_size, or serial_num_blocks (the
    room alone was followed by a 400 on slot_size, then one on serial_num_blocks: helper-193, -195)."""
    if not context_length:
        return GenerationFit(max_tokens)
    room = context_length - prompt_tokens
    if room < 1:
        raise ContextLengthError(prompt_field, f"is {prompt_tokens:,} tokens; the model's maximum context length is "
                                 f"{context_length:,} tokens, leaving no room to generate: shorten it",
                                 prompt_tokens, None, context_length)
    shaped = slot_requested or blocks is not None
    step = slot_size * (blocks or 1) if shaped else 1
    if room < step:
        _refuse_shape(room, slot_size, blocks or 1, slot_requested)
    most = room // step * step  # the longest generation that fits, in whole steps of a client's shape
    if max_tokens > room:
        if requested:
            raise over_context(max_tokens_field, context_length, prompt_tokens, max_tokens, most)
        max_tokens = most
    generated = -(-max_tokens // step) * step if shaped else whole_slots(max_tokens, slot_size)
    if generated <= room:
        return GenerationFit(max_tokens)
    if shaped and not requested:
        return GenerationFit(most)
    exceeds = (f"with the prompt's {prompt_tokens:,} tokens that exceeds the model's maximum context length of "
               f"{context_length:,} tokens")
    if blocks is not None:
        raise InputError(400, max_tokens_field, f"{max_tokens:,} in whole steps of slot_size {slot_size:,} x "
                                                f"serial_num_blocks {blocks:,} is {generated:,} generated tokens; "
                                                f"{exceeds}: ask for at most {most:,}, or send a smaller slot_size "
                                                "or serial_num_blocks")
    fitting = next(s for s in range(min(slot_size, room), 0, -1) if whole_slots(max_tokens, s) <= room)
    if slot_requested:
        raise InputError(400, "slot_size", f"{slot_size:,} rounds {max_tokens_field} {max_tokens:,} up to {generated:,} "
                                           f"generated tokens (whole slots); {exceeds}: choose a slot_size that "
                                           f"fits, such as {fitting:,}, or ask for at most {most:,} tokens")
    return GenerationFit(max_tokens, fitting)


def _refuse_shape(room: int, slot_size: int, blocks: int, slot_requested: bool) -> None:
    """InputError(400) for a client's shape of which not one step fits the `room` left after the prompt."""
    raise InputError(400, "slot_size" if slot_requested and (blocks == 1 or slot_size > room) else "serial_num_blocks",
                     f"a step of slot_size {slot_size:,} x serial_num_blocks {blocks:,} is {slot_size * blocks:,} "
                     f"tokens, more than the {room:,} the model's context leaves after the prompt: send a smaller "
                     "slot_size or serial_num_blocks, or leave them unset")

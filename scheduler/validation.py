"""Submit-time validation of a GenerationRequest: every error names the field and what to change."""

from __future__ import annotations

import secrets

from decoding.api import DecodeParamError
from scheduler.api import MAX_CLIENT_CHARS, MAX_TIME_MS, GenerationRequest, InvalidRequestError, Mode, Priority


def _token_list(value, field_name: str, vocab_size: int | None, *, allow_empty: bool) -> None:
    if not isinstance(value, (list, tuple)):
        raise InvalidRequestError(field_name, f"must be a list of token ids, got {type(value).__name__}")
    if not value and not allow_empty:
        raise InvalidRequestError(field_name, "is empty; give at least one token id")
    for i, tok in enumerate(value):
        if not isinstance(tok, int) or isinstance(tok, bool) or tok < 0 or (vocab_size and tok >= vocab_size):
            limit = f"0..{vocab_size - 1}" if vocab_size else ">= 0"
            raise InvalidRequestError(field_name, f"entry {i} is {tok!r}; token ids must be ints in {limit}")


def validate_request(spec: GenerationRequest, vocab_size: int | None, max_stop_strings: int) -> None:
    """Check the request's own fields (decoding params are checked by the decoder factory)."""
    if not isinstance(spec.request_id, str) or not spec.request_id:
        raise InvalidRequestError("request_id", "must be a non-empty string")
    _token_list(spec.prompt_ids, "prompt_ids", vocab_size, allow_empty=False)
    if spec.suffix_ids is not None:
        _token_list(spec.suffix_ids, "suffix_ids", vocab_size, allow_empty=True)
    if not isinstance(spec.mode, Mode):
        raise InvalidRequestError("mode", f"must be a scheduler.api.Mode ({', '.join(m.value for m in Mode)}), got {spec.mode!r}")
    if not isinstance(spec.priority, Priority):
        raise InvalidRequestError("priority", f"must be a scheduler.api.Priority (INTERACTIVE or BATCH), got {spec.priority!r}")
    if not isinstance(spec.params, dict):
        raise InvalidRequestError("params", f"must be a dict of decoding parameters, got {type(spec.params).__name__}")
    stop = spec.stop
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("stop", "must be a list of non-empty strings")
    if len(stop) > max_stop_strings:
        raise InvalidRequestError("stop", f"has {len(stop)} strings; give at most {max_stop_strings}")
    if spec.client is not None and (not isinstance(spec.client, str) or len(spec.client) > MAX_CLIENT_CHARS):
        raise InvalidRequestError("client", f"must be a string of at most {MAX_CLIENT_CHARS} characters or None "
                                  f"(who sent the request, for the fair share), got {spec.client!r:.80}")
    if not isinstance(spec.healed, str) or spec.healed.strip(" \t"):
        raise InvalidRequestError("healed", f"must be spaces and tabs only (the prompt's trailing blanks), got {spec.healed!r}")
    for name in ("tab_indent", "tab_indent_first_line", "crlf", "cr_only"):
        if not isinstance(getattr(spec, name), bool):
            raise InvalidRequestError(name, f"must be true or false, got {getattr(spec, name)!r:.80}")
    cap = spec.max_tokens
    if cap is not None and (not isinstance(cap, int) or isinstance(cap, bool) or cap < 0):
        raise InvalidRequestError("max_tokens", f"must be a non-negative integer number of tokens or None, got {cap!r}")
    if cap == 0 and spec.params.get("prompt_logprobs") is None:
        raise InvalidRequestError("max_tokens", "0 generates nothing: it is only for scoring the prompt "
                                  "(prompt_logprobs set); ask for at least 1 token")
    bias = spec.params.get("logit_bias")
    if isinstance(bias, dict) and vocab_size:
        outside = [t for t in bias if isinstance(t, int) and not isinstance(t, bool) and t >= vocab_size]
        if outside:
            raise InvalidRequestError("logit_bias", f"token id {outside[0]} is outside the vocabulary 0..{vocab_size - 1}")
    max_time = spec.max_time_ms
    if max_time is not None and (not isinstance(max_time, int) or isinstance(max_time, bool)
                                 or not 0 < max_time <= MAX_TIME_MS):
        shown = max_time
        if isinstance(max_time, int) and abs(max_time) >= 10**30:  # (not quoted whole: it may have thousands of digits)
            shown = f"an integer of {len(str(abs(max_time)))} digits"
        raise InvalidRequestError("max_time_ms", f"must be a positive integer number of milliseconds up to {MAX_TIME_MS} "
                                  f"(about 24.8 days), or None for no limit, got {shown!r}")


def parse_params(factory, params: dict):
    """The factory's parsed parameters; DecodeParamError becomes InvalidRequestError(field)."""
    try:
        return factory.parse_params(params)
    except DecodeParamError as exc:
        raise InvalidRequestError(exc.field, exc.message) from exc


DRAWN_SEED_BITS = 53  # JavaScript's Number.MAX_SAFE_INTEGER is 2^53 - 1


def with_seed(params: dict) -> dict:
    """The request's decoding params with a seed: its own, else a fresh random one (0..2^53-1: the seeds
    responses report, /completion's and /infill's generation_settings, survive a JavaScript client's
    JSON numbers, exact only below 2^53; a drawn 63-bit seed sent back rounded gave other text).

    OpenAI: without `seed`, sampling is fresh on every request; with one, it is reproducible. Greedy
    decoding (temperature 0) reads no random numbers, so it stays deterministic either way.
    """
    if params.get("seed") is not None:
        return params
    return {**params, "seed": secrets.randbits(DRAWN_SEED_BITS)}

"""How the engine gets decoders: the `DecoderFactory` protocol and the default one on `decoding/`.

The engine never constructs decoders itself, so unit tests run it on fake decoders and a second AR
model only needs a factory that builds AR decoders for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from decoding.api import Decoder, Handoff
from decoding.grammar import TokenConstraint
from decoding.healing import HealingConstraint
from scheduler.api import Mode


class DecoderFactory(Protocol):
    """Builds per-request decoders. `params` is whatever parse_params returned; the engine reads
    `params.gen_length` and, when present, `params.slot_size` and `params.serial_num_blocks`."""

    def parse_params(self, params: dict) -> Any:
        """Validate request parameters (model defaults for unset ones); raise DecodeParamError."""

    def create(self, mode: Mode, seq_id: str, prompt_ids: list[int], params: Any, suffix_ids: list[int] | None,
               *, constraint: TokenConstraint | None = None, healing: HealingConstraint | None = None) -> Decoder:
        """A fresh decoder (mode is REFUSION or AR). `constraint`: a grammar request's matcher; `healing`:
        a healed prompt's constraint on its first tokens (decoding.healing). AR only; the scheduler passes
        each only for requests that have one."""

    def from_handoff(self, mode: Mode, seq_id: str, handoff: Handoff, params: Any) -> Decoder:
        """A decoder continuing another one's text (mode switch at a block boundary); the handoff
        carries the infill suffix. Its stream_ids()/output_ids() include the handed-off text."""

    def resume(self, mode: Mode, seq_id: str, handoff: Handoff, params: Any,
               *, constraint: TokenConstraint | None = None, healing: HealingConstraint | None = None) -> Decoder:
        """A decoder continuing the ids its request's own run made (a preempted rerun retracing what it
        streamed, scheduler/replay.py); the handoff's context (prompt and suffix) is cached, its
        generated ids are not. AR reads the next token after them (decoding.ar.ARDecoder.resume);
        ReFusion continues as from a handoff."""


REQUEST_PARAMS = (
    "gen_length", "slot_size", "serial_num_blocks", "slot_threshold", "token_threshold",
    "temperature", "top_k", "top_p", "min_p", "seed", "logprobs", "prompt_logprobs", "presence_penalty",
    "frequency_penalty", "logit_bias", "ignore_eos", "min_tokens",
)


class ModelDecoderFactory:
    """The default factory: decoding.refusion / decoding.ar with decoding.params.

    Defaults for unset parameters: `refusion.json` of the model directory (`model_dir`, else found
    from the runner, see `find_model_dir`), else decoding.params.SERVING_DEFAULTS; EOS and mask ids
    always come from the runner's model.
    """

    def __init__(self, runner, model_dir=None):
        from decoding.params import SERVING_DEFAULTS, load_model_defaults

        model_dir = model_dir or find_model_dir(runner)
        defaults = load_model_defaults(model_dir) if model_dir else dict(SERVING_DEFAULTS)
        defaults["eos_token_id"] = runner.info.eos_token_id
        defaults["end_token_ids"] = tuple(getattr(runner.info, "end_token_ids", ()))  # (the tests' fake runners have none)
        defaults["mask_token_id"] = runner.info.mask_token_id
        self.defaults = defaults

    def parse_params(self, params: dict) -> Any:
        from decoding.api import DecodeParamError
        from decoding.params import DecodeParams

        for key in params:
            if key not in REQUEST_PARAMS:
                raise DecodeParamError(str(key), f"is not a request parameter; use one of {list(REQUEST_PARAMS)}")
        return DecodeParams.from_dict({**self.defaults, **params})

    def create(self, mode: Mode, seq_id: str, prompt_ids: list[int], params: Any, suffix_ids: list[int] | None,
               *, constraint: TokenConstraint | None = None, healing: HealingConstraint | None = None) -> Decoder:
        if constraint is None and healing is None:
            return _decoder_class(mode)(seq_id, prompt_ids, params, suffix_ids=suffix_ids)
        if mode is not Mode.AR:
            what = "a grammar" if constraint is not None else "token healing"
            raise ValueError(f"{seq_id}: {what} constrains AR decoding only, got mode {mode.value}")
        return _decoder_class(mode)(seq_id, prompt_ids, params, suffix_ids=suffix_ids, constraint=constraint,
                                    healing=healing)

    def from_handoff(self, mode: Mode, seq_id: str, handoff: Handoff, params: Any) -> Decoder:
        return _decoder_class(mode).from_handoff(seq_id, handoff, params)

    def resume(self, mode: Mode, seq_id: str, handoff: Handoff, params: Any,
               *, constraint: TokenConstraint | None = None, healing: HealingConstraint | None = None) -> Decoder:
        if mode is Mode.AR:
            from decoding.ar import ARDecoder

            return ARDecoder.resume(seq_id, handoff, params, constraint=constraint, healing=healing)
        return _decoder_class(mode).from_handoff(seq_id, handoff, params)


def find_model_dir(runner) -> Path | None:
    """The runner's model directory: its `model_dir` attribute, else the directory its tokenizer was
    loaded from (ModelRunner loads both from one directory); None for a runner built in memory."""
    for candidate in (getattr(runner, "model_dir", None), getattr(getattr(runner, "tokenizer", None), "name_or_path", None)):
        if candidate and (Path(candidate) / "config.json").is_file():
            return Path(candidate)
    return None


def _decoder_class(mode: Mode):
    if mode is Mode.AR:
        from decoding.ar import ARDecoder

        return ARDecoder
    from decoding.refusion import RefusionDecoder

    return RefusionDecoder

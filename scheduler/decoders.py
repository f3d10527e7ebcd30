"""How the engine gets decoders: the `DecoderFactory` protocol and the default one on `decoding/`.

The engine never constructs decoders itself, so unit tests run it on fake decoders and a second AR
model only needs a factory that builds AR decoders for it.
"""

from __future__ import annotations

from typing import Any, Protocol

from decoding.api import Decoder, Handoff
from scheduler.api import Mode


class DecoderFactory(Protocol):
    """Builds per-request decoders. `params` is whatever parse_params returned; the engine reads
    `params.gen_length` and, when present, `params.slot_size` and `params.serial_num_blocks`."""

    def parse_params(self, params: dict) -> Any:
        """Validate request parameters (model defaults for unset ones); raise DecodeParamError."""

    def create(self, mode: Mode, seq_id: str, prompt_ids: list[int], params: Any, suffix_ids: list[int] | None) -> Decoder:
        """A fresh decoder (mode is REFUSION or AR)."""

    def from_handoff(self, mode: Mode, seq_id: str, handoff: Handoff, params: Any, suffix_ids: list[int] | None) -> Decoder:
        """A decoder continuing another one's text (mode switch at a block boundary)."""


class ModelDecoderFactory:
    """The default factory: decoding.refusion / decoding.ar with decoding.params (model defaults from
    refusion.json in the model directory)."""

    def __init__(self, runner):
        self._info = runner.info
        self._model_dir = getattr(runner, "model_dir", None)

    def parse_params(self, params: dict) -> Any:
        from decoding.params import DecodeParams

        return DecodeParams.from_request(params, model_dir=self._model_dir, info=self._info)

    def create(self, mode: Mode, seq_id: str, prompt_ids: list[int], params: Any, suffix_ids: list[int] | None) -> Decoder:
        if mode is Mode.AR:
            from decoding.ar import ARDecoder

            return ARDecoder(seq_id, prompt_ids, params, self._info, suffix_ids=suffix_ids)
        from decoding.refusion import ReFusionDecoder

        return ReFusionDecoder(seq_id, prompt_ids, params, self._info, suffix_ids=suffix_ids)

    def from_handoff(self, mode: Mode, seq_id: str, handoff: Handoff, params: Any, suffix_ids: list[int] | None) -> Decoder:
        if mode is Mode.AR:
            from decoding.ar import ARDecoder

            return ARDecoder.from_handoff(seq_id, handoff, params, self._info, suffix_ids=suffix_ids)
        from decoding.refusion import ReFusionDecoder

        return ReFusionDecoder.from_handoff(seq_id, handoff, params, self._info, suffix_ids=suffix_ids)

"""Decoding parameters of one request, validated at construction, and per-model defaults.

Serving defaults (used when the model directory has no `refusion.json`):

    gen_length 128, slot_size 8, serial_num_blocks 4 (blocks of 32 tokens), slot_threshold 0.9,
    token_threshold 0.3, temperature 0 (greedy), top_k 0 (off), top_p 1.0, min_p 0 (off), seed 0.

The paper's code-task settings are gen 512, S=32, 4 blocks, slot 0.9, token 0.3. We keep its
thresholds and block count but default to a shorter span with smaller slots: editor completions are
short, and S=8 keeps a mostly-rejected slot cheap to complete (at most S branch rounds). A model
directory overrides any of these with a `refusion.json` holding a JSON object of the same names.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from decoding.api import DecodeParamError
from workers.batch import MAX_TOP_LOGPROBS, SEED_MAX

# Settings that shape AR decoding only (decoding/ar.py): a request carrying one runs AR
# (scheduler.engine), so a model's refusion.json may not make them defaults.
AR_ONLY_PARAMS = ("presence_penalty", "frequency_penalty", "logit_bias", "ignore_eos", "min_tokens")
# The model's own token ids (config.json, the tokenizer): a refusion.json may not set them, the engine
# decodes with the model's whatever the file says
MODEL_TOKEN_IDS = ("eos_token_id", "mask_token_id", "end_token_ids")
# Settings of one request, never a model's default: a request without `seed` samples with a fresh one
# (scheduler.validation.with_seed, as OpenAI's), and log probabilities go only to the requests that ask
PER_REQUEST_PARAMS = ("seed", "logprobs", "prompt_logprobs")

SERVING_DEFAULTS: dict = {
    "gen_length": 128,
    "slot_size": 8,
    "serial_num_blocks": 4,
    "slot_threshold": 0.9,
    "token_threshold": 0.3,
    "temperature": 0.0,
    "top_k": 0,
    "top_p": 1.0,
    "min_p": 0.0,
    "seed": 0,
}

GREEDY_BELOW_TEMPERATURE = 1e-5  # as vLLM: smaller temperatures are greedy (and 1/T would overflow)
MAX_TEMPERATURE = 100.0  # far past uniform; larger values only lose precision
MAX_TOP_K = 2**31 - 1  # far above any vocabulary (a larger top_k keeps every token); the device holds int64
MIN_TOP_P = 1e-6  # smaller values round to 0 in float32 and would drop every token
MAX_PENALTY = 2.0  # presence and frequency penalties: OpenAI's range is [-2, 2]
MAX_LOGIT_BIAS = 100.0  # OpenAI's range
MAX_LOGIT_BIAS_TOKENS = 300  # OpenAI refuses larger maps too
_INT_FIELDS = ("gen_length", "slot_size", "serial_num_blocks", "top_k", "seed", "eos_token_id", "mask_token_id")
_FLOAT_FIELDS = ("slot_threshold", "token_threshold", "temperature", "top_p", "min_p")


@dataclass
class DecodeParams:
    """How one request is decoded (ReFusion and AR share it; AR ignores the ReFusion-only fields).

    gen_length is rounded up to a multiple of slot_size (as the spec does); the block length
    gen_length / serial_num_blocks must then be a whole multiple of slot_size.
    """

    eos_token_id: int
    mask_token_id: int
    gen_length: int = SERVING_DEFAULTS["gen_length"]
    slot_size: int = SERVING_DEFAULTS["slot_size"]
    serial_num_blocks: int = SERVING_DEFAULTS["serial_num_blocks"]
    slot_threshold: float = SERVING_DEFAULTS["slot_threshold"]
    token_threshold: float = SERVING_DEFAULTS["token_threshold"]
    temperature: float = SERVING_DEFAULTS["temperature"]
    top_k: int = SERVING_DEFAULTS["top_k"]
    top_p: float = SERVING_DEFAULTS["top_p"]
    min_p: float = SERVING_DEFAULTS["min_p"]  # draws (AR samples, ReFusion drafts): drop tokens below min_p x the top one's
    seed: int = SERVING_DEFAULTS["seed"]
    # Return each generated token's log probability with this many alternatives (OpenAI logprobs /
    # top_logprobs, 0 .. MAX_TOP_LOGPROBS); None: none. Does not change what is decoded.
    logprobs: int | None = None
    # Score the prompt: each prompt token but the first gets its log probability given the tokens before
    # it, with this many alternatives (OpenAI `echo` with `logprobs`, vLLM `prompt_logprobs`; 0 ..
    # MAX_TOP_LOGPROBS); None: none. The prompt is then prefilled apart and never read from the prefix
    # cache (decoding.context). Does not change what is decoded.
    prompt_logprobs: int | None = None
    # OpenAI's penalties and logit bias (AR decoding only: the engine runs such requests AR): each
    # token already generated has presence_penalty + frequency_penalty x its count subtracted from its
    # logit, and logit_bias {token id: bias} is added, before the token is chosen (greedy or sampled)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict | None = None
    # vLLM's: EOS is never chosen (ignore_eos: the text runs to gen_length unless a stop string or a
    # grammar ends it), or not before min_tokens tokens are generated (stop strings neither:
    # scheduler.detokenizer). AR decoding only, as the penalties.
    ignore_eos: bool = False
    min_tokens: int = 0
    # The model's other end tokens (workers.tokenizer.end_token_ids: generation_config.json's eos_token_id
    # list, the tokenizer's eos_token): each ends the text exactly as eos_token_id does, in every
    # spec step that names EOS (ReFusion's verify and slot completion, AR), and is banned with it
    # (ignore_eos, min_tokens). `ends` holds all of them, eos_token_id included.
    end_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in _INT_FIELDS:
            _check_int(name, getattr(self, name))
        for name in _FLOAT_FIELDS:
            value = _check_number(name, getattr(self, name))
            setattr(self, name, float(value))
        self._check_ranges()
        if self.temperature < GREEDY_BELOW_TEMPERATURE:  # as vLLM: such temperatures mean greedy
            self.temperature = 0.0
        # Spec: gen_length is rounded up to a multiple of slot_size.
        self.gen_length = -(-self.gen_length // self.slot_size) * self.slot_size
        if self.gen_length % self.serial_num_blocks:
            raise DecodeParamError(
                "serial_num_blocks",
                f"gen_length {self.gen_length} (rounded up to a multiple of slot_size {self.slot_size}) "
                f"does not split into {self.serial_num_blocks} equal blocks; choose a block count that divides it",
            )
        if self.block_length % self.slot_size:
            raise DecodeParamError(
                "serial_num_blocks",
                f"block length gen_length/serial_num_blocks = {self.block_length} is not a multiple of "
                f"slot_size {self.slot_size}; use fewer blocks or a smaller slot_size",
            )

    def _check_ranges(self) -> None:
        if self.gen_length < 1:
            raise DecodeParamError("gen_length", f"must be >= 1, got {self.gen_length}")
        if self.slot_size < 1:
            raise DecodeParamError("slot_size", f"must be >= 1, got {self.slot_size}")
        if self.serial_num_blocks < 1:
            raise DecodeParamError("serial_num_blocks", f"must be >= 1, got {self.serial_num_blocks}")
        for name in ("slot_threshold", "token_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise DecodeParamError(name, f"must lie in [0, 1], got {getattr(self, name)}")
        if not 0 <= self.temperature <= MAX_TEMPERATURE:
            raise DecodeParamError("temperature", f"must lie in [0, {MAX_TEMPERATURE}] (0 = greedy), got {self.temperature}")
        if not 0 <= self.top_k <= MAX_TOP_K:
            raise DecodeParamError("top_k", f"must lie in 0..{MAX_TOP_K} (0 = off), got {self.top_k}")
        if not MIN_TOP_P <= self.top_p <= 1.0:
            raise DecodeParamError("top_p", f"must lie in [{MIN_TOP_P}, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise DecodeParamError("min_p", f"must lie in [0, 1] (0 = off), got {self.min_p}")
        if not 0 <= self.seed <= SEED_MAX:
            raise DecodeParamError("seed", f"must lie in 0..{SEED_MAX} (a signed 64-bit integer), got {self.seed}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = _check_number(name, getattr(self, name))
            if not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise DecodeParamError(name, f"must lie in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}] (OpenAI's range), got {value}")
            setattr(self, name, float(value))
        if self.logit_bias is not None:
            self.logit_bias = _check_logit_bias(self.logit_bias)
        if not isinstance(self.ignore_eos, bool):
            raise DecodeParamError("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")
        _check_int("min_tokens", self.min_tokens)
        if not 0 <= self.min_tokens <= self.gen_length:
            raise DecodeParamError("min_tokens", f"must lie in 0..gen_length ({self.gen_length}), got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value)
                if not 0 <= value <= MAX_TOP_LOGPROBS:
                    raise DecodeParamError(name, f"must lie in 0..{MAX_TOP_LOGPROBS} alternatives per token "
                                                 f"(or be unset), got {value}")
        for name in ("eos_token_id", "mask_token_id"):
            if getattr(self, name) < 0:
                raise DecodeParamError(name, f"must be a token id >= 0, got {getattr(self, name)}")
        if not isinstance(self.end_token_ids, (list, tuple)):
            raise DecodeParamError("end_token_ids", f"must be a list of token ids, got {self.end_token_ids!r}")
        for token in self.end_token_ids:
            _check_int("end_token_ids", token)
            if token < 0 or token == self.mask_token_id:
                raise DecodeParamError("end_token_ids", f"{token} is not a token id that can end a text")
        self.end_token_ids = tuple(self.end_token_ids)
        self.ends = frozenset((self.eos_token_id, *self.end_token_ids))

    @property
    def block_length(self) -> int:
        """Tokens per semi-autoregressive block."""
        return self.gen_length // self.serial_num_blocks

    @classmethod
    def from_dict(cls, values: dict) -> "DecodeParams":
        """Build from a name -> value mapping (request params merged over model defaults).

        Unknown names raise DecodeParamError naming the key, so a typo never passes silently.
        """
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                raise DecodeParamError(str(key), f"unknown decoding parameter; use one of {sorted(known)}")
        for name in ("eos_token_id", "mask_token_id"):
            if values.get(name) is None:
                raise DecodeParamError(name, "is required (read it from the model's config.json)")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)


def first_end(tokens: list[int], ends: frozenset[int]) -> int | None:
    """Index of the first of `tokens` that is an end token (DecodeParams.ends), or None. list.index per
    end id (one to three of them): C loops, as texts are cut at EOS several times per step."""
    return min((tokens.index(end) for end in ends if end in tokens), default=None)


def _check_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise DecodeParamError(name, f"must be an integer, got {value!r}")


def _check_number(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DecodeParamError(name, f"must be a finite number, got {value!r}")
    return value


def _check_logit_bias(value) -> dict:
    """{token id (int >= 0): bias in [-MAX_LOGIT_BIAS, MAX_LOGIT_BIAS]}, at most MAX_LOGIT_BIAS_TOKENS
    entries; raises DecodeParamError naming logit_bias."""
    if not isinstance(value, dict):
        raise DecodeParamError("logit_bias", f"must map token ids to biases, got {type(value).__name__}")
    if len(value) > MAX_LOGIT_BIAS_TOKENS:
        raise DecodeParamError("logit_bias", f"has {len(value)} entries; give at most {MAX_LOGIT_BIAS_TOKENS}")
    out = {}
    for token, bias in value.items():
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise DecodeParamError("logit_bias", f"key {token!r} is not a token id (an int >= 0)")
        _check_number("logit_bias", bias)
        if not -MAX_LOGIT_BIAS <= bias <= MAX_LOGIT_BIAS:
            raise DecodeParamError("logit_bias", f"bias {bias} of token {token} is outside [-100, 100] (OpenAI's range)")
        out[token] = float(bias)
    return out


def load_model_defaults(model_dir: str | Path) -> dict:
    """Default decoding parameters for a model directory.

    SERVING_DEFAULTS, overridden by `refusion.json` when present, plus eos_token_id and mask_token_id
    from `config.json` when it names them. Raises DecodeParamError("refusion.json", ...) for an
    unreadable or ill-formed file, an unknown key, a model token id (MODEL_TOKEN_IDS), a per-request
    setting (PER_REQUEST_PARAMS) or a non-zero AR-only setting (AR_ONLY_PARAMS): each would be taken and
    have no effect. An unknown key's message offers model_default_keys(). Values themselves are checked
    when DecodeParams is built.
    """
    model_dir = Path(model_dir)
    defaults = dict(SERVING_DEFAULTS)
    config_path = model_dir / "config.json"
    if config_path.is_file():
        config = _read_json_object(config_path)
        eos = config.get("eos_token_id")
        if isinstance(eos, list) and eos:
            eos = eos[0]
        if isinstance(eos, int):
            defaults["eos_token_id"] = eos
        if isinstance(config.get("mask_token_id"), int):
            defaults["mask_token_id"] = config["mask_token_id"]
    path = model_dir / "refusion.json"
    if path.is_file():
        overrides = _read_json_object(path)
        known = {f.name for f in fields(DecodeParams)}
        for key in overrides:
            if key not in known:
                raise DecodeParamError("refusion.json", f"unknown key {key!r} in {path}; use one of "
                                       f"{', '.join(model_default_keys())}")
            if key in MODEL_TOKEN_IDS:  # (accepted, and without effect)
                source = {"mask_token_id": "config.json or its tokenizer's <|mask|>",
                          "end_token_ids": "config.json's and generation_config.json's eos_token_id and the "
                                           "tokenizer's eos_token"}.get(key, "config.json")
                raise DecodeParamError("refusion.json", f"{key!r} in {path} is not a decode setting: the model's "
                                       f"{key} comes from its {source}; remove it")
            if key in PER_REQUEST_PARAMS:  # (accepted, and without effect, as the token ids)
                why = ("a request without a seed samples with a fresh one" if key == "seed" else
                       "log probabilities go only to the requests that ask for them")
                raise DecodeParamError("refusion.json", f"{key!r} in {path} is set per request, not as a model "
                                       f"default ({why}): remove it and send it with the requests that want it")
            if key in AR_ONLY_PARAMS and overrides[key]:  # ReFusion would drop it, AR apply it: not a default
                raise DecodeParamError("refusion.json", f"{key!r} in {path} shapes autoregressive decoding only, so it "
                                       "cannot be a model default: remove it and send it with the requests that want it")
        defaults.update(overrides)
    return defaults


def model_default_keys() -> list[str]:
    """The DecodeParams fields a refusion.json may set, in their order: each a default with an effect (not
    a model token id, a per-request setting nor an AR-only one)."""
    refused = set(MODEL_TOKEN_IDS) | set(PER_REQUEST_PARAMS) | set(AR_ONLY_PARAMS)
    return [f.name for f in fields(DecodeParams) if f.name not in refused]


def model_default_params(model_dir: str | Path, token_ids: dict) -> DecodeParams:
    """The model's decode defaults (load_model_defaults) built into DecodeParams with the token ids the
    runner decodes with (`token_ids`: workers.loader.check_model_dir's; config.json may leave the mask id
    to the tokenizer's <|mask|>), as every request starts from them (scheduler.decoders): a bad value in
    refusion.json (slot_size 0, gen_length "x") is refused when the model is loaded, not by each request.
    Raises DecodeParamError whose field is the file at fault, as its path (".../refusion.json"), and whose
    message names the key ("slot_size: must be >= 1, got 0")."""
    model_dir = Path(model_dir)
    try:
        return DecodeParams.from_dict({**load_model_defaults(model_dir), **token_ids})
    except DecodeParamError as exc:
        if exc.field in ("refusion.json", "config.json"):  # the file itself: unreadable, an unknown key
            raise DecodeParamError(str(model_dir / exc.field), exc.message) from None
        raise DecodeParamError(str(model_dir / "refusion.json"), str(exc)) from None


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DecodeParamError(path.name, f"cannot read {path}: {exc}") from exc
    if not isinstance(value, dict):
        raise DecodeParamError(path.name, f"{path} must hold a JSON object, got {type(value).__name__}")
    return value

"""config.json of a Qwen3 model directory: `read_config` parses and checks it into `ModelConfig`, the
shape and constants the engine needs (and the checkpoint shapes they imply).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from workers.model_dir import MASK_TOKEN, ModelDirError, _is_file


# The context of a config.json without max_position_embeddings: transformers' Qwen3Config default, which
# transformers and vLLM (reading the config through it) serve such a model with
DEFAULT_CONTEXT = 32768

# config.json's integer sizes (num_key_value_heads and head_dim may be absent: _ABSENT)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim")
# transformers' Qwen3Config values for a key config.json leaves out (vLLM reads the config through it),
# not hidden_size / num_attention_heads: a checkpoint loads here as it loads there (num_key_value_heads
# null is num_attention_heads, as there)
_ABSENT = {"num_key_value_heads": 32, "head_dim": 128}
_DEFAULT_ROPE_THETA = 10000.0  # Qwen3Config's default_theta, for a config that gives none


@dataclass(frozen=True)
class ModelConfig:
    """The Qwen3 shape and constants the engine needs, read from config.json."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    eos_token_id: int
    mask_token_id: int | None  # None: not in config.json; resolved from the tokenizer later
    # config.json's eos_token_id after the first when it is a list (checked by end_token_ids)
    more_eos_token_ids: tuple = ()

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor the model needs, by HF name, with its shape."""
        h, d = self.hidden_size, self.head_dim
        shapes = {"model.embed_tokens.weight": (self.vocab_size, h), "model.norm.weight": (h,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, h)
        for i in range(self.num_layers):
            p = f"model.layers.{i}."
            shapes.update({
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (self.num_heads * d, h),
                p + "self_attn.k_proj.weight": (self.num_kv_heads * d, h),
                p + "self_attn.v_proj.weight": (self.num_kv_heads * d, h),
                p + "self_attn.o_proj.weight": (h, self.num_heads * d),
                p + "self_attn.q_norm.weight": (d,),
                p + "self_attn.k_norm.weight": (d,),
                p + "mlp.gate_proj.weight": (self.intermediate_size, h),
                p + "mlp.up_proj.weight": (self.intermediate_size, h),
                p + "mlp.down_proj.weight": (h, self.intermediate_size),
            })
        return shapes


def _rope_theta(raw: dict, path: Path) -> float:
    """The RoPE base transformers 5 serves config.json with (Qwen3Config: convert_rope_params_to_dict and
    standardize_rope_params): rope_scaling, where set, replaces rope_parameters whole (Qwen's documented
    YaRN switch added to a 5.x config was served here with default RoPE, helper-215); a rope_theta
    missing there is the top level's, else Qwen3Config's 10,000; rope_parameters nested by layer type
    (`full_attention`, or the config's layer_types) are read entry by entry. Default RoPE over whole
    heads only: ModelDirError for another rope type (YaRN, linear, ...), a partial_rotary_factor other
    than 1, or layer types at different bases. Layer-type entries beside rope_parameters' own keys: its
    own rope_type and rope_theta, as transformers' Qwen3 reads them; without both, ModelDirError
    (`{"rope_theta": 1e6, "full_attention": null}` was served at 10,000, where transformers fails)."""
    key = "rope_scaling" if raw.get("rope_scaling") else "rope_parameters"
    params = raw.get(key) or {}
    top = raw.get("rope_theta", _DEFAULT_ROPE_THETA)
    labels = raw.get("layer_types") or ["full_attention"]  # (Qwen3Config's layer types without sliding windows)
    nested = [k for k in params if k in labels]
    own = [k for k in params if k not in nested and not isinstance(params[k], dict)] if nested else []
    if own and "rope_type" in params and "rope_theta" in params:
        nested = []  # transformers' Qwen3 reads these two alone and leaves the layer-type entries out
    elif own:  # (transformers' Qwen3 fails on it: KeyError 'rope_type' or 'rope_theta')
        raise ModelDirError(path, f"{key} holds both layer-type entries ({', '.join(nested)}) and its own "
                                  f"keys ({', '.join(own)}) but not both rope_type and rope_theta, which "
                                  "transformers reads alone then; give one form: the keys alone, or inside each "
                                  "layer type's entry")
    entries = [params[k] for k in nested if params[k] is not None] if nested else [params]
    thetas = set()
    for entry in entries:
        rope_type = entry.get("rope_type", entry.get("type", "default"))
        if rope_type != "default":
            raise ModelDirError(path, f"rope type {rope_type!r} is not supported; only default RoPE is")
        partial = entry.get("partial_rotary_factor", raw.get("partial_rotary_factor"))
        if partial is not None and partial != 1:
            raise ModelDirError(path, f"partial_rotary_factor is {partial!r}: RoPE over part of each head is not "
                                      "supported; only over the whole head (1.0)")
        thetas.add(entry.get("rope_theta", top))
    if len(thetas) > 1:
        raise ModelDirError(path, f"rope_parameters give its layer types different rope_theta ({sorted(thetas)}); "
                                  "one is supported")
    theta = thetas.pop() if thetas else top
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):  # (transformers fails on "1000000")
        raise ModelDirError(path, f"rope_theta is {theta!r}; give the RoPE base as a number (e.g. 1000000.0), or "
                                  "leave it out for 10000")
    return float(theta)


def _check_dtype(value, key: str, path: Path) -> None:
    """config.json's dtype (transformers 5.x) or torch_dtype (4.x): a torch dtype's name, as transformers
    reads it ("bfloat16", "float32", ...; "auto" is from_pretrained's argument, and transformers fails on
    it in config.json, helper-187). Raises ModelDirError naming the key."""
    import torch

    if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
        return
    raise ModelDirError(path, f"{key} is {value!r}; give a torch dtype's name (bfloat16, float16 or float32) "
                              "or leave it out")


def read_config(model_dir: Path) -> ModelConfig:
    """Parse and check config.json of a Qwen3 model directory."""
    path = Path(model_dir) / "config.json"
    raw = _read_config_object(path)
    _check_supported_architecture(raw, path)
    _check_integer_keys(raw, path)
    config = _model_config_of(raw, path)
    _check_consistent(config, raw, path)
    return config


def _read_config_object(path: Path) -> dict:
    """config.json's JSON object; ModelDirError when it is missing, unreadable, not JSON or no object."""
    if not _is_file(path):
        raise ModelDirError(path, "missing; a model directory needs config.json")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelDirError(path, f"not valid JSON ({exc})") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelDirError(path, f"cannot be read ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelDirError(path, f"must hold a JSON object, got {type(raw).__name__}")
    return raw


def _check_supported_architecture(raw: dict, path: Path) -> None:
    """ModelDirError unless the config is a plain Qwen3: no attention bias or sliding window, SiLU, no
    quantization."""
    if raw.get("model_type") not in (None, "qwen3"):
        raise ModelDirError(path, f"model_type is {raw.get('model_type')!r}; only 'qwen3' is supported")
    if raw.get("attention_bias") or raw.get("use_sliding_window"):
        raise ModelDirError(path, "attention_bias and use_sliding_window must be false for Qwen3")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelDirError(path, f"hidden_act is {raw['hidden_act']!r}; only 'silu' is supported")
    quantized = raw.get("quantization_config")
    if quantized not in (None, {}):  # its weights would be read as plain values, without their scales
        what = f"quant_method {quantized['quant_method']!r}" if isinstance(quantized, dict) and "quant_method" in quantized \
            else repr(quantized)[:80]
        raise ModelDirError(path, f"quantization_config ({what}) is set: quantized checkpoints are not supported; "
                                  "serve the model's unquantized (bfloat16) weights")


def _check_integer_keys(raw: dict, path: Path) -> None:
    """ModelDirError for a required size missing, a size or token id that is no integer in its range,
    or no eos_token_id."""
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
        if key not in raw:
            raise ModelDirError(path, f"missing required key {key!r}")
    for key in (*_SIZES, "eos_token_id", "mask_token_id"):  # ints, as transformers' config classes demand
        value = raw.get(key)
        if key == "eos_token_id" and isinstance(value, list):  # several end tokens: the first ends a response
            value = value[0] if value else None
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelDirError(path, f"{key} is {value!r}; it must be an integer")
        if value is not None and value < (0 if key.endswith("token_id") else 1):
            raise ModelDirError(path, f"{key} is {value}; it must be a " +
                                ("token id (>= 0)" if key.endswith("token_id") else "positive integer"))
    eos = raw.get("eos_token_id")
    if eos is None or eos == []:
        raise ModelDirError(path, "no eos_token_id: add the id of the token that ends a response (the "
                                  "tokenizer's eos_token)")


def _model_config_of(raw: dict, path: Path) -> ModelConfig:
    """The ModelConfig of checked config.json keys (defaults for the optional ones); ModelDirError for
    a value of the wrong type or form."""
    heads, eos = raw["num_attention_heads"], raw.get("eos_token_id")
    try:
        return ModelConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads", _ABSENT["num_key_value_heads"]) or heads,
            head_dim=raw.get("head_dim", _ABSENT["head_dim"]),
            rope_theta=_rope_theta(raw, path),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            mask_token_id=raw.get("mask_token_id"),
            more_eos_token_ids=tuple(eos[1:]) if isinstance(eos, list) else (),
        )
    except ModelDirError:  # _rope_theta's own, already naming the file and the fix
        raise
    except (TypeError, ValueError, AttributeError) as exc:  # "abc" for rms_norm_eps, a list for rope_parameters
        raise ModelDirError(path, f"a value has the wrong type or form ({exc}); sizes and ids are integers") from exc


def _check_consistent(config: ModelConfig, raw: dict, path: Path) -> None:
    """ModelDirError where the values disagree: a null head_dim, kv heads that do not divide the heads
    (num_key_value_heads left out: transformers' 32), token ids outside the vocabulary, the mask token the
    EOS token, a norm epsilon or rope theta not positive, a dtype or context that is no valid value."""
    heads = raw["num_attention_heads"]
    if config.head_dim is None:  # (transformers refuses a null head_dim too)
        raise ModelDirError(path, "head_dim is null; give the size of one attention head (an integer), or leave the "
                                  f"key out for transformers' {_ABSENT['head_dim']}")
    for name, token in (("eos_token_id", config.eos_token_id), ("mask_token_id", config.mask_token_id)):
        if token is not None and token >= config.vocab_size:
            raise ModelDirError(path, f"{name} {token} is outside the vocabulary (vocab_size {config.vocab_size})")
    if config.mask_token_id == config.eos_token_id:
        raise ModelDirError(path, f"mask_token_id and eos_token_id are both {config.eos_token_id}; the mask token "
                                  f"({MASK_TOKEN}) is a token of its own")
    if not (config.rms_norm_eps > 0 and config.rope_theta > 0):
        raise ModelDirError(path, "rms_norm_eps and rope_theta must be positive numbers")
    for key in ("dtype", "torch_dtype"):  # (transformers' tokenizer loading failed on it, blamed on tokenizer.json)
        if raw.get(key) is not None:
            _check_dtype(raw[key], key, path)
    context = raw.get("max_position_embeddings")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ModelDirError(path, f"max_position_embeddings is {context!r}; it must be a positive integer (the context)")
    if config.num_heads % config.num_kv_heads:
        absent = "" if "num_key_value_heads" in raw else \
            f" ({config.num_kv_heads}, transformers' Qwen3Config value for the key left out: set it)"
        raise ModelDirError(path, f"num_attention_heads {heads} is not a multiple of num_key_value_heads{absent}")

"""Reads an HF-format Qwen3 directory: config.json, safetensors weights (single file or sharded index),
tokenizer files, and the mask token id.

Weights are read with safetensors directly (no transformers model at run time); transformers is used
only for the tokenizer. Every problem with the directory raises `ModelDirError` naming the file and
what is wrong with it.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

MASK_TOKEN = "<|mask|>"
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"


class ModelDirError(ValueError):
    """The model directory cannot be loaded. `path` names the offending file; the message says why."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def _is_file(path: Path) -> bool:
    """path.is_file(), where a folder on the way that this user may not search (chmod 000, another user's
    0700 directory) raises ModelDirError naming the folder; Path.is_file raised a PermissionError traceback."""
    try:
        return path.is_file()
    except PermissionError:
        raise ModelDirError(path.parent, "cannot be read: permission denied; give the user running refusion read "
                                         "and search permission on it (chmod a+rx) and read permission on its "
                                         "files") from None


# config.json's integer sizes (num_key_value_heads and head_dim may be absent: derived)
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim")


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
    """rope_theta from the top level (transformers 4.x) or from rope_parameters (5.x); default RoPE only."""
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type != "default":
        raise ModelDirError(path, f"rope type {rope_type!r} is not supported; only default RoPE is")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise ModelDirError(path, "no rope_theta (top level or in rope_parameters)")
    return float(theta)


def read_config(model_dir: Path) -> ModelConfig:
    """Parse and check config.json of a Qwen3 model directory."""
    path = Path(model_dir) / "config.json"
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
    if raw.get("model_type") not in (None, "qwen3"):
        raise ModelDirError(path, f"model_type is {raw.get('model_type')!r}; only 'qwen3' is supported")
    if raw.get("attention_bias") or raw.get("use_sliding_window"):
        raise ModelDirError(path, "attention_bias and use_sliding_window must be false for Qwen3")
    if raw.get("hidden_act", "silu") != "silu":
        raise ModelDirError(path, f"hidden_act is {raw['hidden_act']!r}; only 'silu' is supported")
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
    heads, eos = raw["num_attention_heads"], raw.get("eos_token_id")
    if eos is None or eos == []:
        raise ModelDirError(path, "no eos_token_id: add the id of the token that ends a response (the "
                                  "tokenizer's eos_token)")
    try:
        config = ModelConfig(
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
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
    if config.hidden_size % heads and "head_dim" not in raw:
        raise ModelDirError(path, f"hidden_size {config.hidden_size} is not a multiple of num_attention_heads {heads}; "
                                  "set head_dim")
    for name, token in (("eos_token_id", config.eos_token_id), ("mask_token_id", config.mask_token_id)):
        if token is not None and token >= config.vocab_size:
            raise ModelDirError(path, f"{name} {token} is outside the vocabulary (vocab_size {config.vocab_size})")
    if config.mask_token_id == config.eos_token_id:
        raise ModelDirError(path, f"mask_token_id and eos_token_id are both {config.eos_token_id}; the mask token "
                                  f"({MASK_TOKEN}) is a token of its own")
    if not (config.rms_norm_eps > 0 and config.rope_theta > 0):
        raise ModelDirError(path, "rms_norm_eps and rope_theta must be positive numbers")
    context = raw.get("max_position_embeddings")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ModelDirError(path, f"max_position_embeddings is {context!r}; it must be a positive integer (the context)")
    if config.num_heads % config.num_kv_heads:
        raise ModelDirError(path, f"num_attention_heads {heads} is not a multiple of num_key_value_heads")
    return config


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Map tensor name -> safetensors file, from the shard index or the single file."""
    model_dir = Path(model_dir)
    index = model_dir / SHARD_INDEX
    if _is_file(index):
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:  # TypeError: not an object
            raise ModelDirError(index, f"not a safetensors index with a weight_map ({exc!r})") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) and shard.strip(". /")
                                                       for shard in weight_map.values()):
            raise ModelDirError(index, "weight_map must map each tensor name to its shard's file name "
                                       '({"model.norm.weight": "model-00001-of-00002.safetensors", ...})')
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not _is_file(shard):
                raise ModelDirError(shard, f"shard listed in {SHARD_INDEX} is missing" +
                                    (" (not a file)" if shard.exists() else ""))
        return files
    single = model_dir / SINGLE_FILE
    if not _is_file(single):
        raise ModelDirError(single, f"missing; expected {SINGLE_FILE} or {SHARD_INDEX}")
    with _opened(single) as handle:
        return {name: single for name in handle.keys()}


@contextlib.contextmanager
def _opened(path: Path, device: str = "cpu"):
    """safe_open of a safetensors file; a truncated, empty, foreign or unreadable file is a ModelDirError
    naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        open(path, "rb").close()  # safetensors reports a file this user may not read as missing
    except PermissionError:
        raise ModelDirError(path, "cannot be read: permission denied; give the user running refusion read "
                                  "permission on it (chmod a+r)") from None
    except OSError as exc:
        raise ModelDirError(path, f"cannot be read ({exc.strerror})") from None
    try:
        handle = safe_open(str(path), framework="pt", device=device)
    except (SafetensorError, OSError) as exc:
        raise ModelDirError(path, f"not a readable safetensors file ({exc}); re-download or re-save it") from exc
    with handle:
        yield handle


def read_weights(model_dir: Path, config: ModelConfig, *, dtype, device) -> dict:
    """Load every tensor the model needs, checked against the config's shapes, as `dtype` on `device`.
    Raises ModelDirError naming the file for a missing, misshapen or unreadable tensor, one holding a
    NaN or an infinity (damaged bytes loaded silently and decoded empty text), or one the model has no
    place for, and for a tied model's lm_head.weight that differs from its embedding
    (workers.checkpoint_checks)."""
    return _checked_tensors(model_dir, config, str(device), lambda handle, name: handle.get_tensor(name).to(dtype))


def check_model_dir(model_dir: Path | str) -> None:
    """Every check loading the directory makes (config.json, the weights as check_weights does, the
    tokenizer, the mask and end tokens): seconds, so a server can refuse a broken directory before it
    starts anything. Raises ModelDirError naming the file."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_weights(model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer(config, tokenizer, model_dir)
    end_token_ids(config, tokenizer, model_dir, resolve_mask_token_id(config, tokenizer, model_dir))


def check_weights(model_dir: Path | str, config: ModelConfig) -> None:
    """The checks read_weights makes of the safetensors weights (every tensor the config needs is there with
    its shape, none the model has no place for, a tied model's lm_head.weight equal to its embedding) from
    the files' headers: no tensor is read but, where a tied checkpoint holds lm_head.weight too, the two
    compared. Raises ModelDirError naming the file."""
    _checked_tensors(Path(model_dir), config, "cpu", None)


def _checked_tensors(model_dir: Path, config: ModelConfig, device: str, load) -> dict:
    """{name: load(handle, name)} for every tensor the model needs, each checked first (present, listed in
    its shard, the config's shape), and the checkpoint's other tensors (workers.checkpoint_checks); `load`
    None checks only (headers, and a tied model's lm_head.weight) and returns {}."""
    from workers.checkpoint_checks import TIED_HEAD, check_tied_head, check_unexpected

    files = checkpoint_files(model_dir)
    expected = config.expected_shapes()
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name not in files:
            index = Path(model_dir) / SHARD_INDEX
            where = index if _is_file(index) else Path(model_dir) / SINGLE_FILE
            raise ModelDirError(where, f"tensor {name!r} is missing from the checkpoint")
        by_file.setdefault(files[name], []).append(name)
    check_unexpected(files, expected, config.num_layers, config.tie_word_embeddings)
    weights = {}
    for path, names in by_file.items():
        with _opened(path, device) as handle:
            if not set(names) <= set(handle.keys()):
                missing = sorted(set(names) - set(handle.keys()))[0]
                raise ModelDirError(path, f"tensor {missing!r} is listed in the index but not in this shard")
            for name in names:
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != expected[name]:
                    raise ModelDirError(path, f"tensor {name!r} has shape {shape}, config.json implies {expected[name]}")
                if load is not None:
                    weights[name] = tensor = load(handle, name)
                    if tensor.is_floating_point() and not bool(tensor.isfinite().all()):  # one sync per tensor, at load
                        raise ModelDirError(path, f"tensor {name!r} holds NaN or infinite values as {tensor.dtype} "
                                                  "(damaged bytes, or values past what --dtype holds); re-download "
                                                  "or re-save it")
    if config.tie_word_embeddings and TIED_HEAD in files:
        with _opened(files[TIED_HEAD]) as head, _opened(files["model.embed_tokens.weight"]) as embedding:
            check_tied_head(head, embedding, files[TIED_HEAD])
    return weights


def load_tokenizer(model_dir: Path):
    """The transformers tokenizer of the directory (tokenizer.json / tokenizer_config.json)."""
    model_dir = Path(model_dir)
    if not _is_file(model_dir / "tokenizer.json") and not _is_file(model_dir / "tokenizer_config.json"):
        raise ModelDirError(model_dir / "tokenizer.json", "missing; the directory needs tokenizer files")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except TRANSFORMERS_LOAD_ERRORS as exc:  # a file of the wrong structure
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        culprit = model_dir / "config.json" if _is_config_error(exc) else _tokenizer_culprit(model_dir)
        raise ModelDirError(culprit, f"cannot be loaded ({type(exc).__name__}: {reason})") from exc


def _strict_dataclass_errors() -> tuple:
    """huggingface_hub's validation errors of config values (transformers 5 reads config.json through
    strict dataclasses: a string attention_dropout, a layer_types list of the wrong length); () on a
    huggingface_hub without them."""
    try:
        from huggingface_hub.errors import StrictDataclassError
    except ImportError:
        return ()
    return (StrictDataclassError,)


# What transformers' from_pretrained raises for a directory of the wrong structure
TRANSFORMERS_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError, *_strict_dataclass_errors())


def _is_config_error(exc: Exception) -> bool:
    return isinstance(exc, _strict_dataclass_errors())


def _tokenizer_culprit(model_dir: Path) -> Path:
    """The tokenizer file to name when transformers cannot load the tokenizer: one that is not a JSON object, else
    a missing tokenizer.json (tokenizer_config.json alone needs a slow tokenizer's files), else
    tokenizer.json."""
    for name in ("tokenizer_config.json", "tokenizer.json"):
        path = model_dir / name
        try:
            if path.is_file() and not isinstance(json.loads(path.read_text(encoding="utf-8")), dict):
                return path  # JSON, but not the object it must be
        except (OSError, ValueError):
            return path
    return model_dir / "tokenizer.json"


def check_tokenizer(config: ModelConfig, tokenizer, model_dir: Path) -> None:
    """Every id the tokenizer can produce has an embedding row: a tokenizer larger than config.json's
    vocab_size (a cut embedding, an added token) passed loading and then failed the prompts holding such a
    token, a server misconfiguration answered as the client's 400. Raises ModelDirError naming
    tokenizer.json."""
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if largest >= config.vocab_size:
        raise ModelDirError(Path(model_dir) / "tokenizer.json",
                            f"holds token id {largest} but config.json's vocab_size is {config.vocab_size} (the "
                            "embedding's rows): use the checkpoint's own tokenizer, or resize the embedding")


def end_token_ids(config: ModelConfig, tokenizer, model_dir: Path, mask_id: int) -> tuple[int, ...]:
    """The token ids besides `config.eos_token_id` that end a response: the rest of config.json's
    `eos_token_id` list, generation_config.json's `eos_token_id` (an id or a list: what transformers'
    `generate` stops on) and the tokenizer's `eos_token` (vLLM stops on it and generation_config's ids),
    in that order, each once. A Qwen3 chat checkpoint ends its turns with <|im_end|> while its config may
    name <|endoftext|>: generation ran past the end. Raises ModelDirError naming the file for an id that
    is not a token id, lies outside the vocabulary or is the mask token."""
    model_dir = Path(model_dir)
    found: list[tuple[Path, object]] = [(model_dir / "config.json", v) for v in config.more_eos_token_ids]
    path = model_dir / GENERATION_CONFIG
    if _is_file(path):
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelDirError(path, f"cannot be read as JSON ({exc})") from exc
        value = raw.get("eos_token_id") if isinstance(raw, dict) else None
        found += [(path, v) for v in (value if isinstance(value, list) else [value]) if v is not None]
    eos_token = getattr(tokenizer, "eos_token", None)
    if eos_token:
        token_id = tokenizer.convert_tokens_to_ids(eos_token)
        if isinstance(token_id, int) and token_id != tokenizer.unk_token_id:
            found.append((model_dir / "tokenizer_config.json", token_id))
    ends: list[int] = []
    for path, token_id in found:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < config.vocab_size:
            raise ModelDirError(path, f"eos_token_id {token_id!r} is not a token id of the vocabulary "
                                      f"(0..{config.vocab_size - 1})")
        if token_id == mask_id:
            raise ModelDirError(path, f"eos_token_id {token_id} is the mask token; the mask token never ends a text")
        if token_id != config.eos_token_id and token_id not in ends:
            ends.append(token_id)
    return tuple(ends)


def resolve_mask_token_id(config: ModelConfig, tokenizer, model_dir: Path) -> int:
    """`mask_token_id` from config.json, else the tokenizer's `<|mask|>` token. Raises ModelDirError naming
    config.json when neither gives one, when config.json's id is not the tokenizer's `<|mask|>` (decoding
    masked with config.json's without a word, whichever of the two the model learned to fill), when the id
    is outside the vocabulary, or when it is the EOS id."""
    tokenizer_id = tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    if tokenizer_id is None or tokenizer_id == tokenizer.unk_token_id or tokenizer_id < 0:
        tokenizer_id = None  # the tokenizer has no <|mask|>
    mask_id = tokenizer_id if config.mask_token_id is None else config.mask_token_id
    if mask_id is None:
        raise ModelDirError(Path(model_dir) / "config.json",
                            f"no mask_token_id and the tokenizer has no {MASK_TOKEN} token; add mask_token_id to "
                            "config.json")
    if tokenizer_id is not None and mask_id != tokenizer_id:
        raise ModelDirError(Path(model_dir) / "config.json",
                            f"mask_token_id is {mask_id} but the tokenizer's {MASK_TOKEN} is id {tokenizer_id}: set "
                            f"mask_token_id to {tokenizer_id} (or remove it to take the tokenizer's)")
    if not 0 <= mask_id < config.vocab_size:
        raise ModelDirError(Path(model_dir) / "config.json", f"mask_token_id {mask_id} outside the vocabulary")
    if mask_id == config.eos_token_id:
        raise ModelDirError(Path(model_dir) / "config.json", f"the tokenizer's {MASK_TOKEN} is id {mask_id}, which is "
                                                             "eos_token_id too; the mask token is a token of its own")
    return int(mask_id)

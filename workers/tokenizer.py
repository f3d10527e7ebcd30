"""The tokenizer of a model directory (transformers, used for nothing else) and the special tokens read
with it: every tokenizer id has an embedding row (`check_tokenizer`), the mask token's id
(`resolve_mask_token_id`) and the other ids that end a response (`end_token_ids`).
"""

from __future__ import annotations

import json
from pathlib import Path

from workers.model_config import ModelConfig
from workers.model_dir import GENERATION_CONFIG, MASK_TOKEN, ModelDirError, _is_file


def load_tokenizer(model_dir: Path):
    """The transformers tokenizer of the directory (tokenizer.json / tokenizer_config.json)."""
    model_dir = Path(model_dir)
    if not _is_file(model_dir / "tokenizer.json") and not _is_file(model_dir / "tokenizer_config.json"):
        raise ModelDirError(model_dir / "tokenizer.json", "missing; the directory needs tokenizer files")
    if not _is_file(model_dir / "tokenizer.json") and not any(_is_file(model_dir / name) for name in SLOW_VOCAB_FILES):
        # (transformers then tries to build one and says to install sentencepiece or tiktoken: helper-184)
        raise ModelDirError(model_dir / "tokenizer.json", "missing: tokenizer_config.json alone holds no vocabulary; "
                            "copy the checkpoint's tokenizer.json (or its vocab.json and merges.txt) into the directory")
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


# The vocabulary files of tokenizers transformers builds without a tokenizer.json (BPE, SentencePiece,
# WordPiece, tiktoken)
SLOW_VOCAB_FILES = ("vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                    "vocab.txt", "tokenizer.tiktoken")

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

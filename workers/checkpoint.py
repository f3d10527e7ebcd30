"""The safetensors weights of a model directory (one file or a sharded index): which file holds each
tensor, every tensor the model needs read and checked against the config's shapes (`read_weights`), or
the same checks from the files' headers alone (`check_weights`). Weights are read with safetensors
directly, no transformers model at run time; the checks of tensors beyond the ones the model needs are
workers.checkpoint_checks'.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from workers.model_config import ModelConfig
from workers.model_dir import SHARD_INDEX, SINGLE_FILE, ModelDirError, _is_file

PICKLED_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")  # transformers' older format, not read


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
        outside = sorted(shard for shard in set(weight_map.values())
                         if os.path.isabs(shard) or os.path.normpath(shard).split(os.sep)[0] == "..")
        if outside:  # (it loaded another directory's file; transformers refuses it)
            raise ModelDirError(index, f"weight_map names {outside[0]!r}, outside the model directory; shards are "
                                       "file names in it")
        files = {name: model_dir / shard for name, shard in weight_map.items()}
        for shard in sorted(set(files.values())):
            if not _is_file(shard):
                raise ModelDirError(shard, f"shard listed in {SHARD_INDEX} is missing" +
                                    (" (not a file)" if shard.exists() else ""))
        return files
    single = model_dir / SINGLE_FILE
    if not _is_file(single):
        pickled = [name for name in PICKLED_WEIGHTS if (model_dir / name).exists()]
        raise ModelDirError(single, f"missing; expected {SINGLE_FILE} or {SHARD_INDEX}" + (
            f" ({pickled[0]} is here: the engine reads safetensors only; re-save the model with transformers' "
            "save_pretrained(dir, safe_serialization=True))" if pickled else ""))
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
                piece = handle.get_slice(name)
                shape = tuple(piece.get_shape())
                if shape != expected[name]:
                    raise ModelDirError(path, f"tensor {name!r} has shape {shape}, config.json implies {expected[name]}")
                if not piece.get_dtype().startswith(("F", "BF")):  # I32, U8, BOOL: cast to floats without a word
                    raise ModelDirError(path, f"tensor {name!r} holds {piece.get_dtype()} values; weights are floating "
                                              "point (F32, BF16, F16, F8): re-save it")
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

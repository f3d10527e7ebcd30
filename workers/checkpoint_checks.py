"""Checks of a checkpoint's tensors beyond the ones the model needs (workers.checkpoint checks those are present
and of the config's shape): tensors the config's Qwen3 has no place for, and an output head that
tie_word_embeddings would drop.

Both loaded without a word before: a checkpoint with more layers than config.json's num_hidden_layers ran
the first ones and decoded garbage; a q_proj.bias was ignored; a tied model's own lm_head.weight was left
unused where transformers 5 uses it. Each raises `ModelDirError` naming the file that holds the tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

from workers.model_dir import ModelDirError

# Buffers old exports saved beside the weights; the engine computes them (RoPE frequencies from rope_theta)
HARMLESS_SUFFIXES = (".rotary_emb.inv_freq",)
TIED_HEAD = "lm_head.weight"
EMBEDDING = "model.embed_tokens.weight"
_LAYER = re.compile(r"model\.layers\.(\d+)\.")
_SHOWN = 3  # tensor names an error lists before "and N more"
_ROWS_PER_READ = 32768  # rows of the two embeddings compared at a time: a bounded copy of each (64 MiB of a
# bf16 1024-wide embedding; 4096-row reads took 3x as long as one whole read)


def check_unexpected(files: dict[str, Path], expected: dict, num_layers: int, tied: bool) -> None:
    """Raise ModelDirError when the checkpoint (`files`: tensor name -> file) holds a tensor outside
    `expected` (ModelConfig.expected_shapes): a layer at or past num_hidden_layers, named with the fix in
    config.json, else any other weight. Tolerated: HARMLESS_SUFFIXES, and lm_head.weight of a tied model
    (check_tied_head compares it)."""
    extra = sorted((name for name in files if name not in expected and not name.endswith(HARMLESS_SUFFIXES)
                    and not (tied and name == TIED_HEAD)), key=_natural)
    if not extra:
        return
    past = [name for name in extra if (m := _LAYER.match(name)) and int(m.group(1)) >= num_layers]
    if past:
        layers = sorted({int(_LAYER.match(name).group(1)) for name in past})
        raise ModelDirError(files[past[0]], f"holds tensors of layer{'s' if len(layers) > 1 else ''} "
                            f"{_listed(layers)} ({_listed(past)}) but config.json's num_hidden_layers is "
                            f"{num_layers}: set num_hidden_layers to the checkpoint's layer count, or remove "
                            "those layers' tensors")
    raise ModelDirError(files[extra[0]], f"holds {len(extra)} tensor{'s' if len(extra) > 1 else ''} a Qwen3 model "
                        f"has no place for ({_listed(extra)}), which the engine would ignore: remove "
                        f"{'them' if len(extra) > 1 else 'it'}, or give a Qwen3 checkpoint")


def check_tied_head(head, embedding, head_path: Path) -> None:
    """tie_word_embeddings true and lm_head.weight in the checkpoint: the engine outputs through
    model.embed_tokens.weight, so an lm_head.weight that differs from it (shape, or any value; one stored
    in another dtype is compared by value) raises ModelDirError naming `head_path`; an equal one (some
    exporters write both) passes, and so does a shard that does not hold the head its index lists (as
    transformers loads it: there is no head to compare). `head` and `embedding` are safetensors handles
    holding the two; both are read, _ROWS_PER_READ rows at a time."""
    if TIED_HEAD not in head.keys():
        return
    head_slice, embedding_slice = head.get_slice(TIED_HEAD), embedding.get_slice(EMBEDDING)
    shape = head_slice.get_shape()
    same = shape == embedding_slice.get_shape()
    for start in range(0, shape[0] if same else 0, _ROWS_PER_READ):
        rows = slice(start, start + _ROWS_PER_READ)
        if not head_slice[rows].equal(embedding_slice[rows]):  # (torch.equal compares across dtypes by value)
            same = False
            break
    if not same:
        raise ModelDirError(head_path, f"holds {TIED_HEAD}, which differs from {EMBEDDING}, but config.json's "
                                       "tie_word_embeddings is true, so the engine would output through "
                                       f"{EMBEDDING}: set tie_word_embeddings to false to use {TIED_HEAD}, or "
                                       f"remove {TIED_HEAD}")


def _natural(name: str) -> list:
    """Sort key putting model.layers.10 after model.layers.9."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listed(items: list) -> str:
    """The first _SHOWN items, and how many more."""
    shown = ", ".join(repr(item) if isinstance(item, str) else str(item) for item in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")

"""Builds small HF-format Qwen3 model directories for tests: a real byte-level BPE tokenizer trained on
a little Python source, a config with `mask_token_id`, and random weights saved by transformers.

These are random-weight models: good for exactness tests (engine vs transformers, engine vs oracle),
not for output quality. The shipped trained model lives in models/.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
from pathlib import Path

EOS = "<|endoftext|>"
MASK = "<|mask|>"
BOT = "<|beginoftext|>"


def _training_text() -> list[str]:
    """A few KB of real Python from the standard library: deterministic on a given interpreter."""
    import argparse
    import json as json_mod
    import textwrap

    return [inspect.getsource(m) for m in (textwrap, json_mod.decoder, argparse)]


def build_tokenizer(out_dir: Path, vocab_size: int = 384, extra_text: list[str] = ()):
    """Train the project's byte-level BPE (training.tokenizer_build) on a little stdlib source and save
    tokenizer.json + tokenizer_config.json in out_dir. extra_text joins the training text (a test's
    own phrases then encode in few tokens)."""
    from training.tokenizer_build import build_bpe_tokenizer

    fast = build_bpe_tokenizer(_training_text() + list(extra_text), vocab_size)
    fast.save_pretrained(str(out_dir))
    return fast


def make_tiny_model(
    out_dir: Path,
    *,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int = 16,
    intermediate_size: int = 128,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    max_shard_size: str | None = None,
) -> Path:
    """Write a random-weight Qwen3 model directory (float32) and return its path."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    config = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=head_dim,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tok.convert_tokens_to_ids(EOS),
        pad_token_id=tok.convert_tokens_to_ids(EOS),
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).to(torch.float32)
    # Random init gives near-uniform logits; scale the head so argmaxes are decisive and ties rare.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0) if not tie_word_embeddings else model.model.embed_tokens.weight.mul_(4.0)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(out_dir), safe_serialization=True, **kwargs)
    cfg_path = out_dir / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["mask_token_id"] = tok.convert_tokens_to_ids(MASK)
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out_dir


@contextlib.contextmanager
def unreadable(path: Path):
    """`path` (a model directory or one of its files) chmod 000 for the block, its mode restored after; the
    test is skipped where permissions do not bind (root reads anything, unless its capabilities are dropped:
    `setpriv --bounding-set=-dac_override,-dac_read_search` runs such a test as root)."""
    import pytest

    old = path.stat().st_mode & 0o777
    path.chmod(0)
    try:
        if os.geteuid() == 0 and os.access(path, os.R_OK):
            pytest.skip("running as root: file permissions do not apply")
        yield path
    finally:
        path.chmod(old)

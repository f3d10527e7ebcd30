"""Shared fixtures. Model directories are built once per test session (seconds on 2 cores)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

REPO = Path(__file__).resolve().parents[1]
SHIPPED_MODEL = REPO / "models" / "refusion-tiny-code"


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A random-weight tiny Qwen3 (GQA 4/2 heads, tied head) with a real BPE tokenizer and mask token."""
    from model_factory import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_untied_model_dir(tmp_path_factory) -> Path:
    """Like tiny_model_dir but with an untied LM head and 3 layers, MHA (4/4 heads)."""
    from model_factory import make_tiny_model

    return make_tiny_model(
        tmp_path_factory.mktemp("tiny-untied"), num_layers=3, num_kv_heads=4, tie_word_embeddings=False, seed=1
    )

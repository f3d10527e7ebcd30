"""Fixtures for decoder tests: a ModelRunner and a transformers model over the same random weights."""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from refusion_cases import PROMPTS  # noqa: E402


@pytest.fixture(scope="session")
def untied_runner(tiny_untied_model_dir):
    """A session (runner + its own KV) on the untied random model: its drafts vary more than the tied
    one's (which repeats)."""
    import torch

    from workers.runner import ModelRunner
    from workers.session import RunnerSession

    return RunnerSession(ModelRunner(tiny_untied_model_dir, dtype=torch.float32, device="cpu"))


@pytest.fixture(scope="session")
def untied_hf(tiny_untied_model_dir):
    import torch
    from transformers import Qwen3ForCausalLM

    return Qwen3ForCausalLM.from_pretrained(tiny_untied_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def frequent_tokens(untied_runner, untied_hf):
    """Tokens the model drafts most often (for a mask run after a prompt): used as EOS to force EOS paths."""
    import torch

    ids = untied_runner.tokenizer(PROMPTS[0])["input_ids"]
    mask = untied_runner.info.mask_token_id
    with torch.no_grad():
        logits = untied_hf(input_ids=torch.tensor([ids + [mask] * 32])).logits[0, len(ids) :]
    return [tok for tok, _ in Counter(logits.argmax(-1).tolist()).most_common(3)]

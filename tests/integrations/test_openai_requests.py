"""integrations/openai_requests.py: the token ids of a completions prompt (no server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from integrations.http_errors import APIError
from integrations.openai_requests import prompt_ids
from workers.loader import load_tokenizer

SHIPPED = Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code"


async def test_token_ids_are_checked_against_the_vocabulary_at_its_boundary():
    """The first id past the vocabulary (len(tokenizer)) is a 400 naming the prompt's field; it would index
    past the embedding, a device assert on a GPU that fails every request of the replica (helper-222: only
    10**9 was tried)."""
    tokenizer = load_tokenizer(SHIPPED)
    vocab = len(tokenizer)
    assert await prompt_ids(tokenizer, [0, vocab - 1]) == [0, vocab - 1]
    for bad in ([vocab], [1, vocab + 1], [-1]):
        with pytest.raises(APIError) as err:
            await prompt_ids(tokenizer, bad, "prompt.1")
        assert err.value.status == 400 and err.value.param == "prompt.1" and str(bad[-1]) in str(err.value)

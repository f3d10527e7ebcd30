"""FlexStepAttention (reads the paged cache in place) equals the portable StepAttention on the CPU in
float32: logits of every row and the K/V written, for a prefill, decode steps, a ReFusion plan (kept
context + dropped masks), a verify, branches (runs attending their own run after the shared prefix), a
sequence with no context beside ones with partial last blocks, and prefix blocks shared by two
sequences (prefix cache adoption). flex_attention runs eagerly here (its reference path), so the pool is
small; the compiled CUDA kernel is checked in tests/gpu."""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")

from attention_cases import compare, decoding_shapes, runner_sessions, shared_prefix  # noqa: E402
from hf_oracle import segment  # noqa: E402
from workers.loader import read_config  # noqa: E402
from workers.model import random_model  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402


@pytest.fixture()
def sessions(tiny_model_dir):
    return runner_sessions(tiny_model_dir, {name: {"attention": name} for name in ("sdpa", "flex")}, seed=2,
                           num_blocks=24)


def _both(sessions, segments):
    return compare(sessions, segments, "flex")


def test_flex_equals_sdpa_over_decoding_shapes(sessions):
    sessions, mask = sessions
    decoding_shapes(sessions, "flex", mask)


def test_flex_equals_sdpa_with_shared_prefix_blocks(sessions):
    shared_prefix(sessions[0], "flex")


def test_unknown_attention_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="attention: .flash. is not one of"):
        ModelRunner(tiny_model_dir, device="cpu", num_blocks=8, attention="flash")


def test_the_query_tile_divides_for_every_step_length_and_head_ratio():
    """Compiled flex_attention's decoding kernel (below 128 query rows) stacks the query heads of a KV head
    into one tile of next_pow2(rows x heads_per_kv) rows (at least 16) and needs it to divide the mask's
    query block. At the 8B shape (4 query heads per KV head) a 64-row step tiled 256 rows against a fixed
    128 and compilation found no kernel config; the query block now grows with the step."""
    from workers.attention_flex import Q_BLOCK, query_block

    assert query_block(64, 4) == 256 and query_block(32, 4) == Q_BLOCK and query_block(1, 1) == Q_BLOCK
    for heads_per_kv in (1, 2, 4, 5, 8):
        for rows in range(1, 200):
            tile = max(16, 1 << (rows * heads_per_kv - 1).bit_length())
            block = query_block(rows, heads_per_kv)
            assert block >= Q_BLOCK and block % tile == 0 and block & (block - 1) == 0, (rows, heads_per_kv)


def test_flex_equals_sdpa_at_four_query_heads_per_kv_head_with_a_tall_step(tiny_model_dir):
    """The 8B head ratio (4 query heads per KV head) and a 40-token step beside a decode row: the mask's
    query block is then 256 rows (query_block), taller than the step; results are unchanged."""
    base = read_config(tiny_model_dir)
    cfg = dataclasses.replace(base, num_layers=1, num_heads=4 * base.num_kv_heads)
    model = random_model(cfg, dtype=torch.float32, device="cpu", seed=3, std=0.2)
    sessions = {name: RunnerSession(ModelRunner.from_model(model, mask_token_id=cfg.mask_token_id, block_size=4,
                                                           num_blocks=40, attention=name)) for name in ("sdpa", "flex")}
    _both(sessions, [segment("a", 0, list(range(5, 15))), segment("b", 0, [20, 21, 22])])
    _both(sessions, [segment("a", 10, list(range(40, 80))), segment("b", 3, [23])])


@pytest.mark.parametrize("block_size", [8, 24, 96])
def test_flex_on_cuda_refuses_a_block_size_its_kernel_cannot_tile(block_size):
    """Compiled flex attention tiles the KV block (FlexStepAttention.kernel_options' BLOCK_N = the block
    below 64, the default 64-token tile at and above it): a block of 8, 24 or 96 tokens is no legal
    Triton tile or no multiple of the default one, which would fail the first step's compile on a GPU
    (helper-215, read on this CPU). The runner's step function refuses it up front, naming block_size;
    powers of two from 16 and every size on the CPU (eager flex) are taken."""
    from workers.runner_options import step_function

    with pytest.raises(ValueError, match=f"^block_size: {block_size} with attention 'flex' on CUDA"):
        step_function(False, torch.device("cuda"), "flex", block_size=block_size)
    for taken in (16, 32, 64, 128):
        step_function(False, torch.device("cuda"), "flex", block_size=taken)
    step_function(False, torch.device("cpu"), "flex", block_size=block_size)
    step_function(False, torch.device("cuda"), "sdpa", block_size=block_size)

"""Reads an HF-format Qwen3 directory: config.json, safetensors weights (single file or sharded index),
tokenizer files, and the mask token id.

Weights are read with safetensors directly (no transformers model at run time); transformers is used
only for the tokenizer. Every problem with the directory raises `ModelDirError` naming the file and
what is wrong with it.

This module is the entry point: `check_model_dir`, and every name of the parts, each in its own module:
    model_dir.py     file names, the mask token's text, ModelDirError
    model_config.py  config.json -> ModelConfig (read_config)
    checkpoint.py    safetensors weights: checkpoint_files, read_weights, check_weights
    tokenizer.py     load_tokenizer, check_tokenizer, resolve_mask_token_id, end_token_ids
"""

from __future__ import annotations

from pathlib import Path

from workers.checkpoint import check_weights, checkpoint_files, read_weights
from workers.model_config import ModelConfig, read_config
from workers.model_dir import GENERATION_CONFIG, MASK_TOKEN, SHARD_INDEX, SINGLE_FILE, ModelDirError
from workers.tokenizer import (TRANSFORMERS_LOAD_ERRORS, check_tokenizer, end_token_ids, load_tokenizer,
                               resolve_mask_token_id)

__all__ = ["GENERATION_CONFIG", "MASK_TOKEN", "SHARD_INDEX", "SINGLE_FILE", "TRANSFORMERS_LOAD_ERRORS", "ModelConfig",
           "ModelDirError", "check_model_dir", "check_tokenizer", "check_weights", "checkpoint_files",
           "end_token_ids", "load_tokenizer", "read_config", "read_weights", "resolve_mask_token_id"]


def check_model_dir(model_dir: Path | str) -> dict:
    """Every check loading the directory makes (config.json, the weights as check_weights does, the
    tokenizer, the mask and end tokens): seconds, so a server can refuse a broken directory before it
    starts anything. Returns the token ids the runner decodes with (ModelRunner's ModelInfo):
    {"eos_token_id", "mask_token_id" (config.json's, else the tokenizer's <|mask|>), "end_token_ids"}.
    Raises ModelDirError naming the file."""
    model_dir = Path(model_dir)
    config = read_config(model_dir)
    check_weights(model_dir, config)
    tokenizer = load_tokenizer(model_dir)
    check_tokenizer(config, tokenizer, model_dir)
    mask_id = resolve_mask_token_id(config, tokenizer, model_dir)
    return {"eos_token_id": config.eos_token_id, "mask_token_id": mask_id,
            "end_token_ids": end_token_ids(config, tokenizer, model_dir, mask_id)}

"""Tensors beyond the ones the model needs (workers.checkpoint_checks): layers past num_hidden_layers and
weights a Qwen3 has no place for are refused, RoPE buffers of old exports tolerated; a tied model's
lm_head.weight must equal its embedding. Each is found by loading and by the quick check alike."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.loader import ModelDirError, check_model_dir  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402


def _copy_with(src: Path, tmp_path: Path, edit_weights=None, **config) -> Path:
    """A copy of `src` with its weights passed through edit_weights(dict) and config.json's keys updated."""
    from safetensors.torch import load_file, save_file

    model = Path(shutil.copytree(src, tmp_path / "model"))
    if edit_weights is not None:
        weights = load_file(model / "model.safetensors")
        edit_weights(weights)
        save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    if config:
        path = model / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return model


def _refused(model: Path, match: str) -> ModelDirError:
    """The error loading raises, after checking the quick check raises the same."""
    with pytest.raises(ModelDirError, match=match) as checked:
        check_model_dir(model)
    with pytest.raises(ModelDirError, match=match) as loaded:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert checked.value.path == loaded.value.path == str(model / "model.safetensors")
    return loaded.value


def test_layers_past_num_hidden_layers_are_refused(tiny_untied_model_dir, tmp_path):
    """A 3-layer checkpoint with num_hidden_layers 2 ran the first two layers and decoded garbage, no word."""
    model = _copy_with(tiny_untied_model_dir, tmp_path, num_hidden_layers=2, layer_types=["full_attention"] * 2)
    err = _refused(model, "holds tensors of layer 2 .*'model.layers.2.input_layernorm.weight'.* and 8 more")
    assert "num_hidden_layers is 2: set num_hidden_layers to the checkpoint's layer count" in err.problem


def test_a_weight_qwen3_has_no_place_for_is_refused(tiny_model_dir, tmp_path):
    """A stray q_proj.bias (a Qwen2 export, say) was ignored: the model ran without it."""
    model = _copy_with(tiny_model_dir, tmp_path, lambda w: w.update({
        "model.layers.0.self_attn.q_proj.bias": torch.zeros(64)}))
    _refused(model, r"holds 1 tensor a Qwen3 model has no place for \('model.layers.0.self_attn.q_proj.bias'\)")


def test_rope_buffers_of_old_exports_are_tolerated(tiny_model_dir, tmp_path):
    model = _copy_with(tiny_model_dir, tmp_path, lambda w: w.update({
        f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.ones(8) for i in range(2)}))
    check_model_dir(model)
    ModelRunner(model, device="cpu", num_blocks=8)


def test_a_tied_model_with_its_own_differing_head_is_refused(tiny_model_dir, tmp_path):
    """tie_word_embeddings true beside an lm_head.weight of other values: the engine output through the
    embedding (transformers 5 through lm_head), no word."""
    def add_head(weights):
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()
        weights["lm_head.weight"][5, 3] += 1.0

    err = _refused(_copy_with(tiny_model_dir, tmp_path, add_head), "differs from model.embed_tokens.weight")
    assert "set tie_word_embeddings to false to use lm_head.weight, or remove lm_head.weight" in err.problem


def test_a_tied_model_with_an_equal_head_loads(tiny_model_dir, tmp_path):
    """Some exporters write both tensors of a tied model."""
    model = _copy_with(tiny_model_dir, tmp_path, lambda w: w.update(
        {"lm_head.weight": w["model.embed_tokens.weight"].clone()}))
    check_model_dir(model)
    ids = list(range(5, 15))
    [res] = RunnerSession(ModelRunner(model, device="cpu", num_blocks=8)).execute([segment("t", 0, ids)])
    assert (result_logits(res) - dense_logits(tiny_model_dir, ids)).abs().max() < 1e-4


def test_a_tied_sharded_checkpoint_whose_index_lists_a_head_no_shard_holds_loads(tiny_model_dir, tmp_path):
    """An index that lists lm_head.weight in a shard without it (a tied model's exporter): transformers
    loads it, and so did this loader, until the tied-head check opened the tensor (SafetensorError
    traceback from refusion serve)."""
    model = _copy_with(tiny_model_dir, tmp_path)
    from safetensors import safe_open

    with safe_open(str(model / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {**{n: "model.safetensors" for n in names}, "lm_head.weight": "model.safetensors"}}))
    check_model_dir(model)
    ModelRunner(model, device="cpu", num_blocks=8)


def test_a_tied_head_stored_in_another_dtype_with_equal_values_loads(tiny_model_dir, tmp_path):
    """A bfloat16 lm_head.weight beside a float32 embedding holding the same (bfloat16-exact) values was
    refused as differing."""
    def exact(weights):
        weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"].bfloat16().float()
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"].bfloat16()

    check_model_dir(_copy_with(tiny_model_dir, tmp_path, exact))

"""Loading HF-format directories: sharded checkpoints, mask token resolution, clear errors, dtype and KV sizing."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from hf_oracle import dense_logits, result_logits, segment  # noqa: E402
from workers.kv_cache import bytes_per_block  # noqa: E402
from workers.loader import ModelDirError, read_config  # noqa: E402
from workers.runner import ModelRunner  # noqa: E402
from workers.session import RunnerSession  # noqa: E402


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory) -> Path:
    from model_factory import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("sharded"), tie_word_embeddings=False, max_shard_size="60KB", seed=3)


def _copy(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / "model"))


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_sharded_checkpoint_loads_and_matches_transformers(sharded_dir):
    shards = sorted(sharded_dir.glob("model-*.safetensors"))
    assert len(shards) > 2 and (sharded_dir / "model.safetensors.index.json").is_file()
    runner = ModelRunner(sharded_dir, device="cpu", num_blocks=8)
    ids = list(range(5, 17))
    [res] = RunnerSession(runner).execute([segment("s", 0, ids)])
    assert (result_logits(res) - dense_logits(sharded_dir, ids)).abs().max() < 1e-4


def test_missing_shard_is_named(sharded_dir, tmp_path):
    model = _copy(sharded_dir, tmp_path)
    victim = sorted(model.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(ModelDirError, match="missing") as err:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert err.value.path == str(victim)


def test_wrong_tensor_shape_is_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_model_dir, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(8, 64)
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ModelDirError, match=r"k_proj.weight.*shape \(8, 64\).*\(32, 64\)") as err:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert err.value.path.endswith("model.safetensors")


def test_missing_tensor_is_named(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_model_dir, tmp_path)
    weights = load_file(model / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ModelDirError, match="model.norm.weight") as err:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert err.value.path.endswith("model.safetensors")


def test_mask_token_from_tokenizer_then_none_at_all(tiny_model_dir, tmp_path):
    model = _copy(tiny_model_dir, tmp_path)
    _edit_json(model / "config.json", lambda c: c.pop("mask_token_id"))
    assert ModelRunner(model, device="cpu", num_blocks=8).info.mask_token_id == 2  # the tokenizer's <|mask|>

    def drop_mask(tok):
        tok["added_tokens"] = [t for t in tok["added_tokens"] if t["content"] != "<|mask|>"]
        del tok["model"]["vocab"]["<|mask|>"]

    _edit_json(model / "tokenizer.json", drop_mask)
    _edit_json(model / "tokenizer_config.json", lambda c: c.pop("mask_token"))
    with pytest.raises(ModelDirError, match="mask_token_id") as err:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert err.value.path.endswith("config.json")


@pytest.mark.parametrize("victim, expected", [
    ("config.json", "config.json"),
    ("model.safetensors", "model.safetensors"),
    ("tokenizer", "tokenizer.json"),
    # tokenizer_config.json alone: transformers said to install sentencepiece or tiktoken (helper-184)
    ("tokenizer.json", "tokenizer.json"),
])
def test_missing_files_are_named(tiny_model_dir, tmp_path, victim, expected):
    model = _copy(tiny_model_dir, tmp_path)
    names = ["tokenizer.json", "tokenizer_config.json"] if victim == "tokenizer" else [victim]
    for name in names:
        (model / name).unlink()
    with pytest.raises(ModelDirError, match="missing") as err:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert err.value.path.endswith(expected)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("hidden_size"), "hidden_size"),
    (lambda c: c.update(model_type="llama"), "model_type"),
    (lambda c: c.update(num_key_value_heads=3), "multiple"),
    (lambda c: c.update(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "yarn"),
    # an FP8 checkpoint's config (as Qwen3-8B-FP8's): its weights without their scales would be wrong values
    (lambda c: c.update(quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128]}),
     "quantization_config \\(quant_method 'fp8'\\)"),
    (lambda c: c.update(quantization_config={"bits": 4, "group_size": 128}), "quantization_config \\(\\{'bits': 4"),
])
def test_bad_config_is_explained(tiny_model_dir, tmp_path, edit, message):
    model = _copy(tiny_model_dir, tmp_path)
    _edit_json(model / "config.json", edit)
    with pytest.raises(ModelDirError, match=message):
        read_config(model)


def _truncate(model: Path) -> None:
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def _drop_tensor(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, model / "model.safetensors")


@pytest.mark.parametrize("break_it, file", [
    (_truncate, "model.safetensors"),
    (_drop_tensor, "model.safetensors"),
    (lambda m: (m / "tokenizer.json").write_text("{"), "tokenizer.json"),
    (lambda m: (m / "tokenizer_config.json").write_text("{"), "tokenizer_config.json"),  # was named tokenizer.json
    (lambda m: (m / "tokenizer_config.json").write_text("[]"), "tokenizer_config.json"),
    (lambda m: (m / "config.json").write_text("[]"), "config.json"),
    (lambda m: [(m / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")], "tokenizer.json"),
    # each was a traceback (ZeroDivisionError, transformers' validation errors, TypeError, AttributeError)
    (lambda m: _edit_json(m / "config.json", lambda c: (c.update(num_attention_heads=0), c.pop("head_dim", 0))),
     "config.json"),
    (lambda m: _edit_json(m / "config.json", lambda c: c.update(num_hidden_layers=True)), "config.json"),
    (lambda m: _edit_json(m / "config.json", lambda c: c.update(hidden_size=256.7)), "config.json"),
    (lambda m: _edit_json(m / "config.json", lambda c: c.update(attention_dropout="x")), "config.json"),
    (lambda m: _edit_json(m / "config.json", lambda c: c.update(layer_types=["full_attention"] * 9)), "config.json"),
    (lambda m: (m / "model.safetensors.index.json").write_text("[]"), "model.safetensors.index.json"),
    (lambda m: (m / "model.safetensors.index.json").write_text('{"weight_map": []}'), "model.safetensors.index.json"),
    (lambda m: (m / "model.safetensors.index.json").write_text('{"weight_map": {"model.norm.weight": null}}'),
     "model.safetensors.index.json"),
    # accepted, then wrong at serving time: no end token, the mask token the end token, ids past the embedding
    (lambda m: _edit_json(m / "config.json", lambda c: c.pop("eos_token_id")), "config.json"),
    (lambda m: _edit_json(m / "config.json", lambda c: c.update(mask_token_id=c["eos_token_id"])), "config.json"),
    (lambda m: _edit_json(m / "config.json", lambda c: c.update(eos_token_id=c["vocab_size"] + 7)), "config.json"),
    (lambda m: _edit_json(m / "tokenizer.json", lambda t: t["added_tokens"].append(
        {"id": len(t["model"]["vocab"]) + 50, "content": "<|extra|>", "single_word": False, "lstrip": False,
         "rstrip": False, "normalized": False, "special": True})), "tokenizer.json"),
], ids=["truncated", "tensor-dropped", "tokenizer-json", "tokenizer-config", "tokenizer-config-list", "config-list", "no-tokenizer",
        "heads-0", "layers-bool", "hidden-float", "dropout-string", "layer-types", "index-list", "weight-map-list",
        "shard-null", "no-eos", "mask-is-eos", "eos-past-vocab", "token-past-vocab"])
def test_the_quick_check_finds_what_loading_finds(tiny_model_dir, tmp_path, break_it, file):
    """check_model_dir (what `refusion serve` runs before it starts Ray; a broken directory failed every
    replica after a minute of tracebacks) names the same file as loading the model does, reading no tensor."""
    from workers.loader import check_model_dir

    check_model_dir(tiny_model_dir)  # a good directory passes
    model = _copy(tiny_model_dir, tmp_path)
    break_it(model)
    with pytest.raises(ModelDirError) as checked:
        check_model_dir(model)
    with pytest.raises(ModelDirError) as loaded:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert checked.value.path == loaded.value.path and checked.value.path.endswith(file)


def _int_norm(model: Path) -> None:
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"].to(torch.int32)
    save_file(weights, model / "model.safetensors")


def _index_outside(model: Path) -> None:
    from safetensors import safe_open

    other = model.parent / "other"
    other.mkdir()
    (model / "model.safetensors").rename(other / "model.safetensors")
    with safe_open(str(other / "model.safetensors"), "pt") as handle:
        names = list(handle.keys())
    (model / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {name: "../other/model.safetensors" for name in names}}))


@pytest.mark.parametrize("break_it, file, message", [
    # helper-186: an int32 norm was cast to floats without a word (train --init then started at a higher loss)
    (_int_norm, "model.safetensors", "tensor 'model.norm.weight' holds I32 values; weights are floating point"),
    # it loaded another directory's file (transformers refuses it)
    (_index_outside, "model.safetensors.index.json", "weight_map names '../other/model.safetensors', outside the "
                                                     "model directory"),
    # "model.safetensors: missing" said nothing of the .bin beside it
    (lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"), "model.safetensors",
     "pytorch_model.bin is here: the engine reads safetensors only"),
])
def test_weights_it_cannot_serve_as_they_are_are_named(tiny_model_dir, tmp_path, break_it, file, message):
    """Integer weights, a shard index pointing outside the directory, pickled weights alone: a ModelDirError
    naming the file and what to do, from the quick check and from loading alike."""
    from workers.loader import check_model_dir

    model = _copy(tiny_model_dir, tmp_path)
    break_it(model)
    for attempt in (lambda: check_model_dir(model), lambda: ModelRunner(model, device="cpu", num_blocks=8)):
        with pytest.raises(ModelDirError, match=re.escape(message)) as caught:
            attempt()
        assert caught.value.path.endswith(file)


def test_weights_holding_nan_are_refused_naming_the_file(tiny_model_dir, tmp_path):
    """Bytes overwritten in the weights (NaN in float32) or a NaN norm loaded and decoded empty text, exit 0."""
    from safetensors.torch import load_file, save_file

    model = _copy(tiny_model_dir, tmp_path)
    weights = load_file(model / "model.safetensors")
    weights["model.norm.weight"][3] = float("nan")
    save_file(weights, model / "model.safetensors")
    with pytest.raises(ModelDirError, match="'model.norm.weight' holds NaN or infinite values") as err:
        ModelRunner(model, device="cpu", num_blocks=8)
    assert err.value.path.endswith("model.safetensors")


def test_kv_budget_and_dtype(tiny_model_dir):
    cfg = read_config(tiny_model_dir)
    per_block = bytes_per_block(cfg, 16, torch.bfloat16)
    runner = ModelRunner(tiny_model_dir, device="cpu", dtype="bfloat16", kv_memory_bytes=10 * per_block + 5)
    assert runner.info.num_kv_blocks == 10 and runner.info.dtype == "bfloat16"
    # The budget buys the blocks handed out; the scratch block (dropped rows, padding) comes on top.
    assert runner.kv.k[0].shape == (11, 16, cfg.num_kv_heads, cfg.head_dim) and runner.kv.k[0].dtype == torch.bfloat16
    ids = list(range(5, 15))
    [res] = RunnerSession(runner).execute([segment("b", 0, ids)])
    assert (result_logits(res) - dense_logits(tiny_model_dir, ids)).abs().max() < 0.5  # bf16 rounding only
    with pytest.raises(ValueError, match="dtype 'float8'"):
        ModelRunner(tiny_model_dir, device="cpu", dtype="float8")
    with pytest.raises(ValueError, match="at most one"):
        ModelRunner(tiny_model_dir, device="cpu", num_blocks=4, kv_memory_bytes=1 << 20)


def test_default_cpu_kv_budget_is_16k_tokens(tiny_model_dir):
    runner = ModelRunner(tiny_model_dir, device="cpu")
    assert runner.info.num_kv_blocks * runner.info.block_size == 16384


def test_end_tokens_come_from_config_generation_config_and_the_tokenizer(tiny_model_dir, tmp_path):
    """Every id that ends a response (config.json's eos_token_id list, generation_config.json's, the
    tokenizer's eos_token: transformers' generate and vLLM stop on them) reaches the engine; one that is
    no token id of the vocabulary, or is the mask token, is refused naming its file by both checks."""
    from workers.loader import check_model_dir

    model = _copy(tiny_model_dir, tmp_path)
    eos = read_config(model).eos_token_id
    _edit_json(model / "config.json", lambda c: c.update(eos_token_id=[eos, 5]))
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, eos, 5]}))
    assert ModelRunner(model, device="cpu", num_blocks=8).info.end_token_ids == (5, 7)
    mask = json.loads((model / "config.json").read_text())["mask_token_id"]
    for bad in (10**6, mask, "7"):
        (model / "generation_config.json").write_text(json.dumps({"eos_token_id": bad}))
        with pytest.raises(ModelDirError) as checked:
            check_model_dir(model)
        with pytest.raises(ModelDirError) as loaded:
            ModelRunner(model, device="cpu", num_blocks=8)
        assert checked.value.path == loaded.value.path and checked.value.path.endswith("generation_config.json")


@pytest.mark.parametrize("victim, problem", [
    ("", "cannot be read: permission denied; give the user running refusion read and search permission"),
    ("model.safetensors", "cannot be read: permission denied; give the user running refusion read permission"),
])
def test_unreadable_files_are_named_with_the_reason(tiny_model_dir, tmp_path, victim, problem):
    """A directory without read permission was a PermissionError traceback; weights without it were
    reported 'No such file or directory'."""
    from model_factory import unreadable
    from workers.loader import check_model_dir

    model = _copy(tiny_model_dir, tmp_path)
    with unreadable(model / victim):  # (model / "" is the directory)
        for load in (check_model_dir, lambda m: ModelRunner(m, device="cpu", num_blocks=8)):
            with pytest.raises(ModelDirError) as err:
                load(model)
            assert err.value.path == str(model / victim) and problem in err.value.problem


def test_an_unsupported_rope_type_is_said_once(tiny_model_dir, tmp_path):
    """A yarn rope_scaling was 'a value has the wrong type or form (PATH: rope type ...)', the path twice."""
    model = _copy(tiny_model_dir, tmp_path)
    _edit_json(model / "config.json", lambda c: (c.pop("rope_parameters", None), c.update(
        rope_theta=10000.0, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024})))
    with pytest.raises(ModelDirError) as err:
        read_config(model)
    assert str(err.value) == f"{model / 'config.json'}: rope type 'yarn' is not supported; only default RoPE is"


ROPE_CASES = {  # config.json's RoPE keys (the shipped model's removed first): what transformers 5 serves
    "none": {},
    "top level": {"rope_theta": 5e5},
    "rope_parameters": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6}},
    "both, theta in rope_parameters": {"rope_theta": 2e5, "rope_parameters": {"rope_theta": 1e6}},
    "rope_scaling linear beside rope_parameters": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4},
                                                   "rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "rope_scaling default beside rope_parameters": {"rope_parameters": {"rope_theta": 1e6},
                                                    "rope_scaling": {"rope_type": "default"}},
    "rope_scaling 'type' beside both": {"rope_theta": 3e5, "rope_parameters": {"rope_theta": 1e6},
                                        "rope_scaling": {"type": "default"}},
    "rope_scaling yarn, transformers 4": {"rope_theta": 1e4, "rope_scaling": {
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024}},
    "nested by layer type": {"rope_theta": 2e5, "rope_parameters": {"full_attention": {"rope_type": "default",
                                                                                       "rope_theta": 1e6}}},
    "nested without theta": {"rope_parameters": {"full_attention": {"rope_type": "default"}}},
    "nested yarn": {"rope_theta": 2e5, "rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0,
                                                                              "rope_theta": 1e6}}},
    "partial rotary": {"rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.5}},
    "partial rotary, top level": {"rope_theta": 1e6, "partial_rotary_factor": 0.5},
}


@pytest.mark.parametrize("name", ROPE_CASES)
def test_rope_keys_are_read_as_transformers_reads_them(tiny_model_dir, tmp_path, name):
    """config.json's RoPE as transformers 5 serves it (Qwen3Config): a rope_scaling beside rope_parameters
    replaces it (a transformers-5 config with Qwen's YaRN switch added was served here with default RoPE,
    its logits off by up to 5.9, helper-215), a theta it lacks is the top level's, else 10,000, nested
    layer-type entries count (helper-217), and a partial rotary factor applies. The same theta where
    transformers serves default RoPE over whole heads, else refused naming what is not supported."""
    from transformers import Qwen3Config

    model = _copy(tiny_model_dir, tmp_path)
    _edit_json(model / "config.json", lambda c: ([c.pop(k, None) for k in ("rope_theta", "rope_parameters",
                                                                            "rope_scaling")], c.update(ROPE_CASES[name])))
    theirs = Qwen3Config.from_pretrained(model)
    params = theirs.rope_parameters
    entries = [params[k] for k in params if k in theirs.layer_types] or [params]
    if all(e["rope_type"] == "default" and e.get("partial_rotary_factor", 1.0) == 1 for e in entries):
        assert read_config(model).rope_theta == entries[0]["rope_theta"], params
    else:
        with pytest.raises(ModelDirError, match="rope type '(linear|yarn)' is not supported|partial_rotary_factor"):
            read_config(model)


@pytest.mark.parametrize("entry", [None, {"rope_type": "default", "rope_theta": 5e5}])
def test_rope_parameters_with_layer_type_entries_beside_its_own_keys(tiny_model_dir, tmp_path, entry):
    """Its own rope_type and rope_theta are what transformers' Qwen3 builds RoPE from (the layer-type entries
    left out; transformers writes this form itself, helper-226); {"rope_theta": 1e6, "full_attention":
    null} was served at 10,000 (the entry's: the top level's default), the 1e6 beside it ignored, where
    transformers fails (KeyError 'rope_type')."""
    model = _copy(tiny_model_dir, tmp_path)
    for own, theta in (({"rope_type": "default", "rope_theta": 1e6}, 1e6), ({"rope_theta": 1e6}, None),
                       ({"rope_type": "default"}, None), ({"type": "default", "rope_theta": 1e6}, None)):
        _edit_json(model / "config.json", lambda c: (c.pop("rope_theta", None), c.update(
            rope_parameters={**own, "full_attention": entry})))
        if theta is not None:
            assert read_config(model).rope_theta == theta
            continue
        with pytest.raises(ModelDirError) as err:
            read_config(model)
        assert err.value.problem == (
            f"rope_parameters holds both layer-type entries (full_attention) and its own keys ({', '.join(own)}) "
            "but not both rope_type and rope_theta, which transformers reads alone then; give one form: the keys "
            "alone, or inside each layer type's entry")

def test_a_rope_theta_that_is_no_number_is_refused(tiny_model_dir, tmp_path):
    """"1000000" (a string) was served as 1e6, where transformers fails on it (helper-219)."""
    model = _copy(tiny_model_dir, tmp_path)
    _edit_json(model / "config.json", lambda c: (c.pop("rope_parameters", None), c.update(rope_theta="1000000")))
    with pytest.raises(ModelDirError, match="rope_theta is '1000000'; give the RoPE base as a number"):
        read_config(model)


def test_head_dim_and_kv_heads_left_out_take_transformers_values(tiny_model_dir, tmp_path):
    """A config.json without head_dim / num_key_value_heads took hidden_size / num_attention_heads and
    num_attention_heads here, while transformers' Qwen3Config (which vLLM reads it through) takes 128 and
    32: a directory loaded here that transformers refuses, or the other way round (helper-215)."""
    from transformers import Qwen3Config

    model = _copy(tiny_model_dir, tmp_path)
    _edit_json(model / "config.json", lambda c: (c.pop("head_dim"), c.pop("num_key_value_heads"),
                                                 c.update(num_attention_heads=64)))
    theirs, ours = Qwen3Config.from_pretrained(model), read_config(model)
    assert (ours.head_dim, ours.num_kv_heads) == (theirs.head_dim, theirs.num_key_value_heads) == (128, 32)
    _edit_json(model / "config.json", lambda c: c.update(num_attention_heads=4))
    with pytest.raises(ModelDirError, match=r"not a multiple of num_key_value_heads \(32, transformers'"):
        read_config(model)
    _edit_json(model / "config.json", lambda c: c.update(num_key_value_heads=None, head_dim=None))
    with pytest.raises(ModelDirError, match="head_dim is null"):
        read_config(model)


def test_a_config_mask_id_that_is_not_the_tokenizers_mask_is_refused(tiny_model_dir, tmp_path):
    """mask_token_id 5 beside a tokenizer whose <|mask|> is 2 decoded with token 5 as the mask, no word."""
    from workers.loader import check_model_dir

    model = _copy(tiny_model_dir, tmp_path)
    _edit_json(model / "config.json", lambda c: c.update(mask_token_id=5))
    for load in (check_model_dir, lambda m: ModelRunner(m, device="cpu", num_blocks=8)):
        with pytest.raises(ModelDirError) as err:
            load(model)
        assert err.value.path == str(model / "config.json")
        assert err.value.problem == ("mask_token_id is 5 but the tokenizer's <|mask|> is id 2: set mask_token_id to 2 "
                                     "(or remove it to take the tokenizer's)")

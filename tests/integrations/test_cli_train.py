"""`refusion train` end to end on a tiny corpus: a loadable HF directory, a loss log, --init with a new mask."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from integrations.cli import main  # noqa: E402

CORPUS = '''
def add(a, b):
    """Return a + b."""
    total = a + b
    return total


def scale(values, factor):
    out = []
    for v in values:
        out.append(v * factor)
    return out


class Counter:
    def __init__(self):
        self.count = 0

    def bump(self, by=1):
        self.count += by
        return self.count
'''

TINY = ["--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--head-dim", "16",
        "--intermediate", "64", "--threads", "1"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (root / f"mod{i}.py").write_text(CORPUS.replace("add", f"add{i}"))
    return root


def test_train_from_scratch_writes_a_loadable_model_and_log(corpus_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "model"
    rc = main(["train", "--corpus", str(corpus_dir), "--out", str(out), "--steps", "6", "--log-every", "3",
               "--batch-tokens", "512", "--vocab-size", "300", "--heldout-fraction", "0.3", *TINY])
    assert rc == 0
    printed = capsys.readouterr().out
    assert printed.count("step ") == 2 and "saved" in printed
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [3, 6]
    assert {"train_ar_loss", "train_mdm_loss", "heldout_ar_loss", "heldout_mdm_loss"} <= set(records[0])
    assert records[0]["tokens_per_s"] > 0 and 0 < records[0]["fill"] <= 1
    stats = json.loads((out / "train_args.json").read_text())
    assert stats["chat_pairs"] >= 1  # `add` has a docstring: an instruction pair and a tool-call turn
    cfg = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert cfg["mask_token_id"] == tok.convert_tokens_to_ids("<|mask|>") == tok.mask_token_id
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == len(tok)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.hidden_size == 32
    from workers.runner import ModelRunner  # the serving engine loads it too

    info = ModelRunner(str(out), device="cpu").info
    assert (info.mask_token_id, info.eos_token_id, info.num_layers) == (cfg["mask_token_id"], tok.eos_token_id, 1)


def test_init_adds_the_mask_token_and_resizes(corpus_dir, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

    base = tmp_path / "base"  # a checkpoint with EOS but no <|mask|>
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer, bpe.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    bpe.train_from_iterator([CORPUS], trainers.BpeTrainer(vocab_size=290, special_tokens=["<|endoftext|>"],
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>").save_pretrained(str(base))
    n_vocab = bpe.get_vocab_size()
    Qwen3ForCausalLM(Qwen3Config(vocab_size=n_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                 eos_token_id=0)).save_pretrained(str(base))
    out = tmp_path / "tuned"
    rc = main(["train", "--corpus", str(corpus_dir), "--out", str(out), "--init", str(base), "--steps", "2",
               "--batch-tokens", "256", "--threads", "1"])
    assert rc == 0
    tok = AutoTokenizer.from_pretrained(str(out))
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert len(tok) == n_vocab + 2  # <|mask|> and <|beginoftext|>
    assert model.get_input_embeddings().weight.shape[0] >= len(tok)
    assert json.loads((out / "config.json").read_text())["mask_token_id"] == tok.mask_token_id >= n_vocab


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "OUT"], "--steps"),
        (["--out", "OUT", "--steps", "1", "--heads", "3", "--kv-heads", "2"], "--kv-heads"),
        (["--out", "OUT", "--steps", "1", "--corpus", "/nonexistent/dir"], "corpus"),
        (["--out", "OUT", "--steps", "1", "--init", "/nonexistent/dir"], "--init"),
        (["--out", "OUT", "--steps", "0"], "--steps: got 0"),  # before the corpus is read, named as a flag
        (["--out", "OUT", "--minutes", "0"], "--minutes: got 0"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(corpus_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "m")) for a in argv]
    if "--corpus" not in argv:
        argv += ["--corpus", str(corpus_dir)]
    assert main(["train", *TINY, *argv]) == 2
    assert message in capsys.readouterr().err

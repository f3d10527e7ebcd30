"""The ReFusion training loop: loss falls on a learnable toy task; loss maths match full logits."""

from __future__ import annotations

import math
import random

import pytest

torch = pytest.importorskip("torch")

from decoding.objective import build_example, collate  # noqa: E402
from workers.training import TrainingError, heldout_losses, objective_loss, train_model  # noqa: E402

VOCAB, MASK, EOS = 40, 39, 38


def _tiny_qwen3(seed: int = 0):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                         tie_word_embeddings=True, eos_token_id=EOS, pad_token_id=EOS)
    return Qwen3ForCausalLM(config).float()


def _counting_pairs(n: int, seed: int):
    """prompt = a start digit; response = the next 11 numbers mod 30: deterministic, so learnable."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        a = rng.randrange(30)
        pairs.append(([a], [(a + k) % 30 for k in range(1, 12)]))
    return pairs


def test_loss_falls_on_a_learnable_task():
    model = _tiny_qwen3()
    train, heldout = _counting_pairs(64, 0), _counting_pairs(8, 1)
    logs = []
    records = train_model(model, train, steps=60, batch_size=16, lr=1e-2, mask_token_id=MASK, eos_token_id=EOS,
                          seed=0, log_every=20, on_log=logs.append, heldout=heldout)
    assert records == logs and [r["step"] for r in records] == [20, 40, 60]
    first, last = records[0], records[-1]
    assert last["train_loss"] < 0.6 * first["train_loss"]
    # ln(VOCAB) = 3.7 is the loss of a uniform guess; the task is deterministic given the prompt.
    assert last["heldout_ar_loss"] < min(0.8 * first["heldout_ar_loss"], 0.5 * math.log(VOCAB))
    assert last["heldout_mdm_loss"] < first["heldout_mdm_loss"]
    assert last["total_tokens"] == 60 * 16 * 13  # 1 prompt + 11 response + EOS per example, no padding
    assert abs(last["train_loss"] - last["train_ar_loss"] - last["train_mdm_loss"]) < 1e-4


def test_objective_loss_equals_weighted_ce_of_full_logits():
    model = _tiny_qwen3(1)
    rng = random.Random(3)
    examples = [build_example([1, 2, 3], list(range(4, 4 + n)), rng, mask_token_id=MASK, eos_token_id=EOS)
                for n in (5, 17, 30)]
    batch = collate(examples, pad_token_id=EOS)
    with torch.no_grad():
        loss, ar, mdm = objective_loss(model, batch)
        logits = model(input_ids=torch.tensor(batch.input_ids), position_ids=torch.tensor(batch.position_ids),
                       attention_mask=torch.tensor(batch.attention_mask)).logits
    labels = torch.tensor(batch.labels)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten().clamp(min=0), reduction="none")
    expected = (ce * torch.tensor(batch.weights).flatten()).sum() / 3
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    assert float(ar + mdm) == pytest.approx(float(loss), rel=1e-6)


def test_position_jumps_do_not_cut_attention():
    # Without an explicit attention mask transformers reads a position jump as a new packed sequence;
    # the last row must still see the first token when clean slots sit out of order.
    model = _tiny_qwen3(2)
    rng = random.Random(2)  # seed 2: positions [0, 1, 22, 10, 11, ...]: clean slots out of order
    ex = build_example([1, 2], list(range(10, 30)), rng, mask_token_id=MASK, eos_token_id=EOS)
    assert ex.position_ids != sorted(ex.position_ids)
    base = collate([ex], pad_token_id=EOS)
    changed = collate([build_example([5, 2], list(range(10, 30)), random.Random(2), mask_token_id=MASK,
                                     eos_token_id=EOS)], pad_token_id=EOS)
    with torch.no_grad():
        out = [objective_loss(model, b)[0] for b in (base, changed)]
    assert float(out[0]) != pytest.approx(float(out[1]), rel=1e-7, abs=0)


def test_heldout_ar_loss_is_plain_next_token_ce():
    model = _tiny_qwen3(3)
    pairs = [([1, 2], [3, 4, 5])]
    got = heldout_losses(model, pairs, mask_token_id=MASK, eos_token_id=EOS, pad_token_id=EOS)
    ids = torch.tensor([[1, 2, 3, 4, 5, EOS]])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0]
    ce = torch.nn.functional.cross_entropy(logits[1:5], ids[0, 2:6])
    assert got["heldout_ar_loss"] == pytest.approx(float(ce), rel=1e-5)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(steps=None, minutes=None), "steps"),
        (dict(steps=0), "steps"),
        (dict(steps=5, minutes=-1), "minutes"),
        (dict(steps=5, batch_size=0), "batch_size"),
        (dict(steps=5, lr=0.0), "lr"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = dict(batch_size=2, lr=1e-3, mask_token_id=MASK, eos_token_id=EOS, seed=0) | kwargs
    with pytest.raises(TrainingError) as err:
        train_model(_tiny_qwen3(), [([1], [2])], **args)
    assert err.value.field == field


# --- corpus and tokenizer (workers/corpus.py, workers/tokenizer_build.py) ---

SOURCE = '''
import os


@decorator
def documented(a, b=1):
    """Add two numbers.

    More words.
    """
    total = a + b
    if total > 3:
        return total
    return 0


def one_liner(): return 1


class Box:
    size = 3

    def grow(self, by):
        self.size += by
        return self.size
'''


def test_extract_units_splits_prompt_and_response_on_lines():
    from workers.corpus import extract_units

    units = {u.name: u for u in extract_units(SOURCE, "pkg/mod.py")}
    assert set(units) == {"documented", "Box", "grow"}  # the one-liner has nothing to complete
    doc = units["documented"]
    assert doc.prompt.startswith('@decorator\ndef documented(a, b=1):\n    """Add two numbers.')
    assert '    """\n' in doc.prompt  # the whole docstring is prompt
    assert doc.prompt + doc.response == SOURCE[SOURCE.index("@decorator") : SOURCE.index("\n\n\ndef one")] + "\n"
    grow = units["grow"]
    assert grow.prompt.startswith("def grow(self, by):\n")  # methods are dedented
    assert grow.response.endswith("    return self.size\n")


def test_heldout_split_is_by_path_and_deterministic():
    from workers.corpus import is_heldout

    paths = [f"pkg/mod{i}.py" for i in range(2000)]
    held = [p for p in paths if is_heldout(p, 0.1)]
    assert 120 < len(held) < 280 and held == [p for p in paths if is_heldout(p, 0.1)]
    assert not any(is_heldout(p, 0.0) for p in paths)


def test_corpus_drops_repeated_units_and_copies_of_heldout_units(tmp_path):
    from workers.corpus import is_heldout, load_units

    body = "def f{i}(x):\n    y = x + {i}\n    return y\n"
    names = [f"m{i}.py" for i in range(400)]
    held = next(n for n in names if is_heldout(n, 0.03))
    kept = [n for n in names if not is_heldout(n, 0.03)]
    (tmp_path / held).write_text(body.format(i=1))  # held out
    (tmp_path / kept[0]).write_text(body.format(i=1))  # a training copy of the held-out unit: dropped
    (tmp_path / kept[1]).write_text(body.format(i=2) + "\n\n" + body.format(i=2))  # repeated in one file
    (tmp_path / kept[2]).write_text(body.format(i=2) + "\n\n" + body.format(i=3))  # repeated across files
    train, heldout = load_units([str(tmp_path)], 0.03)
    assert [u.name for u in heldout] == ["f1"]
    assert sorted(u.name for u in train) == ["f2", "f3"]


def test_corpus_errors_name_the_field(tmp_path):
    from workers.corpus import CorpusError, load_units

    with pytest.raises(CorpusError) as err:
        load_units([str(tmp_path / "missing")])
    assert err.value.field == "corpus"
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(CorpusError, match="no function or class"):
        load_units([str(tmp_path)])
    with pytest.raises(CorpusError) as err:
        load_units([str(tmp_path)], heldout_fraction=1.5)
    assert err.value.field == "heldout_fraction"


def test_bpe_tokenizer_has_the_special_tokens_and_round_trips():
    from workers.tokenizer_build import BOT, EOS, MASK, TokenizerBuildError, build_bpe_tokenizer

    tok = build_bpe_tokenizer([SOURCE] * 3, vocab_size=320)
    assert [tok.convert_tokens_to_ids(t) for t in (EOS, BOT, MASK)] == [0, 1, 2]
    assert tok.eos_token == EOS and tok.mask_token == MASK and len(tok) <= 320
    ids = tok("def grow(self, by):\n    return 1", add_special_tokens=False)["input_ids"]
    assert 2 not in ids and tok.decode(ids) == "def grow(self, by):\n    return 1"
    with pytest.raises(TokenizerBuildError) as err:
        build_bpe_tokenizer([SOURCE], vocab_size=100)
    assert err.value.field == "vocab_size"

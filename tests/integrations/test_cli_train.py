"""`refusion train` end to end on a tiny corpus: a loadable HF directory, a loss log, --init with a new mask."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

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
    import platform

    from integrations.cli_train_out import package_set as _package_set

    assert stats["python"] == platform.python_version() and "packages" not in stats  # a directory corpus
    assert stats["vocab_size"] == len(AutoTokenizer.from_pretrained(str(out)))  # reached, not asked (300)
    assert any(p.startswith("torch==2.") for p in _package_set(["site-packages"])["packages"])
    cfg = json.loads((out / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(str(out))
    assert cfg["mask_token_id"] == tok.convert_tokens_to_ids("<|mask|>") == tok.mask_token_id
    assert cfg["num_hidden_layers"] == 1 and cfg["vocab_size"] == len(tok)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.hidden_size == 32
    from workers.runner import ModelRunner  # the serving engine loads it too

    info = ModelRunner(str(out), device="cpu").info
    assert (info.mask_token_id, info.eos_token_id, info.num_layers) == (cfg["mask_token_id"], tok.eos_token_id, 1)


def test_init_adds_the_mask_token_and_resizes(corpus_dir, tmp_path, capsys):
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
    # A shape flag beside --init was ignored silently (the checkpoint has its own shape): named now
    assert main(["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "again"), "--init", str(base),
                 "--steps", "1", "--hidden", "64"]) == 2
    assert "--hidden: the model's shape comes from the --init checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--out", "OUT"], "--steps"),
        (["--out", "OUT", "--steps", "1", "--heads", "3", "--kv-heads", "2"], "--kv-heads"),
        (["--out", "OUT", "--steps", "1", "--corpus", "/nonexistent/dir"], "corpus"),
        (["--out", "OUT", "--steps", "1", "--init", "/nonexistent/dir"], "--init"),
        (["--out", "OUT", "--steps", "0"], "--steps: got 0"),  # before the corpus is read, named as a flag
        (["--out", "OUT", "--minutes", "0"], "--minutes: got 0"),
        # Checked before the corpus is built, named as flags (they were tracebacks or Python field names)
        (["--out", "OUT", "--steps", "1", "--log-every", "0"], "--log-every: got 0"),
        (["--out", "OUT", "--steps", "1", "--threads", "-1"], "--threads: got -1"),
        # torch.manual_seed's range (an OverflowError traceback after the corpus was built, or a negative seed)
        (["--out", "OUT", "--steps", "1", "--seed", str(2**70)], "--seed: got 1180591620717411303424; use an integer "
                                                                "in 0..9223372036854775807"),
        (["--out", "OUT", "--steps", "1", "--seed", "-1"], "--seed: got -1"),
        (["--out", "OUT", "--steps", "1", "--device", "tpu"], "--device: got 'tpu'"),
        (["--out", "OUT", "--steps", "1", "--lr", "inf"], "--lr: got inf"),
        (["--out", "OUT", "--steps", "1", "--lr", "-1"], "--lr: got -1"),
        (["--out", "OUT", "--steps", "1", "--data-workers", "-1"], "--data-workers: got -1"),
        (["--out", "OUT", "--steps", "1", "--heldout-fraction", "1"], "--heldout-fraction: got 1.0"),
        (["--out", "OUT", "--steps", "1", "--head-dim", "15"], "--head-dim: got 15"),
        (["--out", "OUT", "--steps", "1", "--vocab-size", "100"], "--vocab-size: got 100"),
        (["--out", "OUT", "--minutes", "inf"], "--minutes: got inf"),
        (["--out", "OUT", "--total-minutes", "0"], "--total-minutes: got 0"),
        (["--out", "OUT", "--total-minutes", "nan"], "--total-minutes: got nan"),
        (["--out", "OUT", "--steps", "1", "--prep-workers", "0"], "--prep-workers: got 0"),
        (["--out", "OUT", "--steps", "1", "--prep-workers", "100000"], "--prep-workers: got 100000; use 1 (none) to"),
        (["--out", "OUT", "--steps", "1", "--corpus", ""], "--corpus: an empty name"),
        (["--out", "/dev/null", "--steps", "1"], "--out: /dev/null is a file"),
        (["--out", "", "--steps", "1"], "--out: is empty; give the path of a new directory"),  # (it was ".")
        (["--out", "OUT", "--steps", "1", "--init", "CORPUS"], "has no config.json"),
        (["--out", "OUT", "--steps", "1", "--init", ""], "--init: is empty; give an HF model directory"),
        # Counted on the meta device before the corpus is built; it was an allocator traceback
        (["--out", "OUT", "--steps", "1", "--hidden", "10000000"], "--hidden: the model needs about "),
        # helper-186: the attention masks grow with --seq-len squared; the kernel killed it at 24 GB, no message
        (["--out", "OUT", "--steps", "1", "--seq-len", "100000", "--batch-tokens", "100000"],
         "--seq-len: rows of 100000 tokens: the run needs about "),
        # Found once the corpus is tokenized: a batch bigger than the corpus would never fill
        # (2,000,000 tokens a step are now refused first: ~100 GiB of activations)
        (["--out", "OUT", "--steps", "1", "--batch-tokens", "256000", "--vocab-size", "300"],
         "--batch-tokens: 256000 tokens make 1000 rows"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(corpus_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "m")).replace("CORPUS", str(corpus_dir)) for a in argv]
    if "--corpus" not in argv:
        argv += ["--corpus", str(corpus_dir)]
    assert main(["train", *TINY, *argv]) == 2
    assert message in capsys.readouterr().err


def test_a_seq_len_no_unit_can_fit_is_refused_before_the_corpus_is_read(tmp_path, capsys):
    """--seq-len 3 was refused ("no unit fits in 3 tokens") only once the corpus was read and tokenized,
    ~70 s on stdlib. Below cli_train_checks.MIN_BPE_UNIT_TOKENS (6) no unit fits the tokenizer a fresh model
    gets, and it is refused before the corpus is read; 6 itself trains, on a corpus of the shortest unit
    there is. With --init (any tokenizer) the bound is MIN_UNIT_TOKENS (3)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m.py").write_text("def _():\n _\n")  # prompt "def _():\n" (3 tokens), response " _\n" (2)
    base = ["train", *TINY, "--corpus", str(corpus), "--steps", "1", "--vocab-size", "300", "--heldout-fraction", "0"]
    assert main([*base, "--out", str(tmp_path / "m5"), "--seq-len", "5", "--batch-tokens", "5"]) == 2
    out, err = capsys.readouterr()
    assert "reading the corpus" not in out, out
    assert ("--seq-len: got 5; no unit can fit: with the BPE tokenizer built for a fresh model a unit's prompt, "
            "response and EOS take at least 6 tokens; use at least 6") in err, err
    assert main([*base, "--out", str(tmp_path / "m6"), "--seq-len", "6", "--batch-tokens", "6"]) == 0
    assert "1 train (0 chat) / 0 held-out units, 6 tokens per epoch" in capsys.readouterr().out
    # --init: any tokenizer's bound, checked before the checkpoint (here not one: refused next, for that)
    assert main([*base, "--out", str(tmp_path / "i"), "--seq-len", "2", "--init", str(corpus)]) == 2
    assert "--seq-len: got 2; no unit can fit: with any tokenizer a unit's prompt, response and EOS take at least 3 " \
           "tokens" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "i"), "--seq-len", "3", "--init", str(corpus)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_out_never_replaces_a_model_unless_asked(corpus_dir, tmp_path, capsys):
    """--out naming a directory that holds a model (the shipped one, say) is refused: the run would
    replace its weights and keep its card (a break-test). --overwrite allows it; a directory where a run
    saved no model (only train_args.json and train_log.jsonl) is reused without it."""
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "README.md").write_text("card")

    def train(out, *more):
        return main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "1",
                     "--batch-tokens", "256", "--vocab-size", "300", *more])

    assert train(model) == 2
    assert "--out: " + str(model) + " already holds a model" in capsys.readouterr().err
    assert (model / "config.json").read_text() == "{}"
    assert train(model, "--overwrite") == 0 and json.loads((model / "config.json").read_text())["mask_token_id"]
    left = tmp_path / "diverged"  # what a run that failed after writing its records leaves
    left.mkdir()
    (left / "train_args.json").write_text("{}")
    (left / "train_log.jsonl").write_text("")
    assert train(left) == 0 and (left / "model.safetensors").exists()


def test_a_diverged_run_names_the_checkpoint_it_left(corpus_dir, tmp_path, capsys):
    """A checkpoint saved before the divergence was seen stayed in --out, unmentioned, holding weights
    near 1e30; the error now says it is there and may hold diverged weights."""
    out = tmp_path / "m"
    rc = main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "3", "--log-every", "2",
               "--batch-tokens", "256", "--vocab-size", "300", "--lr", "1e30", "--checkpoint-minutes", "1e-9"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "training diverged" in err and f"is left in {out} and may hold diverged weights" in err
    # (seen at a log step, or in the weights before the next checkpoint: none is taken of NaN weights)
    assert re.search(r"refusion train: --lr: the ((training|held-out) loss|weights) .* the checkpoint saved at step \d is",
                     err)


def test_a_diverged_run_fails_naming_lr_and_saves_nothing(corpus_dir, tmp_path, capsys):
    out = tmp_path / "m"
    rc = main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "3", "--log-every", "1",
               "--batch-tokens", "256", "--vocab-size", "300", "--lr", "1e30"])
    assert rc == 2
    assert "--lr: the training loss is nan at step" in capsys.readouterr().err  # it was saved as a NaN model, rc 0
    assert not (out / "model.safetensors").exists()


def test_a_run_that_diverges_at_its_last_step_saves_nothing(corpus_dir, tmp_path, capsys):
    """The losses are read before each update, so weights that became NaN at the last step (no held-out
    units to score them after it) were saved with exit 0, and the serving loader then refused the model
    (helper-198). Now the weights are checked before the save."""
    out = tmp_path / "m"
    rc = main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "2", "--log-every", "50",
               "--heldout-max", "0", "--batch-tokens", "256", "--vocab-size", "300", "--lr", "1e10"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "refusion train: --lr: the weights are not finite after step 2: training diverged" in err
    assert not (out / "model.safetensors").exists()


def test_a_run_whose_weights_are_no_better_than_a_uniform_guess_saves_nothing(corpus_dir, tmp_path, capsys):
    """--lr 1e30 --steps 1 saved finite weights of 1e30 that predict the uniform distribution, with exit 0:
    its training loss is read before the update and its weights are finite. The trained weights' AR loss
    (here on training examples: this corpus holds out none) is ln(300), a uniform guess: refused as diverged,
    nothing saved, or, past a checkpoint, the checkpoint named as the NaN guard names it."""
    out = tmp_path / "m"
    rc = main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "1",
               "--batch-tokens", "256", "--vocab-size", "300", "--lr", "1e30"])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert re.search(r"refusion train: --lr: the training-example AR loss after step 1 is 5\.7038 \(5\.\d{4} before "
                     r"training\), no better than ln\(300\) = 5\.7038, what a uniform guess over the vocabulary "
                     r"scores: training diverged; lower the learning rate \(its peak was 1e\+30\)$", err.strip()), err
    assert not (out / "model.safetensors").exists()
    checkpointed = tmp_path / "c"
    rc = main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(checkpointed), "--steps", "1",
               "--batch-tokens", "256", "--vocab-size", "300", "--lr", "1e30", "--checkpoint-minutes", "1e-9"])
    err = capsys.readouterr().err
    assert rc == 2 and "no better than ln(300)" in err, err
    assert f"the checkpoint saved at step 1 is left in {checkpointed} and may hold diverged weights: delete it" in err
    fresh = tmp_path / "fresh"  # the default rate's first step: 5.706 from 5.734, above ln(300) = 5.704 still
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(fresh), "--steps", "1",
                 "--batch-tokens", "256", "--vocab-size", "300"]) == 0


def test_a_fine_tune_defaults_to_a_lower_learning_rate(corpus_dir, tmp_path):
    """--lr unset: 2e-3 for a fresh model, 5e-4 with --init (2e-3 on the shipped model took its MDM loss
    from 5.1 to 15.4 in 4 steps, helper-198); the rate used is recorded in train_args.json."""
    fresh = tmp_path / "fresh"
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(fresh), "--steps", "1",
                 "--batch-tokens", "256", "--vocab-size", "300"]) == 0
    assert json.loads((fresh / "train_args.json").read_text())["args"]["lr"] == 2e-3
    tuned = tmp_path / "tuned"
    assert main(["train", "--threads", "1", "--corpus", str(corpus_dir), "--out", str(tuned), "--init", str(fresh),
                 "--steps", "1", "--batch-tokens", "256"]) == 0
    assert json.loads((tuned / "train_args.json").read_text())["args"]["lr"] == 5e-4


def test_sigterm_while_training_saves_the_model_and_exits_130(corpus_dir, tmp_path):
    """SIGTERM (or Ctrl-C) during training stops after the step in flight and saves a loadable model;
    it was a KeyboardInterrupt traceback (SIGINT) or a silent death (SIGTERM) with nothing saved. The
    signal is sent once the first log line shows training under way: no timing luck."""
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from workers.runner import ModelRunner

    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-m", "integrations.cli", "train", *TINY, "--corpus", str(corpus_dir),
                             "--out", str(out), "--minutes", "10", "--log-every", "1", "--batch-tokens", "256",
                             "--vocab-size", "300"], cwd=Path(__file__).resolve().parents[2], text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "SIGTERM: stopping after this step and saving" in stderr and "Traceback" not in stderr
    assert "interrupted at step" in stdout and f"saved {out}" in stdout
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert records and ModelRunner(str(out), device="cpu").info.num_layers == 1


def test_checkpoints_follow_the_clock_at_any_step_and_a_tiny_budget_still_trains(corpus_dir, tmp_path, monkeypatch):
    """--checkpoint-minutes is checked after every optimizer step, not only at log steps (with
    --log-every above the run's steps a long run saved nothing until its end); --minutes smaller than one
    step still trains that step (it saved an untrained model)."""
    from integrations import cli_train

    saves = []
    real_save = cli_train.save_model_dir
    monkeypatch.setattr(cli_train, "save_model_dir", lambda *a, **kw: (saves.append(a[3]), real_save(*a, **kw)))
    out = tmp_path / "m"
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "3", "--log-every", "100",
                 "--checkpoint-minutes", "1e-9", "--batch-tokens", "256", "--vocab-size", "300",
                 "--save-dtype", "bfloat16"]) == 0
    assert saves == ["float32"] * 3 + ["bfloat16"]  # one checkpoint per step, then the final save
    out2 = tmp_path / "m2"
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out2), "--minutes", "1e-9",
                 "--batch-tokens", "256", "--vocab-size", "300"]) == 0
    records = [json.loads(line) for line in (out2 / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1]


def test_total_minutes_leaves_the_training_loop_what_preparation_did_not_use(corpus_dir, tmp_path, capsys):
    """--total-minutes (a machine lent for a fixed time): the loop's budget is the total less the
    preparation (corpus, tokenizer, model) and SAVE_MARGIN_MINUTES, recorded in train_args.json; with
    --minutes too, the smaller; a total already spent still trains the first step and saves."""
    from integrations.cli_train_flags import SAVE_MARGIN_MINUTES

    said = [""]

    def run(out, *flags):
        assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--batch-tokens", "256",
                     "--vocab-size", "300", "--log-every", "1", *flags]) == 0
        said[0] = capsys.readouterr().out
        args = json.loads((out / "train_args.json").read_text())
        steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
        return args, steps

    args, steps = run(tmp_path / "a", "--total-minutes", "0.52")
    want = 0.52 - args["prep_s"] / 60 - SAVE_MARGIN_MINUTES
    assert 0 < args["train_minutes"] < 0.02 and abs(args["train_minutes"] - want) < 0.1 / 60 + 1e-3, args
    assert steps and steps[0] == 1
    args, steps = run(tmp_path / "b", "--total-minutes", "60", "--minutes", "1e-9")
    assert args["train_minutes"] == 1e-9 and steps == [1]  # --minutes is the smaller
    args, steps = run(tmp_path / "c", "--total-minutes", "0.01")  # spent before the loop starts
    assert args["train_minutes"] == 1e-6 and steps == [1] and (tmp_path / "c" / "model.safetensors").exists()
    assert "nothing of --total-minutes 0.01 is left for training" in said[0]  # (it said "0.00 ... left")


def test_sigterm_to_the_process_group_with_data_workers_saves_the_model(corpus_dir, tmp_path):
    """systemd, Slurm's scancel or `kill -TERM -PGID` signal the whole group: the DataLoader worker died of
    it and the run failed with the DataLoader's RuntimeError traceback, exit 1, unsaved (helper-214). The
    worker ignores it; the trainer stops after the step and saves. Sent once training is under way."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "m"
    proc = subprocess.Popen([sys.executable, "-m", "integrations.cli", "train", *TINY, "--corpus", str(corpus_dir),
                             "--out", str(out), "--minutes", "10", "--log-every", "1", "--batch-tokens", "256",
                             "--vocab-size", "300", "--data-workers", "1"], cwd=Path(__file__).resolve().parents[2],
                            text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        for line in proc.stdout:
            if line.startswith("step "):
                break
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.count("SIGTERM: stopping after this step and saving") == 1, stderr
    assert f"saved {out}" in stdout and (out / "model.safetensors").exists()


_TWO_SIGNALS_IN_ONE_C_CALL = """
import os, signal, sys
from integrations import cli_train
interrupt = cli_train._Interrupt()
interrupt.install()
interrupt.training = True
# A signal still pending when the next one comes is merged by the kernel (a human's double Ctrl-C is
# not): the shell sends the next one once /proc shows none pending, the first delivered to C's handler
kill = "kill -TERM %d" % os.getpid()
delivered = "while grep -q '^ShdPnd:.*[1-9a-f]' /proc/%d/status; do :; done" % os.getpid()
try:
    os.system(("; " + delivered + "; ").join([kill] * int(sys.argv[1])))  # all while system() waits in C
    print("stop after this step" if interrupt.requested else "not asked")
except KeyboardInterrupt:
    print("stop at once")
finally:
    interrupt.restore()
"""


@pytest.mark.parametrize("signals,outcome", [(1, "stop after this step"), (2, "stop at once")])
def test_two_signals_within_one_step_stop_at_once(signals, outcome):
    """A double Ctrl-C (or SIGTERM) during one backward() stopped after the step and saved, as one does:
    Python ran the handler once for both. The two signals are forced into one C call (a shell sending
    them while os.system waits, each once the last is delivered), so Python's merging happens every run;
    the handler counts the deliveries on its wakeup pipe."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", _TWO_SIGNALS_IN_ONE_C_CALL, str(signals)], text=True,
                          capture_output=True, timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.stdout.strip() == outcome, done.stderr


def test_a_data_worker_drops_the_trainers_wakeup_pipe():
    """A forked DataLoader worker inherits the trainer's wakeup pipe, so a signal it took (a SIGTERM to the
    process group) would count as the trainer's second delivery and stop the run unsaved."""
    import signal

    from integrations import cli_train
    from training.batch_stream import _leave_interrupts_to_the_trainer

    interrupt = cli_train._Interrupt()
    interrupt.install()
    try:
        pid = os.fork()
        if pid == 0:  # the worker: what torch's DataLoader runs first in each worker process
            _leave_interrupts_to_the_trainer(0)
            os._exit(0 if signal.set_wakeup_fd(-1) == -1 else 1)
        assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    finally:
        interrupt.restore()
    assert signal.set_wakeup_fd(-1) == -1  # restored: no pipe left behind in the test process


def test_interrupted_before_the_first_step_saves_nothing(corpus_dir, tmp_path, monkeypatch, capsys):
    """A stop asked for before any step (the signal raced the loop's start) saved an untrained model as if
    it were a result; the request is forced here by an interrupt that is already set when training starts."""
    from integrations import cli_train

    class StopAtOnce(cli_train._Interrupt):
        @property
        def requested(self):
            return self.training

        @requested.setter
        def requested(self, value):
            pass

    monkeypatch.setattr(cli_train, "_Interrupt", StopAtOnce)
    out = tmp_path / "m"
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "3",
                 "--batch-tokens", "256", "--vocab-size", "300"]) == 130
    assert "interrupted before the first step; nothing saved" in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


def test_a_broken_init_checkpoint_fails_naming_init_before_the_corpus_is_read(corpus_dir, tmp_path, capsys):
    """Truncated weights were a SafetensorError traceback (rc 1), after the corpus was built (minutes on
    stdlib); the checkpoint now loads first and any load failure is one line naming --init."""
    import shutil

    from transformers import AutoModelForCausalLM, AutoTokenizer

    good = tmp_path / "good"
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(good), "--steps", "1",
                 "--batch-tokens", "256", "--vocab-size", "300"]) == 0
    broken = tmp_path / "broken"
    shutil.copytree(good, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--init", str(broken),
                 "--steps", "1", "--threads", "1"]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"refusion train: --init: {weights}: not a readable safetensors file (") and "Traceback" not in err
    assert "reading the corpus" not in out  # failed before the corpus was built
    assert AutoModelForCausalLM.from_pretrained(str(good)) and AutoTokenizer.from_pretrained(str(good))


def test_an_init_checkpoint_without_its_tokenizer_fails_naming_init(corpus_dir, tiny_model_dir, tmp_path, capsys):
    """Without tokenizer files an empty tokenizer loaded and encoded every unit to nothing, and the run
    failed on "--seq-len: no unit fits; raise --seq-len" (helper-198); with tokenizer_config.json alone,
    transformers' "Couldn't instantiate the backend tokenizer ..." was cut at 300 characters (helper-248).
    Both name the file as `refusion serve` and `generate` do (workers.loader.load_tokenizer)."""
    import shutil

    for kept, said in ((("config.json", "model.safetensors"), "missing; the directory needs tokenizer files"),
                       (("config.json", "model.safetensors", "tokenizer_config.json"),
                        "missing: tokenizer_config.json alone holds no vocabulary")):
        bare = tmp_path / f"bare{len(kept)}"
        bare.mkdir()
        for name in kept:
            shutil.copy(tiny_model_dir / name, bare / name)
        assert main(["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--init", str(bare),
                     "--steps", "1", "--threads", "1"]) == 2
        out, err = capsys.readouterr()
        assert err.startswith(f"refusion train: --init: {bare / 'tokenizer.json'}: {said}") and err.count("\n") == 1, err
        assert "reading the corpus" not in out


def test_an_init_tokenizer_with_a_gap_in_its_ids_fails_naming_init(corpus_dir, tmp_path, capsys):
    """<|mask|> removed from a tokenizer leaves id 2 unused; transformers added it back at len(tokenizer),
    the id of a real BPE token, which was then encoded as the mask (exit 0, helper-199)."""
    import shutil

    good = tmp_path / "good"
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(good), "--steps", "1",
                 "--batch-tokens", "256", "--vocab-size", "300"]) == 0
    gap = tmp_path / "gap"
    shutil.copytree(good, gap)
    data = json.loads((gap / "tokenizer.json").read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "<|mask|>"]
    data["model"]["vocab"].pop("<|mask|>", None)
    (gap / "tokenizer.json").write_text(json.dumps(data))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (gap / name).exists():
            config = json.loads((gap / name).read_text())
            config.pop("mask_token", None)
            config.get("added_tokens_decoder", {}).pop("2", None)
            (gap / name).write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--init", str(gap),
                 "--steps", "1", "--threads", "1", "--batch-tokens", "256"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("refusion train: --init: the tokenizer's ids have a gap, so <|mask|> got id "), err
    assert not (tmp_path / "m" / "model.safetensors").exists()


def test_an_update_past_float32_fails_naming_lr(corpus_dir, tmp_path, capsys):
    """--lr 1e38: AdamW's first update overflows float32, a RuntimeError traceback (helper-199)."""
    out = tmp_path / "m"
    rc = main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "1",
               "--heldout-max", "0", "--batch-tokens", "256", "--vocab-size", "300", "--lr", "1e38"])
    err = capsys.readouterr().err
    assert rc == 2 and "refusion train: --lr: the update at step 1 overflows float32" in err, err
    assert not (out / "model.safetensors").exists()


def test_overwrite_removes_the_old_models_files_and_keeps_the_rest(corpus_dir, tmp_path):
    """--overwrite over a model directory left the old refusion.json (its decode settings then applied to
    the new model) and its README.md card; a model's files go, other files and folders stay."""
    out = tmp_path / "m"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "refusion.json").write_text('{"slot_threshold": 0.6}')
    (out / "README.md").write_text("old card")
    (out / "model-00001-of-00002.safetensors").write_bytes(b"old")
    (out / "notes.txt").write_text("mine")
    (out / "sub").mkdir()
    assert main(["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--steps", "1", "--overwrite",
                 "--batch-tokens", "256", "--vocab-size", "300"]) == 0
    names = {p.name for p in out.iterdir()}
    assert not {"refusion.json", "README.md", "model-00001-of-00002.safetensors"} & names
    assert {"notes.txt", "sub", "model.safetensors", "config.json", "train_log.jsonl"} <= names
    assert json.loads((out / "config.json").read_text())["mask_token_id"] is not None


def test_a_save_cut_short_leaves_the_last_complete_model(corpus_dir, tmp_path, monkeypatch, capsys):
    """A second Ctrl-C while the final save wrote its files left config.json and weights without a
    tokenizer (the directory no longer loaded) and said "nothing saved"; --overwrite removed the old model
    when the run started, so a cut save lost it. The cut is forced where the weights are written."""
    from transformers import Qwen3ForCausalLM

    from workers.runner import ModelRunner

    real_save, calls = Qwen3ForCausalLM.save_pretrained, []

    def cut_on(which: int):
        def save(self, path, *args, **kwargs):
            calls.append(path)
            if len(calls) == which:
                (Path(path) / "model.safetensors").write_bytes(b"half-written")
                raise KeyboardInterrupt  # what the second signal raises (cli_train._Interrupt)
            return real_save(self, path, *args, **kwargs)
        return save

    out = tmp_path / "m"
    out.mkdir()
    old = {"config.json": "{}", "refusion.json": '{"slot_threshold": 0.6}', "model.safetensors": "old weights",
           "train_log.jsonl": '{"step": 9}\n'}  # the old model's records: they were overwritten at the start
    for name, text in old.items():
        (out / name).write_text(text)
    monkeypatch.setattr(Qwen3ForCausalLM, "save_pretrained", cut_on(1))
    argv = ["train", *TINY, "--corpus", str(corpus_dir), "--out", str(out), "--overwrite", "--batch-tokens", "256",
            "--vocab-size", "300"]
    assert main([*argv, "--steps", "1"]) == 130
    assert "interrupted while training; nothing saved" in capsys.readouterr().err
    assert {p.name: p.read_text() for p in out.iterdir() if p.name in old} == old  # the old model, whole
    assert set(p.name for p in out.iterdir()) == set(old) | {".run"}  # no .saving; this run's records aside
    assert {p.name for p in (out / ".run").iterdir()} == {"train_args.json", "train_log.jsonl"}

    # checkpoints at every step, the final save cut: the last checkpoint is named, and it loads
    calls.clear()
    monkeypatch.setattr(Qwen3ForCausalLM, "save_pretrained", cut_on(3))
    assert main([*argv, "--steps", "3", "--checkpoint-minutes", "1e-9", "--log-every", "1"]) == 130
    assert f"interrupted while training; the checkpoint of step 2 is in {out}" in capsys.readouterr().err
    names = {p.name for p in out.iterdir()}
    assert not {"refusion.json", ".run"} & names  # the old model's files went at the first save
    steps = [json.loads(line)["step"] for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert steps and 9 not in steps  # this run's log, moved in at the first save, written on after it
    assert ModelRunner(str(out), device="cpu").info.num_layers == 1
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir() if p.is_file()} == {oct(0o666 & ~umask)}


def test_init_rows_past_the_context_are_refused_and_every_token_gets_an_embedding_row(corpus_dir, tiny_model_dir,
                                                                                        tmp_path, capsys, monkeypatch):
    """--seq-len past the --init model's max_position_embeddings trained positions it is not made for, with
    no word, and rows whose step does not fit in memory (helper-186) are refused; a tokenizer holding ids
    past the embedding crashed mid-loop (IndexError)."""
    import shutil

    from workers.runner import ModelRunner

    base = ["train", "--corpus", str(corpus_dir), "--steps", "1", "--threads", "1"]
    assert main([*base, "--out", str(tmp_path / "long"), "--init", str(tiny_model_dir), "--seq-len", "8192",
                 "--batch-tokens", "8192"]) == 2
    assert "--seq-len: 8192 is longer than the --init model's context (max_position_embeddings 4096)" in \
        capsys.readouterr().err
    # the --init model's step, with the memory free made small: refused before the corpus is built, naming
    # --seq-len where the part growing with it squared is what does not fit (a context of 16384), and
    # --batch-tokens where the step's tokens do not fit whatever the row length (helper-187)
    monkeypatch.setattr("integrations.cli_train_flags._free_bytes", lambda device: 2 * 2**30)

    def weights_loaded(*args, **kwargs):  # the check is made before: a checkpoint too large was loaded first
        raise AssertionError("the weights were loaded before the memory check")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", weights_loaded)
    long_context = Path(shutil.copytree(tiny_model_dir, tmp_path / "long-context"))
    config = json.loads((long_context / "config.json").read_text())
    (long_context / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16384}))
    assert main([*base, "--out", str(tmp_path / "big"), "--init", str(long_context), "--seq-len", "16384",
                 "--batch-tokens", "16384"]) == 2
    err = capsys.readouterr().err
    assert "--seq-len: rows of 16384 tokens: the run needs about " in err and "more than the 2.0 GiB free on cpu" in err, err
    assert main([*base, "--out", str(tmp_path / "big"), "--init", str(tiny_model_dir), "--seq-len", "256",
                 "--batch-tokens", "524288"]) == 2
    assert "--batch-tokens: 524288 tokens a step: the run needs about " in capsys.readouterr().err
    monkeypatch.undo()
    init = Path(shutil.copytree(tiny_model_dir, tmp_path / "init"))
    tokenizer = json.loads((init / "tokenizer.json").read_text())
    rows = json.loads((init / "config.json").read_text())["vocab_size"]
    tokenizer["added_tokens"].append({"id": rows + 3, "content": "<|extra|>", "single_word": False, "lstrip": False,
                                      "rstrip": False, "normalized": False, "special": True})
    (init / "tokenizer.json").write_text(json.dumps(tokenizer))
    out = tmp_path / "grown"
    assert main([*base, "--out", str(out), "--init", str(init), "--batch-tokens", "256", "--seq-len", "128"]) == 0
    assert f"the embedding grows from {rows} to" in capsys.readouterr().out
    info = ModelRunner(str(out), device="cpu").info  # the serving loader's check: every id has its row
    assert info.vocab_size > rows


def _without(name: str):
    def drop(init: Path) -> None:
        from safetensors.torch import load_file, save_file

        weights = load_file(init / "model.safetensors")
        del weights[name]
        save_file(weights, init / "model.safetensors", metadata={"format": "pt"})
    return drop


def _config_with(**changes):
    def edit(init: Path) -> None:
        path = init / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


@pytest.mark.parametrize("break_it, said", [
    (_without("model.layers.1.mlp.up_proj.weight"),
     "model.safetensors: tensor 'model.layers.1.mlp.up_proj.weight' is missing from the checkpoint"),
    (_config_with(model_type="llama"), "config.json: model_type is 'llama'; only 'qwen3' is supported"),
    (_config_with(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
     "config.json: rope type 'yarn' is not supported"),
    (_config_with(num_hidden_layers=1, layer_types=["full_attention"]), "model.safetensors: holds tensors of layer 1"),
], ids=["missing-tensor", "llama", "yarn", "extra-layer"])
def test_an_init_checkpoint_the_engine_would_refuse_is_refused_before_the_corpus_is_read(
        corpus_dir, tiny_model_dir, tmp_path, capsys, break_it, said):
    """transformers filled a missing tensor with random values, loaded a Llama, a yarn RoPE, and trained on:
    the saved model was one the engine refuses (or, a tensor missing, served random weights). --init now
    passes the serving loader's checks first (workers.model_config.read_config, workers.checkpoint.check_weights)."""
    import shutil

    init = Path(shutil.copytree(tiny_model_dir, tmp_path / "init"))
    break_it(init)
    out = tmp_path / "m"
    assert main(["train", "--corpus", str(corpus_dir), "--out", str(out), "--init", str(init), "--steps", "1",
                 "--threads", "1"]) == 2
    printed, err = capsys.readouterr()
    assert err.startswith(f"refusion train: --init: {init}/{said}") and err.count("\n") == 1, err
    assert "loading" not in printed and not out.exists()  # refused with the flags, before the checkpoint loads


def test_an_init_checkpoint_of_pickled_weights_missing_a_tensor_is_refused_once_loaded(corpus_dir, tiny_model_dir,
                                                                                        tmp_path, capsys):
    """pytorch_model.bin has no header to check with the flags: what transformers reports missing is refused."""
    import shutil

    from safetensors.torch import load_file

    init = Path(shutil.copytree(tiny_model_dir, tmp_path / "init"))
    weights = load_file(init / "model.safetensors")
    del weights["model.layers.0.self_attn.q_norm.weight"]
    torch.save(weights, init / "pytorch_model.bin")
    (init / "model.safetensors").unlink()
    assert main(["train", "--corpus", str(corpus_dir), "--out", str(tmp_path / "m"), "--init", str(init),
                 "--steps", "1", "--threads", "1"]) == 2
    printed, err = capsys.readouterr()
    said = (f"refusion train: --init: {init}: tensor 'model.layers.0.self_attn.q_norm.weight' missing from the "
            "checkpoint (transformers would fill it with random values); give a complete one\n")
    assert err.endswith(said)  # (after transformers' progress bar)
    assert "reading the corpus" not in printed

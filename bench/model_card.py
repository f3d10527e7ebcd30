"""Model-card numbers of a trained ReFusion model on held-out standard-library code, in one command:

    OMP_NUM_THREADS=1 python bench/model_card.py [--model models/refusion-tiny-code] [--prompts 64]

Prints a markdown table of:
  - parameters (from model.safetensors; tied head counted once);
  - held-out AR loss: next-token cross-entropy over response + EOS given the prompt, every held-out
    unit that fits the training sequence length (transformers forward, training/losses.heldout_losses);
  - next-line exact match: AR greedy's first generated line == the true first line of the response
    (trailing whitespace ignored), on --prompts held-out units spread evenly over the held-out files;
  - valid Python: share of those prompts whose completion (cut at EOS; without EOS, after its last
    complete line) leaves the unit parseable by `ast`, for AR greedy and for ReFusion;
  - chat and tool-call rows (bench/chat_card.py): held-out requests through /v1/chat/completions;
  - ReFusion TPF (generated tokens / model forwards, prefill-only forwards excluded, spec definition)
    and agreement with AR greedy (identical output; mean matching-prefix fraction) at the decode settings
    in the model's refusion.json (or --set KEY=VALUE overrides), both decoded with the serving engine
    runner (workers/runner.py) and the decoders (decoding/refusion.py, decoding/ar.py, decode_batch).

The held-out split is the one `refusion train` used: files of the interpreter's standard library whose
path hash falls in --heldout-fraction (read from train_args.json when present). Numbers depend on the
Python version's stdlib (the shipped model was trained and measured on CPython 3.11).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
DEFAULT_MODEL = REPO / "models" / "refusion-tiny-code"


def parameter_count(model_dir: Path) -> int:
    """Number of stored parameters (safetensors), each tensor counted once."""
    from safetensors.torch import load_file

    return sum(t.numel() for path in sorted(model_dir.glob("*.safetensors")) for t in load_file(str(path)).values())


def heldout_pairs(tokenizer, train_args: dict, corpus: list[str]) -> list[tuple[list[int], list[int]]]:
    """Held-out (prompt_ids, response_ids) pairs, in corpus order (sorted paths), fitting seq_len."""
    from training.corpus import load_units, tokenize_units

    _, heldout = load_units(corpus, float(train_args.get("heldout_fraction", 0.03)))
    return tokenize_units(tokenizer, heldout, int(train_args.get("seq_len", 256)))


def heldout_ar_loss(model_dir: Path, pairs, eos_id: int, mask_id: int) -> float:
    import torch
    from transformers import AutoModelForCausalLM

    from training.losses import heldout_losses

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return heldout_losses(model, pairs, mask_token_id=mask_id, eos_token_id=eos_id)["heldout_ar_loss"]


def decode_all(runner, kind: str, prompts: list[list[int]], params) -> tuple[list[list[int]], list]:
    """Decode every prompt (one packed batch through the engine runner); returns (outputs, stats)."""
    from decoding.ar import ARDecoder
    from decoding.loop import decode_batch
    from workers.session import RunnerSession
    from decoding.refusion import RefusionDecoder

    cls = RefusionDecoder if kind == "refusion" else ARDecoder
    decoders = [cls(f"{kind}-{i}", p, params) for i, p in enumerate(prompts)]
    outputs = decode_batch(RunnerSession(runner), decoders)
    return outputs, [d.stats for d in decoders]


def first_line(text: str) -> str:
    return text.split("\n", 1)[0].rstrip()


def _cut(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def agreement(a: list[list[int]], b: list[list[int]], eos: int) -> tuple[float, float]:
    """(fraction of identical outputs, mean matching-prefix length / reference length), cut at EOS."""
    same = prefix = 0.0
    for x, y in zip(a, b):
        x, y = _cut(x, eos), _cut(y, eos)
        same += x == y
        n = 0
        while n < min(len(x), len(y)) and x[n] == y[n]:
            n += 1
        prefix += n / max(len(y), 1) if y else float(not x)
    return same / len(a), prefix / len(a)


class CardError(ValueError):
    """An input the card cannot be measured with (flag, model directory, held-out split)."""


def judged(completion: str, ended: bool) -> str:
    """The part of a completion that is judged: all of it when it ended with EOS, else up to its last
    complete line (a function still being written is judged on what it has so far)."""
    return completion if ended else completion[: completion.rfind("\n") + 1]


def parses(prompt: str, completion: str, ended: bool) -> bool:
    """Whether prompt + the judged completion (`judged`) is valid Python (ast)."""
    import ast

    completion = judged(completion, ended)
    try:
        ast.parse(prompt + completion)
    except (SyntaxError, ValueError):
        return False
    return True


def parse_rate(tok, prompts: list[list[int]], outputs: list[list[int]], eos: int) -> float:
    """Share of prompts whose completion (cut at EOS) keeps the unit valid Python (see `parses`)."""
    ok = sum(parses(tok.decode(p), tok.decode(_cut(o, eos)), eos in o) for p, o in zip(prompts, outputs))
    return ok / max(len(prompts), 1)


def _parse_sets(items: list[str]) -> dict:
    """--set KEY=VALUE items as {key: JSON value}; raises CardError naming the item."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            out[key] = json.loads(value)
        except ValueError:
            raise CardError(f"--set {item}: the value must be JSON (a number, true/false, or a quoted string)") from None
        if not sep or not key:
            raise CardError(f"--set {item}: use KEY=VALUE, e.g. slot_threshold=0.8")
    return out


def measure(model_dir: Path, n_prompts: int, overrides: dict, skip_loss: bool = False, chat_requests: int = 20) -> dict:
    """Every model-card number for one model directory and decode setting."""
    from decoding.api import DecodeParamError
    from decoding.params import DecodeParams, load_model_defaults
    from workers.runner import ModelRunner

    from bench.bench_args import context_problem

    args_path = model_dir / "train_args.json"
    train_args = json.loads(args_path.read_text()).get("args", {}) if args_path.exists() else {}
    try:
        params = DecodeParams.from_dict(load_model_defaults(model_dir) | overrides)
    except DecodeParamError as exc:
        raise CardError(f"--set: {exc}") from None
    seq_len = int(train_args.get("seq_len", 256))  # (held-out units fit it, tokenize_units: so do their prompts)
    given = f"--set gen_length={params.gen_length}" if "gen_length" in overrides else f"gen_length {params.gen_length}"
    if problem := context_problem(model_dir, seq_len + params.gen_length,
                                  f"{given} beside held-out prompts of up to seq_len {seq_len} tokens"):
        raise CardError(problem)  # checked before the model loads: 100,000,000 tried to allocate 156 TB
    runner = ModelRunner(str(model_dir))
    tok, eos, mask = runner.tokenizer, runner.info.eos_token_id, runner.info.mask_token_id
    pairs = heldout_pairs(tok, train_args, ["stdlib"])
    if not pairs:
        raise CardError(f"no held-out unit: the model's held-out split (heldout_fraction "
                        f"{train_args.get('heldout_fraction', 0.03)} in train_args.json) holds no standard-library unit "
                        f"that fits seq_len {train_args.get('seq_len', 256)}; the card measures on held-out code only")
    row: dict = {"model": str(model_dir), "parameters": parameter_count(model_dir), "heldout_units": len(pairs)}
    if not skip_loss:
        row["heldout_ar_loss"] = round(heldout_ar_loss(model_dir, pairs, eos, mask), 4)
    subset = pairs[:: max(1, len(pairs) // n_prompts)][:n_prompts]  # evenly spread over held-out files
    prompts = [p for p, _ in subset]
    truth = [first_line(tok.decode(r)) for _, r in subset]
    row["decode"] = {k: getattr(params, k) for k in ("gen_length", "slot_size", "serial_num_blocks",
                                                      "slot_threshold", "token_threshold", "temperature")}
    t0 = time.monotonic()
    ar_out, ar_stats = decode_all(runner, "ar", prompts, params)
    row["ar_wall_s"] = round(time.monotonic() - t0, 1)
    t0 = time.monotonic()
    rf_out, rf_stats = decode_all(runner, "refusion", prompts, params)
    row["refusion_wall_s"] = round(time.monotonic() - t0, 1)
    ar_lines = [first_line(tok.decode(_cut(o, eos))) for o in ar_out]
    rf_lines = [first_line(tok.decode(_cut(o, eos))) for o in rf_out]
    row["prompts"] = len(prompts)
    row["ar_next_line_exact"] = round(sum(a == t for a, t in zip(ar_lines, truth)) / len(prompts), 4)
    row["refusion_next_line_exact"] = round(sum(a == t for a, t in zip(rf_lines, truth)) / len(prompts), 4)
    gen, fwd = sum(s.generated_tokens for s in rf_stats), sum(s.forwards for s in rf_stats)
    row["refusion_tpf"] = round(gen / max(fwd, 1), 3)
    row["ar_tpf"] = round(sum(s.generated_tokens for s in ar_stats) / max(sum(s.forwards for s in ar_stats), 1), 3)
    same, prefix = agreement(rf_out, ar_out, eos)
    row["refusion_equals_ar"], row["refusion_ar_prefix_match"] = round(same, 4), round(prefix, 4)
    row["ar_valid_python"] = round(parse_rate(tok, prompts, ar_out, eos), 4)
    row["refusion_valid_python"] = round(parse_rate(tok, prompts, rf_out, eos), 4)
    row["example"] = {"prompt": tok.decode(prompts[0]), "ar": tok.decode(_cut(ar_out[0], eos)),
                      "refusion": tok.decode(_cut(rf_out[0], eos))}
    if chat_requests:
        from bench.chat_card import measure_chat

        row |= measure_chat(model_dir, ["stdlib"], float(train_args.get("heldout_fraction", 0.03)), chat_requests)
    return row


def print_table(row: dict) -> None:
    keys = ["parameters", "heldout_units", "heldout_ar_loss", "prompts", "ar_next_line_exact",
            "refusion_next_line_exact", "ar_valid_python", "refusion_valid_python", "refusion_tpf", "ar_tpf",
            "refusion_equals_ar", "refusion_ar_prefix_match", "ar_wall_s", "refusion_wall_s", "chat_requests",
            "tool_requests"] + [f"{m}_{k}" for m in ("ar", "refusion") for k in (
                "chat_nonempty", "chat_valid_python", "tool_call_rate", "tool_call_exact", "forced_tool_call_rate",
                "forced_tool_call_exact")]
    print(f"model: {row['model']}\ndecode: {json.dumps(row['decode'])}\n")
    print("| metric | value |\n|---|---|")
    for k in keys:
        if k in row:
            print(f"| {k} | {row[k]} |")
    ex = row["example"]
    print(f"\nexample prompt:\n{ex['prompt']}--- AR:\n{ex['ar']}\n--- ReFusion:\n{ex['refusion']}")
    for mode in ("ar", "refusion"):
        if f"{mode}_chat_example" in row:
            chat = row[f"{mode}_chat_example"]
            print(f"\nchat ({mode}): {chat['request']}\n{chat['content']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--prompts", type=int, default=64, help="held-out prompts to decode")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="decode setting overrides (JSON values)")
    parser.add_argument("--skip-loss", action="store_true", help="skip the held-out loss (decode numbers only)")
    parser.add_argument("--chat-requests", type=int, default=20,
                        help="held-out chat and tool-call requests each (bench/chat_card.py); 0 skips them")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.prompts < 1 or args.chat_requests < 0:
        parser.error("--prompts must be at least 1 and --chat-requests at least 0")
    import torch

    import structlog

    torch.set_num_threads(1)
    saved = structlog.get_config()
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))  # the chat rows' engine log
    from workers.loader import ModelDirError

    try:  # goes to stderr, so stdout is the table or the one JSON object alone
        row = measure(Path(args.model), args.prompts, _parse_sets(args.set), args.skip_loss, args.chat_requests)
    except (CardError, ModelDirError) as exc:
        print(f"model_card: {exc}", file=sys.stderr)
        return 2
    finally:
        structlog.configure(**saved)
    print(json.dumps(row)) if args.json else print_table(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())

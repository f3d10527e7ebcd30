"""`refusion generate`: decode one prompt with ReFusion or AR and print the completion.

    refusion generate --prompt $'def add(a, b):\n    ' [--mode refusion|ar] [--gen-length 64] [--json]

The prompt is tokenized as is (no chat template; special tokens only if the tokenizer's post-processor
adds them). Decoding parameters default to the model's (`refusion.json`, else decoding.params
SERVING_DEFAULTS); flags override them. Plain output is the completion text; --json prints one object:
text, token_ids (generated ids in text order, up to and excluding the first EOS), forwards,
tokens_per_forward, elapsed_s, and a few more counters. Bad arguments print one line and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from integrations.engine_host import RUNNER_DTYPES

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "refusion-tiny-code"
# --model "" (an unset variable in a script): it ran the shipped model without a word (helper-186); the
# message of every command's --model
EMPTY_MODEL_FLAG = "is empty; give a model directory, or leave --model out for the shipped model"

# DecodeParams field -> the flag that sets it (so errors name what the user typed)
FLAGS = {
    "gen_length": "--gen-length",
    "slot_size": "--slot-size",
    "serial_num_blocks": "--blocks",
    "slot_threshold": "--slot-threshold",
    "token_threshold": "--token-threshold",
    "temperature": "--temperature",
    "top_k": "--top-k",
    "top_p": "--top-p",
    "min_p": "--min-p",
    "presence_penalty": "--presence-penalty",
    "frequency_penalty": "--frequency-penalty",
    "seed": "--seed",
}
AR_ONLY = ("--presence-penalty", "--frequency-penalty")  # shape AR decoding only (as on the API)
MAX_PROMPT_FILE_BYTES = 64 * 2**20  # far past any context: a bound on reading /dev/zero or a log file


class GenerateArgumentError(ValueError):
    """A `refusion generate` argument is unusable: `flag` names it, the message says what to change."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `refusion generate`."""
    a = parser.add_argument
    a("--model", default=None, help=f"HF model directory (default: {DEFAULT_MODEL})")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text")
    prompt.add_argument("--prompt-file", help="file holding the prompt text (UTF-8); - for standard input")
    a("--mode", choices=["refusion", "ar"], default="refusion")
    a("--gen-length", type=int, help="tokens to generate (ReFusion, or AR with --slot-size: rounded up to a "
      "multiple of --slot-size)")
    a("--slot-size", type=int, help="ReFusion slot size S")
    a("--blocks", type=int, help="ReFusion serial blocks (gen-length / blocks must be a multiple of S)")
    a("--slot-threshold", type=float, help="ReFusion plan: choose slots whose confidence exceeds this")
    a("--token-threshold", type=float, help="ReFusion verify: tokens pass above this probability")
    a("--temperature", type=float, help="0 = greedy (default)")
    a("--top-k", type=int, help="sampling (AR samples and ReFusion's drafts at --temperature > 0): keep the k most likely tokens (0 = off)")
    a("--top-p", type=float, help="sampling (AR samples and ReFusion's drafts at --temperature > 0): nucleus mass in (0, 1]")
    a("--min-p", type=float, help="sampling (AR samples and ReFusion's drafts at --temperature > 0): drop tokens below this share of the top one's probability (0 = off)")
    a("--presence-penalty", type=float, help="--mode ar: subtract from every generated token's logit (-2..2)")
    a("--frequency-penalty", type=float, help="--mode ar: subtract this x each generated token's count (-2..2)")
    a("--seed", type=int, help="seed of the request's random stream, a signed 64-bit integer as the API's (a "
      "negative one is read as itself + 2^63; default: a fresh random one)")
    a("--dtype", choices=RUNNER_DTYPES, default=None,
      help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")
    a("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    a("--json", action="store_true", help="print one JSON object instead of the text")
    # argparse's own errors print usage plus a message; keep them to the one line the CLI promises.
    parser.error = lambda message: _fail(f"{parser.prog}: error: {message}")


def _fail(line: str) -> None:
    print(line, file=sys.stderr)
    raise SystemExit(2)


def _read_prompt(args) -> str:
    if args.prompt is not None:
        text = args.prompt
        try:  # argv's undecodable bytes arrive as lone surrogates (PEP 383)
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise GenerateArgumentError("--prompt", f"is not UTF-8 text (a byte that does not decode at character "
                                        f"{exc.start}); give UTF-8, or the file with --prompt-file") from None
    else:
        try:
            if args.prompt_file == "-":  # standard input, as run-batch's `-`
                data = sys.stdin.buffer.read(MAX_PROMPT_FILE_BYTES + 1)
            else:
                with open(args.prompt_file, "rb") as f:
                    data = f.read(MAX_PROMPT_FILE_BYTES + 1)
            if len(data) > MAX_PROMPT_FILE_BYTES:
                raise GenerateArgumentError("--prompt-file", f"{args.prompt_file} is larger than "
                                            f"{MAX_PROMPT_FILE_BYTES // 2**20} MiB; give the prompt text itself")
            text = data.decode("utf-8")
        except OSError as exc:  # strerror: the path is said once
            raise GenerateArgumentError("--prompt-file", f"cannot read {args.prompt_file}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise GenerateArgumentError("--prompt-file", f"{args.prompt_file} is not UTF-8 text ({exc.reason} at "
                                        f"byte {exc.start})") from exc
    if not text:
        flag = "--prompt" if args.prompt is not None else "--prompt-file"
        raise GenerateArgumentError(flag, "is empty; give some text to continue")
    return text


def _model_dir(args) -> Path:
    if args.model is not None and not args.model.strip():  # (it decoded with the shipped model)
        raise GenerateArgumentError("--model", EMPTY_MODEL_FLAG)
    model_dir = Path(args.model) if args.model else DEFAULT_MODEL
    if not model_dir.is_dir():
        hint = "pass --model DIR" if args.model else "the shipped model is not there; pass --model DIR"
        what = "is a file, not a model directory" if model_dir.exists() else "does not exist"
        raise GenerateArgumentError("--model", f"{model_dir} {what} ({hint})")
    return model_dir


def _load_runner(model_dir: Path, args):
    import torch

    from workers.runner import ModelRunner

    if args.device == "cuda" and not torch.cuda.is_available():
        raise GenerateArgumentError("--device", "cuda requested but no CUDA device is available; use --device cpu")
    dtype = getattr(torch, args.dtype) if args.dtype else None
    return ModelRunner(model_dir, dtype=dtype, device=args.device)


def _params(model_dir: Path, args, runner):
    from decoding.params import DecodeParams, load_model_defaults
    from workers.batch import SEED_MAX

    values = load_model_defaults(model_dir)
    values |= {"eos_token_id": runner.info.eos_token_id, "end_token_ids": runner.info.end_token_ids,
               "mask_token_id": runner.info.mask_token_id}
    for name, flag in FLAGS.items():
        value = getattr(args, flag[2:].replace("-", "_"))  # "--gen-length" -> args.gen_length
        if value is not None:
            values[name] = value
    if args.mode == "ar" and args.slot_size is None:
        # AR decodes token by token: --gen-length is decoded exactly, not rounded up to the model's slot
        # (a length that fits the context was refused, quoting the rounded one)
        values["slot_size"] = 1
    if args.blocks is None:
        # As the API does (openai_sampling.fitting_block_count): without --blocks, the model's block count
        # shrinks to one that splits --gen-length into whole slots instead of failing (the API may also
        # decode up to 10% more slots and stop at max_tokens; --gen-length here is what is decoded).
        from decoding.params import SERVING_DEFAULTS
        from integrations.openai_sampling import fitting_block_count

        full = SERVING_DEFAULTS | values
        if all(isinstance(full[k], int) and full[k] >= 1 for k in ("gen_length", "slot_size")):  # else: named below
            values["serial_num_blocks"] = fitting_block_count(full["gen_length"], full["slot_size"], full["serial_num_blocks"])
    if args.seed is None:
        # As the API (scheduler/validation.with_seed): without --seed sampling is fresh each run; --json's
        # params report the seed drawn, so a run can be repeated with --seed.
        from scheduler.validation import with_seed

        values["seed"] = with_seed({})["seed"]
    elif not -(SEED_MAX + 1) <= args.seed <= SEED_MAX:
        raise GenerateArgumentError("--seed", f"got {args.seed}; use a signed 64-bit integer "
                                              f"({-(SEED_MAX + 1)}..{SEED_MAX})")
    elif args.seed < 0:
        # As the OpenAI routes (openai_sampling: any signed 64-bit seed, a negative one + 2^63, as vLLM),
        # so a request seeded negatively there repeats here
        values["seed"] = args.seed % (SEED_MAX + 1)
    return DecodeParams.from_dict(values)


def _check_context(model_dir: Path, prompt_tokens: int, params, mode: str, prompt_flag: str = "--prompt",
                   asked: int | None = None) -> None:
    """The prompt and the decoded span must fit the model's context (config.json max_position_embeddings),
    as the server checks (integrations/context_fit.py): ReFusion decodes whole slots, so its span is
    gen_length rounded up to slot_size. asked: --gen-length as typed, which the message quotes (params may
    hold it rounded up to whole slots). Raises GenerateArgumentError naming the flag to change."""
    from integrations.engine_client import read_model_card

    context = read_model_card(model_dir)["limits"]["context_length"]
    rounded = -(-params.gen_length // params.slot_size) * params.slot_size if mode == "refusion" else params.gen_length
    if not context or prompt_tokens + rounded <= context:
        return
    room = context - prompt_tokens
    if room < 1:  # no setting of the decode flags helps: the prompt itself is too long
        raise GenerateArgumentError(prompt_flag, f"{prompt_tokens} tokens leave no room in the model's context of "
                                    f"{context} tokens; shorten the prompt to at most {context - 1} tokens (fewer "
                                    f"by the tokens to generate)")
    if mode == "refusion" and params.slot_size > room:
        raise GenerateArgumentError("--slot-size", f"{params.slot_size}-token slots do not fit the model's context of "
                                    f"{context} tokens after a {prompt_tokens}-token prompt; use at most {max(room, 1)}")
    most = room // params.slot_size * params.slot_size if mode == "refusion" else room  # whole slots fit
    asked = params.gen_length if asked is None else asked
    took = f" ({params.gen_length} in whole slots)" if asked != params.gen_length else ""
    raise GenerateArgumentError("--gen-length", f"{asked} tokens{took} after a {prompt_tokens}-token prompt exceed "
                                f"the model's context of {context} tokens; use at most {most}"
                                + (f" (ReFusion decodes whole {params.slot_size}-token slots)" if most != room else ""))


def generate(args) -> dict:
    """Decode one prompt as `args` say; returns the --json object."""
    from decoding.ar import ARDecoder
    from decoding.loop import decode_batch
    from workers.session import RunnerSession
    from decoding.refusion import RefusionDecoder

    model_dir = _model_dir(args)
    prompt = _read_prompt(args)
    runner = _load_runner(model_dir, args)
    params = _params(model_dir, args, runner)
    prompt_ids = runner.tokenizer(prompt)["input_ids"]
    if not prompt_ids:
        raise GenerateArgumentError("--prompt", "tokenizes to nothing; give some text to continue")
    _check_context(model_dir, len(prompt_ids), params, args.mode, "--prompt-file" if args.prompt_file else "--prompt",
                   args.gen_length)
    for flag in AR_ONLY:
        if args.mode == "refusion" and getattr(args, flag[2:].replace("-", "_")):
            raise GenerateArgumentError(flag, "applies to autoregressive decoding: add --mode ar")
    decoder_cls = RefusionDecoder if args.mode == "refusion" else ARDecoder
    decoder = decoder_cls("generate", prompt_ids, params)
    start = time.perf_counter()
    decode_batch(RunnerSession(runner), [decoder])
    elapsed = time.perf_counter() - start
    ids, stats = decoder.output_ids(), decoder.stats
    return {
        "text": runner.tokenizer.decode(ids, skip_special_tokens=True),  # as the server's text: no <|mask|>
        "token_ids": ids,
        "mode": args.mode,
        "prompt_tokens": len(prompt_ids),
        "generated_tokens": stats.generated_tokens,
        "forwards": stats.forwards,
        "prefill_forwards": stats.prefill_forwards,
        "tokens_per_forward": round(stats.tokens_per_forward, 4),
        "slots_accepted_at_verify": stats.slots_accepted_at_verify,
        "slots_accepted_after_completion": stats.slots_accepted_after_completion,
        "elapsed_s": round(elapsed, 4),
        "params": params.to_dict(),
    }


def run(args) -> int:
    """Entry point of `refusion generate`: 0 on success, 2 with a one-line error for bad input."""
    from decoding.api import DecodeParamError
    from workers.loader import ModelDirError

    try:
        result = generate(args)
    except (GenerateArgumentError, DecodeParamError, ModelDirError) as exc:
        # Named as refusion serve names them (serve_preflight): the flag typed, or for a problem of the
        # model directory's files, --model and the file's path
        if isinstance(exc, DecodeParamError) and exc.field in ("refusion.json", "config.json"):
            exc = f"--model: {_model_dir(args) / exc.field}: {exc.message}"  # the file itself (unreadable, a key)
        elif isinstance(exc, DecodeParamError):
            flag = FLAGS.get(exc.field, exc.field)
            if flag in FLAGS.values() and getattr(args, flag[2:].replace("-", "_"), None) is None:
                # not given as a flag: the value came from the model's refusion.json
                exc = f"--model: {_model_dir(args) / 'refusion.json'}: {exc.field}: {exc.message} (fix the file or pass {flag})"
            else:
                exc = f"{flag}: {exc.message}"
        elif isinstance(exc, ModelDirError):
            exc = f"--model: {exc}"
        print(f"refusion generate: error: {exc}".replace("\n", " "), file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result))
    else:
        print(result["text"])
    return 0

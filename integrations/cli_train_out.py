"""--out of `refusion train`: the model directory a run writes. What it holds (the files a run replaces
with --overwrite, and the run's own records) and their removal, the directory created, the run's records
started there (or aside while --overwrite has an old model in it), and a save staged in out/.saving and
moved into place.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from integrations.cli_train_flags import TrainArgumentError


# What a model directory holds (transformers' files, the server's refusion.json, a run's records): with
# --overwrite they are removed when the new model is first saved (save_model_dir), so no file of
# the old model (its decode settings above all) is read with the new one
RUN_RECORDS = ("train_args.json", "train_log.jsonl")  # written by this run when it starts
MODEL_FILES = ("config.json", "generation_config.json", "refusion.json", "tokenizer.json", "tokenizer_config.json",
               "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
               "chat_template.jinja", "train_args.json", "train_log.jsonl")
MODEL_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model*.bin.index.json")


def remove_model_files(out: Path, keep: tuple[str, ...] = ()) -> list[str]:
    """Remove the model files of `out` (MODEL_FILES, MODEL_PATTERNS, and README.md when the directory held
    a config.json: a model card) but those named in `keep`; returns the names removed. Other files and
    every folder stay."""
    names = (set(MODEL_FILES) | ({"README.md"} if (out / "config.json").is_file() else set())) - set(keep)
    doomed = [p for p in out.iterdir() if p.is_file() and (p.name in names or any(p.match(g) for g in MODEL_PATTERNS))]
    for path in doomed:
        path.unlink()
    return sorted(p.name for p in doomed)


def package_set(corpus) -> dict:
    """{"packages": ["name==version", ...]} of the installed distributions when the corpus reads them
    (`site-packages`), for reproduction; {} otherwise."""
    if "site-packages" not in corpus:
        return {}
    from importlib.metadata import distributions

    return {"packages": sorted({f"{d.metadata['Name']}=={d.version}" for d in distributions() if d.metadata["Name"]})}


STAGING = ".saving"  # the folder of `out` a save is written into before its files move into place
# The folder of `out` this run's records (RUN_RECORDS) are written in while --overwrite has an old model
# there: they join the model at its first save, so a run that saves nothing leaves the old model's own
PENDING_RECORDS = ".run"


def save_model_dir(model, tokenizer, out: Path, save_dtype: str = "float32", replace_old: bool = False,
                   records: Path | None = None) -> None:
    """Write an HF model directory whose config.json carries mask_token_id. The files are written into
    out/.saving, then moved into `out` (os.replace, one rename each): a save cut short (a second Ctrl-C)
    leaves the last complete save in place, not config.json and weights without a tokenizer. replace_old:
    the old model's files (remove_model_files, this run's records kept) are removed just
    before the new ones move in (--overwrite: the old model stays whole until a new one is written);
    `records`: a folder whose RUN_RECORDS (this run's, kept aside while the old model stood) move in with
    them, the folder then removed. The files get the umask's usual mode (0644 under 022; the weights were
    0600, unreadable by a service account serving the model)."""
    import torch

    staging = out / STAGING
    shutil.rmtree(staging, ignore_errors=True)  # a save cut short earlier
    staging.mkdir(parents=True)
    try:
        model.to(getattr(torch, save_dtype)).save_pretrained(str(staging), safe_serialization=True)
        tokenizer.save_pretrained(str(staging))
        cfg_path = staging / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["mask_token_id"] = tokenizer.convert_tokens_to_ids(tokenizer.mask_token)
        cfg_path.write_text(json.dumps(cfg, indent=2))
        if replace_old:
            remove_model_files(out, keep=RUN_RECORDS)
        mode = _umask_mode(staging)
        for path in sorted(staging.iterdir()):
            path.chmod(mode)
            os.replace(path, out / path.name)
        if records is not None and records != out:
            for name in RUN_RECORDS:
                if (records / name).exists():
                    os.replace(records / name, out / name)
            shutil.rmtree(records, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _umask_mode(folder: Path) -> int:
    """The mode a new file in `folder` gets (0o666 less the umask), read from a probe file: os.umask can
    only be read by setting it, which for a moment would give every file another thread creates 0o666."""
    probe = folder / ".mode-probe"
    probe.touch()
    try:
        return probe.stat().st_mode & 0o777
    finally:
        probe.unlink()


def created_out_dir(args) -> Path:
    """--out, created if missing; TrainArgumentError("--out") when it cannot be."""
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrainArgumentError("--out", f"{out} cannot be created ({exc.strerror}); give a path you can write") from None
    return out


def start_run_records(args, out: Path, stats: dict) -> Path:
    """The folder this run's records are written in, train_args.json (the flags and `stats`) written there:
    `out`, or out/PENDING_RECORDS while --overwrite has an old model's own records in `out` (they join the
    model at its first save)."""
    records_dir = out
    shutil.rmtree(out / PENDING_RECORDS, ignore_errors=True)  # a run before that saved nothing
    if args.overwrite and any((out / name).exists() for name in ("config.json", *RUN_RECORDS)):
        records_dir = out / PENDING_RECORDS
        records_dir.mkdir()
    (records_dir / "train_args.json").write_text(json.dumps({"argv": sys.argv, "args": vars(args), **stats}, indent=2))
    return records_dir

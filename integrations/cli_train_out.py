"""--out of `refusion train`: what a model directory holds (the files a run replaces with --overwrite,
and the run's own records) and their removal.
"""

from __future__ import annotations

from pathlib import Path


# What a model directory holds (transformers' files, the server's refusion.json, a run's records): with
# --overwrite they are removed when the new model is first saved (cli_train.save_model_dir), so no file of
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

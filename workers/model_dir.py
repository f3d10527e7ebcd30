"""What every part of loading a model directory shares: the names of its files, the mask token's text,
`ModelDirError` (every problem with the directory, naming the file and what is wrong with it) and the
one test of whether a file is there.
"""

from __future__ import annotations

from pathlib import Path

MASK_TOKEN = "<|mask|>"
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
GENERATION_CONFIG = "generation_config.json"


class ModelDirError(ValueError):
    """The model directory cannot be loaded. `path` names the offending file; the message says why."""

    def __init__(self, path: Path | str, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


def _is_file(path: Path) -> bool:
    """path.is_file(), where a folder on the way that this user may not search (chmod 000, another user's
    0700 directory) raises ModelDirError naming the folder; Path.is_file raised a PermissionError traceback."""
    try:
        return path.is_file()
    except PermissionError:
        raise ModelDirError(path.parent, "cannot be read: permission denied; give the user running refusion read "
                                         "and search permission on it (chmod a+rx) and read permission on its "
                                         "files") from None

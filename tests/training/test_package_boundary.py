"""training/ is offline tooling: the serving path never imports it (issue: a shipped model worth trying)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVING_PACKAGES = ("scheduler", "decoding", "workers", "integrations")
TRAIN_COMMAND = Path("integrations/cli_train.py")  # `refusion train` is the one entry point into training/


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_no_serving_module_names_training_in_an_import():
    offenders = []
    for package in SERVING_PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            rel = path.relative_to(REPO)
            if rel == TRAIN_COMMAND:
                continue
            if any(name == "training" or name.startswith("training.") for name in _imported_modules(path)):
                offenders.append(str(rel))
    assert offenders == []


def test_loading_the_serving_app_and_the_cli_leaves_training_unimported():
    code = (
        "import sys\n"
        "import integrations.serve_app, integrations.cli, integrations.editor.runner, integrations.lsp\n"
        "import scheduler.engine, workers.runner, decoding.refusion\n"
        "print(sorted(m for m in sys.modules if m == 'training' or m.startswith('training.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_train_command_reaches_the_moved_modules():
    assert {"training.corpus", "training.trainer", "training.tokenizer_build"} <= _imported_modules(REPO / TRAIN_COMMAND)

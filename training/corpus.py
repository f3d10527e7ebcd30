"""A code-completion corpus from Python source present on any machine.

`--corpus stdlib` reads the interpreter's standard library (tests, idlelib and site-packages excluded);
`--corpus site-packages` reads every installed package of the running interpreter (sysconfig's purelib
and platlib: on a GPU machine torch, jax, scipy, pandas, transformers and the rest); `--corpus DIR ...`
reads every *.py under the given directories (e.g. one installed package). Each file
is cut with `ast` into units: top-level functions, methods of top-level classes and top-level classes,
each dedented. A unit's prompt is its decorators + signature + docstring (when it has one) plus 0-2 more
lines (chosen by a hash of the unit, so the split is deterministic); the response is the rest. The
objective appends EOS to the response.

The held-out split is by file: a file is held out when the hash of its path relative to its corpus
root falls in the first `heldout_fraction` of the hash range, so it is the same on every machine with
the same sources. Units are deduplicated by their exact text (installed packages vendor and copy code:
setuptools carries distutils, transformers copies whole model files), and a training unit whose text
equals a held-out unit is dropped, so held-out scores never measure memorised copies.
"""

from __future__ import annotations

import ast
import concurrent.futures
import functools
import hashlib
import multiprocessing
import sysconfig
import textwrap
import tokenize
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")
R = TypeVar("R")

EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "idle_test", "__pycache__",
                 "lib2to3", "turtledemo", "ensurepip", "venv"}


class CorpusError(ValueError):
    """A corpus argument is unusable. `field` names it; the message says what to change."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class CodeUnit:
    """One function/method/class: `prompt + response` is its dedented source (ending in a newline)."""

    path: str  # relative to the corpus root
    name: str
    prompt: str
    response: str


def source_files(corpus: Sequence[str]) -> list[tuple[Path, Path]]:
    """(root, file) for every Python file of the corpus, sorted for determinism."""
    if not corpus:
        raise CorpusError("corpus", "is empty; give 'stdlib', 'site-packages' or directories of Python source")
    out: list[tuple[Path, Path]] = []
    seen: set[Path] = set()  # a file reached twice (a directory given twice, or inside site-packages) counts once
    for item in corpus:
        for root in _roots(item):
            if not root.is_dir():
                what = "is not a directory" if root.exists() else "does not exist"
                raise CorpusError("corpus", f"{item!r} {what}; give 'stdlib', 'site-packages' or a directory of .py files")
            excluded = EXCLUDED_DIRS if item == "stdlib" else {"__pycache__"}  # others: all but caches
            files = sorted(p for p in root.rglob("*.py")  # (a FIFO or socket named *.py: never read, it may block)
                           if not excluded & set(p.relative_to(root).parts[:-1]) and p.is_file())
            for f in files:
                if f.resolve() not in seen:
                    seen.add(f.resolve())
                    out.append((root, f))
    return out


def _roots(item: str) -> list[Path]:
    paths = sysconfig.get_paths()
    if item == "stdlib":
        return [Path(paths["stdlib"])]
    if item == "site-packages":
        return [Path(p) for p in dict.fromkeys((paths["purelib"], paths["platlib"]))]
    return [Path(item)]


def _hash01(text: str) -> float:
    return int.from_bytes(hashlib.sha1(text.encode()).digest()[:8], "big") / 2**64


def is_heldout(rel_path: str, heldout_fraction: float) -> bool:
    """Whether a file (path relative to its corpus root, '/'-separated) belongs to the held-out split."""
    return _hash01("heldout:" + rel_path) < heldout_fraction


def _candidate_nodes(tree: ast.Module) -> Iterable[ast.AST]:
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield node
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


def _unit(lines: list[str], node, rel_path: str) -> CodeUnit | None:
    start = min([node.lineno] + [d.lineno for d in node.decorator_list])
    body_start = node.body[0].lineno
    if body_start <= node.lineno or node.end_lineno is None:
        return None  # one-line definition: nothing to complete
    header_end = body_start - 1  # last line (1-based) of the signature
    first = node.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        header_end = first.end_lineno
    extra = int(_hash01(f"{rel_path}:{node.lineno}") * 3)  # 0, 1 or 2 more prompt lines
    header_end = min(header_end + extra, node.end_lineno - 1)
    if header_end < start or header_end >= node.end_lineno:
        return None
    text = textwrap.dedent("".join(lines[start - 1 : node.end_lineno]))
    split_at = header_end - start + 1
    unit_lines = source_lines(text)
    prompt, response = "".join(unit_lines[:split_at]), "".join(unit_lines[split_at:])
    if not response.strip():
        return None
    return CodeUnit(rel_path, node.name, prompt, response if response.endswith("\n") else response + "\n")


def source_lines(text: str) -> list[str]:
    """`text`'s lines, each with its "\n", split where ast counts a line: at "\n" alone (files are read
    with universal newlines, so "\r\n" and "\r" are "\n" already). str.splitlines also breaks at a
    form feed, \x0b, \x1c-\x1e, \x85, \u2028 and \u2029: after one, every unit of the file was cut
    at the wrong lines (132 of 136 units of Debian's stdlib files that hold a form feed, helper-216)."""
    parts = text.split("\n")
    return [part + "\n" for part in parts[:-1]] + ([parts[-1]] if parts[-1] else [])


def extract_units(text: str, rel_path: str) -> list[CodeUnit]:
    """Every unit of one file's source; files that do not parse give none."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # the last two: an expression nested too deep
        return []
    lines = source_lines(text)
    return [u for u in (_unit(lines, n, rel_path) for n in _candidate_nodes(tree)) if u is not None]


# Fewest files (or units) for which the corpus is built in worker processes: below it their start-up
# costs more than they save
PARALLEL_MIN_ITEMS = 256


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int, chunksize: int = 16,
                 min_items: int = PARALLEL_MIN_ITEMS) -> list[R]:
    """[fn(item) for item in items], in order, in `workers` processes when there are at least `min_items`
    items (the corpus is built where the training runs: a GPU machine's installed packages are minutes
    of single-core Python, the device time a session has). `fn` must be picklable
    (a module-level function, or a functools.partial of one). Workers start from a fork server (Python's
    forkserver method: a clean process, so a parent with threads, a Ray worker or a CUDA context, is safe
    to start them from), which imports the caller's main module as spawn does: a script that asks for
    workers needs Python's `if __name__ == "__main__":` guard (the CLI and bench scripts have it)."""
    if workers <= 1 or len(items) < max(2, min_items):
        return [fn(item) for item in items]
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")  # (Windows: spawn)
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(fn, items, chunksize=chunksize))


def _file_units(file: tuple[Path, Path], heldout_fraction: float) -> tuple[bool, list[CodeUnit] | None]:
    """(held out, units) of one corpus file (root, path); units None for a file that cannot be read as
    Python source."""
    root, path = file
    rel = path.relative_to(root).as_posix()
    try:
        text = _read_source(path)
    except (UnicodeDecodeError, SyntaxError, LookupError, OSError):  # undecodable, or a bad coding cookie
        return False, None
    return is_heldout(rel, heldout_fraction), extract_units(text, rel)


def load_units(corpus: Sequence[str], heldout_fraction: float = 0.03,
               workers: int = 1) -> tuple[list[CodeUnit], list[CodeUnit]]:
    """(train units, held-out units) of the corpus; files are cut in `workers` processes (parallel_map),
    with the same result in any number."""
    if not 0.0 <= heldout_fraction < 1.0:
        raise CorpusError("heldout_fraction", f"got {heldout_fraction}; use a fraction in [0, 1), e.g. 0.03")
    train: list[CodeUnit] = []
    heldout: list[CodeUnit] = []
    files, unread = source_files(corpus), 0
    for held, units in parallel_map(functools.partial(_file_units, heldout_fraction=heldout_fraction), files, workers):
        unread += units is None
        (heldout if held else train).extend(units or [])
    if not train and heldout:
        raise CorpusError("heldout_fraction", f"{heldout_fraction} holds out every file with units ({len(heldout)} "
                                              "units); use a smaller fraction, e.g. 0.03")
    if not train and unread:
        raise CorpusError("corpus", f"{list(corpus)}: {unread} of its {len(files)} .py files could not be read as "
                                    "Python source (not UTF-8 nor a coding cookie's encoding, or binary) and the "
                                    "rest hold no function or class with a body; convert them to UTF-8")
    if not train:
        raise CorpusError("corpus", f"{list(corpus)} holds no function or class with a body; point it at Python source")
    heldout = _unique(heldout, set())
    return _unique(train, {u.prompt + u.response for u in heldout}), heldout


def _read_source(path: Path) -> str:
    """A Python file's text in the encoding it declares (PEP 263 coding cookie or BOM; UTF-8 otherwise),
    universal newlines as Python reads source."""
    with open(path, "rb") as f:
        encoding, _ = tokenize.detect_encoding(f.readline)
    return path.read_text(encoding=encoding)


def _unique(units: list[CodeUnit], seen: set[str]) -> list[CodeUnit]:
    """Units in order, without repeats of an earlier unit's text or of any text in `seen` (updated)."""
    out = []
    for u in units:
        text = u.prompt + u.response
        if text not in seen:
            seen.add(text)
            out.append(u)
    return out


# Units per tokenizer call in tokenize_units: one call over a whole corpus held every unit's encoding at
# once (peak +1.46 GB for 12.6M tokens of the standard library x 4, against +0.45 GB in chunks of 2,048).
TOKENIZE_CHUNK = 2048


def tokenize_units(tokenizer, units: Sequence, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(prompt_ids, response_ids) pairs of anything with `.prompt` and `.response` text (CodeUnit,
    training.chat_data.ChatPair); units longer than seq_len - 1 tokens (EOS included) are skipped. The
    text is text: a special token's spelling in it ("<|endoftext|>" in a tokenizer's source, "<|mask|>")
    is encoded as plain characters (split_special_tokens), never as that token's id, which would teach EOS
    in the middle of code and feed the mask id as a clean token (spec, "Training objective": one EOS ends the
    target; the mask token is only a masked slot's input)."""
    out = []
    options = {"add_special_tokens": False, "return_attention_mask": False, "split_special_tokens": True}
    for start in range(0, len(units), TOKENIZE_CHUNK):  # chunks bound the tokenizer's transient memory
        chunk = units[start : start + TOKENIZE_CHUNK]
        prompts = tokenizer([u.prompt for u in chunk], **options)
        responses = tokenizer([u.response for u in chunk], **options)
        out += [(list(p), list(r)) for p, r in zip(prompts["input_ids"], responses["input_ids"])
                if len(p) + len(r) + 1 <= seq_len and r]
    return out

"""The code corpus (training/corpus.py) and tokenizer building (training/tokenizer_build.py)."""

from __future__ import annotations

import pytest

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
    from training.corpus import extract_units

    units = {u.name: u for u in extract_units(SOURCE, "pkg/mod.py")}
    assert set(units) == {"documented", "Box", "grow"}  # the one-liner has nothing to complete
    doc = units["documented"]
    assert doc.prompt.startswith('@decorator\ndef documented(a, b=1):\n    """Add two numbers.')
    assert '    """\n' in doc.prompt  # the whole docstring is prompt
    assert doc.prompt + doc.response == SOURCE[SOURCE.index("@decorator") : SOURCE.index("\n\n\ndef one")] + "\n"
    grow = units["grow"]
    assert grow.prompt.startswith("def grow(self, by):\n")  # methods are dedented
    assert grow.response.endswith("    return self.size\n")


def test_units_are_cut_at_the_lines_ast_counts_past_a_form_feed():
    """str.splitlines also breaks at a form feed (and \x0b, \x1c-\x1e, \x85, \u2028, \u2029), ast only at
    newlines: after one, every unit of the file was cut at the wrong lines (a's response without its
    return, b's prompt opening with a blank line; 132 of 136 units of Debian's stdlib files holding a form
    feed, helper-216). Units come out as they do with the character replaced by a space."""
    from training.corpus import extract_units

    source = "def a():\n    x = 1  # page\x0cbreak\n    return x\n\n\ndef b(y):\n    z = y + 1\n    return z\n"
    for odd in ("\x0c", "\x0b", "\x1c", "\x85", "\u2028"):
        units = {u.name: u for u in extract_units(source.replace("\x0c", odd), "m.py")}
        plain = {u.name: u for u in extract_units(source.replace("\x0c", " "), "m.py")}
        assert set(units) == set(plain) == {"a", "b"}, odd
        for name in units:
            assert units[name].prompt == plain[name].prompt.replace("page break", f"page{odd}break"), (odd, name)
            assert units[name].response == plain[name].response.replace("page break", f"page{odd}break"), (odd, name)
        assert units["a"].response.endswith("    return x\n") and units["b"].prompt.startswith("def b(y):"), odd


def test_heldout_split_is_by_path_and_deterministic():
    from training.corpus import is_heldout

    paths = [f"pkg/mod{i}.py" for i in range(2000)]
    held = [p for p in paths if is_heldout(p, 0.1)]
    assert 120 < len(held) < 280 and held == [p for p in paths if is_heldout(p, 0.1)]
    assert not any(is_heldout(p, 0.0) for p in paths)


def test_corpus_drops_repeated_units_and_copies_of_heldout_units(tmp_path):
    from training.corpus import is_heldout, load_units

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
    from training.corpus import CorpusError, load_units

    with pytest.raises(CorpusError) as err:
        load_units([str(tmp_path / "missing")])
    assert err.value.field == "corpus"
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(CorpusError, match="no function or class"):
        load_units([str(tmp_path)])
    with pytest.raises(CorpusError) as err:
        load_units([str(tmp_path)], heldout_fraction=1.5)
    assert err.value.field == "heldout_fraction"


def test_declared_encodings_are_read_and_corpus_errors_say_what_is_wrong(tmp_path):
    """A file declaring latin-1 (PEP 263) is valid Python and is read (it was skipped as not UTF-8); a
    missing path says so (it said "is not a directory"); a held-out fraction that takes every file names
    --heldout-fraction (it blamed the corpus)."""
    from training.corpus import CorpusError, load_units

    (tmp_path / "latin.py").write_bytes("# -*- coding: latin-1 -*-\ndef caf\u00e9():\n    return '\u00e9t\u00e9'\n"
                                        .encode("latin-1"))
    (tmp_path / "plain.py").write_text("def g(a):\n    b = a\n    return b\n")
    train, _ = load_units([str(tmp_path)], heldout_fraction=0.0)
    assert sorted(u.name for u in train) == ["caf\u00e9", "g"]
    assert "return '\u00e9t\u00e9'" in next(u for u in train if u.name != "g").response
    with pytest.raises(CorpusError, match="does not exist") as err:
        load_units([str(tmp_path / "missing")])
    assert err.value.field == "corpus"
    with pytest.raises(CorpusError, match="holds out every file") as err:
        load_units([str(tmp_path)], heldout_fraction=0.9999999)
    assert err.value.field == "heldout_fraction"


def test_unreadable_files_are_named_and_a_fifo_is_never_opened(tmp_path):
    """A corpus whose files are all undecodable said it "holds no function or class with a body"; a FIFO
    named *.py blocked the corpus load forever in open() (helper-146)."""
    import os

    from training.corpus import CorpusError, load_units

    (tmp_path / "latin.py").write_bytes("def caf\u00e9():\n    return '\u00e9t\u00e9'\n".encode("latin-1"))  # no cookie
    (tmp_path / "blob.py").write_bytes(b"\x00\xff" * 50)
    with pytest.raises(CorpusError, match="2 of its 2 .py files could not be read as Python source"):
        load_units([str(tmp_path)])
    os.mkfifo(tmp_path / "pipe.py")  # opening it for reading would wait for a writer
    (tmp_path / "ok.py").write_text("def g(a):\n    b = a\n    return b\n")
    train, _ = load_units([str(tmp_path)], heldout_fraction=0.0)
    assert [u.name for u in train] == ["g"]


def test_a_file_too_deep_for_the_parser_is_skipped_not_fatal(tmp_path):
    """An expression of 100,000 terms makes ast.parse raise RecursionError: that file gives no unit and
    the rest of the corpus loads (it ended the whole `refusion train` run; a break-test)."""
    from training.corpus import extract_units, load_units

    deep = "def f():\n    return " + "+".join(["1"] * 100_000) + "\n"
    assert extract_units(deep, "deep.py") == []
    (tmp_path / "deep.py").write_text(deep)
    (tmp_path / "ok.py").write_text("def g(a):\n    b = a\n    return b\n")
    train, heldout = load_units([str(tmp_path)], heldout_fraction=0.0)
    assert [u.name for u in train] == ["g"] and heldout == []


def test_bpe_tokenizer_has_the_special_tokens_and_round_trips():
    from training.tokenizer_build import BOT, EOS, MASK, TokenizerBuildError, build_bpe_tokenizer

    tok = build_bpe_tokenizer([SOURCE] * 3, vocab_size=320)
    assert [tok.convert_tokens_to_ids(t) for t in (EOS, BOT, MASK)] == [0, 1, 2]
    assert tok.eos_token == EOS and tok.mask_token == MASK and len(tok) <= 320
    ids = tok("def grow(self, by):\n    return 1", add_special_tokens=False)["input_ids"]
    assert 2 not in ids and tok.decode(ids) == "def grow(self, by):\n    return 1"
    with pytest.raises(TokenizerBuildError) as err:
        build_bpe_tokenizer([SOURCE], vocab_size=100)
    assert err.value.field == "vocab_size"


def test_bpe_trainer_sees_long_runs_cut_into_pieces_and_the_tokenizer_still_round_trips():
    # One word of 2 x 100,000 letters (a minified or generated file) took minutes in the BPE trainer,
    # whose time grows about quadratically with a word's length; it now sees 256-character pieces.
    from training.tokenizer_build import MAX_WORD_CHARS, _bpe_pieces, build_bpe_tokenizer

    long_text = "x = '" + "a" * 100_000 + "b" * 100_000 + "'\n"
    pieces = list(_bpe_pieces([SOURCE, long_text, "y = 1\n"]))
    assert pieces[0] == SOURCE and pieces[-1] == "y = 1\n"  # ordinary text passes whole
    assert "".join(pieces[1:-1]) == long_text and max(len(p) for p in pieces[1:-1]) == MAX_WORD_CHARS
    assert all(" " not in p and "\n" not in p for p in pieces[2:-2])  # only the run itself is cut
    tok = build_bpe_tokenizer([SOURCE, long_text], vocab_size=320)
    probe = "x = '" + "a" * 3000 + "'\n"
    assert tok.decode(tok(probe, add_special_tokens=False)["input_ids"]) == probe


def test_site_packages_reads_the_installed_packages_and_a_file_counts_once(tmp_path):
    import sysconfig
    from pathlib import Path

    from training.corpus import source_files

    purelib = Path(sysconfig.get_paths()["purelib"])
    files = source_files(["site-packages"])
    assert files and all(root == purelib or root == Path(sysconfig.get_paths()["platlib"]) for root, _ in files)
    assert any(f.parts[len(purelib.parts)] == "transformers" for _, f in files)
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "m.py").write_text("def f(x):\n    return x\n")
    assert len(source_files([str(pkg), str(pkg)])) == 1


def test_tokenize_units_in_chunks_equals_one_call_and_skips_long_units(monkeypatch):
    from pathlib import Path
    from types import SimpleNamespace

    from training import corpus
    from workers.loader import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code")
    units = [SimpleNamespace(prompt=f"def f{i}(x):\n", response=f"    return x + {i}\n" * (1 + i % 3)) for i in range(7)]
    units.append(SimpleNamespace(prompt="def long():\n", response="    pass\n" * 200))  # over seq_len: skipped
    units.append(SimpleNamespace(prompt="def empty():\n", response=""))  # nothing to learn: skipped
    whole = [(tok.encode(u.prompt, add_special_tokens=False), tok.encode(u.response, add_special_tokens=False))
             for u in units[:7]]
    monkeypatch.setattr(corpus, "TOKENIZE_CHUNK", 3)  # 9 units: chunks of 3, 3 and 3
    assert corpus.tokenize_units(tok, units, seq_len=128) == whole
    assert corpus.tokenize_units(tok, [], seq_len=128) == []


def test_the_corpus_and_its_chat_pairs_are_the_same_built_in_worker_processes(monkeypatch):
    """`refusion train --prep-workers N` (default: every core): load_units cuts files, and chat_pairs
    makes pairs in chunks, in worker processes (training.corpus.parallel_map), because the GPU recipe
    builds its corpus where it trains and single-core Python took minutes of device time. Over 419 files
    of the standard library (above PARALLEL_MIN_ITEMS, so the pool really runs): the same train and
    held-out units and the same pairs, in the same order, as in one process and as the one-loop definition
    of chat_pairs (each unit's distractors are the two units after it, across chunk boundaries)."""
    import concurrent.futures
    import sysconfig
    from pathlib import Path

    from training import corpus as corpus_module
    from training.chat_data import CHUNK_UNITS, chat_pairs, instruction_pair, tool_call_pair

    pools = []
    real_pool = concurrent.futures.ProcessPoolExecutor
    monkeypatch.setattr(concurrent.futures, "ProcessPoolExecutor", lambda *a, **k: pools.append(1) or real_pool(*a, **k))
    root = Path(sysconfig.get_paths()["stdlib"])
    dirs = [str(root / d) for d in ("asyncio", "email", "json", "http", "xml", "logging", "importlib", "concurrent",
                                    "unittest", "multiprocessing", "urllib", "collections", "encodings", "ctypes",
                                    "sqlite3", "wsgiref", "dbm", "curses", "html", "zoneinfo", "tomllib", "re")]
    assert len(corpus_module.source_files(dirs)) >= corpus_module.PARALLEL_MIN_ITEMS
    one = corpus_module.load_units(dirs, 0.03, workers=1)
    assert not pools
    two = corpus_module.load_units(dirs, 0.03, workers=2)
    assert len(pools) == 1 and two == one and len(one[0]) > 2 * CHUNK_UNITS and one[1]
    units = one[0]
    looped = []
    for i, unit in enumerate(units):  # chat_pairs' definition, one loop
        looped += [p for p in (instruction_pair(unit), tool_call_pair(unit, units[i + 1 : i + 3])) if p is not None]
    assert chat_pairs(units, workers=1) == looped
    assert chat_pairs(units, workers=2) == looped and len(pools) == 2


def test_a_special_tokens_spelling_in_the_corpus_is_trained_as_text():
    """Source that spells "<|endoftext|>" or "<|mask|>" (a tokenizer's own code, 19 files of site-packages)
    was encoded as the EOS and mask ids inside the response (helper-146)."""
    from pathlib import Path
    from types import SimpleNamespace

    from training import corpus
    from workers.loader import load_tokenizer

    tok = load_tokenizer(Path(__file__).resolve().parents[2] / "models" / "refusion-tiny-code")
    unit = SimpleNamespace(prompt='END = "<|endoftext|>"\ndef f():\n', response='    return "<|mask|>" + END\n')
    [(prompt, response)] = corpus.tokenize_units(tok, [unit], seq_len=128)
    specials = set(tok.all_special_ids)
    assert specials and not specials & set(prompt + response)
    assert tok.decode(prompt) + tok.decode(response) == unit.prompt + unit.response

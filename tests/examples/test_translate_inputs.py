"""What `attn-fast translate` and `attn-fast evaluate` do with awkward inputs (issue 14): bad sources reported one
by one while the rest is translated, output fields escaped, heatmaps into a missing directory, refused figure
paths before any decoding, TSV files with a byte-order mark, invalid UTF-8, no pairs or over-long sources.

The commands run through the real entry point (`python -m attn_fast.tools.cli`), each in a process of its own
forked from a server that imported the CLI once (tests/cli_process.py, the `cli_processes` fixture; checked against
a plain subprocess in tests/tools/test_cli_errors.py), on a checkpoint of a tiny 8-step run trained once for the
session (conftest's tiny_seq2seq_checkpoint, which test_seq2seq_cli reads too)."""
import os
import pathlib
import subprocess

import pytest

from attn_fast.examples.errors import UserError
from attn_fast.examples.seq2seq.data import escape_tsv_field, read_tsv, source_problem
from attn_fast.examples.seq2seq.train import load_checkpoint, translate

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
INVALID_UTF8 = b"25 \xff\xfe 2009"  # not UTF-8: Python keeps such argv bytes as lone surrogates


@pytest.fixture(scope="module")
def checkpoint(tiny_seq2seq_checkpoint):
    """A tiny 8-step `attn-fast train` run's last.pt (conftest: trained once for the session, only read here)."""
    return tiny_seq2seq_checkpoint


@pytest.fixture
def run_cli(cli_processes):
    """`run_cli(*args)`: `python -m attn_fast.tools.cli ARGS` (str or bytes arguments) from the repository root, in
    a process of its own (UTF-8 stdio, one thread, no ATTN_FAST_DEBUG); stdout and stderr decoded as UTF-8."""
    def run(*args) -> subprocess.CompletedProcess:
        completed = cli_processes.run(*args, cwd=REPOSITORY)
        return subprocess.CompletedProcess(completed.args, completed.returncode, completed.stdout.decode("utf-8"),
                                           completed.stderr.decode("utf-8", "backslashreplace"))
    return run


def error_lines(completed: subprocess.CompletedProcess, command: str) -> list[str]:
    """The stderr lines in the CLI's one-line error form; asserts there is no traceback."""
    assert "Traceback" not in completed.stderr, completed.stderr
    return [line for line in completed.stderr.splitlines() if line.startswith(f"attn-fast {command}: error: ")]


def test_escape_tsv_field_and_source_problem():
    assert escape_tsv_field("a\tb\nc\rd\\e") == "a\\tb\\nc\\rd\\\\e"
    assert escape_tsv_field("25 июня 2009 г.") == "25 июня 2009 г."
    assert source_problem("") == "the source is empty"
    assert source_problem(os.fsdecode(INVALID_UTF8)) == "the source is not valid UTF-8 text"
    assert source_problem("a\tb") is None and source_problem(" ") is None


def test_read_tsv_takes_a_byte_order_mark_and_names_bad_lines(tmp_path):
    path = tmp_path / "pairs.tsv"
    path.write_bytes("\ufeff12.03.2001\t2001-03-12\n".encode())
    assert read_tsv(path) == [("12.03.2001", "2001-03-12")]  # the mark is not part of the first source
    path.write_bytes(b"a\tb\n\nc\xff\td\n")
    with pytest.raises(UserError, match=r"pairs\.tsv:3: not valid UTF-8"):
        read_tsv(path)
    path.write_text("a\tb\nabcdef\tg\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"pairs\.tsv:2: the source has 6 characters.*--max-source-length"):
        read_tsv(path, max_source_length=5)
    assert read_tsv(path, max_source_length=6) == [("a", "b"), ("abcdef", "g")]


@pytest.mark.slow
def test_translate_reports_bad_sources_and_translates_the_rest(checkpoint, run_cli):
    good = ["25 июня 2009 г.", "tab\there, new\nline, back\\slash"]
    too_long = "1" * 31
    completed = run_cli("translate", "--checkpoint", str(checkpoint), "--max-source-length", "30",
                        good[0], "", good[1], INVALID_UTF8, too_long)
    assert completed.returncode == 2  # some sources refused
    errors = error_lines(completed, "translate")
    assert len(errors) == 3 and len(completed.stderr.splitlines()) == 3, completed.stderr
    assert "source 2 '': the source is empty" in errors[0]
    assert "source 4 " in errors[1] and "not valid UTF-8" in errors[1]
    assert "source 5 " in errors[2] and "31 characters, more than --max-source-length 30" in errors[2]
    # The others: one line each, in order, one tab per line, the same outputs as translating them alone.
    model, src_vocab, tgt_vocab, _ = load_checkpoint(checkpoint)
    outputs = translate(model, good, src_vocab, tgt_vocab)
    assert completed.stdout.splitlines() == [f"{escape_tsv_field(s)}\t{escape_tsv_field(o)}"
                                             for s, o in zip(good, outputs)]
    assert all(line.count("\t") == 1 for line in completed.stdout.splitlines())


@pytest.mark.slow
def test_heatmaps_go_into_a_missing_directory_and_bad_sources_get_none(checkpoint, tmp_path, run_cli):
    out_dir = tmp_path / "figures"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("already here", encoding="utf-8")
    heatmap = out_dir / "new" / "sub" / "align.png"
    sources = ["25 июня 2009 г.", "$5$ on 3/4/09", INVALID_UTF8, "7" * 201]  # "$..$" would be mathtext
    completed = run_cli("translate", "--checkpoint", str(checkpoint), "--heatmap", str(heatmap), *sources)
    assert completed.returncode == 2
    errors = error_lines(completed, "translate")
    assert len(errors) == 2 and "source 3 " in errors[0] and "not valid UTF-8" in errors[0]
    assert "source 4 " in errors[1] and "201 characters, more than the 200 a --heatmap shows" in errors[1]
    assert len(completed.stdout.splitlines()) == 2
    for number in (0, 1):
        figure = heatmap.parent / f"align-{number}.png"
        assert figure.read_bytes()[:8] == PNG_MAGIC and figure.stat().st_size > 1000
        assert f"alignment heatmap: {figure}" in completed.stderr
    # Nothing lost, nothing left over: the earlier file, the two heatmaps, no temporary or refused source's file.
    assert (out_dir / "keep.txt").read_text(encoding="utf-8") == "already here"
    assert sorted(p.name for p in heatmap.parent.iterdir()) == ["align-0.png", "align-1.png"]


@pytest.mark.slow
def test_a_bad_heatmap_path_is_refused_before_decoding(checkpoint, tmp_path, run_cli):
    (tmp_path / "a-file").write_text("not a directory", encoding="utf-8")
    for heatmap, expected in [(tmp_path / "align.jpeg", "must end in .png, .svg, .pdf"),
                              (tmp_path / "a-file" / "align.png", "cannot make its directory")]:
        completed = run_cli("translate", "--checkpoint", str(checkpoint), "--heatmap", str(heatmap), "25.06.2009")
        assert completed.returncode == 2 and completed.stdout == ""  # nothing decoded
        errors = error_lines(completed, "translate")
        assert len(errors) == 1 and "--heatmap" in errors[0] and expected in errors[0], completed.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]
    assert (tmp_path / "a-file").read_text(encoding="utf-8") == "not a directory"


@pytest.mark.slow
def test_evaluate_reads_a_byte_order_mark_and_refuses_empty_and_overlong_files(checkpoint, tmp_path, run_cli):
    with_mark = tmp_path / "with-mark.tsv"
    with_mark.write_bytes("\ufeff12.03.2001\t2001-03-12\n2001-03-12\t2001-03-12\n".encode())
    completed = run_cli("evaluate", "--checkpoint", str(checkpoint), "--data-tsv", str(with_mark))
    assert completed.returncode == 0 and error_lines(completed, "evaluate") == []
    assert completed.stdout.startswith("2 pairs: exact match ") and ", BLEU " in completed.stdout

    empty = tmp_path / "empty.tsv"
    empty.write_text("\n  \n", encoding="utf-8")
    completed = run_cli("evaluate", "--checkpoint", str(checkpoint), "--data-tsv", str(empty))
    assert completed.returncode == 2 and completed.stdout == ""
    assert error_lines(completed, "evaluate") == [f"attn-fast evaluate: error: --data-tsv {empty}: no "
                                                  f"source<TAB>target pair in it (only blank lines, or empty)"]

    completed = run_cli("evaluate", "--checkpoint", str(checkpoint), "--data-tsv", str(with_mark),
                        "--max-source-length", "9")
    assert completed.returncode == 2 and completed.stdout == ""
    errors = error_lines(completed, "evaluate")
    assert len(errors) == 1 and f"{with_mark}:1: the source has 10 characters" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.tsv", "with-mark.tsv"]

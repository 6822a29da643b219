"""The plumbing every command-line tool shares: listing inputs, errors, exit status, status lines."""

from __future__ import annotations

import argparse
import io
import json
import types
import warnings

import pytest

from losatok_jax import _cli
from losatok_jax._cli import Entry, InputError, list_inputs
from losatok_jax.errors import LosatokError


def test_folders_are_searched_recursively_by_suffix_in_any_case(tmp_path):
    for name in ("a.wav", "sub/b.FLAC", "sub/deeper/c.Mp3", "notes.txt", "sub/cover.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert list_inputs(tmp_path) == [
        Entry("a.wav", str(tmp_path / "a.wav")), Entry("sub/b.FLAC", str(tmp_path / "sub/b.FLAC")),
        Entry("sub/deeper/c.Mp3", str(tmp_path / "sub/deeper/c.Mp3"))]


def test_manifest_paths_are_relative_to_the_manifest(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("# training files\nclip0.wav\n\n  ../sub/clip 1.flac  \n"
                                     "/abs/x.wav\n")
    assert list_inputs(lists / "train.txt") == [
        Entry("../sub/clip 1.flac", str(lists / "../sub/clip 1.flac")),
        Entry("/abs/x.wav", "/abs/x.wav"), Entry("clip0.wav", str(lists / "clip0.wav"))]
    (lists / "train.jsonl").write_text(json.dumps({"path": "a.wav", "id": "k1"}) + "\n\n"
                                       + json.dumps({"path": "/abs/b.wav"}) + "\n")
    assert list_inputs(lists / "train.jsonl") == [
        Entry("/abs/b.wav", "/abs/b.wav"), Entry("k1", str(lists / "a.wav"))]


@pytest.mark.parametrize("name, text, message", [
    ("dup.jsonl", '{"path": "x.wav", "id": "k"}\n{"path": "y.wav", "id": "k"}\n', "more than once"),
    ("bad.jsonl", '{"id": "no path"}\n', "bad.jsonl:1"),
    ("empty.txt", "# nothing\n\n", "lists no files"),
    ("list.csv", "a.wav\n", "expected a folder, a .txt or a .jsonl"),
])
def test_bad_manifests_are_input_errors(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(InputError, match=message):
        list_inputs(tmp_path / name)


def test_missing_source_and_empty_folder(tmp_path):
    with pytest.raises(InputError, match="no such file or folder"):
        list_inputs(tmp_path / "missing")
    (tmp_path / "readme.txt.bak").write_text("")
    with pytest.raises(InputError, match="no audio files"):
        list_inputs(tmp_path)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("--x", type=int, default=0)
    return parser


def test_run_main_exit_status_and_one_error_line(capsys):
    def fail(args):
        warnings.warn("first\nhalf of a warning")
        raise LosatokError("a message\n  over two lines")

    assert _cli.run_main(_parser(), lambda args: None, []) == 0
    assert _cli.run_main(_parser(), lambda args: args.x, ["--x", "130"]) == 130
    assert _cli.run_main(_parser(), fail, []) == 2
    assert capsys.readouterr().err.splitlines() == [
        "warning: first half of a warning", "error: a message over two lines"]
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        _cli.run_main(_parser(), lambda args: 1 / 0, [])


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_status_lines_are_whole_lines_at_most_every_interval_when_not_on_a_terminal(
        monkeypatch):
    clock = iter([0.0, 0.0, 4.0, 10.0, 15.0, 25.0, 30.0])  # starts, then each show
    monkeypatch.setattr(_cli, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    log = io.StringIO()
    line = _cli.StatusLine(stream=log, log_interval=10.0)
    for done in range(1, 6):
        line.show(f"{done}/5 clips")
    line.end()
    assert log.getvalue() == "1/5 clips\n3/5 clips\n5/5 clips\n"
    quiet = io.StringIO()
    _cli.StatusLine(terminal_only=True, stream=quiet).show("hidden")
    assert quiet.getvalue() == ""


def test_status_lines_redraw_in_place_on_a_terminal():
    terminal = _Terminal()
    line = _cli.StatusLine(stream=terminal)
    line.show("1/3")
    line.show("2/3")
    _cli.StatusLine.end_all()  # as before an error line
    assert terminal.getvalue() == "\r1/3\033[K\r2/3\033[K\n"

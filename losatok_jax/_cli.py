"""What every command-line tool shares: its parser, how inputs are listed, how errors, warnings
and notes are reported, the exit status, and status lines that stay readable in logs.

The exit-status rule: 0 on success; 2 with one `error: ...` line on stderr for any
`LosatokError` or bad argument (never a traceback, never a page of usage); 130 when interrupted
(the tool saves what it can). A run that fails before its first result leaves nothing on disk:
tools check their inputs, then their outputs (without creating them), and only then write.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from losatok_jax.audio_io import AUDIO_SUFFIXES
from losatok_jax.errors import LosatokError, Note, one_line

EXIT_BAD_INPUT = 2
CONSOLE_SCRIPT_PREFIX = "losatok-"


class ArgumentError(LosatokError):
    """A command line the parser refuses: an unknown flag, a missing one, a bad value."""


def program_name(module: str) -> str:
    """How the user started the tool: the console script's name (`losatok-extract`), or
    `python -m losatok_jax.<module>`."""
    invoked = os.path.basename(sys.argv[0]) if sys.argv else ""
    if invoked.startswith(CONSOLE_SCRIPT_PREFIX):
        return invoked
    return f"python -m losatok_jax.{module}"


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one `error:` line with a hint, not a page of usage."""

    def __init__(self, module: str, description: str):
        super().__init__(prog=program_name(module), description=description)

    def error(self, message: str):
        raise ArgumentError(f"{message} (see {self.prog} --help)")


def positive(kind: type = float, what: str = "number"):
    """An argparse type: a positive, finite `kind`, else an argument error naming what was
    given."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text!r}") \
                from None
        if not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"expected a positive {what}, got {text}")
        return value

    return parse


def seed(text: str) -> int:
    """An argparse type: a random seed, a whole number in [0, 2^63)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2 ** 63:
        raise argparse.ArgumentTypeError(f"expected a whole number from 0 to 2^63 - 1, got "
                                         f"{text!r}")
    return value


def positive_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated positive whole numbers, increasing (bucket sizes)."""
    try:
        values = tuple(int(t) for t in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1 or list(values) != sorted(set(values)):
        raise argparse.ArgumentTypeError(f"expected increasing positive whole numbers separated "
                                         f"by commas, got {text!r}")
    return values


class InputError(LosatokError):
    """An input folder or manifest that lists nothing usable."""


class Entry(NamedTuple):
    """One input: `id` keys it in outputs (unique), `path` is where to read it."""

    id: str
    path: str


def list_inputs(source: str | Path) -> list[Entry]:
    """The inputs a folder or manifest names, sorted by id.

    - a folder: every file below it whose suffix (any case) is in `AUDIO_SUFFIXES`; the id is its
      path relative to the folder;
    - a `.txt` manifest: one path a line (blank lines and `#` comments skipped);
    - a `.jsonl` manifest: one {"path": ..., "id": ...} a line (id optional).
    A manifest's relative paths are relative to the manifest's folder; an entry's id is its path
    as written. Ids must be unique: they key exactly-once bookkeeping.
    """
    root = Path(source)
    if root.is_dir():
        entries = [Entry(p.relative_to(root).as_posix(), str(p)) for p in root.rglob("*")
                   if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES]
        if not entries:
            raise InputError(f"{source}: no audio files ({' '.join(sorted(AUDIO_SUFFIXES))}) "
                             "in this folder")
    elif root.suffix.lower() in (".txt", ".jsonl") and root.is_file():
        entries = [Entry(id, str(root.parent / path)) for id, path in _manifest_rows(root)]
        if not entries:
            raise InputError(f"{source}: the manifest lists no files")
    elif not root.exists():
        raise InputError(f"{source}: no such file or folder")
    else:
        raise InputError(f"{source}: expected a folder, a .txt or a .jsonl manifest")
    seen: set[str] = set()
    for entry in entries:
        if entry.id in seen:
            raise InputError(f"{source}: id {entry.id!r} appears more than once")
        seen.add(entry.id)
    return sorted(entries)


def _manifest_rows(manifest: Path) -> list[tuple[str, str]]:
    """(id, path as written) for each entry of a .txt or .jsonl manifest."""
    try:
        lines = manifest.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not a text file"
        raise InputError(f"cannot read {manifest}: {reason}") from None
    rows = []
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or (manifest.suffix.lower() == ".txt" and line.startswith("#")):
            continue
        if manifest.suffix.lower() == ".txt":
            rows.append((line, line))
            continue
        try:
            item = json.loads(line)
            rows.append((str(item.get("id", item["path"])), str(item["path"])))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InputError(f"{manifest}:{number}: expected a JSON object with a "
                             "\"path\"") from None
    return rows


def _print_warning(message, category, filename, lineno, file=None, line=None):
    StatusLine.clear_all()
    kind = "note" if issubclass(category, Note) else "warning"
    print(f"{kind}: {one_line(message)}", file=sys.stderr)


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None) -> int:
    """Parses `argv`, runs `run(args)` and returns the exit status (see the module's rule).
    Warnings and notes print as one `warning:` or `note:` line each, like the errors."""
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            status = run(parser.parse_args(argv))
        except LosatokError as e:
            StatusLine.end_all()
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0 if status is None else status


class StatusLine:
    """A status line on stderr: redrawn in place on a terminal; elsewhere (CI logs, nohup, pod
    launchers) a whole line at most every `log_interval` seconds, or nothing with
    `terminal_only`."""

    _open: list["StatusLine"] = []

    def __init__(self, terminal_only: bool = False, stream=None, log_interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.on_terminal = self.stream.isatty()
        self.enabled = self.on_terminal or not terminal_only
        self.log_interval = log_interval
        self._drawn = False
        self.start = time.perf_counter()
        self._logged_at = -float("inf")

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self.on_terminal:
            self.stream.write(f"\r{text}\033[K")
            if not self._drawn:
                StatusLine._open.append(self)
            self._drawn = True
        else:  # a log: whole lines, at most one per interval
            now = time.perf_counter()
            if now - self._logged_at < self.log_interval:
                return
            self._logged_at = now
            self.stream.write(text + "\n")
        self.stream.flush()

    def end(self) -> None:
        """Ends a line drawn in place, so the next output starts on a line of its own."""
        self._close("\n")

    def clear(self) -> None:
        """Erases a line drawn in place (for a log line to take its place)."""
        self._close("\r\033[K")

    def _close(self, text: str) -> None:
        if self._drawn:
            self.stream.write(text)
            self.stream.flush()
            self._drawn = False
            StatusLine._open.remove(self)

    @classmethod
    def end_all(cls) -> None:
        for line in list(cls._open):
            line.end()

    @classmethod
    def clear_all(cls) -> None:
        for line in list(cls._open):
            line.clear()

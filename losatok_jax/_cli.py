"""What every command-line tool shares: how inputs are listed, how errors and warnings are
reported, the exit status, and status lines that stay readable in logs.

The exit-status rule: 0 on success; 2 with one `error: ...` line on stderr for any
`LosatokError` (bad input, never a traceback); 130 when interrupted (the tool saves what it can).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

from losatok_jax.audio_io import AUDIO_SUFFIXES
from losatok_jax.errors import LosatokError, one_line

EXIT_BAD_INPUT = 2


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
    print(f"warning: {one_line(message)}", file=sys.stderr)


def run_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None) -> int:
    """Parses `argv`, runs `run(args)` and returns the exit status (see the module's rule).
    Warnings print as one `warning:` line each, like the errors."""
    args = parser.parse_args(argv)
    with warnings.catch_warnings():
        warnings.showwarning = _print_warning
        try:
            status = run(args)
        except LosatokError as e:
            StatusLine.end_all()
            print(f"error: {one_line(e)}", file=sys.stderr)
            return EXIT_BAD_INPUT
    return 0 if status is None else status


class StatusLine:
    """A status line on stderr: redrawn in place on a terminal; elsewhere (CI logs, nohup, pod
    launchers) each update is a whole line, or nothing with `terminal_only`."""

    _open: list["StatusLine"] = []

    def __init__(self, terminal_only: bool = False, stream=None):
        self.stream = stream or sys.stderr
        self.on_terminal = self.stream.isatty()
        self.enabled = self.on_terminal or not terminal_only
        self._drawn = False
        self.start = time.perf_counter()

    def show(self, text: str) -> None:
        if not self.enabled:
            return
        if self.on_terminal:
            self.stream.write(f"\r{text}\033[K")
            if not self._drawn:
                StatusLine._open.append(self)
            self._drawn = True
        else:
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

"""Writing outputs safely: atomic writes, checks that an output can be written before slow work
starts (without creating anything), and checks that an output never overwrites or lands inside
an input.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import tempfile
from pathlib import Path
from typing import Iterable

from losatok_jax.errors import LosatokError


class OutputError(LosatokError):
    """An output that cannot be written, or that would overwrite or pollute an input."""


def _create_temp_sibling(path: Path, owner: str = "") -> tuple[int, Path]:
    """A new, exclusively created file next to `path` (same file system, so rename is atomic),
    named `.<name>.[<owner>.]<random>.tmp`: an owner can find and drop what it left."""
    temp = path.with_name(f".{path.name}.{owner + '.' if owner else ''}"
                          f"{secrets.token_hex(4)}.tmp")
    try:
        # Mode 0o666 lets the umask decide permissions, as for any newly written file.
        return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None


def check_writable(path: str | os.PathLike) -> None:
    """Raises `OutputError` now if file `path` could not be written later (call before slow
    work). Creates and removes a temporary file beside `path`; an existing `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"cannot write {path}: it is a directory")
    fd, temp = _create_temp_sibling(path)
    os.close(fd)
    temp.unlink()


def check_writable_folder(path: str | os.PathLike) -> None:
    """Raises `OutputError` now if folder `path` could not be created or written into later.
    Nothing is left on disk: the check creates and removes a temporary folder in the nearest
    folder that exists."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"cannot write into {path}: it is a file, not a folder")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create {path}: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".losatok-check-", dir=existing))
    except OSError as e:
        raise OutputError(f"cannot write into {path}: {e.strerror}") from None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, owner: str = ""):
    """Yields a binary file that replaces `path` only if the block completes without error
    (`owner` tags its temporary name; see `_create_temp_sibling`)."""
    path = Path(path)
    fd, temp = _create_temp_sibling(path, owner)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the data is on disk before the rename makes it visible
        os.replace(temp, path)
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}") from None
    finally:
        temp.unlink(missing_ok=True)


def write_atomically(path: str | os.PathLike, payload: str | bytes, owner: str = "") -> None:
    with atomic_write(path, owner) as f:
        f.write(payload.encode() if isinstance(payload, str) else payload)


def _real(path: str | os.PathLike) -> Path:
    """`path` with symlinks, `.` and `..` resolved, whether or not it exists."""
    return Path(path).expanduser().resolve()


def check_apart(output: str | os.PathLike, flag: str,
                inputs: Iterable[tuple[str, str | os.PathLike | None]],
                listed: Iterable[str | os.PathLike] = ()) -> None:
    """Refuses an output (`flag` names it) that is one of the `inputs` ((flag, path) pairs; a
    None path is skipped), or is or lies inside an input folder, or is a folder holding `listed`
    files (a manifest's): a run must never overwrite or pollute what it reads. Paths are
    compared resolved, so a symlink or `./` is no way around."""
    target = _real(output)
    for input_flag, path in inputs:
        if path is None or not Path(path).exists():
            continue
        source = _real(path)
        if target == source:
            kind = "folder" if source.is_dir() else "file"
            raise OutputError(f"{flag} {output} is the input {kind} ({input_flag} {path}); "
                              "choose another output")
        if source.is_dir() and source in target.parents:
            raise OutputError(f"{flag} {output} is inside the input folder {path} "
                              f"({input_flag}); choose an output outside it")
    folders = {os.path.dirname(os.path.abspath(p)) for p in listed}
    if any(_real(folder) == target for folder in folders):
        raise OutputError(f"{flag} {output} holds input files that the manifest lists; choose "
                          "another output")

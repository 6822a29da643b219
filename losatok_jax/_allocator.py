"""Runs a compile-heavy command under jemalloc where the system has it.

The TPU compiler's code generation builds and frees a great many small objects, and it runs
markedly faster with jemalloc as the C allocator than with glibc's (`docs/planning.md` has the
measurements). The allocator is chosen when a process starts, so a command that wants it starts
itself again, once, with jemalloc preloaded. Nothing changes where jemalloc is not installed
(Debian and Ubuntu: `apt-get install libjemalloc2`), where `LD_PRELOAD` already names an
allocator, or where `LOSATOK_ALLOCATOR=system`.
"""

from __future__ import annotations

import ctypes.util
import os
import sys
from pathlib import Path

OPT_OUT = "LOSATOK_ALLOCATOR"  # "system" keeps the C library's allocator
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")


def _kept(environ) -> bool:
    """Whether the C library's allocator stays, whatever is installed: off Linux (no
    `LD_PRELOAD`), or where the user asked for it."""
    return not sys.platform.startswith("linux") or environ.get(OPT_OUT) == "system"


def with_jemalloc(environ) -> dict | None:
    """`environ` with jemalloc added to `LD_PRELOAD`, or None where it does not apply (above)."""
    preload = environ.get("LD_PRELOAD", "")
    if _kept(environ) or any(name in preload for name in ALLOCATORS):
        return None
    library = ctypes.util.find_library("jemalloc")
    if library is None:
        return None
    return {**environ, "LD_PRELOAD": f"{preload} {library}".strip()}


def rerun_with_jemalloc() -> None:
    """Replaces this process with the same command line under jemalloc, where that applies."""
    environ = with_jemalloc(os.environ)
    if environ is not None:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environ)


def in_use() -> str:
    """The allocator this process runs with: one of `ALLOCATORS` where it is loaded, else
    "system"."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return "system"
    return next((name for name in ALLOCATORS if f"lib{name}" in maps), "system")


def suggestion() -> str | None:
    """What to install, where this process runs under the C library's allocator although the
    user did not ask for it; else None."""
    if _kept(os.environ) or in_use() != "system":
        return None
    return ("the TPU compiler runs about a quarter faster under jemalloc, which this command "
            "uses where installed (Debian, Ubuntu: apt-get install libjemalloc2)")

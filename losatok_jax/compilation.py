"""JAX's persistent compilation cache, and a count of what was compiled versus loaded from it.

With the cache on, a second process that sees the same bucket shapes loads every program from disk
instead of compiling it: the reconstruct CLI's second run compiles nothing.
"""

from __future__ import annotations

import os

import jax
import jax.monitoring

from losatok_jax._files import OutputError

CACHE_DIR_ENV = "LOSATOK_COMPILATION_CACHE_DIR"


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Caches every compiled program under `path` (default: $LOSATOK_COMPILATION_CACHE_DIR).

    Our programs are few and bucketed, so all of them are cached, however quick to compile.
    Returns the directory used, or None when neither the argument nor the variable is set.
    """
    path = path or os.environ.get(CACHE_DIR_ENV)
    if not path:
        return None
    path = os.path.abspath(os.path.expanduser(str(path)))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot use {path} as the compilation cache: {e.strerror}") from None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path


class CompilationCounter:
    """Counts persistent-cache hits and misses (compilations) from JAX's monitoring events."""

    _EVENTS = {"/jax/compilation_cache/cache_hits": "loaded",
               "/jax/compilation_cache/cache_misses": "compiled"}

    def __init__(self):
        self.loaded = 0
        self.compiled = 0
        jax.monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **kwargs):
        field = self._EVENTS.get(event)
        if field:
            setattr(self, field, getattr(self, field) + 1)

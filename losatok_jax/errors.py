"""The one base class of every error that a user's input can cause.

Command-line tools print such an error as one `error:` line and exit with status 2
(`losatok_jax._cli.run_main`); anything else is a bug and keeps its traceback.
"""

import importlib


def one_line(text) -> str:
    """A message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(text).split())


class LosatokError(ValueError):
    """Input that cannot be used: a file, an option, a checkpoint, a config, or an argument of a
    library call (audio, latents, buckets, training settings); the message says what and why, on
    one line. A `ValueError`, so that callers catching those keep working."""


class Note(UserWarning):
    """Something a user should know that is not a problem (a tool prints it as one `note:`
    line): a fallback taken, a default chosen on the user's behalf."""


class MissingDependencyError(LosatokError):
    """An optional dependency that a feature needs is not installed; the message names the
    extra that installs it."""


def require(module: str, extra: str, feature: str):
    """Imports `module`, or raises `MissingDependencyError` saying which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingDependencyError(
            f"{feature} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'losatok-jax[{extra}]'") from None

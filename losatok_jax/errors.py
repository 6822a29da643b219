"""The one base class of every error that a user's input can cause.

Command-line tools print such an error as one `error:` line and exit with status 2
(`losatok_jax._cli.run_main`); anything else is a bug and keeps its traceback.
"""


def one_line(text) -> str:
    """A message on one line (whitespace runs, newlines included, become one space)."""
    return " ".join(str(text).split())


class LosatokError(ValueError):
    """Input that cannot be used: a file, an option, a checkpoint or a config; the message says
    what and why, on one line."""

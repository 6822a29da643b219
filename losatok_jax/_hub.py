"""Files on the Hugging Face Hub, named `hf://OWNER/REPO[@REVISION]/PATH`: fetched through
huggingface_hub (the `hub` extra) into its cache, once."""

from __future__ import annotations

from pathlib import Path

from losatok_jax.errors import LosatokError, one_line, require

HUB_PREFIX = "hf://"


def is_hub_reference(path: str | Path | None) -> bool:
    return path is not None and str(path).startswith(HUB_PREFIX)


def hub_file(reference: str, flag: str = "--model_path") -> Path:
    """The local copy of a Hub file `hf://OWNER/REPO[@REVISION]/PATH`: downloaded into the
    Hugging Face cache on first use (with its progress bar), the cached copy afterwards; with
    HF_HUB_OFFLINE=1, the cached copy or an error saying what to download."""
    parts = reference[len(HUB_PREFIX):].split("/", 2)
    if len(parts) < 3 or not all(parts):
        raise LosatokError(f"{flag} {reference}: a Hub file is hf://OWNER/REPO[@REVISION]/FILE")
    owner, name, filename = parts
    name, _, revision = name.partition("@")
    repo = f"{owner}/{name}"
    hub = require("huggingface_hub", "hub", "reading checkpoints from the Hugging Face Hub")
    from huggingface_hub import errors as hub_errors

    try:
        return Path(hub.hf_hub_download(repo, filename, revision=revision or None))
    except hub_errors.LocalEntryNotFoundError:
        raise LosatokError(
            f"{flag} {reference}: not in the Hugging Face cache, and the Hub cannot be reached "
            f"(HF_HUB_OFFLINE is set, or no network): download it where there is a network "
            f"(hf download {repo} {filename}) into the same HF_HOME") from None
    except (hub_errors.HfHubHTTPError, OSError) as e:
        raise LosatokError(f"{flag} {reference}: cannot download it: "
                           f"{one_line(e).split(' (Request ID')[0]}") from None


def local_file(path: str | None, flag: str) -> str | None:
    """A file argument that may be a Hub reference, as a local path."""
    return str(hub_file(path, flag)) if is_hub_reference(path) else path

"""What every tool accepts as a model: a converted checkpoint folder, or upstream's `.pth`
(converted once, then reused) on disk or on the Hugging Face Hub (`hf://OWNER/REPO/FILE.pth`,
downloaded once into the Hub's cache), or nothing (a random model from a config, for
`reconstruct`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from losatok_jax import _files
from losatok_jax.config import RELEASED_CONFIG
from losatok_jax.errors import LosatokError, one_line, require

UPSTREAM_SUFFIXES = (".pth", ".pt", ".bin")
CONVERTED_SUFFIX = ".orbax"
SOURCE_FILE = "converted_from.json"
HUB_PREFIX = "hf://"
MODEL_HELP = ("converted checkpoint folder, or upstream's .pth (converted once into "
              "<name>.orbax/ beside it, then reused), or a .pth on the Hugging Face Hub: "
              "hf://OWNER/REPO[@REVISION]/FILE.pth")
CONFIG_HELP = (f"upstream YAML config (default: the released {RELEASED_CONFIG}, shipped with "
               "the package); checked against a converted checkpoint's, used to convert a .pth")


def is_upstream_checkpoint(path: str | Path) -> bool:
    return Path(str(path)).suffix.lower() in UPSTREAM_SUFFIXES


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


def resolve(model_path: str | None, config_path: str | None) -> tuple[str | None, str | None]:
    """(checkpoint folder, config to check it against) for `load_losatok`: a `.pth` (on the Hub:
    its cached copy) becomes its converted folder, beside it (its config was applied by the
    conversion)."""
    if is_hub_reference(model_path):
        if not is_upstream_checkpoint(model_path):
            raise LosatokError(f"--model_path {model_path}: a Hub reference names upstream's "
                               f"checkpoint file ({', '.join(UPSTREAM_SUFFIXES)})")
        model_path = str(hub_file(model_path))
    if model_path is not None and is_upstream_checkpoint(model_path):
        return str(converted_checkpoint(Path(model_path), config_path)), None
    return model_path, config_path


def check_exists(model_path: str | None, flag: str = "--model_path") -> None:
    """A missing model is reported before any output is checked or written (a Hub reference is
    checked when it is fetched)."""
    if model_path is not None and not is_hub_reference(model_path) \
            and not Path(model_path).exists():
        raise LosatokError(f"{flag} {model_path}: no such "
                           + ("file" if is_upstream_checkpoint(model_path) else "folder"))


def _source_stamp(pth: Path) -> dict:
    stat = pth.stat()
    return {"path": str(pth.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def converted_checkpoint(pth: Path, config_path: str | None) -> Path:
    """The converted checkpoint folder for upstream checkpoint `pth`: `<name>.orbax/` beside it
    (or, where that folder cannot be written, in the user's cache), converted on first use.
    A folder converted from another file (or an older version of this one) is never reused or
    overwritten: the error says what to do."""
    if not pth.is_file():
        raise LosatokError(f"--model_path {pth}: no such file")
    stamp = dict(_source_stamp(pth), config=str(config_path or RELEASED_CONFIG))
    beside = pth.with_name(pth.name.removesuffix(pth.suffix) + CONVERTED_SUFFIX)
    digest = hashlib.sha256(stamp["path"].encode()).hexdigest()[:12]
    cached = Path.home() / ".cache" / "losatok_jax" / f"{beside.name}-{digest}"
    for folder in (beside, cached):
        if (folder / SOURCE_FILE).is_file():
            if json.loads((folder / SOURCE_FILE).read_text()) == stamp:
                return folder
            raise LosatokError(f"{folder} was converted from another version of {pth} (or with "
                               "another config); remove it to convert again")
    from losatok_jax import convert

    folder = beside if _can_create(beside) else cached
    convert.convert(config_path or RELEASED_CONFIG, pth, folder)
    (folder / SOURCE_FILE).write_text(json.dumps(stamp) + "\n")
    print(f"converted {pth} into {folder}; later runs reuse it")
    return folder


def _can_create(folder: Path) -> bool:
    """Whether `folder` is new and its parent writable (a conversion there would succeed)."""
    if folder.exists():
        return False
    try:
        _files.check_writable(folder)
    except _files.OutputError:
        return False
    return True

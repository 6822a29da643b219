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
from losatok_jax._hub import hub_file, is_hub_reference
from losatok_jax.config import RELEASED_CONFIG
from losatok_jax.errors import LosatokError

UPSTREAM_SUFFIXES = (".pth", ".pt", ".bin")
CONVERTED_SUFFIX = ".orbax"
SOURCE_FILE = "converted_from.json"
MODEL_HELP = ("converted checkpoint folder, or upstream's .pth (converted once into "
              "<name>.orbax/ beside it, then reused), or a .pth on the Hugging Face Hub: "
              "hf://OWNER/REPO[@REVISION]/FILE.pth")
CONFIG_HELP = (f"upstream YAML config (default: the released {RELEASED_CONFIG}, shipped with "
               "the package); checked against a converted checkpoint's, used to convert a .pth")


def is_upstream_checkpoint(path: str | Path) -> bool:
    return Path(str(path)).suffix.lower() in UPSTREAM_SUFFIXES


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

"""An extraction directory on disk: how records are written so that each clip is stored exactly
once, however often a run is killed and resumed and however many processes write.

Each process P writes groups S of up to `shard_size` clips. A group is complete once its index
`latents-P-S.index.jsonl` exists; it is written last, by an atomic rename, after everything else
of the group:
- format "arrayrecord": the shard `latents-P-S.array_record` (written as `.tmp`, then renamed);
- format "npy": one `<id>.npy` per clip (the feature, (T, D)) and `<id>.json` (id, path,
  duration, sample rate, tokens), mirroring the input tree, each written atomically;
- both: `latents-P-S.stats.json`, the group's partial moments per feature (`losatok_jax.stats`).
A re-run drops what an incomplete group left (`clean_up`) and skips every clip of a complete one
(`completed_ids`); `merge` rebuilds `index.jsonl`, `failures.jsonl` and `stats.json` from the
complete groups of every process.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
from pathlib import Path, PurePosixPath

import numpy as np

from losatok_jax import data, stats
from losatok_jax._files import write_atomically
from losatok_jax.errors import LosatokError

FORMATS = ("arrayrecord", "npy")
SETTINGS_FILE = data.SETTINGS_FILE


class ExtractError(LosatokError):
    """Extraction cannot start or (with --strict) go on; the message says why."""


def npy_name(clip_id: str) -> str:
    """Where a clip's `.npy` goes, relative to the output directory: its id as a path, kept inside
    the directory (a leading `/` dropped, `..` spelled `_parent_`)."""
    parts = [("_parent_" if p == ".." else p) for p in PurePosixPath(clip_id).parts
             if p not in ("/", ".")]
    return str(PurePosixPath(*parts)) + ".npy"


# One record per chunk (any record is read alone), stored uncompressed: ArrayRecord's default
# compression takes several times the CPU time per record of latents to save 6-8% of the bytes
# (near-Gaussian floats barely compress), and a host writing for 8 accelerators is short of CPU.
RECORD_OPTIONS = "group_size:1,uncompressed"


class GroupWriter:
    """Writes this process's clips into groups of `shard_size`, each committed by its index."""

    def __init__(self, directory: Path, process: int, shard_size: int, format: str,
                 dtype: str):
        self.directory, self.process, self.shard_size = directory, process, shard_size
        self.format, self.dtype = format, dtype
        existing = [int(p.name.split("-")[2].split(".")[0])
                    for p in directory.glob(f"latents-{process:05d}-*.index.jsonl")]
        self.next_shard = max(existing, default=-1) + 1
        self._writer = None
        self._index: list[dict] = []
        self._moments: dict[str, stats.Moments] = {}

    def _name(self, suffix: str) -> Path:
        return self.directory / f"latents-{self.process:05d}-{self.next_shard:05d}{suffix}"

    def write(self, info: dict, features: dict[str, np.ndarray]) -> None:
        """One clip: `info` (id, path, duration, ...) and its features, each (T, dim)."""
        stored = {name: np.asarray(array).astype(data.STORAGE_DTYPES[self.dtype], copy=False)
                  for name, array in features.items()}
        for name, array in stored.items():
            part = stats.Moments.of(array)
            self._moments[name] = self._moments[name].merge(part) if name in self._moments \
                else part
        row = {**info, "num_tokens": len(next(iter(stored.values())))}
        if self.format == "npy":
            row["file"] = self._write_npy(row, stored)
        else:
            row.update(self._write_record(row, stored))
        self._index.append(row)
        if len(self._index) == self.shard_size:
            self.close()

    def _write_npy(self, row: dict, stored: dict[str, np.ndarray]) -> str:
        [array] = stored.values()
        name = npy_name(row["id"])
        target = self.directory / name
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        np.save(buffer, array)
        owner = _owner(self.process)
        write_atomically(target, buffer.getvalue(), owner)
        sidecar = {key: row[key] for key in ("id", "path", "duration", "sample_rate",
                                             "num_tokens", "truncated_seconds") if key in row}
        write_atomically(target.with_suffix(".json"), json.dumps(sidecar) + "\n", owner)
        return name

    def _write_record(self, row: dict, stored: dict[str, np.ndarray]) -> dict:
        from array_record.python.array_record_module import ArrayRecordWriter

        if self._writer is None:
            self._writer = ArrayRecordWriter(str(self._name(".array_record.tmp")),
                                             RECORD_OPTIONS)
        self._writer.write(data.encode_record(
            id=row["id"], path=row["path"], duration=row["duration"],
            sample_rate=row["sample_rate"], features=stored, dtype=self.dtype))
        return {"shard": self._name(".array_record").name, "position": len(self._index)}

    def close(self) -> None:
        """Commits the open group: its shard, its moments, then its index."""
        if not self._index:
            return
        if self._writer is not None:
            self._writer.close()
            os.replace(self._name(".array_record.tmp"), self._name(".array_record"))
            self._writer = None
        write_atomically(self._name(".stats.json"), stats.part_json(self._moments))
        write_atomically(self._name(".index.jsonl"),
                         "".join(json.dumps(row) + "\n" for row in self._index))
        self._index, self._moments = [], {}
        self.next_shard += 1


def check_settings(directory: Path, settings: dict) -> None:
    """Refuses a run into `directory` (a resume, or another process of a pod) whose settings
    differ from those recorded by an earlier run; reads only, so it can run before anything is
    written."""
    path = directory / SETTINGS_FILE
    if not path.exists():
        return
    try:
        earlier = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ExtractError(f"{path} is unreadable ({e}); extract into a new --output_dir") \
            from None
    if "format" not in earlier:
        raise ExtractError(f"{directory} was written by an earlier losatok-jax, without "
                           "statistics; extract into a new --output_dir")
    changed = [k for k in settings if earlier.get(k) != settings[k]]
    if changed:
        made = " ".join(filter(None, (_as_flag(k, earlier.get(k)) for k in changed)))
        raise ExtractError(f"{directory} holds latents extracted with {made}; re-run with the "
                           f"same settings or choose another --output_dir")


def record_settings(directory: Path, settings: dict) -> None:
    """Records `settings` on the first run into `directory` (see `check_settings`)."""
    path = directory / SETTINGS_FILE
    if not path.exists():
        write_atomically(path, json.dumps(settings, indent=1) + "\n")


def _as_flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"no --{name}"
    if value is None:
        return ""
    return f"--{name} {','.join(value) if isinstance(value, list) else value}"


def _owner(process: int) -> str:
    """What tags the temporary names of the per-clip files this process writes."""
    return f"latents-{process:05d}"


def clean_up(directory: Path, process: int) -> None:
    """Drops what a killed run of this process left: temporary files (its groups', and its
    per-clip files' anywhere below, never another process's), and the shards and moments of
    groups whose index was never written. Their clips are redone."""
    for pattern in (f"latents-{process:05d}-*.tmp", f".latents-{process:05d}-*.tmp"):
        for tmp in directory.glob(pattern):
            tmp.unlink()
    for tmp in directory.rglob(f".*.{_owner(process)}.*.tmp"):
        tmp.unlink(missing_ok=True)
    for suffix in (".array_record", ".stats.json"):
        for part in directory.glob(f"latents-{process:05d}-*{suffix}"):
            if not part.with_name(part.name.replace(suffix, ".index.jsonl")).exists():
                part.unlink()


def completed_ids(directory: Path) -> set[str]:
    return {json.loads(line)["id"] for index in directory.glob("latents-*.index.jsonl")
            for line in index.read_text().splitlines()}


def merge(directory: Path) -> None:
    """Rebuilds index.jsonl, failures.jsonl and stats.json from every process's complete groups,
    under a lock on the directory itself (no lock file is left behind), so that the last
    process to finish leaves them complete."""
    lock = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        indexes = sorted(directory.glob("latents-*.index.jsonl"))
        write_atomically(directory / data.INDEX_FILE, "".join(p.read_text() for p in indexes))
        failures = sorted(directory.glob("failures-*.jsonl"))
        write_atomically(directory / "failures.jsonl", "".join(p.read_text() for p in failures))
        stats.write_stats(directory, [p.with_name(p.name.replace(".index.jsonl", ".stats.json"))
                                      for p in indexes])
    finally:
        os.close(lock)  # closing releases the lock

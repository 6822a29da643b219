"""Exact per-channel statistics of extracted latents, mergeable across shards and processes.

Each shard of an extraction keeps its partial moments beside it (`latents-P-S.stats.json`): per
feature the token count, the float64 per-channel mean and the sum of squared deviations from it.
Merging them with Chan et al.'s pairwise update gives the statistics of exactly the records in
the complete shards, each once, whatever the order, the number of processes or how often a run
was killed and resumed. `stats.json` holds the merged result:

    {"<feature>": {"count": tokens, "mean": [D floats], "std": [D floats]}}

(population standard deviation, of the values as stored, after `--dtype` rounding).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from losatok_jax._files import atomic_write
from losatok_jax.errors import LosatokError

STATS_FILE = "stats.json"


class StatsError(LosatokError):
    """An extraction directory without the statistics asked for."""


@dataclasses.dataclass
class Moments:
    """Count, mean and sum of squared deviations per channel, in float64."""

    count: int
    mean: np.ndarray
    m2: np.ndarray

    @classmethod
    def of(cls, values: np.ndarray) -> "Moments":
        """The moments of (tokens, channels) `values`, computed in float64 (in one float64 copy
        of them: this runs for every clip extracted)."""
        deviations = np.array(values, np.float64).reshape(-1, np.shape(values)[-1])
        mean = deviations.mean(axis=0) if len(deviations) else np.zeros(deviations.shape[-1])
        deviations -= mean
        return cls(len(deviations), mean, np.square(deviations, out=deviations).sum(axis=0))

    def merge(self, other: "Moments") -> "Moments":
        if not other.count:
            return self
        if not self.count:
            return other
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * (other.count / count)
        m2 = self.m2 + other.m2 + delta ** 2 * (self.count * other.count / count)
        return Moments(count, mean, m2)

    def to_json(self) -> dict:
        return {"count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, data: Mapping) -> "Moments":
        return cls(int(data["count"]), np.asarray(data["mean"], np.float64),
                   np.asarray(data["m2"], np.float64))

    def summary(self) -> dict:
        """What stats.json holds for one feature."""
        std = np.sqrt(self.m2 / max(self.count, 1))
        return {"count": self.count, "mean": self.mean.tolist(), "std": std.tolist()}


def merge_all(parts: Iterable[Mapping[str, Moments]]) -> dict[str, Moments]:
    merged: dict[str, Moments] = {}
    for part in parts:
        for feature, moments in part.items():
            merged[feature] = merged[feature].merge(moments) if feature in merged else moments
    return merged


def read_part(path: Path) -> dict[str, Moments]:
    return {feature: Moments.from_json(data)
            for feature, data in json.loads(Path(path).read_text()).items()}


def part_json(moments: Mapping[str, Moments]) -> str:
    return json.dumps({feature: m.to_json() for feature, m in moments.items()})


def write_stats(directory: Path, parts: Iterable[Path]) -> None:
    """Merges the given partial-moment files into `directory/stats.json` (atomically)."""
    merged = merge_all(read_part(p) for p in parts)
    text = json.dumps({feature: m.summary() for feature, m in merged.items()}, indent=1)
    with atomic_write(directory / STATS_FILE) as f:
        f.write(text.encode() + b"\n")


def load_stats(directory: str | os.PathLike, feature: str = "z") -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 of `feature` from an extraction directory's stats.json."""
    path = Path(directory) / STATS_FILE
    try:
        stats = json.loads(path.read_text())
    except OSError as e:
        raise StatsError(f"cannot read {path}: {e.strerror} (extractions made by this version "
                         "write it)") from None
    if feature not in stats:
        raise StatsError(f"{path} has no statistics for {feature!r}; it has {sorted(stats)}")
    return (np.asarray(stats[feature]["mean"], np.float32),
            np.asarray(stats[feature]["std"], np.float32))

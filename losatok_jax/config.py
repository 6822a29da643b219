"""One typed configuration for LoSATok, read from upstream's YAML.

Upstream's YAML describes the tokenizer (`AudioVAE.config_dict`) but not the semantic encoder,
whose hyperparameters upstream fetches from MiDashengLM-7B at construction time. Those live here as
`SemanticEncoderConfig` defaults, overridable by an optional `semantic_encoder_config` mapping in
the YAML (as the golden test configs do). The resolved config is stored inside every converted
checkpoint, so a checkpoint directory is self-describing.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import json
import os
import warnings
from pathlib import Path
from typing import Any, Mapping

import yaml

from losatok_jax.errors import LosatokError, Note


class ConfigError(LosatokError):
    """A configuration file or mapping that cannot describe a LoSATok model."""


@dataclasses.dataclass(frozen=True)
class SemanticEncoderConfig:
    """The MiDashengLM audio encoder ("Dasheng" transformer); defaults are MiDashengLM-7B's."""

    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    init_values: float | None = None  # LayerScale init; None means no LayerScale.
    patch_size: tuple[int, int] = (64, 4)
    patch_stride: tuple[int, int] = (64, 4)
    target_length: int = 1008  # frames per chunk; target_length // 4 tokens.
    n_mels: int = 64
    n_fft: int = 512
    win_length: int = 512
    hop_length: int = 160
    f_min: float = 0.0
    f_max: float = 8000.0
    sample_rate: int = 16000
    center: bool = True

    @property
    def layer_scale(self) -> bool:
        return self.init_values is not None

    @property
    def frames_per_token(self) -> int:
        return self.patch_stride[1]

    @property
    def chunk_tokens(self) -> int:
        return self.target_length // self.frames_per_token

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)


@dataclasses.dataclass(frozen=True)
class LosatokConfig:
    """The tokenizer: acoustic encoder, VAE head and Vocos decoder, plus its semantic encoder."""

    sample_rate: int = 16000
    embed_dim: int = 1280  # E: acoustic embedding width, equal to the semantic encoder's.
    decoder_dim: int = 128  # D: latent width.
    decoder_embed_dim: int = 1280  # C: Vocos backbone width.
    decoder_intermediate_size: int = 5120  # I: ConvNeXt hidden width.
    decoder_depth: int = 12
    hop_length: int = 160
    n_mels_patch: int = 128
    n_fft_acoustic: int = 1024
    frames_per_token: int = 4
    upsample_tokens: int = 2
    istft_n_fft: int = 1280
    istft_hop: int = 320
    sembo_hidden_dim: int = 512
    logvar_clamp: float = 20.0
    exp_kl_clamp: float | None = None
    semantic: SemanticEncoderConfig = SemanticEncoderConfig()

    def __post_init__(self):
        if self.semantic.embed_dim != self.embed_dim:
            raise ConfigError(
                f"semantic encoder width {self.semantic.embed_dim} != embed_dim {self.embed_dim}: "
                "semantic and acoustic embeddings are summed, so they must match")
        if self.semantic.embed_dim % self.semantic.num_heads:
            raise ConfigError(f"semantic embed_dim {self.semantic.embed_dim} is not divisible by "
                              f"num_heads {self.semantic.num_heads}")
        semantic_rate = self.semantic.hop_length * self.semantic.frames_per_token
        acoustic_rate = self.hop_length * self.frames_per_token
        if semantic_rate != acoustic_rate:
            raise ConfigError(
                f"semantic tokens every {semantic_rate} samples but acoustic tokens every "
                f"{acoustic_rate}: only equal token rates (the released 25 Hz config) are supported")
        if self.istft_n_fft % self.istft_hop:
            raise ConfigError(f"istft_n_fft {self.istft_n_fft} must be a multiple of istft_hop "
                              f"{self.istft_hop}")
        if self.istft_hop * self.upsample_tokens != self.samples_per_token:
            raise ConfigError(
                f"decoder gives {self.istft_hop * self.upsample_tokens} samples per token but the "
                f"encoder consumes {self.samples_per_token}")

    @property
    def samples_per_token(self) -> int:
        """Hop of one latent frame in samples (640: 25 Hz at 16 kHz)."""
        return self.hop_length * self.frames_per_token

    @property
    def front_end_pad(self) -> int:
        """Samples of reflect padding each end that both centred STFTs read from one buffer."""
        return max(self.n_fft_acoustic, self.semantic.n_fft) // 2

    @property
    def min_samples(self) -> int:
        """Shortest input: the centred reflect padding of the largest STFT needs N > n_fft // 2."""
        return self.front_end_pad + 1

    def num_tokens(self, num_samples: int) -> int:
        return (1 + num_samples // self.hop_length) // self.frames_per_token

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "LosatokConfig":
        data = dict(data)
        semantic = _build(SemanticEncoderConfig, data.pop("semantic", {}), "semantic")
        return _build(cls, {**data, "semantic": semantic}, "config")

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LosatokConfig":
        return cls.from_dict(json.loads(text))

    def replace(self, **changes) -> "LosatokConfig":
        return dataclasses.replace(self, **changes)


# Upstream YAML keys under `AudioVAE.config_dict` that map onto LosatokConfig fields.
_UPSTREAM_FIELDS = ("embed_dim", "decoder_dim", "decoder_embed_dim", "decoder_intermediate_size",
                    "decoder_depth", "hop_length", "n_mels_patch", "upsample_tokens",
                    "istft_n_fft", "istft_hop")
# Keys upstream carries that describe nothing we build (`depth`/`num_heads` belong to an inner
# module upstream constructs and discards; the rest is bookkeeping).
_UPSTREAM_IGNORED = ("depth", "num_heads", "dtype", "model_type", "transformers_version")


# The released config, shipped inside the package: an installed wheel finds it from any folder.
RELEASED_CONFIG = "16k_16k_25Hz_losatok.yml"
SAMPLE_RATE = 16000  # the released model's, and the rate the command-line tools read and write


def packaged_config(name: str = RELEASED_CONFIG) -> Path:
    """The path of a config that ships inside the package."""
    return Path(str(importlib.resources.files("losatok_jax") / "configs" / name))


def resolve_config_path(path: str | os.PathLike) -> Path:
    """`path` where it exists; else, where its file name is a packaged config's (as in upstream's
    `--config_path config/16k_16k_25Hz_losatok.yml`, run from any folder), that packaged config,
    with a `Note` saying so unless `path` is the bare packaged name."""
    path = Path(path)
    if not path.exists() and packaged_config(path.name).is_file():
        if path.name != str(path):
            warnings.warn(f"{path} does not exist; using the {path.name} shipped with "
                          "losatok-jax", Note, stacklevel=3)
        return packaged_config(path.name)
    return path


def from_upstream_yaml(path: str | os.PathLike) -> LosatokConfig:
    """Reads upstream's YAML (e.g. `config/16k_16k_25Hz_losatok.yml`) into a LosatokConfig."""
    path = resolve_config_path(path)
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config {path} is not valid YAML: {e}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("AudioVAE.config_dict"), dict):
        raise ConfigError(f"config {path} has no 'AudioVAE.config_dict' mapping")
    config_dict = raw["AudioVAE.config_dict"]
    unknown = set(config_dict) - set(_UPSTREAM_FIELDS) - set(_UPSTREAM_IGNORED)
    if unknown:
        raise ConfigError(f"config {path}: unknown AudioVAE.config_dict keys {sorted(unknown)}")
    missing = set(_UPSTREAM_FIELDS) - set(config_dict)
    if missing:
        raise ConfigError(f"config {path}: AudioVAE.config_dict lacks {sorted(missing)}")
    fields = {k: config_dict[k] for k in _UPSTREAM_FIELDS}
    fields["sample_rate"] = raw.get("AudioVAE.sample_rate", raw.get("sample_rate", 16000))
    fields["exp_kl_clamp"] = raw.get("AudioVAE.exp_kl_clamp")
    semantic = raw.get("semantic_encoder_config") or {}
    if not isinstance(semantic, dict):
        raise ConfigError(f"config {path}: semantic_encoder_config must be a mapping")
    fields["semantic"] = _build(SemanticEncoderConfig, semantic, "semantic_encoder_config")
    return _build(LosatokConfig, fields, str(path))


def _build(cls, fields: Mapping[str, Any], where: str):
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(fields) - set(names)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}")
    values = {}
    for key, value in fields.items():
        if isinstance(value, list):  # JSON and YAML give lists; the dataclass must stay hashable.
            value = tuple(value)
        values[key] = value
    try:
        return cls(**values)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e


def load_config(path: str | os.PathLike) -> LosatokConfig:
    """Reads either upstream YAML or our resolved JSON, by extension."""
    if str(path).endswith(".json"):
        try:
            with open(path) as f:
                return LosatokConfig.from_json(f.read())
        except OSError as e:
            raise ConfigError(f"cannot read config {path}: {e.strerror}") from e
        except json.JSONDecodeError as e:
            raise ConfigError(f"config {path} is not valid JSON: {e}") from e
    return from_upstream_yaml(path)

"""losatok-jax: the LoSATok continuous audio tokenizer in JAX/Flax.

16 kHz audio -> 128-dim latents at 25 Hz (`encode`) -> audio (`decode`), numerically equal to the
upstream PyTorch release. The functions are in `losatok_jax.api` (`encode`, `decode`,
`reconstruct`, ...); `losatok_jax.decode` and `losatok_jax.reconstruct` are command-line modules
(`python -m losatok_jax.decode`), as are `extract`, `train`, `convert` and `plan`.
"""

from losatok_jax._batching import DEFAULT_BUCKETS, Buckets
from losatok_jax.api import encode, load_losatok, log_mels, warmup
from losatok_jax.config import ConfigError, LosatokConfig, SemanticEncoderConfig, load_config
from losatok_jax.errors import LosatokError
from losatok_jax.model import FEATURE_KEYS, Losatok, init_params
from losatok_jax.runners import MeshRunner, PmapRunner, Runner

__all__ = [
    "DEFAULT_BUCKETS", "Buckets", "ConfigError", "FEATURE_KEYS", "Losatok", "LosatokConfig",
    "LosatokError", "MeshRunner", "PmapRunner", "Runner", "SemanticEncoderConfig", "encode",
    "init_params", "load_config", "load_losatok", "log_mels", "warmup",
]

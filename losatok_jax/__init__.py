"""losatok-jax: the LoSATok continuous audio tokenizer in JAX/Flax.

16 kHz audio -> 128-dim latents at 25 Hz (`encode`) -> audio (`decode`), numerically equal to the
upstream PyTorch release.
"""

from losatok_jax.config import ConfigError, LosatokConfig, SemanticEncoderConfig, load_config
from losatok_jax._batching import DEFAULT_BUCKETS, Buckets
from losatok_jax.model import (FEATURE_KEYS, Losatok, decode, encode, init_params, load_losatok,
                               log_mels, reconstruct, warmup)

__all__ = [
    "DEFAULT_BUCKETS", "Buckets", "FEATURE_KEYS", "ConfigError", "Losatok", "LosatokConfig", "SemanticEncoderConfig", "decode",
    "encode", "init_params", "load_config", "load_losatok", "log_mels", "reconstruct", "warmup",
]

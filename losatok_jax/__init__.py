"""losatok-jax: the LoSATok continuous audio tokenizer in JAX/Flax.

16 kHz audio -> 128-dim latents at 25 Hz (`encode`) -> audio (`decode`), numerically equal to the
upstream PyTorch release; upstream's calls work as written:

    from losatok_jax import load_losatok, encode, decode
    model = load_losatok(config_path=..., model_path="ckpts/losatok_kl1e-3.pth", device="cuda")
    features = encode(model, audio)          # audio (B, N) at model.sample_rate
    audio_recon = decode(model, features["z"])

`losatok_jax.encode` and `losatok_jax.decode` are always these functions (`losatok_jax.api` holds
them with `reconstruct`, `log_mels` and `warmup`); `StreamingDecoder` turns latents into audio
as they arrive, with `losatok_jax.streaming` holding its pure, jittable step. The command-line
tools are the modules `reconstruct`, `extract`, `latents_to_wav`, `train`, `convert` and `plan`
(`python -m losatok_jax.<tool>`, or the `losatok-<tool>` console scripts; `losatok-decode` for
`latents_to_wav`).
"""

from losatok_jax._batching import DEFAULT_BUCKETS, Buckets
from losatok_jax.api import decode, encode, load_losatok, log_mels, warmup
from losatok_jax.config import ConfigError, LosatokConfig, SemanticEncoderConfig, load_config
from losatok_jax.errors import LosatokError
from losatok_jax.model import FEATURE_KEYS, Losatok, init_params
from losatok_jax.runners import MeshRunner, PmapRunner, Runner
from losatok_jax.streaming import StreamingDecoder

__all__ = [
    "DEFAULT_BUCKETS", "Buckets", "ConfigError", "FEATURE_KEYS", "Losatok", "LosatokConfig",
    "LosatokError", "MeshRunner", "PmapRunner", "Runner", "SemanticEncoderConfig",
    "StreamingDecoder", "decode", "encode", "init_params", "load_config", "load_losatok",
    "log_mels", "warmup",
]

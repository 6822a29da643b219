"""What the tests share besides fixtures: the golden cases and their tolerances, test model
sizes and configs, the converter as a user runs it, test audio, per-layer programs, and a count of
what JAX compiles."""

from __future__ import annotations

import logging
from pathlib import Path

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import yaml

import losatok_jax
from losatok_jax import LosatokConfig, _programs, convert, training
from losatok_jax.runners import CPU_MATMUL_ROWS

TESTS_DIR = Path(__file__).resolve().parent
GOLDEN_DIR = TESTS_DIR / "data" / "golden"
GOLDEN_CASES = ("tiny_chunk40", "tiny_chunk1008")
# Max |difference| from upstream's float32 arrays, per golden array.
EMBEDDING_TOL, AUDIO_TOL, LOGMEL_TOL = 1e-4, 1e-5, 1e-3

TOLERANCES = {
    **{name: EMBEDDING_TOL for name in (*losatok_jax.FEATURE_KEYS, "semantic_encoder_out",
                                        "sembo_recon")},
    "semantic_logmel": LOGMEL_TOL,
    "acoustic_logmel": LOGMEL_TOL,
    "recon_audio": AUDIO_TOL,
    "decode_z_random": AUDIO_TOL,
}

# Sizes of the golden tiny_chunk40 model, the default shape of random test models.
TINY_SIZES = dict(embed_dim=64, depth=2, num_heads=4, target_length=40, decoder_dim=16,
                  decoder_embed_dim=64, decoder_intermediate_size=128, decoder_depth=2)


def write_upstream_config(path: Path, *, embed_dim: int, depth: int, num_heads: int,
                          target_length: int, decoder_dim: int, decoder_embed_dim: int,
                          decoder_intermediate_size: int, decoder_depth: int,
                          init_values: float | None = None, qkv_bias: bool = True) -> Path:
    """Writes an upstream-format YAML (as in tests/data/golden/*/config.yml) for a test model."""
    config = {
        "sample_rate": 16000,
        "AudioVAE.sample_rate": 16000,
        "AudioVAE.config_dict": {
            "decoder_depth": decoder_depth, "decoder_embed_dim": decoder_embed_dim,
            "decoder_dim": decoder_dim, "decoder_intermediate_size": decoder_intermediate_size,
            "depth": 1, "dtype": "float32", "embed_dim": embed_dim, "hop_length": 160,
            "istft_hop": 320, "istft_n_fft": 1280, "model_type": "dashengtokenizer",
            "n_mels_patch": 128, "num_heads": 4, "transformers_version": "5.1.0",
            "upsample_tokens": 2,
        },
        "AudioVAE.semantic_encoder_path": "semantic_encoder.pth",
        "semantic_encoder_config": {
            "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads,
            "target_length": target_length, "init_values": init_values, "qkv_bias": qkv_bias,
        },
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_converter(config_path, model_path, output_dir, semantic_encoder_path=None) -> int:
    """`losatok_jax.convert.main` with the command-line flags a user would pass."""
    argv = ["--config_path", str(config_path), "--model_path", str(model_path),
            "--output_dir", str(output_dir)]
    if semantic_encoder_path is not None:
        argv += ["--semantic_encoder_path", str(semantic_encoder_path)]
    return convert.main(argv)


def in_out_kernels(tree: dict) -> dict:
    """Every linear `weight` (out, in) as the (in, out) `kernel` Flax's Dense holds (and this
    package stored before its checkpoints took PyTorch's layout); stacked weights too."""
    converted = {}
    for key, value in tree.items():
        if key == "weight":
            converted["kernel"] = np.swapaxes(np.asarray(value), -1, -2)
        else:
            converted[key] = in_out_kernels(value) if isinstance(value, dict) else value
    return converted


def broadband_audio(batch: int, num_samples: int, seed: int) -> np.ndarray:
    """Coloured Gaussian noise with a slow amplitude modulation, peak 0.1, float32 (B, N).

    Broadband on purpose: on tonal audio float32 STFT rounding alone exceeds the tight
    tolerances (docs/architecture.md, "Conditioning"). The spectral shape (a tilt plus ripple, within about
    ±15 dB) has no nulls, and the modulation keeps the envelope non-stationary without silence.
    """
    rng = np.random.default_rng(seed)
    spectrum = np.fft.rfft(rng.standard_normal((batch, num_samples)))
    freq = np.linspace(0.0, 1.0, spectrum.shape[-1])
    shape_db = (rng.uniform(-9, 6, (batch, 1)) * freq
                + 3 * np.sin(2 * np.pi * rng.uniform(1, 4, (batch, 1)) * freq
                             + rng.uniform(0, 2 * np.pi, (batch, 1))))
    coloured = np.fft.irfft(spectrum * 10 ** (shape_db / 20), n=num_samples)
    t = np.arange(num_samples) / 16000
    envelope = 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1, 5, (batch, 1)) * t)
    signal = coloured * envelope
    return (0.1 * signal / np.abs(signal).max(axis=1, keepdims=True)).astype(np.float32)


def layer_inputs(config, stack: str, rows: int):
    """One batch of `rows` rows as the model runs them: encoder rows in semantic chunks (a batch
    of `rows / chunk_tokens` chunks where that divides), decoder rows as one sequence."""
    if stack == "semantic":
        chunk = config.semantic.chunk_tokens
        shape = (rows // chunk, chunk) if rows > chunk and rows % chunk == 0 else (1, rows)
        x = jax.random.normal(jax.random.key(0), (*shape, config.semantic.embed_dim))
        return x, jnp.ones(shape, bool)
    x = jax.random.normal(jax.random.key(0), (1, rows, config.decoder_embed_dim))
    return x, jnp.ones((1, rows, 1))


def lowered_layer(model, stack: str, rows: int):
    """The CPU Runner's per-layer program for one layer of `stack` on `rows` rows, lowered."""
    c = model.config
    x, mask = layer_inputs(c, stack, rows)
    weights = losatok_jax.Runner(model).layers[stack][0]
    return _programs.apply_layer.lower(weights, x, mask, config=c, dtype=model.dtype,
                                       stack=stack, max_rows=CPU_MATMUL_ROWS)


def lowered_layers(model):
    """Both stacks' per-layer programs."""
    return [lowered_layer(model, stack, 8) for stack in ("semantic", "decoder")]


# Training: a tiny model, one step's settings, and clips it can learn from.
TINY = LosatokConfig.from_dict(dict(
    embed_dim=64, decoder_dim=16, decoder_embed_dim=64, decoder_intermediate_size=128,
    decoder_depth=2, semantic=dict(embed_dim=64, depth=2, num_heads=4, target_length=40)))
CLIP_SAMPLES = 7680  # 0.48 s: 12 latent frames
# One step with a non-zero learning rate from the start; the acoustic encoder stays frozen.
STEP_CONFIG = training.TrainConfig(steps=10, learning_rate=1e-3, warmup_steps=0,
                                trainable=("vae_head", "decoder"))


def synthetic_clips(count: int, num_samples: int, seed: int) -> np.ndarray:
    """Harmonic tones (random pitch, phase and tremolo) over faint noise, peak 0.1: (count, N)."""
    rng = np.random.default_rng(seed)
    t = np.arange(num_samples) / 16000
    f0 = rng.uniform(100, 400, (count, 1))
    tone = sum(np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi, (count, 1))) / k
               for k in (1, 2, 3))
    tone *= 0.6 + 0.4 * np.sin(2 * np.pi * rng.uniform(1, 4, (count, 1)) * t)
    clips = 0.1 * tone / np.abs(tone).max(axis=1, keepdims=True)
    return (clips + 0.003 * rng.standard_normal(clips.shape)).astype(np.float32)


def moments_and_metrics(state, metrics) -> dict[str, np.ndarray]:
    """Adam's first moments (by parameter path) and the metrics of a state after one step."""
    moments = flax.traverse_util.flatten_dict(jax.device_get(optax.tree_utils.tree_get(state.opt_state, "mu")))
    return {**{"/".join(path): leaf for path, leaf in moments.items()},
            **{f"metric:{key}": value for key, value in jax.device_get(metrics).items()}}


class _CompileLog(logging.Handler):
    """Collects JAX's own "Compiling ..." log records (emitted with jax_log_compiles)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.compiled: list[str] = []

    def emit(self, record):
        if record.getMessage().startswith("Compiling"):
            self.compiled.append(record.getMessage()[:120])


def compiles_during(run) -> list[str]:
    """The programs JAX compiles while `run()` runs."""
    log, logger = _CompileLog(), logging.getLogger("jax")
    logger.addHandler(log)
    previous = jax.config.jax_log_compiles
    jax.config.update("jax_log_compiles", True)
    try:
        run()
    finally:
        jax.config.update("jax_log_compiles", previous)
        logger.removeHandler(log)
    return log.compiled

"""Training losses: upstream's latent losses (docs/training.md, "Objective") and waveform losses for decoding.

The latent losses reproduce upstream's formulas (checked against the golden values). Upstream
publishes no waveform losses, so the two used to fine-tune the decoder are the common choices:
a multi-resolution log-mel L1 and the Parallel WaveGAN multi-resolution STFT loss (spectral
convergence + log magnitude). Everything here is a pure function of arrays, usable under jit and
grad. Waveform losses take (B, N) audio and average per-example terms, so a batch's loss is the
mean of its equal-sized micro-batches' losses, which gradient accumulation relies on.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

from losatok_jax import spectral
from losatok_jax.errors import LosatokError

# (n_fft, hop, n_mels): short windows resolve transients, long ones pitch.
MEL_RESOLUTIONS = ((512, 128, 40), (1024, 256, 80), (2048, 512, 160))
# (n_fft, hop); the window spans the whole FFT.
STFT_RESOLUTIONS = ((512, 128), (1024, 256), (2048, 512))

SEMANTIC_MODES = ("both", "high_only", "low_only")


def kl_loss(mu: jax.Array, logvar: jax.Array, clamp: float | None = None) -> jax.Array:
    """KL(N(mu, exp(logvar)) || N(0, 1)): summed over latent dims, averaged over batch and time.

    `clamp` (upstream's `exp_kl_clamp`) floors each dim's KL, so dims already close to the prior
    stop being pushed further (free bits).
    """
    per_dim = -0.5 * (1.0 + logvar - mu ** 2 - jnp.exp(logvar))
    if clamp is not None:
        per_dim = jnp.maximum(per_dim, clamp)
    return jnp.mean(jnp.sum(per_dim, axis=-1))


def _mse(x: jax.Array, y: jax.Array) -> jax.Array:
    return jnp.mean((x - y) ** 2)


def semantic_loss(features: Mapping[str, jax.Array], mode: str = "both") -> jax.Array:
    """Distils the semantic encoder into the acoustic branch: MSE of acoustic to (stopped) semantic
    embeddings, low (D) and/or high (E) width. `features` is the dict `encode` returns."""
    if mode not in SEMANTIC_MODES:
        raise LosatokError(f"semantic loss mode must be one of {SEMANTIC_MODES}; got {mode!r}")
    low = _mse(features["acoustic_emb_low"], jax.lax.stop_gradient(features["semantic_emb_low"]))
    high = _mse(features["acoustic_emb"], jax.lax.stop_gradient(features["semantic_emb"]))
    return {"both": low + high, "high_only": high, "low_only": low}[mode]


def logvar_loss(logvar: jax.Array) -> jax.Array:
    """Upstream's optional penalty keeping log-variances near 0: mean over (B, T) of Σ logvar²."""
    return jnp.mean(jnp.sum(logvar ** 2, axis=-1))


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """x / max(‖x‖, eps), as torch's F.normalize."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def _cosine_similarities(x: jax.Array) -> jax.Array:
    """(B, T, dim) -> (B, T, T) cosine similarity between every pair of time steps."""
    x = _l2_normalize(x)
    return jnp.einsum("btd,bsd->bts", x, x, precision=jax.lax.Precision.HIGHEST)


def sembo_loss(emb: jax.Array, recon: jax.Array, emb_low: jax.Array) -> dict[str, jax.Array]:
    """SemBo bottleneck loss.

    `emb` (B, T, E) is `semantic_emb`, `recon` its SemBo round trip (`sembo_recon`), `emb_low`
    (B, T, D) is `semantic_emb_low`. The reconstruction term matches directions (cosine geometry
    is what the semantic features carry); the relation term makes the low-dimensional features keep
    the high-dimensional ones' frame-to-frame similarity structure.
    """
    target = jax.lax.stop_gradient(emb)
    mse = _mse(_l2_normalize(recon), _l2_normalize(target))
    relation = _mse(_cosine_similarities(emb_low), _cosine_similarities(target))
    return {"mse_loss": mse, "relation_loss": relation, "total_loss": mse + relation}


def _magnitudes(audio: jax.Array, n_fft: int, hop: int) -> jax.Array:
    """Centred (reflect-padded) STFT magnitudes (B, F, n_fft // 2 + 1), floored so that log and
    square-root gradients stay finite on silence."""
    padded = spectral.reflect_pad(audio, n_fft // 2)
    power = spectral.power_spectrogram(padded, n_fft=n_fft, hop=hop,
                                       num_frames=1 + audio.shape[-1] // hop)
    return jnp.sqrt(jnp.maximum(power, 1e-7))


def _check_pair(pred: jax.Array, target: jax.Array, longest_fft: int):
    if pred.shape != target.shape or pred.ndim != 2:
        raise LosatokError(f"pred and target must both be (B, N); got {pred.shape} and "
                         f"{target.shape}")
    if pred.shape[1] <= longest_fft // 2:
        raise LosatokError(f"waveform losses need more than {longest_fft // 2} samples per clip; "
                         f"got {pred.shape[1]}")


def multi_resolution_mel_loss(pred: jax.Array, target: jax.Array, sample_rate: int = 16000,
                              resolutions=MEL_RESOLUTIONS) -> jax.Array:
    """Mean over `resolutions` of the L1 distance between natural-log magnitude mel spectrograms
    (floored at 1e-5, so silence does not dominate). Perceptually weighted: the main
    reconstruction loss."""
    _check_pair(pred, target, max(n_fft for n_fft, _, _ in resolutions))
    total = 0.0
    for n_fft, hop, n_mels in resolutions:
        fb = spectral.mel_filterbank(n_fft, n_mels, sample_rate, 0.0, sample_rate / 2)
        log_mel = [jnp.log(jnp.maximum(jnp.matmul(_magnitudes(x, n_fft, hop), fb,
                                                  precision=jax.lax.Precision.HIGHEST), 1e-5))
                   for x in (pred, target)]
        total = total + jnp.mean(jnp.abs(log_mel[0] - log_mel[1]))
    return total / len(resolutions)


def multi_resolution_stft_loss(pred: jax.Array, target: jax.Array,
                               resolutions=STFT_RESOLUTIONS) -> dict[str, jax.Array]:
    """Parallel WaveGAN's loss, each term averaged over `resolutions`.

    `spectral_convergence` = ‖|Y| − |X|‖_F / ‖|Y|‖_F per example (Y the target), which weights
    loud bins; `log_magnitude` = mean |log|Y| − log|X||, which weights quiet ones.
    """
    _check_pair(pred, target, max(n_fft for n_fft, _ in resolutions))
    convergence = magnitude = 0.0
    for n_fft, hop in resolutions:
        pred_mag, target_mag = _magnitudes(pred, n_fft, hop), _magnitudes(target, n_fft, hop)
        # Norms through max(·, tiny): a finite gradient even where pred == target.
        error = jnp.sqrt(jnp.maximum(jnp.sum((target_mag - pred_mag) ** 2, axis=(1, 2)), 1e-20))
        scale = jnp.sqrt(jnp.maximum(jnp.sum(target_mag ** 2, axis=(1, 2)), 1e-20))
        convergence = convergence + jnp.mean(error / scale)
        magnitude = magnitude + jnp.mean(jnp.abs(jnp.log(target_mag) - jnp.log(pred_mag)))
    convergence, magnitude = convergence / len(resolutions), magnitude / len(resolutions)
    return {"spectral_convergence": convergence, "log_magnitude": magnitude,
            "total_loss": convergence + magnitude}

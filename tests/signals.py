"""Test signals and accuracy measures, shared by the tests and the benchmarks.

Speed does not depend on content, so timing uses noise; accuracy is judged on speech, music and
noise, with the log-spectral distance between audio and the cosine between latent frames.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
SPEECH_FILE = Path(__file__).resolve().parent.parent / "examples" / "speech.wav"


def noise_clip(seconds: float, seed: int) -> np.ndarray:
    """Amplitude-modulated coloured noise, peak 0.3: timing inputs (speed is content-blind)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    x = np.cumsum(rng.standard_normal(n)) * 0.02 + rng.standard_normal(n)
    x -= np.convolve(x, np.ones(64) / 64, mode="same")
    t = np.arange(n) / SAMPLE_RATE
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def speech_signal() -> np.ndarray:
    from losatok_jax import audio_io

    return audio_io.load_audio(SPEECH_FILE, SAMPLE_RATE)


def music_signal(seconds: float = 6.0) -> np.ndarray:
    """Harmonic notes with attack/decay envelopes, then chords, over a soft bass: tonal audio with
    a wide dynamic range (the hard case for float32 and bfloat16 alike: docs/architecture.md, "Conditioning")."""
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    out = np.zeros_like(t)

    def note(freq, start, length, amp):
        local = t - start
        on = (local >= 0) & (local < length)
        env = np.where(on, np.minimum(local / 0.02, 1.0) * np.exp(-3.0 * np.maximum(local, 0)),
                       0.0)
        tone = sum(np.sin(2 * np.pi * k * freq * t + k) / k**1.3 for k in range(1, 9)
                   if k * freq < 7500)
        return amp * env * tone

    melody = [261.63, 293.66, 329.63, 349.23, 392.0, 440.0, 493.88, 523.25]
    for i, f in enumerate(melody):
        out += note(f, 0.35 * i, 0.6, 0.3)
    for j, chord in enumerate(([261.63, 329.63, 392.0], [220.0, 261.63, 329.63],
                               [174.61, 220.0, 261.63], [196.0, 246.94, 293.66])):
        for f in chord:
            out += note(f, 3.0 + 0.75 * j, 0.9, 0.15)
    out += note(65.41, 0.0, seconds, 0.1)
    return (0.5 * out / np.abs(out).max()).astype(np.float32)


def noise_signal(seconds: float = 4.0) -> np.ndarray:
    return noise_clip(seconds, seed=7)


def log_spectral_distance(a: np.ndarray, b: np.ndarray, n_fft: int = 512,
                          hop: int = 128) -> float:
    """RMS over bins of the dB difference of power spectra, averaged over frames (dB). Powers are
    floored 80 dB below the reference's peak so near-silent bins do not dominate."""
    window = np.hanning(n_fft + 1)[:-1]

    def power(x):
        frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
        return np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2

    pa, pb = power(a.astype(np.float64)), power(b.astype(np.float64))
    floor = pa.max() * 1e-8
    diff = 10 * np.log10(np.maximum(pa, floor)) - 10 * np.log10(np.maximum(pb, floor))
    return float(np.mean(np.sqrt(np.mean(diff**2, axis=-1))))


def token_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

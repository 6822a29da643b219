"""Streaming decode: its cost per latent against decoding whole sequences and against re-decoding
a context window per chunk, its latency, and the error of each lookahead short of exact.

    python -m benchmarks.streaming --output benchmarks/results/streaming_cpu.json
    python -m benchmarks.streaming --approximation_only --model_path ckpts/losatok_kl1e-3.pth

Speed rows: for each dtype, number of concurrent streams B and chunk size (latents per push), a
`StreamingDecoder` is warmed up and fed chunks of random latents; a push's time is the median over
the pushes made within `--seconds` (at least 3). Against it, per latent:
- whole: `decode` of B sequences of 4 s (100 latents) in one call;
- naive: `decode` of a window of the chunk with the exact lookahead's worth of latents on each
  side (the context an exact re-decode needs), once per chunk.
Time to first audio is the lookahead's 40 ms per latent plus one push. Real-time factor per stream
is a push's time over the audio it adds (below 1: faster than real time).

Approximation rows: speech (examples/speech.wav) and synthesized music are encoded, and their
latents streamed one at a time with every lookahead from 0 to exact, against `decode` of the whole
sequence (SNR, max |Δ|). All lookaheads come from one pass: after each latent the stream is also
decoded as if it ended there, which is what a decoder with a shorter lookahead returns. Without
`--model_path` the weights are random, which says how the error falls with the lookahead but not
its level for the released model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import losatok_jax
from losatok_jax import streaming
from losatok_jax.config import RELEASED_CONFIG, load_config
import benchmarks.workloads  # noqa: F401  (puts tests/ on the path, for the signals)
from signals import music_signal, speech_signal

SECONDS_PER_LATENT = 0.04


def _latents(model, batch: int, tokens: int, seed: int = 0) -> np.ndarray:
    shape = (batch, tokens, model.config.decoder_dim)
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def _median_seconds(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def whole_decode_per_latent(model, batch: int) -> float:
    """`decode` of B sequences of 4 s (100 latents) at once, per latent."""
    z = _latents(model, batch, 100)
    losatok_jax.decode(model, z)  # compiles
    return _median_seconds(lambda: losatok_jax.decode(model, z), 2) / (batch * 100)


def naive_per_latent(model, batch: int, chunk: int) -> float:
    """Decoding the chunk with the exact lookahead of latents before and after it, per latent."""
    context = streaming.right_context_tokens(model.config)
    z = _latents(model, batch, 2 * context + chunk)
    losatok_jax.decode(model, z)
    return _median_seconds(lambda: losatok_jax.decode(model, z), 3) / (batch * chunk)


def streaming_row(model, batch: int, chunk: int, seconds: float) -> dict:
    decoder = losatok_jax.StreamingDecoder(model, batch_size=batch)
    start = time.perf_counter()
    decoder.warmup()
    warmup_seconds = time.perf_counter() - start
    z = _latents(model, batch, chunk, seed=1)
    times, started = [], time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - started < seconds and len(times) < 200):
        start = time.perf_counter()
        decoder.push(z)
        times.append(time.perf_counter() - start)
    push = statistics.median(times)
    return {"batch": batch, "chunk": chunk, "pushes": len(times), "push_seconds": push,
            "first_push_seconds": times[0], "warmup_seconds": warmup_seconds,
            "per_latent_seconds": push / (batch * chunk),
            "realtime_factor_per_stream": push / (chunk * SECONDS_PER_LATENT),
            "time_to_first_audio_seconds": decoder.lookahead_tokens * SECONDS_PER_LATENT + push}


def speed(model, batch_sizes, chunks, seconds: float) -> dict:
    rows = []
    for batch in batch_sizes:
        whole = whole_decode_per_latent(model, batch)
        for chunk in chunks:
            row = streaming_row(model, batch, chunk, seconds)
            row["whole_per_latent_seconds"] = whole
            row["naive_per_latent_seconds"] = naive_per_latent(model, batch, chunk)
            row["streaming_over_whole"] = row["per_latent_seconds"] / whole
            row["naive_over_whole"] = row["naive_per_latent_seconds"] / whole
            rows.append(row)
            print(f"  {model.dtype} B={batch:>2} chunk={chunk:>2}: "
                  f"{row['per_latent_seconds'] * 1e3:7.2f} ms/latent "
                  f"({row['streaming_over_whole']:.2f}x whole, naive "
                  f"{row['naive_over_whole']:.2f}x), RTF {row['realtime_factor_per_stream']:.3f}, "
                  f"first audio {row['time_to_first_audio_seconds']:.3f} s", flush=True)
    return rows


def lookahead_errors(model, z: np.ndarray) -> list[dict]:
    """SNR and max |Δ| against whole decoding for every lookahead, latents pushed one at a time.

    Streamed exactly, the step after latent t gives stream samples up to 640 (t + 1) - lag; the
    same state ended and run on gives the rest as if the sequence stopped at t. A decoder with
    lookahead L returns samples [640 (t - L), 640 (t + 1 - L)) after latent t, from that
    "as if ended" audio (the part before 640 (t + 1) - lag being exact either way).
    """
    config = model.config
    per, lag = config.samples_per_token, streaming.right_context_samples(config)
    exact_lookahead = streaming.right_context_tokens(config)
    tokens = z.shape[1]
    reference = np.asarray(losatok_jax.decode(model, z))[0]
    drain = np.zeros((1, max(streaming.CHUNK_SIZES), config.decoder_dim), np.float32)
    step, end = jax.jit(streaming.step), jax.jit(streaming.end)
    streamed = {lookahead: np.zeros(tokens * per, np.float32)
                for lookahead in range(exact_lookahead + 1)}
    exact_audio = []
    state = jax.device_put(streaming.init(model, 1), jax.devices()[0])
    for t in range(tokens):
        state, audio = step(model, state, z[:, t:t + 1])
        exact_audio.append(np.asarray(audio)[0])
        _, ahead = step(model, end(state), drain, latents=np.int32(exact_lookahead))
        as_if_ended = np.concatenate(exact_audio + [np.asarray(ahead)[0]])[lag:]  # from sample 0
        for lookahead, out in streamed.items():
            lo, hi = max(0, per * (t - lookahead)), max(0, per * (t + 1 - lookahead))
            out[lo:hi] = as_if_ended[lo:hi]
    # What a flush returns: the rest, exact.
    for lookahead, out in streamed.items():
        done = max(0, per * (tokens - lookahead))
        out[done:] = reference[done:]
    rows = []
    for lookahead, out in streamed.items():
        error = out - reference
        snr = 10 * np.log10(np.sum(reference ** 2) / max(np.sum(error ** 2), 1e-30))
        rows.append({"lookahead_tokens": lookahead,
                     "latency_ms": min(lookahead * per, lag) * 1000 / config.sample_rate,
                     "snr_db": float(snr), "max_abs_error": float(np.abs(error).max())})
    return rows


def approximation(model, seconds: float) -> dict:
    signals = {"speech (examples/speech.wav)": speech_signal(),
               "music (synthesized)": music_signal(seconds)}
    results = {}
    for name, audio in signals.items():
        z = np.asarray(losatok_jax.encode(model, audio[None], features=("mu",))["mu"])
        results[name] = lookahead_errors(model, z)
        print(f"  {name}: " + ", ".join(f"L={r['lookahead_tokens']} {r['snr_db']:.1f} dB"
                                       for r in results[name]), flush=True)
    return results


def _load(model_path: str | None, dtype: str):
    if model_path:
        return losatok_jax.load_losatok(model_path=model_path, dtype=dtype)
    config = load_config(RELEASED_CONFIG)
    return losatok_jax.Losatok(losatok_jax.init_params(config, jax.random.key(0)),
                               config).astype(dtype)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_path", default=None,
                        help="a checkpoint (default: random weights at the released size)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch_sizes", type=_ints, default=[1, 8, 32])
    parser.add_argument("--chunks", type=_ints, default=[1, 5, 25])
    parser.add_argument("--seconds", type=float, default=10.0,
                        help="time spent pushing per row (at least 3 pushes)")
    parser.add_argument("--approximation_seconds", type=float, default=4.0,
                        help="length of the music clip for the lookahead errors")
    parser.add_argument("--approximation_only", action="store_true")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)

    results = {"device": jax.devices()[0].device_kind,
               "model": args.model_path or "random weights, released size", "speed": {}}
    if not args.approximation_only:
        for dtype in args.dtypes.split(","):
            results["speed"][dtype] = speed(_load(args.model_path, dtype), args.batch_sizes,
                                            args.chunks, args.seconds)
    results["approximation_float32"] = approximation(_load(args.model_path, "float32"),
                                                     args.approximation_seconds)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()

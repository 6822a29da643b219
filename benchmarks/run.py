"""Times the JAX port against the PyTorch oracle on the same weights, in one command.

    python -m benchmarks.run                      # --full: 1 s, 10 s, 60 s and a mixed batch
    python -m benchmarks.run --quick              # 1 s and 10 s, a smaller batch, 3 repeats
    python -m benchmarks.run --tiny               # the golden tiny model: a smoke test in seconds
    python -m benchmarks.run --device gpu --dtype bfloat16

Both frameworks run the same random full-size weights (`tests/torch_oracle.random_state_dict`,
converted for JAX by `convert.torch_to_orbax.build_params`): speed does not depend on the values.
PyTorch is the oracle from the tests (`TorchOracle`, float32), called one clip at a time as
upstream would be. JAX goes through the public API (`encode`, `decode`, `reconstruct`, default
`Buckets`). Each framework runs in its own subprocess, so peak memory is its own.

For every (operation, input) row: × realtime, first call (and the compile time inside it, from JAX's
compile events), steady state (median of the repeats after the first call), peak host memory
(VmHWM, reset before each row; device memory on GPU), achieved FLOP/s (matmul and convolution
FLOPs the model needs, counted analytically) against a large matmul timed in the same process, and
the JAX/PyTorch ratio. Optionally, bfloat16 accuracy against float32 on speech, music and noise
(`--accuracy`) and the start-up time of the reconstruct CLI from a converted checkpoint
(`--startup`). Writes `<output-dir>/<name>.json` and `<name>.md` (name: device, dtype, profile).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_CACHE_DIR = Path(tempfile.gettempdir()) / "losatok-bench"
SAMPLE_RATE = 16000

# Model sizes, as `tests/torch_oracle.random_state_dict` keywords plus the number of heads.
FULL_SIZES = dict(embed_dim=1280, depth=32, num_heads=16, target_length=1008, decoder_dim=128,
                  decoder_embed_dim=1280, decoder_intermediate_size=5120, decoder_depth=12)
TINY_SIZES = dict(embed_dim=64, depth=2, num_heads=4, target_length=40, decoder_dim=16,
                  decoder_embed_dim=64, decoder_intermediate_size=128, decoder_depth=2)


@dataclasses.dataclass(frozen=True)
class Profile:
    sizes: dict
    durations: tuple[float, ...]  # single clips, seconds
    mixed_clips: int  # clips in the mixed-length batch
    mixed_range: tuple[float, float]  # their durations, seconds
    repeats: int  # timed calls after the first
    matmul_n: int  # side of the square matmul that measures the peak (CPU; GPU uses 8192)


PROFILES = {
    "full": Profile(FULL_SIZES, (1.0, 10.0, 60.0), 8, (1.0, 12.0), 5, 4096),
    "quick": Profile(FULL_SIZES, (1.0, 10.0), 4, (1.0, 12.0), 3, 4096),
    "tiny": Profile(TINY_SIZES, (1.0, 2.0), 3, (0.5, 2.5), 2, 1024),
}
OPERATIONS = ("encode", "decode", "reconstruct")
NOT_MEASURED_GPU = "not measured (no GPU lent to this task)"
# `--buckets`: JAX's shape buckets. "default" is `losatok_jax.DEFAULT_BUCKETS` (16-1512 tokens in
# steps of about 1.25); "powers-of-two" is the coarser 32, 64, ..., 512, 1008 ladder (fewer
# programs, more padding); "per-second" has one length bucket per second of audio up to a minute
# (programs compile on demand, ~1 s each at full size on CPU), so a row is padded by < 1 s.
BUCKET_CHOICES = ("default", "powers-of-two", "per-second")


def make_buckets(name: str):
    from losatok_jax import DEFAULT_BUCKETS, Buckets

    if name == "default":
        return DEFAULT_BUCKETS
    if name == "powers-of-two":
        return Buckets(batch_sizes=DEFAULT_BUCKETS.batch_sizes,
                       num_tokens=(32, 64, 128, 256, 512, 1008))
    if name == "per-second":
        return Buckets(batch_sizes=(1, 2, 4, 8), num_tokens=tuple(range(25, 1501, 25)))
    raise ValueError(f"unknown buckets {name!r}; choose from {BUCKET_CHOICES}")


# --------------------------------------------------------------------------------------------
# Configuration, weights, inputs
# --------------------------------------------------------------------------------------------

def make_config(sizes: dict):
    from losatok_jax.config import LosatokConfig, SemanticEncoderConfig

    semantic = SemanticEncoderConfig(embed_dim=sizes["embed_dim"], depth=sizes["depth"],
                                     num_heads=sizes["num_heads"],
                                     target_length=sizes["target_length"])
    return LosatokConfig(embed_dim=sizes["embed_dim"], decoder_dim=sizes["decoder_dim"],
                         decoder_embed_dim=sizes["decoder_embed_dim"],
                         decoder_intermediate_size=sizes["decoder_intermediate_size"],
                         decoder_depth=sizes["decoder_depth"], semantic=semantic)


def _oracle_module():
    sys.path.insert(0, str(REPO_ROOT / "tests"))
    import torch_oracle

    return torch_oracle


def weights_file(sizes: dict, seed: int, cache_dir: Path) -> Path:
    """A random upstream state dict saved as .pth, generated once per (sizes, seed) and reused:
    generating the full-size one takes over a minute on 2 cores."""
    import torch

    tag = "-".join(f"{k}{v}" for k, v in sorted(sizes.items()) if k != "num_heads")
    path = cache_dir / f"weights-{tag}-seed{seed}.pth"
    if path.exists():
        return path
    cache_dir.mkdir(parents=True, exist_ok=True)
    oracle = _oracle_module()
    keywords = {k: v for k, v in sizes.items() if k != "num_heads"}
    state = oracle.random_state_dict(**keywords, seed=seed)
    temp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(state, temp)
    temp.rename(path)
    return path


def noise_clip(seconds: float, seed: int) -> np.ndarray:
    """Amplitude-modulated coloured noise, peak 0.3: timing inputs (speed is content-blind)."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    x = np.cumsum(rng.standard_normal(n)) * 0.02 + rng.standard_normal(n)
    x -= np.convolve(x, np.ones(64) / 64, mode="same")
    t = np.arange(n) / SAMPLE_RATE
    x *= 0.6 + 0.4 * np.sin(2 * np.pi * 1.3 * t)
    return (0.3 * x / np.abs(x).max()).astype(np.float32)


def mixed_durations(count: int, duration_range: tuple[float, float]) -> np.ndarray:
    """The mixed batch's clip durations in seconds: uniform over the range, one fixed seed."""
    return np.random.default_rng(1234).uniform(*duration_range, count)


def timing_inputs(profile: Profile) -> list[tuple[str, Any]]:
    """(label, clip or list of clips) for every input of the profile (no batch row for 0 mixed
    clips)."""
    inputs = [(f"{d:g} s", noise_clip(d, seed=i)) for i, d in enumerate(profile.durations)]
    if not profile.mixed_clips:
        return inputs
    lengths = mixed_durations(profile.mixed_clips, profile.mixed_range)
    clips = [noise_clip(d, seed=100 + i) for i, d in enumerate(lengths)]
    inputs.append((f"batch of {len(clips)} mixed ({profile.mixed_range[0]:g}-"
                   f"{profile.mixed_range[1]:g} s)", clips))
    return inputs


# --------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------

def encode_flops(config, num_samples: int) -> float:
    """Matmul and convolution FLOPs (2 per multiply-add) that encoding one clip needs, as upstream
    computes it (no padding). STFTs and elementwise work are left out (< 1%)."""
    s = config.semantic
    tokens = config.num_tokens(num_samples)
    frames = 1 + num_samples // config.hop_length
    e, d = config.embed_dim, config.decoder_dim
    flops = 2 * frames * (s.n_fft // 2 + 1) * s.n_mels  # semantic mel matmul
    flops += 2 * frames * (config.n_fft_acoustic // 2 + 1) * config.n_mels_patch  # acoustic mel
    flops += 2 * tokens * (s.n_mels * s.frames_per_token) * e  # semantic patch conv
    full, last = divmod(tokens, s.chunk_tokens)
    for length, count in ((s.chunk_tokens, full), (last, 1 if last else 0)):
        per_block = 2 * length * e * (3 * e + e + 2 * s.mlp_dim) + 4 * length * length * e
        flops += count * s.depth * per_block
    flops += 2 * tokens * (e * config.sembo_hidden_dim + config.sembo_hidden_dim * d)  # SemBo
    flops += 2 * tokens * (config.n_mels_patch * config.frames_per_token) * e  # acoustic patch
    flops += 2 * tokens * (e * d + 2 * d * d)  # fc_a, fc_mu, fc_logvar
    return float(flops)


def decode_flops(config, tokens: int) -> float:
    """Matmul and convolution FLOPs of decoding `tokens` latents (the irfft left out)."""
    frames = tokens * config.upsample_tokens
    e, c, i = config.embed_dim, config.decoder_embed_dim, config.decoder_intermediate_size
    flops = 2 * frames * config.decoder_dim * e  # ConvTranspose1d
    flops += 2 * frames * e * c * 7  # embed conv
    flops += config.decoder_depth * 2 * frames * (c * 7 + 2 * c * i)  # ConvNeXt blocks
    flops += 2 * frames * c * (config.istft_n_fft + 2)  # ISTFT head projection
    return float(flops)


def row_flops(config, operation: str, clips: list[np.ndarray]) -> float:
    total = 0.0
    for clip in clips:
        if operation in ("encode", "reconstruct"):
            total += encode_flops(config, len(clip))
        if operation in ("decode", "reconstruct"):
            total += decode_flops(config, config.num_tokens(len(clip)))
    return total


def jax_tokens_computed(config, operation: str, tokens: int, b=None) -> int | None:
    """Tokens the buckets `b` (default: the default ones) make JAX compute for one clip of
    `tokens` (padding and decoder halos included), or None when unknown; upstream computes
    exactly `tokens`."""
    from losatok_jax import DEFAULT_BUCKETS
    from losatok_jax._batching import decode_rows, encode_pieces

    b = b or DEFAULT_BUCKETS
    if operation == "encode":
        return sum(b.encode_length(config, p.count) for p in encode_pieces(config, 0, tokens))
    if operation == "decode":
        return sum(row.length for row in decode_rows(config, b, [tokens]))
    return None


# --------------------------------------------------------------------------------------------
# Measurement helpers (run inside the workers)
# --------------------------------------------------------------------------------------------

def _status_gb(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 2**20  # kB
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets the process's VmHWM (Linux >= 4.0); False where that is impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_gb() -> float:
    hwm = _status_gb("VmHWM")
    if hwm is not None:
        return hwm
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class CompileClock:
    """Seconds JAX spends tracing, lowering and compiling, from its monitoring events."""

    EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
              "/jax/core/compile/jaxpr_to_mlir_module_duration",
              "/jax/core/compile/backend_compile_duration")

    def __init__(self):
        import jax.monitoring

        self.seconds = 0.0
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **kwargs):
        if event in self.EVENTS:
            self.seconds += duration


class Framework:
    """What a worker times: encode / decode / reconstruct on one clip or a list of clips."""

    name: str
    compile_clock: CompileClock | None = None

    def encode(self, clips):  # -> list of (T, D) latents
        raise NotImplementedError

    def decode(self, latents):
        raise NotImplementedError

    def reconstruct(self, clips):
        raise NotImplementedError

    def memory(self) -> dict:
        return {"peak_rss_gb": round(peak_rss_gb(), 3)}

    def reset_memory(self):
        reset_peak_rss()


def measure(framework: Framework, fn: Callable[[], Any], repeats: int) -> dict:
    framework.reset_memory()
    clock = framework.compile_clock
    compile_before = clock.seconds if clock else 0.0
    start = time.perf_counter()
    output = fn()
    first = time.perf_counter() - start
    compile_s = (clock.seconds - compile_before) if clock else 0.0
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return output, {"first_s": first, "compile_s": compile_s,
                    "steady_s": statistics.median(times), "times_s": times, **framework.memory()}


class Session:
    """One framework loaded in one process, timing rows on request.

    Rows go in the order of `tasks()`; the parent interleaves the frameworks' sessions row by row,
    so a load change on a shared machine hits both sides of a ratio alike.
    """

    def __init__(self, framework: Framework, config, profile: Profile, peak_fn, info: dict):
        self.framework, self.config, self.profile = framework, config, profile
        self.inputs = timing_inputs(profile)
        self.peak_fn = peak_fn
        self.peaks: list[float] = []
        self.info = info
        self.latents: dict[int, Any] = {}  # each input's encode output: its decode row's input

    def tasks(self) -> list[tuple[int, str]]:
        return [(i, op) for i in range(len(self.inputs)) for op in OPERATIONS]

    def peak(self) -> float:
        self.peaks.append(self.peak_fn())
        print(f"  {self.framework.name:7s} matmul peak {self.peaks[-1] / 1e9:.1f} GFLOP/s",
              flush=True)
        return self.peaks[-1]

    def run(self, index: int, operation: str) -> dict:
        label, data = self.inputs[index]
        clips = data if isinstance(data, list) else [data]
        seconds = sum(len(c) for c in clips) / SAMPLE_RATE
        framework = self.framework

        def call():
            if operation == "encode":
                return framework.encode(clips)
            if operation == "decode":
                return framework.decode(self.latents[index])
            return framework.reconstruct(clips)

        output, result = measure(framework, call, self.profile.repeats)
        if operation == "encode":
            self.latents[index] = output
        flops = row_flops(self.config, operation, clips)
        result.update(operation=operation, input=label, audio_s=seconds, clips=len(clips),
                      x_realtime=seconds / result["steady_s"], flops=flops,
                      gflops_per_s=flops / result["steady_s"] / 1e9)
        if len(clips) == 1 and operation != "reconstruct":
            result["tokens"] = self.config.num_tokens(len(clips[0]))
        print(f"  {framework.name:7s} {operation:11s} {label:28s} "
              f"{result['x_realtime']:8.2f}x realtime  steady {result['steady_s']:.3f} s  "
              f"first {result['first_s']:.2f} s (compile {result['compile_s']:.1f} s)",
              flush=True)
        return result

    def summary(self) -> dict:
        """The best matmul peak sampled (one sample can be low on a shared machine)."""
        return {**self.info, "matmul_peak_flops": max(self.peaks) if self.peaks else None,
                "matmul_peak_samples": self.peaks}


def _profile_from(spec: dict) -> Profile:
    return Profile(**{**spec["profile"], "durations": tuple(spec["profile"]["durations"]),
                      "mixed_range": tuple(spec["profile"]["mixed_range"])})


# --------------------------------------------------------------------------------------------
# JAX worker
# --------------------------------------------------------------------------------------------

class JaxFramework(Framework):
    name = "jax"

    def __init__(self, model, device: str, buckets):
        import losatok_jax

        self.api = losatok_jax
        self.model = model
        self.device = device
        self.buckets = buckets
        self.compile_clock = CompileClock()

    def encode(self, clips):
        return [f["z"] for f in self.api.encode(self.model, clips, buckets=self.buckets)]

    def decode(self, latents):
        return self.api.decode(self.model, latents, buckets=self.buckets)

    def reconstruct(self, clips):
        return self.api.reconstruct(self.model, clips, buckets=self.buckets)

    def memory(self):
        out = super().memory()
        if self.device != "cpu":
            import jax

            stats = jax.local_devices()[0].memory_stats() or {}
            out["device_peak_gb"] = round(stats.get("peak_bytes_in_use", 0) / 2**30, 3)
        return out


def load_jax_model(weights: Path, config, dtype: str):
    import jax
    import jax.numpy as jnp

    import losatok_jax
    from convert.torch_to_orbax import build_params, read_torch_state

    params = build_params(read_torch_state(weights), config)
    model = losatok_jax.Losatok(jax.tree.map(jnp.asarray, params), config)
    del params
    return model if dtype == "float32" else model.astype(dtype)


def jax_matmul_peak(n: int, dtype: str, repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul in `dtype` (best of `repeats`), with the model's precision."""
    import jax
    import jax.numpy as jnp

    from losatok_jax.model import full_float32_matmuls

    def product(x, y):
        with full_float32_matmuls():
            return x @ y

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    matmul = jax.jit(product)
    matmul(a, a).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def jax_session(spec: dict) -> Session:
    import jax

    config = make_config(spec["sizes"])
    profile = _profile_from(spec)
    start = time.perf_counter()
    model = load_jax_model(Path(spec["weights"]), config, spec["dtype"])
    load_s = time.perf_counter() - start
    device = jax.devices()[0]
    n = profile.matmul_n if spec["device"] == "cpu" else 8192
    buckets = make_buckets(spec.get("buckets", "default"))
    param_gb = sum(x.nbytes for x in jax.tree.leaves(model.params)) / 2**30
    print(f"jax: {device.device_kind}, dtype {spec['dtype']}, params {param_gb:.2f} GB",
          flush=True)
    info = {"framework": "jax", "buckets": spec.get("buckets", "default"),
            "device_kind": device.device_kind, "dtype": spec["dtype"], "param_gb": param_gb,
            "rss_after_load_gb": _status_gb("VmRSS"), "load_s": load_s, "matmul_n": n,
            "versions": {"jax": jax.__version__, "flax": _version("flax")},
            "xla_flags": os.environ.get("XLA_FLAGS", "")}
    session = Session(JaxFramework(model, spec["device"], buckets), config, profile,
                      lambda: jax_matmul_peak(n, spec["dtype"]), info)
    run = session.run

    def run_with_padding(index, operation):
        row = run(index, operation)
        if "tokens" in row:
            row["tokens_computed"] = jax_tokens_computed(config, operation, row["tokens"],
                                                         buckets)
        return row

    session.run = run_with_padding
    return session


# --------------------------------------------------------------------------------------------
# PyTorch worker
# --------------------------------------------------------------------------------------------

class TorchFramework(Framework):
    name = "pytorch"

    def __init__(self, oracle, device: str):
        self.oracle = oracle
        self.device = device

    def encode(self, clips):
        return [self.oracle.encode(clip[None])["z"][0] for clip in clips]

    def decode(self, latents):
        return [self.oracle.decode(z[None])[0] for z in latents]

    def reconstruct(self, clips):
        return [self.oracle.decode(self.oracle.encode(clip[None])["z"])[0] for clip in clips]

    def reset_memory(self):
        super().reset_memory()
        if self.device != "cpu":
            import torch

            torch.cuda.reset_peak_memory_stats()

    def memory(self):
        out = super().memory()
        if self.device != "cpu":
            import torch

            out["device_peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        return out


def device_oracle(state, num_heads: int, device: str):
    """The test oracle with its tensors on `device` (CUDA); results come back as numpy."""
    import torch

    oracle_module = _oracle_module()
    base = oracle_module.TorchOracle

    class DeviceOracle(base):
        def __init__(self):
            super().__init__(state, num_heads=num_heads, dtype=torch.float32)
            self.device = torch.device(device)
            self.params = {k: v.to(self.device) for k, v in self.params.items()}
            for name in ("semantic_window", "semantic_fb", "acoustic_window", "acoustic_fb",
                         "istft_window"):
                setattr(self, name, getattr(self, name).to(self.device))

        def _check_audio(self, audio):
            return base._check_audio(self, audio).to(self.device)

        @torch.no_grad()
        def encode(self, audio):
            # As TorchOracle.encode, computing only z (= mu); the features it skips are cheap.
            x = self._check_audio(audio)
            semantic = self._semantic_encoder(self._semantic_logmel(x))
            acoustic = self._patchify(self._acoustic_logmel(x),
                                      self._group("dasheng_tokenizer.encoder.patch_embed."))
            acoustic = oracle_module._layer_norm(
                acoustic, self._group("dasheng_tokenizer.encoder.norm."), 1e-5)
            t = min(semantic.shape[1], acoustic.shape[1])
            low = (oracle_module._linear(acoustic[:, :t], self._group("fc_a."))
                   + self._sembo_down(semantic[:, :t]))
            mu = oracle_module._linear(low, self._group("fc_mu."))
            return {"z": mu.cpu().numpy()}

        @torch.no_grad()
        def decode(self, z):
            z = torch.as_tensor(np.asarray(z), dtype=self.dtype, device=self.device)
            b, t, _ = z.shape
            up = self._group("dasheng_tokenizer.upsampler.")
            x = torch.einsum("btd,dek->btke", z, up["weight"]).reshape(b, 2 * t, -1) + up["bias"]
            return self._istft_head(self._vocos_backbone(x)).cpu().numpy()

    return DeviceOracle()


def torch_matmul_peak(n: int, device: str, repeats: int = 5) -> float:
    import torch

    a = torch.randn(n, n, device=device)
    a @ a
    best = math.inf
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ a
        if device != "cpu":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def torch_session(spec: dict) -> Session:
    import torch

    torch.set_num_threads(len(os.sched_getaffinity(0)))
    config = make_config(spec["sizes"])
    profile = _profile_from(spec)
    oracle_module = _oracle_module()
    start = time.perf_counter()
    state = torch.load(spec["weights"], map_location="cpu", weights_only=True)
    device = spec["device"]
    if device == "cpu":
        oracle = oracle_module.TorchOracle(state, num_heads=spec["sizes"]["num_heads"],
                                           dtype=torch.float32)
        kind = _cpu_model()
    else:
        # Float32 in earnest, as JAX's float32 runs: no TF32 in cuBLAS or cuDNN (PyTorch's cuDNN
        # convolutions default to it).
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        oracle = device_oracle(state, spec["sizes"]["num_heads"], "cuda")
        del state
        kind = torch.cuda.get_device_name()
    load_s = time.perf_counter() - start
    n = profile.matmul_n if device == "cpu" else 8192
    print(f"pytorch: {torch.get_num_threads()} threads", flush=True)
    info = {"framework": "pytorch", "device_kind": kind, "dtype": "float32", "load_s": load_s,
            "rss_after_load_gb": _status_gb("VmRSS"), "matmul_n": n,
            "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__}}
    return Session(TorchFramework(oracle, device), config, profile,
                   lambda: torch_matmul_peak(n, "cpu" if device == "cpu" else "cuda"), info)


# --------------------------------------------------------------------------------------------
# bfloat16 accuracy
# --------------------------------------------------------------------------------------------

def speech_signal() -> np.ndarray:
    from losatok_jax import audio_io

    return audio_io.load_audio(REPO_ROOT / "examples" / "speech.wav", SAMPLE_RATE)


def music_signal(seconds: float = 6.0) -> np.ndarray:
    """Harmonic notes with attack/decay envelopes, then chords, over a soft bass: tonal audio with
    a wide dynamic range (the hard case for float32 and bfloat16 alike, SPEC.md)."""
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


def bf16_accuracy(model32, signals: dict[str, np.ndarray]) -> dict:
    """bfloat16 against float32 on each signal: z cosine per token and relative error, the same for
    semantic_emb, and the log-spectral distance of the decoded audio."""
    import losatok_jax

    model16 = model32.astype("bfloat16")
    results = {}
    for name, audio in signals.items():
        f32 = losatok_jax.encode(model32, audio[None], features=("z", "semantic_emb"))
        f16 = losatok_jax.encode(model16, audio[None], features=("z", "semantic_emb"))
        cos = token_cosines(f32["z"], f16["z"])
        audio32 = losatok_jax.decode(model32, f32["z"])[0]
        audio16 = losatok_jax.decode(model16, f16["z"])[0]
        decoder_only = losatok_jax.decode(model16, f32["z"])[0]
        results[name] = {
            "seconds": len(audio) / SAMPLE_RATE,
            "z_cosine_min": float(cos.min()), "z_cosine_mean": float(cos.mean()),
            "z_relative_error": float(np.linalg.norm(f16["z"] - f32["z"])
                                      / np.linalg.norm(f32["z"])),
            "semantic_emb_cosine_min": float(token_cosines(f32["semantic_emb"],
                                                           f16["semantic_emb"]).min()),
            "audio_lsd_db": log_spectral_distance(audio32, audio16),
            "decoder_only_lsd_db": log_spectral_distance(audio32, decoder_only),
            "audio_relative_error": float(np.linalg.norm(audio16 - audio32)
                                          / np.linalg.norm(audio32)),
        }
        print(f"  bf16 vs f32 {name:7s} z cos min {results[name]['z_cosine_min']:.6f}  "
              f"rel {results[name]['z_relative_error']:.2e}  "
              f"LSD {results[name]['audio_lsd_db']:.3f} dB", flush=True)
    return results


def accuracy_worker(spec: dict) -> dict:
    config = make_config(spec["sizes"])
    model = load_jax_model(Path(spec["weights"]), config, "float32")
    signals = {"speech": speech_signal(), "music": music_signal(), "noise": noise_signal()}
    return {"weights": "random (no real checkpoint available)",
            "signals": bf16_accuracy(model, signals)}


# --------------------------------------------------------------------------------------------
# Start-up: converted checkpoint on disk -> first reconstructed 10 s file, through the CLI
# --------------------------------------------------------------------------------------------

def checkpoint_worker(spec: dict) -> dict:
    from losatok_jax import checkpoint

    path = Path(spec["checkpoint"])
    if (path / checkpoint.CONFIG_FILE).exists():
        stale = checkpoint.mismatch(path)  # written by an earlier version: convert anew
        if stale is None:
            return {"checkpoint": str(path)}
        print(f"  {stale}", flush=True)
        shutil.rmtree(path)
    model = load_jax_model(Path(spec["weights"]), make_config(spec["sizes"]), "float32")
    checkpoint.save(path, model)
    return {"checkpoint": str(path)}


def startup(spec: dict, cache_dir: Path) -> dict:
    """Wall time of `python -m losatok_jax.reconstruct` on a 10 s file: with an empty compilation
    cache (cold), then with the one the first run filled (warm)."""
    from losatok_jax import audio_io

    checkpoint = cache_dir / f"ckpt-{Path(spec['weights']).stem}"
    run_worker("checkpoint", {**spec, "checkpoint": str(checkpoint)})
    wav = cache_dir / "startup-10s.wav"
    speech = speech_signal()
    audio = np.concatenate([speech, music_signal(10.0 - len(speech) / SAMPLE_RATE)])
    audio_io.save_audio(wav, audio[:10 * SAMPLE_RATE])
    results = {}
    with tempfile.TemporaryDirectory(prefix="losatok-startup-") as tmp:
        command = [sys.executable, "-m", "losatok_jax.reconstruct", "--input_path", str(wav),
                   "--output_path", str(Path(tmp) / "recon.wav"), "--model_path",
                   str(checkpoint), "--compilation_cache_dir", str(Path(tmp) / "cache")]
        for run in ("cold_cache", "warm_cache"):
            start = time.perf_counter()
            done = subprocess.run(command, cwd=REPO_ROOT, env=_child_env(spec["device"]),
                                  capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise RuntimeError(f"reconstruct CLI failed: {done.stderr[-2000:]}")
            summary = [line for line in done.stdout.splitlines() if "compilation cache" in line]
            results[run] = {"seconds": seconds, "cache": summary[-1] if summary else ""}
            print(f"  start-up ({run}): {seconds:.1f} s  {results[run]['cache']}", flush=True)
    results["checkpoint_gb"] = sum(f.stat().st_size for f in checkpoint.rglob("*")
                                   if f.is_file()) / 2**30
    results["upstream"] = ("not runnable here (no network): upstream's AudioVAE constructor "
                           "downloads MiDashengLM-7B from Hugging Face (a ~7B-parameter "
                           "checkpoint, ~15 GB at 16 bits) and loads it to keep its audio encoder")
    return results


# --------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------

SESSIONS = {"jax": jax_session, "pytorch": torch_session}
WORKERS = {"accuracy": accuracy_worker, "checkpoint": checkpoint_worker}
PROTOCOL_PREFIX = "@@ "


def serve(kind: str, spec: dict) -> None:
    """A session in a subprocess: JSON requests on stdin, JSON replies on stdout after
    PROTOCOL_PREFIX; everything else the worker prints goes to stderr."""
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr

    def reply(value):
        replies.write(PROTOCOL_PREFIX + json.dumps(value) + "\n")
        replies.flush()

    session = SESSIONS[kind](spec)
    reply({"tasks": session.tasks()})
    for line in sys.stdin:
        request = json.loads(line)
        if request["cmd"] == "peak":
            reply(session.peak())
        elif request["cmd"] == "run":
            reply(session.run(request["index"], request["operation"]))
        elif request["cmd"] == "summary":
            reply(session.summary())
            return


class RemoteSession:
    """The parent's handle on a `serve` subprocess, with Session's methods."""

    def __init__(self, kind: str, spec: dict):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", "--serve", kind, "--spec", "-"],
            cwd=REPO_ROOT, env=_child_env(spec["device"]), stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)
        self.process.stdin.write(json.dumps(spec) + "\n")
        self.process.stdin.flush()
        self.kind = kind
        self._tasks = [tuple(t) for t in self._reply()["tasks"]]

    def _reply(self):
        for line in self.process.stdout:
            if line.startswith(PROTOCOL_PREFIX):
                return json.loads(line[len(PROTOCOL_PREFIX):])
        raise RuntimeError(f"the {self.kind} worker exited (status {self.process.wait()})")

    def _ask(self, **request):
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._reply()

    def tasks(self):
        return self._tasks

    def peak(self):
        return self._ask(cmd="peak")

    def run(self, index, operation):
        return self._ask(cmd="run", index=index, operation=operation)

    def summary(self):
        value = self._ask(cmd="summary")
        self.process.wait()
        return value


def run_frameworks(frameworks: list[str], spec: dict, in_process: bool) -> dict[str, dict]:
    """Loads every framework, then runs the rows interleaved: for each row, each framework in
    turn (alternating which goes first). Matmul peaks are sampled before and after."""
    sessions = {name: (SESSIONS[name](spec) if in_process else RemoteSession(name, spec))
                for name in frameworks}
    for session in sessions.values():
        session.peak()
    rows: dict[str, list[dict]] = {name: [] for name in frameworks}
    order = list(frameworks)
    for index, operation in next(iter(sessions.values())).tasks():
        for name in order:
            rows[name].append(sessions[name].run(index, operation))
        order.reverse()
    for session in sessions.values():
        session.peak()
    results = {}
    for name, session in sessions.items():
        summary = session.summary()
        for row in rows[name]:
            row["fraction_of_matmul_peak"] = (row["flops"] / row["steady_s"]
                                              / summary["matmul_peak_flops"])
        results[name] = {**summary, "rows": rows[name]}
    return results


def _child_env(device: str) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env["JAX_PLATFORMS"] = "cpu" if device == "cpu" else "cuda"
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def run_worker(kind: str, spec: dict, in_process: bool = False) -> dict:
    if in_process:
        return WORKERS[kind](spec)
    with tempfile.TemporaryDirectory(prefix="losatok-bench-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        done = subprocess.run([sys.executable, "-m", "benchmarks.run", "--worker", kind,
                               "--spec", str(spec_path), "--result", str(result_path)],
                              cwd=REPO_ROOT, env=_child_env(spec["device"]))
        if done.returncode != 0:
            raise RuntimeError(f"the {kind} worker failed (exit status {done.returncode})")
        return json.loads(result_path.read_text())


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:
        return "?"


def cpu_description(cpuinfo: str) -> str | None:
    """The model name in `/proc/cpuinfo` text with the family, model and widest vector extension
    (x86): the name alone ("AMD EPYC") is shared by the machines here whose float32 matmul peaks
    differ 2.3x (80 and 184 GFLOP/s on 2 cores). None without a model name."""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name")
    if not name or "cpu family" not in fields:
        return name
    flags = set(fields.get("flags", "").split())
    vector = next((label for flag, label in (("avx512f", "AVX-512"), ("avx2", "AVX2"),
                                             ("avx", "AVX")) if flag in flags), "SSE")
    return f"{name} (family {fields['cpu family']} model {fields.get('model', '?')}, {vector})"


def _cpu_model() -> str:
    try:
        described = cpu_description(Path("/proc/cpuinfo").read_text())
    except OSError:
        described = None
    return described or platform.processor() or "unknown"


def print_json(results: dict, output: str | None) -> None:
    """The side benchmarks' report: the results as JSON on stdout, and in `output` if given."""
    text = json.dumps(results, indent=2)
    print(text)
    if output:
        Path(output).write_text(text + "\n")


def combine(jax_result: dict | None, torch_result: dict | None) -> list[dict]:
    """One row per (operation, input) with both frameworks and their ratio."""
    table: dict[tuple[str, str], dict] = {}
    order = []
    for result in (jax_result, torch_result):
        if result is None:
            continue
        for row in result["rows"]:
            key = (row["operation"], row["input"])
            if key not in table:
                order.append(key)
                table[key] = {"operation": row["operation"], "input": row["input"],
                              "audio_s": row["audio_s"], "clips": row["clips"],
                              "flops": row["flops"]}
            table[key][result["framework"]] = {k: v for k, v in row.items()
                                               if k not in table[key]
                                               and k not in ("operation", "input")}
    for row in table.values():
        if "jax" in row and "pytorch" in row:
            row["jax_over_pytorch"] = row["jax"]["x_realtime"] / row["pytorch"]["x_realtime"]
    return [table[key] for key in order]


def goals(results: dict) -> dict:
    """The issue's measurable goals, each with the numbers that decide it."""
    out = {}
    rows = results["rows"]
    if results["device"] == "cpu" and results["dtype"] == "float32":
        ratios = [r["jax_over_pytorch"] for r in rows if "jax_over_pytorch" in r]
        fractions = [r["jax"]["fraction_of_matmul_peak"] for r in rows if "jax" in r]
        if ratios:
            out["cpu_every_row_at_least_pytorch"] = {"met": min(ratios) >= 1.0,
                                                     "worst_ratio": min(ratios)}
        if fractions:
            out["cpu_every_row_at_least_0.9_of_matmul_peak"] = {
                "met": min(fractions) >= 0.9, "worst_fraction": min(fractions),
                "best_fraction": max(fractions)}
        ten = {r["operation"]: r["jax"] for r in rows
               if r["input"] == "10 s" and "jax" in r}
        if "encode" in ten and "decode" in ten:
            compile_s = ten["encode"]["compile_s"] + ten["decode"]["compile_s"]
            out["first_encode_plus_decode_compile_at_most_20_s"] = {
                "met": compile_s <= 20.0, "compile_s": compile_s,
                "first_call_s": ten["encode"]["first_s"] + ten["decode"]["first_s"]}
    if "startup" in results:
        out["startup_faster_than_upstream_construction"] = {
            "cold_cache_s": results["startup"]["cold_cache"]["seconds"],
            "warm_cache_s": results["startup"]["warm_cache"]["seconds"],
            "met": "not comparable by measurement: " + results["startup"]["upstream"]}
    if "accuracy" in results:
        cosines = [s["z_cosine_min"] for s in results["accuracy"]["signals"].values()]
        out["bf16_z_cosine_at_least_0.999"] = {"met": min(cosines) >= 0.999,
                                               "worst_min_cosine": min(cosines)}
    if results["device"] == "cpu":
        out["gpu_goals"] = NOT_MEASURED_GPU
    elif batched := [r for r in rows if r["operation"] == "encode" and r["clips"] > 1
                     and "jax" in r]:
        row, low = batched[0], results["dtype"] != "float32"
        fraction = row["jax"]["fraction_of_matmul_peak"]
        out["gpu_batched_encode_at_least_0.4_of_bf16_peak"] = {
            "met": low and fraction >= 0.4, "fraction": fraction, "dtype": results["dtype"]}
        if "jax_over_pytorch" in row:
            out["gpu_batched_encode_at_least_5x_pytorch_float32"] = {
                "met": row["jax_over_pytorch"] >= 5.0, "ratio": row["jax_over_pytorch"],
                "dtype": results["dtype"]}
    return out


def _fmt(value, spec=".2f", missing="–"):
    return missing if value is None else format(value, spec)


def markdown(results: dict) -> str:
    jax_info, torch_info = results.get("jax", {}), results.get("pytorch", {})
    buckets = results.get("buckets", "default")
    lines = [f"### {results['device'].upper()} ({results['profile']} profile, JAX "
             f"{results['dtype']} with {buckets} buckets, PyTorch oracle float32)", ""]
    lines.append(f"{results['machine']}; {results['date']}; load average before/after "
                 f"{results['load_before']} / {results['load_after']}.")
    if jax_info and torch_info:
        lines.append(f"Matmul peak measured in each process ({jax_info['matmul_n']}² "
                     f"{results['dtype']} / float32): JAX "
                     f"{jax_info['matmul_peak_flops'] / 1e9:.0f} GFLOP/s, PyTorch "
                     f"{torch_info['matmul_peak_flops'] / 1e9:.0f} GFLOP/s. Parameters: "
                     f"{jax_info['param_gb']:.2f} GB (JAX).")
    if not results["rows"]:
        lines.append("(No timing rows: --frameworks none.)")
    else:
        lines += _rows_markdown(results)
    if results["device"] == "cpu":
        lines += ["", f"GPU rows: {NOT_MEASURED_GPU}."]
    if "accuracy" in results:
        lines += ["", "bfloat16 against float32 (random full-size weights; no real checkpoint "
                  "exists here):", "",
                  "| signal | seconds | z cosine min / mean | z relative error | "
                  "semantic_emb cosine min | decoded audio LSD (dB) | decoder-only LSD (dB) |",
                  "|" + "---|" * 7]
        for name, s in results["accuracy"]["signals"].items():
            lines.append(f"| {name} | {s['seconds']:.2f} | {s['z_cosine_min']:.6f} / "
                         f"{s['z_cosine_mean']:.6f} | {s['z_relative_error']:.2e} | "
                         f"{s['semantic_emb_cosine_min']:.6f} | {s['audio_lsd_db']:.3f} | "
                         f"{s['decoder_only_lsd_db']:.3f} |")
    if "startup" in results:
        s = results["startup"]
        lines += ["", f"Start-up, converted checkpoint on disk ({s['checkpoint_gb']:.1f} GB) to "
                  "the first reconstructed 10 s file, one `python -m losatok_jax.reconstruct` "
                  f"run: {s['cold_cache']['seconds']:.1f} s with an empty compilation cache, "
                  f"{s['warm_cache']['seconds']:.1f} s with a warm one. Upstream: {s['upstream']}."]
    if results.get("goals"):
        lines += ["", "Goals:", ""]
        for name, value in results["goals"].items():
            lines.append(f"- `{name}`: {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def _rows_markdown(results: dict) -> list[str]:
    lines = ["", "| operation | input | audio (s) | JAX × realtime | PyTorch × realtime | "
              "JAX / PyTorch | JAX first call (s) [compile] | JAX steady (s) | PyTorch steady (s)"
              " | JAX GFLOP/s (% of peak) | PyTorch GFLOP/s (% of peak) | peak RSS JAX / PyTorch "
              "(GB) |", "|" + "---|" * 12]
    for row in results["rows"]:
        j, p = row.get("jax"), row.get("pytorch")
        memory = "device_peak_gb" if results["device"] != "cpu" else "peak_rss_gb"

        def perf(r):
            if r is None:
                return "–"
            return f"{r['gflops_per_s']:.0f} ({100 * r['fraction_of_matmul_peak']:.0f}%)"

        lines.append(
            f"| {row['operation']} | {row['input']} | {row['audio_s']:.1f} | "
            f"{_fmt(j and j['x_realtime'])} | {_fmt(p and p['x_realtime'])} | "
            f"**{_fmt(row.get('jax_over_pytorch'))}** | "
            f"{_fmt(j and j['first_s'])} [{_fmt(j and j['compile_s'], '.1f')}] | "
            f"{_fmt(j and j['steady_s'], '.3f')} | {_fmt(p and p['steady_s'], '.3f')} | "
            f"{perf(j)} | {perf(p)} | {_fmt(j and j.get(memory))} / {_fmt(p and p.get(memory))} |")
    lines += ["", "Steady state: median of "
              f"{results['repeats']} calls after the first. × realtime: audio seconds per "
              "second. GFLOP/s: the matmul and convolution FLOPs the model needs (upstream's "
              "count, no padding) per steady-state second; JAX pads to its length buckets "
              "(the default ones: 1 s → 25 tokens, 10 s → 252, 60 s encodes as 6 × 252 and "
              "decodes as one 1512-token window; a batch's decode windows share rows where "
              "that computes less), so padding shows as lower JAX GFLOP/s "
              f"({results.get('buckets', 'default')} buckets here). Rows run interleaved: each "
              "row is timed in the JAX process, then in the PyTorch one (or the reverse), so a "
              "load change on a shared machine hits both sides of a ratio alike. "
              "Peak RSS: the process's high-water mark during the row (reset per row), weights "
              "included. Compile: JAX tracing + lowering + XLA compilation inside the first call "
              "(reconstruct reuses the encode and decode programs)."]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run",
                                     description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--full", dest="profile", action="store_const", const="full",
                      help="1 s, 10 s, 60 s and 8 mixed clips, 5 repeats (default)")
    size.add_argument("--quick", dest="profile", action="store_const", const="quick",
                      help="1 s and 10 s clips and 4 mixed clips, 3 repeats")
    size.add_argument("--tiny", dest="profile", action="store_const", const="tiny",
                      help="the golden tiny model (smoke test; numbers mean nothing)")
    parser.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="JAX compute dtype (the PyTorch oracle always runs float32)")
    parser.add_argument("--frameworks", default="jax,pytorch",
                        help="comma-separated subset of jax,pytorch; none: only --accuracy "
                             "and --startup")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per row")
    parser.add_argument("--durations", default=None, metavar="S,S,...",
                        help="single-clip durations in seconds (default: the profile's)")
    parser.add_argument("--mixed-clips", type=int, default=None,
                        help="clips in the mixed-length batch (default: the profile's; 0: no batch "
                        "row)")
    parser.add_argument("--buckets", choices=BUCKET_CHOICES, default="default",
                        help="JAX shape buckets (see BUCKET_CHOICES in this file)")
    parser.add_argument("--pytorch-from", default=None, metavar="JSON",
                        help="take the PyTorch rows from an earlier results file of the same "
                             "profile instead of running PyTorch again")
    parser.add_argument("--accuracy", action=argparse.BooleanOptionalAction, default=None,
                        help="bfloat16 vs float32 accuracy (default: on with --full)")
    parser.add_argument("--startup", action=argparse.BooleanOptionalAction, default=None,
                        help="reconstruct-CLI start-up time (default: on with --full)")
    parser.add_argument("--output-dir", default=str(DEFAULT_OUTPUT_DIR))
    parser.add_argument("--name", default=None, help="results file stem (default: from options)")
    parser.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR),
                        help="where random weights and the start-up checkpoint are kept")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true",
                        help="run the frameworks in this process (memory figures then mix)")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--serve", choices=sorted(SESSIONS), help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.serve:
        serve(args.serve, json.loads(sys.stdin.readline()))
        return 0
    if args.worker:
        result = WORKERS[args.worker](json.loads(Path(args.spec).read_text()))
        Path(args.result).write_text(json.dumps(result))
        return 0

    profile_name = args.profile or "full"
    profile = PROFILES[profile_name]
    if args.repeats is not None:
        profile = dataclasses.replace(profile, repeats=args.repeats)
    if args.durations is not None:
        profile = dataclasses.replace(
            profile, durations=tuple(float(d) for d in args.durations.split(",") if d))
    if args.mixed_clips is not None:
        if args.mixed_clips < 0:
            parser.error(f"--mixed-clips takes a count of 0 or more, got {args.mixed_clips}")
        profile = dataclasses.replace(profile, mixed_clips=args.mixed_clips)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip() not in ("", "none")]
    unknown = set(frameworks) - {"jax", "pytorch"}
    if unknown:
        parser.error(f"--frameworks takes jax and/or pytorch (or none), got {args.frameworks}")
    accuracy = args.accuracy if args.accuracy is not None else profile_name == "full"
    startup_too = args.startup if args.startup is not None else profile_name == "full"
    name = args.name or "-".join([args.device] + ([args.dtype] if args.dtype != "float32" else [])
                                 + ([profile_name] if profile_name != "full" else [])
                                 + ([args.buckets + "-buckets"]
                                    if args.buckets != "default" else []))
    cache_dir = Path(args.cache_dir)

    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"benchmark: {profile_name} profile on {args.device}, JAX {args.dtype}", flush=True)
    start = time.perf_counter()
    weights = weights_file(profile.sizes, args.seed, cache_dir)
    print(f"weights: {weights} ({time.perf_counter() - start:.0f} s)", flush=True)
    spec = {"sizes": profile.sizes, "profile": dataclasses.asdict(profile),
            "weights": str(weights), "device": args.device, "dtype": args.dtype,
            "buckets": args.buckets}
    results: dict[str, Any] = {
        "device": args.device, "dtype": args.dtype, "profile": profile_name,
        "buckets": args.buckets,
        "repeats": profile.repeats, "sizes": profile.sizes,
        "machine": f"{_cpu_model()}, {len(os.sched_getaffinity(0))} cores, "
                   f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GB",
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load_before": load_before, "python": platform.python_version(),
    }
    worker_results = {}
    if args.pytorch_from:
        if "pytorch" in frameworks:
            frameworks.remove("pytorch")
        earlier = json.loads(Path(args.pytorch_from).read_text())
        if earlier["profile"] != profile_name or earlier["device"] != args.device:
            parser.error(f"{args.pytorch_from} is a {earlier['profile']} run on "
                         f"{earlier['device']}, not {profile_name} on {args.device}")
        worker_results["pytorch"] = {
            **earlier["pytorch"], "from": args.pytorch_from,
            "rows": [{**row["pytorch"], "operation": row["operation"], "input": row["input"],
                      "audio_s": row["audio_s"], "clips": row["clips"], "flops": row["flops"]}
                     for row in earlier["rows"]]}
        results["pytorch"] = {k: v for k, v in worker_results["pytorch"].items() if k != "rows"}
    if frameworks:
        worker_results.update(run_frameworks(frameworks, spec, args.in_process))
    for framework in frameworks:
        results[framework] = {k: v for k, v in worker_results[framework].items() if k != "rows"}
    results["rows"] = combine(worker_results.get("jax"), worker_results.get("pytorch"))
    if accuracy:
        print("bfloat16 accuracy", flush=True)
        results["accuracy"] = run_worker("accuracy", spec, args.in_process)
    if startup_too:
        print("start-up", flush=True)
        results["startup"] = startup(spec, cache_dir)
    results["load_after"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    results["total_s"] = time.perf_counter() - start
    results["goals"] = goals(results)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / f"{name}.json").write_text(json.dumps(results, indent=2) + "\n")
    table = markdown(results)
    (output_dir / f"{name}.md").write_text(table)
    print(table)
    print(f"wrote {output_dir / name}.json and .md ({results['total_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

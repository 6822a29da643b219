"""Timing one framework in its own process: the measurement helpers, and a session each for the
JAX port and the PyTorch oracle."""

from __future__ import annotations

import math
import os
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.report import _cpu_model, _version
from benchmarks.workloads import (OPERATIONS, SAMPLE_RATE, Profile, _oracle_module, jax_tokens_computed,
                                  make_buckets, make_config, row_flops, timing_inputs)

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

        self.api = losatok_jax.api
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
    from losatok_jax.convert import build_params, read_torch_state

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

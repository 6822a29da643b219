"""The results: machine description, goals and the Markdown table."""

from __future__ import annotations

import json
import platform
from pathlib import Path


from benchmarks.workloads import NOT_MEASURED_GPU

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

"""`python -m benchmarks.run` at the golden tiny size: the harness runs and reports every row.

The numbers mean nothing at this size; the full-size results are in benchmarks/results/.
"""

import json

import pytest

from benchmarks import report, run, workloads
from losatok_jax import plan

FIELDS = ("first_s", "compile_s", "steady_s", "times_s", "x_realtime", "gflops_per_s",
          "fraction_of_matmul_peak", "peak_rss_gb")


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    status = run.main(["--tiny", "--in-process", "--repeats", "1", "--durations", "1",
                       "--mixed-clips", "2", "--output-dir", str(out),
                       "--cache-dir", str(out / "cache"), "--name", "tiny"])
    assert status == 0
    return json.loads((out / "tiny.json").read_text()), (out / "tiny.md").read_text()


def test_every_row_has_both_frameworks(results):
    data, _ = results
    inputs = {r["input"] for r in data["rows"]}
    assert inputs == {"1 s", "batch of 2 mixed (0.5-2.5 s)"}
    assert len(data["rows"]) == len(workloads.OPERATIONS) * len(inputs)
    for row in data["rows"]:
        assert row["operation"] in workloads.OPERATIONS
        for framework in ("jax", "pytorch"):
            for field in FIELDS:
                assert field in row[framework], (row["operation"], row["input"], field)
            assert row[framework]["steady_s"] > 0 and len(row[framework]["times_s"]) == 1
        assert row["jax_over_pytorch"] == pytest.approx(
            row["jax"]["x_realtime"] / row["pytorch"]["x_realtime"])
        assert row["flops"] > 0
    encode_1s = next(r for r in data["rows"] if r["operation"] == "encode" and r["input"] == "1 s")
    assert encode_1s["jax"]["compile_s"] > 0  # the first call compiles
    assert data["jax"]["matmul_peak_flops"] > 0 and data["pytorch"]["matmul_peak_flops"] > 0
    assert "cpu_every_row_at_least_pytorch" in data["goals"]
    assert data["goals"]["gpu_goals"] == workloads.NOT_MEASURED_GPU


def test_markdown_table(results):
    data, text = results
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(data["rows"])  # header + rows
    assert "JAX / PyTorch" in table[0] and "not measured" in text


def test_flop_count_at_full_size():
    """~1.26 GFLOP per token in the 32 encoder blocks, ~0.68 in the decoder (SPEC sizes)."""
    config = workloads.make_config(workloads.FULL_SIZES)
    ten_seconds = 160000
    tokens = config.num_tokens(ten_seconds)
    blocks = 32 * (24 * tokens * 1280**2 + 4 * tokens**2 * 1280)
    assert plan.encode_flops(config, ten_seconds) == pytest.approx(blocks, rel=0.02)
    assert plan.decode_flops(config, tokens) / tokens == pytest.approx(0.683e9, rel=0.01)
    assert workloads.jax_tokens_computed(config, "encode", 25) == 25
    assert workloads.jax_tokens_computed(config, "encode", 300) == 252 + 50
    assert workloads.jax_tokens_computed(config, "encode", 1500) == 6 * 252
    assert workloads.jax_tokens_computed(config, "decode", 1500) == 1512  # one window
    assert workloads.jax_tokens_computed(config, "decode", 2500) == 1260 + 1260 + 80  # not 1512 + 1260


def test_cpu_description_tells_apart_machines_of_one_model_name():
    """Two "AMD EPYC" machines of different generations get different descriptions."""
    zen1 = "model name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 1\nflags\t\t: fpu sse avx avx2 fma\n"
    wide = "model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: avx2 avx512f\n"
    assert report.cpu_description(zen1) == "AMD EPYC (family 23 model 1, AVX2)"
    assert report.cpu_description(wide) == "AMD EPYC (family 25 model 17, AVX-512)"
    # Only the first processor's fields count; an ARM cpuinfo has no model name.
    assert report.cpu_description(zen1 + "\nprocessor\t: 1\n" + wide) == report.cpu_description(zen1)
    assert report.cpu_description("processor\t: 0\nBogoMIPS\t: 50.00\n") is None


def test_gpu_goals_come_from_the_batched_encode_row():
    def row(operation, clips, fraction, ratio):
        return {"operation": operation, "input": "x", "clips": clips,
                "jax": {"fraction_of_matmul_peak": fraction}, "jax_over_pytorch": ratio}

    rows = [row("encode", 1, 0.1, 1.0), row("decode", 8, 0.9, 9.0), row("encode", 8, 0.45, 6.0)]
    bf16 = report.goals({"device": "gpu", "dtype": "bfloat16", "rows": rows})
    assert bf16["gpu_batched_encode_at_least_0.4_of_bf16_peak"] == {
        "met": True, "fraction": 0.45, "dtype": "bfloat16"}
    assert bf16["gpu_batched_encode_at_least_5x_pytorch_float32"]["met"]
    assert "gpu_goals" not in bf16
    rows[2] = row("encode", 8, 0.45, 4.0)
    f32 = report.goals({"device": "gpu", "dtype": "float32", "rows": rows})
    assert not f32["gpu_batched_encode_at_least_0.4_of_bf16_peak"]["met"]  # not a bf16 run
    assert not f32["gpu_batched_encode_at_least_5x_pytorch_float32"]["met"]

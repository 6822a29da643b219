"""`python -m benchmarks.run` at the golden tiny size: the harness runs and reports every row.

The numbers mean nothing at this size; the full-size results are in benchmarks/results/.
"""

import json

import pytest

from benchmarks import run

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
    assert len(data["rows"]) == len(run.OPERATIONS) * len(inputs)
    for row in data["rows"]:
        assert row["operation"] in run.OPERATIONS
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
    assert data["goals"]["gpu_goals"] == run.NOT_MEASURED_GPU


def test_markdown_table(results):
    data, text = results
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(data["rows"])  # header + rows
    assert "JAX / PyTorch" in table[0] and "not measured" in text


def test_flop_count_at_full_size():
    """~1.26 GFLOP per token in the 32 encoder blocks, ~0.68 in the decoder (SPEC sizes)."""
    config = run.make_config(run.FULL_SIZES)
    ten_seconds = 160000
    tokens = config.num_tokens(ten_seconds)
    blocks = 32 * (24 * tokens * 1280**2 + 4 * tokens**2 * 1280)
    assert run.encode_flops(config, ten_seconds) == pytest.approx(blocks, rel=0.02)
    assert run.decode_flops(config, tokens) / tokens == pytest.approx(0.683e9, rel=0.01)
    assert run.jax_tokens_computed(config, "encode", 25) == 25
    assert run.jax_tokens_computed(config, "encode", 300) == 252 + 50
    assert run.jax_tokens_computed(config, "encode", 1500) == 6 * 252
    assert run.jax_tokens_computed(config, "decode", 1500) == 1512  # one window
    assert run.jax_tokens_computed(config, "decode", 2500) == 1260 + 1260 + 80  # not 1512 + 1260

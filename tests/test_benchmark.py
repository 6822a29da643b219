"""`python -m benchmarks.run` at the golden tiny size: the harness runs and reports every row.

The numbers mean nothing at this size; the full-size results are in benchmarks/results/.
"""

import json

import numpy as np
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


def test_short_rows_fit_splits_stream_from_compute():
    """Rows timed as 0.1 s of weight reading plus arithmetic at 200 GFLOP/s give back both."""
    from benchmarks import short_rows

    per_token = 2 * short_rows.WEIGHTS_PER_TOKEN / 200e9
    rows = [short_rows.row(t, 0.1 + t * per_token, peak_flops=200e9) for t in (1, 25, 252)]
    fit = short_rows.stream_compute_fit(rows)
    assert fit["stream_s"] == pytest.approx(0.1)
    assert fit["compute_gflops"] == pytest.approx(200)
    assert fit["stream_gb_per_s"] == pytest.approx(4 * short_rows.WEIGHTS_PER_TOKEN / 0.1 / 1e9)
    assert rows[1]["fraction_of_peak"] == pytest.approx(25 * per_token / (0.1 + 25 * per_token))


def test_cpu_description_tells_apart_machines_of_one_model_name():
    """Two "AMD EPYC" machines of different generations get different descriptions."""
    zen1 = "model name\t: AMD EPYC\ncpu family\t: 23\nmodel\t\t: 1\nflags\t\t: fpu sse avx avx2 fma\n"
    wide = "model name\t: AMD EPYC\ncpu family\t: 25\nmodel\t\t: 17\nflags\t\t: avx2 avx512f\n"
    assert run.cpu_description(zen1) == "AMD EPYC (family 23 model 1, AVX2)"
    assert run.cpu_description(wide) == "AMD EPYC (family 25 model 17, AVX-512)"
    # Only the first processor's fields count; an ARM cpuinfo has no model name.
    assert run.cpu_description(zen1 + "\nprocessor\t: 1\n" + wide) == run.cpu_description(zen1)
    assert run.cpu_description("processor\t: 0\nBogoMIPS\t: 50.00\n") is None


def test_short_rows_layouts_hold_the_same_matrix():
    """The (out, in) weights are the (in, out) ones transposed, contiguous, so both layouts time
    the same products."""
    from benchmarks import short_rows

    in_out = short_rows.host_weights("in_out", layers=2)
    out_in = short_rows.host_weights("out_in", layers=2)
    assert len(out_in) == 8
    assert [w.shape for w in out_in] == [w.shape[::-1] for w in in_out]
    assert all(b.flags.c_contiguous for b in out_in)
    assert all(np.array_equal(a.T, b) for a, b in zip(in_out, out_in))
    assert [short_rows.in_features(w, "out_in") for w in out_in[:4]] == [1280, 1280, 1280, 5120]


def test_short_rows_layouts_compute_the_same_products():
    """Every library's product in every layout is x @ W (feature-major: its transpose), so the
    layouts differ only in how the operands lie in memory."""
    from benchmarks import short_rows

    tokens = 3
    operands = {layout: (short_rows.host_inputs(tokens, layout),
                         short_rows.host_weights(layout, layers=1))
                for layout in short_rows.LAYOUTS}
    x, weights = operands["in_out"]
    reference = [x[w.shape[0]].astype(np.float64) @ w for w in weights]
    for name, make in short_rows.LIBRARIES.items():
        library = make()
        for layout, (x, weights) in operands.items():
            for w, expected in zip(weights, reference):
                product = library.products[layout](
                    library.array(x[short_rows.in_features(w, layout)]), library.array(w))
                product = np.asarray(product)
                got = product.T if layout == "feature_major" else product
                np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4,
                                           err_msg=f"{name} {layout}")


def test_gpu_goals_come_from_the_batched_encode_row():
    def row(operation, clips, fraction, ratio):
        return {"operation": operation, "input": "x", "clips": clips,
                "jax": {"fraction_of_matmul_peak": fraction}, "jax_over_pytorch": ratio}

    rows = [row("encode", 1, 0.1, 1.0), row("decode", 8, 0.9, 9.0), row("encode", 8, 0.45, 6.0)]
    bf16 = run.goals({"device": "gpu", "dtype": "bfloat16", "rows": rows})
    assert bf16["gpu_batched_encode_at_least_0.4_of_bf16_peak"] == {
        "met": True, "fraction": 0.45, "dtype": "bfloat16"}
    assert bf16["gpu_batched_encode_at_least_5x_pytorch_float32"]["met"]
    assert "gpu_goals" not in bf16
    rows[2] = row("encode", 8, 0.45, 4.0)
    f32 = run.goals({"device": "gpu", "dtype": "float32", "rows": rows})
    assert not f32["gpu_batched_encode_at_least_0.4_of_bf16_peak"]["met"]  # not a bf16 run
    assert not f32["gpu_batched_encode_at_least_5x_pytorch_float32"]["met"]


def test_kernel_layout_times_the_same_layer_in_both_layouts(tmp_path):
    """The (in, out) variant computes the package's layer: same outputs from transposed weights."""
    from benchmarks import kernel_layout
    from conftest import GOLDEN_DIR, in_out_kernels
    from losatok_jax.config import load_config

    config_path = GOLDEN_DIR / "tiny_chunk40" / "config.yml"
    config = load_config(config_path)
    for stack in ("semantic", "decoder"):
        [out_in] = kernel_layout.layer_weights(config, stack, 1, "out_in")
        in_out = in_out_kernels(out_in)
        x, mask = kernel_layout.layer_inputs(config, stack, 8)
        outputs = [kernel_layout.compiled_layer(config, stack, p, w, x, mask)(w, x, mask)
                   for p, w in (("out_in", out_in), ("in_out", in_out), ("in_out_eigen", in_out))]
        for other in outputs[1:]:
            np.testing.assert_allclose(other, outputs[0], rtol=1e-5, atol=1e-5)
    output = tmp_path / "layout.json"
    kernel_layout.main(["--config", str(config_path), "--rows", "8,120", "--layers", "2",
                        "--repeats", "1", "--output", str(output)])
    data = json.loads(output.read_text())
    for stack in ("semantic", "decoder"):
        assert [r["rows"] for r in data[stack]] == [8, 120]
        for r in data[stack]:
            assert min(r[f"{p}_ms"] for p in kernel_layout.PROGRAMS) > 0
            assert r["speedup_vs_best_in_out"] == pytest.approx(
                min(r["in_out_ms"], r["in_out_eigen_ms"]) / r["out_in_ms"])


def test_decode_packing_compares_two_plans_of_the_same_audio(model):
    """Both plans decode the same audio; packing computes fewer tokens; `plan` restores packing."""
    from benchmarks import decode_packing
    from losatok_jax import Buckets, _batching

    packer = _batching.pack_decode_rows
    rng = np.random.default_rng(3)
    latents = [rng.standard_normal((n, model.config.decoder_dim)).astype(np.float32)
               for n in (150, 40, 9, 3)]
    result = decode_packing.measure(model, latents, repeats=1,
                                    buckets=Buckets(batch_sizes=(1, 2, 4), num_tokens=(4, 16, 64)))
    assert result["max_abs_difference"] <= 1e-5
    assert result["tokens_computed"] == {"packed": 4 * 64, "row_per_window": 4 * 64 + 16 + 4}
    assert all(len(t) == 1 and t[0] > 0 for t in result["times_s"].values())
    assert _batching.pack_decode_rows is packer

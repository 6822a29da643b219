"""The planner's arithmetic, without the TPU compiler: projections and the table. Compiling
for a TPU slice is tested in test_tpu_compile.py."""

from __future__ import annotations

import pytest

from losatok_jax import plan


def _report() -> dict:
    """Two encode buckets on a 4-chip slice: 50 tokens (2 s) at 1,000x realtime per chip and
    the 252-token chunk (10.08 s) at 2,000x."""
    def row(tokens, realtime):
        audio = 8 * tokens / 25
        return {"operation": "encode", "tokens": tokens, "batch_per_chip": 8,
                "audio_seconds_per_chip": audio, "realtime_per_chip": realtime,
                "estimated_fraction_of_peak": 0.3, "hbm_bytes_per_chip": 2e9,
                "flops_per_audio_second": 3.2e10, "compiled_over_analytic_flops": 0.98,
                "collectives": {}, "compile_seconds": 1.0}
    return {"target": "v5e:2x2", "chips": 4, "hosts": 1, "chip": "TPU v5 lite",
            "dtype": "bfloat16", "param_bytes_per_chip": 1.6e9, "allocator": "jemalloc",
            "programs": [row(50, 1000.0), row(252, 2000.0)]}


def test_hours_are_projected_at_the_chunk_and_the_slowest_bucket():
    p = plan.projection(_report(), hours=1000.0)
    assert p["chunk_bucket"]["chip_hours"] == pytest.approx(1000 / 2000)
    assert p["slowest_bucket"]["chip_hours"] == pytest.approx(1000 / 1000)
    assert p["chunk_bucket"]["wall_hours"] == pytest.approx(1000 / 2000 / 4)


def test_a_corpus_is_costed_window_by_window_at_its_buckets():
    """A 25 s clip is two chunk windows (2 x 10.08 s at 2,000x) and a 4.84 s rest in the 252
    bucket too (above 50 tokens); a 1 s clip runs in the 50-token bucket (2 s at 1,000x)."""
    p = plan.projection(_report(), durations=[25.0, 1.0])
    chunk_window = 252 / 25 / 2000
    assert p["corpus"]["chip_hours"] * 3600 == pytest.approx(3 * chunk_window + 2 / 1000)
    assert p["audio_hours"] == pytest.approx(26 / 3600)
    text = plan.table({**_report(), "projection": p})
    assert "| encode | 252 | 8 | 2.00 | 32.0 (0.98) | 0 | 2,000 | 30% | 1 |" in text
    assert "the corpus' clips, each window at its bucket" in text


def test_compiles_at_once_share_the_cores(monkeypatch):
    """Each of the compiles running at once gets its share of the cores (at least one thread),
    and a thread count the user gave libtpu is kept."""
    monkeypatch.setattr(plan.os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_tpu_some_flag=1")
    plan.share_cores(2)
    assert plan.os.environ["LIBTPU_INIT_ARGS"] == (
        "--xla_tpu_some_flag=1 --xla_jf_internal_num_threads=4")
    monkeypatch.delenv("LIBTPU_INIT_ARGS")
    plan.share_cores(16)
    assert plan.os.environ["LIBTPU_INIT_ARGS"] == "--xla_jf_internal_num_threads=1"
    monkeypatch.setenv("LIBTPU_INIT_ARGS", "--xla_jf_internal_num_threads=3")
    plan.share_cores(2)
    assert plan.os.environ["LIBTPU_INIT_ARGS"] == "--xla_jf_internal_num_threads=3"

"""The planner's command starts itself again, once, under jemalloc where the system has it, and
leaves the allocator alone where the user chose one or jemalloc is missing."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys

import pytest

from losatok_jax import _allocator, plan


@pytest.fixture
def jemalloc_found(monkeypatch):
    monkeypatch.setattr(_allocator.sys, "platform", "linux")
    monkeypatch.setattr(_allocator.ctypes.util, "find_library",
                        lambda name: "libjemalloc.so.2" if name == "jemalloc" else None)


def test_jemalloc_joins_what_is_preloaded(jemalloc_found):
    assert _allocator.with_jemalloc({"PATH": "/bin"}) == {"PATH": "/bin",
                                                         "LD_PRELOAD": "libjemalloc.so.2"}
    assert _allocator.with_jemalloc({"LD_PRELOAD": "libtrace.so"})["LD_PRELOAD"] == (
        "libtrace.so libjemalloc.so.2")


@pytest.mark.parametrize("environ", [
    {"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"},  # already under jemalloc: no second start
    {"LD_PRELOAD": "libtcmalloc_minimal.so.4"},  # the user's own choice of allocator
    {_allocator.OPT_OUT: "system"},
])
def test_the_allocator_is_left_alone_where_it_was_chosen(jemalloc_found, environ):
    assert _allocator.with_jemalloc(environ) is None


def test_nothing_changes_without_jemalloc_or_off_linux(jemalloc_found, monkeypatch):
    monkeypatch.setattr(_allocator.sys, "platform", "darwin")
    assert _allocator.with_jemalloc({}) is None
    monkeypatch.setattr(_allocator.sys, "platform", "linux")
    monkeypatch.setattr(_allocator.ctypes.util, "find_library", lambda name: None)
    assert _allocator.with_jemalloc({}) is None


def test_the_command_starts_again_with_its_own_command_line(monkeypatch):
    started = []
    monkeypatch.setattr(_allocator, "with_jemalloc", lambda environ: {"LD_PRELOAD": "libj.so"})
    monkeypatch.setattr(_allocator.os, "execve", lambda *call: started.append(call))
    _allocator.rerun_with_jemalloc()
    assert started == [(sys.executable, sys.orig_argv, {"LD_PRELOAD": "libj.so"})]
    monkeypatch.setattr(_allocator, "with_jemalloc", lambda environ: None)
    _allocator.rerun_with_jemalloc()
    assert len(started) == 1


def test_the_planners_command_and_only_it_starts_again(monkeypatch):
    """`python -m losatok_jax.plan` and the console script may start again; `main(argv)`, which
    a program may call in its own process, never does."""
    calls = []
    monkeypatch.setattr(plan._allocator, "rerun_with_jemalloc", lambda: calls.append("rerun"))
    monkeypatch.setattr(plan, "main", lambda argv=None: calls.append("main") or 0)
    assert plan.run_as_program() == 0 and calls == ["rerun", "main"]


def test_a_user_under_the_c_librarys_allocator_hears_of_jemalloc(monkeypatch):
    monkeypatch.setattr(_allocator.sys, "platform", "linux")
    monkeypatch.delenv(_allocator.OPT_OUT, raising=False)
    monkeypatch.setattr(_allocator, "in_use", lambda: "system")
    assert "apt-get install libjemalloc2" in _allocator.suggestion()
    monkeypatch.setenv(_allocator.OPT_OUT, "system")  # asked for it: nothing to say
    assert _allocator.suggestion() is None
    monkeypatch.delenv(_allocator.OPT_OUT)
    monkeypatch.setattr(_allocator, "in_use", lambda: "jemalloc")
    assert _allocator.suggestion() is None


CHILD = ("from losatok_jax import _allocator\n"
         "print(_allocator.in_use(), flush=True)\n"
         "_allocator.rerun_with_jemalloc()\n")


@pytest.mark.skipif(ctypes.util.find_library("jemalloc") is None,
                    reason="jemalloc is not installed (apt-get install libjemalloc2, as .ci/run "
                           "does)")
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_a_process_runs_again_under_jemalloc_once():
    environ = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", _allocator.OPT_OUT)}
    run = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                         env=environ, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["system", "jemalloc"]
    kept = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True,
                          env={**environ, _allocator.OPT_OUT: "system"}, timeout=120)
    assert kept.stdout.split() == ["system"]

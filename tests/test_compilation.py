"""The persistent compilation cache: where it goes, and counting what was compiled or loaded."""

import jax
import jax.numpy as jnp
import pytest

from losatok_jax import compilation


@pytest.fixture
def restore_cache_settings():
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    yield
    for name, value in saved.items():
        jax.config.update(name, value)


def test_no_directory_means_no_cache(monkeypatch, restore_cache_settings):
    monkeypatch.delenv(compilation.CACHE_DIR_ENV, raising=False)
    before = jax.config.jax_compilation_cache_dir
    assert compilation.enable_compilation_cache(None) is None
    assert jax.config.jax_compilation_cache_dir == before


def test_the_environment_variable_names_the_directory(tmp_path, monkeypatch,
                                                      restore_cache_settings):
    monkeypatch.setenv(compilation.CACHE_DIR_ENV, str(tmp_path / "cache"))
    path = compilation.enable_compilation_cache(None)
    assert path == str(tmp_path / "cache") and (tmp_path / "cache").is_dir()
    assert jax.config.jax_compilation_cache_dir == path
    assert jax.config.jax_persistent_cache_min_compile_time_secs == 0.0
    explicit = compilation.enable_compilation_cache(tmp_path / "other")  # the argument wins
    assert explicit == str(tmp_path / "other")


def test_counter_counts_compilations_and_cache_hits(tmp_path, restore_cache_settings):
    compilation.enable_compilation_cache(tmp_path / "cache")
    counter = compilation.CompilationCounter()
    program = jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)  # a program no other test compiles
    program(jnp.ones(7)).block_until_ready()
    assert counter.compiled >= 1
    jax.clear_caches()  # forget the in-memory copy: the next call must come from disk
    loaded_before = counter.loaded
    jax.jit(lambda x: jnp.sin(x) * 3.25 + 0.5)(jnp.ones(7)).block_until_ready()
    assert counter.loaded > loaded_before

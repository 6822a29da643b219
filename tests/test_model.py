"""The model value: `astype` casts only the heavy layers' weights, and the dtype is static."""

import jax
import jax.numpy as jnp
import pytest

import losatok_jax
from losatok_jax._modules import LOW_PRECISION_SCOPES


@pytest.fixture(scope="module")
def model16(model):
    return model.astype("bfloat16")


def _leaves(params):
    return {"/".join(getattr(k, "key", str(k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}


def test_astype_casts_only_the_heavy_kernels(model, model16):
    assert model.dtype == "float32" and model16.dtype == "bfloat16"
    cast = 0
    for name, leaf in _leaves(model16.params).items():
        heavy = name.endswith(("/weight", "/kernel")) and any(
            name.startswith("/".join(scope) + "/") for scope in LOW_PRECISION_SCOPES)
        assert leaf.dtype == (jnp.bfloat16 if heavy else jnp.float32), name
        cast += heavy
    # qkv, proj, fc1, fc2; embed, dwconv, pwconv1, pwconv2; head out.
    assert cast == 9
    weights = [leaf.size for leaf in jax.tree.leaves(model.params)]
    assert sum(x.nbytes for x in jax.tree.leaves(model16.params)) < 4 * sum(weights)


def test_dtype_is_static_and_canonical(model):
    assert model.astype(jnp.bfloat16).dtype == "bfloat16"
    assert losatok_jax.Losatok(model.params, model.config).dtype == "float32"
    back = model.astype("bfloat16").astype("float32")
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(back.params))
    with pytest.raises(ValueError, match="dtype"):
        model.astype("int8")
    # The dtype is part of the treedef, not a leaf: jit specialises on it.
    assert len(jax.tree.leaves(model)) == len(jax.tree.leaves(model.astype("bfloat16")))
    assert jax.tree.structure(model) != jax.tree.structure(model.astype("bfloat16"))

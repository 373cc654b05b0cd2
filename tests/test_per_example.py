"""Per-example gradient norms and vᵀH_b v against explicit loops over the batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from helpers import flat, random_like
from hessfree import per_example_grad_norms, per_example_vhv

RNG = np.random.default_rng(0)
B = 10


PARAMS = {
    "w1": jnp.asarray(RNG.normal(size=(3, 4))),
    "b1": jnp.asarray(RNG.normal(size=(4,))),
    "w2": jnp.asarray(RNG.normal(size=(4,))),
}


def init(dtype=jnp.float64):
    return jax.tree_util.tree_map(lambda leaf: leaf.astype(dtype), PARAMS)


def loss(params, example):
    h = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    return (h @ params["w2"] - example["y"]) ** 2


BATCH = {"x": jnp.asarray(RNG.normal(size=(B, 3))), "y": jnp.asarray(RNG.normal(size=(B,)))}


def example(b):
    return jax.tree_util.tree_map(lambda leaf: leaf[b], BATCH)


@pytest.mark.parametrize("chunk_size", [None, 1, 4, 32])
def test_grad_norms_match_an_explicit_loop(chunk_size):
    params = init()
    expected = [np.linalg.norm(flat(jax.grad(loss)(params, example(b)))) for b in range(B)]
    norms = per_example_grad_norms(loss, params, BATCH, chunk_size=chunk_size)
    assert norms.shape == (B,)
    np.testing.assert_allclose(norms, expected, rtol=1e-12)


def test_grad_norms_under_jit_keep_float32():
    params = init(jnp.float32)
    batch = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float32), BATCH)
    norms = jax.jit(lambda p, d: per_example_grad_norms(loss, p, d, chunk_size=3))(params, batch)
    assert norms.dtype == jnp.float32
    expected = per_example_grad_norms(loss, init(), BATCH)
    np.testing.assert_allclose(norms, expected, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [None, 3])
def test_vhv_matches_dense_per_example_hessians(chunk_size):
    params = init()
    v = random_like(jax.random.PRNGKey(1), params)
    flat_params, unravel = ravel_pytree(params)
    hessian_at = jax.jit(jax.hessian(lambda z, e: loss(unravel(z), e)))
    expected = [
        flat(v) @ np.asarray(hessian_at(flat_params, example(b))) @ flat(v) for b in range(3)
    ]
    got = per_example_vhv(loss, params, BATCH, v, chunk_size=chunk_size)
    assert got.shape == (B,)
    np.testing.assert_allclose(got[:3], expected, rtol=1e-10)


@jax.custom_vjp
def smooth_abs(x):
    return jnp.sqrt(x**2 + 1.0)


smooth_abs.defvjp(lambda x: (smooth_abs(x), x), lambda x, g: (g * x / jnp.sqrt(x**2 + 1.0),))


def test_vhv_through_a_custom_vjp_falls_back_to_hvps():
    def custom_loss(params, example):
        return jnp.sum(smooth_abs(example["x"] @ params["w1"]))

    params = init()
    v = random_like(jax.random.PRNGKey(2), params)
    got = per_example_vhv(custom_loss, params, BATCH, v)

    def plain(params, example):
        return jnp.sum(jnp.sqrt((example["x"] @ params["w1"]) ** 2 + 1.0))

    np.testing.assert_allclose(got, per_example_vhv(plain, params, BATCH, v), rtol=1e-10)


def test_errors_name_the_argument():
    params = init()
    with pytest.raises(ValueError, match="same leading axis B"):
        per_example_grad_norms(loss, params, {"x": BATCH["x"], "y": BATCH["y"][:5]})
    with pytest.raises(
        ValueError, match=r"chunk_size must be an integer in \[1, 2\*\*31 - 1\]; got 0"
    ):
        per_example_grad_norms(loss, params, BATCH, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive integer or None; got float"):
        per_example_vhv(loss, params, BATCH, params, chunk_size=1.5)
    with pytest.raises(ValueError, match="example_loss must return a scalar"):
        per_example_grad_norms(lambda p, e: e["x"] @ p["w1"], params, BATCH)
    with pytest.raises(ValueError, match="example_loss must return a scalar"):
        per_example_vhv(lambda p, e: e["x"] @ p["w1"], params, BATCH, params)
    with pytest.raises(TypeError, match="example_loss must be callable"):
        per_example_grad_norms("loss", params, BATCH)
    with pytest.raises(ValueError, match="v must have the same tree structure as params"):
        per_example_vhv(loss, params, BATCH, {"w1": params["w1"]})
    with pytest.raises(TypeError, match="params must have floating-point leaves"):
        per_example_grad_norms(loss, {"w1": jnp.ones((3, 4), jnp.int32)}, BATCH)


# --- B not a multiple of chunk_size: every entry, the last (short) chunk included ----------

B_ODD = 7
_RNG_ODD = np.random.default_rng(7)
NESTED = {
    "layers": [
        (jnp.asarray(_RNG_ODD.normal(size=(3, 4))), jnp.asarray(_RNG_ODD.normal(size=(4,)))),
    ],
    "head": {"w": jnp.asarray(_RNG_ODD.normal(size=(4, 2))), "scale": jnp.asarray(0.8)},
}
# Every example distinct (and of distinct size), so a misplaced or duplicated row shows.
BATCH_ODD = {
    "x": jnp.asarray(_RNG_ODD.normal(size=(B_ODD, 3)) * np.arange(1, B_ODD + 1)[:, None] / 3),
    "y": jnp.asarray(_RNG_ODD.normal(size=(B_ODD, 2))),
}


def nested_loss(params, ex):
    ((w1, b1),) = params["layers"]
    h = jnp.tanh(ex["x"] @ w1 + b1)
    out = params["head"]["scale"] * (h @ params["head"]["w"])
    return jnp.sum((out - ex["y"]) ** 2) + 0.1 * jnp.sum(jnp.sin(out))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype), tree)


def _example64(b):
    """Example b alone, float64: the reference sees one example at a time, never the batch."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a[b], jnp.float64), BATCH_ODD)


# float32 tolerances: the per-example quantities are O(1)–O(10); float32 carries ~7 digits.
TOL = {jnp.float32: {"rtol": 2e-4, "atol": 1e-4}, jnp.float64: {"rtol": 1e-11, "atol": 1e-12}}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("chunk_size", [3, 5, 10, None])
def test_grad_norms_every_entry_when_b_is_not_a_multiple_of_chunk_size(chunk_size, dtype):
    params = _cast(NESTED, dtype)
    batch = _cast(BATCH_ODD, dtype)
    p64 = _cast(params, jnp.float64)  # the same (rounded) point, evaluated in float64
    grad_one = jax.jit(jax.grad(nested_loss))
    expected = np.array(
        [
            np.linalg.norm(np.asarray(ravel_pytree(grad_one(p64, _example64(b)))[0]))
            for b in range(B_ODD)
        ]
    )
    got = per_example_grad_norms(nested_loss, params, batch, chunk_size=chunk_size)
    assert got.shape == (B_ODD,) and got.dtype == dtype
    assert np.all(np.isfinite(np.asarray(got)))
    np.testing.assert_allclose(np.asarray(got, np.float64), expected, **TOL[dtype])
    # The entries genuinely differ, so a row copied into the short chunk would be caught.
    assert len(np.unique(np.round(expected, 6))) == B_ODD


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("chunk_size", [3, 5, 10, None])
def test_vhv_every_entry_when_b_is_not_a_multiple_of_chunk_size(chunk_size, dtype):
    params = _cast(NESTED, dtype)
    batch = _cast(BATCH_ODD, dtype)
    v = random_like(jax.random.PRNGKey(3), params)
    z, unravel = ravel_pytree(_cast(params, jnp.float64))
    vz = np.asarray(ravel_pytree(_cast(v, jnp.float64))[0])
    hessian_at = jax.jit(jax.hessian(lambda q, ex: nested_loss(unravel(q), ex)))
    expected = np.array([vz @ np.asarray(hessian_at(z, _example64(b))) @ vz for b in range(B_ODD)])
    got = per_example_vhv(nested_loss, params, batch, v, chunk_size=chunk_size)
    assert got.shape == (B_ODD,) and got.dtype == dtype
    assert np.all(np.isfinite(np.asarray(got)))
    scale = np.abs(expected).max()
    tol = TOL[dtype]
    np.testing.assert_allclose(
        np.asarray(got, np.float64), expected, rtol=tol["rtol"], atol=tol["atol"] * scale
    )
    assert len(np.unique(np.round(expected, 6))) == B_ODD


# --- 0.2: the function is `example_loss`; complex tangents and non-array leaves refused ------


def test_example_loss_keyword():
    params = init()
    v = random_like(jax.random.PRNGKey(3), params)
    by_keyword = per_example_grad_norms(example_loss=loss, params=params, batch=BATCH)
    np.testing.assert_allclose(by_keyword, per_example_grad_norms(loss, params, BATCH), rtol=0)
    vhv = per_example_vhv(example_loss=loss, params=params, batch=BATCH, v=v)
    np.testing.assert_allclose(vhv, per_example_vhv(loss, params, BATCH, v), rtol=0)
    with pytest.raises(TypeError, match="loss"):
        per_example_grad_norms(loss=loss, params=params, batch=BATCH)


def test_complex_direction_and_non_array_leaves_are_refused():
    params = init()
    v = jax.tree_util.tree_map(lambda a: a.astype(jnp.complex128), params)
    with pytest.raises(TypeError, match=r"v must have floating-point leaves.*complex"):
        per_example_vhv(loss, params, BATCH, v)
    with_fn = {**params, "act": jnp.tanh}
    hint = r"params must be a pytree of arrays; leaf \['act'\].*eqx\.partition.*nnx\.split"
    with pytest.raises(TypeError, match=hint):
        per_example_grad_norms(loss, with_fn, BATCH)
    with pytest.raises(TypeError, match=hint):
        per_example_vhv(loss, with_fn, BATCH, with_fn)

"""over_batches: curvature of data in batches equals the operator on the concatenated data."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessfree as hf
from helpers import count_compiles, flat, random_like


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def make(dtype=jnp.float64, n=23, d=4, h=5, c=3, seed=0):
    k = jax.random.split(jax.random.key(seed), 6)
    p = {
        "w1": jax.random.normal(k[0], (d, h), dtype) / 2,
        "b1": jax.random.normal(k[1], (h,), dtype) / 4,
        "w2": jax.random.normal(k[2], (h, c), dtype) / 2,
        "b2": jnp.zeros((c,), dtype),
    }
    X = jax.random.normal(k[3], (n, d), dtype)
    labels = jax.random.randint(k[4], (n,), 0, c)
    Y = jax.random.normal(k[5], (n, c), dtype)
    return p, X, labels, Y


def split(arrays, cuts):
    edges = [0, *cuts, arrays[0].shape[0]]
    return [tuple(a[s:e] for a in arrays) for s, e in itertools.pairwise(edges)]


def ce_loss(p, X, labels):
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(mlp(p, X)), labels[:, None], 1))


def build_ggn(p, b):
    return hf.ggn(mlp, "softmax_cross_entropy", p, b[0], b[1])


def build_mse(p, b):
    return hf.ggn(mlp, "mse", p, b[0], b[1])


def build_hessian(p, b):
    return hf.hessian(ce_loss, p, b[0], b[1])


def build_fisher(p, b):
    return hf.fisher(mlp, p, b[0], likelihood="categorical")


@pytest.mark.parametrize(
    ("build", "whole"),
    [
        (build_ggn, lambda p, X, lab, Y: hf.ggn(mlp, "softmax_cross_entropy", p, X, lab)),
        (build_hessian, lambda p, X, lab, Y: hf.hessian(ce_loss, p, X, lab)),
        (build_fisher, lambda p, X, lab, Y: hf.fisher(mlp, p, X, likelihood="categorical")),
    ],
)
@pytest.mark.parametrize("cuts", [[10], [8, 16], [5, 6, 20]])
def test_unequal_batches_equal_the_concatenated_operator(build, whole, cuts):
    p, X, labels, Y = make()
    op = hf.over_batches(build, p, split((X, labels), cuts))
    ref = whole(p, X, labels, Y).to_dense()
    np.testing.assert_allclose(op.to_dense(), ref, rtol=1e-12, atol=1e-13)
    assert op.label.endswith(f"over {len(cuts) + 1} batches")


def test_mse_batches_and_stacked_form():
    p, X, _, Y = make(n=24)
    ref = hf.ggn(mlp, "mse", p, X, Y).to_dense()
    listed = hf.over_batches(build_mse, p, split((X, Y), [6, 12, 18]))
    stacked = hf.over_batches(
        build_mse, p, (X.reshape(4, 6, -1), Y.reshape(4, 6, -1)), stacked=True
    )
    np.testing.assert_allclose(listed.to_dense(), ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(stacked.to_dense(), ref, rtol=1e-12, atol=1e-13)
    assert listed.psd and stacked.psd


def test_an_iterator_and_explicit_sizes():
    p, X, _, Y = make(n=20)
    parts = split((X, Y), [5])
    gen = (b for b in parts)
    op = hf.over_batches(build_mse, p, gen)
    ref = hf.ggn(mlp, "mse", p, X, Y).to_dense()
    np.testing.assert_allclose(op.to_dense(), ref, rtol=1e-12, atol=1e-13)
    # sizes given explicitly: equal weights make the plain mean of the two batch operators
    eq = hf.over_batches(build_mse, p, parts, sizes=[1, 1]).to_dense()
    mean = 0.5 * (build_mse(p, parts[0]).to_dense() + build_mse(p, parts[1]).to_dense())
    np.testing.assert_allclose(eq, mean, rtol=1e-12, atol=1e-13)


@pytest.mark.slow
def test_algorithms_damping_and_float32():
    p, X, labels, _ = make(n=30)
    parts = split((X, labels), [12, 24])
    op = hf.over_batches(build_ggn, p, parts)
    dense = np.asarray(hf.ggn(mlp, "softmax_cross_entropy", p, X, labels).to_dense())
    top = hf.eigsh(op, 1, key=jax.random.key(0)).eigenvalues[-1]
    np.testing.assert_allclose(top, np.linalg.eigvalsh(dense)[-1], rtol=1e-7)
    b = random_like(jax.random.key(1), p)
    x = hf.cg(op + 0.1, b, rtol=1e-10).x
    np.testing.assert_allclose(
        flat(x), np.linalg.solve(dense + 0.1 * np.eye(len(dense)), flat(b)), rtol=1e-7
    )
    p32, X32, lab32, _ = make(jnp.float32, n=30)
    op32 = hf.over_batches(build_ggn, p32, split((X32, lab32), [12, 24]))
    out = op32.mv(p32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(out))
    ref32 = hf.ggn(mlp, "softmax_cross_entropy", p32, X32, lab32).mv(p32)
    np.testing.assert_allclose(flat(out), flat(ref32), rtol=2e-5, atol=1e-6)


def test_new_params_compile_nothing_with_and_without_jit():
    p, X, labels, _ = make(n=30)
    parts = split((X, labels), [12, 24])
    v = random_like(jax.random.key(2), p)

    @jax.jit
    def step(p, parts, v):
        return hf.over_batches(build_ggn, p, parts).mv(v)

    for i in range(3):
        q = jax.tree_util.tree_map(lambda a, i=i: a + 0.01 * i, p)
        with count_compiles() as eager:
            hf.over_batches(build_ggn, q, parts).mv(v)
        with count_compiles() as jitted:
            step(q, parts, v)
        if i:
            assert eager == [] and jitted == []


def test_grad_and_vmap_through_products():
    p, X, _, Y = make(n=12)
    parts = split((X, Y), [6])
    v = random_like(jax.random.key(3), p)

    def vGv(scale):
        q = jax.tree_util.tree_map(lambda a: scale * a, p)
        out = hf.over_batches(build_mse, q, parts).mv(v)
        return sum(
            jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(out), strict=True)
        )

    def vGv_ref(scale):
        q = jax.tree_util.tree_map(lambda a: scale * a, p)
        out = hf.ggn(mlp, "mse", q, X, Y).mv(v)
        return sum(
            jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(out), strict=True)
        )

    np.testing.assert_allclose(jax.grad(vGv)(1.3), jax.grad(vGv_ref)(1.3), rtol=1e-10)
    scales = jnp.array([0.5, 1.0, 2.0])
    np.testing.assert_allclose(jax.vmap(vGv)(scales), jax.vmap(vGv_ref)(scales), rtol=1e-10)


def test_bad_input_is_named():
    p, X, _, Y = make(n=12)
    with pytest.raises(TypeError, match="build must be callable"):
        hf.over_batches("ggn", p, [(X, Y)])
    with pytest.raises(TypeError, match=r"batches must be a list.*tuple of arrays"):
        hf.over_batches(build_mse, p, (X, Y))
    with pytest.raises(TypeError, match="batches must be a list"):
        hf.over_batches(build_mse, p, X)
    with pytest.raises(ValueError, match="at least one batch"):
        hf.over_batches(build_mse, p, [])
    with pytest.raises(TypeError, match="one pytree structure"):
        hf.over_batches(build_mse, p, [(X, Y), {"x": X, "y": Y}])
    with pytest.raises(ValueError, match="sizes must give one positive size per batch"):
        hf.over_batches(build_mse, p, [(X, Y)], sizes=[3, 4])
    with pytest.raises(ValueError, match="sizes must give one positive size per batch"):
        hf.over_batches(build_mse, p, [(X, Y)], sizes=[0])
    with pytest.raises(ValueError, match="leading batch axis"):
        hf.over_batches(build_mse, p, [(jnp.float64(1.0), Y)])
    with pytest.raises(TypeError, match="build must return a CurvatureOperator"):
        hf.over_batches(lambda p, b: b, p, [(X, Y)])
    with pytest.raises(TypeError, match="params must be a pytree of arrays"):
        hf.over_batches(build_mse, {"w": "a"}, [(X, Y)])

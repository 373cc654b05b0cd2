"""eigsh on real model Hessians and the products inside Krylov loops, against references.

``loop_product`` rewrites convolutions for XLA:CPU loops: it must compute the same product,
and eigsh/spectral_density through it the same answers as on the dense Hessian.
"""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg as sla
from jax.flatten_util import ravel_pytree

import hessfree
from hessfree._cli.workloads import mlp_classifier
from hessfree._krylov import _slow_convs, loop_product, pseudo_random

KEY = jax.random.PRNGKey(3)


def wanted(eigenvalues, k, which):
    order = {"LA": -eigenvalues, "SA": eigenvalues, "LM": -np.abs(eigenvalues)}[which]
    return np.sort(eigenvalues[np.argsort(order)[:k]])


def test_an_mlp_hessian_pytree_matches_arpack():
    """~13k parameters in a pytree, float64, vs ARPACK at tol 1e-12 on as_scipy()."""
    w = mlp_classifier(sizes=(64, 160, 16, 10), batch=64, dtype=jnp.float64)
    op = hessfree.hessian(w.f, w.x, *w.args)
    k = 5
    res = hessfree.eigsh(op, k, key=KEY, tol=1e-8)
    assert bool(res.success), res.message
    ref = sla.eigsh(op.as_scipy(), k, which="LA", tol=1e-12, return_eigenvectors=False)
    np.testing.assert_allclose(np.asarray(res.eigenvalues), np.sort(ref), rtol=1e-7)
    flat_vectors = jax.vmap(lambda v: ravel_pytree(v)[0])(res.eigenvectors)
    hv = jax.vmap(lambda v: ravel_pytree(op.mv(v))[0])(res.eigenvectors)
    residual = np.linalg.norm(hv - flat_vectors * res.eigenvalues[:, None], axis=1)
    assert np.all(residual <= 1e-7 * np.abs(np.asarray(res.eigenvalues)))
    np.testing.assert_allclose(flat_vectors @ flat_vectors.T, np.eye(k), atol=1e-7)


# --- products inside loops: convolutions in a layout XLA:CPU loops handle badly ---------------


def cnn_loss(params, x, y):
    """A CNN in PyTorch's layout (NCHW input, OIHW kernels): two 3x3 convs and a dense head."""
    h = jax.lax.conv_general_dilated(x, params["c1"], (1, 1), "SAME")
    h = jnp.tanh(h)
    h = jax.lax.conv_general_dilated(h, params["c2"], (2, 2), "VALID")
    h = jnp.tanh(h).reshape(x.shape[0], -1)
    logits = h @ params["w"]
    return jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.take_along_axis(logits, y, 1)[:, 0])


def cnn_problem():
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    params = {
        "c1": 0.5 * jax.random.normal(k[0], (4, 2, 3, 3)),
        "c2": 0.3 * jax.random.normal(k[1], (3, 4, 3, 3)),
        "w": 0.2 * jax.random.normal(k[2], (3 * 3 * 3, 5)),
    }
    x = jax.random.normal(k[3], (6, 2, 8, 8))
    y = jax.random.randint(k[4], (6, 1), 0, 5)
    return params, x, y


def assert_trees_close(got, ref, **tolerances):
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(ref)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, **tolerances), got, ref)


def test_loop_product_detects_non_nhwc_convolutions():
    params, x, y = cnn_problem()
    op = hessfree.hessian(cnn_loss, params, x, y)
    assert _slow_convs(jax.make_jaxpr(op.mv)(params).jaxpr)
    mlp = mlp_classifier(sizes=(8, 4, 3), batch=4, dtype=jnp.float64)
    mlp_op = hessfree.hessian(mlp.f, mlp.x, *mlp.args)
    assert not _slow_convs(jax.make_jaxpr(mlp_op.mv)(mlp.x).jaxpr)


def test_loop_product_computes_the_same_product_in_and_out_of_loops():
    params, x, y = cnn_problem()
    op = hessfree.hessian(cnn_loss, params, x, y)
    v = pseudo_random(1, params)
    product = loop_product(op.mv)
    ref = op.mv(v)
    for got in (product(v), jax.jit(product)(v)):
        assert_trees_close(got, ref, rtol=1e-12, atol=1e-14)

    def power(v):  # the rewritten product inside a loop, as eigsh uses it
        return jax.lax.fori_loop(0, 3, lambda _, u: product(u), v)

    def plain_power(v):
        for _ in range(3):
            v = op.mv(v)
        return v

    assert_trees_close(jax.jit(power)(v), plain_power(v), rtol=1e-10, atol=1e-12)


def test_eigsh_on_a_cnn_hessian_matches_the_dense_hessian():
    params, x, y = cnn_problem()
    flat0, unravel = ravel_pytree(params)
    dense = jax.hessian(lambda p: cnn_loss(unravel(p), x, y))(flat0)
    spectrum = np.linalg.eigvalsh(np.asarray(dense))
    op = hessfree.hessian(cnn_loss, params, x, y)
    res = hessfree.eigsh(op, 3, which="LM", key=KEY, tol=1e-9)
    assert bool(res.success), res.message
    np.testing.assert_allclose(res.eigenvalues, wanted(spectrum, 3, "LM"), rtol=1e-8)

    # spectral_density through the rewritten product equals the density of the dense matrix
    # (the same flat probes, so the same quadrature up to rounding)
    def flat_mv(v):
        return ravel_pytree(op.mv(unravel(v)))[0]

    got = hessfree.spectral_density(flat_mv, like=flat0, num_probes=2, num_steps=30, key=KEY)
    ref = hessfree.spectral_density(dense, num_probes=2, num_steps=30, key=KEY)
    np.testing.assert_allclose(got.grid, ref.grid, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(got.density, ref.density, rtol=1e-6, atol=1e-8 * ref.density.max())


def test_pseudo_random_is_deterministic_balanced_and_keeps_dtypes():
    like = {"a": jnp.zeros((300, 7), jnp.float32), "b": jnp.zeros(5000)}
    u1, u2 = pseudo_random(5, like, 2), pseudo_random(5, like, 2)
    other = pseudo_random(5, like, 3)
    signs = pseudo_random(5, like, 2, signs=True)
    assert u1["a"].dtype == jnp.float32 and u1["b"].dtype == jnp.float64
    np.testing.assert_array_equal(u1["b"], u2["b"])
    assert not np.allclose(u1["b"], other["b"])
    b = np.asarray(u1["b"])
    assert -1 <= b.min() and b.max() < 1 and abs(b.mean()) < 0.05 and abs(b.var() - 1 / 3) < 0.02
    s = np.asarray(signs["a"]).ravel()
    assert set(np.unique(s)) == {-1.0, 1.0} and abs(s.mean()) < 0.05
    # another seed, or another counter, gives an uncorrelated draw
    for seed, counter in ((6, 2), (5, 3)):
        t = np.asarray(pseudo_random(seed, like, counter, signs=True)["a"]).ravel()
        assert abs(np.mean(s * t)) < 0.05
    # leaves are not copies of each other
    assert not np.allclose(np.asarray(u1["a"]).ravel()[:100], b[:100])

"""Implicit differentiation of cg (issue 10): ``dx = A⁻¹(db − dA·x)``, one more CG solve.

Gradients with respect to b and to the arrays inside A (a dense matrix, a CurvatureOperator's
leaves, a ``jax.tree_util.Partial``'s arrays), checked against ``jnp.linalg.solve``,
unrolled differentiation of a fixed-iteration CG, and finite differences, in float32 and
float64, with ``grad``, ``jacrev``, ``jvp``, under ``jit`` and ``vmap``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

import hessfree as hf

DTYPES = [jnp.float32, jnp.float64]
RTOL = {jnp.float32: 2e-3, jnp.float64: 1e-8}
CG_RTOL = {jnp.float32: 1e-6, jnp.float64: 1e-12}


def spd(n: int, seed: int, cond: float = 10.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


def unrolled_cg(a: jax.Array, b: jax.Array, steps: int) -> jax.Array:
    """Plain CG for a fixed number of steps, differentiable by unrolling."""
    x = jnp.zeros_like(b)
    r = b
    p = r
    rr = r @ r
    for _ in range(steps):
        ap = a @ p
        alpha = rr / (p @ ap)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = r @ r
        p = r + rr_new / rr * p
        rr = rr_new
    return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_wrt_b_and_dense_a_matches_linalg_solve(dtype):
    n = 5
    a = jnp.asarray(spd(n, 0), dtype)
    b = jnp.asarray(np.random.default_rng(1).normal(size=n), dtype)
    w = jnp.asarray(np.random.default_rng(2).normal(size=n), dtype)
    rt = CG_RTOL[dtype]

    def loss_cg(a, b):
        return jnp.sum(w * hf.cg(a, b, rtol=rt).x ** 2)

    def loss_ref(a, b):
        return jnp.sum(w * jnp.linalg.solve(a, b) ** 2)

    ga, gb = jax.grad(loss_cg, argnums=(0, 1))(a, b)
    ra, rb = jax.grad(loss_ref, argnums=(0, 1))(a, b)
    assert ga.dtype == dtype and gb.dtype == dtype
    np.testing.assert_allclose(gb, rb, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    np.testing.assert_allclose(ga, ra, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    # unrolled differentiation of n exact-arithmetic CG steps agrees too (float64: CG is
    # exact after n steps)
    if dtype == jnp.float64:
        ua, ub = jax.grad(lambda a, b: jnp.sum(w * unrolled_cg(a, b, n) ** 2), argnums=(0, 1))(a, b)
        np.testing.assert_allclose(gb, ub, rtol=1e-6)
        # CG only sees symmetric A: compare along symmetric perturbations
        sym = lambda g: (g + g.T) / 2  # noqa: E731
        np.testing.assert_allclose(sym(ga), sym(ua), rtol=1e-6, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_jacrev_and_jacfwd_wrt_b_are_the_inverse(dtype):
    a = jnp.asarray(spd(4, 3), dtype)
    b = jnp.ones(4, dtype)
    inv = np.linalg.inv(np.asarray(a, np.float64))
    f = lambda b: hf.cg(a, b, rtol=CG_RTOL[dtype]).x  # noqa: E731
    np.testing.assert_allclose(jax.jacrev(f)(b), inv, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    np.testing.assert_allclose(jax.jacfwd(f)(b), inv, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    # jvp wrt A: d(A⁻¹b)[dA] = −A⁻¹ dA A⁻¹ b
    da = jnp.asarray(spd(4, 4), dtype)
    _, dx = jax.jvp(lambda a: hf.cg(a, b, rtol=CG_RTOL[dtype]).x, (a,), (da,))
    want = -inv @ np.asarray(da, np.float64) @ inv @ np.ones(4)
    np.testing.assert_allclose(dx, want, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_pytree_b_with_partial_operator_arrays(dtype):
    a1 = jnp.asarray(spd(3, 5), dtype)
    d2 = jnp.asarray([1.0, 2.0, 4.0, 8.0], dtype)

    def apply(mats, v):
        m, d = mats
        return {"u": m @ v["u"], "v": d * v["v"]}

    b = {"u": jnp.asarray([1.0, -2.0, 0.5], dtype), "v": jnp.asarray([1.0, 1.0, 2.0, 3.0], dtype)}

    def loss(mats, b):
        op = Partial(apply, mats)
        x = hf.cg(op, b, rtol=CG_RTOL[dtype]).x
        return jnp.sum(x["u"] ** 3) + jnp.sum(jnp.sin(x["v"]))

    def ref(mats, b):
        m, d = mats
        xu, xv = jnp.linalg.solve(m, b["u"]), b["v"] / d
        return jnp.sum(xu**3) + jnp.sum(jnp.sin(xv))

    g_mats, g_b = jax.grad(loss, argnums=(0, 1))((a1, d2), b)
    r_mats, r_b = jax.grad(ref, argnums=(0, 1))((a1, d2), b)
    for got, want in zip(
        jax.tree_util.tree_leaves((g_mats, g_b)),
        jax.tree_util.tree_leaves((r_mats, r_b)),
        strict=True,
    ):
        assert got.dtype == dtype
        np.testing.assert_allclose(got, want, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    # jacrev of the pytree solution wrt the pytree b
    jac = jax.jacrev(lambda b: hf.cg(Partial(apply, (a1, d2)), b, rtol=CG_RTOL[dtype]).x)(b)
    np.testing.assert_allclose(
        jac["v"]["v"], np.diag(1 / np.asarray(d2)), rtol=RTOL[dtype], atol=1e-6
    )
    np.testing.assert_allclose(jac["u"]["v"], np.zeros((3, 4)), atol=1e-6)
    np.testing.assert_allclose(
        jac["u"]["u"],
        np.linalg.inv(np.asarray(a1, np.float64)),
        rtol=RTOL[dtype],
        atol=RTOL[dtype] * 1e-2,
    )


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_through_a_curvature_operator_matches_dense_hessian(dtype):
    c = jnp.asarray(spd(4, 7), dtype)

    def f(x):  # Hessian c + diag(x²)·3 ... positive definite near x
        return 0.5 * x @ c @ x + jnp.sum(x**4) / 4

    x = jnp.asarray([0.3, -0.2, 0.5, 0.1], dtype)
    b = jnp.asarray([1.0, 2.0, -1.0, 0.5], dtype)

    def loss(x, b):
        return jnp.sum(hf.cg(hf.hessian(f, x), b, rtol=CG_RTOL[dtype]).x ** 2)

    def ref(x, b):
        return jnp.sum(jnp.linalg.solve(jax.hessian(f)(x), b) ** 2)

    gx, gb = jax.grad(loss, argnums=(0, 1))(x, b)
    rx, rb = jax.grad(ref, argnums=(0, 1))(x, b)
    np.testing.assert_allclose(gb, rb, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    np.testing.assert_allclose(gx, rx, rtol=RTOL[dtype] * 5, atol=RTOL[dtype] * 1e-2)
    # a damped, scaled operator too (its scalars are leaves)
    g_damp = jax.grad(lambda lam: jnp.sum(hf.cg(hf.hessian(f, x) + lam, b, rtol=CG_RTOL[dtype]).x))(
        jnp.asarray(0.5, dtype)
    )
    want = jax.grad(
        lambda lam: jnp.sum(jnp.linalg.solve(jax.hessian(f)(x) + lam * jnp.eye(4, dtype=dtype), b))
    )(jnp.asarray(0.5, dtype))
    np.testing.assert_allclose(g_damp, want, rtol=RTOL[dtype])


def test_finite_differences_float64():
    a = jnp.asarray(spd(6, 11, cond=50.0))
    b = jnp.asarray(np.random.default_rng(12).normal(size=6))
    da = jnp.asarray(spd(6, 13))
    db = jnp.asarray(np.random.default_rng(14).normal(size=6))

    def g(t):
        return jnp.sum(jnp.tanh(hf.cg(a + t * da, b + t * db, rtol=1e-13).x))

    eps = 1e-6
    fd = (float(g(eps)) - float(g(-eps))) / (2 * eps)
    ad = float(jax.grad(g)(0.0))
    assert abs(ad - fd) <= 1e-6 * max(1.0, abs(fd))
    _, tangent = jax.jvp(g, (0.0,), (1.0,))
    assert abs(float(tangent) - fd) <= 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("dtype", DTYPES)
def test_x0_does_not_change_the_derivative_and_gets_none(dtype):
    a = jnp.asarray(spd(5, 15), dtype)
    b = jnp.asarray(np.random.default_rng(16).normal(size=5), dtype)
    x0 = jnp.asarray(np.random.default_rng(17).normal(size=5) * 100, dtype)

    def loss(a, b, x0):
        return jnp.sum(hf.cg(a, b, x0=x0, rtol=CG_RTOL[dtype]).x ** 2)

    ga, gb, gx0 = jax.grad(loss, argnums=(0, 1, 2))(a, b, x0)
    ra, rb = jax.grad(lambda a, b: jnp.sum(jnp.linalg.solve(a, b) ** 2), argnums=(0, 1))(a, b)
    np.testing.assert_allclose(gb, rb, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    np.testing.assert_allclose(ga, ra, rtol=RTOL[dtype], atol=RTOL[dtype] * 1e-2)
    np.testing.assert_array_equal(gx0, np.zeros(5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_status_fields_are_not_differentiated_and_jit_vmap_work(dtype):
    a = jnp.asarray(spd(4, 18), dtype)
    bs = jnp.asarray(np.random.default_rng(19).normal(size=(3, 4)), dtype)

    def loss(b):
        res = hf.cg(a, b, rtol=CG_RTOL[dtype])
        # residual_norm and status ride along without a derivative
        return jnp.sum(res.x) + res.residual_norm + res.status.astype(dtype)

    grads = jax.jit(jax.vmap(jax.grad(loss)))(bs)
    want = np.linalg.solve(np.asarray(a, np.float64), np.ones(4))  # A⁻¹1 (A symmetric)
    np.testing.assert_allclose(grads, np.broadcast_to(want, (3, 4)), rtol=RTOL[dtype])
    res = jax.vmap(lambda b: hf.cg(a, b))(bs)
    assert bool(jnp.all(res.success))

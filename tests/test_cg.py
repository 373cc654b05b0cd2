"""cg and Steihaug-Toint CG against dense numpy solves, on pytrees, under jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from hessfree import CGResult, cg
from hessfree._cg import steihaug


def spd(n: int, seed: int = 0, cond: float = 100.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    return (q * np.geomspace(1.0, cond, n)) @ q.T


class DenseOp:
    """An operator-like object: only mv (no in_structure), as cg must accept."""

    def __init__(self, a):
        self.a = jnp.asarray(a)

    def mv(self, v):
        return self.a @ v


def test_dense_spd_matches_numpy_solve():
    a, b = spd(30), np.random.default_rng(1).normal(size=30)
    res = cg(jnp.asarray(a), jnp.asarray(b), rtol=1e-12)
    assert isinstance(res, CGResult)
    assert bool(res.converged) and not bool(res.negative_curvature)
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res.residual_norm, np.linalg.norm(b - a @ res.x), atol=1e-9)
    assert res.residual_norm <= 1e-12 * np.linalg.norm(b)


def test_preconditioner_on_badly_scaled_matrix():
    s = np.geomspace(1e-3, 1e3, 40)
    a = s[:, None] * spd(40, seed=2, cond=10.0) * s[None, :]
    b = np.random.default_rng(3).normal(size=40)
    plain = cg(jnp.asarray(a), jnp.asarray(b), rtol=1e-10, maxiter=2000)
    jacobi = cg(DenseOp(a), jnp.asarray(b), rtol=1e-10, M=lambda v: v / jnp.diag(a))
    dense_m = cg(jnp.asarray(a), jnp.asarray(b), rtol=1e-10, M=jnp.diag(1 / np.diag(a)))
    exact = np.linalg.solve(a, b)
    for res in (jacobi, dense_m):
        assert bool(res.converged)
        np.testing.assert_allclose(res.x, exact, rtol=1e-6)
    assert int(jacobi.iterations) < int(plain.iterations) // 4
    assert int(jacobi.iterations) == int(dense_m.iterations)


def test_pytree_rhs_with_callable_operator():
    a = spd(5, seed=4)
    bmat = np.diag([1.0, 2.0, 3.0])

    def matvec(v):
        return {"w": jnp.asarray(a) @ v["w"], "b": jnp.asarray(bmat) @ v["b"]}

    rhs = {"w": jnp.arange(5.0), "b": jnp.ones(3)}
    res = cg(matvec, rhs, rtol=1e-12, M=lambda v: jax.tree_util.tree_map(lambda x: 0.5 * x, v))
    assert jax.tree_util.tree_structure(res.x) == jax.tree_util.tree_structure(rhs)
    np.testing.assert_allclose(res.x["w"], np.linalg.solve(a, np.arange(5.0)), rtol=1e-9)
    np.testing.assert_allclose(res.x["b"], [1.0, 0.5, 1 / 3], rtol=1e-9)


def test_x0_atol_and_maxiter():
    a, b = spd(20, seed=5, cond=1e4), np.ones(20)
    exact = np.linalg.solve(a, b)
    warm = cg(jnp.asarray(a), jnp.asarray(b), x0=jnp.asarray(exact), rtol=1e-8)
    assert int(warm.iterations) <= 1 and bool(warm.converged)
    loose = cg(jnp.asarray(a), jnp.asarray(b), rtol=0.0, atol=1e-2)
    assert bool(loose.converged) and float(loose.residual_norm) <= 1e-2
    capped = cg(jnp.asarray(a), jnp.asarray(b), rtol=1e-14, maxiter=3)
    assert int(capped.iterations) == 3 and not bool(capped.converged)


def test_indefinite_stops_and_flags_negative_curvature():
    a = np.diag([1.0, 2.0, -3.0, 4.0])
    res = cg(jnp.asarray(a), jnp.ones(4))
    assert bool(res.negative_curvature) and not bool(res.converged)
    assert np.all(np.isfinite(res.x))
    # x is the last iterate before the bad direction: a descent direction for ½xᵀAx − bᵀx
    if int(res.iterations) > 0:
        assert float(0.5 * res.x @ a @ res.x - res.x.sum()) < 0
    first = cg(jnp.asarray(-np.eye(3)), jnp.ones(3))
    assert bool(first.negative_curvature) and int(first.iterations) == 0
    np.testing.assert_array_equal(first.x, np.zeros(3))
    # symmetric indefinite but with pᵀAp > 0 all along: CG still solves it
    b = np.diag([3.0, -1.0])
    ok = cg(jnp.asarray(b), jnp.array([1.0, 0.1]), rtol=1e-12)
    if not bool(ok.negative_curvature):
        np.testing.assert_allclose(ok.x, np.linalg.solve(b, [1.0, 0.1]), rtol=1e-9)


def test_nonfinite_product_stops_with_finite_iterate():
    a = jnp.array([[2.0, 1.0], [1.0, 2.0]])

    def matvec(v):  # NaN for any direction with a negative entry (the second CG direction)
        return jnp.where(jnp.all(v >= 0), 1.0, jnp.nan) * (a @ v)

    res = cg(matvec, jnp.array([1.0, 0.2]), x0=jnp.zeros(2))
    assert np.all(np.isfinite(res.x)) and not bool(res.converged)
    assert int(res.iterations) == 1 and np.isfinite(float(res.residual_norm))


def test_jit_vmap_and_float32():
    a = jnp.asarray(spd(8, seed=6))
    bs = jnp.asarray(np.random.default_rng(7).normal(size=(8, 8)))
    solve = jax.jit(jax.vmap(lambda b: cg(a, b, rtol=1e-10)))
    res = solve(bs)
    np.testing.assert_allclose(res.x, np.linalg.solve(np.asarray(a), np.asarray(bs).T).T, rtol=1e-7)
    assert res.iterations.shape == (8,) and bool(jnp.all(res.converged))
    r32 = cg(a.astype(jnp.float32), bs[0].astype(jnp.float32), rtol=1e-5)
    assert r32.x.dtype == jnp.float32 and r32.residual_norm.dtype == jnp.float32
    np.testing.assert_allclose(r32.x, np.linalg.solve(np.asarray(a), np.asarray(bs[0])), rtol=1e-3)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"b": jnp.arange(3)}, TypeError, "floating"),
        ({"x0": jnp.zeros(4)}, ValueError, "x0 must match the shapes of b"),
        ({"x0": {"a": jnp.zeros(3)}}, ValueError, "x0 must have the same tree structure as b"),
        ({"rtol": -1.0}, ValueError, "rtol must be a finite number >= 0"),
        ({"atol": float("nan")}, ValueError, "atol must be a finite number >= 0"),
        ({"maxiter": 0}, ValueError, "maxiter must be a positive integer"),
        ({"A": "matrix"}, TypeError, "A must be a CurvatureOperator, a callable"),
        ({"A": jnp.ones((3, 2))}, ValueError, "must be square"),
        ({"A": jnp.eye(4)}, ValueError, "b must be a 1-D array of length 4"),
        ({"M": 3}, TypeError, "M must be a CurvatureOperator, a callable"),
    ],
)
def test_errors(kwargs, error, match):
    call = {"A": jnp.eye(3), "b": jnp.ones(3)} | kwargs
    with pytest.raises(error, match=match):
        cg(call.pop("A"), call.pop("b"), **call)


# --- Steihaug-Toint ----------------------------------------------------------------------


def _steihaug(a, g, radius, precond=lambda v: v, tol=1e-12):
    a = jnp.asarray(a)
    return steihaug(lambda v: a @ v, jnp.asarray(g), jnp.asarray(radius), precond, tol, 50)


def test_steihaug_interior_is_newton_step_and_model_is_exact():
    a, g = spd(6, seed=8), np.arange(1.0, 7.0)
    newton = -np.linalg.solve(a, g)
    out = _steihaug(a, g, 2 * np.linalg.norm(newton))
    assert not bool(out.hits_boundary)
    np.testing.assert_allclose(out.s, newton, rtol=1e-8)
    np.testing.assert_allclose(out.model, g @ newton + 0.5 * newton @ a @ newton, rtol=1e-10)


def test_steihaug_boundary_and_negative_curvature():
    a, g = spd(6, seed=9), np.ones(6)
    out = _steihaug(a, g, 0.01)
    assert bool(out.hits_boundary)
    np.testing.assert_allclose(np.linalg.norm(out.s), 0.01, rtol=1e-10)
    s = np.asarray(out.s)
    np.testing.assert_allclose(out.model, g @ s + 0.5 * s @ a @ s, rtol=1e-10)
    indefinite = np.diag([1.0, -2.0, 3.0])
    out = _steihaug(indefinite, np.array([1.0, 1.0, 1.0]), 5.0)
    assert bool(out.hits_boundary) and bool(out.negative_curvature)
    s = np.asarray(out.s)
    np.testing.assert_allclose(np.linalg.norm(s), 5.0, rtol=1e-10)
    np.testing.assert_allclose(out.model, s.sum() + 0.5 * s @ indefinite @ s, rtol=1e-10)
    assert float(out.model) < 0


def test_steihaug_preconditioned_norm():
    d = np.geomspace(1.0, 100.0, 5)
    a = np.diag(d) + 0.1
    g = np.ones(5)
    out = _steihaug(a, g, 0.05, precond=lambda v: v / jnp.asarray(d))
    s = np.asarray(out.s)
    assert bool(out.hits_boundary)
    np.testing.assert_allclose(np.sqrt(s @ (d * s)), 0.05, rtol=1e-9)
    np.testing.assert_allclose(out.step_norm, 0.05, rtol=1e-9)
    np.testing.assert_allclose(out.model, g @ s + 0.5 * s @ a @ s, rtol=1e-9)


def test_pytree_flat_equivalence():
    a = spd(7, seed=10)
    tree = {"a": jnp.ones(3), "b": jnp.ones((2, 2))}
    flat, unravel = ravel_pytree(tree)

    def matvec(v):
        return unravel(jnp.asarray(a) @ ravel_pytree(v)[0])

    res = cg(matvec, tree, rtol=1e-12)
    np.testing.assert_allclose(
        ravel_pytree(res.x)[0], np.linalg.solve(a, np.asarray(flat)), rtol=1e-9
    )

"""cg and Steihaug-Toint CG against dense numpy solves, on pytrees, under jit and vmap."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessfree
from hessfree import STATUS_MESSAGES, CGResult, cg
from hessfree._minimize._trust import steihaug
from hessfree._staging import cache_size


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
    assert bool(res.success) and int(res.status) == 0 and not bool(res.negative_curvature)
    assert res.message == STATUS_MESSAGES[0]
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res.residual_norm, np.linalg.norm(b - a @ res.x), atol=1e-9)
    assert res.residual_norm <= 1e-12 * np.linalg.norm(b)


def test_preconditioner_on_badly_scaled_matrix():
    s = np.geomspace(1e-3, 1e3, 40)
    a = s[:, None] * spd(40, seed=2, cond=10.0) * s[None, :]
    b = np.random.default_rng(3).normal(size=40)
    plain = cg(jnp.asarray(a), jnp.asarray(b), rtol=1e-10, maxiter=2000)
    inv_diag = jnp.asarray(1 / np.diag(a))  # Jacobi, as a callable and as a dense matrix
    jacobi = cg(lambda v: jnp.asarray(a) @ v, jnp.asarray(b), rtol=1e-10, M=lambda v: v * inv_diag)
    dense_m = cg(jnp.asarray(a), jnp.asarray(b), rtol=1e-10, M=jnp.diag(inv_diag))
    exact = np.linalg.solve(a, b)
    for res in (jacobi, dense_m):
        assert bool(res.success)
        np.testing.assert_allclose(res.x, exact, rtol=1e-6)
    assert int(jacobi.num_matvecs) < int(plain.num_matvecs) // 4
    assert int(jacobi.num_matvecs) == int(dense_m.num_matvecs)


def test_operator_with_only_mv_is_accepted():
    a, b = spd(12, seed=13), np.random.default_rng(14).normal(size=12)
    res = cg(DenseOp(a), jnp.asarray(b), rtol=1e-10, M=lambda v: v / jnp.diag(a))
    assert bool(res.success)
    np.testing.assert_allclose(res.x, np.linalg.solve(a, b), rtol=1e-6)


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
    # one product for x0, at most one iteration
    assert int(warm.num_matvecs) <= 2 and bool(warm.success)
    loose = cg(jnp.asarray(a), jnp.asarray(b), rtol=0.0, atol=1e-2)
    assert bool(loose.success) and float(loose.residual_norm) <= 1e-2
    capped = cg(jnp.asarray(a), jnp.asarray(b), rtol=1e-14, maxiter=3)
    assert int(capped.num_matvecs) == 3 and not bool(capped.success)
    assert int(capped.status) == 1 and capped.message == STATUS_MESSAGES[1]
    assert "Maximum number of iterations" in capped.message


def test_indefinite_stops_and_flags_negative_curvature():
    a = np.diag([1.0, 2.0, -3.0, 4.0])
    res = cg(jnp.asarray(a), jnp.ones(4))
    assert bool(res.negative_curvature) and not bool(res.success)
    assert int(res.status) == 5 and res.message == STATUS_MESSAGES[5]
    assert "non-positive curvature" in res.message
    assert np.all(np.isfinite(res.x))
    # x is the last iterate before the bad direction: a descent direction for ½xᵀAx − bᵀx
    # (num_matvecs counts the product that found the bad direction too)
    if int(res.num_matvecs) > 1:
        assert float(0.5 * res.x @ a @ res.x - res.x.sum()) < 0
    first = cg(jnp.asarray(-np.eye(3)), jnp.ones(3))
    assert bool(first.negative_curvature) and int(first.num_matvecs) == 1
    assert int(first.status) == 5 and not bool(first.success)
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
    assert np.all(np.isfinite(res.x)) and not bool(res.success)
    assert int(res.status) == 3 and res.message == STATUS_MESSAGES[3]
    # one product for x0, one good iteration, then the product that came back NaN
    assert int(res.num_matvecs) == 3 and np.isfinite(float(res.residual_norm))
    b = np.array([1.0, 0.2])  # x is the first CG iterate, the exact line minimizer along b
    np.testing.assert_allclose(res.x, (b @ b) / (b @ np.asarray(a) @ b) * b, rtol=1e-12)


def test_jit_vmap_and_float32():
    a = jnp.asarray(spd(8, seed=6))
    bs = jnp.asarray(np.random.default_rng(7).normal(size=(8, 8)))
    solve = jax.jit(jax.vmap(lambda b: cg(a, b, rtol=1e-10)))
    res = solve(bs)
    np.testing.assert_allclose(res.x, np.linalg.solve(np.asarray(a), np.asarray(bs).T).T, rtol=1e-7)
    assert res.num_matvecs.shape == (8,) and bool(jnp.all(res.success))
    assert res.status.shape == (8,) and bool(jnp.all(res.status == 0))
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
        ({"rtol": float("inf")}, ValueError, "rtol must be a finite number >= 0"),
        ({"maxiter": 0}, ValueError, r"maxiter must be an integer in \[1, 2\*\*31 - 1\]; got 0"),
        ({"maxiter": 2**40}, ValueError, r"maxiter must be an integer in \[1, 2\*\*31 - 1\]"),
        ({"maxiter": 3.0}, TypeError, "maxiter must be a positive integer or None"),
        ({"rtol": "1e-5"}, TypeError, "rtol must be a real number"),
        ({"b": jnp.ones(3, jnp.float16)}, TypeError, "b must be float32 or float64"),
        ({"b": jnp.ones(3, jnp.bfloat16)}, TypeError, "b must be float32 or float64"),
        ({"x0": jnp.zeros(3, jnp.int32)}, TypeError, "x0 must have floating-point leaves"),
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


def test_nonfinite_b_is_status_3():
    for bad in (jnp.array([1.0, jnp.nan, 0.0]), jnp.array([jnp.inf, 1.0, 0.0])):
        res = cg(jnp.eye(3), bad)
        assert int(res.status) == 3 and not bool(res.success)
        assert res.message == STATUS_MESSAGES[3]
        assert np.all(np.isfinite(res.x))
    tree_b = {"a": jnp.ones(2), "b": jnp.array([jnp.nan])}
    res = cg(lambda v: v, tree_b)
    assert int(res.status) == 3 and not bool(res.success)


def test_structure_mismatches_name_the_argument():
    def matvec(v):
        return {"w": 2.0 * v["w"], "b": 3.0 * v["b"]}

    rhs = {"w": jnp.ones(3), "b": jnp.ones(2)}
    with pytest.raises(ValueError, match="x0 must have the same tree structure as b"):
        cg(matvec, rhs, x0={"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="x0 must match the shapes of b"):
        cg(matvec, rhs, x0={"w": jnp.zeros(3), "b": jnp.zeros(5)})
    # A returning another structure than its input
    with pytest.raises(ValueError, match=r"A\(v\) must have the same tree structure"):
        cg(lambda v: {"w": v["w"]}, rhs)
    # M returning another structure than b
    with pytest.raises(ValueError, match=r"M\(v\) must have the same tree structure"):
        cg(matvec, rhs, M=lambda v: {"w": v["w"]})
    with pytest.raises(ValueError, match=r"M\(v\) must match the shapes"):
        cg(matvec, rhs, M=lambda v: {"w": v["w"], "b": jnp.zeros(4)})
    with pytest.raises(ValueError, match=r"M\(v\) must match the shapes"):
        cg(jnp.eye(3), jnp.ones(3), M=lambda v: v[:2])


def test_dense_b_of_the_wrong_shape_names_b():
    with pytest.raises(ValueError, match=r"so b must be a 1-D array of length 3; got"):
        cg(jnp.eye(3), {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"so b must be a 1-D array of length 3; got"):
        cg(jnp.eye(3), jnp.ones((3, 1)))


def test_b_unlike_the_operator_input_names_b():
    op = hessfree.hessian(lambda p: jnp.sum(p["w"] ** 2), {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"\bb\b"):
        cg(op, {"v": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"\bb\b"):
        cg(op, {"w": jnp.ones(4)})


def test_compiled_once_for_new_right_hand_sides():
    a = jnp.asarray(spd(6, seed=11))

    def A_op(v):
        return a @ v

    rng = np.random.default_rng(12)
    first = cg(A_op, jnp.asarray(rng.normal(size=6)))
    jax.block_until_ready(first)
    before = cache_size()
    for _ in range(3):
        b = jnp.asarray(rng.normal(size=6))
        res = cg(A_op, b)
        assert bool(res.success)
        np.testing.assert_allclose(res.x, np.linalg.solve(np.asarray(a), np.asarray(b)), rtol=1e-6)
    assert cache_size() == before


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

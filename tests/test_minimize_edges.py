"""minimize at its edges (issue 10): saddles whose negative curvature is small next to the
largest, objectives scaled by 1e-30…1e30, states saved in another dtype, and implicit
differentiation of the solution with respect to the data."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hessfree as hf
from hessfree import Minimizer, minimize
from hessfree._results import CURVATURE_UNRESOLVED, STATUS_MESSAGES

METHODS = ["trust-ncg", "newton-cg"]
DTYPES = [jnp.float32, jnp.float64]

# --- 1. saddles with small negative curvature are never a success --------------------------


def stiff_saddle(x):
    return 1e3 * x[0] ** 2 - 1e-5 * x[1] ** 2


def cubic(x):
    return x[0] ** 2 + x[1] ** 3  # zero curvature along x1 at 0: not a minimum


_D100 = jnp.concatenate([jnp.array([1e3, -1e-5]), jnp.ones(98)])


def saddle100(x):
    """n = 100, three distinct curvatures (1e3, −1e-5, 1), bounded below by a quartic."""
    return 0.5 * jnp.sum(_D100.astype(x.dtype) * x**2) + jnp.sum(x**4)


def test_unresolved_status_has_its_own_code_and_text():
    assert CURVATURE_UNRESOLVED == 7 and CURVATURE_UNRESOLVED in STATUS_MESSAGES
    assert "too small to tell" in STATUS_MESSAGES[CURVATURE_UNRESOLVED]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_stiff_saddle_is_not_a_success(method, dtype):
    res = minimize(stiff_saddle, jnp.zeros(2, dtype), method=method, maxiter=50)
    assert not bool(res.success), res.message
    if dtype == jnp.float64:  # −2e-5 is far above rounding (≈ 1e-13·λmax): it is escaped
        assert float(res.fun) < 0
    else:  # float32: 1e-8·λmax is below rounding: too small to tell, or escaped
        assert int(res.status) == CURVATURE_UNRESOLVED or float(res.fun) < 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_curvature_of_a_cubic_is_not_a_success(method, dtype):
    res = minimize(cubic, jnp.zeros(2, dtype), method=method, maxiter=50)
    assert int(res.status) == CURVATURE_UNRESOLVED and not bool(res.success)
    assert "too small to tell" in res.message
    np.testing.assert_array_equal(res.x, jnp.zeros(2, dtype))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_n100_saddle_with_few_probe_iterations(method, dtype):
    res = minimize(saddle100, jnp.zeros(100, dtype), method=method, probe_iters=5)
    if dtype == jnp.float64:  # found, escaped, and the minimum next to it is a success
        assert float(res.fun) < 0, res.message
        assert abs(float(res.x[1])) > 1e-4
    else:
        assert not bool(res.success) or float(res.fun) < 0, res.message


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_true_minima_are_still_a_success(method, dtype):
    rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
    gtol = 1e-3 if dtype == jnp.float32 else 1e-8
    res = minimize(rosen, jnp.array([-1.2, 1.0], dtype), method=method, gtol=gtol)
    assert bool(res.success), res.message
    d = jnp.linspace(1.0, 1e4, 50).astype(dtype)
    quad = lambda x: 0.5 * jnp.sum(d * (x - 1) ** 2)  # noqa: E731
    res = minimize(quad, jnp.zeros(50, dtype), method=method, gtol=1e-3)
    assert bool(res.success), res.message


def test_steihaug_boundary_step_is_in_the_preconditioner_norm():
    from hessfree._minimize._trust import steihaug

    h = jnp.diag(jnp.array([1e4, 1.0, -1.0]))  # indefinite: CG meets negative curvature
    g = jnp.ones(3)
    d = jnp.array([1e4, 1.0, 1.0])
    for radius in (0.5, 1e-3):
        tol = jnp.asarray(1e-12)
        out = steihaug(lambda v: h @ v, g, jnp.asarray(radius), lambda v: v / d, tol, 10)
        s = out.s
        assert bool(out.hits_boundary)
        np.testing.assert_allclose(float(jnp.sqrt(s @ (d * s))), radius, rtol=1e-12)
        np.testing.assert_allclose(float(out.step_norm), radius, rtol=1e-12)
        np.testing.assert_allclose(float(out.model), float(g @ s + 0.5 * s @ h @ s), rtol=1e-10)


@pytest.mark.parametrize("preconditioner", ["diagonal", lambda x: jnp.array([2e3, 1e-2])])
def test_escape_from_a_saddle_goes_to_the_boundary_of_the_preconditioner_norm(preconditioner):
    solver = Minimizer(stiff_saddle, preconditioner=preconditioner)
    state = jax.jit(solver.step)(solver.init(jnp.zeros(2)))  # the first proposal: an escape
    pr = state.proposal
    assert bool(pr.stationary) and bool(pr.negative) and int(state.nit) == 0
    diag = state.diagonal if preconditioner == "diagonal" else preconditioner(state.x)
    wnorm = float(jnp.sqrt(pr.d @ (diag * pr.d)))
    np.testing.assert_allclose(wnorm, float(state.radius), rtol=1e-12)
    np.testing.assert_allclose(float(pr.step_norm), float(state.radius), rtol=1e-12)
    assert abs(float(pr.d[1])) > abs(float(pr.d[0]))  # along the negative curvature
    res = minimize(stiff_saddle, jnp.zeros(2), preconditioner=preconditioner, maxiter=50)
    assert not bool(res.success) and float(res.fun) < 0


# --- 2. scale: finite f and g are never called non-finite ----------------------------------


def scaled_quadratic(x, c):
    return c * jnp.sum((x - 1) ** 2)


def scaled_rosen(x, c):
    return c * jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


PROBLEMS = {
    "quadratic": (scaled_quadratic, lambda n: np.zeros(n)),
    "rosenbrock": (scaled_rosen, lambda n: np.tile([-1.2, 1.0], n // 2)),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_huge_scale_is_not_called_nonfinite(method, dtype):
    for n in (3, 10, 40):
        res = minimize(lambda x: 1e18 * jnp.sum((x - 1) ** 2), jnp.zeros(n, dtype), method=method)
        assert int(res.status) != 3, (n, res.message)
        np.testing.assert_allclose(res.x, np.ones(n), rtol=1e-3)
    res = minimize(scaled_rosen, jnp.zeros(10, dtype) - 1, jnp.asarray(1e18, dtype), method=method)
    assert int(res.status) != 3, res.message


def _scale_case(problem, method, dtype, exponent, n):
    f, start = PROBLEMS[problem]
    c = jnp.asarray(10.0**exponent, dtype)
    x0 = jnp.asarray(start(n), dtype)
    res = minimize(f, x0, c, method=method, gtol=1e-5, maxiter=300)
    assert np.all(np.isfinite(np.asarray(res.x)))
    if int(res.status) == 3:  # non-finite only when f or ∇f really is
        fx, gx = jax.value_and_grad(f)(res.x, c)
        assert not (np.isfinite(float(fx)) and np.all(np.isfinite(np.asarray(gx))))
    if bool(res.success):
        g = jax.grad(f)(res.x, c)
        assert float(jnp.linalg.norm(g.astype(jnp.float64))) <= 1e-5 * (1 + 1e-3)
        if problem == "quadratic":  # the one minimizer x = 1, to gtol/(2c) or rounding
            err = np.abs(np.asarray(res.x, np.float64) - 1.0)
            rounding = 10 * float(jnp.finfo(dtype).eps) ** 0.5
            assert np.all(err <= 1e-5 / (2 * 10.0**exponent) + rounding), err
        # (Rosenbrock with n = 4 has a second local minimum near (−0.78, 0.61, 0.38, 0.15):
        # any stationary point with no negative curvature is a legitimate success)


def _scale_body(problem, method, dtype_name, exponent_frac, n):
    dtype = jnp.float32 if dtype_name == "float32" else jnp.float64
    top = 18 if dtype == jnp.float32 else 30
    exponent = round(-top + 2 * top * exponent_frac)
    _scale_case(problem, method, dtype, exponent, n)


_STRATEGIES = (
    st.sampled_from(sorted(PROBLEMS)),
    st.sampled_from(METHODS),
    st.sampled_from(["float32", "float64"]),
    st.floats(0.0, 1.0),
    st.sampled_from([2, 4, 10]),
)


def _generated(count):
    checks = list(HealthCheck)
    return settings(max_examples=count, deadline=None, suppress_health_check=checks)(
        given(*_STRATEGIES)(_scale_body)
    )


test_scale_fuzz = _generated(4)  # CI; 320 examples in the slow tier
test_scale_fuzz_many = pytest.mark.slow(_generated(320))


# --- 3. a state saved in another dtype is refused ------------------------------------------


def test_state_of_another_dtype_is_refused(tmp_path):
    rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
    solver = Minimizer(rosen)
    s64 = solver.advance(solver.init(jnp.array([-1.2, 1.0])), num_steps=2)
    path = tmp_path / "state.npz"
    np.savez(path, *jax.tree_util.tree_leaves(s64))
    loaded = np.load(path)
    leaves = [loaded[f"arr_{i}"] for i in range(len(loaded.files))]
    x32 = jnp.array([-1.2, 1.0], jnp.float32)
    treedef = jax.tree_util.tree_structure(solver.init(x32))
    # the point cast to the run's dtype, the rest float64 as saved
    mixed = jax.tree_util.tree_unflatten(treedef, leaves)._replace(
        x=jnp.asarray(leaves[0], jnp.float32)
    )
    with pytest.raises(ValueError, match=r"state\.fun.*float64.*float32"):
        solver.advance(mixed, num_steps=1)
    # a whole float64 state resumes in float64 (its own dtype, consistently)
    state64 = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(v) for v in leaves])
    out = solver.advance(state64, num_steps=1)
    assert out.x.dtype == jnp.float64 and out.fun.dtype == jnp.float64


def test_float64_leaves_are_refused_when_jax_runs_in_float32(tmp_path):
    rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2  # noqa: E731
    solver = Minimizer(rosen)
    s64 = solver.init(jnp.array([-1.2, 1.0]))
    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(s64)]
    with jax.enable_x64(False):
        x32 = jnp.array([-1.2, 1.0])
        treedef = jax.tree_util.tree_structure(solver.init(x32))
        state = jax.tree_util.tree_unflatten(treedef, leaves)
        with pytest.raises(ValueError, match=r"state\.x.*float64"):
            solver.advance(state, num_steps=1)


# --- 4. implicit differentiation of the solution --------------------------------------------


def ridge(w, X, y, lam):
    return 0.5 * jnp.sum((X @ w - y) ** 2) + 0.5 * lam * jnp.sum(w**2)


def ridge_closed_form(X, y, lam):
    return jnp.linalg.solve(X.T @ X + lam * jnp.eye(X.shape[1]), X.T @ y)


def ridge_data(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(30, 5)), dtype)
    y = jnp.asarray(rng.normal(size=30), dtype)
    return X, y


@pytest.mark.parametrize("method", METHODS)
def test_grad_of_solution_wrt_hyperparameter_matches_closed_form(method):
    X, y = ridge_data()
    lam = jnp.asarray(0.7)
    w0 = jnp.zeros(5)

    def loss(lam, X, y):
        w = minimize(ridge, w0, X, y, lam, method=method, gtol=1e-10).x
        return jnp.sum(jnp.sin(w))

    def loss_exact(lam, X, y):
        return jnp.sum(jnp.sin(ridge_closed_form(X, y, lam)))

    for argnums in (0, 1, 2):
        got = jax.grad(loss, argnums)(lam, X, y)
        want = jax.grad(loss_exact, argnums)(lam, X, y)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    # finite differences in lam
    h = 1e-5
    fd = (loss_exact(lam + h, X, y) - loss_exact(lam - h, X, y)) / (2 * h)
    fd_solver = (loss(lam + h, X, y) - loss(lam - h, X, y)) / (2 * h)
    np.testing.assert_allclose(jax.grad(loss)(lam, X, y), fd, rtol=1e-6)
    np.testing.assert_allclose(fd_solver, fd, rtol=1e-5)


def test_jacrev_and_jit_of_the_solution():
    X, y = ridge_data()
    w0 = jnp.zeros(5)
    sol = lambda lam, y: minimize(ridge, w0, X, y, lam, gtol=1e-10).x  # noqa: E731
    jac = jax.jit(jax.jacrev(sol, argnums=(0, 1)))(jnp.asarray(0.7), y)
    want = jax.jacrev(lambda lam, y: ridge_closed_form(X, y, lam), argnums=(0, 1))(
        jnp.asarray(0.7), y
    )
    np.testing.assert_allclose(jac[0], want[0], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(jac[1], want[1], rtol=1e-6, atol=1e-10)


def test_x0_gets_zero_gradient_and_other_fields_are_constant():
    X, y = ridge_data()

    def loss(w0, lam):
        res = minimize(ridge, w0, X, y, lam, gtol=1e-10)
        return jnp.sum(res.x) + res.fun

    g_w0, g_lam = jax.grad(loss, argnums=(0, 1))(jnp.zeros(5), jnp.asarray(0.7))
    np.testing.assert_array_equal(g_w0, np.zeros(5))
    want = jax.grad(lambda lam: jnp.sum(ridge_closed_form(X, y, lam)))(jnp.asarray(0.7))
    np.testing.assert_allclose(g_lam, want, rtol=1e-6)


def test_implicit_gradient_float32_and_pytree():
    X, y = ridge_data(jnp.float32)

    def f(p, X, y, lam):
        return ridge(p["w"], X, y, lam) + 0.5 * (p["b"] - 1.0) ** 2

    def loss(lam):
        p = minimize(f, {"w": jnp.zeros(5, jnp.float32), "b": jnp.zeros((), jnp.float32)},
                     X, y, lam, gtol=1e-4).x  # fmt: skip
        return jnp.sum(p["w"] ** 2) + p["b"]

    g = jax.grad(loss)(jnp.asarray(0.7, jnp.float32))
    assert g.dtype == jnp.float32
    want = jax.grad(lambda lam: jnp.sum(ridge_closed_form(X, y, lam) ** 2))(
        jnp.asarray(0.7, jnp.float32)
    )
    np.testing.assert_allclose(g, want, rtol=2e-3)


def test_gradient_at_a_non_minimum_is_nan_not_silently_wrong():
    # at a saddle the implicit function theorem's H is indefinite: CG refuses
    f = lambda x, a: a * x[0] ** 2 - x[1] ** 2  # noqa: E731
    g = jax.grad(lambda a: jnp.sum(minimize(f, jnp.zeros(2), a, maxiter=1).x))(1.0)
    assert np.isnan(float(g))


def test_public_status_table_exported():
    assert hf.STATUS_MESSAGES[CURVATURE_UNRESOLVED] == STATUS_MESSAGES[CURVATURE_UNRESOLVED]


def logistic(w, X, y, lam):
    z = X @ w
    return jnp.mean(jnp.logaddexp(0.0, z) - y * z) + 0.5 * lam * jnp.sum(w**2)


def unrolled_newton(X, y, lam, steps=30):
    """Plain Newton with dense Hessians, differentiated by unrolling: the reference."""
    w = jnp.zeros(X.shape[1], X.dtype)
    for _ in range(steps):
        g = jax.grad(logistic)(w, X, y, lam)
        w = w - jnp.linalg.solve(jax.hessian(logistic)(w, X, y, lam), g)
    return w


@pytest.mark.parametrize("method", METHODS)
def test_implicit_gradient_of_a_nonquadratic_problem_matches_unrolled_and_fd(method):
    rng = np.random.default_rng(3)
    X = jnp.asarray(rng.normal(size=(40, 4)))
    y = jnp.asarray((rng.random(40) < 0.5).astype(np.float64))
    lam = jnp.asarray(0.3)

    def out(lam, X):
        w = minimize(logistic, jnp.zeros(4), X, y, lam, method=method, gtol=1e-12).x
        return jnp.sum(jnp.cos(w) * jnp.arange(1.0, 5.0))

    def out_unrolled(lam, X):
        return jnp.sum(jnp.cos(unrolled_newton(X, y, lam)) * jnp.arange(1.0, 5.0))

    g_lam, g_X = jax.grad(out, argnums=(0, 1))(lam, X)
    u_lam, u_X = jax.grad(out_unrolled, argnums=(0, 1))(lam, X)
    np.testing.assert_allclose(g_lam, u_lam, rtol=1e-7)
    np.testing.assert_allclose(g_X, u_X, rtol=1e-6, atol=1e-12)
    h = 1e-5
    fd = (out(lam + h, X) - out(lam - h, X)) / (2 * h)
    np.testing.assert_allclose(g_lam, fd, rtol=1e-6)

"""minimize against scipy.optimize.minimize fed the same exact derivatives, and its contracts:
honest status at saddles and non-finite regions, maxiter, jit, vmap, float32, resume, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree

import hessfree
from hessfree import Minimizer, OptimizeResult, minimize

# --- test problems (Moré, Garbow & Hillstrom 1981) ----------------------------------------


def rosen(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def rosen_extended(x):
    odd, even = x[0::2], x[1::2]
    return jnp.sum(100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2)


def beale(x):
    a, b = x[0], x[1]
    return (1.5 - a + a * b) ** 2 + (2.25 - a + a * b**2) ** 2 + (2.625 - a + a * b**3) ** 2


def wood(x):
    a, b, c, d = x
    return (
        100 * (b - a**2) ** 2
        + (1 - a) ** 2
        + 90 * (d - c**2) ** 2
        + (1 - c) ** 2
        + 10.1 * ((b - 1) ** 2 + (d - 1) ** 2)
        + 19.8 * (b - 1) * (d - 1)
    )


def powell_singular(x):
    a, b, c, d = x
    return (a + 10 * b) ** 2 + 5 * (c - d) ** 2 + (b - 2 * c) ** 4 + 10 * (a - d) ** 4


def helical_valley(x):
    theta = jnp.arctan2(x[1], x[0]) / (2 * jnp.pi)
    return 100 * ((x[2] - 10 * theta) ** 2 + (jnp.sqrt(x[0] ** 2 + x[1] ** 2) - 1) ** 2) + x[2] ** 2


def logistic(params, features, labels):
    """Mean logistic loss plus a small ridge, over a dict of parameters."""
    logits = features @ params["w"] + params["b"]
    loss = jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits)
    return loss + 1e-3 * (jnp.sum(params["w"] ** 2) + params["b"] ** 2)


def logistic_data(n=300, d=6, seed=0):
    rng = np.random.default_rng(seed)
    scales = np.geomspace(1e-2, 1e2, d)
    features = rng.normal(size=(n, d)) * scales
    w_true = rng.normal(size=d) / scales
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-(features @ w_true)))).astype(float)
    return jnp.asarray(features), jnp.asarray(labels)


def saddle(x):
    return x[0] ** 2 - x[1] ** 2 + x[1] ** 4


def scipy_reference(f, x0, args, method):
    """scipy.optimize.minimize with jit-ed exact f, gradient and Hessian-vector product."""
    flat0, unravel = ravel_pytree(x0)

    def flat_f(z):
        return f(unravel(z), *args)

    fun = jax.jit(flat_f)
    jac = jax.jit(jax.grad(flat_f))
    hessp = jax.jit(lambda z, p: jax.jvp(jax.grad(flat_f), (z,), (p,))[1])
    options = {"gtol": 1e-8} if method == "trust-ncg" else {"xtol": 1e-12}
    # scipy's default maxiter (200·n) is not enough for its Newton-CG on Wood (817 iterations
    # with scipy 1.17): give it room; callers check that the reference converged.
    options["maxiter"] = 2_000
    res = scipy.optimize.minimize(
        lambda z: float(fun(z)),
        np.asarray(flat0),
        jac=lambda z: np.asarray(jac(z)),
        hessp=lambda z, p: np.asarray(hessp(z, p)),
        method="trust-ncg" if method == "trust-ncg" else "Newton-CG",
        options=options,
    )
    return res


PROBLEMS = {
    "rosenbrock": (rosen, jnp.array([-1.2, 1.0]), (), np.ones(2)),
    "rosenbrock_extended": (rosen_extended, jnp.tile(jnp.array([-1.2, 1.0]), 5), (), np.ones(10)),
    "beale": (beale, jnp.array([1.0, 1.0]), (), np.array([3.0, 0.5])),
    "wood": (wood, jnp.array([-3.0, -1.0, -3.0, -1.0]), (), np.ones(4)),
    "powell_singular": (powell_singular, jnp.array([3.0, -1.0, 0.0, 1.0]), (), np.zeros(4)),
    "helical_valley": (helical_valley, jnp.array([-1.0, 0.0, 0.0]), (), np.array([1.0, 0.0, 0.0])),
}


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
@pytest.mark.parametrize("name", sorted(PROBLEMS))
def test_against_scipy(name, method):
    f, x0, args, known = PROBLEMS[name]
    res = minimize(f, x0, *args, method=method, gtol=1e-8)
    ref = scipy_reference(f, x0, args, method)
    assert int(res.status) == 0, res.message
    assert float(jnp.linalg.norm(res.jac)) <= 1e-8
    singular = name == "powell_singular"  # quartic at the minimizer: x is only f^(1/4)-accurate
    # scipy's Newton-CG never meets xtol=1e-12 on the singular problem; all others converge
    assert ref.success or (singular and method == "newton-cg"), (name, ref.message)
    tol = 2e-2 if singular else 1e-6
    np.testing.assert_allclose(res.x, known, atol=tol)
    np.testing.assert_allclose(res.x, ref.x, atol=tol)
    np.testing.assert_allclose(res.fun, ref.fun, atol=1e-9 if singular else 1e-10)
    assert float(res.fun) <= float(ref.fun) + 1e-12
    assert int(res.nhev) > 0 and int(res.nfev) >= 1 and int(res.njev) >= int(res.nit)


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_ill_scaled_logistic_regression_over_a_pytree(method):
    features, labels = logistic_data()
    x0 = {"w": jnp.zeros(features.shape[1]), "b": jnp.zeros(())}
    res = minimize(logistic, x0, features, labels, method=method, gtol=1e-7)
    ref = scipy_reference(logistic, x0, (features, labels), method)
    assert ref.success, ref.message
    assert int(res.status) == 0, res.message
    assert jax.tree_util.tree_structure(res.x) == jax.tree_util.tree_structure(x0)
    x_flat = ravel_pytree(res.x)[0]
    np.testing.assert_allclose(res.fun, ref.fun, rtol=1e-10)
    # compare in the metric that is well determined: the scaled weights w_j * scale_j
    scale = np.concatenate([[1.0], np.asarray(jnp.std(features, axis=0))])
    np.testing.assert_allclose(x_flat * scale, ref.x * scale, atol=1e-4)


def test_preconditioner_same_answer_fewer_products():
    features, labels = logistic_data()
    x0 = {"w": jnp.zeros(features.shape[1]), "b": jnp.zeros(())}

    def diag(params, features, labels):
        s = jax.nn.sigmoid(features @ params["w"] + params["b"])
        c = s * (1 - s) / features.shape[0]
        return {"w": c @ features**2 + 2e-3, "b": jnp.sum(c) + 2e-3}

    for method in ("trust-ncg", "newton-cg"):
        plain = minimize(logistic, x0, features, labels, method=method, gtol=1e-7)
        pre = minimize(
            logistic, x0, features, labels, method=method, gtol=1e-7, preconditioner=diag
        )
        assert int(pre.status) == 0, pre.message
        np.testing.assert_allclose(pre.fun, plain.fun, rtol=1e-10)
        assert int(pre.nhev) < int(plain.nhev)


# --- the automatic Jacobi preconditioner (issue 14) -----------------------------------------

METHODS = ["trust-ncg", "newton-cg"]


def scaled_logistic_problem():
    """Badly scaled (feature scales 1e-2..1e2), large enough that plain CG solves get long."""
    features, labels = logistic_data(n=1000, d=50)
    return {"w": jnp.zeros(50), "b": jnp.zeros(())}, features, labels


@pytest.mark.parametrize("method", METHODS)
def test_auto_preconditioner_same_answer_as_scipy_with_far_fewer_products(method):
    x0, features, labels = scaled_logistic_problem()
    auto = minimize(logistic, x0, features, labels, method=method, gtol=1e-7)
    plain = minimize(logistic, x0, features, labels, method=method, gtol=1e-7, preconditioner=None)
    ref = scipy_reference(logistic, x0, (features, labels), method)
    assert ref.success, ref.message
    assert int(auto.status) == 0 and int(plain.status) == 0, (auto.message, plain.message)
    assert float(ravel_pytree(auto.jac)[0] @ ravel_pytree(auto.jac)[0]) ** 0.5 <= 1e-7
    np.testing.assert_allclose(auto.fun, ref.fun, rtol=1e-10)
    scale = np.concatenate([[1.0], np.asarray(jnp.std(features, axis=0))])
    np.testing.assert_allclose(ravel_pytree(auto.x)[0] * scale, ref.x * scale, atol=1e-4)
    assert 4 * int(auto.nhev) < int(plain.nhev), (int(auto.nhev), int(plain.nhev))
    # the run switched to the estimated diagonal (phase 2), whose spread is the features'
    solver = Minimizer(logistic, method=method, gtol=1e-7)
    state = solver.run(solver.init(x0, features, labels), features, labels)
    assert int(state.jacobi) == 2
    d = np.asarray(state.diagonal["w"])
    exact = np.asarray(jnp.var(features, axis=0))  # ∝ diag(H) up to the weights σ(1-σ)
    assert np.corrcoef(np.log(d), np.log(exact))[0, 1] > 0.95


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["rosenbrock", "rosenbrock_extended", "wood", "helical_valley"])
def test_auto_preconditioner_leaves_short_solves_alone(name, method):
    # CG solves stay short: nothing is estimated (the phase stays UNSCALED, D = 1), so it is
    # the run without a preconditioner. Two programs (one with the estimate compiled in) may
    # round differently, and a long run like Wood's can then take a few more iterations, so
    # the runs are compared by their phase, minimum and status, not bit for bit.
    f, x0, args, _ = PROBLEMS[name]
    solver = Minimizer(f, method=method, gtol=1e-8)
    state = solver.run(solver.init(x0, *args), *args)
    auto = solver.result(state)
    plain = minimize(f, x0, *args, method=method, gtol=1e-8, preconditioner=None)
    assert int(state.jacobi) == 0
    np.testing.assert_array_equal(state.diagonal, np.ones_like(x0))
    np.testing.assert_allclose(auto.x, plain.x, rtol=1e-7, atol=1e-10)
    assert abs(int(auto.nit) - int(plain.nit)) <= max(2, int(plain.nit) // 20)
    assert int(auto.status) == int(plain.status) == 0


def test_auto_preconditioner_declines_where_scaling_does_not_help():
    # a dense quadratic whose ill-conditioning is a rotation, not a scaling: Jacobi cannot
    # help, the estimate is measured, declined (phase 3) and costs its 6 products only
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(60, 60)))
    a = jnp.asarray(q @ np.diag(np.geomspace(1e-3, 1.0, 60)) @ q.T)
    b = jnp.asarray(rng.normal(size=60))

    def quad(x):
        return 0.5 * x @ a @ x - b @ x

    solver = Minimizer(quad, method="newton-cg", gtol=1e-6)
    state = solver.run(solver.init(jnp.zeros(60)))
    plain = minimize(quad, jnp.zeros(60), method="newton-cg", gtol=1e-6, preconditioner=None)
    assert int(state.status) == 0 and int(state.jacobi) == 3
    np.testing.assert_array_equal(state.diagonal, np.ones(60))
    assert int(state.nhev) == int(plain.nhev) + 6
    np.testing.assert_allclose(state.x, plain.x, rtol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", ["rosenbrock", "beale", "wood", "helical_valley"])
def test_diagonal_preconditioner_same_minimizer_as_scipy(name, method):
    f, x0, args, known = PROBLEMS[name]
    res = minimize(f, x0, *args, method=method, gtol=1e-8, preconditioner="diagonal")
    ref = scipy_reference(f, x0, args, method)
    assert int(res.status) == 0, res.message
    assert float(jnp.linalg.norm(res.jac)) <= 1e-8
    np.testing.assert_allclose(res.x, known, atol=1e-6)
    np.testing.assert_allclose(res.x, ref.x, atol=1e-6)
    assert float(res.fun) <= float(ref.fun) + 1e-12


def test_auto_preconditioner_under_jit_vmap_and_grad():
    features, labels = logistic_data(n=1000, d=30)
    other = 1.0 - labels
    x0 = {"w": jnp.zeros(30), "b": jnp.zeros(())}
    solve = jax.jit(jax.vmap(lambda y: minimize(logistic, x0, features, y, gtol=1e-7)))
    batch = solve(jnp.stack([labels, other]))
    for i, y in enumerate((labels, other)):
        # (batched products round differently: the same solution, not the same iterates)
        one = minimize(logistic, x0, features, y, gtol=1e-7)
        assert int(batch.status[i]) == int(one.status) == 0
        scale = np.asarray(jnp.std(features, axis=0))
        np.testing.assert_allclose(batch.x["w"][i] * scale, one.x["w"] * scale, atol=1e-6)

    def ridge_logistic(params, lam):
        return logistic(params, features, labels) + lam * jnp.sum(params["w"] ** 2)

    def out(lam, preconditioner):
        x = minimize(ridge_logistic, x0, lam, gtol=1e-10, preconditioner=preconditioner).x
        return jnp.sum(jnp.sin(x["w"])) + x["b"]

    lam = jnp.asarray(1e-3)
    np.testing.assert_allclose(jax.grad(out)(lam, "auto"), jax.grad(out)(lam, None), rtol=1e-6)


def test_no_recompilation_at_new_values():
    from hessfree._minimize import _solver

    x0, features, labels = scaled_logistic_problem()

    def sizes():
        jits = (
            _solver._init_jit,
            _solver._advance_jit,
            _solver._init_small,
            _solver._advance_small,
        )
        return [fn._cache_size() for fn in jits]  # pyright: ignore[reportAttributeAccessIssue]

    minimize(logistic, x0, features, labels, gtol=1e-6)
    before = sizes()
    x1 = jax.tree_util.tree_map(lambda a: a + 0.1, x0)
    res = minimize(logistic, x1, 2.0 * features, 1.0 - labels, gtol=1e-6)
    assert int(res.status) == 0, res.message
    assert sizes() == before


def test_resume_across_the_switch_to_the_jacobi_preconditioner(tmp_path):
    x0, features, labels = scaled_logistic_problem()
    solver = Minimizer(logistic, gtol=1e-7)
    full = solver.run(solver.init(x0, features, labels), features, labels)
    state = solver.init(x0, features, labels)
    phases = []
    while int(state.jacobi) != 2:  # stop right after the switch, save, reload, go on
        state = solver.advance(state, features, labels, num_steps=1)
        phases.append(int(state.jacobi))
    assert phases[0] == 0 and 1 in phases and int(state.status) == -1
    path = tmp_path / "state.npz"
    np.savez(path, *jax.tree_util.tree_leaves(state))
    loaded = np.load(path)
    leaves = [jnp.asarray(loaded[f"arr_{i}"]) for i in range(len(loaded.files))]
    state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(state), leaves)
    resumed = solver.run(state, features, labels)
    for a, b in zip(
        jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed), strict=True
    ):
        np.testing.assert_array_equal(a, b)


# --- honest status -------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
@pytest.mark.parametrize("start", [(0.0, 0.0), (1e-8, 0.0)])
def test_escapes_saddle(method, start):
    res = minimize(saddle, jnp.array(start), method=method)
    assert int(res.status) == 0 and bool(res.success)
    np.testing.assert_allclose(res.fun, -0.25, atol=1e-10)
    np.testing.assert_allclose(jnp.abs(res.x), [0.0, 0.5**0.5], atol=1e-5)
    # scipy stops at the saddle and calls it a success (scipy issue 20213)
    ref = scipy_reference(saddle, jnp.array(start), (), method)
    assert ref.fun > -1e-10


def test_saddle_status_when_escape_runs_out_of_iterations():
    # the first escape step (to y = ±1, where f = 0) is rejected; then maxiter is spent
    res = minimize(saddle, jnp.zeros(2), maxiter=1)
    assert int(res.status) == 4 and not bool(res.success)
    assert "saddle" in res.message
    np.testing.assert_array_equal(res.x, jnp.zeros(2))


def barrier(x):
    return jnp.sum(x - jnp.log(x))  # NaN for x < 0; minimizer x = 1


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_nan_region_rejects_and_shrinks(method):
    # from x = 3 the full Newton step lands at x = -3, where log is NaN
    res = minimize(barrier, jnp.array([3.0, 3.0]), method=method, initial_radius=100.0)
    assert int(res.status) == 0, res.message
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-6)
    assert np.isfinite(float(res.fun))
    if method == "newton-cg":  # the line search backtracked out of the NaN region
        assert int(res.nfev) > int(res.nit) + 1


def cliff(x):
    return jnp.sum(x) + jnp.where(jnp.all(x >= 1.0), 0.0, jnp.nan)  # finite only at x >= 1


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_cannot_continue_reports_nonfinite_and_keeps_last_finite_iterate(method):
    res = minimize(cliff, jnp.array([1.0, 1.0]), method=method)
    assert int(res.status) == 3 and not bool(res.success)
    assert "Non-finite" in res.message
    np.testing.assert_array_equal(res.x, [1.0, 1.0])
    assert np.isfinite(float(res.fun))


@jax.custom_jvp
def poison(t):
    """Zero, with a NaN derivative for t > 2: f stays finite where the gradient is not."""
    return 0.0 * t


@poison.defjvp
def _poison_jvp(primals, tangents):
    (t,), (dt,) = primals, tangents
    return poison(t), jnp.where(t > 2, jnp.nan, 0.0) * dt


def nan_gradient_region(x):
    return jnp.sum((x - 3.0) ** 2) + poison(x[0])


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_nonfinite_gradient_at_accepted_point_rejects_it(method):
    # the minimizer (3, 3) lies where the gradient is NaN: never step there, say why
    res = minimize(nan_gradient_region, jnp.zeros(2), method=method, maxiter=60)
    assert int(res.status) in (1, 3), res.message  # 3 once the step collapses (trust: 82 it)
    assert np.all(np.isfinite(np.asarray(res.jac))) and float(res.x[0]) <= 2.0
    assert int(res.nit) <= 60
    np.testing.assert_allclose(res.x, [2.0, 2.0], atol=1e-2)


def test_nonfinite_start():
    res = minimize(barrier, jnp.array([-1.0, 2.0]))
    assert int(res.status) == 3 and int(res.nit) == 0
    np.testing.assert_array_equal(res.x, [-1.0, 2.0])


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_maxiter_exhaustion(method):
    res = minimize(rosen, jnp.array([-1.2, 1.0]), method=method, maxiter=5)
    assert int(res.status) == 1 and int(res.nit) == 5 and not bool(res.success)
    assert res.message.startswith("Maximum number of iterations")


# --- transformations, dtypes, resume -------------------------------------------------------


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_vmap_over_8_starts_and_jit(method):
    starts = jnp.asarray(np.random.default_rng(0).uniform(-2, 2, size=(8, 2)))
    solve = jax.jit(jax.vmap(lambda x0: minimize(rosen, x0, method=method, gtol=1e-8)))
    batch = solve(starts)
    assert batch.x.shape == (8, 2) and batch.status.shape == (8,)
    assert bool(jnp.all(batch.success)), batch.message
    np.testing.assert_allclose(batch.x, np.ones((8, 2)), atol=1e-6)
    one = minimize(rosen, starts[3], method=method, gtol=1e-8)
    np.testing.assert_allclose(batch.x[3], one.x, rtol=1e-12)
    assert int(batch.nit[3]) == int(one.nit)
    assert isinstance(batch.message, list) and len(batch.message) == 8


def test_vmap_over_problem_data():
    def quad(x, center):
        return jnp.sum((x - center) ** 2 * jnp.arange(1.0, 4.0)) + jnp.sum((x - center) ** 4)

    centers = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3)))
    res = jax.vmap(lambda c: minimize(quad, jnp.zeros(3), c, method="newton-cg", gtol=1e-9))(
        centers
    )
    assert bool(jnp.all(res.success))
    np.testing.assert_allclose(res.x, centers, atol=1e-6)


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_float32_kept(method):
    res = minimize(rosen, jnp.array([-1.2, 1.0], jnp.float32), method=method, gtol=1e-3)
    assert res.x.dtype == jnp.float32 and res.fun.dtype == jnp.float32
    assert res.jac.dtype == jnp.float32
    assert int(res.status) == 0, res.message
    np.testing.assert_allclose(res.x, [1.0, 1.0], atol=5e-3)


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_resume_from_saved_state_is_bitwise_identical(method, tmp_path):
    features, labels = logistic_data()
    x0 = {"w": jnp.zeros(features.shape[1]), "b": jnp.zeros(())}
    full = minimize(logistic, x0, features, labels, method=method, gtol=1e-7)

    solver = Minimizer(logistic, method=method, gtol=1e-7)
    state = solver.advance(solver.init(x0, features, labels), features, labels, num_steps=3)
    assert int(state.status) == -1 and int(state.nit) == 3
    path = tmp_path / "state.npz"
    np.savez(path, *jax.tree_util.tree_leaves(state))
    del state

    loaded = np.load(path)
    leaves = [jnp.asarray(loaded[f"arr_{i}"]) for i in range(len(loaded.files))]
    treedef = jax.tree_util.tree_structure(solver.init(x0, features, labels))
    state = jax.tree_util.tree_unflatten(treedef, leaves)
    seen = []
    state = solver.run(state, features, labels, chunk=2, callback=lambda s: seen.append(int(s.nit)))
    resumed = solver.result(state)
    assert seen == sorted(seen) and len(seen) >= 2
    for a, b in zip(
        jax.tree_util.tree_leaves(full), jax.tree_util.tree_leaves(resumed), strict=True
    ):
        np.testing.assert_array_equal(a, b)


def test_step_is_pure_and_stops_when_done(capsys):
    solver = Minimizer(rosen)
    step = jax.jit(solver.step)
    state = solver.init(jnp.array([-1.2, 1.0]))
    for _ in range(100):
        state = step(state)
    assert int(state.status) == 0
    again = step(state)
    for a, b in zip(
        jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(again), strict=True
    ):
        np.testing.assert_array_equal(a, b)
    solver.run(solver.init(jnp.array([-1.2, 1.0])), chunk=10, progress=True)
    assert "nit" in capsys.readouterr().out


def test_result_type_and_exports():
    res = minimize(rosen, jnp.array([-1.2, 1.0]))
    assert isinstance(res, OptimizeResult)
    assert set(OptimizeResult._fields) == {
        "x", "fun", "jac", "nit", "nfev", "njev", "nhev", "status", "success",
    }  # fmt: skip
    assert res.message == hessfree.STATUS_MESSAGES[0]
    assert jax.jit(lambda x0: minimize(rosen, x0).status)(jnp.array([-1.2, 1.0])) == 0


# --- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("f", "x0", "kwargs", "error", "match"),
    [
        (lambda x: x**2, jnp.ones(2), {}, ValueError, r"f must return a scalar"),
        (rosen, jnp.array([1, 2]), {}, TypeError, "x0 must have floating-point leaves"),
        ("rosen", jnp.ones(2), {}, TypeError, "f must be callable"),
        (rosen, jnp.ones(2), {"method": "bfgs"}, ValueError, r"\['trust-ncg', 'newton-cg'\]"),
        (rosen, jnp.ones(2), {"mode": "x"}, ValueError, r"mode must be one of \['auto', "),
        (rosen, jnp.ones(2), {"gtol": -1.0}, ValueError, "gtol must be a finite number >= 0"),
        (rosen, jnp.ones(2), {"gtol": "small"}, TypeError, "gtol must be a real number"),
        (rosen, jnp.ones(2), {"maxiter": 0}, ValueError, r"maxiter must be an integer in \[1, "),
        (rosen, jnp.ones(2), {"maxiter": 2.5}, TypeError, "maxiter must be a positive integer"),
        (rosen, jnp.ones(2), {"maxiter": 2**31}, ValueError, r"maxiter must be an integer in"),
        (rosen, jnp.ones(2), {"cg_maxiter": -3}, ValueError, r"cg_maxiter must be an integer in"),
        (rosen, jnp.ones(2), {"initial_radius": 0.0}, ValueError, "initial_radius must be"),
        (rosen, jnp.ones(2), {"max_radius": 0.5}, ValueError, "max_radius must be"),
        (
            rosen,
            jnp.ones(2),
            {"eta": 0.3},
            ValueError,
            r"eta \(the trust-region acceptance ratio\) must be in \[0, 0.25\)",
        ),
        (rosen, jnp.ones(2), {"preconditioner": 1.0}, TypeError, "preconditioner must be"),
        (rosen, jnp.ones(2), {"probe_iters": 0}, ValueError, r"probe_iters must be an integer in"),
    ],
)
def test_errors(f, x0, kwargs, error, match):
    with pytest.raises(error, match=match):
        minimize(f, x0, **kwargs)


# --- 0.2: construction validates, argument mistakes are named, unknown statuses -----------


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"gtol": -1.0}, ValueError, "gtol must be a finite number >= 0"),
        ({"gtol": float("nan")}, ValueError, "gtol must be a finite number"),
        ({"gtol": "small"}, TypeError, "gtol must be a real number"),
        ({"method": "bfgs"}, ValueError, "method must be one of"),
        ({"mode": "fwd_fwd"}, ValueError, "mode must be one of"),
        ({"maxiter": 1.5}, TypeError, "maxiter must be a positive integer"),
        ({"eta": 0.25}, ValueError, r"eta \(the trust-region acceptance ratio\)"),
        ({"preconditioner": "diag"}, ValueError, r"preconditioner must be one of \['auto', "),
        ({"preconditioner": 2}, TypeError, "preconditioner must be callable"),
    ],
)
def test_minimizer_constructor_validates(kwargs, error, match):
    with pytest.raises(error, match=match):
        Minimizer(rosen, **kwargs)
    with pytest.raises(TypeError, match="f must be callable"):
        Minimizer("rosen")
    assert not hasattr(Minimizer, "create")


def test_advance_with_args_that_do_not_fit_f_names_the_problem():
    features, labels = logistic_data(n=40)
    x0 = {"w": jnp.zeros(features.shape[1]), "b": jnp.zeros(())}
    solver = Minimizer(logistic, method="newton-cg")
    state = solver.init(x0, features, labels)
    with pytest.raises(TypeError, match=r"missing 2 required positional arguments"):
        solver.advance(state, num_steps=2)  # the data forgotten
    with pytest.raises(TypeError, match=r"takes 3 positional arguments but 4 were given"):
        solver.advance(state, features, labels, 1.0, num_steps=2)
    with pytest.raises(TypeError, match="state must be a MinimizeState"):
        solver.advance(x0, features, labels, num_steps=2)

    def linear(x, w):
        return jnp.sum(x**2) + x @ w

    lin = Minimizer(linear)
    st = lin.init(jnp.ones(2), jnp.ones(2))
    with pytest.raises(
        ValueError, match=r"f must return a scalar .*got output of shape\(s\) \(3,\)"
    ):
        lin.advance(st, jnp.ones((2, 3)), num_steps=1)
    # the same args the state was built with still work afterwards
    out = lin.advance(st, jnp.ones(2), num_steps=50)
    assert int(out.status) == 0
    np.testing.assert_allclose(out.x, -0.5 * np.ones(2), atol=1e-10)


@pytest.mark.parametrize("method", ["trust-ncg", "newton-cg"])
def test_preconditioner_of_the_wrong_structure_is_refused(method):
    with pytest.raises(ValueError, match=r"preconditioner\(x, \*args\) must have the same tree"):
        minimize(rosen, jnp.ones(2), method=method, preconditioner=lambda x: {"d": x})
    with pytest.raises(ValueError, match=r"preconditioner\(x, \*args\) must match the shapes"):
        minimize(rosen, jnp.ones(2), method=method, preconditioner=lambda x: jnp.ones(3))
    solver = Minimizer(rosen, method=method, preconditioner=lambda x: (x, x))
    with pytest.raises(ValueError, match="preconditioner"):
        solver.init(jnp.ones(2))


def test_unknown_status_message_says_so():
    res = minimize(rosen, jnp.array([-1.2, 1.0]))
    odd = res._replace(status=jnp.asarray(77))
    assert "Unknown status" in odd.message and "77" in odd.message
    both = res._replace(status=jnp.asarray([0, 77]))
    assert both.message == [hessfree.STATUS_MESSAGES[0], odd.message]
    assert set(hessfree.STATUS_MESSAGES) >= {0, 1, 2, 3, 4}


def test_state_carries_forcing_not_eta():
    assert "forcing" in hessfree.MinimizeState._fields
    assert "eta" not in hessfree.MinimizeState._fields
    solver = Minimizer(rosen, method="newton-cg")
    state = solver.init(jnp.array([-1.2, 1.0]))
    np.testing.assert_array_equal(state.forcing, 0.5)  # the first Eisenstat-Walker term
    state = solver.advance(state, num_steps=3)
    assert 0.0 < float(state.forcing) <= 0.5


@pytest.mark.parametrize("f, start", [(rosen, [-1.2, 1.0]), (helical_valley, [-1.0, 0.0, 0.0])])
def test_small_problems_compile_for_latency_with_the_same_answers(f, start):
    """x and args of at most _SMALL numbers: on CPU the programs use XLA's loop emitters
    (faster to compile); they must reach the same minimum as the default programs."""
    from hessfree._minimize import _solver

    x0 = jnp.asarray(start)
    cpu = jax.default_backend() == "cpu"
    init, advance = _solver._programs(x0, ())
    assert (advance is _solver._advance_small) == cpu and (init is _solver._init_small) == cpu
    big = (jnp.zeros(hessfree._staging.SMALL),)  # with x, one number over
    assert _solver._programs(x0, big) == (_solver._init_jit, _solver._advance_jit)

    solver = Minimizer(f, gtol=1e-9)
    steps = jnp.asarray(500, jnp.int32)
    fast = solver.result(
        _solver._advance_small(solver, _solver._init_small(solver, x0, ()), (), steps)
    )
    default = solver.result(
        _solver._advance_jit(solver, _solver._init_jit(solver, x0, ()), (), steps)
    )
    assert int(fast.status) == int(default.status) == 0, (fast.message, default.message)
    np.testing.assert_allclose(fast.x, default.x, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(minimize(f, x0, gtol=1e-9).x, default.x, rtol=1e-9, atol=1e-12)
    # under the caller's jit (and vmap) the default programs are inlined: no compile options
    # on a nested jit, which JAX refuses
    jitted = jax.jit(lambda x: minimize(f, x, gtol=1e-9).x)(x0)
    np.testing.assert_allclose(jitted, default.x, rtol=1e-9, atol=1e-12)
    batched = jax.vmap(lambda x: minimize(f, x, gtol=1e-9).x)(jnp.stack([x0, x0]))
    np.testing.assert_allclose(batched[1], default.x, rtol=1e-9, atol=1e-12)

"""hessfree.optim.hessian_free: each piece against dense float64 references, and the edges."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import hessfree as hf
from helpers import count_compiles, flat
from hessfree.optim import HessianFreeState, hessian_free
from hessfree.optim._hessian_free import _martens_cg, _save_schedule


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def make(dtype=jnp.float64, n=40, d=5, h=8, c=3, seed=0):
    k = jax.random.split(jax.random.key(seed), 5)
    p = {
        "w1": jax.random.normal(k[0], (d, h), dtype) / math.sqrt(d),
        "b1": jnp.zeros((h,), dtype),
        "w2": jax.random.normal(k[1], (h, c), dtype) / math.sqrt(h),
        "b2": jnp.zeros((c,), dtype),
    }
    X = jax.random.normal(k[2], (n, d), dtype)
    labels = jax.random.randint(k[3], (n,), 0, c)
    return p, X, labels


def xent(p, X, labels):
    logp = jax.nn.log_softmax(mlp(p, X))
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], 1))


def spd(n, cond, seed=0, dtype=jnp.float64):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return jnp.asarray(q @ np.diag(np.geomspace(1, cond, n)) @ q.T, dtype)


# --- the CG engine --------------------------------------------------------------------------


def test_save_schedule_is_martens_geometric_one():
    marks = np.flatnonzero(_save_schedule(60))
    assert marks.tolist() == sorted({math.ceil(1.3**j) for j in range(40) if 1.3**j <= 60})
    assert marks[:8].tolist() == [1, 2, 3, 4, 5, 7, 9, 11]


@pytest.mark.parametrize("precondition", [False, True])
def test_cg_converges_to_the_dense_solution_and_keeps_the_last_iterate(precondition):
    A = spd(30, 1e3)
    g = jnp.asarray(np.random.default_rng(1).normal(size=30))
    d = jnp.diag(A)
    pre = (lambda r: r / d) if precondition else (lambda r: r)
    out = _martens_cg(lambda v: A @ v, g, jnp.zeros(30), pre, 200, 1e-12, 4)
    want = np.linalg.solve(np.asarray(A), -np.asarray(g))
    np.testing.assert_allclose(out.x, want, rtol=1e-6, atol=1e-8)
    # the last iterate is among the kept ones, with its model value φ = ½xᵀAx + gᵀx
    last = int(np.argmax(np.asarray(out.slot_iter)))
    assert int(out.slot_iter[last]) == int(out.i)
    x = np.asarray(out.slots[last])
    phi = 0.5 * x @ np.asarray(A) @ x + np.asarray(g) @ x
    np.testing.assert_allclose(out.slot_phi[last], phi, rtol=1e-10)
    # every kept iterate sits on the schedule or is the last one
    marks = _save_schedule(200)
    for it in np.asarray(out.slot_iter):
        assert it == int(out.i) or marks[it]


def test_cg_progress_test_stops_early_and_warm_start_counts():
    A = spd(200, 1e6, seed=2)
    g = jnp.asarray(np.random.default_rng(3).normal(size=200))
    loose = _martens_cg(lambda v: A @ v, g, jnp.zeros(200), lambda r: r, 500, 5e-2, 4)
    tight = _martens_cg(lambda v: A @ v, g, jnp.zeros(200), lambda r: r, 500, 1e-9, 4)
    assert 10 < int(loose.i) < int(tight.i)
    # the stopping rule held where it stopped: relative progress over k iterations < k·tol
    i = int(loose.i)
    k = max(10, math.ceil(0.1 * i))
    phi = np.asarray(loose.phi)
    assert phi[i] < 0 and (phi[i] - phi[i - k]) / phi[i] < k * 5e-2
    # warm start from the solution: no progress to make, so it stops at the first test (k = 10)
    sol = jnp.asarray(np.linalg.solve(np.asarray(A), -np.asarray(g)))
    warm = _martens_cg(lambda v: A @ v, g, sol, lambda r: r, 500, 5e-4, 4)
    assert int(warm.i) <= 11
    np.testing.assert_allclose(warm.x, sol, rtol=1e-8)


def test_cg_stops_at_negative_curvature_keeping_the_last_good_iterate():
    A = jnp.diag(jnp.array([1.0, 2.0, -1.0]))
    g = jnp.array([1.0, 1.0, 1.0])
    out = _martens_cg(lambda v: A @ v, g, jnp.zeros(3), lambda r: r, 50, 5e-4, 4)
    assert bool(jnp.all(jnp.isfinite(out.x)))
    assert int(out.i) == 0 or float(out.phi[out.i]) <= 0.0


# --- one step against dense references --------------------------------------------------------


def test_first_step_solves_the_damped_gauss_newton_system():
    p, X, labels = make()
    lam = 0.3
    tx = hessian_free(mlp, "softmax_cross_entropy", initial_damping=lam, cg_maxiter=400,
                      cg_tol=1e-14, line_search=False)  # fmt: skip
    g = jax.grad(xent)(p, X, labels)
    _, state = tx.update(g, tx.init(p), p, inputs=X, targets=labels)
    G = np.asarray(hf.ggn(mlp, "softmax_cross_entropy", p, X, labels).to_dense())
    want = np.linalg.solve(G + lam * np.eye(len(G)), -flat(g))
    np.testing.assert_allclose(flat(state.direction), want, rtol=1e-6, atol=1e-9)


def test_quadratic_problem_rho_is_one_and_damping_falls():
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(50, 4)))
    Y = X @ jnp.array([1.0, -2.0, 0.5, 3.0])
    model = lambda w, x: x @ w  # noqa: E731 - the GGN of mse is the exact Hessian here
    tx = hessian_free(model, "mse", line_search=False, cg_tol=1e-10)
    w, state = jnp.zeros(4), tx.init(jnp.zeros(4))
    loss = lambda w: 0.5 * jnp.mean((model(w, X) - Y) ** 2)  # noqa: E731
    dampings = []
    for _ in range(4):
        updates, state = tx.update(jax.grad(loss)(w), state, w, inputs=X, targets=Y)
        w = optax.apply_updates(w, updates)
        np.testing.assert_allclose(state.rho, 1.0, rtol=1e-6)
        dampings.append(float(state.damping))
    np.testing.assert_allclose(dampings, [(2 / 3) ** (i + 1) for i in range(4)], rtol=1e-12)
    assert float(state.loss_after) < 1e-2 * float(loss(jnp.zeros(4)))


def test_rho_is_the_ratio_of_actual_to_predicted_reduction():
    p, X, labels = make(seed=1)
    tx = hessian_free(mlp, "softmax_cross_entropy", line_search=False, num_saved_iterates=1)
    g = jax.grad(xent)(p, X, labels)
    updates, state = tx.update(g, tx.init(p), p, inputs=X, targets=labels)
    step = state.direction  # one kept iterate: the last, which is the CG solution itself
    G = np.asarray(hf.ggn(mlp, "softmax_cross_entropy", p, X, labels).to_dense())
    s = flat(step)
    predicted = 0.5 * s @ G @ s + flat(g) @ s
    actual = float(xent(optax.apply_updates(p, step), X, labels) - xent(p, X, labels))
    np.testing.assert_allclose(state.rho, actual / predicted, rtol=1e-6)
    np.testing.assert_allclose(flat(updates), s, rtol=1e-12)
    np.testing.assert_allclose(state.loss_before, xent(p, X, labels), rtol=1e-12)


@pytest.mark.parametrize("curvature", ["ggn", "hessian", "fisher"])
@pytest.mark.parametrize("preconditioner", [False, True])
def test_training_decreases_the_loss(curvature, preconditioner):
    p, X, labels = make(n=64)
    tx = hessian_free(mlp, "softmax_cross_entropy", curvature=curvature,
                      preconditioner=preconditioner)  # fmt: skip

    @jax.jit
    def step(p, state):
        g = jax.grad(xent)(p, X, labels)
        updates, state = tx.update(g, state, p, inputs=X[:32], targets=labels[:32])
        return optax.apply_updates(p, updates), state

    state = tx.init(p)
    start = float(xent(p, X, labels))
    for _ in range(15):
        p, state = step(p, state)
    # the one-sample Monte-Carlo Fisher is a noisier curvature: a looser bar
    assert float(xent(p, X, labels)) < (0.75 if curvature == "fisher" else 0.6) * start
    assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree_util.tree_leaves(p))


def test_at_the_minimum_damping_stays_bounded_and_steps_are_converged():
    rng = np.random.default_rng(0)
    X = jnp.asarray(rng.normal(size=(30, 3)))
    Y = X @ jnp.array([1.0, -2.0, 0.5])
    model = lambda w, x: x @ w  # noqa: E731
    for dtype in (jnp.float32, jnp.float64):
        Xd, Yd = X.astype(dtype), Y.astype(dtype)
        tx = hessian_free(model, "mse")

        @jax.jit
        def step(w, state, Xd=Xd, Yd=Yd, tx=tx):
            g = jax.grad(lambda w: 0.5 * jnp.mean((model(w, Xd) - Yd) ** 2))(w)
            updates, state = tx.update(g, state, w, inputs=Xd, targets=Yd)
            return optax.apply_updates(w, updates), state

        w, state = jnp.zeros(3, dtype), tx.init(jnp.zeros(3, dtype))
        seen = []
        for _ in range(150):
            w, state = step(w, state)
            seen.append((float(state.damping), bool(state.skipped), bool(state.converged)))
        dampings = [d for d, _, _ in seen]
        assert max(dampings) <= 1.0  # never driven up by rounding noise
        assert any(c for _, _, c in seen[-50:]) or not any(s for _, s, _ in seen[-50:])
        np.testing.assert_allclose(w, [1.0, -2.0, 0.5], rtol=1e-3 if dtype == jnp.float32 else 1e-9)
        assert w.dtype == dtype and state.damping.dtype == dtype


def test_cross_entropy_at_the_float32_floor_is_converged_not_skipped():
    # a separable 2-class problem drives the cross-entropy to float32's floor (~1e-8), where a
    # mean of logs of sums >= 1 moves in steps of eps, not eps·f: those steps are rounding
    # (converged), not failed line searches (skipped, λ raised) as a relative test read them
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    f32 = jnp.float32
    X = jax.random.normal(k1, (256, 2), f32)
    labels = (X[:, 0] * X[:, 1] > 0).astype(jnp.int32)
    params = {
        "w1": jax.random.normal(k2, (2, 32), f32) / 1.4, "b1": jnp.zeros(32, f32),
        "w2": jax.random.normal(k3, (32, 2), f32) / 5.6, "b2": jnp.zeros(2, f32),
    }  # fmt: skip
    tx = hessian_free(mlp, "softmax_cross_entropy")

    @jax.jit
    def step(p, state):
        g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
            mlp(p, X), labels).mean())(p)  # fmt: skip
        updates, state = tx.update(g, state, p, inputs=X, targets=labels)
        return optax.apply_updates(p, updates), state

    state = tx.init(params)
    rows = []
    for _ in range(150):
        params, state = step(params, state)
        rows.append((float(state.loss_after), bool(state.skipped), bool(state.converged)))
    assert rows[-1][0] < 1e-6  # it did reach the floor
    assert sum(s for _, s, _ in rows) == 0
    assert all(c for _, _, c in rows[-20:])
    assert float(state.damping) < 1.0
    # converged is not claimed while the loss still falls well above rounding
    assert not any(c for loss, _, c in rows if loss > 1e-4)


# --- failures are skipped steps, never NaN parameters ---------------------------------------


def test_nonfinite_gradient_skips_the_step():
    p, X, labels = make()
    tx = hessian_free(mlp, "softmax_cross_entropy")
    state = tx.init(p)
    g = jax.tree_util.tree_map(
        lambda a: a.at[(0,) * a.ndim].set(jnp.nan), jax.grad(xent)(p, X, labels)
    )
    updates, new = tx.update(g, state, p, inputs=X, targets=labels)
    assert bool(new.skipped)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))
    np.testing.assert_allclose(new.damping, 1.5 * state.damping)
    assert all(bool(jnp.all(d == 0)) for d in jax.tree_util.tree_leaves(new.direction))


def test_out_of_range_targets_raise_eagerly_and_skip_under_jit():
    p, X, labels = make()
    tx = hessian_free(mlp, "softmax_cross_entropy")
    g = jax.grad(xent)(p, X, labels)
    bad = labels.at[0].set(7)
    with pytest.raises(ValueError, match="targets"):
        tx.update(g, tx.init(p), p, inputs=X, targets=bad)
    updates, state = jax.jit(lambda t: tx.update(g, tx.init(p), p, inputs=X, targets=t))(bad)
    assert bool(state.skipped)
    assert all(bool(jnp.all(u == 0)) for u in jax.tree_util.tree_leaves(updates))


def test_nan_loss_in_the_model_skips_the_step():
    p, X, labels = make()
    tx = hessian_free(mlp, "softmax_cross_entropy")
    Xnan = X.at[3, 0].set(jnp.inf)
    g = jax.grad(xent)(p, X, labels)
    updates, state = jax.jit(lambda x: tx.update(g, tx.init(p), p, inputs=x, targets=labels))(Xnan)
    assert bool(state.skipped)
    assert all(bool(jnp.all(jnp.isfinite(u))) for u in jax.tree_util.tree_leaves(updates))


# --- bad input and settings ---------------------------------------------------------------


def test_bad_settings_and_calls_are_named():
    p, X, labels = make()
    with pytest.raises(ValueError, match="curvature"):
        hessian_free(mlp, "softmax_cross_entropy", curvature="kfac")
    with pytest.raises(ValueError, match="loss"):
        hessian_free(mlp, "hinge")
    with pytest.raises(ValueError, match="curvature='fisher' needs a named loss"):
        hessian_free(mlp, lambda o, t: jnp.mean(o), curvature="fisher")
    with pytest.raises(ValueError, match="cg_decay"):
        hessian_free(mlp, "mse", cg_decay=1.5)
    with pytest.raises(ValueError, match="initial_damping"):
        hessian_free(mlp, "mse", initial_damping=-1.0)
    with pytest.raises(ValueError, match="max_damping"):
        hessian_free(mlp, "mse", max_damping=0.5)
    with pytest.raises(ValueError, match="cg_maxiter"):
        hessian_free(mlp, "mse", cg_maxiter=0)
    with pytest.raises(TypeError, match="model must be callable"):
        hessian_free("mlp", "mse")
    tx = hessian_free(mlp, "softmax_cross_entropy")
    g = jax.grad(xent)(p, X, labels)
    with pytest.raises(TypeError, match=r"inputs= and targets=.*missing \['targets'\]"):
        tx.update(g, tx.init(p), p, inputs=X)
    with pytest.raises(TypeError, match="params must be given"):
        tx.update(g, tx.init(p))
    with pytest.raises((TypeError, ValueError), match=r"inputs|model"):
        tx.update(g, tx.init(p), p, inputs={"x": X}, targets=labels)
    with pytest.raises(TypeError, match="params must be a pytree of arrays"):
        tx.init({"w": "x"})


# --- state, dtypes, loops -------------------------------------------------------------------


def test_state_is_a_pytree_and_float32_stays_float32():
    p, X, labels = make(jnp.float32)
    tx = hessian_free(mlp, "softmax_cross_entropy")
    state = tx.init(p)
    assert isinstance(state, HessianFreeState)
    g = jax.grad(xent)(p, X, labels)
    updates, state = jax.jit(tx.update)(g, state, p, inputs=X, targets=labels)
    for leaf in jax.tree_util.tree_leaves((updates, state.direction)):
        assert leaf.dtype == jnp.float32
    assert state.damping.dtype == jnp.float32 and state.rho.dtype == jnp.float32
    # a state goes through flatten/unflatten (checkpointing) and resumes identically
    leaves, treedef = jax.tree_util.tree_flatten(state)
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    a = tx.update(g, state, p, inputs=X, targets=labels)[0]
    b = tx.update(g, again, p, inputs=X, targets=labels)[0]
    np.testing.assert_array_equal(flat(a), flat(b))


def test_no_recompiles_in_a_loop_eager_and_jitted():
    p, X, labels = make()
    tx = hessian_free(mlp, "softmax_cross_entropy", preconditioner=True)

    @jax.jit
    def step(p, state):
        g = jax.grad(xent)(p, X, labels)
        updates, state = tx.update(g, state, p, inputs=X, targets=labels)
        return optax.apply_updates(p, updates), state

    state = tx.init(p)
    q, s = p, state
    for i in range(4):
        with count_compiles() as jitted:
            p, state = step(p, state)
        g = jax.grad(xent)(q, X, labels)
        with count_compiles() as eager:
            updates, s = tx.update(g, s, q, inputs=X, targets=labels)
        q = optax.apply_updates(q, updates)
        if i:
            assert jitted == [] and eager == [], (jitted, eager)
    # a new transformation with equal settings reuses the compiled update
    tx2 = hessian_free(mlp, "softmax_cross_entropy", preconditioner=True)
    with count_compiles() as again:
        tx2.update(jax.grad(xent)(q, X, labels), s, q, inputs=X, targets=labels)
    assert again == []
    np.testing.assert_allclose(flat(q), flat(p), rtol=1e-9)


def test_vmap_over_independent_problems():
    p, X, labels = make()
    tx = hessian_free(mlp, "softmax_cross_entropy")
    ps = jax.tree_util.tree_map(lambda a: jnp.stack([a, 1.1 * a]), p)

    def one(p):
        g = jax.grad(xent)(p, X, labels)
        return tx.update(g, tx.init(p), p, inputs=X, targets=labels)[0]

    batched = jax.vmap(one)(ps)
    for i in range(2):
        single = one(jax.tree_util.tree_map(lambda a, i=i: a[i], ps))
        np.testing.assert_allclose(
            flat(jax.tree_util.tree_map(lambda a, i=i: a[i], batched)),
            flat(single),
            rtol=1e-6,
            atol=1e-9,
        )

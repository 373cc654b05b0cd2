"""influence, self_influence, predicted_loss_change: against dense float64 formulas and retraining.

The main problem is L2-regularized logistic regression on sklearn's breast-cancer data (30
standardized features plus a bias, P = 31), objective

    R(θ) = (1/N) Σ_i ℓ(θ, z_i) + (α/2)‖θ‖²,   α = 1e-2 (the bias is regularized too),

trained to machine precision by Newton's method on the dense ``jax.hessian`` over
``ravel_pytree`` (independent of hessfree). The references: per-example gradients by
``jax.grad`` over ``ravel_pytree``, ``H = jax.hessian(R)``, ``scores = −G_test (H + λI)⁻¹
G_trainᵀ`` by ``numpy.linalg.solve``, and actual leave-one-out retraining (the same Newton
iteration, warm-started, on ``(1/N) Σ_{j≠i} ℓ_j + (α/2)‖θ‖²``).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.flatten_util import ravel_pytree
from scipy.stats import pearsonr, spearmanr
from sklearn.datasets import load_breast_cancer

import hessfree as hf
from helpers import count_compiles
from hessfree import (
    InfluenceScores,
    influence,
    predicted_loss_change,
    self_influence,
)

ALPHA = 1e-2
N_TRAIN, N_TEST = 400, 5


def example_loss(params, example):
    x, y = example
    logit = x @ params["w"] + params["b"]
    return jnp.logaddexp(0.0, logit) - y * logit


def objective(params, x, y, weights):
    losses = jax.vmap(example_loss, (None, 0))(params, (x, y))
    penalty = jnp.sum(params["w"] ** 2) + params["b"] ** 2
    return jnp.sum(weights * losses) / x.shape[0] + 0.5 * ALPHA * penalty


@functools.cache
def data(dtype=np.float64):
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order], y[order]
    x = (x - x[:N_TRAIN].mean(0)) / x[:N_TRAIN].std(0)
    x, y = jnp.asarray(x, dtype), jnp.asarray(y, dtype)
    return (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


@functools.cache
def newton():
    """A jitted Newton iteration (dense Hessian) on R with per-example weights."""
    (x, y), _ = data()
    _, unravel = ravel_pytree({"w": jnp.zeros(30), "b": jnp.zeros(())})

    @jax.jit
    def run(flat, weights):
        def f(z):
            return objective(unravel(z), x, y, weights)

        def step(z, _):
            return z - jnp.linalg.solve(jax.hessian(f)(z), jax.grad(f)(z)), None

        return jax.lax.scan(step, flat, None, length=25)[0]

    return run, unravel


@functools.cache
def lr():
    """Trained logistic regression with its dense references (float64)."""
    train, test = data()
    run, unravel = newton()
    ones = jnp.ones(N_TRAIN)
    flat = run(jnp.zeros(31), ones)
    params = unravel(flat)
    test = (test[0][:N_TEST], test[1][:N_TEST])
    H_dense = np.asarray(jax.hessian(lambda z: objective(unravel(z), *train, ones))(flat))
    grads = jax.vmap(lambda z: ravel_pytree(jax.grad(example_loss)(params, z))[0])
    op = hf.hessian(objective, params, *train, ones)
    return {
        "params": params,
        "flat": flat,
        "train": train,
        "test": test,
        "H": op,
        "H_dense": H_dense,
        "G_train": np.asarray(grads(train)),
        "G_test": np.asarray(grads(test)),
        "ones": ones,
    }


def dense_scores(p, damping=0.0):
    """``−G_test (H + λI)⁻¹ G_trainᵀ`` by numpy.linalg.solve."""
    H = p["H_dense"] + damping * np.eye(p["H_dense"].shape[0])
    return -p["G_test"] @ np.linalg.solve(H, p["G_train"].T)


def rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


# --- exactness -----------------------------------------------------------------------------------


@pytest.mark.parametrize("damping", [0.0, 0.05])
def test_cg_matches_dense_formula(damping):
    p = lr()
    res = influence(p["H"], example_loss, p["params"], p["train"], p["test"], damping=damping, rtol=1e-10)  # fmt: skip
    assert isinstance(res, InfluenceScores)
    assert res.scores.shape == (N_TEST, N_TRAIN) and res.scores.dtype == jnp.float64
    assert res.status.shape == (N_TEST,) and bool(res.success.all())
    assert int(res.num_matvecs) > 0
    assert rel_err(res.scores, dense_scores(p, damping)) < 1e-8


def test_arnoldi_at_full_rank_equals_cg():
    p = lr()
    args = (p["H"], example_loss, p["params"], p["train"], p["test"])
    exact = influence(*args, rtol=1e-10)
    full = influence(*args, method="arnoldi", rank=31, key=jax.random.PRNGKey(0))
    assert bool(full.success.all())
    assert rel_err(full.scores, np.asarray(exact.scores)) < 1e-7


def test_arnoldi_at_low_rank_is_the_truncated_inverse():
    """rank k: ``−G_test V diag(1/(s + λ)) Vᵀ G_trainᵀ`` over the top k eigenpairs; the rest of
    the gradients is dropped (the documented approximation)."""
    p = lr()
    k, damping = 8, 0.01
    res = influence(
        p["H"], example_loss, p["params"], p["train"], p["test"], method="arnoldi", rank=k,
        damping=damping, key=jax.random.PRNGKey(1),
    )  # fmt: skip
    s, V = np.linalg.eigh(p["H_dense"])
    top = np.argsort(-np.abs(s))[:k]
    s, V = s[top], V[:, top]
    ref = -(p["G_test"] @ V) / (s + damping) @ (V.T @ p["G_train"].T)
    assert bool(res.success.all())
    assert rel_err(res.scores, ref) < 1e-6
    assert rel_err(res.scores, dense_scores(p, damping)) > 1e-2  # truncation is visible here


def test_arnoldi_reuses_precomputed_eigenpairs():
    """An EigshResult as A: the same scores as computing it inside, no products spent; a
    smaller rank uses the eigenpairs of largest magnitude."""
    p = lr()
    args = (example_loss, p["params"], p["train"], p["test"])
    key = jax.random.PRNGKey(1)
    eig = hf.eigsh(p["H"], 8, key=key, which="LM")
    inside = influence(p["H"], *args, method="arnoldi", rank=8, key=key, damping=0.01)
    given = influence(eig, *args, method="arnoldi", damping=0.01)
    np.testing.assert_allclose(given.scores, inside.scores, rtol=1e-12)
    assert int(given.num_matvecs) == 0 and int(inside.num_matvecs) > 0
    s, V = np.linalg.eigh(p["H_dense"])
    top = np.argsort(-np.abs(s))[:4]
    ref = -(p["G_test"] @ V[:, top]) / (s[top] + 0.01) @ (V[:, top].T @ p["G_train"].T)
    four = influence(eig, *args, method="arnoldi", rank=4, damping=0.01)
    assert rel_err(four.scores, ref) < 1e-6
    with pytest.raises(ValueError, match="at most the number of eigenpairs"):
        influence(eig, *args, method="arnoldi", rank=9)
    with pytest.raises(ValueError, match="only method='arnoldi'"):
        influence(eig, *args)


def test_lissa_converges_toward_cg():
    """Exact products, scale = λ_max(H) (dense): the error falls with depth to CG's; the
    default scale (estimated by eigsh) converges as well."""
    p = lr()
    args = (p["H"], example_loss, p["params"], p["train"], p["test"])
    ref = dense_scores(p)
    lam_max = float(np.linalg.eigvalsh(p["H_dense"])[-1])
    errors, statuses = [], []
    for depth in (10, 100, 3000):
        res = influence(*args, method="lissa", lissa_scale=lam_max, lissa_depth=depth, rtol=1e-9)
        errors.append(rel_err(res.scores, ref))
        statuses.append(np.asarray(res.status))
    print(f"lissa, depth 10/100/3000: relative error {errors}")
    assert errors[0] > errors[1] > errors[2]
    assert errors[0] > 1e-2 and errors[2] < 1e-7
    assert np.all(statuses[0] == 1) and np.all(statuses[2] == 0)  # depth 10: maxiter
    default = influence(*args, method="lissa", key=jax.random.PRNGKey(2), rtol=1e-9, lissa_depth=3000)  # fmt: skip
    assert bool(default.success.all())
    assert rel_err(default.scores, ref) < 1e-7


# --- what the scores predict ---------------------------------------------------------------------


def test_predicted_removal_matches_leave_one_out_retraining():
    """The 30 training points with the largest predicted effect on the worst-fit test point,
    each removed and the model retrained: Pearson of predicted vs actual test-loss change."""
    p = lr()
    run, unravel = newton()
    (x_te, y_te) = data()[1]
    test_losses = jax.vmap(example_loss, (None, 0))(p["params"], (x_te, y_te))
    t = int(jnp.argmax(test_losses))
    z = (x_te[t], y_te[t])
    res = influence(p["H"], example_loss, p["params"], p["train"], (x_te[t : t + 1], y_te[t : t + 1]), rtol=1e-10)  # fmt: skip
    predicted = np.asarray(predicted_loss_change(res, N_TRAIN))[0]
    chosen = np.argsort(-np.abs(predicted))[:30]
    base = float(example_loss(p["params"], z))
    actual = [
        float(example_loss(unravel(run(p["flat"], p["ones"].at[i].set(0.0))), z)) - base
        for i in chosen
    ]
    r = pearsonr(predicted[chosen], actual)[0]
    print(f"leave-one-out: Pearson(predicted, actual) = {r:.4f} over {len(chosen)} points")
    assert r >= 0.95


def test_self_influence_is_minus_the_diagonal():
    """Also the chunked path: self_influence in chunks of 16 (16, 16, 8) against the
    unchunked influence matrix."""
    p = lr()
    sub = jax.tree_util.tree_map(lambda a: a[:40], p["train"])
    for options in ({"method": "cg", "rtol": 1e-10}, {"method": "arnoldi", "rank": 8}):
        options = {**options, "key": jax.random.PRNGKey(1), "damping": 0.01}
        full = influence(p["H"], example_loss, p["params"], sub, sub, **options)
        own = self_influence(p["H"], example_loss, p["params"], sub, chunk_size=16, **options)
        assert own.scores.shape == (40,) and own.status.shape == (40,)
        assert bool(own.success.all()) and bool(full.success.all())
        assert bool(jnp.all(own.scores > 0))  # positive convention
        np.testing.assert_allclose(own.scores, -jnp.diag(full.scores), rtol=1e-8)


def test_solves_one_after_another_give_the_vmapped_scores(monkeypatch):
    """On CPU, operators on more than hessfree._krylov.SEQUENTIAL parameters solve their
    points one after another by default. Lowered to 0 here, this small problem takes that
    path (cg and lissa), with one point fewer so its programs are compiled afresh; each
    point's solve is its own, so the scores are the vmapped ones."""
    p = lr()
    train = jax.tree_util.tree_map(lambda a: a[:24], p["train"])
    test = jax.tree_util.tree_map(lambda a: a[:7], data()[1])
    fewer = jax.tree_util.tree_map(lambda a: a[:-1], train), jax.tree_util.tree_map(lambda a: a[:-1], test)  # fmt: skip
    for options in ({"method": "cg", "rtol": 1e-10}, {"method": "lissa", "lissa_scale": 2.0}):
        options = {**options, "damping": 0.05}
        together = influence(p["H"], example_loss, p["params"], train, test, **options)
        own_together = self_influence(p["H"], example_loss, p["params"], train, **options)
        with monkeypatch.context() as m:
            m.setattr(hf._krylov, "SEQUENTIAL", 0)
            apart = influence(p["H"], example_loss, p["params"], train, fewer[1], **options)
            own_apart = self_influence(p["H"], example_loss, p["params"], fewer[0], **options)
        assert bool(apart.success.all()) and bool(own_apart.success.all())
        np.testing.assert_allclose(apart.scores, together.scores[:-1], rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(own_apart.scores, own_together.scores[:-1], rtol=1e-9)


def test_mlp_arnoldi_at_low_rank_ranks_like_cg():
    """A 30-16-1 tanh MLP (P = 513) on 300 training points, L2 α = 1e-2, trained by L-BFGS to
    a small gradient. A = its Hessian (positive definite there). Arnoldi at rank 20 against
    CG: mean Spearman over 10 test points of the scores of all training points."""
    (x, y), (x_te, y_te) = data()
    x, y, x_te, y_te = x[:300], y[:300], x_te[:10], y_te[:10]

    def mlp_loss(p, z):
        xi, yi = z
        o = jnp.tanh(xi @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return jnp.logaddexp(0.0, o) - yi * o

    def mlp_objective(p, x, y):
        penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(p))
        return jnp.mean(jax.vmap(mlp_loss, (None, 0))(p, (x, y))) + 0.5 * ALPHA * penalty

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    p0 = {
        "w1": jax.random.normal(k1, (30, 16), jnp.float64) / np.sqrt(30),
        "b1": jnp.zeros(16),
        "w2": jax.random.normal(k2, (16,), jnp.float64) / 4,
        "b2": jnp.zeros(()),
    }
    flat0, unravel = ravel_pytree(p0)
    value_and_grad = jax.jit(jax.value_and_grad(lambda z: mlp_objective(unravel(z), x, y)))
    fit = scipy.optimize.minimize(
        lambda z: tuple(np.asarray(v) for v in value_and_grad(jnp.asarray(z))),
        np.asarray(flat0), jac=True, method="L-BFGS-B",
        options={"maxiter": 5000, "gtol": 1e-9, "ftol": 0.0},
    )  # fmt: skip
    params = unravel(jnp.asarray(fit.x))
    H = hf.hessian(mlp_objective, params, x, y)
    args = (H, mlp_loss, params, (x, y), (x_te, y_te))
    exact = influence(*args, rtol=1e-8)
    assert bool(exact.success.all())  # CG met no negative curvature: H is positive definite
    low = influence(*args, method="arnoldi", rank=20, key=jax.random.PRNGKey(3))
    assert bool(low.success.all())
    rhos = [spearmanr(low.scores[i], exact.scores[i])[0] for i in range(10)]
    print(f"MLP, rank 20 of 513: Spearman vs CG mean {np.mean(rhos):.3f}, min {np.min(rhos):.3f}")
    assert np.mean(rhos) >= 0.7


# --- statuses, pytrees, dtypes, jit -------------------------------------------------------------


def test_singular_curvature_without_damping_is_a_status_not_nan():
    """Feature 2 is zero in every training point, so the Hessian of the (unregularized) mean
    loss is singular; a test point with feature 2 set has a gradient outside its range."""
    x = jnp.array([[1.0, 0.5, 0.0], [-0.3, 1.0, 0.0], [0.7, -1.2, 0.0], [0.2, 0.1, 0.0]])
    y = jnp.array([1.0, 0.0, 1.0, 0.0])
    test = (jnp.array([[0.5, 0.5, 0.0], [0.5, 0.5, 2.0]]), jnp.array([1.0, 1.0]))
    params = {"w": jnp.array([0.3, -0.2, 0.0]), "b": jnp.zeros(())}
    H = hf.hessian(lambda p: jnp.mean(jax.vmap(example_loss, (None, 0))(p, (x, y))), params)
    cases = [
        {"method": "cg"},
        {"method": "arnoldi", "rank": 4, "key": jax.random.PRNGKey(0)},
        {"method": "lissa", "lissa_scale": 1.0, "lissa_depth": 500},
    ]
    for options in cases:
        res = influence(H, example_loss, params, (x, y), test, **options)
        assert bool(jnp.all(jnp.isfinite(res.scores))), options
        assert not bool(res.success[1]), options  # the gradient outside the range
        if options["method"] == "arnoldi":
            assert int(res.status[0]) == 5  # the zero eigenvalue dropped, and said so
        else:
            assert bool(res.success[0]), options  # this gradient is in the range: solvable
        damped = influence(H, example_loss, params, (x, y), test, damping=0.1, **options)
        assert bool(damped.success.all()), options


def test_pytree_params_callable_and_dense_operators_agree():
    p = lr()
    ref = dense_scores(p, 0.1)
    # nested params, A as a plain callable v -> H v
    (x, y) = p["train"]
    nested = ((p["params"]["w"][:10], p["params"]["w"][10:]), {"b": p["params"]["b"]})

    def loss_nested(q, z):
        return example_loss({"w": jnp.concatenate(q[0]), "b": q[1]["b"]}, z)

    def obj_nested(q):
        return jnp.mean(jax.vmap(loss_nested, (None, 0))(q, (x, y))) + 0.5 * ALPHA * sum(
            jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(q)
        )

    res = influence(lambda v: hf.hvp(obj_nested, nested, v), loss_nested, nested, p["train"], p["test"], damping=0.1, rtol=1e-10)  # fmt: skip
    assert rel_err(res.scores, ref) < 1e-8
    # a dense (P, P) matrix on flat parameters
    _, unravel = ravel_pytree(p["params"])

    def loss_flat(z, ex):
        return example_loss(unravel(z), ex)

    res = influence(jnp.asarray(p["H_dense"]), loss_flat, p["flat"], p["train"], p["test"], damping=0.1, rtol=1e-10)  # fmt: skip
    assert rel_err(res.scores, ref) < 1e-8
    # the Hessian of the SUM (N times the mean's, damping scaled alike) with num_train = 1
    # predicts the same removal effects as the mean's with num_train = N
    summed = influence(N_TRAIN * jnp.asarray(p["H_dense"]), loss_flat, p["flat"], p["train"], p["test"], damping=0.1 * N_TRAIN, rtol=1e-10)  # fmt: skip
    np.testing.assert_allclose(
        predicted_loss_change(summed, 1), predicted_loss_change(res, N_TRAIN), rtol=1e-7
    )


def test_float32():
    p = lr()
    train, test = data(np.float32)
    test = jax.tree_util.tree_map(lambda a: a[:N_TEST], test)
    params = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), p["params"])
    H = hf.hessian(objective, params, *train, jnp.ones(N_TRAIN, jnp.float32))
    res = influence(H, example_loss, params, train, test, rtol=1e-4)
    assert res.scores.dtype == jnp.float32 and bool(res.success.all())
    assert rel_err(res.scores, dense_scores(p)) < 1e-3


def test_jit_and_no_recompile_at_new_parameters():
    p = lr()
    (x, y), test, ones = p["train"], p["test"], p["ones"]

    def scores(params):
        H = hf.hessian(objective, params, x, y, ones)
        return influence(H, example_loss, params, (x, y), test, damping=0.1).scores

    eager = scores(p["params"])
    np.testing.assert_allclose(jax.jit(scores)(p["params"]), eager, rtol=1e-6)
    moved = jax.tree_util.tree_map(lambda a: a * 1.01, p["params"])
    scores(moved)
    with count_compiles() as compiles:
        again = jax.tree_util.tree_map(lambda a: a * 0.99, p["params"])
        jax.block_until_ready(scores(again))
    assert compiles == []


def test_predicted_loss_change_convention():
    scores = jnp.array([[2.0, -4.0]])
    np.testing.assert_allclose(predicted_loss_change(scores, 4), [[-0.5, 1.0]])
    wrapped = InfluenceScores(scores, jnp.zeros(1, jnp.int32), jnp.ones(1, bool), jnp.zeros((), jnp.int32))  # fmt: skip
    np.testing.assert_allclose(predicted_loss_change(wrapped, 2), [[-1.0, 2.0]])
    with pytest.raises(ValueError, match="num_train"):
        predicted_loss_change(scores, 0)
    with pytest.raises(TypeError, match="floating"):
        predicted_loss_change(jnp.array([1, 2]), 2)


# --- bad input -----------------------------------------------------------------------------------


def _vector_loss(params, example):
    return params["w"] * example[0][0]


KEY = jax.random.PRNGKey(0)
BAD_OPTIONS = [
    ({"method": "newton"}, ValueError, "method must be one of"),
    ({"damping": -1.0}, ValueError, "damping"),
    ({"method": "arnoldi", "key": KEY}, ValueError, "needs rank="),
    ({"method": "arnoldi", "rank": 32, "key": KEY}, ValueError, "rank must be at most"),
    ({"method": "arnoldi", "rank": 0, "key": KEY}, ValueError, "rank"),
    ({"method": "arnoldi", "rank": 3}, ValueError, "needs key="),
    ({"method": "lissa"}, ValueError, "lissa_scale"),
    ({"method": "lissa", "lissa_scale": 0.0}, ValueError, "lissa_scale"),
    ({"chunk_size": 0}, ValueError, "chunk_size"),
    ({"rtol": -1e-3}, ValueError, "rtol"),
    ({"key": "seed"}, TypeError, "key must be a jax.random key"),
]
BAD_ARGUMENTS = [
    ("example_loss", lambda _: _vector_loss, ValueError, "example_loss must return a scalar"),
    ("test", lambda te: (te[0][:, :5], te[1]), ValueError, "shaped like train"),
    ("test", lambda te: {"x": te[0], "y": te[1]}, ValueError, "same tree structure"),
    ("test", lambda te: (te[0], te[1][:2]), ValueError, "leading axis"),
    ("A", lambda _: "hessian", TypeError, "A must be"),
    ("params", lambda q: {"w": q["w"].astype(jnp.int32), "b": q["b"]}, TypeError, "float"),
]


def _arguments():
    p = lr()
    return {
        "A": p["H"],
        "example_loss": example_loss,
        "params": p["params"],
        "train": p["train"],
        "test": p["test"],
    }


@pytest.mark.parametrize(("options", "error", "match"), BAD_OPTIONS)
def test_bad_options_raise_named_errors(options, error, match):
    with pytest.raises(error, match=match):
        influence(*_arguments().values(), **options)


@pytest.mark.parametrize(("name", "change", "error", "match"), BAD_ARGUMENTS)
def test_bad_arguments_raise_named_errors(name, change, error, match):
    args = _arguments()
    args[name] = change(args[name])
    with pytest.raises(error, match=match):
        influence(*args.values())


def test_bad_operator_structure():
    p = lr()
    other = hf.hessian(lambda q: jnp.sum(q["w"] ** 2), {"w": jnp.zeros(31)})
    with pytest.raises(ValueError, match="params"):
        influence(other, example_loss, p["params"], p["train"], p["test"])
    with pytest.raises(ValueError, match="1-D array"):
        influence(jnp.eye(31), example_loss, p["params"], p["train"], p["test"])


# --- the example ---------------------------------------------------------------------------------


def test_breast_cancer_example_finds_flipped_labels():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        import influence_breast_cancer
    finally:
        sys.path.pop(0)
    out = influence_breast_cancer.main(num_train=300, method="arnoldi", rank=31, verbose=False)
    assert out["train_success"] and out["influence_success"] and out["self_influence_success"]
    assert len(out["explained"]) == 3
    for e in out["explained"]:
        assert len(e["train_indices"]) == 5 and all(np.isfinite(e["predicted_change"]))
    # flipped labels rank high: far above chance among the top k = number flipped
    assert out["recall_self_influence"] >= 0.5 > 5 * out["recall_chance"]

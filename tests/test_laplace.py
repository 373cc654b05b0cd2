"""laplace: posterior precision, evidence, variances, samples and predictives vs dense float64.

The references are built independently of the code under test: per-example Jacobians by
``jax.jacfwd`` over ``ravel_pytree``, per-example NLL Hessians by ``jax.hessian`` of the NLL
written out by hand, ``Λ = δI + Σ_n J_nᵀ H_n J_n``, ``slogdet`` and ``inv``.
"""

from __future__ import annotations

import functools
import math
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from helpers import count_compiles, flat
from hessfree import Laplace, Predictive, laplace

N, D_IN, HIDDEN = 8, 3, 4
OUT = {"categorical": 3, "gaussian": 2, "bernoulli": 2}
LIKELIHOODS = ["categorical", "gaussian", "bernoulli"]
SIGMA = {"categorical": 1.0, "gaussian": 0.7, "bernoulli": 1.0}
DELTA = 0.8


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


@functools.cache
def problem(likelihood, dtype=jnp.float64):
    if dtype != jnp.float64:
        return jax.tree.map(lambda a: a.astype(dtype) if a.dtype == jnp.float64 else a, problem(likelihood))  # fmt: skip
    k = jax.random.split(jax.random.PRNGKey(0), 6)
    c = OUT[likelihood]
    params = {
        "w1": jax.random.normal(k[0], (D_IN, HIDDEN)),
        "b1": 0.1 * jax.random.normal(k[1], (HIDDEN,)),
        "w2": jax.random.normal(k[2], (HIDDEN, c)) / 2,
        "b2": 0.3 * jax.random.normal(k[3], (c,)),
    }
    x = jax.random.normal(k[4], (N, D_IN))
    if likelihood == "categorical":
        y = jax.random.randint(k[5], (N,), 0, c)
    elif likelihood == "gaussian":
        y = jax.random.normal(k[5], (N, c))
    else:
        y = jax.random.bernoulli(k[5], 0.4, (N, c)).astype(jnp.float64)
    return params, x, y


@functools.cache
def build(likelihood, structure, prior=DELTA):
    params, x, y = problem(likelihood)
    rank = flat(params).size if structure == "lowrank" else None  # rank = P: exact
    return laplace(
        mlp, params, x, y, likelihood=likelihood, structure=structure,
        prior_precision=prior, sigma_noise=SIGMA[likelihood], rank=rank,
        key=jax.random.PRNGKey(1),
    )  # fmt: skip


# --- independent dense references -------------------------------------------------------------


def example_nll(likelihood, o, y, sigma):
    """−log p(y | o) of one example, by hand (constants included)."""
    if likelihood == "categorical":
        return -jax.nn.log_softmax(o)[y]
    if likelihood == "gaussian":
        return 0.5 * jnp.sum((o - y) ** 2) / sigma**2 + 0.5 * o.size * jnp.log(2 * jnp.pi * sigma**2)  # fmt: skip
    return jnp.sum(jnp.logaddexp(0.0, o) - y * o)


@functools.cache
def dense(likelihood):
    """``(θ flat, Σ_n J_nᵀ H_n J_n, Σ_n ℓ_n, J at the training inputs, unravel)``."""
    params, x, y = problem(likelihood)
    z, unravel = ravel_pytree(params)
    sigma = SIGMA[likelihood]
    J = np.asarray(jax.jacfwd(lambda q: mlp(unravel(q), x))(z))  # (N, C, P)
    out = mlp(params, x)
    H = np.asarray(jax.vmap(jax.hessian(lambda o, t: example_nll(likelihood, o, t, sigma)))(out, y))  # fmt: skip
    NG = np.einsum("nkp,nkl,nlq->pq", J, H, J)
    nll = float(jnp.sum(jax.vmap(lambda o, t: example_nll(likelihood, o, t, sigma))(out, y)))
    return np.asarray(z), NG, nll, J


def dense_logml(z, NG, nll, d, structure="full"):
    """``−Σℓ − ½ Σ d θ² + ½ Σ log d − ½ log det Λ``, d the prior diagonal (vector)."""
    lam = np.diag(d) + NG if structure == "full" else np.diag(d + np.diag(NG))
    return -nll - 0.5 * np.sum(d * z**2) + 0.5 * np.sum(np.log(d)) - 0.5 * np.linalg.slogdet(lam)[1]


def jacobian_at(params, x):
    z, unravel = ravel_pytree(params)
    return np.asarray(jax.jacfwd(lambda q: mlp(unravel(q), x))(z))


# --- posterior precision and evidence ----------------------------------------------------------


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_full_precision_and_logml_match_dense(likelihood):
    z, NG, nll, _ = dense(likelihood)
    la = build(likelihood, "full")
    assert isinstance(la, Laplace) and la.num_data == N
    lam = np.asarray(la.posterior_precision.to_dense())
    np.testing.assert_allclose(lam, DELTA * np.eye(z.size) + NG, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(
        float(la.log_marginal_likelihood()), dense_logml(z, NG, nll, np.full(z.size, DELTA)), rtol=1e-10
    )  # fmt: skip
    # new δ and σ from the cache: Λ = δI + NG₁/σ² (NG scales by σ²_old/σ²_new)
    if likelihood == "gaussian":
        s_old, s_new = SIGMA[likelihood], 1.3
        NG2 = NG * s_old**2 / s_new**2
        _, x, y = problem(likelihood)
        out = mlp(problem(likelihood)[0], x)
        nll2 = float(sum(example_nll(likelihood, out[n], y[n], s_new) for n in range(N)))
        want = dense_logml(z, NG2, nll2, np.full(z.size, 2.5))
        np.testing.assert_allclose(float(la.log_marginal_likelihood(2.5, s_new)), want, rtol=1e-10)


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
def test_diagonal_precision_variance_and_logml(likelihood):
    z, NG, nll, _ = dense(likelihood)
    la = build(likelihood, "diagonal")
    lam = DELTA + np.diag(NG)
    np.testing.assert_allclose(np.diag(la.posterior_precision.to_dense()), lam, rtol=1e-10)
    np.testing.assert_allclose(flat(la.variance()), 1 / lam, rtol=1e-10)
    want = dense_logml(z, NG, nll, np.full(z.size, DELTA), structure="diagonal")
    np.testing.assert_allclose(float(la.log_marginal_likelihood()), want, rtol=1e-10)


def test_per_leaf_prior_precision():
    z, NG, nll, _ = dense("categorical")
    params = problem("categorical")[0]
    prior = {"w1": 0.5, "b1": 2.0, "w2": 1.5, "b2": jnp.linspace(0.5, 1.0, 3)}
    d = flat(jax.tree.map(lambda p, v: jnp.broadcast_to(jnp.asarray(v, p.dtype), p.shape), params, prior))  # fmt: skip
    la = build("categorical", "full")
    np.testing.assert_allclose(float(la.log_marginal_likelihood(prior)), dense_logml(z, NG, nll, d), rtol=1e-10)  # fmt: skip
    la_leaf = laplace(mlp, params, *problem("categorical")[1:], likelihood="categorical", structure="full", prior_precision=prior)  # fmt: skip
    np.testing.assert_allclose(la_leaf.posterior_precision.to_dense(), np.diag(d) + NG, rtol=1e-10, atol=1e-12)  # fmt: skip
    np.testing.assert_allclose(flat(la_leaf.variance()), np.diag(np.linalg.inv(np.diag(d) + NG)), rtol=1e-9)  # fmt: skip


@pytest.mark.parametrize("structure", ["full", "diagonal", "lowrank"])
def test_logml_gradient_matches_finite_differences(structure):
    """d/dδ and d/dσ of the evidence (from the cache) vs central differences."""
    la = build("gaussian", structure)

    def f(log_delta, log_sigma):
        return la.log_marginal_likelihood(jnp.exp(log_delta), jnp.exp(log_sigma))

    t, s = jnp.log(1.7), jnp.log(0.9)
    g = jax.grad(f, argnums=(0, 1))(t, s)
    eps = 1e-5
    fd_t = (f(t + eps, s) - f(t - eps, s)) / (2 * eps)
    fd_s = (f(t, s + eps) - f(t, s - eps)) / (2 * eps)
    np.testing.assert_allclose([float(g[0]), float(g[1])], [float(fd_t), float(fd_s)], rtol=1e-6)


# --- low rank ----------------------------------------------------------------------------------


def test_lowrank_with_full_rank_equals_full():
    likelihood = "gaussian"  # one eigsh configuration for the whole file (compiles are slow)
    full, low = build(likelihood, "full"), build(likelihood, "lowrank")
    np.testing.assert_allclose(flat(low.variance()), flat(full.variance()), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(low.log_marginal_likelihood()), float(full.log_marginal_likelihood()), rtol=1e-8)  # fmt: skip
    np.testing.assert_allclose(low.posterior_precision.to_dense(), full.posterior_precision.to_dense(), atol=1e-7)  # fmt: skip
    x = problem(likelihood)[1]
    np.testing.assert_allclose(low.predict(x).variance, full.predict(x).variance, rtol=1e-6)
    z, NG, _, _ = dense(likelihood)
    assert_sample_covariance(low, np.linalg.inv(DELTA * np.eye(z.size) + NG))


def assert_sample_covariance(la, cov, num=40_000, z_max=5.0):
    """Mean and covariance of `num` draws vs θ* and `cov`, entrywise within z_max standard errors."""
    s = la.sample(jax.random.PRNGKey(7), num)
    S = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(s))
    dev = S - flat(la.mean)
    se_mean = np.sqrt(np.diag(cov) / num)
    assert np.max(np.abs(dev.mean(0)) / se_mean) < z_max
    emp = dev.T @ dev / num  # the mean is known: no Bessel correction
    se_cov = np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / num)
    assert np.max(np.abs(emp - cov) / se_cov) < z_max


@pytest.mark.parametrize("structure", ["full", "diagonal"])
def test_sample_covariance_converges(structure):
    z, NG, _, _ = dense("categorical")
    la = build("categorical", structure)
    lam = DELTA * np.eye(z.size) + (NG if structure != "diagonal" else np.diag(np.diag(NG)))
    assert_sample_covariance(la, np.linalg.inv(lam))


def test_lowrank_truncated_per_leaf_prior():
    """k < P eigenpairs and a per-leaf prior: Woodbury variance, evidence and draws follow the
    operator D + V diag(s/σ²) Vᵀ exactly. (The top-5 pairs of the rank-P build stand in for a
    rank-5 build: eigsh compiles per k, and its top-k are checked against eigvalsh here.)"""
    likelihood = "gaussian"
    params = problem(likelihood)[0]
    z, NG, nll, _ = dense(likelihood)
    values, vectors = build(likelihood, "lowrank").curvature
    sigma2 = SIGMA[likelihood] ** 2
    np.testing.assert_allclose(np.asarray(values)[-5:] / sigma2, np.linalg.eigvalsh(NG)[-5:], rtol=1e-7)  # fmt: skip
    top = (values[-5:], jax.tree.map(lambda v: v[-5:], vectors))
    prior = {"w1": 0.5, "b1": 2.0, "w2": 1.5, "b2": 1.0}
    la = build(likelihood, "lowrank")._replace(curvature=top, prior_precision=prior)
    V = np.asarray(jax.vmap(lambda v: ravel_pytree(v)[0])(top[1]))
    d = flat(jax.tree.map(lambda p, v: jnp.full(p.shape, v, p.dtype), params, prior))
    lam = np.diag(d) + V.T @ np.diag(np.asarray(top[0]) / sigma2) @ V
    np.testing.assert_allclose(la.posterior_precision.to_dense(), lam, atol=1e-9)
    np.testing.assert_allclose(flat(la.variance()), np.diag(np.linalg.inv(lam)), rtol=1e-8)
    logdet = np.linalg.slogdet(lam)[1]
    want = -nll - 0.5 * np.sum(d * z**2) + 0.5 * np.sum(np.log(d)) - 0.5 * logdet
    np.testing.assert_allclose(float(la.log_marginal_likelihood()), want, rtol=1e-10)
    assert_sample_covariance(la, np.linalg.inv(lam))
    xt = new_inputs()
    Jt = jacobian_at(params, xt)
    var = np.einsum("bcp,pq,bcq->bc", Jt, np.linalg.inv(lam), Jt) + sigma2
    np.testing.assert_allclose(la.predict(xt).variance, var, rtol=1e-8)


# --- predictive ----------------------------------------------------------------------------------


@functools.cache
def new_inputs():
    return jax.random.normal(jax.random.PRNGKey(11), (5, D_IN))


@pytest.mark.parametrize("likelihood", LIKELIHOODS)
@pytest.mark.parametrize("structure", ["full", "diagonal"])
def test_glm_predictive_matches_dense(likelihood, structure):
    z, NG, _, _ = dense(likelihood)
    la = build(likelihood, structure)
    xt = new_inputs()
    params = problem(likelihood)[0]
    lam = DELTA * np.eye(z.size) + (NG if structure == "full" else np.diag(np.diag(NG)))
    Sigma = np.linalg.inv(lam)
    Jt = jacobian_at(params, xt)  # (B, C, P)
    var = np.einsum("bcp,pq,bcq->bc", Jt, Sigma, Jt)
    mean = np.asarray(mlp(params, xt))
    pred = la.predict(xt, chunk_size=2)
    assert isinstance(pred, Predictive)
    np.testing.assert_allclose(pred.mean, mean, rtol=1e-12)
    extra = SIGMA[likelihood] ** 2 if likelihood == "gaussian" else 0.0
    np.testing.assert_allclose(pred.variance, var + extra, rtol=1e-9)
    scaled = mean / np.sqrt(1 + np.pi / 8 * var)
    if likelihood == "categorical":
        probs = np.exp(scaled) / np.exp(scaled).sum(-1, keepdims=True)
        np.testing.assert_allclose(pred.probs, probs, rtol=1e-9)
    elif likelihood == "bernoulli":
        np.testing.assert_allclose(pred.probs, 1 / (1 + np.exp(-scaled)), rtol=1e-9)
    else:
        assert pred.probs is None


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_mc_predictive_approaches_glm_mc_mean(likelihood):
    """MC probs vs E[softmax(f)], f ~ N(μ, J Σ Jᵀ) per input, estimated densely with numpy."""
    z, NG, _, _ = dense(likelihood)
    la = build(likelihood, "full")
    xt = new_inputs()
    params = problem(likelihood)[0]
    Sigma = np.linalg.inv(DELTA * np.eye(z.size) + NG)
    Jt = jacobian_at(params, xt)
    mean = np.asarray(mlp(params, xt))
    rng = np.random.default_rng(0)
    num = 4000
    pred = la.predict(xt, method="mc", key=jax.random.PRNGKey(5), num_samples=num)
    glm = la.predict(xt)
    np.testing.assert_allclose(pred.mean, glm.mean, rtol=1e-12)
    for b in range(xt.shape[0]):
        cov = Jt[b] @ Sigma @ Jt[b].T
        f = rng.multivariate_normal(mean[b], cov, size=200_000)
        if likelihood == "categorical":
            p = np.exp(f - f.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
        else:
            p = 1 / (1 + np.exp(-f))
        ref, se = p.mean(0), p.std(0) / np.sqrt(num)
        assert np.all(np.abs(np.asarray(pred.probs[b]) - ref) < 5 * se + 1e-3)
        # the MC variance (around the known mean) estimates diag(J Σ Jᵀ)
        se_var = np.sqrt(2 / num) * np.diag(cov)
        assert np.all(np.abs(np.asarray(pred.variance[b]) - np.diag(cov)) < 5 * se_var)


# --- prior precision optimization --------------------------------------------------------------


@pytest.mark.parametrize("structure", ["full", "diagonal"])
def test_optimize_prior_precision_scalar(structure):
    likelihood = "categorical"
    la = build(likelihood, structure)
    opt = la.optimize_prior_precision()
    delta = float(opt.prior_precision)
    assert np.shape(opt.prior_precision) == ()
    assert float(opt.log_marginal_likelihood()) > float(la.log_marginal_likelihood())
    g = jax.grad(lambda t: la.log_marginal_likelihood(jnp.exp(t)))(jnp.log(delta))
    assert abs(float(g)) < 1e-6
    # a dense grid search on the independent formula lands next to it
    z, NG, nll, _ = dense(likelihood)
    grid = np.exp(np.linspace(np.log(1e-3), np.log(1e3), 601))
    s = "diagonal" if structure == "diagonal" else "full"
    values = [dense_logml(z, NG, nll, np.full(z.size, t), s) for t in grid]
    best = int(np.argmax(values))
    assert grid[best - 1] <= delta <= grid[best + 1]
    assert float(opt.log_marginal_likelihood()) >= max(values) - 1e-9


def test_optimize_prior_precision_per_leaf():
    la = build("gaussian", "full")
    scalar = la.optimize_prior_precision()
    opt = la.optimize_prior_precision(per_leaf=True, num_steps=60)
    assert jax.tree.structure(opt.prior_precision) == jax.tree.structure(la.mean)
    grads = jax.grad(lambda p: opt.log_marginal_likelihood(jax.tree.map(jnp.exp, p)))(
        jax.tree.map(jnp.log, opt.prior_precision)
    )
    assert max(abs(float(v)) for v in jax.tree.leaves(grads)) < 1e-6
    assert float(opt.log_marginal_likelihood()) >= float(scalar.log_marginal_likelihood())


# --- dtypes, models, staging -------------------------------------------------------------------


@pytest.mark.parametrize("structure", ["full", "diagonal"])
def test_float32_stays_float32(structure):
    params, x, y = problem("categorical", jnp.float32)
    la = laplace(mlp, params, x, y, likelihood="categorical", structure=structure, prior_precision=DELTA)  # fmt: skip
    assert la.prior_precision.dtype == jnp.float32
    leaves = [
        la.log_marginal_likelihood(),
        *jax.tree.leaves(la.variance()),
        *jax.tree.leaves(la.sample(jax.random.PRNGKey(0), 3)),
        *la.predict(x),
    ]
    if structure == "full":  # the other methods once (each is one more compile)
        leaves += [
            *la.predict(x, method="mc", key=jax.random.PRNGKey(0), num_samples=4),
            la.optimize_prior_precision(num_steps=20).prior_precision,
        ]
    assert all(leaf.dtype == jnp.float32 for leaf in leaves)
    ref = build("categorical", structure)
    np.testing.assert_allclose(flat(la.variance()), flat(ref.variance()), rtol=2e-3)
    np.testing.assert_allclose(float(la.log_marginal_likelihood()), float(ref.log_marginal_likelihood()), rtol=1e-4)  # fmt: skip


def test_chunked_equals_unchunked():
    params, x, y = problem("categorical")
    for structure in ("full", "diagonal"):
        whole = build("categorical", structure)
        part = laplace(mlp, params, x, y, likelihood="categorical", structure=structure, prior_precision=DELTA, chunk_size=3)  # fmt: skip
        np.testing.assert_allclose(flat(part.variance()), flat(whole.variance()), rtol=1e-10)
        np.testing.assert_allclose(float(part.log_marginal_likelihood()), float(whole.log_marginal_likelihood()), rtol=1e-12)  # fmt: skip


def test_no_recompiles_and_jit():
    params, x, y = problem("categorical")
    la = build("categorical", "diagonal")
    la.log_marginal_likelihood(1.5)
    new = jax.tree.map(lambda a: a * 1.01, params)
    with count_compiles() as compiles:
        la2 = laplace(mlp, new, x, y, likelihood="categorical", structure="diagonal", prior_precision=0.3)  # fmt: skip
        la2.log_marginal_likelihood(2.5)
        la2.log_marginal_likelihood()
    assert compiles == []
    probs = jax.jit(lambda la, xt: la.predict(xt).probs)(la, new_inputs())
    np.testing.assert_allclose(probs, la.predict(new_inputs()).probs, rtol=1e-12)
    vmapped = jax.vmap(lambda d: la.log_marginal_likelihood(d))(jnp.array([0.5, DELTA]))
    np.testing.assert_allclose(vmapped[1], la.log_marginal_likelihood(), rtol=1e-12)

    def evidence(p, d):  # the whole build under the user's jit, δ traced
        built = laplace(mlp, p, x, y, likelihood="categorical", structure="diagonal", prior_precision=d)  # fmt: skip
        return built.log_marginal_likelihood()

    np.testing.assert_allclose(jax.jit(evidence)(params, DELTA), la.log_marginal_likelihood(), rtol=1e-12)  # fmt: skip


def head(body_params, p, x):
    return jnp.tanh(x @ body_params["w1"] + body_params["b1"]) @ p["w2"] + p["b2"]


def test_last_layer_partial_model():
    """Last-layer Laplace through a Partial model: its arrays are leaves (no recompile)."""
    params, x, y = problem("categorical")
    body = {"w1": params["w1"], "b1": params["b1"]}
    last = {"w2": params["w2"], "b2": params["b2"]}
    model = jax.tree_util.Partial(head, body)
    la = laplace(model, last, x, y, likelihood="categorical", structure="full", prior_precision=DELTA)  # fmt: skip
    _, NG, _, _ = dense("categorical")
    # ravel order of the full params: b1, b2, w1, w2; of the last layer: b2, w2
    sizes = {"b1": 4, "b2": 3, "w1": 12, "w2": 12}
    start = {"b1": 0, "b2": 4, "w1": 7, "w2": 19}
    idx = np.concatenate([np.arange(start[k], start[k] + sizes[k]) for k in ("b2", "w2")])
    np.testing.assert_allclose(la.posterior_precision.to_dense(), DELTA * np.eye(15) + NG[np.ix_(idx, idx)], rtol=1e-10, atol=1e-12)  # fmt: skip
    la.predict(x)
    model2 = jax.tree_util.Partial(head, jax.tree.map(lambda a: a + 0.1, body))
    with count_compiles() as compiles:
        la2 = laplace(model2, last, x, y, likelihood="categorical", structure="full", prior_precision=DELTA)  # fmt: skip
        la2.predict(x)
    assert compiles == []
    assert not np.allclose(la2.predict(x).variance, la.predict(x).variance)


def test_equinox_model():
    eqx = pytest.importorskip("equinox")
    net = eqx.nn.MLP(D_IN, 3, 5, 1, activation=jnp.tanh, key=jax.random.PRNGKey(4))
    net = jax.tree.map(lambda a: a.astype(jnp.float64) if eqx.is_inexact_array(a) else a, net)
    params, static = eqx.partition(net, eqx.is_inexact_array)

    def model(p, x):
        return jax.vmap(eqx.combine(p, static))(x)

    _, x, y = problem("categorical")
    la = laplace(model, params, x, y, likelihood="categorical", structure="full", prior_precision=DELTA)  # fmt: skip
    z, unravel = ravel_pytree(params)
    J = np.asarray(jax.jacfwd(lambda q: model(unravel(q), x))(z))
    out = model(params, x)
    H = np.asarray(jax.vmap(jax.hessian(lambda o, t: -jax.nn.log_softmax(o)[t]))(out, y))
    NG = np.einsum("nkp,nkl,nlq->pq", J, H, J)
    np.testing.assert_allclose(la.posterior_precision.to_dense(), DELTA * np.eye(z.size) + NG, rtol=1e-9, atol=1e-12)  # fmt: skip
    Jt = J.reshape(N, 3, z.size)
    var = np.einsum("bcp,pq,bcq->bc", Jt, np.linalg.inv(DELTA * np.eye(z.size) + NG), Jt)
    np.testing.assert_allclose(la.predict(x).variance, var, rtol=1e-8)


# --- misuse ------------------------------------------------------------------------------------


def test_bad_inputs_raise_named_errors():
    params, x, y = problem("categorical")
    kw = {"likelihood": "categorical"}
    cases = [
        (ValueError, "structure", dict(kw, structure="kfac")),
        (ValueError, "likelihood", {"likelihood": "poisson"}),
        (ValueError, "prior_precision", dict(kw, prior_precision=-1.0)),
        (ValueError, "prior_precision", dict(kw, prior_precision=0.0)),
        (ValueError, "prior_precision", dict(kw, prior_precision={"w1": 1.0})),
        (TypeError, "prior_precision", dict(kw, prior_precision="big")),
        (ValueError, "sigma_noise", {"likelihood": "gaussian", "sigma_noise": -0.5}),
        (ValueError, "sigma_noise", dict(kw, sigma_noise=2.0)),
        (ValueError, "rank", dict(kw, structure="lowrank", key=jax.random.PRNGKey(0))),
        (ValueError, "rank", dict(kw, structure="lowrank", rank=10_000, key=jax.random.PRNGKey(0))),
        (ValueError, "rank", dict(kw, structure="full", rank=3)),
        (ValueError, "key", dict(kw, structure="lowrank", rank=3)),
    ]
    for error, word, options in cases:
        with pytest.raises(error, match=word):
            laplace(mlp, params, x, y, **options)
    with pytest.raises(ValueError, match="targets"):
        laplace(mlp, params, x, y[:5], **kw)
    with pytest.raises(ValueError, match="targets"):
        laplace(mlp, params, x, y + 10, **kw)
    with pytest.raises(TypeError, match="model"):
        laplace("mlp", params, x, y, **kw)
    big = {"w": jnp.zeros((D_IN, 4000)), "v": jnp.zeros((4000, 3))}
    with pytest.raises(ValueError, match="10,000"):
        laplace(lambda p, x: (x @ p["w"]) @ p["v"], big, x, y, structure="full", **kw)
    la = build("categorical", "diagonal")
    with pytest.raises(ValueError, match="key"):
        la.predict(x, method="mc")
    with pytest.raises(ValueError, match="method"):
        la.predict(x, method="laplace")
    with pytest.raises(ValueError, match="prior_precision"):
        la.log_marginal_likelihood(-2.0)
    with pytest.raises(ValueError, match="method"):
        la.optimize_prior_precision("grid")
    with pytest.raises(TypeError, match="num_samples"):
        la.sample(jax.random.PRNGKey(0), 2.5)


# --- the example -------------------------------------------------------------------------------


def test_digits_example_improves_nll_under_shift():
    """The example runs; under input shift the Laplace predictive beats the overconfident MAP.

    On the clean test set this MAP is already calibrated and the evidence-tuned Laplace
    predictive is measurably underconfident (higher NLL), so the NLL claim is made where
    Laplace is meant to help: inputs shifted by Gaussian pixel noise.
    """
    pytest.importorskip("sklearn")
    pytest.importorskip("optax")
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
    try:
        import laplace_digits
    finally:
        sys.path.pop(0)
    out = laplace_digits.main(hidden=32, train_steps=600, verbose=False)
    assert out["shift_laplace_nll"] < 0.9 * out["shift_map_nll"]
    assert out["shift_laplace_ece"] < out["shift_map_ece"]
    assert out["laplace_accuracy"] >= out["map_accuracy"] - 0.01
    assert math.isfinite(out["laplace_nll"]) and out["prior_precision"] > 0

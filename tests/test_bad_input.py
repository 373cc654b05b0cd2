"""Careless input, generated: a clear error naming the argument, or an honest status; never a
silent wrong answer and never a raw JAX traceback.

Each case takes a valid call and spoils at most one argument with a value drawn from a list of
mistakes (wrong structure, shape, dtype, a string, None, NaN, a negative or huge number). A
spoiled argument must raise ``ValueError``/``TypeError`` whose message names it, or (for values
only seen at run time, like NaN data) return a result whose status is not success. An unspoiled
call must succeed and agree with a dense reference. CI runs a sample; ``-m slow`` runs 1,200+.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hessfree as hf

A = jnp.array([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
B = jnp.array([1.0, 2.0, 3.0])
KEY = jax.random.key(0)

BAD_ARRAYS = {
    "wrong shape": jnp.ones(4),
    "2-D": jnp.ones((3, 1)),
    "int": jnp.array([1, 2, 3]),
    "complex": jnp.array([1.0, 2.0, 3.0]) * (1 + 1j),
    "float16": jnp.ones(3, jnp.float16),
    "string": "abc",
    "dict": {"a": jnp.ones(3)},
}
BAD_INTS = {
    "zero": 0,
    "negative": -3,
    "float": 2.5,
    "huge": 2**40,
    "string": "10",
    "bool": True,
}
BAD_FLOATS = {"negative": -1.0, "nan": math.nan, "inf": math.inf, "string": "1e-5", "list": [1e-5]}


def expect_named_error(call, name):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), f"{name!r} not named in: {info.value}"


# --- cg ---------------------------------------------------------------------------------------

CG_SPOILS = (
    [("b", k, v) for k, v in BAD_ARRAYS.items()]
    + [("x0", k, v) for k, v in BAD_ARRAYS.items() if k != "float16"]
    + [("rtol", k, v) for k, v in BAD_FLOATS.items()]
    + [("atol", k, v) for k, v in BAD_FLOATS.items()]
    + [("maxiter", k, v) for k, v in BAD_INTS.items()]
    + [("M", "wrong output", lambda r: r[:2]), ("M", "string", "diag")]
    + [("A", "non-square", jnp.ones((3, 2))), ("A", "string", "matrix")]
)


def _cg_case(spoil):
    kwargs = {"A": A, "b": B, "x0": None, "rtol": 1e-6, "atol": 0.0, "maxiter": None, "M": None}
    if spoil is not None:
        kwargs[spoil[0]] = spoil[2]
    return kwargs


def _cg_bad_input(spoil, scale):
    kwargs = _cg_case(spoil)
    kwargs["b"] = kwargs["b"] * scale if spoil is None or spoil[0] != "b" else kwargs["b"]
    A_, b = kwargs.pop("A"), kwargs.pop("b")
    if spoil is None:
        res = hf.cg(A_, b, **kwargs)
        assert bool(res.success) and int(res.status) == 0
        np.testing.assert_allclose(res.x, np.linalg.solve(A_, b), rtol=1e-4)
        return
    expect_named_error(lambda: hf.cg(A_, b, **kwargs), spoil[0])


@pytest.mark.parametrize("bad", [jnp.array([1.0, jnp.nan, 3.0]), jnp.array([1.0, jnp.inf, 3.0])])
def test_cg_non_finite_b_is_a_status_not_success(bad):
    res = hf.cg(A, bad)
    assert int(res.status) == 3 and not bool(res.success)
    assert "Non-finite" in res.message and np.all(np.isfinite(res.x))


# --- hvp, hvps, hvp_fn --------------------------------------------------------------------------

X = {"w": jnp.array([1.0, -2.0]), "b": jnp.array(0.5)}


def f_tree(p):
    return jnp.sum(p["w"] ** 4) / 4 + p["b"] ** 2 * jnp.sum(p["w"])


HVP_SPOILS = [
    ("v", "missing key", {"w": jnp.ones(2)}),
    ("v", "wrong shape", {"w": jnp.ones(3), "b": jnp.array(1.0)}),
    ("v", "complex", {"w": jnp.ones(2) * 1j, "b": jnp.array(1.0)}),
    ("v", "int", {"w": jnp.array([1, 1]), "b": jnp.array(1)}),
    ("v", "string", "v"),
    ("x", "int leaf", {"w": jnp.array([1, 2]), "b": jnp.array(0.5)}),
    ("x", "function leaf", {"w": jnp.ones(2), "b": jnp.tanh}),
    ("x", "string leaf", {"w": jnp.ones(2), "b": "0.5"}),
    ("mode", "unknown", "fwd"),
    ("mode", "None", None),
]


def _hvp_bad_input(spoil, which, scale):
    x = jax.tree.map(lambda a: a * scale, X)
    v, mode = {"w": jnp.array([1.0, 0.5]), "b": jnp.array(-1.0)}, "auto"
    if spoil is not None:
        x, v, mode = (
            spoil[2] if spoil[0] == n else d for n, d in (("x", x), ("v", v), ("mode", mode))
        )

    def call():
        if which == "hvp":
            return hf.hvp(f_tree, x, v, mode=mode)
        if which == "hvp_fn":
            return hf.hvp_fn(f_tree, x, mode=mode)(v)
        vs = jax.tree.map(lambda a: jnp.stack([a, a]), v) if not isinstance(v, str) else v
        return jax.tree.map(lambda a: a[0], hf.hvps(f_tree, x, vs, mode=mode))

    if spoil is None:
        flat, unravel = jax.flatten_util.ravel_pytree(x)
        dense = jax.hessian(lambda z: f_tree(unravel(z)))(flat)
        got = jax.flatten_util.ravel_pytree(call())[0]
        np.testing.assert_allclose(got, dense @ jax.flatten_util.ravel_pytree(v)[0], rtol=1e-5)
        return
    name = "vs" if which == "hvps" and spoil[0] == "v" else spoil[0]
    expect_named_error(call, name)


# --- estimators and eigsh -------------------------------------------------------------------------

EST_SPOILS = (
    [("num_probes", k, v) for k, v in BAD_INTS.items()]
    + [("chunk_size", k, v) for k, v in BAD_INTS.items() if k != "huge"]
    + [("key", "None", None), ("key", "int", 3), ("key", "float array", jnp.ones(2))]
    + [("method", "unknown", "xtrace2"), ("distribution", "unknown", "uniform")]
)


def _estimator_bad_input(spoil, which, seed):
    kwargs = {
        "key": jax.random.key(seed),
        "num_probes": 6,
        "chunk_size": None,
        "method": "hutchinson",
    }
    kwargs["distribution"] = "rademacher"
    if spoil is not None:
        kwargs[spoil[0]] = spoil[2]
    fn = hf.trace if which == "trace" else hf.diagonal
    if spoil is None:
        out = fn(A, **kwargs)
        assert int(out.num_matvecs) == 6
        assert np.all(np.isfinite(jax.flatten_util.ravel_pytree(out.value)[0]))
        return
    expect_named_error(lambda: fn(A, **kwargs), spoil[0])


EIG_SPOILS = (
    [("k", k, v) for k, v in BAD_INTS.items()]
    + [("k", "too many", 4)]
    + [("tol", k, v) for k, v in BAD_FLOATS.items()]
    + [("tol", "zero", 0.0)]
    + [("maxiter", k, v) for k, v in BAD_INTS.items()]
    + [("which", "unknown", "BE"), ("key", "None", None), ("v0", "wrong shape", jnp.ones(4))]
)


def _eigsh_bad_input(spoil, seed):
    kwargs = {
        "k": 1,
        "key": jax.random.key(seed),
        "tol": None,
        "maxiter": 100,
        "which": "LA",
        "v0": None,
    }
    if spoil is not None:
        kwargs[spoil[0]] = spoil[2]
    if spoil is None:
        res = hf.eigsh(A, **kwargs)
        assert bool(res.success)
        np.testing.assert_allclose(res.eigenvalues[-1], np.linalg.eigvalsh(A)[-1], rtol=1e-5)
        return
    expect_named_error(lambda: hf.eigsh(A, **kwargs), spoil[0])


# --- ggn / fisher targets ---------------------------------------------------------------------------

XS = jax.random.normal(jax.random.key(1), (6, 3))
W = jax.random.normal(jax.random.key(2), (3, 4))


def linear(w, x):
    return x @ w


TARGET_SPOILS = [
    ("softmax_cross_entropy", "label >= C", jnp.array([0, 1, 2, 3, 4, 0])),
    ("softmax_cross_entropy", "label < 0", jnp.array([0, 1, 2, 3, -1, 0])),
    ("softmax_cross_entropy", "probs not summing to 1", jnp.full((6, 4), 0.5)),
    ("softmax_cross_entropy", "wrong shape", jnp.array([0, 1, 2])),
    ("sigmoid_cross_entropy", "target 2.0", jnp.full((6, 4), 2.0)),
    ("sigmoid_cross_entropy", "string", "ones"),
    ("mse", "nan", jnp.full((6, 4), jnp.nan)),
    ("mse", "wrong shape", jnp.ones((6, 3))),
]


def _ggn_refuses_bad_targets(spoil, as_fisher, scale):
    loss, _, targets = spoil
    w = W * scale
    if as_fisher:
        likelihood = hf._losses.LOSSES[loss].likelihood
        call = lambda: hf.fisher(  # noqa: E731
            linear, w, XS, likelihood=likelihood, kind="empirical", targets=targets
        )
    else:
        call = lambda: hf.ggn(linear, loss, w, XS, targets)  # noqa: E731
    expect_named_error(call, "targets")


def test_bad_targets_inside_jit_give_nan_products_not_numbers():
    bad = jnp.array([0, 1, 2, 3, 4, 0])
    out = jax.jit(lambda t: hf.ggn(linear, "softmax_cross_entropy", W, XS, t).mv(W))(bad)
    assert np.all(np.isnan(out))
    res = jax.jit(lambda t: hf.cg(hf.ggn(linear, "softmax_cross_entropy", W, XS, t), W))(bad)
    assert int(res.status) == 3


# --- minimize ---------------------------------------------------------------------------------------


def rosen(x):
    return (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2


MIN_SPOILS = (
    [("gtol", k, v) for k, v in BAD_FLOATS.items()]
    + [("maxiter", k, v) for k, v in BAD_INTS.items()]
    + [("cg_maxiter", k, v) for k, v in BAD_INTS.items()]
    + [("method", "unknown", "bfgs"), ("mode", "unknown", "fwd")]
    + [("eta", "too big", 0.5), ("initial_radius", "zero", 0.0)]
    + [
        ("preconditioner", "wrong structure", lambda x: {"d": x}),
        ("preconditioner", "string", "jacobi"),
    ]
    + [("x0", k, v) for k, v in BAD_ARRAYS.items() if k in ("int", "complex", "string")]
)


def _minimize_bad_input(spoil, start):
    kwargs = {"method": "trust-ncg", "gtol": 1e-5, "maxiter": None, "mode": "auto"}
    x0 = jnp.array([-1.2, 1.0]) * start
    if spoil is not None:
        if spoil[0] == "x0":
            x0 = spoil[2]
        else:
            kwargs[spoil[0]] = spoil[2]
    if spoil is None:
        res = hf.minimize(rosen, x0, **kwargs)
        assert bool(res.success)
        np.testing.assert_allclose(res.x, [1.0, 1.0], atol=1e-3)
        return
    expect_named_error(lambda: hf.minimize(rosen, x0, **kwargs), spoil[0])


def test_unknown_status_has_a_message_not_a_key_error():
    res = hf.minimize(rosen, jnp.array([-1.2, 1.0]), maxiter=1)
    assert "Unknown status code 77" in res._replace(status=jnp.asarray(77)).message


# --- CI runs a sample of each; `pytest -m slow` runs 1,500 generated cases ----------------------


def _generated(body, strategies, count):
    checks = list(HealthCheck)
    return settings(max_examples=count, deadline=None, suppress_health_check=checks)(
        given(*strategies)(body)
    )


_CG_BAD_INPUT_STRATEGIES = (
    st.one_of(st.none(), st.sampled_from(CG_SPOILS)),
    st.floats(0.1, 10.0),
)
test_cg_bad_input = _generated(_cg_bad_input, _CG_BAD_INPUT_STRATEGIES, 60)
test_cg_bad_input_many = pytest.mark.slow(_generated(_cg_bad_input, _CG_BAD_INPUT_STRATEGIES, 250))

_HVP_BAD_INPUT_STRATEGIES = (
    st.one_of(st.none(), st.sampled_from(HVP_SPOILS)),
    st.sampled_from(["hvp", "hvp_fn", "hvps"]),
    st.floats(0.25, 4.0),
)
test_hvp_bad_input = _generated(_hvp_bad_input, _HVP_BAD_INPUT_STRATEGIES, 40)
test_hvp_bad_input_many = pytest.mark.slow(
    _generated(_hvp_bad_input, _HVP_BAD_INPUT_STRATEGIES, 250)
)

_ESTIMATOR_BAD_INPUT_STRATEGIES = (
    st.one_of(st.none(), st.sampled_from(EST_SPOILS)),
    st.sampled_from(["trace", "diagonal"]),
    st.integers(0, 2**16),
)
test_estimator_bad_input = _generated(_estimator_bad_input, _ESTIMATOR_BAD_INPUT_STRATEGIES, 50)
test_estimator_bad_input_many = pytest.mark.slow(
    _generated(_estimator_bad_input, _ESTIMATOR_BAD_INPUT_STRATEGIES, 250)
)

_EIGSH_BAD_INPUT_STRATEGIES = (
    st.one_of(st.none(), st.sampled_from(EIG_SPOILS)),
    st.integers(0, 2**16),
)
test_eigsh_bad_input = _generated(_eigsh_bad_input, _EIGSH_BAD_INPUT_STRATEGIES, 50)
test_eigsh_bad_input_many = pytest.mark.slow(
    _generated(_eigsh_bad_input, _EIGSH_BAD_INPUT_STRATEGIES, 250)
)

_GGN_REFUSES_BAD_TARGETS_STRATEGIES = (
    st.sampled_from(TARGET_SPOILS),
    st.booleans(),
    st.floats(0.25, 4.0),
)
test_ggn_refuses_bad_targets = _generated(
    _ggn_refuses_bad_targets, _GGN_REFUSES_BAD_TARGETS_STRATEGIES, 30
)
test_ggn_refuses_bad_targets_many = pytest.mark.slow(
    _generated(_ggn_refuses_bad_targets, _GGN_REFUSES_BAD_TARGETS_STRATEGIES, 250)
)

_MINIMIZE_BAD_INPUT_STRATEGIES = (
    st.one_of(st.none(), st.sampled_from(MIN_SPOILS)),
    st.floats(0.5, 1.5),
)
test_minimize_bad_input = _generated(_minimize_bad_input, _MINIMIZE_BAD_INPUT_STRATEGIES, 50)
test_minimize_bad_input_many = pytest.mark.slow(
    _generated(_minimize_bad_input, _MINIMIZE_BAD_INPUT_STRATEGIES, 250)
)

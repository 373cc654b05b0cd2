"""trace and diagonal: unbiasedness over seeds, stderr calibration, Hutch++ vs Hutchinson."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessfree
from hessfree import diagonal, trace

KEY = jax.random.PRNGKey(0)
RNG = np.random.default_rng(0)
B = RNG.normal(size=(40, 40))
A = jnp.asarray(B + B.T)  # indefinite, exact trace known


def decaying(n=200, power=2.0, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, n)))
    return jnp.asarray(q @ np.diag(np.arange(1, n + 1) ** -power) @ q.T)


@pytest.mark.parametrize("distribution", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_with_a_calibrated_stderr(distribution):
    keys = jax.random.split(KEY, 400)
    estimates = jax.vmap(lambda k: trace(A, key=k, num_probes=8, distribution=distribution))(keys)
    values, stderrs = np.asarray(estimates.value), np.asarray(estimates.stderr)
    spread = values.std(ddof=1)
    exact = float(jnp.trace(A))
    # the mean over 400 seeds is within 4 standard errors of the exact trace
    assert abs(values.mean() - exact) < 4 * spread / np.sqrt(len(values))
    # the reported stderr matches the spread over seeds (root-mean-square, within 15 %)
    assert 0.85 < np.sqrt(np.mean(stderrs**2)) / spread < 1.15


def test_hutch_plus_plus_beats_hutchinson_at_equal_budget_on_a_decaying_spectrum():
    matrix = decaying()
    exact = float(jnp.trace(matrix))
    keys = jax.random.split(KEY, 50)
    errors = {}
    for method in ("hutchinson", "hutch++"):
        values = jax.vmap(lambda k, m=method: trace(matrix, key=k, num_probes=30, method=m).value)(
            keys
        )
        errors[method] = float(np.mean(np.abs(np.asarray(values) - exact)))
    assert errors["hutch++"] < 0.3 * errors["hutchinson"]


def test_hutch_plus_plus_is_exact_on_low_rank():
    u = RNG.normal(size=(50, 4))
    matrix = jnp.asarray(u @ u.T)
    estimate = trace(matrix, key=KEY, num_probes=12, method="hutch++")
    np.testing.assert_allclose(estimate.value, np.trace(u @ u.T), rtol=1e-10)
    assert int(estimate.num_matvecs) == 12
    assert isinstance(estimate.num_matvecs, jax.Array) and estimate.num_matvecs.dtype == jnp.int32


def test_diagonal_converges_on_a_pytree():
    def matvec(v):  # A acting on {"a": (10,), "b": (5, 6)}
        y = A @ jnp.concatenate([v["a"], v["b"].ravel()])
        return {"a": y[:10], "b": y[10:].reshape(5, 6)}

    like = {"a": jnp.zeros(10), "b": jnp.zeros((5, 6))}
    exact = np.diag(np.asarray(A))

    def error(num_probes):
        d = diagonal(matvec, key=KEY, num_probes=num_probes, like=like)
        assert d.value["b"].shape == (5, 6) and d.stderr["b"].shape == (5, 6)
        assert int(d.num_matvecs) == num_probes
        flat = np.concatenate([d.value["a"], d.value["b"].ravel()])
        return np.abs(flat - exact).mean()

    coarse, fine = error(16), error(4096)
    assert fine < 0.25 * coarse  # error falls like 1/sqrt(N): 16x the probes, 1/4 the error
    assert fine < 0.15 * np.abs(exact).mean()


def test_chunked_equals_unchunked_and_dtype_is_kept():
    a32 = A.astype(jnp.float32)
    full = trace(a32, key=KEY, num_probes=10, method="hutch++")
    chunked = trace(a32, key=KEY, num_probes=10, method="hutch++", chunk_size=3)
    assert full.value.dtype == jnp.float32 and full.stderr.dtype == jnp.float32
    np.testing.assert_allclose(full.value, chunked.value, rtol=1e-5)
    d_full = diagonal(a32, key=KEY, num_probes=10)
    d_chunked = diagonal(a32, key=KEY, num_probes=10, chunk_size=4)
    assert d_full.value.dtype == jnp.float32 and d_full.stderr.dtype == jnp.float32
    np.testing.assert_allclose(d_full.value, d_chunked.value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_full.stderr, d_chunked.stderr, rtol=1e-5, atol=1e-5)


def test_trace_and_diagonal_of_a_hessian_operator_under_jit():
    # f = ½ xᵀAx + Σ x⁴/12 on a pytree: the Hessian is A + diag(x²), known exactly
    x = {"a": jnp.asarray(RNG.normal(size=10)), "b": jnp.asarray(RNG.normal(size=(5, 6)))}

    def f(p):
        z = jnp.concatenate([p["a"], p["b"].ravel()])
        return 0.5 * z @ A @ z + jnp.sum(z**4) / 12

    z = np.concatenate([x["a"], np.ravel(x["b"])])
    exact_diag = np.diag(np.asarray(A)) + z**2
    op = hessfree.hessian(f, x)
    estimate = jax.jit(lambda o, k: trace(o, key=k, num_probes=200))(op, KEY)
    assert abs(float(estimate.value) - exact_diag.sum()) < 4 * float(estimate.stderr)
    d = diagonal(op, key=KEY, num_probes=2000)
    assert d.value["b"].shape == (5, 6)
    d_flat = np.concatenate([d.value["a"], np.ravel(d.value["b"])])
    assert np.abs(d_flat - exact_diag).mean() < 0.2 * np.abs(exact_diag).mean()


def test_single_probe_has_infinite_stderr():
    assert np.isinf(float(trace(A, key=KEY, num_probes=1).stderr))


def test_diagonal_stderr_is_calibrated():
    # per entry, the reported stderr matches the spread over seeds (rms over entries, 15 %)
    keys = jax.random.split(KEY, 400)
    d = jax.vmap(lambda k: diagonal(A, key=k, num_probes=8))(keys)
    values, stderrs = np.asarray(d.value), np.asarray(d.stderr)
    spread = values.std(axis=0, ddof=1)
    exact = np.diag(np.asarray(A))
    assert np.all(np.abs(values.mean(0) - exact) < 5 * spread / np.sqrt(len(values)))
    assert 0.85 < np.sqrt(np.mean(stderrs**2) / np.mean(spread**2)) < 1.15


def test_errors_name_the_argument():
    with pytest.raises(
        ValueError, match=r"num_probes must be an integer in \[1, 2\*\*31 - 1\]; got 0"
    ):
        trace(A, key=KEY, num_probes=0)
    with pytest.raises(
        ValueError, match=r"num_probes must be an integer in \[1, 2\*\*31 - 1\]; got 0"
    ):
        diagonal(A, key=KEY, num_probes=0)
    with pytest.raises(ValueError, match=r"num_probes must be an integer in \[1, 2\*\*31 - 1\]"):
        trace(A, key=KEY, num_probes=2**31)
    with pytest.raises(TypeError, match=r"num_probes must be a positive integer; got float 3\.0"):
        trace(A, key=KEY, num_probes=3.0)  # type: ignore[arg-type]
    with pytest.raises(
        ValueError,
        match=r"method must be one of \['hutchinson', 'hutch\+\+', 'xtrace'\]; got 'xtrace2'",
    ):
        trace(A, key=KEY, num_probes=3, method="xtrace2")
    with pytest.raises(
        ValueError, match=r"method must be one of \['hutchinson', 'xdiag'\]; got 'hutch\+\+'"
    ):
        diagonal(A, key=KEY, num_probes=3, method="hutch++")
    with pytest.raises(
        ValueError, match=r"distribution must be one of \['rademacher', 'gaussian'\]"
    ):
        diagonal(A, key=KEY, num_probes=3, distribution="uniform")
    with pytest.raises(
        ValueError, match=r"at least 3 for method='hutch\+\+' \(N/3 sketch\); got 2"
    ):
        trace(A, key=KEY, num_probes=2, method="hutch++")
    with pytest.raises(ValueError, match="trace needs key="):
        trace(A, key=None, num_probes=3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="diagonal needs key="):
        diagonal(A, key=None, num_probes=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        trace(A, key=0, num_probes=3)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="positional"):
        trace(A, KEY, num_probes=3)  # type: ignore[misc]  (key is keyword-only)
    with pytest.raises(
        ValueError, match=r"chunk_size must be an integer in \[1, 2\*\*31 - 1\]; got 0"
    ):
        trace(A, key=KEY, num_probes=3, chunk_size=0)
    with pytest.raises(
        TypeError, match=r"chunk_size must be a positive integer or None; got float 1\.5"
    ):
        trace(A, key=KEY, num_probes=3, chunk_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(
        TypeError, match=r"chunk_size must be a positive integer or None; got float 1\.5"
    ):
        diagonal(A, key=KEY, num_probes=3, chunk_size=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="pass like="):
        diagonal(lambda v: v, key=KEY, num_probes=3)

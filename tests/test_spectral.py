"""lanczos, eigsh and spectral_density against dense numpy references with known spectra."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse.linalg as sla
from jax.flatten_util import ravel_pytree

import hessfree
from helpers import flat
from hessfree import eigsh, lanczos, spectral_density
from hessfree._cli.workloads import mlp_classifier

KEY = jax.random.PRNGKey(0)


def with_spectrum(eigenvalues, seed=0):
    """``Q diag(λ) Qᵀ`` with a random orthogonal Q, float64."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    return q @ np.diag(eigenvalues) @ q.T


# negative eigenvalues, near-clusters at both ends, a bulk around 0
RNG = np.random.default_rng(1)
SPECTRUM = np.concatenate(
    [[-4.0, -3.95, -3.9], RNG.uniform(-0.5, 0.5, 52), [3.0, 3.03, 3.06, 6.0, -7.0]]
)
A = jnp.asarray(with_spectrum(SPECTRUM))


def reference(eigenvalues, k, which):
    order = {"LA": -eigenvalues, "SA": eigenvalues, "LM": -np.abs(eigenvalues)}[which]
    return np.sort(eigenvalues[np.argsort(order)[:k]])


def assert_eigenpairs(matrix, values, vectors, rtol):
    """Eigenvector residuals ‖A y − θ y‖ <= rtol·|θ| and orthonormal eigenvectors."""
    matrix, values, vectors = np.asarray(matrix), np.asarray(values), np.asarray(vectors)
    residual = np.linalg.norm(matrix @ vectors.T - vectors.T * values, axis=0)
    assert np.all(residual <= rtol * np.abs(values)), residual
    np.testing.assert_allclose(vectors @ vectors.T, np.eye(len(values)), atol=1e-6)


@pytest.mark.parametrize(("which", "k"), [("LA", 1), ("LA", 4), ("SA", 3), ("LM", 3)])
def test_eigsh_matches_eigh_with_negative_and_clustered_eigenvalues(which, k):
    values, vectors, info = eigsh(A, k, which=which, key=KEY, return_info=True)
    np.testing.assert_allclose(values, reference(SPECTRUM, k, which), rtol=1e-10, atol=1e-10)
    assert bool(info.converged)
    assert_eigenpairs(A, values, vectors, rtol=1e-7)
    assert np.all(np.diff(np.asarray(values)) > 0)  # ascending, as scipy


def test_eigsh_uses_fewer_products_than_arpack_at_the_same_tolerance():
    tol = 1e-8
    _, _, info = eigsh(A, 4, key=KEY, tol=tol, return_info=True)
    calls = []

    def matvec(x):
        calls.append(1)
        return np.asarray(A) @ np.ravel(x)

    op = sla.LinearOperator(A.shape, matvec=matvec, dtype=np.float64)
    sla.eigsh(op, 4, which="LA", tol=tol, v0=np.ones(A.shape[0]))
    assert int(info.num_matvecs) < len(calls)


def test_eigsh_thick_restarts_until_converged():
    values, vectors, info = eigsh(A, 2, key=KEY, num_steps=6, tol=1e-10, return_info=True)
    assert int(info.num_restarts) > 0 and bool(info.converged)
    np.testing.assert_allclose(values, reference(SPECTRUM, 2, "LA"), rtol=1e-12)
    assert_eigenpairs(A, values, vectors, rtol=1e-9)


def test_eigsh_warns_and_reports_when_not_converged():
    with pytest.warns(RuntimeWarning, match="did not reach tol"):
        _, _, info = eigsh(A, 2, key=KEY, num_steps=3, maxiter=1, tol=1e-14, return_info=True)
    assert not bool(info.converged)
    assert np.all(np.isfinite(np.asarray(info.residuals)))


def test_eigsh_float32_keeps_dtype_and_meets_default_tol():
    values, vectors = eigsh(A.astype(jnp.float32), 2, key=KEY)
    assert values.dtype == jnp.float32 and vectors.dtype == jnp.float32
    np.testing.assert_allclose(values, reference(SPECTRUM, 2, "LA"), rtol=1e-4)
    assert_eigenpairs(A, values, vectors, rtol=2e-3)


def test_eigsh_on_a_pytree_callable_under_jit():
    n = A.shape[0]

    def matvec(v):  # A acting on {"a": first 20 entries, "b": the rest as (8, 5)}
        y = A @ jnp.concatenate([v["a"], v["b"].ravel()])
        return {"a": y[:20], "b": y[20:].reshape(8, 5)}

    like = {"a": jnp.zeros(20), "b": jnp.zeros((8, 5))}
    assert 20 + 40 == n
    values, vectors = jax.jit(lambda key: eigsh(matvec, 2, which="SA", key=key, like=like))(KEY)
    np.testing.assert_allclose(values, reference(SPECTRUM, 2, "SA"), rtol=1e-10)
    assert vectors["b"].shape == (2, 8, 5)
    flat_vectors = np.concatenate([vectors["a"], vectors["b"].reshape(2, -1)], axis=1)
    assert_eigenpairs(A, values, flat_vectors, rtol=1e-7)


def test_eigsh_vmaps_over_matrices():
    spectra = [np.linspace(-1.0, 1.0, 30) * s for s in (1.0, 2.0, 3.0)]
    stack = jnp.asarray(np.stack([with_spectrum(s, seed=i) for i, s in enumerate(spectra)]))
    values, _ = jax.vmap(lambda m: eigsh(m, 1, key=KEY))(stack)
    np.testing.assert_allclose(values[:, 0], [1.0, 2.0, 3.0], rtol=1e-10)


@pytest.fixture(scope="module")
def mlp():
    """A small MLP's Hessian as an operator, and densely (jitted jax.hessian, float64)."""
    workload = mlp_classifier(sizes=(6, 12, 3), batch=32, dtype=jnp.float64)
    flat_x, unravel = ravel_pytree(workload.x)
    dense = jax.jit(jax.hessian(lambda z: workload.f(unravel(z), *workload.args)))(flat_x)
    return hessfree.hessian(workload.f, workload.x, *workload.args), np.asarray(dense)


def test_eigsh_on_the_hessian_of_a_small_mlp(mlp):
    op, dense = mlp
    exact = np.linalg.eigvalsh(dense)
    values, vectors = eigsh(op, 3, key=KEY)
    np.testing.assert_allclose(values, exact[-3:], rtol=1e-9)
    flat_vectors = np.stack(
        [flat(jax.tree_util.tree_map(lambda x, i=i: x[i], vectors)) for i in range(3)]
    )
    assert_eigenpairs(dense, values, flat_vectors, rtol=1e-7)


def test_eigsh_with_exactly_repeated_eigenvalues_returns_no_nans():
    # three distinct eigenvalues: the Krylov space breaks down after three steps
    matrix = jnp.asarray(with_spectrum(np.repeat([-1.0, 2.0, 5.0], 10)))
    values, vectors = eigsh(matrix, 1, which="SA", key=KEY)
    np.testing.assert_allclose(values, [-1.0], rtol=1e-10)
    assert np.all(np.isfinite(np.asarray(vectors)))


def test_lanczos_tridiagonalizes_with_an_orthonormal_basis():
    v0 = {"u": jnp.ones(20), "w": jnp.arange(40.0).reshape(8, 5)}

    def matvec(v):
        y = A @ jnp.concatenate([v["u"], v["w"].ravel()])
        return {"u": y[:20], "w": y[20:].reshape(8, 5)}

    result = lanczos(matvec, v0, 25)
    assert result.basis["w"].shape == (25, 8, 5)
    V = np.concatenate([result.basis["u"], result.basis["w"].reshape(25, -1)], axis=1)
    np.testing.assert_allclose(V @ V.T, np.eye(25), atol=1e-12)
    T = np.diag(result.alphas) + np.diag(result.betas[:-1], 1) + np.diag(result.betas[:-1], -1)
    np.testing.assert_allclose(V @ np.asarray(A) @ V.T, T, atol=1e-10)
    np.testing.assert_allclose(V[0], flat(v0) / np.linalg.norm(flat(v0)), atol=1e-14)


def test_lanczos_breakdown_gives_finite_coefficients_and_zero_beta():
    matrix = jnp.asarray(with_spectrum(np.repeat([1.0, 3.0], 10)))
    result = jax.jit(lanczos, static_argnums=2)(matrix, jnp.ones(20), 6)
    assert np.all(np.isfinite(np.asarray(result.alphas))) and np.all(np.isfinite(result.basis))
    assert abs(float(result.betas[1])) < 1e-12  # invariant subspace of dimension 2
    np.testing.assert_allclose(result.basis @ result.basis.T, np.eye(6), atol=1e-12)


def test_spectral_density_integrates_to_one_and_weighs_clusters_float32():
    fractions = {-2.0: 0.2, 1.0: 0.5, 5.0: 0.3}
    spectrum = np.concatenate([np.full(int(100 * f), c) for c, f in fractions.items()])
    matrix = jnp.asarray(with_spectrum(spectrum + 0.01 * RNG.normal(size=100)), jnp.float32)
    grid, density = jax.jit(
        lambda key: spectral_density(matrix, key, num_probes=30, num_steps=20, sigma=0.1)
    )(KEY)
    assert density.dtype == jnp.float32
    grid, density = np.asarray(grid, np.float64), np.asarray(density, np.float64)
    assert grid.shape == density.shape == (1000,)
    assert abs(np.trapezoid(density, grid) - 1.0) < 1e-5
    for center, fraction in fractions.items():
        window = np.abs(grid - center) < 1.0
        assert abs(np.trapezoid(density[window], grid[window]) - fraction) < 0.08


def test_spectral_density_of_a_hessian_in_chunks(mlp):
    op, dense = mlp
    exact = np.linalg.eigvalsh(dense)
    grid, density = spectral_density(
        op, KEY, num_probes=3, num_steps=30, num_points=200, chunk_size=2
    )
    assert abs(float(jnp.trapezoid(density, grid)) - 1.0) < 1e-12
    # Ritz values of 30 steps reach the extreme eigenvalues; the grid covers them
    assert grid[0] <= exact[0] and grid[-1] >= exact[-1]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"k must be at most the dimension n = 60 .* got k = 61"):
        eigsh(A, 61, key=KEY)
    with pytest.raises(ValueError, match=r"which must be one of \['LA', 'SA', 'LM'\]; got 'BE'"):
        eigsh(A, 1, which="BE", key=KEY)
    with pytest.raises(ValueError, match="eigsh needs a random key"):
        eigsh(A, 1)
    with pytest.raises(ValueError, match="num_steps must exceed k"):
        eigsh(A, 3, key=KEY, num_steps=3)
    with pytest.raises(
        ValueError, match=r"num_steps must be at most the dimension n = 60 of A; got 61"
    ):
        lanczos(A, jnp.ones(60), 61)
    with pytest.raises(ValueError, match="v0 must match the shapes"):
        lanczos(A, jnp.ones(59), 5)
    with pytest.raises(ValueError, match="pass like="):
        eigsh(lambda v: v, 1, key=KEY)
    with pytest.raises(ValueError, match="num_probes must be a positive integer; got 0"):
        spectral_density(A, KEY, num_probes=0, num_steps=5)
    with pytest.raises(ValueError, match="spectral_density needs a random key"):
        spectral_density(A, None, num_probes=1, num_steps=5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sigma must be positive"):
        spectral_density(A, KEY, num_probes=1, num_steps=5, sigma=0.0)

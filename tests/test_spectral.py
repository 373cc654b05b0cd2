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
    res = eigsh(A, k, which=which, key=KEY)
    assert isinstance(res, hessfree.EigshResult)
    values, vectors = res.eigenvalues, res.eigenvectors
    np.testing.assert_allclose(values, reference(SPECTRUM, k, which), rtol=1e-10, atol=1e-10)
    assert bool(res.success) and int(res.status) == 0
    assert res.message == hessfree.STATUS_MESSAGES[0]
    assert res.residuals.shape == (k,) and np.all(
        np.asarray(res.residuals) <= 1e-7 * np.abs(values)
    )
    assert_eigenpairs(A, values, vectors, rtol=1e-7)
    assert np.all(np.diff(np.asarray(values)) > 0)  # ascending, as scipy


def test_eigsh_products_stay_within_a_small_factor_of_arpack_at_the_same_tolerance():
    # eigsh also checks for missed copies of the wanted values (ARPACK does not): that
    # costs converging one more eigenpair from a fresh start
    tol = 1e-8
    info = eigsh(A, 4, key=KEY, tol=tol)
    assert bool(info.success)
    calls = []

    def matvec(x):
        calls.append(1)
        return np.asarray(A) @ np.ravel(x)

    op = sla.LinearOperator(A.shape, matvec=matvec, dtype=np.float64)
    sla.eigsh(op, 4, which="LA", tol=tol, v0=np.ones(A.shape[0]))
    assert int(info.num_matvecs) < 5 * len(calls)


def test_eigsh_thick_restarts_until_converged():
    info = eigsh(A, 2, key=KEY, num_steps=6, tol=1e-10)
    values, vectors = info.eigenvalues, info.eigenvectors
    # more products than one basis holds: it restarted
    assert int(info.num_matvecs) > 6 and bool(info.success) and int(info.status) == 0
    np.testing.assert_allclose(values, reference(SPECTRUM, 2, "LA"), rtol=1e-12)
    assert_eigenpairs(A, values, vectors, rtol=1e-9)


def test_eigsh_reports_when_not_converged():
    info = eigsh(A, 2, key=KEY, num_steps=3, maxiter=1, tol=1e-14)
    assert not bool(info.success) and int(info.status) == 1
    assert info.message == hessfree.STATUS_MESSAGES[1]
    assert "Maximum number of iterations" in info.message
    assert np.all(np.isfinite(np.asarray(info.residuals)))
    assert np.all(np.isfinite(np.asarray(info.eigenvalues)))


def test_eigsh_float32_keeps_dtype_and_meets_default_tol():
    res = eigsh(A.astype(jnp.float32), 2, key=KEY)
    values, vectors = res.eigenvalues, res.eigenvectors
    assert bool(res.success)
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
    res = jax.jit(lambda key: eigsh(matvec, 2, which="SA", key=key, like=like))(KEY)
    values, vectors = res.eigenvalues, res.eigenvectors
    np.testing.assert_allclose(values, reference(SPECTRUM, 2, "SA"), rtol=1e-10)
    assert vectors["b"].shape == (2, 8, 5)
    flat_vectors = np.concatenate([vectors["a"], vectors["b"].reshape(2, -1)], axis=1)
    assert_eigenpairs(A, values, flat_vectors, rtol=1e-7)


def test_flat_view_round_trips_and_declines_where_it_would_change_the_layout():
    like = {"a": jnp.zeros(3), "b": jnp.zeros((2, 4)), "c": jnp.zeros(())}
    ravel, unravel = hessfree._tree.flat_view(like)
    x = {"a": jnp.arange(3.0), "b": jnp.arange(8.0).reshape(2, 4) + 10, "c": jnp.asarray(-1.0)}
    v = ravel(x)
    np.testing.assert_array_equal(v, flat(x))  # ravel_pytree's order
    back = unravel(v)
    for key in like:
        np.testing.assert_array_equal(back[key], x[key])
        assert back[key].shape == like[key].shape
    # one leaf: nothing to gain; two dtypes: one flat dtype would change one of them
    assert hessfree._tree.flat_view({"a": jnp.zeros(3)}) is None
    assert hessfree._tree.flat_view({"a": jnp.zeros(3), "b": jnp.zeros(2, jnp.float32)}) is None


@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_and_lanczos_agree_on_flat_and_per_leaf_bases(which, monkeypatch):
    """On one device a multi-leaf pytree runs on one flat vector; per leaf (as on several
    devices) the same Krylov space gives the same answers."""

    def matvec(v):
        y = A @ jnp.concatenate([v["a"], v["b"].ravel()])
        return {"a": y[:20], "b": y[20:].reshape(8, 5)}

    like = {"a": jnp.zeros(20), "b": jnp.zeros((8, 5))}
    assert hessfree._tree.flat_view(like) is not None
    flat_res = eigsh(matvec, 3, which=which, key=KEY, like=like)
    flat_lz = lanczos(matvec, None, 12, key=KEY, like=like)
    declined = []
    monkeypatch.setattr(hessfree._tree, "flat_view", lambda like: declined.append(1))

    def per_leaf(v):  # another function: traced anew, not the compiled flat program
        return matvec(v)

    leaf_res = eigsh(per_leaf, 3, which=which, key=KEY, like=like)
    leaf_lz = lanczos(per_leaf, None, 12, key=KEY, like=like)
    assert len(declined) == 2  # both ran per leaf
    np.testing.assert_allclose(flat_res.eigenvalues, reference(SPECTRUM, 3, which), rtol=1e-10)
    np.testing.assert_allclose(leaf_res.eigenvalues, flat_res.eigenvalues, rtol=1e-10)
    for key in like:  # the same start vector, so the same eigenvectors up to rounding and sign
        assert flat_res.eigenvectors[key].shape == leaf_res.eigenvectors[key].shape
    signs = np.sign(np.sum(flat_res.eigenvectors["a"] * leaf_res.eigenvectors["a"], axis=1))
    np.testing.assert_allclose(
        flat_res.eigenvectors["b"], signs[:, None, None] * leaf_res.eigenvectors["b"], atol=1e-7
    )
    np.testing.assert_allclose(flat_lz.alphas, leaf_lz.alphas, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(flat_lz.basis["b"], leaf_lz.basis["b"], atol=1e-9)


def test_eigsh_vmaps_over_matrices():
    spectra = [np.linspace(-1.0, 1.0, 30) * s for s in (1.0, 2.0, 3.0)]
    stack = jnp.asarray(np.stack([with_spectrum(s, seed=i) for i, s in enumerate(spectra)]))
    res = jax.vmap(lambda m: eigsh(m, 1, key=KEY))(stack)
    values = res.eigenvalues
    assert res.status.shape == (3,) and bool(jnp.all(res.success))
    np.testing.assert_allclose(values[:, 0], [1.0, 2.0, 3.0], rtol=1e-10)


def top_vector(matrix):
    w, q = np.linalg.eigh(np.asarray(matrix))
    return w[-1], q[:, -1]


def test_eigsh_warm_start_from_the_exact_eigenvector_needs_few_products():
    lam, q = top_vector(A)
    cold = eigsh(A, 1, key=KEY)
    warm = eigsh(A, 1, v0=jnp.asarray(q))  # no key: v0 is the start
    assert bool(cold.success) and bool(warm.success)
    np.testing.assert_allclose(warm.eigenvalues, [lam], rtol=1e-12)
    assert int(warm.num_matvecs) < int(cold.num_matvecs)  # the multiplicity check remains
    assert_eigenpairs(A, warm.eigenvalues, warm.eigenvectors, rtol=1e-7)
    # the same with a key given
    keyed = eigsh(A, 1, key=KEY, v0=jnp.asarray(q))
    assert int(keyed.num_matvecs) == int(warm.num_matvecs)


def test_eigsh_warm_start_tracks_a_slowly_changing_matrix_on_a_pytree():
    # previous eigenvector as v0, as in a training loop; the matrix moved a little
    _, q = top_vector(A)
    moved = A + 1e-3 * jnp.asarray(with_spectrum(np.linspace(-1, 1, 60), seed=5))
    lam_new, _ = top_vector(moved)

    def matvec(v):
        y = moved @ jnp.concatenate([v["a"], v["b"]])
        return {"a": y[:20], "b": y[20:]}

    v0 = {"a": jnp.asarray(q[:20]), "b": jnp.asarray(q[20:])}
    warm = eigsh(matvec, 1, v0=v0)  # like taken from v0
    cold = eigsh(matvec, 1, key=KEY, like=v0)
    np.testing.assert_allclose(warm.eigenvalues, [lam_new], rtol=1e-10)
    np.testing.assert_allclose(cold.eigenvalues, [lam_new], rtol=1e-10)
    assert int(warm.num_matvecs) < int(cold.num_matvecs)


def test_eigsh_v0_must_match_a():
    with pytest.raises(ValueError, match="v0 must match the shapes"):
        eigsh(A, 1, v0=jnp.ones(59))
    with pytest.raises(ValueError, match="v0 must have the same tree structure"):
        eigsh(A, 1, v0={"a": jnp.ones(60)})


def test_lanczos_draws_its_start_from_a_key():
    result = lanczos(A, None, 10, key=KEY)
    V = np.asarray(result.basis)
    np.testing.assert_allclose(V @ V.T, np.eye(10), atol=1e-12)
    again = lanczos(A, None, 10, key=KEY)
    np.testing.assert_array_equal(result.alphas, again.alphas)


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
    res = eigsh(op, 3, key=KEY)
    values, vectors = res.eigenvalues, res.eigenvectors
    np.testing.assert_allclose(values, exact[-3:], rtol=1e-9)
    flat_vectors = np.stack(
        [flat(jax.tree_util.tree_map(lambda x, i=i: x[i], vectors)) for i in range(3)]
    )
    assert_eigenpairs(dense, values, flat_vectors, rtol=1e-7)


def test_eigsh_with_exactly_repeated_eigenvalues_returns_no_nans():
    # three distinct eigenvalues: the Krylov space breaks down after three steps
    matrix = jnp.asarray(with_spectrum(np.repeat([-1.0, 2.0, 5.0], 10)))
    res = eigsh(matrix, 1, which="SA", key=KEY)
    values, vectors = res.eigenvalues, res.eigenvectors
    np.testing.assert_allclose(values, [-1.0], rtol=1e-10)
    assert np.all(np.isfinite(np.asarray(vectors)))


def test_lanczos_tridiagonalizes_with_an_orthonormal_basis():
    v0 = {"u": jnp.ones(20), "w": jnp.arange(40.0).reshape(8, 5)}

    def matvec(v):
        y = A @ jnp.concatenate([v["u"], v["w"].ravel()])
        return {"u": y[:20], "w": y[20:].reshape(8, 5)}

    result = lanczos(matvec, v0, 25)
    assert int(result.num_matvecs) == 25
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
    res = jax.jit(
        lambda key: spectral_density(matrix, key=key, num_probes=30, num_steps=20, sigma=0.1)
    )(KEY)
    assert isinstance(res, hessfree.DensityResult) and int(res.num_matvecs) == 30 * 20
    grid, density = res.grid, res.density
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
    res = spectral_density(op, key=KEY, num_probes=3, num_steps=30, num_points=200, chunk_size=2)
    grid, density = res.grid, res.density
    assert int(res.num_matvecs) == 3 * 30
    assert abs(float(jnp.trapezoid(density, grid)) - 1.0) < 1e-12
    # Ritz values of 30 steps reach the extreme eigenvalues; the grid covers them
    assert grid[0] <= exact[0] and grid[-1] >= exact[-1]


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match=r"k must be at most the dimension n = 60 .* got k = 61"):
        eigsh(A, 61, key=KEY)
    with pytest.raises(ValueError, match=r"which must be one of \['LA', 'SA', 'LM'\]; got 'BE'"):
        eigsh(A, 1, which="BE", key=KEY)
    with pytest.raises(ValueError, match=r"eigsh needs key=.*\(or pass v0\); got None"):
        eigsh(A, 1)
    with pytest.raises(ValueError, match=r"lanczos needs key=.*\(or pass v0\); got None"):
        lanczos(A, None, 5)
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        eigsh(A, 1, key=0)
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
    with pytest.raises(
        ValueError, match=r"num_probes must be an integer in \[1, 2\*\*31 - 1\]; got 0"
    ):
        spectral_density(A, key=KEY, num_probes=0, num_steps=5)
    with pytest.raises(ValueError, match="spectral_density needs key="):
        spectral_density(A, key=None, num_probes=1, num_steps=5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="positional"):
        spectral_density(A, KEY, num_probes=1, num_steps=5)  # type: ignore[misc]
    with pytest.raises(ValueError, match=r"sigma must be a finite number > 0\.0; got 0\.0"):
        spectral_density(A, key=KEY, num_probes=1, num_steps=5, sigma=0.0)
    with pytest.raises(ValueError, match="num_points must be at least 2; got 1"):
        spectral_density(A, key=KEY, num_probes=1, num_steps=5, num_points=1)
    with pytest.raises(TypeError, match="chunk_size must be a positive integer or None"):
        spectral_density(A, key=KEY, num_probes=2, num_steps=5, chunk_size=1.5)
    with pytest.raises(ValueError, match=r"tol must be a finite number > 0\.0"):
        eigsh(A, 1, key=KEY, tol=0.0)
    with pytest.raises(ValueError, match=r"maxiter must be an integer in \[1, 2\*\*31 - 1\]"):
        eigsh(A, 1, key=KEY, maxiter=2**40)


def test_spectral_density_is_the_same_one_probe_at_a_time_or_all_together(mlp, monkeypatch):
    # by default probes run together, or one after another on CPU for operators on more than
    # hessfree._krylov.SEQUENTIAL numbers (0 here, so this small one takes that path; a
    # step count no other test uses, so the default's program is compiled under it): the
    # same probes give the same quadrature, to rounding
    op, _ = mlp
    monkeypatch.setattr(hessfree._krylov, "SEQUENTIAL", 0)
    kwargs = {"key": KEY, "num_probes": 4, "num_steps": 13, "num_points": 100}
    default = spectral_density(op, **kwargs)
    for c in (1, 2, 4):
        res = spectral_density(op, chunk_size=c, **kwargs)
        np.testing.assert_allclose(res.grid, default.grid, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(res.density, default.density, rtol=1e-7, atol=1e-9)

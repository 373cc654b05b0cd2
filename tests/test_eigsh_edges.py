"""eigsh at its edges (issue 10): repeated eigenvalues, non-symmetric or non-finite input,
overflow, eigenvalue derivatives, and a scale fuzz: right, or not success."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hessfree as hf

KEY = jax.random.key(0)
DTYPES = [jnp.float32, jnp.float64]


def rtol_of(dtype):
    return 1e-3 if dtype == jnp.float32 else 1e-9


def with_spectrum(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues), len(eigenvalues))))
    m = q @ np.diag(eigenvalues) @ q.T
    return (m + m.T) / 2


# --- 1. repeated eigenvalues ----------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("which", "expected"), [("LA", [2, 2, 5]), ("SA", [1, 2, 2])])
def test_eigsh_finds_the_multiplicity_of_a_repeated_eigenvalue(dtype, which, expected):
    D = jnp.diag(jnp.array([1.0, 2.0, 2.0, 2.0, 5.0], dtype))
    res = hf.eigsh(D, 3, which=which, key=KEY)
    assert bool(res.success)
    np.testing.assert_allclose(res.eigenvalues, expected, rtol=rtol_of(dtype))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_eigsh_repeated_top_eigenvalue_in_a_larger_space(dtype, k):
    # n = 60 > num_steps: restarts and the multiplicity check both run
    spectrum = np.r_[6.0, 6.0, 6.0, np.linspace(-3, 3.5, 57)]
    matrix = jnp.asarray(with_spectrum(spectrum), dtype)
    res = hf.eigsh(matrix, k, key=KEY)
    assert bool(res.success)
    expected = np.sort(spectrum)[-k:]
    np.testing.assert_allclose(res.eigenvalues, expected, rtol=rtol_of(dtype))


@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_missed_copy_just_beyond_the_next_value_is_found(which):
    # the check converges its extra pair only to sqrt(tol) when that pair is clearly outside
    # the wanted set; here a copy of the top value sits 1e-3 (relative) beyond the next one,
    # closer than sqrt(tol) = 1e-2 would resolve, so the check must go on and find it
    sign = -1.0 if which == "SA" else 1.0
    spectrum = sign * np.r_[5.0, 5.0, 4.995, np.linspace(-1.0, 1.0, 77)]
    matrix = jnp.asarray(with_spectrum(spectrum, seed=3))
    res = hf.eigsh(matrix, 2, which=which, key=KEY, tol=1e-4, num_steps=12)
    assert bool(res.success)
    np.testing.assert_allclose(np.abs(res.eigenvalues), [5.0, 5.0], rtol=1e-6)


def quartic(x, d):
    return 0.5 * jnp.sum(d * x**2) + 0.01 * jnp.sum(x**4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_eigsh_on_a_hessian_with_a_repeated_extreme_eigenvalue(dtype, which):
    n = 40
    d = np.linspace(1.0, 3.0, n)
    d[:3], d[-3:] = 0.5, 4.0  # repeated min and max
    d = jnp.asarray(d, dtype)
    x = jnp.zeros(n, dtype).at[5].set(0.1)  # the quartic term barely moves one entry
    dense = np.asarray(jax.hessian(quartic)(x.astype(jnp.float64), d.astype(jnp.float64)))
    exact = np.linalg.eigvalsh(dense)
    res = hf.eigsh(hf.hessian(quartic, x, d), 3, which=which, key=KEY)
    assert bool(res.success)
    expected = exact[-3:] if which == "LA" else exact[:3]
    np.testing.assert_allclose(res.eigenvalues, expected, rtol=rtol_of(dtype))


# --- 2. refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_refuses_a_non_symmetric_dense_matrix(dtype):
    with pytest.raises(ValueError, match=r"A must be symmetric"):
        hf.eigsh(jnp.array([[1.0, 2.0], [0.0, 1.0]], dtype), 1, key=KEY)
    # rounding-level asymmetry is fine
    m = jnp.asarray(with_spectrum([1.0, 2.0, 3.0]), dtype)
    assert bool(hf.eigsh(m + 1e-9 * jnp.triu(m, 1), 1, key=KEY).success)


def test_eigsh_refuses_infinite_tol_and_spectral_density_infinite_sigma():
    A = jnp.diag(jnp.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=r"tol must be a finite number"):
        hf.eigsh(A, 1, key=KEY, tol=math.inf)
    with pytest.raises(ValueError, match=r"sigma must be a finite number"):
        hf.spectral_density(A, key=KEY, num_probes=1, num_steps=2, sigma=math.inf)


# --- 3. non-finite operators ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_stops_at_once_on_a_nan_operator(dtype):
    res = hf.eigsh(jnp.full((5, 5), jnp.nan, dtype), 1, key=KEY)
    assert int(res.status) == 3 and not bool(res.success) and int(res.num_matvecs) <= 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_eigsh_under_vmap_one_nan_operator_does_not_spoil_the_others(dtype):
    spectra = [np.linspace(-1.0, 1.0, 30) * s for s in (1.0, 2.0, 3.0)]
    stack = np.stack([with_spectrum(s, seed=i) for i, s in enumerate(spectra)])
    stack[1] = np.nan
    res = jax.vmap(lambda m: hf.eigsh(m, 1, key=KEY))(jnp.asarray(stack, dtype))
    np.testing.assert_array_equal(res.status, [0, 3, 0])
    assert int(res.num_matvecs[1]) <= 2
    np.testing.assert_allclose(res.eigenvalues[[0, 2], 0], [1.0, 3.0], rtol=rtol_of(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_lanczos_with_a_nan_start_gives_nan_not_a_random_start(dtype):
    A = jnp.diag(jnp.array([1.0, 2.0, 3.0, 4.0], dtype))
    res = hf.lanczos(A, jnp.full(4, jnp.nan, dtype), 3)
    assert np.all(np.isnan(np.asarray(res.alphas)))


# --- 5. overflow ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale", [1e-20, 1e20])
def test_eigsh_at_extreme_scales_is_right_or_not_success(dtype, scale):
    res = hf.eigsh(jnp.asarray(scale * np.diag([1.0, 2.0, 3.0]), dtype), 1, key=KEY)
    assert bool(res.success)
    np.testing.assert_allclose(res.eigenvalues, [3 * scale], rtol=rtol_of(dtype))


# --- 6. eigenvalue derivatives (Hellmann-Feynman) ---------------------------------------------


def gapped(dtype, n=6):
    return jnp.asarray(with_spectrum(np.array([-2.0, -1.0, 0.5, 1.5, 3.0, 4.0])[:n]), dtype)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA"])
def test_grad_of_eigenvalues_of_a_dense_matrix_matches_eigh(dtype, which):
    M = gapped(dtype)

    def top(M):
        return hf.eigsh(M, 2, which=which, key=KEY).eigenvalues

    def ref(M):
        w = jnp.linalg.eigh(M)[0]
        return w[-2:] if which == "LA" else w[:2]

    weights = jnp.array([0.3, 1.0], dtype)
    g = jax.grad(lambda M: top(M) @ weights)(M)
    g_ref = jax.grad(lambda M: ref(M) @ weights)(M)
    np.testing.assert_allclose(g, g_ref, atol=10 * rtol_of(dtype))
    J = jax.jacrev(top)(M)
    np.testing.assert_allclose(J, jax.jacrev(ref)(M), atol=10 * rtol_of(dtype))


def test_grad_of_eigenvalues_matches_finite_differences():
    M = gapped(jnp.float64)
    E = jnp.asarray(with_spectrum(np.linspace(-1, 1, 6), seed=3))
    f = lambda t: hf.eigsh(M + t * E, 1, key=KEY).eigenvalues[0]  # noqa: E731
    h = 1e-5
    fd = (f(h) - f(-h)) / (2 * h)
    np.testing.assert_allclose(jax.grad(f)(0.0), fd, rtol=1e-6)
    np.testing.assert_allclose(jax.jacfwd(f)(0.0), fd, rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_of_a_hessian_eigenvalue_wrt_data_and_point(dtype):
    n = 8
    d = jnp.asarray(np.linspace(1.0, 4.0, n), dtype)
    x = jnp.asarray(np.linspace(-0.5, 0.5, n), dtype)

    def top(x, d):
        return hf.eigsh(hf.hessian(quartic, x, d), 1, key=KEY).eigenvalues[0]

    def ref(x, d):
        return jnp.linalg.eigvalsh(jax.hessian(quartic)(x, d))[-1]

    for argnum in (0, 1):
        np.testing.assert_allclose(
            jax.grad(top, argnum)(x, d), jax.grad(ref, argnum)(x, d), atol=10 * rtol_of(dtype)
        )


def test_grad_through_a_partial_operator():
    M = gapped(jnp.float64)

    def apply(M, v):
        return M @ v

    def top(M):
        op = jax.tree_util.Partial(apply, M)
        return hf.eigsh(op, 1, key=KEY, like=jnp.zeros(6)).eigenvalues[0]

    g_ref = jax.grad(lambda M: jnp.linalg.eigh(M)[0][-1])(M)
    np.testing.assert_allclose(jax.grad(top)(M), g_ref, atol=1e-9)
    np.testing.assert_allclose(jax.jit(jax.grad(top))(M), g_ref, atol=1e-9)


# --- 6b. eigenvector derivatives (Nelson 1976 / Magnus 1985, a CG solve per vector) ----------

MIXED = [-3.5, -1.0, 0.5, 1.5, 2.0, 4.0]  # LM k=2 wants -3.5 and 4: one of each sign


def wanted(w, which, k):
    """Indices (ascending eigenvalue) of the k wanted among eigh's ascending values w."""
    score = {"LA": -w, "SA": w, "LM": -jnp.abs(w)}[which]
    return jnp.sort(jnp.argsort(score)[:k])


def projectors(Y):
    """``yᵢyᵢᵀ`` for the rows of Y: sign-invariant functions of the eigenvectors."""
    return jnp.einsum("ki,kj->kij", Y, Y)


def eigh_vectors(M, which, k):
    """The k wanted eigenvectors as rows, through jnp.linalg.eigh (unrolled reference)."""
    w, V = jnp.linalg.eigh(M)
    return V[:, wanted(w, which, k)].T


def sym(G):
    """Symmetric part in the last two axes: the gradient in the space of symmetric matrices."""
    return (G + jnp.swapaxes(G, -1, -2)) / 2


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("which", ["LA", "SA", "LM"])
def test_eigenvector_derivatives_of_a_dense_matrix_match_eigh(dtype, which):
    M = jnp.asarray(with_spectrum(np.array(MIXED)), dtype)
    w = jnp.asarray(np.random.default_rng(1).normal(size=6), dtype)
    c = jnp.array([1.0, 2.0], dtype)

    def ours(M):
        return projectors(hf.eigsh(M, 2, which=which, key=KEY).eigenvectors)

    def ref(M):
        return projectors(eigh_vectors(M, which, 2))

    atol = 10 * rtol_of(dtype)
    np.testing.assert_allclose(sym(jax.jacrev(ours)(M)), jax.jacrev(ref)(M), atol=atol)

    def loss(f):  # Σ cᵢ (wᵀyᵢ)²
        return lambda M: jnp.einsum("kij,i,j,k->", f(M), w, w, c)

    np.testing.assert_allclose(sym(jax.grad(loss(ours))(M)), jax.grad(loss(ref))(M), atol=atol)
    E = jnp.asarray(with_spectrum(np.linspace(-1, 1, 6), seed=3), dtype)
    np.testing.assert_allclose(jax.jvp(ours, (M,), (E,))[1], jax.jvp(ref, (M,), (E,))[1], atol=atol)


@pytest.mark.slow
def test_eigenvector_derivatives_match_finite_differences():
    M = jnp.asarray(with_spectrum(np.array(MIXED)))
    E = jnp.asarray(with_spectrum(np.linspace(-1, 1, 6), seed=3))
    for which in ("LA", "SA", "LM"):

        def f(t, which=which):
            return projectors(hf.eigsh(M + t * E, 2, which=which, key=KEY).eigenvectors)

        h = 1e-5
        fd = (f(h) - f(-h)) / (2 * h)
        np.testing.assert_allclose(jax.jacfwd(f)(0.0), fd, atol=1e-8)
        np.testing.assert_allclose(jax.jacrev(f)(0.0), fd, atol=1e-8)


def coupled(x, d):
    """A Hessian with off-diagonal entries that depend on the data d and the point x."""
    return 0.5 * jnp.sum(d * x**2) + 0.5 * jnp.sum(d[1:] * x[1:] * x[:-1]) + 0.1 * jnp.sum(x**4)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
def test_grad_of_a_hessian_eigenvector_wrt_data_and_point(dtype):
    n = 8
    d = jnp.asarray(np.linspace(1.0, 4.0, n), dtype)
    x = jnp.asarray(np.linspace(-0.5, 0.5, n), dtype)
    w = jnp.asarray(np.random.default_rng(2).normal(size=n), dtype)

    def top(x, d):
        Y = hf.eigsh(hf.hessian(coupled, x, d), 2, key=KEY).eigenvectors
        return jnp.sum((Y @ w) ** 2 * jnp.array([1.0, 2.0], dtype))

    def ref(x, d):
        Y = jnp.linalg.eigh(jax.hessian(coupled)(x, d))[1][:, -2:].T
        return jnp.sum((Y @ w) ** 2 * jnp.array([1.0, 2.0], dtype))

    for argnum in (0, 1):
        np.testing.assert_allclose(
            jax.grad(top, argnum)(x, d), jax.grad(ref, argnum)(x, d), atol=10 * rtol_of(dtype)
        )


def test_grad_of_eigenvectors_through_a_partial_operator_under_jit_and_vmap():
    M = gapped(jnp.float64)
    w = jnp.asarray(np.random.default_rng(1).normal(size=6))

    def apply(M, v):
        return M @ v

    def top(M):
        op = jax.tree_util.Partial(apply, M)
        y = hf.eigsh(op, 1, key=KEY, like=jnp.zeros(6)).eigenvectors[0]
        return (w @ y) ** 2

    g_ref = jax.grad(lambda M: (w @ jnp.linalg.eigh(M)[1][:, -1]) ** 2)(M)
    np.testing.assert_allclose(sym(jax.grad(top)(M)), g_ref, atol=1e-9)
    np.testing.assert_allclose(sym(jax.jit(jax.grad(top))(M)), g_ref, atol=1e-9)
    stack = jnp.stack([M, 2 * M])
    np.testing.assert_allclose(sym(jax.vmap(jax.grad(top))(stack)[1]), g_ref / 2, atol=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [2, 3])
def test_repeated_eigenvalue_gives_nan_eigenvector_derivatives_only(dtype, k):
    # spectrum 1, 2, 2, 5: k = 3 holds the tie; k = 2 cuts it (2 wanted, its copy left out)
    M = jnp.asarray(with_spectrum(np.array([1.0, 2.0, 2.0, 5.0])), dtype)
    E = jnp.asarray(with_spectrum(np.linspace(-1, 1, 4), seed=3), dtype)
    w = jnp.asarray([0.3, -1.0, 0.5, 2.0], dtype)

    def res(M):
        return hf.eigsh(M, k, key=KEY)

    def loss(M, i):
        return (w @ res(M).eigenvectors[i]) ** 2

    tangent = jax.jvp(res, (M,), (E,))[1]
    tied = 0  # eigenvectors[0] belongs to a copy of 2
    assert np.all(np.isnan(tangent.eigenvectors[tied]))
    assert np.all(np.isnan(jax.grad(loss)(M, tied)))
    # eigenvalue derivatives stay finite (with the tie inside, their sum is unique)
    g = jax.grad(lambda M: jnp.sum(res(M).eigenvalues))(M)
    assert np.all(np.isfinite(g))
    if k == 3:
        g_ref = jax.grad(lambda M: jnp.sum(jnp.linalg.eigvalsh(M)[-k:]))(M)
        np.testing.assert_allclose(g, g_ref, atol=10 * rtol_of(dtype))

    # the simple eigenvalue's vector (θ = 5) keeps a finite derivative, in both modes
    def simple(M):  # forward through eigh: its 1/0 stays in the tied columns
        return jnp.linalg.eigh(M)[1][:, -1]

    y, dy = jax.jvp(simple, (M,), (E,))
    sign = jnp.sign(y @ res(M).eigenvectors[-1])
    atol = 10 * rtol_of(dtype)
    np.testing.assert_allclose(sign * tangent.eigenvectors[-1], dy, atol=atol)
    directional = jnp.sum(jax.grad(loss)(M, -1) * E)
    np.testing.assert_allclose(directional, 2 * (w @ y) * (w @ dy), atol=atol)


@pytest.mark.slow
def test_second_derivatives_of_eigenpairs_match_eigh():
    M = jnp.asarray(with_spectrum(np.array(MIXED)))
    E = jnp.asarray(with_spectrum(np.linspace(-1, 1, 6), seed=3))
    w = jnp.asarray(np.random.default_rng(1).normal(size=6))

    def second(f):
        return jax.jvp(lambda t: jax.jvp(f, (M + t * E,), (E,))[1], (0.0,), (1.0,))[1]

    value = lambda M: hf.eigsh(M, 2, key=KEY).eigenvalues  # noqa: E731
    vector = lambda M: projectors(hf.eigsh(M, 2, key=KEY).eigenvectors) @ w  # noqa: E731
    np.testing.assert_allclose(
        second(value), second(lambda M: jnp.linalg.eigvalsh(M)[-2:]), atol=1e-8
    )
    np.testing.assert_allclose(
        second(vector), second(lambda M: projectors(eigh_vectors(M, "LA", 2)) @ w), atol=1e-8
    )
    loss = lambda f: lambda M: jnp.sum(f(M) ** 2)  # noqa: E731
    H = jax.hessian(loss(vector))(M)
    H_ref = jax.hessian(loss(lambda M: projectors(eigh_vectors(M, "LA", 2)) @ w))(M)
    np.testing.assert_allclose(
        jnp.einsum("ij,ijkl,kl->", E, H, E), jnp.einsum("ij,ijkl,kl->", E, H_ref, E), rtol=1e-7
    )


# --- 7. scale fuzz: within the stated tolerance of eigvalsh, or not success -------------------


def _fuzz(dtype_name, exponent, n, k, which, repeat, seed):
    dtype = jnp.float32 if dtype_name == "float32" else jnp.float64
    rng = np.random.default_rng(seed)
    spectrum = rng.normal(size=n)
    if repeat:
        spectrum[: min(3, n)] = spectrum[0]  # a repeated value, somewhere in the spectrum
    matrix = with_spectrum(spectrum, seed) * 10.0**exponent
    A = jnp.asarray(matrix, dtype)
    exact = np.linalg.eigvalsh(np.asarray(A, np.float64))
    res = hf.eigsh(A, k, which=which, key=jax.random.key(seed), maxiter=100)
    if not bool(res.success):
        return
    order = {"LA": -exact, "SA": exact, "LM": -np.abs(exact)}[which]
    expected = np.sort(exact[np.argsort(order, kind="stable")[:k]])
    values = np.asarray(res.eigenvalues, np.float64)
    assert np.all(np.isfinite(values))
    eps = float(np.finfo(dtype).eps)
    tol = math.sqrt(eps)
    norm = np.max(np.abs(exact))
    # |θ − λ| <= ‖A y − θ y‖ <= tol·|θ| (with a floor eps^(2/3)·max|θ| for θ near 0), plus
    # rounding of the products
    bound = 2 * tol * np.maximum(np.abs(values), eps ** (2 / 3) * norm) + 100 * n * eps * norm
    if which == "LM":  # ±λ ties at equal magnitude: compare magnitudes
        values, expected = np.sort(np.abs(values)), np.sort(np.abs(expected))
    assert np.all(np.abs(values - expected) <= bound), (values, expected, bound)


_FUZZ = (
    st.sampled_from(["float32", "float64"]),
    st.floats(-1.0, 1.0),
    st.integers(3, 40),
    st.integers(1, 3),
    st.sampled_from(["LA", "SA", "LM"]),
    st.booleans(),
    st.integers(0, 2**16),
)


def _scaled_fuzz(dtype_name, unit, n, k, which, repeat, seed):
    limit = 18 if dtype_name == "float32" else 30
    _fuzz(dtype_name, unit * limit, n, min(k, n - 1), which, repeat, seed)


def _generated(count):
    checks = list(HealthCheck)
    return settings(max_examples=count, deadline=None, suppress_health_check=checks)(
        given(*_FUZZ)(_scaled_fuzz)
    )


test_eigsh_scale_fuzz = _generated(4)  # CI; 300 examples in the slow tier
test_eigsh_scale_fuzz_many = pytest.mark.slow(_generated(300))

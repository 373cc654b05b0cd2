"""Randomized trace and diagonal estimates of an operator from matrix-vector products.

All probes are drawn at once and pushed through the operator together (``vmap`` of its
product), or `chunk_size` at a time to bound memory. Probes are pytrees shaped like A's input
(each leaf with a leading probe axis), drawn leaf by leaf in the input's dtypes and layout;
nothing is raveled, so sharded parameters stay sharded. `num_probes` is static (a new count
compiles a new program): keep it fixed in a loop.

The exchangeable estimators XTrace and XDiag (Epperly, Tropp & Webber 2024) use N/2 test
vectors Ω twice: as Hutchinson probes and, leaving one out, as the sketch ``A Ω_{-i}`` of a
low-rank approximation. All N/2 leave-one-out estimates come from one orthonormalization of
``A Ω`` and ``k × k`` algebra on inner products (k = N/2); only those small matrices are dense.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg

from . import _tree as tree
from ._krylov import orthonormal_rows, probes, seed_of
from ._linop import TreeOperator, tree_operator
from ._results import DiagonalEstimate, TraceEstimate
from ._staging import staged
from ._validation import PyTree, check_choice, check_key, check_positive_int

TRACE_METHODS = ("hutchinson", "hutch++", "xtrace")
DIAGONAL_METHODS = ("hutchinson", "xdiag")
EXCHANGEABLE = ("xtrace", "xdiag")  # need an even num_probes >= 4
DISTRIBUTIONS = ("rademacher", "gaussian")


def _probes(key: jax.Array, count: int, op: TreeOperator, distribution: str) -> PyTree:
    """`count` probe vectors with ``E[z zᵀ] = I``: leaves ``(count, *leaf_shape)``, hashed
    from the key's seed (:func:`hessfree._krylov.probes`)."""
    return probes(seed_of(key), op.zeros(), count, distribution)


def _mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    count = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    if count < 2:
        return mean, jnp.full_like(mean, jnp.inf)
    return mean, jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(count).astype(samples.dtype)


def _hutchinson(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    z = _probes(key, count, op, distribution)
    return _mean_and_stderr(tree.rowwise_vdot(z, op.mm(z, chunk_size)))


def _hutch_plus_plus(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """``tr(QᵀAQ) + hutchinson((I − QQᵀ) A (I − QQᵀ))`` with Q spanning ``A S``; budget count."""
    sketch = count // 3
    key_s, key_g = jax.random.split(key)
    S = _probes(key_s, sketch, op, distribution)
    Q = orthonormal_rows(op.mm(S, chunk_size), sketch)
    exact = jnp.sum(tree.rowwise_vdot(Q, op.mm(Q, chunk_size)))
    G = _probes(key_g, count - 2 * sketch, op, distribution)
    coeffs = jax.vmap(tree.project, in_axes=(None, 0))(Q, G)  # (count - 2 sketch, sketch)
    G = tree.sub(G, jax.vmap(tree.combine, in_axes=(0, None))(coeffs, Q))
    rest, stderr = _mean_and_stderr(tree.rowwise_vdot(G, op.mm(G, chunk_size)))
    return exact + rest, stderr


# --- exchangeable estimators (XTrace, XDiag) -------------------------------------------------


def _scale_rows(c: jax.Array, X: PyTree) -> PyTree:
    """Row i of the basis X times ``c[i]``, leaf by leaf in each leaf's dtype."""

    def one(leaf: jax.Array) -> jax.Array:
        return leaf * c.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype)

    return jax.tree_util.tree_map(one, X)


def _rows(C: jax.Array, V: PyTree) -> PyTree:
    """The basis whose row i is ``Σ_j C[j, i] V[j]`` (V's rows combined by C's columns)."""
    return jax.vmap(tree.combine, in_axes=(1, None))(C, V)


def _gram(X: PyTree, V: PyTree, dtype: Any) -> jax.Array:
    """``M[j, i] = ⟨X[j], V[i]⟩`` for two bases (k × k, in the operator's scalar dtype)."""
    return jax.vmap(tree.project, in_axes=(None, 0))(X, V).T.astype(dtype)


def _test_vectors(key: jax.Array, count: int, op: TreeOperator, distribution: str) -> PyTree:
    """`count` test vectors: Rademacher, or uniform on the sphere of radius √n ("gaussian")."""
    omega = _probes(key, count, op, distribution)
    if distribution == "gaussian":  # the paper's normalization: Gaussian directions, norm √n
        norms = jnp.sqrt(tree.rowwise_vdot(omega, omega))
        factor = jnp.sqrt(jnp.asarray(op.size, op.dtype)) / jnp.where(norms > 0, norms, 1)
        omega = _scale_rows(factor, omega)
    return omega


class _Sketch(NamedTuple):
    """``Y = A Ω = Q R``, ``Z = A Q`` and the leave-one-out directions, for k test vectors.

    Q's rows are orthonormal or zero (a column of Y numerically in the span of the ones before
    it gives a zero row). Column i of S is the unit vector s with ``Q_(i) Q_(i)ᵀ = QQᵀ −
    (Qs)(Qs)ᵀ``, Q_(i) spanning ``A Ω_{-i}``; it is zero where leaving ω_i out shrinks nothing
    (``A ω_i`` lies in the span of the others), and then ``removed[i]`` is 0, else 1.
    """

    omega: PyTree
    Y: PyTree
    Q: PyTree
    Z: PyTree
    R: jax.Array  # R[j, i] = ⟨q_j, y_i⟩ (upper triangular)
    W: jax.Array  # W[j, i] = ⟨q_j, ω_i⟩
    S: jax.Array
    removed: jax.Array  # (k,) 1.0 where a direction is removed, else 0.0
    rank: jax.Array  # the number of nonzero rows of Q


def _sketch(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> _Sketch:
    """Spend exactly `count` products: ``A Ω`` on k = count/2 test vectors, then ``A Q``."""
    k, dtype = count // 2, op.dtype
    omega = _test_vectors(key, k, op, distribution)
    Y = op.mm(omega, chunk_size)
    Q = orthonormal_rows(Y, k)
    Z = op.mm(Q, chunk_size)
    R, W = _gram(Q, Y, dtype), _gram(Q, omega, dtype)
    # range(A Ω_{-i}) is range(Q) less the direction Q R^{-T} e_i (orthogonal to every y_j,
    # j ≠ i). R's columns are scaled to unit norm first (the directions do not change), and a
    # zero row j of Q (column j dependent on the ones before it) gets a unit pivot, so the
    # solve stays finite; then entry j of R̂^{-T} e_i is minus the (scaled) coefficient of y_i
    # in y_j, and ω_i is removable only if no dependent column uses y_i.
    pivot = tree.rowwise_vdot(Q, Q) > 0.5
    norms = jnp.linalg.norm(R, axis=0)
    R_hat = jnp.where(pivot[:, None], jnp.triu(R / jnp.where(norms > 0, norms, 1)), 0)
    R_hat = R_hat + jnp.diag(jnp.where(pivot, 0, 1).astype(dtype))
    T = jax.scipy.linalg.solve_triangular(R_hat, jnp.eye(k, dtype=dtype), trans=1, lower=False)
    t_kept = jnp.where(pivot[:, None], T, 0)
    t_dependent = jnp.where(pivot[:, None], 0, T)
    size = jnp.linalg.norm(t_kept, axis=0)
    tol = jnp.sqrt(jnp.finfo(dtype).eps)
    removed = (jnp.max(jnp.abs(t_dependent), axis=0) <= tol) & (size > 0)
    S = jnp.where(removed[None, :], t_kept / jnp.where(size > 0, size, 1), 0)
    rank = jnp.sum(pivot).astype(dtype)
    return _Sketch(omega, Y, Q, Z, R, W, S, removed.astype(dtype), rank)


def _xtrace(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """Mean and spread of the k leave-one-out estimates ``tr(Q_(i)ᵀAQ_(i)) + vᵢᵀ A vᵢ``,
    ``vᵢ = (I − Q_(i)Q_(i)ᵀ) ωᵢ``, all from k × k inner products (no product with Aᵀ)."""
    sk = _sketch(op, key, count, distribution, chunk_size)
    dtype = op.dtype
    H = _gram(sk.Q, sk.Z, dtype)  # H[j, l] = q_jᵀ A q_l
    T = _gram(sk.Z, sk.omega, dtype)  # T[j, i] = (A q_j)ᵀ ω_i
    S, W, R = sk.S, sk.W, sk.R
    c = jnp.sum(S * W, axis=0)  # s_iᵀ Qᵀ ω_i
    U = W - S * c  # vᵢ = ωᵢ − Q uᵢ
    sketched = jnp.trace(H) - jnp.sum(S * (H @ S), axis=0)  # tr(Q_(i)ᵀ A Q_(i))
    # vᵢᵀ A vᵢ = ωᵢᵀAωᵢ − ωᵢᵀ A Q uᵢ − uᵢᵀ Qᵀ A ωᵢ + uᵢᵀ H uᵢ
    quad = tree.rowwise_vdot(sk.omega, sk.Y).astype(dtype)
    quad = quad - jnp.sum(T * U, axis=0) - jnp.sum(U * R, axis=0) + jnp.sum(U * (H @ U), axis=0)
    if distribution == "gaussian":
        # improved normalization: vᵢ is uniform on the sphere of the complement of Q_(i)
        # (dimension n − rank(Q_(i))), so (that dimension / ‖vᵢ‖²) vᵢᵀAvᵢ is exactly unbiased
        sq_omega = tree.rowwise_vdot(sk.omega, sk.omega).astype(dtype)
        sq = sq_omega - jnp.sum(W * W, axis=0) + c * c  # ‖vᵢ‖²
        dim = jnp.maximum(op.size - sk.rank + sk.removed, 0)
        ok = sq > jnp.finfo(dtype).eps * sq_omega
        quad = jnp.where(ok, dim * quad / jnp.where(ok, sq, 1), 0)
    return _mean_and_stderr(sketched + quad)


def _xdiag(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[PyTree, PyTree]:
    """Mean and spread of the k leave-one-out estimates
    ``diag(Q_(i)Q_(i)ᵀA) + ωᵢ ⊙ (I − Q_(i)Q_(i)ᵀ) A ωᵢ``, with ``Qᵀ A = (A Q)ᵀ`` (A symmetric)."""
    sk = _sketch(op, key, count, distribution, chunk_size)
    c = jnp.sum(sk.S * sk.R, axis=0)  # s_iᵀ Qᵀ A ω_i
    QS, ZS, QR = _rows(sk.S, sk.Q), _rows(sk.S, sk.Z), _rows(sk.R, sk.Q)

    def leaf(q, z, qs, zs, qr, om, y):
        base = jnp.sum(q * z, axis=0)  # diag(QQᵀA) = Σ_j q_j ⊙ A q_j
        c_rows = c.reshape((-1,) + (1,) * (y.ndim - 1)).astype(y.dtype)
        residual = y - qr + qs * c_rows  # (I − Q_(i)Q_(i)ᵀ) A ωᵢ
        return (base[None] - qs * zs + om * residual).astype(y.dtype)

    samples = jax.tree_util.tree_map(leaf, sk.Q, sk.Z, QS, ZS, QR, sk.omega, sk.Y)
    stats = jax.tree_util.tree_map(_mean_and_stderr, samples)
    value = jax.tree_util.tree_map(lambda _, s: s[0], samples, stats)
    stderr = jax.tree_util.tree_map(lambda _, s: s[1], samples, stats)
    return value, stderr


def _check_exchangeable(num_probes: int, method: str) -> None:
    if method in EXCHANGEABLE and (num_probes < 4 or num_probes % 2):
        msg = (
            f"num_probes must be an even number >= 4 for method={method!r} (N/2 test vectors, "
            f"each used for one product A ω and one product A q); got {num_probes}"
        )
        raise ValueError(msg)


def _check_common(key: Any, num_probes: Any, distribution: str, chunk_size: Any, fn: str) -> None:
    check_key(key, fn, "its probes")
    check_positive_int(num_probes, "num_probes")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)


_TRACE_ESTIMATORS = {"hutchinson": _hutchinson, "hutch++": _hutch_plus_plus, "xtrace": _xtrace}


def _trace_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    method: str,
    distribution: str,
    chunk_size: int | None,
) -> TraceEstimate:
    op = tree_operator(A, like)
    value, stderr = _TRACE_ESTIMATORS[method](op, key, num_probes, distribution, chunk_size)
    return TraceEstimate(value, stderr, jnp.asarray(num_probes, jnp.int32))


def trace(
    A: Any,
    *,
    key: jax.Array,
    num_probes: int,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    like: PyTree | None = None,
    chunk_size: int | None = None,
) -> TraceEstimate:
    """Randomized estimate of ``tr(A)``.

    Hutchinson: ``tr(A) ≈ (1/N) Σᵢ zᵢᵀ A zᵢ`` with ``E[z zᵀ] = I`` (unbiased; with Rademacher
    probes the variance is ``2 Σ_{i≠j} A_ij²``). Hutch++: spend N/3 products on a sketch
    ``Q = orth(A S)`` whose trace ``tr(QᵀAQ)`` is computed exactly, N/3 on that, and the rest
    on Hutchinson of the deflated ``(I − QQᵀ) A (I − QQᵀ)``. XTrace (exchangeable): k = N/2
    test vectors ωᵢ, ``tr(A) ≈ (1/k) Σᵢ [tr(Q_(i)ᵀAQ_(i)) + ωᵢᵀ(I − Q_(i)Q_(i)ᵀ)A(I −
    Q_(i)Q_(i)ᵀ)ωᵢ]`` with ``Q_(i) = orth(A Ω_{-i})``: every vector serves in the sketch of
    the others and as the probe of its own residual; unbiased.

    Which to use: Hutchinson for a flat spectrum (no low-rank part to capture) or a very
    small budget; Hutch++ or XTrace when the spectrum decays or A is low rank plus noise (the
    error falls like 1/N instead of 1/√N). At equal N XTrace is usually several times more
    accurate than Hutch++ (all N products feed both the sketch and the probes), and exact
    when ``rank(A) < N/2``; on a flat spectrum all three are within a factor of about 2 of
    each other, Hutchinson usually best. XTrace with ``distribution="gaussian"`` (see below)
    is exact on a multiple of I and often more accurate than with random signs.

    Cost: exactly `num_probes` products with A (HVPs for a Hessian), run together or
    `chunk_size` at a time. Hutch++ adds an orthonormalization of N/3 sketch vectors; XTrace
    one of its N/2 vectors ``A Ω`` (``O(N² n)``), then N/2 products ``A Q`` and ``O(N³)``
    dense work on N/2 × N/2 inner products, from which all N/2 leave-one-out estimates
    follow (no product with Aᵀ is needed); it holds 4 · N/2 vectors (Ω, AΩ, Q, AQ).

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense square matrix.
        key: a ``jax.random`` key (keyword-only).
        num_probes: N, the budget of products; at least 3 for ``"hutch++"``; even and at
            least 4 for ``"xtrace"`` (N/2 test vectors).
        method: ``"hutchinson"`` (default), ``"hutch++"`` or ``"xtrace"``.
        distribution: probe entries, ``"rademacher"`` (±1, default) or ``"gaussian"``. For
            XTrace ``"gaussian"`` draws test vectors uniformly on the sphere of radius √n and
            uses the paper's improved normalization of each residual probe (scaled by
            ``dim / ‖(I − Q_(i)Q_(i)ᵀ)ωᵢ‖²``, still unbiased, a little less variance).
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many products at once; None runs them all together.

    Returns:
        A :class:`TraceEstimate` ``(value, stderr, num_matvecs)``. For XTrace, `stderr` is the
        paper's error estimate from the spread of the k leave-one-out estimates,
        ``sqrt(Σᵢ (tᵢ − t̂)² / (k(k − 1)))``.

    Raises:
        ValueError: `key` missing; `num_probes` < 1 (< 3 for Hutch++, odd or < 4 for
            XTrace); unknown `method` or `distribution`; bad `chunk_size`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import hessfree as hf
        >>> float(hf.trace(jnp.diag(jnp.arange(1.0, 5.0)), key=jax.random.key(0), num_probes=8).value)
        10.0

    References:
        Hutchinson, Commun. Stat. Simul. Comput. 18, 1989; Meyer, Musco, Musco & Woodruff,
        "Hutch++: Optimal stochastic trace estimation", SOSA 2021; Epperly, Tropp & Webber,
        "XTrace: Making the most of every sample in stochastic trace estimation", SIAM J.
        Matrix Anal. Appl. 45, 2024.
    """
    _check_common(key, num_probes, distribution, chunk_size, "trace")
    check_choice(method, TRACE_METHODS, "method")
    if method == "hutch++" and num_probes < 3:
        msg = f"num_probes must be at least 3 for method='hutch++' (N/3 sketch); got {num_probes}"
        raise ValueError(msg)
    _check_exchangeable(num_probes, method)
    tree_operator(A, like)  # checks A and like before tracing
    statics = {"num_probes": num_probes, "method": method, "distribution": distribution}
    return staged(_trace_impl, A, like, key, chunk_size=chunk_size, **statics)


def _hutchinson_diagonal(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[PyTree, PyTree]:
    z = _probes(key, count, op, distribution)
    az = op.mm(z, chunk_size)
    # per probe: z ⊙ Az / mean(z ⊙ z); the mean over probes is Bekas et al.'s estimator
    norm = jax.tree_util.tree_map(lambda zl: jnp.mean(zl * zl, axis=0), z)
    samples = jax.tree_util.tree_map(lambda zl, al, nl: zl * al / nl, z, az, norm)
    stats = jax.tree_util.tree_map(_mean_and_stderr, samples)
    value = jax.tree_util.tree_map(lambda _, s: s[0], z, stats)
    stderr = jax.tree_util.tree_map(lambda _, s: s[1], z, stats)
    return value, stderr


_DIAGONAL_ESTIMATORS = {"hutchinson": _hutchinson_diagonal, "xdiag": _xdiag}


def _diagonal_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    method: str,
    distribution: str,
    chunk_size: int | None,
) -> DiagonalEstimate:
    op = tree_operator(A, like)
    value, stderr = _DIAGONAL_ESTIMATORS[method](op, key, num_probes, distribution, chunk_size)
    return DiagonalEstimate(value, stderr, jnp.asarray(num_probes, jnp.int32))


def diagonal(
    A: Any,
    *,
    key: jax.Array,
    num_probes: int,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    like: PyTree | None = None,
    chunk_size: int | None = None,
) -> DiagonalEstimate:
    """Randomized estimate of ``diag(A)``, as a pytree like A's input.

    Hutchinson: ``diag(A) ≈ (Σᵢ zᵢ ⊙ A zᵢ) ⊘ (Σᵢ zᵢ ⊙ zᵢ)`` (Bekas, Kokiopoulou & Saad 2007).
    With Rademacher probes the denominator is N and entry j has variance
    ``Σ_{l≠j} A_jl² / N``. XDiag (exchangeable): k = N/2 test vectors ωᵢ, ``diag(A) ≈ (1/k)
    Σᵢ [diag(Q_(i)Q_(i)ᵀA) + ωᵢ ⊙ (I − Q_(i)Q_(i)ᵀ) A ωᵢ]`` with ``Q_(i) = orth(A Ω_{-i})``;
    unbiased. A is taken to be symmetric (as are the Hessians, GGNs and Fishers hessfree
    builds, and the dense matrices it accepts): ``QᵀA = (A Q)ᵀ``, so no product with Aᵀ.

    Which to use: Hutchinson when the off-diagonal mass is spread out with no low-rank part
    (a flat spectrum) or the budget is tiny; XDiag when A is low rank plus noise or its
    spectrum decays, where its error falls like 1/N rather than 1/√N and it is exact for
    ``rank(A) < N/2``. Rademacher test vectors suit both (Gaussian ones add the spread of
    ``ωⱼ²`` to every entry).

    Cost: exactly `num_probes` products with A, together or `chunk_size` at a time; XDiag
    adds an orthonormalization of its N/2 vectors ``A Ω`` and ``O(N² n)`` work combining them,
    and holds about 8 · N/2 vectors (Ω, AΩ, Q, AQ, three combinations and the samples).

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense square matrix.
        key: a ``jax.random`` key (keyword-only).
        num_probes: N >= 1; even and at least 4 for ``"xdiag"`` (N/2 test vectors).
        method: ``"hutchinson"`` (default) or ``"xdiag"``.
        distribution: ``"rademacher"`` (default) or ``"gaussian"`` (for XDiag: uniform on
            the sphere of radius √n, the paper's normalization).
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many products at once.

    Returns:
        A :class:`DiagonalEstimate` ``(value, stderr, num_matvecs)``; `value` and `stderr`
        (per entry, from the spread of the probes) are pytrees like A's input. For XDiag,
        `stderr` is the exchangeable error estimate from the spread of the k leave-one-out
        estimates, ``sqrt(Σᵢ (dᵢ − d̂)² / (k(k − 1)))`` entry by entry.

    Raises:
        ValueError: `key` missing; `num_probes` < 1 (odd or < 4 for XDiag); unknown `method`
            or `distribution`.

    References:
        Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer.
        Math. 57, 2007; Epperly, Tropp & Webber, "XTrace: Making the most of every sample in
        stochastic trace estimation", SIAM J. Matrix Anal. Appl. 45, 2024 (XDiag).
    """
    _check_common(key, num_probes, distribution, chunk_size, "diagonal")
    check_choice(method, DIAGONAL_METHODS, "method")
    _check_exchangeable(num_probes, method)
    tree_operator(A, like)  # checks A and like before tracing
    statics = {"num_probes": num_probes, "method": method, "distribution": distribution}
    return staged(_diagonal_impl, A, like, key, chunk_size=chunk_size, **statics)

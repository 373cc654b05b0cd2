"""Spectra of symmetric operators from matrix-vector products: Lanczos, eigsh, spectral density.

Everything here works on the flat vector space of the operator's input (``ravel_pytree``
order) and calls the operator only through its product; results go back to pytrees at the end.
One Lanczos step costs one product (one HVP for a Hessian) plus ``O(m n)`` work for the full
reorthogonalization against the ``m`` basis vectors kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.flatten_util import ravel_pytree

from ._linop import matvec_and_structure
from ._validation import PyTree, check_choice, check_like, check_positive_int

WHICH = ("LA", "SA", "LM")
FlatMatVec = Callable[[jax.Array], jax.Array]


class FlatOperator(NamedTuple):
    """An operator seen on flat vectors: ``matvec`` on ``(n,)``, ``unravel`` back to pytrees."""

    matvec: FlatMatVec
    size: int
    dtype: Any
    unravel: Callable[[jax.Array], PyTree]
    pytree_mm: Callable[[PyTree], PyTree] | None
    structure: PyTree


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`.

    Attributes:
        alphas: ``(m,)`` diagonal of the tridiagonal ``T``.
        betas: ``(m,)``; ``betas[:-1]`` is the off-diagonal of ``T`` and ``betas[-1]`` the norm
            of the final residual, so ``A Vᵀ = Vᵀ T + betas[-1] r e_mᵀ`` with ``r`` a unit
            vector orthogonal to the basis. A zero entry marks a breakdown (an invariant
            subspace was found; the next vector is a fresh random direction).
        basis: a pytree like the start vector whose every leaf has a leading axis ``m``:
            ``basis[i]`` is the i-th orthonormal Lanczos vector ``v_i`` (``v_0 = v0/‖v0‖``).
    """

    alphas: jax.Array
    betas: jax.Array
    basis: PyTree


class EigshInfo(NamedTuple):
    """Convergence report of :func:`eigsh` (``return_info=True``).

    Attributes:
        residuals: ``(k,)`` Ritz residual norms ``‖A y − θ y‖`` (estimated as
            ``β·|last component of the Ritz vector|``), matching the eigenvalues.
        converged: whether every residual met ``tol``.
        num_matvecs: products with A used (HVPs for a Hessian).
        num_restarts: thick restarts performed.
    """

    residuals: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array


def flat_operator(A: Any, like: PyTree | None, name: str = "A") -> FlatOperator:
    """`A` (operator, callable + `like`, or dense matrix) as a product on flat vectors."""
    matvec, structure = matvec_and_structure(A, like, name)
    zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), structure)
    flat0, unravel = ravel_pytree(zeros)

    def flat_matvec(x: jax.Array) -> jax.Array:
        return ravel_pytree(matvec(unravel(x)))[0].astype(flat0.dtype)

    mm = getattr(A, "mm", None)
    pytree_mm = mm if callable(mm) else None
    return FlatOperator(flat_matvec, int(flat0.size), flat0.dtype, unravel, pytree_mm, structure)


def batched_matvec(op: FlatOperator, xs: jax.Array, chunk_size: int | None = None) -> jax.Array:
    """``A xᵢ`` for every row of ``xs`` ``(N, n)``: the operator's ``mm`` if any, else ``vmap``.

    With `chunk_size`, at most that many products run at once (``lax.map``).
    """
    if chunk_size is not None:
        return jax.lax.map(op.matvec, xs, batch_size=chunk_size)
    if op.pytree_mm is not None:
        out = op.pytree_mm(jax.vmap(op.unravel)(xs))
        return jax.vmap(lambda t: ravel_pytree(t)[0])(out).astype(xs.dtype)
    return jax.vmap(op.matvec)(xs)


_JITTED: dict[Any, Any] = {}


def run_jitted(fn: Callable[..., Any], A: Any, *args: Any, **static: Any) -> Any:
    """``fn(A, *args, **static)`` under ``jit``, compiled once per setting and input structure.

    A dense matrix or a CurvatureOperator (a pytree of arrays) is passed as data; a plain
    function is passed as a static (hashed) argument. Keyword arguments are static.
    """
    leaves = jax.tree_util.tree_leaves(A)
    as_data = bool(leaves) and all(isinstance(x, jax.Array | np.ndarray) for x in leaves)
    try:
        hash(A)
    except TypeError:
        if not as_data:
            return fn(A, *args, **static)
    cache_key = (fn, as_data, tuple(sorted(static)))
    if cache_key not in _JITTED:
        static_argnums = () if as_data else (0,)
        _JITTED[cache_key] = jax.jit(
            fn, static_argnums=static_argnums, static_argnames=tuple(static)
        )
    return _JITTED[cache_key](A, *args, **static)


def _normalize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    norm = jnp.linalg.norm(x)
    return x / jnp.where(norm > 0, norm, 1), norm


def _orthogonalize(V: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Classical Gram-Schmidt against the rows of V, twice ("twice is enough")."""
    h = V @ w
    w = w - h @ V
    h2 = V @ w
    return w - h2 @ V, h + h2


def _expand(
    matvec: FlatMatVec, V: jax.Array, H: jax.Array, j: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One Lanczos step on basis row j: ``w = A v_j`` made orthogonal to every row of V.

    Writes column (and row) j of the projected matrix ``H = V A Vᵀ`` and the next unit vector
    ``V[j+1]``; returns ``(V, H, β)`` with ``β = ‖w‖``. On breakdown (β at rounding level) the
    next vector is a random direction orthogonal to V and β is 0, so nothing is divided by 0.
    """
    aw = matvec(V[j])
    w, h = _orthogonalize(V, aw)
    beta = jnp.linalg.norm(w)
    eps = jnp.finfo(V.dtype).eps
    broke = beta <= 10 * eps * jnp.linalg.norm(aw)

    def fresh(_: Any) -> jax.Array:
        r = jax.random.normal(jax.random.fold_in(key, j), w.shape, w.dtype)
        return _orthogonalize(V, r)[0]

    w = jax.lax.cond(broke, fresh, lambda _: w, None)
    v_next, _ = _normalize(w)
    beta = jnp.where(broke, jnp.zeros_like(beta), beta)
    V = V.at[j + 1].set(v_next)
    H = H.at[:, j].set(h[: H.shape[0]]).at[j, :].set(h[: H.shape[0]])
    return V, H, beta


def _start_vector(v0: jax.Array, key: jax.Array) -> jax.Array:
    v, norm = _normalize(v0)
    fallback = _normalize(jax.random.normal(key, v0.shape, v0.dtype))[0]
    return jnp.where(norm > 0, v, fallback)


def lanczos_flat(
    matvec: FlatMatVec, v0: jax.Array, num_steps: int, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(alphas, betas, V)`` of `num_steps` Lanczos steps on flat vectors; V is ``(m, n)``."""
    key = jax.random.PRNGKey(0) if key is None else key
    m = num_steps
    V = jnp.zeros((m + 1, v0.shape[0]), v0.dtype).at[0].set(_start_vector(v0, key))
    H = jnp.zeros((m, m), v0.dtype)

    def step(j: jax.Array, carry: tuple[jax.Array, jax.Array, jax.Array]) -> Any:
        V, H, betas = carry
        V, H, beta = _expand(matvec, V, H, j, key)
        return V, H, betas.at[j].set(beta)

    V, H, betas = jax.lax.fori_loop(0, m, step, (V, H, jnp.zeros((m,), v0.dtype)))
    return jnp.diagonal(H), betas, V[:m]


def lanczos(A: Any, v0: PyTree, num_steps: int) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization.

    ``V A Vᵀ = T = tridiag(betas[:-1], alphas, betas[:-1])`` with V's rows an orthonormal basis
    of the Krylov space ``span{v0, A v0, …, A^{m−1} v0}``. Every new vector is orthogonalized
    against all previous ones (twice), so the basis stays orthonormal to rounding and no
    spurious copies of converged eigenvalues appear. Runs as one ``lax.fori_loop``; jit- and
    vmap-able.

    Cost: `num_steps` products with A, plus ``O(m² n)`` flops and ``(m + 1) n`` memory.

    Args:
        A: a CurvatureOperator (or any object with ``mv`` and ``in_structure``), a callable
            ``v -> A v`` on pytrees shaped like `v0`, or a dense symmetric ``(n, n)`` array.
        v0: the start vector, a pytree (normalized here; a zero vector is replaced by a
            random one).
        num_steps: m, the number of Lanczos vectors, ``1 <= m <= n``.

    Returns:
        A :class:`LanczosResult` ``(alphas, betas, basis)``; see its fields for the layout.

    Raises:
        ValueError: `num_steps` is not a positive integer or exceeds the dimension n; `v0`
            does not match A's input structure.

    References:
        Lanczos, J. Res. Nat. Bur. Standards 45, 1950; Golub & Van Loan, Matrix
        Computations, 4th ed., §10.1.
    """
    has_structure = callable(getattr(A, "in_structure", None)) or (
        hasattr(A, "shape") and not callable(A)
    )
    op = flat_operator(A, None if has_structure else v0)
    if has_structure:
        check_like(op.structure, v0, "A's input", "v0")
    _check_steps(num_steps, op.size, "num_steps")
    like = None if has_structure else v0
    return run_jitted(_lanczos_impl, A, like, v0, num_steps=num_steps)


def _lanczos_impl(A: Any, like: PyTree | None, v0: PyTree, *, num_steps: int) -> LanczosResult:
    op = flat_operator(A, like)
    flat_v0 = ravel_pytree(v0)[0].astype(op.dtype)
    alphas, betas, V = lanczos_flat(op.matvec, flat_v0, num_steps)
    return LanczosResult(alphas, betas, jax.vmap(op.unravel)(V))


def _check_steps(num_steps: Any, n: int, name: str) -> None:
    check_positive_int(num_steps, name)
    if num_steps > n:
        msg = f"{name} must be at most the dimension n = {n} of A; got {num_steps}"
        raise ValueError(msg)


def _check_key(key: Any, fn: str) -> None:
    if key is None:
        msg = (
            f"{fn} needs a random key for its start vector: pass key=jax.random.PRNGKey(0) "
            f"(or any key); got None"
        )
        raise ValueError(msg)


# ----------------------------------------------------------------------------------------
# eigsh: thick-restart Lanczos, converged to tol


def _ritz(H: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigenpairs of the leading ``size × size`` block of H: ``(θ, S, active)``.

    H has a fixed shape; the inactive part is replaced by distinct diagonal values far above
    the spectrum, and ``active`` marks the eigenpairs that belong to the leading block.
    """
    m = H.shape[0]
    inside = jnp.arange(m) < size
    block = jnp.where(inside[:, None] & inside[None, :], H, 0)
    far = 2 * jnp.max(jnp.sum(jnp.abs(block), axis=1)) + 1
    sentinels = far * (2 + jnp.arange(m, dtype=H.dtype))
    theta, S = jnp.linalg.eigh(block + jnp.diag(jnp.where(inside, 0, sentinels)))
    active = jnp.sum(jnp.where(inside[:, None], S**2, 0), axis=0) > 0.5
    return theta, S, active


def _wanted(theta: jax.Array, active: jax.Array, which: str, count: int) -> jax.Array:
    """Indices of the `count` wanted Ritz values among the active ones, most wanted first."""
    score = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
    return jax.lax.top_k(jnp.where(active, score, -jnp.inf), count)[1]


class _EigshState(NamedTuple):
    V: jax.Array
    H: jax.Array
    j: jax.Array
    beta: jax.Array
    converged: jax.Array
    stop: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array


def _residuals(H: jax.Array, size: jax.Array, beta: jax.Array, which: str, k: int) -> Any:
    """``(θ, S, idx, residual)`` for the k wanted Ritz pairs of the leading block of H."""
    theta, S, active = _ritz(H, size)
    idx = _wanted(theta, active, which, k)
    last = jnp.take(S, size - 1, axis=0)
    residual = jnp.abs(beta) * jnp.abs(last[idx])
    return theta, S, idx, residual


def _thick_restart(state: _EigshState, which: str, keep: int) -> tuple[jax.Array, jax.Array]:
    """Keep the `keep` wanted Ritz vectors plus the residual direction (Wu & Simon 2000)."""
    m = state.H.shape[0]
    theta, S = jnp.linalg.eigh(state.H)
    idx = _wanted(theta, jnp.ones((m,), bool), which, keep)
    Y = S[:, idx]
    V = jnp.zeros_like(state.V)
    V = V.at[:keep].set(Y.T @ state.V[:m]).at[keep].set(state.V[m])
    coupling = state.beta * Y[m - 1]
    H = jnp.zeros_like(state.H).at[jnp.arange(keep), jnp.arange(keep)].set(theta[idx])
    H = H.at[keep, :keep].set(coupling).at[:keep, keep].set(coupling)
    return V, H


def eigsh_flat(
    matvec: FlatMatVec,
    v0: jax.Array,
    k: int,
    which: str,
    num_steps: int,
    tol: float,
    maxiter: int,
    key: jax.Array,
) -> tuple[jax.Array, jax.Array, EigshInfo]:
    """Thick-restart Lanczos on flat vectors; eigenvectors as rows ``(k, n)``."""
    m, n = num_steps, v0.shape[0]
    keep = min(m - 1, k + (m - k) // 2) if m < n else m - 1
    dtype = v0.dtype
    tiny = jnp.finfo(dtype).eps ** (2 / 3)

    def body(s: _EigshState) -> _EigshState:
        V, H, beta = _expand(matvec, s.V, s.H, s.j, jax.random.fold_in(key, s.num_matvecs))
        size = s.j + 1
        theta, _, idx, residual = _residuals(H, size, beta, which, k)
        scale = jnp.maximum(jnp.abs(theta[idx]), tiny * jnp.max(jnp.abs(theta[idx])))
        converged = (size >= k) & jnp.all(residual <= tol * scale)
        full = size == m
        out_of_budget = full & (s.num_restarts >= maxiter)
        restart = full & ~converged & ~out_of_budget
        s = s._replace(V=V, H=H, j=size, beta=beta, num_matvecs=s.num_matvecs + 1)
        V, H = jax.lax.cond(restart, lambda: _thick_restart(s, which, keep), lambda: (V, H))
        return s._replace(
            V=V,
            H=H,
            j=jnp.where(restart, keep, size),
            converged=converged,
            stop=converged | out_of_budget,
            num_restarts=s.num_restarts + restart.astype(s.num_restarts.dtype),
        )

    zero = jnp.zeros((), jnp.int32)
    init = _EigshState(
        V=jnp.zeros((m + 1, n), dtype).at[0].set(_start_vector(v0, key)),
        H=jnp.zeros((m, m), dtype),
        j=zero,
        beta=jnp.zeros((), dtype),
        converged=jnp.zeros((), bool),
        stop=jnp.zeros((), bool),
        num_matvecs=zero,
        num_restarts=zero,
    )
    s = jax.lax.while_loop(lambda s: ~s.stop, body, init)
    theta, S, idx, residual = _residuals(s.H, s.j, s.beta, which, k)
    order = jnp.argsort(theta[idx])
    idx, residual = idx[order], residual[order]
    vectors = S[:, idx].T @ s.V[:m]
    info = EigshInfo(residual, s.converged, s.num_matvecs, s.num_restarts)
    return theta[idx], vectors, info


def eigsh(
    A: Any,
    k: int = 1,
    *,
    which: str = "LA",
    key: jax.Array | None = None,
    num_steps: int | None = None,
    tol: float | None = None,
    maxiter: int = 1000,
    like: PyTree | None = None,
    return_info: bool = False,
) -> Any:
    """The k extreme eigenpairs of a symmetric operator, by thick-restart Lanczos.

    Solves ``A y = θ y`` for the k algebraically largest (``"LA"``), smallest (``"SA"``) or
    largest-magnitude (``"LM"``) eigenvalues. The Krylov space grows one product at a time
    and the Ritz residuals ``‖A y − θ y‖ = β·|s_last|`` are checked after every product; it
    stops as soon as all k satisfy ``‖A y − θ y‖ <= tol·|θ|``. When the basis reaches
    `num_steps` vectors it is thick-restarted (Wu & Simon 2000): the best Ritz vectors are
    kept and the space grows again, so memory stays ``(num_steps + 1) n``. The whole solve
    is one ``lax.while_loop``: jit-, vmap-able.

    Cost: as many products (HVPs) as convergence needs, reported in ``info.num_matvecs``;
    typically fewer than ARPACK (``scipy.sparse.linalg.eigsh``) at the same tolerance, since
    convergence is checked every step rather than every restart cycle. Plus ``O(m² n)``
    flops of reorthogonalization per product.

    Args:
        A: a CurvatureOperator (or anything with ``mv`` and ``in_structure``), a callable
            ``v -> A v`` (then pass `like`), or a dense symmetric ``(n, n)`` array.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` (default), ``"SA"`` or ``"LM"``.
        key: a ``jax.random`` key for the random start vector; required.
        num_steps: the largest Krylov basis kept (memory, in vectors); default
            ``min(n, max(3k, 30))``, a little above ARPACK's ``ncv = max(2k + 1, 20)``, which
            saves products on restarts. Needs ``num_steps > k`` unless it equals n.
        tol: relative residual tolerance; default ``sqrt(eps)`` of A's dtype (about 3e-4 in
            float32, 1.5e-8 in float64). The eigenvalue error is then about
            ``tol²·|θ|²/gap``.
        maxiter: maximum number of thick restarts.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        return_info: also return an :class:`EigshInfo`.

    Returns:
        ``(eigenvalues, eigenvectors)`` or, with `return_info`, ``(eigenvalues, eigenvectors,
        info)``. ``eigenvalues`` is ``(k,)`` in ascending order, as scipy returns them;
        ``eigenvectors`` is a pytree like A's input whose every leaf has a leading axis k:
        ``eigenvectors[i]`` (each leaf indexed at i) is the unit eigenvector of
        ``eigenvalues[i]``. For a dense matrix that is a ``(k, n)`` array (scipy returns
        the transpose). If the tolerance is not met within `maxiter` restarts, the best Ritz
        pairs are returned, ``info.converged`` is False and, outside ``jit``, a
        ``RuntimeWarning`` is issued.

    Raises:
        ValueError: `key` is missing; `k` or `num_steps` is out of range; `which` is unknown.

    Example:
        >>> A = jnp.diag(jnp.array([-3.0, 1.0, 2.0, 5.0]))
        >>> eigsh(A, 2, key=jax.random.PRNGKey(0))[0]  # ≈ [2., 5.]

    Limitations: from one start vector Lanczos sees one copy of an exactly repeated
    eigenvalue (multiplicity needs a block method); nearby distinct eigenvalues are fine.

    References:
        Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
        SIAM J. Matrix Anal. Appl. 22, 2000; Stewart, "A Krylov-Schur algorithm for large
        eigenproblems", SIAM J. Matrix Anal. Appl. 23, 2001.
    """
    check_choice(which, WHICH, "which")
    _check_key(key, "eigsh")
    assert key is not None
    op = flat_operator(A, like)
    check_positive_int(k, "k")
    if k > op.size:
        msg = f"k must be at most the dimension n = {op.size} of A; got k = {k}"
        raise ValueError(msg)
    m = min(op.size, max(3 * k, 30)) if num_steps is None else num_steps
    _check_steps(m, op.size, "num_steps")
    if m <= k and m < op.size:
        msg = f"num_steps must exceed k (or equal n = {op.size}); got num_steps = {m}, k = {k}"
        raise ValueError(msg)
    check_positive_int(maxiter, "maxiter")
    tol = float(np.sqrt(np.finfo(op.dtype).eps)) if tol is None else tol
    if not tol > 0:
        msg = f"tol must be positive; got {tol!r}"
        raise ValueError(msg)
    statics = {"k": k, "which": which, "num_steps": m, "tol": tol, "maxiter": maxiter}
    values, eigenvectors, info = run_jitted(_eigsh_impl, A, like, key, **statics)
    if not isinstance(info.converged, Tracer) and not bool(info.converged):
        warnings.warn(
            f"eigsh did not reach tol = {tol:g} in {int(info.num_matvecs)} products "
            f"({maxiter} restarts); residuals {np.asarray(info.residuals)}. Raise maxiter "
            f"or num_steps, or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    if return_info:
        return values, eigenvectors, info
    return values, eigenvectors


def _eigsh_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    k: int,
    which: str,
    num_steps: int,
    tol: float,
    maxiter: int,
) -> tuple[jax.Array, PyTree, EigshInfo]:
    op = flat_operator(A, like)
    k_start, k_run = jax.random.split(key)
    v0 = jax.random.normal(k_start, (op.size,), op.dtype)
    values, vectors, info = eigsh_flat(op.matvec, v0, k, which, num_steps, tol, maxiter, k_run)
    return values, jax.vmap(op.unravel)(vectors), info


# ----------------------------------------------------------------------------------------
# spectral density: stochastic Lanczos quadrature


def _quadrature(matvec: FlatMatVec, v0: jax.Array, num_steps: int) -> tuple[jax.Array, jax.Array]:
    """Gauss quadrature of ``v0ᵀ g(A) v0 / ‖v0‖²``: nodes θ (Ritz values), weights ``s_0²``."""
    alphas, betas, _ = lanczos_flat(matvec, v0, num_steps)
    T = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, S = jnp.linalg.eigh(T)
    return theta, S[0] ** 2


def spectral_density(
    A: Any,
    key: jax.Array,
    *,
    num_probes: int,
    num_steps: int,
    num_points: int = 1000,
    sigma: float | None = None,
    like: PyTree | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    ``φ(t) = (1/n) Σᵢ δ(t − λᵢ) ≈ (1/P) Σₚ Σⱼ τₚⱼ g_σ(t − θₚⱼ)``: for each of P Rademacher
    probes, m Lanczos steps give Gauss quadrature nodes θ (Ritz values) and weights τ (the
    squared first components of T's eigenvectors); each node is broadened by a Gaussian
    ``g_σ``. The density is normalized so its trapezoid integral over the grid is 1; the
    mass near an eigenvalue cluster estimates the fraction of eigenvalues in it.

    Cost: ``num_probes × num_steps`` products, probes run together (``vmap``) or
    `chunk_size` at a time; memory ``(num_steps + 1) n`` per probe running at once.

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense symmetric
            matrix.
        key: a ``jax.random`` key for the probes.
        num_probes: P >= 1.
        num_steps: Lanczos steps per probe, ``1 <= m <= n``.
        num_points: grid points.
        sigma: Gaussian width; default 1% of the spread of the Ritz values.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many probes at once; None runs all together.

    Returns:
        ``(grid, density)``, both ``(num_points,)``; the grid spans the Ritz values ± 5σ.

    Raises:
        ValueError: `key` missing, or `num_probes`, `num_steps`, `num_points`, `chunk_size`
            or `sigma` out of range.

    References:
        Lin, Saad & Yang, "Approximating spectral densities of large matrices", SIAM Review
        58, 2016; Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization
        via Hessian eigenvalue density", ICML 2019.
    """
    _check_key(key, "spectral_density")
    op = flat_operator(A, like)
    check_positive_int(num_probes, "num_probes")
    _check_steps(num_steps, op.size, "num_steps")
    check_positive_int(num_points, "num_points")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if num_points < 2:
        msg = f"num_points must be at least 2; got {num_points}"
        raise ValueError(msg)
    if sigma is not None and not sigma > 0:
        msg = f"sigma must be positive or None; got {sigma!r}"
        raise ValueError(msg)

    statics = {"num_probes": num_probes, "num_steps": num_steps, "num_points": num_points}
    statics |= {"sigma": sigma, "chunk_size": chunk_size}
    return run_jitted(_density_impl, A, like, key, **statics)


def _density_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    num_steps: int,
    num_points: int,
    sigma: float | None,
    chunk_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    op = flat_operator(A, like)

    def one(probe_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        v0 = jax.random.rademacher(probe_key, (op.size,), op.dtype)
        return _quadrature(op.matvec, v0, num_steps)

    keys = jax.random.split(key, num_probes)
    if chunk_size is None:
        nodes, weights = jax.vmap(one)(keys)
    else:
        nodes, weights = jax.lax.map(one, keys, batch_size=chunk_size)
    return broadened_density(nodes, weights, num_points, sigma)


def broadened_density(
    nodes: jax.Array, weights: jax.Array, num_points: int, sigma: float | None
) -> tuple[jax.Array, jax.Array]:
    """Gaussian-broadened mixture of point masses ``weights`` at ``nodes``, normalized."""
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    spread = hi - lo
    fallback = jnp.maximum(jnp.abs(hi), 1)
    width = jnp.where(spread > 0, spread, fallback) * 0.01 if sigma is None else sigma
    width = jnp.asarray(width, nodes.dtype)
    grid = jnp.linspace(lo - 5 * width, hi + 5 * width, num_points, dtype=nodes.dtype)
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / width
    gauss = jnp.exp(-0.5 * z**2) / (width * jnp.sqrt(2 * jnp.pi).astype(nodes.dtype))
    density = gauss @ weights.reshape(-1) / nodes.shape[0]
    return grid, density / jnp.trapezoid(density, grid)

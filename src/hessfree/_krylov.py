"""The one Krylov core: orthogonalization and the Lanczos step, on pytrees.

A basis of m vectors is a pytree whose every leaf has a leading axis m; inner products are
per-leaf sums (:mod:`hessfree._tree`), so the basis keeps the parameters' layout and sharding.
Only the small ``m × m`` projected problems are dense. One Lanczos step costs one product plus
``O(m n)`` work for the full reorthogonalization against the m basis vectors kept. eigsh,
spectral_density and the estimators build on this module.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _tree as tree
from ._linop import MatVec, TreeOperator, tree_operator
from ._results import LanczosResult
from ._staging import staged
from ._validation import PyTree, check_floating, check_key, check_like, check_steps


def normalize(x: PyTree) -> tuple[PyTree, jax.Array]:
    """``(x/‖x‖, ‖x‖)``; a zero vector stays zero."""
    n = tree.norm(x)
    return tree.scale(1 / jnp.where(n > 0, n, 1), x), n


def orthogonalize(V: PyTree, w: PyTree) -> tuple[PyTree, jax.Array]:
    """Classical Gram-Schmidt of `w` against the rows of V, twice ("twice is enough").

    Returns the orthogonalized vector and the coefficients ``Vw`` removed.
    """
    h = tree.project(V, w)
    w = tree.sub(w, tree.combine(h, V))
    h2 = tree.project(V, w)
    return tree.sub(w, tree.combine(h2, V)), h + h2


def orthonormal_rows(Y: PyTree, count: int) -> PyTree:
    """Rows spanning those of `Y` (leaves ``(count, ...)``), orthonormal or zero.

    Row by row against the ones before; a row (numerically) in the span of the previous
    ones becomes zero, so a rank-deficient sketch gives zero rows instead of NaNs.
    """
    eps = jnp.finfo(tree.scalar_dtype(Y)).eps
    Q = tree.empty_basis(tree.row(tree.zeros_like(Y), 0), count)

    def step(i: jax.Array, Q: PyTree) -> PyTree:
        y = tree.row(Y, i)
        w, _ = orthogonalize(Q, y)
        n = tree.norm(w)
        keep = n > 100 * eps * tree.norm(y)
        return tree.set_row(Q, i, tree.scale(jnp.where(keep, 1 / jnp.where(n > 0, n, 1), 0), w))

    return jax.lax.fori_loop(0, count, step, Q)


def expand(
    matvec: MatVec, V: PyTree, H: jax.Array, j: jax.Array, key: jax.Array
) -> tuple[PyTree, jax.Array, jax.Array]:
    """One Lanczos step on basis row j: ``w = A v_j`` made orthogonal to every row of V.

    Writes column (and row) j of the projected matrix ``H = V A Vᵀ`` and the next unit vector
    ``V[j+1]``; returns ``(V, H, β)`` with ``β = ‖w‖``. On breakdown (β at rounding level) the
    next vector is a random direction orthogonal to V and β is 0, so nothing is divided by 0.
    """
    aw = matvec(tree.row(V, j))
    w, h = orthogonalize(V, aw)
    beta = tree.norm(w)
    eps = jnp.finfo(H.dtype).eps
    broke = beta <= 10 * eps * tree.norm(aw)

    def fresh(w: PyTree) -> PyTree:
        r = tree.random_tree(jax.random.fold_in(key, j), tree.zeros_like(w))
        return orthogonalize(V, r)[0]

    w = jax.lax.cond(broke, fresh, lambda w: w, w)
    v_next, _ = normalize(w)
    beta = jnp.where(broke, jnp.zeros_like(beta), beta)
    V = tree.set_row(V, j + 1, v_next)
    m = H.shape[0]
    h = h[:m].astype(H.dtype)
    H = H.at[:, j].set(h).at[j, :].set(h)
    return V, H, beta


def start_basis(v0: PyTree, m: int) -> PyTree:
    """A basis of m + 1 rows whose row 0 is ``v0/‖v0‖`` (the rest zero)."""
    return tree.set_row(tree.empty_basis(tree.zeros_like(v0), m + 1), 0, normalize(v0)[0])


def lanczos_tree(
    matvec: MatVec, v0: PyTree, num_steps: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, PyTree]:
    """``(alphas, betas, V)`` of `num_steps` Lanczos steps; V's leaves have leading axis m."""
    m = num_steps
    dtype = tree.scalar_dtype(v0)
    V = start_basis(v0, m)
    H = jnp.zeros((m, m), dtype)

    def step(j: jax.Array, carry: tuple[PyTree, jax.Array, jax.Array]) -> Any:
        V, H, betas = carry
        V, H, beta = expand(matvec, V, H, j, key)
        return V, H, betas.at[j].set(beta)

    V, H, betas = jax.lax.fori_loop(0, m, step, (V, H, jnp.zeros((m,), dtype)))
    return jnp.diagonal(H), betas, jax.tree_util.tree_map(lambda Vl: Vl[:m], V)


def start_vector(op: TreeOperator, v0: PyTree | None, key: jax.Array) -> tuple[PyTree, jax.Array]:
    """``(v0, key)``: the given start vector in A's dtypes, or one drawn from `key` (traced)."""
    k_start, k_run = jax.random.split(key)
    if v0 is None:
        return tree.random_tree(k_start, op.zeros()), k_run
    check_like(op.structure, v0, "A's input", "v0")
    check_floating(v0, "v0")
    return tree.cast_like(v0, op.structure), k_run


def checked_start(
    A: Any, v0: PyTree | None, key: Any, like: PyTree | None, fn: str
) -> tuple[jax.Array, PyTree | None, int]:
    """Eager checks shared by lanczos and eigsh: ``(key, like, n)``; a key is needed without v0."""
    if v0 is None:
        check_key(key, fn, "its random start vector (or pass v0)")
    elif key is not None:
        check_key(key, fn)
    if like is None and v0 is not None and callable(A) and not hasattr(A, "in_structure"):
        like = v0
    n = tree.size(tree_operator(A, like).structure)  # checks A and like at once
    return (jax.random.PRNGKey(0) if key is None else key), like, n


def _lanczos_impl(
    A: Any, like: PyTree | None, v0: PyTree | None, key: Any, *, num_steps: int
) -> LanczosResult:
    op = tree_operator(A, like)
    v0, k_run = start_vector(op, v0, key)
    alphas, betas, V = lanczos_tree(op.matvec, v0, num_steps, k_run)
    return LanczosResult(alphas, betas, V, jnp.asarray(num_steps, jnp.int32))


def lanczos(
    A: Any,
    v0: PyTree | None,
    num_steps: int,
    *,
    key: jax.Array | None = None,
    like: PyTree | None = None,
) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization.

    ``V A Vᵀ = T = tridiag(betas[:-1], alphas, betas[:-1])`` with V's rows an orthonormal basis
    of the Krylov space ``span{v0, A v0, …, A^{m−1} v0}``. Every new vector is orthogonalized
    against all previous ones (twice), so the basis stays orthonormal to rounding and no
    spurious copies of converged eigenvalues appear. Runs as one ``lax.fori_loop`` on pytrees
    like `v0` (never raveled, so sharded parameters stay sharded); jit- and vmap-able.

    Cost: `num_steps` products with A, plus ``O(m² n)`` flops and ``(m + 1) n`` memory.
    `num_steps` is static (a new count compiles a new program).

    Args:
        A: a CurvatureOperator, a callable ``v -> A v`` (then pass `like`, or a `v0`), or a
            dense symmetric ``(n, n)`` array.
        v0: the start vector, a pytree (normalized here), or None to draw one from `key`.
            It is used as given: a non-finite `v0` gives NaN coefficients (never a silent
            random start).
        num_steps: m, the number of Lanczos vectors, ``1 <= m <= n``.
        key: a ``jax.random`` key: required when `v0` is None; also seeds the fresh
            directions drawn after a breakdown (fixed key 0 when not given).
        like: an example pytree shaped like A's input, for a plain callable A.

    Returns:
        A :class:`LanczosResult` ``(alphas, betas, basis, num_matvecs)``.

    Raises:
        ValueError: `num_steps` out of range; `v0` does not match A's input; neither `v0`
            nor `key` given.

    References:
        Lanczos, J. Res. Nat. Bur. Standards 45, 1950; Golub & Van Loan, Matrix
        Computations, 4th ed., §10.1.
    """
    key, like, n = checked_start(A, v0, key, like, "lanczos")
    check_steps(num_steps, n)
    return staged(_lanczos_impl, A, like, v0, key, num_steps=num_steps)


def ritz(H: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigenpairs of the leading ``size × size`` block of H: ``(θ, S, active)``.

    H has a fixed shape; the inactive part is replaced by distinct diagonal values far above
    the spectrum, and ``active`` marks the eigenpairs that belong to the leading block.
    Non-finite entries are read as 0 (the caller reports them).
    """
    m = H.shape[0]
    inside = jnp.arange(m) < size
    # non-finite entries (a NaN operator, reported by the caller) become 0: some eigh
    # kernels never return on NaN input, and under vmap every element runs
    block = jnp.where(inside[:, None] & inside[None, :] & jnp.isfinite(H), H, 0)
    far = 2 * jnp.max(jnp.sum(jnp.abs(block), axis=1)) + 1
    sentinels = far * (2 + jnp.arange(m, dtype=H.dtype))
    theta, S = jnp.linalg.eigh(block + jnp.diag(jnp.where(inside, 0, sentinels)))
    active = jnp.sum(jnp.where(inside[:, None], S**2, 0), axis=0) > 0.5
    return theta, S, active

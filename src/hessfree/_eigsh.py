"""Extreme eigenpairs of a symmetric operator by thick-restart Lanczos, on pytrees."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from . import _tree as tree
from ._cg import pcg
from ._krylov import (
    checked_start,
    flattened,
    loop_product,
    normalize,
    orthogonalize,
    pseudo_random,
    ritz,
    start_basis,
    start_vector,
)
from ._linop import MatVec, is_dense, tree_operator
from ._results import MAXITER, NONFINITE, SUCCESS, EigshResult
from ._staging import staged
from ._validation import (
    PyTree,
    check_choice,
    check_number,
    check_positive_int,
    check_steps,
)

WHICH = ("LA", "SA", "LM")


def _wanted(theta: jax.Array, active: jax.Array, which: str, count: int) -> jax.Array:
    """Indices of the `count` wanted Ritz values among the active ones, most wanted first."""
    score = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
    return jax.lax.top_k(jnp.where(active, score, -jnp.inf), count)[1]


class _State(NamedTuple):
    V: PyTree  # m + 1 rows; rows 0..j hold the basis, rows past j are zero
    H: jax.Array  # (m, m): V A Vᵀ, its leading j × j block filled
    j: jax.Array  # the row to expand next
    beta: jax.Array  # ‖w‖ of the last step: V[j] = w/β
    lost: jax.Array  # (m, locks): row i's residual outside H is Σ_l lost[i, l]·r_l, ‖r_l‖ = 1
    num_locks: jax.Array
    previous: jax.Array  # (k,) wanted values when last locked (sorted); inf before
    deflated: jax.Array  # a deflation restart happened: checking for missed copies
    converged: jax.Array
    finite: jax.Array
    stop: jax.Array
    pending: jax.Array  # what the basis needs before it grows again: _GROW, _RESTART, _LOCK
    num_matvecs: jax.Array
    num_restarts: jax.Array


_GROW, _RESTART, _LOCK = 0, 1, 2


def _ritz_pairs(s: _State, size: jax.Array, which: str, count: int) -> Any:
    """``(θ, S, idx, residual)`` for the `count` wanted Ritz pairs of the leading block of H.

    ``residual`` bounds ``‖A y − θ y‖``: ``β·|s_last| + Σ_l |(Sᵀ lost)_l|`` (the Lanczos
    residual, and what locking left out of H, one unit direction r_l per lock).
    """
    theta, S, active = ritz(s.H, size)
    idx = _wanted(theta, active, which, count)
    last = jnp.take(S, size - 1, axis=0)
    Y = S[:, idx]
    residual = jnp.abs(s.beta) * jnp.abs(last[idx]) + jnp.sum(jnp.abs(Y.T @ s.lost), axis=1)
    return theta, S, idx, residual, active[idx]


def _combined(Y: jax.Array, V: PyTree) -> PyTree:
    """The rows ``Yᵀ V[:m]`` (leaves ``(r, ...)``): one matrix product per leaf."""
    m = Y.shape[0]
    return jax.tree_util.tree_map(lambda Vl: jnp.tensordot(Y.T.astype(Vl.dtype), Vl[:m], 1), V)


def _restart(s: _State, which: str, k: int, keep: int, fresh: Any) -> _State:
    """Rebuild the basis for a pending thick restart or lock, from one eigendecomposition.

    Thick restart (Wu & Simon 2000): keep the `keep` wanted Ritz vectors and the residual
    direction, their coupling in H. Lock: keep the k wanted Ritz vectors, drop their small
    residual coupling into `lost` and continue from ``fresh(V)``, a fresh vector made
    orthogonal to them: a copy of a repeated eigenvalue, invisible from the old start vector,
    shows up in the new Krylov space. (One code path with selects rather than a conditional:
    under ``vmap`` both would run, and two LAPACK eigh calls running side by side can
    deadlock XLA:CPU.)
    """
    m = s.H.shape[0]
    if k > keep:  # k = num_steps = n: the first basis spans everything, nothing restarts
        return s
    size = s.j
    lock = s.pending == _LOCK
    theta, S, active = ritz(s.H, size)  # size == m for a thick restart: all of H
    idx = _wanted(theta, active, which, keep)
    Y = S[:, idx] * jnp.where(lock, jnp.arange(keep) < k, True)  # a lock keeps k columns
    kept = _combined(Y, s.V)
    last = tree.scale(jnp.where(lock, 0, 1), tree.row(s.V, m))

    def rows(Vl: jax.Array, Kl: jax.Array, Ll: jax.Array) -> jax.Array:
        return jnp.zeros_like(Vl).at[:keep].set(Kl).at[keep].set(Ll)

    V = jax.tree_util.tree_map(rows, s.V, kept, last)
    new = jax.lax.cond(lock, fresh, lambda V: tree.row(V, k), V)
    V = tree.set_row(V, k, new)
    values = jnp.where(lock, jnp.arange(keep) < k, True) * theta[idx]
    coupling = jnp.where(lock, 0, s.beta) * S[m - 1, idx]
    # H: the kept values on the diagonal, their coupling in row and column `keep` (as
    # selects against iotas: they fuse, where scatters are a kernel each)
    i, l = jnp.arange(m)[:, None], jnp.arange(m)[None, :]
    pad = (0, m - keep)
    H = jnp.where((i == l) & (i < keep), jnp.pad(values, pad)[None, :], 0)
    if keep < m:
        H = jnp.where((i == keep) & (l < keep), jnp.pad(coupling, pad)[None, :], H)
        H = jnp.where((l == keep) & (i < keep), jnp.pad(coupling, pad)[:, None], H)
    lost = jnp.pad(Y.T @ s.lost, ((0, m - keep), (0, 0)))
    dropped = jnp.where(lock, s.beta, 0) * jnp.take(S, size - 1, axis=0)[idx[:k]]
    column = jnp.arange(s.lost.shape[1])[None, :] == s.num_locks
    lost = lost + jnp.where(column & (i < k), jnp.pad(dropped, (0, m - k))[:, None], 0)
    return s._replace(
        V=V,
        H=H,
        lost=lost,
        j=jnp.where(lock, k, keep).astype(s.j.dtype),
        previous=jnp.where(lock, jnp.sort(theta[idx[:k]]), s.previous),
        deflated=s.deflated | lock,
        num_locks=s.num_locks + lock.astype(s.num_locks.dtype),
    )


def eigsh_tree(
    matvec: MatVec,
    v0: PyTree,
    k: int,
    which: str,
    num_steps: int,
    tol: float,
    maxiter: int,
    seed: Any,
) -> EigshResult:
    """Thick-restart Lanczos with full reorthogonalization, on pytrees.

    Two phases: converge k wanted Ritz pairs; then lock them, restart from a fresh random
    vector orthogonal to them and converge k + 1 wanted pairs (the new one is the best of the
    rest of the spectrum, or a missed copy of a wanted value). The new one needs only √tol
    where its interval ``θ ± residual`` (which holds an eigenvalue) lies beyond the wanted
    set by their tolerance: from a random start Lanczos resolves the deflated operator's
    extreme eigenvalue, where a missed copy would be, before anything inside its spectrum
    (Kaniel-Paige), so the check does not need that pair to full accuracy. It stops when the
    wanted k values did not move by more than their tolerance; otherwise it locks again.

    Program: an outer ``while_loop`` whose body rebuilds the basis (thick restart or lock,
    when one is pending) and runs an inner ``while_loop`` of Lanczos steps until the basis is
    full, k pairs converged, or it stops; so the basis is only ever updated in place, one row
    per step, and never passes through a conditional.

    Each step: one product; the new vector w made orthogonal to the last two (the three-term
    recurrence, reading three vectors); then, at every step, reorthogonalized fully
    against rows 0..j by classical Gram-Schmidt (the coefficients, then their combination:
    two passes over the basis as matrix-vector products), and a second time only where the
    first removed much of w, ``‖w‖`` falling below 0.7 (about 1/√2) of itself (Daniel, Gragg,
    Kaufman & Stewart 1976), as in thick-restart Lanczos (Wu & Simon 2000). The basis stays
    orthonormal to rounding, so H is the projection ``V A Vᵀ`` of A onto the Krylov space to
    rounding; the cost is ``O(j n)`` flops per step besides the product.
    """
    m, n = num_steps, tree.size(v0)
    # pairs the check phase converges: the k wanted and the best one outside them
    check = min(k + 1, m - 1) if m < n else min(k + 1, n)
    keep = min(m - 1, check + (m - check) // 2) if m < n else m - 1
    dtype = tree.scalar_dtype(v0)
    eps = float(np.finfo(dtype).eps)
    tiny = jnp.asarray(eps ** (2 / 3), dtype)
    locks = k + 2  # at most this many lock-and-check rounds
    seed = jnp.asarray(seed, jnp.uint32)
    matvec = loop_product(matvec)

    def grow(s: _State) -> _State:
        # a stopped or pending element (under vmap the body still runs on it) stays in range
        j = jnp.minimum(s.j, m - 1)
        v, prev = tree.row(s.V, j), tree.row(s.V, jnp.maximum(j - 1, 0))
        has_prev = j > 0
        u = matvec(v)
        c = jnp.where(has_prev, s.beta, 0)
        alpha = tree.vdot(v, u)
        # the three-term recurrence once: what rounding leaves along v and prev, Gram-Schmidt
        # against every row (below) removes with the rest
        w = tree.axpy(-c, prev, tree.axpy(-alpha, v, u))
        # small writes as selects against an iota (they fuse; a scatter is a kernel of its own)
        rows = jnp.arange(m + 1)
        local = jnp.where(rows == j, alpha, 0) + jnp.where(rows == jnp.maximum(j - 1, 0), c, 0)

        # every step, against rows 0..j: rounding (and, after a restart, the converged and
        # locked Ritz vectors) leaks back into every new vector. This also gives the last
        # vector of a full basis, which a thick restart keeps as the residual direction, its
        # coupling to the kept Ritz vectors: its inner products with them
        w, h = orthogonalize(s.V, w)  # rows past j are zero
        beta = tree.norm(w)
        broke = beta <= 10 * eps * tree.norm(u)

        def fresh(w: PyTree) -> PyTree:  # an invariant subspace: go on in a new direction
            return orthogonalize(s.V, pseudo_random(seed, w, s.num_matvecs))[0]

        w = jax.lax.cond(broke, fresh, lambda w: w, w)
        v_next, _ = normalize(w)
        beta = jnp.where(broke, jnp.zeros_like(beta), beta)
        column = (local + h)[:m]
        # H is kept symmetric: the coefficients put into column j beyond the recurrence's own
        # are Gram-Schmidt projections onto a basis orthonormal to rounding (or the coupling a
        # thick restart left in column j), so H stays V A Vᵀ to rounding
        at_j = jnp.arange(m) == j
        H = jnp.where(
            at_j[:, None], column[None, :], jnp.where(at_j[None, :], column[:, None], s.H)
        )
        s = s._replace(
            V=tree.set_row(s.V, j + 1, v_next),
            H=H,
            j=j + 1,
            beta=beta,
            num_matvecs=s.num_matvecs + 1,
        )
        size = j + 1
        finite = jnp.all(jnp.isfinite(H)) & jnp.isfinite(beta)
        theta, _, idx, residual, active = _ritz_pairs(s, size, which, check)
        values = theta[idx]
        scale = jnp.maximum(jnp.abs(values), tiny * jnp.max(jnp.abs(values[:k])))
        met = active & (residual <= tol * scale)
        if check > k:
            # the extra pair: to the wanted values' absolute accuracy; or, when an eigenvalue
            # within its residual of it lies below the wanted set by their tolerance, to √tol
            # (Lanczos from a random start resolves the deflated operator's extreme, where a
            # missed copy of a wanted value would be, before anything inside its spectrum)
            top = jnp.max(jnp.abs(values[:k]))
            size_k = jnp.maximum(top, scale[k])
            rank = {"LA": values, "SA": -values, "LM": jnp.abs(values)}[which]
            below = rank[k] + residual[k] < jnp.min(rank[:k] - tol * scale[:k])
            extra = (residual[k] <= tol * size_k) | (below & (residual[k] <= np.sqrt(tol) * size_k))
            met = jnp.where(jnp.arange(check) == k, active[k] & extra, met)
        converged_k = finite & jnp.all(met[:k])
        # lock with a margin: what locking leaves out must not push them back over tol
        tight = finite & jnp.all(active[:k] & (residual[:k] <= tol * scale[:k] / 10))
        # the whole space is spanned (size == n, never after a breakdown-free miss): exact
        whole = size >= n
        checked = converged_k & (jnp.all(met) | whole)
        current = jnp.sort(values[:k])
        stable = jnp.all(jnp.abs(current - s.previous) <= tol * jnp.sort(scale[:k]))
        done = converged_k & (whole | (s.deflated & checked & stable))
        can_lock = (s.num_restarts < maxiter) & (s.num_locks < locks)
        lock = tight & ~done & ((~s.deflated) | checked) & can_lock
        full_basis = size == m
        stuck = tight & ~done & ((~s.deflated) | checked) & ~can_lock
        out_of_budget = ~done & ((full_basis & (s.num_restarts >= maxiter)) | stuck)
        restart = full_basis & ~done & ~lock & ~out_of_budget & finite
        pending = jnp.where(lock, _LOCK, jnp.where(restart, _RESTART, _GROW))
        return s._replace(
            converged=done,
            finite=finite,
            stop=done | out_of_budget | ~finite,
            pending=pending.astype(s.pending.dtype),
        )

    def rebuild(s: _State) -> _State:
        def fresh(V: PyTree) -> PyTree:
            counter = s.num_matvecs + jnp.asarray(2**30, s.num_matvecs.dtype)
            r = pseudo_random(seed, tree.row(V, 0), counter)
            return normalize(orthogonalize(V, r)[0])[0]

        def restart(s: _State) -> _State:
            return _restart(s, which, k, keep, fresh)

        s = jax.lax.cond(s.pending == _GROW, lambda s: s, restart, s)
        return s._replace(
            beta=jnp.zeros_like(s.beta),
            num_restarts=s.num_restarts + (s.pending != _GROW).astype(s.num_restarts.dtype),
            pending=jnp.zeros_like(s.pending),
        )

    def cycle(s: _State) -> _State:
        s = rebuild(s)
        return jax.lax.while_loop(lambda s: ~s.stop & (s.pending == _GROW), grow, s)

    zero = jnp.zeros((), jnp.int32)
    start_finite = tree.all_finite(v0)
    init = _State(
        V=start_basis(v0, m),
        H=jnp.zeros((m, m), dtype),
        j=zero,
        beta=jnp.zeros((), dtype),
        lost=jnp.zeros((m, locks), dtype),
        num_locks=zero,
        previous=jnp.full((k,), jnp.inf, dtype),
        deflated=jnp.zeros((), bool),
        converged=jnp.zeros((), bool),
        finite=start_finite,
        stop=~start_finite,
        pending=zero,
        num_matvecs=zero,
        num_restarts=zero,
    )
    s = jax.lax.while_loop(lambda s: ~s.stop, cycle, init)
    theta, S, idx, residual, _ = _ritz_pairs(s, jnp.maximum(s.j, 1), which, k)
    order = jnp.argsort(theta[idx])
    idx, residual = idx[order], residual[order]
    vectors = _combined(S[:, idx], s.V)
    # unit length to rounding, whatever rounding the combination of basis rows added
    vectors = jax.vmap(lambda y: normalize(y)[0])(vectors)
    status = jnp.where(s.converged, SUCCESS, jnp.where(s.finite, MAXITER, NONFINITE))
    status = status.astype(jnp.int32)
    values = jnp.where(s.finite, theta[idx], jnp.nan)
    return EigshResult(values, vectors, residual, status, status == SUCCESS, s.num_matvecs)


def _eigsh_impl(
    A: Any,
    like: PyTree | None,
    v0: PyTree | None,
    key: jax.Array,
    *,
    k: int,
    which: str,
    num_steps: int,
    tol: float,
    maxiter: int,
) -> EigshResult:
    leaves, treedef = jax.tree_util.tree_flatten(A)
    is_array = [isinstance(leaf, jax.Array) for leaf in leaves]
    arrays = [leaf for leaf, a in zip(leaves, is_array, strict=True) if a]

    def rebuild(arrays: list) -> Any:
        it = iter(arrays)
        return treedef.unflatten(
            [next(it) if a else leaf for leaf, a in zip(leaves, is_array, strict=True)]
        )

    @jax.custom_jvp
    def solve(arrays: list, like: PyTree, v0: PyTree, key: jax.Array) -> EigshResult:
        op = tree_operator(rebuild(arrays), like)
        v0, seed = start_vector(op, v0, key)
        matvec, ravel, unravel = flattened(op.matvec, v0)
        res = eigsh_tree(matvec, ravel(v0), k, which, num_steps, tol, maxiter, seed)
        return res._replace(eigenvectors=jax.vmap(unravel)(res.eigenvectors))

    @solve.defjvp
    def solve_jvp(primals: tuple, tangents: tuple) -> tuple[EigshResult, EigshResult]:
        # Hellmann-Feynman: dθᵢ = yᵢᵀ (dA) yᵢ for unit eigenvectors yᵢ; and
        # dyᵢ = (θᵢI − A)⁺ (dA) yᵢ, see _eigenvector_tangents. Nothing is held fixed, so
        # differentiating this rule again gives second derivatives.
        arrays, like, v0, key = primals
        res = solve(arrays, like, v0, key)
        vectors = res.eigenvectors

        def product(arrays: list, y: PyTree) -> PyTree:
            return tree.cast_like(tree_operator(rebuild(arrays), like).matvec(y), y)

        def d_product(y: PyTree) -> PyTree:
            return jax.jvp(lambda a: product(a, y), (arrays,), (tangents[0],))[1]

        d_av = jax.vmap(d_product)(vectors)
        d_theta = tree.rowwise_vdot(vectors, d_av).astype(res.eigenvalues.dtype)
        d_vectors = _eigenvector_tangents(
            lambda v: product(arrays, v),
            vectors,
            res.eigenvalues,
            res.residuals,
            d_av,
            which,
            tol,
        )
        zero = jax.tree_util.tree_map(_zero_tangent, res)
        return res, zero._replace(eigenvalues=d_theta, eigenvectors=d_vectors)

    return solve(arrays, like, v0, key)


# --- eigenvector derivatives ----------------------------------------------------------------


def _gap_floor(theta: jax.Array, residuals: jax.Array) -> jax.Array:
    """``δ = √eps·max|θ| + 2·max‖A y − θ y‖``: eigenvalues closer than δ count as one.

    A Ritz vector is known only to about ``(residual + eps·‖A‖)/gap``, so below δ the
    eigenvector derivative (``∝ 1/gap``) is not determined by the computed pairs.
    """
    eps = jnp.finfo(theta.dtype).eps
    return np.sqrt(eps) * jnp.max(jnp.abs(theta)) + 2 * jnp.max(residuals)


def _signs(theta: jax.Array, which: str) -> jax.Array:
    """``sᵢ`` with ``sᵢ(θᵢ − λ) >= 0`` for every eigenvalue λ left out of the wanted set.

    LA: +1; SA: −1; LM: ``sign θᵢ``, since every λ left out has ``|λ| <= min|θ|``, so
    ``sign(θᵢ)(θᵢ − λ) >= |θᵢ| − |λ| >= 0``. Then ``sᵢ Q(θᵢI − A)Q`` is positive definite on
    range Q when the wanted set is gapped from the rest: a CG system.
    """
    if which == "LA":
        return jnp.ones_like(theta)
    if which == "SA":
        return -jnp.ones_like(theta)
    return jnp.sign(theta)


def _project_out(Y: PyTree, v: PyTree) -> PyTree:
    """``Q v = v − Y (Yᵀ v)`` (Y's rows orthonormal): the part of v outside span(Y)."""
    return tree.sub(v, tree.combine(tree.project(Y, v), Y))


def _nan_like(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda xl: jnp.full_like(xl, jnp.nan), x)


def _eigenvector_tangent(
    matvec: MatVec,
    Y: PyTree,
    theta: jax.Array,
    i: jax.Array,
    sign: jax.Array,
    b: PyTree,
    delta: jax.Array,
    rtol: float,
    maxiter: int,
) -> PyTree:
    """One eigenvector's derivative ``dyᵢ = T̃ᵢ⁻¹ b``, ``b = (I − yᵢyᵢᵀ)(dA)yᵢ``: one CG solve.

    Split by ``I = YYᵀ + Q``:
    ``dyᵢ = Σ_{j≠i} (yⱼᵀb)/(θᵢ − θⱼ) yⱼ + (Q(θᵢI − A)Q)|_{range Q}⁻¹ Q b``
    (Nelson 1976, Magnus 1985). ``T̃ᵢ = Y diag(θᵢ − θⱼ; σ at j = i) Yᵀ + Q(θᵢI − A)Q`` is
    invertible and symmetric, and equals ``θᵢI − A`` on yᵢ⊥ for exact eigenpairs (so
    ``yᵢᵀdyᵢ = 0`` and differentiating T̃ᵢ gives exact second derivatives). CG solves on
    ``sᵢQ(θᵢI − A)Q + σYYᵀ`` (definite, see _signs) until ``‖r‖ <= rtol·‖b‖``, at most
    `maxiter` steps of one product each (plus one to check the residual). The solve is a
    ``lax.custom_linear_solve`` with ``symmetric=True``: reverse mode transposes it into the
    same solve on the cotangent, and its own derivative is ``−T̃ᵢ⁻¹(dT̃ᵢ)x`` (second order).

    NaN (every entry, only where the right-hand side needs it) where the gap does not allow:
    a coupling ``yⱼᵀb ≠ 0`` to a θⱼ within `delta` of θᵢ; a CG that meets non-positive
    curvature (the wanted set is not gapped from the rest), breaks down or does not converge;
    or a solution with ``δ·‖x‖ >= ‖Qb‖`` (then ``sᵢQ(θᵢI − A)Q`` has an eigenvalue
    ``<= ‖Qb‖/‖x‖ <= δ``: the gap to the eigenvalues left out is below δ).
    """
    others = jnp.arange(theta.shape[0]) != i
    shift = jnp.max(jnp.abs(theta)) + 2 * delta  # σ > δ
    weights = jnp.where(others, theta[i] - theta, shift)  # θᵢ − θⱼ; σ at j = i
    split = jnp.abs(weights) > delta

    def restricted(v: PyTree) -> PyTree:  # Q (θᵢI − A) Q v
        q = _project_out(Y, v)
        return _project_out(Y, tree.axpy(-1.0, matvec(q), tree.scale(theta[i], q)))

    def definite(v: PyTree) -> PyTree:  # sᵢ Q (θᵢI − A) Q v + σ YYᵀ v
        return tree.axpy(
            shift, tree.combine(tree.project(Y, v), Y), tree.scale(sign, restricted(v))
        )

    def operator(v: PyTree) -> PyTree:  # T̃ᵢ v
        return tree.axpy(1.0, tree.combine(weights * tree.project(Y, v), Y), restricted(v))

    def inverse(_: MatVec, rhs: PyTree) -> PyTree:  # T̃ᵢ⁻¹ rhs, NaN where the gap is missing
        c = tree.project(Y, rhs)
        ties = jnp.where(c == 0, 0, jnp.nan)
        coef = jnp.where(split, c / jnp.where(split, weights, 1), ties)
        q = _project_out(Y, rhs)
        # tolerance relative to all of rhs: Q rhs may be rounding alone
        st = pcg(definite, q, None, tree.identity, rtol * tree.norm(rhs), maxiter, verify=True)
        x = _project_out(Y, st.x)
        x_norm, q_norm = tree.norm(x), tree.norm(q)
        near = (x_norm > 0) & (delta * x_norm >= q_norm)
        x = tree.where(st.converged & ~near, tree.scale(sign, x), _nan_like(x))
        return tree.axpy(1.0, tree.combine(coef, Y), x)

    return jax.lax.custom_linear_solve(operator, b, inverse, symmetric=True)


def _eigenvector_tangents(
    matvec: MatVec,
    Y: PyTree,
    theta: jax.Array,
    residuals: jax.Array,
    d_av: PyTree,
    which: str,
    tol: float,
) -> PyTree:
    """``dyᵢ = (θᵢI − A)⁺ (dA) yᵢ`` for the k rows of Y, given ``d_av[i] = (dA) yᵢ``.

    ``yᵢᵀdyᵢ = 0`` (unit length, sign held). One CG solve per eigenvector (vmapped over the
    k), to the relative residual `tol` the eigenpairs were computed to, at most ``10·n``
    products each; see _eigenvector_tangent.
    """
    k = theta.shape[0]
    n = tree.size(Y) // k
    delta = _gap_floor(theta, jax.lax.stop_gradient(residuals))
    signs = _signs(theta, which)
    d_av = tree.cast_like(d_av, Y)
    b = tree.sub(d_av, jax.vmap(tree.scale)(tree.rowwise_vdot(Y, d_av), Y))  # P (dA) yᵢ

    def one(i: jax.Array, sign: jax.Array, b: PyTree) -> PyTree:
        return _eigenvector_tangent(matvec, Y, theta, i, sign, b, delta, tol, 10 * n)

    return jax.vmap(one)(jnp.arange(k), signs, b)


def _zero_tangent(x: jax.Array) -> Any:
    if jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.zeros_like(x)
    return np.zeros(x.shape, jax.dtypes.float0)


def _check_symmetric(A: Any) -> None:
    """Refuse a concrete dense A with ``max|A − Aᵀ| > sqrt(eps)·max|A|`` (NaN passes: status)."""
    if not is_dense(A) or isinstance(A, jax.core.Tracer):
        return
    M = jnp.asarray(A)
    asym, size = float(jnp.max(jnp.abs(M - M.T))), float(jnp.max(jnp.abs(M)))
    bound = float(np.sqrt(np.finfo(M.dtype).eps)) * size
    if asym > bound:
        msg = (
            f"A must be symmetric: max|A - A^T| = {asym:.3g} exceeds sqrt(eps)*max|A| = "
            f"{bound:.3g}; eigsh treats A as symmetric (symmetrize it, e.g. (A + A.T) / 2)"
        )
        raise ValueError(msg)


def eigsh(
    A: Any,
    k: int = 1,
    *,
    key: jax.Array | None = None,
    which: str = "LA",
    tol: float | None = None,
    maxiter: int = 1000,
    num_steps: int | None = None,
    v0: PyTree | None = None,
    like: PyTree | None = None,
) -> EigshResult:
    """The k extreme eigenpairs of a symmetric operator, by thick-restart Lanczos.

    Solves ``A y = θ y`` for the k algebraically largest (``"LA"``), smallest (``"SA"``) or
    largest-magnitude (``"LM"``) eigenvalues. The Krylov space grows one product at a time
    and the Ritz residuals ``‖A y − θ y‖ = β·|s_last|`` are checked after every product; it
    stops as soon as all k satisfy ``‖A y − θ y‖ <= tol·|θ|``. When the basis reaches
    `num_steps` vectors it is thick-restarted (Wu & Simon 2000): the best Ritz vectors are
    kept and the space grows again, so memory stays ``(num_steps + 1) n``. The whole solve
    is one ``lax.while_loop``: jit-, vmap-able; compiled once per operator configuration,
    shapes and settings (k, which, tol, maxiter, num_steps are static).

    Repeated eigenvalues: one start vector sees one copy of an exactly repeated eigenvalue,
    so once k pairs have converged (to tol/10) they are locked and Lanczos restarts from a
    fresh random vector orthogonal to them (drawn from `key`); it runs until k + 1 pairs
    have converged (the extra one to √tol when it is clearly outside the wanted set), and
    stops when the wanted k values moved by no more than their tolerance, else locks again
    (at most k + 2 rounds; then status 1). Locking drops a residual coupling of at most
    tol/10, carried into ``residuals`` as a bound.

    Cost: as many products (HVPs) as convergence needs, reported in ``num_matvecs``: those
    for k pairs, plus those for one more eigenpair from a fresh start to √tol (the check;
    about 1.1-1.4x ARPACK's products in all at the same tolerance on a 0.5M-parameter MLP
    Hessian, which does not check multiplicity), plus
    ``O(m n)`` flops of reorthogonalization per product (one or two Gram-Schmidt passes over
    the m basis vectors: each product costs about 2-3x one product alone on a 0.5M-parameter
    MLP Hessian, against ARPACK's 2.6-4.4x with its host round trips; wall time 0.7-1.0x
    ARPACK's at k = 1, 5, 20, ``benchmarks/bench_eigsh.py``). With its arrays on one device a
    pytree input of one dtype runs as one flat vector (:func:`hessfree._krylov.flattened`), so the compiled
    program does not grow with the number of leaves: about 200 kernels, 1.5-2 s of XLA:CPU
    compile on the first call (2.1-3x ARPACK's first call at k = 1 and 5, 1.3x at k = 20).

    Derivatives (``jax.grad``, ``jacrev``, ``jvp``, ``jacfwd``, also of second order) with
    respect to the arrays inside A (a dense matrix, an operator's leaves, a ``Partial``'s
    arguments). Eigenvalues: ``dθᵢ = yᵢᵀ (dA) yᵢ`` (Hellmann-Feynman; k JVPs of the product).
    Eigenvectors, with Y the k computed unit vectors and ``Q = I − YYᵀ``:
    ``dyᵢ = Σ_{j≠i} (yⱼᵀ dA yᵢ)/(θᵢ − θⱼ) yⱼ + (θᵢI − A)|_{range Q}⁻¹ Q (dA) yᵢ`` (Nelson
    1976, Magnus 1985), so ``yᵢᵀdyᵢ = 0``: unit length and sign are held. The second term is
    one CG solve per eigenvector on ``sᵢ·Q(θᵢI − A)Q``, positive definite on range Q when
    the wanted set is separated from the rest of the spectrum by a gap: ``sᵢ = +1`` for
    "LA", −1 for "SA", ``sign θᵢ`` for "LM" (every eigenvalue λ left out has
    ``|λ| <= min|θ|``, so LM needs no special case). It runs to relative residual `tol`
    (as accurate as the eigenpairs themselves), in about ``√κ·log(1/tol)`` products with
    ``κ = ‖A − θᵢI‖ / gap``, at most ``10·n``; reverse mode runs the same solve on the
    cotangent (at once for a zero one); forward mode computes them with the eigenvalue
    tangents unless ``jit`` finds them unused. Where the gap does not allow it the eigenvector
    tangent is NaN, never silently wrong (eigenvalue tangents stay finite): a wanted θⱼ
    within ``δ = √eps·max|θ| + 2·max(residuals)`` of θᵢ (a repeated eigenvalue; both
    vectors), or a cut without a gap (the CG meets non-positive curvature, does not
    converge, or its solution certifies an eigenvalue of ``sᵢQ(θᵢI − A)Q`` below δ).
    Unconverged pairs (status 1) are differentiated as if exact: about ``residual/gap``
    off. For a dense matrix the gradient is that of the products ``A v``, not symmetrized
    (for eigenvectors it is not symmetric): take ``(G + Gᵀ)/2`` for the gradient in the
    space of symmetric matrices.

    Tracking the top eigenvalue over training: pass the previous eigenvector as `v0`
    (``v0=jax.tree.map(lambda e: e[-1], res.eigenvectors)``); near convergence it needs
    few products.

    Args:
        A: a CurvatureOperator (or anything with ``mv`` and ``in_structure``), a callable
            ``v -> A v`` (then pass `like`), or a dense symmetric ``(n, n)`` array.
        k: number of eigenpairs, ``1 <= k <= n``.
        key: a ``jax.random`` key for the random start vector (required unless `v0` is
            given; it also seeds fresh directions after a breakdown).
        which: ``"LA"`` (default), ``"SA"`` or ``"LM"``.
        tol: relative residual tolerance; default ``sqrt(eps)`` of A's dtype (about 3e-4 in
            float32, 1.5e-8 in float64). The eigenvalue error is then about
            ``tol²·|θ|²/gap``.
        maxiter: maximum number of thick restarts.
        num_steps: the largest Krylov basis kept (memory, in vectors); default
            ``min(n, max(2k + 1, 20))`` (ARPACK's; on a 0.5M-parameter MLP Hessian it beat
            a larger basis on wall time at k = 1, 5, 20). Needs ``num_steps > k`` unless it
            equals n (and ``num_steps >= k + 2`` for the multiplicity check).
        v0: a start vector like A's input (e.g. the previous eigenvector); random if None.
        like: an example pytree shaped like A's input, needed when A is a plain callable.

    Returns:
        An :class:`EigshResult` ``(eigenvalues, eigenvectors, residuals, status, success,
        num_matvecs)``: eigenvalues ``(k,)`` ascending; eigenvectors a pytree like A's
        input with a leading axis k (for a dense matrix a ``(k, n)`` array, scipy's
        transpose). Status 1 if the tolerance is not met within `maxiter` restarts (the best
        Ritz pairs are returned), 3 on non-finite products.

    Raises:
        ValueError: `key` and `v0` both missing; `k` or `num_steps` out of range; `which`
            unknown; `tol` not a finite positive number; a concrete dense A not symmetric
            (``max|A − Aᵀ| > sqrt(eps)·max|A|``). A NaN operator gives status 3 after one
            product (also per element under ``vmap``).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import hessfree as hf
        >>> A = jnp.diag(jnp.array([-3.0, 1.0, 2.0, 5.0]))
        >>> hf.eigsh(A, 2, key=jax.random.key(0)).eigenvalues.round(4).tolist()
        [2.0, 5.0]

    References:
        Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
        SIAM J. Matrix Anal. Appl. 22, 2000. Nelson, "Simplified calculation of eigenvector
        derivatives", AIAA J. 14, 1976. Magnus, "On differentiating eigenvalues and
        eigenvectors", Econometric Theory 1, 1985.
    """
    check_choice(which, WHICH, "which")
    key, like, n = checked_start(A, v0, key, like, "eigsh")
    _check_symmetric(A)
    check_positive_int(k, "k")
    if k > n:
        msg = f"k must be at most the dimension n = {n} of A; got k = {k}"
        raise ValueError(msg)
    m = min(n, max(2 * k + 1, 20)) if num_steps is None else num_steps
    check_steps(m, n)
    if m <= k and m < n:
        msg = f"num_steps must exceed k (or equal n = {n}); got num_steps = {m}, k = {k}"
        raise ValueError(msg)
    check_positive_int(maxiter, "maxiter")
    dtype = tree.scalar_dtype(tree_operator(A, like).structure)
    tol = float(np.sqrt(np.finfo(dtype).eps)) if tol is None else tol
    check_number(tol, "tol", minimum=0.0, strict=True)
    statics = {"k": k, "which": which, "num_steps": m, "tol": float(tol), "maxiter": maxiter}
    return staged(_eigsh_impl, A, like, v0, key, **statics)

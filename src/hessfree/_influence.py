"""Influence functions: how much each training point moves the loss on a test point.

Conventions. N training points ``z_1 … z_N``, per-example loss ``ℓ(θ, z) =
example_loss(params, z)``, gradients ``g(z) = ∇_θ ℓ(θ, z)`` at the given `params` θ̂ (the
minimizer of the training objective; never re-optimized here), ``A`` the curvature of the
training objective at θ̂ (built by the caller with :func:`hessfree.hessian`,
:func:`hessfree.ggn`, …) and ``λ >= 0`` the damping::

    I_up,loss(z_i, z) = −g(z)ᵀ (A + λI)⁻¹ g(z_i)                     (Koh & Liang 2017, eq. 2)

is the derivative of the loss at z with respect to upweighting z_i by ε in the training
objective. With the usual objective ``R(θ) = (1/N) Σ_j ℓ(θ, z_j) + Ω(θ)`` (Ω a regularizer)
and ``A = ∇²R(θ̂)`` (the Hessian of the MEAN loss), removing z_i is ``ε = −1/N``, so to first
order the test loss changes by

    Δℓ(z) ≈ −(1/N)·I_up,loss(z_i, z) = (1/N)·g(z)ᵀ A⁻¹ g(z_i)         (predicted_loss_change)

when the rest of the objective (Ω, the 1/N in front of the sum) is held as it is. If A is
the Hessian of the SUM ``Σ_j ℓ(θ, z_j) + N·Ω(θ)`` (N times the above), then ``A⁻¹`` carries
the 1/N already: ``Δℓ(z) ≈ −I_up,loss(z_i, z)``; pass ``num_train=1``.

Three ways to apply ``(A + λI)⁻¹``, each built only from products with A:

- ``"cg"``: one conjugate-gradient solve ``(A + λI) s = g(z_test)`` per test point
  (:func:`hessfree.cg`; all test points together under ``vmap``, or `chunk_size` at a time;
  on CPU with more than 131072 parameters one after another by default),
  then ``scores = −S G_trainᵀ`` with the training gradients made chunk by chunk. Exact to
  the CG tolerance. Cost: the CG products for every test point (about
  ``√κ·log(1/rtol)`` each, κ the condition number of A + λI), one gradient per point.
- ``"arnoldi"``: Schioppa, Zablotskaia, Vilar & Sokolov, "Scaling up influence functions",
  AAAI 2022. The `rank` eigenpairs ``(s_k, v_k)`` of A of largest magnitude
  (:func:`hessfree.eigsh`, thick-restart Lanczos, which is Arnoldi's iteration on a
  symmetric operator) give ``(A + λI)⁻¹ ≈ Σ_k v_k v_kᵀ / (s_k + λ)`` and every score is a sum
  over projections: ``−Σ_k ⟨v_k, g_test⟩⟨v_k, g_train⟩ / (s_k + λ)``. The components of the
  gradients outside the span of the kept eigenvectors are DROPPED (not approximated by
  ``1/λ``), as in the paper: exact when ``rank = P``, an approximation that keeps the
  high-curvature directions otherwise. Cost: the eigsh products once, for all points; then
  one gradient and `rank` inner products per point (no solve per point).
- ``"lissa"``: Agarwal, Bullins & Hazan, "Second-order stochastic optimization for machine
  learning in linear time", JMLR 2017, as used by Koh & Liang: the truncated Neumann series
  ``s_{j+1} = v + (I − (A + λI)/scale) s_j``, ``s_0 = v``, ``(A + λI)⁻¹ v ≈ s_J / scale``.
  Here every step uses the exact product with the given A (no minibatch sampling), so the
  recursion is deterministic and repeats would be identical: there is no repeat count (build
  A on a minibatch to get the original's cost per step). The residual ``v − (A + λI) s_j /
  scale`` comes free with each step; the series stops once it meets `rtol` or after
  `lissa_depth` steps. It converges iff every eigenvalue of ``A + λI`` lies in ``(0,
  2·scale)``; ``scale >= λ_max(A + λI)`` is the usual choice (Koh & Liang's "scale"), and the
  error shrinks by ``1 − λ_min/scale`` per step. Cost: up to `lissa_depth` products per test
  point (usually far more than CG for the same accuracy: LiSSA is here as the reference
  method of the literature).

References:
    Koh & Liang, "Understanding black-box predictions via influence functions", ICML 2017.
    Cook & Weisberg, "Residuals and influence in regression", 1982. Schioppa et al. 2022 and
    Agarwal et al. 2017, above.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from . import _tree as tree
from ._cg import cg
from ._eigsh import eigsh
from ._krylov import map_loops
from ._linop import is_dense, tree_operator
from ._operators import CurvatureOperator
from ._results import (
    MAXITER,
    NEGATIVE_CURVATURE,
    NONFINITE,
    SUCCESS,
    EigshResult,
    message_of,
)
from ._staging import staged
from ._validation import (
    PyTree,
    batch_size,
    check_choice,
    check_key,
    check_like,
    check_number,
    check_positive_int,
    check_scalar_fn,
    check_solver_dtype,
    describe_tree,
)

METHODS = ("cg", "arnoldi", "lissa")
Loss = Callable[[PyTree, PyTree], jax.Array]


class InfluenceScores(NamedTuple):
    """What :func:`influence` and :func:`self_influence` return.

    Attributes:
        scores: :func:`influence`: ``(num_test, num_train)``, ``scores[t, i] =
            I_up,loss(z_train[i], z_test[t])``; :func:`self_influence`: ``(num_train,)``.
        status: int32, one code per row of `scores` (per test point; per training point
            for :func:`self_influence`): 0 success; 1 the solve did not meet `rtol` within
            `maxiter` (cg) or `lissa_depth` (lissa), or eigsh did not converge (arnoldi);
            3 non-finite values (in a gradient, a product or the row's scores); 5 A + λI is
            not positive definite (cg met ``pᵀ(A + λI)p <= 0``; arnoldi found, among its
            `rank` eigenvalues, one with ``s + λ`` at or below rounding level, zero or
            negative, and dropped its direction). A row that is not a success holds the
            scores of the last finite iterate (cg, lissa) or of the kept directions
            (arnoldi): finite numbers, but not to be trusted; NaN appears only with a
            non-finite gradient, and then with status 3.
        success: ``status == 0``, per row.
        num_matvecs: products with A spent by the call, in all (every solve, eigsh, the
            LiSSA scale estimate; 0 for precomputed eigenpairs).
    """

    scores: jax.Array
    status: jax.Array
    success: jax.Array
    num_matvecs: jax.Array

    message = property(lambda self: message_of(self.status), doc="The texts of `status`.")


# --- helpers -------------------------------------------------------------------------------------


def _dense_mv(A: jax.Array, v: jax.Array) -> jax.Array:
    return A @ v


def _as_operator(A: Any, params: PyTree) -> CurvatureOperator:
    """`A` as a :class:`CurvatureOperator` on pytrees like `params` (checked eagerly)."""
    if isinstance(A, CurvatureOperator):
        check_like(A.in_structure(), params, "A's parameters", "params")
        return A
    if callable(getattr(A, "mv", None)) and callable(getattr(A, "in_structure", None)):
        check_like(A.in_structure(), params, "A's parameters", "params")
        return CurvatureOperator(A.mv, params)
    if is_dense(A):
        n = tree.size(params)
        if not hasattr(params, "shape") or np.ndim(params) != 1 or np.shape(A) != (n, n):
            msg = (
                f"A as a dense matrix acts on flat vectors, so params must be a 1-D array of "
                f"length n and A of shape (n, n); got A of shape {np.shape(A)} and params "
                f"{describe_tree(params)}"
            )
            raise ValueError(msg)
        tree_operator(A)  # square, floating
        return CurvatureOperator(Partial(_dense_mv, A), params)
    if callable(A):
        return CurvatureOperator(A, params)
    msg = (
        f"A must be a CurvatureOperator (hf.hessian, hf.ggn, hf.fisher), a callable v -> A v "
        f"on pytrees like params, or a dense (n, n) array; got {type(A).__name__}"
    )
    raise TypeError(msg)


def _example_of(batch: PyTree) -> PyTree:
    return jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], jnp.result_type(leaf)), batch
    )


def _check_batches(train: PyTree, test: PyTree | None) -> PyTree:
    """Leading axes agree within each batch, and test examples are shaped like train's."""
    batch_size(train, "train")
    if test is None:
        return _example_of(train)
    batch_size(test, "test")
    train_def = jax.tree_util.tree_structure(train)
    test_def = jax.tree_util.tree_structure(test)
    if train_def != test_def:
        msg = (
            f"test must have the same tree structure as train; got {describe_tree(test)} vs "
            f"{describe_tree(train)} (structures {test_def} vs {train_def})"
        )
        raise ValueError(msg)
    for (path, a), b in zip(
        jax.tree_util.tree_leaves_with_path(train), jax.tree_util.tree_leaves(test), strict=True
    ):
        if tuple(jnp.shape(a))[1:] != tuple(jnp.shape(b))[1:]:
            where = jax.tree_util.keystr(path) or "(the array itself)"
            msg = (
                f"test examples must be shaped like train examples (all but the leading axis); "
                f"leaf {where} has shape {tuple(jnp.shape(b))} in test but "
                f"{tuple(jnp.shape(a))} in train"
            )
            raise ValueError(msg)
    return _example_of(train)


def _over(one: Callable[[PyTree], Any], batch: PyTree, chunk_size: int | None) -> Any:
    if chunk_size is None:
        return jax.vmap(one)(batch)
    return jax.lax.map(one, batch, batch_size=chunk_size)


class _LissaState(NamedTuple):
    x: PyTree
    r: PyTree
    rnorm: jax.Array
    k: jax.Array
    finite: jax.Array


def _lissa_solve(
    matvec: Callable[[PyTree], PyTree],
    v: PyTree,
    scale: jax.Array,
    rtol: jax.Array,
    depth: Any,
) -> tuple[PyTree, jax.Array, jax.Array]:
    """``(x, status, products)`` with ``x ≈ B⁻¹ v`` by the truncated Neumann series.

    ``x_j = s_j / scale`` where ``s_{j+1} = v + (I − B/scale) s_j``; equivalently
    ``x_{j+1} = x_j + r_j / scale`` with ``r_j = v − B x_j`` (LiSSA's recursion with exact
    products; ``x_0 = 0``, so ``x_1 = v / scale = s_0 / scale``). One product per step.
    """
    dtype = tree.scalar_dtype(v)
    scale = jnp.asarray(scale, dtype)
    inv = 1 / scale
    vnorm = tree.norm(v)
    tol = jnp.asarray(rtol, dtype) * vnorm
    start_ok = jnp.isfinite(vnorm) & jnp.isfinite(inv) & (scale > 0)
    init = _LissaState(tree.zeros_like(v), v, vnorm, jnp.zeros((), jnp.int32), start_ok)

    def cond(s: _LissaState) -> jax.Array:
        return s.finite & (s.k < depth) & (s.rnorm > tol)

    def body(s: _LissaState) -> _LissaState:
        x = tree.axpy(inv, s.r, s.x)
        r = tree.sub(v, tree.cast_like(matvec(x), v))
        rnorm = tree.norm(r)
        ok = jnp.isfinite(rnorm) & tree.all_finite(x)
        return _LissaState(
            tree.where(ok, x, s.x),
            tree.where(ok, r, s.r),
            jnp.where(ok, rnorm, s.rnorm),
            s.k + 1,
            ok,
        )

    s = jax.lax.while_loop(cond, body, init)
    status = jnp.where(~s.finite, NONFINITE, jnp.where(s.rnorm <= tol, SUCCESS, MAXITER))
    return s.x, status.astype(jnp.int32), s.k


def _finite_rows(scores: jax.Array, status: jax.Array) -> jax.Array:
    """Status NONFINITE for every row of `scores` holding a NaN or inf."""
    axes = tuple(range(1, scores.ndim))
    finite = jnp.all(jnp.isfinite(scores), axis=axes) if axes else jnp.isfinite(scores)
    return jnp.where(finite, status, NONFINITE).astype(jnp.int32)


# --- the staged bodies -------------------------------------------------------------------------


def _grad_fn(example_loss: Loss, params: PyTree) -> Callable[[PyTree], PyTree]:
    def grad_of(example: PyTree) -> PyTree:
        return tree.cast_like(jax.grad(example_loss)(params, example), params)

    return grad_of


def _arnoldi_impl(
    eig: EigshResult,
    example_loss: Loss,
    params: PyTree,
    train: PyTree,
    test: PyTree | None,
    damping: Any,
    *,
    chunk_size: int | None,
) -> InfluenceScores:
    """Scores from the eigenpairs of A: ``(A + λI)⁻¹ ≈ V diag(1/(s + λ)) Vᵀ`` on their span."""
    dtype = tree.scalar_dtype(params)
    grad_of = _grad_fn(example_loss, params)
    d = eig.eigenvalues.astype(dtype) + jnp.asarray(damping, dtype)
    floor = jnp.finfo(dtype).eps ** 0.75 * jnp.max(jnp.abs(d))
    kept = d > floor  # at or below rounding level: not positive definite, dropped
    inv = jnp.where(kept, 1 / jnp.where(kept, d, 1), 0)
    shared = jnp.where(
        eig.status != SUCCESS, eig.status, jnp.where(jnp.all(kept), SUCCESS, NEGATIVE_CURVATURE)
    )
    vectors = eig.eigenvectors

    def project(example: PyTree) -> jax.Array:
        return tree.project(vectors, grad_of(example)).astype(dtype)

    p_train = _over(project, train, chunk_size)  # (N, rank)
    if test is None:
        scores = jnp.sum(p_train * p_train * inv, axis=1)
    else:
        p_test = _over(project, test, chunk_size)  # (T, rank)
        scores = -(p_test * inv) @ p_train.T
    status = _finite_rows(scores, jnp.broadcast_to(shared, scores.shape[:1]))
    return InfluenceScores(scores, status, status == SUCCESS, eig.num_matvecs.astype(jnp.int32))


def _solve_impl(
    op: CurvatureOperator,
    example_loss: Loss,
    params: PyTree,
    train: PyTree,
    test: PyTree | None,
    rtol: Any,
    lissa_scale: Any,
    lissa_depth: Any,
    extra_matvecs: jax.Array,
    *,
    method: str,
    chunk_size: int | None,
    maxiter: int | None,
) -> InfluenceScores:
    """Scores from one solve with the (damped) operator per test point: cg or lissa."""
    dtype = tree.scalar_dtype(params)
    grad_of = _grad_fn(example_loss, params)
    if method == "lissa":
        matvec = tree_operator(op, params).matvec

        def solve(g: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
            return _lissa_solve(matvec, g, lissa_scale, rtol, lissa_depth)

    else:

        def solve(g: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
            res = cg(op, g, rtol=rtol, maxiter=maxiter)
            return res.x, res.status, res.num_matvecs

    if test is None:

        def one_self(example: PyTree) -> tuple[jax.Array, jax.Array, jax.Array]:
            g = grad_of(example)
            x, status, count = solve(g)
            return tree.vdot(g, x).astype(dtype), status, count

        scores, status, counts = map_loops(one_self, train, chunk_size, params)
    else:

        def one_test(example: PyTree) -> tuple[PyTree, jax.Array, jax.Array]:
            return solve(grad_of(example))

        S, status, counts = map_loops(one_test, test, chunk_size, params)  # S: (T, ...)

        def column(example: PyTree) -> jax.Array:
            return -tree.project(S, grad_of(example)).astype(dtype)

        scores = _over(column, train, chunk_size).T  # (T, N)
    matvecs = jnp.sum(counts.astype(jnp.int32)) + extra_matvecs
    status = _finite_rows(scores, status)
    return InfluenceScores(scores, status, status == SUCCESS, matvecs)


def _run(
    op: CurvatureOperator | EigshResult,
    example_loss: Loss,
    params: PyTree,
    train: PyTree,
    test: PyTree | None,
    *,
    method: str,
    damping: Any,
    rank: int | None,
    key: Any,
    chunk_size: int | None,
    maxiter: int | None,
    rtol: Any,
    lissa_scale: Any,
    lissa_depth: int,
) -> InfluenceScores:
    """The steps, each compiled once per configuration: eigsh (shared by every call with the
    same operator and rank, whatever the data), then the per-point work."""
    if method == "arnoldi":
        assert rank is not None  # checked by the caller
        if isinstance(op, EigshResult):  # precomputed: the `rank` of largest magnitude
            top = jnp.argsort(-jnp.abs(op.eigenvalues))[:rank]
            eig = op._replace(
                eigenvalues=op.eigenvalues[top],
                eigenvectors=jax.tree_util.tree_map(lambda e: e[top], op.eigenvectors),
                residuals=op.residuals[top],
                num_matvecs=jnp.zeros((), jnp.int32),
            )
        else:
            eig = eigsh(op, rank, key=key, which="LM")
        return staged(
            _arnoldi_impl, eig, example_loss, params, train, test, damping, chunk_size=chunk_size
        )
    damped = op + damping
    extra = jnp.zeros((), jnp.int32)
    if method == "lissa" and lissa_scale is None:
        top = eigsh(damped, 1, key=key, which="LM")
        lissa_scale = jnp.abs(top.eigenvalues[0])
        extra = top.num_matvecs.astype(jnp.int32)
    return staged(
        _solve_impl, damped, example_loss, params, train, test, rtol, lissa_scale, lissa_depth,
        extra, method=method, chunk_size=chunk_size, maxiter=maxiter,
    )  # fmt: skip


# --- the public functions ----------------------------------------------------------------------


def _checked(
    A: Any,
    example_loss: Any,
    params: PyTree,
    train: PyTree,
    test: PyTree | None,
    method: Any,
    damping: Any,
    rank: Any,
    key: Any,
    chunk_size: Any,
    maxiter: Any,
    rtol: Any,
    lissa_scale: Any,
    lissa_depth: Any,
    fn: str,
) -> tuple[CurvatureOperator | EigshResult, int | None]:
    """Every check that can be made before running; returns A as an operator (or the given
    eigenpairs) and the rank."""
    check_choice(method, METHODS, "method")
    check_solver_dtype(params, "params")
    if isinstance(A, EigshResult):
        if method != "arnoldi":
            msg = (
                f"A is an EigshResult (precomputed eigenpairs), which only method='arnoldi' can "
                f"use; got method={method!r}: pass the operator itself"
            )
            raise ValueError(msg)
        check_like(params, A.eigenvectors, "params", "A.eigenvectors", batched=True)
        k = int(np.shape(A.eigenvalues)[0])
        rank = k if rank is None else rank
        check_positive_int(rank, "rank")
        if rank > k:
            msg = f"rank must be at most the number of eigenpairs given, {k}; got rank = {rank}"
            raise ValueError(msg)
        op: CurvatureOperator | EigshResult = A
    else:
        op = _as_operator(A, params)
    example = _check_batches(train, test)
    check_scalar_fn(example_loss, params, (example,), "example_loss")
    check_number(damping, "damping", traced_ok=True)
    check_number(rtol, "rtol", traced_ok=True)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_positive_int(maxiter, "maxiter", allow_none=True)
    check_positive_int(lissa_depth, "lissa_depth")
    if lissa_scale is not None:
        check_number(lissa_scale, "lissa_scale", strict=True, traced_ok=True)
    if isinstance(op, EigshResult):
        pass
    elif method == "arnoldi":
        if rank is None:
            msg = (
                f"{fn}(method='arnoldi') needs rank= (the number of eigenpairs of A kept, "
                f"1 <= rank <= P = {tree.size(params)}); got None"
            )
            raise ValueError(msg)
        check_positive_int(rank, "rank")
        if rank > tree.size(params):
            msg = (
                f"rank must be at most the number of parameters P = {tree.size(params)}; "
                f"got rank = {rank}"
            )
            raise ValueError(msg)
        check_key(key, f"{fn}(method='arnoldi')", "the eigsh start vector")
    elif method == "lissa" and lissa_scale is None:
        check_key(
            key,
            f"{fn}(method='lissa') without lissa_scale",
            "estimating the largest eigenvalue of A + damping·I (or pass lissa_scale=)",
        )
    elif key is not None:
        check_key(key, fn)
    return op, rank


def influence(
    A: Any,
    example_loss: Loss,
    params: PyTree,
    train: PyTree,
    test: PyTree,
    *,
    method: str = "cg",
    damping: float = 0.0,
    rank: int | None = None,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    maxiter: int | None = None,
    rtol: float = 1e-5,
    lissa_scale: float | None = None,
    lissa_depth: int = 1000,
) -> InfluenceScores:
    """Koh & Liang's influence of every training point on the loss of every test point.

    ``scores[t, i] = I_up,loss(z_train[i], z_test[t]) = −g(z_test[t])ᵀ (A + λI)⁻¹
    g(z_train[i])`` with ``g(z) = ∇_θ example_loss(params, z)`` and λ = `damping`: the
    derivative of the test loss with respect to upweighting the training point. Negative:
    upweighting the point lowers the test loss (a helpful point); positive: a harmful one.
    :func:`predicted_loss_change` turns scores into the predicted effect of removing a point.
    The conventions, and the three methods (``"cg"`` exact to `rtol`, ``"arnoldi"`` a
    rank-`rank` eigen-approximation that drops the directions outside its span, ``"lissa"``
    the truncated Neumann series), are in the module docstring of ``hessfree._influence``.

    Compiled once per operator configuration, `example_loss`, settings and shapes; calling it
    again at new parameters (with A rebuilt there) or new data compiles nothing. ``jit``-able.

    Cost: one gradient per training and per test point, plus ``"cg"``: one CG solve per test
    point (reported in ``num_matvecs``; solved together under ``vmap``, a batch iterates
    until its slowest solve has converged); ``"arnoldi"``: one eigsh for all points, then
    `rank` inner products per point; ``"lissa"``: up to `lissa_depth` products per test point
    (and one eigsh(k=1) if `lissa_scale` is not given). Memory: ``"cg"``/``"lissa"`` hold
    the T solutions (``T × P``); ``"arnoldi"`` the `rank` eigenvectors (``rank × P``, plus
    eigsh's Krylov basis); gradients are made ``chunk_size`` at a time (all at once without
    it: ``max(N, T) × P``).

    Args:
        A: the curvature of the training objective at `params`: a
            :class:`~hessfree.CurvatureOperator` (``hf.hessian(objective, params, ...)``,
            ``hf.ggn(...)``), a callable ``v -> A v`` on pytrees like `params`, or a dense
            ``(P, P)`` array when `params` is a 1-D array. Symmetric; positive definite after
            damping for the results to mean anything (not positive definite shows in
            ``status``). For ``"arnoldi"`` also an :class:`~hessfree.EigshResult` of A
            (``hf.eigsh(A, k, key=key, which="LM")``), to compute the eigenpairs once and
            reuse them across calls: the `rank` (default k) of largest magnitude are used,
            and the call spends no products with A.
        example_loss: ``example_loss(params, example) -> scalar``, the loss of one example.
        params: the trained parameters θ̂, a pytree of float32/float64 arrays.
        train: the training points, a pytree whose leaves share a leading axis N.
        test: the test points, a pytree like `train` with a leading axis T.
        method: ``"cg"`` (default), ``"arnoldi"`` or ``"lissa"``.
        damping: λ >= 0, added to A (``A + λI``); needed when A is singular or indefinite.
        rank: ``"arnoldi"`` only: the number of eigenpairs kept, ``1 <= rank <= P`` (at most
            k for precomputed eigenpairs).
        key: a ``jax.random`` key: ``"arnoldi"`` (the eigsh start vector), ``"lissa"``
            without `lissa_scale` (its estimate). Ignored by ``"cg"``.
        chunk_size: at most this many points at once (solves, gradients, projections), by
            ``lax.map``; None: all at once (``vmap``), except the cg and lissa solves on CPU
            for more than 131072 parameters, which run one after another (XLA:CPU gains
            nothing from batching large products; a batched loop pays for its branches).
        maxiter: ``"cg"`` only: iterations per solve (default 10·P, as :func:`hessfree.cg`).
        rtol: ``"cg"`` and ``"lissa"``: a solve succeeds when ``‖g − (A + λI) x‖ <=
            rtol·‖g‖``.
        lissa_scale: ``"lissa"`` only: the scale, > 0; every eigenvalue of ``A + λI`` must lie
            in ``(0, 2·scale)`` or the series diverges (status 1 or 3). Default: the
            largest-magnitude eigenvalue of ``A + λI``, by :func:`hessfree.eigsh` (k = 1,
            needs `key`).
        lissa_depth: ``"lissa"`` only: the most terms of the series (products) per test point.

    Returns:
        :class:`InfluenceScores` ``(scores, status, success, num_matvecs)``: scores
        ``(T, N)`` in the parameters' dtype; status and success per test point.

    Raises:
        ValueError: unknown `method`; `train`/`test` with another structure, or examples of
            other shapes, or leaves that disagree on their leading axis; `example_loss` not
            scalar; negative `damping` or `rtol`; `rank` missing or above P (``"arnoldi"``);
            `key` missing where needed; A's structure unlike `params`.
        TypeError: non-floating (or not float32/float64) parameters; A of an unusable type;
            a `key` that is not a jax key.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import hessfree as hf
        >>> loss = lambda w, z: 0.5 * (z[0] @ w - z[1]) ** 2  # least squares
        >>> X, y = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]), jnp.array([1.0, 0.0, 2.0])
        >>> w = jnp.linalg.solve(X.T @ X, X.T @ y)  # the minimizer of the mean loss
        >>> H = hf.hessian(lambda w: jnp.mean(jax.vmap(loss, (None, 0))(w, (X, y))), w)
        >>> res = hf.influence(H, loss, w, (X, y), (X[:1], y[:1]))
        >>> res.scores.shape, bool(res.success.all())
        ((1, 3), True)
    """
    op, rank = _checked(
        A, example_loss, params, train, test, method, damping, rank, key, chunk_size, maxiter,
        rtol, lissa_scale, lissa_depth, "influence",
    )  # fmt: skip
    return _run(
        op, example_loss, params, train, test, method=method, damping=damping, rank=rank,
        key=key, chunk_size=chunk_size, maxiter=maxiter, rtol=rtol, lissa_scale=lissa_scale,
        lissa_depth=lissa_depth,
    )  # fmt: skip


def self_influence(
    A: Any,
    example_loss: Loss,
    params: PyTree,
    train: PyTree,
    *,
    method: str = "cg",
    damping: float = 0.0,
    rank: int | None = None,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
    maxiter: int | None = None,
    rtol: float = 1e-5,
    lissa_scale: float | None = None,
    lissa_depth: int = 1000,
) -> InfluenceScores:
    """The self-influence of every training point: ``g(z_i)ᵀ (A + λI)⁻¹ g(z_i)``, ``(N,)``.

    Sign convention: reported POSITIVE (for a positive definite A + λI), i.e. MINUS the
    diagonal of ``influence(A, example_loss, params, train, train).scores``: it is how much
    upweighting a point lowers its own loss, and to first order N times how much removing it
    raises its own loss (see :func:`predicted_loss_change`). Large values mark points the
    model fits only by bending for them: mislabeled or atypical examples rank first.

    Arguments, methods and statuses as in :func:`influence` (status per training point).
    Cost: ``"cg"``/``"lissa"``: one solve per training point (N solves, so for large N
    prefer ``"arnoldi"``, whose eigsh is shared: then one gradient and `rank` inner products
    per point); never a ``N × N`` matrix.

    Returns:
        :class:`InfluenceScores` with ``scores`` of shape ``(N,)``.
    """
    op, rank = _checked(
        A, example_loss, params, train, None, method, damping, rank, key, chunk_size, maxiter,
        rtol, lissa_scale, lissa_depth, "self_influence",
    )  # fmt: skip
    return _run(
        op, example_loss, params, train, None, method=method, damping=damping, rank=rank,
        key=key, chunk_size=chunk_size, maxiter=maxiter, rtol=rtol, lissa_scale=lissa_scale,
        lissa_depth=lissa_depth,
    )  # fmt: skip


def predicted_loss_change(scores: Any, num_train: int) -> jax.Array:
    """The predicted change of each test loss when each training point is removed.

    ``Δℓ(z_test[t], remove z_train[i]) ≈ −scores[t, i] / N = (1/N)·g_testᵀ A⁻¹ g_train``
    (N = `num_train`). This is the first-order effect of upweighting z_i by ``ε = −1/N`` in
    ``R(θ) = (1/N) Σ_j ℓ(θ, z_j) + Ω(θ)`` with A the Hessian of R, the MEAN training loss
    (plus the regularizer): the retrained objective is ``(1/N) Σ_{j≠i} ℓ(θ, z_j) + Ω(θ)``,
    with the weight of Ω and the 1/N held. Positive: removing the point raises the test loss
    (it was helpful). If A is the Hessian of the SUM ``Σ_j ℓ + N·Ω`` (N times larger),
    its inverse already carries the 1/N: pass ``num_train=1``. The approximation is
    first-order in 1/N (Koh & Liang 2017, §2.1); it also applies to :func:`self_influence`
    scores with the sign flipped (their removal raises the point's own loss by about
    ``+scores/N``).

    Args:
        scores: :class:`InfluenceScores` or an array of scores from :func:`influence`.
        num_train: N, the number of training points averaged over in the objective.

    Returns:
        An array like the scores: ``−scores / num_train``.
    """
    check_positive_int(num_train, "num_train")
    values = scores.scores if isinstance(scores, InfluenceScores) else scores
    values = jnp.asarray(values)
    if not jnp.issubdtype(values.dtype, jnp.floating):
        msg = f"scores must be a floating-point array; got dtype {values.dtype}"
        raise TypeError(msg)
    return -values / jnp.asarray(num_train, values.dtype)

"""Conjugate gradients on pytrees, and Steihaug-Toint truncated CG for trust regions.

Both only ever call a matrix-vector product ``v -> A v``; neither forms A. Both run as one
``lax.while_loop``, so they compile once under ``jit`` and batch under ``vmap``.

- :func:`cg` solves ``A x = b`` for symmetric A (preconditioned by an optional SPD `M`) and
  stops at the first direction of non-positive curvature, flagging it.
- :func:`steihaug` (private, used by :func:`hessfree.minimize`) approximately minimizes the
  quadratic model ``m(s) = gᵀs + ½ sᵀHs`` inside a trust region ``‖s‖_W <= Δ`` and leaves
  it for the boundary along any direction of negative curvature.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._linop import as_matvec
from ._products import cast_like, tree_vdot
from ._validation import PyTree, check_floating, check_like, check_positive_int

MatVec = Callable[[PyTree], PyTree]


# --- small pytree arithmetic -------------------------------------------------------------


def tree_axpy(a: jax.Array, x: PyTree, y: PyTree) -> PyTree:
    """``a x + y`` leaf by leaf, keeping the dtype of each leaf of `y`."""
    return jax.tree_util.tree_map(lambda xl, yl: yl + jnp.asarray(a, yl.dtype) * xl, x, y)


def tree_scale(a: jax.Array, x: PyTree) -> PyTree:
    """``a x`` leaf by leaf, keeping dtypes."""
    return jax.tree_util.tree_map(lambda xl: jnp.asarray(a, xl.dtype) * xl, x)


def tree_neg(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.negative, x)


def tree_zeros_like(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, x)


def tree_where(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where the scalar `cond` holds, else ``b`` (structures must match)."""
    return jax.tree_util.tree_map(lambda al, bl: jnp.where(cond, al, bl), a, b)


def tree_norm(x: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(x, x))


def tree_size(x: PyTree) -> int:
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(x))


def scalar_dtype(x: PyTree) -> np.dtype:
    return np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(x)))


def _identity(v: PyTree) -> PyTree:
    return v


# --- preconditioned CG -------------------------------------------------------------------


class CGResult(NamedTuple):
    """What :func:`cg` returns (a pytree, so it passes through ``jit`` and ``vmap``).

    Attributes:
        x: the solution estimate, a pytree like `b`. On negative curvature: the last iterate
            computed before the offending direction (a descent direction for the quadratic
            ``½xᵀAx − bᵀx`` whenever at least one step was taken).
        iterations: CG steps taken (int32).
        residual_norm: ``‖b − A x‖₂`` of the returned `x` (recursively updated residual).
        converged: ``residual_norm <= max(rtol·‖b‖₂, atol)``.
        negative_curvature: the iteration met a direction p with ``pᵀAp <= 0`` and stopped.
    """

    x: PyTree
    iterations: jax.Array
    residual_norm: jax.Array
    converged: jax.Array
    negative_curvature: jax.Array


class PCGState(NamedTuple):
    """Loop state of :func:`pcg`; `p` and `pAp` describe the direction last tested."""

    x: PyTree
    r: PyTree
    z: PyTree
    p: PyTree
    rz: jax.Array
    rnorm: jax.Array
    pAp: jax.Array
    pp: jax.Array
    max_rayleigh: jax.Array
    k: jax.Array
    matvecs: jax.Array
    negative: jax.Array
    broken: jax.Array


def pcg(
    matvec: MatVec,
    b: PyTree,
    x0: PyTree | None,
    precond: MatVec,
    tol: jax.Array,
    maxiter: int | jax.Array,
) -> PCGState:
    """Preconditioned CG (Hestenes & Stiefel 1952) until ``‖r‖ <= tol``, maxiter or ``pᵀAp <= 0``.

    Unchecked engine under :func:`cg`, Newton-CG and the saddle probe. A non-finite ``pᵀAp``
    stops the iteration too (`broken`), keeping the last finite iterate. Cost: one product
    per step (plus one for ``x0``), one preconditioner application per step.
    """
    dtype = scalar_dtype(b)
    if x0 is None:
        x = tree_zeros_like(b)
        r = b
        matvecs = jnp.zeros((), jnp.int32)
    else:
        x = x0
        r = tree_axpy(jnp.asarray(-1.0, dtype), cast_like(matvec(x0), b), b)
        matvecs = jnp.ones((), jnp.int32)
    z = cast_like(precond(r), b)
    rz = tree_vdot(r, z)
    zero = jnp.zeros((), dtype)
    state = PCGState(
        x=x,
        r=r,
        z=z,
        p=z,
        rz=rz,
        rnorm=tree_norm(r),
        pAp=zero,
        pp=zero,
        max_rayleigh=zero,
        k=jnp.zeros((), jnp.int32),
        matvecs=matvecs,
        negative=jnp.zeros((), bool),
        broken=jnp.zeros((), bool),
    )

    def cond(s: PCGState) -> jax.Array:
        return ~s.negative & ~s.broken & (s.rnorm > tol) & (s.k < maxiter)

    def body(s: PCGState) -> PCGState:
        Ap = cast_like(matvec(s.p), b)
        pAp = tree_vdot(s.p, Ap)
        pp = tree_vdot(s.p, s.p)
        broken = ~jnp.isfinite(pAp)
        negative = ~broken & (pAp <= 0)
        ok = ~broken & ~negative
        alpha = jnp.where(ok, s.rz / jnp.where(ok, pAp, 1), 0)
        x = tree_axpy(alpha, s.p, s.x)
        r = tree_axpy(-alpha, Ap, s.r)
        z = cast_like(precond(r), b)
        rz = tree_vdot(r, z)
        beta = rz / jnp.where(s.rz != 0, s.rz, 1)
        p = tree_axpy(beta, s.p, z)
        rayleigh = jnp.where(ok & (pp > 0), pAp / jnp.where(pp > 0, pp, 1), 0)
        return PCGState(
            x=tree_where(ok, x, s.x),
            r=tree_where(ok, r, s.r),
            z=tree_where(ok, z, s.z),
            p=tree_where(ok, p, s.p),
            rz=jnp.where(ok, rz, s.rz),
            rnorm=jnp.where(ok, tree_norm(r), s.rnorm),
            pAp=pAp,
            pp=pp,
            max_rayleigh=jnp.maximum(s.max_rayleigh, rayleigh),
            k=s.k + ok.astype(jnp.int32),
            matvecs=s.matvecs + 1,
            negative=negative,
            broken=broken,
        )

    return lax.while_loop(cond, body, state)


def _check_tolerance(value: Any, name: str) -> None:
    if isinstance(value, int | float | np.floating | np.integer) and not isinstance(value, bool):
        if not np.isfinite(value) or value < 0:
            msg = f"{name} must be a finite number >= 0; got {value!r}"
            raise ValueError(msg)
        return
    if isinstance(value, jax.Array | np.ndarray) and np.shape(value) == ():
        return
    msg = f"{name} must be a finite number >= 0 (or a scalar array); got {type(value).__name__}"
    raise TypeError(msg)


def _check_dense_rhs(A: Any, b: PyTree, name: str) -> None:
    if callable(getattr(A, "mv", None)) or callable(A):
        return
    n = np.shape(A)[0] if np.ndim(A) == 2 else None
    if not isinstance(b, jax.Array | np.ndarray) or np.shape(b) != (n,):
        msg = (
            f"{name} is a dense matrix of shape {tuple(np.shape(A))}, so b must be a 1-D array "
            f"of length {n}; got {type(b).__name__} of shape {np.shape(b) if hasattr(b, 'shape') else '?'}"
        )
        raise ValueError(msg)


def cg(
    A: Any,
    b: PyTree,
    *,
    x0: PyTree | None = None,
    rtol: float = 1e-5,
    atol: float = 0.0,
    maxiter: int | None = None,
    M: Any = None,
) -> CGResult:
    """Solve ``A x = b`` by (preconditioned) conjugate gradients, never forming A.

    ``x_{k+1} = x_k + α_k p_k``, ``α_k = r_kᵀz_k / p_kᵀAp_k``, ``z = M r``; stops when
    ``‖b − A x‖₂ <= max(rtol·‖b‖₂, atol)``, after `maxiter` steps, or at the first direction
    with ``pᵀAp <= 0`` (then ``negative_curvature`` is set and `x` is the last iterate before
    that direction, which for a Hessian A and ``b = −∇f`` is still a descent direction when
    ``iterations > 0``). A non-finite product stops the iteration as well, keeping the last
    finite iterate (``converged`` is then False). Runs as one ``lax.while_loop``: ``jit``-
    and ``vmap``-able (vmap over `b`, `x0` or data captured by a callable A).

    Cost: one product with A per iteration (plus one if `x0` is given), one with M.

    Args:
        A: a symmetric linear operator: a :class:`~hessfree.CurvatureOperator` (anything with
            ``mv``), a callable ``v -> A v`` on pytrees like `b`, or a dense ``(n, n)`` array
            (then `b` is a 1-D array of length n).
        b: the right-hand side, any pytree of floating arrays.
        x0: starting guess like `b`; zeros by default.
        rtol: relative tolerance on the residual norm.
        atol: absolute tolerance on the residual norm.
        maxiter: at most this many iterations; default ``10·n`` with n the number of
            unknowns (as scipy.sparse.linalg.cg), which covers CG's n-step finite termination
            with room for rounding.
        M: optional symmetric positive definite preconditioner approximating ``A⁻¹``, given
            like A (operator, callable or dense matrix).

    Returns:
        A :class:`CGResult` ``(x, iterations, residual_norm, converged, negative_curvature)``.

    Raises:
        ValueError: bad tolerances or maxiter; `x0` unlike `b`; dense A of the wrong shape.
        TypeError: `b` has non-floating leaves; A or M of an unusable type.

    Example:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> cg(A, jnp.array([1.0, 2.0])).x  # numpy.linalg.solve gives [0.0909, 0.6364]
        Array([0.09090909, 0.6363636 ], dtype=float32)

    References:
        Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems",
        J. Res. NBS 1952. Nocedal & Wright, Numerical Optimization, 2nd ed. 2006, ch. 5.
    """
    check_floating(b, "b")
    matvec = as_matvec(A, "A")
    _check_dense_rhs(A, b, "A")
    precond = _identity if M is None else as_matvec(M, "M")
    if x0 is not None:
        check_like(b, x0, "b", "x0")
        check_floating(x0, "x0")
        x0 = cast_like(x0, b)
    _check_tolerance(rtol, "rtol")
    _check_tolerance(atol, "atol")
    check_positive_int(maxiter, "maxiter", allow_none=True)
    n_iter = 10 * tree_size(b) if maxiter is None else int(maxiter)
    dtype = scalar_dtype(b)
    tol = jnp.maximum(jnp.asarray(rtol, dtype) * tree_norm(b), jnp.asarray(atol, dtype))
    state = pcg(matvec, b, x0, precond, tol, n_iter)
    return CGResult(
        x=state.x,
        iterations=state.k,
        residual_norm=state.rnorm,
        converged=state.rnorm <= tol,
        negative_curvature=state.negative,
    )


# --- Steihaug-Toint truncated CG ---------------------------------------------------------


class SteihaugResult(NamedTuple):
    """The trust-region step `s`, its model value ``m(s) = gᵀs + ½sᵀHs`` and how it ended."""

    s: PyTree
    model: jax.Array
    step_norm: jax.Array
    hits_boundary: jax.Array
    negative_curvature: jax.Array
    matvecs: jax.Array


class _SteihaugState(NamedTuple):
    s: PyTree
    r: PyTree
    y: PyTree
    p: PyTree
    ry: jax.Array
    rnorm: jax.Array
    sWs: jax.Array
    sWp: jax.Array
    pWp: jax.Array
    model: jax.Array
    k: jax.Array
    done: jax.Array
    hits: jax.Array
    negative: jax.Array


def boundary_tau(sWs: jax.Array, sWp: jax.Array, pWp: jax.Array, radius: jax.Array) -> jax.Array:
    """The root ``τ >= 0`` of ``‖s + τp‖_W = Δ`` (with ``‖s‖_W <= Δ``), without cancellation."""
    c = jnp.minimum(sWs - radius**2, 0)
    root = jnp.sqrt(sWp**2 - pWp * c)
    safe_pWp = jnp.where(pWp > 0, pWp, 1)
    denom = sWp + root
    return jnp.where(sWp >= 0, -c / jnp.where(denom > 0, denom, 1), (root - sWp) / safe_pWp)


def steihaug(
    matvec: MatVec,
    g: PyTree,
    radius: jax.Array,
    precond: MatVec,
    tol: jax.Array,
    maxiter: int,
) -> SteihaugResult:
    """Approximately minimize ``m(s) = gᵀs + ½ sᵀHs`` subject to ``‖s‖_W <= Δ``.

    Steihaug-Toint truncated CG (N&W Alg. 7.2, preconditioned as in Steihaug 1983): CG on
    ``H s = −g`` from ``s = 0`` stops at ``‖g + Hs‖ <= tol``, steps to the boundary
    ``‖s‖_W = Δ`` when the next iterate would leave the region or when a direction has
    ``pᵀHp <= 0`` (or a non-finite product, treated as zero curvature). ``W = M⁻¹`` for the
    preconditioner M; the W-norms ``sᵀWs, sᵀWp, pᵀWp`` follow from CG's recurrences, so W is
    never applied. The model value is tracked the same way, so no extra product is needed.

    Cost: one product with H and one with M per iteration; at most `maxiter` iterations.

    References:
        Steihaug, "The conjugate gradient method and trust regions in large scale
        optimization", SIAM J. Numer. Anal. 1983. Toint 1981. Nocedal & Wright 2006, §7.1.
    """
    dtype = scalar_dtype(g)
    y = cast_like(precond(g), g)
    ry = tree_vdot(g, y)
    rnorm = tree_norm(g)
    zero = jnp.zeros((), dtype)
    state = _SteihaugState(
        s=tree_zeros_like(g),
        r=g,
        y=y,
        p=tree_neg(y),
        ry=ry,
        rnorm=rnorm,
        sWs=zero,
        sWp=zero,
        pWp=ry,
        model=zero,
        k=jnp.zeros((), jnp.int32),
        done=rnorm <= tol,
        hits=jnp.zeros((), bool),
        negative=jnp.zeros((), bool),
    )

    def cond(st: _SteihaugState) -> jax.Array:
        return ~st.done & (st.k < maxiter)

    def body(st: _SteihaugState) -> _SteihaugState:
        Hp = cast_like(matvec(st.p), g)
        kappa_raw = tree_vdot(st.p, Hp)
        kappa = jnp.where(jnp.isfinite(kappa_raw), kappa_raw, 0)
        negative = kappa <= 0
        alpha = st.ry / jnp.where(negative, 1, kappa)
        sWs_interior = st.sWs + 2 * alpha * st.sWp + alpha**2 * st.pWp
        to_boundary = negative | (sWs_interior >= radius**2)
        step = jnp.where(to_boundary, boundary_tau(st.sWs, st.sWp, st.pWp, radius), alpha)
        s = tree_axpy(step, st.p, st.s)
        model = st.model - step * st.ry + 0.5 * step**2 * kappa
        r = tree_axpy(step, Hp, st.r)
        y = cast_like(precond(r), g)
        ry = tree_vdot(r, y)
        beta = ry / jnp.where(st.ry != 0, st.ry, 1)
        rnorm = tree_norm(r)
        return _SteihaugState(
            s=s,
            r=r,
            y=y,
            p=tree_axpy(beta, st.p, tree_neg(y)),
            ry=ry,
            rnorm=rnorm,
            sWs=jnp.where(to_boundary, radius**2, sWs_interior),
            sWp=beta * (st.sWp + alpha * st.pWp),
            pWp=ry + beta**2 * st.pWp,
            model=model,
            k=st.k + 1,
            done=to_boundary | (rnorm <= tol),
            hits=to_boundary,
            negative=negative,
        )

    out = lax.while_loop(cond, body, state)
    return SteihaugResult(
        s=out.s,
        model=out.model,
        step_norm=jnp.sqrt(out.sWs),
        hits_boundary=out.hits,
        negative_curvature=out.negative,
        matvecs=out.k,
    )

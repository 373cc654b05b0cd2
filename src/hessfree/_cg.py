"""Conjugate gradients on pytrees: one ``lax.while_loop``, compiled once, ``vmap``-able."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _tree as tree
from ._linop import MatVec, is_dense, tree_operator
from ._results import MAXITER, NEGATIVE_CURVATURE, NONFINITE, SUCCESS, CGResult
from ._staging import staged
from ._validation import (
    PyTree,
    check_floating,
    check_like,
    check_number,
    check_positive_int,
    check_solver_dtype,
    describe_tree,
)


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
    or residual stops the iteration too (`broken`), keeping the last finite iterate. Cost:
    one product per step (plus one for ``x0``), one preconditioner application per step.
    """
    dtype = tree.scalar_dtype(b)
    if x0 is None:
        x, r, matvecs = tree.zeros_like(b), b, jnp.zeros((), jnp.int32)
    else:
        x = x0
        r = tree.axpy(jnp.asarray(-1.0, dtype), tree.cast_like(matvec(x0), b), b)
        matvecs = jnp.ones((), jnp.int32)
    z = tree.cast_like(precond(r), b)
    rz = tree.vdot(r, z)
    rnorm = tree.norm(r)
    zero = jnp.zeros((), dtype)
    state = PCGState(
        x=x,
        r=r,
        z=z,
        p=z,
        rz=rz,
        rnorm=rnorm,
        pAp=zero,
        pp=zero,
        max_rayleigh=zero,
        k=jnp.zeros((), jnp.int32),
        matvecs=matvecs,
        negative=jnp.zeros((), bool),
        broken=~(jnp.isfinite(rnorm) & jnp.isfinite(rz)),
    )

    def cond(s: PCGState) -> jax.Array:
        return ~s.negative & ~s.broken & (s.rnorm > tol) & (s.k < maxiter)

    def body(s: PCGState) -> PCGState:
        Ap = tree.cast_like(matvec(s.p), b)
        pAp = tree.vdot(s.p, Ap)
        pp = tree.vdot(s.p, s.p)
        negative = jnp.isfinite(pAp) & (pAp <= 0)
        alpha = s.rz / jnp.where(pAp > 0, pAp, 1)
        x = tree.axpy(alpha, s.p, s.x)
        r = tree.axpy(-alpha, Ap, s.r)
        z = tree.cast_like(precond(r), b)
        rz = tree.vdot(r, z)
        rnorm = tree.norm(r)
        broken = ~negative & ~(jnp.isfinite(pAp) & jnp.isfinite(rnorm) & jnp.isfinite(rz))
        ok = ~broken & ~negative
        beta = rz / jnp.where(s.rz != 0, s.rz, 1)
        p = tree.axpy(beta, s.p, z)
        rayleigh = jnp.where(ok & (pp > 0), pAp / jnp.where(pp > 0, pp, 1), 0)
        return PCGState(
            x=tree.where(ok, x, s.x),
            r=tree.where(ok, r, s.r),
            z=tree.where(ok, z, s.z),
            p=tree.where(ok, p, s.p),
            rz=jnp.where(ok, rz, s.rz),
            rnorm=jnp.where(ok, rnorm, s.rnorm),
            pAp=pAp,
            pp=pp,
            max_rayleigh=jnp.maximum(s.max_rayleigh, rayleigh),
            k=s.k + ok.astype(jnp.int32),
            matvecs=s.matvecs + 1,
            negative=negative,
            broken=broken,
        )

    return lax.while_loop(cond, body, state)


def _identity(v: PyTree) -> PyTree:
    return v


def _checked_precond(M: Any, b: PyTree) -> Callable[[PyTree], PyTree]:
    if M is None:
        return _identity
    return tree_operator(M, b, "M", like_name="b").matvec


def _cg_impl(
    A: Any, b: PyTree, x0: PyTree | None, M: Any, rtol: Any, atol: Any, *, maxiter: int, dense: bool
) -> CGResult:
    op = tree_operator(A, None if dense else b, like_name="b")
    if dense and np.shape(b) != (op.size,):
        msg = (
            f"A is a dense matrix of shape {(op.size, op.size)}, so b must be a 1-D array of length "
            f"{op.size}; got {describe_tree(b)}"
        )
        raise ValueError(msg)
    precond = _checked_precond(M, b)
    dtype = tree.scalar_dtype(b)
    rtol, atol = jnp.asarray(rtol, dtype), jnp.asarray(atol, dtype)
    tol = jnp.maximum(rtol * tree.norm(b), atol)
    st = pcg(op.matvec, b, x0, precond, tol, maxiter)
    finite_input = tree.all_finite(b) & jnp.isfinite(tol)
    status = jnp.where(
        ~finite_input | st.broken,
        NONFINITE,
        jnp.where(st.negative, NEGATIVE_CURVATURE, jnp.where(st.rnorm <= tol, SUCCESS, MAXITER)),
    ).astype(jnp.int32)
    return CGResult(st.x, status, status == SUCCESS, st.matvecs, st.rnorm, st.negative)


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
    ``‖b − A x‖₂ <= max(rtol·‖b‖₂, atol)`` (status 0), after `maxiter` steps (status 1), at
    the first direction with ``pᵀAp <= 0`` (status 5; `x` is the last iterate before that
    direction, which for a Hessian A and ``b = −∇f`` is still a descent direction when at
    least one step was taken), or on a non-finite `b`, product or residual (status 3, the
    last finite iterate kept). Runs as one ``lax.while_loop``, compiled once per operator
    configuration and shapes: ``jit``- and ``vmap``-able.

    Cost: one product with A per iteration (plus one if `x0` is given), one with M.

    Args:
        A: a symmetric linear operator: a :class:`~hessfree.CurvatureOperator`, a callable
            ``v -> A v`` on pytrees like `b`, or a dense ``(n, n)`` array (then `b` is a 1-D
            array of length n).
        b: the right-hand side, any pytree of float32 or float64 arrays.
        x0: starting guess like `b`; zeros by default.
        rtol: relative tolerance on the residual norm (finite, >= 0).
        atol: absolute tolerance on the residual norm (finite, >= 0).
        maxiter: at most this many iterations; default ``10·n`` with n the number of
            unknowns (as scipy.sparse.linalg.cg).
        M: optional symmetric positive definite preconditioner approximating ``A⁻¹``, given
            like A (operator, callable or dense matrix); it must return a pytree like `b`.

    Returns:
        A :class:`~hessfree.CGResult` ``(x, status, success, num_matvecs, residual_norm,
        negative_curvature)``; ``message`` gives the text of ``status``.

    Raises:
        ValueError: bad tolerances or maxiter; `x0` unlike `b`; dense A of the wrong shape;
            M returning another structure.
        TypeError: `b` not float32/float64; A or M of an unusable type.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> A = jnp.array([[4.0, 1.0], [1.0, 3.0]])
        >>> res = hf.cg(A, jnp.array([1.0, 2.0]))
        >>> [round(float(v), 4) for v in res.x], res.message  # numpy.linalg.solve: 1/11, 7/11
        ([0.0909, 0.6364], 'Success: the requested tolerance was met (minimize: gradient norm <= gtol and no negative curvature found at the solution).')

    References:
        Hestenes & Stiefel, "Methods of conjugate gradients for solving linear systems",
        J. Res. NBS 1952. Nocedal & Wright, Numerical Optimization, 2nd ed. 2006, ch. 5.
    """
    check_solver_dtype(b, "b")
    dense = is_dense(A)
    tree_operator(A, None if dense else b, like_name="b")
    if M is not None:
        tree_operator(M, b, "M", like_name="b")
    if x0 is not None:
        check_like(b, x0, "b", "x0")
        check_floating(x0, "x0")
        x0 = tree.cast_like(x0, b)
    check_number(rtol, "rtol", traced_ok=True)
    check_number(atol, "atol", traced_ok=True)
    check_positive_int(maxiter, "maxiter", allow_none=True)
    n_iter = 10 * tree.size(b) if maxiter is None else int(maxiter)
    n_iter = min(n_iter, int(np.iinfo(np.int32).max))
    return staged(_cg_impl, A, b, x0, M, rtol, atol, maxiter=n_iter, dense=dense)

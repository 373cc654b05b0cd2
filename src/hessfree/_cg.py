"""Conjugate gradients on pytrees: one ``lax.while_loop``, compiled once, ``vmap``-able, scale-safe
and differentiable (implicitly, through ``jax.lax.custom_linear_solve``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _tree as tree
from ._linop import MatVec, is_dense, tree_operator
from ._results import (
    MAXITER,
    NEGATIVE_CURVATURE,
    NONFINITE,
    PRECONDITIONER_BREAKDOWN,
    SUCCESS,
    CGResult,
)
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
    """Loop state of :func:`pcg`; `p` and `pAp` describe the direction last tested.

    In the loop the vectors are in units of the scale s of the starting residual (see
    :func:`pcg`); the state :func:`pcg` returns is back in the units of `b`.
    """

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
    precond_broken: jax.Array
    verified: jax.Array
    converged: jax.Array


def pcg(
    matvec: MatVec,
    b: PyTree,
    x0: PyTree | None,
    precond: MatVec,
    tol: jax.Array,
    maxiter: int | jax.Array,
    *,
    rtol: jax.Array | None = None,
    verify: bool = False,
) -> PCGState:
    """Preconditioned CG (Hestenes & Stiefel 1952) until ``‖r‖ <= max(tol, rtol·‖b‖)``.

    Unchecked engine under :func:`cg`, Newton-CG and the saddle probe. It also stops at
    maxiter, at ``pᵀAp <= 0`` (`negative`), at ``rᵀMr <= 0`` for ``‖r‖ > tol``
    (`precond_broken`: M is not positive definite), and on a non-finite ``pᵀAp``, residual,
    ``rᵀMr`` or iterate (`broken`), keeping the last finite iterate.

    Overflow-safe scaling: CG is run on ``A x̂ = r₀ / s`` with ``s = max|r₀|`` (so the
    residual starts with entries of at most 1 and its inner products cannot overflow or
    underflow whatever the scale of `b`) and ``x = x0 + s·x̂``; the tolerance is compared in
    the same units. With ``verify=True`` a residual that meets the tolerance is recomputed
    as ``r₀/s − A x̂`` (one product) before the iteration stops; if the recomputed one does
    not meet it, CG restarts from it (residual replacement). `converged` is then the
    honest test. Cost: one product with A and one with M per step (plus one for `x0`, and
    one per check with ``verify``).
    """
    if x0 is None:
        r0, matvecs0 = b, 0
    else:
        r0 = tree.axpy(jnp.asarray(-1.0, tree.scalar_dtype(b)), tree.cast_like(matvec(x0), b), b)
        matvecs0 = 1
    return _pcg_from(matvec, b, x0, r0, precond, tol, rtol, maxiter, verify, matvecs0)


def _pcg_from(
    matvec: MatVec,
    b: PyTree,
    x0: PyTree | None,
    r0: PyTree,
    precond: MatVec,
    tol: jax.Array,
    rtol: jax.Array | None,
    maxiter: int | jax.Array,
    verify: bool,
    matvecs0: int,
) -> PCGState:
    """:func:`pcg` from `x0` (None: zero) whose residual ``b − A x0`` is `r0`."""
    dtype = tree.scalar_dtype(b)
    scale, inv = tree.pow2_scale(tree.max_abs(r0))
    tol_hat = jnp.asarray(tol, dtype) * inv
    if rtol is not None:
        rtol = jnp.asarray(rtol, dtype)
        rel = jnp.where(rtol > 0, rtol * tree.norm(tree.rescale(b, inv)), 0)
        tol_hat = jnp.maximum(tol_hat, rel)
    st = _pcg_loop(matvec, tree.rescale(r0, inv), precond, tol_hat, maxiter, verify, matvecs0)
    # back to the units of b; an iterate that overflows there is not returned
    start = tree.zeros_like(b) if x0 is None else x0
    x = tree.axpy(scale, st.x, start)
    finite_x = tree.all_finite(x)
    safe_start = tree.where(tree.all_finite(start), start, tree.zeros_like(b))
    s2 = scale * scale
    return st._replace(
        x=tree.where(finite_x, x, safe_start),
        r=tree.scale(scale, st.r),
        z=tree.scale(scale, st.z),
        p=tree.scale(scale, st.p),
        rz=st.rz * s2,
        rnorm=st.rnorm * scale,
        pAp=st.pAp * s2,
        pp=st.pp * s2,
        broken=st.broken | ~finite_x,
        converged=st.converged & finite_x,
    )


def _pcg_loop(
    matvec: MatVec,
    rhs: PyTree,
    precond: MatVec,
    tol: jax.Array,
    maxiter: int | jax.Array,
    verify: bool,
    matvecs0: int,
) -> PCGState:
    """The CG loop on ``A x = rhs`` from ``x = 0`` (rhs already scaled)."""
    dtype = tree.scalar_dtype(rhs)
    r = rhs
    z = tree.cast_like(precond(r), rhs)
    rz = tree.vdot(r, z)
    rnorm = tree.norm(r)
    zero = jnp.zeros((), dtype)
    false = jnp.zeros((), bool)
    broken = ~(jnp.isfinite(rnorm) & jnp.isfinite(rz))
    state = PCGState(
        x=tree.zeros_like(rhs),
        r=r,
        z=z,
        p=z,
        rz=rz,
        rnorm=rnorm,
        pAp=zero,
        pp=zero,
        max_rayleigh=zero,
        k=jnp.zeros((), jnp.int32),
        matvecs=jnp.asarray(matvecs0, jnp.int32),
        negative=false,
        broken=broken,
        precond_broken=~broken & (rz <= 0) & (rnorm > tol),
        verified=~false,  # r is the residual b − A x itself, not a recursive update
        converged=~broken & (rnorm <= tol),
    )

    def cond(s: PCGState) -> jax.Array:
        conv = s.rnorm <= tol
        done = s.negative | s.broken | s.precond_broken | (conv & s.verified)
        return ~done & ((s.k < maxiter) | conv)

    def body(s: PCGState) -> PCGState:
        # with verify, a recursive residual that meets tol is checked first: this step
        # multiplies x instead of p and restarts from the recomputed residual
        check = (s.rnorm <= tol) & ~s.verified if verify else false
        v = tree.where(check, s.x, s.p) if verify else s.p
        Av = tree.cast_like(matvec(v), rhs)
        pAp = tree.vdot(s.p, Av)
        pp = tree.vdot(s.p, s.p)
        step = ~check
        negative = step & jnp.isfinite(pAp) & (pAp <= 0)
        alpha = s.rz / jnp.where(pAp > 0, pAp, 1)
        x = tree.axpy(alpha, s.p, s.x)
        r = tree.axpy(-alpha, Av, s.r)
        if verify:
            r = tree.where(check, tree.sub(rhs, Av), r)
        z = tree.cast_like(precond(r), rhs)
        rz = tree.vdot(r, z)
        rnorm = tree.norm(r)
        step_finite = jnp.isfinite(pAp) & tree.all_finite(x)
        finite = jnp.isfinite(rnorm) & jnp.isfinite(rz) & (check | step_finite)
        broken = ~negative & ~finite
        ok = ~broken & ~negative
        accept = ok & step
        beta = jnp.where(check, 0, rz / jnp.where(s.rz != 0, s.rz, 1))
        p = tree.axpy(beta, s.p, z)
        rayleigh = jnp.where(accept & (pp > 0), pAp / jnp.where(pp > 0, pp, 1), 0)
        verified = jnp.where(ok, check, s.verified) if verify else s.verified
        rnorm = jnp.where(ok, rnorm, s.rnorm)
        return PCGState(
            x=tree.where(accept, x, s.x),
            r=tree.where(ok, r, s.r),
            z=tree.where(ok, z, s.z),
            p=tree.where(ok, p, s.p),
            rz=jnp.where(ok, rz, s.rz),
            rnorm=rnorm,
            pAp=jnp.where(step, pAp, s.pAp),
            pp=jnp.where(step, pp, s.pp),
            max_rayleigh=jnp.maximum(s.max_rayleigh, rayleigh),
            k=s.k + accept.astype(jnp.int32),
            matvecs=s.matvecs + 1,
            negative=negative,
            broken=broken,
            precond_broken=ok & (rz <= 0) & (rnorm > tol),
            verified=verified,
            converged=ok & verified & (rnorm <= tol),
        )

    return lax.while_loop(cond, body, state)


def _checked_precond(M: Any, b: PyTree) -> Callable[[PyTree], PyTree]:
    if M is None:
        return tree.identity
    return tree_operator(M, b, "M", like_name="b").matvec


def _start_multiple(start: PyTree, a_start: PyTree, rhs: PyTree) -> jax.Array:
    """``c = startᵀrhs / startᵀA start``: the multiple of `start` closest to ``A⁻¹rhs`` in the
    A-norm (1 where ``startᵀA start <= 0`` or c is not finite). Computed on rescaled vectors,
    so no inner product overflows."""
    _, ix = tree.pow2_scale(tree.max_abs(start))
    _, iy = tree.pow2_scale(tree.max_abs(a_start))
    sb, ib = tree.pow2_scale(tree.max_abs(rhs))
    xn = tree.rescale(start, ix)
    num = tree.vdot(xn, tree.rescale(rhs, ib))
    den = tree.vdot(xn, tree.rescale(a_start, iy))
    c = num / jnp.where(den > 0, den, 1) * (sb * iy)
    return jnp.where((den > 0) & jnp.isfinite(c), c, jnp.ones_like(c))


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
    start = None if x0 is None else lax.stop_gradient(x0)

    def solve(matvec: MatVec, rhs: PyTree) -> tuple[PyTree, tuple[jax.Array, ...]]:
        # The same solve serves the primal (rhs = b) and, through custom_linear_solve, the
        # tangent and adjoint systems, so it starts from the best multiple of x0 for *its*
        # right-hand side and measures its tolerance against *its* ‖rhs‖.
        if start is None:
            x_init, r0, matvecs0 = None, rhs, 0
        else:
            a_start = tree.cast_like(matvec(start), rhs)
            c = _start_multiple(start, a_start, rhs)
            x_init, r0, matvecs0 = tree.scale(c, start), tree.axpy(-c, a_start, rhs), 1
        st = _pcg_from(
            matvec, rhs, x_init, r0, precond, atol, rtol, maxiter, verify=True, matvecs0=matvecs0
        )
        finite_input = jnp.isfinite(rtol) & jnp.isfinite(atol)
        status = jnp.where(
            ~finite_input | st.broken,
            NONFINITE,
            jnp.where(
                st.negative,
                NEGATIVE_CURVATURE,
                jnp.where(
                    st.converged,
                    SUCCESS,
                    jnp.where(st.precond_broken, PRECONDITIONER_BREAKDOWN, MAXITER),
                ),
            ),
        ).astype(jnp.int32)
        return st.x, (status, st.matvecs, st.rnorm, st.negative)

    # Implicit differentiation: dx = A⁻¹(db − dA·x), the adjoint one more CG solve with A.
    x, aux = lax.custom_linear_solve(op.matvec, b, solve, symmetric=True, has_aux=True)
    status, matvecs, rnorm, negative = lax.stop_gradient(aux)
    return CGResult(x, status, status == SUCCESS, matvecs, rnorm, negative)


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
    ``‖b − A x‖₂ <= max(rtol·‖b‖₂, atol)`` (status 0; checked on the residual recomputed from
    `x`, one extra product, and CG restarts from it if the recursive residual had drifted),
    after `maxiter` steps (status 1), at the first direction with ``pᵀAp <= 0`` (status 5;
    `x` is the last iterate before that direction, which for a Hessian A and ``b = −∇f`` is
    still a descent direction when at least one step was taken), at ``rᵀMr <= 0`` (status 6:
    M is not positive definite), or on a non-finite `b`, product, residual or iterate
    (status 3). `x` is never non-finite: on trouble it is the last finite iterate. Scale-safe:
    CG runs on ``r₀ / s`` with s a power of two near ``max|r₀|`` and every norm is scaled as
    BLAS nrm2, so a `b` or an A of any magnitude the dtype holds (``1e20`` in float32) is
    solved, not overflowed to a false success. On a singular positive semidefinite A, success
    is reported only if the tolerance is met (b in the range of A).

    Differentiable (``grad``, ``jacrev``, ``jvp``) with respect to `b` and to the arrays inside
    A (a dense matrix, a :class:`~hessfree.CurvatureOperator`'s leaves, a
    :class:`jax.tree_util.Partial`'s arrays) by implicit differentiation through
    ``jax.lax.custom_linear_solve``: ``dx = A⁻¹(db − dA·x)``, each derivative one more CG
    solve with A (tolerance ``max(rtol·‖rhs‖, atol)`` for its own right-hand side). `x0` and
    M get no derivative; ``status`` and the other fields are not differentiated. Runs as one
    ``lax.while_loop``, compiled once per operator configuration and shapes: ``jit``- and
    ``vmap``-able.

    Cost: one product with A and one with M per iteration, plus one product for `x0` and one
    per check of the recomputed residual (usually one); a derivative costs one such solve.

    Args:
        A: a symmetric linear operator: a :class:`~hessfree.CurvatureOperator`, a callable
            ``v -> A v`` on pytrees like `b`, or a dense ``(n, n)`` array (then `b` is a 1-D
            array of length n).
        b: the right-hand side, any pytree of float32 or float64 arrays.
        x0: starting guess like `b`; zeros by default. CG starts from its best multiple
            ``c·x0``, ``c = x0ᵀb / x0ᵀAx0`` (the A-norm-closest to the solution; ``c = 1``
            where ``x0ᵀAx0 <= 0``), so the same start serves the derivative's solves.
        rtol: relative tolerance on the residual norm (finite, >= 0).
        atol: absolute tolerance on the residual norm (finite, >= 0).
        maxiter: at most this many iterations; default ``10·n`` with n the number of
            unknowns (as scipy.sparse.linalg.cg).
        M: optional symmetric positive definite preconditioner approximating ``A⁻¹``, given
            like A (operator, callable or dense matrix); it must return a pytree like `b`.

    Returns:
        A :class:`~hessfree.CGResult` ``(x, status, success, num_matvecs, residual_norm,
        negative_curvature)``; ``message`` gives the text of ``status`` (0 success,
        1 maxiter, 3 non-finite, 5 negative curvature of A, 6 preconditioner breakdown).

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
        Blue, "A portable Fortran program to find the Euclidean norm of a vector", ACM TOMS
        1978 (scaled norms). Van der Vorst & Ye, "Residual replacement strategies for Krylov
        subspace iterative methods", SIAM J. Sci. Comput. 2000.
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

"""The result types of every algorithm, and the one status table they share.

Results are NamedTuples (pytrees), so they leave ``jit`` and ``vmap`` with every field an
array. Iterative algorithms carry ``status`` (int32, 0 = success), ``success`` and
``num_matvecs``; their ``message`` property looks the text up once ``status`` is concrete.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import numpy as np

PyTree = Any

RUNNING, SUCCESS, MAXITER, PRECISION_LOSS, NONFINITE, SADDLE, NEGATIVE_CURVATURE = range(-1, 6)
PRECONDITIONER_BREAKDOWN = 6
CURVATURE_UNRESOLVED = 7

STATUS_MESSAGES = {
    RUNNING: "Running: call step or advance again to continue.",
    SUCCESS: "Success: the requested tolerance was met (minimize: gradient norm <= gtol and no "
    "negative curvature found at the solution).",
    MAXITER: "Maximum number of iterations reached before the tolerance was met; the last "
    "iterate is returned.",
    PRECISION_LOSS: "Desired error not necessarily achieved due to precision loss: the line "
    "search failed or the trust region collapsed without decreasing f.",
    NONFINITE: "Non-finite values (NaN or inf) met in the products or the function; the last "
    "finite iterate is returned.",
    SADDLE: "Stopped at a saddle point: gradient norm <= gtol but the Hessian has negative "
    "curvature here and no step along it decreased f.",
    NEGATIVE_CURVATURE: "Stopped at a direction of non-positive curvature (pᵀAp <= 0): A is not "
    "positive definite; the last iterate before that direction is returned.",
    PRECONDITIONER_BREAKDOWN: "Preconditioner breakdown: rᵀMr <= 0 for a nonzero residual r, so "
    "M is not positive definite; the last iterate is returned.",
    CURVATURE_UNRESOLVED: "Curvature too small to tell: gradient norm <= gtol but the smallest "
    "curvature found is within rounding of zero (relative to the largest), so whether this is "
    "a minimum cannot be decided in this precision; x is returned, not called a success.",
}


def message_of(status: Any) -> str | list[str]:
    """The text of a status code (a list of texts for a batch of codes)."""
    try:
        codes = np.asarray(status)
    except jax.errors.TracerArrayConversionError:
        return "status is traced (inside jit/vmap); read result.status outside"

    def text(code: int) -> str:
        return STATUS_MESSAGES.get(code, f"Unknown status code {code}.")

    if codes.ndim == 0:
        return text(int(codes))
    return [text(int(c)) for c in codes.ravel()]


class CGResult(NamedTuple):
    """What :func:`hessfree.cg` returns.

    Attributes:
        x: the solution estimate, like `b`; the last finite iterate on trouble.
        status: 0 success, 1 maxiter, 3 non-finite (input, product, residual or `x`),
            5 negative curvature of A, 6 preconditioner breakdown (M not positive definite).
        success: ``status == 0``: ``‖b − A x‖ <= max(rtol·‖b‖, atol)``, checked on the
            residual recomputed from `x` (not only the recursively updated one).
        num_matvecs: products with A (one per iteration, one for `x0`, one per check of
            the recomputed residual).
        residual_norm: ``‖b − A x‖₂`` of the returned `x` (recomputed from `x` on success,
            else the recursively updated residual).
        negative_curvature: a direction with ``pᵀAp <= 0`` stopped the iteration.
    """

    x: PyTree
    status: jax.Array
    success: jax.Array
    num_matvecs: jax.Array
    residual_norm: jax.Array
    negative_curvature: jax.Array

    message = property(lambda self: message_of(self.status), doc="The text of `status`.")


class OptimizeResult(NamedTuple):
    """The result of :func:`hessfree.minimize`, with scipy.optimize.OptimizeResult's fields.

    Attributes:
        x: the solution, a pytree like ``x0``; never non-finite (the last finite iterate).
        fun: ``f(x)``.
        jac: ``∇f(x)``, a pytree like ``x0``.
        nit: outer iterations (trial steps, as scipy counts them: rejected ones included).
        nfev: evaluations of f (the start, each trust-ncg trial, each line-search trial).
        njev: gradient passes: one per iteration, the linearization of ∇f (plus the start).
        nhev: Hessian-vector products (tangent passes through the linearized gradient).
        status: int32 code from ``STATUS_MESSAGES`` (0, 1, 2, 3, 4 or 7).
        success: ``status == 0``.
    """

    x: PyTree
    fun: jax.Array
    jac: PyTree
    nit: jax.Array
    nfev: jax.Array
    njev: jax.Array
    nhev: jax.Array
    status: jax.Array
    success: jax.Array

    message = property(lambda self: message_of(self.status), doc="The text of `status`.")

    @property
    def num_matvecs(self) -> jax.Array:
        """Hessian-vector products spent (``nhev``)."""
        return self.nhev


class EigshResult(NamedTuple):
    """What :func:`hessfree.eigsh` returns.

    Attributes:
        eigenvalues: ``(k,)`` in ascending order, as scipy returns them.
        eigenvectors: a pytree like A's input whose leaves have a leading axis k;
            ``eigenvectors[i]`` is the unit eigenvector of ``eigenvalues[i]``.
        residuals: ``(k,)`` Ritz residual norms ``‖A y − θ y‖`` (β·|last Ritz component|).
        status: 0 success (every residual met tol), 1 maxiter (restarts used up), 3 non-finite.
        success: ``status == 0``.
        num_matvecs: products with A.
    """

    eigenvalues: jax.Array
    eigenvectors: PyTree
    residuals: jax.Array
    status: jax.Array
    success: jax.Array
    num_matvecs: jax.Array

    message = property(lambda self: message_of(self.status), doc="The text of `status`.")


class LanczosResult(NamedTuple):
    """What :func:`hessfree.lanczos` returns.

    Attributes:
        alphas: ``(m,)`` diagonal of the tridiagonal ``T``.
        betas: ``(m,)``; ``betas[:-1]`` is the off-diagonal of ``T`` and ``betas[-1]`` the norm
            of the final residual. A zero entry marks a breakdown (an invariant subspace was
            found; the next vector is a fresh random direction).
        basis: a pytree like the start vector whose every leaf has a leading axis ``m``.
        num_matvecs: products with A (``m``).
    """

    alphas: jax.Array
    betas: jax.Array
    basis: PyTree
    num_matvecs: jax.Array


class DensityResult(NamedTuple):
    """What :func:`hessfree.spectral_density` returns: ``density`` on ``grid``, and the cost."""

    grid: jax.Array
    density: jax.Array
    num_matvecs: jax.Array


class TraceEstimate(NamedTuple):
    """A trace estimate: ``value``, its standard error and the products spent.

    ``stderr`` comes from the spread of the Hutchinson samples (``std / sqrt(count)``; for
    Hutch++ conditional on the sketched subspace, whose trace is exact); ``inf`` when a
    single sample leaves the spread unknown.
    """

    value: jax.Array
    stderr: jax.Array
    num_matvecs: jax.Array


class DiagonalEstimate(NamedTuple):
    """A diagonal estimate: ``value`` and ``stderr`` are pytrees like A's input."""

    value: PyTree
    stderr: PyTree
    num_matvecs: jax.Array

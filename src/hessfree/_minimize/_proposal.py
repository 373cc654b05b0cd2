"""What a step proposes, and the state a run carries between steps (pytrees of arrays)."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _tree as tree

PyTree = Any


class Proposal(NamedTuple):
    """The move from x to try next: a trust-region step or a line-search direction `d`.

    ``gd = gᵀd``; ``dHd = dᵀHd`` (trust-ncg: exact; newton-cg: the negative curvature of
    the direction, else 0, as the line search's second-order term uses it); ``model =
    gd + ½dHd``; ``step_norm = ‖d‖`` in the trust-region norm. ``stationary``: proposed at
    a point with ``‖∇f‖ <= gtol`` (an escape from a saddle); ``nonfinite``: shrunk after a
    non-finite gradient; ``empty``: nothing to try (a state fresh from ``init``: the next step
    computes the first proposal at x instead of trying one).
    """

    d: PyTree
    gd: jax.Array
    dHd: jax.Array
    model: jax.Array
    step_norm: jax.Array
    hits_boundary: jax.Array
    negative: jax.Array
    stationary: jax.Array
    nonfinite: jax.Array
    empty: jax.Array

    def scaled(self, c: jax.Array) -> Proposal:
        """The same move times c (model, curvature and norm scaled to match)."""
        return self._replace(
            d=tree.scale(c, self.d),
            gd=c * self.gd,
            dHd=c**2 * self.dHd,
            model=c * self.gd + 0.5 * c**2 * self.dHd,
            step_norm=c * self.step_norm,
        )


def along(
    g: PyTree, d: PyTree, dHd: jax.Array, *, hits_boundary: Any, negative: Any, stationary: Any
) -> Proposal:
    """The step `d` with its quadratic model ``m(d) = gᵀd + ½ dᵀHd`` (curvature `dHd` given)."""
    gd = tree.vdot(g, d)
    return Proposal(
        d=d,
        gd=gd,
        dHd=dHd,
        model=gd + 0.5 * dHd,
        step_norm=tree.norm(d),
        hits_boundary=jnp.asarray(hits_boundary),
        negative=jnp.asarray(negative),
        stationary=jnp.asarray(stationary),
        nonfinite=jnp.zeros((), bool),
        empty=jnp.zeros((), bool),
    )


def no_proposal(x: PyTree) -> Proposal:
    """Nothing to try (``empty``): the zero step at x."""
    zero = jnp.zeros((), tree.scalar_dtype(x))
    false = jnp.zeros((), bool)
    return Proposal(
        tree.zeros_like(x), zero, zero, zero, zero, false, false, false, false, jnp.ones((), bool)
    )


class MinimizeState(NamedTuple):
    """Solver state between steps: a pytree of arrays only, safe to save and reload.

    ``x, fun, jac`` are the current iterate; ``proposal`` the move to try next (already
    computed from the linearization at x, so a step needs one gradient pass; ``empty`` in a
    state fresh from ``init``). ``radius`` is the trust radius (trust-ncg, in the norm
    ``‖s‖_D = √(sᵀDs)`` of the preconditioner's diagonal D); ``forcing``/``gnorm_prev``
    carry the Eisenstat-Walker forcing term (newton-cg). ``diagonal`` is the estimated
    Hessian diagonal D of ``preconditioner="auto"``/``"diagonal"`` (ones until estimated; None
    for other preconditioners) and ``jacobi`` its phase (see :mod:`._jacobi`). The counters
    are as in :class:`~hessfree.OptimizeResult`; ``status`` is -1 while running.
    """

    x: PyTree
    fun: jax.Array
    jac: PyTree
    radius: jax.Array
    forcing: jax.Array
    gnorm_prev: jax.Array
    nit: jax.Array
    nfev: jax.Array
    njev: jax.Array
    nhev: jax.Array
    status: jax.Array
    proposal: Proposal
    diagonal: PyTree
    jacobi: jax.Array


class Tried(NamedTuple):
    """The outcome of trying the proposal: the point to continue from and the new state."""

    state: MinimizeState
    x: PyTree
    f: jax.Array
    stop: jax.Array
    alpha: jax.Array

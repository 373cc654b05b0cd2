"""Line-search Newton-CG: Eisenstat-Walker forcing terms and a curvilinear backtracking search."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import _tree as tree
from .._cg import pcg
from .._results import NONFINITE, PRECISION_LOSS, RUNNING, SADDLE
from ._proposal import MinimizeState, Proposal, Tried, along

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

_C1 = 1e-4  # Armijo constant
_MAX_BACKTRACKS = 40
_EW_GAMMA = 0.9  # Eisenstat-Walker choice 2
_EW_ALPHA = (1 + 5**0.5) / 2
FORCING_MAX = 0.5


def forcing_term(gnorm: jax.Array, gnorm_prev: jax.Array, forcing_prev: jax.Array) -> jax.Array:
    """Eisenstat-Walker choice 2: ``η = γ(‖g_k‖/‖g_{k−1}‖)^α``, safeguarded, capped at 0.5.

    The safeguard ``η >= γ η_{k−1}^α`` (applied when that exceeds 0.1) keeps η from
    collapsing after one lucky step; the first iteration (``gnorm_prev = inf``) uses 0.5.
    """
    ratio = gnorm / jnp.where(jnp.isfinite(gnorm_prev) & (gnorm_prev > 0), gnorm_prev, jnp.inf)
    eta = _EW_GAMMA * ratio**_EW_ALPHA
    guard = _EW_GAMMA * forcing_prev**_EW_ALPHA
    eta = jnp.where(guard > 0.1, jnp.maximum(eta, guard), eta)
    eta = jnp.where(jnp.isfinite(gnorm_prev), eta, FORCING_MAX)
    return jnp.clip(eta, jnp.finfo(gnorm.dtype).eps, FORCING_MAX)


class _LineSearch(NamedTuple):
    alpha: jax.Array
    x: PyTree
    f: jax.Array
    ok: jax.Array
    finite: jax.Array  # every trial so far had a finite f
    tries: jax.Array


def backtracking(
    value: Callable[..., jax.Array], x: PyTree, f0: jax.Array, pr: Proposal, args: tuple[Any, ...]
) -> _LineSearch:
    """Backtracking line search on ``f(x + αd) <= f + c₁(α gᵀd + ½α² min(dᵀHd, 0))``.

    With a Newton or CG direction (``dᵀHd`` taken as 0) this is Armijo's test; along a
    direction of negative curvature the second-order term makes it the curvilinear test of
    Moré & Sorensen (1979), so a step is accepted even where ``gᵀd = 0`` (a saddle). f must
    also strictly decrease. Starts at α = 1; the next α minimizes the quadratic interpolant,
    kept in ``[0.1α, 0.5α]`` (``0.1α`` after a non-finite f). At most 40 trials of f alone,
    none once ``α‖d‖`` is below the rounding level of x.
    """
    dtype = pr.gd.dtype
    tiny = (
        jnp.finfo(dtype).eps * (1 + tree.norm(x)) / jnp.maximum(pr.step_norm, jnp.finfo(dtype).tiny)
    )

    def cond(ls: _LineSearch) -> jax.Array:
        return ~ls.ok & (ls.tries < _MAX_BACKTRACKS) & (ls.alpha > tiny)

    def body(ls: _LineSearch) -> _LineSearch:
        alpha = ls.alpha
        x_t = tree.axpy(alpha, pr.d, x)
        f_t = value(x_t, args)
        finite = jnp.isfinite(f_t)
        bound = f0 + _C1 * (alpha * pr.gd + 0.5 * alpha**2 * jnp.minimum(pr.dHd, 0))
        ok = finite & (f_t <= bound) & (f_t < f0)
        curv = f_t - f0 - alpha * pr.gd
        quad = -pr.gd * alpha**2 / (2 * jnp.where(curv > 0, curv, 1))
        quad = jnp.where((curv > 0) & jnp.isfinite(quad), quad, 0.5 * alpha)
        nxt = jnp.where(finite, jnp.clip(quad, 0.1 * alpha, 0.5 * alpha), 0.1 * alpha)
        return _LineSearch(
            alpha=jnp.where(ok, alpha, nxt).astype(dtype),
            x=x_t,
            f=f_t.astype(ls.f.dtype),
            ok=ok,
            finite=ls.finite & finite,
            tries=ls.tries + 1,
        )

    descent = (pr.gd < 0) | (pr.dHd < 0)  # else: not a descent direction, fail without trying
    start = _LineSearch(
        alpha=jnp.ones((), dtype),
        x=x,
        f=f0,
        ok=jnp.zeros((), bool),
        finite=jnp.ones((), bool),
        tries=jnp.where(descent, 0, _MAX_BACKTRACKS).astype(jnp.int32),
    )
    return lax.while_loop(cond, body, start)


@dataclasses.dataclass(frozen=True)
class LineSearchNewton:
    """``method="newton-cg"``: truncated Newton directions and a backtracking line search."""

    def propose(
        self,
        hv: MatVec,
        g: PyTree,
        gnorm: jax.Array,
        st: MinimizeState,
        precond: MatVec,
        cg_maxiter: int,
    ) -> tuple[Proposal, jax.Array, jax.Array]:
        forcing = forcing_term(gnorm, st.gnorm_prev, st.forcing)
        res = pcg(hv, tree.neg(g), None, precond, forcing * gnorm, cg_maxiter)
        # Negative curvature on the first direction (p = −Mg): use it, it is downhill and
        # curves down; later: the last iterate, a descent direction for the model.
        first = (res.negative | res.broken) & (res.k == 0)
        d = tree.where(first, res.p, res.x)
        dHd = jnp.where(first & res.negative, res.pAp, 0)
        false = jnp.zeros((), bool)
        return (
            along(g, d, dHd, hits_boundary=false, negative=false, stationary=false),
            res.matvecs,
            forcing,
        )

    def escape(
        self, d: PyTree, dHd: jax.Array, radius: jax.Array, dnorm: jax.Array
    ) -> tuple[PyTree, jax.Array, jax.Array]:
        """The direction itself (the line search scales it); its 2-norm is the step norm."""
        del radius, dnorm
        return d, dHd, tree.norm(d)

    def try_proposal(
        self, value: Callable[..., jax.Array], st: MinimizeState, args: tuple[Any, ...]
    ) -> Tried:
        pr = st.proposal
        ls = backtracking(value, st.x, st.fun, pr, args)
        nonfinite = ~ls.finite | pr.nonfinite
        failure = jnp.where(pr.stationary, SADDLE, jnp.where(nonfinite, NONFINITE, PRECISION_LOSS))
        state = st._replace(
            nfev=st.nfev + ls.tries, status=jnp.where(ls.ok, RUNNING, failure).astype(jnp.int32)
        )
        return Tried(
            state, tree.where(ls.ok, ls.x, st.x), jnp.where(ls.ok, ls.f, st.fun), ~ls.ok, ls.alpha
        )

    def shrink(self, st: MinimizeState, alpha: jax.Array) -> MinimizeState:
        """After a non-finite gradient at the accepted point: a tenth of the step taken."""
        pr = st.proposal
        c = 0.1 * alpha.astype(pr.gd.dtype)
        return st._replace(proposal=pr.scaled(c)._replace(nonfinite=jnp.ones((), bool)))

"""Trust-region Newton-CG: Steihaug-Toint truncated CG and N&W Alg. 4.1's radius update."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import _tree as tree
from .._results import NONFINITE, PRECISION_LOSS, RUNNING, SADDLE
from ._proposal import MinimizeState, Proposal, Tried

PyTree = Any
MatVec = Callable[[PyTree], PyTree]


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
    matvec: MatVec, g: PyTree, radius: jax.Array, precond: MatVec, tol: jax.Array, maxiter: int
) -> SteihaugResult:
    """Approximately minimize ``m(s) = gᵀs + ½ sᵀHs`` subject to ``‖s‖_W <= Δ``.

    Steihaug-Toint truncated CG (N&W Alg. 7.2, preconditioned as in Steihaug 1983): CG on
    ``H s = −g`` from ``s = 0`` stops at ``‖g + Hs‖ <= tol``, steps to the boundary
    ``‖s‖_W = Δ`` when the next iterate would leave the region or when a direction has
    ``pᵀHp <= 0`` (or a non-finite product, treated as zero curvature). ``W = M⁻¹``; the
    W-norms follow from CG's recurrences, so W is never applied, and so does the model value.

    Cost: one product with H and one with M per iteration; at most `maxiter` iterations.

    References:
        Steihaug, "The conjugate gradient method and trust regions in large scale
        optimization", SIAM J. Numer. Anal. 1983. Toint 1981. Nocedal & Wright 2006, §7.1.
    """
    dtype = tree.scalar_dtype(g)
    y = tree.cast_like(precond(g), g)
    ry = tree.vdot(g, y)
    rnorm = tree.norm(g)
    zero = jnp.zeros((), dtype)
    state = _SteihaugState(
        s=tree.zeros_like(g),
        r=g,
        y=y,
        p=tree.neg(y),
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

    def body(st: _SteihaugState) -> _SteihaugState:
        Hp = tree.cast_like(matvec(st.p), g)
        kappa_raw = tree.vdot(st.p, Hp)
        kappa = jnp.where(jnp.isfinite(kappa_raw), kappa_raw, 0)
        negative = kappa <= 0
        alpha = st.ry / jnp.where(negative, 1, kappa)
        sWs_interior = st.sWs + 2 * alpha * st.sWp + alpha**2 * st.pWp
        to_boundary = negative | (sWs_interior >= radius**2)
        step = jnp.where(to_boundary, boundary_tau(st.sWs, st.sWp, st.pWp, radius), alpha)
        s = tree.axpy(step, st.p, st.s)
        model = st.model - step * st.ry + 0.5 * step**2 * kappa
        r = tree.axpy(step, Hp, st.r)
        y = tree.cast_like(precond(r), g)
        ry = tree.vdot(r, y)
        beta = ry / jnp.where(st.ry != 0, st.ry, 1)
        rnorm = tree.norm(r)
        return _SteihaugState(
            s=s,
            r=r,
            y=y,
            p=tree.axpy(beta, st.p, tree.neg(y)),
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

    out = lax.while_loop(lambda st: ~st.done & (st.k < maxiter), body, state)
    return SteihaugResult(out.s, out.model, jnp.sqrt(out.sWs), out.hits, out.negative, out.k)


def _new_radius(
    radius: jax.Array, pr: Proposal, finite: jax.Array, rho: jax.Array, max_radius: float
) -> jax.Array:
    """N&W Alg. 4.1: ρ < ¼: Δ/4; ρ > ¾ on the boundary: min(2Δ, max); non-finite: ‖s‖/4."""
    grown = jnp.where((rho > 0.75) & pr.hits_boundary, jnp.minimum(2 * radius, max_radius), radius)
    return jnp.where(
        ~finite,
        0.25 * jnp.minimum(radius, pr.step_norm),
        jnp.where(rho < 0.25, 0.25 * radius, grown),
    )


@dataclasses.dataclass(frozen=True)
class TrustRegion:
    """``method="trust-ncg"``: Steihaug steps, accepted when ``ρ > eta``.

    Steihaug runs on g and H divided by a power of two near ``max|gᵢ|`` (the step is
    unchanged, the inner products cannot overflow), and ρ is formed from halved values, so
    a finite f and ∇f at any scale never read as non-finite.
    """

    eta: float
    max_radius: float

    def propose(
        self,
        hv: MatVec,
        g: PyTree,
        gnorm: jax.Array,
        st: MinimizeState,
        precond: MatVec,
        cg_maxiter: int,
    ) -> tuple[Proposal, jax.Array, jax.Array]:
        # Scale-safe: the step minimizing gᵀs + ½sᵀHs is unchanged when g and H are divided
        # by σ ≈ max|gᵢ| (a power of two, exact), so Steihaug runs on ĝ = g/σ, Ĥ = H/σ, whose
        # inner products cannot overflow or underflow whatever the scale of f; the model
        # value is σ·m̂, in the units of f (finite whenever the changes in f are).
        sigma, inv = tree.pow2_scale(tree.max_abs(g))
        tol = jnp.minimum(0.5, jnp.sqrt(gnorm)) * gnorm * inv
        g_hat = tree.rescale(g, inv)

        def hv_hat(v: PyTree) -> PyTree:
            return tree.rescale(tree.cast_like(hv(v), g), inv)

        sub = steihaug(hv_hat, g_hat, st.radius, precond, tol, cg_maxiter)
        gd_hat = tree.vdot(g_hat, sub.s)
        false = jnp.zeros((), bool)
        proposal = Proposal(
            sub.s,
            sigma * gd_hat,
            sigma * (2 * (sub.model - gd_hat)),
            sigma * sub.model,
            sub.step_norm,
            sub.hits_boundary,
            false,
            false,
            false,
            false,
        )
        return proposal, sub.matvecs, st.forcing

    def escape(
        self, d: PyTree, dHd: jax.Array, radius: jax.Array, dnorm: jax.Array
    ) -> tuple[PyTree, jax.Array, jax.Array]:
        """Along d (curvature `dHd`, trust-region norm `dnorm`) to the boundary ``‖s‖ = Δ``."""
        c = radius / jnp.where(dnorm > 0, dnorm, 1)
        return tree.scale(c, d), dHd * c**2, radius

    def try_proposal(
        self, value: Callable[..., jax.Array], st: MinimizeState, args: tuple[Any, ...]
    ) -> Tried:
        pr = st.proposal
        x_t = tree.axpy(jnp.ones((), pr.gd.dtype), pr.d, st.x)
        f_t = value(x_t, args)
        finite = jnp.isfinite(f_t)
        predicted = -pr.model
        # ρ from f's change and the model's, both halved before subtracting: no overflow
        # even when f and f_t are near the largest finite number of opposite signs
        actual = 0.5 * st.fun - 0.5 * f_t
        rho = actual / jnp.where(predicted > 0, 0.5 * predicted, 1)
        good_model = predicted > 0
        accept = finite & good_model & (rho > self.eta)
        radius = _new_radius(st.radius, pr, finite, rho, self.max_radius)
        eps = jnp.finfo(tree.scalar_dtype(st.x)).eps
        collapsed = ~accept & (radius <= eps * (1 + tree.norm(st.x)))
        stop = ~good_model | collapsed
        nonfinite = ~finite | pr.nonfinite
        failure = jnp.where(pr.stationary, SADDLE, jnp.where(nonfinite, NONFINITE, PRECISION_LOSS))
        state = st._replace(
            radius=radius,
            nfev=st.nfev + 1,
            status=jnp.where(stop, failure, RUNNING).astype(jnp.int32),
        )
        x = tree.where(accept, x_t, st.x)
        return Tried(state, x, jnp.where(accept, f_t, st.fun), stop, jnp.ones_like(radius))

    def shrink(self, st: MinimizeState, alpha: jax.Array) -> MinimizeState:
        """After a non-finite gradient at the accepted point: a quarter of the step."""
        del alpha
        pr = st.proposal
        radius = 0.25 * jnp.minimum(st.radius, pr.step_norm)
        c = radius / jnp.maximum(pr.step_norm, jnp.finfo(radius.dtype).tiny)
        return st._replace(
            proposal=pr.scaled(c)._replace(nonfinite=jnp.ones((), bool)), radius=radius
        )

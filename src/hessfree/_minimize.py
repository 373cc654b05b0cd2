"""Newton-CG and trust-region Newton-CG minimization that never forms the Hessian.

Every outer iteration linearizes the gradient once (:func:`linearize_gradient`: one gradient
pass whose residuals are kept), so each inner CG iteration costs one tangent pass, not a full
Hessian-vector product, and trial points cost one evaluation of f each: the gradient at an
accepted point is the one its linearization produces. The whole solve is one ``lax.while_loop`` over :meth:`Minimizer.step`,
whose state is a pytree: a run can be stopped, saved, reloaded and resumed bit for bit.

Status codes (``OptimizeResult.status``; scipy's meanings kept for 0-3):

====  ==========================================================================================
 -1   running (only in an unfinished :class:`MinimizeState`)
  0   success: ``‖∇f‖₂ <= gtol`` and no negative curvature found at the final point
  1   maximum number of iterations reached
  2   precision loss: the line search failed or the trust region collapsed without progress
  3   non-finite f or gradient (at the start, or at every trial point tried): last finite
      iterate returned
  4   saddle: ``‖∇f‖₂ <= gtol`` but the Hessian has negative curvature here, and no escape
      along it succeeded within the iterations or step sizes left
====  ==========================================================================================
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._cg import (
    pcg,
    scalar_dtype,
    steihaug,
    tree_axpy,
    tree_neg,
    tree_norm,
    tree_scale,
    tree_size,
    tree_where,
)
from ._products import VALID_MODES, cast_like, linearize_gradient, match_sharding, tree_vdot
from ._validation import PyTree, check_choice, check_floating, check_positive_int, check_scalar_fn

METHODS = ("trust-ncg", "newton-cg")

RUNNING, SUCCESS, MAXITER, PRECISION_LOSS, NONFINITE, SADDLE = -1, 0, 1, 2, 3, 4

STATUS_MESSAGES = {
    RUNNING: "Running: call step or run again to continue.",
    SUCCESS: "Optimization terminated successfully: gradient norm <= gtol and no negative "
    "curvature found at the solution.",
    MAXITER: "Maximum number of iterations has been exceeded.",
    PRECISION_LOSS: "Desired error not necessarily achieved due to precision loss: the line "
    "search failed or the trust region collapsed without decreasing f.",
    NONFINITE: "Non-finite f or gradient: at the starting point, or at every trial point "
    "tried from the last finite iterate (returned).",
    SADDLE: "Stopped at a saddle point: gradient norm <= gtol but the Hessian has negative "
    "curvature here and no step along it decreased f.",
}

_C1 = 1e-4  # Armijo constant
_MAX_BACKTRACKS = 40
_EW_GAMMA = 0.9  # Eisenstat-Walker choice 2
_EW_ALPHA = (1 + 5**0.5) / 2
_EW_MAX = 0.5


# --- results and state -------------------------------------------------------------------


class OptimizeResult(NamedTuple):
    """The result of :func:`minimize`, with scipy.optimize.OptimizeResult's fields.

    A pytree (NamedTuple): it leaves ``jit`` and ``vmap`` with every field an array.
    ``message`` is a property, not a field: inside ``jit`` the status is traced, so the text
    is looked up from ``status`` once it is concrete (``STATUS_MESSAGES``); under ``vmap`` it
    is a list, one message per problem.

    Attributes:
        x: the solution, a pytree like ``x0``; never non-finite (the last finite iterate).
        fun: ``f(x)``.
        jac: ``∇f(x)``, a pytree like ``x0``.
        nit: outer iterations (trial steps, as scipy counts them: rejected ones included).
        nfev: evaluations of f (the start, each trust-ncg trial, each line-search trial).
        njev: gradient passes: one per iteration, the linearization of ∇f (plus the start).
        nhev: Hessian-vector products (tangent passes through the linearized gradient).
        status: int32 code; see the module docstring or ``STATUS_MESSAGES``.
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

    @property
    def message(self) -> str | list[str]:
        """The text of ``status`` (a list of texts when ``status`` is batched)."""
        try:
            codes = np.asarray(self.status)
        except jax.errors.TracerArrayConversionError:
            return "status is traced (inside jit/vmap); read result.status outside"
        if codes.ndim == 0:
            return STATUS_MESSAGES[int(codes)]
        return [STATUS_MESSAGES[int(c)] for c in codes.ravel()]


class Proposal(NamedTuple):
    """The move from x to try next: a trust-region step or a line-search direction `d`.

    ``gd = gᵀd``; ``dHd = dᵀHd`` (trust-ncg: exact; newton-cg: the negative curvature of
    the direction, else 0, as the line search's second-order term uses it); ``model =
    gd + ½dHd``; ``step_norm = ‖d‖`` in the trust-region norm. ``stationary``: proposed at
    a point with ``‖∇f‖ <= gtol`` (an escape from a saddle); ``nonfinite``: shrunk after a
    non-finite gradient.
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


class MinimizeState(NamedTuple):
    """Solver state between steps: a pytree of arrays only, safe to save and reload.

    ``x, fun, jac`` are the current iterate; ``proposal`` the move to try next (already
    computed from the linearization at x, so a step needs one gradient pass). ``radius`` is
    the trust radius (trust-ncg); ``eta``/``gnorm_prev`` carry the Eisenstat-Walker forcing
    term (newton-cg). The counters are as in :class:`OptimizeResult`; ``status`` is -1
    while running.
    """

    x: PyTree
    fun: jax.Array
    jac: PyTree
    radius: jax.Array
    eta: jax.Array
    gnorm_prev: jax.Array
    nit: jax.Array
    nfev: jax.Array
    njev: jax.Array
    nhev: jax.Array
    status: jax.Array
    proposal: Proposal


class _Next(NamedTuple):
    proposal: Proposal
    status: jax.Array
    matvecs: jax.Array
    eta: jax.Array
    gnorm: jax.Array


# --- small pure helpers ------------------------------------------------------------------


def _all_finite(tree: PyTree) -> jax.Array:
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _probe_vector(x: PyTree) -> PyTree:
    """A fixed pseudo-random vector like x (key 0): generic, so it meets every eigenvector."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    keys = jax.random.split(jax.random.PRNGKey(0), len(leaves))
    u = jax.tree_util.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(l), jnp.result_type(l))
            for k, l in zip(keys, leaves, strict=True)
        ],
    )
    return match_sharding(u, x)


def forcing_term(gnorm: jax.Array, gnorm_prev: jax.Array, eta_prev: jax.Array) -> jax.Array:
    """Eisenstat-Walker choice 2: ``η = γ(‖g_k‖/‖g_{k−1}‖)^α``, safeguarded, capped at 0.5.

    The safeguard ``η >= γ η_{k−1}^α`` (applied when that exceeds 0.1) keeps η from
    collapsing after one lucky step; the first iteration (``gnorm_prev = inf``) uses 0.5.
    """
    ratio = gnorm / jnp.where(jnp.isfinite(gnorm_prev) & (gnorm_prev > 0), gnorm_prev, jnp.inf)
    eta = _EW_GAMMA * ratio**_EW_ALPHA
    guard = _EW_GAMMA * eta_prev**_EW_ALPHA
    eta = jnp.where(guard > 0.1, jnp.maximum(eta, guard), eta)
    eta = jnp.where(jnp.isfinite(gnorm_prev), eta, _EW_MAX)
    return jnp.clip(eta, jnp.finfo(gnorm.dtype).eps, _EW_MAX)


def _along(
    g: PyTree, d: PyTree, dHd: jax.Array, *, hits_boundary: Any, negative: Any, stationary: Any
) -> Proposal:
    """The step `d` with its quadratic model ``m(d) = gᵀd + ½ dᵀHd`` (curvature `dHd` given)."""
    gd = tree_vdot(g, d)
    return Proposal(
        d=d,
        gd=gd,
        dHd=dHd,
        model=gd + 0.5 * dHd,
        step_norm=tree_norm(d),
        hits_boundary=hits_boundary,
        negative=negative,
        stationary=stationary,
        nonfinite=jnp.zeros((), bool),
    )


def _probe_curvature(hv: Callable[[PyTree], PyTree], x: PyTree, g: PyTree, iters: int):
    """Look for negative curvature at x with CG on ``H z = u`` for a fixed generic u.

    CG's pivots ``pᵀHp`` are the Lanczos tridiagonal's LDLᵀ pivots, so an indefinite Krylov
    space shows up as ``pᵀHp <= 0``; the direction counts only if its Rayleigh quotient is
    below ``−√eps`` times the largest one seen (rounding in a PSD-singular H does not). The
    unit direction returned points downhill (``gᵀd <= 0``). Cost: at most `iters` products.
    """
    u = _probe_vector(x)
    eps = jnp.finfo(scalar_dtype(x)).eps
    st = pcg(hv, u, None, lambda v: v, eps * tree_norm(u), iters)
    rayleigh = st.pAp / jnp.where(st.pp > 0, st.pp, 1)
    scale = jnp.maximum(st.max_rayleigh, jnp.abs(rayleigh))
    found = st.negative & (rayleigh < -jnp.sqrt(eps) * scale)
    d = tree_scale(1 / jnp.sqrt(jnp.where(st.pp > 0, st.pp, 1)), st.p)
    sign = jnp.where(tree_vdot(g, d) > 0, -1.0, 1.0)
    return found, tree_scale(sign, d), jnp.where(found, rayleigh, 0), st.matvecs


# --- the solver --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Minimizer:
    """Step-wise Newton-CG / trust-region Newton-CG: ``init``, ``step``, ``result``, ``run``.

    A frozen (hashable) description of the problem and settings; all mutable state lives in
    a :class:`MinimizeState` pytree. :func:`minimize` is ``result(advance(init(x0)))``; a
    Python-driven loop (:meth:`run`) calls the same compiled :meth:`advance` in chunks, so a
    run stopped, saved (``np.savez`` of ``jax.tree_util.tree_leaves(state)``), reloaded
    (``tree_unflatten`` with the structure of ``init(x0)``) and resumed follows exactly the
    same trajectory as an uninterrupted one.

    Construct it with :meth:`create` (which validates); fields as in :func:`minimize`.
    """

    f: Callable[..., Any]
    method: str = "trust-ncg"
    gtol: float = 1e-5
    maxiter: int | None = None
    hvp_mode: str = "auto"
    preconditioner: Callable[..., PyTree] | None = None
    initial_radius: float = 1.0
    max_radius: float = 1000.0
    eta: float = 0.15
    cg_maxiter: int | None = None
    probe_iters: int = 20

    @classmethod
    def create(cls, f: Callable[..., Any], **options: Any) -> Minimizer:
        """A validated solver; raises ValueError/TypeError on bad settings (see minimize)."""
        solver = cls(f, **options)
        solver.check_settings()
        return solver

    def check_settings(self) -> None:
        if not callable(self.f):
            msg = f"f must be callable as f(x, *args); got {type(self.f).__name__}"
            raise TypeError(msg)
        check_choice(self.method, METHODS, "method")
        check_choice(self.hvp_mode, VALID_MODES, "hvp_mode")
        _check_number(self.gtol, "gtol", minimum=0.0)
        check_positive_int(self.maxiter, "maxiter", allow_none=True)
        check_positive_int(self.cg_maxiter, "cg_maxiter", allow_none=True)
        check_positive_int(self.probe_iters, "probe_iters")
        _check_number(self.initial_radius, "initial_radius", minimum=0.0, strict=True)
        _check_number(self.max_radius, "max_radius", minimum=float(self.initial_radius))
        _check_number(self.eta, "eta", minimum=0.0)
        if self.eta >= 0.25:
            msg = f"eta must be in [0, 0.25); got {self.eta!r}"
            raise ValueError(msg)
        if self.preconditioner is not None and not callable(self.preconditioner):
            msg = (
                "preconditioner must be None or a callable (x, *args) -> positive pytree like x "
                f"(an approximate Hessian diagonal); got {type(self.preconditioner).__name__}"
            )
            raise TypeError(msg)

    def check_problem(self, x0: PyTree, args: tuple[Any, ...]) -> None:
        check_floating(x0, "x0")
        check_scalar_fn(self.f, x0, args)

    # -- pieces -----------------------------------------------------------------------

    def _maxiter(self, x: PyTree) -> int:
        return 200 * tree_size(x) if self.maxiter is None else int(self.maxiter)

    def _cg_maxiter(self, x: PyTree) -> int:
        return 20 * tree_size(x) if self.cg_maxiter is None else int(self.cg_maxiter)

    def _precond(self, x: PyTree, args: tuple[Any, ...]) -> Callable[[PyTree], PyTree]:
        if self.preconditioner is None:
            return lambda v: v
        diag = cast_like(self.preconditioner(x, *args), x)
        return lambda v: jax.tree_util.tree_map(jnp.divide, v, diag)

    def _value(self, x: PyTree, args: tuple[Any, ...]) -> jax.Array:
        return self.f(x, *args)

    def _linearize(self, x: PyTree, args: tuple[Any, ...]):
        g, hv = linearize_gradient(self.f, x, args, self.hvp_mode)
        return cast_like(g, x), hv

    # -- the three steps ---------------------------------------------------------------

    def init(self, x0: PyTree, *args: Any) -> MinimizeState:
        """f, the linearized ∇f and the first proposal at `x0` (status 3 if non-finite)."""
        self.check_problem(x0, args)
        return _init_jit(self, x0, args)

    def step(self, state: MinimizeState, *args: Any) -> MinimizeState:
        """One outer iteration (pure; ``jax.jit`` it). A no-op once ``status != -1``.

        Tries the pending proposal (f only: one trial for trust-ncg, a backtracking line
        search for newton-cg), accepts or rejects it, linearizes ∇f at the resulting point
        (the one gradient pass of the step) and computes the next proposal from it: a
        Steihaug step (trust-ncg) or a truncated Newton direction (newton-cg). At a point with
        ``‖∇f‖ <= gtol`` it instead probes for negative curvature: none ends the run with
        success, some gives an escape step. A non-finite gradient at an accepted point
        rejects it and shrinks the proposal.
        """
        return lax.cond(
            state.status == RUNNING,
            lambda s: self._step(s, args),
            lambda s: s,
            state,
        )

    def advance(
        self, state: MinimizeState, *args: Any, num_steps: int | jax.Array
    ) -> MinimizeState:
        """Up to `num_steps` steps (fewer if the run ends), compiled as one while loop."""
        return _advance_jit(self, state, args, jnp.asarray(num_steps, jnp.int32))

    def result(self, state: MinimizeState) -> OptimizeResult:
        """The :class:`OptimizeResult` of a state (finished or not)."""
        return OptimizeResult(
            x=state.x,
            fun=state.fun,
            jac=state.jac,
            nit=state.nit,
            nfev=state.nfev,
            njev=state.njev,
            nhev=state.nhev,
            status=state.status,
            success=state.status == SUCCESS,
        )

    def run(
        self,
        state: MinimizeState,
        *args: Any,
        chunk: int = 100,
        callback: Callable[[MinimizeState], Any] | None = None,
        progress: bool = False,
    ) -> MinimizeState:
        """Drive the solver from Python, `chunk` steps per compiled call, until it finishes.

        After each chunk ``callback(state)`` is called (return True to stop early, e.g. to
        save the state and resume later); with ``progress=True`` a line with nit, f, ‖∇f‖
        and status is printed. The trajectory is the same as :func:`minimize`'s.
        """
        check_positive_int(chunk, "chunk")
        while int(state.status) == RUNNING:
            state = self.advance(state, *args, num_steps=chunk)
            if progress:
                gnorm = float(tree_norm(state.jac))
                print(
                    f"nit {int(state.nit):6d}  f {float(state.fun): .6e}  "
                    f"|g| {gnorm:.3e}  status {int(state.status)}",
                    flush=True,
                )
            if callback is not None and callback(state):
                break
        return state

    # -- implementation ------------------------------------------------------------------

    def _init(self, x0: PyTree, args: tuple[Any, ...]) -> MinimizeState:
        dtype = scalar_dtype(x0)
        f0 = self._value(x0, args)
        g0, hv = self._linearize(x0, args)
        finite = jnp.isfinite(f0) & _all_finite(g0)
        zero = jnp.zeros((), jnp.int32)
        st = MinimizeState(
            x=x0,
            fun=f0,
            jac=g0,
            radius=jnp.asarray(self.initial_radius, dtype),
            eta=jnp.asarray(_EW_MAX, dtype),
            gnorm_prev=jnp.asarray(jnp.inf, dtype),
            nit=zero,
            nfev=zero + 1,
            njev=zero + 1,
            nhev=zero,
            status=jnp.asarray(NONFINITE, jnp.int32),
            proposal=_no_proposal(x0),
        )
        return lax.cond(finite, lambda: self._with_next(st, hv, args), lambda: st)

    def _with_next(self, st: MinimizeState, hv, args: tuple[Any, ...]) -> MinimizeState:
        """`st` (x, fun, jac set; hv its linearization) with the next proposal and status."""
        nxt = self._propose(hv, st, args)
        return st._replace(
            proposal=nxt.proposal,
            status=nxt.status,
            nhev=st.nhev + nxt.matvecs,
            eta=nxt.eta,
            gnorm_prev=nxt.gnorm,
        )

    def _propose(self, hv, st: MinimizeState, args: tuple[Any, ...]) -> _Next:
        x, g = st.x, st.jac
        gnorm = tree_norm(g)
        stationary = gnorm <= self.gtol
        out_of_iters = st.nit >= self._maxiter(x)
        branch = jnp.where(stationary, 0, jnp.where(out_of_iters, 2, 1))
        proposal, matvecs, eta = lax.switch(
            branch,
            [
                lambda: self._escape_direction(hv, x, g, st.radius),
                lambda: self._newton_direction(hv, x, g, gnorm, st, args),
                lambda: (_no_proposal(x), jnp.zeros((), jnp.int32), st.eta),
            ],
        )
        converged = stationary & ~proposal.negative
        status = jnp.where(
            converged,
            SUCCESS,
            jnp.where(out_of_iters, jnp.where(stationary, SADDLE, MAXITER), RUNNING),
        ).astype(jnp.int32)
        return _Next(proposal, status, matvecs, eta.astype(gnorm.dtype), gnorm)

    def _step(self, st: MinimizeState, args: tuple[Any, ...]) -> MinimizeState:
        dtype = scalar_dtype(st.x)
        if self.method == "trust-ncg":
            tried = self._try_trust(st, args)
        else:
            tried = self._try_line_search(st, args)
        g, hv = self._linearize(tried.x, args)
        grad_ok = _all_finite(g)
        st = tried.state._replace(nit=st.nit + 1, njev=tried.state.njev + 1)
        good = st._replace(x=tried.x, fun=tried.f, jac=g)
        # an accepted point whose gradient is not finite: stay, shrink the same proposal
        bad = self._shrink(st, tried.alpha)
        out_of_iters = bad.nit >= self._maxiter(st.x)
        bad = bad._replace(status=jnp.where(out_of_iters, MAXITER, bad.status).astype(jnp.int32))
        out = lax.cond(
            tried.stop,
            lambda: st,
            lambda: lax.cond(grad_ok, lambda: self._with_next(good, hv, args), lambda: bad),
        )
        return out._replace(radius=out.radius.astype(dtype), eta=out.eta.astype(dtype))

    def _newton_direction(self, hv, x, g, gnorm, st: MinimizeState, args):
        precond = self._precond(x, args)
        false = jnp.zeros((), bool)
        if self.method == "trust-ncg":
            tol = jnp.minimum(0.5, jnp.sqrt(gnorm)) * gnorm
            sub = steihaug(hv, g, st.radius, precond, tol, self._cg_maxiter(x))
            gd = tree_vdot(g, sub.s)
            proposal = Proposal(
                d=sub.s,
                gd=gd,
                dHd=2 * (sub.model - gd),
                model=sub.model,
                step_norm=sub.step_norm,
                hits_boundary=sub.hits_boundary,
                negative=false,
                stationary=false,
                nonfinite=false,
            )
            return proposal, sub.matvecs, st.eta
        eta = forcing_term(gnorm, st.gnorm_prev, st.eta)
        res = pcg(hv, tree_neg(g), None, precond, eta * gnorm, self._cg_maxiter(x))
        # Negative curvature on the first direction (p = −Mg): use it, it is downhill and
        # curves down; later: the last iterate, a descent direction for the model.
        first = (res.negative | res.broken) & (res.k == 0)
        d = tree_where(first, res.p, res.x)
        dHd = jnp.where(first & res.negative, res.pAp, 0)
        proposal = _along(g, d, dHd, hits_boundary=false, negative=false, stationary=false)
        return proposal, res.matvecs, eta

    def _escape_direction(self, hv, x, g, radius):
        iters = min(self.probe_iters, tree_size(x))
        found, d, dHd, matvecs = _probe_curvature(hv, x, g, iters)
        if self.method == "trust-ncg":
            d = tree_scale(radius, d)
            dHd = dHd * radius**2
        true = jnp.ones((), bool)
        proposal = _along(g, d, dHd, hits_boundary=true, negative=found, stationary=true)
        return proposal, matvecs, jnp.asarray(_EW_MAX, proposal.gd.dtype)

    def _try_trust(self, st: MinimizeState, args) -> _Tried:
        pr = st.proposal
        x_t = tree_axpy(jnp.ones((), pr.gd.dtype), pr.d, st.x)
        f_t = self._value(x_t, args)
        finite = jnp.isfinite(f_t)
        predicted = -pr.model
        rho = (st.fun - f_t) / jnp.where(predicted > 0, predicted, 1)
        good_model = predicted > 0
        accept = finite & good_model & (rho > self.eta)
        radius = _new_radius(st.radius, pr, finite, rho, self.max_radius)
        eps = jnp.finfo(scalar_dtype(st.x)).eps
        collapsed = ~accept & (radius <= eps * (1 + tree_norm(st.x)))
        stop = ~good_model | collapsed
        nonfinite = ~finite | pr.nonfinite
        failure = jnp.where(pr.stationary, SADDLE, jnp.where(nonfinite, NONFINITE, PRECISION_LOSS))
        state = st._replace(
            radius=radius,
            nfev=st.nfev + 1,
            status=jnp.where(stop, failure, RUNNING).astype(jnp.int32),
        )
        return _Tried(
            state=state,
            x=tree_where(accept, x_t, st.x),
            f=jnp.where(accept, f_t, st.fun),
            stop=stop,
            alpha=jnp.ones_like(radius),
        )

    def _try_line_search(self, st: MinimizeState, args) -> _Tried:
        pr = st.proposal
        ls = _backtracking(self._value, st.x, st.fun, pr, args)
        nonfinite = ~ls.finite | pr.nonfinite
        failure = jnp.where(pr.stationary, SADDLE, jnp.where(nonfinite, NONFINITE, PRECISION_LOSS))
        state = st._replace(
            nfev=st.nfev + ls.tries,
            status=jnp.where(ls.ok, RUNNING, failure).astype(jnp.int32),
        )
        return _Tried(
            state=state,
            x=tree_where(ls.ok, ls.x, st.x),
            f=jnp.where(ls.ok, ls.f, st.fun),
            stop=~ls.ok,
            alpha=ls.alpha,
        )

    def _shrink(self, st: MinimizeState, alpha: jax.Array) -> MinimizeState:
        """After a non-finite gradient at the accepted point: keep x, try a shorter move."""
        pr = st.proposal
        if self.method == "trust-ncg":
            radius = 0.25 * jnp.minimum(st.radius, pr.step_norm)
            scale = radius / jnp.maximum(pr.step_norm, jnp.finfo(radius.dtype).tiny)
        else:
            radius = st.radius
            scale = 0.1 * alpha.astype(pr.gd.dtype)
        shrunk = pr._replace(
            d=tree_scale(scale, pr.d),
            gd=scale * pr.gd,
            dHd=scale**2 * pr.dHd,
            model=scale * pr.gd + 0.5 * scale**2 * pr.dHd,
            step_norm=scale * pr.step_norm,
            nonfinite=jnp.ones((), bool),
        )
        return st._replace(proposal=shrunk, radius=radius)


class _Tried(NamedTuple):
    """The outcome of trying the proposal: the point to continue from and the new state."""

    state: MinimizeState
    x: PyTree
    f: jax.Array
    stop: jax.Array
    alpha: jax.Array


def _new_radius(radius, pr: Proposal, finite, rho, max_radius):
    """N&W Alg. 4.1: ρ < ¼: Δ/4; ρ > ¾ on the boundary: min(2Δ, max); non-finite: ‖s‖/4."""
    return jnp.where(
        ~finite,
        0.25 * jnp.minimum(radius, pr.step_norm),
        jnp.where(
            rho < 0.25,
            0.25 * radius,
            jnp.where((rho > 0.75) & pr.hits_boundary, jnp.minimum(2 * radius, max_radius), radius),
        ),
    )


def _no_proposal(x: PyTree) -> Proposal:
    zero = jnp.zeros((), scalar_dtype(x))
    false = jnp.zeros((), bool)
    return Proposal(
        d=jax.tree_util.tree_map(jnp.zeros_like, x),
        gd=zero,
        dHd=zero,
        model=zero,
        step_norm=zero,
        hits_boundary=false,
        negative=false,
        stationary=false,
        nonfinite=false,
    )


class _LineSearch(NamedTuple):
    alpha: jax.Array
    x: PyTree
    f: jax.Array
    ok: jax.Array
    finite: jax.Array  # every trial so far had a finite f
    tries: jax.Array


def _backtracking(value, x, f0, pr: Proposal, args) -> _LineSearch:
    """Backtracking line search on ``f(x + αd) <= f + c₁(α gᵀd + ½α² min(dᵀHd, 0))``.

    With a Newton or CG direction (``dᵀHd`` taken as 0) this is Armijo's test; along a
    direction of negative curvature the second-order term makes it the curvilinear test of
    Moré & Sorensen (1979), so a step is accepted even where ``gᵀd = 0`` (a saddle). f must
    also strictly decrease. Starts at α = 1; the next α minimizes the quadratic interpolant,
    kept in ``[0.1α, 0.5α]`` (``0.1α`` after a non-finite f). At most 40 trials of f alone
    (the gradient comes with the next linearization), none once ``α‖d‖`` is below the
    rounding level of x.
    """
    dtype = pr.gd.dtype
    # Steps below rounding level of x cannot change f: stop trying.
    tiny = (
        jnp.finfo(dtype).eps * (1 + tree_norm(x)) / jnp.maximum(pr.step_norm, jnp.finfo(dtype).tiny)
    )

    def cond(ls: _LineSearch) -> jax.Array:
        return ~ls.ok & (ls.tries < _MAX_BACKTRACKS) & (ls.alpha > tiny)

    def body(ls: _LineSearch) -> _LineSearch:
        alpha = ls.alpha
        x_t = tree_axpy(alpha, pr.d, x)
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

    start = _LineSearch(
        alpha=jnp.ones((), dtype),
        x=x,
        f=f0,
        ok=jnp.zeros((), bool),
        finite=jnp.ones((), bool),
        tries=jnp.zeros((), jnp.int32),
    )
    # Not a descent direction at all (neither slope nor curvature): fail without trying.
    start = start._replace(tries=jnp.where((pr.gd < 0) | (pr.dHd < 0), 0, _MAX_BACKTRACKS))
    return lax.while_loop(cond, body, start)


def _check_number(value: Any, name: str, *, minimum: float, strict: bool = False) -> None:
    ok_type = isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool
    )
    if not ok_type or not np.isfinite(value) or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        msg = f"{name} must be a finite number {relation} {minimum}; got {value!r}"
        raise ValueError(msg)


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(solver: Minimizer, x0: PyTree, args: tuple[Any, ...]) -> MinimizeState:
    return solver._init(x0, args)


@functools.partial(jax.jit, static_argnums=0)
def _advance_jit(
    solver: Minimizer, state: MinimizeState, args: tuple[Any, ...], num_steps: jax.Array
) -> MinimizeState:
    def cond(carry):
        s, k = carry
        return (s.status == RUNNING) & (k < num_steps)

    def body(carry):
        s, k = carry
        return solver._step(s, args), k + 1

    return lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))[0]


def minimize(
    f: Callable[..., Any],
    x0: PyTree,
    *args: Any,
    method: str = "trust-ncg",
    gtol: float = 1e-5,
    maxiter: int | None = None,
    hvp_mode: str = "auto",
    preconditioner: Callable[..., PyTree] | None = None,
    initial_radius: float = 1.0,
    max_radius: float = 1000.0,
    eta: float = 0.15,
    cg_maxiter: int | None = None,
    probe_iters: int = 20,
) -> OptimizeResult:
    """Minimize a scalar ``f(x, *args)`` over a pytree x by Newton-CG, never forming ∇²f.

    Newton's step ``∇²f(x) p = −∇f(x)`` solved inexactly by CG on Hessian-vector products:
    ``"trust-ncg"`` (default) solves it inside a trust region by Steihaug-Toint CG, leaving
    for the boundary along negative curvature, with N&W Alg. 4.1's radius update (ρ < ¼:
    Δ ← Δ/4; ρ > ¾ on the boundary: Δ ← min(2Δ, max_radius); accept if ρ > eta);
    ``"newton-cg"`` stops CG at the Eisenstat-Walker tolerance ``‖r‖ <= η_k‖∇f‖`` (or at
    negative curvature, keeping a descent direction) and backtracks along it (Armijo).
    Converged when ``‖∇f(x)‖₂ <= gtol`` and a CG probe finds no negative curvature at x; at
    a saddle (gradient small, curvature negative) the solver steps along the negative
    curvature instead of stopping. A trial point with non-finite f or ∇f is rejected and the
    step shrunk. The solve is one ``lax.while_loop``: ``jit``- and ``vmap``-able over ``x0``
    or ``args``; float32 and float64 are kept as given.

    Cost per iteration: one linearization of ∇f (one gradient pass), one tangent pass per
    inner CG iteration (at most ``20·n``, or `cg_maxiter`), one f per trial point; at a
    stationary point at most `probe_iters` tangent passes for the saddle probe.

    Args:
        f: scalar function ``f(x, *args)``.
        x0: starting point, any pytree of floating arrays.
        *args: further arguments of `f` (data), held fixed; they may be batched by ``vmap``.
        method: ``"trust-ncg"`` or ``"newton-cg"``.
        gtol: stop when the gradient's 2-norm is at most this.
        maxiter: at most this many outer iterations; default ``200·n`` (scipy's).
        hvp_mode: product mode, as in :func:`hessfree.hvp`.
        preconditioner: optional ``(x, *args) -> d``, a positive pytree like x approximating
            the Hessian diagonal; CG then uses ``M v = v / d`` (trust-ncg's region becomes
            ``‖s‖_W <= Δ`` with ``W = diag(d)``).
        initial_radius, max_radius, eta: trust-ncg settings (scipy's defaults).
        cg_maxiter: at most this many inner CG iterations per outer one; default 20·n
            (scipy Newton-CG's cap: rounding makes ill-conditioned CG need more than n).
        probe_iters: HVPs spent looking for negative curvature at a stationary point.

    Returns:
        :class:`OptimizeResult`; ``status`` codes are listed in ``STATUS_MESSAGES`` and the
        module docstring (0 success, 1 maxiter, 2 precision loss, 3 non-finite, 4 saddle).

    Raises:
        ValueError: `f` not scalar; unknown `method` or `hvp_mode`; bad gtol, maxiter or
            other settings.
        TypeError: `x0` has non-floating leaves; `f` not callable.

    Example:
        >>> import jax.numpy as jnp
        >>> rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        >>> res = minimize(rosen, jnp.array([-1.2, 1.0]))
        >>> res.x, int(res.status), int(res.nit)  # scipy's trust-ncg: [1, 1] in 29 iterations
        (Array([0.9999997, 0.9999994], dtype=float32), 0, 29)

    References:
        Nocedal & Wright, Numerical Optimization, 2nd ed. 2006, ch. 4-7 (Alg. 4.1, 7.1, 7.2).
        Steihaug, SIAM J. Numer. Anal. 1983. Eisenstat & Walker, SIAM J. Sci. Comput. 1996.
        Moré & Sorensen, Math. Programming 1979 (negative curvature in line searches).
    """
    solver = Minimizer.create(
        f,
        method=method,
        gtol=gtol,
        maxiter=maxiter,
        hvp_mode=hvp_mode,
        preconditioner=preconditioner,
        initial_radius=initial_radius,
        max_radius=max_radius,
        eta=eta,
        cg_maxiter=cg_maxiter,
        probe_iters=probe_iters,
    )
    state = solver.init(x0, *args)
    state = solver.advance(state, *args, num_steps=np.iinfo(np.int32).max)
    return solver.result(state)

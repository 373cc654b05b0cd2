"""Newton-CG and trust-region Newton-CG minimization that never forms the Hessian.

Every outer iteration linearizes the gradient once (one gradient pass whose residuals are
kept), so each inner CG iteration costs one tangent pass, not a full Hessian-vector product,
and trial points cost one evaluation of f each. The whole solve is one ``lax.while_loop`` over
:meth:`Minimizer.step`, whose state is a pytree: a run can be stopped, saved, reloaded and
resumed bit for bit. The two methods are strategies (:mod:`._trust`, :mod:`._newton`) behind
one loop. Status codes come from the shared table (``hessfree.STATUS_MESSAGES``): 0 success,
1 maxiter, 2 precision loss, 3 non-finite, 4 saddle.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from .. import _tree as tree
from .._cg import pcg
from .._products import VALID_MODES, linearize_gradient
from .._results import MAXITER, NONFINITE, RUNNING, SADDLE, SUCCESS, OptimizeResult
from .._validation import (
    PyTree,
    check_callable,
    check_choice,
    check_floating,
    check_like,
    check_number,
    check_positive_int,
    check_scalar_fn,
)
from ._newton import FORCING_MAX, LineSearchNewton
from ._proposal import MinimizeState, along, no_proposal
from ._trust import TrustRegion

METHODS = ("trust-ncg", "newton-cg")
MatVec = Callable[[PyTree], PyTree]


def _probe_curvature(hv: MatVec, x: PyTree, g: PyTree, iters: int) -> Any:
    """Look for negative curvature at x with CG on ``H z = u`` for a fixed generic u.

    CG's pivots ``pᵀHp`` are the Lanczos tridiagonal's LDLᵀ pivots, so an indefinite Krylov
    space shows up as ``pᵀHp <= 0``; the direction counts only if its Rayleigh quotient is
    below ``−√eps`` times the largest one seen (rounding in a PSD-singular H does not). The
    unit direction returned points downhill (``gᵀd <= 0``). Cost: at most `iters` products.
    """
    u = tree.match_sharding(tree.random_tree(jax.random.PRNGKey(0), tree.structure_of(x)), x)
    eps = jnp.finfo(tree.scalar_dtype(x)).eps
    st = pcg(hv, u, None, lambda v: v, eps * tree.norm(u), iters)
    rayleigh = st.pAp / jnp.where(st.pp > 0, st.pp, 1)
    scale = jnp.maximum(st.max_rayleigh, jnp.abs(rayleigh))
    found = st.negative & (rayleigh < -jnp.sqrt(eps) * scale)
    d = tree.scale(1 / jnp.sqrt(jnp.where(st.pp > 0, st.pp, 1)), st.p)
    sign = jnp.where(tree.vdot(g, d) > 0, -1.0, 1.0)
    return found, tree.scale(sign, d), jnp.where(found, rayleigh, 0), st.matvecs


@dataclasses.dataclass(frozen=True)
class Minimizer:
    """Step-wise Newton-CG / trust-region Newton-CG: ``init``, ``step``, ``advance``, ``result``.

    A frozen (hashable) description of the problem and settings, validated on construction;
    all mutable state lives in a :class:`MinimizeState` pytree. :func:`minimize` is
    ``result(advance(init(x0)))``; :meth:`run` calls the same compiled :meth:`advance` in
    chunks, so a run stopped, saved (``np.savez`` of ``jax.tree_util.tree_leaves(state)``),
    reloaded (``tree_unflatten`` with the structure of ``init(x0)``) and resumed follows
    exactly the same trajectory as an uninterrupted one. Fields as in :func:`minimize`.
    """

    f: Callable[..., Any]
    method: str = "trust-ncg"
    gtol: float = 1e-5
    maxiter: int | None = None
    mode: str = "auto"
    preconditioner: Callable[..., PyTree] | None = None
    initial_radius: float = 1.0
    max_radius: float = 1000.0
    eta: float = 0.15
    cg_maxiter: int | None = None
    probe_iters: int = 20

    def __post_init__(self) -> None:
        check_callable(self.f, "f", "f(x, *args)")
        check_choice(self.method, METHODS, "method")
        check_choice(self.mode, VALID_MODES, "mode")
        check_number(self.gtol, "gtol")
        check_positive_int(self.maxiter, "maxiter", allow_none=True)
        check_positive_int(self.cg_maxiter, "cg_maxiter", allow_none=True)
        check_positive_int(self.probe_iters, "probe_iters")
        check_number(self.initial_radius, "initial_radius", strict=True)
        check_number(self.max_radius, "max_radius", minimum=float(self.initial_radius))
        check_number(self.eta, "eta")
        if self.eta >= 0.25:
            msg = f"eta (the trust-region acceptance ratio) must be in [0, 0.25); got {self.eta!r}"
            raise ValueError(msg)
        if self.preconditioner is not None:
            check_callable(
                self.preconditioner,
                "preconditioner",
                "preconditioner(x, *args) -> positive pytree like x",
            )

    @property
    def strategy(self) -> TrustRegion | LineSearchNewton:
        if self.method == "trust-ncg":
            return TrustRegion(self.eta, self.max_radius)
        return LineSearchNewton()

    # -- public steps --------------------------------------------------------------------

    def check_problem(self, x0: PyTree, args: tuple[Any, ...], name: str = "x0") -> None:
        check_floating(x0, name)
        check_scalar_fn(self.f, x0, args)
        if self.preconditioner is not None:
            diag = jax.eval_shape(self.preconditioner, x0, *args)
            check_like(x0, diag, name, "preconditioner(x, *args)")

    def init(self, x0: PyTree, *args: Any) -> MinimizeState:
        """f, the linearized ∇f and the first proposal at `x0` (status 3 if non-finite)."""
        self.check_problem(x0, args)
        return _init_jit(self, x0, args)

    def step(self, state: MinimizeState, *args: Any) -> MinimizeState:
        """One outer iteration (pure; ``jax.jit`` it). A no-op once ``status != -1``.

        Tries the pending proposal (f only), accepts or rejects it, linearizes ∇f at the
        resulting point (the one gradient pass of the step) and computes the next proposal.
        At a point with ``‖∇f‖ <= gtol`` it instead probes for negative curvature: none ends
        the run with success, some gives an escape step.
        """
        return lax.cond(state.status == RUNNING, lambda s: self._step(s, args), lambda s: s, state)

    def advance(
        self, state: MinimizeState, *args: Any, num_steps: int | jax.Array
    ) -> MinimizeState:
        """Up to `num_steps` steps (fewer if the run ends), compiled as one while loop."""
        if not isinstance(state, MinimizeState):
            msg = f"state must be a MinimizeState from init(); got {type(state).__name__}"
            raise TypeError(msg)
        self.check_problem(state.x, args, "state.x")
        return _advance_jit(self, state, args, jnp.asarray(num_steps, jnp.int32))

    def result(self, state: MinimizeState) -> OptimizeResult:
        """The :class:`~hessfree.OptimizeResult` of a state (finished or not)."""
        return OptimizeResult(
            state.x, state.fun, state.jac, state.nit, state.nfev, state.njev, state.nhev,
            state.status, state.status == SUCCESS,
        )  # fmt: skip

    def run(
        self,
        state: MinimizeState,
        *args: Any,
        chunk: int = 100,
        callback: Callable[[MinimizeState], Any] | None = None,
        progress: bool = False,
    ) -> MinimizeState:
        """Drive the solver from Python, `chunk` steps per compiled call, until it finishes.

        After each chunk ``callback(state)`` is called (return True to stop early); with
        ``progress=True`` a line with nit, f, ‖∇f‖ and status is printed.
        """
        check_positive_int(chunk, "chunk")
        while int(state.status) == RUNNING:
            state = self.advance(state, *args, num_steps=chunk)
            if progress:
                print(
                    f"nit {int(state.nit):6d}  f {float(state.fun): .6e}  "
                    f"|g| {float(tree.norm(state.jac)):.3e}  status {int(state.status)}",
                    flush=True,
                )
            if callback is not None and callback(state):
                break
        return state

    # -- implementation ------------------------------------------------------------------

    def _maxiter(self, x: PyTree) -> int:
        return min(200 * tree.size(x), 2**31 - 1) if self.maxiter is None else int(self.maxiter)

    def _cg_maxiter(self, x: PyTree) -> int:
        return (
            min(20 * tree.size(x), 2**31 - 1) if self.cg_maxiter is None else int(self.cg_maxiter)
        )

    def _precond(self, x: PyTree, args: tuple[Any, ...]) -> MatVec:
        if self.preconditioner is None:
            return lambda v: v
        diag = tree.cast_like(self.preconditioner(x, *args), x)
        return lambda v: jax.tree_util.tree_map(jnp.divide, v, diag)

    def _value(self, x: PyTree, args: tuple[Any, ...]) -> jax.Array:
        return self.f(x, *args)

    def _linearize(self, x: PyTree, args: tuple[Any, ...]) -> tuple[PyTree, MatVec]:
        g, hv = linearize_gradient(self.f, x, args, self.mode)
        return tree.cast_like(g, x), hv

    def _init(self, x0: PyTree, args: tuple[Any, ...]) -> MinimizeState:
        dtype = tree.scalar_dtype(x0)
        f0 = self._value(x0, args)
        g0, hv = self._linearize(x0, args)
        finite = jnp.isfinite(f0) & tree.all_finite(g0)
        zero = jnp.zeros((), jnp.int32)
        st = MinimizeState(
            x=x0,
            fun=f0,
            jac=g0,
            radius=jnp.asarray(self.initial_radius, dtype),
            forcing=jnp.asarray(FORCING_MAX, dtype),
            gnorm_prev=jnp.asarray(jnp.inf, dtype),
            nit=zero,
            nfev=zero + 1,
            njev=zero + 1,
            nhev=zero,
            status=jnp.asarray(NONFINITE, jnp.int32),
            proposal=no_proposal(x0),
        )
        return lax.cond(finite, lambda: self._with_next(st, hv, args), lambda: st)

    def _with_next(self, st: MinimizeState, hv: MatVec, args: tuple[Any, ...]) -> MinimizeState:
        """`st` (x, fun, jac set; hv its linearization) with the next proposal and status."""
        x, g = st.x, st.jac
        gnorm = tree.norm(g)
        stationary = gnorm <= self.gtol
        out_of_iters = st.nit >= self._maxiter(x)
        branch = jnp.where(stationary, 0, jnp.where(out_of_iters, 2, 1))
        proposal, matvecs, forcing = lax.switch(
            branch,
            [
                lambda: self._escape(hv, x, g, st.radius, st.forcing),
                lambda: self.strategy.propose(
                    hv, g, gnorm, st, self._precond(x, args), self._cg_maxiter(x)
                ),
                lambda: (no_proposal(x), jnp.zeros((), jnp.int32), st.forcing),
            ],
        )
        converged = stationary & ~proposal.negative
        status = jnp.where(
            converged,
            SUCCESS,
            jnp.where(out_of_iters, jnp.where(stationary, SADDLE, MAXITER), RUNNING),
        ).astype(jnp.int32)
        return st._replace(
            proposal=proposal,
            status=status,
            nhev=st.nhev + matvecs,
            forcing=forcing.astype(gnorm.dtype),
            gnorm_prev=gnorm,
        )

    def _escape(
        self, hv: MatVec, x: PyTree, g: PyTree, radius: jax.Array, forcing: jax.Array
    ) -> Any:
        found, d, dHd, matvecs = _probe_curvature(hv, x, g, min(self.probe_iters, tree.size(x)))
        d, dHd = self.strategy.escape(d, dHd, radius)
        true = jnp.ones((), bool)
        proposal = along(g, d, dHd, hits_boundary=true, negative=found, stationary=true)
        return proposal, matvecs, jnp.full_like(forcing, FORCING_MAX)

    def _step(self, st: MinimizeState, args: tuple[Any, ...]) -> MinimizeState:
        dtype = tree.scalar_dtype(st.x)
        tried = self.strategy.try_proposal(self._value, st, args)
        g, hv = self._linearize(tried.x, args)
        st = tried.state._replace(nit=st.nit + 1, njev=tried.state.njev + 1)
        good = st._replace(x=tried.x, fun=tried.f, jac=g)
        # an accepted point whose gradient is not finite: stay, shrink the same proposal
        bad = self.strategy.shrink(st, tried.alpha)
        bad = bad._replace(
            status=jnp.where(bad.nit >= self._maxiter(st.x), MAXITER, bad.status).astype(jnp.int32)
        )
        out = lax.cond(
            tried.stop,
            lambda: st,
            lambda: lax.cond(
                tree.all_finite(g), lambda: self._with_next(good, hv, args), lambda: bad
            ),
        )
        return out._replace(radius=out.radius.astype(dtype), forcing=out.forcing.astype(dtype))


@functools.partial(jax.jit, static_argnums=0)
def _init_jit(solver: Minimizer, x0: PyTree, args: tuple[Any, ...]) -> MinimizeState:
    return solver._init(x0, args)


@functools.partial(jax.jit, static_argnums=0)
def _advance_jit(
    solver: Minimizer, state: MinimizeState, args: tuple[Any, ...], num_steps: jax.Array
) -> MinimizeState:
    def body(carry: tuple[MinimizeState, jax.Array]) -> tuple[MinimizeState, jax.Array]:
        s, k = carry
        return solver._step(s, args), k + 1

    def cond(carry: tuple[MinimizeState, jax.Array]) -> jax.Array:
        s, k = carry
        return (s.status == RUNNING) & (k < num_steps)

    return lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))[0]


def minimize(
    f: Callable[..., Any],
    x0: PyTree,
    *args: Any,
    method: str = "trust-ncg",
    gtol: float = 1e-5,
    maxiter: int | None = None,
    mode: str = "auto",
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
    ``"newton-cg"`` stops CG at the Eisenstat-Walker forcing term ``‖r‖ <= η_k‖∇f‖`` (or at
    negative curvature, keeping a descent direction) and backtracks along it (Armijo).
    Converged when ``‖∇f(x)‖₂ <= gtol`` and a CG probe finds no negative curvature at x; at
    a saddle the solver steps along the negative curvature instead of stopping. A trial
    point with non-finite f or ∇f is rejected and the step shrunk. The solve is one
    ``lax.while_loop``, compiled once per f, settings and shapes: ``jit``- and
    ``vmap``-able over ``x0`` or ``args``; float32 and float64 are kept as given.

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
        mode: HVP mode, as in :func:`hessfree.hvp`.
        preconditioner: optional ``(x, *args) -> d``, a positive pytree like x approximating
            the Hessian diagonal; CG then uses ``M v = v / d``.
        initial_radius, max_radius: trust-ncg's region (scipy's defaults).
        eta: trust-ncg's acceptance ratio: a step is taken when ``ρ > eta`` (scipy's name).
        cg_maxiter: at most this many inner CG iterations per outer one; default 20·n.
        probe_iters: HVPs spent looking for negative curvature at a stationary point.

    Returns:
        :class:`~hessfree.OptimizeResult`; ``status`` 0 success, 1 maxiter, 2 precision
        loss, 3 non-finite, 4 saddle (``message`` gives the text).

    Raises:
        ValueError: `f` not scalar; unknown `method` or `mode`; bad settings.
        TypeError: `x0` has non-floating leaves; `f` not callable.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> rosen = lambda x: (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        >>> res = hf.minimize(rosen, jnp.array([-1.2, 1.0]))
        >>> res.x.round(4).tolist(), int(res.status)  # scipy's trust-ncg: [1, 1]
        ([1.0, 1.0], 0)

    References:
        Nocedal & Wright, Numerical Optimization, 2nd ed. 2006, ch. 4-7 (Alg. 4.1, 7.1, 7.2).
        Steihaug, SIAM J. Numer. Anal. 1983. Eisenstat & Walker, SIAM J. Sci. Comput. 1996.
        Moré & Sorensen, Math. Programming 1979 (negative curvature in line searches).
    """
    solver = Minimizer(
        f, method=method, gtol=gtol, maxiter=maxiter, mode=mode, preconditioner=preconditioner,
        initial_radius=initial_radius, max_radius=max_radius, eta=eta, cg_maxiter=cg_maxiter,
        probe_iters=probe_iters,
    )  # fmt: skip
    state = solver.init(x0, *args)
    state = solver.advance(state, *args, num_steps=np.iinfo(np.int32).max)
    return solver.result(state)

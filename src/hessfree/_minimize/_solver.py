"""Newton-CG and trust-region Newton-CG minimization that never forms the Hessian.

Every outer iteration linearizes the gradient once (one gradient pass whose residuals are
kept), so each inner CG iteration costs one tangent pass, not a full Hessian-vector product,
and trial points cost one evaluation of f each. The whole solve is one ``lax.while_loop`` over
:meth:`Minimizer.step`, whose state is a pytree: a run can be stopped, saved, reloaded and
resumed bit for bit. The two methods are strategies (:mod:`._trust`, :mod:`._newton`) behind
one loop; CG is preconditioned by default with a Jacobi diagonal estimated from a few
products where the curvature is badly scaled (:mod:`._jacobi`). Status codes come from the
shared table (``hessfree.STATUS_MESSAGES``): 0 success, 1 maxiter, 2 precision loss, 3
non-finite, 4 saddle, 7 curvature too small to tell. :func:`minimize` is differentiable in
its ``args`` by the implicit function theorem.
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

from .. import _tree as tree
from .._cg import pcg
from .._krylov import lanczos_tree, normalize, pseudo_random
from .._products import VALID_MODES, linearize_gradient
from .._results import (
    CURVATURE_UNRESOLVED,
    MAXITER,
    NONFINITE,
    RUNNING,
    SADDLE,
    SUCCESS,
    OptimizeResult,
)
from .._staging import LATENCY, for_latency
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
from . import _jacobi as jacobi
from ._newton import FORCING_MAX, LineSearchNewton
from ._proposal import MinimizeState, Tried, along, no_proposal
from ._trust import TrustRegion

METHODS = ("trust-ncg", "newton-cg")
PRECONDITIONERS = ("auto", "diagonal")
MatVec = Callable[[PyTree], PyTree]


# Rounding level of a computed curvature vᵀHv (‖v‖ = 1), in units of eps·‖H‖: products and
# inner products each carry a few eps·‖H‖ of error, growing mildly with the dimension.
_ROUNDING = 64
_PROBE_SEED = 0  # the saddle probe's start vector
# its fresh directions after a breakdown: a constant, so no threefry is compiled into the
# program (the seed ``_krylov.seed_of(jax.random.PRNGKey(1))``, which it used to draw)
_LANCZOS_SEED = np.uint32(1883912375)
_JACOBI_SEED = 1  # the Jacobi estimate's probes (one seed per round from here)


class Probe(NamedTuple):
    """What the saddle probe found: ``negative`` curvature (direction `d`, curvature `dHd`),
    or curvature ``unresolved`` (the smallest within rounding of zero), or neither."""

    negative: jax.Array
    unresolved: jax.Array
    d: PyTree
    dHd: jax.Array
    matvecs: jax.Array


def _probe_curvature(hv: MatVec, x: PyTree, g: PyTree, iters: int) -> Probe:
    """The smallest curvature of H at x over an `iters`-dimensional Krylov space.

    `iters` Lanczos steps (full reorthogonalization, :func:`hessfree._krylov.lanczos_tree`)
    from a fixed generic start (a hashed uniform vector, :func:`._krylov.pseudo_random`) give
    the tridiagonal ``T``; its smallest Ritz pair ``(θ, y)`` minimizes the Rayleigh quotient
    over the Krylov space, so it sees at least as much negative curvature as any CG pivot
    there. The curvature ``c = yᵀHy`` is then recomputed with one more product and compared
    with the rounding level ``τ = 64·eps·‖H‖`` (``‖H‖`` estimated by ``max |θᵢ|``), a
    relative test that only discards what rounding could have made: ``c < −τ`` is negative curvature (y, pointing downhill, ``gᵀy <= 0``); ``|c| <= τ``
    (or a non-finite c) is *unresolved*: whether x is a minimum cannot be told in this
    precision. Every quantity is computed on unit vectors, so it is scale-free: f·10³⁰ and
    f·10⁻³⁰ give the same decisions. Success after a probe means "no negative curvature in
    the Krylov space", exact when ``iters >= n``. Cost: ``iters + 1`` products and
    ``O(iters·n)`` memory for the basis.
    """
    u = pseudo_random(_PROBE_SEED, x)
    eps = jnp.finfo(tree.scalar_dtype(x)).eps

    def matvec(v: PyTree) -> PyTree:
        return tree.cast_like(hv(v), x)

    alphas, betas, V = lanczos_tree(matvec, u, iters, _LANCZOS_SEED)
    # T = diag(α) + diag(β[:-1], 1) + diag(β[:-1], -1), summed in that order, as one
    # elementwise expression (jnp.diag's pads are a kernel each)
    i = jnp.arange(iters)[:, None]
    k = jnp.arange(iters)[None, :]
    T = (
        jnp.where(i == k, alphas[None, :], 0)
        + jnp.where(k == i + 1, betas[:, None], 0)
        + jnp.where(i == k + 1, betas[None, :], 0)
    )
    theta, S = jnp.linalg.eigh(T)
    y, _ = normalize(tree.combine(S[:, 0], V))
    c = tree.vdot(y, matvec(y))
    tau = _ROUNDING * eps * jnp.maximum(jnp.max(jnp.abs(theta)), jnp.abs(c))
    finite = jnp.isfinite(c) & jnp.all(jnp.isfinite(theta))
    negative = finite & (c < -tau)
    unresolved = ~negative & (~finite | (c <= tau))
    sign = jnp.where(tree.vdot(g, y) > 0, -1.0, 1.0)
    d = tree.scale(sign, y)
    return Probe(
        negative, unresolved, d, jnp.where(negative, c, 0), jnp.asarray(iters + 1, jnp.int32)
    )


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
    preconditioner: Callable[..., PyTree] | str | None = "auto"
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
        if isinstance(self.preconditioner, str) and self.preconditioner not in PRECONDITIONERS:
            msg = (
                f"preconditioner must be one of {list(PRECONDITIONERS)}, None or a callable "
                f"preconditioner(x, *args) -> positive pytree like x; got {self.preconditioner!r}"
            )
            raise ValueError(msg)
        if self.preconditioner is not None and not isinstance(self.preconditioner, str):
            check_callable(
                self.preconditioner,
                "preconditioner",
                "preconditioner(x, *args) -> positive pytree like x (or be None, 'auto' or "
                "'diagonal')",
            )

    @property
    def strategy(self) -> TrustRegion | LineSearchNewton:
        if self.method == "trust-ncg":
            return TrustRegion(self.eta, self.max_radius)
        return LineSearchNewton()

    # -- public steps --------------------------------------------------------------------

    @property
    def estimates_diagonal(self) -> bool:
        """Whether the diagonal is estimated from products ("auto", "diagonal")."""
        return isinstance(self.preconditioner, str)

    def check_problem(self, x0: PyTree, args: tuple[Any, ...], name: str = "x0") -> None:
        check_floating(x0, name)
        check_scalar_fn(self.f, x0, args)
        if callable(self.preconditioner):
            diag = jax.eval_shape(self.preconditioner, x0, *args)
            check_like(x0, diag, name, "preconditioner(x, *args)")

    def init(self, x0: PyTree, *args: Any) -> MinimizeState:
        """f and ∇f at `x0` (status 3 if non-finite); the first :meth:`step` proposes.

        The state's proposal is ``empty``: the first step linearizes ∇f at x0 and computes the
        first proposal (and, with ``preconditioner="diagonal"``, the diagonal) without counting
        an iteration. So ``init`` compiles only f and its gradient; the proposal's machinery
        is compiled once, in :meth:`advance`.
        """
        self.check_problem(x0, args)
        return _programs(x0, args)[0](self, x0, args)

    def step(self, state: MinimizeState, *args: Any) -> MinimizeState:
        """One outer iteration (pure; ``jax.jit`` it). A no-op once ``status != -1``.

        Tries the pending proposal (f only), accepts or rejects it, linearizes ∇f at the
        resulting point (the one gradient pass of the step) and computes the next proposal.
        On a state fresh from :meth:`init` it only computes the first proposal (``nit`` stays
        0).
        At a point with ``‖∇f‖ <= gtol`` it instead probes for negative curvature: none ends
        the run with success, some gives an escape step, and a smallest curvature within
        rounding of zero ends it with status 7 (too small to tell: never a success).
        """
        return lax.cond(state.status == RUNNING, lambda s: self._step(s, args), lambda s: s, state)

    def advance(
        self, state: MinimizeState, *args: Any, num_steps: int | jax.Array
    ) -> MinimizeState:
        """Up to `num_steps` steps (fewer if the run ends), compiled as one while loop.

        Raises ValueError if a leaf of `state` does not have the dtype of its problem (see
        :meth:`check_state_dtypes`): a saved state resumes in the precision it was saved in.
        """
        if not isinstance(state, MinimizeState):
            msg = f"state must be a MinimizeState from init(); got {type(state).__name__}"
            raise TypeError(msg)
        self.check_problem(state.x, args, "state.x")
        self.check_state_dtypes(state, args)
        advance = _programs(state.x, args)[1]
        return advance(self, state, args, jnp.asarray(num_steps, jnp.int32))

    def check_state_dtypes(self, state: MinimizeState, args: tuple[Any, ...]) -> None:
        """Refuse a state whose leaves do not all have the dtypes of its problem.

        The problem's dtype is that of ``state.x`` (``x0``'s in the run that made it): every
        leaf must have the dtype :meth:`init` gives at such a point, and JAX must be able to
        hold it (a float64 leaf while ``jax_enable_x64`` is off would silently become
        float32). A run saved in float64 and resumed must therefore be resumed in float64;
        cast the whole state yourself to change its precision.
        """
        expected = jax.eval_shape(functools.partial(_init_jit, self), state.x, args)
        paths = jax.tree_util.tree_leaves_with_path(state)
        want = jax.tree_util.tree_leaves(expected)
        for (path, leaf), ref in zip(paths, want, strict=True):
            name = "state" + jax.tree_util.keystr(path)
            got = np.dtype(leaf.dtype if hasattr(leaf, "dtype") else np.result_type(leaf))
            held = np.dtype(jax.dtypes.canonicalize_dtype(got))
            if held != got:
                msg = (
                    f"{name} has dtype {got}, which JAX cannot hold with jax_enable_x64 off: it "
                    f"would silently continue in {held}. Resume a {got} state with "
                    f"jax_enable_x64 on, or start again from x0 in {held}."
                )
                raise ValueError(msg)
            if got != np.dtype(ref.dtype):
                msg = (
                    f"{name} has dtype {got} but the problem (state.x, x0's dtype, and f) "
                    f"needs {np.dtype(ref.dtype)}: a state saved in one precision cannot "
                    f"continue in another. Load every leaf of the state in the dtype it was "
                    f"saved in, or start again from x0."
                )
                raise ValueError(msg)

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

    def _diagonal(self, st: MinimizeState, args: tuple[Any, ...]) -> PyTree | None:
        """The preconditioner's diagonal D at st.x (CG uses ``M v = v / D``), or None."""
        if self.preconditioner is None:
            return None
        if self.estimates_diagonal:
            return st.diagonal
        assert callable(self.preconditioner)
        return tree.cast_like(self.preconditioner(st.x, *args), st.x)

    def _value(self, x: PyTree, args: tuple[Any, ...]) -> jax.Array:
        return self.f(x, *args)

    def _linearize(self, x: PyTree, args: tuple[Any, ...]) -> tuple[PyTree, MatVec]:
        g, hv = linearize_gradient(self.f, x, args, self.mode)
        return tree.cast_like(g, x), hv

    def _init(self, x0: PyTree, args: tuple[Any, ...]) -> MinimizeState:
        dtype = tree.scalar_dtype(x0)
        f0, g0 = jax.value_and_grad(self.f)(x0, *args)
        g0 = tree.cast_like(g0, x0)
        finite = jnp.isfinite(f0) & tree.all_finite(g0)
        zero = jnp.zeros((), jnp.int32)
        if self.preconditioner == "diagonal":
            phase = jacobi.ESTIMATE
        elif self.preconditioner == "auto":
            phase = jacobi.UNSCALED
        else:
            phase = jacobi.DECLINED
        return MinimizeState(
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
            status=jnp.where(finite, RUNNING, NONFINITE).astype(jnp.int32),
            proposal=no_proposal(x0),
            diagonal=jacobi.ones_like(x0) if self.estimates_diagonal else None,
            jacobi=jnp.asarray(phase, jnp.int32),
        )

    def _estimate(self, st: MinimizeState, hv: MatVec) -> MinimizeState:
        """`st` with the Jacobi diagonal estimated at st.x (phase ESTIMATE → SCALED/DECLINED)."""
        est = jacobi.estimate(hv, st.x, _JACOBI_SEED)
        use = est.finite
        if self.preconditioner == "auto":
            use = use & jnp.isfinite(est.after) & (jacobi.GAIN * est.after <= est.before)
        return st._replace(
            diagonal=tree.where(use, est.diagonal, jacobi.ones_like(st.x)),
            jacobi=jnp.where(use, jacobi.SCALED, jacobi.DECLINED).astype(jnp.int32),
            nhev=st.nhev + est.matvecs,
        )

    def _with_next(self, st: MinimizeState, hv: MatVec, args: tuple[Any, ...]) -> MinimizeState:
        """`st` (x, fun, jac set; hv its linearization) with the next proposal and status."""
        if self.estimates_diagonal:
            st = lax.cond(st.jacobi == jacobi.ESTIMATE, lambda: self._estimate(st, hv), lambda: st)
        x, g = st.x, st.jac
        diag = self._diagonal(st, args)
        precond: MatVec = (lambda v: v) if diag is None else (lambda v: jacobi.divide(v, diag))
        gnorm = tree.norm(g)
        stationary = gnorm <= self.gtol
        out_of_iters = st.nit >= self._maxiter(x)
        branch = jnp.where(stationary, 0, jnp.where(out_of_iters, 2, 1))
        false = jnp.zeros((), bool)
        proposal, matvecs, forcing, unresolved = lax.switch(
            branch,
            [
                lambda: self._escape(hv, x, g, st.radius, st.forcing, diag),
                lambda: (
                    *self.strategy.propose(hv, g, gnorm, st, precond, self._cg_maxiter(x)),
                    false,
                ),
                lambda: (no_proposal(x), jnp.zeros((), jnp.int32), st.forcing, false),
            ],
        )
        converged = stationary & ~proposal.negative & ~unresolved
        status = jnp.where(
            converged,
            SUCCESS,
            jnp.where(
                stationary & unresolved,
                CURVATURE_UNRESOLVED,
                jnp.where(out_of_iters, jnp.where(stationary, SADDLE, MAXITER), RUNNING),
            ),
        ).astype(jnp.int32)
        phase = st.jacobi
        if self.preconditioner == "auto":  # a long CG solve: estimate D at the next point
            long_solve = (branch == 1) & (matvecs >= jacobi.AFTER)
            phase = jnp.where((phase == jacobi.UNSCALED) & long_solve, jacobi.ESTIMATE, phase)
        return st._replace(
            proposal=proposal,
            status=status,
            nhev=st.nhev + matvecs,
            forcing=forcing.astype(gnorm.dtype),
            gnorm_prev=gnorm,
            jacobi=phase.astype(jnp.int32),
        )

    def _escape(
        self,
        hv: MatVec,
        x: PyTree,
        g: PyTree,
        radius: jax.Array,
        forcing: jax.Array,
        diag: PyTree | None,
    ) -> Any:
        probe = _probe_curvature(hv, x, g, min(self.probe_iters, tree.size(x)))
        # the probe's direction has ‖d‖₂ = 1; trust-ncg's region is in the norm ‖·‖_D
        dnorm = jnp.ones_like(radius) if diag is None else jacobi.weighted_norm(probe.d, diag)
        d, dHd, step_norm = self.strategy.escape(probe.d, probe.dHd, radius, dnorm)
        true = jnp.ones((), bool)
        proposal = along(g, d, dHd, hits_boundary=true, negative=probe.negative, stationary=true)
        proposal = proposal._replace(step_norm=step_norm.astype(proposal.step_norm.dtype))
        return proposal, probe.matvecs, jnp.full_like(forcing, FORCING_MAX), probe.unresolved

    def _step(self, st: MinimizeState, args: tuple[Any, ...]) -> MinimizeState:
        dtype = tree.scalar_dtype(st.x)
        empty = st.proposal.empty  # fresh from init: propose at x, try nothing
        one = jnp.ones((), dtype)
        false = jnp.zeros((), bool)
        tried = lax.cond(
            empty,
            lambda: Tried(st, st.x, st.fun, false, one),
            lambda: self.strategy.try_proposal(self._value, st, args),
        )
        g, hv = self._linearize(tried.x, args)
        st = tried.state._replace(
            nit=st.nit + jnp.where(empty, 0, 1).astype(st.nit.dtype),
            njev=tried.state.njev + 1,
        )
        good = st._replace(x=tried.x, fun=tried.f, jac=g)
        # an accepted point whose gradient is not finite: stay, shrink the same proposal
        bad = self.strategy.shrink(st, tried.alpha)
        bad_status = jnp.where(bad.nit >= self._maxiter(st.x), MAXITER, bad.status)
        bad = bad._replace(status=jnp.where(empty, NONFINITE, bad_status).astype(jnp.int32))
        out = lax.cond(
            tried.stop,
            lambda: st,
            lambda: lax.cond(
                tree.all_finite(g), lambda: self._with_next(good, hv, args), lambda: bad
            ),
        )
        return out._replace(radius=out.radius.astype(dtype), forcing=out.forcing.astype(dtype))


def _init_impl(solver: Minimizer, x0: PyTree, args: tuple[Any, ...]) -> MinimizeState:
    return solver._init(x0, args)


def _advance_impl(
    solver: Minimizer, state: MinimizeState, args: tuple[Any, ...], num_steps: jax.Array
) -> MinimizeState:
    def body(carry: tuple[MinimizeState, jax.Array]) -> tuple[MinimizeState, jax.Array]:
        s, k = carry  # the step that only makes init's first proposal is not counted
        return solver._step(s, args), k + jnp.where(s.proposal.empty, 0, 1).astype(k.dtype)

    def cond(carry: tuple[MinimizeState, jax.Array]) -> jax.Array:
        s, k = carry
        return (s.status == RUNNING) & (k < num_steps)

    return lax.while_loop(cond, body, (state, jnp.zeros((), jnp.int32)))[0]


_init_jit = jax.jit(_init_impl, static_argnums=0)
_advance_jit = jax.jit(_advance_impl, static_argnums=0)

# small problems compile for latency (hessfree._staging.for_latency)
_init_small = jax.jit(_init_impl, static_argnums=0, compiler_options=LATENCY)
_advance_small = jax.jit(_advance_impl, static_argnums=0, compiler_options=LATENCY)


def _programs(x: PyTree, args: tuple[Any, ...]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(init, advance)``: compiled for latency on small problems
    (:func:`hessfree._staging.for_latency`), else with XLA's defaults."""
    if for_latency(jax.tree_util.tree_leaves((x, args))):
        return _init_small, _advance_small
    return _init_jit, _advance_jit


def minimize(
    f: Callable[..., Any],
    x0: PyTree,
    *args: Any,
    method: str = "trust-ncg",
    gtol: float = 1e-5,
    maxiter: int | None = None,
    mode: str = "auto",
    preconditioner: Callable[..., PyTree] | str | None = "auto",
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
    Converged when ``‖∇f(x)‖₂ <= gtol`` and a Lanczos probe finds no negative curvature at
    x; at a saddle the solver steps along the negative curvature instead of stopping. The
    probe's test is relative and at rounding level: curvature below ``−64·eps·‖H‖`` is a
    direction to escape along; a smallest curvature within ``±64·eps·‖H‖`` of zero (e.g.
    ``x0² + x1³`` at 0) ends with status 7, never success. Steps, norms and the model are
    computed on rescaled vectors, so f scaled by 1e-30…1e30 is no cause of overflow. A trial
    point with non-finite f or ∇f is rejected and the step shrunk. The solve is one
    ``lax.while_loop``, compiled once per f, settings and shapes: ``jit``- and
    ``vmap``-able over ``x0`` or ``args``; float32 and float64 are kept as given.

    Cost per iteration: one linearization of ∇f (one gradient pass), one tangent pass per
    inner CG iteration (at most ``20·n``, or `cg_maxiter`), one f per trial point; at a
    stationary point ``min(probe_iters, n) + 1`` tangent passes for the saddle probe (and
    ``probe_iters`` vectors of memory). The first step recomputes ∇f at x0 with its
    linearization (``njev`` counts it). The default preconditioner adds at most 6 tangent
    passes to a whole run (below); all products are counted in ``nhev``.

    Preconditioning (``preconditioner="auto"``, the default): badly scaled curvature (a
    Hessian diagonal spanning orders of magnitude, e.g. features on different scales) makes
    CG take hundreds of products per step. The first time an outer iteration's CG needs 10
    or more products, the Hessian diagonal D is estimated at the next point from 6 products
    with Rademacher probes, refined in the scaled basis ``D^{-1/2} H D^{-1/2}`` (Hutchinson's
    estimate alone drowns small diagonal entries in the coupling to large ones), with
    ``|·|`` and a floor ``eps^¾·max D`` so it is positive on indefinite H. D is kept only if
    it divides the measured eigenvalue dispersion ``n tr(A²)/tr(A)²`` at least by 2: then CG
    uses ``M v = v / D`` (Jacobi) for the rest of the run, and trust-ncg's region, its
    boundary steps and its escapes from saddles are measured in ``‖s‖_D = √(sᵀDs)`` (D
    normalized to mean 1; Steihaug 1983, N&W Alg. 7.2). Runs whose CG solves stay short
    (well-conditioned or small problems) never estimate and follow the unpreconditioned
    path exactly; runs on badly scaled logistic regression need tens of times fewer
    products (``benchmarks/bench_minimize.py``). Under ``vmap`` a batched ``lax.cond``
    computes both branches, so the estimate's 6 products (like the saddle probe's) are
    then spent at every step.

    Differentiation: ``jax.grad``/``jax.vjp``/``jax.jacrev`` of a function of ``result.x``
    with respect to `args` use the implicit function theorem at the solution,
    ``dx*/dθ = −(∇²ₓf)⁻¹ ∂²f/∂x∂θ``: the backward pass solves ``∇²ₓf(x*) u = x̄`` by CG on
    Hessian-vector products at x* (at most 20·n products) and returns ``−(∂∇ₓf/∂θ)ᵀ u``; it
    never differentiates through the iterations. This is exact only at a strict minimum
    (meet a small `gtol`); where CG meets non-positive curvature the gradient is NaN. `x0`
    gets a zero gradient (x* does not depend on it), and every other field of the result
    (``fun``, ``jac``, counters, ``status``) is a constant to differentiation. Reverse
    mode only (``jax.jvp``/``jacfwd`` are not supported: a ``custom_vjp``).

    Args:
        f: scalar function ``f(x, *args)``.
        x0: starting point, any pytree of floating arrays.
        *args: further arguments of `f` (data), held fixed; they may be batched by ``vmap``
            and differentiated (implicitly, see above).
        method: ``"trust-ncg"`` or ``"newton-cg"``.
        gtol: stop when the gradient's 2-norm is at most this.
        maxiter: at most this many outer iterations; default ``200·n`` (scipy's).
        mode: HVP mode, as in :func:`hessfree.hvp`.
        preconditioner: ``"auto"`` (default: a Jacobi preconditioner estimated and kept
            only where it helps, see above), ``"diagonal"`` (the same estimate at x0, always
            kept: 6 products), None (plain CG, Euclidean trust region) or a callable
            ``(x, *args) -> d``, a positive pytree like x approximating the Hessian
            diagonal, evaluated at every outer iteration; CG then uses ``M v = v / d``.
        initial_radius, max_radius: trust-ncg's region (scipy's defaults).
        eta: trust-ncg's acceptance ratio: a step is taken when ``ρ > eta`` (scipy's name).
        cg_maxiter: at most this many inner CG iterations per outer one; default 20·n.
        probe_iters: Lanczos steps spent looking for negative curvature at a stationary
            point (exact when ``>= n``; a negative eigenvalue hidden among many others may
            need more).

    Returns:
        :class:`~hessfree.OptimizeResult`; ``status`` 0 success, 1 maxiter, 2 precision
        loss, 3 non-finite, 4 saddle, 7 curvature too small to tell (``message`` gives the
        text).

    Raises:
        ValueError: `f` not scalar; unknown `method`, `mode` or `preconditioner` name; bad
            settings.
        TypeError: `x0` has non-floating leaves; `f` or `preconditioner` not callable.

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
        Hutchinson, Commun. Stat. Simul. Comput. 1990; Bekas, Kokiopoulou & Saad, Appl.
        Numer. Math. 2007 (diagonal estimation); Ruiz, RAL-TR-2001-034 (iterative scaling).
        Moré & Sorensen, Math. Programming 1979 (negative curvature in line searches).
        Implicit differentiation: Krantz & Parks, The Implicit Function Theorem, 2002;
        Blondel et al., "Efficient and modular implicit differentiation", NeurIPS 2022.
    """
    solver = Minimizer(
        f, method=method, gtol=gtol, maxiter=maxiter, mode=mode, preconditioner=preconditioner,
        initial_radius=initial_radius, max_radius=max_radius, eta=eta, cg_maxiter=cg_maxiter,
        probe_iters=probe_iters,
    )  # fmt: skip
    solver.check_problem(x0, args)  # before any JAX call, so bad leaves get our message
    x0_c, args_c = jax.tree_util.tree_map(_stop_array_gradient, (x0, args))
    # init and advance without their checks: the problem was just checked, the state is new
    init, advance = _programs(x0_c, args_c)
    state = init(solver, x0_c, args_c)
    state = advance(solver, state, args_c, jnp.asarray(np.iinfo(np.int32).max, jnp.int32))
    res = solver.result(state)
    return res._replace(x=_implicit_solution(solver, res.x, args))


# --- implicit differentiation -------------------------------------------------------------


def _stop_array_gradient(leaf: Any) -> Any:
    """``stop_gradient`` on array leaves; other leaves of `args` (static data) pass as is."""
    return lax.stop_gradient(leaf) if isinstance(leaf, jax.Array | np.ndarray | float) else leaf


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _implicit_solution(solver: Minimizer, x_star: PyTree, args: tuple[Any, ...]) -> PyTree:
    """``x*`` itself; its derivative in `args` is the implicit function theorem's."""
    del solver, args
    return x_star


def _implicit_fwd(
    solver: Minimizer, x_star: PyTree, args: tuple[Any, ...]
) -> tuple[PyTree, tuple[PyTree, tuple[Any, ...]]]:
    return x_star, (x_star, args)


def _implicit_bwd(
    solver: Minimizer, res: tuple[PyTree, tuple[Any, ...]], x_bar: PyTree
) -> tuple[PyTree, tuple[Any, ...]]:
    x_star, args = res
    theta_bar = _implicit_vjp(solver, x_star, args, x_bar)
    return tree.zeros_like(x_star), theta_bar


_implicit_solution.defvjp(_implicit_fwd, _implicit_bwd)


@functools.partial(jax.jit, static_argnums=0)
def _implicit_vjp(
    solver: Minimizer, x_star: PyTree, args: tuple[Any, ...], x_bar: PyTree
) -> tuple[Any, ...]:
    """``θ̄ = −(∂²f/∂θ∂x) u`` with ``∇²ₓf(x*) u = x̄``, solved by CG on products at x*.

    At a strict minimum ``∇ₓf(x*(θ), θ) = 0`` defines x*(θ) with ``dx*/dθ = −H⁻¹ ∂²f/∂x∂θ``
    (implicit function theorem), so ``θ̄ = (dx*/dθ)ᵀ x̄ = −(∂∇ₓf/∂θ)ᵀ u``: one CG solve
    (at most 20·n products, relative residual ``eps^¾``) and one VJP of ∇ₓf in θ. If H is
    not positive definite at x* (CG meets ``pᵀHp <= 0``: not a strict minimum) or the
    solve breaks down, the gradient is NaN rather than silently wrong.
    """
    x_bar = tree.cast_like(x_bar, x_star)
    _, hv = solver._linearize(x_star, args)
    eps = jnp.finfo(tree.scalar_dtype(x_star)).eps
    st = pcg(
        lambda v: tree.cast_like(hv(v), x_star), x_bar, None, lambda v: v,
        jnp.zeros((), eps.dtype), solver._cg_maxiter(x_star), rtol=jnp.asarray(eps**0.75), verify=True,
    )  # fmt: skip
    bad = st.negative | st.broken
    u = tree.where(bad, jax.tree_util.tree_map(lambda v: jnp.full_like(v, jnp.nan), st.x), st.x)

    def grad_in_args(a: tuple[Any, ...]) -> PyTree:
        return tree.cast_like(jax.grad(solver.f)(x_star, *a), x_star)

    _, pullback = jax.vjp(grad_in_args, args)
    (theta_bar,) = pullback(tree.neg(u))
    return theta_bar

"""Martens' Hessian-free optimizer as an optax transformation.

One step, at parameters θ with gradient g of the batch-mean loss and a curvature batch (X, Y):
solve ``(B + λI) p = −g`` by preconditioned CG on products with the curvature B (Gauss-Newton
by default) at (X, Y), warm-started from the previous solution times a decay, stopped by
Martens' relative-progress test; keep a few CG iterates and take the one with the lowest
batch loss; scale it by an Armijo backtracking line search; adapt λ by Levenberg-Marquardt
from the reduction ratio ρ. Everything is one jittable function of arrays, the state is a
pytree, and nothing recompiles from step to step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
import optax

from .. import _tree as tree
from .._losses import LOSSES, check_targets, get_loss
from .._model_curvature import fisher, ggn
from .._operators import CurvatureOperator, apply, hessian
from .._staging import staged
from .._validation import (
    PyTree,
    check_callable,
    check_choice,
    check_floating,
    check_number,
    check_positive_int,
    describe_tree,
)

CURVATURES = ("ggn", "hessian", "fisher")


class HessianFreeState(NamedTuple):
    """The optimizer's state: a pytree (checkpoint it, shard it like the parameters).

    Attributes:
        count: steps taken (int32).
        damping: the Levenberg-Marquardt damping λ used for the next step.
        direction: the last CG solution p (warm start: CG begins at ``decay · p``).
        key: the random key for Monte-Carlo Fisher curvature (unused otherwise).
        rho: the last step's reduction ratio ``(f(θ+p) − f(θ)) / (q(p) − q(0))``.
        cg_iterations: CG iterations (curvature products) of the last step.
        loss_before, loss_after: the curvature batch's loss before and after the last update.
        step_size: the last update's scale (line-search α times the learning rate).
        skipped: the last step was refused (non-finite loss, gradient or curvature, or no
            decrease found): parameters unchanged, damping raised, warm start reset.
        converged: the last step's predicted and actual reductions were both at rounding
            level: nothing left to gain on this batch in this precision (damping kept).
    """

    count: jax.Array
    damping: jax.Array
    direction: PyTree
    key: jax.Array
    rho: jax.Array
    cg_iterations: jax.Array
    loss_before: jax.Array
    loss_after: jax.Array
    step_size: jax.Array
    skipped: jax.Array
    converged: jax.Array


class _BatchLoss:
    """``θ -> loss(model(θ, X), Y)``: the batch-mean loss, static, compared by its parts."""

    __slots__ = ("__weakref__", "loss", "model")

    def __init__(self, model: Callable[..., Any], loss: str | Callable[..., Any]) -> None:
        self.model, self.loss = model, loss

    def __hash__(self) -> int:
        return hash(
            (_BatchLoss, id(self.model), self.loss if isinstance(self.loss, str) else id(self.loss))
        )

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _BatchLoss)
            and other.model is self.model
            and (other.loss is self.loss or other.loss == self.loss)
        )

    def __call__(self, params: PyTree, inputs: PyTree, targets: PyTree) -> jax.Array:
        outputs = self.model(params, inputs)
        value = get_loss(self.loss).value if isinstance(self.loss, str) else self.loss
        return value(outputs, targets)


def _save_schedule(maxiter: int) -> np.ndarray:
    """Iterations ``⌈1.3^j⌉`` at which a CG iterate is kept (Martens 2010, sec. 4.6)."""
    marks = np.zeros(maxiter + 1, bool)
    j = 0
    while (i := math.ceil(1.3**j)) <= maxiter:
        marks[i] = True
        j += 1
    return marks


class _CG(NamedTuple):
    x: PyTree
    r: PyTree
    z: PyTree
    d: PyTree
    rz: jax.Array
    i: jax.Array
    phi: jax.Array  # (maxiter + 1,) the damped model's value at each iterate
    slots: PyTree  # (K, ...) kept iterates, a ring
    slot_phi: jax.Array
    slot_iter: jax.Array
    num_saved: jax.Array
    done: jax.Array


def _martens_cg(
    matvec: Callable[[PyTree], PyTree],
    g: PyTree,
    x0: PyTree,
    precondition: Callable[[PyTree], PyTree],
    maxiter: int,
    tol: float,
    keep: int,
) -> _CG:
    """PCG on ``A x = −g`` from x0, stopped by Martens' progress test; keeps `keep` iterates.

    ``φ(x) = ½xᵀAx + gᵀx = ½xᵀ(g − r)`` with ``r = −g − Ax`` (no extra product). Stop at i when
    ``i > k``, ``φ_i < 0`` and ``(φ_i − φ_{i−k}) / φ_i < k·tol`` with ``k = max(10, ⌈i/10⌉)``,
    at `maxiter`, or at non-positive or non-finite curvature ``dᵀAd`` (the last iterate kept).
    Iterates at iterations ``⌈1.3^j⌉`` and the last one go into a ring of `keep` slots.
    """
    dtype = tree.scalar_dtype(x0)
    marks = jnp.asarray(_save_schedule(maxiter))
    r0 = tree.sub(tree.neg(g), matvec(x0))
    z0 = precondition(r0)
    phi0 = 0.5 * tree.vdot(x0, tree.sub(g, r0))
    rz0 = tree.vdot(r0, z0)
    gg = tree.vdot(g, g)
    empty = tree.empty_basis(tree.zeros_like(x0), keep)  # in x0's layout

    def store(s: _CG, x: PyTree, phi: jax.Array, i: jax.Array) -> tuple:
        slot = s.num_saved % keep
        slots = jax.tree_util.tree_map(lambda S, a: S.at[slot].set(a), s.slots, x)
        return slots, s.slot_phi.at[slot].set(phi), s.slot_iter.at[slot].set(i), s.num_saved + 1

    def body(s: _CG) -> _CG:
        Ad = matvec(s.d)
        curv = tree.vdot(s.d, Ad)
        good = (curv > 0) & jnp.isfinite(curv)
        alpha = jnp.where(good, s.rz / jnp.where(good, curv, 1), 0)
        x = tree.axpy(alpha, s.d, s.x)
        r = tree.axpy(-alpha, Ad, s.r)
        z = precondition(r)
        rz = tree.vdot(r, z)
        d = tree.axpy(rz / jnp.where(s.rz == 0, 1, s.rz), s.d, z)
        i = s.i + 1
        phi_i = 0.5 * tree.vdot(x, tree.sub(g, r))
        good = good & jnp.isfinite(phi_i) & tree.all_finite(x)
        phi = s.phi.at[i].set(phi_i)
        k = jnp.maximum(10, jnp.ceil(0.1 * i).astype(i.dtype))
        before = phi[jnp.maximum(i - k, 0)]
        progress = (
            (i > k) & (phi_i < 0) & ((phi_i - before) / jnp.where(phi_i == 0, 1, phi_i) < k * tol)
        )
        new = s._replace(x=x, r=r, z=z, d=d, rz=rz, i=i, phi=phi)
        saved = new._replace(
            **dict(
                zip(
                    ("slots", "slot_phi", "slot_iter", "num_saved"),
                    store(new, x, phi_i, i),
                    strict=True,
                )
            )
        )
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(marks[i], b, a), new, saved)
        new = jax.tree_util.tree_map(
            lambda a, b: jnp.where(good, a, b), new, s._replace(done=s.done)
        )
        small = tree.vdot(r, r) <= (64 * jnp.finfo(dtype).eps) ** 2 * gg  # r at rounding
        finished = ~good | progress | (i >= maxiter) | small
        return new._replace(done=finished)

    init = _CG(
        x=x0, r=r0, z=z0, d=z0, rz=rz0, i=jnp.zeros((), jnp.int32),
        phi=jnp.zeros((maxiter + 1,), dtype).at[0].set(phi0), slots=empty,
        slot_phi=jnp.full((keep,), jnp.inf, dtype), slot_iter=jnp.full((keep,), -1, jnp.int32),
        num_saved=jnp.zeros((), jnp.int32), done=~(tree.all_finite(r0) & jnp.isfinite(phi0)),
    )  # fmt: skip
    out = jax.lax.while_loop(lambda s: ~s.done, body, init)
    # the last iterate is always a candidate (unless it was just stored)
    last_stored = out.slot_iter[(out.num_saved - 1) % keep] == out.i
    stored = out._replace(
        **dict(
            zip(
                ("slots", "slot_phi", "slot_iter", "num_saved"),
                store(out, out.x, out.phi[out.i], out.i),
                strict=True,
            )
        )
    )
    return jax.tree_util.tree_map(lambda a, b: jnp.where(last_stored, a, b), out, stored)


def _empirical_fisher_diagonal(
    batch_loss: _BatchLoss, params: PyTree, inputs: PyTree, targets: PyTree, chunk: int | None
) -> PyTree:
    """``(1/B) Σ_b (∇ℓ_b)²``: mean squared per-example gradients (one backward pass each)."""

    def one(example: tuple[PyTree, PyTree]) -> PyTree:
        x, y = jax.tree_util.tree_map(lambda a: a[None], example)
        return jax.tree_util.tree_map(jnp.square, jax.grad(batch_loss)(params, x, y))

    batch = (inputs, targets)
    squares = jax.vmap(one)(batch) if chunk is None else jax.lax.map(one, batch, batch_size=chunk)
    return jax.tree_util.tree_map(lambda s: jnp.mean(s, axis=0), squares)


def hessian_free(
    model: Callable[..., Any],
    loss: str | Callable[..., Any],
    *,
    learning_rate: float = 1.0,
    curvature: str = "ggn",
    initial_damping: float = 1.0,
    min_damping: float = 1e-8,
    max_damping: float = 1e8,
    cg_maxiter: int = 20,
    cg_tol: float = 5e-4,
    cg_decay: float = 0.95,
    num_saved_iterates: int = 4,
    line_search: bool = True,
    preconditioner: bool = False,
    chunk_size: int | None = None,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """Hessian-free optimization (Martens 2010) as an ``optax.GradientTransformationExtraArgs``.

    Each step solves ``(B + λI) p = −g`` by CG on curvature products at the curvature batch,
    never forming B: g is the gradient given to ``update`` (of the batch-mean loss), B the
    Gauss-Newton matrix ``ggn(model, loss, θ, X, Y)`` (or the Hessian of the batch loss, or a
    Monte-Carlo Fisher), λ the damping. Martens (2010) and Martens & Sutskever (2012), all of it:

    - CG starts from ``cg_decay · p_prev`` (the previous step's CG solution) and stops at
      iteration i once ``φ_i < 0`` and ``(φ_i − φ_{i−k}) / φ_i < k · cg_tol`` with
      ``k = max(10, i/10)`` (φ the damped quadratic model), at ``cg_maxiter``, or at
      non-positive curvature (possible with ``curvature="hessian"``).
    - Iterates at CG iterations ``⌈1.3^j⌉`` and the last are kept (the last
      `num_saved_iterates`); the update is the one with the lowest loss on the curvature batch.
    - An Armijo backtracking line search (``α ← 0.8α`` until
      ``f(θ + αp) <= f(θ) + 10⁻² α gᵀp``, at most 20 trials) scales it.
    - ``ρ = (f(θ+p) − f(θ)) / (q(p) − q(0))``, with q the undamped quadratic model; then
      ``λ ← 3/2 λ`` if ρ < 1/4 and ``λ ← 2/3 λ`` if ρ > 3/4, kept in ``[min_damping,
      max_damping]``.
    - If the actual change ``|f(θ+p) − f(θ)|`` is within rounding, ρ is noise and λ is left
      alone. f's rounding is taken as ``64·eps·(|f| + Σ|∂f/∂ŷ|·|ŷ|)`` (the outputs' own
      rounding carried into f) plus ``4·eps`` for a cross-entropy (a log of a sum ≥ 1,
      resolved to about eps absolute however small it is) (this is where a naive ρ rule drives λ to 1e20); if the
      predicted change is too, the step is flagged ``converged``: nothing is left to gain
      on this batch in this precision. Such a step is never counted as a failure.
    - A non-finite loss, gradient or CG result, or a line search that finds no decrease, skips
      the step: zero update, λ raised by 3/2, warm start reset, ``state.skipped`` set. The
      parameters never become NaN.
    - With ``preconditioner=True``, CG is preconditioned by ``(diag(F̂) + λ)^0.75`` with F̂ the
      empirical Fisher (mean squared per-example gradients of the curvature batch;
      Martens 2010, sec. 4.7).

    The first step starts from λ = `initial_damping` = 1: with a batch-mean loss the
    curvature's typical eigenvalues are O(1) or below for a normally initialized network, so
    λ = 1 keeps the first step no longer than a unit gradient step in flat directions while
    allowing Newton-like steps in steep ones, and the ρ rule moves λ by a factor of 1.5 per
    step to where it belongs (reached within a few dozen steps from any reasonable start).

    Cost per step: ``cg_iterations`` curvature products (each about 2 forward passes for the
    GGN), one forward pass per kept iterate and per line-search trial, one linearization of
    the model at the curvature batch, and with the preconditioner one backward pass per
    example of the curvature batch. Memory: ``num_saved_iterates + 5`` parameter-sized
    vectors.

    When to use: for training on minibatches (the gradient batch may be larger than the
    curvature batch, typically 1/10 to 1). For a deterministic problem that fits in memory
    (full-batch, a smooth objective), :func:`hessfree.minimize` (trust-region Newton-CG) is
    the better tool: it has convergence guarantees and a gradient-norm stopping test.

    Args:
        model: ``model(params, inputs) -> outputs`` (batch-major), as for :func:`hessfree.ggn`.
        loss: a named loss (``"softmax_cross_entropy"``, ``"mse"``,
            ``"sigmoid_cross_entropy"``) or a callable ``loss(outputs, targets) -> scalar``
            (batch mean).
        learning_rate: the update is ``learning_rate · α · p``; 1 is Martens' choice.
        curvature: ``"ggn"`` (default), ``"hessian"`` (of the batch loss; may be indefinite,
            CG then stops at negative curvature), or ``"fisher"`` (Monte-Carlo Fisher of the
            loss's likelihood with one sample per example; named losses only).
        initial_damping: λ for the first step.
        min_damping, max_damping: bounds of λ.
        cg_maxiter: at most this many CG iterations per step. 20 by default: with a
            subsampled curvature batch, longer CG runs fit that batch's curvature in its flat
            directions ("minibatch overfitting", Martens & Sutskever 2012, sec. 20.12), ρ falls
            and λ rises to compensate, so each step does less. On the digits autoencoder of
            ``benchmarks/bench_training.py`` (3 seeds, equal cost) caps of 10, 20, 30 and 50
            ended at median losses 2.4, 1.8, 3.3 and 3.6. With the full data as the curvature
            batch a larger cap (50-250, Martens' 2010 setting) pays.
        cg_tol: Martens' relative-progress threshold ε (5e-4 in the paper).
        cg_decay: warm-start decay of the previous solution (0.95 in the paper).
        num_saved_iterates: how many of the geometrically spaced CG iterates to keep.
        line_search: apply the Armijo line search (else α = 1 when it decreases the loss).
        preconditioner: use the empirical-Fisher diagonal preconditioner.
        chunk_size: examples at a time for the model linearization and the preconditioner.
        seed: seed of the Monte-Carlo Fisher's key (kept in the state).

    Returns:
        An ``optax.GradientTransformationExtraArgs``; call
        ``tx.update(grads, state, params, inputs=X, targets=Y)``.

    Raises:
        TypeError / ValueError: at construction for bad settings; at ``update`` for a missing
            or mismatched curvature batch (as :func:`hessfree.ggn` reports it).

    Example:
        >>> import jax, jax.numpy as jnp, optax
        >>> from hessfree.optim import hessian_free
        >>> model = lambda w, x: x @ w
        >>> X = jax.random.normal(jax.random.key(0), (32, 3)); Y = X @ jnp.array([1.0, -2.0, 0.5])
        >>> tx = hessian_free(model, "mse")
        >>> w = jnp.zeros(3); state = tx.init(w)
        >>> for _ in range(8):
        ...     g = jax.grad(lambda w: 0.5 * jnp.mean((model(w, X) - Y) ** 2))(w)
        ...     updates, state = tx.update(g, state, w, inputs=X, targets=Y)
        ...     w = optax.apply_updates(w, updates)
        >>> w.round(3).tolist()
        [1.0, -2.0, 0.5]

    References:
        Martens, "Deep learning via Hessian-free optimization", ICML 2010. Martens &
        Sutskever, "Training deep and recurrent networks with Hessian-free optimization",
        Neural Networks: Tricks of the Trade, 2012. Schraudolph, "Fast curvature
        matrix-vector products for second-order gradient descent", Neural Computation 2002.
    """
    check_callable(model, "model", "model(params, inputs)")
    if isinstance(loss, str):
        check_choice(loss, tuple(LOSSES), "loss")
    else:
        check_callable(loss, "loss", "loss(outputs, targets) -> scalar")
    check_choice(curvature, CURVATURES, "curvature")
    if curvature == "fisher" and not isinstance(loss, str):
        msg = "curvature='fisher' needs a named loss (its likelihood); got a callable loss"
        raise ValueError(msg)
    check_number(learning_rate, "learning_rate", strict=True)
    check_number(initial_damping, "initial_damping")
    check_number(min_damping, "min_damping")
    check_number(max_damping, "max_damping", minimum=float(max(min_damping, initial_damping)))
    check_positive_int(cg_maxiter, "cg_maxiter")
    check_number(cg_tol, "cg_tol", strict=True)
    check_number(cg_decay, "cg_decay")
    if cg_decay > 1:
        msg = f"cg_decay must be in [0, 1]; got {cg_decay!r}"
        raise ValueError(msg)
    check_positive_int(num_saved_iterates, "num_saved_iterates")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    batch_loss = _BatchLoss(model, loss)
    settings = _Settings(
        batch_loss=batch_loss, curvature=curvature, learning_rate=float(learning_rate),
        initial_damping=float(initial_damping), min_damping=float(min_damping),
        max_damping=float(max_damping), cg_maxiter=int(cg_maxiter), cg_tol=float(cg_tol),
        cg_decay=float(cg_decay), keep=int(num_saved_iterates), line_search=bool(line_search),
        preconditioner=bool(preconditioner), chunk_size=chunk_size, seed=int(seed),
    )  # fmt: skip

    def init(params: PyTree) -> HessianFreeState:
        check_floating(params, "params")
        return _init(settings, params)

    def update(
        updates: PyTree, state: HessianFreeState, params: PyTree | None = None, **extra: Any
    ) -> tuple[PyTree, HessianFreeState]:
        if params is None:
            msg = "params must be given: tx.update(grads, state, params, inputs=X, targets=Y)"
            raise TypeError(msg)
        missing = [name for name in ("inputs", "targets") if name not in extra]
        if missing:
            msg = (
                f"hessian_free's update needs the curvature batch as keywords inputs= and "
                f"targets=; missing {missing}"
            )
            raise TypeError(msg)
        check_floating(params, "params")
        inputs, targets = extra["inputs"], extra["targets"]
        _check_batch(batch_loss, params, inputs, targets)
        return staged(_update, updates, state, params, inputs, targets, settings=settings)

    return optax.GradientTransformationExtraArgs(init, update)  # pyright: ignore[reportArgumentType]


def _check_batch(batch_loss: _BatchLoss, params: PyTree, inputs: PyTree, targets: PyTree) -> None:
    """The curvature batch fits the model and loss (shapes always; target values if concrete)."""
    try:
        outputs = jax.eval_shape(batch_loss.model, params, inputs)
    except Exception as err:
        msg = (
            f"inputs must be a batch the model accepts: model(params, inputs) failed on the "
            f"curvature batch ({describe_tree(inputs)}): {type(err).__name__}: {err}"
        )
        raise TypeError(msg) from err
    if not isinstance(batch_loss.loss, str):
        return
    row = get_loss(batch_loss.loss)
    check_targets(row, outputs, targets)
    leaves = jax.tree_util.tree_leaves(targets)
    if any(isinstance(t, jax.core.Tracer) for t in leaves):
        return
    # On the host when it holds the targets. A global array spanning other processes cannot be
    # fetched (jax.distributed): an SPMD program checks it, and every process reads its verdict.
    local = all(getattr(t, "is_fully_addressable", True) for t in leaves)
    ok = (
        row.targets_ok(outputs, np.asarray(targets), xp=np)
        if local
        else row.targets_ok(outputs, targets)
    )
    if not bool(ok):
        msg = f"targets for loss {row.name!r} must be {row.targets_doc}; got values out of range"
        raise ValueError(msg)


class _Settings(NamedTuple):
    batch_loss: _BatchLoss
    curvature: str
    learning_rate: float
    initial_damping: float
    min_damping: float
    max_damping: float
    cg_maxiter: int
    cg_tol: float
    cg_decay: float
    keep: int
    line_search: bool
    preconditioner: bool
    chunk_size: int | None
    seed: int


def _init(s: _Settings, params: PyTree) -> HessianFreeState:
    dtype = tree.scalar_dtype(params)
    zero = jnp.zeros((), dtype)
    return HessianFreeState(
        count=jnp.zeros((), jnp.int32),
        damping=jnp.asarray(s.initial_damping, dtype),
        direction=tree.zeros_like(params),
        key=jax.random.key(s.seed),
        rho=zero,
        cg_iterations=jnp.zeros((), jnp.int32),
        loss_before=zero,
        loss_after=zero,
        step_size=zero,
        skipped=jnp.zeros((), bool),
        converged=jnp.zeros((), bool),
    )


def _curvature(
    s: _Settings, params: PyTree, inputs: PyTree, targets: PyTree, key: jax.Array
) -> CurvatureOperator:
    model, loss = s.batch_loss.model, s.batch_loss.loss
    if s.curvature == "ggn":
        return ggn(model, loss, params, inputs, targets, chunk_size=s.chunk_size)
    if s.curvature == "hessian":
        return hessian(s.batch_loss, params, inputs, targets)
    likelihood = get_loss(loss).likelihood
    return fisher(
        model, params, inputs, likelihood=likelihood, kind="mc", key=key, chunk_size=s.chunk_size
    )


def _value_and_sensitivity(
    batch_loss: _BatchLoss, params: PyTree, inputs: PyTree, targets: PyTree
) -> tuple[jax.Array, jax.Array]:
    """f(θ) and ``Σ |∂f/∂ŷ|·|ŷ|``: how much the outputs' own rounding moves f (one forward pass).

    A relative error ε in the outputs ŷ changes f by about ε times this, however small f is:
    with ŷ ≈ y a squared error's rounding is ``|ŷ − y|·ε|ŷ|``, far above ``ε·f``.
    """
    outputs = batch_loss.model(params, inputs)
    value = get_loss(batch_loss.loss).value if isinstance(batch_loss.loss, str) else batch_loss.loss
    f0, d = jax.value_and_grad(value)(outputs, targets)
    terms = jax.tree_util.tree_map(lambda a, b: jnp.sum(jnp.abs(a * b)), d, outputs)
    return f0, sum(jax.tree_util.tree_leaves(terms), jnp.zeros((), f0.dtype))


def _armijo(
    f: Callable[[jax.Array], jax.Array],
    f0: jax.Array,
    slope: jax.Array,
    f1: jax.Array,
    search: bool,
) -> tuple[jax.Array, jax.Array]:
    """α in ``{0.8^k}`` with ``f(α) <= f0 + 10⁻²·α·slope`` (α = 1 first, its f given); 0 if none."""
    one = jnp.ones((), f0.dtype)

    def ok(alpha: jax.Array, value: jax.Array) -> jax.Array:
        return jnp.isfinite(value) & (value <= f0 + 1e-2 * alpha * slope)

    if not search:
        good = ok(one, f1) | (jnp.isfinite(f1) & (f1 < f0))
        return jnp.where(good, one, 0 * one), jnp.where(good, f1, f0)

    def cond(c: tuple) -> jax.Array:
        alpha, value, k = c
        return ~ok(alpha, value) & (k < 20)

    def body(c: tuple) -> tuple:
        alpha, _, k = c
        alpha = 0.8 * alpha
        return alpha, f(alpha), k + 1

    alpha, value, _ = jax.lax.while_loop(cond, body, (one, f1, jnp.zeros((), jnp.int32)))
    good = ok(alpha, value)
    return jnp.where(good, alpha, 0 * one), jnp.where(good, value, f0)


def _update(
    grads: PyTree,
    state: HessianFreeState,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    settings: _Settings,
) -> tuple[PyTree, HessianFreeState]:
    s = settings
    dtype = tree.scalar_dtype(params)
    eps = jnp.finfo(dtype).eps
    g = tree.cast_like(grads, params)
    lam = state.damping.astype(dtype)
    key, sub = jax.random.split(state.key)

    def f(p: PyTree) -> jax.Array:
        return s.batch_loss(p, inputs, targets).astype(dtype)

    f0, sensitivity = _value_and_sensitivity(s.batch_loss, params, inputs, targets)
    f0 = f0.astype(dtype)
    op = _curvature(s, params, inputs, targets, sub)

    def damped(v: PyTree) -> PyTree:
        return tree.axpy(lam, v, apply(op, v))

    if s.preconditioner:
        diag = _empirical_fisher_diagonal(s.batch_loss, params, inputs, targets, s.chunk_size)
        m = jax.tree_util.tree_map(lambda d: (d.astype(dtype) + lam) ** 0.75, diag)

        def precondition(r: PyTree) -> PyTree:
            return jax.tree_util.tree_map(lambda a, b: a / b, r, m)
    else:

        def precondition(r: PyTree) -> PyTree:
            return r

    x0 = tree.scale(jnp.asarray(s.cg_decay, dtype), state.direction)
    cg = _martens_cg(damped, g, x0, precondition, s.cg_maxiter, s.cg_tol, s.keep)

    # the kept iterate with the lowest loss on the curvature batch
    losses = jax.lax.map(lambda p: f(tree.axpy(1.0, p, params)), cg.slots)
    losses = jnp.where((cg.slot_iter >= 0) & jnp.isfinite(losses), losses, jnp.inf)
    best = jnp.argmin(losses)
    p = jax.tree_util.tree_map(lambda S: S[best], cg.slots)
    f1 = losses[best]
    predicted = cg.slot_phi[best] - 0.5 * lam * tree.vdot(p, p)  # q(p) − q(0), undamped
    # a model that predicts no decrease (it cannot happen in exact arithmetic) counts as bad
    rho = jnp.where(predicted < 0, (f1 - f0) / jnp.where(predicted < 0, predicted, -1), -jnp.inf)

    slope = tree.vdot(g, p)
    alpha, f_new = _armijo(lambda a: f(tree.axpy(a, p, params)), f0, slope, f1, s.line_search)

    # below f's rounding the actual change, and so ρ, is noise: λ is left alone
    unit = get_loss(s.batch_loss.loss).rounding_unit if isinstance(s.batch_loss.loss, str) else 0
    rounding = (
        64 * eps * (jnp.maximum(jnp.abs(f0), jnp.abs(f1)) + sensitivity.astype(dtype))
        + 4 * eps * unit
        + 64 * jnp.finfo(dtype).tiny
    )
    unresolved = jnp.abs(f1 - f0) <= rounding
    converged = unresolved & (jnp.abs(predicted) <= rounding)
    finite = jnp.isfinite(f0) & tree.all_finite(g) & tree.all_finite(p) & jnp.isfinite(predicted)
    skipped = ~finite | ((alpha == 0) & ~unresolved)
    factor = jnp.where(rho < 0.25, 1.5, jnp.where(rho > 0.75, 2 / 3, 1.0)).astype(dtype)
    factor = jnp.where(skipped, 1.5, jnp.where(unresolved, 1.0, factor)).astype(dtype)
    new_lam = jnp.clip(lam * factor, s.min_damping, s.max_damping).astype(dtype)
    step = jnp.where(skipped, 0, s.learning_rate * alpha).astype(dtype)
    updates = tree.scale(step, tree.where(skipped, tree.zeros_like(p), p))
    new_state = HessianFreeState(
        count=state.count + 1,
        damping=new_lam,
        direction=tree.where(finite, cg.x, tree.zeros_like(cg.x)),
        key=key,
        rho=jnp.where(finite, rho, jnp.nan).astype(dtype),
        cg_iterations=cg.i,
        loss_before=f0,
        loss_after=jnp.where(
            skipped, f0, f_new if s.learning_rate == 1.0 else f(tree.axpy(step, p, params))
        ),
        step_size=step,
        skipped=skipped,
        converged=converged & ~skipped,
    )
    return tree.keep_sharding(updates, params), new_state

"""Hessian-vector products of any scalar function of any pytree.

Three ways to differentiate twice, all giving ``H v`` with ``H = ∇²f(x)``:

- ``"fwd_rev"``: ``jvp(grad f)``, forward over reverse (Pearlmutter 1994). One reverse pass to
  build the gradient, one forward pass to push the tangent through it. The production choice.
- ``"rev_rev"``: ``grad(⟨grad f, v⟩)``, reverse over reverse. Differentiates the gradient
  graph again; more memory, works on every function reverse mode works on.
- ``"rev_fwd"``: ``grad(⟨∇f, v⟩)`` through ``jvp f``, reverse over forward.
- ``"auto"``: ``"fwd_rev"``, and ``"rev_rev"`` where forward mode cannot go through a
  ``jax.custom_vjp`` in f. The user sees the same value either way.

Whether forward mode goes through is decided from the traced program, once per compile: a
function whose program holds no ``custom_vjp`` call always takes ``jvp(grad f)``. One that
holds one gets ``jvp(grad f)`` if that traces to a program free of ``custom_lin`` (the
primitive forward mode cannot evaluate, jax issue 16049), else the same product staged
through ``jax.linearize`` (which prunes the primal branch of the rule) if that is free of it,
else no forward mode. JAX's error texts are never read.

Every public function here is staged (:mod:`hessfree._staging`): compiled once per function,
settings and input shapes, argument checks run while tracing. Tangents are cast to the dtype
of the matching leaf of `x` (they live in its tangent space); results have the structure and
dtypes of `x`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
from jax.tree_util import Partial

from . import _tree as tree
from ._staging import Linear, capture, staged
from ._validation import (
    PyTree,
    check_choice,
    check_floating,
    check_like,
    check_positive_int,
    check_scalar_fn,
)

MODES = ("fwd_rev", "rev_rev", "rev_fwd")
VALID_MODES = ("auto", *MODES)
_FORWARD_REFUSED = (
    "mode {mode!r} needs forward-mode autodiff, which cannot go through a jax.custom_vjp in f "
    "(jax issue 16049); use mode='auto' (falls back by itself) or mode='rev_rev'"
)

Fn = Callable[..., Any]
Product = Callable[[Fn, PyTree, PyTree, tuple[Any, ...]], PyTree]


# --- the three products ---------------------------------------------------------------------


def _grad_at(f: Fn, args: tuple[Any, ...]) -> Callable[[PyTree], PyTree]:
    return lambda y: jax.grad(f)(y, *args)


def _jvp_of_grad(f: Fn, x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.jvp(_grad_at(f, args), (x,), (v,))[1]


def _linearized_grad(f: Fn, x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.linearize(_grad_at(f, args), x)[1](v)


def _rev_rev(f: Fn, x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.grad(lambda y: tree.vdot(_grad_at(f, args)(y), v))(x)


def _rev_fwd(f: Fn, x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.grad(lambda y: jax.jvp(lambda z: f(z, *args), (y,), (v,))[1])(x)


# --- forward mode through custom_vjp, decided from the program ---------------------------------


def contains_primitive(jaxpr: Any, test: Callable[[str], bool]) -> bool:
    """Whether `jaxpr` (or any sub-jaxpr of its equations) has a primitive whose name passes."""
    for eqn in jaxpr.eqns:
        if test(eqn.primitive.name):
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and contains_primitive(inner, test):
                    return True
    return False


def has_custom_vjp(f: Fn, x: PyTree, args: tuple[Any, ...]) -> bool:
    """Whether the program of ``f(x, *args)`` calls a ``jax.custom_vjp`` function."""
    closed = jax.make_jaxpr(lambda x_, a_: f(x_, *a_))(x, args)
    return contains_primitive(closed.jaxpr, lambda name: "custom_vjp" in name)


def forward_product(f: Fn, x: PyTree, args: tuple[Any, ...]) -> Product | None:
    """The forward-over-reverse product that works for this f, or None (see module doc)."""
    if not has_custom_vjp(f, x, args):
        return _jvp_of_grad
    for product in (_jvp_of_grad, _linearized_grad):
        try:
            closed = jax.make_jaxpr(lambda x_, a_, p=product: p(f, x_, x_, a_))(x, args)
        except Exception:
            continue
        if not contains_primitive(closed.jaxpr, lambda name: name == "custom_lin"):
            return product
    return None


def product_for(mode: str, f: Fn, x: PyTree, args: tuple[Any, ...]) -> Product:
    """The ``(f, x, v, args) -> Hv`` implementation of `mode` for this f (call while tracing)."""
    if mode == "rev_rev":
        return _rev_rev
    if mode == "rev_fwd":
        if has_custom_vjp(f, x, args):
            raise TypeError(_FORWARD_REFUSED.format(mode=mode))
        return _rev_fwd
    forward = forward_product(f, x, args)
    if forward is not None:
        return forward
    if mode == "fwd_rev":
        raise TypeError(_FORWARD_REFUSED.format(mode=mode))
    return _rev_rev


def linearize_gradient(
    f: Fn, x: PyTree, args: tuple[Any, ...], mode: str = "auto"
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """``(∇f(x), v -> H v)`` with the gradient pass run once and its residuals kept.

    For ``"fwd_rev"``/``"auto"`` this is ``jax.linearize`` of the gradient (each product one
    tangent pass); where forward mode cannot go through f (and for ``"rev_rev"``) it is
    ``jax.vjp`` of the gradient (H is symmetric, so the VJP of ∇f is H v: one reverse pass
    over the gradient graph per product). ``"rev_fwd"`` keeps nothing and recomputes. Call
    while tracing; no argument checks.
    """
    grad_at = _grad_at(f, args)
    if mode in ("fwd_rev", "auto"):
        if forward_product(f, x, args) is not None:
            return jax.linearize(grad_at, x)
        if mode == "fwd_rev":
            raise TypeError(_FORWARD_REFUSED.format(mode=mode))
    if mode in ("rev_rev", "auto"):
        g, pullback = jax.vjp(grad_at, x)
        return g, lambda v: pullback(v)[0]
    product = product_for(mode, f, x, args)
    return grad_at(x), lambda v: product(f, x, v, args)


# --- remat -------------------------------------------------------------------------------------

Remat = bool | Callable[..., Any] | None


@dataclasses.dataclass(frozen=True)
class _Checkpointed:
    """`f` under ``jax.checkpoint`` (policy None saves nothing); hashable, compared by value."""

    f: Fn
    policy: Callable[..., Any] | None

    def __call__(self, *args: Any) -> Any:
        return jax.checkpoint(self.f, policy=self.policy)(*args)


def with_remat(f: Fn, remat: Remat) -> Fn:
    """`f` under ``jax.checkpoint`` when asked: True saves nothing, a callable is the policy."""
    if remat is None or remat is False:
        return f
    if remat is True:
        return _Checkpointed(f, None)
    if callable(remat):
        return _Checkpointed(f, remat)
    msg = f"remat must be False, True or a jax.checkpoint_policies policy; got {remat!r}"
    raise TypeError(msg)


# --- staged implementations ----------------------------------------------------------------------


def check_hvp_args(f: Fn, x: PyTree, args: tuple[Any, ...], mode: str) -> None:
    """The checks every product runs (static information only, so they run while tracing)."""
    check_choice(mode, VALID_MODES, "mode")
    check_floating(x, "x")
    check_scalar_fn(f, x, args)


def _hvp_impl(f: Fn, x: PyTree, v: PyTree, args: tuple[Any, ...], *, mode: str) -> PyTree:
    check_hvp_args(f, x, args, mode)
    check_like(x, v, "x", "v")
    check_floating(v, "v")
    return product_for(mode, f, x, args)(f, x, tree.cast_like(v, x), args)


def _hvps_impl(
    f: Fn, x: PyTree, vs: PyTree, args: tuple[Any, ...], *, mode: str, chunk_size: int | None
) -> PyTree:
    check_hvp_args(f, x, args, mode)
    check_like(x, vs, "x", "vs", batched=True)
    check_floating(vs, "vs")
    product = product_for(mode, f, x, args)
    vs = tree.cast_like(vs, x)

    def one(v: PyTree) -> PyTree:
        return product(f, x, v, args)

    return jax.vmap(one)(vs) if chunk_size is None else jax.lax.map(one, vs, batch_size=chunk_size)


def _linearize_impl(f: Fn, x: PyTree, args: tuple[Any, ...], *, mode: str) -> tuple[PyTree, Linear]:
    check_hvp_args(f, x, args, mode)
    g, linear = linearize_gradient(f, x, args, mode)
    return g, capture(linear, x, ("hessian", f, mode), (x, args))


def cached_gradient_linearization(
    f: Fn, x: PyTree, args: tuple[Any, ...], mode: str = "auto", remat: Remat = False
) -> tuple[PyTree, Linear]:
    """``(∇f(x), L)`` with ``L v = H v`` a :class:`Linear` (residuals as leaves), compiled once."""
    check_choice(mode, VALID_MODES, "mode")
    return staged(_linearize_impl, with_remat(f, remat), x, args, mode=mode)


def _apply_linear(linear: Linear, v: PyTree) -> PyTree:
    return linear(v)


@dataclasses.dataclass(frozen=True)
class _CachedHvp:
    """``(L, v) -> L v`` with the checks of `v` against x's structure (static, hashable)."""

    treedef: Any
    leaves: tuple[jax.ShapeDtypeStruct, ...]

    def __call__(self, linear: Linear, v: PyTree) -> PyTree:
        structure = jax.tree_util.tree_unflatten(self.treedef, self.leaves)
        check_like(structure, v, "x", "v")
        check_floating(v, "v")
        out = staged(_apply_linear, linear, tree.cast_like(v, structure))
        return tree.keep_sharding(out, v)


@dataclasses.dataclass(frozen=True)
class _UncachedHvp:
    """``v -> H v`` recomputing the gradient pass each time; hashable (f by identity)."""

    f: Fn
    mode: str

    def __call__(self, x: PyTree, args: tuple[Any, ...], v: PyTree) -> PyTree:
        return tree.keep_sharding(staged(_hvp_impl, self.f, x, v, args, mode=self.mode), x)


# --- public ---------------------------------------------------------------------------------------


def hvp(
    f: Fn, x: PyTree, v: PyTree, *args: Any, mode: str = "auto", remat: Remat = False
) -> PyTree:
    """Hessian-vector product ``∇²f(x) v`` of a scalar function of a pytree.

    ``H v = d/dt ∇f(x + t v)|ₜ₌₀``, never forming H. Cost: about one gradient evaluation plus
    one forward (tangent) pass for ``"fwd_rev"``; see the module docstring for the others.
    Compiled once per `f`, `mode` and shapes: calling it again at new values of `x`, `v` or
    `args` compiles nothing.

    Args:
        f: scalar function ``f(x, *args)``; may contain ``jax.custom_vjp`` functions. Pass
            data through `args`, not a fresh closure per call (a new function is a new
            program).
        x: the point, any pytree of floating arrays.
        v: the direction, a pytree with the structure and leaf shapes of `x`.
        *args: further arguments of `f`, held fixed (not differentiated); traced like
            ``jax.jit``'s arguments (arrays and numbers), other leaves static.
        mode: ``"auto"`` (default), ``"fwd_rev"``, ``"rev_rev"`` or ``"rev_fwd"``.
        remat: run `f` under ``jax.checkpoint`` (True), or with a
            ``jax.checkpoint_policies`` policy; see :func:`hvp_fn` for when this pays.

    Returns:
        ``H v``, a pytree like `x` (same structure, shapes and dtypes).

    Raises:
        ValueError: `v` differs from `x` in structure or a leaf's shape; `f` is not scalar;
            `mode` is unknown.
        TypeError: `x` or `v` has non-floating leaves (complex included).

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> f = lambda p: jnp.sum(p["w"] ** 3) + p["b"] ** 2
        >>> Hv = hf.hvp(f, {"w": jnp.array([1.0, 2.0]), "b": jnp.array(1.0)},
        ...             {"w": jnp.ones(2), "b": jnp.array(1.0)})
        >>> Hv["w"].tolist(), Hv["b"].tolist()  # 6 w v_w and 2 v_b
        ([6.0, 12.0], 2.0)

    References:
        Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    """
    check_choice(mode, VALID_MODES, "mode")
    out = staged(_hvp_impl, with_remat(f, remat), x, v, args, mode=mode)
    return tree.keep_sharding(out, x)


def hvps(
    f: Fn,
    x: PyTree,
    vs: PyTree,
    *args: Any,
    mode: str = "auto",
    chunk_size: int | None = None,
    remat: Remat = False,
) -> PyTree:
    """Many Hessian-vector products ``[H v₁, …, H vₖ]`` at one point.

    Vectorized with ``vmap``: the primal and gradient passes do not depend on the tangent, so
    they run once and only the tangent pass is batched. With `chunk_size`, the tangents are
    processed ``chunk_size`` at a time (``lax.map``), bounding memory by one chunk; the values
    are the same. Cost: k tangent passes plus one gradient pass.

    Args:
        f: scalar function ``f(x, *args)``.
        x: the point, any pytree of floating arrays.
        vs: a pytree like `x` whose every leaf has one extra leading axis of size k.
        *args: further arguments of `f`.
        mode: as in :func:`hvp`.
        chunk_size: at most this many tangents at once; None processes all k together.
        remat: as in :func:`hvp`.

    Returns:
        A pytree like `vs`: leaf ``[i]`` of the result belongs to ``H vs[i]``.
    """
    check_choice(mode, VALID_MODES, "mode")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    out = staged(_hvps_impl, with_remat(f, remat), x, vs, args, mode=mode, chunk_size=chunk_size)
    return tree.keep_sharding(out, x, batched=True)


def hvp_fn(
    f: Fn,
    x: PyTree,
    *args: Any,
    mode: str = "auto",
    cache: bool = True,
    remat: Remat = False,
) -> Callable[[PyTree], PyTree]:
    """A function ``v -> ∇²f(x) v`` for repeated products at one point.

    With ``cache=True`` the primal and gradient passes run once, here (compiled once per `f`
    and shapes; building costs about one gradient), and their intermediate values (the
    linearization's residuals) are held for as long as the returned function lives:
    typically a few times the activations of one gradient evaluation. Each product then
    costs only the tangent pass (about one forward pass). With ``cache=False`` nothing is
    held and every call pays the full product (:func:`hvp`).

    The returned function is a ``jax.tree_util.Partial`` (a pytree whose leaves are the
    residuals, or `x` and `args`), so it can be passed into ``jit`` or to :func:`hessfree.cg`
    as ``A`` at every step of a loop without recompiling.

    Args:
        f: scalar function ``f(x, *args)``.
        x: the point.
        *args: further arguments of `f`.
        mode: as in :func:`hvp`; caching applies to ``"fwd_rev"``, ``"rev_rev"`` and
            ``"auto"`` (``"rev_fwd"`` has nothing tangent-independent to keep).
        cache: keep the linearization (default) or recompute every product.
        remat: trade time for the memory the cache holds: with ``remat=True`` (``f`` under
            ``jax.checkpoint``) the linearization keeps only `f`'s inputs and each product
            recomputes the forward pass; a ``jax.checkpoint_policies`` policy keeps what it
            names (e.g. ``dots_saveable``). Measured on a 12-block residual MLP (6.3M
            parameters): the cache holds 400 MiB, 25 MiB with True and 220 MiB with
            ``dots_saveable`` (``benchmarks/bench_memory.py``).

    Returns:
        A function of one pytree `v` like `x`, returning ``H v`` like `x`.
    """
    check_choice(mode, VALID_MODES, "mode")
    f = with_remat(f, remat)
    if not cache:
        return Partial(_UncachedHvp(f, mode), x, args)
    _, linear = cached_gradient_linearization(f, x, args, mode)
    leaves, treedef = jax.tree_util.tree_flatten(tree.structure_of(x))
    return Partial(_CachedHvp(treedef, tuple(leaves)), linear)

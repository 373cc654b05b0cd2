"""Hessian-vector products of any scalar function of any pytree.

Three ways to differentiate twice, all giving ``H v`` with ``H = ∇²f(x)``:

- ``"fwd_rev"``: ``jvp(grad f)``, forward over reverse (Pearlmutter 1994). One reverse pass to
  build the gradient, one forward pass to push the tangent through it. The production choice.
- ``"rev_rev"``: ``grad(⟨grad f, v⟩)``, reverse over reverse. Differentiates the gradient
  graph again; more memory, works on every function reverse mode works on.
- ``"rev_fwd"``: ``grad(⟨∇f, v⟩)`` through ``jvp f``, reverse over forward.
- ``"auto"``: ``"fwd_rev"``, and ``"rev_rev"`` where forward mode cannot go through a
  ``jax.custom_vjp`` at all. The user sees the same value either way.

Outside ``jit``, ``jvp(grad f)`` fails on a ``custom_vjp`` whose forward rule calls the primal
function (jax issue 16049); ``"fwd_rev"`` then stages the same product through
``jax.linearize``, which prunes that branch, so it works where plain JAX does not.

Tangents are cast to the dtype of the matching leaf of `x` (they live in its tangent space);
results have the structure and dtypes of `x`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec
from jax.tree_util import Partial

from ._validation import (
    PyTree,
    check_choice,
    check_floating,
    check_like,
    check_positive_int,
    check_scalar_fn,
)

MODES = ("fwd_rev", "rev_rev", "rev_fwd")
_FORWARD_REFUSED = (
    "mode {mode!r} needs forward-mode autodiff, which cannot go through a jax.custom_vjp in f "
    "(jax issue 16049); use mode='auto' (falls back by itself) or mode='rev_rev'"
)
VALID_MODES = ("auto", *MODES)


def tree_vdot(a: PyTree, b: PyTree) -> jax.Array:
    """Sum over leaves of the inner products ``⟨a, b⟩`` (real arrays).

    Written as ``sum(a * b)`` rather than ``vdot``: a contraction over sharded axes has no
    unambiguous output sharding under explicit mesh axes, an elementwise product and a sum
    do (the sum becomes an all-reduce).
    """
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    total = jnp.zeros((), jnp.result_type(*leaves_a))
    for x, y in zip(leaves_a, leaves_b, strict=True):
        total = total + jnp.sum(x * y)
    return total


def cast_like(v: PyTree, x: PyTree) -> PyTree:
    """Cast each leaf of `v` to the dtype of the matching leaf of `x` (a no-op where it has it)."""

    def one(vl: Any, xl: Any) -> Any:
        dtype = jnp.result_type(xl)
        return vl if getattr(vl, "dtype", None) == dtype else jnp.asarray(vl, dtype=dtype)

    return jax.tree_util.tree_map(one, v, x)


def _is_sharded(x: PyTree) -> bool:
    """Whether any leaf of `x` is a concrete array laid out over more than one device."""
    return any(
        isinstance(getattr(leaf, "sharding", None), NamedSharding)
        and len(leaf.sharding.device_set) > 1
        for leaf in jax.tree_util.tree_leaves(x)
        if not isinstance(leaf, jax.core.Tracer)
    )


def keep_sharding(out: PyTree, x: PyTree, *, batched: bool = False) -> PyTree:
    """Give each concrete output leaf the sharding of the matching concrete leaf of `x`.

    XLA's sharding propagation may pick another layout for a result than its input had
    (e.g. a weight sharded by columns coming back sharded by rows); outside ``jit`` this puts
    results back where the inputs live. Traced leaves are left to the caller's ``jit``: under
    explicit mesh axes their types already carry the input's sharding, and under automatic
    axes the caller's ``out_shardings`` decide. With ``batched=True`` outputs carry one
    leading (unsharded) batch axis.
    """

    def one(o: Any, xl: Any) -> Any:
        sharding = getattr(xl, "sharding", None)
        if (
            isinstance(o, jax.core.Tracer)
            or isinstance(xl, jax.core.Tracer)
            or not isinstance(sharding, NamedSharding)
            or len(sharding.device_set) == 1
        ):
            return o
        if batched:
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.device_put(o, sharding)

    return jax.tree_util.tree_map(one, out, x)


def match_sharding(tree: PyTree, like: PyTree) -> PyTree:
    """Give each leaf of `tree` the sharding type of the matching leaf of `like`.

    Under explicit mesh axes a sharding is part of an array's type, and a freshly drawn array
    (a random probe, a start vector) is unsharded: a linearized function refuses it as a
    tangent of sharded parameters, and mixing it with them is ambiguous. This reshards it to
    the parameters' layout. Under automatic axes (or without a mesh) it does nothing and
    XLA's propagation decides.
    """

    def one(leaf: Any, like_leaf: Any) -> Any:
        sharding = getattr(jax.typeof(like_leaf), "sharding", None)
        if not isinstance(sharding, NamedSharding):
            return leaf
        explicit = any(t == AxisType.Explicit for t in getattr(sharding.mesh, "axis_types", ()))
        if not explicit or all(axis is None for axis in sharding.spec):
            return leaf
        return jax.sharding.reshard(leaf, sharding.spec)

    return jax.tree_util.tree_map(one, tree, like)


def _grad_at(f: Callable[..., Any], args: tuple[Any, ...]) -> Callable[[PyTree], PyTree]:
    return lambda y: jax.grad(f)(y, *args)


def _fwd_rev_eager(f: Callable[..., Any], x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.jvp(_grad_at(f, args), (x,), (v,))[1]


def _fwd_rev_staged(f: Callable[..., Any], x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.linearize(_grad_at(f, args), x)[1](v)


def _contains_primitive(jaxpr: Any, name: str) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == name:
            return True
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns") and _contains_primitive(inner, name):
                    return True
    return False


def _fwd_rev(f: Callable[..., Any], x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    # A custom_vjp inside f leaves a `custom_lin` in the traced product that forward mode
    # cannot evaluate (jax issue 16049); under jit that error would only surface at lowering,
    # out of reach. So the product is first traced abstractly and inspected (a trace-time
    # cost only), then run. jvp of the gradient leaves the primal branch of the custom_vjp in
    # place; linearize stages the gradient out first, which prunes it where the loss does not
    # need it. Both are the same forward-over-reverse product; where neither is free of
    # `custom_lin`, forward mode is refused here, at once.
    for product in (_fwd_rev_eager, _fwd_rev_staged):
        try:
            closed = jax.make_jaxpr(lambda x_, v_, p=product: p(f, x_, v_, args))(x, v)
        except (TypeError, NotImplementedError) as err:
            if not is_forward_mode_failure(err):
                raise
            continue
        if not _contains_primitive(closed.jaxpr, "custom_lin"):
            return product(f, x, v, args)
    raise TypeError(_FORWARD_REFUSED.format(mode="fwd_rev"))


def _rev_rev(f: Callable[..., Any], x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.grad(lambda y: tree_vdot(_grad_at(f, args)(y), v))(x)


def _rev_fwd(f: Callable[..., Any], x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    return jax.grad(lambda y: jax.jvp(lambda z: f(z, *args), (y,), (v,))[1])(x)


_PRODUCTS = {"fwd_rev": _fwd_rev, "rev_rev": _rev_rev, "rev_fwd": _rev_fwd}


def is_forward_mode_failure(err: Exception) -> bool:
    """Whether `err` is JAX refusing forward mode through a ``custom_vjp``."""
    text = str(err)
    return isinstance(err, TypeError | NotImplementedError) and (
        "custom_vjp" in text or "custom_lin" in text or "forward-mode" in text
    )


def _auto(f: Callable[..., Any], x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
    try:
        return _fwd_rev(f, x, v, args)
    except (TypeError, NotImplementedError) as err:
        if not is_forward_mode_failure(err):
            raise
    return _rev_rev(f, x, v, args)


def _explained(
    mode: str,
) -> Callable[[Callable[..., Any], PyTree, PyTree, tuple[Any, ...]], PyTree]:
    product = _PRODUCTS[mode]

    def run(f: Callable[..., Any], x: PyTree, v: PyTree, args: tuple[Any, ...]) -> PyTree:
        try:
            return product(f, x, v, args)
        except (TypeError, NotImplementedError) as err:
            if not is_forward_mode_failure(err):
                raise
            raise TypeError(_FORWARD_REFUSED.format(mode=mode)) from err

    return run


def product_for(
    mode: str,
) -> Callable[[Callable[..., Any], PyTree, PyTree, tuple[Any, ...]], PyTree]:
    """The unchecked ``(f, x, v, args) -> Hv`` implementation of `mode`."""
    return _auto if mode == "auto" else _explained(mode)


Remat = bool | Callable[..., Any] | None


def with_remat(f: Callable[..., Any], remat: Remat) -> Callable[..., Any]:
    """`f` under ``jax.checkpoint`` when asked: True saves nothing, a callable is the policy."""
    if remat is None or remat is False:
        return f
    if remat is True:
        return jax.checkpoint(f)
    if callable(remat):
        return jax.checkpoint(f, policy=remat)
    msg = f"remat must be False, True or a jax.checkpoint_policies policy; got {remat!r}"
    raise TypeError(msg)


def check_hvp_args(f: Callable[..., Any], x: PyTree, args: tuple[Any, ...], mode: str) -> None:
    """The checks every product runs before tracing anything."""
    check_choice(mode, VALID_MODES, "mode")
    check_floating(x, "x")
    check_scalar_fn(f, x, args)


def hvp(
    f: Callable[..., Any],
    x: PyTree,
    v: PyTree,
    *args: Any,
    mode: str = "auto",
    remat: Remat = False,
) -> PyTree:
    """Hessian-vector product ``∇²f(x) v`` of a scalar function of a pytree.

    ``H v = d/dt ∇f(x + t v)|ₜ₌₀``, never forming H. Cost: about one gradient evaluation plus
    one forward (tangent) pass for ``"fwd_rev"``; see the module docstring for the others.

    Args:
        f: scalar function ``f(x, *args)``; may contain ``jax.custom_vjp`` functions.
        x: the point, any pytree of floating arrays.
        v: the direction, a pytree with the structure and leaf shapes of `x`.
        *args: further arguments of `f`, held fixed (not differentiated).
        mode: ``"auto"`` (default), ``"fwd_rev"``, ``"rev_rev"`` or ``"rev_fwd"``.
        remat: run `f` under ``jax.checkpoint`` (True), or with a
            ``jax.checkpoint_policies`` policy; see :func:`hvp_fn` for when this pays.

    Returns:
        ``H v``, a pytree like `x` (same structure, shapes and dtypes).

    Raises:
        ValueError: `v` differs from `x` in structure or a leaf's shape; `f` is not scalar;
            `mode` is unknown.
        TypeError: `x` has non-floating leaves.

    Example:
        >>> import jax.numpy as jnp
        >>> f = lambda p: jnp.sum(p["w"] ** 3) + p["b"] ** 2
        >>> hvp(f, {"w": jnp.array([1.0, 2.0]), "b": 1.0}, {"w": jnp.ones(2), "b": 1.0})
        {'b': Array(2., dtype=float32, weak_type=True), 'w': Array([ 6., 12.], dtype=float32)}

    References:
        Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    """
    check_hvp_args(f, x, args, mode)
    check_like(x, v, "x", "v")
    f = with_remat(f, remat)
    return keep_sharding(product_for(mode)(f, x, cast_like(v, x), args), x)


def hvps(
    f: Callable[..., Any],
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
    are the same.

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
    check_hvp_args(f, x, args, mode)
    check_like(x, vs, "x", "vs", batched=True)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    f = with_remat(f, remat)
    product = product_for(mode)
    vs = cast_like(vs, x)

    def one(v: PyTree) -> PyTree:
        return product(f, x, v, args)

    out = jax.vmap(one)(vs) if chunk_size is None else jax.lax.map(one, vs, batch_size=chunk_size)
    return keep_sharding(out, x, batched=True)


def linearize_gradient(
    f: Callable[..., Any], x: PyTree, args: tuple[Any, ...], mode: str = "auto"
) -> tuple[PyTree, Callable[[PyTree], PyTree]]:
    """``(∇f(x), v -> H v)`` with the gradient pass run once and its residuals kept.

    For ``"fwd_rev"``/``"auto"`` this is ``jax.linearize`` of the gradient: each product then
    costs one tangent pass. For ``"rev_rev"`` it is ``jax.vjp`` of the gradient (H is
    symmetric, so the VJP of ∇f is H v): each product costs one reverse pass over the gradient
    graph. ``"rev_fwd"`` has no tangent-free part to keep, so its products recompute. The
    linear function is a ``jax.tree_util.Partial`` (a pytree), so it can cross ``jit``
    boundaries. No argument checks: this is the engine under :func:`hvp_fn` and the solvers.
    """
    grad_at = _grad_at(f, args)
    if mode in ("fwd_rev", "auto"):
        try:
            g, linear = jax.linearize(grad_at, x)
            if not _contains_primitive(jax.make_jaxpr(linear)(x).jaxpr, "custom_lin"):
                return g, linear
            raise TypeError(_FORWARD_REFUSED.format(mode="fwd_rev"))
        except (TypeError, NotImplementedError) as err:
            if not is_forward_mode_failure(err):
                raise
            if mode == "fwd_rev":
                raise TypeError(_FORWARD_REFUSED.format(mode="fwd_rev")) from err
    if mode in ("rev_rev", "auto"):
        g, pullback = jax.vjp(grad_at, x)
        return g, Partial(_first_of_pullback, pullback)
    rev_fwd = product_for("rev_fwd")
    return grad_at(x), Partial(lambda x_, args_, v: rev_fwd(f, x_, v, args_), x, args)


def _first_of_pullback(pullback: Callable[[PyTree], tuple[PyTree]], v: PyTree) -> PyTree:
    return pullback(v)[0]


@jax.jit
def _apply(linear_fn: Callable[[PyTree], PyTree], v: PyTree) -> PyTree:
    return linear_fn(v)


def hvp_fn(
    f: Callable[..., Any],
    x: PyTree,
    *args: Any,
    mode: str = "auto",
    cache: bool = True,
    remat: Remat = False,
) -> Callable[[PyTree], PyTree]:
    """A function ``v -> ∇²f(x) v`` for repeated products at one point.

    With ``cache=True`` the primal and gradient passes run once, here, and their intermediate
    values (the linearization's residuals) are held in memory for as long as the returned
    function lives: typically a few times the activations of one gradient evaluation, the
    same as a single backward pass keeps. Each product then costs only the tangent pass
    (about one forward pass, roughly 2/3 of an uncached product). With ``cache=False`` nothing
    is held and every call pays the full product (:func:`hvp`).

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
            names (e.g. ``dots_saveable``: matmul outputs). Measured on a 12-block residual
            MLP (6.3M parameters, batch 512, CPU): the cache holds 400 MiB, 25 MiB with
            True and 220 MiB with ``dots_saveable``, and the products took 0.92x and 0.79x
            the time of the plain cached one (memory-bound: re-reading 400 MiB costs about
            what recomputing the forward pass does); ``benchmarks/bench_memory.py``.

    Returns:
        A function of one pytree `v` like `x`, returning ``H v`` like `x`.
    """
    check_hvp_args(f, x, args, mode)
    if not cache:

        def hv_uncached(v: PyTree) -> PyTree:
            return hvp(f, x, v, *args, mode=mode, remat=remat)

        return hv_uncached

    _, linear = linearize_gradient(with_remat(f, remat), x, args, mode)
    sharded = _is_sharded(x)

    def hv(v: PyTree) -> PyTree:
        check_like(x, v, "x", "v")
        out = _apply(linear, cast_like(v, x))
        return keep_sharding(out, x) if sharded else out

    return hv

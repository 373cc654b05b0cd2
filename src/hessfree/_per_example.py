"""Per-example quantities over a batch: gradient norms and curvature along a direction.

``loss(params, example)`` is one example's loss; every leaf of ``batch`` carries a leading
axis B. Examples are processed together (``vmap``) or `chunk_size` at a time (``lax.map``), so
at most ``chunk_size × P`` per-example intermediates exist at once (P = number of parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ._products import cast_like, is_forward_mode_failure, product_for, tree_vdot
from ._validation import (
    PyTree,
    check_floating,
    check_like,
    check_positive_int,
    check_scalar_fn,
    describe_tree,
)

Loss = Callable[[PyTree, PyTree], jax.Array]


def _batch_size(batch: PyTree) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        msg = f"batch must contain at least one array; got {describe_tree(batch)}"
        raise ValueError(msg)
    shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
    if any(not shape for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
        msg = f"every leaf of batch must have the same leading axis B; got leaf shapes {shapes}"
        raise ValueError(msg)
    return int(shapes[0][0])


def _check(loss: Any, params: PyTree, batch: PyTree, chunk_size: Any) -> None:
    check_floating(params, "params")
    _batch_size(batch)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    example = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype), batch
    )
    check_scalar_fn(loss, params, (example,), "loss")


def _over_batch(
    one: Callable[[PyTree], jax.Array], batch: PyTree, chunk_size: int | None
) -> jax.Array:
    if chunk_size is None:
        return jax.vmap(one)(batch)
    return jax.lax.map(one, batch, batch_size=chunk_size)


def per_example_grad_norms(
    loss: Loss, params: PyTree, batch: PyTree, *, chunk_size: int | None = None
) -> jax.Array:
    """Euclidean norms of the per-example gradients, ``‖∇_θ loss(θ, x_b)‖`` for b = 1..B.

    Each example's gradient is reduced to its norm where it is made, so only the examples
    in flight hold a full gradient: memory ``O(chunk_size × P)`` (``O(B × P)`` without
    `chunk_size`, the same as ``vmap(grad)``), never more.

    Cost: B gradient evaluations (one batched reverse pass per chunk).

    Args:
        loss: ``loss(params, example) -> scalar`` for one example.
        params: the parameters, any pytree of floating arrays.
        batch: a pytree whose every leaf has the leading axis B.
        chunk_size: at most this many examples at once; None runs all B together.

    Returns:
        A ``(B,)`` array in the parameters' dtype.

    Raises:
        ValueError: batch leaves disagree on B; `loss` is not scalar; bad `chunk_size`.
        TypeError: non-floating parameters.
    """
    _check(loss, params, batch, chunk_size)

    def one(example: PyTree) -> jax.Array:
        g = jax.grad(loss)(params, example)
        return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree_util.tree_leaves(g)))

    return _over_batch(one, batch, chunk_size)


def _second_directional(loss: Loss, params: PyTree, v: PyTree, example: PyTree) -> jax.Array:
    """``vᵀ ∇²loss v = d²/dt² loss(θ + t v)`` by forward over forward (no P-sized reverse)."""

    def along(p: PyTree) -> jax.Array:
        return jax.jvp(lambda q: loss(q, example), (p,), (v,))[1]

    return jax.jvp(along, (params,), (v,))[1]


def per_example_vhv(
    loss: Loss, params: PyTree, batch: PyTree, v: PyTree, *, chunk_size: int | None = None
) -> jax.Array:
    """Per-example curvature along v: ``vᵀ ∇²_θ loss(θ, x_b) v`` for b = 1..B.

    Computed as the second directional derivative ``d²/dt² loss(θ + t v, x_b)`` (forward over
    forward: two tangent passes, no reverse pass), falling back to a Hessian-vector product
    ``⟨v, H_b v⟩`` when forward mode cannot go through a ``jax.custom_vjp`` in `loss`.

    Cost: B batched products, each about two forward passes of one example.

    Args:
        loss: ``loss(params, example) -> scalar`` for one example.
        params: the parameters.
        batch: a pytree whose every leaf has the leading axis B.
        v: the direction, a pytree like `params`.
        chunk_size: at most this many examples at once.

    Returns:
        A ``(B,)`` array.

    Raises:
        ValueError: `v` does not match `params`; batch leaves disagree on B; bad `chunk_size`.
        TypeError: non-floating parameters.
    """
    _check(loss, params, batch, chunk_size)
    check_like(params, v, "params", "v")
    v = cast_like(v, params)

    def by_forward(example: PyTree) -> jax.Array:
        return _second_directional(loss, params, v, example)

    def by_hvp(example: PyTree) -> jax.Array:
        return tree_vdot(v, product_for("auto")(loss, params, v, (example,)))

    try:
        return _over_batch(by_forward, batch, chunk_size)
    except (TypeError, NotImplementedError) as err:
        if not is_forward_mode_failure(err):
            raise
    return _over_batch(by_hvp, batch, chunk_size)

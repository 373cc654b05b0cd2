"""Per-example quantities over a batch: gradient norms and curvature along a direction.

``example_loss(params, example)`` is one example's loss; every leaf of ``batch`` carries a leading
axis B. Examples are processed together (``vmap``) or `chunk_size` at a time (``lax.map``), so
at most ``chunk_size × P`` per-example intermediates exist at once (P = number of parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from . import _tree as tree
from ._products import has_custom_vjp, product_for
from ._staging import staged
from ._validation import (
    PyTree,
    batch_size,
    check_floating,
    check_like,
    check_positive_int,
    check_scalar_fn,
)

Loss = Callable[[PyTree, PyTree], jax.Array]


def _check(example_loss: Any, params: PyTree, batch: PyTree) -> PyTree:
    """The static checks; returns one example's structure."""
    check_floating(params, "params")
    batch_size(batch)
    example = jax.tree_util.tree_map(
        lambda leaf: jax.ShapeDtypeStruct(jnp.shape(leaf)[1:], jnp.result_type(leaf)), batch
    )
    check_scalar_fn(example_loss, params, (example,), "example_loss")
    return example


def _over_batch(
    one: Callable[[PyTree], jax.Array], batch: PyTree, chunk_size: int | None
) -> jax.Array:
    if chunk_size is None:
        return jax.vmap(one)(batch)
    return jax.lax.map(one, batch, batch_size=chunk_size)


def _grad_norms_impl(
    example_loss: Loss, params: PyTree, batch: PyTree, *, chunk_size: int | None
) -> jax.Array:
    _check(example_loss, params, batch)

    def one(example: PyTree) -> jax.Array:
        return tree.norm(jax.grad(example_loss)(params, example))

    return _over_batch(one, batch, chunk_size)


def per_example_grad_norms(
    example_loss: Loss, params: PyTree, batch: PyTree, *, chunk_size: int | None = None
) -> jax.Array:
    """Euclidean norms of the per-example gradients, ``‖∇_θ loss(θ, x_b)‖`` for b = 1..B.

    Each example's gradient is reduced to its norm where it is made, so only the examples
    in flight hold a full gradient: memory ``O(chunk_size × P)`` (``O(B × P)`` without
    `chunk_size`, the same as ``vmap(grad)``), never more.

    Cost: B gradient evaluations (one batched reverse pass per chunk).

    Args:
        example_loss: ``example_loss(params, example) -> scalar`` for one example.
        params: the parameters, any pytree of floating arrays.
        batch: a pytree whose every leaf has the leading axis B.
        chunk_size: at most this many examples at once; None runs all B together.

    Returns:
        A ``(B,)`` array in the parameters' dtype.

    Raises:
        ValueError: batch leaves disagree on B; `example_loss` is not scalar; bad `chunk_size`.
        TypeError: non-floating parameters.
    """
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    return staged(_grad_norms_impl, example_loss, params, batch, chunk_size=chunk_size)


def _second_directional(loss: Loss, params: PyTree, v: PyTree, example: PyTree) -> jax.Array:
    """``vᵀ ∇²loss v = d²/dt² loss(θ + t v)`` by forward over forward (no P-sized reverse)."""

    def along(p: PyTree) -> jax.Array:
        return jax.jvp(lambda q: loss(q, example), (p,), (v,))[1]

    return jax.jvp(along, (params,), (v,))[1]


def _vhv_impl(
    example_loss: Loss, params: PyTree, batch: PyTree, v: PyTree, *, chunk_size: int | None
) -> jax.Array:
    example = _check(example_loss, params, batch)
    check_like(params, v, "params", "v")
    check_floating(v, "v")
    v = tree.cast_like(v, params)
    if not has_custom_vjp(example_loss, params, (example,)):

        def by_forward(ex: PyTree) -> jax.Array:
            return _second_directional(example_loss, params, v, ex)

        return _over_batch(by_forward, batch, chunk_size)
    product = product_for("auto", example_loss, params, (example,))

    def by_hvp(ex: PyTree) -> jax.Array:
        return tree.vdot(v, product(example_loss, params, v, (ex,)))

    return _over_batch(by_hvp, batch, chunk_size)


def per_example_vhv(
    example_loss: Loss, params: PyTree, batch: PyTree, v: PyTree, *, chunk_size: int | None = None
) -> jax.Array:
    """Per-example curvature along v: ``vᵀ ∇²_θ loss(θ, x_b) v`` for b = 1..B.

    Computed as the second directional derivative ``d²/dt² loss(θ + t v, x_b)`` (forward over
    forward: two tangent passes, no reverse pass), falling back to a Hessian-vector product
    ``⟨v, H_b v⟩`` when forward mode cannot go through a ``jax.custom_vjp`` in `example_loss` (decided from its program).

    Cost: B batched products, each about two forward passes of one example.

    Args:
        example_loss: ``example_loss(params, example) -> scalar`` for one example.
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
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    return staged(_vhv_impl, example_loss, params, batch, v, chunk_size=chunk_size)

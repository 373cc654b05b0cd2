"""Curvature over data that comes in batches: the exact size-weighted mean of batch operators.

``A = Σ_b (n_b / N) A_b`` where ``A_b = build(params, batch_b)`` is the operator of batch b
under the batch-mean convention (``hessian`` of a mean loss, ``ggn``, ``fisher``) and n_b its
size, so A is the operator of the concatenated data. Batches of one shape are stacked and
visited by ``lax.scan`` inside every product; batches of another shape (a short last batch)
form a second group. Each product rebuilds one batch's operator at a time, so curvature
memory is that of one batch (times one vector), whatever the number of batches.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import Partial

from . import _tree as tree
from ._operators import CurvatureOperator, apply
from ._validation import PyTree, check_callable, check_floating, describe_tree

Build = Callable[[PyTree, PyTree], CurvatureOperator]


class _MeanOverBatches:
    """``v -> Σ_groups Σ_b w_b · build(params, batch_b) v``, one batch operator at a time.

    Static part of the product (compared by the identity of `build`); the parameters, the
    stacked batches and the weights are its pytree arguments.
    """

    __slots__ = ("build",)

    def __init__(self, build: Build) -> None:
        self.build = build

    def __hash__(self) -> int:
        return hash((_MeanOverBatches, self.build))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _MeanOverBatches) and other.build is self.build

    def __call__(
        self, params: PyTree, groups: tuple[PyTree, ...], weights: tuple[jax.Array, ...], v: PyTree
    ) -> PyTree:
        def step(acc: PyTree, item: tuple[PyTree, jax.Array]) -> tuple[PyTree, None]:
            batch, w = item
            out = apply(self.build(params, batch), v)
            return tree.axpy(w.astype(tree.scalar_dtype(v)), out, acc), None

        total = tree.zeros_like(v)
        for group, w in zip(groups, weights, strict=True):  # a static count of groups
            total, _ = jax.lax.scan(step, total, (group, w))
        return total


def _leading(batch: PyTree, name: str) -> int:
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves or not all(getattr(leaf, "ndim", 0) >= 1 for leaf in leaves):
        msg = (
            f"{name} must be a pytree of arrays with a leading batch axis; got "
            f"{describe_tree(batch)}"
        )
        raise ValueError(msg)
    return int(leaves[0].shape[0])


def _signature(batch: PyTree) -> Any:
    leaves, treedef = jax.tree_util.tree_flatten(batch)
    return treedef, tuple((tuple(jnp.shape(x)), jnp.result_type(x)) for x in leaves)


def _group(batches: list[PyTree], sizes: list[int]) -> tuple[tuple, tuple]:
    """Stack the batches of one structure and shape; weights ``n_b / N`` per group."""
    total = sum(sizes)
    order: dict[Any, list[int]] = {}
    for i, batch in enumerate(batches):
        order.setdefault(_signature(batch), []).append(i)
    groups, weights = [], []
    for members in order.values():
        groups.append(
            jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *[batches[i] for i in members])
        )
        weights.append(jnp.asarray([sizes[i] / total for i in members]))
    return tuple(groups), tuple(weights)


def _as_list(batches: Any) -> list[PyTree]:
    if isinstance(batches, tuple) and batches and all(hasattr(b, "shape") for b in batches):
        msg = (
            "batches must be a list (or iterator) of batches, each a pytree such as "
            "(inputs, targets); got a tuple of arrays, which would be read as one batch per "
            "array. Pass [(inputs, targets)] for one batch, or stacked=True for batches "
            "stacked along a leading axis."
        )
        raise TypeError(msg)
    if isinstance(batches, dict) or hasattr(batches, "shape") or not isinstance(batches, Iterable):
        msg = (
            "batches must be a list (or iterator) of batches, or with stacked=True a pytree "
            f"whose leaves have a leading axis of num_batches; got {describe_tree(batches)}"
        )
        raise TypeError(msg)
    out = list(batches)
    if not out:
        msg = "batches must hold at least one batch; got none"
        raise ValueError(msg)
    return out


def over_batches(
    build: Build,
    params: PyTree,
    batches: Any,
    *,
    stacked: bool = False,
    sizes: Iterable[int] | None = None,
) -> CurvatureOperator:
    """The curvature of all the data, from batches: ``A v = Σ_b (n_b/N) A_b v``.

    ``A_b = build(params, batch_b)`` is a batch-mean operator (``hessian`` of a mean loss,
    ``ggn``, ``fisher``), so with weights ``n_b / N`` (n_b the batch's size, N their sum)
    the products are exactly those of the same operator on the concatenated data. Define
    `build` once (it is compared by identity): rebuilding the operator at new `params`
    in a loop then compiles nothing new.

    Cost and memory per product: every batch's operator is built and applied once, in a
    ``lax.scan`` (for ``ggn`` one linearization of the model and one product per batch, as
    ``ggn(..., chunk_size=n_b)``; for a cached ``hessian`` one gradient linearization and one
    tangent pass per batch, about an HVP). Only one batch's linearization is alive at a time:
    memory is that of one batch's operator plus the accumulated vector. The data itself is
    held as given (stacked, one array per group of equal-shape batches).

    Args:
        build: ``build(params, batch) -> CurvatureOperator``, e.g.
            ``lambda p, b: hf.ggn(model, "mse", p, b[0], b[1])``.
        params: the parameters, a pytree of floating arrays.
        batches: a list or iterator of batches, each a pytree of arrays with a leading
            batch axis (e.g. ``(inputs, targets)``); batches of different sizes are fine (each
            size forms its own stacked group). With ``stacked=True``: one pytree whose leaves
            have a leading axis of num_batches, then the batch axis.
        stacked: whether `batches` is already stacked along a leading axis.
        sizes: the number of examples in each batch, if not the length of each batch's
            first leaf's leading axis (e.g. a batch holding a per-batch key first).

    Returns:
        A :class:`CurvatureOperator` on pytrees like `params`, labeled ``"<label> over B
        batches"``, positive semidefinite if the batch operators are.

    Raises:
        TypeError: `build` not callable; `batches` not a list/iterator of batches (a tuple of
            arrays is refused: it reads as one batch per array); batches of different pytree
            structures; `build` not returning a CurvatureOperator.
        ValueError: no batches; a batch without a leading axis; `sizes` of the wrong length or
            not positive.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> model = lambda w, x: x @ w
        >>> build = lambda w, b: hf.ggn(model, "mse", w, b[0], b[1])
        >>> X, Y = jnp.arange(12.0).reshape(6, 2), jnp.zeros((6,))
        >>> whole = hf.ggn(model, "mse", jnp.ones(2), X, Y).to_dense()
        >>> parts = hf.over_batches(build, jnp.ones(2), [(X[:4], Y[:4]), (X[4:], Y[4:])])
        >>> bool(jnp.allclose(parts.to_dense(), whole))
        True

    References:
        The per-batch accumulation of curvlinops' operators (Dangel et al., 2025) and of
        Martens (2010), here as one ``lax.scan`` per product.
    """
    check_callable(build, "build", "build(params, batch) -> CurvatureOperator")
    check_floating(params, "params")
    if stacked:
        num = _leading(batches, "batches (stacked=True)")
        each = _leading(jax.tree_util.tree_map(lambda x: x[0], batches), "each stacked batch")
        counts = [each] * num
        groups: tuple = (batches,)
        listed = None
    else:
        listed = _as_list(batches)
        num = len(listed)
        structures = {jax.tree_util.tree_structure(b) for b in listed}
        if len(structures) > 1:
            msg = (
                "batches must all have one pytree structure; got "
                f"{len(structures)} different ones, e.g. {sorted(map(str, structures))[:2]}"
            )
            raise TypeError(msg)
        counts = [_leading(b, f"batches[{i}]") for i, b in enumerate(listed)]
    if sizes is not None:
        counts = [int(s) for s in sizes]
        if len(counts) != num or min(counts, default=0) <= 0:
            msg = f"sizes must give one positive size per batch ({num} batches); got {counts}"
            raise ValueError(msg)
    if listed is None:
        weights: tuple = (jnp.asarray(counts) / sum(counts),)
    else:
        groups, weights = _group(listed, counts)
    first = jax.tree_util.tree_map(lambda x: x[0], groups[0])
    example = jax.eval_shape(build, params, first)
    if not isinstance(example, CurvatureOperator):
        msg = f"build must return a CurvatureOperator; got {type(example).__name__}"
        raise TypeError(msg)
    matvec = Partial(_MeanOverBatches(build), params, groups, weights)
    label = f"{example.label} over {num} batches"
    return CurvatureOperator(matvec, params, label=label, psd=example.psd)

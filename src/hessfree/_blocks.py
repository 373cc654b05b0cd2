"""Parameter blocks: the block-diagonal approximation of an operator, and its blocks one by one.

Blocks are given as masks in ``optax.masked``'s convention (a pytree of Python bools like the
parameters, or a prefix of it; see :meth:`CurvatureOperator.restrict`). By default there is
one block per layer (:func:`layer_masks`). ``block_diagonal(op)`` keeps the diagonal blocks
``A[S_b, S_b]`` of ``op`` and drops the couplings between blocks; ``blocks(op)`` gives each
block as its own operator on the selected sub-pytree, e.g. for a per-layer top eigenvalue.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.tree_util import DictKey, Partial, SequenceKey

from ._operators import CurvatureOperator, Mask, mask_leaves, operator_on, restrict_to
from ._validation import PyTree, check_positive_int, describe_tree

# --- default blocks: one per layer --------------------------------------------------------------


def _is_leaf_node(node: Any) -> bool:
    return jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(node))


def _children(node: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """The direct children of a pytree node with their keys (None children included)."""
    items, _ = jax.tree_util.tree_flatten_with_path(node, is_leaf=lambda x: x is not node)
    return [(tuple(path), child) for path, child in items]


def _owners(params: PyTree) -> list[tuple[Any, ...]]:
    """For each leaf (flattening order), the key path of the layer holding it.

    A leaf's layer is the node that contains it; a node with one array child under an
    attribute key (a wrapper such as an ``nnx.Param``'s ``.value``) counts as that leaf.
    """
    owners: list[tuple[Any, ...]] = []

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if node is None:
            return
        if _is_leaf_node(node):
            owners.append(path[:-1])
            return
        kids = _children(node)
        if (
            len(kids) == 1
            and len(kids[0][0]) == 1
            and not isinstance(kids[0][0][0], DictKey | SequenceKey)
            and kids[0][1] is not None
            and _is_leaf_node(kids[0][1])
        ):
            owners.append(path[:-1])  # a wrapper around one array: the wrapper is the leaf
            return
        for key, child in kids:
            walk(child, path + key)

    walk(params, ())
    return owners


def layer_masks(params: PyTree) -> list[PyTree]:
    """One mask per layer of `params`: the default blocks of :func:`block_diagonal`.

    Leaves are grouped by the node that holds them: ``{"layer1": {"w", "b"}, "layer2":
    {...}}`` gives one block per top-level key, a Flax linen ``{"params": {"Dense_0": {...},
    ...}}`` one per module, an ``nnx.State`` one per module (an ``nnx.Param`` wrapping one
    array counts as that array), an Equinox MLP one per ``layers[i]``. A leaf directly at the
    root (a flat list or dict of arrays, or one array) is a block of its own. Blocks come in
    the order of their first leaf.

    Args:
        params: the parameters (or their structure), any pytree.

    Returns:
        A list of masks, each a pytree of bools with the structure of `params`, disjoint and
        together covering every leaf.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> p = {"l1": {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}, "l2": {"w": jnp.ones(2)}}
        >>> hf.layer_masks(p)
        [{'l1': {'b': True, 'w': True}, 'l2': {'w': False}}, {'l1': {'b': False, 'w': False}, 'l2': {'w': True}}]
    """
    treedef = jax.tree_util.tree_structure(params)
    owners = _owners(params)
    if len(owners) != treedef.num_leaves or not owners:
        msg = (
            f"params must be a pytree of arrays with at least one leaf; got {describe_tree(params)}"
        )
        raise ValueError(msg)
    groups: dict[Any, list[int]] = {}
    for i, owner in enumerate(owners):
        groups.setdefault(owner if owner else ("<root leaf>", i), []).append(i)
    return [
        jax.tree_util.tree_unflatten(treedef, [i in members for i in range(len(owners))])
        for members in groups.values()
    ]


# --- validation ------------------------------------------------------------------------------


def _block_selections(
    op: Any, masks: Sequence[Mask] | None, fn: str
) -> tuple[PyTree, list[tuple[bool, ...]]]:
    if not isinstance(op, CurvatureOperator):
        msg = f"{fn}: op must be a CurvatureOperator (hessian, ggn, fisher, ...); got {type(op).__name__}"
        raise TypeError(msg)
    structure = op.in_structure()
    if masks is None:
        masks = layer_masks(structure)
    if not isinstance(masks, list | tuple):
        msg = (
            f"masks must be a list or tuple of masks, one per block (each a pytree of bools "
            f"like the parameters); got {describe_tree(masks)}. For a single block use "
            f"op.restrict(mask)."
        )
        raise TypeError(msg)
    if not masks:
        msg = "masks must hold at least one mask; got an empty sequence"
        raise ValueError(msg)
    return structure, [mask_leaves(m, structure, f"masks[{i}]") for i, m in enumerate(masks)]


def _assignment(structure: PyTree, selections: list[tuple[bool, ...]]) -> tuple[int, ...]:
    """The block of every leaf; ValueError if two masks share a leaf or a leaf is in none."""
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(structure)]
    owner: list[int | None] = [None] * len(paths)
    for b, selected in enumerate(selections):
        for i, s in enumerate(selected):
            if not s:
                continue
            if owner[i] is not None:
                msg = (
                    f"masks must be disjoint; leaf {paths[i] or '(the array)'} is selected by "
                    f"masks[{owner[i]}] and masks[{b}]"
                )
                raise ValueError(msg)
            owner[i] = b
    missing = [paths[i] or "(the array)" for i, b in enumerate(owner) if b is None]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        msg = (
            f"masks must cover every parameter leaf; {shown} in no block. Add a block for "
            f"them, or restrict the operator first: block_diagonal(op.restrict(mask), masks)."
        )
        raise ValueError(msg)
    return tuple(b for b in owner if b is not None)


# --- block-diagonal product --------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BlockDiagonal:
    """``(A, v) -> Σ_b embed(A[S_b, S_b] v[S_b])`` with static block assignments (hashable)."""

    assign: tuple[int, ...]
    num_blocks: int
    chunk_size: int | None

    def __call__(self, matvec: Callable[[PyTree], PyTree], v: PyTree) -> PyTree:
        if self.num_blocks == 1:
            return matvec(v)
        leaves, treedef = jax.tree_util.tree_flatten(v)
        k = self.num_blocks

        def spread(leaf: jax.Array, b: int) -> jax.Array:
            own = (jnp.arange(k) == b).reshape((k,) + (1,) * jnp.ndim(leaf))
            return jnp.where(own, leaf[None], jnp.zeros((), jnp.result_type(leaf)))

        stacked = jax.tree_util.tree_unflatten(
            treedef, [spread(leaf, b) for leaf, b in zip(leaves, self.assign, strict=True)]
        )
        if self.chunk_size is None:
            out = jax.vmap(matvec)(stacked)
        else:
            out = jax.lax.map(matvec, stacked, batch_size=self.chunk_size)
        rows = [o[b] for o, b in zip(jax.tree_util.tree_leaves(out), self.assign, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, rows)


def block_diagonal(
    op: CurvatureOperator, masks: Sequence[Mask] | None = None, *, chunk_size: int | None = None
) -> CurvatureOperator:
    """The block-diagonal approximation of `op`: ``v -> Σ_b embed(A[S_b, S_b] v[S_b])``.

    Each block ``S_b`` is a set of parameter leaves given by a mask; the couplings between
    blocks are dropped. On the same parameters as `op` (its input structure), with its scale,
    damping and `psd` (principal blocks of a PSD matrix are PSD, hence so is their direct sum).

    Cost per product: one product of `op` per block, vmapped over the blocks (each on `v`
    with zeros outside its block), so about ``len(masks)`` products' time and, with ``vmap``,
    ``len(masks)`` times one product's memory; ``chunk_size`` blocks at a time
    (``lax.map``) bounds the memory. For a Hessian, the blocks of ``hessian(...,
    wrt=mask)`` (see :func:`blocks`) are cheaper one by one.

    Args:
        op: a :class:`CurvatureOperator` (``hessian``, ``ggn``, ``fisher``, ...).
        masks: a list or tuple of masks, one per block, each a pytree of Python bools like
            the parameters or a prefix of it (``optax.masked``'s convention). They must be
            disjoint and cover every leaf (restrict `op` first to leave leaves out). None
            (default): one block per layer, :func:`layer_masks`.
        chunk_size: blocks per vectorized batch, or None for all at once.

    Returns:
        A :class:`CurvatureOperator` on pytrees like `op`'s, labeled ``"block-diagonal
        <label> (B blocks)"``.

    Raises:
        TypeError: `op` not a CurvatureOperator; `masks` not a list/tuple; a mask not a
            pytree of bools; `chunk_size` not a positive int.
        ValueError: a mask of the wrong structure or selecting nothing; overlapping masks;
            a leaf in no mask; no masks.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> f = lambda p: (p["a"] @ p["b"]) ** 2 / 2
        >>> H = hf.hessian(f, {"a": jnp.ones(1), "b": jnp.full(1, 2.0)})
        >>> H.to_dense().tolist(), hf.block_diagonal(H).to_dense().tolist()
        ([[4.0, 4.0], [4.0, 1.0]], [[4.0, 0.0], [0.0, 1.0]])
    """
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    structure, selections = _block_selections(op, masks, "block_diagonal")
    assign = _assignment(structure, selections)
    matvec = Partial(_BlockDiagonal(assign, len(selections), chunk_size), op.matvec)
    label = f"block-diagonal {op.label} ({len(selections)} blocks)"
    return operator_on(matvec, structure, op, label)


def blocks(op: CurvatureOperator, masks: Sequence[Mask] | None = None) -> list[CurvatureOperator]:
    """The diagonal blocks of `op` as operators: ``[op.restrict(m) for m in masks]``.

    Each acts on the sub-pytree its mask selects (unselected leaves None; see
    :meth:`CurvatureOperator.restrict`), e.g. for the top eigenvalue of every layer with
    ``eigsh``. Masks may overlap and need not cover every leaf. Building them costs nothing
    (each product is one product of `op`).

    Args:
        op: a :class:`CurvatureOperator`.
        masks: a list or tuple of masks (``optax.masked``'s convention); None (default):
            one per layer, :func:`layer_masks`.

    Returns:
        A list of :class:`CurvatureOperator`, one per mask, labeled by the layer they hold.
    """
    _, selections = _block_selections(op, masks, "blocks")
    return [restrict_to(op, selected) for selected in selections]

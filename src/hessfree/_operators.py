"""Curvature operators: :class:`CurvatureOperator` and the Hessian.

A :class:`CurvatureOperator` is a registered pytree: its children are arrays (the
linearization's residuals, the point and data, damping, scale) and its aux data is static
configuration compared by value (the user's functions by identity, settings, the parameters'
structure). So an operator crosses ``jit`` and ``vmap`` boundaries, and rebuilding one at new
parameters inside a training loop changes only its leaves: its products compile once.
Algorithms only ever call ``mv`` / ``mm``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from . import _tree as tree
from ._products import (
    VALID_MODES,
    Remat,
    _UncachedHvp,
    cached_gradient_linearization,
    check_hvp_args,
    with_remat,
)
from ._staging import staged
from ._validation import (
    PyTree,
    check_choice,
    check_floating,
    check_like,
    check_positive_int,
    check_real_scalar,
    describe_tree,
)

DENSE_LIMIT = 10_000

Mask = Any
"""A pytree of Python bools like the parameters (or a prefix of it), or a callable giving one."""


def _concrete_sign(value: Any) -> float | None:
    """The sign of a scalar if it is known now (not traced), else None."""
    if isinstance(value, Tracer):
        return None
    return float(np.sign(np.asarray(value)))


@jax.tree_util.register_pytree_node_class
class CurvatureOperator:
    """A symmetric matrix-free operator ``v -> (c A + λ I) v`` on a parameter pytree.

    ``A v`` is `matvec`, a pytree-function (a :class:`jax.tree_util.Partial` or a cached
    linearization, whose arrays are pytree children); ``c`` is the scale and ``λ`` the damping,
    both scalars (None when unset). Build one with :func:`hessian`, :func:`ggn` or
    :func:`fisher`, or wrap your own product: ``CurvatureOperator(matvec, params)``.

    Attributes:
        matvec: the undamped, unscaled product ``v -> A v``.
        label: a short static display label, e.g. ``"hessian"`` or ``"fisher (mc, categorical)"``.
        psd: whether the operator is known positive semidefinite (GGN, Fisher, and those
            damped by λ ≥ 0 or scaled by c ≥ 0; traced λ and c are assumed nonnegative).
        scale, damping: the scalars c and λ, or None.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> op = hf.hessian(lambda x: jnp.sum(x**4) / 12, jnp.array([1.0, 2.0]))  # diag(x²)
        >>> (2 * op + 1.0).mv(jnp.ones(2)).tolist()
        [3.0, 9.0]
    """

    def __init__(
        self,
        matvec: Callable[[PyTree], PyTree],
        structure: PyTree,
        *,
        label: str = "custom",
        psd: bool = False,
        scale: Any = None,
        damping: Any = None,
    ) -> None:
        if not callable(matvec):
            msg = f"matvec must be callable as matvec(v); got {type(matvec).__name__}"
            raise TypeError(msg)
        check_floating(structure, "structure")
        leaves, self._treedef = jax.tree_util.tree_flatten(tree.structure_of(structure))
        self._leaves = tuple(leaves)
        self.matvec = matvec
        self.label = str(label)
        self.psd = bool(psd)
        self.scale = scale
        self.damping = damping

    # --- pytree -------------------------------------------------------------------------
    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        children = (self.matvec, self.scale, self.damping)
        return children, (self._treedef, self._leaves, self.label, self.psd)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> CurvatureOperator:
        op = object.__new__(cls)
        op._treedef, op._leaves, op.label, op.psd = aux
        op.matvec, op.scale, op.damping = children
        return op

    def _replace(self, **changes: Any) -> CurvatureOperator:
        children, aux = self.tree_flatten()
        op = CurvatureOperator.tree_unflatten(aux, children)
        for name, value in changes.items():
            setattr(op, name, value)
        return op

    # --- structure ----------------------------------------------------------------------
    def in_structure(self) -> PyTree:
        """A pytree of ``jax.ShapeDtypeStruct`` like the parameters (the vectors it acts on)."""
        return jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)`` with n the total number of parameters."""
        n = tree.size(self._leaves)
        return (n, n)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the raveled parameters (their promoted dtype)."""
        return np.dtype(jnp.result_type(*self._leaves))

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}=…" for name in ("scale", "damping") if getattr(self, name) is not None
        )
        return f"CurvatureOperator({self.label}, shape={self.shape}, dtype={self.dtype}, psd={self.psd}{extra})"

    # --- products -----------------------------------------------------------------------
    def mv(self, v: PyTree) -> PyTree:
        """``(c A + λ I) v`` for a pytree `v` like the parameters; returns a pytree like them.

        Compiled once per operator configuration and shapes (staged), whatever the values.
        """
        return tree.keep_sharding(staged(_checked_apply, self, v), v)

    def __matmul__(self, v: PyTree) -> PyTree:
        return self.mv(v)

    def mm(self, vs: PyTree, chunk_size: int | None = None) -> PyTree:
        """Many products at once; every leaf of `vs` has a leading batch axis of size k.

        Vectorized with ``vmap`` (the linearization is shared, only tangents are batched); with
        `chunk_size`, ``chunk_size`` vectors at a time (``lax.map``), bounding memory.
        """
        structure = self.in_structure()
        check_like(structure, vs, "the operator's parameters", "vs", batched=True)
        check_floating(vs, "vs")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        return staged(_apply_many, self, tree.cast_like(vs, structure), chunk_size=chunk_size)

    # --- parameter blocks ---------------------------------------------------------------
    def restrict(self, mask: Mask) -> CurvatureOperator:
        """The block ``A[S, S]`` on the parameters selected by `mask`, the others held fixed.

        `mask` follows ``optax.masked``'s convention: a pytree of Python bools with the
        structure of the parameters, or a prefix of it (one bool for a whole subtree), or a
        callable returning one from the parameters' structure (``jax.ShapeDtypeStruct``
        leaves). Container types may differ where the key paths agree (a plain dict mask for
        an ``nnx.State`` or a ``FrozenDict``).

        The restricted operator acts on the *selected sub-pytree*: the parameters' pytree with
        every unselected leaf replaced by None (an empty subtree in JAX), so the tree keeps its
        shape and keys; :func:`select` builds such vectors (``select(grads, mask)``). Its
        matrix, in ``ravel_pytree`` order of that sub-pytree, is the principal sub-block of
        :meth:`to_dense` at the selected leaves' entries. Scale and damping carry over (the
        block of ``c A + λ I`` is ``c A[S, S] + λ I``), and so does `psd` (a principal block
        of a PSD matrix is PSD).

        Cost: each product embeds `v` with zeros in the unselected leaves and runs one full
        product. For a Hessian, ``hessian(f, x, *args, wrt=mask)`` gives the same operator
        for less: it differentiates with respect to the selected leaves only.

        Raises:
            TypeError: `mask` is not a pytree of bools (or a callable returning one).
            ValueError: `mask` does not match the parameters' structure, or selects nothing.

        Example:
            >>> import jax.numpy as jnp
            >>> import hessfree as hf
            >>> f = lambda p: jnp.sum(p["a"] ** 2 * p["b"])
            >>> H = hf.hessian(f, {"a": jnp.ones(2), "b": jnp.full(2, 3.0)})
            >>> Hb = H.restrict({"a": True, "b": False})
            >>> Hb.in_structure()["b"], Hb.to_dense().tolist()
            (None, [[6.0, 0.0], [0.0, 6.0]])
        """
        return restrict_to(self, mask_leaves(mask, self.in_structure()))

    # --- algebra ------------------------------------------------------------------------
    def __add__(self, lam: Any) -> CurvatureOperator:
        """``A + λ I`` (damping) for a scalar λ, possibly traced."""
        if isinstance(lam, CurvatureOperator):
            return NotImplemented
        check_real_scalar(lam, "damping λ")
        sign = _concrete_sign(lam)
        damping = lam if self.damping is None else self.damping + lam
        return self._replace(damping=damping, psd=self.psd and (sign is None or sign >= 0))

    __radd__ = __add__

    def __mul__(self, c: Any) -> CurvatureOperator:
        """``c A`` (scaling, damping scaled too) for a scalar c, possibly traced."""
        if isinstance(c, CurvatureOperator):
            return NotImplemented
        check_real_scalar(c, "scale c")
        sign = _concrete_sign(c)
        scale = c if self.scale is None else self.scale * c
        damping = None if self.damping is None else self.damping * c
        return self._replace(
            scale=scale, damping=damping, psd=self.psd and (sign is None or sign >= 0)
        )

    __rmul__ = __mul__

    # --- export -------------------------------------------------------------------------
    def to_dense(self, force: bool = False) -> jax.Array:
        """The ``(n, n)`` matrix, rows and columns in ``jax.flatten_util.ravel_pytree`` order.

        Costs n products (chunked, 128 at a time). Refuses above n = 10,000 unless `force`.
        """
        n = self.shape[0]
        if n > DENSE_LIMIT and not force:
            gib = n * n * self.dtype.itemsize / 2**30
            msg = (
                f"to_dense would build a {n:,} × {n:,} matrix ({gib:.1f} GiB) from {n:,} products; "
                f"the limit is n = {DENSE_LIMIT:,}. Pass force=True to build it anyway."
            )
            raise ValueError(msg)
        return staged(_dense, self)

    def as_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` on flat numpy vectors (ravel_pytree order).

        Usable by ``eigsh``, ``cg``, ``minres``. Products run jitted in the operator's dtype;
        inputs are cast to it (so float64 vectors work on a float32 operator).
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:  # pragma: no cover - depends on the environment
            msg = "as_scipy() needs scipy: pip install scipy (or hessfree[bench])"
            raise ImportError(msg) from err
        # Ravel and unravel on the host: inside one XLA program, slicing a flat vector into
        # the parameters' shapes and concatenating the result made each product about 8x
        # slower on XLA:CPU (measured on the 1M-parameter MLP) than the pytree product.
        leaves, treedef = jax.tree_util.tree_flatten(self.in_structure())
        splits = np.cumsum([int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves])[:-1]
        dtype = self.dtype

        def to_tree(x: np.ndarray, batch: tuple[int, ...]) -> PyTree:
            parts = np.split(np.asarray(x), splits, axis=0)
            return jax.tree_util.tree_unflatten(
                treedef,
                [
                    jnp.asarray(np.moveaxis(part, 0, -1).reshape(*batch, *leaf.shape), leaf.dtype)
                    for part, leaf in zip(parts, leaves, strict=True)
                ],
            )

        def to_flat(out: PyTree, batch: tuple[int, ...]) -> np.ndarray:
            flat = [
                np.asarray(leaf, dtype).reshape(*batch, -1)
                for leaf in jax.tree_util.tree_leaves(out)
            ]
            return np.moveaxis(np.concatenate(flat, axis=-1), -1, 0)

        def matvec(x: np.ndarray) -> np.ndarray:
            return to_flat(staged(apply, self, to_tree(np.ravel(x), ())), ())

        def matmat(x: np.ndarray) -> np.ndarray:
            k = np.shape(x)[1]
            return to_flat(staged(_apply_many, self, to_tree(x, (k,)), chunk_size=None), (k,))

        return LinearOperator(self.shape, matvec, matvec, matmat, dtype)  # pyright: ignore[reportCallIssue]

    def as_lineax(self) -> Any:
        """A ``lineax.FunctionLinearOperator``: symmetric, and positive semidefinite if `psd`."""
        try:
            import lineax as lx
        except ImportError as err:  # pragma: no cover - depends on the environment
            msg = "as_lineax() needs lineax: pip install lineax (or hessfree[lineax])"
            raise ImportError(msg) from err
        tags = [lx.symmetric_tag]
        if self.psd:
            tags.append(lx.positive_semidefinite_tag)
        return lx.FunctionLinearOperator(Partial(apply, self), self.in_structure(), tags)


def apply(op: CurvatureOperator, v: PyTree) -> PyTree:
    """``(c A + λ I) v`` without checks (call while tracing, or through :func:`staged`)."""
    out = op.matvec(v)
    if op.scale is not None:
        out = tree.scale(op.scale, out)
    if op.damping is not None:
        out = tree.axpy(op.damping, v, out)
    return tree.cast_like(out, v)


def _checked_apply(op: CurvatureOperator, v: PyTree) -> PyTree:
    structure = op.in_structure()
    check_like(structure, v, "the operator's parameters", "v")
    check_floating(v, "v")
    return apply(op, tree.cast_like(v, structure))


def _apply_many(op: CurvatureOperator, vs: PyTree, *, chunk_size: int | None) -> PyTree:
    one = functools.partial(apply, op)
    return jax.vmap(one)(vs) if chunk_size is None else jax.lax.map(one, vs, batch_size=chunk_size)


def _dense(op: CurvatureOperator) -> jax.Array:
    _, unravel = ravel_pytree(tree.zeros(op.in_structure()))
    n = op.shape[0]
    columns = jax.lax.map(
        lambda e: ravel_pytree(apply(op, unravel(e)))[0],
        jnp.eye(n, dtype=op.dtype),
        batch_size=min(n, 128),
    )
    return columns.T


# --- parameter masks (optax.masked's convention) ---------------------------------------------


def _is_bool(leaf: Any) -> bool:
    return isinstance(leaf, bool | np.bool_)


def _match_by_path(mask: PyTree, structure: PyTree) -> tuple[bool, ...] | None:
    """Expand `mask` by key paths (container types may differ); None if they do not line up."""
    entries = [(tuple(p), bool(m)) for p, m in jax.tree_util.tree_leaves_with_path(mask)]
    used: set[int] = set()
    out = []
    for path, _ in jax.tree_util.tree_leaves_with_path(structure):
        path = tuple(path)
        hits = [i for i, (prefix, _) in enumerate(entries) if path[: len(prefix)] == prefix]
        if len(hits) != 1:
            return None
        used.add(hits[0])
        out.append(entries[hits[0]][1])
    return tuple(out) if len(used) == len(entries) else None


def mask_leaves(mask: Mask, structure: PyTree, name: str = "mask") -> tuple[bool, ...]:
    """One static bool per leaf of `structure` (flattening order): whether `mask` selects it.

    `mask` is a pytree of Python bools with the structure of `structure` or a prefix of it
    (``optax.masked``'s convention; matched by key paths where container types differ), or
    a callable returning one from `structure`. At least one leaf must be selected.
    """
    if callable(mask) and jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(mask)):
        mask = mask(structure)
    if mask is None:
        msg = (
            f"{name} must be a pytree of Python bools like the parameters (or a prefix of it, "
            f"e.g. True for all of them); got None"
        )
        raise TypeError(msg)
    for path, leaf in jax.tree_util.tree_leaves_with_path(mask):
        if not _is_bool(leaf):
            where = jax.tree_util.keystr(path) or "(the mask itself)"
            msg = (
                f"{name} must be a pytree of Python bools (True selects a leaf or a whole "
                f"subtree), static, one per parameter leaf, not an elementwise mask; leaf {where} "
                f"is a {describe_tree(leaf) if hasattr(leaf, 'shape') else type(leaf).__name__}"
            )
            raise TypeError(msg)
    leaves, mask_def = jax.tree_util.tree_flatten(mask)
    try:
        subtrees = mask_def.flatten_up_to(structure)
    except (ValueError, TypeError):
        selected = _match_by_path(mask, structure)
    else:
        selected = tuple(
            bool(m)
            for m, sub in zip(leaves, subtrees, strict=True)
            for _ in jax.tree_util.tree_leaves(sub)
        )
    if selected is None:
        msg = (
            f"{name} must have the tree structure of the parameters, or a prefix of it (one "
            f"bool per leaf or per subtree; False, not None, leaves a leaf out); got "
            f"{describe_tree(mask)} for parameters {describe_tree(structure)} (structures "
            f"{mask_def} vs {jax.tree_util.tree_structure(structure)})"
        )
        raise ValueError(msg)
    if not any(selected):
        msg = f"{name} must select at least one parameter leaf; every leaf of {name} is False"
        raise ValueError(msg)
    return selected


def select_leaves(x: PyTree, selected: tuple[bool, ...]) -> PyTree:
    """`x` with its unselected leaves replaced by None (empty subtrees): the selected part."""
    leaves, treedef = jax.tree_util.tree_flatten(x)
    return jax.tree_util.tree_unflatten(
        treedef, [leaf if s else None for leaf, s in zip(leaves, selected, strict=True)]
    )


def merge_leaves(treedef: Any, selected: tuple[bool, ...], part: PyTree, rest: PyTree) -> PyTree:
    """The full pytree: selected leaves from `part`, the others from `rest` (both None-holed)."""
    taken, others = iter(jax.tree_util.tree_leaves(part)), iter(jax.tree_util.tree_leaves(rest))
    return jax.tree_util.tree_unflatten(
        treedef, [next(taken) if s else next(others) for s in selected]
    )


def select(x: PyTree, mask: Mask) -> PyTree:
    """The part of `x` (a pytree like the parameters) that `mask` selects.

    Unselected leaves are replaced by None (an empty subtree in JAX), so the result keeps the
    tree's shape and keys: it is a vector for ``op.restrict(mask)`` and ``hessian(...,
    wrt=mask)`` (e.g. ``select(grads, mask)``). `mask` follows ``optax.masked``'s
    convention, as in :meth:`CurvatureOperator.restrict`.

    Example:
        >>> import jax.numpy as jnp
        >>> from hessfree._operators import select
        >>> select({"w": jnp.ones(2), "b": jnp.zeros(1)}, {"w": True, "b": False})["b"] is None
        True
    """
    return select_leaves(x, mask_leaves(mask, tree.structure_of(x)))


def embed(part: PyTree, mask: Mask, like: PyTree) -> PyTree:
    """The full pytree like `like`: the leaves `mask` selects from `part`, zeros elsewhere.

    The inverse of :func:`select` up to the zeros: ``embed(select(v, mask), mask, v)``.
    """
    structure = tree.structure_of(like)
    selected = mask_leaves(mask, structure)
    check_like(select_leaves(structure, selected), part, "the selected parameters", "part")
    treedef = jax.tree_util.tree_structure(structure)
    return merge_leaves(
        treedef, selected, part, select_leaves(tree.zeros(structure), _not(selected))
    )


def _not(selected: tuple[bool, ...]) -> tuple[bool, ...]:
    return tuple(not s for s in selected)


def restricted_label(label: str, structure: PyTree, selected: tuple[bool, ...]) -> str:
    """A static display label: ``"<label> on ['layer1']"`` (a whole subtree), ``"<label> on
    ['w1'], ['b2']"`` (up to three leaves) or ``"<label> on k of n leaves"``."""
    paths = [tuple(p) for p, _ in jax.tree_util.tree_leaves_with_path(structure)]
    chosen = [p for p, s in zip(paths, selected, strict=True) if s]
    common = chosen[0]
    for p in chosen[1:]:
        n = next((i for i, (a, b) in enumerate(zip(common, p, strict=False)) if a != b), None)
        common = common[: min(len(common), len(p)) if n is None else n]
    under = [p for p in paths if p[: len(common)] == common]
    if common and len(chosen) > 1 and len(under) == len(chosen):
        where = jax.tree_util.keystr(common)
    elif len(chosen) <= 3:
        where = ", ".join(jax.tree_util.keystr(p) or "the array" for p in chosen)
    else:
        where = f"{len(chosen)} of {len(paths)} leaves"
    return f"{label} on {where}"


def operator_on(
    matvec: Callable[[PyTree], PyTree], structure: PyTree, like: CurvatureOperator, label: str
) -> CurvatureOperator:
    """A :class:`CurvatureOperator` on `structure` (``ShapeDtypeStruct`` leaves, kept as they
    are, shardings included) with the scale, damping and `psd` of `like`."""
    leaves, treedef = jax.tree_util.tree_flatten(structure)
    return CurvatureOperator.tree_unflatten(
        (treedef, tuple(leaves), label, like.psd), (matvec, like.scale, like.damping)
    )


def restrict_to(op: CurvatureOperator, selected: tuple[bool, ...]) -> CurvatureOperator:
    """``op.restrict`` for a mask already expanded to one bool per leaf (see :func:`mask_leaves`)."""
    structure = op.in_structure()
    matvec = Partial(_Embedded.of(structure, selected), op.matvec)
    label = restricted_label(op.label, structure, selected)
    return operator_on(matvec, select_leaves(structure, selected), op, label)


@dataclasses.dataclass(frozen=True)
class _Embedded:
    """``(A, u) -> (A embed(u))[S]``: a product on the selected leaves S (static, hashable)."""

    treedef: Any
    leaves: tuple[jax.ShapeDtypeStruct, ...]
    selected: tuple[bool, ...]

    @classmethod
    def of(cls, structure: PyTree, selected: tuple[bool, ...]) -> _Embedded:
        leaves, treedef = jax.tree_util.tree_flatten(structure)
        return cls(treedef, tuple(leaves), selected)

    def __call__(self, matvec: Callable[[PyTree], PyTree], u: PyTree) -> PyTree:
        structure = jax.tree_util.tree_unflatten(self.treedef, self.leaves)
        zeros = select_leaves(tree.zeros(structure), _not(self.selected))
        out = matvec(merge_leaves(self.treedef, self.selected, u, zeros))
        return select_leaves(out, self.selected)


@dataclasses.dataclass(frozen=True)
class _OnSelected:
    """``f(part, rest, *args) = f(merge(part, rest), *args)``: `f` of the selected leaves only.

    Static and compared by value (`f` by identity), so the Hessian's compiled build and its
    cached linear map are found again at new parameters.
    """

    f: Callable[..., Any]
    treedef: Any
    selected: tuple[bool, ...]

    def __call__(self, part: PyTree, rest: PyTree, *args: Any) -> Any:
        return self.f(merge_leaves(self.treedef, self.selected, part, rest), *args)


def _check_only(f: Callable[..., Any], x: PyTree, args: tuple[Any, ...], *, mode: str) -> None:
    check_hvp_args(f, x, args, mode)


def hessian(
    f: Callable[..., Any],
    x: PyTree,
    *args: Any,
    mode: str = "auto",
    cache: bool = True,
    remat: Remat = False,
    wrt: Mask = None,
) -> CurvatureOperator:
    """The Hessian ``H = ∇²f(x)`` as an operator, ``v -> H v`` without forming H.

    With ``cache=True`` the gradient is linearized once, here (``jax.linearize``, compiled
    once per `f` and shapes: building costs about one gradient), its residuals kept as the
    operator's leaves (about one backward pass's worth), and each product costs one tangent
    pass, about 2/3 of an HVP. With ``cache=False`` nothing is kept and each product is a
    full HVP (one gradient plus one tangent pass). Either way, rebuilding the operator at a
    new `x` in a loop compiles nothing new.

    Args:
        f: scalar function ``f(x, *args)``.
        x: the point, any pytree of floating arrays.
        *args: further arguments of `f`, held fixed.
        mode: the HVP mode, as in :func:`hessfree.hvp`.
        cache: linearize once (default) or recompute every product.
        remat: run `f` under ``jax.checkpoint`` (True or a policy) so the cached
            linearization holds only what the policy saves; see :func:`hessfree.hvp_fn`.
        wrt: a mask selecting the leaves of `x` to differentiate with respect to
            (``optax.masked``'s convention, as in :meth:`CurvatureOperator.restrict`); the
            others are held fixed, passed to `f` as arguments. The operator is the block
            ``H[S, S]``, the same as ``hessian(f, x, *args).restrict(wrt)`` (it acts on
            ``select(x, wrt)``, unselected leaves None) but cheaper: the gradient and its
            linearization run over the selected leaves only. Unselected leaves need not be
            floating (integer state is fine). None (default): all of `x`.

    Returns:
        A symmetric, indefinite (``psd=False``) :class:`CurvatureOperator` on pytrees like `x`
        (like ``select(x, wrt)`` with `wrt`).

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
        >>> H = hf.hessian(lambda x, A: 0.5 * x @ A @ x, jnp.zeros(2), A)
        >>> H.to_dense().tolist(), ((H + 1.0) @ jnp.ones(2)).tolist()
        ([[2.0, 1.0], [1.0, 3.0]], [4.0, 5.0])

    References:
        Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    """
    check_choice(mode, VALID_MODES, "mode")
    f = with_remat(f, remat)
    label = "hessian"
    if wrt is not None:
        structure = tree.structure_of(x)
        selected = mask_leaves(wrt, structure, "wrt")
        label = restricted_label(label, structure, selected)
        treedef = jax.tree_util.tree_structure(x)
        f = _OnSelected(f, treedef, selected)
        x, args = select_leaves(x, selected), (select_leaves(x, _not(selected)), *args)
    if cache:
        _, matvec = cached_gradient_linearization(f, x, args, mode)
    else:
        staged(_check_only, f, x, args, mode=mode)  # raises now; compiled once, then ~free
        matvec = Partial(_UncachedHvp(f, mode), x, args)
    return CurvatureOperator(matvec, x, label=label, psd=False)

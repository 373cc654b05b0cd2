"""Curvature operators: :class:`CurvatureOperator` and the Hessian.

A :class:`CurvatureOperator` is a registered pytree: its children are arrays (the
linearization's residuals, the point and data, damping, scale) and its aux data is static
configuration compared by value (the user's functions by identity, settings, the parameters'
structure). So an operator crosses ``jit`` and ``vmap`` boundaries, and rebuilding one at new
parameters inside a training loop changes only its leaves: its products compile once.
Algorithms only ever call ``mv`` / ``mm``.
"""

from __future__ import annotations

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
)

DENSE_LIMIT = 10_000


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


def _check_only(f: Callable[..., Any], x: PyTree, args: tuple[Any, ...], *, mode: str) -> None:
    check_hvp_args(f, x, args, mode)


def hessian(
    f: Callable[..., Any],
    x: PyTree,
    *args: Any,
    mode: str = "auto",
    cache: bool = True,
    remat: Remat = False,
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

    Returns:
        A symmetric, indefinite (``psd=False``) :class:`CurvatureOperator` on pytrees like `x`.

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
    if cache:
        _, matvec = cached_gradient_linearization(f, x, args, mode)
    else:
        staged(_check_only, f, x, args, mode=mode)  # raises now; compiled once, then ~free
        matvec = Partial(_UncachedHvp(f, mode), x, args)
    return CurvatureOperator(matvec, x, label="hessian", psd=False)

"""What an algorithm accepts as a linear operator, turned into a product on pytrees.

Algorithms (cg, eigsh, lanczos, spectral_density, trace, diagonal) never differentiate: they
call a matrix-vector product. They accept

- anything with ``mv(v)`` and ``in_structure()`` (a :class:`~hessfree.CurvatureOperator`);
- a plain callable ``v -> A v`` on pytrees, with an example pytree ``like=`` fixing the
  structure of ``v``. A :class:`jax.tree_util.Partial` (such as :func:`hessfree.hvp_fn`'s
  result) is a pytree: its arrays are traced, so passing a new one each step compiles
  nothing; a fresh Python closure each step is a new function, hence a new program;
- a dense symmetric 2-D array ``(n, n)`` acting on flat vectors ``(n,)``.

Algorithms are staged with the operator as an argument (its arrays traced, the rest static)
and call :func:`tree_operator` while tracing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from . import _tree as tree
from ._validation import PyTree, check_floating, check_like

MatVec = Callable[[PyTree], PyTree]


class TreeOperator(NamedTuple):
    """An operator on pytrees shaped like its input.

    Attributes:
        matvec: ``v -> A v`` on pytrees like `structure`, each output leaf in its input dtype.
        structure: a pytree of ``jax.ShapeDtypeStruct`` (the input's shapes and dtypes).
        size: n, the total number of entries.
        dtype: the promoted dtype of the leaves (that of scalars such as inner products).
        template: an example input pytree (arrays, possibly traced) whose layout and sharding
            new vectors copy, or None.
    """

    matvec: MatVec
    structure: PyTree
    size: int
    dtype: np.dtype
    template: PyTree | None = None

    def zeros(self) -> PyTree:
        """A zero vector like A's input, in the template's layout (and sharding) if any."""
        if self.template is not None:
            return jax.tree_util.tree_map(
                lambda t, s: jnp.zeros_like(t, dtype=s.dtype), self.template, self.structure
            )
        return tree.zeros(self.structure)

    def mm(self, xs: PyTree, chunk_size: int | None = None) -> PyTree:
        """``A xᵢ`` for every vector of `xs` (leading axis N): ``vmap``, or ``lax.map`` in chunks."""
        if chunk_size is None:
            return jax.vmap(self.matvec)(xs)
        return jax.lax.map(self.matvec, xs, batch_size=chunk_size)


def is_dense(A: Any) -> bool:
    """Whether `A` is a dense matrix (an array), not an operator or a function."""
    return isinstance(A, jax.Array | np.ndarray)


def check_operator(A: Any, like: PyTree | None, name: str = "A", like_name: str = "like") -> None:
    """Raise at once if `A` (with `like`) cannot be an operator (static information only)."""
    if callable(getattr(A, "mv", None)) and callable(getattr(A, "in_structure", None)):
        if like is not None:
            check_floating(like, like_name)
            check_like(A.in_structure(), like, f"{name}'s input", like_name)
        return
    if is_dense(A):
        shape = tuple(np.shape(A))
        if len(shape) != 2 or shape[0] != shape[1]:
            msg = f"{name} as a dense matrix must be square 2-D; got shape {shape}"
            raise ValueError(msg)
        check_floating(A, name)
        return
    if callable(A) or callable(getattr(A, "mv", None)):
        if like is None:
            msg = (
                f"{name} is a plain callable, so its input structure is unknown: pass like=<a "
                f"pytree shaped like the vectors {name} acts on> (e.g. the parameters)"
            )
            raise ValueError(msg)
        check_floating(like, like_name)
        return
    msg = (
        f"{name} must be a CurvatureOperator, a callable v -> A v (with like=), or a square "
        f"2-D array; got {type(A).__name__}"
    )
    raise TypeError(msg)


def tree_operator(
    A: Any, like: PyTree | None = None, name: str = "A", like_name: str = "like"
) -> TreeOperator:
    """`A` (operator, callable + `like`, or dense matrix) as a product on pytrees.

    New vectors (start vectors, probes) copy the layout of `like` where given (possibly
    traced arrays: under explicit mesh axes their types carry the sharding), else of the
    operator's structure where it has shardings.
    """
    check_operator(A, like, name, like_name)
    if like is not None:
        matvec, structure = getattr(A, "mv", A), tree.structure_of(like)
    elif callable(getattr(A, "in_structure", None)):
        matvec, structure = A.mv, A.in_structure()
    else:
        matvec, structure = (lambda v: A @ v), jax.ShapeDtypeStruct((np.shape(A)[0],), A.dtype)
    if is_dense(A):
        matvec = lambda v: A @ v  # noqa: E731
    dtype = tree.scalar_dtype(structure)

    def tree_matvec(v: PyTree) -> PyTree:
        out = matvec(v)
        check_like(structure, out, f"{name}'s input", f"{name}(v)")
        return tree.cast_like(out, structure)

    template = like
    if template is not None and not all(
        isinstance(x, jax.Array | np.ndarray) for x in jax.tree_util.tree_leaves(template)
    ):
        template = None
    return TreeOperator(tree_matvec, structure, tree.size(structure), dtype, template)

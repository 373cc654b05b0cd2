"""What an algorithm accepts as a linear operator, turned into ``(matvec, structure)``.

Algorithms (cg, minimize's inner solves, eigsh, trace, diagonal) never differentiate: they call
a matrix-vector product. They accept

- anything with a ``mv(v)`` method and an ``in_structure()`` method (a
  :class:`~hessfree.CurvatureOperator`, or any object following that protocol);
- a plain callable ``v -> A v`` on pytrees, together with an example pytree (`like`) that
  fixes the structure of ``v``;
- a dense 2-D array ``(n, n)`` acting on flat vectors ``(n,)``.

`structure` is a pytree of ``jax.ShapeDtypeStruct`` with the structure of ``v``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from ._validation import PyTree, check_floating

MatVec = Callable[[PyTree], PyTree]


def structure_of(tree: PyTree) -> PyTree:
    """A pytree of ``jax.ShapeDtypeStruct`` with the shapes, dtypes and shardings of `tree`.

    The sharding is kept where a leaf is laid out over a mesh (its type's ``NamedSharding``
    names a mesh axis), so that algorithms can draw probes and start vectors in the
    parameters' layout; otherwise it is left unset.
    """

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(jax.typeof(x), "sharding", None) if isinstance(x, jax.Array) else None
        if not (isinstance(sharding, NamedSharding) and any(a is not None for a in sharding.spec)):
            sharding = None
        return jax.ShapeDtypeStruct(np.shape(x), jax.numpy.result_type(x), sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def as_matvec(A: Any, name: str = "A") -> MatVec:
    """The ``v -> A v`` function of an operator, callable or dense matrix."""
    mv = getattr(A, "mv", None)
    if callable(mv):
        return mv
    if hasattr(A, "shape") and hasattr(A, "dtype") and not callable(A):
        if np.ndim(A) != 2 or np.shape(A)[0] != np.shape(A)[1]:
            msg = f"{name} as a dense matrix must be square 2-D; got shape {tuple(np.shape(A))}"
            raise ValueError(msg)
        check_floating(A, name)
        return lambda v: A @ v
    if callable(A):
        return A
    msg = (
        f"{name} must be a CurvatureOperator, a callable v -> A v, or a square 2-D array; "
        f"got {type(A).__name__}"
    )
    raise TypeError(msg)


def matvec_and_structure(
    A: Any, like: PyTree | None = None, name: str = "A"
) -> tuple[MatVec, PyTree]:
    """``(matvec, structure)`` of `A`; `like` is required only for a plain callable."""
    matvec = as_matvec(A, name)
    in_structure = getattr(A, "in_structure", None)
    if like is not None:
        check_floating(like, "like")
        return matvec, structure_of(like)
    if callable(in_structure):
        return matvec, in_structure()
    if hasattr(A, "shape") and not callable(A):
        return matvec, jax.ShapeDtypeStruct((np.shape(A)[0],), A.dtype)
    msg = (
        f"{name} is a plain callable, so its input structure is unknown: pass like=<a pytree "
        f"shaped like the vectors {name} acts on> (e.g. the parameters)"
    )
    raise ValueError(msg)

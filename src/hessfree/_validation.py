"""Argument checks shared by every public function.

Misuse that is visible before anything runs (structures, shapes, dtypes, settings) raises at
once, naming the argument, what was expected and what was received. All checks here look only
at static information (tree structure, shapes, dtypes), so they work unchanged under `jit`,
`vmap` and `grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

PyTree = Any


def describe_tree(tree: PyTree) -> str:
    """A short human description of a pytree's structure, for error messages."""
    if isinstance(tree, dict):
        return f"dict with keys {sorted(map(str, tree.keys()))}"
    fields = getattr(tree, "_fields", None)
    if isinstance(tree, tuple) and fields is not None:
        return f"{type(tree).__name__} with fields {list(fields)}"
    if isinstance(tree, list | tuple):
        return f"{type(tree).__name__} of length {len(tree)}"
    shape = getattr(tree, "shape", None)
    if shape is not None:
        return f"array of shape {tuple(shape)} and dtype {getattr(tree, 'dtype', '?')}"
    return f"{type(tree).__name__}"


_NUMBER = (int, float, np.integer, np.floating)
_MAX_INT = int(np.iinfo(np.int32).max)


def _leaf_dtype(leaf: Any, name: str, where: str) -> np.dtype:
    dtype = getattr(leaf, "dtype", None)
    if dtype is not None and hasattr(leaf, "shape"):
        return np.dtype(dtype)
    if isinstance(leaf, (*_NUMBER, complex)) and not isinstance(leaf, bool):
        return np.dtype(jnp.asarray(leaf).dtype)
    msg = (
        f"{name} must be a pytree of arrays; leaf {where} is a {type(leaf).__name__}, not an "
        f"array. A model object with functions or settings inside must be split into its "
        f"parameters first: params, static = eqx.partition(model, eqx.is_inexact_array) "
        f"(Equinox) or graphdef, params = nnx.split(model) (Flax nnx), then differentiate "
        f"with respect to params and rebuild the model inside f."
    )
    raise TypeError(msg)


def check_floating(tree: PyTree, name: str) -> None:
    """Raise TypeError unless every leaf of `tree` has a floating dtype.

    Complex inputs are refused as well: an HVP of a real scalar function of complex
    parameters is not what the real-Hessian algorithms in this library assume.
    """
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        msg = f"{name} must contain at least one array; got {describe_tree(tree)}"
        raise ValueError(msg)
    for path, leaf in leaves:
        where = jax.tree_util.keystr(path) or "(the array itself)"
        dtype = _leaf_dtype(leaf, name, where)
        if not jnp.issubdtype(dtype, jnp.floating):
            msg = (
                f"{name} must have floating-point leaves (float32 or float64); "
                f"leaf {where} has dtype {dtype}. Convert it, e.g. with .astype(jnp.float32)."
            )
            raise TypeError(msg)


def check_like(x: PyTree, v: PyTree, x_name: str, v_name: str, *, batched: bool = False) -> None:
    """Raise ValueError unless `v` has the tree structure and leaf shapes of `x`.

    With ``batched=True`` every leaf of `v` carries one extra leading axis, the same for all.
    """
    x_def = jax.tree_util.tree_structure(x)
    v_def = jax.tree_util.tree_structure(v)
    if x_def != v_def:
        got, want = describe_tree(v), describe_tree(x)
        if isinstance(v, dict) and isinstance(x, dict):
            want = want.removeprefix("dict with keys ")
        msg = (
            f"{v_name} must have the same tree structure as {x_name}; got {got} vs {want} "
            f"(structures {v_def} vs {x_def})"
        )
        raise ValueError(msg)
    batch = None
    for (path, xl), vl in zip(
        jax.tree_util.tree_leaves_with_path(x), jax.tree_util.tree_leaves(v), strict=True
    ):
        where = jax.tree_util.keystr(path) or "(the array itself)"
        x_shape = tuple(np.shape(xl))
        v_shape = tuple(np.shape(vl))
        if batched:
            if len(v_shape) != len(x_shape) + 1 or v_shape[1:] != x_shape:
                msg = (
                    f"every leaf of {v_name} must be the matching leaf of {x_name} with a "
                    f"leading batch axis; leaf {where} has shape {v_shape}, expected "
                    f"(batch, *{x_shape})"
                )
                raise ValueError(msg)
            if batch is None:
                batch = v_shape[0]
            elif v_shape[0] != batch:
                msg = (
                    f"every leaf of {v_name} must have the same leading batch size; leaf "
                    f"{where} has {v_shape[0]}, an earlier leaf has {batch}"
                )
                raise ValueError(msg)
        elif v_shape != x_shape:
            msg = (
                f"{v_name} must match the shapes of {x_name}; leaf {where} has shape "
                f"{v_shape} in {v_name} but {x_shape} in {x_name}"
            )
            raise ValueError(msg)


def check_scalar_fn(
    f: Callable[..., Any], x: PyTree, args: Sequence[Any], f_name: str = "f"
) -> None:
    """Raise if `f` is not callable or `f(x, *args)` is not a real scalar (checked abstractly)."""
    check_callable(f, f_name, f"{f_name}(x, *args)")
    out = jax.eval_shape(f, x, *args)
    leaves = jax.tree_util.tree_leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        got = ", ".join(f"{tuple(leaf.shape)}" for leaf in leaves) or "nothing"
        msg = (
            f"{f_name} must return a scalar (shape ()); got output of shape(s) {got}. "
            f"Reduce it, e.g. with jnp.sum or jnp.mean."
        )
        raise ValueError(msg)
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        msg = f"{f_name} must return a floating-point scalar; got dtype {leaves[0].dtype}"
        raise TypeError(msg)


def check_choice(value: Any, valid: Sequence[str], name: str) -> str:
    """Raise ValueError unless `value` is one of `valid`; return it."""
    if not isinstance(value, str) or value not in valid:
        msg = f"{name} must be one of {list(valid)}; got {value!r}"
        raise ValueError(msg)
    return value


def check_positive_int(value: Any, name: str, *, allow_none: bool = False) -> None:
    """Raise unless `value` is a positive Python int (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        expected = "a positive integer or None" if allow_none else "a positive integer"
        msg = f"{name} must be {expected}; got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if not 1 <= value <= _MAX_INT:
        msg = f"{name} must be an integer in [1, 2**31 - 1]; got {value!r}"
        raise ValueError(msg)


def check_number(
    value: Any, name: str, *, minimum: float = 0.0, strict: bool = False, traced_ok: bool = False
) -> None:
    """Raise unless `value` is a finite real number ``>= minimum`` (``>`` with `strict`).

    With `traced_ok`, a scalar jax array (possibly traced) is accepted as it is: its value is
    checked inside jit by the algorithm (and shows in its status).
    """
    if isinstance(value, jax.Array | np.ndarray) and not isinstance(value, np.generic):
        real = jnp.issubdtype(value.dtype, jnp.floating) or jnp.issubdtype(value.dtype, jnp.integer)
        if traced_ok and np.shape(value) == () and real:
            if isinstance(value, jax.core.Tracer):
                return
            value = float(value)
        else:
            msg = f"{name} must be a real number; got an array of shape {np.shape(value)}"
            raise TypeError(msg)
    if isinstance(value, bool) or not isinstance(value, _NUMBER):
        msg = f"{name} must be a real number; got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    if not np.isfinite(value) or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        msg = f"{name} must be a finite number {relation} {minimum}; got {value!r}"
        raise ValueError(msg)


def check_key(key: Any, fn: str, what: str = "its random draws") -> None:
    """Raise unless `key` is a jax.random key (typed, or a legacy uint32 ``(2,)`` key)."""
    if key is None:
        msg = f"{fn} needs key= (a jax.random key, e.g. jax.random.key(0)) for {what}; got None"
        raise ValueError(msg)
    dtype = getattr(key, "dtype", None)
    if dtype is None or not (
        jnp.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == jnp.uint32 and np.shape(key) == (2,))
    ):
        msg = (
            f"{fn}: key must be a jax.random key (jax.random.key(0) or jax.random.PRNGKey(0)); "
            f"got {type(key).__name__} with dtype {dtype} and shape {np.shape(key)}"
        )
        raise TypeError(msg)


def check_callable(value: Any, name: str, signature: str) -> None:
    if not callable(value):
        msg = f"{name} must be callable as {signature}; got {type(value).__name__}"
        raise TypeError(msg)


def check_steps(num_steps: Any, n: int, name: str = "num_steps") -> None:
    """Raise unless `num_steps` is an integer in ``[1, n]`` (n the operator's dimension)."""
    check_positive_int(num_steps, name)
    if num_steps > n:
        msg = f"{name} must be at most the dimension n = {n} of A; got {num_steps}"
        raise ValueError(msg)


def check_solver_dtype(tree: PyTree, name: str) -> None:
    """Raise unless every leaf is float32 or float64 (lower precision cannot meet a tolerance)."""
    check_floating(tree, name)
    for leaf in jax.tree_util.tree_leaves(tree):
        if np.dtype(leaf.dtype) not in (np.float32, np.float64):
            msg = (
                f"{name} must be float32 or float64 (lower precision cannot reach a useful "
                f"residual); got dtype {np.dtype(leaf.dtype)}. Cast it, e.g. .astype(jnp.float32)."
            )
            raise TypeError(msg)


def check_real_scalar(value: Any, name: str) -> None:
    """Raise TypeError unless `value` is a real scalar (a Python number or a 0-d array)."""
    if np.ndim(value) != 0 or (
        not hasattr(value, "__float__") and not isinstance(value, jax.Array)
    ):
        msg = f"{name} must be a scalar (python or 0-d array); got {type(value).__name__} of shape {np.shape(value)}"
        raise TypeError(msg)
    dtype = jnp.result_type(value)
    if not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer)):
        msg = f"{name} must be a real scalar; got dtype {dtype}"
        raise TypeError(msg)


def batch_size(batch: PyTree, name: str = "batch") -> int:
    """The common leading axis B of every leaf of `batch` (ValueError if they disagree)."""
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        msg = f"{name} must contain at least one array; got {describe_tree(batch)}"
        raise ValueError(msg)
    shapes = [tuple(jnp.shape(leaf)) for leaf in leaves]
    if any(not shape for shape in shapes) or len({shape[0] for shape in shapes}) != 1:
        msg = f"every leaf of {name} must have the same leading axis B; got leaf shapes {shapes}"
        raise ValueError(msg)
    return int(shapes[0][0])

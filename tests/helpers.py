"""Dense float64 references, built independently of the code under test."""

from __future__ import annotations

import contextlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree


def to_f64(tree: Any) -> Any:
    """Cast every floating leaf to float64 (needs jax_enable_x64, set in conftest)."""
    return jax.tree_util.tree_map(
        lambda a: (
            jnp.asarray(a, jnp.float64) if jnp.issubdtype(jnp.result_type(a), jnp.floating) else a
        ),
        tree,
    )


def dense_hessian(f, x, *args) -> np.ndarray:
    """The Hessian of f at x in ravel_pytree order, by jax.hessian of the raveled function, float64."""
    x64 = to_f64(x)
    args64 = to_f64(args)
    flat, unravel = ravel_pytree(x64)
    return np.asarray(jax.jit(jax.hessian(lambda z: f(unravel(z), *args64)))(flat))


def fd_hvp(f, x, v, *args, eps: float = 1e-5) -> np.ndarray:
    """Central finite difference of the gradient, float64: (∇f(x + εv) − ∇f(x − εv)) / 2ε."""
    x64, v64, args64 = to_f64(x), to_f64(v), to_f64(args)
    flat, unravel = ravel_pytree(x64)
    vflat, _ = ravel_pytree(v64)

    def g(z):
        return ravel_pytree(jax.grad(f)(unravel(z), *args64))[0]

    return np.asarray((g(flat + eps * vflat) - g(flat - eps * vflat)) / (2 * eps))


def flat(tree: Any) -> np.ndarray:
    """A pytree as one flat float64 numpy vector, in ravel_pytree order."""
    return np.asarray(ravel_pytree(to_f64(tree))[0])


def random_like(key, tree: Any) -> Any:
    """A standard normal pytree with the structure, shapes and dtypes of `tree`."""
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(
        treedef,
        [
            jax.random.normal(k, jnp.shape(l), jnp.result_type(l))
            for k, l in zip(keys, leaves, strict=False)
        ],
    )


_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: (
        _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
)


@contextlib.contextmanager
def count_compiles():
    """Yields a list that holds, on exit, one entry per XLA backend compile inside the block."""
    start = len(_COMPILES)
    out: list[str] = []
    try:
        yield out
    finally:
        out.extend(_COMPILES[start:])

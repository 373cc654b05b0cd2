"""Compile once per user function and shape, never per call.

Every public function runs its work through :func:`staged`: its arguments are flattened, the
array leaves (parameters, data, operators' residuals) become the traced inputs of one
``jax.jit``, and everything else (the user's functions, names, counts) is its static part,
compared by value (functions by identity). So calling a public function again with the same
user functions and the same shapes, dtypes and shardings at new values compiles nothing; the
jit cache grows with the number of distinct functions and shapes, never with the number of
calls. Under a user's own ``jit`` the same call is traced into their program. A top-level
call on small inputs (:data:`SMALL` numbers) compiles for latency (:func:`for_latency`).

A cached linearization (of a gradient, or of a model) is kept as :class:`Linear`: its
residuals are pytree leaves, and the linear map itself is found through a static key in a
registry that holds one entry per (function, settings, input shapes), written when the build
is traced. No jaxpr object or closure is ever a jit cache key.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import os
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.core
import numpy as np

from . import _tree as tree

PyTree = Any

_ARRAY_TYPES = (jax.Array, np.ndarray, np.generic, float, int, complex, bool)


def _dynamic(leaf: Any) -> bool:
    return isinstance(leaf, _ARRAY_TYPES)


class _Static:
    """A hashable wrapper compared by value: the static part of a staged call."""

    __slots__ = ("_hash", "value")

    def __init__(self, value: Any) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, _Static) and self._hash == other._hash and self.value == other.value
        )


_HOLE = object()


def _call(fn: Callable[..., Any], static: _Static, options: _Static, dynamic: list) -> Any:
    treedef, leaves, spread = static.value
    it = iter(dynamic)
    args = jax.tree_util.tree_unflatten(treedef, [next(it) if s is _HOLE else s for s in leaves])
    token = _SPREAD.set(spread)  # read while tracing (inputs_spread); part of the cache key
    try:
        return fn(*args, **dict(options.value))
    finally:
        _SPREAD.reset(token)


_SPREAD: contextvars.ContextVar[bool] = contextvars.ContextVar("hessfree_spread", default=False)


def inputs_spread() -> bool:
    """Whether the staged call being traced has an array argument over several devices.

    Algorithms then keep vectors leaf by leaf, in the arguments' layout, rather than as one
    flat vector. Under the caller's own ``jit`` the arguments are tracers and this is False
    (only explicit-axes sharding is seen there, by the algorithms themselves).
    """
    return _SPREAD.get()


# Small problems are compiled for latency. On CPU, XLA's loop emitters compile a solver's
# program (hundreds of small kernels) about 1.7x faster than its MLIR fusion emitters:
# minimize's first call on Rosenbrock 1.3 -> 0.75 s. Warm runs of calls this small took the
# same to 20 % longer (hvp on a 14k-number MLP: 0.18 -> 0.21 ms; eigsh k = 3 on it 11.4 ->
# 11.8 ms; minimize on extended Rosenbrock the same), so a session breaks even after
# thousands of eager calls; inside the caller's jit nothing changes. Larger inputs keep XLA's
# defaults: there the run dominates (the fusion emitters' kernels ran 5-9 % faster for eigsh
# on a 0.5M-parameter Hessian). HESSFREE_LATENCY_SIZE sets the size (0: never).
SMALL = int(os.environ.get("HESSFREE_LATENCY_SIZE", "65536"))  # numbers in all array args
LATENCY = {"xla_cpu_use_fusion_emitters": False}
_trampoline = jax.jit(_call, static_argnums=(0, 1, 2))
_trampoline_small = jax.jit(_call, static_argnums=(0, 1, 2), compiler_options=LATENCY)


@functools.cache
def _latency_options_work(backend: str) -> bool:
    """Whether this backend's XLA takes the latency options (CPU, with a jaxlib that has them)."""
    if backend != "cpu":
        return False
    try:
        jax.jit(lambda x: x + 1, compiler_options=LATENCY).lower(1.0).compile()
    except (jax.errors.JaxRuntimeError, TypeError, ValueError):
        return False
    return True


def for_latency(leaves: list) -> bool:
    """Whether a top-level call on these array leaves compiles for latency (see :data:`SMALL`).

    Never under a trace (the caller's ``jit``, ``vmap``, ``grad``): there the program is
    inlined into the caller's, which has its own compile options (and JAX refuses them on a
    nested ``jit``).
    """
    numbers = 0
    for leaf in leaves:
        if isinstance(leaf, jax.core.Tracer):
            return False
        numbers += int(np.size(leaf))
    return numbers <= SMALL and _latency_options_work(jax.default_backend())


def staged(fn: Callable[..., Any], *args: Any, **options: Any) -> Any:
    """``fn(*args, **options)`` under ``jax.jit``: array leaves of `args` traced, the rest static.

    `options` are static settings (hashable). If some static part cannot be hashed (an
    unhashable object inside a user function's pytree), the call runs without staging.
    """
    leaves, treedef = jax.tree_util.tree_flatten(args)
    dynamic, statics = [], []
    for leaf in leaves:  # one pass: this runs on every eager call
        if isinstance(leaf, _ARRAY_TYPES):
            dynamic.append(leaf)
            statics.append(_HOLE)
        else:
            statics.append(leaf)
    statics = tuple(statics)
    spread = any(tree.multi_device(leaf) for leaf in dynamic)
    try:
        static = _Static((treedef, statics, spread))
        opts = _Static(tuple(sorted(options.items())))
    except TypeError:
        return fn(*args, **options)
    trampoline = _trampoline_small if for_latency(dynamic) else _trampoline
    return trampoline(fn, static, opts, dynamic)


def cache_size() -> int:
    """Entries in the staging jit caches (for tests: they must not grow with calls)."""
    return sum(
        t._cache_size()  # pyright: ignore[reportAttributeAccessIssue]
        for t in (_trampoline, _trampoline_small)
    )


# --- cached linear maps ----------------------------------------------------------------------

_LINEAR: dict[Hashable, Callable[..., Any]] = {}


class _Key:
    """A registry key with its hash computed once (it is hashed on every staged call)."""

    __slots__ = ("_hash", "value")

    def __init__(self, value: Hashable) -> None:
        self.value, self._hash = value, hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, _Key) and self._hash == other._hash and self.value == other.value
        )


def _aval_key(tree: PyTree) -> Hashable:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(
        jax.typeof(leaf) if isinstance(leaf, jax.Array) else leaf for leaf in leaves
    )


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class Linear:
    """A linear map ``v -> L v`` kept as its residuals (pytree leaves) and a static key.

    Built by :func:`capture` while tracing; ``L`` is looked up in a registry that holds one
    entry per key (function, settings, shapes), so applying it never recompiles.
    """

    key: Hashable
    residuals: tuple[Any, ...]

    def tree_flatten(self) -> tuple[tuple[Any, ...], Hashable]:
        return self.residuals, self.key

    @classmethod
    def tree_unflatten(cls, key: Hashable, residuals: tuple[Any, ...]) -> Linear:
        return cls(key, tuple(residuals))

    def __call__(self, v: PyTree) -> PyTree:
        return _LINEAR[self.key](v, *self.residuals)

    def transpose(self, w: PyTree, primal: PyTree) -> PyTree:
        """``Lᵀ w``; `primal` is a structure like the input of L."""
        return jax.linear_transpose(self, primal)(w)[0]


def capture(
    linear_fn: Callable[[PyTree], PyTree], example: PyTree, tag: Hashable, inputs: PyTree
) -> Linear:
    """Turn a linear function (closing over traced residuals) into a :class:`Linear`.

    `example` is an input of the linear map (its shapes); `tag` names the build (function,
    settings) and `inputs` are the build's inputs: with their types (and static leaves) they
    make the registry key. Call this while tracing the build (inside :func:`staged`).
    """
    # Every constant of the traced linear map becomes an input (jax.closure_convert would keep
    # non-float tracers, e.g. a relu's boolean mask, closed over, and they would leak).
    closed, out_shape = jax.make_jaxpr(linear_fn, return_shape=True)(example)
    residuals = tuple(closed.consts)
    out_tree = jax.tree_util.tree_structure(out_shape)
    jaxpr = closed.jaxpr

    def converted(v: PyTree, *consts: Any) -> PyTree:
        out = jax.core.eval_jaxpr(jaxpr, list(consts), *jax.tree_util.tree_leaves(v))
        return jax.tree_util.tree_unflatten(out_tree, out)

    residuals = tuple(jax.numpy.asarray(r) for r in residuals)
    key = _Key((tag, _aval_key(inputs), tuple(jax.typeof(r) for r in residuals)))
    _LINEAR[key] = converted
    return Linear(key, tuple(residuals))

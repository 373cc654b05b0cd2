"""Randomized trace and diagonal estimates of an operator from matrix-vector products.

All probes are drawn at once and pushed through the operator together (``vmap`` of its
product), or `chunk_size` at a time to bound memory. Probes are pytrees shaped like A's input
(each leaf with a leading probe axis), drawn leaf by leaf in the input's dtypes and layout;
nothing is raveled, so sharded parameters stay sharded. `num_probes` is static (a new count
compiles a new program): keep it fixed in a loop.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from . import _tree as tree
from ._krylov import orthonormal_rows
from ._linop import TreeOperator, tree_operator
from ._results import DiagonalEstimate, TraceEstimate
from ._staging import staged
from ._validation import PyTree, check_choice, check_key, check_positive_int

TRACE_METHODS = ("hutchinson", "hutch++")
DIAGONAL_METHODS = ("hutchinson",)
DISTRIBUTIONS = ("rademacher", "gaussian")


def _probes(key: jax.Array, count: int, op: TreeOperator, distribution: str) -> PyTree:
    """`count` probe vectors with ``E[z zᵀ] = I``: leaves ``(count, *leaf_shape)``."""
    return tree.random_tree(key, op.zeros(), distribution, count)


def _mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    count = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    if count < 2:
        return mean, jnp.full_like(mean, jnp.inf)
    return mean, jnp.std(samples, axis=0, ddof=1) / jnp.sqrt(count).astype(samples.dtype)


def _hutchinson(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    z = _probes(key, count, op, distribution)
    return _mean_and_stderr(tree.rowwise_vdot(z, op.mm(z, chunk_size)))


def _hutch_plus_plus(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """``tr(QᵀAQ) + hutchinson((I − QQᵀ) A (I − QQᵀ))`` with Q spanning ``A S``; budget count."""
    sketch = count // 3
    key_s, key_g = jax.random.split(key)
    S = _probes(key_s, sketch, op, distribution)
    Q = orthonormal_rows(op.mm(S, chunk_size), sketch)
    exact = jnp.sum(tree.rowwise_vdot(Q, op.mm(Q, chunk_size)))
    G = _probes(key_g, count - 2 * sketch, op, distribution)
    coeffs = jax.vmap(tree.project, in_axes=(None, 0))(Q, G)  # (count - 2 sketch, sketch)
    G = tree.sub(G, jax.vmap(tree.combine, in_axes=(0, None))(coeffs, Q))
    rest, stderr = _mean_and_stderr(tree.rowwise_vdot(G, op.mm(G, chunk_size)))
    return exact + rest, stderr


def _check_common(key: Any, num_probes: Any, distribution: str, chunk_size: Any, fn: str) -> None:
    check_key(key, fn, "its probes")
    check_positive_int(num_probes, "num_probes")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)


def _trace_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    method: str,
    distribution: str,
    chunk_size: int | None,
) -> TraceEstimate:
    op = tree_operator(A, like)
    estimator = _hutchinson if method == "hutchinson" else _hutch_plus_plus
    value, stderr = estimator(op, key, num_probes, distribution, chunk_size)
    return TraceEstimate(value, stderr, jnp.asarray(num_probes, jnp.int32))


def trace(
    A: Any,
    *,
    key: jax.Array,
    num_probes: int,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    like: PyTree | None = None,
    chunk_size: int | None = None,
) -> TraceEstimate:
    """Randomized estimate of ``tr(A)``.

    Hutchinson: ``tr(A) ≈ (1/N) Σᵢ zᵢᵀ A zᵢ`` with ``E[z zᵀ] = I`` (unbiased; with Rademacher
    probes the variance is ``2 Σ_{i≠j} A_ij²``). Hutch++: spend N/3 products on a sketch
    ``Q = orth(A S)`` whose trace ``tr(QᵀAQ)`` is computed exactly, N/3 on that, and the rest
    on Hutchinson of the deflated ``(I − QQᵀ) A (I − QQᵀ)``; for a decaying spectrum the
    error falls as 1/N instead of 1/√N, for a flat one Hutchinson is as good or better.

    Cost: exactly `num_probes` products with A (HVPs for a Hessian), run together or
    `chunk_size` at a time; Hutch++ adds an orthonormalization of the N/3 sketch vectors.

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense square matrix.
        key: a ``jax.random`` key (keyword-only).
        num_probes: N, the budget of products; at least 3 for ``"hutch++"``.
        method: ``"hutchinson"`` (default) or ``"hutch++"``.
        distribution: probe entries, ``"rademacher"`` (±1, default) or ``"gaussian"``.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many products at once; None runs them all together.

    Returns:
        A :class:`TraceEstimate` ``(value, stderr, num_matvecs)``.

    Raises:
        ValueError: `key` missing; `num_probes` < 1 (or < 3 for Hutch++); unknown `method`
            or `distribution`; bad `chunk_size`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import hessfree as hf
        >>> float(hf.trace(jnp.diag(jnp.arange(1.0, 5.0)), key=jax.random.key(0), num_probes=8).value)
        10.0

    References:
        Hutchinson, Commun. Stat. Simul. Comput. 18, 1989; Meyer, Musco, Musco & Woodruff,
        "Hutch++: Optimal stochastic trace estimation", SOSA 2021.
    """
    _check_common(key, num_probes, distribution, chunk_size, "trace")
    check_choice(method, TRACE_METHODS, "method")
    if method == "hutch++" and num_probes < 3:
        msg = f"num_probes must be at least 3 for method='hutch++' (N/3 sketch); got {num_probes}"
        raise ValueError(msg)
    tree_operator(A, like)  # checks A and like before tracing
    statics = {"num_probes": num_probes, "method": method, "distribution": distribution}
    return staged(_trace_impl, A, like, key, chunk_size=chunk_size, **statics)


def _diagonal_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    distribution: str,
    chunk_size: int | None,
) -> DiagonalEstimate:
    op = tree_operator(A, like)
    z = _probes(key, num_probes, op, distribution)
    az = op.mm(z, chunk_size)
    # per probe: z ⊙ Az / mean(z ⊙ z); the mean over probes is Bekas et al.'s estimator
    norm = jax.tree_util.tree_map(lambda zl: jnp.mean(zl * zl, axis=0), z)
    samples = jax.tree_util.tree_map(lambda zl, al, nl: zl * al / nl, z, az, norm)
    stats = jax.tree_util.tree_map(_mean_and_stderr, samples)
    value = jax.tree_util.tree_map(lambda _, s: s[0], z, stats)
    stderr = jax.tree_util.tree_map(lambda _, s: s[1], z, stats)
    return DiagonalEstimate(value, stderr, jnp.asarray(num_probes, jnp.int32))


def diagonal(
    A: Any,
    *,
    key: jax.Array,
    num_probes: int,
    method: str = "hutchinson",
    distribution: str = "rademacher",
    like: PyTree | None = None,
    chunk_size: int | None = None,
) -> DiagonalEstimate:
    """Randomized estimate of ``diag(A)``, as a pytree like A's input.

    ``diag(A) ≈ (Σᵢ zᵢ ⊙ A zᵢ) ⊘ (Σᵢ zᵢ ⊙ zᵢ)`` (Bekas, Kokiopoulou & Saad 2007). With
    Rademacher probes the denominator is N and entry j has variance ``Σ_{l≠j} A_jl² / N``.

    Cost: exactly `num_probes` products with A, together or `chunk_size` at a time.

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense square matrix.
        key: a ``jax.random`` key (keyword-only).
        num_probes: N >= 1.
        method: ``"hutchinson"`` (the only one so far).
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many products at once.

    Returns:
        A :class:`DiagonalEstimate` ``(value, stderr, num_matvecs)``; `value` and `stderr`
        (per entry, from the spread of the probes) are pytrees like A's input.

    Raises:
        ValueError: `key` missing; `num_probes` < 1; unknown `method` or `distribution`.

    References:
        Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer.
        Math. 57, 2007.
    """
    _check_common(key, num_probes, distribution, chunk_size, "diagonal")
    check_choice(method, DIAGONAL_METHODS, "method")
    tree_operator(A, like)  # checks A and like before tracing
    statics = {"num_probes": num_probes, "distribution": distribution, "chunk_size": chunk_size}
    return staged(_diagonal_impl, A, like, key, **statics)

"""Randomized trace and diagonal estimates of an operator from matrix-vector products.

All probes are drawn at once and pushed through the operator together (its ``mm`` if it has
one, else ``vmap`` of its product), or `chunk_size` at a time to bound memory. Probes are
pytrees shaped like A's input (each leaf with a leading probe axis), drawn leaf by leaf in the
input's dtypes and layout; nothing is raveled into one flat vector, so sharded parameters stay
sharded.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from ._products import tree_vdot
from ._spectral import (
    TreeOperator,
    batched_matvec,
    combine,
    empty_basis,
    project,
    random_tree,
    run_jitted,
    set_row,
    tree_operator,
    zeros,
)
from ._validation import PyTree, check_choice, check_positive_int

METHODS = ("hutchinson", "hutch++")
DISTRIBUTIONS = ("rademacher", "gaussian")


class TraceEstimate(NamedTuple):
    """A trace estimate.

    Attributes:
        value: the estimate of ``tr(A)``.
        stderr: its standard error, from the spread of the Hutchinson samples
            (``std / sqrt(count)``; for Hutch++ conditional on the sketched subspace, whose
            trace is exact). ``inf`` when a single sample leaves the spread unknown.
        num_matvecs: products with A spent (equals `num_probes`).
    """

    value: jax.Array
    stderr: jax.Array
    num_matvecs: int


def _probes(key: jax.Array, count: int, op: TreeOperator, distribution: str) -> PyTree:
    """`count` probe vectors with ``E[z zᵀ] = I``: leaves ``(count, *leaf_shape)``."""
    return random_tree(key, zeros(op), distribution, count)


def _rowwise_dot(xs: PyTree, ys: PyTree) -> jax.Array:
    """``(N,)`` inner products ``⟨xs[i], ys[i]⟩`` of two batches of vectors."""
    return jax.vmap(tree_vdot)(xs, ys)


def _orthonormal_rows(Y: PyTree, count: int) -> PyTree:
    """Rows spanning those of `Y` (leaves ``(count, ...)``), orthonormal or zero.

    Gram-Schmidt row by row, each row orthogonalized twice against the ones before; a row
    that is (numerically) in the span of the previous ones becomes zero, so a rank-deficient
    sketch gives zero rows instead of NaNs.
    """
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(Y))
    eps = jnp.finfo(dtype).eps
    Q = empty_basis(jax.tree_util.tree_map(lambda y: jnp.zeros_like(y[0]), Y), count)

    def step(i: jax.Array, Q: PyTree) -> PyTree:
        y = jax.tree_util.tree_map(lambda leaf: leaf[i], Y)
        w = y
        for _ in range(2):
            w = jax.tree_util.tree_map(jnp.subtract, w, combine(project(Q, w), Q))
        norm = jnp.sqrt(tree_vdot(w, w))
        keep = norm > 100 * eps * jnp.sqrt(tree_vdot(y, y))
        scale = jnp.where(keep, 1 / jnp.where(norm > 0, norm, 1), 0)
        return set_row(Q, i, jax.tree_util.tree_map(lambda x: x * scale.astype(x.dtype), w))

    return jax.lax.fori_loop(0, count, step, Q)


def _mean_and_stderr(samples: jax.Array) -> tuple[jax.Array, jax.Array]:
    count = samples.shape[0]
    if count < 2:
        return jnp.mean(samples), jnp.asarray(jnp.inf, samples.dtype)
    return jnp.mean(samples), jnp.std(samples, ddof=1) / jnp.sqrt(count).astype(samples.dtype)


def _hutchinson(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    z = _probes(key, count, op, distribution)
    samples = _rowwise_dot(z, batched_matvec(op, z, chunk_size))
    return _mean_and_stderr(samples)


def _hutch_plus_plus(
    op: TreeOperator, key: jax.Array, count: int, distribution: str, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """``tr(QᵀAQ) + hutchinson((I − QQᵀ) A (I − QQᵀ))`` with Q spanning ``A S``; budget count."""
    sketch = count // 3
    key_s, key_g = jax.random.split(key)
    S = _probes(key_s, sketch, op, distribution)
    Q = _orthonormal_rows(batched_matvec(op, S, chunk_size), sketch)
    exact = jnp.sum(_rowwise_dot(Q, batched_matvec(op, Q, chunk_size)))
    G = _probes(key_g, count - 2 * sketch, op, distribution)
    coeffs = jax.vmap(project, in_axes=(None, 0))(Q, G)  # (count - 2 sketch, sketch)
    G = jax.tree_util.tree_map(jnp.subtract, G, jax.vmap(combine, in_axes=(0, None))(coeffs, Q))
    samples = _rowwise_dot(G, batched_matvec(op, G, chunk_size))
    rest, stderr = _mean_and_stderr(samples)
    return exact + rest, stderr


def _check_common(key: Any, num_probes: Any, distribution: str, chunk_size: Any, fn: str) -> None:
    if key is None:
        msg = f"{fn} needs a random key for its probes: pass e.g. jax.random.PRNGKey(0); got None"
        raise ValueError(msg)
    check_positive_int(num_probes, "num_probes")
    check_choice(distribution, DISTRIBUTIONS, "distribution")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)


def trace(
    A: Any,
    key: jax.Array,
    *,
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
    error falls as 1/N instead of 1/√N.

    Cost: exactly `num_probes` products with A (HVPs for a Hessian), run together (the
    operator's ``mm`` or ``vmap``) or `chunk_size` at a time; Hutch++ adds an
    orthonormalization of the N/3 sketch vectors (Gram-Schmidt, ``O(n N²)`` flops).

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense square matrix.
        key: a ``jax.random`` key.
        num_probes: N, the budget of products; at least 3 for ``"hutch++"``.
        method: ``"hutchinson"`` (default) or ``"hutch++"``.
        distribution: probe entries, ``"rademacher"`` (±1, default) or ``"gaussian"``.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many products at once; None runs them all together.

    Returns:
        A :class:`TraceEstimate` with ``value`` and ``stderr``.

    Raises:
        ValueError: `key` missing; `num_probes` < 1 (or < 3 for Hutch++); unknown `method`
            or `distribution`; bad `chunk_size`.

    Example:
        >>> trace(jnp.diag(jnp.arange(1.0, 5.0)), jax.random.PRNGKey(0), num_probes=8).value
        Array(10., dtype=float32)

    References:
        Hutchinson, Commun. Stat. Simul. Comput. 18, 1989; Meyer, Musco, Musco & Woodruff,
        "Hutch++: Optimal stochastic trace estimation", SOSA 2021.
    """
    _check_common(key, num_probes, distribution, chunk_size, "trace")
    check_choice(method, METHODS, "method")
    if method == "hutch++" and num_probes < 3:
        msg = f"num_probes must be at least 3 for method='hutch++' (N/3 sketch); got {num_probes}"
        raise ValueError(msg)
    tree_operator(A, like)  # checks A and like before tracing
    statics = {"num_probes": num_probes, "method": method, "distribution": distribution}
    value, stderr = run_jitted(_trace_impl, A, like, key, chunk_size=chunk_size, **statics)
    return TraceEstimate(value, stderr, num_probes)


def _trace_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    method: str,
    distribution: str,
    chunk_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    op = tree_operator(A, like)
    estimator = _hutchinson if method == "hutchinson" else _hutch_plus_plus
    return estimator(op, key, num_probes, distribution, chunk_size)


def diagonal(
    A: Any,
    key: jax.Array,
    *,
    num_probes: int,
    distribution: str = "rademacher",
    like: PyTree | None = None,
    chunk_size: int | None = None,
) -> PyTree:
    """Randomized estimate of ``diag(A)``, as a pytree like A's input.

    ``diag(A) ≈ (Σᵢ zᵢ ⊙ A zᵢ) ⊘ (Σᵢ zᵢ ⊙ zᵢ)`` (Bekas, Kokiopoulou & Saad 2007). With
    Rademacher probes the denominator is N and entry j has variance ``Σ_{l≠j} A_jl² / N``.

    Cost: exactly `num_probes` products with A, together or `chunk_size` at a time.

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense square matrix.
        key: a ``jax.random`` key.
        num_probes: N >= 1.
        distribution: ``"rademacher"`` (default) or ``"gaussian"``.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many products at once.

    Returns:
        A pytree with the structure, shapes and dtypes of A's input (e.g. the parameters).

    Raises:
        ValueError: `key` missing; `num_probes` < 1; unknown `distribution`; bad `chunk_size`.

    References:
        Bekas, Kokiopoulou & Saad, "An estimator for the diagonal of a matrix", Appl. Numer.
        Math. 57, 2007.
    """
    _check_common(key, num_probes, distribution, chunk_size, "diagonal")
    tree_operator(A, like)  # checks A and like before tracing
    statics = {"num_probes": num_probes, "distribution": distribution, "chunk_size": chunk_size}
    return run_jitted(_diagonal_impl, A, like, key, **statics)


def _diagonal_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    distribution: str,
    chunk_size: int | None,
) -> PyTree:
    op = tree_operator(A, like)
    z = _probes(key, num_probes, op, distribution)
    az = batched_matvec(op, z, chunk_size)
    return jax.tree_util.tree_map(
        lambda zl, al: jnp.sum(zl * al, axis=0) / jnp.sum(zl * zl, axis=0), z, az
    )

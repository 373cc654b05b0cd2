"""The automatic Jacobi preconditioner: the Hessian diagonal from a few probe products.

Hutchinson's estimate ``diag(H) ≈ z ⊙ Hz`` (Rademacher z) carries the error
``Σ_{j≠i} H_ij z_i z_j``, which swamps the small diagonal entries of a badly scaled H (a
coordinate of curvature 1e-4 next to one of 1e4 reads as the coupling between them). So the
estimate is refined in the scaled basis, as in Sinkhorn/Ruiz balancing: with the current
guess D, one probe of ``A = D^{-1/2} H D^{-1/2}`` gives ``a = |z ⊙ Az|`` ≈ diag(A) and
``D ← D ⊙ a``. The exact diagonal is a fixed point (then ``diag(A) = 1``), and each round
shrinks the error, because in a better scaled basis the off-diagonal error ``Σ_j A_ij z_j``
(``|A_ij| <= 1`` where D is right and H positive definite) is smaller next to ``A_ii``:
roughly the error's exponent halves per round. :data:`ROUNDS` rounds, one product each.

Taking ``|·|`` and a floor ``eps^¾ · max D`` keeps D positive on indefinite H, so CG's
preconditioner ``M = D⁻¹`` is positive definite whatever the curvature; D is normalized to
mean 1 (trust-ncg's region is ``‖s‖_D = √(sᵀDs) <= Δ``; CG itself does not care about the
scale of M).

Whether D helps is measured, not assumed: one more probe gives the dispersion
``δ(A) = n ‖Az‖² / (zᵀAz)²`` of the scaled matrix, an estimate of ``n tr(A²)/tr(A)²``
(1 for a multiple of the identity, up to n for one dominant eigenvalue), and the same
statistic of H itself comes with round 0 (D = 1). ``"auto"`` keeps D only when it divides
the dispersion by at least :data:`GAIN`: badly scaled curvature has a large ``δ(H)`` that
Jacobi scaling removes; well-scaled or strongly coupled curvature (Rosenbrock's valleys) does
not, and its Hessian is left alone. Cost: ``ROUNDS + 1`` products, once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from .. import _tree as tree
from .._krylov import pseudo_random

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

ROUNDS = 5  # refinement rounds (products); then one product to measure the result
GAIN = 2.0  # "auto" keeps D when it divides the curvature's dispersion at least by this
# "auto" estimates D only once an outer iteration's CG needed this many products: the
# estimate (ROUNDS + 1 products) then costs less than that one solve, and problems whose CG
# solves stay shorter (well conditioned, or n of a few) never pay for it nor change course.
AFTER = 10

# phases of the state's ``jacobi`` field
UNSCALED = 0  # D = 1 ("auto": until a long CG solve asks for an estimate)
ESTIMATE = 1  # estimate D at the next point before its proposal
SCALED = 2  # D in use
DECLINED = 3  # D = 1 for good (estimated and found no help, or not finite; or not "auto")


class Estimate(NamedTuple):
    diagonal: PyTree
    before: jax.Array  # dispersion of H
    after: jax.Array  # dispersion of D^{-1/2} H D^{-1/2}
    finite: jax.Array
    matvecs: jax.Array


def ones_like(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.ones_like, x)


def divide(v: PyTree, d: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.divide, v, d)


def weighted_norm(v: PyTree, d: PyTree) -> jax.Array:
    """``‖v‖_D = √(vᵀDv)``, scale-safe (the 2-norm of ``√D ⊙ v``)."""
    return tree.norm(jax.tree_util.tree_map(lambda vl, dl: vl * jnp.sqrt(dl), v, d))


def _unit_max(v: PyTree) -> PyTree:
    """``v / max|v|`` (v itself where that is 0 or not finite): entries of at most 1."""
    m = tree.max_abs(v)
    m = jnp.where(jnp.isfinite(m) & (m > 0), m, 1)
    return jax.tree_util.tree_map(lambda vl: vl / m.astype(vl.dtype), v)


def _normalized(d: PyTree) -> PyTree:
    """``d / max d``, floored at ``eps^¾``, then divided by its mean (entries of d >= 0)."""
    eps = jnp.finfo(tree.scalar_dtype(d)).eps
    d = jax.tree_util.tree_map(lambda dl: jnp.maximum(dl, eps**0.75), _unit_max(d))
    mean = tree.vdot(d, ones_like(d)) / tree.size(d)
    return tree.scale(1 / mean, d)


def estimate(hv: MatVec, x: PyTree, seed: int) -> Estimate:
    """The scaled Hutchinson refinement of the module doc: ``ROUNDS + 1`` products with `hv`.

    Probes are Rademacher vectors (:func:`hessfree._krylov.pseudo_random` of ``(seed, round)``) in x's layout,
    sharding kept. A non-finite product gives ``finite = False`` (the caller then keeps D = 1).
    """
    n = tree.size(x)
    dtype = tree.scalar_dtype(x)

    def body(r: jax.Array, carry: tuple[PyTree, jax.Array, jax.Array, jax.Array]) -> Any:
        d, before, _, finite = carry
        z = pseudo_random(seed, x, r, signs=True)
        root = jax.tree_util.tree_map(jnp.sqrt, d)
        # A z, scaled to max 1 (δ and the update do not depend on its scale)
        w = _unit_max(divide(tree.cast_like(hv(divide(z, root)), x), root))
        zw = tree.vdot(z, w)
        dispersion = n * tree.vdot(w, w) / jnp.where(zw != 0, zw**2, 0)
        dispersion = jnp.where(jnp.isfinite(dispersion), dispersion, jnp.inf)
        refined = _normalized(
            jax.tree_util.tree_map(lambda dl, zl, wl: dl * jnp.abs(zl * wl), d, z, w)
        )
        d = tree.where(r < ROUNDS, refined, d)  # the last product only measures
        return (
            d,
            jnp.where(r == 0, dispersion, before),
            dispersion,
            finite & tree.all_finite(w),
        )

    inf = jnp.asarray(jnp.inf, dtype)
    start = (ones_like(x), inf, inf, jnp.ones((), bool))
    d, before, after, finite = lax.fori_loop(0, ROUNDS + 1, body, start)
    return Estimate(d, before, after, finite, jnp.asarray(ROUNDS + 1, jnp.int32))

"""The seed problem: the Hessian-vector product of a quadratic, two ways.

Both functions compute ``H @ v`` for ``f(x) = 0.5 * xᵀ A x``, whose Hessian is the symmetric
part ``½(A + Aᵀ)``; for a symmetric `A` (the seed's contract) that is ``A @ v``. For a
non-symmetric `A` the result is ``½(A + Aᵀ) v``, not ``A v``: the Hessian of a quadratic form
only sees the symmetric part of its matrix.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from ._validation import check_floating


def _quadratic(x: jax.Array, A: jax.Array) -> jax.Array:
    return 0.5 * x @ A @ x


def _check_seed_args(x: jax.Array, A: jax.Array, v: jax.Array) -> None:
    for name, arr in (("x", x), ("A", A), ("v", v)):
        if not hasattr(arr, "shape"):
            msg = f"{name} must be a jax or numpy array; got {type(arr).__name__}"
            raise TypeError(msg)
    if np.ndim(x) != 1:
        msg = f"x must be 1-D with shape (d,); got shape {tuple(np.shape(x))}"
        raise ValueError(msg)
    d = np.shape(x)[0]
    if tuple(np.shape(A)) != (d, d):
        msg = f"A must have shape (d, d) = ({d}, {d}) to match x; got shape {tuple(np.shape(A))}"
        raise ValueError(msg)
    if tuple(np.shape(v)) != (d,):
        msg = f"v must have shape (d,) = ({d},) to match x; got shape {tuple(np.shape(v))}"
        raise ValueError(msg)
    for name, arr in (("x", x), ("A", A), ("v", v)):
        check_floating(arr, name)


def hvp_jvp_of_grad(x: jax.Array, A: jax.Array, v: jax.Array) -> jax.Array:
    """Hessian-vector product of ``f(x) = 0.5 xᵀAx`` by forward-over-reverse.

    Computes ``jax.jvp(jax.grad(f), (x,), (v,))[1]``: the directional derivative of the
    gradient, ``d/dt ∇f(x + t v)|ₜ₌₀ = H(x) v``. Cost: one reverse pass plus one forward pass
    (about 2 to 3 gradient evaluations), never forming H. For symmetric `A` the result is
    ``A @ v``; for any `A` it is ``½(A + Aᵀ) v``.

    Args:
        x: the point, shape ``(d,)``, floating.
        A: the matrix of the quadratic form, shape ``(d, d)``, symmetric.
        v: the direction, shape ``(d,)``.

    Returns:
        ``H @ v`` with shape ``(d,)`` and the dtype of `x` (`v` is cast to it: the tangent
        lives in x's tangent space).

    Example:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[2.0, 0.0], [0.0, 3.0]])
        >>> hvp_jvp_of_grad(jnp.ones(2), A, jnp.array([1.0, 0.0])).tolist()
        [2.0, 0.0]

    References:
        Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    """
    _check_seed_args(x, A, v)
    v = jnp.asarray(v, x.dtype)  # the tangent lives in x's tangent space
    return jax.jvp(jax.grad(lambda y: _quadratic(y, A)), (x,), (v,))[1]


def hvp_grad_of_grad(x: jax.Array, A: jax.Array, v: jax.Array) -> jax.Array:
    """Hessian-vector product of ``f(x) = 0.5 xᵀAx`` by reverse-over-reverse (the baseline).

    Computes ``jax.grad(lambda y: jnp.vdot(jax.grad(f)(y), v))(x)``: the gradient of the
    scalar ``⟨∇f(y), v⟩``. Same value as :func:`hvp_jvp_of_grad`; the cost is two reverse
    passes, the inner one differentiated again, which stores the gradient graph twice.

    Args:
        x: the point, shape ``(d,)``, floating.
        A: the matrix of the quadratic form, shape ``(d, d)``, symmetric.
        v: the direction, shape ``(d,)``.

    Returns:
        ``H @ v`` with shape ``(d,)``; ``½(A + Aᵀ) v`` for a non-symmetric `A`.

    Example:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[2.0, 0.0], [0.0, 3.0]])
        >>> hvp_grad_of_grad(jnp.ones(2), A, jnp.array([1.0, 0.0])).tolist()
        [2.0, 0.0]
    """
    _check_seed_args(x, A, v)
    v = jnp.asarray(v, x.dtype)
    grad_f = jax.grad(lambda y: _quadratic(y, A))
    return jax.grad(lambda y: jnp.vdot(grad_f(y), v))(x)

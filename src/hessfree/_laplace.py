"""Laplace approximations of a model's posterior, built from GGN curvature.

Conventions. N data points ``(x_n, y_n)``, outputs ``o_n = f(x_n; θ)`` with D numbers per
example, P parameters, ``θ*`` = the given `params` (the MAP; never re-optimized here)::

    ℓ_n(θ) = −log p(y_n | f(x_n; θ))                 per-example negative log-likelihood
        categorical: −log softmax(o_n)[y_n]           (summed over any extra positions)
        bernoulli:   Σ softplus(o_n) − y_n·o_n
        gaussian:    ½‖o_n − y_n‖²/σ² + (D/2)·log(2πσ²)
    L(θ)  = (1/N) Σ_n ℓ_n(θ)                          batch-mean NLL, constants included
    p(θ)  = N(0, diag(δ)⁻¹)                           δ = prior_precision
    G     = (1/N) Σ_n J_nᵀ (∇²_o ℓ_n) J_n             batch-mean GGN of the NLL at θ*
    Λ     = diag(δ) + N·G                             posterior precision
    q(θ)  = N(θ*, Λ⁻¹)

For ``"gaussian"``, ``∇²_o ℓ_n = I/σ²``: G is ``hf.ggn(model, "mse", ...)`` (the ``"mse"``
loss is ``½‖o − y‖²``, unit variance) divided by σ². The curvature is cached at σ = 1 as
``N·G₁`` (``G₁`` the GGN at unit variance), so Λ at any δ and σ is ``diag(δ) + N·G₁/σ²`` with no
new model products. The Laplace evidence::

    log p(D) ≈ log p(D|θ*) + log p(θ*) + (P/2) log 2π − ½ log det Λ
             = −N·L(θ*) − ½ Σ_i δ_i θ*_i² + ½ Σ_i log δ_i − ½ log det Λ.

References:
    MacKay, "A practical Bayesian framework for backpropagation networks", Neural
    Computation 1992 (the evidence; the probit approximation). Ritter, Botev, Barber, "A
    scalable Laplace approximation for neural networks", ICLR 2018. Immer, Korzepa, Bauer,
    "Improving predictions of Bayesian neural nets via local linearization", AISTATS 2021 (the
    GLM predictive). Daxberger et al., "Laplace Redux: effortless Bayesian deep learning",
    NeurIPS 2021.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from . import _losses as losses
from . import _tree as tree
from ._diagonals import _diagonal, _outputs
from ._eigsh import eigsh
from ._model_curvature import _check_model, _refuse_bad_targets, ggn
from ._operators import CurvatureOperator
from ._staging import staged
from ._validation import (
    PyTree,
    batch_size,
    check_callable,
    check_choice,
    check_floating,
    check_key,
    check_number,
    check_positive_int,
    describe_tree,
)

STRUCTURES = ("diagonal", "lowrank", "full")
PREDICT_METHODS = ("glm", "mc")
PRIOR_METHODS = ("marglik",)
FULL_LIMIT = 10_000
_MAX_LOG_STEP = 2.0  # largest change of log δ per Newton step (a factor e² ≈ 7.4)
Model = Callable[..., Any]


class Predictive(NamedTuple):
    """The predictive distribution at a batch of inputs, per output.

    Attributes:
        mean: ``(B, *out)``, the outputs at the MAP ``f(x; θ*)`` (the GLM predictive mean).
        variance: ``(B, *out)``, the marginal predictive variance of each output (the
            diagonal of ``J Σ Jᵀ`` per input; plus σ² for ``"gaussian"``).
        probs: ``(B, *out)`` class probabilities (``"categorical"``, softmax over the last
            axis) or ``P(y = 1)`` (``"bernoulli"``); None for ``"gaussian"``.
    """

    mean: jax.Array
    variance: jax.Array
    probs: jax.Array | None


# --- the model as pytree parts (arrays traced, the rest static) ------------------------------

_HOLE = object()


def _is_array(x: Any) -> bool:
    return isinstance(x, jax.Array | np.ndarray)


def _split_model(model: Model) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """``(arrays, static)``: a ``Partial`` model's arrays become leaves, the rest aux data."""
    leaves, treedef = jax.tree_util.tree_flatten(model)
    arrays = tuple(leaf for leaf in leaves if _is_array(leaf))
    static = tuple(_HOLE if _is_array(leaf) else leaf for leaf in leaves)
    return arrays, (treedef, static)


def _join_model(arrays: tuple[Any, ...], static: tuple[Any, ...]) -> Model:
    treedef, leaves = static
    it = iter(arrays)
    return jax.tree_util.tree_unflatten(treedef, [next(it) if s is _HOLE else s for s in leaves])


# --- small tree helpers ------------------------------------------------------------------------


def _expand_prior(prior: PyTree, params: PyTree) -> PyTree:
    """The prior precision as a pytree like `params`, every leaf full-shaped, in its dtype."""
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(prior)):
        return jax.tree_util.tree_map(
            lambda x: jnp.broadcast_to(jnp.asarray(prior, x.dtype), x.shape), params
        )
    return jax.tree_util.tree_map(
        lambda d, x: jnp.broadcast_to(jnp.asarray(d, x.dtype), x.shape), prior, params
    )


def _tree_sum(x: PyTree, dtype: Any) -> jax.Array:
    total = jnp.zeros((), dtype)
    for leaf in jax.tree_util.tree_leaves(x):
        total = total + jnp.sum(leaf).astype(dtype)
    return total


def _gram(X: PyTree, Y: PyTree) -> jax.Array:
    """``(K, M)`` inner products of the rows of two bases (leaves ``(K, …)`` and ``(M, …)``)."""
    total = None
    for xl, yl in zip(jax.tree_util.tree_leaves(X), jax.tree_util.tree_leaves(Y), strict=True):
        part = xl.reshape(xl.shape[0], -1) @ yl.reshape(yl.shape[0], -1).T
        total = part if total is None else total + part.astype(total.dtype)
    assert total is not None
    return total


def _row_sums(X: PyTree, weight: PyTree) -> jax.Array:
    """``(K,)``: ``Σ_i weight_i X_ki²`` for every row k of the basis X."""
    total = None
    for xl, wl in zip(jax.tree_util.tree_leaves(X), jax.tree_util.tree_leaves(weight), strict=True):
        part = jnp.sum((xl * xl * wl[None]).reshape(xl.shape[0], -1), axis=1)
        total = part if total is None else total + part.astype(total.dtype)
    assert total is not None
    return total


def _rows_scaled(X: PyTree, coeffs: jax.Array) -> PyTree:
    """Row k of the basis X times ``coeffs[k]``."""
    return jax.tree_util.tree_map(
        lambda xl: xl * coeffs.astype(xl.dtype).reshape(-1, *(1,) * (xl.ndim - 1)), X
    )


def _combine(coeffs: jax.Array, X: PyTree) -> PyTree:
    """``Σ_k coeffs[..., k] X_k``: one vector (coeffs ``(K,)``) or a batch (``(S, K)``)."""
    return jax.tree_util.tree_map(lambda xl: jnp.tensordot(coeffs.astype(xl.dtype), xl, 1), X)


def _standard_normal(key: jax.Array, like: PyTree, num: int) -> PyTree:
    """``num`` standard normal pytrees like `like` (leading axis num), from one flat draw."""
    flat, unravel = ravel_pytree(like)
    z = jax.random.normal(key, (num, flat.shape[0]), flat.dtype)
    return jax.vmap(unravel)(z)


def _curvature_scale(likelihood: str, sigma: jax.Array) -> jax.Array:
    return 1 / sigma**2 if likelihood == "gaussian" else jnp.ones_like(sigma)


# --- the posterior, per structure (built while tracing) ----------------------------------------


class _Diagonal:
    """``Λ = diag(δ) + diag(N·G₁)/σ²``."""

    def __init__(self, mean: PyTree, d: PyTree, c: jax.Array, g: PyTree) -> None:
        self.lam = jax.tree_util.tree_map(lambda di, gi: di + c.astype(gi.dtype) * gi, d, g)
        self.var = jax.tree_util.tree_map(jnp.reciprocal, self.lam)
        self.mean = mean

    def log_det(self, dtype: Any) -> jax.Array:
        return _tree_sum(jax.tree_util.tree_map(jnp.log, self.lam), dtype)

    def variance(self) -> PyTree:
        return self.var

    def draw(self, key: jax.Array, num: int) -> PyTree:
        z = _standard_normal(key, self.mean, num)
        return jax.tree_util.tree_map(lambda zl, vl: zl * jnp.sqrt(vl)[None], z, self.var)

    def quad_diag(self, U: PyTree) -> jax.Array:
        return _row_sums(U, self.var)

    def precision(self) -> tuple[Callable[..., PyTree], tuple[Any, ...]]:
        return _diagonal_mv, (self.lam,)


class _LowRank:
    """``Λ = D + W Wᵀ`` with ``D = diag(δ)``, ``W = V diag(√(s/σ²))``: Woodbury throughout.

    ``C = I_k + Wᵀ D⁻¹ W = L_C L_Cᵀ``; ``Λ⁻¹ = D⁻¹ − D⁻¹W C⁻¹ WᵀD⁻¹``; ``log det Λ = log det D
    + log det C`` (the matrix-determinant lemma). V need not be orthonormal.
    """

    def __init__(
        self, mean: PyTree, d: PyTree, c: jax.Array, values: jax.Array, vectors: PyTree
    ) -> None:
        self.mean, self.d = mean, d
        self.dinv = jax.tree_util.tree_map(jnp.reciprocal, d)
        # √c·√s, not √(c·s): the derivative in σ stays finite at s = 0
        self.W = _rows_scaled(vectors, jnp.sqrt(c) * jnp.sqrt(jnp.maximum(values, 0)))
        self.DW = jax.tree_util.tree_map(lambda wl, di: wl * di[None], self.W, self.dinv)
        k = values.shape[0]
        inner = _gram(self.W, self.DW)
        self.L = jnp.linalg.cholesky(jnp.eye(k, dtype=inner.dtype) + (inner + inner.T) / 2)

    def log_det(self, dtype: Any) -> jax.Array:
        log_d = _tree_sum(jax.tree_util.tree_map(jnp.log, self.d), dtype)
        return log_d + 2 * jnp.sum(jnp.log(jnp.diag(self.L))).astype(dtype)

    def _solve(self, x: PyTree) -> PyTree:
        """``Λ⁻¹ x`` for one vector."""
        proj = _gram(self.DW, jax.tree_util.tree_map(lambda a: a[None], x))[:, 0]
        coeffs = jax.scipy.linalg.cho_solve((self.L, True), proj)
        return tree.sub(
            jax.tree_util.tree_map(jnp.multiply, self.dinv, x), _combine(coeffs, self.DW)
        )

    def variance(self) -> PyTree:
        k = self.L.shape[0]
        Linv = jax.scipy.linalg.solve_triangular(self.L, jnp.eye(k, dtype=self.L.dtype), lower=True)
        Z = jax.tree_util.tree_map(lambda a: jnp.tensordot(Linv.astype(a.dtype), a, 1), self.DW)
        return jax.tree_util.tree_map(lambda di, zl: di - jnp.sum(zl * zl, axis=0), self.dinv, Z)

    def draw(self, key: jax.Array, num: int) -> PyTree:
        # θ − θ* = Λ⁻¹ (D^½ z₁ + W z₂) has covariance Λ⁻¹ (D + W Wᵀ) Λ⁻¹ = Λ⁻¹, exactly.
        k1, k2 = jax.random.split(key)
        z1 = _standard_normal(k1, self.mean, num)
        z2 = jax.random.normal(k2, (num, self.L.shape[0]), self.L.dtype)
        x = jax.tree_util.tree_map(lambda zl, dl: zl * jnp.sqrt(dl)[None], z1, self.d)
        x = jax.tree_util.tree_map(jnp.add, x, _combine(z2, self.W))
        return jax.vmap(self._solve)(x)

    def quad_diag(self, U: PyTree) -> jax.Array:
        A = _row_sums(U, self.dinv)
        Y = jax.scipy.linalg.solve_triangular(self.L, _gram(U, self.DW).T, lower=True)
        return A - jnp.sum(Y * Y, axis=0).astype(A.dtype)

    def precision(self) -> tuple[Callable[..., PyTree], tuple[Any, ...]]:
        return _lowrank_mv, (self.d, self.W)


class _Full:
    """``Λ = diag(δ) + N·G₁/σ²`` dense over ``ravel_pytree(params)``, ``Λ = L Lᵀ`` (Cholesky)."""

    def __init__(self, mean: PyTree, d: PyTree, c: jax.Array, H: jax.Array) -> None:
        self.mean = mean
        d_flat, self.unravel = ravel_pytree(d)
        self.lam = c.astype(H.dtype) * (H + H.T) / 2 + jnp.diag(d_flat.astype(H.dtype))
        self.L = jnp.linalg.cholesky(self.lam)

    def log_det(self, dtype: Any) -> jax.Array:
        return 2 * jnp.sum(jnp.log(jnp.diag(self.L))).astype(dtype)

    def variance(self) -> PyTree:
        n = self.L.shape[0]
        Linv = jax.scipy.linalg.solve_triangular(self.L, jnp.eye(n, dtype=self.L.dtype), lower=True)
        return self.unravel(jnp.sum(Linv * Linv, axis=0))  # diag(L⁻ᵀ L⁻¹)

    def draw(self, key: jax.Array, num: int) -> PyTree:
        z = jax.random.normal(key, (self.L.shape[0], num), self.L.dtype)
        x = jax.scipy.linalg.solve_triangular(self.L, z, lower=True, trans="T")  # L⁻ᵀ z
        return jax.vmap(self.unravel)(x.T)

    def quad_diag(self, U: PyTree) -> jax.Array:
        flat = jax.vmap(lambda u: ravel_pytree(u)[0])(U)
        Y = jax.scipy.linalg.solve_triangular(self.L, flat.T.astype(self.L.dtype), lower=True)
        return jnp.sum(Y * Y, axis=0)

    def precision(self) -> tuple[Callable[..., PyTree], tuple[Any, ...]]:
        return _dense_mv, (self.lam,)


def _diagonal_mv(lam: PyTree, v: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.multiply, lam, v)


def _lowrank_mv(d: PyTree, W: PyTree, v: PyTree) -> PyTree:
    coeffs = _gram(W, jax.tree_util.tree_map(lambda a: a[None], v))[:, 0]
    return jax.tree_util.tree_map(jnp.add, _diagonal_mv(d, v), _combine(coeffs, W))


def _dense_mv(lam: jax.Array, v: PyTree) -> PyTree:
    flat, unravel = ravel_pytree(v)
    return unravel(lam @ flat.astype(lam.dtype))


# --- the Laplace object ------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class Laplace:
    """A Laplace posterior ``q(θ) = N(θ*, Λ⁻¹)``; build it with :func:`laplace`.

    A registered pytree: the arrays (mean, prior precision, σ, the data term and the cached
    curvature, and any arrays inside a ``Partial`` model) are its leaves; the model function,
    likelihood, structure and sizes are static. So it passes through ``jit``/``vmap`` and its
    methods compile once per configuration and shapes.

    Attributes:
        mean: θ*, the given parameters (pytree).
        prior_precision: δ: a scalar, or a pytree like the parameters whose leaves are
            scalars (one precision per leaf) or full arrays (one per entry).
        sigma_noise: σ, the Gaussian observation noise (1 for other likelihoods).
        nll: ``N·L(θ*)`` for ``"categorical"``/``"bernoulli"``; ``½ Σ_n ‖o_n − y_n‖²`` for
            ``"gaussian"`` (the σ-free part, so that σ can change).
        curvature: the cached ``N·G₁`` (GGN summed over the data, at σ = 1):
            ``"diagonal"``: its diagonal, a pytree like the parameters; ``"lowrank"``:
            ``(eigenvalues (k,), eigenvectors)`` of its top k eigenpairs, eigenvectors a pytree
            with a leading axis k; ``"full"``: the dense ``(P, P)`` matrix in
            ``ravel_pytree`` order.
        likelihood, structure, num_data (N), num_outputs (D per example): static.
    """

    def __init__(
        self,
        model: Model,
        mean: PyTree,
        prior_precision: PyTree,
        sigma_noise: jax.Array,
        nll: jax.Array,
        curvature: Any,
        *,
        likelihood: str,
        structure: str,
        num_data: int,
        num_outputs: int,
        chunk_size: int | None = None,
    ) -> None:
        self.model = model
        self.mean = mean
        self.prior_precision = prior_precision
        self.sigma_noise = sigma_noise
        self.nll = nll
        self.curvature = curvature
        self.likelihood = likelihood
        self.structure = structure
        self.num_data = num_data
        self.num_outputs = num_outputs
        self.chunk_size = chunk_size

    # --- pytree --------------------------------------------------------------------------
    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        arrays, static = _split_model(self.model)
        children = (
            self.mean,
            self.prior_precision,
            self.sigma_noise,
            self.nll,
            self.curvature,
            arrays,
        )
        aux = (
            static,
            self.likelihood,
            self.structure,
            self.num_data,
            self.num_outputs,
            self.chunk_size,
        )
        return children, aux

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> Laplace:
        mean, prior, sigma, nll, curvature, arrays = children
        static, likelihood, structure, num_data, num_outputs, chunk_size = aux
        return cls(
            _join_model(tuple(arrays), static),
            mean,
            prior,
            sigma,
            nll,
            curvature,
            likelihood=likelihood,
            structure=structure,
            num_data=num_data,
            num_outputs=num_outputs,
            chunk_size=chunk_size,
        )

    def _replace(self, **changes: Any) -> Laplace:
        children, aux = self.tree_flatten()
        out = Laplace.tree_unflatten(aux, children)
        for name, value in changes.items():
            setattr(out, name, value)
        return out

    def __repr__(self) -> str:
        return (
            f"Laplace(structure={self.structure!r}, likelihood={self.likelihood!r}, "
            f"num_params={tree.size(self.mean)}, num_data={self.num_data})"
        )

    @property
    def num_params(self) -> int:
        """P, the number of parameters."""
        return tree.size(self.mean)

    # --- the posterior ---------------------------------------------------------------------
    @property
    def posterior_precision(self) -> CurvatureOperator:
        """Λ as a :class:`CurvatureOperator` (PSD) on pytrees like the parameters.

        Exact for ``"diagonal"`` and ``"full"`` (the matrices stated in :func:`laplace`); for
        ``"lowrank"`` it is ``diag(δ) + V diag(s/σ²) Vᵀ``, the top-k truncation of ``N·G``
        plus the prior. ``to_dense()`` gives the matrix in ``ravel_pytree`` order.
        """
        return staged(_precision_operator, self)

    def variance(self) -> PyTree:
        """The marginal posterior variances ``diag(Λ⁻¹)``, a pytree like the parameters.

        Cost: O(P) (diagonal), O(P k²) (lowrank), O(P³) (full: a Cholesky and a triangular
        inverse).
        """
        return staged(_variance, self)

    def sample(self, key: jax.Array, num_samples: int) -> PyTree:
        """``num_samples`` exact draws from ``N(θ*, Λ⁻¹)``: a pytree with a leading axis.

        Diagonal: ``θ* + z/√Λ``. Full: ``θ* + L⁻ᵀ z`` with ``Λ = L Lᵀ``. Lowrank:
        ``θ* + Λ⁻¹ (D^½ z₁ + W z₂)`` (covariance ``Λ⁻¹(D + WWᵀ)Λ⁻¹ = Λ⁻¹``), with
        ``Λ⁻¹`` by Woodbury. Draws are in the parameters' dtypes.
        """
        check_key(key, "Laplace.sample", "the draws")
        check_positive_int(num_samples, "num_samples")
        return staged(_sample, self, key, num_samples=num_samples)

    def log_marginal_likelihood(
        self, prior_precision: PyTree = None, sigma_noise: Any = None
    ) -> jax.Array:
        """The Laplace evidence ``log p(D | δ, σ)`` (defaults: the stored δ and σ).

        ``−N·L(θ*) − ½ Σ_i δ_i θ*_i² + ½ Σ_i log δ_i − ½ log det Λ`` where ``N·L`` includes
        the likelihood's constants (``+ ½ N D log(2πσ²)`` for ``"gaussian"``, with the data
        term ``nll/σ²``). Evaluated from the cached curvature: no model products; cost O(P)
        (diagonal), O(P k²) (lowrank), O(P³) (full, one Cholesky). Differentiable in
        `prior_precision` and `sigma_noise` (pass traced values); θ* is held at the given
        point.
        """
        if prior_precision is not None:
            prior_precision = _checked_prior(prior_precision, self.mean, "prior_precision")
        if sigma_noise is not None:
            sigma_noise = _checked_sigma(sigma_noise, self.likelihood, self.mean)
        return staged(_log_marginal_likelihood, self, prior_precision, sigma_noise)

    def optimize_prior_precision(
        self, method: str = "marglik", *, num_steps: int = 100, per_leaf: bool = False
    ) -> Laplace:
        """This posterior with δ maximizing :meth:`log_marginal_likelihood` (σ held).

        Maximizes over ``t = log δ`` (one scalar, or one per leaf of the parameters with
        ``per_leaf=True``) by Newton's method with a backtracking line search, at most
        `num_steps` steps in one ``lax.while_loop``, stopping when a step moves ``t`` by less
        than ``√eps``. Each step moves ``log δ`` by at most 2. The evidence is concave in
        ``t`` (``log det(diag(e^t) + N G)`` is a log-sum-exp of affine functions of t, since the
        principal minors of a PSD matrix are nonnegative), so the maximizer is unique and
        Newton converges to it. Cost per step: a few evidence evaluations (see
        :meth:`log_marginal_likelihood`) and their first and second derivatives; for
        ``"full"`` with one scalar δ, the eigenvalues of ``N·G`` once, then O(P) per step.

        Args:
            method: ``"marglik"`` (the Laplace evidence).
            num_steps: the most Newton steps.
            per_leaf: one precision per leaf of the parameters (else one scalar).

        Returns:
            A new :class:`Laplace` whose `prior_precision` is a scalar, or a pytree like the
            parameters with scalar leaves (``per_leaf=True``).
        """
        check_choice(method, PRIOR_METHODS, "method")
        check_positive_int(num_steps, "num_steps")
        if not isinstance(per_leaf, bool):
            msg = f"per_leaf must be a bool; got {type(per_leaf).__name__} {per_leaf!r}"
            raise TypeError(msg)
        return staged(_optimize_prior, self, num_steps=num_steps, per_leaf=per_leaf)

    def predict(
        self,
        inputs: PyTree,
        *,
        method: str = "glm",
        key: jax.Array | None = None,
        num_samples: int = 100,
        chunk_size: int | None = None,
    ) -> Predictive:
        """The linearized (GLM) predictive at `inputs`: ``f(x; θ) ≈ f(x; θ*) + J(x)(θ − θ*)``.

        Under q, the outputs of input x are ``N(f(x; θ*), J_x Λ⁻¹ J_xᵀ)``. Returned per output:
        the mean ``f(x; θ*)`` and the variance ``diag(J_x Λ⁻¹ J_xᵀ)`` (plus σ² for
        ``"gaussian"``); the off-diagonal output covariance is not returned.

        - ``method="glm"``: variances exact. Per input, the K = D rows of ``J_x`` are K
          vector-Jacobian products of that input alone (one-hot output cotangents), then
          ``diag(J_x Σ J_xᵀ)`` from the posterior's factors. Probabilities by the probit
          approximation: ``softmax(μ / √(1 + π/8·σ²_f))`` (``"categorical"``, per class),
          ``sigmoid(μ / √(1 + π/8·σ²_f))`` (``"bernoulli"``). Cost: B·D single-example
          backward passes, memory ``chunk·D·P``; plus per input O(D·P) (diagonal), O(D·P·k)
          (lowrank), O(D·P²) (full).
        - ``method="mc"``: `num_samples` exact draws ``θ_s ~ q`` pushed through the
          linearized model, ``f_s = f(x; θ*) + J (θ_s − θ*)`` (one forward-mode pass of the
          batch each; jointly Gaussian with exactly the GLM covariance). ``probs`` is the
          average of ``softmax(f_s)``/``sigmoid(f_s)``; ``variance`` is
          ``mean_s (f_s − f(x; θ*))²`` (the mean is known exactly). Cost: S draws (see
          :meth:`sample`) and S tangent passes; memory ``S·B·D`` outputs.

        Each example is run alone through the model for ``"glm"`` (a batch of one), so the
        model must treat examples independently.

        Args:
            inputs: the model's inputs (leading axis B).
            method: ``"glm"`` (default) or ``"mc"``.
            key: a ``jax.random`` key, required for ``"mc"``.
            num_samples: draws for ``"mc"`` (static).
            chunk_size: ``"glm"``: inputs processed at once; ``"mc"``: draws at once.
                None: all at once.

        Returns:
            :class:`Predictive` ``(mean, variance, probs)``, each ``(B, *out)``.
        """
        check_choice(method, PREDICT_METHODS, "method")
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        if method == "mc":
            check_key(key, "Laplace.predict(method='mc')", "the posterior draws")
            check_positive_int(num_samples, "num_samples")
        else:
            key, num_samples = None, 1
        outputs = jax.eval_shape(self.model, self.mean, inputs)
        losses.check_model_outputs(outputs, inputs)
        return staged(
            _predict,
            self,
            inputs,
            key,
            method=method,
            num_samples=num_samples,
            chunk_size=chunk_size,
        )


# --- the methods' staged bodies ----------------------------------------------------------------


def _posterior(la: Laplace, prior: PyTree = None, sigma: Any = None) -> Any:
    prior = la.prior_precision if prior is None else prior
    sigma = la.sigma_noise if sigma is None else sigma
    d = _expand_prior(prior, la.mean)
    c = _curvature_scale(la.likelihood, jnp.asarray(sigma, tree.scalar_dtype(la.mean)))
    if la.structure == "diagonal":
        return _Diagonal(la.mean, d, c, la.curvature)
    if la.structure == "lowrank":
        values, vectors = la.curvature
        return _LowRank(la.mean, d, c, values, vectors)
    return _Full(la.mean, d, c, la.curvature)


def _precision_operator(la: Laplace) -> CurvatureOperator:
    fn, arrays = _posterior(la).precision()
    label = f"laplace posterior precision ({la.structure}, {la.likelihood})"
    return CurvatureOperator(Partial(fn, *arrays), la.mean, label=label, psd=True)


def _variance(la: Laplace) -> PyTree:
    return tree.cast_like(_posterior(la).variance(), la.mean)


def _sample(la: Laplace, key: jax.Array, *, num_samples: int) -> PyTree:
    deltas = _posterior(la).draw(key, num_samples)
    return jax.tree_util.tree_map(lambda m, e: (m[None] + e).astype(m.dtype), la.mean, deltas)


def _data_term(la: Laplace, sigma: jax.Array, dtype: Any) -> jax.Array:
    """``N·L(θ*)``, the likelihood's constants included."""
    nll = jnp.asarray(la.nll, dtype)
    if la.likelihood != "gaussian":
        return nll
    count = la.num_data * la.num_outputs
    return nll / sigma**2 + 0.5 * count * jnp.log(2 * math.pi * sigma**2)


def _evidence(la: Laplace, d: PyTree, sigma: jax.Array, log_det: jax.Array) -> jax.Array:
    dtype = tree.scalar_dtype(la.mean)
    penalty = _tree_sum(jax.tree_util.tree_map(lambda di, m: di * m * m, d, la.mean), dtype)
    log_prior_det = _tree_sum(jax.tree_util.tree_map(jnp.log, d), dtype)
    return -_data_term(la, sigma, dtype) - 0.5 * penalty + 0.5 * log_prior_det - 0.5 * log_det


def _log_marginal_likelihood(la: Laplace, prior: PyTree, sigma: Any) -> jax.Array:
    prior = la.prior_precision if prior is None else prior
    dtype = tree.scalar_dtype(la.mean)
    sigma = jnp.asarray(la.sigma_noise if sigma is None else sigma, dtype)
    d = _expand_prior(prior, la.mean)
    log_det = _posterior(la, prior, sigma).log_det(dtype)
    return _evidence(la, d, sigma, log_det)


def _initial_log_prior(prior: PyTree, params: PyTree, per_leaf: bool) -> jax.Array:
    num = len(jax.tree_util.tree_leaves(params))
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(prior)):
        t = jnp.mean(jnp.log(prior))[None]
    else:
        t = jnp.stack([jnp.mean(jnp.log(leaf)) for leaf in jax.tree_util.tree_leaves(prior)])
    if per_leaf:
        return jnp.broadcast_to(t, (num,)) if t.shape[0] == 1 else t
    return jnp.mean(t)[None]


def _optimize_prior(la: Laplace, *, num_steps: int, per_leaf: bool) -> Laplace:
    dtype = tree.scalar_dtype(la.mean)
    leaves, treedef = jax.tree_util.tree_flatten(la.mean)
    sigma = jnp.asarray(la.sigma_noise, dtype)
    t0 = _initial_log_prior(la.prior_precision, la.mean, per_leaf).astype(dtype)

    def prior_of(t: jax.Array) -> PyTree:
        if per_leaf:
            return jax.tree_util.tree_unflatten(
                treedef, [jnp.exp(t[i]).astype(leaf.dtype) for i, leaf in enumerate(leaves)]
            )
        return jnp.exp(t[0])

    if la.structure == "full" and not per_leaf:
        # log det(δI + c·N·G₁) = Σ_j log(δ + c e_j): one eigendecomposition, then O(P) per step
        c = _curvature_scale(la.likelihood, sigma)
        e = jnp.maximum(jnp.linalg.eigvalsh((la.curvature + la.curvature.T) / 2), 0)

        def objective(t: jax.Array) -> jax.Array:
            delta = jnp.exp(t[0])
            log_det = jnp.sum(jnp.log(delta + c * e)).astype(dtype)
            return _evidence(la, _expand_prior(delta, la.mean), sigma, log_det)

    else:

        def objective(t: jax.Array) -> jax.Array:
            return _log_marginal_likelihood(la, prior_of(t), sigma)

    tol = float(np.sqrt(np.finfo(dtype).eps))

    def body(state: tuple[Any, ...]) -> tuple[Any, ...]:
        i, t, _ = state
        f, g = jax.value_and_grad(objective)(t)
        hess = jax.hessian(objective)(t)
        neg = -(hess + hess.T) / 2
        step = jnp.linalg.solve(neg, g)  # Newton: neg is positive definite (concavity)
        fallback = g / jnp.maximum(jnp.max(jnp.abs(jnp.diag(neg))), 1)
        good = jnp.all(jnp.isfinite(step)) & (jnp.vdot(g, step) > 0)
        step = jnp.where(good, step, fallback)
        step = step * jnp.minimum(1, _MAX_LOG_STEP / jnp.maximum(jnp.max(jnp.abs(step)), 1e-30))

        # backtracking: halve until the evidence does not decrease (at most 40 halvings)
        def worse(s: tuple[Any, ...]) -> jax.Array:
            _, value, tries = s
            return (tries < 40) & ~(value >= f)

        def halve(s: tuple[Any, ...]) -> tuple[Any, ...]:
            alpha = s[0] / 2
            return alpha, objective(t + alpha * step), s[2] + 1

        one = jnp.ones((), dtype)
        start = (one, objective(t + step), jnp.zeros((), jnp.int32))
        alpha, value, _ = jax.lax.while_loop(worse, halve, start)
        move = jnp.where(value >= f, alpha, 0) * step  # no ascent found: stay (and stop)
        moved = jnp.max(jnp.abs(move))
        return i + 1, t + move, moved <= tol

    def cond(state: tuple[Any, ...]) -> jax.Array:
        i, _, done = state
        return (i < num_steps) & ~done

    init = (jnp.zeros((), jnp.int32), t0, jnp.zeros((), bool))
    _, t, _ = jax.lax.while_loop(cond, body, init)
    return la._replace(prior_precision=prior_of(t))


def _glm_variance(
    la: Laplace, post: Any, inputs: PyTree, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """``(f(x; θ*), diag(J_x Λ⁻¹ J_xᵀ))`` per input, from the rows of J_x by K vjps."""

    def one(x: PyTree) -> tuple[jax.Array, jax.Array]:
        x = jax.tree_util.tree_map(lambda a: a[None], x)
        out, pull = jax.vjp(lambda p: la.model(p, x)[0], la.mean)
        size = out.size
        cols = jnp.eye(size, dtype=out.dtype).reshape(size, *out.shape)
        rows = jax.vmap(pull)(cols)[0]  # J_xᵀ e_k for every output k
        return out, post.quad_diag(rows).reshape(out.shape).astype(out.dtype)

    if chunk_size is None:
        return jax.vmap(one)(inputs)
    return jax.lax.map(one, inputs, batch_size=chunk_size)


def _mc_outputs(
    la: Laplace, post: Any, inputs: PyTree, key: jax.Array, num: int, chunk_size: int | None
) -> tuple[jax.Array, jax.Array]:
    """``(f(x; θ*), f_s)`` with ``f_s = f(x; θ*) + J (θ_s − θ*)``, ``θ_s ~ q``: ``(S, B, …)``."""
    deltas = post.draw(key, num)
    deltas = tree.cast_like(deltas, jax.tree_util.tree_map(lambda m: m[None], la.mean))

    def at_inputs(p: PyTree) -> jax.Array:
        return la.model(p, inputs)

    mu = at_inputs(la.mean)

    def tangent(delta: PyTree) -> jax.Array:
        return jax.jvp(at_inputs, (la.mean,), (delta,))[1]

    if chunk_size is None:
        jd = jax.vmap(tangent)(deltas)
    else:
        jd = jax.lax.map(tangent, deltas, batch_size=chunk_size)
    return mu, mu[None] + jd.astype(mu.dtype)


def _probit(likelihood: str, mean: jax.Array, variance: jax.Array) -> jax.Array | None:
    if likelihood == "gaussian":
        return None
    scaled = mean / jnp.sqrt(1 + math.pi / 8 * variance)
    if likelihood == "categorical":
        return jax.nn.softmax(scaled, axis=-1)
    return jax.nn.sigmoid(scaled)


def _predict(
    la: Laplace,
    inputs: PyTree,
    key: Any,
    *,
    method: str,
    num_samples: int,
    chunk_size: int | None,
) -> Predictive:
    post = _posterior(la)
    if method == "glm":
        mean, var = _glm_variance(la, post, inputs, chunk_size)
        probs = _probit(la.likelihood, mean, var)
    else:
        mean, f = _mc_outputs(la, post, inputs, key, num_samples, chunk_size)
        var = jnp.mean((f - mean[None]) ** 2, axis=0)
        probs = None
        if la.likelihood == "categorical":
            probs = jnp.mean(jax.nn.softmax(f, axis=-1), axis=0)
        elif la.likelihood == "bernoulli":
            probs = jnp.mean(jax.nn.sigmoid(f), axis=0)
    if la.likelihood == "gaussian":
        var = var + jnp.asarray(la.sigma_noise, var.dtype) ** 2
    return Predictive(mean, var, probs)


# --- the builder -------------------------------------------------------------------------------


def _chunked_sum(
    fn: Callable[[PyTree], jax.Array], data: PyTree, batch: int, zero: jax.Array, chunk: int | None
) -> jax.Array:
    """``Σ over chunks of fn(chunk)``; `fn` takes a slice of `data` (leading axis) at once."""
    if chunk is None or chunk >= batch:
        return fn(data)
    num = batch // chunk
    head = jax.tree_util.tree_map(
        lambda a: a[: num * chunk].reshape(num, chunk, *a.shape[1:]), data
    )
    total = jax.lax.scan(lambda acc, c: (acc + fn(c), None), zero, head)[0]
    if batch % chunk:
        total = total + fn(jax.tree_util.tree_map(lambda a: a[num * chunk :], data))
    return total


def _dense_ggn_sum(
    model: Model,
    row: losses.Loss,
    params: PyTree,
    inputs: PyTree,
    targets: Any,
    chunk_size: int | None,
) -> jax.Array:
    """``N·G₁ = Σ_n Σ_k (J_nᵀ s_nk)(J_nᵀ s_nk)ᵀ``, ``Σ_k s_nk s_nkᵀ = ∇²_o ℓ_n`` (closed form).

    K single-example backward passes per example; the rows of a chunk are stacked into a
    ``(chunk·K, P)`` matrix R and ``RᵀR`` accumulated (memory ``chunk·K·P + P²``).
    """
    batch = batch_size(inputs, "inputs")
    flat, _ = ravel_pytree(params)
    n = flat.shape[0]

    def one(example: tuple[PyTree, Any]) -> jax.Array:
        x, y = example
        x = jax.tree_util.tree_map(lambda a: a[None], x)
        out, pull = jax.vjp(lambda p: model(p, x)[0], params)
        cols = row.hessian_factor(out, y).astype(out.dtype)
        rows = jax.vmap(pull)(cols)[0]
        return jax.vmap(lambda r: ravel_pytree(r)[0])(rows)  # (K, P)

    def chunk_gram(chunk: tuple[PyTree, Any]) -> jax.Array:
        R = jax.vmap(one)(chunk)
        R = R.reshape(-1, n)
        return R.T @ R

    zero = jnp.zeros((n, n), flat.dtype)
    return _chunked_sum(chunk_gram, (inputs, targets), batch, zero, chunk_size)


def _fit_build(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    likelihood: str,
    structure: str,
    chunk_size: int | None,
) -> tuple[jax.Array, Any, jax.Array]:
    """``(nll, curvature or None, targets ok)``: checks, the data term, and for "diagonal" and
    "full" the curvature (``"lowrank"`` is done by ``eigsh`` on ``ggn``)."""
    row = losses.get_likelihood(likelihood)
    outputs_struct = _check_model(model, params, inputs)
    losses.check_targets(row, outputs_struct, targets)
    batch_size(inputs, "inputs")
    ok = row.targets_ok(outputs_struct, targets)
    outputs = _outputs(model, params, inputs, chunk_size)
    nll = losses.guarded(ok, row.value(outputs, targets) * outputs.shape[0])
    curvature = None
    if structure == "diagonal":

        def factor(out: jax.Array, y: Any) -> tuple[jax.Array, jax.Array]:
            cols = row.hessian_factor(out, y)
            return cols, jnp.ones(cols.shape[:1], out.dtype)

        diag = _diagonal(model, params, inputs, targets, factor, chunk_size)
        curvature = jax.tree_util.tree_map(lambda d: losses.guarded(ok, d), diag)
    elif structure == "full":
        curvature = losses.guarded(
            ok, _dense_ggn_sum(model, row, params, inputs, targets, chunk_size)
        )
    return nll, curvature, ok


# --- argument checks ---------------------------------------------------------------------------


def _check_positive(value: Any, name: str, where: str = "") -> None:
    """Refuse non-real, non-positive or non-finite concrete values (traced ones pass)."""
    if isinstance(value, jax.core.Tracer):
        return
    if isinstance(value, bool) or not (
        isinstance(value, int | float | np.integer | np.floating) or _is_array(value)
    ):
        msg = f"{name} must be a positive number or an array of them{where}; got {type(value).__name__} {value!r}"
        raise TypeError(msg)
    arr = np.asarray(value)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        msg = f"{name} must be real{where}; got dtype {arr.dtype}"
        raise TypeError(msg)
    if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr > 0)):
        bad = arr.ravel()[~(np.isfinite(arr.ravel()) & (arr.ravel() > 0))][0]
        msg = f"{name} must be finite and > 0{where}; got {bad!r}"
        raise ValueError(msg)


def _checked_prior(value: Any, params: PyTree, name: str) -> PyTree:
    """δ as arrays in the parameters' dtypes: a scalar, or a pytree like params (leaves of
    shape () or the leaf's shape)."""
    if value is None:
        msg = f"{name} must be a positive number or a pytree like params; got None"
        raise TypeError(msg)
    dtype = tree.scalar_dtype(params)
    if jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(value)):
        shape = tuple(np.shape(value))
        single = jax.tree_util.treedef_is_leaf(jax.tree_util.tree_structure(params))
        if shape != () and not (single and shape == tuple(np.shape(params))):
            msg = (
                f"{name} must be a scalar or a pytree like params (one scalar or one array "
                f"of the leaf's shape per leaf); got an array of shape {shape} for params "
                f"{describe_tree(params)}"
            )
            raise ValueError(msg)
        _check_positive(value, name)
        return jnp.asarray(value, dtype)
    p_def, v_def = jax.tree_util.tree_structure(params), jax.tree_util.tree_structure(value)
    if p_def != v_def:
        msg = (
            f"{name} as a pytree must have the tree structure of params; got "
            f"{describe_tree(value)} vs {describe_tree(params)} (structures {v_def} vs {p_def})"
        )
        raise ValueError(msg)
    out = []
    for (path, leaf), p in zip(
        jax.tree_util.tree_leaves_with_path(value), jax.tree_util.tree_leaves(params), strict=True
    ):
        where = f" (leaf {jax.tree_util.keystr(path)})"
        shape = tuple(np.shape(leaf))
        if shape not in ((), tuple(np.shape(p))):
            msg = (
                f"{name}{where} must be a scalar or have the leaf's shape {tuple(np.shape(p))}; "
                f"got shape {shape}"
            )
            raise ValueError(msg)
        _check_positive(leaf, name, where)
        out.append(jnp.asarray(leaf, jnp.result_type(p)))
    return jax.tree_util.tree_unflatten(v_def, out)


def _checked_sigma(value: Any, likelihood: str, params: PyTree) -> jax.Array:
    check_number(value, "sigma_noise", minimum=0.0, strict=True, traced_ok=True)
    if likelihood != "gaussian" and not isinstance(value, jax.core.Tracer) and float(value) != 1:
        msg = (
            f"sigma_noise is the noise of likelihood='gaussian' only; got sigma_noise={value!r} "
            f"with likelihood={likelihood!r}"
        )
        raise ValueError(msg)
    return jnp.asarray(value, tree.scalar_dtype(params))


def laplace(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    likelihood: str,
    structure: str = "diagonal",
    prior_precision: Any = 1.0,
    sigma_noise: Any = 1.0,
    rank: int | None = None,
    key: jax.Array | None = None,
    chunk_size: int | None = None,
) -> Laplace:
    """The Laplace approximation ``q(θ) = N(θ*, Λ⁻¹)`` of the posterior at the MAP ``θ* = params``.

    ``Λ = diag(δ) + N·G``, where N is the leading size of `inputs`, δ = `prior_precision`
    (prior ``N(0, diag(δ)⁻¹)``) and G is the batch-mean GGN of the negative log-likelihood
    ``ℓ_n = −log p(y_n | f(x_n; θ))`` over the N given points, ``G = (1/N) Σ_n J_nᵀ ∇²_o ℓ_n
    J_n``: the operator ``hf.ggn(model, loss, params, inputs, targets)`` of the matching loss
    (``"categorical"`` ↔ ``"softmax_cross_entropy"``, ``"bernoulli"`` ↔
    ``"sigmoid_cross_entropy"``, ``"gaussian"`` ↔ ``"mse"``, the last divided by σ²: the
    ``"mse"`` loss is ``½‖o − y‖²``, so the Gaussian NLL with variance σ² is
    ``½‖o − y‖²/σ² + (D/2) log(2πσ²)``). The full conventions are in the module docstring.

    Structures:

    - ``"diagonal"``: ``Λ = diag(δ) + diag(N·G)``, the exact GGN diagonal (as
      :func:`hessfree.ggn_diagonal`): K single-example backward passes per example (K outputs
      per example), memory ``chunk·K·P``.
    - ``"lowrank"``: ``Λ = diag(δ) + V diag(s) Vᵀ`` with ``(s, V)`` the top-`rank` eigenpairs of
      ``N·G`` by :func:`hessfree.eigsh` (Lanczos on GGN products; needs `key`); inverses and
      log-determinants by Woodbury and the matrix-determinant lemma, O(P·k²).
    - ``"full"``: the dense ``P × P`` Λ over ``ravel_pytree(params)``, then Cholesky. N·G is
      built as ``Σ_n Σ_k (J_nᵀ s_nk)(J_nᵀ s_nk)ᵀ`` from the closed-form factor of each
      example's output Hessian: B·K backward passes plus O(B·K·P²) flops, memory
      ``chunk·K·P + P²``. Refused above P = 10,000.

    Restricting the parameters (last-layer Laplace): `params` may be any pytree, so pass only
    the parameters the posterior is over and let the model supply the rest. The cheapest
    pattern computes the features once and passes them as the inputs::

        feats = body(body_params, x)                       # (N, H), held fixed
        la = laplace(lambda p, h: h @ p["w"] + p["b"], head_params, feats, y,
                     likelihood="categorical", structure="full")
        la.predict(body(body_params, x_test))

    or pass ``jax.tree_util.Partial(f, body_params)`` with ``f(body_params, p, x)`` as the
    model (its arrays are traced, so nothing recompiles when they change).

    Args:
        model: ``model(params, inputs) -> outputs`` (logits for ``"categorical"``/
            ``"bernoulli"``, means for ``"gaussian"``), one array with leading axis N. The
            examples must be independent (no batch statistics): the curvature runs examples
            one at a time.
        params: θ*, the MAP (any pytree of floating arrays).
        inputs: the training inputs (leading axis N).
        targets: the training targets (labels or probabilities, reals, or numbers in [0, 1]).
        likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
        structure: ``"diagonal"`` (default), ``"lowrank"`` or ``"full"``.
        prior_precision: δ > 0: a scalar, or a pytree like `params` with one scalar per leaf
            (or an array of the leaf's shape).
        sigma_noise: σ > 0, the observation noise of ``"gaussian"`` (must stay 1 otherwise).
        rank: k, the number of eigenpairs for ``"lowrank"`` (required there, ``k <= P``).
        key: a ``jax.random`` key, required for ``"lowrank"`` (Lanczos start vectors).
        chunk_size: process this many examples at a time (curvature and data term);
            None: all at once.

    Returns:
        A :class:`Laplace` (a pytree). Compiled once per model, settings and shapes.

    Raises:
        ValueError: unknown likelihood or structure; δ or σ not positive; `rank` missing,
            out of range or given for another structure; `key` missing for ``"lowrank"``;
            ``"full"`` above P = 10,000; targets of the wrong shape (inputs and targets
            disagree) or out of range; σ ≠ 1 for a non-Gaussian likelihood.
        TypeError: `model` not callable; non-floating parameters or outputs; a bad key.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import hessfree as hf
        >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> y = jnp.zeros((3, 1))
        >>> la = hf.laplace(lambda p, x: x @ p, jnp.ones((2, 1)), x, y, likelihood="gaussian",
        ...              structure="full", prior_precision=2.0)
        >>> bool(jnp.allclose(la.posterior_precision.to_dense(), 2 * jnp.eye(2) + x.T @ x))
        True
    """
    row = losses.get_likelihood(likelihood)
    check_choice(structure, STRUCTURES, "structure")
    check_callable(model, "model", "model(params, inputs)")
    check_floating(params, "params")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    prior = _checked_prior(prior_precision, params, "prior_precision")
    sigma = _checked_sigma(sigma_noise, likelihood, params)
    n = tree.size(params)
    if structure == "lowrank":
        if rank is None:
            msg = "rank must be given for structure='lowrank' (the number of eigenpairs); got None"
            raise ValueError(msg)
        check_positive_int(rank, "rank")
        if rank > n:
            msg = f"rank must be at most the number of parameters P = {n}; got rank = {rank}"
            raise ValueError(msg)
        check_key(key, "laplace(structure='lowrank')", "the Lanczos start vectors")
    elif rank is not None:
        msg = f"rank applies to structure='lowrank' only; got rank={rank!r} with structure={structure!r}"
        raise ValueError(msg)
    if structure == "full" and n > FULL_LIMIT:
        msg = (
            f"structure='full' stores the dense P × P posterior precision; P = {n:,} exceeds "
            f"{FULL_LIMIT:,}. Use structure='diagonal' or 'lowrank', or restrict the parameters "
            f"(last-layer Laplace: pass the last layer's params and its input features)."
        )
        raise ValueError(msg)
    options = {"likelihood": likelihood, "structure": structure, "chunk_size": chunk_size}
    nll, curvature, ok = staged(_fit_build, model, params, inputs, targets, **options)
    _refuse_bad_targets(ok, targets, row)
    out = jax.eval_shape(model, params, inputs)
    num_data = int(out.shape[0])
    num_outputs = int(np.prod(out.shape[1:], dtype=np.int64))
    if structure == "lowrank":
        assert rank is not None and key is not None
        G = ggn(model, row.name, params, inputs, targets, chunk_size=chunk_size)
        res = eigsh(num_data * G, rank, key=key)
        if not isinstance(res.success, jax.core.Tracer) and not bool(res.success):
            warnings.warn(
                f"laplace(structure='lowrank'): eigsh did not converge ({res.message}); the "
                f"low-rank curvature uses its best Ritz pairs",
                RuntimeWarning,
                stacklevel=2,
            )
        curvature = (jnp.maximum(res.eigenvalues, 0), res.eigenvectors)
    return Laplace(
        model,
        params,
        prior,
        sigma,
        nll,
        curvature,
        likelihood=likelihood,
        structure=structure,
        num_data=num_data,
        num_outputs=num_outputs,
        chunk_size=chunk_size,
    )

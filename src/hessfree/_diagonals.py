"""Exact (and Monte-Carlo) diagonals of the GGN and the Fisher, by per-example backward passes.

The GGN of :func:`hessfree.ggn` is ``G = Σ_b J_bᵀ H_b J_b``, with ``J_b`` the Jacobian of example
b's outputs and ``H_b`` the output Hessian of the batch-mean loss (so it carries the 1/B). If
``H_b = Σ_k w_bk s_bk s_bkᵀ``, then ``diag(G) = Σ_b Σ_k w_bk (J_bᵀ s_bk)²`` (squares elementwise):
one vector-Jacobian product of one example per column ``s_bk``. The columns are a symmetric
factor of ``H_b`` in closed form for the built-in losses (see :mod:`hessfree._losses`), the
eigenvectors of ``H_b`` (weights its eigenvalues) for a callable loss, sampled output gradients
for the Monte-Carlo estimate and the observed ones for the empirical Fisher. The products run
over the columns and examples of a chunk at once (``vmap``) and over chunks in a ``lax.scan``,
so at most ``chunk_size × K × P`` numbers are in flight (K columns, P parameters).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _losses as losses
from . import _tree as tree
from ._model_curvature import (
    ChunkedJacobian,
    _check_model,
    _refuse_bad_targets,
    check_fisher_model,
    check_loss,
    fisher_settings,
)
from ._staging import staged
from ._validation import (
    PyTree,
    batch_size,
    check_choice,
    check_key,
    check_positive_int,
    check_scalar_fn,
)

METHODS = ("exact", "mc")
Model = Callable[..., Any]
# (one example's outputs, its data) -> (columns (K, *output shape), weights (K,))
Factor = Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]


# --- Σ_b Σ_k w_bk (J_bᵀ s_bk)², swept over the batch ----------------------------------------------


def _sum_over_examples(
    one: Callable[[PyTree], PyTree], data: PyTree, batch: int, zero: PyTree, chunk_size: int | None
) -> PyTree:
    """``Σ_b one(data_b)``: all examples at once, or `chunk_size` at a time in a scan."""

    def total(chunk: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda a: jnp.sum(a, axis=0), jax.vmap(one)(chunk))

    if chunk_size is None or chunk_size >= batch:
        return total(data)
    num = batch // chunk_size
    head = jax.tree_util.tree_map(
        lambda a: a[: num * chunk_size].reshape(num, chunk_size, *a.shape[1:]), data
    )

    def step(acc: PyTree, chunk: PyTree) -> tuple[PyTree, None]:
        return jax.tree_util.tree_map(jnp.add, acc, total(chunk)), None

    acc = jax.lax.scan(step, zero, head)[0]
    if batch % chunk_size:  # the remainder, one smaller chunk (no padding, no wasted passes)
        rest = total(jax.tree_util.tree_map(lambda a: a[num * chunk_size :], data))
        acc = jax.tree_util.tree_map(jnp.add, acc, rest)
    return acc


def _diagonal(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    data: PyTree,
    factor: Factor,
    chunk_size: int | None,
) -> PyTree:
    """``Σ_b Σ_k w_bk (J_bᵀ s_bk)²`` with ``(s_b, w_b) = factor(o_b, data_b)``, a pytree like params.

    Example b is run alone through the model (inputs sliced to a batch of one), so the model
    must treat examples independently, as the per-example gradient of any loss assumes.
    """
    batch = batch_size(inputs, "inputs")

    def one(example: tuple[PyTree, Any]) -> PyTree:
        x_b, d_b = example
        x_b = jax.tree_util.tree_map(lambda a: a[None], x_b)
        out, pull = jax.vjp(lambda p: model(p, x_b)[0], params)
        cols, weights = factor(out, d_b)
        grads = jax.vmap(pull)(cols.astype(out.dtype))[0]  # J_bᵀ s_bk for every column k
        return jax.tree_util.tree_map(
            lambda g: jnp.tensordot(weights.astype(g.dtype), g * g, axes=1), grads
        )

    return _sum_over_examples(one, (inputs, data), batch, tree.zeros_like(params), chunk_size)


def _outputs(model: Model, params: PyTree, inputs: PyTree, chunk_size: int | None) -> jax.Array:
    """The model's outputs on the whole batch (one forward pass, in chunks if asked)."""
    if chunk_size is None:
        return model(params, inputs)
    return ChunkedJacobian.build(model, params, inputs, chunk_size).outputs()


def _guard(ok: jax.Array, diag: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda d: losses.guarded(ok, d), diag)


# --- the factors ------------------------------------------------------------------------------


def _named_factor(row: losses.Loss, batch: int, with_targets: bool) -> Factor:
    """Closed-form ``S_b`` of the built-in loss, weights 1/B (the batch mean)."""

    def factor(out: jax.Array, target: Any) -> tuple[jax.Array, jax.Array]:
        cols = row.hessian_factor(out, target if with_targets else None)
        return cols, jnp.full(cols.shape[:1], 1 / batch, out.dtype)

    return factor


def _sampled_factor(batch: int, num_samples: int) -> Factor:
    """Output gradients ``r_bs`` (sampled or observed) as columns, weights ``1/(B S)``."""

    def factor(out: jax.Array, grads: jax.Array) -> tuple[jax.Array, jax.Array]:
        return grads, jnp.full((num_samples,), 1 / (batch * num_samples), out.dtype)

    return factor


def _autodiff_factor(loss: Callable[..., Any], outputs: jax.Array, targets: PyTree) -> Factor:
    """Eigenpairs of ``H_b = ∂²loss/∂o_b²`` (the other examples' outputs held fixed).

    Columns are the eigenvectors, weights the eigenvalues, signs kept: for a non-convex loss
    ``Σ_k λ_k (J_bᵀ v_k)²`` is still exactly the diagonal of ``J_bᵀ H_b J_b``.
    """
    size = int(np.prod(outputs.shape[1:], dtype=int))

    def factor(out: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
        del out

        def restricted(o: jax.Array) -> jax.Array:
            return loss(outputs.at[index].set(o), targets)

        hess = jax.hessian(restricted)(outputs[index]).reshape(size, size)
        eigenvalues, eigenvectors = jnp.linalg.eigh((hess + hess.T) / 2)
        return eigenvectors.T.reshape(size, *outputs.shape[1:]), eigenvalues

    return factor


# --- GGN --------------------------------------------------------------------------------------


def _ggn_diagonal_build(
    model: Model,
    loss: Any,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    key: Any,
    *,
    method: str,
    num_samples: int,
    chunk_size: int | None,
) -> tuple[PyTree, jax.Array]:
    outputs_struct = _check_model(model, params, inputs)
    batch = outputs_struct.shape[0]
    if not isinstance(loss, str):
        check_scalar_fn(loss, outputs_struct, (targets,), "loss")
        batch_size(inputs, "inputs")
        outputs = _outputs(model, params, inputs, chunk_size)
        factor = _autodiff_factor(loss, outputs, targets)
        diag = _diagonal(model, params, inputs, jnp.arange(batch), factor, chunk_size)
        return diag, jnp.ones((), bool)
    row = losses.get_loss(loss)
    losses.check_targets(row, outputs_struct, targets)
    batch_size(inputs, "inputs")
    ok = row.targets_ok(outputs_struct, targets)
    if method == "exact":
        factor = _named_factor(row, batch, with_targets=True)
        diag = _diagonal(model, params, inputs, targets, factor, chunk_size)
    else:
        outputs = _outputs(model, params, inputs, chunk_size)
        grads = losses.sampled_output_grads(row, outputs, key, num_samples)
        if row.name == "softmax_cross_entropy":  # unnormalized soft labels scale H_b (as in ggn)
            weight = jnp.sum(losses._probabilities(outputs, targets), axis=-1, keepdims=True)
            grads = grads * jnp.sqrt(weight)
        factor = _sampled_factor(batch, num_samples)
        diag = _diagonal(model, params, inputs, jnp.swapaxes(grads, 0, 1), factor, chunk_size)
    return _guard(ok, diag), ok


def ggn_diagonal(
    model: Model,
    loss: str | Callable[..., Any],
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    method: str = "exact",
    key: jax.Array | None = None,
    num_samples: int = 1,
    chunk_size: int | None = None,
) -> PyTree:
    """The diagonal of the GGN ``G = Σ_b J_bᵀ H_b J_b`` that :func:`hessfree.ggn` multiplies by.

    ``diag(G) = Σ_b Σ_k w_bk (J_bᵀ s_bk)²`` for ``H_b = Σ_k w_bk s_bk s_bkᵀ``: the output Hessian
    of the batch-mean loss at example b (so it includes the 1/B), written with K columns.

    - ``method="exact"``: for the built-in losses the columns are a closed-form symmetric
      factor, K = the number of outputs per example C: ``√p_c (e_c − p)`` for softmax
      cross-entropy (per position, class axis last), the identity for ``"mse"``,
      ``√(σ(1−σ)) e_c`` for sigmoid cross-entropy. For a callable loss, ``H_b`` is its Hessian
      in example b's outputs by autodiff (``jax.hessian`` with the other outputs fixed) and the
      columns its eigenvectors, weights the eigenvalues *with their signs*: for a non-convex
      loss, whose GGN is indefinite, the result is still exactly ``diag(G)`` (negative entries
      possible), not the diagonal of a clipped PSD surrogate.
    - ``method="mc"`` (built-in losses only): targets ``y_bs ~ p(y | o_b)`` sampled from the
      loss's likelihood, `num_samples` per example, and ``diag(G) ≈ (1/(B S)) Σ_{b,s}
      (J_bᵀ r_bs)²`` with ``r_bs = ∇_o ℓ(o_b, y_bs)``: unbiased, since ``E[r rᵀ] = B·H_b``.
      The same draws as ``fisher(kind="mc", key=key)``, so it is that operator's exact
      diagonal. The given `targets` are still checked (and weight soft labels as in ``ggn``).

    Cost: K vector-Jacobian products (backward passes) per example, batched over the columns
    and the examples of a chunk: ``B·K`` single-example backward passes for ``"exact"``
    (C per example), ``B·S`` for ``"mc"``. A callable loss adds, per example, its Hessian in
    the example's outputs (K Hessian-vector products of the whole loss) and a K×K ``eigh``;
    ``"mc"`` adds one forward pass of the batch. Memory: ``chunk_size × K × P`` (``B × K × P``
    without `chunk_size`). Compiled once per model, loss, settings and shapes.

    Each example is run through the model alone (a batch of one), so the model must treat
    the examples independently (no batch statistics), and a callable loss should be a sum or
    mean of per-example terms: cross-example blocks of its Hessian are not in the diagonal.

    Args:
        model: ``model(params, inputs) -> outputs``, one array with a leading batch axis B.
        loss: a built-in loss name (``"softmax_cross_entropy"``, ``"mse"``,
            ``"sigmoid_cross_entropy"``) or a callable ``loss(outputs, targets) -> scalar``.
        params: the parameters, any pytree of floating arrays.
        inputs: the model's inputs, every leaf with the leading axis B.
        targets: the loss's targets, as for :func:`hessfree.ggn` (checked when concrete;
            inside ``jit`` out-of-range targets make the diagonal NaN).
        method: ``"exact"`` (default) or ``"mc"``.
        key: a ``jax.random`` key, required for ``"mc"``; ignored otherwise.
        num_samples: sampled targets per example for ``"mc"`` (a static count).
        chunk_size: process this many examples at a time; None runs all B at once.

    Returns:
        A pytree like `params` (same dtypes).

    Raises:
        ValueError: unknown loss name or method; ``"mc"`` without a key or with a callable
            loss; targets of the wrong shape or out of range; inputs leaves without the
            common leading axis B; `loss` not scalar; bad `num_samples`/`chunk_size`.
        TypeError: `model`/`loss` not callable; non-floating parameters or outputs; a key
            that is not a ``jax.random`` key.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> model, p, t = (lambda p, x: x @ p), jnp.ones((2, 2)), jnp.zeros((3, 2))
        >>> d = hf.ggn_diagonal(model, "mse", p, x, t)
        >>> G = hf.ggn(model, "mse", p, x, t).to_dense()
        >>> bool(jnp.allclose(d.ravel(), jnp.diag(G)))
        True

    References:
        Dangel, Kunstner, Hennig, "BackPACK: packing more into backprop", ICLR 2020
        (DiagGGN, DiagGGNMC). Martens, "New insights and perspectives on the natural
        gradient method", JMLR 2020. Liu, Li, Hall, Liang, Ma, "Sophia: a scalable stochastic
        second-order optimizer for language model pre-training", 2023 (Gauss-Newton-Bartlett).
    """
    check_choice(method, METHODS, "method")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_loss(loss)
    if method == "mc":
        if not isinstance(loss, str):
            msg = (
                f"method='mc' samples targets from a built-in loss's likelihood; loss must be "
                f"one of {list(losses.LOSSES)} for it; got a callable (use method='exact')"
            )
            raise ValueError(msg)
        check_key(key, "ggn_diagonal(method='mc')", "sampling targets")
    else:
        key, num_samples = None, 1
    options = {"method": method, "num_samples": num_samples, "chunk_size": chunk_size}
    diag, ok = staged(_ggn_diagonal_build, model, loss, params, inputs, targets, key, **options)
    if isinstance(loss, str):
        _refuse_bad_targets(ok, targets, losses.get_loss(loss))
    return diag


# --- Fisher -----------------------------------------------------------------------------------


def _fisher_diagonal_build(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    key: Any,
    *,
    likelihood: str,
    kind: str,
    num_samples: int,
    chunk_size: int | None,
) -> tuple[PyTree, jax.Array]:
    row, outputs_struct = check_fisher_model(model, params, inputs, targets, likelihood, kind)
    batch = outputs_struct.shape[0]
    batch_size(inputs, "inputs")
    ok = jnp.ones((), bool)
    if kind == "exact":
        factor = _named_factor(row, batch, with_targets=False)
        return _diagonal(model, params, inputs, None, factor, chunk_size), ok
    if kind == "mc":
        outputs = _outputs(model, params, inputs, chunk_size)
        grads = jnp.swapaxes(losses.sampled_output_grads(row, outputs, key, num_samples), 0, 1)
        factor = _sampled_factor(batch, num_samples)
        return _diagonal(model, params, inputs, grads, factor, chunk_size), ok
    ok = row.targets_ok(outputs_struct, targets)

    def observed(out: jax.Array, target: jax.Array) -> tuple[jax.Array, jax.Array]:
        grad = row.output_grad(out[None], target[None])  # (1, *output shape): one column
        return grad, jnp.full((1,), 1 / batch, out.dtype)

    return _guard(ok, _diagonal(model, params, inputs, targets, observed, chunk_size)), ok


def fisher_diagonal(
    model: Model,
    params: PyTree,
    inputs: PyTree,
    *,
    likelihood: str,
    kind: str = "exact",
    targets: PyTree = None,
    key: jax.Array | None = None,
    num_samples: int = 1,
    chunk_size: int | None = None,
) -> PyTree:
    """The diagonal of the Fisher that :func:`hessfree.fisher` multiplies by, same arguments.

    ``diag(F) = (1/B) Σ_b E_{y ~ p(y|o_b)}[(J_bᵀ r_b)²]``, ``r_b = ∇_o −log p(y|o_b)``:

    - ``kind="exact"``: the output Fisher's closed-form symmetric factor (as
      :func:`ggn_diagonal` of the matching loss, without targets): C backward passes per
      example.
    - ``kind="mc"``: `num_samples` labels per example drawn from `key` exactly as
      ``fisher(kind="mc")`` draws them, so the result is that operator's diagonal and an
      unbiased estimate of the exact one: S backward passes per example.
    - ``kind="empirical"``: ``(1/B) Σ_b g_b²`` with ``g_b`` the per-example gradient of the
      loss at the given `targets` (the mean of squared per-example gradients): one backward
      pass per example. Not the Fisher's diagonal in general (Kunstner et al. 2019).

    Memory ``chunk_size × K × P`` (K the passes per example; ``B × K × P`` without
    `chunk_size`); the model must treat examples independently (each is run alone).

    Args:
        model: ``model(params, inputs) -> outputs`` (logits, means or Bernoulli logits).
        params: the parameters, any pytree of floating arrays.
        inputs: the model's inputs, every leaf with the leading axis B.
        likelihood: ``"categorical"``, ``"gaussian"`` (unit variance) or ``"bernoulli"``.
        kind: ``"exact"`` (default), ``"mc"`` or ``"empirical"``.
        targets: required for ``"empirical"``; ignored otherwise.
        key: a ``jax.random`` key, required for ``"mc"``; ignored otherwise.
        num_samples: samples per example for ``"mc"`` (a static count).
        chunk_size: process this many examples at a time; None runs all B at once.

    Returns:
        A pytree like `params` (same dtypes), entries ≥ 0.

    Raises:
        ValueError: as :func:`hessfree.fisher` (unknown likelihood or kind, missing targets
            or key, target shapes or values), and inputs leaves without the leading axis B.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> model, p = (lambda p, x: x @ p), jnp.array([[0.1, -0.2], [0.3, 0.0]])
        >>> d = hf.fisher_diagonal(model, p, x, likelihood="categorical")
        >>> F = hf.fisher(model, p, x, likelihood="categorical").to_dense()
        >>> bool(jnp.allclose(d.ravel(), jnp.diag(F)))
        True

    References:
        Dangel, Kunstner, Hennig, "BackPACK: packing more into backprop", ICLR 2020.
        Martens, "New insights and perspectives on the natural gradient method", JMLR 2020.
        Kunstner, Balles, Hennig, "Limitations of the empirical Fisher approximation for
        natural gradient descent", NeurIPS 2019.
    """
    row, targets, key, num_samples = fisher_settings(
        "fisher_diagonal", likelihood, kind, targets, key, num_samples, chunk_size
    )
    options = {
        "likelihood": likelihood,
        "kind": kind,
        "num_samples": num_samples,
        "chunk_size": chunk_size,
    }
    diag, ok = staged(_fisher_diagonal_build, model, params, inputs, targets, key, **options)
    if kind == "empirical":
        _refuse_bad_targets(ok, targets, row)
    return diag

"""Output-space curvature of the built-in losses, in closed form, and their likelihoods' samplers.

A built-in loss is a mean over the leading (batch) axis of a per-example loss that sums over
every other position of the example:

- ``"softmax_cross_entropy"``: ``ℓ_b = Σ_t −⟨y_bt, log softmax(o_bt)⟩`` over the last (class)
  axis; targets are integer labels (shape ``outputs.shape[:-1]``) or probabilities (shape of
  the outputs). Likelihood ``"categorical"``.
- ``"mse"``: ``ℓ_b = 0.5 ‖o_b − y_b‖²``, the Gaussian negative log-likelihood with unit variance
  up to a constant. Likelihood ``"gaussian"``.
- ``"sigmoid_cross_entropy"``: ``ℓ_b = Σ softplus(o_b) − y_b o_b``, targets in [0, 1]. Likelihood
  ``"bernoulli"``.

For each, the Hessian with respect to the outputs is known in closed form (no autodiff of the
loss): ``(diag p − p pᵀ)`` per class axis (times ``Σ y`` for unnormalized soft labels), the
identity, and ``diag σ(o)(1 − σ(o))``, each divided by the batch size B. These are the cheap
middle factor of the generalized Gauss-Newton ``Jᵀ H_L J``. A callable loss gets its output
Hessian by autodiff instead (:func:`autodiff_output_hessian`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from ._validation import PyTree, check_choice, describe_tree

LOSSES = ("softmax_cross_entropy", "mse", "sigmoid_cross_entropy")
LIKELIHOODS = {
    "categorical": "softmax_cross_entropy",
    "gaussian": "mse",
    "bernoulli": "sigmoid_cross_entropy",
}


def check_outputs_for(loss: str, outputs: Any) -> None:
    """Raise unless `loss` is a built-in name whose outputs fit `outputs` (logits need a class axis)."""
    check_choice(loss, LOSSES, "loss")
    out_shape = tuple(np.shape(outputs))
    if loss == "softmax_cross_entropy" and len(out_shape) < 2:
        msg = f"loss {loss!r} needs outputs (logits) of shape (B, ..., C); got shape {out_shape}"
        raise ValueError(msg)


def check_targets(loss: str, outputs: Any, targets: Any, name: str = "targets") -> None:
    """Raise unless `targets` fit the outputs of built-in `loss` (shapes and dtypes, statically)."""
    check_outputs_for(loss, outputs)
    if targets is None:
        msg = f"{name} must be given for loss {loss!r}; got None"
        raise ValueError(msg)
    out_shape = tuple(np.shape(outputs))
    t_shape = tuple(np.shape(targets))
    t_dtype = jnp.result_type(targets)
    if loss == "softmax_cross_entropy":
        if jnp.issubdtype(t_dtype, jnp.integer):
            expected = out_shape[:-1]
            what = "integer labels"
        elif jnp.issubdtype(t_dtype, jnp.floating):
            expected = out_shape
            what = "probabilities"
        else:
            msg = f"{name} for loss {loss!r} must be integer labels or float probabilities; got dtype {t_dtype}"
            raise TypeError(msg)
        if t_shape != expected:
            msg = (
                f"{name} as {what} must have shape {expected} for outputs of shape {out_shape} "
                f"(loss {loss!r}); got shape {t_shape}"
            )
            raise ValueError(msg)
        return
    if not (jnp.issubdtype(t_dtype, jnp.floating) or jnp.issubdtype(t_dtype, jnp.integer)):
        msg = f"{name} for loss {loss!r} must be real numbers; got dtype {t_dtype}"
        raise TypeError(msg)
    if t_shape != out_shape:
        msg = f"{name} must have the shape of the outputs {out_shape} for loss {loss!r}; got shape {t_shape}"
        raise ValueError(msg)


def _sum_nonbatch(x: jax.Array, keepdims: bool = False) -> jax.Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=keepdims)


def _as_probabilities(outputs: jax.Array, targets: jax.Array) -> jax.Array:
    if targets.ndim == outputs.ndim - 1:
        return jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
    return jnp.asarray(targets, outputs.dtype)


def loss_value(loss: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """The built-in `loss` ``(1/B) Σ_b ℓ(o_b, y_b)``; used for references and benchmarks."""
    batch = outputs.shape[0]
    if loss == "softmax_cross_entropy":
        y = _as_probabilities(outputs, targets)
        return -jnp.sum(y * jax.nn.log_softmax(outputs, axis=-1)) / batch
    y = jnp.asarray(targets, outputs.dtype)
    if loss == "mse":
        return 0.5 * jnp.sum((outputs - y) ** 2) / batch
    return jnp.sum(jax.nn.softplus(outputs) - y * outputs) / batch


def output_grad(loss: str, outputs: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example gradients ``r_b = ∂ℓ_b/∂o_b`` (shape of `outputs`, not divided by B).

    ``s p − y`` (with ``s = Σ_c y_c``), ``o − y`` and ``σ(o) − y`` for the three losses.
    """
    if loss == "softmax_cross_entropy":
        y = _as_probabilities(outputs, targets)
        p = jax.nn.softmax(outputs, axis=-1)
        return jnp.sum(y, axis=-1, keepdims=True) * p - y
    y = jnp.asarray(targets, outputs.dtype)
    if loss == "mse":
        return outputs - y
    return jax.nn.sigmoid(outputs) - y


def output_hessian_mv(
    loss: str, outputs: jax.Array, targets: jax.Array | None, u: jax.Array
) -> jax.Array:
    """``H_L u``, the Hessian of the batch-mean built-in `loss` w.r.t. the outputs, times `u`.

    Closed form, O(size of the outputs): softmax ``s (p ⊙ u − p ⟨p, u⟩) / B`` per class axis,
    mse ``u / B``, sigmoid ``σ(o)(1 − σ(o)) u / B``. With ``targets=None`` the targets are
    taken as normalized (s = 1), which is the Fisher of the matching likelihood.
    """
    batch = outputs.shape[0]
    u = jnp.asarray(u, outputs.dtype)
    if loss == "softmax_cross_entropy":
        p = jax.nn.softmax(outputs, axis=-1)
        hu = p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)
        if targets is not None:
            hu = jnp.sum(_as_probabilities(outputs, targets), axis=-1, keepdims=True) * hu
        return hu / batch
    if loss == "mse":
        return u / batch
    s = jax.nn.sigmoid(outputs)
    return s * (1 - s) * u / batch


def closed_form_output_hessian(loss: str, outputs: jax.Array, targets: jax.Array | None) -> Partial:
    """``u -> H_L u`` for a built-in loss as a pytree-function (its arrays are children)."""
    return Partial(_NamedHessian(loss), outputs, targets)


class _NamedHessian:
    # A hashable, comparable function object, so equal losses share jit caches.
    def __init__(self, loss: str) -> None:
        self.loss = loss

    def __call__(self, outputs: jax.Array, targets: jax.Array | None, u: jax.Array) -> jax.Array:
        return output_hessian_mv(self.loss, outputs, targets, u)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _NamedHessian) and other.loss == self.loss

    def __hash__(self) -> int:
        return hash((_NamedHessian, self.loss))


def autodiff_output_hessian(
    loss: Callable[..., Any], outputs: jax.Array, targets: PyTree
) -> Callable[[jax.Array], jax.Array]:
    """``u -> ∇²_o loss(o, targets) u`` by ``jax.linearize`` of the output gradient (linearized once)."""
    return jax.linearize(lambda o: jax.grad(loss)(o, targets), outputs)[1]


def sample_targets(
    likelihood: str, outputs: jax.Array, key: jax.Array, num_samples: int
) -> jax.Array:
    """``num_samples`` draws per example from the model's predictive; shape ``(S, *labels)``.

    categorical: labels ``~ softmax(o)`` over the last axis; gaussian: ``o + ε``, ``ε ~ N(0, I)``;
    bernoulli: ``y ~ Bernoulli(σ(o))`` (as floats in the outputs' dtype).
    """
    outputs = jax.lax.stop_gradient(outputs)
    if likelihood == "categorical":
        return jax.random.categorical(
            key, outputs, axis=-1, shape=(num_samples, *outputs.shape[:-1])
        )
    shape = (num_samples, *outputs.shape)
    if likelihood == "gaussian":
        return outputs + jax.random.normal(key, shape, outputs.dtype)
    return jax.random.bernoulli(key, jax.nn.sigmoid(outputs), shape).astype(outputs.dtype)


def sampled_output_grads(
    likelihood: str, outputs: jax.Array, key: jax.Array, num_samples: int
) -> jax.Array:
    """Per-example output gradients of the NLL at sampled labels, shape ``(S, *outputs.shape)``.

    Their outer products average to the output Fisher: ``E[r rᵀ] = H_L · B`` per example.
    """
    loss = LIKELIHOODS[likelihood]
    samples = sample_targets(likelihood, outputs, key, num_samples)
    return jax.vmap(lambda y: output_grad(loss, outputs, y))(samples)


def outer_product_mv(grads: jax.Array, u: jax.Array) -> jax.Array:
    """``(1/(B S)) Σ_{s,b} r_sb ⟨r_sb, u_b⟩`` for output gradients `grads` of shape ``(S, B, …)``.

    The output-space middle factor of the MC and empirical Fisher; O(S × size of the outputs).
    """
    num_samples, batch = grads.shape[0], grads.shape[1]
    u = jnp.asarray(u, grads.dtype)
    coeff = jax.vmap(lambda r: _sum_nonbatch(r * u, keepdims=True))(grads)
    return jnp.sum(grads * coeff, axis=0) / (batch * num_samples)


def check_model_outputs(outputs: Any, inputs: PyTree) -> None:
    """Raise unless the model returns one floating array whose leading axis is the inputs' batch."""
    if not hasattr(outputs, "shape") or not hasattr(outputs, "dtype"):
        msg = f"model must return one array of outputs of shape (B, ...); got {describe_tree(outputs)}"
        raise TypeError(msg)
    if not jnp.issubdtype(outputs.dtype, jnp.floating):
        msg = f"model outputs must be floating-point; got dtype {outputs.dtype}"
        raise TypeError(msg)
    if len(outputs.shape) == 0:
        msg = "model outputs must have a leading batch axis, shape (B, ...); got shape ()"
        raise ValueError(msg)
    sizes = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(inputs) if np.ndim(leaf) > 0}
    if len(sizes) == 1 and outputs.shape[0] not in sizes:
        msg = (
            f"model outputs must have the batch axis of inputs first: inputs have leading size "
            f"{sizes.pop()}, outputs have shape {tuple(outputs.shape)}. Does the model map a single "
            f"example? Batch it, e.g. with jax.vmap(model, in_axes=(None, 0))."
        )
        raise ValueError(msg)

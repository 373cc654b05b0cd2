"""The built-in losses and their likelihoods, as one table.

A built-in loss is a mean over the leading (batch) axis of a per-example loss that sums over
every other position of the example:

====================== ============ ================================================ ============
loss                    likelihood   per-example ``ℓ_b``                              targets
====================== ============ ================================================ ============
softmax_cross_entropy   categorical  ``Σ_t −⟨y_bt, log softmax(o_bt)⟩`` (last axis C)  labels in
                                                                                      [0, C) or
                                                                                      probabilities
mse                     gaussian     ``½‖o_b − y_b‖²`` (unit variance)                real
sigmoid_cross_entropy   bernoulli    ``Σ softplus(o_b) − y_b o_b``                    in [0, 1]
====================== ============ ================================================ ============

Each row gives: the value, the per-example output gradient ``r_b = ∂ℓ_b/∂o_b``, the product
with the output Hessian of the batch-mean loss in closed form (``(diag p − p pᵀ)`` per class
axis, the identity, ``diag σ(1 − σ)``, each over B), a symmetric factor of one example's output
Hessian (``S Sᵀ = ∇²ℓ_b``, for exact Hessian diagonals), a sampler of the likelihood and the
static and value checks of targets. A callable loss gets its output Hessian by autodiff.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._validation import PyTree, check_choice, describe_tree

Array = jax.Array


def _sum_nonbatch(x: Array, keepdims: bool = False) -> Array:
    return jnp.sum(x, axis=tuple(range(1, x.ndim)), keepdims=keepdims)


def _column_scale(x: Array) -> Array:
    """``x`` (one example's output shape) as one scale per factor column, ``(K, 1, …, 1)``."""
    return x.reshape(x.size, *(1,) * x.ndim)


# --- softmax cross-entropy / categorical -------------------------------------------------------


def _probabilities(outputs: Array, targets: Array) -> Array:
    if targets.ndim == outputs.ndim - 1:
        return jax.nn.one_hot(targets, outputs.shape[-1], dtype=outputs.dtype)
    return jnp.asarray(targets, outputs.dtype)


def _softmax_value(outputs: Array, targets: Array) -> Array:
    y = _probabilities(outputs, targets)
    return -jnp.sum(y * jax.nn.log_softmax(outputs, axis=-1)) / outputs.shape[0]


def _softmax_grad(outputs: Array, targets: Array) -> Array:
    y = _probabilities(outputs, targets)
    return jnp.sum(y, axis=-1, keepdims=True) * jax.nn.softmax(outputs, axis=-1) - y


def _softmax_hessian_mv(outputs: Array, targets: Array | None, u: Array) -> Array:
    p = jax.nn.softmax(outputs, axis=-1)
    u = jnp.asarray(u, outputs.dtype)
    hu = p * u - p * jnp.sum(p * u, axis=-1, keepdims=True)
    if targets is not None:  # unnormalized soft labels scale the Hessian by Σ y
        hu = jnp.sum(_probabilities(outputs, targets), axis=-1, keepdims=True) * hu
    return hu / outputs.shape[0]


def _softmax_factor(output: Array, target: Array | None) -> Array:
    """Columns ``s_tc = √(w_t p_tc) (e_tc − p_t)`` at each position t (zero elsewhere).

    ``Σ_c s_tc s_tcᵀ = w_t (diag p_t − p_t p_tᵀ)`` since ``Σ_c p_tc = 1``; ``w_t = Σ_c y_tc`` is
    1 for labels and normalized probabilities (the Hessian of unnormalized soft labels scales).
    """
    p = jax.nn.softmax(output, axis=-1)
    size = output.size
    eye = jnp.eye(size, dtype=output.dtype).reshape(size, *output.shape)
    at = jnp.sum(eye, axis=-1, keepdims=True)  # (K, …, 1): 1 at the column's position t
    scale = p
    if target is not None:
        weight = jnp.sum(_probabilities(output, target), axis=-1, keepdims=True)
        scale = p * weight
    return _column_scale(jnp.sqrt(scale)) * (eye - at * p[None])


def _categorical_sample(key: Array, outputs: Array, num_samples: int) -> Array:
    return jax.random.categorical(key, outputs, axis=-1, shape=(num_samples, *outputs.shape[:-1]))


def _softmax_targets_ok(outputs: Any, targets: Any, xp: Any = jnp) -> Any:
    if targets.ndim == len(outputs.shape) - 1:
        return xp.all((targets >= 0) & (targets < outputs.shape[-1]))
    total = xp.sum(targets, axis=-1)
    return xp.all(targets >= 0) & xp.all(xp.abs(total - 1) <= 1e-3)


# --- mse / gaussian --------------------------------------------------------------------------------


def _mse_value(outputs: Array, targets: Array) -> Array:
    return 0.5 * jnp.sum((outputs - jnp.asarray(targets, outputs.dtype)) ** 2) / outputs.shape[0]


def _mse_grad(outputs: Array, targets: Array) -> Array:
    return outputs - jnp.asarray(targets, outputs.dtype)


def _mse_hessian_mv(outputs: Array, targets: Array | None, u: Array) -> Array:
    del targets
    return jnp.asarray(u, outputs.dtype) / outputs.shape[0]


def _identity_factor(output: Array, target: Array | None) -> Array:
    del target
    size = output.size
    return jnp.eye(size, dtype=output.dtype).reshape(size, *output.shape)


def _gaussian_sample(key: Array, outputs: Array, num_samples: int) -> Array:
    return outputs + jax.random.normal(key, (num_samples, *outputs.shape), outputs.dtype)


def _finite_targets(outputs: Any, targets: Any, xp: Any = jnp) -> Any:
    del outputs
    return xp.all(xp.isfinite(targets))


# --- sigmoid cross-entropy / bernoulli ----------------------------------------------------------


def _sigmoid_value(outputs: Array, targets: Array) -> Array:
    y = jnp.asarray(targets, outputs.dtype)
    return jnp.sum(jax.nn.softplus(outputs) - y * outputs) / outputs.shape[0]


def _sigmoid_grad(outputs: Array, targets: Array) -> Array:
    return jax.nn.sigmoid(outputs) - jnp.asarray(targets, outputs.dtype)


def _sigmoid_hessian_mv(outputs: Array, targets: Array | None, u: Array) -> Array:
    del targets
    s = jax.nn.sigmoid(outputs)
    return s * (1 - s) * jnp.asarray(u, outputs.dtype) / outputs.shape[0]


def _sigmoid_factor(output: Array, target: Array | None) -> Array:
    del target
    s = jax.nn.sigmoid(output)
    return _column_scale(jnp.sqrt(s * (1 - s))) * _identity_factor(output, None)


def _bernoulli_sample(key: Array, outputs: Array, num_samples: int) -> Array:
    shape = (num_samples, *outputs.shape)
    return jax.random.bernoulli(key, jax.nn.sigmoid(outputs), shape).astype(outputs.dtype)


def _unit_interval_targets(outputs: Any, targets: Any, xp: Any = jnp) -> Any:
    del outputs
    return xp.all((targets >= 0) & (targets <= 1))


# --- the table ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Loss:
    """One row of the table: a built-in loss and its likelihood."""

    name: str
    likelihood: str
    value: Callable[[Array, Array], Array]
    output_grad: Callable[[Array, Array], Array]
    hessian_mv: Callable[[Array, Array | None, Array], Array]
    sample: Callable[[Array, Array, int], Array]
    targets_ok: Callable[..., Any]  # (outputs or their structure, targets, xp=jnp) -> bool
    targets_doc: str
    # (one example's output o, its target or None) -> S of shape (K, *o.shape), K = o.size,
    # with Σ_k S_k S_kᵀ = ∇²_o ℓ_b(o) (per example, not divided by B): a symmetric factor.
    hessian_factor: Callable[[Array, Array | None], Array]
    # the absolute rounding of one example's loss, in units of eps: a cross-entropy is a log of
    # a sum >= 1, resolved to about eps however small the loss is; a squared error's rounding
    # is relative to it (0 here)
    rounding_unit: float


LOSSES: dict[str, Loss] = {
    loss.name: loss
    for loss in (
        Loss(
            "softmax_cross_entropy",
            "categorical",
            _softmax_value,
            _softmax_grad,
            _softmax_hessian_mv,
            _categorical_sample,
            _softmax_targets_ok,
            "integer labels in [0, C) or probabilities (nonnegative, summing to 1 over the last axis)",
            _softmax_factor,
            1.0,
        ),
        Loss(
            "mse",
            "gaussian",
            _mse_value,
            _mse_grad,
            _mse_hessian_mv,
            _gaussian_sample,
            _finite_targets,
            "finite real numbers",
            _identity_factor,
            0.0,
        ),
        Loss(
            "sigmoid_cross_entropy",
            "bernoulli",
            _sigmoid_value,
            _sigmoid_grad,
            _sigmoid_hessian_mv,
            _bernoulli_sample,
            _unit_interval_targets,
            "numbers in [0, 1]",
            _sigmoid_factor,
            1.0,
        ),
    )
}
LIKELIHOODS: dict[str, Loss] = {loss.likelihood: loss for loss in LOSSES.values()}


def get_loss(name: Any) -> Loss:
    """The row of a built-in loss name (ValueError naming the choices otherwise)."""
    return LOSSES[check_choice(name, tuple(LOSSES), "loss")]


def get_likelihood(name: Any) -> Loss:
    """The row of a likelihood name (ValueError naming the choices otherwise)."""
    return LIKELIHOODS[check_choice(name, tuple(LIKELIHOODS), "likelihood")]


# --- checks -----------------------------------------------------------------------------------------


def check_outputs_for(loss: Loss, outputs: Any) -> None:
    """Raise unless the outputs fit `loss` (logits need a class axis)."""
    out_shape = tuple(np.shape(outputs))
    if loss.name == "softmax_cross_entropy" and len(out_shape) < 2:
        msg = (
            f"loss {loss.name!r} needs outputs (logits) of shape (B, ..., C); got shape {out_shape}"
        )
        raise ValueError(msg)


def check_targets(loss: Loss, outputs: Any, targets: Any, name: str = "targets") -> None:
    """Raise unless `targets` fit the outputs of `loss` (shapes and dtypes, statically).

    Values are checked by the operators: concrete out-of-range targets raise after the build
    (one scalar read); inside ``jit`` the products turn NaN, so solvers report non-finite.
    """
    check_outputs_for(loss, outputs)
    if targets is None:
        msg = f"{name} must be given for loss {loss.name!r}; got None"
        raise ValueError(msg)
    if not hasattr(targets, "shape") or not hasattr(targets, "dtype"):
        msg = f"{name} must be an array; got {describe_tree(targets)}"
        raise TypeError(msg)
    out_shape, t_shape = tuple(np.shape(outputs)), tuple(np.shape(targets))
    t_dtype = jnp.result_type(targets)
    integer, floating = jnp.issubdtype(t_dtype, jnp.integer), jnp.issubdtype(t_dtype, jnp.floating)
    if not (integer or floating):
        msg = f"{name} for loss {loss.name!r} must be {loss.targets_doc}; got dtype {t_dtype}"
        raise TypeError(msg)
    expected = out_shape[:-1] if loss.name == "softmax_cross_entropy" and integer else out_shape
    if t_shape != expected:
        what = "integer labels" if integer and loss.name == "softmax_cross_entropy" else "targets"
        if floating and loss.name == "softmax_cross_entropy":
            what = "probabilities"
        msg = (
            f"{name} as {what} must have shape {expected} for outputs of shape {out_shape} "
            f"(loss {loss.name!r}); got shape {t_shape}"
        )
        raise ValueError(msg)


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


# --- output-space middle factors ------------------------------------------------------------------


def guarded(ok: Array, out: Array) -> Array:
    """`out`, or NaN everywhere when `ok` is False (invalid targets seen inside jit)."""
    return jnp.where(ok, out, jnp.nan)


def sampled_output_grads(loss: Loss, outputs: Array, key: Array, num_samples: int) -> Array:
    """Output gradients of the NLL at labels sampled from the predictive: ``(S, *outputs.shape)``.

    Their outer products average to the output Fisher: ``E[r rᵀ] = B · H_L`` per example.
    """
    outputs = jax.lax.stop_gradient(outputs)
    samples = loss.sample(key, outputs, num_samples)
    return jax.vmap(lambda y: loss.output_grad(outputs, y))(samples)


def outer_product_mv(grads: Array, u: Array) -> Array:
    """``(1/(B S)) Σ_{s,b} r_sb ⟨r_sb, u_b⟩`` for output gradients of shape ``(S, B, …)``.

    The output-space middle factor of the MC and empirical Fisher; O(S × size of outputs).
    """
    num_samples, batch = grads.shape[0], grads.shape[1]
    u = jnp.asarray(u, grads.dtype)
    coeff = jax.vmap(lambda r: _sum_nonbatch(r * u, keepdims=True))(grads)
    return jnp.sum(grads * coeff, axis=0) / (batch * num_samples)


@dataclasses.dataclass(frozen=True)
class AutodiffOutputHessian:
    """``(outputs, targets, u) -> ∇²_o loss(o, targets) u`` for a callable loss (jvp of grad)."""

    loss: Callable[..., Any]

    def __call__(self, outputs: Array, targets: PyTree, u: Array) -> Array:
        grad = jax.grad(self.loss)
        return jax.jvp(lambda o: grad(o, targets), (outputs,), (jnp.asarray(u, outputs.dtype),))[1]

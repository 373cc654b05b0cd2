"""The generalized Gauss-Newton and the Fisher of a model: ``Jᵀ M J``, matrix-free.

J is the Jacobian of the model outputs with respect to the parameters and M an output-space
matrix: the loss Hessian (closed form for the built-in losses of :mod:`hessfree._losses`, by
autodiff for a callable), or an average of outer products of output gradients (MC and
empirical Fisher). J is linearized once per operator and kept as residual leaves; ``Jᵀ`` is
its transpose (``jax.linear_transpose``), reusing the same residuals. With ``chunk_size`` the
batch is swept in chunks instead, holding one chunk's activations at a time. Operators are
built by one staged (compiled once) program per model, loss and shapes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from . import _losses as losses
from . import _tree as tree
from ._operators import CurvatureOperator
from ._staging import capture, staged
from ._validation import (
    PyTree,
    check_callable,
    check_choice,
    check_floating,
    check_key,
    check_positive_int,
    check_scalar_fn,
)

KINDS = ("exact", "mc", "empirical")
Model = Callable[..., Any]


# --- the model Jacobian, whole or in chunks ---------------------------------------------------


def _pad_batch(x: jax.Array, total: int) -> jax.Array:
    pad = [(0, total - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, mode="edge")


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class ChunkedJacobian:
    """``v -> J v`` and ``w -> Jᵀ w`` swept over the batch in chunks (nothing kept but inputs).

    The batch is cut into ``(num_chunks, chunk_size, …)``, the last chunk padded with copies
    of the last example whose outputs are dropped (and whose cotangents are zero).
    """

    model: Model
    batch: int
    params: PyTree
    chunks: PyTree

    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        return (self.params, self.chunks), (self.model, self.batch)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> ChunkedJacobian:
        return cls(aux[0], aux[1], *children)

    @classmethod
    def build(
        cls, model: Model, params: PyTree, inputs: PyTree, chunk_size: int
    ) -> ChunkedJacobian:
        batch = jax.eval_shape(model, params, inputs).shape[0]
        size = min(chunk_size, batch)
        num = -(-batch // size)
        chunks = jax.tree_util.tree_map(
            lambda x: _pad_batch(jnp.asarray(x), num * size).reshape(num, size, *np.shape(x)[1:]),
            inputs,
        )
        return cls(model, batch, params, chunks)

    def outputs(self) -> jax.Array:
        out = jax.lax.map(lambda x: self.model(self.params, x), self.chunks)
        return out.reshape(-1, *out.shape[2:])[: self.batch]

    def __call__(self, v: PyTree) -> jax.Array:
        def one(x: PyTree) -> jax.Array:
            return jax.jvp(lambda p: self.model(p, x), (self.params,), (v,))[1]

        out = jax.lax.map(one, self.chunks)
        return out.reshape(-1, *out.shape[2:])[: self.batch]

    def transpose(self, w: jax.Array, primal: PyTree) -> PyTree:
        del primal
        num, size = jax.tree_util.tree_leaves(self.chunks)[0].shape[:2]
        w = jnp.pad(w, [(0, num * size - self.batch)] + [(0, 0)] * (w.ndim - 1))
        w = w.reshape(num, size, *w.shape[1:])

        def step(acc: PyTree, chunk: tuple[PyTree, jax.Array]) -> tuple[PyTree, None]:
            x, wk = chunk
            g = jax.vjp(lambda p: self.model(p, x), self.params)[1](wk)[0]
            return jax.tree_util.tree_map(jnp.add, acc, g), None

        return jax.lax.scan(step, tree.zeros_like(self.params), (self.chunks, w))[0]


def model_jacobian(
    model: Model, params: PyTree, inputs: PyTree, chunk_size: int | None
) -> tuple[jax.Array, Any]:
    """``(outputs, J)`` with ``J(v) = J v`` and ``J.transpose(w, params) = Jᵀ w`` (call while tracing)."""
    if chunk_size is None:
        outputs, jvp = jax.linearize(lambda p: model(p, inputs), params)
        return outputs, capture(jvp, params, ("model", model), (params, inputs))
    jac = ChunkedJacobian.build(model, params, inputs, chunk_size)
    return jac.outputs(), jac


@dataclasses.dataclass(frozen=True)
class _Sandwich:
    """``(J, M, v) -> Jᵀ M J v``; holds the parameters' structure (static) for the transpose."""

    treedef: Any
    leaves: tuple[jax.ShapeDtypeStruct, ...]

    def __call__(self, jac: Any, middle: Callable[[jax.Array], jax.Array], v: PyTree) -> PyTree:
        primal = jax.tree_util.tree_unflatten(self.treedef, self.leaves)
        return jac.transpose(middle(jac(v)), primal)


def _operator(jac: Any, middle: Any, params: PyTree, label: str) -> CurvatureOperator:
    leaves, treedef = jax.tree_util.tree_flatten(tree.structure_of(params))
    matvec = Partial(_Sandwich(treedef, tuple(leaves)), jac, middle)
    return CurvatureOperator(matvec, params, label=label, psd=True)


@dataclasses.dataclass(frozen=True)
class _NamedMiddle:
    """``u -> H_L u`` of a built-in loss, NaN when the targets were out of range."""

    hessian_mv: Callable[..., jax.Array]

    def __call__(self, ok: jax.Array, outputs: jax.Array, targets: Any, u: jax.Array) -> jax.Array:
        return losses.guarded(ok, self.hessian_mv(outputs, targets, u))


def _check_model(model: Any, params: PyTree, inputs: PyTree) -> Any:
    check_callable(model, "model", "model(params, inputs)")
    check_floating(params, "params")
    outputs = jax.eval_shape(model, params, inputs)
    losses.check_model_outputs(outputs, inputs)
    return outputs


# --- GGN ------------------------------------------------------------------------------------


def _ggn_build(
    model: Model,
    loss: Any,
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    chunk_size: int | None,
) -> tuple[CurvatureOperator, jax.Array]:
    outputs_struct = _check_model(model, params, inputs)
    if isinstance(loss, str):
        row = losses.get_loss(loss)
        losses.check_targets(row, outputs_struct, targets)
    else:
        check_scalar_fn(loss, outputs_struct, (targets,), "loss")
    outputs, jac = model_jacobian(model, params, inputs, chunk_size)
    if isinstance(loss, str):
        row = losses.get_loss(loss)
        ok = row.targets_ok(outputs, targets)
        middle = Partial(_NamedMiddle(row.hessian_mv), ok, outputs, targets)
        label = f"ggn ({loss})"
    else:
        ok = jnp.ones((), bool)
        middle = Partial(losses.AutodiffOutputHessian(loss), outputs, targets)
        label = f"ggn ({getattr(loss, '__name__', 'callable')})"
    return _operator(jac, middle, params, label), ok


def check_loss(loss: Any) -> None:
    """A built-in loss's name (looked up now; shapes and target values while tracing) or a
    callable; anything else is a TypeError."""
    if isinstance(loss, str):
        losses.get_loss(loss)
    elif not callable(loss):
        msg = (
            f"loss must be a callable loss(outputs, targets) -> scalar or one of "
            f"{list(losses.LOSSES)}; got {type(loss).__name__}"
        )
        raise TypeError(msg)


def fisher_settings(
    caller: str,
    likelihood: str,
    kind: str,
    targets: Any,
    key: Any,
    num_samples: int,
    chunk_size: int | None,
) -> tuple[losses.Loss, Any, Any, int]:
    """The settings of a Fisher (``fisher``, ``fisher_diagonal``), checked:
    ``(likelihood row, targets, key, num_samples)`` with what `kind` ignores set to None / 1."""
    row = losses.get_likelihood(likelihood)
    check_choice(kind, KINDS, "kind")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if kind == "empirical":
        if targets is None:
            msg = (
                'targets must be given for kind="empirical" (gradients are taken at them); got None'
            )
            raise ValueError(msg)
    else:
        targets = None
    if kind == "mc":
        check_key(key, f"{caller}(kind='mc')", "sampling labels")
    else:
        key, num_samples = None, 1
    return row, targets, key, num_samples


def check_fisher_model(
    model: Any, params: PyTree, inputs: PyTree, targets: Any, likelihood: str, kind: str
) -> tuple[losses.Loss, Any]:
    """While tracing: ``(likelihood row, outputs structure)``, the model's outputs checked
    against the likelihood (and the targets, for the empirical Fisher)."""
    row = losses.get_likelihood(likelihood)
    outputs_struct = _check_model(model, params, inputs)
    if kind == "empirical":
        losses.check_targets(row, outputs_struct, targets)
    else:
        losses.check_outputs_for(row, outputs_struct)
    return row, outputs_struct


def _refuse_bad_targets(ok: jax.Array, targets: Any, loss: losses.Loss) -> None:
    """Outside jit (targets concrete), out-of-range targets raise now (one scalar read)."""
    if (
        not isinstance(targets, jax.core.Tracer)
        and not isinstance(ok, jax.core.Tracer)
        and not bool(ok)
    ):
        msg = f"targets for loss {loss.name!r} must be {loss.targets_doc}; got values out of range"
        raise ValueError(msg)


def ggn(
    model: Model,
    loss: str | Callable[..., Any],
    params: PyTree,
    inputs: PyTree,
    targets: PyTree,
    *,
    chunk_size: int | None = None,
) -> CurvatureOperator:
    """The generalized Gauss-Newton ``G = Jᵀ H_L J`` of ``loss(model(params, inputs), targets)``.

    J is the Jacobian of the outputs w.r.t. the parameters, ``H_L`` the Hessian of the loss
    w.r.t. the outputs: closed form for the built-in losses (``"softmax_cross_entropy"``,
    ``"mse"``, ``"sigmoid_cross_entropy"``, each a mean over the leading batch axis), by
    autodiff for a callable ``loss(outputs, targets) -> scalar``. G is positive semidefinite
    when ``H_L`` is (always, for the built-in losses).

    Cost: building linearizes the model once (one forward pass, residuals kept; compiled once
    per model, loss and shapes). Each product is one tangent pass (``J v``), the output-space
    ``H_L u`` and one transposed pass (``Jᵀ w``): about one forward plus one backward pass of
    the model, cheaper than a Hessian product. With `chunk_size`, nothing is kept and each
    product sweeps the batch twice in chunks, holding one chunk's activations.

    Args:
        model: ``model(params, inputs) -> outputs``, one array with a leading batch axis B.
        loss: a built-in loss name or a callable ``loss(outputs, targets) -> scalar``.
        params: the parameters, any pytree of floating arrays.
        inputs: the model's inputs (any pytree, leading axis B).
        targets: the loss's targets (integer labels or probabilities for softmax). Values
            are checked when concrete; inside ``jit`` out-of-range targets make the
            products NaN (so solvers report non-finite), never a silent number.
        chunk_size: process the batch this many examples at a time; None linearizes the
            whole batch once.

    Returns:
        A :class:`CurvatureOperator` with ``psd=True``.

    Raises:
        ValueError: unknown loss name; targets of the wrong shape or out of range; outputs
            without a batch axis; `loss` not scalar.
        TypeError: `model`/`loss` not callable; non-floating parameters or outputs.

    Example:
        >>> import jax.numpy as jnp
        >>> import hessfree as hf
        >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # B = 3 inputs
        >>> G = hf.ggn(lambda p, x: x @ p, "mse", jnp.ones((2, 2)), x, jnp.zeros((3, 2)))
        >>> bool(jnp.allclose(G.to_dense(), jnp.kron(x.T @ x / 3, jnp.eye(2))))  # (XᵀX/B) ⊗ I
        True

    References:
        Schraudolph, "Fast curvature matrix-vector products for second-order gradient
        descent", Neural Computation 2002. Martens, "New insights and perspectives on the
        natural gradient method", JMLR 2020.
    """
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    check_loss(loss)
    op, ok = staged(_ggn_build, model, loss, params, inputs, targets, chunk_size=chunk_size)
    if isinstance(loss, str):
        _refuse_bad_targets(ok, targets, losses.get_loss(loss))
    return op


# --- Fisher ---------------------------------------------------------------------------------


def _fisher_build(
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
) -> tuple[CurvatureOperator, jax.Array]:
    row, _ = check_fisher_model(model, params, inputs, targets, likelihood, kind)
    outputs, jac = model_jacobian(model, params, inputs, chunk_size)
    ok = jnp.ones((), bool)
    if kind == "exact":
        middle = Partial(_NamedMiddle(row.hessian_mv), ok, outputs, None)
    else:
        if kind == "mc":
            grads = losses.sampled_output_grads(row, outputs, key, num_samples)
        else:
            ok = row.targets_ok(outputs, targets)
            grads = losses.guarded(ok, row.output_grad(outputs, targets))[None]
        middle = Partial(losses.outer_product_mv, grads)
    return _operator(jac, middle, params, f"fisher ({kind}, {likelihood})"), ok


def fisher(
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
) -> CurvatureOperator:
    """The Fisher information of the model's predictive, averaged over the batch, as an operator.

    ``F = (1/B) Σ_b E_{y ~ p(y|o_b)}[g gᵀ]`` with ``g = ∇_θ −log p(y|o_b)``, ``o_b`` the outputs.

    - ``kind="exact"``: ``Jᵀ F_o J`` with the output Fisher in closed form; it equals the GGN of
      the matching loss ("categorical" ↔ "softmax_cross_entropy", "gaussian" ↔ "mse",
      "bernoulli" ↔ "sigmoid_cross_entropy"; Martens 2020, the canonical-link case).
    - ``kind="mc"``: labels sampled from the predictive, `num_samples` per input (fixed at
      build time from `key`): ``(1/(B S)) Σ_{b,s} J_bᵀ r_bs r_bsᵀ J_b`` with ``r_bs`` the output
      gradient of the sampled NLL. Unbiased for the exact Fisher; rank ≤ B·S.
    - ``kind="empirical"``: ``(1/B) Σ_b g_b g_bᵀ`` with ``g_b = J_bᵀ r_b`` the per-example
      gradient at the given `targets`. Not the Fisher in general (Kunstner et al. 2019).

    No B × P matrix is ever formed: the per-example gradients enter only through the output
    space, ``Jᵀ (r ⟨r, J v⟩)``. Cost per product, all kinds: one tangent pass and one
    transposed pass of the model (as :func:`ggn`), plus O(S × outputs). `num_samples` is a
    static count (a new count compiles a new build).

    Args:
        model: ``model(params, inputs) -> outputs`` (logits, means or Bernoulli logits).
        params: the parameters, any pytree of floating arrays.
        inputs: the model's inputs (leading axis B).
        likelihood: ``"categorical"``, ``"gaussian"`` (unit variance) or ``"bernoulli"``.
        kind: ``"exact"`` (default), ``"mc"`` or ``"empirical"``.
        targets: required for ``"empirical"``; ignored otherwise.
        key: a ``jax.random`` key, required for ``"mc"``; ignored otherwise.
        num_samples: samples per input for ``"mc"``.
        chunk_size: process the batch this many examples at a time; None linearizes once.

    Returns:
        A positive semidefinite :class:`CurvatureOperator`.

    Raises:
        ValueError: unknown likelihood or kind; targets missing (empirical) or out of range;
            key missing (mc); target shape mismatch; outputs without a batch axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import hessfree as hf
        >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> model, p = (lambda p, x: x @ p), jnp.ones((2, 2))
        >>> F = hf.fisher(model, p, x, likelihood="gaussian")
        >>> bool(jnp.allclose(F.to_dense(), hf.ggn(model, "mse", p, x, jnp.zeros((3, 2))).to_dense()))
        True

    References:
        Martens, "New insights and perspectives on the natural gradient method", JMLR 2020.
        Kunstner, Balles, Hennig, "Limitations of the empirical Fisher approximation for
        natural gradient descent", NeurIPS 2019.
    """
    row, targets, key, num_samples = fisher_settings(
        "fisher", likelihood, kind, targets, key, num_samples, chunk_size
    )
    options = {"likelihood": likelihood, "kind": kind, "num_samples": num_samples}
    op, ok = staged(
        _fisher_build, model, params, inputs, targets, key, chunk_size=chunk_size, **options
    )
    if kind == "empirical":
        _refuse_bad_targets(ok, targets, row)
    return op

"""Curvature operators: the Hessian, the generalized Gauss-Newton and the Fisher, matrix-free.

Each is a :class:`CurvatureOperator`, a registered pytree whose children are arrays (the
linearization residuals, the model outputs, sampled gradients, damping, scale) and whose aux
data is static configuration, so operators cross ``jit`` and ``vmap`` boundaries. Algorithms
only ever call ``mv`` / ``mm``.

The GGN and the Fishers share one shape, ``Jᵀ M J`` with J the Jacobian of the model outputs
with respect to the parameters and M an output-space matrix (the loss Hessian, or an average of
outer products of output gradients). J is linearized once per operator (``jax.linearize``) and
transposed (``jax.linear_transpose``) so ``Jᵀ`` reuses the same residuals; with ``chunk_size``
the batch is swept in chunks instead, holding one chunk's activations at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer
from jax.flatten_util import ravel_pytree
from jax.tree_util import Partial

from . import _losses
from ._linop import structure_of
from ._products import (
    Remat,
    cast_like,
    check_hvp_args,
    linearize_gradient,
    product_for,
    with_remat,
)
from ._validation import (
    PyTree,
    check_choice,
    check_floating,
    check_like,
    check_positive_int,
    check_scalar_fn,
)

DENSE_LIMIT = 10_000
KINDS = ("exact", "mc", "empirical")


def _concrete_sign(value: Any) -> float | None:
    """The sign of a scalar if it is known now (not traced), else None."""
    if isinstance(value, Tracer):
        return None
    return float(np.sign(np.asarray(value)))


def _check_scalar(value: Any, name: str) -> None:
    if isinstance(value, CurvatureOperator) or np.ndim(value) != 0:
        msg = f"{name} must be a scalar (python or 0-d array); got {type(value).__name__} of shape {np.shape(value)}"
        raise TypeError(msg)


def _scale_leaf(out: jax.Array, c: Any) -> jax.Array:
    return out * jnp.asarray(c, out.dtype)


@jax.tree_util.register_pytree_node_class
class CurvatureOperator:
    """A symmetric matrix-free operator ``v -> (c A + λ I) v`` on a parameter pytree.

    ``A v`` is `matvec`, a ``jax.tree_util.Partial`` (its arrays are pytree children); ``c`` is
    the scale and ``λ`` the damping, both scalars (None when unset). Build one with
    :func:`hessian`, :func:`ggn` or :func:`fisher`.

    Attributes:
        matvec: the undamped, unscaled product ``v -> A v`` (a pytree-function).
        kind: a short static label, e.g. ``"hessian"`` or ``"fisher (mc, categorical)"``.
        psd: whether the operator is known positive semidefinite (GGN, Fisher, and those
            damped by λ ≥ 0 or scaled by c ≥ 0; traced λ and c are assumed nonnegative).
        scale, damping: the scalars c and λ, or None.

    Example:
        >>> import jax.numpy as jnp
        >>> op = hessian(lambda x: jnp.sum(x**4) / 12, jnp.array([1.0, 2.0]))
        >>> (2 * op + 1.0).mv(jnp.ones(2)).tolist()
        [3.0, 9.0]
    """

    def __init__(
        self,
        matvec: Callable[[PyTree], PyTree],
        structure: PyTree,
        *,
        kind: str = "custom",
        psd: bool = False,
        scale: Any = None,
        damping: Any = None,
    ) -> None:
        if not callable(matvec):
            msg = f"matvec must be callable as matvec(v); got {type(matvec).__name__}"
            raise TypeError(msg)
        leaves, self._treedef = jax.tree_util.tree_flatten(structure_of(structure))
        self._leaves = tuple(leaves)
        self.matvec = matvec
        self.kind = kind
        self.psd = bool(psd)
        self.scale = scale
        self.damping = damping

    # --- pytree -------------------------------------------------------------------------
    def tree_flatten(self) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        children = (self.matvec, self.scale, self.damping)
        return children, (self._treedef, self._leaves, self.kind, self.psd)

    @classmethod
    def tree_unflatten(cls, aux: tuple[Any, ...], children: tuple[Any, ...]) -> CurvatureOperator:
        op = object.__new__(cls)
        op._treedef, op._leaves, op.kind, op.psd = aux
        op.matvec, op.scale, op.damping = children
        return op

    def _replace(self, **changes: Any) -> CurvatureOperator:
        children, aux = self.tree_flatten()
        op = CurvatureOperator.tree_unflatten(aux, children)
        for name, value in changes.items():
            setattr(op, name, value)
        return op

    # --- structure ----------------------------------------------------------------------
    def in_structure(self) -> PyTree:
        """A pytree of ``jax.ShapeDtypeStruct`` like the parameters (the vectors it acts on)."""
        return jax.tree_util.tree_unflatten(self._treedef, self._leaves)

    @property
    def shape(self) -> tuple[int, int]:
        """``(n, n)`` with n the total number of parameters."""
        n = sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in self._leaves)
        return (n, n)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the raveled parameters (their promoted dtype)."""
        return np.dtype(jnp.result_type(*self._leaves))

    def __repr__(self) -> str:
        extra = "".join(
            f", {name}=…" for name in ("scale", "damping") if getattr(self, name) is not None
        )
        return f"CurvatureOperator({self.kind}, shape={self.shape}, dtype={self.dtype}, psd={self.psd}{extra})"

    # --- products -----------------------------------------------------------------------
    def mv(self, v: PyTree) -> PyTree:
        """``(c A + λ I) v`` for a pytree `v` like the parameters; returns a pytree like them."""
        structure = self.in_structure()
        check_like(structure, v, "the operator's parameters", "v")
        return _apply(self, cast_like(v, structure))

    def __matmul__(self, v: PyTree) -> PyTree:
        return self.mv(v)

    def mm(self, vs: PyTree, chunk_size: int | None = None) -> PyTree:
        """Many products at once; every leaf of `vs` has a leading batch axis of size k.

        Vectorized with ``vmap`` (the linearization is shared, only tangents are batched); with
        `chunk_size`, ``chunk_size`` vectors at a time (``lax.map``), bounding memory.
        """
        structure = self.in_structure()
        check_like(structure, vs, "the operator's parameters", "vs", batched=True)
        check_positive_int(chunk_size, "chunk_size", allow_none=True)
        vs = cast_like(vs, structure)
        one = functools.partial(_apply, self)
        if chunk_size is None:
            return jax.vmap(one)(vs)
        return jax.lax.map(one, vs, batch_size=chunk_size)

    # --- algebra ------------------------------------------------------------------------
    def __add__(self, lam: Any) -> CurvatureOperator:
        """``A + λ I`` (damping) for a scalar λ, possibly traced."""
        if isinstance(lam, CurvatureOperator):
            return NotImplemented
        _check_scalar(lam, "damping λ")
        sign = _concrete_sign(lam)
        damping = lam if self.damping is None else self.damping + lam
        return self._replace(damping=damping, psd=self.psd and (sign is None or sign >= 0))

    __radd__ = __add__

    def __mul__(self, c: Any) -> CurvatureOperator:
        """``c A`` (scaling, damping scaled too) for a scalar c, possibly traced."""
        if isinstance(c, CurvatureOperator):
            return NotImplemented
        _check_scalar(c, "scale c")
        sign = _concrete_sign(c)
        scale = c if self.scale is None else self.scale * c
        damping = None if self.damping is None else self.damping * c
        return self._replace(
            scale=scale, damping=damping, psd=self.psd and (sign is None or sign >= 0)
        )

    __rmul__ = __mul__

    # --- export -------------------------------------------------------------------------
    def _flat(self) -> tuple[Callable[[jax.Array], jax.Array], int]:
        zeros = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), self.in_structure())
        _, unravel = ravel_pytree(zeros)
        return lambda x: ravel_pytree(_apply(self, unravel(x)))[0], self.shape[0]

    def to_dense(self, force: bool = False) -> jax.Array:
        """The ``(n, n)`` matrix, rows and columns in ``jax.flatten_util.ravel_pytree`` order.

        Costs n products (chunked, 128 at a time). Refuses above n = 10,000 unless `force`.
        """
        n = self.shape[0]
        if n > DENSE_LIMIT and not force:
            gib = n * n * self.dtype.itemsize / 2**30
            msg = (
                f"to_dense would build a {n:,} × {n:,} matrix ({gib:.1f} GiB) from {n:,} products; "
                f"the limit is n = {DENSE_LIMIT:,}. Pass force=True to build it anyway."
            )
            raise ValueError(msg)
        return _dense(self)

    def as_scipy(self) -> Any:
        """A ``scipy.sparse.linalg.LinearOperator`` on flat numpy vectors (ravel_pytree order).

        Usable by ``eigsh``, ``cg``, ``minres``. Products run jitted in the operator's dtype;
        inputs are cast to it (so float64 vectors work on a float32 operator).
        """
        try:
            from scipy.sparse.linalg import LinearOperator
        except ImportError as err:  # pragma: no cover - depends on the environment
            msg = "as_scipy() needs scipy: pip install scipy (or hessfree[bench])"
            raise ImportError(msg) from err
        # Ravel and unravel on the host: inside one XLA program, slicing a flat vector into
        # the parameters' shapes and concatenating the result made each product about 8x
        # slower on XLA:CPU (measured on the 1M-parameter MLP) than the pytree product.
        structure = self.in_structure()
        leaves, treedef = jax.tree_util.tree_flatten(structure)
        splits = np.cumsum([int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves])[:-1]
        dtype = self.dtype

        def to_tree(x: np.ndarray, batch: tuple[int, ...]) -> PyTree:
            parts = np.split(np.asarray(x), splits, axis=0)
            return jax.tree_util.tree_unflatten(
                treedef,
                [
                    jnp.asarray(np.moveaxis(part, 0, -1).reshape(*batch, *leaf.shape), leaf.dtype)
                    for part, leaf in zip(parts, leaves, strict=True)
                ],
            )

        def to_flat(tree: PyTree, batch: tuple[int, ...]) -> np.ndarray:
            flat = [
                np.asarray(leaf, dtype).reshape(*batch, -1)
                for leaf in jax.tree_util.tree_leaves(tree)
            ]
            return np.moveaxis(np.concatenate(flat, axis=-1), -1, 0)

        def matvec(x: np.ndarray) -> np.ndarray:
            return to_flat(_apply(self, to_tree(np.ravel(x), ())), ())

        def matmat(x: np.ndarray) -> np.ndarray:
            k = np.shape(x)[1]
            return to_flat(_apply_many(self, to_tree(x, (k,))), (k,))

        return LinearOperator(self.shape, matvec, matvec, matmat, dtype)  # pyright: ignore[reportCallIssue]

    def as_lineax(self) -> Any:
        """A ``lineax.FunctionLinearOperator``: symmetric, and positive semidefinite if `psd`."""
        try:
            import lineax as lx
        except ImportError as err:  # pragma: no cover - depends on the environment
            msg = "as_lineax() needs lineax: pip install lineax (or hessfree[lineax])"
            raise ImportError(msg) from err
        tags = [lx.symmetric_tag]
        if self.psd:
            tags.append(lx.positive_semidefinite_tag)
        return lx.FunctionLinearOperator(Partial(_apply, self), self.in_structure(), tags)


def _matvec(op: CurvatureOperator, v: PyTree) -> PyTree:
    out = op.matvec(v)
    if op.scale is not None:
        out = jax.tree_util.tree_map(functools.partial(_scale_leaf, c=op.scale), out)
    if op.damping is not None:
        out = jax.tree_util.tree_map(lambda o, x: o + jnp.asarray(op.damping, o.dtype) * x, out, v)
    return cast_like(out, v)


_apply = jax.jit(_matvec)


@jax.jit
def _apply_many(op: CurvatureOperator, vs: PyTree) -> PyTree:
    return jax.vmap(functools.partial(_matvec, op))(vs)


@jax.jit
def _dense(op: CurvatureOperator) -> jax.Array:
    flat_mv, n = op._flat()
    columns = jax.lax.map(flat_mv, jnp.eye(n, dtype=op.dtype), batch_size=min(n, 128))
    return columns.T


# --- Hessian --------------------------------------------------------------------------------


def hessian(
    f: Callable[..., Any],
    x: PyTree,
    *args: Any,
    cache: bool = True,
    mode: str = "auto",
    remat: Remat = False,
) -> CurvatureOperator:
    """The Hessian ``H = ∇²f(x)`` as an operator, ``v -> H v`` without forming H.

    With ``cache=True`` the gradient is linearized once, here (``jax.linearize``; residuals kept
    for the operator's lifetime, about one backward pass's worth), and each product costs one
    tangent pass, about 2/3 of an HVP. With ``cache=False`` nothing is kept and each product is
    a full HVP (one gradient plus one tangent pass).

    Args:
        f: scalar function ``f(x, *args)``.
        x: the point, any pytree of floating arrays.
        *args: further arguments of `f`, held fixed.
        cache: linearize once (default) or recompute every product.
        mode: the HVP mode, as in :func:`hessfree.hvp`.
        remat: run `f` under ``jax.checkpoint`` (True or a policy) so the cached
            linearization holds only what the policy saves; see :func:`hessfree.hvp_fn`.

    Returns:
        A symmetric, indefinite (``psd=False``) :class:`CurvatureOperator` on pytrees like `x`.

    Example:
        >>> import jax.numpy as jnp
        >>> A = jnp.array([[2.0, 1.0], [1.0, 3.0]])
        >>> H = hessian(lambda x, A: 0.5 * x @ A @ x, jnp.zeros(2), A)
        >>> bool(jnp.allclose(H.to_dense(), A)), bool(jnp.allclose((H + 1.0) @ jnp.ones(2), A.sum(1) + 1))
        (True, True)

    References:
        Pearlmutter, "Fast exact multiplication by the Hessian", Neural Computation 1994.
    """
    check_hvp_args(f, x, args, mode)
    f = with_remat(f, remat)
    if cache:
        _, matvec = linearize_gradient(f, x, args, mode)
    else:
        matvec = Partial(_UncachedHvp(f, mode), x, args)
    return CurvatureOperator(matvec, x, kind="hessian", psd=False)


class _UncachedHvp:
    # Static part of an uncached product: the function and the mode (compared by identity of f).
    def __init__(self, f: Callable[..., Any], mode: str) -> None:
        self.f, self.mode = f, mode

    def __call__(self, x: PyTree, args: tuple[Any, ...], v: PyTree) -> PyTree:
        return product_for(self.mode)(self.f, x, v, args)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _UncachedHvp) and (other.f, other.mode) == (self.f, self.mode)

    def __hash__(self) -> int:
        return hash((_UncachedHvp, id(self.f), self.mode))


# --- the model Jacobian ---------------------------------------------------------------------


def _sandwich(
    jvp: Callable[[PyTree], jax.Array],
    middle: Callable[[jax.Array], jax.Array],
    vjp: Callable[[jax.Array], PyTree],
    v: PyTree,
) -> PyTree:
    """``Jᵀ M J v``."""
    return vjp(middle(jvp(v)))


def _first(transpose: Callable[[jax.Array], tuple[PyTree]], w: jax.Array) -> PyTree:
    return transpose(w)[0]


def _pad_batch(x: jax.Array, total: int) -> jax.Array:
    pad = [(0, total - x.shape[0])] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, pad, mode="edge")


def _chunks(inputs: PyTree, batch: int, chunk_size: int) -> PyTree:
    """`inputs` as ``(num_chunks, chunk_size, …)``, the last chunk padded with the last example."""
    num = -(-batch // chunk_size)
    return jax.tree_util.tree_map(
        lambda x: _pad_batch(jnp.asarray(x), num * chunk_size).reshape(
            num, chunk_size, *np.shape(x)[1:]
        ),
        inputs,
    )


def _chunked_outputs(
    model: Callable[..., Any], batch: int, params: PyTree, chunks: PyTree
) -> jax.Array:
    out = jax.lax.map(lambda x: model(params, x), chunks)
    return out.reshape(-1, *out.shape[2:])[:batch]


def _chunked_jvp(
    model: Callable[..., Any], batch: int, params: PyTree, chunks: PyTree, v: PyTree
) -> jax.Array:
    out = jax.lax.map(lambda x: jax.jvp(lambda p: model(p, x), (params,), (v,))[1], chunks)
    return out.reshape(-1, *out.shape[2:])[:batch]


def _chunked_vjp(
    model: Callable[..., Any], batch: int, params: PyTree, chunks: PyTree, w: jax.Array
) -> PyTree:
    num, size = jax.tree_util.tree_leaves(chunks)[0].shape[:2]
    w = jnp.pad(w, [(0, num * size - batch)] + [(0, 0)] * (w.ndim - 1)).reshape(
        num, size, *w.shape[1:]
    )

    def step(acc: PyTree, chunk: tuple[PyTree, jax.Array]) -> tuple[PyTree, None]:
        x, wk = chunk
        g = jax.vjp(lambda p: model(p, x), params)[1](wk)[0]
        return jax.tree_util.tree_map(jnp.add, acc, g), None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return jax.lax.scan(step, zeros, (chunks, w))[0]


def _model_jacobian(
    model: Callable[..., Any], params: PyTree, inputs: PyTree, chunk_size: int | None
) -> tuple[jax.Array, Callable[[PyTree], jax.Array], Callable[[jax.Array], PyTree]]:
    """``(outputs, v -> J v, w -> Jᵀ w)``: linearized once, or swept in chunks of the batch."""
    if chunk_size is None:
        outputs, jvp = jax.linearize(lambda p: model(p, inputs), params)
        return outputs, jvp, Partial(_first, jax.linear_transpose(jvp, params))
    batch = jax.eval_shape(model, params, inputs).shape[0]
    chunks = _chunks(inputs, batch, min(chunk_size, batch))
    outputs = _chunked_outputs(model, batch, params, chunks)
    jvp = Partial(functools.partial(_chunked_jvp, model, batch), params, chunks)
    vjp = Partial(functools.partial(_chunked_vjp, model, batch), params, chunks)
    return outputs, jvp, vjp


def _check_model(model: Any, params: PyTree, inputs: PyTree) -> jax.ShapeDtypeStruct:
    if not callable(model):
        msg = f"model must be callable as model(params, inputs); got {type(model).__name__}"
        raise TypeError(msg)
    check_floating(params, "params")
    outputs = jax.eval_shape(model, params, inputs)
    _losses.check_model_outputs(outputs, inputs)
    return outputs


# --- GGN ------------------------------------------------------------------------------------


def ggn(
    model: Callable[..., Any],
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
    ``"mse"``, ``"sigmoid_cross_entropy"``, each a mean over the leading batch axis; see
    :mod:`hessfree._losses`), by autodiff for a callable ``loss(outputs, targets) -> scalar``.
    G is positive semidefinite when ``H_L`` is (always, for the built-in losses).

    Cost: building linearizes the model once (one forward pass, residuals kept). Each product
    is one tangent pass (``J v``), the output-space ``H_L u`` (O(outputs) closed form) and one
    transposed pass (``Jᵀ w``), about one forward plus one backward pass of the model: cheaper
    than a Hessian product, which differentiates the backward pass again. With `chunk_size`,
    nothing is kept and each product sweeps the batch twice in chunks (a forward plus tangent,
    then a forward plus backward per chunk), holding one chunk's activations.

    Args:
        model: ``model(params, inputs) -> outputs``, one array with a leading batch axis B.
        loss: a built-in loss name or a callable ``loss(outputs, targets) -> scalar``.
        params: the parameters, any pytree of floating arrays.
        inputs: the model's inputs (any pytree, leading axis B).
        targets: the loss's targets (integer labels or probabilities for softmax).
        chunk_size: process the batch this many examples at a time (built-in losses and
            callables alike); None linearizes the whole batch once.

    Returns:
        A :class:`CurvatureOperator` with ``psd=True`` for built-in losses (for a callable loss
        ``psd`` is True too: the GGN is PSD when the loss is convex in the outputs).

    Raises:
        ValueError: unknown loss name; target shape does not match the outputs; outputs
            without a batch axis; `loss` not scalar.
        TypeError: `model`/`loss` not callable; non-floating parameters or outputs.

    Example:
        >>> import jax.numpy as jnp
        >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # B = 3 inputs
        >>> G = ggn(lambda p, x: x @ p, "mse", jnp.ones((2, 2)), x, jnp.zeros((3, 2)))
        >>> bool(jnp.allclose(G.to_dense(), jnp.kron(x.T @ x / 3, jnp.eye(2))))  # (XᵀX/B) ⊗ I
        True

    References:
        Schraudolph, "Fast curvature matrix-vector products for second-order gradient
        descent", Neural Computation 2002. Martens, "New insights and perspectives on the
        natural gradient method", JMLR 2020 (arXiv 2014).
    """
    outputs_struct = _check_model(model, params, inputs)
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if callable(loss):
        check_scalar_fn(loss, outputs_struct, (targets,), "loss")
        kind = f"ggn ({getattr(loss, '__name__', 'callable')})"
    elif isinstance(loss, str):
        _losses.check_targets(loss, outputs_struct, targets)
        kind = f"ggn ({loss})"
    else:
        msg = (
            f"loss must be a callable loss(outputs, targets) -> scalar or one of "
            f"{list(_losses.LOSSES)}; got {type(loss).__name__}"
        )
        raise TypeError(msg)
    outputs, jvp, vjp = _model_jacobian(model, params, inputs, chunk_size)
    if callable(loss):
        middle = _losses.autodiff_output_hessian(loss, outputs, targets)
    else:
        middle = _losses.closed_form_output_hessian(loss, outputs, targets)
    return CurvatureOperator(Partial(_sandwich, jvp, middle, vjp), params, kind=kind, psd=True)


# --- Fisher ---------------------------------------------------------------------------------


def _check_key(key: Any) -> None:
    if key is None:
        msg = 'key must be a jax.random key for kind="mc" (labels are sampled); got None'
        raise ValueError(msg)
    dtype = jnp.result_type(key)
    if not (
        jnp.issubdtype(dtype, jax.dtypes.prng_key)
        or (dtype == jnp.uint32 and np.shape(key)[-1:] == (2,))
    ):
        msg = f"key must be a jax.random key (jax.random.key(0) or PRNGKey(0)); got dtype {dtype}, shape {np.shape(key)}"
        raise TypeError(msg)


def fisher(
    model: Callable[..., Any],
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
      "bernoulli" ↔ "sigmoid_cross_entropy"; Martens 2014, the canonical-link case).
    - ``kind="mc"``: labels sampled from the predictive, `num_samples` per input (fixed at
      build time from `key`): ``(1/(B S)) Σ_{b,s} J_bᵀ r_bs r_bsᵀ J_b`` with ``r_bs`` the output
      gradient of the sampled NLL. Unbiased for the exact Fisher; rank ≤ B·S.
    - ``kind="empirical"``: ``(1/B) Σ_b g_b g_bᵀ`` with ``g_b = J_bᵀ r_b`` the per-example
      gradient at the given `targets`. Not the Fisher in general (Kunstner et al. 2019).

    No B × P matrix is ever formed: the per-example gradients enter only through the output
    space, ``Jᵀ (r ⟨r, J v⟩)``. Cost per product, all kinds: one tangent pass and one
    transposed pass of the model (as :func:`ggn`), plus O(S × outputs). With `chunk_size`,
    memory is bounded by one chunk of the batch (see :func:`ggn`).

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
        ValueError: unknown likelihood or kind; targets missing (empirical); key missing
            (mc); target shape mismatch; outputs without a batch axis.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
        >>> model, p = (lambda p, x: x @ p), jnp.ones((2, 2))
        >>> F = fisher(model, p, x, likelihood="gaussian")
        >>> bool(jnp.allclose(F.to_dense(), ggn(model, "mse", p, x, jnp.zeros((3, 2))).to_dense()))
        True
        >>> F_mc = fisher(model, p, x, likelihood="gaussian", kind="mc", key=jax.random.key(0),
        ...               num_samples=20_000)
        >>> bool(jnp.allclose(F_mc.to_dense(), F.to_dense(), atol=0.2))  # |F| up to 18.7
        True

    References:
        Martens, "New insights and perspectives on the natural gradient method", JMLR 2020
        (arXiv 2014). Kunstner, Balles, Hennig, "Limitations of the empirical Fisher
        approximation for natural gradient descent", NeurIPS 2019.
    """
    check_choice(likelihood, tuple(_losses.LIKELIHOODS), "likelihood")
    check_choice(kind, KINDS, "kind")
    check_positive_int(num_samples, "num_samples")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    outputs_struct = _check_model(model, params, inputs)
    loss = _losses.LIKELIHOODS[likelihood]
    if kind == "empirical":
        if targets is None:
            msg = (
                'targets must be given for kind="empirical" (gradients are taken at them); got None'
            )
            raise ValueError(msg)
        _losses.check_targets(loss, outputs_struct, targets)
    elif kind == "mc":
        _check_key(key)
    else:
        _losses.check_outputs_for(loss, outputs_struct)
    outputs, jvp, vjp = _model_jacobian(model, params, inputs, chunk_size)
    if kind == "exact":
        middle = _losses.closed_form_output_hessian(loss, outputs, None)
    else:
        if kind == "mc":
            assert key is not None
            grads = _losses.sampled_output_grads(likelihood, outputs, key, num_samples)
        else:
            grads = _losses.output_grad(loss, outputs, targets)[None]
        middle = Partial(_losses.outer_product_mv, grads)
    matvec = Partial(_sandwich, jvp, middle, vjp)
    return CurvatureOperator(matvec, params, kind=f"fisher ({kind}, {likelihood})", psd=True)

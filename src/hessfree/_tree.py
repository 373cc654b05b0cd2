"""Tree math, random pytrees, bases of vectors and sharding helpers: one copy of each.

Every vector in hessfree is a pytree shaped like the parameters; nothing is raveled. A basis
of m vectors is a pytree whose every leaf has a leading axis m. Inner products are written as
``sum(a * b)`` per leaf rather than ``vdot``: a contraction over sharded axes has no
unambiguous output sharding under explicit mesh axes, an elementwise product and a sum do
(the sum becomes an all-reduce).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

PyTree = Any

# --- arithmetic ----------------------------------------------------------------------------


def vdot(a: PyTree, b: PyTree) -> jax.Array:
    """``⟨a, b⟩``: the sum over leaves of ``sum(a * b)`` (real arrays)."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)
    total = jnp.zeros((), jnp.result_type(*leaves_a))
    for x, y in zip(leaves_a, leaves_b, strict=True):
        total = total + jnp.sum(x * y).astype(total.dtype)
    return total


def max_abs(x: PyTree) -> jax.Array:
    """``‖x‖_∞ = max |xᵢ|`` over all leaves (per-leaf max, then max over leaves; 0 if empty).

    NaN if an entry is NaN. In the promoted dtype of the leaves; never overflows.
    """
    leaves = jax.tree_util.tree_leaves(x)
    dtype = jnp.result_type(*leaves)
    total = jnp.zeros((), dtype)
    for leaf in leaves:
        if np.size(leaf):
            total = jnp.maximum(total, jnp.max(jnp.abs(leaf)).astype(dtype))
    return total


def pow2_scale(m: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(s, 1/s)``: a power of two s within a factor 2 of ``m > 0`` (s = 1 where m is 0 or
    not finite), clipped so that s and 1/s are both normal numbers of m's dtype.

    Rescaling by multiplying with a power of two is exact (XLA may turn ``x / s`` into
    ``x · (1/s)`` and flush a subnormal ``1/s`` to zero, so we never divide by a raw max).
    s is ``2**e`` with e the exponent ``frexp(m)`` gives (``m = f·2**e``, ``½ <= f < 1``),
    read from m's exponent bits and written into those of s and 1/s: a few integer
    operations, where ``frexp``/``ldexp`` add a ``pow`` and tens of instructions to every
    norm of a program (and time to its compile). Subnormal m (exponent bits 0) reads as
    ``e = minexp``, which the clip gives them anyway.
    """
    finfo = jnp.finfo(m.dtype)
    ints = jnp.dtype(f"int{finfo.bits}")
    bias = finfo.maxexp - 1
    ok = jnp.isfinite(m) & (m > 0)
    bits = jax.lax.bitcast_convert_type(jnp.where(ok, m, jnp.ones_like(m)), ints)
    biased = (bits >> finfo.nmant) & ((1 << finfo.nexp) - 1)
    e = jnp.clip(jnp.where(ok, biased - (bias - 1), 0), finfo.minexp, finfo.maxexp - 2)

    def power(k: jax.Array) -> jax.Array:  # 2**k for a normal exponent k
        return jax.lax.bitcast_convert_type((k + bias).astype(ints) << finfo.nmant, m.dtype)

    return power(e), power(-e)


def rescale(x: PyTree, factor: jax.Array) -> PyTree:
    """``factor · x`` leaf by leaf, computed in the promoted dtype and cast back to each leaf's."""
    return jax.tree_util.tree_map(lambda xl: (xl * factor).astype(xl.dtype), x)


def norm(x: PyTree) -> jax.Array:
    """``‖x‖₂`` over all leaves, scaled as BLAS ``nrm2``: ``s·sqrt(Σ (xᵢ/s)²)``, ``s ≈ max|xᵢ|``.

    The squares never overflow or underflow before the result itself would: ``‖1e20·x‖`` in
    float32 is finite, and a true norm past the dtype's range is ``inf``. ``inf`` if an entry
    is infinite, NaN if one is NaN. s (a power of two near ``max|xᵢ|``, see
    :func:`pow2_scale`) is held constant under differentiation, so the gradient is ``x/‖x‖``
    (and 0 at ``x = 0``). Cost: two reductions over the leaves (the max, then the sum of
    squares); no ravel, so sharded leaves reduce in place (per leaf, then over leaves).
    """
    m = jax.lax.stop_gradient(max_abs(x))
    s, inv = pow2_scale(m)
    total = jnp.zeros((), m.dtype)
    for leaf in jax.tree_util.tree_leaves(x):
        scaled = leaf * inv.astype(jnp.result_type(leaf, inv))
        total = total + jnp.sum(scaled * scaled).astype(total.dtype)
    # total > 0 exactly where m is positive and finite (the largest scaled entry is at least
    # ½), so that is the test: total is read once, and XLA fuses its square root and the
    # rescaling into the reduction (one kernel, not two)
    positive = jnp.isfinite(m) & (m > 0)
    root = jnp.where(positive, jnp.sqrt(jnp.where(positive, total, 1)), 0)
    return jnp.where(jnp.isfinite(m), s * root, m)


def axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    """``a x + y`` leaf by leaf, keeping the dtype of each leaf of `y`."""
    return jax.tree_util.tree_map(lambda xl, yl: yl + jnp.asarray(a, yl.dtype) * xl, x, y)


def scale(a: Any, x: PyTree) -> PyTree:
    """``a x`` leaf by leaf, keeping dtypes."""
    return jax.tree_util.tree_map(lambda xl: jnp.asarray(a, xl.dtype) * xl, x)


def sub(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, x, y)


def neg(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.negative, x)


def identity(x: PyTree) -> PyTree:
    """`x` itself (the identity operator, a plain preconditioner, a no-op flattening)."""
    return x


def zeros_like(x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.zeros_like, x)


def where(cond: jax.Array, a: PyTree, b: PyTree) -> PyTree:
    """``a`` where the scalar `cond` holds, else ``b`` (structures must match)."""
    return jax.tree_util.tree_map(lambda al, bl: jnp.where(cond, al, bl), a, b)


def all_finite(tree: PyTree) -> jax.Array:
    """Whether every entry of every leaf is finite (a scalar bool)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def size(x: PyTree) -> int:
    """The total number of entries (static)."""
    return sum(
        int(np.prod(np.shape(leaf), dtype=np.int64)) for leaf in jax.tree_util.tree_leaves(x)
    )


def scalar_dtype(x: PyTree) -> np.dtype:
    """The promoted dtype of the leaves: that of inner products and norms."""
    return np.dtype(jnp.result_type(*jax.tree_util.tree_leaves(x)))


def cast_like(v: PyTree, x: PyTree) -> PyTree:
    """Cast each leaf of `v` to the dtype of the matching leaf of `x` (a no-op where it has it)."""

    def one(vl: Any, xl: Any) -> Any:
        dtype = jnp.result_type(xl)
        return vl if getattr(vl, "dtype", None) == dtype else jnp.asarray(vl, dtype=dtype)

    return jax.tree_util.tree_map(one, v, x)


# --- bases: pytrees whose leaves carry a leading axis m -------------------------------------


def row(V: PyTree, j: Any) -> PyTree:
    return jax.tree_util.tree_map(lambda Vl: Vl[j], V)


def set_row(V: PyTree, j: Any, x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda Vl, xl: Vl.at[j].set(xl.astype(Vl.dtype)), V, x)


def put_row(V: PyTree, j: Any, x: PyTree) -> PyTree:
    """:func:`set_row` for an index known to be in bounds: a dynamic update slice, where
    ``.at[j].set`` also compiles the bounds check that drops an update out of bounds (two
    more kernels per write in a loop body). An out-of-bounds j is clamped, not dropped."""
    return jax.tree_util.tree_map(
        lambda Vl, xl: jax.lax.dynamic_update_index_in_dim(Vl, xl.astype(Vl.dtype), j, 0), V, x
    )


def empty_basis(zero: PyTree, m: int) -> PyTree:
    """m zero vectors like `zero` (leaves ``(m, *shape)``, same layout)."""
    return jax.tree_util.tree_map(lambda z: jnp.broadcast_to(z[None], (m, *z.shape)), zero)


def project(V: PyTree, w: PyTree) -> jax.Array:
    """``(m,)`` inner products ``⟨V[i], w⟩`` of every basis vector with `w`.

    Leaves sharded under explicit mesh axes use an elementwise product and a sum (an
    all-reduce); others use ``tensordot``, which XLA:CPU runs about 3x faster.
    """
    total = None
    for Vl, wl in zip(jax.tree_util.tree_leaves(V), jax.tree_util.tree_leaves(w), strict=True):
        if explicitly_sharded(Vl) or explicitly_sharded(wl):
            part = jnp.sum(Vl * wl[None], axis=tuple(range(1, Vl.ndim)))
        else:
            part = jnp.tensordot(Vl, wl, wl.ndim)
        total = part if total is None else total + part.astype(total.dtype)
    assert total is not None
    return total


def combine(coeffs: jax.Array, V: PyTree) -> PyTree:
    """``Σᵢ coeffs[i] V[i]``, a vector like one row of V."""
    return jax.tree_util.tree_map(lambda Vl: jnp.tensordot(coeffs.astype(Vl.dtype), Vl, 1), V)


def rowwise_vdot(xs: PyTree, ys: PyTree) -> jax.Array:
    """``(N,)`` inner products ``⟨xs[i], ys[i]⟩`` of two batches of vectors."""
    return jax.vmap(vdot)(xs, ys)


# --- structures and sharding ---------------------------------------------------------------


def explicit_axes(sharding: Any) -> bool:
    """Whether `sharding` is a NamedSharding splitting some axis over explicit mesh axes."""
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        return False
    names = [n for entry in spec if entry is not None for n in np.atleast_1d(entry)]
    types = dict(zip(mesh.axis_names, getattr(mesh, "axis_types", ()), strict=False))
    return bool(names) and all(types.get(n) == AxisType.Explicit for n in names)


def explicitly_sharded(x: Any) -> bool:
    """Whether `x`'s type (possibly traced) carries an axis split over explicit mesh axes."""
    return isinstance(x, jax.Array) and explicit_axes(getattr(jax.typeof(x), "sharding", None))


def multi_device(x: Any) -> bool:
    """Whether `x` is a concrete array laid out over more than one device."""
    # cheap tests first: this runs on every leaf of every eager call (isinstance against the
    # jax.Array ABC costs microseconds; a NamedSharding is only ever found on a jax.Array)
    if isinstance(x, jax.core.Tracer):
        return False
    sharding = getattr(x, "sharding", None)
    return isinstance(sharding, NamedSharding) and len(sharding.device_set) > 1


def flat_view(like: PyTree) -> tuple[Callable[[PyTree], jax.Array], Callable[[Any], PyTree]] | None:
    """``(ravel, unravel)`` between pytrees like `like` and one flat vector, or None.

    A Krylov basis of a many-leaf pytree costs a kernel per leaf for every vector operation,
    in the program and in its compile (a 6-leaf MLP's eigsh: 556 kernels, 4.5 s of XLA
    compile; flat: 211 kernels, 1.8 s). So solvers run on one flat vector where that keeps
    the layout: for two or more leaves of one dtype, none split over explicit mesh axes
    (callers also keep the pytree when their inputs lie on several devices:
    :func:`hessfree._staging.inputs_spread`). `ravel` writes each leaf into its slice of one
    buffer (XLA:CPU runs a fused concatenate of a product's outputs element by element: 8 ms
    against 0.2 ms for 0.5M entries); `unravel` slices.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    dtypes = {jnp.result_type(leaf) for leaf in leaves}
    if len(leaves) < 2 or len(dtypes) > 1 or any(explicitly_sharded(x) for x in leaves):
        return None
    (dtype,) = dtypes
    shapes = [tuple(np.shape(leaf)) for leaf in leaves]
    sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
    offsets = np.cumsum([0, *sizes]).tolist()

    def ravel(x: PyTree) -> jax.Array:
        out = jnp.zeros((offsets[-1],), dtype)
        for leaf, start in zip(jax.tree_util.tree_leaves(x), offsets, strict=False):
            out = jax.lax.dynamic_update_slice(out, jnp.ravel(leaf).astype(dtype), (start,))
        return out

    def unravel(v: Any) -> PyTree:
        parts = [
            jax.lax.slice(v, (start,), (start + size,)).reshape(shape)
            for start, size, shape in zip(offsets, sizes, shapes, strict=False)
        ]
        return jax.tree_util.tree_unflatten(treedef, parts)

    return ravel, unravel


def structure_of(tree: PyTree) -> PyTree:
    """A pytree of ``jax.ShapeDtypeStruct``: the shapes, dtypes and (mesh) shardings of `tree`.

    The sharding is kept where a leaf is split over a mesh axis, so algorithms can draw
    probes and start vectors in the parameters' layout; otherwise it is left unset.
    """

    def leaf(x: Any) -> jax.ShapeDtypeStruct:
        sharding = getattr(jax.typeof(x), "sharding", None) if isinstance(x, jax.Array) else None
        if not (isinstance(sharding, NamedSharding) and any(a is not None for a in sharding.spec)):
            sharding = None
        return jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x), sharding=sharding)

    return jax.tree_util.tree_map(leaf, tree)


def zeros(structure: PyTree) -> PyTree:
    """A zero pytree of ``jax.ShapeDtypeStruct`` `structure`, in its layout where explicit."""

    def leaf(s: Any) -> jax.Array:
        sharding = getattr(s, "sharding", None)
        if explicit_axes(sharding):
            return jnp.zeros(s.shape, s.dtype, out_sharding=sharding)
        return jnp.zeros(s.shape, s.dtype)  # automatic axes: XLA propagates the layout

    return jax.tree_util.tree_map(leaf, structure)


def match_sharding(tree: PyTree, like: PyTree) -> PyTree:
    """Give each leaf of `tree` the explicit-axes sharding type of the matching leaf of `like`.

    A freshly drawn array (a probe, a start vector) is unsharded; under explicit mesh axes a
    linearized function refuses it as a tangent of sharded parameters. Under automatic axes
    (or without a mesh) this does nothing and XLA's propagation decides.
    """

    def one(leaf: Any, like_leaf: Any) -> Any:
        sharding = getattr(jax.typeof(like_leaf), "sharding", None)
        if sharding is None or not explicit_axes(sharding):
            return leaf
        return jax.sharding.reshard(leaf, sharding.spec)

    return jax.tree_util.tree_map(one, tree, like)


def keep_sharding(out: PyTree, x: PyTree, *, batched: bool = False) -> PyTree:
    """Outside ``jit``, put each output leaf where the matching concrete leaf of `x` lives.

    XLA's propagation may pick another layout for a result than its input had. Traced
    leaves are left to the caller's ``jit``. With ``batched=True`` outputs carry one leading
    (unsharded) batch axis.
    """

    def one(o: Any, xl: Any) -> Any:
        if isinstance(o, jax.core.Tracer) or not multi_device(xl):
            return o
        sharding = xl.sharding
        if batched:
            sharding = NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
        return jax.device_put(o, sharding)

    if not any(multi_device(leaf) for leaf in jax.tree_util.tree_leaves(x)):
        return out
    return jax.tree_util.tree_map(one, out, x)

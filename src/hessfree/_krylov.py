"""The one Krylov core: orthogonalization and the Lanczos step, on pytrees.

A basis of m vectors is a pytree whose every leaf has a leading axis m; inner products are
per-leaf sums (:mod:`hessfree._tree`), so the basis keeps the parameters' layout and sharding.
With inputs on one device eigsh and lanczos run on one flat vector instead
(:func:`flattened`): every vector operation is then one kernel, not one per leaf.
Only the small ``m × m`` projected problems are dense. :func:`lanczos_tree` reorthogonalizes
every new vector fully (``O(m n)`` per step); :func:`tridiagonal` (spectral_density) keeps no
basis; eigsh reorthogonalizes every new vector fully too, with a second Gram-Schmidt pass only
where the first removed much of it (see :mod:`hessfree._eigsh`). Products inside these loops
go through :func:`loop_product`, and fresh directions inside them come from
:func:`pseudo_random` (a few integer operations per entry: ``jax.random`` would add hundreds of
instructions per leaf to every program, and seconds to its compile).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from . import _tree as tree
from ._linop import MatVec, TreeOperator, tree_operator
from ._results import LanczosResult
from ._staging import inputs_spread, staged
from ._validation import PyTree, check_floating, check_key, check_like, check_steps


def normalize(x: PyTree) -> tuple[PyTree, jax.Array]:
    """``(x/‖x‖, ‖x‖)``; a zero vector stays zero."""
    n = tree.norm(x)
    return tree.scale(1 / jnp.where(n > 0, n, 1), x), n


def _mix(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finalizer: every input bit flips about half the output bits."""
    h = h ^ (h >> 16)
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


# pseudo_random's counter for a start vector (the loops count from 0 and from 2**30)
_START = np.uint32(0xFFFFFFFF)


def seed_of(key: jax.Array) -> jax.Array:
    """A uint32 seed for :func:`pseudo_random` drawn from a ``jax.random`` key (once, outside
    the loops)."""
    return jax.random.bits(key, (), jnp.uint32)


def _draw(base: jax.Array, leaf_index: int, shape: tuple[int, ...], dtype: Any, kind: str) -> Any:
    """Entries of one leaf: hashes of ``(base, leaf_index, entry)`` mapped to `kind`.

    ``"uniform"``: the top 24 bits as a float in [-1, 1) (exact in float32 and float64);
    ``"rademacher"``: the top bit as ±1; ``"gaussian"``: Box-Muller on two 24-bit uniforms
    (the second from a re-hash), ``√(−2 ln u₁)·cos(2π u₂)`` with ``u₁ ∈ (0, 1]``. `base` may
    carry leading axes (one draw per element, e.g. one probe per row).
    """
    size = int(np.prod(shape, dtype=np.int64))
    index = jax.lax.iota(jnp.uint32, size).reshape(shape)
    base = base.reshape(base.shape + (1,) * len(shape))
    h = _mix(index * np.uint32(0x9E3779B1) + _mix(base + np.uint32(leaf_index)))
    if kind == "rademacher":
        return jnp.where((h >> 31) == 1, -1, 1).astype(dtype)
    if kind == "uniform":
        return ((h >> 8).astype(jnp.float32) * np.float32(2.0**-23) - np.float32(1.0)).astype(dtype)
    u1 = ((h >> 8) + np.uint32(1)).astype(jnp.float32) * np.float32(2.0**-24)
    u2 = (_mix(h ^ np.uint32(0x5BD1E995)) >> 8).astype(jnp.float32) * np.float32(2.0**-24)
    z = jnp.sqrt(np.float32(-2.0) * jnp.log(u1)) * jnp.cos(np.float32(2 * np.pi) * u2)
    return z.astype(dtype)


def _base(seed: Any, counter: Any) -> jax.Array:
    return _mix(
        jnp.asarray(seed).astype(jnp.uint32) ^ _mix(jnp.asarray(counter).astype(jnp.uint32))
    )


def pseudo_random(seed: Any, like: PyTree, counter: Any = 0, *, signs: bool = False) -> PyTree:
    """A vector like `like`, entry i of leaf l a hash of ``(seed, counter, l, i)``.

    Uniform in ``[-1, 1)`` (24 bits: exact in float32 and float64), or ±1 with `signs`
    (Rademacher). For the directions solvers draw inside their loops (fresh Lanczos vectors
    after a breakdown or a lock, Hutchinson probes, start vectors): any generic direction
    will do, and a counter hash costs a few integer operations per entry where
    ``jax.random``'s threefry adds hundreds of instructions per leaf to a program, and
    seconds to its compile. `seed` and `counter` may be traced. Leaves keep `like`'s dtypes
    and layout (its mesh sharding under explicit axes).
    """
    base = _base(seed, counter)
    kind = "rademacher" if signs else "uniform"
    out = []
    leaves, treedef = jax.tree_util.tree_flatten(like)
    for i, leaf in enumerate(leaves):
        u = _draw(base, i, tuple(np.shape(leaf)), jnp.result_type(leaf), kind)
        if isinstance(leaf, jax.Array):
            u = u + jnp.zeros_like(leaf)  # the leaf's layout (and sharding type)
        out.append(u)
    return tree.match_sharding(jax.tree_util.tree_unflatten(treedef, out), like)


def probes(seed: Any, like: PyTree, count: int, distribution: str) -> PyTree:
    """`count` probe vectors with ``E[z zᵀ] = I``, leaves ``(count, *leaf_shape)``.

    Entry i of leaf l of probe r is a hash of ``(seed, r, l, i)`` (:func:`pseudo_random`'s
    counter is r): ±1 (``"rademacher"``) or standard normal (``"gaussian"``, Box-Muller). One
    fused kernel per leaf, where ``jax.random`` compiled 10-20 (threefry) and was 60 % of a
    Hutchinson trace's program on a 6-leaf MLP. Leaves keep `like`'s dtypes and layout.
    """
    base = _base(seed, jnp.arange(count, dtype=jnp.uint32))
    out = []
    leaves, treedef = jax.tree_util.tree_flatten(like)
    for i, leaf in enumerate(leaves):
        z = _draw(base, i, tuple(np.shape(leaf)), jnp.result_type(leaf), distribution)
        if isinstance(leaf, jax.Array):
            z = z + jnp.zeros_like(leaf)[None]  # the leaf's layout (and sharding type)
        out.append(z)
    return jax.tree_util.tree_unflatten(treedef, out)


def derived_seed(seed: Any, i: Any) -> jax.Array:
    """Another uint32 seed from `seed` and an index (a probe's run seed, say)."""
    return _mix(
        jnp.asarray(seed).astype(jnp.uint32)
        + _mix(jnp.asarray(i).astype(jnp.uint32) ^ np.uint32(0x27D4EB2F))
    )


# --- products inside loops -------------------------------------------------------------------

_CALLS = ("jit", "pjit", "closed_call", "core_call")


def _canonical(spec: Any, nd: int) -> bool:
    lhs, rhs, out = spec.lhs_spec, spec.rhs_spec, spec.out_spec
    nhwc = (0, nd - 1, *range(1, nd - 1))
    return (
        tuple(lhs) == nhwc and tuple(out) == nhwc and tuple(rhs) == (nd - 1, nd - 2, *range(nd - 2))
    )


def _slow_convs(jaxpr: Any) -> bool:
    """Whether `jaxpr` (or a jit/call inside it) has a convolution outside NHWC/HWIO layout."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is jax.lax.conv_general_dilated_p:
            nd = len(eqn.invars[0].aval.shape)
            if not _canonical(eqn.params["dimension_numbers"], nd):
                return True
        elif eqn.primitive.name in _CALLS:
            inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
            inner = getattr(inner, "jaxpr", inner)
            if inner is not None and _slow_convs(inner):
                return True
    return False


def _conv_nhwc(lhs: jax.Array, rhs: jax.Array, params: dict) -> jax.Array:
    """The same convolution with its operands transposed to NHWC/HWIO and its result back."""
    spec = params["dimension_numbers"]
    nd = lhs.ndim
    lhs_order = (spec.lhs_spec[0], *spec.lhs_spec[2:], spec.lhs_spec[1])
    rhs_order = (*spec.rhs_spec[2:], spec.rhs_spec[1], spec.rhs_spec[0])
    out_order = (spec.out_spec[0], *spec.out_spec[2:], spec.out_spec[1])
    nhwc = (0, nd - 1, *range(1, nd - 1))
    canonical = jax.lax.ConvDimensionNumbers(nhwc, (nd - 1, nd - 2, *range(nd - 2)), nhwc)
    out = jax.lax.conv_general_dilated_p.bind(
        jnp.transpose(lhs, lhs_order),
        jnp.transpose(rhs, rhs_order),
        **{**params, "dimension_numbers": canonical},
    )
    return jnp.transpose(out, tuple(int(i) for i in np.argsort(out_order)))


def _eval_nhwc(jaxpr: Any, consts: Any, args: Any) -> list:
    """``eval_jaxpr`` with every convolution put in NHWC/HWIO layout (jits inlined)."""
    env: dict = {}

    def read(v: Any) -> Any:
        return v.val if isinstance(v, jex.Literal) else env[v]

    env.update(zip(jaxpr.constvars, consts, strict=True))
    env.update(zip(jaxpr.invars, args, strict=True))
    for eqn in jaxpr.eqns:
        invals = [read(v) for v in eqn.invars]
        inner = eqn.params.get("jaxpr", eqn.params.get("call_jaxpr"))
        if eqn.primitive is jax.lax.conv_general_dilated_p:
            outs = [_conv_nhwc(invals[0], invals[1], eqn.params)]
        elif eqn.primitive.name in _CALLS and isinstance(inner, jex.ClosedJaxpr):
            outs = _eval_nhwc(inner.jaxpr, inner.consts, invals)
        elif eqn.primitive.name in _CALLS and isinstance(inner, jex.Jaxpr):
            outs = _eval_nhwc(inner, [], invals)
        else:
            with eqn.ctx.manager:
                outs = eqn.primitive.bind(*invals, **eqn.primitive.get_bind_params(eqn.params))
            if not eqn.primitive.multiple_results:
                outs = [outs]
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def loop_product(matvec: MatVec) -> MatVec:
    """`matvec` as it should be traced inside a ``while_loop`` body.

    XLA:CPU puts convolutions into the layout its fast kernels take (NHWC input, HWIO kernel)
    only in a program's entry computation, not inside loop bodies: there the transposed
    convolutions of a CNN's backward pass (kernel-gradient ``f01b_i01o->01bf``,
    input-gradient ``b01f_01oi->b01f``) fall back to a naive loop nest, and a CNN product
    inside Lanczos ran 4-8x (one convolution 40-70x) slower than the same product alone. On
    CPU, a product with such convolutions is traced once to a jaxpr and evaluated with each
    convolution wrapped in explicit transposes to NHWC/HWIO (what XLA does itself outside
    loops); other products, other backends and explicitly sharded vectors are left as they
    are.
    """

    def product(v: PyTree) -> PyTree:
        leaves, treedef = jax.tree_util.tree_flatten(v)
        if jax.default_backend() != "cpu" or any(tree.explicitly_sharded(x) for x in leaves):
            return matvec(v)

        def flat(*xs: Any) -> PyTree:
            return matvec(jax.tree_util.tree_unflatten(treedef, xs))

        closed, out_shape = jax.make_jaxpr(flat, return_shape=True)(*leaves)
        if not _slow_convs(closed.jaxpr):
            return matvec(v)
        outs = _eval_nhwc(closed.jaxpr, closed.consts, leaves)
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(out_shape), outs)

    return product


# On CPU, solver loops over operators on more numbers than this run one after another by
# default rather than together under vmap (map_loops). XLA:CPU gains nothing from batching
# large products, and a batched loop evaluates its conditional branches as selects on every
# step. On MLP Hessians/GGNs, one after another took 0.78-0.79x the vmapped time at 536k
# parameters (8 Lanczos probes; 8 CG solves), 0.92x at 204k, but 1.09-1.29x at 68k and
# 1.3-1.5x at 1k-10k, where batching saves per-kernel overhead.
SEQUENTIAL = 1 << 17


def map_loops(one: Any, xs: Any, chunk_size: int | None, like: PyTree) -> Any:
    """``one`` (a function that runs a solver loop: Lanczos, CG) over the leading axis of
    `xs`: `chunk_size` at a time, or with None all together under ``vmap``, except on CPU
    for operators on more than :data:`SEQUENTIAL` numbers (the size of `like`), where they
    run one after another."""
    if chunk_size is not None:
        return jax.lax.map(one, xs, batch_size=chunk_size)
    if jax.default_backend() == "cpu" and tree.size(like) > SEQUENTIAL:
        return jax.lax.map(one, xs)
    return jax.vmap(one)(xs)


def flattened(matvec: MatVec, like: PyTree) -> tuple[MatVec, Any, Any]:
    """``(flat_matvec, ravel, unravel)``: `matvec` on one flat vector where
    :func:`hessfree._tree.flat_view` allows it (one dtype, several leaves: a kernel per
    vector operation instead of one per leaf) and the call's inputs lie on one device
    (:func:`hessfree._staging.inputs_spread`), else `matvec` and identities."""
    flat = None if inputs_spread() else tree.flat_view(like)
    if flat is None:
        return matvec, tree.identity, tree.identity
    ravel, unravel = flat
    return (lambda v: ravel(matvec(unravel(v)))), ravel, unravel


def orthogonalize(V: PyTree, w: PyTree) -> tuple[PyTree, jax.Array]:
    """Classical Gram-Schmidt of `w` against the rows of V (zero rows allowed), a second time
    only where the first removed much of w: ``‖w‖`` fell below 0.7 (about 1/√2) of itself
    (Daniel, Gragg, Kaufman & Stewart 1976; "twice is enough").

    Returns the orthogonalized vector and the coefficients ``Vw`` removed. Cost: two or four
    passes over V.
    """
    before = tree.norm(w)
    h = tree.project(V, w)
    w = tree.sub(w, tree.combine(h, V))

    def again(w: PyTree) -> tuple[PyTree, jax.Array]:
        h2 = tree.project(V, w)
        return tree.sub(w, tree.combine(h2, V)), h2

    def done(w: PyTree) -> tuple[PyTree, jax.Array]:
        return w, jnp.zeros_like(h)

    w, h2 = jax.lax.cond(tree.norm(w) < 0.7 * before, again, done, w)
    return w, h + h2


def orthonormal_rows(Y: PyTree, count: int) -> PyTree:
    """Rows spanning those of `Y` (leaves ``(count, ...)``), orthonormal or zero.

    Row by row against the ones before; a row (numerically) in the span of the previous
    ones becomes zero, so a rank-deficient sketch gives zero rows instead of NaNs.
    """
    eps = jnp.finfo(tree.scalar_dtype(Y)).eps
    Q = tree.empty_basis(tree.row(tree.zeros_like(Y), 0), count)

    def step(i: jax.Array, Q: PyTree) -> PyTree:
        y = tree.row(Y, i)
        w, _ = orthogonalize(Q, y)
        n = tree.norm(w)
        keep = n > 100 * eps * tree.norm(y)
        return tree.set_row(Q, i, tree.scale(jnp.where(keep, 1 / jnp.where(n > 0, n, 1), 0), w))

    return jax.lax.fori_loop(0, count, step, Q)


def expand(
    matvec: MatVec, V: PyTree, H: jax.Array, j: jax.Array, seed: jax.Array
) -> tuple[PyTree, jax.Array, jax.Array]:
    """One Lanczos step on basis row j: ``w = A v_j`` made orthogonal to every row of V.

    Writes column (and row) j of the projected matrix ``H = V A Vᵀ`` and the next unit vector
    ``V[j+1]``; returns ``(V, H, β)`` with ``β = ‖w‖``. On breakdown (β at rounding level) the
    next vector is a fresh direction (:func:`pseudo_random` from `seed`) orthogonal to V and β
    is 0, so nothing is divided by 0.
    """
    aw = matvec(tree.row(V, j))
    w, h = orthogonalize(V, aw)
    beta = tree.norm(w)
    eps = jnp.finfo(H.dtype).eps
    broke = beta <= 10 * eps * tree.norm(aw)

    def fresh(w: PyTree) -> PyTree:
        return orthogonalize(V, pseudo_random(seed, w, j))[0]

    w = jax.lax.cond(broke, fresh, lambda w: w, w)
    v_next, _ = normalize(w)
    beta = jnp.where(broke, jnp.zeros_like(beta), beta)
    V = tree.put_row(V, j + 1, v_next)
    m = H.shape[0]
    h = h[:m].astype(H.dtype)
    H = jax.lax.dynamic_update_index_in_dim(H, h, j, 1)
    H = jax.lax.dynamic_update_index_in_dim(H, h, j, 0)
    return V, H, beta


def start_basis(v0: PyTree, m: int) -> PyTree:
    """A basis of m + 1 rows whose row 0 is ``v0/‖v0‖`` (the rest zero)."""
    return tree.set_row(tree.empty_basis(tree.zeros_like(v0), m + 1), 0, normalize(v0)[0])


def lanczos_tree(
    matvec: MatVec, v0: PyTree, num_steps: int, seed: Any
) -> tuple[jax.Array, jax.Array, PyTree]:
    """``(alphas, betas, V)`` of `num_steps` Lanczos steps; V's leaves have leading axis m.

    `seed` (uint32, e.g. :func:`seed_of` a key) draws the fresh directions after breakdowns.
    """
    m = num_steps
    dtype = tree.scalar_dtype(v0)
    V = start_basis(v0, m)
    H = jnp.zeros((m, m), dtype)
    seed = jnp.asarray(seed, jnp.uint32)
    matvec = loop_product(matvec)

    def step(j: jax.Array, carry: tuple[PyTree, jax.Array, jax.Array]) -> Any:
        V, H, betas = carry
        V, H, beta = expand(matvec, V, H, j, seed)
        return V, H, jax.lax.dynamic_update_index_in_dim(betas, beta, j, 0)

    V, H, betas = jax.lax.fori_loop(0, m, step, (V, H, jnp.zeros((m,), dtype)))
    return jnp.diagonal(H), betas, jax.tree_util.tree_map(lambda Vl: Vl[:m], V)


def tridiagonal(
    matvec: MatVec, v0: PyTree, num_steps: int, seed: Any
) -> tuple[jax.Array, jax.Array]:
    """``(alphas, betas)`` of `num_steps` Lanczos steps kept to three vectors (no basis).

    The three-term recurrence, each new vector made orthogonal to the last two (twice). Without
    a basis nothing is reorthogonalized globally: once Ritz values converge, rounding brings
    back copies of them ("ghosts"), but the Gauss quadrature of ``v0ᵀ g(A) v0`` the
    tridiagonal gives stays accurate (the weight of a converged eigenvalue is split among its
    copies; Greenbaum 1989, Knizhnerman 1996), which is all stochastic Lanczos quadrature
    uses. Cost per step: one product and a few vector operations; memory three vectors.
    On breakdown (β at rounding level) the next vector is a fresh direction orthogonal to the
    last two and β is 0, which decouples the rest of the tridiagonal from ``v0``.
    """
    dtype = tree.scalar_dtype(v0)
    eps = jnp.finfo(dtype).eps
    seed = jnp.asarray(seed, jnp.uint32)
    matvec = loop_product(matvec)
    v, _ = normalize(v0)

    def step(j: jax.Array, carry: tuple) -> tuple:
        v, prev, beta, alphas, betas = carry
        u = matvec(v)
        alpha = tree.vdot(v, u)
        w = tree.axpy(-beta, prev, tree.axpy(-alpha, v, u))
        d1, d0 = tree.vdot(v, w), tree.vdot(prev, w)
        w = tree.axpy(-d0, prev, tree.axpy(-d1, v, w))
        alpha = alpha + d1
        b = tree.norm(w)
        broke = b <= 10 * eps * tree.norm(u)

        def fresh(w: PyTree) -> PyTree:
            r = pseudo_random(seed, w, j)
            for _ in range(2):
                r = tree.axpy(-tree.vdot(prev, r), prev, tree.axpy(-tree.vdot(v, r), v, r))
            return r

        w = jax.lax.cond(broke, fresh, lambda w: w, w)
        b = jnp.where(broke, jnp.zeros_like(b), b)
        v_next, _ = normalize(w)
        return v_next, v, b, alphas.at[j].set(alpha), betas.at[j].set(b)

    zero = tree.zeros_like(v)
    init = (
        v,
        zero,
        jnp.zeros((), dtype),
        jnp.zeros((num_steps,), dtype),
        jnp.zeros((num_steps,), dtype),
    )
    _, _, _, alphas, betas = jax.lax.fori_loop(0, num_steps, step, init)
    return alphas, betas


def start_vector(op: TreeOperator, v0: PyTree | None, key: jax.Array) -> tuple[PyTree, jax.Array]:
    """``(v0, seed)``: the given start vector in A's dtypes, or one drawn from the uint32
    `seed` of `key` (:func:`pseudo_random`, entries uniform in [-1, 1): a generic direction,
    without threefry's hundreds of kernels per leaf in the program); the seed then draws the
    run's fresh directions (other counters)."""
    seed = seed_of(key)
    if v0 is None:
        return pseudo_random(seed, op.zeros(), _START), seed
    check_like(op.structure, v0, "A's input", "v0")
    check_floating(v0, "v0")
    return tree.cast_like(v0, op.structure), seed


def checked_start(
    A: Any, v0: PyTree | None, key: Any, like: PyTree | None, fn: str
) -> tuple[jax.Array, PyTree | None, int]:
    """Eager checks shared by lanczos and eigsh: ``(key, like, n)``; a key is needed without v0."""
    if v0 is None:
        check_key(key, fn, "its random start vector (or pass v0)")
    elif key is not None:
        check_key(key, fn)
    if like is None and v0 is not None and callable(A) and not hasattr(A, "in_structure"):
        like = v0
    n = tree.size(tree_operator(A, like).structure)  # checks A and like at once
    return (jax.random.PRNGKey(0) if key is None else key), like, n


def _lanczos_impl(
    A: Any, like: PyTree | None, v0: PyTree | None, key: Any, *, num_steps: int
) -> LanczosResult:
    op = tree_operator(A, like)
    v0, seed = start_vector(op, v0, key)
    matvec, ravel, unravel = flattened(op.matvec, v0)
    alphas, betas, V = lanczos_tree(matvec, ravel(v0), num_steps, seed)
    V = jax.vmap(unravel)(V)
    return LanczosResult(alphas, betas, V, jnp.asarray(num_steps, jnp.int32))


def lanczos(
    A: Any,
    v0: PyTree | None,
    num_steps: int,
    *,
    key: jax.Array | None = None,
    like: PyTree | None = None,
) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization.

    ``V A Vᵀ = T = tridiag(betas[:-1], alphas, betas[:-1])`` with V's rows an orthonormal basis
    of the Krylov space ``span{v0, A v0, …, A^{m−1} v0}``. Every new vector is orthogonalized
    against all previous ones (twice), so the basis stays orthonormal to rounding and no
    spurious copies of converged eigenvalues appear. Runs as one ``lax.fori_loop`` on pytrees
    like `v0` (never raveled, so sharded parameters stay sharded); jit- and vmap-able.

    Cost: `num_steps` products with A, plus ``O(m² n)`` flops and ``(m + 1) n`` memory.
    `num_steps` is static (a new count compiles a new program).

    Args:
        A: a CurvatureOperator, a callable ``v -> A v`` (then pass `like`, or a `v0`), or a
            dense symmetric ``(n, n)`` array.
        v0: the start vector, a pytree (normalized here), or None to draw one from `key`.
            It is used as given: a non-finite `v0` gives NaN coefficients (never a silent
            random start).
        num_steps: m, the number of Lanczos vectors, ``1 <= m <= n``.
        key: a ``jax.random`` key: required when `v0` is None; also seeds the fresh
            directions drawn after a breakdown (fixed key 0 when not given).
        like: an example pytree shaped like A's input, for a plain callable A.

    Returns:
        A :class:`LanczosResult` ``(alphas, betas, basis, num_matvecs)``.

    Raises:
        ValueError: `num_steps` out of range; `v0` does not match A's input; neither `v0`
            nor `key` given.

    References:
        Lanczos, J. Res. Nat. Bur. Standards 45, 1950; Golub & Van Loan, Matrix
        Computations, 4th ed., §10.1.
    """
    key, like, n = checked_start(A, v0, key, like, "lanczos")
    check_steps(num_steps, n)
    return staged(_lanczos_impl, A, like, v0, key, num_steps=num_steps)


def ritz(H: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigenpairs of the leading ``size × size`` block of H: ``(θ, S, active)``.

    H has a fixed shape; the inactive part is replaced by distinct diagonal values far above
    the spectrum, and ``active`` marks the eigenpairs that belong to the leading block.
    Non-finite entries are read as 0 (the caller reports them).
    """
    m = H.shape[0]
    inside = jnp.arange(m) < size
    # non-finite entries (a NaN operator, reported by the caller) become 0: some eigh
    # kernels never return on NaN input, and under vmap every element runs
    block = jnp.where(inside[:, None] & inside[None, :] & jnp.isfinite(H), H, 0)
    far = 2 * jnp.max(jnp.sum(jnp.abs(block), axis=1)) + 1
    sentinels = far * (2 + jnp.arange(m, dtype=H.dtype))
    theta, S = jnp.linalg.eigh(block + jnp.diag(jnp.where(inside, 0, sentinels)))
    active = jnp.sum(jnp.where(inside[:, None], S**2, 0), axis=0) > 0.5
    return theta, S, active

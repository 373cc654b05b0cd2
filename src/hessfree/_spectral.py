"""Spectra of symmetric operators from matrix-vector products: Lanczos, eigsh, spectral density.

Everything here works on pytrees shaped like the operator's input (the parameters): a basis of
m vectors is a pytree whose every leaf has a leading axis m, inner products are sums of
elementwise products per leaf (:func:`hessfree._products.tree_vdot`), and nothing is raveled
into one flat vector, so the basis keeps the parameters' layout and sharding. Only the small
``m × m`` projected problems are dense. One Lanczos step costs one product (one HVP for a
Hessian) plus ``O(m n)`` work for the full reorthogonalization against the ``m`` basis
vectors kept.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._linop import matvec_and_structure
from ._products import tree_vdot
from ._validation import PyTree, check_choice, check_like, check_positive_int

WHICH = ("LA", "SA", "LM")
TreeMatVec = Callable[[PyTree], PyTree]


class TreeOperator(NamedTuple):
    """An operator on pytrees shaped like its input.

    Attributes:
        matvec: ``v -> A v`` on pytrees like `structure`, each output leaf in its input dtype.
        structure: a pytree of ``jax.ShapeDtypeStruct`` (the input's shapes and dtypes).
        size: n, the total number of entries.
        dtype: the promoted dtype of the leaves (that of scalars such as inner products).
        pytree_mm: the operator's own batched product ``mm`` if it has one.
        template: an example input pytree (arrays, possibly traced) whose layout and sharding
            new vectors copy, or None.
    """

    matvec: TreeMatVec
    structure: PyTree
    size: int
    dtype: Any
    pytree_mm: Callable[[PyTree], PyTree] | None
    template: PyTree | None = None


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos`.

    Attributes:
        alphas: ``(m,)`` diagonal of the tridiagonal ``T``.
        betas: ``(m,)``; ``betas[:-1]`` is the off-diagonal of ``T`` and ``betas[-1]`` the norm
            of the final residual, so ``A Vᵀ = Vᵀ T + betas[-1] r e_mᵀ`` with ``r`` a unit
            vector orthogonal to the basis. A zero entry marks a breakdown (an invariant
            subspace was found; the next vector is a fresh random direction).
        basis: a pytree like the start vector whose every leaf has a leading axis ``m``:
            ``basis[i]`` is the i-th orthonormal Lanczos vector ``v_i`` (``v_0 = v0/‖v0‖``).
    """

    alphas: jax.Array
    betas: jax.Array
    basis: PyTree


class EigshInfo(NamedTuple):
    """Convergence report of :func:`eigsh` (``return_info=True``).

    Attributes:
        residuals: ``(k,)`` Ritz residual norms ``‖A y − θ y‖`` (estimated as
            ``β·|last component of the Ritz vector|``), matching the eigenvalues.
        converged: whether every residual met ``tol``.
        num_matvecs: products with A used (HVPs for a Hessian).
        num_restarts: thick restarts performed.
    """

    residuals: jax.Array
    converged: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array


def tree_operator(
    A: Any, like: PyTree | None, name: str = "A", template: PyTree | None = None
) -> TreeOperator:
    """`A` (operator, callable + `like`, or dense matrix) as a product on pytrees.

    A dense ``(n, n)`` matrix acts on a single ``(n,)`` leaf. New vectors (start vectors,
    probes) copy the layout of `template`, else of `like` (both may be traced arrays: under
    explicit mesh axes their types carry the sharding), else of the structure's shardings
    where it has them.
    """
    matvec, structure = matvec_and_structure(A, like, name)
    leaves = jax.tree_util.tree_leaves(structure)
    dtype = jnp.result_type(*[leaf.dtype for leaf in leaves])

    def tree_matvec(v: PyTree) -> PyTree:
        out = matvec(v)
        return jax.tree_util.tree_map(lambda o, s: o.astype(s.dtype), out, structure)

    mm = getattr(A, "mm", None)
    size = int(sum(int(np.prod(leaf.shape, dtype=np.int64)) for leaf in leaves))
    template = like if template is None else template
    if template is not None and not all(
        isinstance(x, jax.Array | np.ndarray) for x in jax.tree_util.tree_leaves(template)
    ):
        template = None
    return TreeOperator(
        tree_matvec, structure, size, np.dtype(dtype), mm if callable(mm) else None, template
    )


def zeros(op: TreeOperator) -> PyTree:
    """A zero vector like A's input, with the template's layout (and sharding) if any."""
    if op.template is not None:
        return jax.tree_util.tree_map(
            lambda t, s: jnp.zeros_like(t, dtype=s.dtype), op.template, op.structure
        )

    def leaf(s: Any) -> jax.Array:
        sharding = getattr(s, "sharding", None)
        if _explicit_axes(sharding):
            return jnp.zeros(s.shape, s.dtype, out_sharding=sharding)
        return jnp.zeros(s.shape, s.dtype)  # automatic axes: XLA propagates the layout

    return jax.tree_util.tree_map(leaf, op.structure)


def _explicit_axes(sharding: Any) -> bool:
    """Whether `sharding` is a NamedSharding splitting some axis over explicit mesh axes."""
    spec, mesh = getattr(sharding, "spec", None), getattr(sharding, "mesh", None)
    if spec is None or mesh is None:
        return False
    names = [n for entry in spec if entry is not None for n in np.atleast_1d(entry)]
    types = dict(zip(mesh.axis_names, mesh.axis_types, strict=True))
    return bool(names) and all(types.get(n) == jax.sharding.AxisType.Explicit for n in names)


def random_tree(
    key: jax.Array, like: PyTree, distribution: str = "normal", count: int | None = None
) -> PyTree:
    """Random vectors drawn leaf by leaf, with the dtypes and layout of the pytree `like`.

    With `count`, every leaf gets a leading axis `count` (that many independent vectors).
    ``"normal"`` draws standard normal entries, ``"rademacher"`` ±1.
    """
    leaves, treedef = jax.tree_util.tree_flatten(like)
    keys = jax.random.split(key, len(leaves))
    draw = jax.random.rademacher if distribution == "rademacher" else jax.random.normal
    out = []
    for k, leaf in zip(keys, leaves, strict=True):
        shape = leaf.shape if count is None else (count, *leaf.shape)
        # adding the zero leaf gives the draw its layout (its sharding under explicit axes)
        out.append(draw(k, shape, leaf.dtype) + (leaf if count is None else leaf[None]))
    return jax.tree_util.tree_unflatten(treedef, out)


def batched_matvec(op: TreeOperator, xs: PyTree, chunk_size: int | None = None) -> PyTree:
    """``A xᵢ`` for every vector of `xs` (leaves with a leading axis N): ``mm`` or ``vmap``.

    With `chunk_size`, at most that many products run at once (``lax.map``).
    """
    if chunk_size is not None:
        return jax.lax.map(op.matvec, xs, batch_size=chunk_size)
    if op.pytree_mm is not None:
        out = op.pytree_mm(xs)
        return jax.tree_util.tree_map(lambda o, x: o.astype(x.dtype), out, xs)
    return jax.vmap(op.matvec)(xs)


_JITTED: dict[Any, Any] = {}


def run_jitted(fn: Callable[..., Any], A: Any, *args: Any, **static: Any) -> Any:
    """``fn(A, *args, **static)`` under ``jit``, compiled once per setting and input structure.

    A dense matrix or a CurvatureOperator (a pytree of arrays) is passed as data; a plain
    function is passed as a static (hashed) argument. Keyword arguments are static.
    """
    leaves = jax.tree_util.tree_leaves(A)
    as_data = bool(leaves) and all(isinstance(x, jax.Array | np.ndarray) for x in leaves)
    try:
        hash(A)
    except TypeError:
        if not as_data:
            return fn(A, *args, **static)
    cache_key = (fn, as_data, tuple(sorted(static)))
    if cache_key not in _JITTED:
        static_argnums = () if as_data else (0,)
        _JITTED[cache_key] = jax.jit(
            fn, static_argnums=static_argnums, static_argnames=tuple(static)
        )
    return _JITTED[cache_key](A, *args, **static)


# ----------------------------------------------------------------------------------------
# vectors and bases as pytrees; a basis V has leaves (m, *leaf_shape)


def _explicitly_sharded(x: jax.Array) -> bool:
    """Whether `x`'s type carries a sharded axis (explicit mesh axes)."""
    sharding = getattr(jax.typeof(x), "sharding", None)
    spec = getattr(sharding, "spec", None)
    return spec is not None and any(s is not None for s in spec)


def project(V: PyTree, w: PyTree) -> jax.Array:
    """``(m,)`` inner products ``⟨V[i], w⟩`` of every basis vector with `w`.

    A contraction over sharded axes has no unambiguous output sharding under explicit mesh
    axes, so such leaves use an elementwise product and a sum (an all-reduce); other leaves
    use ``tensordot``, which XLA:CPU runs about 3x faster.
    """
    total = None
    for Vl, wl in zip(jax.tree_util.tree_leaves(V), jax.tree_util.tree_leaves(w), strict=True):
        if _explicitly_sharded(Vl) or _explicitly_sharded(wl):
            part = jnp.sum(Vl * wl[None], axis=tuple(range(1, Vl.ndim)))
        else:
            part = jnp.tensordot(Vl, wl, wl.ndim)
        total = part if total is None else total + part.astype(total.dtype)
    assert total is not None
    return total


def combine(coeffs: jax.Array, V: PyTree) -> PyTree:
    """``Σᵢ coeffs[i] V[i]``, a vector like one row of V."""
    return jax.tree_util.tree_map(lambda Vl: jnp.tensordot(coeffs.astype(Vl.dtype), Vl, 1), V)


def tree_norm(x: PyTree) -> jax.Array:
    return jnp.sqrt(tree_vdot(x, x))


def _axpy(a: Any, x: PyTree, y: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda xl, yl: yl + jnp.asarray(a, yl.dtype) * xl, x, y)


def _scale(a: Any, x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda xl: xl * jnp.asarray(a, xl.dtype), x)


def _sub(x: PyTree, y: PyTree) -> PyTree:
    return jax.tree_util.tree_map(jnp.subtract, x, y)


def row(V: PyTree, j: Any) -> PyTree:
    return jax.tree_util.tree_map(lambda Vl: Vl[j], V)


def set_row(V: PyTree, j: Any, x: PyTree) -> PyTree:
    return jax.tree_util.tree_map(lambda Vl, xl: Vl.at[j].set(xl.astype(Vl.dtype)), V, x)


def empty_basis(zero: PyTree, m: int) -> PyTree:
    """m zero vectors like `zero` (leaves ``(m, *shape)``, same layout)."""
    return jax.tree_util.tree_map(lambda z: jnp.broadcast_to(z[None], (m, *z.shape)), zero)


def _normalize(x: PyTree) -> tuple[PyTree, jax.Array]:
    norm = tree_norm(x)
    return _scale(1 / jnp.where(norm > 0, norm, 1), x), norm


def _orthogonalize(V: PyTree, w: PyTree) -> tuple[PyTree, jax.Array]:
    """Classical Gram-Schmidt against the rows of V, twice ("twice is enough")."""
    h = project(V, w)
    w = _sub(w, combine(h, V))
    h2 = project(V, w)
    return _sub(w, combine(h2, V)), h + h2


def _expand(
    matvec: TreeMatVec, V: PyTree, H: jax.Array, j: jax.Array, key: jax.Array
) -> tuple[PyTree, jax.Array, jax.Array]:
    """One Lanczos step on basis row j: ``w = A v_j`` made orthogonal to every row of V.

    Writes column (and row) j of the projected matrix ``H = V A Vᵀ`` and the next unit vector
    ``V[j+1]``; returns ``(V, H, β)`` with ``β = ‖w‖``. On breakdown (β at rounding level) the
    next vector is a random direction orthogonal to V and β is 0, so nothing is divided by 0.
    """
    aw = matvec(row(V, j))
    w, h = _orthogonalize(V, aw)
    beta = tree_norm(w)
    eps = jnp.finfo(H.dtype).eps
    broke = beta <= 10 * eps * tree_norm(aw)

    def fresh(w: PyTree) -> PyTree:
        r = random_tree(jax.random.fold_in(key, j), jax.tree_util.tree_map(jnp.zeros_like, w))
        return _orthogonalize(V, r)[0]

    w = jax.lax.cond(broke, fresh, lambda w: w, w)
    v_next, _ = _normalize(w)
    beta = jnp.where(broke, jnp.zeros_like(beta), beta)
    V = set_row(V, j + 1, v_next)
    m = H.shape[0]
    h = h[:m].astype(H.dtype)
    H = H.at[:, j].set(h).at[j, :].set(h)
    return V, H, beta


def _start_vector(v0: PyTree, key: jax.Array) -> PyTree:
    v, norm = _normalize(v0)
    fallback = _normalize(random_tree(key, jax.tree_util.tree_map(jnp.zeros_like, v0)))[0]
    return jax.tree_util.tree_map(lambda a, b: jnp.where(norm > 0, a, b), v, fallback)


def lanczos_tree(
    matvec: TreeMatVec, v0: PyTree, num_steps: int, key: jax.Array | None = None
) -> tuple[jax.Array, jax.Array, PyTree]:
    """``(alphas, betas, V)`` of `num_steps` Lanczos steps; V's leaves have leading axis m."""
    key = jax.random.PRNGKey(0) if key is None else key
    m = num_steps
    dtype = jnp.result_type(*jax.tree_util.tree_leaves(v0))
    zero = jax.tree_util.tree_map(jnp.zeros_like, v0)
    V = set_row(empty_basis(zero, m + 1), 0, _start_vector(v0, key))
    H = jnp.zeros((m, m), dtype)

    def step(j: jax.Array, carry: tuple[PyTree, jax.Array, jax.Array]) -> Any:
        V, H, betas = carry
        V, H, beta = _expand(matvec, V, H, j, key)
        return V, H, betas.at[j].set(beta)

    V, H, betas = jax.lax.fori_loop(0, m, step, (V, H, jnp.zeros((m,), dtype)))
    return jnp.diagonal(H), betas, jax.tree_util.tree_map(lambda Vl: Vl[:m], V)


def lanczos(A: Any, v0: PyTree, num_steps: int) -> LanczosResult:
    """Lanczos tridiagonalization with full reorthogonalization.

    ``V A Vᵀ = T = tridiag(betas[:-1], alphas, betas[:-1])`` with V's rows an orthonormal basis
    of the Krylov space ``span{v0, A v0, …, A^{m−1} v0}``. Every new vector is orthogonalized
    against all previous ones (twice), so the basis stays orthonormal to rounding and no
    spurious copies of converged eigenvalues appear. Runs as one ``lax.fori_loop`` on pytrees
    like `v0` (never raveled, so sharded parameters stay sharded); jit- and vmap-able.

    Cost: `num_steps` products with A, plus ``O(m² n)`` flops and ``(m + 1) n`` memory.

    Args:
        A: a CurvatureOperator (or any object with ``mv`` and ``in_structure``), a callable
            ``v -> A v`` on pytrees shaped like `v0`, or a dense symmetric ``(n, n)`` array.
        v0: the start vector, a pytree (normalized here; a zero vector is replaced by a
            random one).
        num_steps: m, the number of Lanczos vectors, ``1 <= m <= n``.

    Returns:
        A :class:`LanczosResult` ``(alphas, betas, basis)``; see its fields for the layout.

    Raises:
        ValueError: `num_steps` is not a positive integer or exceeds the dimension n; `v0`
            does not match A's input structure.

    References:
        Lanczos, J. Res. Nat. Bur. Standards 45, 1950; Golub & Van Loan, Matrix
        Computations, 4th ed., §10.1.
    """
    has_structure = callable(getattr(A, "in_structure", None)) or (
        hasattr(A, "shape") and not callable(A)
    )
    op = tree_operator(A, None if has_structure else v0)
    if has_structure:
        check_like(op.structure, v0, "A's input", "v0")
    _check_steps(num_steps, op.size, "num_steps")
    like = None if has_structure else v0
    return run_jitted(_lanczos_impl, A, like, v0, num_steps=num_steps)


def _lanczos_impl(A: Any, like: PyTree | None, v0: PyTree, *, num_steps: int) -> LanczosResult:
    op = tree_operator(A, like, template=v0)
    v0 = jax.tree_util.tree_map(lambda x, s: jnp.asarray(x, s.dtype), v0, op.structure)
    alphas, betas, V = lanczos_tree(op.matvec, v0, num_steps)
    return LanczosResult(alphas, betas, V)


def _check_steps(num_steps: Any, n: int, name: str) -> None:
    check_positive_int(num_steps, name)
    if num_steps > n:
        msg = f"{name} must be at most the dimension n = {n} of A; got {num_steps}"
        raise ValueError(msg)


def _check_key(key: Any, fn: str) -> None:
    if key is None:
        msg = (
            f"{fn} needs a random key for its start vector: pass key=jax.random.PRNGKey(0) "
            f"(or any key); got None"
        )
        raise ValueError(msg)


# ----------------------------------------------------------------------------------------
# eigsh: thick-restart Lanczos, converged to tol


def _ritz(H: jax.Array, size: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigenpairs of the leading ``size × size`` block of H: ``(θ, S, active)``.

    H has a fixed shape; the inactive part is replaced by distinct diagonal values far above
    the spectrum, and ``active`` marks the eigenpairs that belong to the leading block.
    """
    m = H.shape[0]
    inside = jnp.arange(m) < size
    block = jnp.where(inside[:, None] & inside[None, :], H, 0)
    far = 2 * jnp.max(jnp.sum(jnp.abs(block), axis=1)) + 1
    sentinels = far * (2 + jnp.arange(m, dtype=H.dtype))
    theta, S = jnp.linalg.eigh(block + jnp.diag(jnp.where(inside, 0, sentinels)))
    active = jnp.sum(jnp.where(inside[:, None], S**2, 0), axis=0) > 0.5
    return theta, S, active


def _wanted(theta: jax.Array, active: jax.Array, which: str, count: int) -> jax.Array:
    """Indices of the `count` wanted Ritz values among the active ones, most wanted first."""
    score = {"LA": theta, "SA": -theta, "LM": jnp.abs(theta)}[which]
    return jax.lax.top_k(jnp.where(active, score, -jnp.inf), count)[1]


class _EigshState(NamedTuple):
    V: PyTree
    H: jax.Array
    j: jax.Array
    beta: jax.Array
    converged: jax.Array
    stop: jax.Array
    num_matvecs: jax.Array
    num_restarts: jax.Array


def _residuals(H: jax.Array, size: jax.Array, beta: jax.Array, which: str, k: int) -> Any:
    """``(θ, S, idx, residual)`` for the k wanted Ritz pairs of the leading block of H."""
    theta, S, active = _ritz(H, size)
    idx = _wanted(theta, active, which, k)
    last = jnp.take(S, size - 1, axis=0)
    residual = jnp.abs(beta) * jnp.abs(last[idx])
    return theta, S, idx, residual


def _thick_restart(state: _EigshState, which: str, keep: int) -> tuple[PyTree, jax.Array]:
    """Keep the `keep` wanted Ritz vectors plus the residual direction (Wu & Simon 2000)."""
    m = state.H.shape[0]
    theta, S = jnp.linalg.eigh(state.H)
    idx = _wanted(theta, jnp.ones((m,), bool), which, keep)
    Y = S[:, idx]
    old = jax.tree_util.tree_map(lambda Vl: Vl[:m], state.V)
    kept = jax.vmap(combine, in_axes=(1, None))(Y, old)  # leaves (keep, ...)

    def restarted(Vl: jax.Array, Kl: jax.Array) -> jax.Array:
        return jnp.zeros_like(Vl).at[:keep].set(Kl).at[keep].set(Vl[m])

    V = jax.tree_util.tree_map(restarted, state.V, kept)
    coupling = state.beta * Y[m - 1]
    H = jnp.zeros_like(state.H).at[jnp.arange(keep), jnp.arange(keep)].set(theta[idx])
    H = H.at[keep, :keep].set(coupling).at[:keep, keep].set(coupling)
    return V, H


def eigsh_tree(
    matvec: TreeMatVec,
    v0: PyTree,
    k: int,
    which: str,
    num_steps: int,
    tol: float,
    maxiter: int,
    key: jax.Array,
) -> tuple[jax.Array, PyTree, EigshInfo]:
    """Thick-restart Lanczos on pytrees; eigenvectors as leaves with a leading axis k."""
    leaves = jax.tree_util.tree_leaves(v0)
    m, n = num_steps, sum(leaf.size for leaf in leaves)
    keep = min(m - 1, k + (m - k) // 2) if m < n else m - 1
    dtype = jnp.result_type(*leaves)
    tiny = jnp.finfo(dtype).eps ** (2 / 3)

    def body(s: _EigshState) -> _EigshState:
        V, H, beta = _expand(matvec, s.V, s.H, s.j, jax.random.fold_in(key, s.num_matvecs))
        size = s.j + 1
        theta, _, idx, residual = _residuals(H, size, beta, which, k)
        scale = jnp.maximum(jnp.abs(theta[idx]), tiny * jnp.max(jnp.abs(theta[idx])))
        converged = (size >= k) & jnp.all(residual <= tol * scale)
        full = size == m
        out_of_budget = full & (s.num_restarts >= maxiter)
        restart = full & ~converged & ~out_of_budget
        s = s._replace(V=V, H=H, j=size, beta=beta, num_matvecs=s.num_matvecs + 1)
        V, H = jax.lax.cond(restart, lambda: _thick_restart(s, which, keep), lambda: (V, H))
        return s._replace(
            V=V,
            H=H,
            j=jnp.where(restart, keep, size),
            converged=converged,
            stop=converged | out_of_budget,
            num_restarts=s.num_restarts + restart.astype(s.num_restarts.dtype),
        )

    zero = jnp.zeros((), jnp.int32)
    init = _EigshState(
        V=set_row(
            empty_basis(jax.tree_util.tree_map(jnp.zeros_like, v0), m + 1),
            0,
            _start_vector(v0, key),
        ),
        H=jnp.zeros((m, m), dtype),
        j=zero,
        beta=jnp.zeros((), dtype),
        converged=jnp.zeros((), bool),
        stop=jnp.zeros((), bool),
        num_matvecs=zero,
        num_restarts=zero,
    )
    s = jax.lax.while_loop(lambda s: ~s.stop, body, init)
    theta, S, idx, residual = _residuals(s.H, s.j, s.beta, which, k)
    order = jnp.argsort(theta[idx])
    idx, residual = idx[order], residual[order]
    old = jax.tree_util.tree_map(lambda Vl: Vl[:m], s.V)
    vectors = jax.vmap(combine, in_axes=(1, None))(S[:, idx], old)
    info = EigshInfo(residual, s.converged, s.num_matvecs, s.num_restarts)
    return theta[idx], vectors, info


def eigsh(
    A: Any,
    k: int = 1,
    *,
    which: str = "LA",
    key: jax.Array | None = None,
    num_steps: int | None = None,
    tol: float | None = None,
    maxiter: int = 1000,
    like: PyTree | None = None,
    return_info: bool = False,
) -> Any:
    """The k extreme eigenpairs of a symmetric operator, by thick-restart Lanczos.

    Solves ``A y = θ y`` for the k algebraically largest (``"LA"``), smallest (``"SA"``) or
    largest-magnitude (``"LM"``) eigenvalues. The Krylov space grows one product at a time
    and the Ritz residuals ``‖A y − θ y‖ = β·|s_last|`` are checked after every product; it
    stops as soon as all k satisfy ``‖A y − θ y‖ <= tol·|θ|``. When the basis reaches
    `num_steps` vectors it is thick-restarted (Wu & Simon 2000): the best Ritz vectors are
    kept and the space grows again, so memory stays ``(num_steps + 1) n``. The whole solve
    is one ``lax.while_loop``: jit-, vmap-able.

    Cost: as many products (HVPs) as convergence needs, reported in ``info.num_matvecs``;
    typically fewer than ARPACK (``scipy.sparse.linalg.eigsh``) at the same tolerance, since
    convergence is checked every step rather than every restart cycle. Plus ``O(m² n)``
    flops of reorthogonalization per product.

    Args:
        A: a CurvatureOperator (or anything with ``mv`` and ``in_structure``), a callable
            ``v -> A v`` (then pass `like`), or a dense symmetric ``(n, n)`` array.
        k: number of eigenpairs, ``1 <= k <= n``.
        which: ``"LA"`` (default), ``"SA"`` or ``"LM"``.
        key: a ``jax.random`` key for the random start vector; required.
        num_steps: the largest Krylov basis kept (memory, in vectors); default
            ``min(n, max(3k, 30))``, a little above ARPACK's ``ncv = max(2k + 1, 20)``, which
            saves products on restarts. Needs ``num_steps > k`` unless it equals n.
        tol: relative residual tolerance; default ``sqrt(eps)`` of A's dtype (about 3e-4 in
            float32, 1.5e-8 in float64). The eigenvalue error is then about
            ``tol²·|θ|²/gap``.
        maxiter: maximum number of thick restarts.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        return_info: also return an :class:`EigshInfo`.

    Returns:
        ``(eigenvalues, eigenvectors)`` or, with `return_info`, ``(eigenvalues, eigenvectors,
        info)``. ``eigenvalues`` is ``(k,)`` in ascending order, as scipy returns them;
        ``eigenvectors`` is a pytree like A's input whose every leaf has a leading axis k:
        ``eigenvectors[i]`` (each leaf indexed at i) is the unit eigenvector of
        ``eigenvalues[i]``. For a dense matrix that is a ``(k, n)`` array (scipy returns
        the transpose). If the tolerance is not met within `maxiter` restarts, the best Ritz
        pairs are returned, ``info.converged`` is False and, outside ``jit``, a
        ``RuntimeWarning`` is issued.

    Raises:
        ValueError: `key` is missing; `k` or `num_steps` is out of range; `which` is unknown.

    Example:
        >>> A = jnp.diag(jnp.array([-3.0, 1.0, 2.0, 5.0]))
        >>> eigsh(A, 2, key=jax.random.PRNGKey(0))[0]  # ≈ [2., 5.]

    Limitations: from one start vector Lanczos sees one copy of an exactly repeated
    eigenvalue (multiplicity needs a block method); nearby distinct eigenvalues are fine.

    References:
        Wu & Simon, "Thick-restart Lanczos method for large symmetric eigenvalue problems",
        SIAM J. Matrix Anal. Appl. 22, 2000; Stewart, "A Krylov-Schur algorithm for large
        eigenproblems", SIAM J. Matrix Anal. Appl. 23, 2001.
    """
    check_choice(which, WHICH, "which")
    _check_key(key, "eigsh")
    assert key is not None
    op = tree_operator(A, like)
    check_positive_int(k, "k")
    if k > op.size:
        msg = f"k must be at most the dimension n = {op.size} of A; got k = {k}"
        raise ValueError(msg)
    m = min(op.size, max(3 * k, 30)) if num_steps is None else num_steps
    _check_steps(m, op.size, "num_steps")
    if m <= k and m < op.size:
        msg = f"num_steps must exceed k (or equal n = {op.size}); got num_steps = {m}, k = {k}"
        raise ValueError(msg)
    check_positive_int(maxiter, "maxiter")
    tol = float(np.sqrt(np.finfo(op.dtype).eps)) if tol is None else tol
    if not tol > 0:
        msg = f"tol must be positive; got {tol!r}"
        raise ValueError(msg)
    statics = {"k": k, "which": which, "num_steps": m, "tol": tol, "maxiter": maxiter}
    values, eigenvectors, info = run_jitted(_eigsh_impl, A, like, key, **statics)
    if not isinstance(info.converged, Tracer) and not bool(info.converged):
        warnings.warn(
            f"eigsh did not reach tol = {tol:g} in {int(info.num_matvecs)} products "
            f"({maxiter} restarts); residuals {np.asarray(info.residuals)}. Raise maxiter "
            f"or num_steps, or loosen tol.",
            RuntimeWarning,
            stacklevel=2,
        )
    if return_info:
        return values, eigenvectors, info
    return values, eigenvectors


def _eigsh_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    k: int,
    which: str,
    num_steps: int,
    tol: float,
    maxiter: int,
) -> tuple[jax.Array, PyTree, EigshInfo]:
    op = tree_operator(A, like)
    k_start, k_run = jax.random.split(key)
    v0 = random_tree(k_start, zeros(op))
    return eigsh_tree(op.matvec, v0, k, which, num_steps, tol, maxiter, k_run)


# ----------------------------------------------------------------------------------------
# spectral density: stochastic Lanczos quadrature


def _quadrature(matvec: TreeMatVec, v0: PyTree, num_steps: int) -> tuple[jax.Array, jax.Array]:
    """Gauss quadrature of ``v0ᵀ g(A) v0 / ‖v0‖²``: nodes θ (Ritz values), weights ``s_0²``."""
    alphas, betas, _ = lanczos_tree(matvec, v0, num_steps)
    T = jnp.diag(alphas) + jnp.diag(betas[:-1], 1) + jnp.diag(betas[:-1], -1)
    theta, S = jnp.linalg.eigh(T)
    return theta, S[0] ** 2


def spectral_density(
    A: Any,
    key: jax.Array,
    *,
    num_probes: int,
    num_steps: int,
    num_points: int = 1000,
    sigma: float | None = None,
    like: PyTree | None = None,
    chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    ``φ(t) = (1/n) Σᵢ δ(t − λᵢ) ≈ (1/P) Σₚ Σⱼ τₚⱼ g_σ(t − θₚⱼ)``: for each of P Rademacher
    probes, m Lanczos steps give Gauss quadrature nodes θ (Ritz values) and weights τ (the
    squared first components of T's eigenvectors); each node is broadened by a Gaussian
    ``g_σ``. The density is normalized so its trapezoid integral over the grid is 1; the
    mass near an eigenvalue cluster estimates the fraction of eigenvalues in it.

    Cost: ``num_probes × num_steps`` products, probes run together (``vmap``) or
    `chunk_size` at a time; memory ``(num_steps + 1) n`` per probe running at once.

    Args:
        A: an operator, a callable ``v -> A v`` (then pass `like`), or a dense symmetric
            matrix.
        key: a ``jax.random`` key for the probes.
        num_probes: P >= 1.
        num_steps: Lanczos steps per probe, ``1 <= m <= n``.
        num_points: grid points.
        sigma: Gaussian width; default 1% of the spread of the Ritz values.
        like: an example pytree shaped like A's input, needed when A is a plain callable.
        chunk_size: at most this many probes at once; None runs all together.

    Returns:
        ``(grid, density)``, both ``(num_points,)``; the grid spans the Ritz values ± 5σ.

    Raises:
        ValueError: `key` missing, or `num_probes`, `num_steps`, `num_points`, `chunk_size`
            or `sigma` out of range.

    References:
        Lin, Saad & Yang, "Approximating spectral densities of large matrices", SIAM Review
        58, 2016; Ghorbani, Krishnan & Xiao, "An investigation into neural net optimization
        via Hessian eigenvalue density", ICML 2019.
    """
    _check_key(key, "spectral_density")
    op = tree_operator(A, like)
    check_positive_int(num_probes, "num_probes")
    _check_steps(num_steps, op.size, "num_steps")
    check_positive_int(num_points, "num_points")
    check_positive_int(chunk_size, "chunk_size", allow_none=True)
    if num_points < 2:
        msg = f"num_points must be at least 2; got {num_points}"
        raise ValueError(msg)
    if sigma is not None and not sigma > 0:
        msg = f"sigma must be positive or None; got {sigma!r}"
        raise ValueError(msg)

    statics = {"num_probes": num_probes, "num_steps": num_steps, "num_points": num_points}
    statics |= {"sigma": sigma, "chunk_size": chunk_size}
    return run_jitted(_density_impl, A, like, key, **statics)


def _density_impl(
    A: Any,
    like: PyTree | None,
    key: jax.Array,
    *,
    num_probes: int,
    num_steps: int,
    num_points: int,
    sigma: float | None,
    chunk_size: int | None,
) -> tuple[jax.Array, jax.Array]:
    op = tree_operator(A, like)
    zero = zeros(op)

    def one(probe_key: jax.Array) -> tuple[jax.Array, jax.Array]:
        v0 = random_tree(probe_key, zero, "rademacher")
        return _quadrature(op.matvec, v0, num_steps)

    keys = jax.random.split(key, num_probes)
    if any(_explicitly_sharded(leaf) for leaf in jax.tree_util.tree_leaves(zero)):
        # Under explicit mesh axes, vmap would turn Lanczos' breakdown cond into a select
        # whose batched predicate cannot carry the vectors' sharding (JAX refuses it): run
        # the probes one after another instead; each product is still sharded.
        nodes, weights = jax.lax.map(one, keys)
    elif chunk_size is None:
        nodes, weights = jax.vmap(one)(keys)
    else:
        nodes, weights = jax.lax.map(one, keys, batch_size=chunk_size)
    return broadened_density(nodes, weights, num_points, sigma)


def broadened_density(
    nodes: jax.Array, weights: jax.Array, num_points: int, sigma: float | None
) -> tuple[jax.Array, jax.Array]:
    """Gaussian-broadened mixture of point masses ``weights`` at ``nodes``, normalized."""
    lo, hi = jnp.min(nodes), jnp.max(nodes)
    spread = hi - lo
    fallback = jnp.maximum(jnp.abs(hi), 1)
    width = jnp.where(spread > 0, spread, fallback) * 0.01 if sigma is None else sigma
    width = jnp.asarray(width, nodes.dtype)
    grid = jnp.linspace(lo - 5 * width, hi + 5 * width, num_points, dtype=nodes.dtype)
    z = (grid[:, None] - nodes.reshape(-1)[None, :]) / width
    gauss = jnp.exp(-0.5 * z**2) / (width * jnp.sqrt(2 * jnp.pi).astype(nodes.dtype))
    density = gauss @ weights.reshape(-1) / nodes.shape[0]
    return grid, density / jnp.trapezoid(density, grid)

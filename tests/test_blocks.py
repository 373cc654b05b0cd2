"""Parameter blocks (restrict, hessian(wrt=), block_diagonal, blocks) vs dense float64 sub-blocks.

References are the dense float64 matrices of ``jax.hessian`` over ``ravel_pytree`` (or the
full operator's ``to_dense()`` for ggn/fisher, tested against their own references in
test_operators.py), cut to the entries of the selected leaves by an index set built here
from the leaves' key paths, independently of the mask code under test.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessfree as hf
from helpers import count_compiles, dense_hessian, flat, random_like
from hessfree import _staging, block_diagonal, blocks, layer_masks
from hessfree._operators import embed, select

D_IN, HIDDEN, C, B = 3, 4, 3, 5


@functools.cache
def make_params(dtype=jnp.float64):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    return {
        "layer1": {
            "w": jax.random.normal(k1, (D_IN, HIDDEN), dtype),
            "b": 0.1 * jax.random.normal(k3, (HIDDEN,), dtype),
        },
        "layer2": {
            "w": jax.random.normal(k2, (HIDDEN, C), dtype) / 2,
            "b": 0.1 * jax.random.normal(k4, (C,), dtype),
        },
    }


@functools.cache
def make_data(dtype=jnp.float64):
    kx, ky = jax.random.split(jax.random.key(1))
    return jax.random.normal(kx, (B, D_IN), dtype), jax.random.randint(ky, (B,), 0, C)


def mlp(p, x):
    h = jnp.tanh(x @ p["layer1"]["w"] + p["layer1"]["b"])
    return h @ p["layer2"]["w"] + p["layer2"]["b"]


def loss(p, x, y):
    logits = mlp(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def build(kind, p, x, y):
    if kind == "hessian":
        return hf.hessian(loss, p, x, y)
    if kind == "ggn":
        return hf.ggn(mlp, "softmax_cross_entropy", p, x, y)
    return hf.fisher(mlp, p, x, likelihood="categorical", kind="mc", key=jax.random.key(3))


def index(params, chosen):
    """Flat indices (ravel_pytree order) of the leaves whose key path is in `chosen`."""
    marks = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full(jnp.shape(leaf), jax.tree_util.keystr(path) in chosen),
        params,
    )
    return np.flatnonzero(np.asarray(ravel_pytree(marks)[0]))


def sub(dense, idx):
    return np.asarray(dense)[np.ix_(idx, idx)]


L1 = ("['layer1']['w']", "['layer1']['b']")
L2 = ("['layer2']['w']", "['layer2']['b']")
# (mask, the leaves it selects)
MASKS = [
    ({"layer1": True, "layer2": False}, L1),  # prefix
    ({"layer1": {"w": True, "b": False}, "layer2": {"w": False, "b": True}}, (L1[0], L2[1])),
    ({"layer1": False, "layer2": {"w": True, "b": True}}, L2),  # mixed
]


# --- restrict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hessian", "ggn", "fisher"])
def test_restrict_is_the_dense_sub_block(kind):
    p, (x, y) = make_params(), make_data()
    op = build(kind, p, x, y)
    full = dense_hessian(loss, p, x, y) if kind == "hessian" else np.asarray(op.to_dense())
    for mask, chosen in MASKS:
        idx = index(p, chosen)
        R = op.restrict(mask)
        assert R.shape == (idx.size, idx.size) and R.psd == op.psd
        np.testing.assert_allclose(R.to_dense(), sub(full, idx), rtol=1e-10, atol=1e-12)
        v = select(random_like(jax.random.key(4), p), mask)
        np.testing.assert_allclose(flat(R.mv(v)), sub(full, idx) @ flat(v), rtol=1e-10, atol=1e-12)


def test_restricted_structure_keeps_the_tree_with_none_in_unselected_leaves():
    p, (x, y) = make_params(), make_data()
    R = hf.hessian(loss, p, x, y).restrict({"layer1": True, "layer2": {"w": False, "b": True}})
    s = R.in_structure()
    assert s["layer2"]["w"] is None and s["layer1"]["w"].shape == (D_IN, HIDDEN)
    assert jax.tree_util.tree_structure(s) == jax.tree_util.tree_structure(
        {"layer1": {"w": 0, "b": 0}, "layer2": {"w": None, "b": 0}}
    )
    assert "['layer1']" in R.label
    v = random_like(jax.random.key(0), p)
    part = select(v, {"layer1": True, "layer2": False})
    assert part["layer2"] is None or jax.tree_util.tree_leaves(part["layer2"]) == []
    back = embed(part, {"layer1": True, "layer2": False}, p)
    np.testing.assert_array_equal(back["layer1"]["w"], v["layer1"]["w"])
    np.testing.assert_array_equal(back["layer2"]["b"], np.zeros(C))


@pytest.mark.parametrize("cache", [True, False])
def test_hessian_wrt_equals_restrict(cache):
    p, (x, y) = make_params(), make_data()
    full = dense_hessian(loss, p, x, y)
    for mask, chosen in MASKS:
        W = hf.hessian(loss, p, x, y, wrt=mask, cache=cache)
        R = hf.hessian(loss, p, x, y).restrict(mask)
        assert W.in_structure() == R.in_structure() and W.label == R.label
        np.testing.assert_allclose(
            W.to_dense(), sub(full, index(p, chosen)), rtol=1e-10, atol=1e-12
        )


def test_hessian_wrt_leaves_non_floating_leaves_alone():
    def f(p):
        return jnp.sum(p["w"] ** 3) * p["count"]

    p = {"w": jnp.arange(1.0, 4.0), "count": jnp.asarray(2, jnp.int32)}
    W = hf.hessian(f, p, wrt={"w": True, "count": False})
    np.testing.assert_allclose(W.to_dense(), np.diag(12.0 * np.arange(1.0, 4.0)))


def test_scale_and_damping_carry_over():
    p, (x, y) = make_params(), make_data()
    H = hf.hessian(loss, p, x, y)
    mask, chosen = MASKS[1]
    block = sub(dense_hessian(loss, p, x, y), index(p, chosen))
    eye = np.eye(block.shape[0])
    for R in ((2.0 * H + 1.0).restrict(mask), 2.0 * H.restrict(mask) + 1.0):
        assert float(R.scale) == 2.0 and float(R.damping) == 1.0
        np.testing.assert_allclose(R.to_dense(), 2 * block + eye, rtol=1e-10, atol=1e-12)
    W = 3.0 * hf.hessian(loss, p, x, y, wrt=mask) + 0.25
    np.testing.assert_allclose(W.to_dense(), 3 * block + 0.25 * eye, rtol=1e-10, atol=1e-12)


def test_nested_prefix_callable_and_path_masks():
    k = jax.random.split(jax.random.key(5), 5)
    p = {
        "enc": {
            "l1": {"w": jax.random.normal(k[0], (2, 3)), "b": jax.random.normal(k[1], (3,))},
            "l2": {"w": jax.random.normal(k[2], (3, 2))},
        },
        "head": (jax.random.normal(k[3], (2,)), jax.random.normal(k[4], ())),
    }

    def f(q):
        h = jnp.tanh(jnp.ones(2) @ q["enc"]["l1"]["w"] + q["enc"]["l1"]["b"])
        return jnp.sum(jnp.sin(h @ q["enc"]["l2"]["w"] * q["head"][0]) * q["head"][1] ** 2)

    full, H = dense_hessian(f, p), hf.hessian(f, p)
    l1 = ("['enc']['l1']['w']", "['enc']['l1']['b']")
    cases = [
        ({"enc": {"l1": True, "l2": False}, "head": (False, True)}, (*l1, "['head'][1]")),
        ({"enc": False, "head": True}, ("['head'][0]", "['head'][1]")),
        (True, (*l1, "['enc']['l2']['w']", "['head'][0]", "['head'][1]")),
        (lambda s: jax.tree.map(lambda a: a.ndim == 2, s), (l1[0], "['enc']['l2']['w']")),
        # container types may differ where key paths agree: a list for the tuple
        (
            {"enc": {"l1": {"w": False, "b": True}, "l2": True}, "head": [True, False]},
            (l1[1], "['enc']['l2']['w']", "['head'][0]"),
        ),
    ]
    for mask, chosen in cases:
        want = sub(full, index(p, chosen))
        np.testing.assert_allclose(H.restrict(mask).to_dense(), want, rtol=1e-10, atol=1e-12)
        W = hf.hessian(f, p, wrt=mask)
        np.testing.assert_allclose(W.to_dense(), want, rtol=1e-10, atol=1e-12)
    # restricting twice: the mask of the second call is against the first's sub-pytree
    twice = H.restrict({"enc": True, "head": False}).restrict({"enc": {"l1": True, "l2": False}})
    np.testing.assert_allclose(twice.to_dense(), sub(full, index(p, l1)), rtol=1e-10)


# --- block_diagonal and blocks -----------------------------------------------------------------


def block_diagonal_of(dense, index_sets):
    out = np.zeros_like(dense)
    for idx in index_sets:
        out[np.ix_(idx, idx)] = dense[np.ix_(idx, idx)]
    return out


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_block_diagonal_is_the_block_diagonal_of_the_dense_matrix(kind):
    p, (x, y) = make_params(), make_data()
    op = build(kind, p, x, y)
    full = dense_hessian(loss, p, x, y) if kind == "hessian" else np.asarray(op.to_dense())
    groups = [(L1[0], L2[1]), (L1[1],), (L2[0],)]
    masks = [
        {"layer1": {"w": True, "b": False}, "layer2": {"w": False, "b": True}},
        {"layer1": {"w": False, "b": True}, "layer2": False},
        {"layer1": False, "layer2": {"w": True, "b": False}},
    ]
    want = block_diagonal_of(full, [index(p, g) for g in groups])
    for chunk_size in (None, 2):
        D = block_diagonal(op, masks, chunk_size=chunk_size)
        assert D.in_structure() == op.in_structure() and D.psd == op.psd
        np.testing.assert_allclose(D.to_dense(), want, rtol=1e-10, atol=1e-12)
    # default: one block per layer; damping and scale carry over
    D = block_diagonal(0.5 * op + 0.1)
    want = block_diagonal_of(full, [index(p, L1), index(p, L2)])
    np.testing.assert_allclose(
        D.to_dense(), 0.5 * want + 0.1 * np.eye(len(want)), rtol=1e-10, atol=1e-12
    )


def test_default_blocks_are_layers():
    p = make_params()
    assert layer_masks(p) == [
        {"layer1": {"w": True, "b": True}, "layer2": {"w": False, "b": False}},
        {"layer1": {"w": False, "b": False}, "layer2": {"w": True, "b": True}},
    ]
    # a flat list (or dict) of arrays: one block per leaf
    assert layer_masks([jnp.ones(2), jnp.ones(3), jnp.ones(1)]) == [
        [True, False, False],
        [False, True, False],
        [False, False, True],
    ]
    nested = {"enc": {"a": {"w": jnp.ones(2), "b": jnp.ones(1)}, "c": {"w": jnp.ones(2)}}}
    assert [jax.tree.leaves(m) for m in layer_masks(nested)] == [
        [True, True, False],
        [False, False, True],
    ]


def test_default_blocks_on_a_flax_nnx_state():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(3, 4, rngs=rngs)
            self.l2 = nnx.Linear(4, 2, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (5, 3))

    def model(s, x):
        return nnx.merge(graphdef, s)(x)

    G = hf.ggn(model, "mse", state, x, jnp.zeros((5, 2)))
    full = np.asarray(G.to_dense())
    l1 = ("['l1']['bias'].value", "['l1']['kernel'].value")
    l2 = ("['l2']['bias'].value", "['l2']['kernel'].value")
    D = block_diagonal(G)
    assert "2 blocks" in D.label
    want = block_diagonal_of(full, [index(state, l1), index(state, l2)])
    np.testing.assert_allclose(D.to_dense(), want, rtol=2e-5, atol=1e-6)
    # a plain dict mask selects the layer of an nnx.State (matched by key paths)
    R = G.restrict({"l1": False, "l2": True})
    np.testing.assert_allclose(R.to_dense(), sub(full, index(state, l2)), rtol=2e-5, atol=1e-6)


def test_blocks_give_per_layer_top_eigenvalues():
    p, (x, y) = make_params(), make_data()
    G = build("ggn", p, x, y)
    full = np.asarray(G.to_dense())
    per_layer = blocks(G)
    assert len(per_layer) == 2 and "['layer1']" in per_layer[0].label
    for R, chosen in zip(per_layer, (L1, L2), strict=True):
        top = hf.eigsh(R, 1, key=jax.random.key(0), tol=1e-10)
        want = np.linalg.eigvalsh(sub(full, index(p, chosen)))[-1]
        assert bool(top.success)
        np.testing.assert_allclose(top.eigenvalues[0], want, rtol=1e-8)


def test_eigsh_on_restricted_hessian_is_the_top_eigenvalue_of_the_sub_block():
    p, (x, y) = make_params(), make_data()
    mask, chosen = MASKS[2]
    block = sub(dense_hessian(loss, p, x, y), index(p, chosen))
    top = hf.eigsh(hf.hessian(loss, p, x, y, wrt=mask), 1, key=jax.random.key(2), tol=1e-10)
    np.testing.assert_allclose(top.eigenvalues[0], np.linalg.eigvalsh(block)[-1], rtol=1e-8)


def test_trace_and_cg_on_block_diagonal_match_dense():
    p, (x, y) = make_params(), make_data()
    G = build("ggn", p, x, y)
    D = block_diagonal(G) + 0.1
    dense = np.asarray(D.to_dense())
    n = dense.shape[0]
    tr = hf.trace(D, key=jax.random.key(0), num_probes=3 * n, method="hutch++")
    np.testing.assert_allclose(tr.value, np.trace(dense), rtol=1e-8)
    g = jax.grad(loss)(p, x, y)
    sol = hf.cg(D, g, rtol=1e-12, maxiter=10 * n)
    assert bool(sol.success)
    np.testing.assert_allclose(flat(sol.x), np.linalg.solve(dense, flat(g)), rtol=1e-7, atol=1e-10)
    # cg on a restricted operator solves the sub-block system
    mask, chosen = MASKS[0]
    R = G.restrict(mask) + 0.1
    rhs = select(g, mask)
    sol = hf.cg(R, rhs, rtol=1e-12, maxiter=200)
    want = np.linalg.solve(
        sub(np.asarray(G.to_dense()), index(p, chosen)) + 0.1 * np.eye(16), flat(rhs)
    )
    np.testing.assert_allclose(flat(sol.x), want, rtol=1e-7, atol=1e-10)


# --- misuse ------------------------------------------------------------------------------------


def test_bad_masks_raise_naming_the_argument():
    p, (x, y) = make_params(), make_data()
    H = hf.hessian(loss, p, x, y)
    with pytest.raises(ValueError, match=r"mask must have the tree structure"):
        H.restrict({"layer1": True})
    with pytest.raises(ValueError, match=r"mask must have the tree structure.*not None"):
        H.restrict({"layer1": True, "layer2": None})
    with pytest.raises(TypeError, match=r"mask must be a pytree of Python bools.*\['layer2'\]"):
        H.restrict({"layer1": True, "layer2": 1})
    with pytest.raises(TypeError, match=r"mask must be a pytree of Python bools"):
        H.restrict(jax.tree.map(lambda a: jnp.ones(a.shape, bool), p))
    with pytest.raises(TypeError, match=r"mask .*got None"):
        H.restrict(None)
    with pytest.raises(ValueError, match=r"mask must select at least one"):
        H.restrict({"layer1": False, "layer2": False})
    with pytest.raises(ValueError, match=r"wrt must select at least one"):
        hf.hessian(loss, p, x, y, wrt=False)
    with pytest.raises(ValueError, match=r"wrt must have the tree structure"):
        hf.hessian(loss, p, x, y, wrt=[True, False])
    with pytest.raises(
        ValueError, match=r"masks must be disjoint.*\['layer1'\]\['b'\].*masks\[0\] and masks\[1\]"
    ):
        block_diagonal(
            H,
            [
                {"layer1": True, "layer2": False},
                {"layer1": {"w": False, "b": True}, "layer2": True},
            ],
        )
    with pytest.raises(
        ValueError, match=r"masks must cover every parameter leaf; \['layer2'\]\['w'\]"
    ):
        block_diagonal(H, [{"layer1": True, "layer2": {"w": False, "b": True}}])
    with pytest.raises(ValueError, match=r"masks\[1\] must select at least one"):
        block_diagonal(H, [True, False])
    with pytest.raises(TypeError, match=r"masks must be a list or tuple"):
        block_diagonal(H, {"layer1": True, "layer2": False})
    with pytest.raises(ValueError, match=r"masks must hold at least one"):
        blocks(H, [])
    with pytest.raises(TypeError, match=r"op must be a CurvatureOperator"):
        block_diagonal(jnp.eye(3))
    with pytest.raises(TypeError, match=r"chunk_size"):
        block_diagonal(H, chunk_size=1.5)
    R = H.restrict(MASKS[0][0])
    with pytest.raises(ValueError, match=r"v must have the same tree structure"):
        R.mv(p)  # a full vector for a restricted operator


# --- dtypes, transformations, compiles ---------------------------------------------------------


def test_float32_stays_float32():
    p, (x, y) = make_params(jnp.float32), make_data(jnp.float32)
    H = hf.hessian(loss, p, x, y)
    mask = MASKS[1][0]
    v = select(random_like(jax.random.key(0), p), mask)
    for op in (H.restrict(mask), hf.hessian(loss, p, x, y, wrt=mask), block_diagonal(H)):
        assert op.dtype == np.float32
        assert op.to_dense().dtype == jnp.float32
    assert {leaf.dtype for leaf in jax.tree.leaves(H.restrict(mask).mv(v))} == {np.dtype("float32")}
    u = block_diagonal(H).mv(random_like(jax.random.key(0), p))
    assert {leaf.dtype for leaf in jax.tree.leaves(u)} == {np.dtype("float32")}


def tree_row(t, i):
    return jax.tree.map(lambda a: a[i], t)


def test_jit_and_vmap():
    p, (x, y) = make_params(), make_data()
    mask, chosen = MASKS[0]
    idx = index(p, chosen)
    full = dense_hessian(loss, p, x, y)
    vs = select(
        jax.tree.map(lambda a: jax.random.normal(jax.random.key(7), (3, *a.shape)), p), mask
    )

    @jax.jit
    def products(q, vs):
        R = hf.hessian(loss, q, x, y, wrt=mask)
        D = block_diagonal(hf.hessian(loss, q, x, y))
        return jax.vmap(R.mv)(vs), D.mv(embed(jax.tree.map(lambda a: a[0], vs), mask, q))

    out, bd = products(p, vs)
    V = np.stack([flat(tree_row(vs, i)) for i in range(3)])
    np.testing.assert_allclose(
        np.stack([flat(tree_row(out, i)) for i in range(3)]),
        V @ sub(full, idx).T,
        rtol=1e-10,
    )
    np.testing.assert_allclose(flat(bd)[idx], sub(full, idx) @ V[0], rtol=1e-10)
    # operators cross jit boundaries as arguments
    R = hf.hessian(loss, p, x, y).restrict(mask)
    got = jax.jit(lambda op, v: op.mv(v))(R, jax.tree.map(lambda a: a[0], vs))
    np.testing.assert_allclose(flat(got), sub(full, idx) @ V[0], rtol=1e-10)
    # vmap over parameters: one restricted Hessian per parameter point
    ps = jax.tree.map(lambda a: jnp.stack([a, 2 * a]), p)
    traces = jax.vmap(lambda q: jnp.trace(hf.hessian(loss, q, x, y, wrt=mask).to_dense()))(ps)
    want = [np.trace(sub(dense_hessian(loss, tree_row(ps, i), x, y), idx)) for i in (0, 1)]
    np.testing.assert_allclose(traces, want, rtol=1e-10)


def test_nothing_recompiles_at_new_params():
    p, (x, y) = make_params(jnp.float32), make_data(jnp.float32)
    mask = {"layer1": False, "layer2": True}
    g_fn = jax.jit(jax.grad(loss))

    def step(q, key):
        g = g_fn(q, x, y)
        R = hf.hessian(loss, q, x, y).restrict(mask)
        W = hf.hessian(loss, q, x, y, wrt=mask)
        G = hf.ggn(mlp, "softmax_cross_entropy", q, x, y)
        D = block_diagonal(G) + 1e-2
        per_layer = blocks(G)
        return {
            "r": R.mv(select(g, mask)),
            "w": W.mv(select(g, mask)),
            "top": hf.eigsh(per_layer[0], 1, key=key, maxiter=20).eigenvalues,
            "cg": hf.cg(D, g, maxiter=5).x,
            "tr": hf.trace(D, key=key, num_probes=4).value,
        }

    counts, sizes = [], []
    for i in range(4):
        with count_compiles() as compiled:
            out = jax.block_until_ready(step(p, jax.random.key(i)))
            p = jax.tree.map(lambda a, b: a - 0.1 * b, p, g_fn(p, x, y))
        counts.append(len(compiled))
        sizes.append((_staging.cache_size(), len(_staging._LINEAR)))
        assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(out))
    assert counts[0] > 0 and counts[1:] == [0, 0, 0], counts
    assert len(set(sizes)) == 1, sizes

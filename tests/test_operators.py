"""CurvatureOperator, hessian, ggn and fisher vs dense float64 references built independently."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessfree as hf
from helpers import flat, random_like, to_f64

B, D_IN, HIDDEN, C = 6, 4, 7, 3


class Head(NamedTuple):
    w: jax.Array
    b: jax.Array


@functools.cache
def make_params(dtype=jnp.float64, c=C):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "layers": [
            {"w": jax.random.normal(k1, (D_IN, HIDDEN), dtype), "b": 0.1 * jnp.ones(HIDDEN, dtype)}
        ],
        "head": Head(
            jax.random.normal(k2, (HIDDEN, c), dtype) / 2, jax.random.normal(k3, (c,), dtype)
        ),
    }


def model(params, x):
    h = jnp.tanh(x @ params["layers"][0]["w"] + params["layers"][0]["b"])
    return h @ params["head"].w + params["head"].b


@functools.cache
def make_data(dtype=jnp.float64, batch=B):
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.normal(kx, (batch, D_IN), dtype), jax.random.randint(ky, (batch,), 0, C)


def targets_for(loss, labels, dtype=jnp.float64):
    if loss == "softmax_cross_entropy":
        return labels
    key = jax.random.PRNGKey(2)
    if loss == "mse":
        return jax.random.normal(key, (labels.shape[0], C), dtype)
    return jax.random.uniform(key, (labels.shape[0], C), dtype)


# --- independent dense references -----------------------------------------------------------


def dense_hessian(f, x, *args):
    """jax.hessian of the raveled function, float64 (helpers.dense_hessian, jitted for speed)."""
    z, unravel = ravel_pytree(to_f64(x))
    args = to_f64(args)
    return np.asarray(jax.jit(jax.hessian(lambda q: f(unravel(q), *args)))(z))


def dense_jacobian(params, x):
    """J of the raveled outputs w.r.t. the raveled parameters, (B·C, P), by jax.jacfwd, float64."""
    z, unravel = ravel_pytree(to_f64(params))
    J = jax.jit(jax.jacfwd(lambda q: model(unravel(q), to_f64(x))))(z)
    return np.asarray(J).reshape(-1, z.size), np.asarray(model(unravel(z), to_f64(x)))


def dense_output_hessian(loss, out):
    """The output Hessian of the batch-mean loss, written out by hand, (B·C, B·C)."""
    batch = out.shape[0]
    if loss == "softmax_cross_entropy":
        p = np.exp(out) / np.exp(out).sum(-1, keepdims=True)
        blocks = [np.diag(pb) - np.outer(pb, pb) for pb in p]
    elif loss == "mse":
        blocks = [np.eye(out.shape[1]) for _ in out]
    else:
        s = 1 / (1 + np.exp(-out))
        blocks = [np.diag(sb * (1 - sb)) for sb in s]
    n = out.size
    H = np.zeros((n, n))
    k = out.shape[1]
    for b, blk in enumerate(blocks):
        H[b * k : (b + 1) * k, b * k : (b + 1) * k] = blk
    return H / batch


def dense_ggn(loss, params, x):
    J, out = dense_jacobian(params, x)
    return J.T @ dense_output_hessian(loss, out) @ J


@functools.cache
def ref_ggn(loss, scale=1.0):
    """dense_ggn at the default parameters and data (inputs scaled by `scale`), computed once."""
    x, _ = make_data()
    return dense_ggn(loss, make_params(), scale * x)


@functools.cache
def ref_hessian(dtype=jnp.float64):
    """dense_hessian of f_loss at the default parameters and data, computed once per dtype."""
    x, y = make_data(dtype)
    return dense_hessian(f_loss, make_params(dtype), x, y)


def per_example_nll(loss, o, y):
    """One example's loss, written out by hand."""
    if loss == "softmax_cross_entropy":
        return -jax.nn.log_softmax(o)[y]
    if loss == "mse":
        return 0.5 * jnp.sum((o - y) ** 2)
    return jnp.sum(jnp.log1p(jnp.exp(o)) - y * o)


def f_loss(params, x, y):
    return jnp.mean(
        jax.vmap(lambda o, t: per_example_nll("softmax_cross_entropy", o, t))(model(params, x), y)
    )


LOSSES = ["softmax_cross_entropy", "mse", "sigmoid_cross_entropy"]
PAIRS = [
    ("categorical", "softmax_cross_entropy"),
    ("gaussian", "mse"),
    ("bernoulli", "sigmoid_cross_entropy"),
]


# --- Hessian --------------------------------------------------------------------------------


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("mode", ["auto", "rev_rev"])
def test_hessian_matches_dense(cache, mode):
    params = make_params()
    x, y = make_data()
    op = hf.hessian(f_loss, params, x, y, cache=cache, mode=mode)
    H = ref_hessian()
    np.testing.assert_allclose(op.to_dense(), H, rtol=1e-10, atol=1e-12)
    v = random_like(jax.random.PRNGKey(3), params)
    np.testing.assert_allclose(flat(op.mv(v)), H @ flat(v), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(flat(op @ v), H @ flat(v), rtol=1e-10, atol=1e-12)
    assert not op.psd
    assert op.shape == (H.shape[0], H.shape[0]) and op.dtype == np.float64


def test_operator_structure_and_result_structure():
    params = make_params()
    x, y = make_data()
    op = hf.hessian(f_loss, params, x, y)
    v = random_like(jax.random.PRNGKey(4), params)
    out = op.mv(v)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(params)
    assert isinstance(out["head"], Head)
    np.testing.assert_allclose(flat(out), ref_hessian() @ flat(v), rtol=1e-10, atol=1e-12)
    for leaf_out, leaf_p in zip(
        jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(params), strict=True
    ):
        assert leaf_out.shape == leaf_p.shape and leaf_out.dtype == leaf_p.dtype
    structure = op.in_structure()
    assert jax.tree_util.tree_structure(structure) == jax.tree_util.tree_structure(params)
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree_util.tree_leaves(structure))
    assert [(s.shape, s.dtype) for s in jax.tree_util.tree_leaves(structure)] == [
        (a.shape, a.dtype) for a in jax.tree_util.tree_leaves(params)
    ]


def test_damping_and_scaling():
    params = make_params()
    x, y = make_data()
    op = hf.hessian(f_loss, params, x, y)
    H = ref_hessian()
    eye = np.eye(H.shape[0])
    for combo, ref in [
        (op + 0.5, H + 0.5 * eye),
        (0.5 + op, H + 0.5 * eye),
        (op * 3.0, 3 * H),
        (2.0 * (op + 1.0), 2 * H + 2 * eye),
        (2.0 * op + 1.0 + jnp.asarray(0.25), 2 * H + 1.25 * eye),
    ]:
        np.testing.assert_allclose(combo.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_psd_flag_follows_concrete_signs():
    params = make_params()
    x, y = make_data()
    G = hf.ggn(model, "softmax_cross_entropy", params, x, y)
    assert G.psd and (G + 1.0).psd and (2 * G).psd
    assert not (G + -1.0).psd and not (G * -1.0).psd
    assert not (hf.hessian(f_loss, params, x, y) + 1.0).psd


def test_jit_and_vmap_through_mv():
    params = make_params()
    x, y = make_data()
    op = hf.hessian(f_loss, params, x, y)
    H = ref_hessian()
    vs = random_like(
        jax.random.PRNGKey(5), jax.tree_util.tree_map(lambda a: jnp.stack([a] * 3), params)
    )
    ref = np.stack([H @ flat(jax.tree_util.tree_map(lambda a, i=i: a[i], vs)) for i in range(3)])

    def rows(tree):
        return np.stack([flat(jax.tree_util.tree_map(lambda a, i=i: a[i], tree)) for i in range(3)])

    np.testing.assert_allclose(rows(jax.vmap(op.mv)(vs)), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rows(op.mm(vs)), ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(rows(op.mm(vs, chunk_size=2)), ref, rtol=1e-10, atol=1e-12)
    # The operator itself is a pytree: through jit as an argument, and damping traced under vmap.
    v0 = jax.tree_util.tree_map(lambda a: a[0], vs)
    out = jax.jit(lambda o, v: o.mv(v))(op, v0)
    np.testing.assert_allclose(flat(out), ref[0], rtol=1e-10, atol=1e-12)
    lams = jnp.array([0.0, 1.0, 2.0])
    damped = jax.vmap(lambda lam: ravel_pytree((op + lam).mv(v0))[0])(lams)
    np.testing.assert_allclose(
        damped, ref[0] + np.asarray(lams)[:, None] * flat(v0)[None], rtol=1e-10
    )
    # Built inside jit and vmapped over points.
    xs = jnp.stack([x, 2 * x])
    hv = jax.jit(jax.vmap(lambda xi: hf.hessian(f_loss, params, xi, y).mv(v0)))(xs)
    ref2 = hf.hessian(f_loss, params, 2 * x, y).mv(v0)  # itself checked against dense above
    np.testing.assert_allclose(
        flat(jax.tree_util.tree_map(lambda a: a[1], hv)), flat(ref2), rtol=1e-10
    )


def test_float32_in_float32_out():
    params = make_params(jnp.float32)
    x, y = make_data(jnp.float32)
    H = ref_hessian(jnp.float32)
    v = random_like(jax.random.PRNGKey(6), params)
    op = hf.hessian(f_loss, params, x, y) + 0.0
    out = op.mv(v)
    assert op.dtype == np.float32
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(out))
    vs = jax.tree_util.tree_map(lambda a: a[None], v)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(op.mm(vs)))
    np.testing.assert_allclose(flat(out), H @ flat(v), rtol=2e-4, atol=2e-5)
    # float64 tangents and a float64 damping are cast to the parameters' dtype, not the reverse.
    out = (op + jnp.asarray(0.5, jnp.float64)).mv(to_f64(v))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(out))
    np.testing.assert_allclose(flat(out), H @ flat(v) + 0.5 * flat(v), rtol=2e-4, atol=2e-5)


def test_to_dense_refuses_large_unless_forced():
    x = jnp.zeros(10_001)
    op = hf.hessian(lambda z: 0.5 * jnp.sum(z**2), x)
    with pytest.raises(ValueError, match=r"limit is n = 10,000.*force=True"):
        op.to_dense()


def test_to_dense_forced_small_chunks():
    x = jnp.linspace(0.0, 1.0, 300)
    op = hf.hessian(lambda z: jnp.sum(z**3) / 6, x)
    np.testing.assert_allclose(op.to_dense(force=True), np.diag(np.asarray(x)), atol=1e-14)


def test_scipy_eigsh_matches_numpy():
    from scipy.sparse.linalg import eigsh

    params = make_params()
    x, y = make_data()
    for op, A in [
        (hf.hessian(f_loss, params, x, y), ref_hessian()),
        (hf.ggn(model, "softmax_cross_entropy", params, x, y), ref_ggn("softmax_cross_entropy")),
    ]:
        lin = op.as_scipy()
        assert lin.shape == A.shape and lin.dtype == np.float64
        vals = eigsh(lin, k=3, which="LA", tol=1e-12)[0]
        np.testing.assert_allclose(np.sort(vals), np.linalg.eigvalsh(A)[-3:], rtol=1e-8, atol=1e-12)
        X = np.random.default_rng(0).standard_normal((A.shape[0], 2))
        np.testing.assert_allclose(lin @ X, A @ X, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(lin.rmatvec(X[:, 0]), A @ X[:, 0], rtol=1e-10, atol=1e-12)


def test_scipy_float32_operator_accepts_float64_vectors():
    params = make_params(jnp.float32)
    x, y = make_data(jnp.float32)
    lin = hf.ggn(model, "softmax_cross_entropy", params, x, y).as_scipy()
    out = lin @ np.ones(lin.shape[0])
    assert out.dtype == np.float32
    ref = dense_ggn("softmax_cross_entropy", params, x) @ np.ones(lin.shape[0])
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_lineax_cg_on_damped_ggn_matches_numpy_solve():
    import lineax as lx

    params = make_params()
    x, y = make_data()
    G = hf.ggn(model, "softmax_cross_entropy", params, x, y)
    op = (G + 0.1).as_lineax()
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    b = random_like(jax.random.PRNGKey(7), params)
    sol = lx.linear_solve(op, b, lx.CG(rtol=1e-12, atol=1e-12, max_steps=2000))
    A = ref_ggn("softmax_cross_entropy") + 0.1 * np.eye(G.shape[0])
    np.testing.assert_allclose(flat(sol.value), np.linalg.solve(A, flat(b)), rtol=1e-7, atol=1e-9)
    H = hf.hessian(f_loss, params, x, y).as_lineax()
    assert lx.is_symmetric(H) and not lx.is_positive_semidefinite(H)


def test_operator_errors():
    params = make_params()
    x, y = make_data()
    op = hf.hessian(f_loss, params, x, y)
    with pytest.raises(ValueError, match="v must have the same tree structure"):
        op.mv({"w": jnp.zeros(3)})
    bad = jax.tree_util.tree_map(lambda a: jnp.zeros((*a.shape, 2)), params)
    with pytest.raises(ValueError, match="v must match the shapes"):
        op.mv(bad)
    with pytest.raises(ValueError, match="leading batch axis"):
        op.mm(params)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer in \[1, 2\*\*31 - 1\]"):
        op.mm(jax.tree_util.tree_map(lambda a: a[None], params), chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size must be a positive integer or None; got float"):
        op.mm(jax.tree_util.tree_map(lambda a: a[None], params), chunk_size=1.5)
    with pytest.raises(TypeError, match="damping λ must be a scalar"):
        op + jnp.ones(3)
    with pytest.raises(TypeError, match="scale c must be a scalar"):
        op * jnp.ones(3)
    with pytest.raises(TypeError):
        op + op
    with pytest.raises(ValueError, match="mode must be one of"):
        hf.hessian(f_loss, params, x, y, mode="fwd_fwd")
    with pytest.raises(TypeError, match="matvec must be callable"):
        hf.CurvatureOperator(3, params)


# --- GGN ------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_matches_dense_reference(loss):
    params = make_params()
    x, labels = make_data()
    t = targets_for(loss, labels)
    G = hf.ggn(model, loss, params, x, t)
    ref = ref_ggn(loss)
    np.testing.assert_allclose(G.to_dense(), ref, rtol=1e-10, atol=1e-12)
    assert G.psd
    assert np.linalg.eigvalsh(ref).min() > -1e-12
    assert np.linalg.eigvalsh(np.asarray(G.to_dense())).min() > -1e-12


@pytest.mark.parametrize("loss", LOSSES)
def test_ggn_callable_loss_equals_builtin(loss):
    params = make_params()
    x, labels = make_data()
    t = targets_for(loss, labels)

    def callable_loss(o, y):
        return jnp.mean(jax.vmap(lambda ob, yb: per_example_nll(loss, ob, yb))(o, y))

    G = hf.ggn(model, callable_loss, params, x, t)
    np.testing.assert_allclose(G.to_dense(), ref_ggn(loss), rtol=1e-10, atol=1e-12)


def test_ggn_of_least_squares_equals_hessian_of_linear_model():
    """For a model linear in the parameters under mse, GGN == Hessian exactly."""
    params = {"w": jnp.ones((D_IN, C)), "b": jnp.zeros(C)}
    x, _ = make_data()
    t = targets_for("mse", jnp.zeros(B, int))

    def lin(p, xx):
        return xx @ p["w"] + p["b"]

    G = hf.ggn(lin, "mse", params, x, t)
    H = dense_hessian(lambda p: 0.5 * jnp.sum((lin(p, x) - t) ** 2) / B, params)
    np.testing.assert_allclose(G.to_dense(), H, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [1, 4, 50])
def test_ggn_chunked_equals_unchunked(chunk_size):
    params = make_params()
    x, labels = make_data()
    G = hf.ggn(model, "softmax_cross_entropy", params, x, labels, chunk_size=chunk_size)
    np.testing.assert_allclose(
        G.to_dense(), ref_ggn("softmax_cross_entropy"), rtol=1e-10, atol=1e-12
    )


def test_ggn_soft_labels_and_sequence_outputs():
    params = make_params()
    x, labels = make_data()
    probs = jax.nn.one_hot(labels, C, dtype=jnp.float64)
    G = hf.ggn(model, "softmax_cross_entropy", params, x, probs)
    np.testing.assert_allclose(
        G.to_dense(), ref_ggn("softmax_cross_entropy"), rtol=1e-10, atol=1e-12
    )

    # (B, T, C) logits: the mean over the batch of the sum over positions.
    def seq_model(p, xx):
        return jnp.stack([model(p, xx), model(p, 2 * xx)], axis=1)

    yy = jnp.stack([labels, labels[::-1]], axis=1)
    Gs = hf.ggn(seq_model, "softmax_cross_entropy", params, x, yy)
    ref = ref_ggn("softmax_cross_entropy") + ref_ggn("softmax_cross_entropy", 2.0)
    np.testing.assert_allclose(Gs.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_ggn_float32():
    params = make_params(jnp.float32)
    x, labels = make_data(jnp.float32)
    G = hf.ggn(model, "softmax_cross_entropy", params, x, labels)
    v = random_like(jax.random.PRNGKey(8), params)
    out = G.mv(v)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(out))
    ref = dense_ggn("softmax_cross_entropy", params, x) @ flat(v)
    np.testing.assert_allclose(flat(out), ref, rtol=1e-4, atol=1e-5)


def test_ggn_errors():
    params = make_params()
    x, labels = make_data()
    with pytest.raises(ValueError, match=r"loss must be one of \['softmax_cross_entropy', 'mse'"):
        hf.ggn(model, "hinge", params, x, labels)
    with pytest.raises(TypeError, match="loss must be a callable"):
        hf.ggn(model, 3, params, x, labels)
    with pytest.raises(ValueError, match=r"targets as integer labels must have shape \(6,\)"):
        hf.ggn(model, "softmax_cross_entropy", params, x, labels[:4])
    with pytest.raises(
        ValueError,
        match=r"targets.* must have shape \(6, 3\) for outputs of shape \(6, 3\) \(loss 'mse'\); "
        r"got shape \(6, 4\)",
    ):
        hf.ggn(model, "mse", params, x, jnp.zeros((B, C + 1)))
    with pytest.raises(ValueError, match="outputs must have a leading batch axis"):
        hf.ggn(lambda p, xx: jnp.sum(model(p, xx)), "mse", params, x, jnp.zeros(()))
    with pytest.raises(ValueError, match="batch axis of inputs first"):
        hf.ggn(lambda p, xx: model(p, xx)[0], "mse", params, x, jnp.zeros(C))
    with pytest.raises(ValueError, match="loss must return a scalar"):
        hf.ggn(model, lambda o, y: o, params, x, labels)
    with pytest.raises(TypeError, match="model must be callable"):
        hf.ggn(None, "mse", params, x, labels)
    with pytest.raises(TypeError, match="params must have floating-point leaves"):
        hf.ggn(model, "mse", jax.tree_util.tree_map(lambda a: a.astype(int), params), x, labels)


# --- Fisher ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("likelihood", "loss"), PAIRS)
def test_exact_fisher_equals_ggn(likelihood, loss):
    params = make_params()
    x, labels = make_data()
    F = hf.fisher(model, params, x, likelihood=likelihood)
    G = hf.ggn(model, loss, params, x, targets_for(loss, labels))
    np.testing.assert_allclose(F.to_dense(), G.to_dense(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(F.to_dense(), ref_ggn(loss), rtol=1e-10, atol=1e-12)
    assert F.psd


@pytest.mark.parametrize(("likelihood", "loss"), PAIRS)
def test_mc_fisher_converges_to_exact(likelihood, loss):
    """The mean of many independent draws is within a few standard errors of the exact Fisher."""
    params = make_params()
    x, _ = make_data()
    exact = ref_ggn(loss)
    keys = jax.random.split(jax.random.PRNGKey(9), 400)
    draws = np.asarray(
        jax.jit(
            jax.vmap(
                lambda k: hf.fisher(
                    model, params, x, likelihood=likelihood, kind="mc", key=k
                ).to_dense()
            )
        )(keys)
    )
    mean, stderr = draws.mean(0), draws.std(0) / np.sqrt(len(keys))
    assert np.all(np.abs(mean - exact) <= 5 * stderr + 1e-3 * np.abs(exact).max())
    # More samples per input: the same estimator averaged, closer to the exact value.
    many = hf.fisher(
        model, params, x, likelihood=likelihood, kind="mc", key=keys[0], num_samples=4000
    )
    one_err = np.abs(draws[0] - exact).max()
    many_err = np.abs(np.asarray(many.to_dense()) - exact).max()
    assert many_err < 0.2 * one_err


def test_mc_fisher_is_deterministic_given_key_and_psd():
    params = make_params()
    x, _ = make_data()
    key = jax.random.PRNGKey(10)
    a = hf.fisher(
        model, params, x, likelihood="categorical", kind="mc", key=key, num_samples=3
    ).to_dense()
    b = hf.fisher(
        model, params, x, likelihood="categorical", kind="mc", key=key, num_samples=3
    ).to_dense()
    np.testing.assert_array_equal(a, b)
    assert np.linalg.eigvalsh(np.asarray(a)).min() > -1e-12
    assert np.linalg.matrix_rank(np.asarray(a), tol=1e-10) <= B * 3


@pytest.mark.parametrize(("likelihood", "loss"), PAIRS)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_empirical_fisher_matches_per_example_loop(likelihood, loss, chunk_size):
    params = make_params()
    x, labels = make_data()
    t = targets_for(loss, labels)
    F = hf.fisher(
        model, params, x, likelihood=likelihood, kind="empirical", targets=t, chunk_size=chunk_size
    )
    grad_b = jax.jit(jax.grad(lambda p, xb, tb: per_example_nll(loss, model(p, xb[None])[0], tb)))
    grads = [flat(grad_b(params, x[b], t[b])) for b in range(B)]
    ref = sum(np.outer(g, g) for g in grads) / B
    np.testing.assert_allclose(F.to_dense(), ref, rtol=1e-10, atol=1e-12)


def test_fisher_chunked_equals_unchunked_and_float32():
    params = make_params(jnp.float32)
    x, _ = make_data(jnp.float32)
    key = jax.random.PRNGKey(11)
    a = hf.fisher(model, params, x, likelihood="categorical", kind="mc", key=key, num_samples=2)
    b = hf.fisher(
        model, params, x, likelihood="categorical", kind="mc", key=key, num_samples=2, chunk_size=4
    )
    assert a.to_dense().dtype == jnp.float32
    np.testing.assert_allclose(a.to_dense(), b.to_dense(), rtol=1e-4, atol=1e-6)
    # The chunked float32 exact Fisher against the dense float64 GGN at the same point.
    exact = hf.fisher(model, params, x, likelihood="categorical", chunk_size=4).to_dense()
    assert exact.dtype == jnp.float32
    ref = dense_ggn("softmax_cross_entropy", params, x)
    np.testing.assert_allclose(exact, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


def test_fisher_errors():
    params = make_params()
    x, _ = make_data()
    with pytest.raises(
        ValueError, match=r"likelihood must be one of \['categorical', 'gaussian', 'bernoulli'\]"
    ):
        hf.fisher(model, params, x, likelihood="poisson")
    with pytest.raises(ValueError, match=r"kind must be one of \['exact', 'mc', 'empirical'\]"):
        hf.fisher(model, params, x, likelihood="categorical", kind="true")
    with pytest.raises(ValueError, match='targets must be given for kind="empirical"'):
        hf.fisher(model, params, x, likelihood="categorical", kind="empirical")
    with pytest.raises(ValueError, match=r"fisher\(kind='mc'\) needs key= \(a jax\.random key"):
        hf.fisher(model, params, x, likelihood="categorical", kind="mc")
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        hf.fisher(model, params, x, likelihood="categorical", kind="mc", key=jnp.ones(3))
    with pytest.raises(ValueError, match=r"num_samples must be an integer in \[1, 2\*\*31 - 1\]"):
        hf.fisher(
            model,
            params,
            x,
            likelihood="categorical",
            kind="mc",
            key=jax.random.PRNGKey(0),
            num_samples=0,
        )
    with pytest.raises(
        ValueError,
        match=r"targets.* must have shape \(6, 3\) for outputs of shape \(6, 3\) "
        r"\(loss 'mse'\); got shape \(6,\)",
    ):
        hf.fisher(model, params, x, likelihood="gaussian", kind="empirical", targets=jnp.zeros(B))
    with pytest.raises(ValueError, match="outputs must have a leading batch axis"):
        hf.fisher(lambda p, xx: jnp.sum(model(p, xx)), params, x, likelihood="gaussian")
    with pytest.raises(ValueError, match=r"logits\) of shape \(B, ..., C\)"):
        hf.fisher(lambda p, xx: model(p, xx)[:, 0], params, x, likelihood="categorical")
    with pytest.raises(ValueError, match=r"chunk_size must be an integer in \[1, 2\*\*31 - 1\]"):
        hf.fisher(model, params, x, likelihood="categorical", chunk_size=-1)
    with pytest.raises(TypeError, match="chunk_size must be a positive integer or None; got float"):
        hf.fisher(model, params, x, likelihood="categorical", chunk_size=1.5)
    with pytest.raises(TypeError, match="num_samples must be a positive integer; got float"):
        hf.fisher(
            model, params, x, likelihood="categorical", kind="mc", key=jax.random.key(0),
            num_samples=2.0,
        )  # fmt: skip


def bernoulli_mc_error_scale(params, x):
    """sqrt(E‖F̂₁ − F‖²_F) for the one-sample-per-input Bernoulli MC Fisher, computed exactly.

    F̂₁ = (1/B) Σ_b J_bᵀ r_b r_bᵀ J_b with r_b = σ(o_b) − y_b, y_bc ~ Bernoulli(σ(o_bc))
    independent; the examples are independent and centred, so the variance is the sum over b of
    E‖J_bᵀ (r_b r_bᵀ − Λ_b) J_b‖²_F / B², each expectation by enumerating all 2^C labels.
    """
    J, out = dense_jacobian(params, x)
    batch, c = out.shape
    J = J.reshape(batch, c, -1)
    s = 1 / (1 + np.exp(-out))
    total = 0.0
    for b in range(batch):
        lam = np.diag(s[b] * (1 - s[b]))
        for bits in np.ndindex(*(2,) * c):
            y = np.asarray(bits, float)
            prob = np.prod(np.where(y == 1, s[b], 1 - s[b]))
            r = s[b] - y
            dev = J[b].T @ (np.outer(r, r) - lam) @ J[b]
            total += prob * np.sum(dev**2)
    return np.sqrt(total) / batch


@pytest.mark.parametrize("seed", [0, 3])
def test_new_style_keys_match_legacy_keys(seed):
    params = make_params()
    x, _ = make_data()
    typed = jax.random.key(seed)
    legacy = jax.random.PRNGKey(seed)
    F_typed = hf.fisher(model, params, x, likelihood="bernoulli", kind="mc", key=typed)
    F_legacy = hf.fisher(model, params, x, likelihood="bernoulli", kind="mc", key=legacy)
    dense_typed = np.asarray(F_typed.to_dense())
    assert dense_typed.shape == F_typed.shape
    assert np.all(np.isfinite(dense_typed))
    if np.array_equal(np.asarray(jax.random.key_data(typed)), np.asarray(legacy)):
        # Same bits, same implementation: the same labels are drawn, so the same operator.
        np.testing.assert_allclose(dense_typed, F_legacy.to_dense(), rtol=1e-12, atol=1e-14)
    # A different key gives a different draw (the key is actually used).
    other = hf.fisher(
        model, params, x, likelihood="bernoulli", kind="mc", key=jax.random.key(seed + 100)
    )
    assert not np.allclose(dense_typed, other.to_dense())


def test_new_style_key_mc_fisher_approaches_exact_fisher():
    """With S samples per input, E‖F̂_S − F‖_F = O(σ₁/√S), σ₁ computed exactly (no sampling)."""
    params = make_params()
    x, _ = make_data()
    exact = ref_ggn("sigmoid_cross_entropy")  # J^T diag(σ(1−σ)) J / B, the Bernoulli Fisher
    sigma1 = bernoulli_mc_error_scale(params, x)
    samples = 20_000
    F = hf.fisher(
        model,
        params,
        x,
        likelihood="bernoulli",
        kind="mc",
        key=jax.random.key(21),
        num_samples=samples,
    )
    err = np.linalg.norm(np.asarray(F.to_dense()) - exact)
    # Chebyshev on ‖·‖²_F: P(err > 5 σ₁/√S) ≤ 1/25; the fixed key makes it deterministic.
    tol = 5 * sigma1 / np.sqrt(samples)
    assert tol < 0.1 * np.linalg.norm(exact)  # the bound is informative, not vacuous
    assert err <= tol, (err, tol)


def test_grad_through_mv():
    """d/dθ vᵀ G(θ) v for mse, where vᵀ G v = ‖J v‖² / B, vs the same through jax.jvp directly."""
    params = make_params()
    x, labels = make_data()
    t = targets_for("mse", labels)
    v = random_like(jax.random.PRNGKey(12), params)

    def quad(p):
        return jnp.vdot(flat_jax(v), flat_jax(hf.ggn(model, "mse", p, x, t).mv(v)))

    def ref(p):
        return jnp.sum(jax.jvp(lambda q: model(q, x), (p,), (v,))[1] ** 2) / B

    np.testing.assert_allclose(
        flat(jax.grad(quad)(params)), flat(jax.grad(ref)(params)), rtol=1e-10
    )


def test_hessian_through_custom_vjp_under_jit():
    @jax.custom_vjp
    def softplus(z):
        return jnp.log1p(jnp.exp(z))

    softplus.defvjp(lambda z: (softplus(z), z), lambda z, g: (g * jax.nn.sigmoid(z),))
    x = jnp.linspace(-1.0, 1.0, 5)
    op = hf.hessian(lambda z: jnp.sum(softplus(z)), x)
    s = jax.nn.sigmoid(x)
    out = jax.jit(lambda o, v: o.mv(v))(op, jnp.ones(5))
    np.testing.assert_allclose(out, s * (1 - s), rtol=1e-12)


def test_operators_cross_jit_and_vmap_boundaries():
    """Operators built inside jit come out whole; operators built under vmap act batched."""
    params = make_params()
    x, labels = make_data()
    t = targets_for("mse", labels)
    op = jax.jit(lambda p: hf.ggn(model, "mse", p, x, t, chunk_size=4) + 1.0)(params)
    np.testing.assert_allclose(op.to_dense(), ref_ggn("mse") + np.eye(op.shape[0]), rtol=1e-10)
    ps = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a]), params)
    ops = jax.vmap(lambda p: hf.ggn(model, "mse", p, x, t))(ps)
    out = jax.vmap(lambda o, v: o.mv(v))(ops, ps)
    p1 = jax.tree_util.tree_map(lambda a: a[1], ps)
    ref = dense_ggn("mse", p1, x) @ flat(p1)
    np.testing.assert_allclose(flat(jax.tree_util.tree_map(lambda a: a[1], out)), ref, rtol=1e-10)


def flat_jax(tree):
    return ravel_pytree(tree)[0]


# --- 0.2: `label`, and out-of-range targets refused (concrete) or NaN (under jit) --------------


def test_label_replaces_kind():
    params = make_params()
    x, labels = make_data()
    assert hf.hessian(f_loss, params, x, labels).label == "hessian"
    assert hf.ggn(model, "mse", params, x, targets_for("mse", labels)).label == "ggn (mse)"
    F = hf.fisher(model, params, x, likelihood="categorical")
    assert F.label == "fisher (exact, categorical)"
    assert (2.0 * F + 1.0).label == F.label  # algebra keeps the label
    assert jax.jit(lambda o: o)(F).label == F.label  # static across jit
    assert not hasattr(F, "kind")
    mine = hf.CurvatureOperator(lambda v: v, params, label="identity", psd=True)
    assert mine.label == "identity" and "identity" in repr(mine)
    np.testing.assert_allclose(mine.to_dense(), np.eye(mine.shape[0]), rtol=0)
    with pytest.raises(TypeError, match="kind"):
        hf.CurvatureOperator(lambda v: v, params, kind="identity")


_SOFTMAX_RANGE = r"targets for loss 'softmax_cross_entropy' must be integer labels in \[0, C\)"
_BERNOULLI_RANGE = r"targets for loss 'sigmoid_cross_entropy' must be numbers in \[0, 1\]"


def _bad_targets():
    _, labels = make_data()
    return {
        "label >= C": ("softmax_cross_entropy", "categorical", labels.at[0].set(C), _SOFTMAX_RANGE),
        "label < 0": ("softmax_cross_entropy", "categorical", labels.at[2].set(-1), _SOFTMAX_RANGE),
        "bernoulli 2.0": (
            "sigmoid_cross_entropy",
            "bernoulli",
            jnp.full((B, C), 0.5).at[1, 1].set(2.0),
            _BERNOULLI_RANGE,
        ),
        "probabilities sum to 1.5": (
            "softmax_cross_entropy",
            "categorical",
            jnp.full((B, C), 0.5),
            r"probabilities \(nonnegative, summing to 1 over the last axis\)",
        ),
    }


@pytest.mark.parametrize(
    "case", ["label >= C", "label < 0", "bernoulli 2.0", "probabilities sum to 1.5"]
)
@pytest.mark.parametrize("chunk_size", [None, 4])
def test_out_of_range_concrete_targets_are_refused(case, chunk_size):
    loss, likelihood, targets, match = _bad_targets()[case]
    params = make_params()
    x, _ = make_data()
    with pytest.raises(ValueError, match=match):
        hf.ggn(model, loss, params, x, targets, chunk_size=chunk_size)
    with pytest.raises(ValueError, match=match):
        hf.ggn(model, loss, params, x, np.asarray(targets), chunk_size=chunk_size)
    with pytest.raises(ValueError, match=match):
        hf.fisher(
            model, params, x, likelihood=likelihood, kind="empirical", targets=targets,
            chunk_size=chunk_size,
        )  # fmt: skip


@pytest.mark.parametrize(
    "case", ["label >= C", "label < 0", "bernoulli 2.0", "probabilities sum to 1.5"]
)
def test_out_of_range_traced_targets_make_products_nan(case):
    loss, likelihood, targets, _ = _bad_targets()[case]
    params = make_params()
    x, labels = make_data()
    good = (
        labels
        if loss == "softmax_cross_entropy" and targets.ndim == 1
        else targets_for(loss, labels)
    )
    if case == "probabilities sum to 1.5":
        good = jax.nn.one_hot(labels, C, dtype=jnp.float64)
    v = random_like(jax.random.PRNGKey(13), params)

    @jax.jit
    def ggn_mv(t):
        return hf.ggn(model, loss, params, x, t).mv(v)

    @jax.jit
    def empirical_mv(t):
        return hf.fisher(model, params, x, likelihood=likelihood, kind="empirical", targets=t).mv(v)

    assert np.all(np.isnan(flat(ggn_mv(targets))))
    assert np.all(np.isnan(flat(empirical_mv(targets))))
    # the same compiled programs with valid targets: finite, and equal to the dense reference
    np.testing.assert_allclose(flat(ggn_mv(good)), ref_ggn(loss) @ flat(v), rtol=1e-10, atol=1e-12)
    assert np.all(np.isfinite(flat(empirical_mv(good))))
    # an operator built inside jit with bad targets carries the NaN out
    op = jax.jit(lambda t: hf.ggn(model, loss, params, x, t))(targets)
    assert np.all(np.isnan(flat(op.mv(v))))
    # a solver fed such an operator reports non-finite instead of a silent number
    res = hf.cg(op + 1.0, v)
    assert int(res.status) == 3 and not bool(res.success)

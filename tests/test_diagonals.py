"""ggn_diagonal and fisher_diagonal vs dense float64 references built independently."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessfree as hf
from helpers import count_compiles, flat, to_f64
from hessfree import _losses, _staging, fisher_diagonal, ggn_diagonal

B, D_IN, HIDDEN, C, T = 5, 3, 4, 3, 2
LOSSES = ["softmax_cross_entropy", "mse", "sigmoid_cross_entropy"]
PAIRS = [("categorical", "softmax_cross_entropy"), ("gaussian", "mse"), ("bernoulli", "sigmoid_cross_entropy")]  # fmt: skip


@functools.cache
def make_params(dtype=jnp.float64):
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    return {
        "w1": jax.random.normal(k1, (D_IN, HIDDEN), dtype),
        "b1": 0.1 * jnp.ones(HIDDEN, dtype),
        "w2": jax.random.normal(k2, (HIDDEN, C), dtype) / 2,
        "b2": jax.random.normal(k3, (C,), dtype),
    }


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def seq_mlp(p, x):
    """(B, T, C) outputs: the same network at two scalings of the input."""
    return jnp.stack([mlp(p, x), mlp(p, -2 * x)], axis=1)


@functools.cache
def make_data(dtype=jnp.float64, batch=B):
    kx, ky = jax.random.split(jax.random.PRNGKey(1))
    return jax.random.normal(kx, (batch, D_IN), dtype), jax.random.randint(ky, (batch,), 0, C)


def targets_for(loss, shape, dtype=jnp.float64):
    """Valid targets for outputs of `shape` (labels for softmax)."""
    key = jax.random.PRNGKey(2)
    if loss == "softmax_cross_entropy":
        return jax.random.randint(key, shape[:-1], 0, shape[-1])
    if loss == "mse":
        return jax.random.normal(key, shape, dtype)
    return jax.random.uniform(key, shape, dtype)


# --- independent dense references -------------------------------------------------------------


def per_example_jacobians(model, params, x):
    """J_b of the raveled outputs w.r.t. the raveled parameters, (B, K, P), by jax.jacfwd."""
    z, unravel = ravel_pytree(to_f64(params))
    J = np.asarray(jax.jit(jax.jacfwd(lambda q: model(unravel(q), to_f64(x))))(z))
    return J.reshape(J.shape[0], -1, z.size), np.asarray(model(unravel(z), to_f64(x)))


def example_output_hessian(loss, o, y=None):
    """∇²_o of one example's loss ℓ_b, written out by hand (not divided by B), (K, K)."""
    if loss == "mse":
        return np.eye(o.size)
    if loss == "sigmoid_cross_entropy":
        s = 1 / (1 + np.exp(-o.ravel()))
        return np.diag(s * (1 - s))
    rows = o.reshape(-1, o.shape[-1])
    weights = np.ones(len(rows)) if y is None or y.ndim < o.ndim else y.reshape(len(rows), -1).sum(-1)  # fmt: skip
    H = np.zeros((o.size, o.size))
    c = o.shape[-1]
    for t, (row, w) in enumerate(zip(rows, weights, strict=True)):
        p = np.exp(row - row.max()) / np.exp(row - row.max()).sum()
        H[t * c : (t + 1) * c, t * c : (t + 1) * c] = w * (np.diag(p) - np.outer(p, p))
    return H


def dense_ggn_diagonal(loss, model, params, x, targets=None):
    """Σ_b diag(J_bᵀ H_b J_b) / B, float64."""
    J, out = per_example_jacobians(model, params, x)
    y = None if targets is None else np.asarray(targets)
    total = np.zeros(J.shape[-1])
    for b in range(J.shape[0]):
        H = example_output_hessian(loss, out[b], None if y is None else y[b])
        total += np.einsum("kp,kl,lp->p", J[b], H, J[b])
    return total / J.shape[0]


def diag_of(op):
    return np.diag(np.asarray(op.to_dense()))


def per_example_nll(loss, o, y):
    """One example's loss written out by hand (any output shape, class axis last)."""
    if loss == "softmax_cross_entropy":
        return -jnp.sum(jnp.take_along_axis(jax.nn.log_softmax(o), y[..., None], axis=-1))
    if loss == "mse":
        return 0.5 * jnp.sum((o - y) ** 2)
    return jnp.sum(jnp.log1p(jnp.exp(o)) - y * o)


def callable_version(loss):
    def mean_loss(o, y):
        return jnp.mean(jax.vmap(lambda ob, yb: per_example_nll(loss, ob, yb))(o, y))

    return mean_loss


@functools.cache
def exact_ref(loss, seq=False):
    model = seq_mlp if seq else mlp
    x, _ = make_data()
    shape = (B, T, C) if seq else (B, C)
    return dense_ggn_diagonal(loss, model, make_params(), x, targets_for(loss, shape))


@pytest.mark.parametrize(
    ("loss", "shape"),
    [
        (loss, shape)
        for loss in LOSSES
        for shape in [(C,), (T, C), ()]
        if shape or loss != "softmax_cross_entropy"
    ],
)  # softmax needs a class axis
def test_loss_table_factors_are_symmetric_factors_of_the_output_hessian(loss, shape):
    o = jax.random.normal(jax.random.PRNGKey(7), shape, jnp.float64)
    S = np.asarray(_losses.LOSSES[loss].hessian_factor(o, None)).reshape(o.size, o.size)
    ref = example_output_hessian(loss, np.asarray(o).reshape(shape or (1,)))
    np.testing.assert_allclose(S.T @ S, ref, rtol=1e-12, atol=1e-15)  # rows of S are columns s_k


# --- exact GGN diagonal -------------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_exact_ggn_diagonal_matches_dense_references(loss, chunk_size):
    params = make_params()
    x, _ = make_data()
    t = targets_for(loss, (B, C))
    d = ggn_diagonal(mlp, loss, params, x, t, chunk_size=chunk_size)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(params)
    assert all(
        a.shape == b.shape for a, b in zip(jax.tree.leaves(d), jax.tree.leaves(params), strict=True)
    )
    np.testing.assert_allclose(flat(d), exact_ref(loss), rtol=1e-10, atol=1e-13)
    G = hf.ggn(mlp, loss, params, x, t)
    np.testing.assert_allclose(flat(d), diag_of(G), rtol=1e-10, atol=1e-13)
    assert np.all(flat(d) >= 0)


@pytest.mark.parametrize("chunk_size", [1, 3, 5, 7])
def test_chunk_sizes_give_equal_results(chunk_size):
    """B = 5: chunks of 3 leave a remainder of 2; 7 > B is one chunk."""
    params = make_params()
    x, labels = make_data()
    whole = ggn_diagonal(mlp, "softmax_cross_entropy", params, x, labels)
    part = ggn_diagonal(mlp, "softmax_cross_entropy", params, x, labels, chunk_size=chunk_size)
    np.testing.assert_allclose(flat(part), flat(whole), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("loss", LOSSES)
def test_multidimensional_outputs(loss):
    """(B, T, C) outputs: softmax over the last axis per position, other axes summed."""
    params = make_params()
    x, _ = make_data()
    t = targets_for(loss, (B, T, C))
    d = ggn_diagonal(seq_mlp, loss, params, x, t, chunk_size=3)
    np.testing.assert_allclose(flat(d), exact_ref(loss, seq=True), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(
        flat(d), diag_of(hf.ggn(seq_mlp, loss, params, x, t)), rtol=1e-10, atol=1e-13
    )


def test_soft_labels_weight_the_softmax_hessian():
    params = make_params()
    x, _ = make_data()
    probs = jax.nn.softmax(jax.random.normal(jax.random.PRNGKey(5), (B, T, C)), axis=-1)
    probs = probs * (1 + 5e-4)  # Σ y = 1.0005: inside the accepted tolerance, visibly weighted
    d = ggn_diagonal(seq_mlp, "softmax_cross_entropy", params, x, probs)
    ref = dense_ggn_diagonal("softmax_cross_entropy", seq_mlp, params, x, probs)
    np.testing.assert_allclose(flat(d), ref, rtol=1e-10, atol=1e-13)
    G = hf.ggn(seq_mlp, "softmax_cross_entropy", params, x, probs)
    np.testing.assert_allclose(flat(d), diag_of(G), rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("loss", LOSSES)
def test_callable_loss_equals_builtin(loss):
    params = make_params()
    x, _ = make_data()
    t = targets_for(loss, (B, T, C))
    d = ggn_diagonal(seq_mlp, callable_version(loss), params, x, t)
    np.testing.assert_allclose(flat(d), exact_ref(loss, seq=True), rtol=1e-9, atol=1e-12)


def nonconvex_loss(o, y):
    """A separable loss whose per-example output Hessian is indefinite and couples outputs."""
    per = jnp.sum(jnp.sin(3 * o) * y, axis=-1) + o[:, 0] * o[:, 1] - 0.3 * o[:, 2] ** 3
    return jnp.mean(per)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_nonconvex_callable_loss_gives_the_signed_exact_diagonal(chunk_size):
    params = make_params()
    x, _ = make_data()
    y = targets_for("mse", (B, C))
    d = ggn_diagonal(mlp, nonconvex_loss, params, x, y, chunk_size=chunk_size)
    # Dense: J (B·C, P) and the full output Hessian of the loss by jax.hessian, float64.
    J, out = per_example_jacobians(mlp, params, x)
    H = np.asarray(jax.hessian(lambda o: nonconvex_loss(o.reshape(B, C), y))(out.ravel()))
    assert np.linalg.eigvalsh(H[:C, :C]).min() < -1e-3  # H_b really is indefinite
    Jf = J.reshape(B * C, -1)
    ref = np.diag(Jf.T @ H @ Jf)
    assert ref.min() < 0  # so is the GGN: the diagonal keeps its signs (no clipping)
    np.testing.assert_allclose(flat(d), ref, rtol=1e-9, atol=1e-12)
    G = hf.ggn(mlp, nonconvex_loss, params, x, y)
    np.testing.assert_allclose(flat(d), diag_of(G), rtol=1e-9, atol=1e-12)


# --- Monte-Carlo GGN diagonal ---------------------------------------------------------------------


@pytest.mark.parametrize("loss", LOSSES)
def test_mc_diagonal_is_unbiased(loss):
    """The mean of many fixed-key draws is within a few standard errors of the exact diagonal;
    many samples per example shrink the error as 1/√S (tolerance from the measured spread)."""
    params = make_params()
    x, _ = make_data()
    t = targets_for(loss, (B, C))
    exact = exact_ref(loss)
    keys = jax.random.split(jax.random.PRNGKey(9), 400)
    draws = np.asarray(
        jax.jit(
            jax.vmap(lambda k: flat_jax(ggn_diagonal(mlp, loss, params, x, t, method="mc", key=k)))
        )(keys)
    )
    sigma = draws.std(0)  # spread of the one-sample estimator, per entry
    stderr = sigma / np.sqrt(len(keys))
    assert np.all(np.abs(draws.mean(0) - exact) <= 5 * stderr + 1e-12 * np.abs(exact).max())
    samples = 4000
    many = ggn_diagonal(
        mlp, loss, params, x, t, method="mc", key=jax.random.PRNGKey(3), num_samples=samples
    )
    err = np.abs(flat(many) - exact)
    assert np.all(err <= 5 * sigma / np.sqrt(samples) + 1e-12 * np.abs(exact).max())
    assert err.max() < 0.1 * np.abs(draws[0] - exact).max()


def flat_jax(tree):
    return ravel_pytree(tree)[0]


@pytest.mark.parametrize(("likelihood", "loss"), PAIRS)
def test_mc_diagonal_is_the_diagonal_of_the_mc_fisher_with_the_same_key(likelihood, loss):
    params = make_params()
    x, _ = make_data()
    t = targets_for(loss, (B, C))
    key = jax.random.key(4)
    a = ggn_diagonal(mlp, loss, params, x, t, method="mc", key=key, num_samples=3)
    b = ggn_diagonal(mlp, loss, params, x, t, method="mc", key=key, num_samples=3, chunk_size=2)
    c = fisher_diagonal(mlp, params, x, likelihood=likelihood, kind="mc", key=key, num_samples=3)
    F = hf.fisher(mlp, params, x, likelihood=likelihood, kind="mc", key=key, num_samples=3)
    np.testing.assert_allclose(flat(a), diag_of(F), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(flat(b), flat(a), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(flat(c), flat(a), rtol=1e-12, atol=1e-15)
    other = ggn_diagonal(mlp, loss, params, x, t, method="mc", key=jax.random.key(5), num_samples=3)
    assert not np.allclose(flat(other), flat(a))


# --- Fisher diagonals ----------------------------------------------------------------------------


@pytest.mark.parametrize(("likelihood", "loss"), PAIRS)
@pytest.mark.parametrize("kind", ["exact", "mc", "empirical"])
def test_fisher_diagonal_matches_the_fisher_operator(likelihood, loss, kind):
    params = make_params()
    x, _ = make_data()
    t = targets_for(loss, (B, T, C))
    options = {"likelihood": likelihood, "kind": kind}
    if kind == "mc":
        options.update(key=jax.random.PRNGKey(6), num_samples=2)
    if kind == "empirical":
        options["targets"] = t
    d = fisher_diagonal(seq_mlp, params, x, **options)
    np.testing.assert_allclose(
        flat(d), diag_of(hf.fisher(seq_mlp, params, x, **options)), rtol=1e-10, atol=1e-13
    )
    if kind == "exact":
        np.testing.assert_allclose(flat(d), exact_ref(loss, seq=True), rtol=1e-10, atol=1e-13)
    if kind == "empirical":  # the mean of squared per-example gradients, by a loop
        grad_b = jax.jit(
            jax.grad(lambda p, xb, tb: per_example_nll(loss, seq_mlp(p, xb[None])[0], tb))
        )
        ref = sum(flat(grad_b(params, x[b], t[b])) ** 2 for b in range(B)) / B
        np.testing.assert_allclose(flat(d), ref, rtol=1e-10, atol=1e-13)
    chunked = fisher_diagonal(seq_mlp, params, x, chunk_size=2, **options)
    np.testing.assert_allclose(flat(chunked), flat(d), rtol=1e-12, atol=1e-15)


# --- bad input ----------------------------------------------------------------------------------


def test_bad_input_raises_naming_the_argument():
    params = make_params()
    x, labels = make_data()
    key = jax.random.key(0)
    sce = "softmax_cross_entropy"
    with pytest.raises(ValueError, match=r"method must be one of \['exact', 'mc'\]; got 'diag'"):
        ggn_diagonal(mlp, sce, params, x, labels, method="diag")
    with pytest.raises(ValueError, match=r"ggn_diagonal\(method='mc'\) needs key= \(a jax\.random"):
        ggn_diagonal(mlp, sce, params, x, labels, method="mc")
    with pytest.raises(TypeError, match=r"key must be a jax\.random key"):
        ggn_diagonal(mlp, sce, params, x, labels, method="mc", key=jnp.ones(3))
    with pytest.raises(ValueError, match=r"method='mc' samples targets .* got a callable"):
        ggn_diagonal(mlp, callable_version(sce), params, x, labels, method="mc", key=key)
    with pytest.raises(ValueError, match=r"num_samples must be an integer in \[1, 2\*\*31 - 1\]"):
        ggn_diagonal(mlp, sce, params, x, labels, method="mc", key=key, num_samples=0)
    with pytest.raises(TypeError, match="num_samples must be a positive integer; got float"):
        ggn_diagonal(mlp, sce, params, x, labels, method="mc", key=key, num_samples=2.0)
    with pytest.raises(TypeError, match="chunk_size must be a positive integer or None; got float"):
        ggn_diagonal(mlp, sce, params, x, labels, chunk_size=1.5)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer in \[1, 2\*\*31 - 1\]"):
        ggn_diagonal(mlp, sce, params, x, labels, chunk_size=0)
    with pytest.raises(ValueError, match=r"loss must be one of \['softmax_cross_entropy', 'mse'"):
        ggn_diagonal(mlp, "hinge", params, x, labels)
    with pytest.raises(TypeError, match="loss must be a callable"):
        ggn_diagonal(mlp, 3, params, x, labels)
    with pytest.raises(ValueError, match=r"targets as integer labels must have shape \(5,\)"):
        ggn_diagonal(mlp, sce, params, x, labels[:4])
    with pytest.raises(
        ValueError,
        match=r"targets.* must have shape \(5, 3\) for outputs of shape \(5, 3\) \(loss 'mse'\); "
        r"got shape \(5, 4\)",
    ):
        ggn_diagonal(mlp, "mse", params, x, jnp.zeros((B, C + 1)), method="mc", key=key)
    with pytest.raises(ValueError, match="loss must return a scalar"):
        ggn_diagonal(mlp, lambda o, y: o, params, x, labels)
    with pytest.raises(ValueError, match="batch axis of inputs first"):
        ggn_diagonal(lambda p, xx: mlp(p, xx)[0], "mse", params, x, jnp.zeros(C))
    with pytest.raises(ValueError, match="every leaf of inputs must have the same leading axis B"):
        ggn_diagonal(lambda p, xs: mlp(p, xs[0]) + xs[1], "mse", params, (x, 1.0), jnp.zeros((B, C)))  # fmt: skip
    with pytest.raises(TypeError, match="model must be callable"):
        ggn_diagonal(None, "mse", params, x, labels)
    with pytest.raises(TypeError, match="params must have floating-point leaves"):
        ggn_diagonal(mlp, "mse", jax.tree.map(lambda a: a.astype(int), params), x, labels)


def test_fisher_diagonal_bad_input():
    params = make_params()
    x, _ = make_data()
    with pytest.raises(ValueError, match=r"likelihood must be one of \['categorical', 'gaussian'"):
        fisher_diagonal(mlp, params, x, likelihood="poisson")
    with pytest.raises(ValueError, match=r"kind must be one of \['exact', 'mc', 'empirical'\]"):
        fisher_diagonal(mlp, params, x, likelihood="categorical", kind="true")
    with pytest.raises(ValueError, match='targets must be given for kind="empirical"'):
        fisher_diagonal(mlp, params, x, likelihood="categorical", kind="empirical")
    with pytest.raises(ValueError, match=r"fisher_diagonal\(kind='mc'\) needs key="):
        fisher_diagonal(mlp, params, x, likelihood="categorical", kind="mc")
    with pytest.raises(ValueError, match=r"num_samples must be an integer in \[1, 2\*\*31 - 1\]"):
        fisher_diagonal(
            mlp, params, x, likelihood="bernoulli", kind="mc", key=jax.random.key(0), num_samples=-1
        )
    with pytest.raises(ValueError, match=r"got shape \(5,\)"):
        fisher_diagonal(mlp, params, x, likelihood="gaussian", kind="empirical", targets=jnp.zeros(B))  # fmt: skip
    with pytest.raises(ValueError, match=r"logits\) of shape \(B, ..., C\)"):
        fisher_diagonal(lambda p, xx: mlp(p, xx)[:, 0], params, x, likelihood="categorical")


def test_out_of_range_targets_raise_when_concrete_and_give_nan_when_traced():
    params = make_params()
    x, labels = make_data()
    bad = labels.at[0].set(C)
    match = r"targets for loss 'softmax_cross_entropy' must be integer labels in \[0, C\)"
    with pytest.raises(ValueError, match=match):
        ggn_diagonal(mlp, "softmax_cross_entropy", params, x, bad)
    with pytest.raises(ValueError, match=match):
        ggn_diagonal(
            mlp, "softmax_cross_entropy", params, x, bad, method="mc", key=jax.random.key(0)
        )
    with pytest.raises(ValueError, match=r"must be numbers in \[0, 1\]"):
        fisher_diagonal(
            mlp, params, x, likelihood="bernoulli", kind="empirical", targets=jnp.full((B, C), 2.0)
        )
    traced = jax.jit(lambda t: ggn_diagonal(mlp, "softmax_cross_entropy", params, x, t))
    assert np.all(np.isnan(flat(traced(bad))))
    np.testing.assert_allclose(flat(traced(labels)), exact_ref("softmax_cross_entropy"), rtol=1e-10)


# --- dtypes, transformations, compiles -----------------------------------------------------------


def test_float32_in_float32_out():
    params = make_params(jnp.float32)
    x, labels = make_data(jnp.float32)
    outs = [
        ggn_diagonal(mlp, "softmax_cross_entropy", params, x, labels, chunk_size=2),
        ggn_diagonal(mlp, callable_version("softmax_cross_entropy"), params, x, labels),
        fisher_diagonal(mlp, params, x, likelihood="categorical"),
    ]
    ref = dense_ggn_diagonal("softmax_cross_entropy", mlp, params, x)
    for d in outs:
        assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(d))
        np.testing.assert_allclose(flat(d), ref, rtol=1e-4, atol=1e-6 * np.abs(ref).max())
    mc = ggn_diagonal(mlp, "mse", params, x, x, method="mc", key=jax.random.key(1))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(mc))


def test_jit_and_vmap():
    params = make_params()
    x, labels = make_data()
    jitted = jax.jit(lambda p: ggn_diagonal(mlp, "softmax_cross_entropy", p, x, labels))
    np.testing.assert_allclose(flat(jitted(params)), exact_ref("softmax_cross_entropy"), rtol=1e-10)
    stacked = jax.tree.map(lambda a: jnp.stack([a, -0.5 * a]), params)
    batched = jax.vmap(lambda p: ggn_diagonal(mlp, "mse", p, x, x[:, :C], chunk_size=2))(stacked)
    for i in range(2):
        p_i = jax.tree.map(lambda a, i=i: a[i], stacked)
        got = flat(jax.tree.map(lambda a, i=i: a[i], batched))
        np.testing.assert_allclose(got, dense_ggn_diagonal("mse", mlp, p_i, x), rtol=1e-10)
    keys = jax.random.split(jax.random.key(2), 2)
    fd = jax.vmap(lambda k: fisher_diagonal(mlp, params, x, likelihood="categorical", kind="mc", key=k))(keys)  # fmt: skip
    one = fisher_diagonal(mlp, params, x, likelihood="categorical", kind="mc", key=keys[1])
    np.testing.assert_allclose(flat(jax.tree.map(lambda a: a[1], fd)), flat(one), rtol=1e-10)


def test_no_recompiles_at_new_params():
    params = make_params(jnp.float32)
    x, labels = make_data(jnp.float32)
    nll = callable_version("softmax_cross_entropy")
    counts, sizes = [], []
    for step in range(4):
        key = jax.random.key(step)
        with count_compiles() as compiled:
            outs = [
                ggn_diagonal(mlp, "softmax_cross_entropy", params, x, labels),
                ggn_diagonal(mlp, "softmax_cross_entropy", params, x, labels, chunk_size=2),
                ggn_diagonal(mlp, nll, params, x, labels),
                ggn_diagonal(mlp, "mse", params, x, x, method="mc", key=key, num_samples=2),
                fisher_diagonal(mlp, params, x, likelihood="bernoulli", kind="mc", key=key),
                fisher_diagonal(
                    mlp, params, x, likelihood="categorical", kind="empirical", targets=labels
                ),
            ]
            jax.block_until_ready(outs)
            params = jax.tree.map(lambda a, d: a - 0.1 * d, params, outs[0])
        counts.append(len(compiled))
        sizes.append((_staging.cache_size(), len(_staging._LINEAR)))
    assert counts[0] > 0
    assert counts[1:] == [0, 0, 0], counts
    assert len(set(sizes)) == 1, sizes

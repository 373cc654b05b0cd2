"""Inside a training loop nothing recompiles: XLA compiles are counted across steps.

The loop a practitioner writes: train a small network and, every step, rebuild curvature
operators at the new parameters and run every algorithm on them. After the first step (which
compiles everything once) no step may compile anything, with or without a jit of their own.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessfree as hf
from helpers import count_compiles
from hessfree import _staging


def mlp(p, x):
    h = jnp.tanh(x @ p["w1"] + p["b1"])
    return h @ p["w2"] + p["b2"]


def loss(p, x, y):
    logits = mlp(p, x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def init(key, dtype=jnp.float32):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (20, 32), dtype) / 5,
        "b1": jnp.zeros(32, dtype),
        "w2": jax.random.normal(k2, (32, 5), dtype) / 6,
        "b2": jnp.zeros(5, dtype),
    }


def data(key, dtype=jnp.float32):
    kx, ky = jax.random.split(key)
    return jax.random.normal(kx, (64, 20), dtype), jax.random.randint(ky, (64,), 0, 5)


def curvature_step(p, x, y, key):
    """Everything the issue lists, at parameters p: returns numbers to check."""
    keys = jax.random.split(key, 5)
    H = hf.hessian(loss, p, x, y)
    H_plain = hf.hessian(loss, p, x, y, cache=False)
    G = hf.ggn(mlp, "softmax_cross_entropy", p, x, y)
    F = hf.fisher(mlp, p, x, likelihood="categorical", kind="mc", key=keys[0])
    top = hf.eigsh(H, 1, key=keys[1], maxiter=50)
    tr = hf.trace(G, key=keys[2], num_probes=8)
    diag = hf.diagonal(F, key=keys[3], num_probes=4)
    g = jax.grad(loss)(p, x, y)
    step = hf.cg(G + 1e-2, g, maxiter=10)
    mv = H_plain.mv(g)
    short = hf.minimize(loss, p, x, y, maxiter=2)
    fn = hf.hvp_fn(loss, p, x, y)
    return {
        "top": top.eigenvalues[0],
        "trace": tr.value,
        "diag": diag.value["b2"],
        "step": step.x["b2"],
        "mv": mv["b2"],
        "fn": fn(g)["b2"],
        "min": short.fun,
        "hvp": hf.hvp(loss, p, g, x, y)["b2"],
    }


def _train(p, x, y):
    g = jax.grad(loss)(p, x, y)
    return jax.tree.map(lambda a, b: a - 0.1 * b, p, g)


@pytest.mark.slow
def test_eager_loop_compiles_nothing_after_the_first_step():
    p, (x, y) = init(jax.random.key(0)), data(jax.random.key(1))
    counts, sizes = [], []
    for step in range(5):
        with count_compiles() as compiled:
            out = curvature_step(p, x, y, jax.random.key(10 + step))
            jax.block_until_ready(out)
            p = _train(p, x, y)
        counts.append(len(compiled))
        sizes.append((_staging.cache_size(), len(_staging._LINEAR)))
        assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    assert counts[0] > 0
    assert counts[1:] == [0, 0, 0, 0], counts
    assert len(set(sizes)) == 1, sizes  # no cache grows per call


def test_loop_under_the_users_own_jit_compiles_once():
    p, (x, y) = init(jax.random.key(0)), data(jax.random.key(1))
    step_fn = jax.jit(lambda p, key: (curvature_step(p, x, y, key), _train(p, x, y)))
    counts = []
    for step in range(5):
        with count_compiles() as compiled:
            out, p = step_fn(p, jax.random.key(step))
            jax.block_until_ready(out)
        counts.append(len(compiled))
    assert counts[0] > 0 and counts[1:] == [0, 0, 0, 0], counts


def test_rebuilt_operators_give_the_values_of_fresh_dense_references():
    """The cache must not serve a stale linearization: products at the new point are exact."""
    p, (x, y) = init(jax.random.key(0), jnp.float64), data(jax.random.key(1), jnp.float64)
    flat, unravel = jax.flatten_util.ravel_pytree(p)
    for _ in range(3):
        H = hf.hessian(loss, p, x, y)
        v = jax.tree.map(jnp.ones_like, p)
        dense = jax.hessian(lambda z: loss(unravel(z), x, y))(jax.flatten_util.ravel_pytree(p)[0])
        got = jax.flatten_util.ravel_pytree(H.mv(v))[0]
        np.testing.assert_allclose(got, dense @ jnp.ones_like(flat), rtol=1e-10, atol=1e-12)
        p = _train(p, x, y)


def test_flax_nnx_model_split_compiles_nothing_after_the_first_step():
    nnx = pytest.importorskip("flax.nnx")

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(20, 16, rngs=rngs)
            self.l2 = nnx.Linear(16, 5, rngs=rngs)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    graphdef, params = nnx.split(MLP(nnx.Rngs(0)))

    def model(params, x):
        return nnx.merge(graphdef, params)(x)

    x, y = data(jax.random.key(1))
    counts = []
    for step in range(4):
        with count_compiles() as compiled:
            G = hf.ggn(model, "softmax_cross_entropy", params, x, y)
            top = hf.eigsh(G, 1, key=jax.random.key(step), maxiter=50)
            jax.block_until_ready(top.eigenvalues)
            g = jax.grad(
                lambda q: hf._losses.LOSSES["softmax_cross_entropy"].value(model(q, x), y)
            )(params)
            params = jax.tree.map(lambda a, b: a - 0.1 * b, params, g)
        counts.append(len(compiled))
        assert float(top.eigenvalues[0]) > 0
    assert counts[0] > 0 and counts[1:] == [0, 0, 0], counts


def test_changing_a_count_compiles_but_changing_values_does_not():
    A, A2 = jnp.diag(jnp.arange(1.0, 9.0)), jnp.diag(jnp.arange(2.0, 10.0))
    keys = jax.random.split(jax.random.key(0), 2)
    hf.trace(A, key=keys[0], num_probes=4)
    with count_compiles() as same:
        hf.trace(A2, key=keys[1], num_probes=4)
    with count_compiles() as other:
        hf.trace(A, key=keys[0], num_probes=5)
    assert len(same) == 0 and len(other) > 0

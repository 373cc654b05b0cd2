"""Built-in workloads for the CLI, the benchmarks and the examples.

Each is deterministic given its key and sizes, made from synthetic data (nothing is
downloaded). A :class:`Workload` is a scalar objective ``f(x, *args)`` at a point; the model
workloads also expose ``model(params, inputs) -> outputs`` and their data, for the GGN and
Fisher operators.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Workload(NamedTuple):
    """A scalar objective `f` at the point `x` with fixed arguments `args`."""

    name: str
    f: Callable[..., jax.Array]
    x: Any
    args: tuple[Any, ...]
    description: str
    model: Callable[..., jax.Array] | None = None
    inputs: jax.Array | None = None
    targets: jax.Array | None = None
    loss: str | None = None


def _dense_init(key: jax.Array, n_in: int, n_out: int, dtype: Any) -> dict[str, jax.Array]:
    w = jax.random.normal(key, (n_in, n_out), dtype) * jnp.sqrt(2.0 / n_in).astype(dtype)
    return {"w": w, "b": jnp.zeros((n_out,), dtype)}


def mlp_apply(params: list[dict[str, jax.Array]], inputs: jax.Array) -> jax.Array:
    """A tanh MLP: ``logits = W_L tanh(… tanh(W_1 x + b_1) …) + b_L``."""
    h = inputs
    for layer in params[:-1]:
        h = jnp.tanh(h @ layer["w"] + layer["b"])
    return h @ params[-1]["w"] + params[-1]["b"]


def _softmax_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
    # One-hot rather than a gather: the same value, and it partitions cleanly when the batch
    # is sharded (a gather with sharded indices needs an explicit output sharding).
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(
        jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype), axis=-1)
    )


def _mlp_loss(params: Any, inputs: jax.Array, labels: jax.Array) -> jax.Array:
    return _softmax_xent(mlp_apply(params, inputs), labels)


def mlp_classifier(
    key: jax.Array | None = None,
    sizes: tuple[int, ...] = (784, 1024, 256, 10),
    batch: int = 256,
    dtype: Any = jnp.float32,
) -> Workload:
    """A tanh MLP classifier under softmax cross-entropy; the default has ~1.07M parameters."""
    key = jax.random.PRNGKey(0) if key is None else key
    keys = jax.random.split(key, len(sizes) + 1)
    params = [
        _dense_init(k, a, b, dtype)
        for k, a, b in zip(keys[:-2], sizes[:-1], sizes[1:], strict=False)
    ]
    inputs = jax.random.normal(keys[-2], (batch, sizes[0]), dtype)
    labels = jax.random.randint(keys[-1], (batch,), 0, sizes[-1])
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))
    return Workload(
        "mlp",
        _mlp_loss,
        params,
        (inputs, labels),
        f"MLP {'-'.join(map(str, sizes))}, {n:,} parameters, batch {batch}",
        model=mlp_apply,
        inputs=inputs,
        targets=labels,
        loss="softmax_cross_entropy",
    )


def _quadratic(x: jax.Array, A: jax.Array) -> jax.Array:
    return 0.5 * x @ A @ x


def quadratic(key: jax.Array | None = None, d: int = 3000, dtype: Any = jnp.float32) -> Workload:
    """The seed's quadratic ``0.5 xᵀAx`` with a random symmetric A of size d."""
    key = jax.random.PRNGKey(1) if key is None else key
    ka, kx = jax.random.split(key)
    B = jax.random.normal(ka, (d, d), dtype) / jnp.sqrt(d).astype(dtype)
    A = 0.5 * (B + B.T)
    x = jax.random.normal(kx, (d,), dtype)
    return Workload("quadratic", _quadratic, x, (A,), f"quadratic 0.5 xᵀAx, d = {d:,}")


def attention_apply(params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """One pre-norm transformer block (single-head self-attention + tanh MLP), mean-pooled."""
    d = tokens.shape[-1]
    h = tokens / jnp.sqrt(jnp.mean(tokens**2, axis=-1, keepdims=True) + 1e-6)
    q, k, v = h @ params["wq"], h @ params["wk"], h @ params["wv"]
    scores = jnp.einsum("bqd,bkd->bqk", q, k) / jnp.sqrt(d).astype(tokens.dtype)
    h = tokens + jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(scores, axis=-1), v) @ params["wo"]
    h = h + jnp.tanh(h @ params["w1"]) @ params["w2"]
    return jnp.mean(h, axis=1) @ params["head"]


def _attention_loss(params: Any, tokens: jax.Array, labels: jax.Array) -> jax.Array:
    return _softmax_xent(attention_apply(params, tokens), labels)


def attention_block(
    key: jax.Array | None = None,
    batch: int = 32,
    seq: int = 64,
    d_model: int = 128,
    n_classes: int = 10,
    dtype: Any = jnp.float32,
) -> Workload:
    """A self-attention block classifier on random token embeddings (~200k parameters)."""
    key = jax.random.PRNGKey(2) if key is None else key
    ks = jax.random.split(key, 9)
    scale = 1.0 / jnp.sqrt(d_model).astype(dtype)
    shapes = {
        "wq": (d_model, d_model),
        "wk": (d_model, d_model),
        "wv": (d_model, d_model),
        "wo": (d_model, d_model),
        "w1": (d_model, 4 * d_model),
        "w2": (4 * d_model, d_model),
        "head": (d_model, n_classes),
    }
    params = {
        name: jax.random.normal(k, shape, dtype) * scale
        for k, (name, shape) in zip(ks[:7], shapes.items(), strict=True)
    }
    tokens = jax.random.normal(ks[7], (batch, seq, d_model), dtype)
    labels = jax.random.randint(ks[8], (batch,), 0, n_classes)
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))
    return Workload(
        "attention",
        _attention_loss,
        params,
        (tokens, labels),
        f"self-attention block, {n:,} parameters, batch {batch} × {seq} tokens",
        model=attention_apply,
        inputs=tokens,
        targets=labels,
        loss="softmax_cross_entropy",
    )


WORKLOADS: dict[str, Callable[..., Workload]] = {
    "mlp": mlp_classifier,
    "quadratic": quadratic,
    "attention": attention_block,
}

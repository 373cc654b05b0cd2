"""A training loop with curvature measured every step: cost per step ÷ the products it runs.

The loop a practitioner writes without a jit of their own: at every step, rebuild the operator
at the new parameters (hessian cached and not, ggn, fisher mc) and run K products with it
(``op.mv``), then take an SGD step. The reference is the same K products written by hand as
one pre-compiled jitted function each (``jvp(grad f)`` for the Hessian, ``Jᵀ H_L J`` through
``jvp``/``vjp`` of the model for the GGN and Fisher). The ratio is what hessfree's staging,
checks and dispatch add on top of the products themselves (target: at most 1.5). A second
ratio divides by the same hessfree step run under one jit of the user's (the compiled programs
without any Python dispatch). Also counts XLA compiles after the first step (must be 0).

    python benchmarks/bench_loop.py [--steps 12] [--products 10] [--batch 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp

import hessfree as hf

COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: (
        COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
)


def mlp(p, x):
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss(p, x, y):
    return hf._losses.LOSSES["softmax_cross_entropy"].value(mlp(p, x), y)


def init(key):
    k1, k2 = jax.random.split(key)
    return {
        "w1": jax.random.normal(k1, (20, 32)) / 5,
        "b1": jnp.zeros(32),
        "w2": jax.random.normal(k2, (32, 5)) / 6,
        "b2": jnp.zeros(5),
    }


@jax.jit
def sgd(p, x, y):
    return jax.tree.map(lambda a, g: a - 0.05 * g, p, jax.grad(loss)(p, x, y))


@jax.jit
def raw_hvp(p, x, y, v):
    return jax.jvp(lambda q: jax.grad(loss)(q, x, y), (p,), (v,))[1]


@jax.jit
def raw_ggn(p, x, y, v):
    out, jv = jax.jvp(lambda q: mlp(q, x), (p,), (v,))
    prob = jax.nn.softmax(out)
    hu = (prob * jv - prob * jnp.sum(prob * jv, -1, keepdims=True)) / x.shape[0]
    return jax.vjp(lambda q: mlp(q, x), p)[1](hu)[0]


@jax.jit
def raw_fisher_mc(p, x, key, v):
    out, jv = jax.jvp(lambda q: mlp(q, x), (p,), (v,))
    labels = jax.random.categorical(key, out)
    r = jax.nn.softmax(out) - jax.nn.one_hot(labels, out.shape[-1])
    hu = r * jnp.sum(r * jv, -1, keepdims=True) / x.shape[0]
    return jax.vjp(lambda q: mlp(q, x), p)[1](hu)[0]


def hessfree_step(kind, p, x, y, key, v, k):
    if kind == "hessian (cached)":
        op = hf.hessian(loss, p, x, y)
    elif kind == "hessian (uncached)":
        op = hf.hessian(loss, p, x, y, cache=False)
    elif kind == "ggn":
        op = hf.ggn(mlp, "softmax_cross_entropy", p, x, y)
    else:
        op = hf.fisher(mlp, p, x, likelihood="categorical", kind="mc", key=key)
    return [op.mv(jax.tree.map(lambda a, i=i: a * (i + 1), v)) for i in range(k)]


def jitted_step(kind, p, x, y, key, v, k):
    """The same hessfree step under the user's own jit: the products alone, no dispatch."""
    return _JITTED(kind, p, x, y, key, v, k)


_JITTED = jax.jit(hessfree_step, static_argnums=(0, 6))


def raw_step(kind, p, x, y, key, v, k):
    if kind.startswith("hessian"):
        return [raw_hvp(p, x, y, jax.tree.map(lambda a, i=i: a * (i + 1), v)) for i in range(k)]
    if kind == "ggn":
        return [raw_ggn(p, x, y, jax.tree.map(lambda a, i=i: a * (i + 1), v)) for i in range(k)]
    return [raw_fisher_mc(p, x, key, jax.tree.map(lambda a, i=i: a * (i + 1), v)) for i in range(k)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--products", type=int, default=10)
    parser.add_argument("--batch", type=int, default=512)
    args = parser.parse_args()
    key = jax.random.key(0)
    x = jax.random.normal(key, (args.batch, 20))
    y = jax.random.randint(jax.random.key(1), (args.batch,), 0, 5)
    kinds = ["hessian (cached)", "hessian (uncached)", "ggn", "fisher (mc)"]
    rows = []
    print(
        f"{jax.devices()[0].device_kind}; MLP 20-32-5, batch {args.batch}, {args.products} products/step"
    )
    print("step ÷ products: the eager hessfree step ÷ the same products hand-written and jitted")
    print("step ÷ own jit: the eager hessfree step ÷ the same step under one user jit")
    print(
        f"{'operator':20s} {'step ÷ products':>16s} {'step ÷ own jit':>18s} {'compiles after step 1':>22s}"
    )
    for kind in kinds:
        p = init(jax.random.key(2))
        v = jax.tree.map(jnp.ones_like, p)
        times = {"hessfree": [], "raw": [], "jitted": []}
        compiles_after_first = 0
        for step in range(args.steps):
            skey = jax.random.fold_in(key, step)
            jax.block_until_ready((p, skey))
            steps = (("hessfree", hessfree_step), ("raw", raw_step), ("jitted", jitted_step))
            for name, fn in steps:  # interleaved
                start_compiles = len(COMPILES)
                t0 = time.perf_counter()
                jax.block_until_ready(fn(kind, p, x, y, skey, v, args.products))
                elapsed = time.perf_counter() - t0
                if step > 0:
                    times[name].append(elapsed)
                    if name == "hessfree":
                        compiles_after_first += len(COMPILES) - start_compiles
            p = sgd(p, x, y)
        med = {name: statistics.median(t) for name, t in times.items()}
        ratio, overhead = med["hessfree"] / med["raw"], med["hessfree"] / med["jitted"]
        row = {"operator": kind, "ratio": ratio, "overhead": overhead}
        rows.append(row | {"compiles_after_first": compiles_after_first})
        print(f"{kind:20s} {ratio:16.2f} {overhead:18.2f} {compiles_after_first:22d}")
    out = Path(__file__).parent / "results" / "bench_loop.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

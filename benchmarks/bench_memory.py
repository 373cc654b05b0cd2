"""Memory controls side by side: rematerialization and chunking, with their time cost.

On a deep residual MLP (12 blocks of width 256 with a 4x expansion, batch 512, ~3.1M
parameters) it measures, for each setting:
- the bytes a cached product holds (the linearization behind ``hvp_fn``/``hessian``),
- XLA's compiled temporary memory of one uncached ``hvp``,
- the median time per product (cached and uncached), interleaved rounds after warm-up,
and for ``hvps`` with and without ``chunk_size``, the compiled temporary memory and time.

    python benchmarks/bench_memory.py [--quick] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp

import hessfree as hf
from hessfree._cli.bench import interleaved_times
from hessfree._products import cached_gradient_linearization

RESULTS = Path(__file__).parent / "results"


def residual_mlp(depth: int, width: int, batch: int):
    keys = jax.random.split(jax.random.PRNGKey(0), depth)
    params = [
        {
            "w1": jax.random.normal(k, (width, 4 * width)) / jnp.sqrt(width),
            "w2": jax.random.normal(k, (4 * width, width)) / jnp.sqrt(4 * width),
        }
        for k in keys
    ]
    x = jax.random.normal(jax.random.PRNGKey(1), (batch, width))

    def f(params, x):
        h = x
        for p in params:
            h = h + jnp.tanh(jax.nn.gelu(h @ p["w1"]) @ p["w2"])
        return jnp.mean(h**2)

    return f, params, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    depth, width, batch = (4, 64, 128) if args.quick else (12, 256, 512)
    f, params, x = residual_mlp(depth, width, batch)
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))
    v = jax.tree_util.tree_map(jnp.ones_like, params)
    print(f"deep residual MLP: {depth} blocks, width {width}, batch {batch}, {n:,} parameters")

    settings = {
        "no remat": False,
        "remat=True": True,
        "remat=dots_saveable": jax.checkpoint_policies.dots_saveable,
    }
    candidates, rows = {}, {}
    for name, remat in settings.items():
        # the cached operator's linearization, its residuals as pytree leaves
        _, linear = cached_gradient_linearization(f, params, (x,), "auto", remat)
        held = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(linear))
        uncached = jax.jit(lambda p, u, a, r=remat: hf.hvp(f, p, u, a, remat=r))
        temp = uncached.lower(params, v, x).compile().memory_analysis().temp_size_in_bytes
        rows[name] = {"cached_bytes": int(held), "uncached_temp_bytes": int(temp)}
        candidates[f"{name}: cached product"] = (hf.hvp_fn(f, params, x, remat=remat), (v,))
        candidates[f"{name}: uncached hvp"] = (uncached, (params, v, x))

    k = 16
    vs = jax.tree_util.tree_map(lambda a: jnp.stack([a] * k), v)
    for chunk in (None, 4):
        fn = jax.jit(lambda p, us, a, c=chunk: hf.hvps(f, p, us, a, chunk_size=c))
        temp = fn.lower(params, vs, x).compile().memory_analysis().temp_size_in_bytes
        rows[f"hvps k={k}, chunk_size={chunk}"] = {"uncached_temp_bytes": int(temp)}
        candidates[f"hvps k={k}, chunk_size={chunk}"] = (fn, (params, vs, x))

    print(f"timing {len(candidates)} programs, {args.repeats} interleaved rounds …", flush=True)
    times = interleaved_times(candidates, repeats=args.repeats)
    base_time = times["no remat: cached product"]
    base_held = rows["no remat"]["cached_bytes"]
    print(
        f"\n{'setting':38}{'held MiB':>10}{'÷ plain':>9}{'temp MiB':>10}{'ms/product':>12}{'÷ plain cached':>16}"
    )
    for name in settings:
        r = rows[name]
        for which in ("cached product", "uncached hvp"):
            t = times[f"{name}: {which}"]
            held = (
                f"{r['cached_bytes'] / 2**20:10.1f}{r['cached_bytes'] / base_held:9.2f}"
                if which == "cached product"
                else f"{'':19}"
            )
            print(
                f"{name + ', ' + which:38}{held}{r['uncached_temp_bytes'] / 2**20:10.1f}{t * 1e3:12.1f}{t / base_time:16.2f}"
            )
            r[f"seconds_{which.replace(' ', '_')}"] = t
    for chunk in (None, 4):
        name = f"hvps k={k}, chunk_size={chunk}"
        t = times[name]
        rows[name]["seconds"] = t
        print(
            f"{name:30}{'':19}{rows[name]['uncached_temp_bytes'] / 2**20:10.1f}{t * 1e3 / k:12.1f}{t / k / base_time:16.2f}"
        )
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "memory.json"
    out.write_text(json.dumps({"parameters": n, "rows": rows}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

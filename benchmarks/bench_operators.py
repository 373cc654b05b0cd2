"""GGN and Fisher products vs Hessian products, side by side in one process.

For each workload (the ~1M-parameter MLP and the attention block), times one product of every
curvature operator, cached (operator built once, only ``mv`` timed) and uncached (build and
product in one jitted call, what a single product costs from scratch), and reads XLA's compiled
memory analysis of the same jitted call. Times are medians over repeats after a warm-up, with
inputs and outputs blocked until ready. Everything is reported as a ratio to the cached Hessian
product, and the built-in closed-form loss against the same loss given as a callable.

    python benchmarks/bench_operators.py [--quick] [--repeats N]

Writes benchmarks/results/operators.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

import hessfree as hf
from hessfree._cli.workloads import Workload, attention_block, mlp_classifier

RESULTS = os.path.join(os.path.dirname(__file__), "results")


def softmax_xent_callable(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """The built-in "softmax_cross_entropy" written as a user would, for the callable path."""
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))


def builders(w: Workload) -> dict[str, Callable[[Any], hf.CurvatureOperator]]:
    """name -> (params -> operator) for every curvature compared."""
    model, x, y = w.model, w.inputs, w.targets
    key = jax.random.PRNGKey(0)
    chunk = max(1, x.shape[0] // 4)

    def hess(p: Any) -> hf.CurvatureOperator:
        return hf.hessian(w.f, p, *w.args)

    return {
        "hessian": hess,
        "ggn (closed form)": lambda p: hf.ggn(model, "softmax_cross_entropy", p, x, y),
        "ggn (callable loss)": lambda p: hf.ggn(model, softmax_xent_callable, p, x, y),
        "fisher exact": lambda p: hf.fisher(model, p, x, likelihood="categorical"),
        "fisher mc (1 sample)": lambda p: hf.fisher(
            model, p, x, likelihood="categorical", kind="mc", key=key
        ),
        "fisher empirical": lambda p: hf.fisher(
            model, p, x, likelihood="categorical", kind="empirical", targets=y
        ),
        f"fisher empirical (chunk {chunk})": lambda p: hf.fisher(
            model, p, x, likelihood="categorical", kind="empirical", targets=y, chunk_size=chunk
        ),
    }


def timed(fn: Callable[..., Any], args: tuple[Any, ...]) -> float:
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - t0


def memory(fn: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, int]:
    """XLA's compiled memory analysis of ``fn(*args)`` (deterministic, bytes)."""
    m = jax.jit(fn).lower(*args).compile().memory_analysis()
    if m is None:
        return {"temp": -1, "peak": -1, "resident": -1}
    peak = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    peak -= m.alias_size_in_bytes
    return {
        "temp": int(m.temp_size_in_bytes),
        "peak": int(peak),
        "resident": int(m.argument_size_in_bytes),
    }


def cached(op: hf.CurvatureOperator, v: Any) -> Any:
    return op.mv(v)


def measure(w: Workload, repeats: int) -> dict[str, dict[str, Any]]:
    """Warm up every candidate, then time them round-robin (load drift hits all alike)."""
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / a.size**0.5, w.x)
    calls: dict[tuple[str, str], tuple[Callable[..., Any], tuple[Any, ...]]] = {}
    rows: dict[str, dict[str, Any]] = {}
    for name, build in builders(w).items():

        def uncached(p: Any, v: Any, build: Callable[[Any], hf.CurvatureOperator] = build) -> Any:
            return build(p).mv(v)

        op = jax.block_until_ready(build(w.x))
        calls[name, "cached"] = (jax.jit(cached), (op, v))
        calls[name, "uncached"] = (jax.jit(uncached), (w.x, v))
        rows[name] = {
            "cached_mem": memory(cached, (op, v)),
            "uncached_mem": memory(uncached, (w.x, v)),
        }
        for fn, args in (calls[name, "cached"], calls[name, "uncached"]):
            timed(fn, args)  # warm-up: compile
        print(f"  compiled {name}", flush=True)
    times: dict[tuple[str, str], list[float]] = {k: [] for k in calls}
    for _ in range(repeats):
        for k, (fn, args) in calls.items():
            times[k].append(timed(fn, args))
    for (name, how), ts in times.items():
        rows[name][f"{how}_s"] = statistics.median(ts)
    return rows


def mib(b: int) -> str:
    return f"{b / 2**20:8.1f}"


def table(name: str, rows: dict[str, dict[str, Any]]) -> str:
    base = rows["hessian"]
    bt, bm = base["cached_s"], base["cached_mem"]["peak"]
    head = (
        f"{'operator':34s} {'cached ms':>9s} {'×hess':>6s} {'uncached ms':>11s} {'×hess':>6s} "
        f"{'peak MiB c/u':>19s} {'×hess c':>7s} {'held MiB':>8s}"
    )
    lines = [f"\n{name}", head, "-" * len(head)]
    for op, r in rows.items():
        lines.append(
            f"{op:34s} {1e3 * r['cached_s']:9.2f} {r['cached_s'] / bt:6.2f} "
            f"{1e3 * r['uncached_s']:11.2f} {r['uncached_s'] / base['uncached_s']:6.2f} "
            f"{mib(r['cached_mem']['peak'])} /{mib(r['uncached_mem']['peak'])} "
            f"{r['cached_mem']['peak'] / bm:7.2f} {mib(r['cached_mem']['resident'])}"
        )
    g, gc = rows["ggn (closed form)"], rows["ggn (callable loss)"]
    lines.append(
        f"closed-form loss vs callable: cached time ×{g['cached_s'] / gc['cached_s']:.2f}, "
        f"uncached time ×{g['uncached_s'] / gc['uncached_s']:.2f}, "
        f"cached peak memory ×{g['cached_mem']['peak'] / gc['cached_mem']['peak']:.2f}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small workloads, few repeats")
    parser.add_argument("--repeats", type=int, default=None)
    a = parser.parse_args()
    repeats = a.repeats or (3 if a.quick else 10)
    if a.quick:
        workloads = [
            mlp_classifier(sizes=(784, 128, 64, 10), batch=64),
            attention_block(batch=8, seq=16, d_model=64),
        ]
    else:
        workloads = [mlp_classifier(), attention_block()]
    out: dict[str, Any] = {
        "benchmark": "operators",
        "quick": a.quick,
        "repeats": repeats,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.platform(),
        "reference": "hessian (cached) product; ratios are time or memory over it",
        "workloads": {},
    }
    for w in workloads:
        print(f"{w.name}: {w.description}", flush=True)
        rows = measure(w, repeats)
        print(table(w.description, rows), flush=True)
        out["workloads"][w.name] = {"description": w.description, "rows": rows}
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "operators.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

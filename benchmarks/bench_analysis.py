"""Curvature analysis side by side: eigsh vs ARPACK, trace estimators, per-example norms.

    .venv/bin/python benchmarks/bench_analysis.py [--quick] [--repeats N]

1. Top-1 and top-5 Hessian eigenvalues of the ~1M-parameter MLP: hessfree.eigsh vs
   scipy.sparse.linalg.eigsh (ARPACK) on the same operator's as_scipy(), same tolerance;
   HVP counts and wall time (median of repeats after a warm-up). Then the training-loop
   case: eigsh(k=1) on a cached Hessian rebuilt (hessfree.hessian) at new parameters before
   every call, 5 rebuilds, time per call after the first vs. eigsh(k=1) on one fixed
   operator, and the XLA compiles after the first call (0 expected).
2. Trace error vs HVP budget, Hutchinson vs Hutch++, on a small MLP whose exact trace is
   computed densely (mean relative error over seeds).
3. Per-example gradient norms: time and compiled temp memory (XLA memory_analysis) of
   hessfree.per_example_grad_norms (whole batch, and chunked) vs materializing vmap(grad).

Prints tables of ratios and writes benchmarks/results/analysis.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg as sla
from jax.flatten_util import ravel_pytree

import hessfree
from hessfree._cli.workloads import mlp_apply, mlp_classifier

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")

from _timing import median_time  # noqa: E402

COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: (
        COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
)


def scipy_eigsh(scipy_op: Any, k: int, tol: float, v0: np.ndarray, repeats: int) -> Any:
    """ARPACK on the operator's LinearOperator: (median seconds, eigenvalues, HVPs per solve)."""
    calls = [0]

    def matvec(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return scipy_op.matvec(x)

    counted = sla.LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
    seconds, values = median_time(
        lambda: sla.eigsh(counted, k, which="LA", tol=tol, v0=v0)[0], repeats
    )
    return seconds, values, calls[0] // (repeats + 1)


def bench_eigsh(workload: Any, tol: float, repeats: int) -> list[dict[str, Any]]:
    op = hessfree.hessian(workload.f, workload.x, *workload.args)
    scipy_op = op.as_scipy()
    n = op.shape[0]
    v0 = np.random.default_rng(0).normal(size=n).astype(np.float32)
    rows = []
    for k in (1, 5):
        key = jax.random.PRNGKey(k)
        seconds, result = median_time(
            lambda k=k, key=key: hessfree.eigsh(op, k, key=key, tol=tol), repeats
        )
        values, hvps = result.eigenvalues, int(result.num_matvecs)
        scipy_seconds, scipy_values, scipy_hvps = scipy_eigsh(scipy_op, k, tol, v0, repeats)
        rows.append(
            {
                "k": k,
                "tol": tol,
                "hessfree_hvps": hvps,
                "scipy_hvps": scipy_hvps,
                "hvp_ratio": scipy_hvps / hvps,
                "hessfree_s": seconds,
                "scipy_s": scipy_seconds,
                "speedup": scipy_seconds / seconds,
                "converged": bool(result.success),
                "status": int(result.status),
                "hessfree_eigenvalues": np.asarray(values).tolist(),
                "scipy_eigenvalues": np.sort(scipy_values).tolist(),
                "max_rel_diff": float(
                    np.max(
                        np.abs(np.asarray(values) - np.sort(scipy_values)) / np.abs(scipy_values)
                    )
                ),
            }
        )
    return rows


def bench_eigsh_loop(workload: Any, tol: float, rebuilds: int = 5) -> dict[str, Any]:
    """eigsh(k=1) on a Hessian rebuilt at each new point vs. on one fixed operator.

    The points are `rebuilds` SGD iterates (computed beforehand). At each point, interleaved:
    "rebuilt" builds ``hessian(f, p, *args)`` (cached) and runs eigsh on it, "fixed" runs
    eigsh on the operator built once at the first point. Per-call time is the median over the
    calls after the first; HVPs are the median count of those calls (the rebuilt operator's
    convergence varies with the point, hence also the ratio per HVP).
    """
    f, args = workload.f, workload.args
    grad = jax.jit(jax.grad(f))
    points = [workload.x]
    for _ in range(rebuilds - 1):
        g = grad(points[-1], *args)
        points.append(jax.tree_util.tree_map(lambda a, b: a - 0.1 * b, points[-1], g))
    jax.block_until_ready(points)
    key = jax.random.PRNGKey(0)
    fixed_op = jax.block_until_ready(hessfree.hessian(f, points[0], *args))
    variants = {
        "rebuilt": lambda p: hessfree.eigsh(hessfree.hessian(f, p, *args), 1, key=key, tol=tol),
        "fixed": lambda _: hessfree.eigsh(fixed_op, 1, key=key, tol=tol),
    }
    samples: dict[str, dict[str, Any]] = {
        name: {"times": [], "hvps": [], "compiles": 0} for name in variants
    }
    for i, p in enumerate(points):
        for name, fn in variants.items():  # interleaved, so load drift hits both alike
            before = len(COMPILES)
            start = time.perf_counter()
            result = jax.block_until_ready(fn(p))
            elapsed = time.perf_counter() - start
            if i > 0:
                samples[name]["times"].append(elapsed)
                samples[name]["hvps"].append(int(result.num_matvecs))
                samples[name]["compiles"] += len(COMPILES) - before
    row: dict[str, Any] = {"rebuilds": rebuilds, "tol": tol}
    for name, sample in samples.items():
        row[f"{name}_s"] = statistics.median(sample["times"])
        row[f"{name}_hvps"] = statistics.median(sample["hvps"])
        row[f"{name}_compiles_after_first"] = sample["compiles"]
    row["ratio"] = row["rebuilt_s"] / row["fixed_s"]
    row["ratio_per_hvp"] = (row["rebuilt_s"] / row["rebuilt_hvps"]) / (
        row["fixed_s"] / row["fixed_hvps"]
    )
    return row


def trace_errors(A: Any, exact: float, budgets: list[int], seeds: int) -> list[dict[str, Any]]:
    """Mean relative error over seeds of both estimators at each HVP budget."""
    keys = jax.random.split(jax.random.PRNGKey(0), seeds)
    rows = []
    for budget in budgets:
        row: dict[str, Any] = {"hvps": budget, "exact": exact}
        for method in ("hutchinson", "hutch++"):
            values = jax.vmap(
                lambda key, m=method, b=budget: (
                    hessfree.trace(A, key=key, num_probes=b, method=m).value
                )
            )(keys)
            row[method] = float(np.mean(np.abs(np.asarray(values) - exact)) / abs(exact))
        row["ratio"] = row["hutchinson"] / row["hutch++"]
        rows.append(row)
    return rows


def bench_trace(budgets: list[int], seeds: int) -> dict[str, list[dict[str, Any]]]:
    """A small MLP's Hessian (exact trace from the dense Hessian), and a decaying spectrum."""
    workload = mlp_classifier(sizes=(20, 32, 5), batch=128)
    flat, unravel = ravel_pytree(workload.x)
    dense = jax.jit(jax.hessian(lambda z: workload.f(unravel(z), *workload.args)))(flat)
    op = hessfree.hessian(workload.f, workload.x, *workload.args)
    n = 1000
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(n, n)))
    decaying = jnp.asarray((q * np.arange(1, n + 1) ** -1.5) @ q.T, jnp.float32)
    mlp_name = f"MLP 20-32-5 Hessian (n = {flat.size})"
    return {
        mlp_name: trace_errors(op, float(jnp.trace(dense)), budgets, seeds),
        f"dense, eigenvalues i^-1.5 (n = {n})": trace_errors(
            decaying, float(jnp.trace(decaying)), budgets, seeds
        ),
    }


def _example_loss(params: Any, example: tuple[jax.Array, jax.Array]) -> jax.Array:
    inputs, label = example
    logits = mlp_apply(params, inputs[None, :])[0]
    return -jax.nn.log_softmax(logits)[label]


def _materialized(params: Any, batch: Any) -> jax.Array:
    grads = jax.vmap(jax.grad(_example_loss), in_axes=(None, 0))(params, batch)
    leaves = jax.tree_util.tree_leaves(grads)
    return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1) for g in leaves))


def bench_per_example(workload: Any, chunk: int, repeats: int) -> list[dict[str, Any]]:
    params, batch = workload.x, (workload.inputs, workload.targets)
    variants = {
        "vmap(grad) materialized": _materialized,
        "per_example_grad_norms": lambda p, b: hessfree.per_example_grad_norms(_example_loss, p, b),
        f"per_example_grad_norms chunk={chunk}": lambda p, b: hessfree.per_example_grad_norms(
            _example_loss, p, b, chunk_size=chunk
        ),
    }
    rows, reference = [], None
    for name, fn in variants.items():
        jitted = jax.jit(fn)
        memory = jitted.lower(params, batch).compile().memory_analysis()
        temp = int(getattr(memory, "temp_size_in_bytes", -1)) if memory is not None else -1
        seconds, norms = median_time(lambda j=jitted: j(params, batch), repeats)
        reference = norms if reference is None else reference
        rows.append(
            {
                "variant": name,
                "seconds": seconds,
                "temp_bytes": temp,
                "max_rel_diff": float(jnp.max(jnp.abs(norms - reference) / reference)),
            }
        )
    base = rows[0]
    for row in rows:
        row["time_ratio_vs_materialized"] = row["seconds"] / base["seconds"]
        row["memory_ratio_vs_materialized"] = row["temp_bytes"] / max(base["temp_bytes"], 1)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller model, fewer repeats")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 3)
    sizes = (784, 256, 10) if args.quick else (784, 1024, 256, 10)
    workload = mlp_classifier(sizes=sizes)
    print(f"{workload.description}; JAX {jax.__version__} on {jax.devices()[0].platform}")

    tol = 1e-4
    eig = bench_eigsh(workload, tol, repeats)
    print(f"\neigsh top-k, tol = {tol:g} (median of {repeats}, warm)")
    print(
        f"{'k':>3} {'HVPs hessfree':>14} {'HVPs ARPACK':>12} {'ratio':>6} {'s hessfree':>11} {'s ARPACK':>9} {'speedup':>8} {'max rel diff':>13}"
    )
    for r in eig:
        print(
            f"{r['k']:>3} {r['hessfree_hvps']:>14} {r['scipy_hvps']:>12} {r['hvp_ratio']:>6.2f} "
            f"{r['hessfree_s']:>11.3f} {r['scipy_s']:>9.3f} {r['speedup']:>8.2f} {r['max_rel_diff']:>13.1e}"
        )

    loop = bench_eigsh_loop(workload, tol)
    print(
        f"\neigsh k=1 in a loop, tol = {tol:g}: hessian rebuilt at each of {loop['rebuilds']} "
        "SGD iterates vs. one fixed operator (median per call after the first)"
    )
    print(
        f"{'operator':>9} {'s/call':>8} {'HVPs':>6} {'compiles after 1st':>19}"
        f" {'ratio rebuilt/fixed':>20} {'per HVP':>8}"
    )
    for name in ("fixed", "rebuilt"):
        ratios = (
            f" {loop['ratio']:>20.2f} {loop['ratio_per_hvp']:>8.2f}" if name == "rebuilt" else ""
        )
        print(
            f"{name:>9} {loop[f'{name}_s']:>8.3f} {loop[f'{name}_hvps']:>6g} "
            f"{loop[f'{name}_compiles_after_first']:>19}{ratios}"
        )

    budgets = [6, 12, 24, 48] if args.quick else [6, 12, 24, 48, 96, 192, 384]
    seeds = 10 if args.quick else 40
    tr = bench_trace(budgets, seeds)
    for name, rows in tr.items():
        print(f"\ntrace, mean relative error over {seeds} seeds: {name}")
        print(f"{'HVPs':>6} {'Hutchinson':>11} {'Hutch++':>9} {'ratio':>6}")
        for r in rows:
            print(
                f"{r['hvps']:>6} {r['hutchinson']:>11.2e} {r['hutch++']:>9.2e} {r['ratio']:>6.2f}"
            )

    pe = bench_per_example(workload, chunk=32, repeats=repeats)
    print(
        f"\nper-example gradient norms, batch {workload.inputs.shape[0]} (median of {repeats}, warm)"
    )
    print(f"{'variant':<38} {'s':>8} {'temp MiB':>9} {'time ratio':>10} {'mem ratio':>9}")
    for r in pe:
        print(
            f"{r['variant']:<38} {r['seconds']:>8.3f} {r['temp_bytes'] / 2**20:>9.1f} "
            f"{r['time_ratio_vs_materialized']:>10.2f} {r['memory_ratio_vs_materialized']:>9.3f}"
        )

    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "analysis.json")
    with open(path, "w") as fh:
        json.dump(
            {
                "model": workload.description,
                "quick": args.quick,
                "repeats": repeats,
                "eigsh": eig,
                "eigsh_loop": loop,
                "trace": tr,
                "per_example": pe,
            },
            fh,
            indent=2,
        )
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()

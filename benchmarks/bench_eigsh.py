"""eigsh and spectral_density: cost per product, wall time vs ARPACK, first-call latency.

    .venv/bin/python benchmarks/bench_eigsh.py [--repeats N] [--quick] [--skip-first-call]

On the Hessian of a ~0.5M-parameter MLP (784-512-256-10, batch 256, float32):

1. One product ``op.mv`` (median of repeats, warm): the unit every ratio divides by.
2. eigsh for k = 1, 5, 20 (``which="LA"``, tol 1e-4) vs ``scipy.sparse.linalg.eigsh``
   (ARPACK) on ``op.as_scipy()`` at the same tolerance: products, warm wall time, the cost
   per product ``(eigsh seconds / products) / (op.mv seconds)`` (target <= 1.3) and the wall
   time ratio hessfree / ARPACK (target < 1).
3. spectral_density (8 probes x 60 steps; the default, one probe at a time on CPU at this
   size, and all 8 vmapped): seconds per product / op.mv (target <= 1.3).
4. A small CNN (two 3x3 conv layers, dense head): op.mv alone, the same products inside a
   ``lax.fori_loop`` (power iteration), and eigsh k = 1 per product.
5. First call in a fresh process (XLA compile included): ``hessfree.eigsh(op, k)`` vs
   ``scipy.sparse.linalg.eigsh(op.as_scipy(), k)`` (the jit of the product included); the
   operator is built (and its linearization compiled) before the clock starts in both. Also
   spectral_density, and ``hessfree.trace`` (Hutchinson, 8 probes) against the same 8
   products by hand through ``op.as_scipy()`` with numpy probes.

Ratios are what to compare across runs: the machine is shared and absolute times are noisy.
Writes benchmarks/results/eigsh.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse.linalg as sla

import hessfree
from _timing import median_time
from hessfree._cli.workloads import mlp_classifier

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TOL = 1e-4
MLP_SIZES = (784, 512, 256, 10)


def mlp_operator(sizes: tuple[int, ...] = MLP_SIZES) -> tuple[Any, str]:
    workload = mlp_classifier(sizes=sizes)
    op = jax.block_until_ready(hessfree.hessian(workload.f, workload.x, *workload.args))
    return op, workload.description


def cnn_apply(params: Any, x: jax.Array) -> jax.Array:
    dn = ("NHWC", "HWIO", "NHWC")
    h = x
    for layer in params["conv"]:
        h = jax.lax.conv_general_dilated(h, layer["w"], (1, 1), "SAME", dimension_numbers=dn)
        h = jnp.tanh(h + layer["b"])
        h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
    h = h.reshape(h.shape[0], -1)
    return h @ params["out"]["w"] + params["out"]["b"]


def cnn_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    logp = jax.nn.log_softmax(cnn_apply(params, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def cnn_operator(batch: int = 64) -> tuple[Any, str]:
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    chans = [(1, 16), (16, 32)]
    conv = [
        {
            "w": jax.random.normal(k, (3, 3, cin, cout)) / np.sqrt(9 * cin),
            "b": jnp.zeros(cout),
        }
        for k, (cin, cout) in zip(keys[:2], chans, strict=True)
    ]
    params = {
        "conv": conv,
        "out": {"w": jax.random.normal(keys[2], (7 * 7 * 32, 10)) / 40, "b": jnp.zeros(10)},
    }
    x = jax.random.normal(keys[3], (batch, 28, 28, 1))
    y = jax.random.randint(keys[4], (batch,), 0, 10)
    op = jax.block_until_ready(hessfree.hessian(cnn_loss, params, x, y))
    n = sum(p.size for p in jax.tree_util.tree_leaves(params))
    return op, f"CNN conv3x3(16)-pool-conv3x3(32)-pool-dense(10), {n:,} parameters, batch {batch}"


def random_vector(op: Any, seed: int = 0) -> Any:
    structure = op.in_structure()
    leaves, treedef = jax.tree_util.tree_flatten(structure)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    draws = [jax.random.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(treedef, draws)


def time_mv(op: Any, repeats: int) -> float:
    v = random_vector(op)
    seconds, _ = median_time(lambda: op.mv(v), max(5, 3 * repeats))
    return seconds


def arpack(op: Any, k: int, tol: float, repeats: int) -> tuple[float, int, np.ndarray]:
    """ARPACK on op.as_scipy(): (median seconds, products per solve, eigenvalues)."""
    scipy_op = op.as_scipy()
    calls = [0]

    def matvec(x: np.ndarray) -> np.ndarray:
        calls[0] += 1
        return scipy_op.matvec(x)

    counted = sla.LinearOperator(scipy_op.shape, matvec=matvec, dtype=scipy_op.dtype)
    v0 = np.random.default_rng(0).normal(size=scipy_op.shape[0]).astype(np.float32)
    seconds, values = median_time(
        lambda: sla.eigsh(counted, k, which="LA", tol=tol, v0=v0)[0], repeats
    )
    return seconds, calls[0] // (repeats + 1), np.sort(values)


def bench_eigsh(op: Any, mv_s: float, ks: tuple[int, ...], repeats: int) -> list[dict[str, Any]]:
    rows = []
    for k in ks:
        key = jax.random.PRNGKey(k)
        seconds, res = median_time(
            lambda k=k, key=key: hessfree.eigsh(op, k, key=key, tol=TOL), repeats
        )
        a_s, a_hvps, a_values = arpack(op, k, TOL, repeats)
        hvps = int(res.num_matvecs)
        values = np.asarray(res.eigenvalues)
        rows.append(
            {
                "k": k,
                "hvps": hvps,
                "arpack_hvps": a_hvps,
                "seconds": seconds,
                "arpack_seconds": a_s,
                "per_product": seconds / hvps / mv_s,
                "arpack_per_product": a_s / a_hvps / mv_s,
                "wall_ratio": seconds / a_s,
                "success": bool(res.success),
                "max_rel_diff": float(np.max(np.abs(values - a_values) / np.abs(a_values))),
            }
        )
    return rows


def bench_density(op: Any, mv_s: float, repeats: int) -> list[dict[str, Any]]:
    rows = []
    probes, steps = 8, 60
    for chunk in (None, probes):
        seconds, res = median_time(
            lambda c=chunk: hessfree.spectral_density(
                op,
                key=jax.random.PRNGKey(0),
                num_probes=probes,
                num_steps=steps,
                chunk_size=c,
            ),
            repeats,
        )
        products = int(res.num_matvecs)
        rows.append(
            {
                "variant": f"{probes} probes x {steps} steps, "
                + ("default" if chunk is None else f"chunk_size={chunk} (all vmapped)"),
                "products": products,
                "seconds": seconds,
                "per_product": seconds / products / mv_s,
            }
        )
    return rows


def bench_cnn(repeats: int) -> dict[str, Any]:
    op, description = cnn_operator()
    mv_s = time_mv(op, repeats)
    steps = 20

    @jax.jit
    def power(op: Any, v: Any) -> Any:
        def body(_: Any, v: Any) -> Any:
            w = op.mv(v)
            return hessfree._tree.scale(1 / hessfree._tree.norm(w), w)

        return jax.lax.fori_loop(0, steps, body, v)

    v = random_vector(op)
    loop_s, _ = median_time(lambda: power(op, v), repeats)
    e_s, res = median_time(lambda: hessfree.eigsh(op, 1, key=jax.random.PRNGKey(1), tol=TOL), 1)
    a_s, a_hvps, _ = arpack(op, 1, TOL, 1)
    return {
        "model": description,
        "mv_s": mv_s,
        "loop_per_product": loop_s / steps / mv_s,
        "eigsh_hvps": int(res.num_matvecs),
        "eigsh_per_product": e_s / int(res.num_matvecs) / mv_s,
        "eigsh_s": e_s,
        "arpack_s": a_s,
        "arpack_hvps": a_hvps,
        "wall_ratio": e_s / a_s,
    }


def first_call(which: str, k: int) -> float:
    """Seconds of the first call in this (fresh) process; the operator is built before."""
    op, _ = mlp_operator()
    start = time.perf_counter()
    if which == "hessfree":
        jax.block_until_ready(hessfree.eigsh(op, k, key=jax.random.PRNGKey(0), tol=TOL))
    elif which == "density":
        jax.block_until_ready(
            hessfree.spectral_density(op, key=jax.random.PRNGKey(0), num_probes=8, num_steps=60)
        )
    elif which == "trace":
        jax.block_until_ready(hessfree.trace(op, key=jax.random.PRNGKey(0), num_probes=k))
    elif which == "trace-scipy":  # Hutchinson by hand: numpy probes through op.as_scipy()
        z = np.random.default_rng(0).choice(np.float32([-1, 1]), size=(k, op.shape[0]))
        A = op.as_scipy()
        float(np.mean([zi @ A.matvec(zi) for zi in z]))
    else:
        v0 = np.random.default_rng(0).normal(size=op.shape[0]).astype(np.float32)
        sla.eigsh(op.as_scipy(), k, which="LA", tol=TOL, v0=v0)
    return time.perf_counter() - start


def bench_first_calls(ks: tuple[int, ...]) -> list[dict[str, Any]]:
    def fresh(which: str, k: int) -> float:
        out = subprocess.run(
            [sys.executable, __file__, "--first-call", which, "--k", str(k)],
            capture_output=True,
            text=True,
            check=True,
        )
        return float(out.stdout.strip().splitlines()[-1])

    rows = []
    for k in ks:
        # interleaved, so load drift hits both alike
        h, a = fresh("hessfree", k), fresh("arpack", k)
        rows.append({"k": k, "hessfree_s": h, "arpack_s": a, "ratio": h / a})
    d = fresh("density", 0)
    rows.append({"k": "density", "hessfree_s": d, "arpack_s": float("nan"), "ratio": float("nan")})
    # trace (Hutchinson, 8 probes) against the same 8 products by hand through op.as_scipy()
    t, a = fresh("trace", 8), fresh("trace-scipy", 8)
    rows.append({"k": "trace 8", "hessfree_s": t, "arpack_s": a, "ratio": t / a})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="k = 1, 5 only; no CNN")
    parser.add_argument("--skip-first-call", action="store_true")
    parser.add_argument(
        "--first-call", choices=("hessfree", "arpack", "density", "trace", "trace-scipy")
    )
    parser.add_argument("--k", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(RESULTS, "eigsh.json"))
    args = parser.parse_args()
    if args.first_call:
        print(first_call(args.first_call, args.k))
        return
    repeats = args.repeats
    ks = (1, 5) if args.quick else (1, 5, 20)
    op, description = mlp_operator()
    print(f"{description}; JAX {jax.__version__} on {jax.devices()[0].platform}")
    mv_s = time_mv(op, repeats)
    print(f"one op.mv: {mv_s * 1e3:.2f} ms (median, warm)")

    eig = bench_eigsh(op, mv_s, ks, repeats)
    print(f"\neigsh vs ARPACK on op.as_scipy(), which=LA, tol={TOL:g} (median of {repeats}, warm)")
    print(
        f"{'k':>3} {'HVPs':>6} {'ARPACK':>7} {'s':>8} {'s ARPACK':>9} {'per-product/mv':>15}"
        f" {'ARPACK p/mv':>12} {'wall/ARPACK':>12} {'rel diff':>9}"
    )
    for r in eig:
        print(
            f"{r['k']:>3} {r['hvps']:>6} {r['arpack_hvps']:>7} {r['seconds']:>8.3f} "
            f"{r['arpack_seconds']:>9.3f} {r['per_product']:>15.2f} "
            f"{r['arpack_per_product']:>12.2f} {r['wall_ratio']:>12.2f} {r['max_rel_diff']:>9.1e}"
        )

    dens = bench_density(op, mv_s, repeats)
    print("\nspectral_density: seconds per product / op.mv")
    for r in dens:
        print(f"  {r['variant']:<40} {r['seconds']:>7.3f} s  {r['per_product']:>6.2f}")

    cnn = None
    if not args.quick:
        cnn = bench_cnn(repeats)
        print(f"\n{cnn['model']}: op.mv {cnn['mv_s'] * 1e3:.2f} ms")
        print(f"  product inside lax.fori_loop / op.mv: {cnn['loop_per_product']:.2f}")
        print(
            f"  eigsh k=1: {cnn['eigsh_hvps']} HVPs, per product / op.mv "
            f"{cnn['eigsh_per_product']:.2f}; wall / ARPACK {cnn['wall_ratio']:.2f} "
            f"({cnn['eigsh_s']:.3f} s vs {cnn['arpack_s']:.3f} s, {cnn['arpack_hvps']} HVPs)"
        )

    first = None
    if not args.skip_first_call:
        first = bench_first_calls((1, 5) if args.quick else (1, 5, 20))
        print("\nfirst call in a fresh process (compile included; operator built before);")
        print("peer: ARPACK for eigsh, 8 products through op.as_scipy() for trace")
        print(f"{'k':>8} {'hessfree s':>11} {'peer s':>9} {'ratio':>6}")
        for r in first:
            print(
                f"{r['k']!s:>8} {r['hessfree_s']:>11.2f} {r['arpack_s']:>9.2f} {r['ratio']:>6.2f}"
            )

    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(
            {
                "model": description,
                "mv_s": mv_s,
                "tol": TOL,
                "repeats": repeats,
                "eigsh": eig,
                "density": dens,
                "cnn": cnn,
                "first_call": first,
            },
            fh,
            indent=2,
        )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

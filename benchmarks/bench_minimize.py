"""hessfree.minimize vs scipy.optimize.minimize (trust-ncg, Newton-CG) fed jax.jit-ed derivatives.

What a JAX user does today: jit f, ∇f and a Hessian-vector product and hand them to scipy,
which loops in Python and pays a full HVP (gradient + tangent pass) per CG iteration.
hessfree runs the whole solve in one compiled while loop and linearizes ∇f once per outer
iteration, so each CG iteration costs one tangent pass.

Problems: (a) ill-conditioned logistic regression (HVPs dominate), (b) chained Rosenbrock
d = 1000 from (-1.2, 1, ...) (thousands of cheap iterations), (c) extended Rosenbrock with
thousands of independent 2-D blocks (a short solve; fixed costs show). Warm timings (compiled
first), median of repeats, same gtol; scipy Newton-CG has no gtol option, so a callback stops
it (StopIteration) once ‖∇f‖ <= gtol, after the jit-ed gradient it already has in hand.

Run: ``python benchmarks/bench_minimize.py [--quick]``; writes benchmarks/results/minimize.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import scipy.optimize  # noqa: E402

import hessfree  # noqa: E402


def logistic(w, features, labels):
    logits = features @ w
    return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits) + 1e-4 * jnp.sum(w**2)


def logistic_diag(w, features, labels):
    """The Hessian diagonal of `logistic` (a Jacobi preconditioner): O(n d), one pass."""
    s = jax.nn.sigmoid(features @ w)
    return (s * (1 - s)) @ features**2 / features.shape[0] + 2e-4


def chained_rosenbrock(x):
    return jnp.sum(100.0 * (x[1:] - x[:-1] ** 2) ** 2 + (1.0 - x[:-1]) ** 2)


def extended_rosenbrock(x):
    odd, even = x[0::2], x[1::2]
    return jnp.sum(100.0 * (even - odd**2) ** 2 + (1.0 - odd) ** 2)


def make_problems(quick: bool) -> dict:
    rng = np.random.default_rng(0)
    n, d = (5000, 100) if quick else (20000, 300)
    scales = np.geomspace(1e-2, 1e2, d)
    features = rng.normal(size=(n, d)) * scales
    w_true = rng.normal(size=d) / scales
    labels = (rng.uniform(size=n) < 1 / (1 + np.exp(-(features @ w_true)))).astype(float)
    dim = 200 if quick else 1000
    blocks = 500 if quick else 5000
    return {
        "logistic": {
            "f": logistic,
            "x0": jnp.zeros(d),
            "args": (jnp.asarray(features), jnp.asarray(labels)),
            "gtol": 1e-6,
            "preconditioner": logistic_diag,
            "desc": f"logistic regression n={n} d={d}, feature scales 1e-2..1e2",
        },
        "chained_rosenbrock": {
            "f": chained_rosenbrock,
            "x0": jnp.tile(jnp.array([-1.2, 1.0]), dim // 2),
            "args": (),
            "gtol": 1e-5,
            "desc": f"chained Rosenbrock d={dim}",
        },
        "extended_rosenbrock": {
            "f": extended_rosenbrock,
            "x0": jnp.tile(jnp.array([-1.2, 1.0]), blocks),
            "args": (),
            "gtol": 1e-5,
            "desc": f"extended Rosenbrock {blocks} blocks (d={2 * blocks})",
        },
    }


def run_hessfree(problem, method, precond=False):
    kwargs = {"preconditioner": problem["preconditioner"]} if precond else {}
    res = hessfree.minimize(
        problem["f"], problem["x0"], *problem["args"], method=method, gtol=problem["gtol"], **kwargs
    )
    res = jax.block_until_ready(res)
    return {
        "nit": int(res.nit),
        "nfev": int(res.nfev),
        "njev": int(res.njev),
        "nhev": int(res.nhev),
        "gnorm": float(jnp.linalg.norm(res.jac)),
        "fun": float(res.fun),
        "status": int(res.status),
    }


def scipy_functions(problem):
    f, args = problem["f"], problem["args"]
    fun = jax.jit(lambda x: f(x, *args))
    jac = jax.jit(jax.grad(lambda x: f(x, *args)))
    hessp = jax.jit(lambda x, p: jax.jvp(jax.grad(lambda y: f(y, *args)), (x,), (p,))[1])
    x0 = np.asarray(problem["x0"])
    jax.block_until_ready((fun(x0), jac(x0), hessp(x0, x0)))  # compile before timing
    return fun, jac, hessp


def run_scipy(problem, method, fns):
    fun, jac, hessp = fns
    gtol = problem["gtol"]
    last = {}

    def jac_np(x):
        g = np.asarray(jac(x))
        last["g"] = g
        return g

    options = {"gtol": gtol, "maxiter": 200 * problem["x0"].size}
    callback = None
    if method == "Newton-CG":
        options = {"xtol": 1e-14, "maxiter": options["maxiter"]}

        def callback(intermediate_result):
            if np.linalg.norm(jac_np(intermediate_result.x)) <= gtol:
                raise StopIteration

    res = scipy.optimize.minimize(
        lambda x: float(fun(x)),
        np.asarray(problem["x0"]),
        jac=jac_np,
        hessp=lambda x, p: np.asarray(hessp(x, p)),
        method=method,
        options=options,
        callback=callback,
    )
    return {
        "nit": int(res.nit),
        "nfev": int(res.nfev),
        "njev": int(res.njev),
        "nhev": int(res.nhev),
        "gnorm": float(np.linalg.norm(np.asarray(jac(res.x)))),
        "fun": float(res.fun),
        "status": int(res.status),
    }


def timed(fn, repeats):
    fn()  # warm: compile / first call
    walls, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        walls.append(time.perf_counter() - start)
    assert out is not None
    return out | {"wall_s": statistics.median(walls), "walls_s": walls}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    cli = parser.parse_args()
    repeats = cli.repeats or (1 if cli.quick else 3)
    rows = []
    for name, problem in make_problems(cli.quick).items():
        fns = scipy_functions(problem)
        for hf_method, sp_method in (("trust-ncg", "trust-ncg"), ("newton-cg", "Newton-CG")):
            ref = timed(lambda p=problem, m=sp_method, f=fns: run_scipy(p, m, f), repeats)
            variants = [("", False)]
            if "preconditioner" in problem:
                variants.append(("+jacobi", True))
            for suffix, precond in variants:
                ours = timed(
                    lambda p=problem, m=hf_method, c=precond: run_hessfree(p, m, c), repeats
                )
                rows.append(
                    {
                        "problem": name,
                        "desc": problem["desc"],
                        "method": hf_method + suffix,
                        "gtol": problem["gtol"],
                        "hessfree": ours,
                        "scipy": ref,
                        "ratio": ours["wall_s"] / ref["wall_s"],
                    }
                )
                print_row(rows[-1])
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", "minimize.json")
    meta = {
        "jax": jax.__version__,
        "scipy": scipy.__version__,
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "quick": cli.quick,
        "repeats": repeats,
    }
    with open(path, "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=2)
    print(f"wrote {path}")


HEADER = (
    f"{'problem':20s} {'method':18s} | {'nit':>5s} {'nhev':>6s} {'|g|':>9s} {'wall s':>8s} | "
    f"{'scipy nit':>9s} {'nhev':>6s} {'|g|':>9s} {'wall s':>8s} | {'ratio':>6s}"
)
_printed_header = []


def print_row(row) -> None:
    if not _printed_header:
        print(HEADER)
        print("-" * len(HEADER))
        _printed_header.append(True)
    h, s = row["hessfree"], row["scipy"]
    print(
        f"{row['problem']:20s} {row['method']:18s} | {h['nit']:5d} {h['nhev']:6d} "
        f"{h['gnorm']:9.2e} {h['wall_s']:8.3f} | {s['nit']:9d} {s['nhev']:6d} {s['gnorm']:9.2e} "
        f"{s['wall_s']:8.3f} | {row['ratio']:6.3f}",
        flush=True,
    )


if __name__ == "__main__":
    main()

"""hessfree.minimize vs scipy.optimize.minimize (trust-ncg, Newton-CG) fed jax.jit-ed derivatives.

What a JAX user does today: jit f, ∇f and a Hessian-vector product and hand them to scipy,
which loops in Python and pays a full HVP (gradient + tangent pass) per CG iteration.
hessfree runs the whole solve in one compiled while loop and linearizes ∇f once per outer
iteration, so each CG iteration costs one tangent pass.

Problems: (a) badly scaled logistic regression (feature scales 1e-2..1e2; HVPs dominate),
(b) chained Rosenbrock d = 1000 from (-1.2, 1, ...) (thousands of cheap iterations), (c)
extended Rosenbrock with thousands of independent 2-D blocks (a short solve; fixed costs
show). Warm timings (compiled first), median of repeats, same gtol; scipy Newton-CG has no gtol
option, so a callback stops it (StopIteration) once ‖∇f‖ <= gtol, after the jit-ed gradient it
already has in hand. On the logistic problem hessfree runs with its default preconditioner
(``"auto"``: a Jacobi diagonal estimated from a few products once CG solves get long), with
none (the default before), and with the exact diagonal passed by the user; each row says
whether its final ‖∇f‖ is at most scipy's.

First call (``--first-call``): on small Moré-Garbow-Hillstrom problems, each solver's first
call in a fresh process (JAX imported, nothing compiled): hessfree.minimize (compile + solve),
scipy fed functions jitted in that call, and optimistix (BFGS, the closest it has: no
Newton-CG), with hessfree's time split into tracing, lowering and XLA compilation of its two
programs (init, advance), measured again after ``jax.clear_caches()``.

Run: ``python benchmarks/bench_minimize.py [--quick] [--first-call | --no-first-call]
[--problems logistic ...] [--logistic N D] [--out PATH]``; writes
benchmarks/results/minimize.json (or PATH).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

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


def make_problems(quick: bool, logistic_shape: tuple[int, int] | None = None) -> dict:
    rng = np.random.default_rng(0)
    n, d = logistic_shape or ((5000, 100) if quick else (20000, 300))
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


def run_hessfree(problem, method, precond="default", gtol=None):
    """hessfree.minimize; `precond`: "default" (its default), None, or "exact" (the user's)."""
    kwargs: dict[str, Any] = {}
    if precond is None:
        kwargs = {"preconditioner": None}
    elif precond == "exact":
        kwargs = {"preconditioner": problem["preconditioner"]}
    res = hessfree.minimize(
        problem["f"],
        problem["x0"],
        *problem["args"],
        method=method,
        gtol=problem["gtol"] if gtol is None else gtol,
        **kwargs,
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

    def stop_at_gtol(intermediate_result):
        if np.linalg.norm(jac_np(intermediate_result.x)) <= gtol:
            raise StopIteration

    callback = None
    if method == "Newton-CG":
        options = {"xtol": 1e-14, "maxiter": options["maxiter"]}
        callback = stop_at_gtol

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
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller problems, one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--first-call",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="first-call latency on small problems in fresh processes (default: on)",
    )
    parser.add_argument(
        "--problems", nargs="*", help="run only these (logistic, chained_rosenbrock, ...)"
    )
    parser.add_argument(
        "--logistic", nargs=2, type=int, metavar=("N", "D"), help="logistic problem's shape"
    )
    parser.add_argument("--out", help="JSON path (default benchmarks/results/minimize.json)")
    parser.add_argument("--child", nargs=3, metavar=("SOLVER", "PROBLEM", "METHOD"))
    cli = parser.parse_args()
    if cli.child:
        print(json.dumps(first_call_child(*cli.child)))
        return
    repeats = cli.repeats or (1 if cli.quick else 3)
    rows = []
    shape = (cli.logistic[0], cli.logistic[1]) if cli.logistic else None
    for name, problem in make_problems(cli.quick, shape).items():
        if cli.problems and name not in cli.problems:
            continue
        fns = scipy_functions(problem)
        for hf_method, sp_method in (("trust-ncg", "trust-ncg"), ("newton-cg", "Newton-CG")):
            ref = timed(lambda p=problem, m=sp_method, f=fns: run_scipy(p, m, f), repeats)
            variants = [("", "default", None)]
            if "preconditioner" in problem:
                # scipy may stop below gtol: the same comparison with hessfree stopping at
                # scipy's final ‖∇f‖ (equal or smaller final gradient)
                matched = min(problem["gtol"], ref["gnorm"])
                variants += [
                    (", gtol=scipy's |g|", "default", matched),
                    (" (no precond)", None, None),
                    ("+exact diag", "exact", None),
                ]
            for suffix, precond, gtol in variants:
                ours = timed(
                    lambda p=problem, m=hf_method, c=precond, g=gtol: run_hessfree(p, m, c, g),
                    repeats,
                )
                rows.append(
                    {
                        "problem": name,
                        "desc": problem["desc"],
                        "method": hf_method + suffix,
                        "gtol": problem["gtol"] if gtol is None else gtol,
                        "hessfree": ours,
                        "scipy": ref,
                        "ratio": ours["wall_s"] / ref["wall_s"],
                        "gnorm_at_most_scipys": ours["gnorm"] <= ref["gnorm"],
                    }
                )
                print_row(rows[-1])
    first_call = []
    if cli.first_call:
        first_call = first_call_table(repeats)
    path = cli.out or os.path.join(os.path.dirname(__file__), "results", "minimize.json")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    meta = {
        "jax": jax.__version__,
        "scipy": scipy.__version__,
        "backend": jax.default_backend(),
        "platform": platform.platform(),
        "quick": cli.quick,
        "logistic_shape": cli.logistic,
        "repeats": repeats,
    }
    with open(path, "w") as fh:
        json.dump({"meta": meta, "rows": rows, "first_call": first_call}, fh, indent=2)
    print(f"wrote {path}")


HEADER = (
    f"{'problem':20s} {'method':26s} | {'nit':>5s} {'nhev':>6s} {'|g|':>9s} {'wall s':>8s} | "
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
        f"{row['problem']:20s} {row['method']:26s} | {h['nit']:5d} {h['nhev']:6d} "
        f"{h['gnorm']:9.2e} {h['wall_s']:8.3f} | {s['nit']:9d} {s['nhev']:6d} {s['gnorm']:9.2e} "
        f"{s['wall_s']:8.3f} | {row['ratio']:6.3f}"
        f"{'' if row['gnorm_at_most_scipys'] else ' (|g| > scipy)'}",
        flush=True,
    )


# --- first call: compile + solve in a fresh process -------------------------------------------


def wood(x):
    a, b, c, d = x[0], x[1], x[2], x[3]
    return (
        100 * (b - a**2) ** 2 + (1 - a) ** 2 + 90 * (d - c**2) ** 2 + (1 - c) ** 2
        + 10.1 * ((b - 1) ** 2 + (d - 1) ** 2) + 19.8 * (b - 1) * (d - 1)
    )  # fmt: skip


def helical_valley(x):
    theta = jnp.arctan2(x[1], x[0]) / (2 * jnp.pi)
    return 100 * ((x[2] - 10 * theta) ** 2 + (jnp.sqrt(x[0] ** 2 + x[1] ** 2) - 1) ** 2) + x[2] ** 2


SMALL = {
    "rosenbrock": (chained_rosenbrock, [-1.2, 1.0]),
    "wood": (wood, [-3.0, -1.0, -3.0, -1.0]),
    "helical_valley": (helical_valley, [-1.0, 0.0, 0.0]),
    "ext_rosenbrock_10": (extended_rosenbrock, [-1.2, 1.0] * 5),
}
SMALL_GTOL = 1e-5
FIRST_CALL_SOLVERS = (
    ("hessfree", "trust-ncg"),
    ("hessfree", "newton-cg"),
    ("scipy", "trust-ncg"),
    ("optimistix", "BFGS"),
)


def first_call_child(solver: str, name: str, method: str) -> dict:
    """One solver's first and second call on one small problem (run in a fresh process)."""
    f, start = SMALL[name]
    x0 = jnp.asarray(start)
    jax.block_until_ready(x0)
    if solver == "hessfree":

        def call():
            res = hessfree.minimize(f, x0, method=method, gtol=SMALL_GTOL)
            jax.block_until_ready(res.x)
            return int(res.nit), float(jnp.linalg.norm(res.jac))

    elif solver == "scipy":
        fun, jac = jax.jit(f), jax.jit(jax.grad(f))  # compiled in the first call
        hessp = jax.jit(lambda x, p: jax.jvp(jax.grad(f), (x,), (p,))[1])

        def call():
            res = scipy.optimize.minimize(
                lambda x: float(fun(x)), np.asarray(x0), jac=lambda x: np.asarray(jac(x)),
                hessp=lambda x, p: np.asarray(hessp(x, p)), method=method,
                options={"gtol": SMALL_GTOL},
            )  # fmt: skip
            return int(res.nit), float(np.linalg.norm(np.asarray(jac(res.x))))

    else:
        import optimistix as optx

        def fn(y, _):
            return f(y)

        bfgs = optx.BFGS(rtol=1e-8, atol=1e-8)

        def call():
            sol = optx.minimise(fn, bfgs, x0, max_steps=10_000, throw=False)
            jax.block_until_ready(sol.value)
            return int(sol.stats["num_steps"]), float(jnp.linalg.norm(jax.grad(f)(sol.value)))

    start_t = time.perf_counter()
    nit, gnorm = call()
    first = time.perf_counter() - start_t
    start_t = time.perf_counter()
    call()
    second = time.perf_counter() - start_t
    out = {"first_s": first, "second_s": second, "nit": nit, "gnorm": gnorm}
    if solver == "hessfree":
        out |= hessfree_stages(f, x0, method)
    return out


def hessfree_stages(f, x0, method) -> dict:
    """Tracing, lowering and compilation of minimize's two programs, after clearing caches
    (those minimize picks: compiled for latency on these small problems, see
    ``hessfree._staging.for_latency``)."""
    from hessfree._minimize import _solver

    jax.clear_caches()
    solver = _solver.Minimizer(f, method=method, gtol=SMALL_GTOL)
    times = {"trace_s": 0.0, "lower_s": 0.0, "compile_s": 0.0}

    def stages(fn, *args):
        t = time.perf_counter()
        traced = fn.trace(*args)
        times["trace_s"] += time.perf_counter() - t
        t = time.perf_counter()
        lowered = traced.lower()
        times["lower_s"] += time.perf_counter() - t
        t = time.perf_counter()
        compiled = lowered.compile()
        times["compile_s"] += time.perf_counter() - t
        return compiled

    init, advance = _solver._programs(x0, ())  # the ones minimize picks for this problem
    state = stages(init, solver, x0, ())(x0, ())
    stages(advance, solver, state, (), jnp.asarray(10**6, jnp.int32))
    return times


def first_call_table(repeats: int) -> list:
    """Each (solver, problem) in `repeats` fresh processes, interleaved; medians."""
    script = os.path.abspath(__file__)
    samples: dict = {}
    for _ in range(repeats):
        for name in SMALL:
            for solver, method in FIRST_CALL_SOLVERS:
                cmd = [sys.executable, script, "--child", solver, name, method]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True)
                samples.setdefault((name, solver, method), []).append(
                    json.loads(out.stdout.strip().splitlines()[-1])
                )
    rows = []
    print(
        f"\nfirst call, fresh process, median of {repeats}: "
        f"{'problem':18s} {'solver':22s} {'first s':>8s} {'second s':>9s} {'nit':>5s} "
        f"{'|g|':>9s} | hessfree's trace/lower/compile s"
    )
    for (name, solver, method), runs in samples.items():
        row = {"problem": name, "solver": solver, "method": method}
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
        stages = ""
        if solver == "hessfree":
            stages = f"{row['trace_s']:.2f} / {row['lower_s']:.2f} / {row['compile_s']:.2f}"
        print(
            f"  {name:18s} {solver + ' ' + method:22s} {row['first_s']:8.2f} "
            f"{row['second_s']:9.4f} {int(row['nit']):5d} {row['gnorm']:9.1e} | {stages}"
        )
    by = {(r["problem"], r["solver"], r["method"]): r for r in rows}
    for name in SMALL:
        ours = by[(name, "hessfree", "trust-ncg")]["first_s"]
        sp = by[(name, "scipy", "trust-ncg")]["first_s"]
        ox = by[(name, "optimistix", "BFGS")]["first_s"]
        print(
            f"  {name:18s} first-call ratio hessfree trust-ncg / scipy {ours / sp:5.2f}, "
            f"/ optimistix {ours / ox:5.2f}"
        )
    return rows


if __name__ == "__main__":
    main()

"""The command line: ``hessfree demo | bench | spectrum``."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

from .._cost import ModeCost, cost
from .._products import hvp
from .._seed import hvp_grad_of_grad, hvp_jvp_of_grad
from .bench import format_table, median_time, product_table
from .workloads import WORKLOADS, Workload, mlp_classifier, quadratic


def _say(text: str = "") -> None:
    print(text, flush=True)


def _fmt_count(value: float | None) -> str:
    if value is None:
        return "n/a"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.2f}{unit}"
    return f"{value:.0f}"


def _compare(
    title: str,
    products: dict[str, Callable[..., Any]],
    costs: dict[str, ModeCost],
    inputs: tuple[Any, ...],
) -> None:
    """Equal results, XLA's cost, eager and jitted time, side by side."""
    _say(title)
    values = {
        name: np.asarray(jax.flatten_util.ravel_pytree(fn(*inputs))[0])
        for name, fn in products.items()
    }
    first, *rest = values.values()
    scale = float(np.max(np.abs(first))) or 1.0
    for name, value in zip(list(values)[1:], rest, strict=True):
        diff = float(np.max(np.abs(value - first)))
        _say(
            f"  results equal: max |{name} − {next(iter(values))}| = {diff:.2e} (of max |Hv| = {scale:.3g})"
        )
    header = f"  {'':24}{'flops':>10}{'bytes':>10}{'temp mem':>10}{'eager ms':>11}{'jit ms':>9}"
    _say(header)
    for name, fn in products.items():
        eager = median_time(fn, *inputs, repeats=3)
        jitted = median_time(jax.jit(fn), *inputs, repeats=7)
        c = costs[name]
        _say(
            f"  {name:24}{_fmt_count(c.flops):>10}{_fmt_count(c.bytes_accessed):>10}"
            f"{_fmt_count(c.temp_bytes):>10}{eager * 1e3:11.2f}{jitted * 1e3:9.3f}"
        )


def demo(args: argparse.Namespace) -> int:
    """The seed's worked example, then jvp-of-grad vs grad-of-grad where it matters."""
    _say("hessfree demo: Hessian-vector products without the Hessian\n")
    _say(
        "1. The seed's worked example: f(x) = 0.5 xᵀAx, H v by jax.jvp(jax.grad(f), (x,), (v,))[1]"
    )
    A = jnp.array([[2.0, 0.0], [0.0, 3.0]])
    x = jnp.array([1.0, 1.0])
    v = jnp.array([1.0, 0.0])
    _say("   A = [[2, 0], [0, 3]], x = [1, 1], v = [1, 0]")
    _say(
        f"   hvp_jvp_of_grad(x, A, v)  = {np.asarray(hvp_jvp_of_grad(x, A, v))}   (exact: A @ v = {np.asarray(A @ v)})"
    )
    _say(f"   hvp_grad_of_grad(x, A, v) = {np.asarray(hvp_grad_of_grad(x, A, v))}\n")

    d = args.d
    quad = quadratic(d=d)
    (A_big,) = quad.args
    u = jax.random.normal(jax.random.PRNGKey(3), (d,), quad.x.dtype)
    costs = cost(quad.f, quad.x, A_big)
    _compare(
        f"2. The seed's quadratic at d = {d:,}: jvp-of-grad vs grad-of-grad (XLA's cost, median time)",
        {"jvp_of_grad (fwd_rev)": hvp_jvp_of_grad, "grad_of_grad (rev_rev)": hvp_grad_of_grad},
        {"jvp_of_grad (fwd_rev)": costs["fwd_rev"], "grad_of_grad (rev_rev)": costs["rev_rev"]},
        (quad.x, A_big, u),
    )
    _say("   A quadratic's gradient graph is one matvec, so XLA compiles both to the same work.\n")

    net = mlp_classifier(sizes=(784, 512, 256, 10), batch=256)
    n = sum(leaf.size for leaf in jax.tree_util.tree_leaves(net.x))
    w = jax.tree_util.tree_map(jnp.ones_like, net.x)
    costs = cost(net.f, net.x, *net.args)
    _compare(
        f"3. A small neural network ({net.description}): hessfree.hvp by mode",
        {
            "jvp_of_grad (fwd_rev)": lambda p, t, *a: hvp(net.f, p, t, *a, mode="fwd_rev"),
            "grad_of_grad (rev_rev)": lambda p, t, *a: hvp(net.f, p, t, *a, mode="rev_rev"),
            "grad_of_jvp (rev_fwd)": lambda p, t, *a: hvp(net.f, p, t, *a, mode="rev_fwd"),
        },
        {
            "jvp_of_grad (fwd_rev)": costs["fwd_rev"],
            "grad_of_grad (rev_rev)": costs["rev_rev"],
            "grad_of_jvp (rev_fwd)": costs["rev_fwd"],
        },
        (net.x, w, *net.args),
    )
    grad_cost = costs["grad"]
    _say(
        f"   for scale: one gradient is {_fmt_count(grad_cost.flops)} flops; {n:,} parameters, H never formed"
    )
    _say("\nNext: `hessfree bench` times every mode on larger workloads.")
    return 0


def bench(args: argparse.Namespace) -> int:
    """The mode table of benchmarks/ on the built-in workloads."""
    names = args.workloads or list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        _say(f"unknown workload(s) {unknown}; choose from {list(WORKLOADS)}")
        return 2
    for name in names:
        workload: Workload = WORKLOADS[name]()
        _say(f"[{name}] {workload.description}: compiling and timing …")
        times = product_table(workload, repeats=args.repeats, progress=lambda s: _say(f"   · {s}"))
        _say(format_table(f"\n{workload.description} (median of {args.repeats}, warm)", times))
        _say("")
    return 0


def spectrum(args: argparse.Namespace) -> int:
    """Top eigenvalues, trace and spectral density of a small MLP's Hessian, with a figure."""
    try:
        from .analysis import run_spectrum
    except ImportError as err:  # pragma: no cover - only before the analysis module lands
        _say(f"spectrum is not available: {err}")
        return 1
    run_spectrum(out=args.out, k=args.k, progress=True)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hessfree", description="Matrix-free curvature for JAX.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="the seed example, then jvp-of-grad vs grad-of-grad")
    p.add_argument("--d", type=int, default=3000, help="size of the quadratic (default 3000)")
    p.set_defaults(run=demo)
    p = sub.add_parser("bench", help="time every HVP mode on the built-in workloads")
    p.add_argument("workloads", nargs="*", help=f"any of {list(WORKLOADS)} (default: all)")
    p.add_argument("--repeats", type=int, default=7)
    p.set_defaults(run=bench)
    p = sub.add_parser("spectrum", help="Hessian spectrum of a small MLP, with a figure")
    p.add_argument("--out", default="spectrum.png", help="figure path (default spectrum.png)")
    p.add_argument("--k", type=int, default=5, help="how many top eigenvalues (default 5)")
    p.set_defaults(run=spectrum)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())

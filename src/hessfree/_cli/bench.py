"""Side-by-side timing of HVP idioms, shared by ``hessfree bench`` and ``benchmarks/``.

Every alternative runs in this one process: compiled first (warm-up run), inputs blocked until
ready, then `repeats` rounds in which each alternative runs once in turn (so load from other
processes falls on all alike), each run blocked on its result; the median per alternative is
reported. Ratios are what to quote: absolute times on a shared machine are noise.
"""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .._products import hvp, hvp_fn
from .workloads import Workload


def median_time(fn: Callable[..., Any], *inputs: Any, repeats: int = 7) -> float:
    """Median seconds of ``fn(*inputs)`` after one warm-up call, results blocked on."""
    return interleaved_times({"fn": (fn, inputs)}, repeats=repeats)["fn"]


def interleaved_times(
    candidates: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]], *, repeats: int = 7
) -> dict[str, float]:
    """Median seconds per call of each ``fn(*inputs)``, timed round-robin.

    Every candidate is warmed up (compiled and run once) first; then each round times every
    candidate once, in turn, so that load from other processes falls on all of them alike.
    """
    for fn, inputs in candidates.values():
        jax.block_until_ready(inputs)
        jax.block_until_ready(fn(*inputs))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, (fn, inputs) in candidates.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*inputs))
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(times) for name, times in samples.items()}


def raw_idioms(f: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """The three hand-written HVP idioms a JAX user writes today, jitted, data as arguments."""

    def fwd_rev(x: Any, v: Any, *args: Any) -> Any:
        return jax.jvp(lambda y: jax.grad(f)(y, *args), (x,), (v,))[1]

    def rev_rev(x: Any, v: Any, *args: Any) -> Any:
        def inner(y: Any) -> Any:
            g = jax.grad(f)(y, *args)
            leaves = zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(v), strict=True)
            return sum(jnp.vdot(a, b) for a, b in leaves)

        return jax.grad(inner)(x)

    def rev_fwd(x: Any, v: Any, *args: Any) -> Any:
        return jax.grad(lambda y: jax.jvp(lambda z: f(z, *args), (y,), (v,))[1])(x)

    return {
        "raw fwd_rev": jax.jit(fwd_rev),
        "raw rev_rev": jax.jit(rev_rev),
        "raw rev_fwd": jax.jit(rev_fwd),
    }


def product_table(
    workload: Workload,
    *,
    repeats: int = 7,
    progress: Callable[[str], None] | None = None,
    extra: dict[str, Callable[[], Any]] | None = None,
) -> dict[str, float]:
    """Median seconds per call of the gradient, each raw idiom, hvp(auto) and a cached product.

    The data (`workload.args`) are passed as arguments of every compiled program, as the
    library's style asks of users: closed over, they would become compile-time constants
    that XLA may pre-arrange, which a real training loop's batches never are. Where a
    program takes less than a millisecond, more rounds are run, so that each candidate is
    timed for about 0.3 s. `extra` adds peers (e.g. another framework's product) as
    argument-free callables, timed in the same interleaved rounds.
    """
    f, x, args = workload.f, workload.x, workload.args
    v = jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / jnp.sqrt(a.size).astype(a.dtype), x)
    say = progress or (lambda _: None)
    grad = jax.jit(lambda y, *a: jax.grad(f)(y, *a))
    candidates: dict[str, tuple[Callable[..., Any], tuple[Any, ...]]] = {"grad": (grad, (x, *args))}
    for name, fn in raw_idioms(f).items():
        candidates[name] = (fn, (x, v, *args))
    auto = jax.jit(lambda y, u, *a: hvp(f, y, u, *a))
    candidates["hessfree hvp(auto)"] = (auto, (x, v, *args))
    say("linearizing for the cached product")
    candidates["hessfree hvp_fn cached, per product"] = (hvp_fn(f, x, *args), (v,))
    for name, fn in (extra or {}).items():
        candidates[name] = (fn, ())
    say(f"compiling {len(candidates)} programs, then interleaved rounds")
    fn, inputs = candidates["raw fwd_rev"]
    probe = median_time(fn, *inputs, repeats=3)
    rounds = max(repeats, min(400, int(0.3 / max(probe, 1e-6))))
    return interleaved_times(candidates, repeats=rounds)


def compiled_ops(fn: Callable[..., Any], *inputs: Any) -> list[str]:
    """The optimized XLA program of ``jit(fn)(*inputs)`` as op lines, names and metadata removed."""
    text = jax.jit(fn).lower(*inputs).compile().as_text() or ""
    lines = []
    for line in text.splitlines():
        line = re.sub(r",?\s*metadata=\{.*?\}", "", line)
        line = re.sub(r"%[\w.\-]+|[\w.\-]+(?=: [a-z]+\d*\[)", "%", line)
        if (
            "=" in line
            and not line.lstrip().startswith(('"', "HloModule"))
            and not re.match(r"^\s*\d+ ", line)
        ):
            lines.append(line.strip())
    return lines


def same_program(workload: Workload) -> bool:
    """Whether ``hessfree.hvp`` (auto) compiles to the ops of hand-written jvp(grad).

    Compared as multisets of optimized XLA ops (names and metadata removed): the scheduler
    may order independent ops differently between two compilations of one computation.
    """
    v = jax.tree_util.tree_map(jnp.ones_like, workload.x)
    inputs = (workload.x, v, *workload.args)
    auto = compiled_ops(lambda y, u, *a: hvp(workload.f, y, u, *a), *inputs)
    return sorted(auto) == sorted(compiled_ops(raw_idioms(workload.f)["raw fwd_rev"], *inputs))


def format_table(title: str, times: dict[str, float], reference: str = "raw fwd_rev") -> str:
    """A fixed-width table: time in ms and the ratio to `reference`."""
    ref = times[reference]
    width = max(len(k) for k in times) + 2
    lines = [title, f"{'':{width}}{'ms':>10}{'÷ ' + reference:>20}"]
    lines += [f"{name:{width}}{t * 1e3:10.3f}{t / ref:20.2f}" for name, t in times.items()]
    return "\n".join(lines)

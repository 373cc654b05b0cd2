"""What each HVP mode costs once XLA has compiled it, and which one is fastest here.

The seed's lesson is the computational graph: forward-over-reverse and reverse-over-reverse
give the same numbers through different programs. :func:`cost` shows XLA's own accounting of
each compiled program; :func:`select_mode` times them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax

from ._products import MODES, check_hvp_args, product_for
from ._validation import PyTree, check_positive_int


class ModeCost(NamedTuple):
    """XLA's cost analysis of one compiled program (None where XLA does not report a figure).

    Attributes:
        flops: floating-point operations.
        bytes_accessed: bytes read and written by the program's operations.
        temp_bytes: temporary buffer memory of the compiled program (peak scratch).
        error: why the program could not be built, for a mode this function does not support
            (e.g. forward mode through a ``custom_vjp``); None otherwise.
    """

    flops: float | None
    bytes_accessed: float | None
    temp_bytes: int | None
    error: str | None = None


def _compile(fn: Callable[..., Any], *example: Any) -> Any:
    return jax.jit(fn).lower(*example).compile()


def _first(analysis: Any) -> dict[str, Any]:
    # Older jax returns a list with one dict per computation.
    if isinstance(analysis, list | tuple):
        return analysis[0] if analysis else {}
    return analysis or {}


def _cost_of(compiled: Any) -> ModeCost:
    analysis = _first(compiled.cost_analysis())
    try:
        memory = compiled.memory_analysis()
        temp = None if memory is None else int(memory.temp_size_in_bytes)
    except (NotImplementedError, AttributeError):
        temp = None
    return ModeCost(analysis.get("flops"), analysis.get("bytes accessed"), temp)


def _programs(f: Callable[..., Any], args: tuple[Any, ...]) -> dict[str, Callable[..., Any]]:
    programs: dict[str, Callable[..., Any]] = {"grad": lambda x, v: jax.grad(f)(x, *args)}
    for mode in MODES:
        programs[mode] = lambda x, v, m=mode: product_for(m, f, x, args)(f, x, v, args)
    return programs


def cost(f: Callable[..., Any], x: PyTree, *args: Any) -> dict[str, ModeCost]:
    """XLA's accounting of the compiled gradient and of each compiled HVP mode.

    Compiles ``grad f`` (the unit of cost) and ``H v`` in each mode for the shapes of `x` and
    reports XLA's cost analysis: flops, bytes accessed and temporary memory. Nothing is run,
    only compiled. A mode that cannot be built for this `f` gets its `error` filled instead.

    Args:
        f: scalar function ``f(x, *args)``.
        x: the point (only its shapes and dtypes are used).
        *args: further arguments of `f`.

    Returns:
        ``{"grad": ModeCost, "fwd_rev": ModeCost, "rev_rev": ModeCost, "rev_fwd": ModeCost}``.
    """
    check_hvp_args(f, x, args, "auto")
    example = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(jax.numpy.shape(a), jax.numpy.result_type(a)), x
    )
    costs: dict[str, ModeCost] = {}
    for name, program in _programs(f, args).items():
        try:
            costs[name] = _cost_of(_compile(program, example, example))
        except (TypeError, NotImplementedError) as err:
            costs[name] = ModeCost(None, None, None, f"{type(err).__name__}: {err}")
    return costs


def time_modes(
    f: Callable[..., Any], x: PyTree, *args: Any, v: PyTree | None = None, repeats: int = 7
) -> dict[str, float]:
    """Median wall time in seconds of each compiled HVP mode (and of ``grad``), warm.

    Each program is compiled and run once before timing; inputs are ready before the clock
    starts and each result is blocked on before it stops. Modes that cannot be built for
    this `f` are left out.
    """
    check_positive_int(repeats, "repeats")
    v = jax.tree_util.tree_map(jax.numpy.ones_like, x) if v is None else v
    times: dict[str, float] = {}
    for name, program in _programs(f, args).items():
        try:
            compiled = _compile(program, x, v)
        except (TypeError, NotImplementedError):
            continue
        jax.block_until_ready((x, v))
        jax.block_until_ready(compiled(x, v))
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(x, v))
            samples.append(time.perf_counter() - start)
        times[name] = statistics.median(samples)
    return times


def select_mode(f: Callable[..., Any], x: PyTree, *args: Any, repeats: int = 7) -> str:
    """The HVP mode that runs fastest for this `f` at this `x`, by measurement.

    Compiles every mode that can be built for `f` (forward modes are skipped where a
    ``custom_vjp`` refuses them), runs each once to warm up, then times `repeats` runs and
    compares medians. Pass the result as ``mode=`` to :func:`hvp`, :func:`hvps` or
    :func:`hvp_fn`. Costs ``3 · (repeats + 1)`` products plus three compilations.

    Args:
        f: scalar function ``f(x, *args)``.
        x: the point, concrete arrays (this function runs the products).
        *args: further arguments of `f`.
        repeats: timed runs per mode.

    Returns:
        One of ``"fwd_rev"``, ``"rev_rev"``, ``"rev_fwd"``.
    """
    check_hvp_args(f, x, args, "auto")
    times = {m: t for m, t in time_modes(f, x, *args, repeats=repeats).items() if m in MODES}
    if not times:
        msg = "no HVP mode could be compiled for f; check that f is differentiable"
        raise ValueError(msg)
    return min(times, key=times.__getitem__)

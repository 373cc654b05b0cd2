"""``hessfree spectrum``: top eigenvalues, trace and spectral density of a small MLP's Hessian.

The lead's CLI calls :func:`run_spectrum`; it is also usable from Python (it returns the numbers).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from .._density import spectral_density
from .._eigsh import eigsh
from .._estimators import trace
from .._operators import hessian
from .workloads import mlp_classifier


def _stage(progress: bool, label: str, run: Callable[[], Any]) -> tuple[Any, float]:
    """Run one stage, saying what it does and how long it took (on stderr) when `progress`."""
    if progress:
        print(f"{label} …", end="", file=sys.stderr, flush=True)
    start = time.perf_counter()
    result = jax.block_until_ready(run())
    seconds = time.perf_counter() - start
    if progress:
        print(f" {seconds:.1f} s", file=sys.stderr, flush=True)
    return result, seconds


def run_spectrum(
    out: str | None,
    k: int = 5,
    progress: bool = True,
    *,
    num_probes: int = 4,
    num_steps: int = 80,
    trace_probes: int = 60,
    seed: int = 0,
    sizes: tuple[int, ...] = (20, 64, 64, 5),
    batch: int = 512,
) -> dict[str, Any]:
    """Hessian spectrum of the built-in MLP (20-64-64-5, tanh, batch 512, 5,829 parameters).

    Computes the top-k eigenvalues (:func:`hessfree.eigsh`), the trace (Hutch++,
    :func:`hessfree.trace`) and the spectral density (:func:`hessfree.spectral_density`),
    prints them on stdout (progress on stderr) and, if `out` is given, writes the figure
    (:func:`hessfree.plot.plot_spectrum`, log scale, top eigenvalues marked).

    Args:
        out: figure path (e.g. ``"spectrum.png"``) or None for no figure.
        k: number of top eigenvalues.
        progress: report each stage and its time on stderr.
        num_probes, num_steps: stochastic Lanczos quadrature settings.
        trace_probes: HVP budget of the trace estimate (at least 3).
        seed: the random seed.
        sizes, batch: the MLP's layer widths and batch size (the defaults give the model
            described above).

    Returns:
        A dict with ``model``, ``num_params``, ``eigenvalues`` (ascending), ``eigsh_hvps``,
        ``converged``, ``trace``, ``trace_stderr``, ``total_hvps``, ``seconds`` and ``figure``
        (the path written, or None).
    """
    workload = mlp_classifier(sizes=sizes, batch=batch)
    op = hessian(workload.f, workload.x, *workload.args)
    n = op.shape[0]
    key_eig, key_trace, key_density = jax.random.split(jax.random.PRNGKey(seed), 3)
    if progress:
        print(f"Hessian of {workload.description}", file=sys.stderr, flush=True)
    eig, t_eig = _stage(
        progress,
        f"[1/3] top-{k} eigenvalues (Lanczos)",
        lambda: eigsh(op, k, key=key_eig),
    )
    estimate, t_trace = _stage(
        progress,
        f"[2/3] trace (Hutch++, {trace_probes} HVPs)",
        lambda: trace(op, key=key_trace, num_probes=trace_probes, method="hutch++"),
    )
    dens, t_density = _stage(
        progress,
        f"[3/3] spectral density ({num_probes} probes × {num_steps} Lanczos steps)",
        lambda: spectral_density(op, key=key_density, num_probes=num_probes, num_steps=num_steps),
    )
    values = np.asarray(eig.eigenvalues)
    eig_hvps, converged = int(eig.num_matvecs), bool(eig.success)
    grid, density = np.asarray(dens.grid), np.asarray(dens.density)
    total = eig_hvps + int(estimate.num_matvecs) + int(dens.num_matvecs)
    print(f"Hessian of {workload.description} (n = {n:,})")
    print(f"  top-{k} eigenvalues ({eig_hvps} HVPs, converged: {converged}):")
    for i, lam in enumerate(values[::-1], start=1):
        print(f"    λ{i:<3d} {lam: .6e}")
    value, stderr = float(estimate.value), float(estimate.stderr)
    print(f"  trace           {value: .6e} ± {stderr:.1e} (Hutch++, {trace_probes} HVPs)")
    print(f"  mean eigenvalue {value / n: .6e}")
    peak = grid[np.argmax(density)]
    print(f"  density         grid [{grid[0]:.3g}, {grid[-1]:.3g}], peak at {peak:.3g}")
    print(f"  total           {total} HVPs in {t_eig + t_trace + t_density:.1f} s")
    figure = None
    if out is not None:
        from ..plot import plot_spectrum

        title = f"Hessian spectrum, {workload.description}"
        plot_spectrum(grid, density, values, path=out, log=True, title=title)
        figure = out
        print(f"  figure          {out}")
    return {
        "model": workload.description,
        "num_params": n,
        "eigenvalues": values.tolist(),
        "eigsh_hvps": eig_hvps,
        "converged": converged,
        "trace": value,
        "trace_stderr": stderr,
        "total_hvps": total,
        "seconds": t_eig + t_trace + t_density,
        "figure": figure,
    }

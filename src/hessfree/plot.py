"""Figures of curvature analyses (needs matplotlib: ``pip install 'hessfree[plot]'``).

matplotlib is imported only when a figure is drawn, so ``import hessfree.plot`` always works.
Figures are made with ``matplotlib.figure.Figure`` directly (no pyplot, no global state, no
display needed); pass `ax` to draw into your own axes instead.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["plot_spectrum"]


def _figure_class() -> Any:
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        msg = (
            "hessfree.plot needs matplotlib, which is not installed; install the plot extra: "
            "pip install 'hessfree[plot]'"
        )
        raise ImportError(msg) from err
    return Figure


def plot_spectrum(
    grid: Any,
    density: Any,
    eigenvalues: Any = None,
    *,
    ax: Any = None,
    path: str | None = None,
    log: bool = False,
    title: str | None = None,
) -> Any:
    """The spectral density with the top eigenvalues marked.

    Draws ``density`` over ``grid`` (as returned by :func:`hessfree.spectral_density`) and a
    dashed vertical line at each of ``eigenvalues`` (e.g. from :func:`hessfree.eigsh`).

    Args:
        grid: ``(num_points,)`` eigenvalue axis.
        density: ``(num_points,)`` density values.
        eigenvalues: optional 1-D eigenvalues to mark.
        ax: matplotlib axes to draw into; None makes a new figure.
        path: if given, the figure is saved there (format from the extension, e.g. ``.png``).
        log: logarithmic density axis (useful for Hessians: a tall bulk near 0 and rare
            outliers); values below 1e-8 of the peak are clipped.
        title: optional axes title.

    Returns:
        The ``matplotlib.figure.Figure``.

    Raises:
        ImportError: matplotlib is not installed.
        ValueError: `grid` and `density` are not 1-D of one length.
    """
    Figure = _figure_class()
    grid = np.asarray(grid, dtype=float)
    density = np.asarray(density, dtype=float)
    if grid.ndim != 1 or grid.shape != density.shape:
        msg = (
            f"grid and density must be 1-D of the same length; got shapes {grid.shape} "
            f"and {density.shape}"
        )
        raise ValueError(msg)
    if ax is None:
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
    else:
        fig = ax.figure
    if log:
        floor = max(float(density.max()) * 1e-8, np.finfo(float).tiny)
        ax.semilogy(grid, np.maximum(density, floor), color="C0", label="density (SLQ)")
    else:
        ax.plot(grid, density, color="C0", label="density (SLQ)")
        ax.fill_between(grid, density, alpha=0.2, color="C0")
    if eigenvalues is not None:
        for i, lam in enumerate(np.atleast_1d(np.asarray(eigenvalues, dtype=float))):
            label = "top eigenvalues" if i == 0 else None
            ax.axvline(lam, color="C3", linestyle="--", linewidth=1, label=label)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    if title is not None:
        ax.set_title(title)
    ax.legend(loc="best")
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig

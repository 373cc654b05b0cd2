"""hessfree.plot figures and the spectrum command's engine (run_spectrum)."""

import sys

import jax.numpy as jnp
import numpy as np
import pytest

from hessfree import plot
from hessfree._cli.analysis import run_spectrum


def test_plot_spectrum_writes_a_nonempty_png(tmp_path):
    grid = jnp.linspace(-1.0, 3.0, 200)
    density = jnp.exp(-0.5 * (grid / 0.2) ** 2)
    path = tmp_path / "density.png"
    fig = plot.plot_spectrum(grid, density, eigenvalues=[2.0, 2.5], path=str(path), log=True)
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    marked = sorted(line.get_xdata()[0] for line in ax.get_lines()[1:])
    assert marked == [2.0, 2.5]


def test_plot_spectrum_draws_into_given_axes():
    from matplotlib.figure import Figure

    fig = Figure()
    ax = fig.add_subplot()
    assert plot.plot_spectrum(np.arange(3.0), np.ones(3), ax=ax) is fig


def test_plot_spectrum_checks_shapes():
    with pytest.raises(
        ValueError,
        match=r"grid and density must be 1-D of the same length; got shapes \(3,\) and \(4,\)",
    ):
        plot.plot_spectrum(np.arange(3.0), np.ones(4))


def test_missing_matplotlib_names_the_plot_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(ImportError, match=r"pip install 'hessfree\[plot\]'"):
        plot.plot_spectrum(np.arange(3.0), np.ones(3))


def test_run_spectrum_prints_and_writes_the_figure(tmp_path, capsys):
    path = tmp_path / "spectrum.png"
    quick = {"num_probes": 1, "num_steps": 10, "trace_probes": 6, "sizes": (4, 8, 3), "batch": 16}
    result = run_spectrum(str(path), k=2, progress=True, **quick)
    assert path.stat().st_size > 1000
    assert result["figure"] == str(path) and result["converged"]
    assert len(result["eigenvalues"]) == 2 and result["eigenvalues"][0] <= result["eigenvalues"][1]
    out, err = capsys.readouterr()
    assert "top-2 eigenvalues" in out and "trace" in out and "[3/3]" in err

"""The examples in examples/ train (loss down, accuracy up, no NaN, steps taken), and the
training benchmark's quick path runs end to end.

Each example's ``main`` is run with a few steps; one of them also checks that nothing is
compiled after the first step of its jitted train step.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import jax
import pytest

pytest.importorskip("optax")
pytest.importorskip("sklearn")

ROOT = Path(__file__).resolve().parent.parent
for folder in ("examples", "benchmarks"):
    if str(ROOT / folder) not in sys.path:
        sys.path.insert(0, str(ROOT / folder))


_COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: (
        _COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
)


def _example(name: str):
    return importlib.import_module(name)


def _check_training(result: dict, loss_ratio: float = 0.5) -> None:
    assert math.isfinite(result["final_loss"]) and math.isfinite(result["test_loss"])
    assert result["final_loss"] < loss_ratio * result["initial_loss"], result
    assert not all(result["skipped"]), result["skipped"]
    assert math.isfinite(result["damping"]) and result["damping"] > 0


def test_plain_pytree_classifier_trains_and_compiles_only_on_the_first_step():
    example = _example("hf_plain")
    start = len(_COMPILES)
    counts: list[int] = []  # XLA compiles so far, after each step
    result = example.main(steps=12, verbose=False, on_step=lambda _: counts.append(len(_COMPILES)))
    _check_training(result)
    assert result["test_accuracy"] > 0.85, result
    assert counts[0] > start, "the first step must compile the train step"
    assert counts[1:] == [counts[0]] * (len(counts) - 1), f"compiles after each step: {counts}"


def test_flax_nnx_classifier_trains():
    pytest.importorskip("flax")
    result = _example("hf_flax_nnx").main(steps=12, verbose=False)
    _check_training(result)
    assert result["test_accuracy"] > 0.85, result


def test_flax_linen_classifier_trains():
    pytest.importorskip("flax")
    result = _example("hf_flax_linen").main(steps=12, verbose=False)
    _check_training(result)
    assert result["test_accuracy"] > 0.85, result


def test_equinox_autoencoder_trains():
    pytest.importorskip("equinox")
    result = _example("hf_equinox").main(steps=30, verbose=False)
    # the 16-unit code: the loss at least halves (PCA with 16 components is at about 0.27×)
    _check_training(result)
    assert result["test_loss"] < 0.6 * result["initial_loss"], result


@pytest.mark.slow
def test_training_benchmark_quick_path_runs(tmp_path):
    """The classifier part of ``bench_training.py --quick`` (the autoencoder's path is the
    same code on a deeper network, which takes longer to compile)."""
    pytest.importorskip("matplotlib")
    bench = importlib.import_module("bench_training")
    report = bench.main(
        seconds=0.2, quick=True, problems=("classifier",), lrs=(1e-2,), out=str(tmp_path / "q")
    )
    assert (tmp_path / "q.json").exists() and (tmp_path / "q.png").exists()
    (problem,) = report["problems"]
    rows = {row["method"].split(" (")[0]: row for row in problem["table"]}
    assert set(rows) == {"hessian_free", "adam lr=0.01", "lbfgs"}
    for row in rows.values():
        assert not row["nan"] and row["steps"] > 0
        assert row["final_loss"] < 0.5 * math.log(10), row  # from ≈ log 10 at initialization
    assert problem["hessian_free_summary"]["skipped"] < problem["hessian_free_summary"]["steps"]

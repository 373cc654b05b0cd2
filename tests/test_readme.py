"""The README's example runs and prints the exact values it claims."""

import contextlib
import io
import re
from pathlib import Path

import jax
import numpy as np
from jax.flatten_util import ravel_pytree

README = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_example_prints_value_next_to_exact():
    code = _python_blocks()[0]
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    f, p, v, Hv = namespace["f"], namespace["p"], namespace["v"], namespace["Hv"]
    # Independent reference: the dense Hessian of the raveled function.
    flat_p, unravel = ravel_pytree(p)
    H = jax.hessian(lambda z: f(unravel(z)))(flat_p)
    np.testing.assert_allclose(ravel_pytree(Hv)[0], H @ ravel_pytree(v)[0], rtol=1e-6)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2
    for line in lines:
        computed, exact = line.split("exact:")
        assert computed.strip() == exact.strip(), line
    # The comments in the README show what it prints.
    for line, comment in zip(lines, re.findall(r"# (\[.*\] exact: \[.*\])", code), strict=True):
        assert line.split() == comment.split()


def test_readme_commands_are_the_ones_ci_runs():
    text = README.read_text()
    assert "pip install -e ." in text and "hessfree demo" in text
    assert 'pip install -e ".[test]"' in text and "python -m pytest -n 2" in text
    ci = (README.parent / ".ci" / "run").read_text()
    assert 'python" -m pytest -n 2' in ci


def test_readme_second_example_prints_values_next_to_exact():
    code = _python_blocks()[1]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {})
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 3
    for line in lines:
        computed, exact = line.split("exact:")
        got = np.array([float(t) for t in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", computed)])
        want = np.array([float(t) for t in re.findall(r"-?\d+\.?\d*(?:e-?\d+)?", exact)])
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_readme_flax_and_equinox_forms_run():
    import pytest

    pytest.importorskip("flax.nnx")
    pytest.importorskip("equinox")
    code = _python_blocks()[2]
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 2
    # the GGN is PSD: its top eigenvalue and trace are positive, and the trace bounds it
    top = float(lines[0].strip("[]"))
    assert top > 0 and float(lines[1]) > top
    # independent reference for the Equinox GGN: dense Jᵀ H_L J over ravel_pytree
    model, params, x, y = namespace["model"], namespace["params"], namespace["x"], namespace["y"]
    flat, unravel = ravel_pytree(params)
    J = jax.jacfwd(lambda z: model(unravel(z), x))(flat)
    logits = model(params, x)
    HL = jax.hessian(
        lambda o: -jax.numpy.mean(jax.numpy.take_along_axis(jax.nn.log_softmax(o), y[:, None], 1))
    )(logits)
    dense = jax.numpy.einsum("bip,bicj,cjq->pq", J, HL, J)
    np.testing.assert_allclose(namespace["G"].to_dense(), dense, rtol=1e-4, atol=1e-6)


def test_readme_training_example_trains():
    code = _python_blocks()[3]
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), namespace)
    damping, cg_iterations, trained = out.getvalue().split()
    assert 1e-8 <= float(damping) < 1.0 and int(cg_iterations) >= 1 and trained == "True"
    state, loss = namespace["state"], namespace["loss"]
    assert not bool(state.skipped) and int(state.count) == 10
    # the loss it reports is the loss of the data it trained on, recomputed independently
    p, x, y = namespace["params"], namespace["x"], namespace["y"]
    logits = np.tanh(np.asarray(x) @ np.asarray(p["w1"])) @ np.asarray(p["w2"])
    logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    np.testing.assert_allclose(
        -logp[np.arange(len(y)), np.asarray(y)].mean(), loss(p, x, y), rtol=1e-5
    )

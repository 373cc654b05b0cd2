"""cost() reports XLA's figures per mode; select_mode() picks a mode that works."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessfree as hf
from helpers import dense_hessian
from test_products import f_custom_vjp, f_custom_vjp_linear, f_flat, f_tree, tree_point


def test_cost_reports_every_mode_and_grad():
    p, data = tree_point(jnp.float32)
    costs = hf.cost(f_tree, p, data)
    assert set(costs) == {"grad", "fwd_rev", "rev_rev", "rev_fwd"}
    for name, c in costs.items():
        assert c.error is None, name
        assert c.flops is not None and math.isfinite(c.flops) and c.flops > 0, name
        assert c.bytes_accessed is not None and math.isfinite(c.bytes_accessed), name
        assert c.bytes_accessed > 0, name
    # An HVP does strictly more arithmetic than the gradient it differentiates, but only a
    # small constant factor more (about 2-5x in theory; XLA reports ~2.2-2.5x here).
    grad_flops = costs["grad"].flops
    for mode in ("fwd_rev", "rev_rev", "rev_fwd"):
        assert grad_flops < costs[mode].flops <= 10 * grad_flops, (mode, costs[mode], grad_flops)


def test_cost_scales_with_problem_size():
    small = hf.cost(lambda x, A: 0.5 * x @ A @ x, jnp.ones(100), jnp.eye(100))
    large = hf.cost(lambda x, A: 0.5 * x @ A @ x, jnp.ones(400), jnp.eye(400))
    assert large["fwd_rev"].flops > 10 * small["fwd_rev"].flops


def test_cost_marks_modes_a_custom_vjp_refuses():
    costs = hf.cost(f_custom_vjp, jnp.ones(5))
    assert costs["rev_rev"].error is None
    assert costs["rev_fwd"].error is not None and "forward-mode" in costs["rev_fwd"].error
    # the jax-16049 pattern: no forward product at all, decided from the program
    assert costs["fwd_rev"].error is not None
    assert "TypeError" in costs["fwd_rev"].error and "custom_vjp" in costs["fwd_rev"].error
    assert costs["fwd_rev"].flops is None and costs["rev_fwd"].flops is None
    assert costs["rev_rev"].flops is not None and costs["rev_rev"].flops > 0


def test_cost_of_a_custom_vjp_linearize_can_take():
    costs = hf.cost(f_custom_vjp_linear, jnp.ones(5))
    assert costs["fwd_rev"].error is None and costs["fwd_rev"].flops > 0
    assert costs["rev_rev"].error is None


def test_select_mode_returns_a_working_mode():
    mode = hf.select_mode(f_flat, jnp.linspace(-1, 1, 50), repeats=2)
    assert mode in ("fwd_rev", "rev_rev", "rev_fwd")
    x, v = jnp.linspace(-1.0, 1.0, 50), jnp.cos(jnp.arange(50.0))
    out = hf.hvp(f_flat, x, v, mode=mode)
    assert out.shape == (50,)
    np.testing.assert_allclose(
        out, dense_hessian(f_flat, x) @ np.asarray(v), rtol=1e-10, atol=1e-12
    )


def test_select_mode_skips_modes_that_cannot_run():
    mode = hf.select_mode(f_custom_vjp, jnp.linspace(-1, 1, 5), repeats=1)
    assert mode in ("fwd_rev", "rev_rev")  # rev_fwd cannot go through this custom_vjp
    x, v = jnp.linspace(-1.0, 1.0, 5), jnp.arange(1.0, 6.0)
    out = hf.hvp(f_custom_vjp, x, v, mode=mode)
    # f = Σ softplus(x)² + Σ x³/3 is separable: its Hessian is diagonal, written out by hand
    # in float64 (jax.hessian's forward pass cannot go through the custom_vjp).
    z = np.asarray(x, np.float64)
    sig, sp = 1 / (1 + np.exp(-z)), np.log1p(np.exp(z))
    diag = 2 * sig**2 + 2 * sp * sig * (1 - sig) + 2 * z
    np.testing.assert_allclose(out, diag * np.asarray(v), rtol=1e-10, atol=1e-12)
    # ...and the same through reverse-over-reverse, independent of hessfree.
    ref = jax.jacrev(jax.grad(f_custom_vjp))(x) @ v
    np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)


def test_select_mode_and_cost_check_arguments():
    with pytest.raises(ValueError, match="f must return a scalar"):
        hf.cost(lambda x: x, jnp.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        hf.select_mode(f_flat, jnp.arange(3))
    with pytest.raises(
        ValueError, match=r"repeats must be an integer in \[1, 2\*\*31 - 1\]; got 0"
    ):
        hf.select_mode(f_flat, jnp.ones(3), repeats=0)
    with pytest.raises(TypeError, match="repeats must be a positive integer; got float"):
        hf.select_mode(f_flat, jnp.ones(3), repeats=2.0)

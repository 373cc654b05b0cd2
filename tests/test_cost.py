"""cost() reports XLA's figures per mode; select_mode() picks a mode that works."""

import jax.numpy as jnp
import pytest

import hessfree as hf
from test_products import f_custom_vjp, f_flat, f_tree, tree_point


def test_cost_reports_every_mode_and_grad():
    p, data = tree_point(jnp.float32)
    costs = hf.cost(f_tree, p, data)
    assert set(costs) == {"grad", "fwd_rev", "rev_rev", "rev_fwd"}
    for name, c in costs.items():
        assert c.error is None, name
        assert c.flops is not None and c.flops > 0
        assert c.bytes_accessed is not None and c.bytes_accessed > 0
    # An HVP does strictly more arithmetic than the gradient it differentiates.
    assert costs["fwd_rev"].flops > costs["grad"].flops


def test_cost_scales_with_problem_size():
    small = hf.cost(lambda x, A: 0.5 * x @ A @ x, jnp.ones(100), jnp.eye(100))
    large = hf.cost(lambda x, A: 0.5 * x @ A @ x, jnp.ones(400), jnp.eye(400))
    assert large["fwd_rev"].flops > 10 * small["fwd_rev"].flops


def test_cost_marks_modes_a_custom_vjp_refuses():
    costs = hf.cost(f_custom_vjp, jnp.ones(5))
    assert costs["rev_rev"].error is None
    assert costs["rev_fwd"].error is not None and "forward-mode" in costs["rev_fwd"].error


def test_select_mode_returns_a_working_mode():
    mode = hf.select_mode(f_flat, jnp.linspace(-1, 1, 50), repeats=2)
    assert mode in ("fwd_rev", "rev_rev", "rev_fwd")
    assert hf.hvp(f_flat, jnp.ones(50), jnp.ones(50), mode=mode).shape == (50,)


def test_select_mode_skips_modes_that_cannot_run():
    mode = hf.select_mode(f_custom_vjp, jnp.linspace(-1, 1, 5), repeats=1)
    assert mode in ("fwd_rev", "rev_rev")  # rev_fwd cannot go through this custom_vjp
    hf.hvp(f_custom_vjp, jnp.linspace(-1, 1, 5), jnp.ones(5), mode=mode)


def test_select_mode_and_cost_check_arguments():
    with pytest.raises(ValueError, match="f must return a scalar"):
        hf.cost(lambda x: x, jnp.ones(3))
    with pytest.raises(TypeError, match="floating-point"):
        hf.select_mode(f_flat, jnp.arange(3))
    with pytest.raises(ValueError, match="repeats must be a positive integer"):
        hf.select_mode(f_flat, jnp.ones(3), repeats=0)

"""Test-wide settings: float64 available (references are dense float64), strict checks."""

import jax

jax.config.update("jax_enable_x64", True)


import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _fresh_jax_caches():
    """Drop compiled programs after each test module: a long-lived xdist worker otherwise holds
    every program the suite compiled (several GB), and XLA:CPU crashed twice in such workers."""
    yield
    jax.clear_caches()

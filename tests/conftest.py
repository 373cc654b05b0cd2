"""Test-wide settings: float64 available (references are dense float64), strict checks."""

import jax

jax.config.update("jax_enable_x64", True)

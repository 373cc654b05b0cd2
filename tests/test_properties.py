"""Property tests: symmetry and linearity of H v on random shapes and trees (hypothesis)."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import hessfree as hf
from helpers import dense_hessian, flat

shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
containers = st.sampled_from(["dict", "list", "tuple", "nested"])


def make_tree(kind, arrays):
    if kind == "dict":
        return {f"k{i}": a for i, a in enumerate(arrays)}
    if kind == "list":
        return list(arrays)
    if kind == "tuple":
        return tuple(arrays)
    return {"outer": [tuple(arrays[:1]), {"rest": list(arrays[1:])}]}


def coupled(p):
    """Smooth, with curvature inside each leaf and across leaves."""
    leaves = jax.tree_util.tree_leaves(p)
    own = sum(jnp.sum(jnp.sin(a) * a**2 + 0.1 * a**4) for a in leaves)
    total = sum(jnp.sum(a) for a in leaves)
    return own + jnp.cos(total) + 0.05 * total**3


@st.composite
def problems(draw):
    leaf_shapes = draw(st.lists(shapes, min_size=1, max_size=3))
    kind = draw(containers)
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)

    def tree():
        return make_tree(kind, [jnp.asarray(rng.standard_normal(s)) for s in leaf_shapes])

    return tree(), tree(), tree(), draw(st.sampled_from(["fwd_rev", "rev_rev", "rev_fwd", "auto"]))


@settings(max_examples=20, deadline=None)
@given(problems())
def test_symmetry(problem):
    x, u, v, mode = problem
    left = float(jnp.vdot(flat(u), flat(hf.hvp(coupled, x, v, mode=mode))))
    right = float(jnp.vdot(flat(hf.hvp(coupled, x, u, mode=mode)), flat(v)))
    np.testing.assert_allclose(left, right, rtol=1e-10, atol=1e-10)


@settings(max_examples=20, deadline=None)
@given(problems(), st.floats(-3, 3), st.floats(-3, 3))
def test_linearity(problem, a, b):
    x, u, v, mode = problem
    combo = jax.tree_util.tree_map(lambda p, q: a * p + b * q, u, v)
    lhs = flat(hf.hvp(coupled, x, combo, mode=mode))
    rhs = a * flat(hf.hvp(coupled, x, u, mode=mode)) + b * flat(hf.hvp(coupled, x, v, mode=mode))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-9, atol=1e-9)


@settings(max_examples=15, deadline=None)
@given(problems())
def test_random_trees_match_dense(problem):
    x, _, v, mode = problem
    np.testing.assert_allclose(
        flat(hf.hvp(coupled, x, v, mode=mode)),
        dense_hessian(coupled, x) @ flat(v),
        rtol=1e-9,
        atol=1e-9,
    )

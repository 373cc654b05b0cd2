"""The seed functions against the seed page's contract and a dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hessfree as hf

SEED_FUNCTIONS = [hf.hvp_jvp_of_grad, hf.hvp_grad_of_grad]


@pytest.mark.parametrize("fn", SEED_FUNCTIONS)
def test_worked_example(fn):
    A = jnp.array([[2.0, 0.0], [0.0, 3.0]])
    out = fn(jnp.array([1.0, 1.0]), A, jnp.array([1.0, 0.0]))
    np.testing.assert_array_equal(np.asarray(out), [2.0, 0.0])


def _random_problem(d, dtype, seed=0):
    rng = np.random.default_rng(seed)
    B = rng.standard_normal((d, d))
    A = (B + B.T) / 2
    x, v = rng.standard_normal(d), rng.standard_normal(d)
    return (jnp.asarray(a, dtype) for a in (x, A, v))


@pytest.mark.parametrize("fn", SEED_FUNCTIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_equals_A_v_and_keeps_dtype(fn, dtype):
    x, A, v = _random_problem(37, dtype)
    out = fn(x, A, v)
    assert out.dtype == dtype and out.shape == (37,)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    np.testing.assert_allclose(
        out, np.asarray(A, np.float64) @ np.asarray(v, np.float64), rtol=tol, atol=tol
    )


def test_both_agree_exactly_enough():
    x, A, v = _random_problem(50, jnp.float64, seed=1)
    np.testing.assert_allclose(
        hf.hvp_jvp_of_grad(x, A, v), hf.hvp_grad_of_grad(x, A, v), rtol=1e-13, atol=1e-13
    )


@pytest.mark.parametrize("fn", SEED_FUNCTIONS)
def test_nonsymmetric_A_gives_symmetric_part(fn):
    rng = np.random.default_rng(2)
    A = jnp.asarray(rng.standard_normal((6, 6)))
    x, v = jnp.asarray(rng.standard_normal(6)), jnp.asarray(rng.standard_normal(6))
    np.testing.assert_allclose(fn(x, A, v), 0.5 * (A + A.T) @ v, rtol=1e-12)
    assert not np.allclose(fn(x, A, v), A @ v)


@pytest.mark.parametrize("fn", SEED_FUNCTIONS)
def test_jit_and_vmap(fn):
    x, A, v = _random_problem(8, jnp.float64, seed=3)
    np.testing.assert_allclose(jax.jit(fn)(x, A, v), A @ v, rtol=1e-12)
    V = jnp.stack([v, 2 * v, -v])
    np.testing.assert_allclose(jax.vmap(fn, in_axes=(None, None, 0))(x, A, V), V @ A.T, rtol=1e-12)
    X = jnp.stack([x, x + 1])
    np.testing.assert_allclose(
        jax.vmap(fn, in_axes=(0, None, None))(X, A, v), jnp.stack([A @ v] * 2), rtol=1e-12
    )


@pytest.mark.parametrize("fn", SEED_FUNCTIONS)
@pytest.mark.parametrize(
    ("x_shape", "A_shape", "v_shape", "match"),
    [
        ((2, 2), (2, 2), (2,), r"x must be 1-D .* got shape \(2, 2\)"),
        ((3,), (3, 2), (3,), r"A must have shape \(d, d\) = \(3, 3\) .* got shape \(3, 2\)"),
        ((3,), (3, 3), (4,), r"v must have shape \(d,\) = \(3,\) .* got shape \(4,\)"),
        ((), (1, 1), (1,), r"x must be 1-D .* got shape \(\)"),
    ],
)
def test_shape_errors_name_the_argument(fn, x_shape, A_shape, v_shape, match):
    with pytest.raises(ValueError, match=match):
        fn(jnp.ones(x_shape), jnp.ones(A_shape), jnp.ones(v_shape))


@pytest.mark.parametrize("fn", SEED_FUNCTIONS)
def test_integer_inputs_raise_type_error(fn):
    with pytest.raises(TypeError, match=r"x must have floating-point leaves.*int"):
        fn(jnp.array([1, 1]), jnp.eye(2), jnp.ones(2))
    with pytest.raises(TypeError, match=r"A must have floating-point"):
        fn(jnp.ones(2), jnp.eye(2, dtype=jnp.int32), jnp.ones(2))
    with pytest.raises(TypeError, match=r"x must be a jax or numpy array"):
        fn([1.0, 1.0], jnp.eye(2), jnp.ones(2))


@pytest.mark.parametrize("fn", SEED_FUNCTIONS)
def test_mixed_precision_keeps_x_dtype(fn):
    x = jnp.ones(3, jnp.float32)
    out = fn(x, jnp.eye(3, dtype=jnp.float64), jnp.ones(3, jnp.float64))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, np.ones(3), rtol=1e-6)

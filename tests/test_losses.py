"""Closed-form output-space curvature of the built-in losses vs hand-written and autodiff references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hessfree import _losses

B, C = 5, 4
SOFTMAX = _losses.LOSSES["softmax_cross_entropy"]


def _logits(dtype=jnp.float64, shape=(B, C)):
    return jax.random.normal(jax.random.PRNGKey(0), shape, dtype)


def _ref_loss(loss, o, y):
    """The built-in losses written out by hand, float64 numpy."""
    o, y = np.asarray(o, np.float64), np.asarray(y)
    if loss == "softmax_cross_entropy":
        if y.ndim == o.ndim - 1:
            y = np.eye(o.shape[-1])[y]
        lse = np.log(np.sum(np.exp(o), axis=-1, keepdims=True))
        return -np.sum(y * (o - lse)) / o.shape[0]
    if loss == "mse":
        return 0.5 * np.sum((o - y) ** 2) / o.shape[0]
    return np.sum(np.log1p(np.exp(o)) - y * o) / o.shape[0]


def _ref_hessian_softmax(o):
    """(diag(p) − ppᵀ)/B per example, block diagonal over the batch, in raveled order."""
    p = np.exp(o) / np.sum(np.exp(o), axis=-1, keepdims=True)
    blocks = [np.diag(pb) - np.outer(pb, pb) for pb in p]
    n = o.shape[0] * o.shape[1]
    H = np.zeros((n, n))
    for b, blk in enumerate(blocks):
        H[b * C : (b + 1) * C, b * C : (b + 1) * C] = blk
    return H / o.shape[0]


def _targets(loss, kind="labels"):
    key = jax.random.PRNGKey(1)
    if loss == "softmax_cross_entropy" and kind == "labels":
        return jax.random.randint(key, (B,), 0, C)
    if loss == "softmax_cross_entropy":
        return jax.nn.softmax(jax.random.normal(key, (B, C)))
    if loss == "mse":
        return jax.random.normal(key, (B, C))
    return jax.random.uniform(key, (B, C))


LOSS_CASES = [
    ("softmax_cross_entropy", "labels"),
    ("softmax_cross_entropy", "probs"),
    ("mse", None),
    ("sigmoid_cross_entropy", None),
]


@pytest.mark.parametrize(("loss", "kind"), LOSS_CASES)
def test_loss_value_matches_hand_written(loss, kind):
    o, y = _logits(), _targets(loss, kind)
    np.testing.assert_allclose(
        _losses.get_loss(loss).value(o, y), _ref_loss(loss, o, y), rtol=1e-12
    )


@pytest.mark.parametrize(("loss", "kind"), LOSS_CASES)
def test_output_hessian_matches_autodiff(loss, kind):
    o, y = _logits(), _targets(loss, kind)
    H = jax.jit(jax.hessian(lambda z: _losses.get_loss(loss).value(z.reshape(B, C), y)))(o.ravel())
    u = jax.random.normal(jax.random.PRNGKey(2), (B, C), jnp.float64)
    hu = _losses.get_loss(loss).hessian_mv(o, y, u)
    np.testing.assert_allclose(hu.ravel(), H @ u.ravel(), rtol=1e-10, atol=1e-14)


def test_softmax_hessian_matches_hand_written():
    o = _logits()
    u = jax.random.normal(jax.random.PRNGKey(3), (B, C), jnp.float64)
    hu = SOFTMAX.hessian_mv(o, None, u)
    np.testing.assert_allclose(
        hu.ravel(), _ref_hessian_softmax(np.asarray(o)) @ u.ravel(), rtol=1e-12
    )


def test_unnormalized_soft_labels_scale_the_hessian():
    o, y = _logits(), 2.5 * _targets("softmax_cross_entropy", "probs")
    H = jax.jit(jax.hessian(lambda z: SOFTMAX.value(z.reshape(B, C), y)))(o.ravel())
    u = jnp.ones((B, C), jnp.float64).at[:, 0].set(-1.0)
    hu = SOFTMAX.hessian_mv(o, y, u)
    np.testing.assert_allclose(hu.ravel(), H @ u.ravel(), rtol=1e-10)


def test_sequence_logits_hessian_is_block_diagonal_per_position():
    o = _logits(shape=(B, 3, C))
    y = jax.random.randint(jax.random.PRNGKey(4), (B, 3), 0, C)
    H = jax.jit(jax.hessian(lambda z: SOFTMAX.value(z.reshape(o.shape), y)))(o.ravel())
    u = jax.random.normal(jax.random.PRNGKey(5), o.shape, jnp.float64)
    hu = SOFTMAX.hessian_mv(o, y, u)
    np.testing.assert_allclose(hu.ravel(), H @ u.ravel(), rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(("loss", "kind"), LOSS_CASES)
def test_output_grad_is_per_example_gradient(loss, kind):
    o, y = _logits(), _targets(loss, kind)
    g = jax.grad(lambda z: _losses.get_loss(loss).value(z, y))(o) * B
    np.testing.assert_allclose(_losses.get_loss(loss).output_grad(o, y), g, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("loss", _losses.LOSSES)
def test_float32_stays_float32(loss):
    o = _logits(jnp.float32)
    y = _targets(loss, "labels")
    y = y if loss == "softmax_cross_entropy" else y.astype(jnp.float32)
    u = jnp.ones((B, C), jnp.float32)
    row = _losses.get_loss(loss)
    assert row.hessian_mv(o, y, u).dtype == jnp.float32
    assert row.output_grad(o, y).dtype == jnp.float32
    assert row.value(o, y).dtype == jnp.float32


@pytest.mark.parametrize("likelihood", list(_losses.LIKELIHOODS))
def test_sampled_gradients_average_to_output_fisher(likelihood):
    """E[r rᵀ] over the predictive equals B · H_L (statistical: many draws, fixed key)."""
    row = _losses.get_likelihood(likelihood)
    o = _logits()
    S = 20_000
    r = _losses.sampled_output_grads(row, o, jax.random.PRNGKey(6), S)
    assert r.shape == (S, B, C)
    outer = np.einsum("sbi,sbj->sbij", r, r)
    mean, stderr = outer.mean(0), outer.std(0) / np.sqrt(S)
    eye = np.eye(C)
    exact = np.stack(
        [
            np.asarray(
                jax.vmap(lambda e, b=b: row.hessian_mv(o, None, e)[b] * B)(
                    jnp.zeros((C, B, C), jnp.float64).at[:, b, :].set(eye)
                )
            )
            for b in range(B)
        ]
    )
    assert np.all(np.abs(mean - exact) <= 5 * stderr + 1e-3)


def test_samplers_shapes_and_dtypes():
    key = jax.random.PRNGKey(7)
    o = _logits(jnp.float32)
    assert _losses.get_likelihood("categorical").sample(key, o, 3).shape == (3, B)
    assert _losses.get_likelihood("gaussian").sample(key, o, 3).dtype == jnp.float32
    y = _losses.get_likelihood("bernoulli").sample(key, o, 3)
    assert y.shape == (3, B, C) and y.dtype == jnp.float32
    assert set(np.unique(np.asarray(y))) <= {0.0, 1.0}


def test_table_rows_and_lookups():
    assert set(_losses.LOSSES) == {"softmax_cross_entropy", "mse", "sigmoid_cross_entropy"}
    assert set(_losses.LIKELIHOODS) == {"categorical", "gaussian", "bernoulli"}
    for name, row in _losses.LOSSES.items():
        assert row.name == name and _losses.get_loss(name) is row
        assert _losses.get_likelihood(row.likelihood) is row
    with pytest.raises(ValueError, match="loss must be one of"):
        _losses.get_loss("hinge")
    with pytest.raises(ValueError, match="likelihood must be one of"):
        _losses.get_likelihood("poisson")


def test_check_targets_errors():
    o = jax.ShapeDtypeStruct((B, C), jnp.float32)
    mse = _losses.get_loss("mse")
    with pytest.raises(ValueError, match="loss must be one of"):
        _losses.check_targets(_losses.get_loss("hinge"), o, jnp.zeros(B))
    with pytest.raises(ValueError, match=r"integer labels must have shape \(5,\)"):
        _losses.check_targets(SOFTMAX, o, jnp.zeros((B, 1), jnp.int32))
    with pytest.raises(
        ValueError,
        match=r"must have shape \(5, 4\) for outputs of shape \(5, 4\).*got shape \(5,\)",
    ):
        _losses.check_targets(SOFTMAX, o, jnp.zeros((B,), jnp.float32))
    with pytest.raises(
        ValueError,
        match=r"must have shape \(5, 4\) for outputs of shape \(5, 4\).*got shape \(5, 5\)",
    ):
        _losses.check_targets(mse, o, jnp.zeros((B, C + 1)))
    with pytest.raises(ValueError, match="targets must be given"):
        _losses.check_targets(mse, o, None)
    with pytest.raises(ValueError, match=r"logits\) of shape \(B, ..., C\)"):
        _losses.check_targets(SOFTMAX, jax.ShapeDtypeStruct((B,), jnp.float32), jnp.zeros(B, int))
    with pytest.raises(TypeError, match=r"must be integer labels in \[0, C\) or probabilities"):
        _losses.check_targets(SOFTMAX, o, jnp.zeros(B, bool))


def test_check_targets_names_probabilities():
    o = jax.ShapeDtypeStruct((B, C), jnp.float32)
    with pytest.raises(ValueError, match=r"probabilities must have shape \(5, 4\)"):
        _losses.check_targets(SOFTMAX, o, jnp.zeros((B,), jnp.float32))


def test_targets_ok_flags_out_of_range_values():
    # check_targets is static (shapes, dtypes); the value predicate is each row's targets_ok
    o = _logits(jnp.float32)
    sigmoid, mse = _losses.get_loss("sigmoid_cross_entropy"), _losses.get_loss("mse")
    assert not bool(SOFTMAX.targets_ok(o, jnp.full((B,), C, jnp.int32)))
    assert not bool(SOFTMAX.targets_ok(o, jnp.full((B,), -1, jnp.int32)))
    assert not bool(SOFTMAX.targets_ok(o, jnp.full((B, C), 0.5, jnp.float32)))
    assert not bool(sigmoid.targets_ok(o, jnp.full((B, C), 2.0)))
    assert not bool(mse.targets_ok(o, jnp.full((B, C), jnp.nan)))
    assert bool(SOFTMAX.targets_ok(o, _targets("softmax_cross_entropy", "labels")))
    assert bool(SOFTMAX.targets_ok(o, _targets("softmax_cross_entropy", "probs")))
    assert bool(sigmoid.targets_ok(o, _targets("sigmoid_cross_entropy")))
    assert bool(mse.targets_ok(o, _targets("mse")))
    # check_targets itself accepts valid targets
    spec = jax.ShapeDtypeStruct((B, C), jnp.float32)
    _losses.check_targets(SOFTMAX, spec, _targets("softmax_cross_entropy", "labels"))
    _losses.check_targets(SOFTMAX, spec, _targets("softmax_cross_entropy", "probs"))


def test_outer_product_mv_matches_explicit_outer_products():
    r = jax.random.normal(jax.random.PRNGKey(8), (3, B, C), jnp.float64)
    u = jax.random.normal(jax.random.PRNGKey(9), (B, C), jnp.float64)
    expected = np.einsum("sbi,sbj,bj->bi", r, r, u) / (B * 3)
    np.testing.assert_allclose(_losses.outer_product_mv(r, u), expected, rtol=1e-12)


def test_check_model_outputs_errors():
    x = jnp.zeros((B, 3))
    with pytest.raises(ValueError, match="leading batch axis"):
        _losses.check_model_outputs(jax.ShapeDtypeStruct((), jnp.float32), x)
    with pytest.raises(ValueError, match="leading size 5"):
        _losses.check_model_outputs(jax.ShapeDtypeStruct((C,), jnp.float32), x)
    with pytest.raises(TypeError, match="one array of outputs"):
        _losses.check_model_outputs((jnp.zeros((B, C)), jnp.zeros((B, C))), x)
    with pytest.raises(TypeError, match="floating-point"):
        _losses.check_model_outputs(jax.ShapeDtypeStruct((B, C), jnp.int32), x)

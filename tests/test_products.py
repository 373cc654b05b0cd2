"""hvp, hvps and hvp_fn against dense float64 Hessians and finite differences."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import hessfree as hf
from helpers import dense_hessian, fd_hvp, flat, random_like

MODES = ["fwd_rev", "rev_rev", "rev_fwd", "auto"]


class Layer(NamedTuple):
    w: jax.Array
    b: jax.Array


def f_flat(x):
    return jnp.sum(jnp.sin(x) * x**2) + (x @ x) ** 2 / 10


def f_tree(p, data):
    """A nested pytree: dict of list of NamedTuple and tuple, plus a scalar leaf."""
    layer, (c,) = p["layers"]
    h = jnp.tanh(data @ layer.w + layer.b)
    return (
        jnp.mean(jnp.log1p(jnp.exp(h @ c)))
        + p["scale"] ** 2 * jnp.sum(c**2)
        + jnp.sum(layer.w**4) / 7
    )


def tree_point(dtype):
    k = jax.random.split(jax.random.PRNGKey(0), 4)
    p = {
        "layers": [
            Layer(jax.random.normal(k[0], (3, 4), dtype), jax.random.normal(k[1], (4,), dtype)),
            (jax.random.normal(k[2], (4,), dtype),),
        ],
        "scale": jnp.asarray(0.7, dtype),
    }
    data = jax.random.normal(k[3], (5, 3), dtype)
    return p, data


@jax.custom_vjp
def _softplus_cv(x):
    return jnp.log1p(jnp.exp(x))


def _softplus_fwd(x):
    # The pattern of jax issue 16049: the forward rule calls the custom_vjp function itself.
    return _softplus_cv(x), x


def _softplus_bwd(x, g):
    return (g * jax.nn.sigmoid(x),)


_softplus_cv.defvjp(_softplus_fwd, _softplus_bwd)


def f_custom_vjp(x):
    return jnp.sum(_softplus_cv(x) ** 2) + jnp.sum(x**3) / 3


def f_custom_vjp_linear(x):
    return jnp.sum(_softplus_cv(x)) + jnp.sum(x**4)


CASES = {
    "flat": (f_flat, lambda dt: (jnp.linspace(-1.0, 1.5, 6, dtype=dt), ())),
    "tree": (f_tree, lambda dt: (tree_point(dt)[0], (tree_point(dt)[1],))),
}


def _reference(f, x, v, args):
    H = dense_hessian(f, x, *args)
    return H @ flat(v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_hvp_matches_dense_hessian(mode, case, dtype):
    f, make = CASES[case]
    x, args = make(dtype)
    v = random_like(jax.random.PRNGKey(1), x)
    out = hf.hvp(f, x, v, *args, mode=mode)
    assert jax.tree_util.tree_structure(out) == jax.tree_util.tree_structure(x)
    for o, xl in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(x), strict=True):
        assert o.dtype == xl.dtype and o.shape == xl.shape
    tol = 2e-4 if dtype == jnp.float32 else 1e-10
    ref = _reference(f, x, v, args)
    np.testing.assert_allclose(flat(out), ref, rtol=tol, atol=tol * np.max(np.abs(ref)))


@pytest.mark.parametrize("case", list(CASES))
def test_hvp_matches_central_differences(case):
    f, make = CASES[case]
    x, args = make(jnp.float64)
    v = random_like(jax.random.PRNGKey(2), x)
    np.testing.assert_allclose(
        flat(hf.hvp(f, x, v, *args)), fd_hvp(f, x, v, *args), rtol=1e-6, atol=1e-7
    )


@pytest.mark.parametrize("mode", MODES)
def test_jit_and_vmap(mode):
    x, args = CASES["tree"][1](jnp.float64)
    vs = jax.vmap(lambda k: random_like(k, x))(jax.random.split(jax.random.PRNGKey(3), 4))
    H = dense_hessian(f_tree, x, *args)
    jitted = jax.jit(lambda x, v, d: hf.hvp(f_tree, x, v, d, mode=mode))
    batched = jax.vmap(lambda v: hf.hvp(f_tree, x, v, *args, mode=mode))(vs)
    for i in range(4):
        v = jax.tree_util.tree_map(lambda a, i=i: a[i], vs)
        np.testing.assert_allclose(flat(jitted(x, v, *args)), H @ flat(v), rtol=1e-10)
        np.testing.assert_allclose(
            flat(jax.tree_util.tree_map(lambda a, i=i: a[i], batched)), H @ flat(v), rtol=1e-10
        )


def test_vmap_over_points():
    xs = jnp.stack([jnp.linspace(-1, 1, 5), jnp.linspace(0, 2, 5)])
    v = jnp.arange(5.0)
    out = jax.vmap(lambda x: hf.hvp(f_flat, x, v))(xs)
    for x, o in zip(xs, out, strict=True):
        np.testing.assert_allclose(o, dense_hessian(f_flat, x) @ v, rtol=1e-10)


@pytest.mark.parametrize("f", [f_custom_vjp, f_custom_vjp_linear])
@pytest.mark.parametrize("transform", ["eager", "jit", "vmap", "hvp_fn", "hvps"])
def test_auto_works_through_custom_vjp(f, transform):
    x = jnp.linspace(-1.0, 1.0, 5)
    v = jnp.array([1.0, -2.0, 0.5, 0.0, 3.0])
    # The reference differentiates the same math without the custom_vjp.
    ref = dense_hessian(_plain(f), x) @ np.asarray(v)
    if transform == "eager":
        out = hf.hvp(f, x, v)
    elif transform == "jit":
        out = jax.jit(lambda x, v: hf.hvp(f, x, v))(x, v)
    elif transform == "vmap":
        out = jax.vmap(lambda v: hf.hvp(f, x, v))(jnp.stack([v, v]))[1]
    elif transform == "hvp_fn":
        out = hf.hvp_fn(f, x)(v)
    else:
        out = hf.hvps(f, x, jnp.stack([v, 2 * v]), chunk_size=1)[0]
    np.testing.assert_allclose(out, ref, rtol=1e-10)


def _plain(f):
    softplus = lambda x: jnp.log1p(jnp.exp(x))  # noqa: E731
    if f is f_custom_vjp:
        return lambda x: jnp.sum(softplus(x) ** 2) + jnp.sum(x**3) / 3
    return lambda x: jnp.sum(softplus(x)) + jnp.sum(x**4)


def test_plain_jax_forward_mode_really_fails_on_the_custom_vjp():
    """The premise of the fallback: plain jvp-of-grad refuses this function."""
    x = jnp.linspace(-1.0, 1.0, 5)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(jax.grad(f_custom_vjp), (x,), (x,))


def test_explicit_forward_mode_on_custom_vjp_says_why():
    x = jnp.linspace(-1.0, 1.0, 5)
    with pytest.raises(TypeError, match=r"mode 'fwd_rev' needs forward-mode.*custom_vjp.*'auto'"):
        hf.hvp(f_custom_vjp, x, x, mode="fwd_rev")
    with pytest.raises(TypeError, match=r"mode 'rev_fwd' needs forward-mode"):
        hf.hvp(f_custom_vjp, x, x, mode="rev_fwd")
    np.testing.assert_allclose(
        hf.hvp(f_custom_vjp, x, x, mode="rev_rev"), hf.hvp(f_custom_vjp, x, x)
    )


@pytest.mark.parametrize("mode", MODES)
def test_third_derivative_through_hvp(mode):
    """grad of ⟨u, H(x) v⟩ is the third-derivative tensor contracted twice."""
    x = jnp.linspace(-1.0, 1.2, 4)
    u, v = jnp.array([1.0, 0.5, -1.0, 2.0]), jnp.array([0.3, -1.0, 1.0, 0.0])
    g = jax.grad(lambda y: jnp.vdot(u, hf.hvp(f_flat, y, v, mode=mode)))(x)
    T = jax.jacfwd(jax.hessian(f_flat))(x)  # T[i, j, k] = ∂³f / ∂x_i ∂x_j ∂x_k
    np.testing.assert_allclose(g, np.einsum("ijk,i,j->k", T, u, v), rtol=1e-10)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk_size", [None, 1, 3, 8])
def test_hvps_equals_stacked_hvp(mode, chunk_size):
    x, args = CASES["tree"][1](jnp.float64)
    vs = jax.vmap(lambda k: random_like(k, x))(jax.random.split(jax.random.PRNGKey(4), 5))
    out = hf.hvps(f_tree, x, vs, *args, mode=mode, chunk_size=chunk_size)
    for i in range(5):
        v = jax.tree_util.tree_map(lambda a, i=i: a[i], vs)
        expected = flat(hf.hvp(f_tree, x, v, *args, mode=mode))
        np.testing.assert_allclose(
            flat(jax.tree_util.tree_map(lambda a, i=i: a[i], out)), expected, rtol=1e-12, atol=1e-14
        )


def test_hvps_chunked_is_identical_to_unchunked_float32():
    x, args = CASES["tree"][1](jnp.float32)
    vs = jax.vmap(lambda k: random_like(k, x))(jax.random.split(jax.random.PRNGKey(5), 7))
    full = flat(hf.hvps(f_tree, x, vs, *args))
    chunked = flat(hf.hvps(f_tree, x, vs, *args, chunk_size=3))
    # Same math; float32 rounding may differ in the last bits between batch shapes.
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6 * np.max(np.abs(full)))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cache", [True, False])
def test_hvp_fn_equals_hvp(mode, cache):
    x, args = CASES["tree"][1](jnp.float64)
    hv = hf.hvp_fn(f_tree, x, *args, mode=mode, cache=cache)
    for seed in range(3):
        v = random_like(jax.random.PRNGKey(10 + seed), x)
        np.testing.assert_allclose(
            flat(hv(v)), flat(hf.hvp(f_tree, x, v, *args, mode=mode)), rtol=1e-12
        )


def test_hvp_fn_keeps_float32_and_jits():
    x, args = CASES["tree"][1](jnp.float32)
    hv = hf.hvp_fn(f_tree, x, *args)
    v = random_like(jax.random.PRNGKey(0), x)
    out = jax.jit(hv)(v)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(out))


def test_hvp_fn_cached_runs_gradient_pass_once():
    calls = []

    def f(x):
        jax.debug.callback(lambda: calls.append(1))
        return f_flat(x)

    x = jnp.linspace(-1.0, 1.0, 4)
    hv = hf.hvp_fn(f, x, cache=True)
    before = len(calls)
    for _ in range(3):
        jax.block_until_ready(hv(x))
    assert len(calls) == before  # products replay only the tangent pass


def test_tangent_is_cast_to_x_dtype():
    x = jnp.linspace(-1.0, 1.0, 4, dtype=jnp.float32)
    out = hf.hvp(f_flat, x, jnp.ones(4, jnp.float64))
    assert out.dtype == jnp.float32


# ----------------------------------------------------------------------------- errors


def test_error_structure_mismatch_names_both():
    x = {"w": jnp.ones(2), "b": jnp.ones(())}
    with pytest.raises(
        ValueError,
        match=r"v must have the same tree structure as x; got dict with keys \['w'\] vs \['b', 'w'\]",
    ):
        hf.hvp(lambda p: jnp.sum(p["w"] ** 2) + p["b"], x, {"w": jnp.ones(2)})


def test_error_leaf_shape_names_the_leaf():
    x = {"w": jnp.ones((2, 3)), "b": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(3, 2\) in v but \(2, 3\) in x"):
        hf.hvp(
            lambda p: jnp.sum(p["w"] ** 2) + jnp.sum(p["b"]),
            x,
            {"w": jnp.ones((3, 2)), "b": jnp.ones(3)},
        )


def test_error_f_not_scalar():
    with pytest.raises(
        ValueError, match=r"f must return a scalar .*got output of shape\(s\) \(3,\)"
    ):
        hf.hvp(lambda x: x**2, jnp.ones(3), jnp.ones(3))


def test_error_unknown_mode_lists_valid():
    with pytest.raises(
        ValueError,
        match=r"mode must be one of \['auto', 'fwd_rev', 'rev_rev', 'rev_fwd'\]; got 'fwd'",
    ):
        hf.hvp(f_flat, jnp.ones(3), jnp.ones(3), mode="fwd")
    with pytest.raises(ValueError, match="mode must be one of"):
        hf.hvp_fn(f_flat, jnp.ones(3), mode="forward")


def test_error_integer_x():
    with pytest.raises(
        TypeError, match=r"x must have floating-point leaves.*leaf \['a'\] has dtype int"
    ):
        hf.hvp(lambda p: jnp.sum(p["a"] ** 2.0), {"a": jnp.arange(3)}, {"a": jnp.ones(3)})


def test_error_f_not_callable():
    with pytest.raises(TypeError, match=r"f must be callable"):
        hf.hvp("f", jnp.ones(3), jnp.ones(3))


def test_error_hvps_batch_axis():
    x = {"a": jnp.ones(3), "b": jnp.ones(2)}
    f = lambda p: jnp.sum(p["a"] ** 2) + jnp.sum(p["b"] ** 2)  # noqa: E731
    with pytest.raises(
        ValueError, match=r"leaf \['a'\] has shape \(3,\), expected \(batch, \*\(3,\)\)"
    ):
        hf.hvps(f, x, x)
    with pytest.raises(ValueError, match=r"same leading batch size; leaf \['b'\] has 4"):
        hf.hvps(f, x, {"a": jnp.ones((2, 3)), "b": jnp.ones((4, 2))})
    vs = {"a": jnp.ones((2, 3)), "b": jnp.ones((2, 2))}
    with pytest.raises(
        ValueError, match=r"chunk_size must be an integer in \[1, 2\*\*31 - 1\]; got 0"
    ):
        hf.hvps(f, x, vs, chunk_size=0)
    with pytest.raises(
        TypeError, match=r"chunk_size must be a positive integer or None; got float"
    ):
        hf.hvps(f, x, vs, chunk_size=1.5)
    with pytest.raises(ValueError, match=r"chunk_size must be an integer in \[1, 2\*\*31 - 1\]"):
        hf.hvps(f, x, vs, chunk_size=2**31)


def test_error_hvp_fn_checks_v():
    hv = hf.hvp_fn(f_flat, jnp.ones(3))
    with pytest.raises(ValueError, match=r"v must match the shapes of x"):
        hv(jnp.ones(4))


def test_matches_ravel_order_of_reference():
    """Guard the oracle itself: the dense reference is in ravel_pytree order."""
    x, args = CASES["tree"][1](jnp.float64)
    flat_x, unravel = ravel_pytree(x)
    e = jnp.zeros_like(flat_x).at[3].set(1.0)
    column = flat(hf.hvp(f_tree, x, unravel(e), *args))
    np.testing.assert_allclose(column, dense_hessian(f_tree, x, *args)[:, 3], rtol=1e-10)


# ----------------------------------------------------------------------------- remat


def _residual_mlp(params, x):
    h = x
    for p in params:
        h = h + jnp.tanh(jax.nn.gelu(h @ p["w1"]) @ p["w2"])
    return jnp.mean(h**2)


def _residual_problem():
    keys = jax.random.split(jax.random.PRNGKey(7), 3)
    params = [
        {"w1": jax.random.normal(k, (6, 24)) / 3, "w2": jax.random.normal(k, (24, 6)) / 5}
        for k in keys
    ]
    return params, jax.random.normal(jax.random.PRNGKey(8), (16, 6))


@pytest.mark.parametrize("remat", [True, jax.checkpoint_policies.dots_saveable])
@pytest.mark.parametrize("mode", MODES)
def test_remat_gives_the_same_products(remat, mode):
    params, x = _residual_problem()
    v = random_like(jax.random.PRNGKey(9), params)
    expected = flat(hf.hvp(_residual_mlp, params, v, x, mode=mode))
    np.testing.assert_allclose(
        flat(hf.hvp(_residual_mlp, params, v, x, mode=mode, remat=remat)), expected, rtol=1e-10
    )
    np.testing.assert_allclose(
        flat(hf.hvp_fn(_residual_mlp, params, x, mode=mode, remat=remat)(v)), expected, rtol=1e-10
    )
    vs = jax.tree_util.tree_map(lambda a: jnp.stack([a, -a]), v)
    np.testing.assert_allclose(
        flat(
            jax.tree_util.tree_map(
                lambda a: a[1], hf.hvps(_residual_mlp, params, vs, x, mode=mode, remat=remat)
            )
        ),
        -expected,
        rtol=1e-10,
    )


def test_remat_shrinks_what_the_cached_linearization_holds():
    params, x = _residual_problem()

    def held_bytes(op):
        return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree_util.tree_leaves(op.matvec))

    plain = held_bytes(hf.hessian(_residual_mlp, params, x))
    full = held_bytes(hf.hessian(_residual_mlp, params, x, remat=True))
    dots = held_bytes(
        hf.hessian(_residual_mlp, params, x, remat=jax.checkpoint_policies.dots_saveable)
    )
    assert full < dots < plain
    assert full < plain / 3


def test_remat_rejects_a_non_policy():
    with pytest.raises(
        TypeError, match=r"remat must be False, True or a jax.checkpoint_policies policy; got 'yes'"
    ):
        hf.hvp(f_flat, jnp.ones(3), jnp.ones(3), remat="yes")


@pytest.mark.parametrize("name", ["mlp", "quadratic", "attention"])
def test_auto_compiles_to_the_hand_written_jvp_of_grad_program(name):
    """No overhead by construction: hvp(auto) is XLA's program for jvp(grad f), op for op."""
    from hessfree._cli.bench import same_program
    from hessfree._cli.workloads import attention_block, mlp_classifier, quadratic

    small = {
        "mlp": lambda: mlp_classifier(sizes=(8, 16, 4), batch=8),
        "quadratic": lambda: quadratic(d=20),
        "attention": lambda: attention_block(batch=2, seq=4, d_model=8),
    }
    assert same_program(small[name]())


# --- 0.2: complex tangents and non-array leaves are refused ----------------------------------


def _quartic(p):
    return jnp.sum(p["w"] ** 4) / 12


def test_complex_tangents_are_refused():
    x = {"w": jnp.array([1.0, 2.0])}
    v = {"w": jnp.array([1.0 + 1.0j, 0.5j])}
    with pytest.raises(TypeError, match=r"v must have floating-point leaves.*\['w'\].*complex"):
        hf.hvp(_quartic, x, v)
    with pytest.raises(TypeError, match=r"v must have floating-point leaves.*complex"):
        jax.jit(lambda v: hf.hvp(_quartic, x, v))(v)
    with pytest.raises(TypeError, match=r"vs must have floating-point leaves.*\['w'\].*complex"):
        hf.hvps(_quartic, x, jax.tree_util.tree_map(lambda a: a[None], v))
    for cache in (True, False):
        with pytest.raises(TypeError, match=r"v must have floating-point leaves.*complex"):
            hf.hvp_fn(_quartic, x, cache=cache)(v)
    with pytest.raises(TypeError, match=r"x must have floating-point leaves.*complex"):
        hf.hvp(_quartic, v, v)
    # the real part alone is fine: diag(x²) v
    out = hf.hvp(_quartic, x, {"w": jnp.array([1.0, 0.0])})
    np.testing.assert_allclose(out["w"], [1.0, 0.0], rtol=1e-12)


def test_non_array_leaf_points_to_partition():
    x = {"w": jnp.ones(2), "act": jnp.tanh}

    def f(p):
        return jnp.sum(p["act"](p["w"]) ** 2)

    hint = r"leaf \['act'\].*not an array.*eqx\.partition.*nnx\.split"
    v = {"w": jnp.ones(2), "act": jnp.tanh}
    with pytest.raises(TypeError, match=r"x must be a pytree of arrays; " + hint):
        hf.hvp(f, x, v)
    with pytest.raises(TypeError, match=r"x must be a pytree of arrays; " + hint):
        hf.hvps(f, x, {"w": jnp.ones((3, 2)), "act": jnp.tanh})
    with pytest.raises(TypeError, match=r"x must be a pytree of arrays; " + hint):
        hf.hvp_fn(f, x)
    with pytest.raises(TypeError, match=r"x must be a pytree of arrays; " + hint):
        hf.hvp_fn(f, x, cache=False)(v)
    with pytest.raises(TypeError, match=hint):
        hf.hessian(f, x)
    with pytest.raises(TypeError, match=hint):
        hf.minimize(f, x)


# --- 0.2: forward mode through custom_vjp is decided from the program ------------------------


def test_forward_mode_decided_by_the_program_16049_pattern():
    """(1) The jax-16049 custom_vjp (its forward rule calls the primal): no forward product
    exists, auto falls back to reverse-over-reverse and still equals the dense reference."""
    from hessfree._products import forward_product, has_custom_vjp

    x = jnp.linspace(-1.0, 1.0, 5)
    v = jnp.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert has_custom_vjp(f_custom_vjp, x, ())
    assert forward_product(f_custom_vjp, x, ()) is None
    ref = dense_hessian(_plain(f_custom_vjp), x) @ np.asarray(v)
    eager = hf.hvp(f_custom_vjp, x, v)
    jitted = jax.jit(lambda x, v: hf.hvp(f_custom_vjp, x, v))(x, v)
    vs = jnp.stack([v, -v, 2 * v])
    mapped = jax.vmap(lambda u: hf.hvp(f_custom_vjp, x, u))(vs)
    for out in (eager, jitted):
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mapped, np.stack([ref, -ref, 2 * ref]), rtol=1e-10, atol=1e-12)

    # the same custom_vjp nested in a jit, a scan or a cond is found as well
    def scanned(z):
        return (
            jax.lax.scan(lambda c, zi: (c + _softplus_cv(zi) ** 2, None), 0.0, z)[0]
            + jnp.sum(z**3) / 3
        )

    for g in (jax.jit(f_custom_vjp), scanned):
        assert has_custom_vjp(g, x, ()) and forward_product(g, x, ()) is None
        np.testing.assert_allclose(hf.hvp(g, x, v), ref, rtol=1e-10, atol=1e-12)


def test_forward_mode_refused_on_the_16049_pattern_names_custom_vjp():
    x = jnp.linspace(-1.0, 1.0, 5)
    match = r"mode 'fwd_rev' needs forward-mode autodiff, which cannot go through a jax\.custom_vjp"
    with pytest.raises(TypeError, match=match):
        hf.hvp(f_custom_vjp, x, x, mode="fwd_rev")
    with pytest.raises(TypeError, match=match):
        jax.jit(lambda z: hf.hvp(f_custom_vjp, z, z, mode="fwd_rev"))(x)
    with pytest.raises(TypeError, match=match):
        hf.hvps(f_custom_vjp, x, x[None], mode="fwd_rev")
    with pytest.raises(TypeError, match=match):
        hf.hvp_fn(f_custom_vjp, x, mode="fwd_rev")
    with pytest.raises(TypeError, match=match):
        hf.hessian(f_custom_vjp, x, mode="fwd_rev")


def test_forward_mode_chosen_where_linearize_handles_the_custom_vjp():
    """(2) A custom_vjp that jax.linearize can take: a forward product is chosen, and
    fwd_rev works and equals the dense reference."""
    from hessfree._products import _linearized_grad, forward_product, has_custom_vjp

    x = jnp.linspace(-1.0, 1.0, 5)
    v = jnp.array([1.0, -2.0, 0.5, 0.0, 3.0])
    assert has_custom_vjp(f_custom_vjp_linear, x, ())
    product = forward_product(f_custom_vjp_linear, x, ())
    assert product is not None and product is _linearized_grad
    ref = dense_hessian(_plain(f_custom_vjp_linear), x) @ np.asarray(v)
    np.testing.assert_allclose(product(f_custom_vjp_linear, x, v, ()), ref, rtol=1e-10)
    for mode in ("fwd_rev", "auto"):
        out = jax.jit(lambda z, u, m=mode: hf.hvp(f_custom_vjp_linear, z, u, mode=m))(x, v)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(
            hf.hvp_fn(f_custom_vjp_linear, x, mode=mode)(v), ref, rtol=1e-10, atol=1e-12
        )


@pytest.mark.parametrize("case", list(CASES))
def test_forward_mode_without_custom_vjp_is_plain_jvp_of_grad(case):
    """(3) No custom_vjp in the program: jvp(grad f), nothing else is tried."""
    from hessfree._products import _jvp_of_grad, forward_product, has_custom_vjp, product_for

    f, make = CASES[case]
    x, args = make(jnp.float64)
    assert has_custom_vjp(f, x, args) is False
    assert forward_product(f, x, args) is _jvp_of_grad
    assert product_for("auto", f, x, args) is _jvp_of_grad
    assert product_for("fwd_rev", f, x, args) is _jvp_of_grad

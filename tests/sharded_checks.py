"""Checks on 8 simulated CPU devices; run in a subprocess by tests/test_sharding.py.

XLA's device count is fixed when JAX starts, so these checks cannot share the test process.
`python tests/sharded_checks.py` runs them all and prints one JSON object: check name ->
"ok" or the failure's traceback.
"""

from __future__ import annotations

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)

import json
import re
import sys
import time
import traceback
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

jax.config.update("jax_enable_x64", True)

import hessfree as hf  # noqa: E402
from hessfree._cli.workloads import mlp_classifier  # noqa: E402

CHECKS: dict[str, Callable[[], None]] = {}


def check(fn: Callable[[], None]) -> Callable[[], None]:
    CHECKS[fn.__name__] = fn
    return fn


def meshes():
    """An 8-device data mesh and a 4×2 data × model mesh, with explicit and automatic axes."""
    for shape, names in (((8, 1), ("data", "model")), ((4, 2), ("data", "model"))):
        for kind in (AxisType.Explicit, AxisType.Auto):
            yield (
                f"{shape[0]}x{shape[1]}-{kind.name}",
                jax.make_mesh(shape, names, axis_types=(kind, kind)),
            )


def problem(dtype=jnp.float64):
    return mlp_classifier(sizes=(12, 16, 8), batch=32, dtype=dtype)


def shard_problem(w, mesh):
    """Weights column-sharded over `model`, biases over `model`, the batch over `data`."""

    def place(leaf):
        spec = P(None, "model") if leaf.ndim == 2 else P("model")
        return jax.device_put(leaf, NamedSharding(mesh, spec))

    params = jax.tree_util.tree_map(place, w.x)
    inputs = jax.device_put(w.args[0], NamedSharding(mesh, P("data", None)))
    labels = jax.device_put(w.args[1], NamedSharding(mesh, P("data")))
    return params, inputs, labels


def to_numpy(tree):
    # On the host: ravel_pytree would reshape sharded arrays, which explicit axes refuse.
    return np.concatenate([np.asarray(leaf).ravel() for leaf in jax.tree_util.tree_leaves(tree)])


def assert_close(a, b, rtol=1e-10):
    np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=rtol, atol=rtol)


def assert_same_sharding(out, like, batched=False):
    for o, x in zip(jax.tree_util.tree_leaves(out), jax.tree_util.tree_leaves(like), strict=True):
        want = x.sharding
        if batched:
            want = NamedSharding(want.mesh, P(None, *want.spec))
        assert o.sharding.is_equivalent_to(want, o.ndim), (o.sharding, want)


def assert_no_host_or_single_device(compiled_text: str):
    """No host callback and no computation pinned to one device in the compiled program."""
    assert not re.search(r"callback", compiled_text, re.I), "host callback in the compiled program"
    assert "maximal" not in compiled_text, "a computation is pinned to a single device"


def ones_like_tree(tree):
    return jax.tree_util.tree_map(lambda a: jnp.ones_like(a) / 3.0, tree)


@check
def hvp_matches_unsharded_and_keeps_sharding():
    w = problem()
    v0 = ones_like_tree(w.x)
    reference = hf.hvp(w.f, w.x, v0, *w.args)
    for name, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            v = jax.tree_util.tree_map(lambda a, p: jax.device_put(a, p.sharding), v0, params)
            for mode in ("fwd_rev", "rev_rev", "rev_fwd", "auto"):
                out = hf.hvp(w.f, params, v, inputs, labels, mode=mode)
                assert_close(out, reference)
                assert_same_sharding(out, params)
            jitted = jax.jit(lambda p, u, i, l: hf.hvp(w.f, p, u, i, l))
            out = jitted(params, v, inputs, labels)
            assert_close(out, reference)
            if "Explicit" in name:  # explicit axes carry the sharding in the types
                assert_same_sharding(out, params)
            for cache in (True, False):
                out = hf.hvp_fn(w.f, params, inputs, labels, cache=cache)(v)
                assert_close(out, reference)
                assert_same_sharding(out, params)


@check
def hvp_fn_keeps_sharding_on_auto_axes():
    """hvp_fn's products land where the parameters live, as hvp's do."""
    w = problem()
    v0 = ones_like_tree(w.x)
    for name, mesh in meshes():
        if "Auto" not in name:
            continue
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            v = jax.tree_util.tree_map(lambda a, p: jax.device_put(a, p.sharding), v0, params)
            for cache in (True, False):
                assert_same_sharding(hf.hvp_fn(w.f, params, inputs, labels, cache=cache)(v), params)


@check
def operator_mv_keeps_sharding_on_auto_axes():
    """CurvatureOperator.mv lands where the parameters live on Auto axes."""
    w = problem()
    v0 = ones_like_tree(w.x)
    for name, mesh in meshes():
        if "Auto" not in name:
            continue
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            v = jax.tree_util.tree_map(lambda a, p: jax.device_put(a, p.sharding), v0, params)
            assert_same_sharding(hf.hessian(w.f, params, inputs, labels).mv(v), params)


@check
def hvps_chunked_matches_and_keeps_sharding():
    w = problem()
    vs0 = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a, -a]), ones_like_tree(w.x))
    reference = hf.hvps(w.f, w.x, vs0, *w.args)
    for _, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            for chunk in (None, 2):
                out = hf.hvps(w.f, params, vs0, inputs, labels, chunk_size=chunk)
                assert_close(out, reference)
                assert_same_sharding(out, params, batched=True)


@check
def hvp_program_has_no_host_transfer():
    w = problem()
    for _, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            v = jax.tree_util.tree_map(
                lambda a, p: jax.device_put(jnp.ones_like(a), p.sharding), w.x, params
            )
            text = (
                jax.jit(lambda p, u, i, l: hf.hvp(w.f, p, u, i, l))
                .lower(params, v, inputs, labels)
                .compile()
                .as_text()
            )
            assert_no_host_or_single_device(text)


@check
def operators_match_unsharded_and_keep_sharding():
    w = problem()
    v0 = ones_like_tree(w.x)
    key = jax.random.PRNGKey(0)

    def operators(params, inputs, labels):
        return {
            "hessian": hf.hessian(w.f, params, inputs, labels),
            "ggn": hf.ggn(w.model, "softmax_cross_entropy", params, inputs, labels),
            "ggn callable loss": hf.ggn(w.model, softmax_xent, params, inputs, labels),
            "fisher exact": hf.fisher(w.model, params, inputs, likelihood="categorical"),
            "fisher mc": hf.fisher(
                w.model, params, inputs, likelihood="categorical", kind="mc", key=key
            ),
            "fisher empirical": hf.fisher(
                w.model, params, inputs, likelihood="categorical", kind="empirical", targets=labels
            ),
        }

    reference = {name: op.mv(v0) for name, op in operators(w.x, *w.args).items()}
    for mesh_name, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            v = jax.tree_util.tree_map(lambda a, p: jax.device_put(a, p.sharding), v0, params)
            for name, op in operators(params, inputs, labels).items():
                out = op.mv(v)
                assert_close(out, reference[name], rtol=1e-9)
                if "Explicit" in mesh_name:
                    assert_same_sharding(out, params)
                damped = jax.jit(lambda o, u: (o + 0.5).mv(u))(op, v)
                assert_close(
                    damped,
                    jax.tree_util.tree_map(lambda a, b: a + 0.5 * b, reference[name], v0),
                    rtol=1e-9,
                )


@check
def eigsh_and_trace_match_unsharded():
    w = problem()
    key = jax.random.PRNGKey(1)
    op0 = hf.ggn(w.model, "softmax_cross_entropy", w.x, *w.args)
    eig0 = hf.eigsh(op0, k=2, key=key)
    assert bool(eig0.success), eig0.message
    tr0 = hf.trace(op0, key=key, num_probes=8)
    diag0 = hf.diagonal(op0, key=key, num_probes=4)
    for _, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            op = hf.ggn(w.model, "softmax_cross_entropy", params, inputs, labels)
            eig = hf.eigsh(op, k=2, key=key)
            assert bool(eig.success), eig.message
            np.testing.assert_allclose(
                np.asarray(eig.eigenvalues), np.asarray(eig0.eigenvalues), rtol=1e-7
            )
            tr = hf.trace(op, key=key, num_probes=8)
            np.testing.assert_allclose(float(tr.value), float(tr0.value), rtol=1e-9)
            np.testing.assert_allclose(float(tr.stderr), float(tr0.stderr), rtol=1e-7)
            assert int(tr.num_matvecs) == int(tr0.num_matvecs) == 8
            diag = hf.diagonal(op, key=key, num_probes=4)
            assert_close(diag.value, diag0.value, rtol=1e-9)
            assert int(diag.num_matvecs) == int(diag0.num_matvecs) == 4


@check
def cg_and_minimize_match_unsharded_without_host_transfer():
    w = problem()
    b0 = ones_like_tree(w.x)
    op0 = hf.ggn(w.model, "softmax_cross_entropy", w.x, *w.args) + 0.1
    x_ref = hf.cg(op0, b0, rtol=1e-10).x

    def objective(p, inputs, labels):  # L2-regularized: a unique, well-conditioned minimizer
        # elementwise, then summed: a dot over a sharded axis would need an out_sharding
        return w.f(p, inputs, labels) + 1e-2 * sum(
            jnp.sum(a * a) for a in jax.tree_util.tree_leaves(p)
        )

    ref = hf.minimize(objective, w.x, *w.args, method="trust-ncg", gtol=1e-7)
    ref_ncg = hf.minimize(objective, w.x, *w.args, method="newton-cg", gtol=1e-7)
    for mesh_name, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            b = jax.tree_util.tree_map(lambda a, p: jax.device_put(a, p.sharding), b0, params)
            op = hf.ggn(w.model, "softmax_cross_entropy", params, inputs, labels) + 0.1
            solve = jax.jit(lambda o, r: hf.cg(o, r, rtol=1e-10))
            out = solve(op, b)
            assert_close(out.x, x_ref, rtol=1e-8)
            if "Explicit" in mesh_name:
                assert_same_sharding(out.x, params)
            assert_no_host_or_single_device(solve.lower(op, b).compile().as_text())

            run = jax.jit(
                lambda p, i, l: hf.minimize(objective, p, i, l, method="trust-ncg", gtol=1e-7)
            )
            res = run(params, inputs, labels)
            # Sharded reductions add in another order: the same iterates up to rounding, so
            # the stopping test may trigger one iteration apart.
            assert int(res.status) == 0 and abs(int(res.nit) - int(ref.nit)) <= 1, (
                res.nit,
                ref.nit,
            )
            assert_close(res.x, ref.x, rtol=1e-6)
            if "Explicit" in mesh_name:
                assert_same_sharding(res.x, params)
            assert_no_host_or_single_device(run.lower(params, inputs, labels).compile().as_text())
            if mesh_name != "4x2-Explicit":  # one mesh suffices for the second method
                continue
            res = hf.minimize(objective, params, inputs, labels, method="newton-cg", gtol=1e-7)
            assert int(res.status) == 0
            assert_close(res.x, ref_ncg.x, rtol=1e-6)


@check
def lanczos_and_density_match_unsharded():
    w = problem()
    key = jax.random.PRNGKey(2)
    op0 = hf.ggn(w.model, "softmax_cross_entropy", w.x, *w.args)
    v0 = ones_like_tree(w.x)
    lz0 = hf.lanczos(op0, v0, 8)
    dens0 = hf.spectral_density(op0, key=key, num_probes=2, num_steps=8, num_points=50)
    for name, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            op = hf.ggn(w.model, "softmax_cross_entropy", params, inputs, labels)
            v = jax.tree_util.tree_map(lambda a, p: jax.device_put(a, p.sharding), v0, params)
            lz = hf.lanczos(op, v, 8)
            np.testing.assert_allclose(np.asarray(lz.alphas), np.asarray(lz0.alphas), rtol=1e-9)
            np.testing.assert_allclose(np.asarray(lz.betas), np.asarray(lz0.betas), rtol=1e-8)
            assert_close(lz.basis, lz0.basis, rtol=1e-8)
            if "Explicit" in name:  # the basis keeps the parameters' layout
                assert_same_sharding(lz.basis, params, batched=True)
            dens = hf.spectral_density(op, key=key, num_probes=2, num_steps=8, num_points=50)
            np.testing.assert_allclose(np.asarray(dens.grid), np.asarray(dens0.grid), rtol=1e-9)
            np.testing.assert_allclose(
                np.asarray(dens.density), np.asarray(dens0.density), rtol=1e-7
            )
            assert int(dens.num_matvecs) == int(dens0.num_matvecs)


@check
def eigsh_program_has_no_host_transfer():
    w = problem()
    key = jax.random.PRNGKey(1)
    for _, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)

            def top(p, i, l, k):
                op = hf.ggn(w.model, "softmax_cross_entropy", p, i, l)
                return hf.eigsh(op, k=2, key=k).eigenvalues

            text = jax.jit(top).lower(params, inputs, labels, key).compile().as_text()
            assert "while" in text  # the Lanczos loop is in the program
            assert_no_host_or_single_device(text)


@check
def hessian_free_update_matches_unsharded():
    from hessfree.optim import hessian_free

    w = problem()
    tx = hessian_free(w.model, "softmax_cross_entropy", preconditioner=True)

    @jax.jit
    def step(params, state, inputs, labels):
        grads = jax.grad(w.f)(params, inputs, labels)
        updates, state = tx.update(grads, state, params, inputs=inputs, targets=labels)
        return updates, state

    state = tx.init(w.x)
    ref_updates, ref_state = step(w.x, state, *w.args)
    assert not bool(ref_state.skipped)
    for mesh_name, mesh in meshes():
        with jax.set_mesh(mesh):
            params, inputs, labels = shard_problem(w, mesh)
            updates, new_state = step(params, tx.init(params), inputs, labels)
            assert_close(updates, ref_updates, rtol=1e-8)
            assert_close(new_state.direction, ref_state.direction, rtol=1e-8)
            for field in ("damping", "rho", "loss_after", "step_size"):
                np.testing.assert_allclose(
                    getattr(new_state, field), getattr(ref_state, field), rtol=1e-8
                )
            assert int(new_state.cg_iterations) == int(ref_state.cg_iterations)
            if "Explicit" in mesh_name:
                assert_same_sharding(updates, params)


def softmax_xent(logits, labels):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(
        jnp.sum(logp * jax.nn.one_hot(labels, logits.shape[-1], dtype=logp.dtype), axis=-1)
    )


def main(names: list[str]) -> int:
    assert len(jax.devices()) == 8, jax.devices()
    results = {}
    for name in names or list(CHECKS):
        start = time.perf_counter()
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        print(f"{name}: {time.perf_counter() - start:.1f}s", file=sys.stderr)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

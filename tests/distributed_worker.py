"""One process of a 2-process × 2-CPU-device jax.distributed run; see tests/test_distributed.py.

Usage: ``python tests/distributed_worker.py PROCESS_ID NUM_PROCESSES PORT``. Every process
joins the coordinator at 127.0.0.1:PORT (gloo collectives on CPU), builds one mesh over all
processes' devices, shards a batch over it from the rows it holds itself, and runs hvp,
ggn(...).mv, cg, eigsh, minimize and one step of the optax ``hessian_free`` optimizer. Each
result is gathered to the host and compared with the same quantity computed on ONE local
device from the whole unsharded batch (float64). It prints one JSON object, check name ->
"ok" or the failure's traceback, and exits 1 if any check failed.

Nothing runs on import (pytest's ``--doctest-modules`` imports this file): the environment
is set and JAX configured only when it runs as a script.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from collections.abc import Callable

LOCAL_DEVICES = 2
BATCH = 32  # split over all devices: 8 rows a device, 16 a process
SIZES = (12, 16, 8)  # a tanh MLP, softmax cross-entropy


def main(process_id: int, num_processes: int, port: int) -> int:
    # XLA reads its flags once, when the backend starts: set them before JAX is imported.
    flags = [
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    flags.append(f"--xla_force_host_platform_device_count={LOCAL_DEVICES}")
    os.environ["XLA_FLAGS"] = " ".join(flags)
    os.environ["JAX_PLATFORMS"] = "cpu"

    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import hessfree as hf
    from hessfree._cli.workloads import mlp_classifier
    from hessfree.optim import hessian_free

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the default in new JAX
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
        initialization_timeout=120,
    )
    assert jax.process_index() == process_id and jax.process_count() == num_processes
    assert jax.local_device_count() == LOCAL_DEVICES, jax.local_devices()
    assert jax.device_count() == num_processes * LOCAL_DEVICES, jax.devices()

    # The same problem in every process (deterministic from its key); the reference answers are
    # computed from the whole batch on one local device, the sharded ones from this process's
    # rows only.
    w = mlp_classifier(sizes=SIZES, batch=BATCH, dtype=jnp.float64)
    f, model, loss = w.f, w.model, "softmax_cross_entropy"
    inputs_all, labels_all = (np.asarray(a) for a in w.args)
    params0 = jax.tree_util.tree_map(np.asarray, w.x)
    v0 = jax.tree_util.tree_map(lambda a: np.ones_like(a) / 3.0, params0)
    key = jax.random.key(1)

    def objective(p, x, y):  # L2-regularized: a unique, well-conditioned minimizer
        return f(p, x, y) + 1e-2 * sum(jnp.sum(a * a) for a in jax.tree_util.tree_leaves(p))

    tx = hessian_free(model, loss, preconditioner=True)

    @jax.jit
    def hf_step(p, x, y):  # one optax step from a fresh state
        grads = jax.grad(f)(p, x, y)
        updates, state = tx.update(grads, tx.init(p), p, inputs=x, targets=y)
        return updates, state, optax.apply_updates(p, updates)

    def hvp(params, inputs, labels, v):
        return {
            "hvp": hf.hvp(f, params, v, inputs, labels),
            "hvp (jit)": jax.jit(hf.hvp, static_argnums=0)(f, params, v, inputs, labels),
        }

    def ggn_mv(params, inputs, labels, v):
        return {"ggn.mv": hf.ggn(model, loss, params, inputs, labels).mv(v)}

    def cg(params, inputs, labels, v):
        G = hf.ggn(model, loss, params, inputs, labels)
        return {"cg": jax.jit(lambda op, b: hf.cg(op, b, rtol=1e-10).x)(G + 0.1, v)}

    def eigsh(params, inputs, labels, v):
        res = hf.eigsh(hf.ggn(model, loss, params, inputs, labels), k=2, key=key)
        return {"eigsh": res.eigenvalues, "eigsh success": res.success}

    def minimize(params, inputs, labels, v):
        run = jax.jit(lambda p, x, y: hf.minimize(objective, p, x, y, gtol=1e-9))
        res = run(params, inputs, labels)
        return {"minimize": res.x, "minimize status": res.status, "minimize nit": res.nit}

    def optimizer_step(params, inputs, labels, v):
        updates, state, new_params = hf_step(params, inputs, labels)
        return {
            "hessian_free updates": updates,
            "hessian_free params": new_params,
            "hessian_free direction": state.direction,
            "hessian_free scalars": [state.damping, state.rho, state.loss_after, state.step_size],
            "hessian_free cg_iterations": state.cg_iterations,
        }

    def optimizer_step_outside_jit(params, inputs, labels, v):
        # tx.update called directly on the global arrays (it stages its own program)
        grads = jax.grad(f)(params, inputs, labels)
        updates, _ = tx.update(grads, tx.init(params), params, inputs=inputs, targets=labels)
        return {"hessian_free updates (outside jit)": updates}

    # Every process computes every quantity sharded (an SPMD program needs all of them); the
    # one-device references are split between the processes to halve the wall time, and each
    # process checks the quantities whose reference it holds.
    groups = [hvp, ggn_mv, cg, eigsh, minimize, optimizer_step, optimizer_step_outside_jit]
    owner = {hvp: 0, ggn_mv: 0, minimize: 0, cg: 1, eigsh: 1, optimizer_step: 1}
    mine_groups = [g for g in owner if owner[g] % num_processes == process_id]
    same_reference = {"hessian_free updates (outside jit)": "hessian_free updates"}

    t0 = time.perf_counter()
    reference = {}
    with jax.default_device(jax.local_devices()[0]):  # one device, the whole batch, no mesh
        for group in mine_groups:
            out = group(params0, inputs_all, labels_all, v0)
            reference.update(jax.tree_util.tree_map(np.asarray, out))
    print(f"process {process_id}: reference {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    t0 = time.perf_counter()
    mesh = jax.make_mesh((jax.device_count(),), ("data",))  # all processes' devices
    with jax.set_mesh(mesh):
        replicated = NamedSharding(mesh, P())
        rows = NamedSharding(mesh, P("data"))
        # This process supplies the rows its own devices hold: one contiguous block.
        n_local = BATCH // num_processes
        mine = slice(process_id * n_local, (process_id + 1) * n_local)
        held = [idx[0] for idx in rows.addressable_devices_indices_map((BATCH,)).values()]
        assert min(s.start for s in held) == mine.start, held
        assert max(s.stop for s in held) == mine.stop, held
        assert sum(s.stop - s.start for s in held) == n_local, held
        inputs = jax.make_array_from_process_local_data(
            NamedSharding(mesh, P("data", None)), inputs_all[mine], inputs_all.shape
        )
        labels = jax.make_array_from_process_local_data(rows, labels_all[mine], labels_all.shape)
        assert not inputs.is_fully_addressable  # a global array: half of it is in the other process
        params = jax.device_put(params0, replicated)
        v = jax.device_put(v0, replicated)
        sharded = {}
        for group in groups:
            sharded.update(group(params, inputs, labels, v))
        # Every result comes back laid out like the parameters: replicated over the 4 devices.
        layouts = {
            name: str(leaf.sharding)
            for name, value in sharded.items()
            for leaf in jax.tree_util.tree_leaves(value)
            if not leaf.sharding.is_equivalent_to(replicated, leaf.ndim)
        }
        # To the host: process_allgather works for any layout; np.asarray for replicated ones.
        gathered = jax.tree_util.tree_map(
            lambda a: np.asarray(multihost_utils.process_allgather(a, tiled=True)), sharded
        )
        read = jax.tree_util.tree_map(np.asarray, sharded)
        # Out-of-range labels in a global array are refused outside jit, as on one device.
        try:
            tx.update(params, tx.init(params), params, inputs=inputs, targets=labels + 100)
            refused = "tx.update accepted labels out of range"
        except ValueError as err:
            refused = "" if "out of range" in str(err) else repr(err)
    print(f"process {process_id}: sharded {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    tolerances = {  # float64; the sharded reductions add in another order
        "hvp": 1e-10,
        "hvp (jit)": 1e-10,
        "ggn.mv": 1e-10,
        "cg": 1e-8,
        "eigsh": 1e-7,
        "minimize": 1e-6,
        "hessian_free updates": 1e-8,
        "hessian_free updates (outside jit)": 1e-8,
        "hessian_free params": 1e-8,
        "hessian_free direction": 1e-8,
        "hessian_free scalars": 1e-8,
    }
    results: dict[str, str] = {}

    def check(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()

    def compare(name: str, rtol: float) -> None:
        got = jax.tree_util.tree_leaves(gathered[name])
        want = jax.tree_util.tree_leaves(reference[same_reference.get(name, name)])
        err = max(float(np.max(np.abs(g - r), initial=0.0)) for g, r in zip(got, want, strict=True))
        print(f"process {process_id}: {name}: max abs difference {err:.1e}", file=sys.stderr)
        for g, r in zip(got, want, strict=True):
            np.testing.assert_allclose(
                g, r, rtol=rtol, atol=rtol, err_msg=f"{name}: 2 processes x 2 devices vs 1 device"
            )

    for name, rtol in tolerances.items():
        if same_reference.get(name, name) in reference:
            check(name, lambda name=name, rtol=rtol: compare(name, rtol))

    def layout() -> None:
        assert not layouts, f"not laid out like the (replicated) parameters: {layouts}"
        for name in sharded:  # np.asarray reads a replicated global array in any process
            for a, b in zip(
                jax.tree_util.tree_leaves(read[name]),
                jax.tree_util.tree_leaves(gathered[name]),
                strict=True,
            ):
                np.testing.assert_array_equal(a, b, err_msg=name)

    def bad_targets() -> None:
        assert not refused, refused

    def eigsh_success() -> None:
        assert bool(gathered["eigsh success"]) and bool(reference["eigsh success"])

    def minimize_status() -> None:
        assert int(gathered["minimize status"]) == int(reference["minimize status"]) == 0
        # the same iterates up to rounding: the stopping test may trigger one iteration apart
        nit, nit0 = int(gathered["minimize nit"]), int(reference["minimize nit"])
        assert abs(nit - nit0) <= 1, f"minimize: {nit} iterations, {nit0} on one device"

    def hessian_free_cg_iterations() -> None:
        it, it0 = (
            int(gathered["hessian_free cg_iterations"]),
            int(reference["hessian_free cg_iterations"]),
        )
        assert it == it0, f"hessian_free: {it} CG iterations, {it0} on one device"

    check(f"layout (process {process_id})", layout)
    check(f"bad targets refused (process {process_id})", bad_targets)
    if "eigsh success" in reference:
        check("eigsh success", eigsh_success)
    if "minimize status" in reference:
        check("minimize status and nit", minimize_status)
    if "hessian_free cg_iterations" in reference:
        check("hessian_free cg_iterations", hessian_free_cg_iterations)

    print(json.dumps(results))
    jax.distributed.shutdown()
    return 0 if all(r == "ok" for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])))

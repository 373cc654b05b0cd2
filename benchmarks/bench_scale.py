"""Time per HVP and per CG solve against the number of devices (data-parallel batch sharding).

Each device count runs in its own subprocess (XLA fixes the device count at start-up). On a
CPU machine the devices are simulated with ``--xla_force_host_platform_device_count`` and all
share the machine's cores, so this measures the overhead of partitioning (collectives,
per-shard dispatch), not a speed-up. On a machine with several accelerators, pass
``--real`` to use the devices that are there.

    python benchmarks/bench_scale.py [--quick] [--repeats 7] [--real]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def worker(num_devices: int, quick: bool, repeats: int) -> dict[str, float]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    import hessfree as hf
    from hessfree._cli.bench import interleaved_times
    from hessfree._cli.workloads import mlp_classifier

    w = mlp_classifier(
        sizes=(64, 256, 256, 10) if quick else (784, 512, 512, 10), batch=512 if quick else 2048
    )
    mesh = jax.make_mesh((num_devices,), ("data",), devices=jax.devices()[:num_devices])
    with jax.set_mesh(mesh):
        replicated = NamedSharding(mesh, P())
        params = jax.device_put(w.x, replicated)
        inputs = jax.device_put(w.args[0], NamedSharding(mesh, P("data", None)))
        labels = jax.device_put(w.args[1], NamedSharding(mesh, P("data")))
        v = jax.tree_util.tree_map(lambda a: jax.device_put(jnp.ones_like(a), replicated), w.x)
        hvp = jax.jit(lambda p, u, i, l: hf.hvp(w.f, p, u, i, l))

        def solve(p, b, i, l):
            op = hf.ggn(w.model, "softmax_cross_entropy", p, i, l) + 1e-3
            return hf.cg(op, b, rtol=0.0, maxiter=20).x  # exactly 20 products

        solve = jax.jit(solve)
        return interleaved_times(
            {
                "hvp": (hvp, (params, v, inputs, labels)),
                "cg (20 GGN products)": (solve, (params, v, inputs, labels)),
            },
            repeats=repeats,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--real", action="store_true", help="use the real devices, not simulated CPUs"
    )
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.quick, args.repeats)))
        return
    counts = [1, 2, 4, 8]
    rows = {}
    for n in counts:
        env = dict(os.environ)
        if not args.real:
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={n}"
            env["JAX_PLATFORMS"] = "cpu"
        cmd = [sys.executable, __file__, "--worker", str(n), "--repeats", str(args.repeats)] + (
            ["--quick"] if args.quick else []
        )
        print(f"{n} device(s) …", flush=True)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        rows[n] = json.loads(out.stdout.strip().splitlines()[-1])
    names = list(rows[1])
    kind = (
        "real devices"
        if args.real
        else f"simulated CPU devices sharing {os.cpu_count()} cores (overhead, not speed-up)"
    )
    print(f"\ndata-parallel batch sharding, {kind}; time ÷ 1 device")
    print(f"{'devices':>8}" + "".join(f"{name:>26}" for name in names))
    for n in counts:
        print(
            f"{n:>8}"
            + "".join(
                f"{rows[n][name] * 1e3:16.1f} ms {rows[n][name] / rows[1][name]:5.2f}x"
                for name in names
            )
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps({"kind": kind, "seconds": rows}, indent=2))


if __name__ == "__main__":
    main()

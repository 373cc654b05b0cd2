"""HVP modes side by side: gradient, raw idioms, hessfree.hvp(auto), cached products, torch.func.

Workloads: (a) an MLP classifier with ~1.07M parameters, (b) the seed's quadratic at d = 3000,
(c) a self-attention block. Every figure is the median of repeats after a warm-up, inputs
blocked until ready, in this one process. Quote the ratios: the machine is shared.

    python benchmarks/bench_products.py [--repeats 15] [--quick]

Targets (issue 2): hvp(auto) <= 1.05x the fastest raw idiom on every workload; cached products
<= 0.75x raw jvp-of-grad where there is a forward pass to cache (MLP, attention), and no slower
than jvp-of-grad on the quadratic.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from hessfree._cli.bench import format_table, product_table, same_program
from hessfree._cli.workloads import attention_block, mlp_classifier, quadratic

RESULTS = Path(__file__).parent / "results"


def torch_mlp_product(workload):
    """torch.func.jvp(grad(loss)) on the same MLP and data (float32), or None without torch.

    On the device JAX runs on: CUDA when JAX's backend is a GPU and torch sees one, else CPU.
    """
    try:
        import torch
        from torch.func import grad, jvp
    except ImportError:
        return None
    on_gpu = jax.default_backend() == "gpu" and torch.cuda.is_available()
    device = torch.device("cuda" if on_gpu else "cpu")

    def put(x):
        return torch.from_numpy(np.array(x)).to(device)

    params = [{k: put(v) for k, v in layer.items()} for layer in workload.x]
    inputs = put(workload.args[0])
    labels = put(workload.args[1]).long()

    def loss(ps):
        h = inputs
        for layer in ps[:-1]:
            h = torch.tanh(h @ layer["w"] + layer["b"])
        logits = h @ ps[-1]["w"] + ps[-1]["b"]
        return torch.nn.functional.cross_entropy(logits, labels)

    tangent = [
        {k: torch.ones_like(v) / v.numel() ** 0.5 for k, v in layer.items()} for layer in params
    ]

    def product():
        jvp(grad(loss), (params,), (tangent,))
        if on_gpu:
            torch.cuda.synchronize()  # on CPU torch is synchronous
        return None

    return product


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="smaller workloads, fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    workloads = (
        [
            mlp_classifier(sizes=(64, 128, 10), batch=64),
            quadratic(d=300),
            attention_block(batch=4, seq=16, d_model=32),
        ]
        if args.quick
        else [mlp_classifier(), quadratic(d=3000), attention_block()]
    )
    print(
        f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cores; median of {repeats}"
    )
    report = {}
    for workload in workloads:
        print(f"\n[{workload.name}] {workload.description} …", flush=True)
        peer = torch_mlp_product(workload) if workload.name == "mlp" else None
        extra = {"torch.func jvp(grad) (same MLP)": peer} if peer is not None else None
        times = product_table(
            workload,
            repeats=repeats,
            progress=lambda s: print(f"   · {s}", flush=True),
            extra=extra,
        )
        raw = {k: v for k, v in times.items() if k.startswith("raw ")}
        fastest = min(raw, key=raw.__getitem__)
        ratios = {
            "hvp(auto) / fastest raw": times["hessfree hvp(auto)"] / raw[fastest],
            "cached per product / raw fwd_rev": times["hessfree hvp_fn cached, per product"]
            / times["raw fwd_rev"],
            "raw fwd_rev / grad": times["raw fwd_rev"] / times["grad"],
        }
        identical = same_program(workload)
        print(format_table(f"{workload.description}", times))
        print(f"   hvp(auto) compiles to the same XLA program as raw jvp(grad): {identical}")
        for name, r in ratios.items():
            print(f"   {name:36}{r:8.2f}")
        report[workload.name] = {
            "description": workload.description,
            "seconds": times,
            "ratios": ratios,
            "auto_program_identical_to_raw_fwd_rev": identical,
            "fastest_raw": fastest,
        }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "products.json"
    out.write_text(
        json.dumps({"jax": jax.__version__, "repeats": repeats, "workloads": report}, indent=2)
    )
    print(f"\nwrote {out}")


if __name__ == "__main__":
    jnp.zeros(())  # initialise the backend before timing anything
    main()

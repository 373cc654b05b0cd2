"""Influence scores side by side: cg vs arnoldi vs lissa, wall time and agreement with exact.

    .venv/bin/python benchmarks/bench_influence.py [--quick] [--repeats N] [--hidden H] [--alpha A]

A 64-H-10 tanh MLP (H = 32: 2,410 parameters) on sklearn's digits, trained to a small gradient
by hessfree.minimize on ``mean softmax cross-entropy + (α/2)‖θ‖²`` (α = 1e-3 by default),
float64, then cast to float32 for the timings. A = the GGN of the mean cross-entropy (hessfree.ggn) with
damping α, i.e. the GGN of the regularized objective. 1000 training points, 100 test points.

For each method: the wall time of one ``influence`` call for 100 test points (median of
repeats after a warm-up, blocked; float32), its products with A, and the agreement of its
scores with exact scores (float64 CG at rtol 1e-10): Spearman and Pearson correlation over
the training points, averaged over the test points, and the relative error
``‖S − S_exact‖_F / ‖S_exact‖_F``. Arnoldi is timed twice: with its eigsh inside the call,
and with the eigenpairs computed once and passed in (``A = hf.eigsh(...)``), which is how it
amortizes over many test batches. Prints a table of ratios to cg and writes
benchmarks/results/influence.json (influence_alpha<α>.json for another α).

Arnoldi keeps only the top-rank eigendirections (Schioppa et al.'s choice): the smaller α is
next to the bulk of the GGN's spectrum, the more of ``(A + αI)⁻¹`` lives in the dropped
directions, so its agreement at a given rank depends on α (compare --alpha 1e-3 and 1e-1).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import hessfree as hf  # noqa: E402
from _timing import median_time  # noqa: E402
from hessfree import influence  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def mlp(params: dict[str, Any], x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ params["w1"] + params["b1"]) @ params["w2"] + params["b2"]


def example_loss(params: dict[str, Any], example: tuple[jax.Array, jax.Array]) -> jax.Array:
    x, y = example
    return -jax.nn.log_softmax(mlp(params, x))[y]


def objective(params: dict[str, Any], x: jax.Array, y: jax.Array, alpha: jax.Array) -> jax.Array:
    losses = jax.vmap(example_loss, (None, 0))(params, (x, y))
    penalty = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(params))
    return jnp.mean(losses) + 0.5 * alpha * penalty


def problem(hidden: int, num_train: int, num_test: int, alpha: float) -> dict[str, Any]:
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    x, y = x[order] / 16.0, y[order]
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    p0 = {
        "w1": jax.random.normal(k1, (64, hidden), jnp.float64) / 8.0,
        "b1": jnp.zeros(hidden, jnp.float64),
        "w2": jax.random.normal(k2, (hidden, 10), jnp.float64) / np.sqrt(hidden),
        "b2": jnp.zeros(10, jnp.float64),
    }
    x_tr, y_tr = jnp.asarray(x[:num_train]), jnp.asarray(y[:num_train])
    x_te, y_te = (
        jnp.asarray(x[num_train : num_train + num_test]),
        jnp.asarray(y[num_train:][:num_test]),
    )
    res = hf.minimize(objective, p0, x_tr, y_tr, jnp.asarray(alpha), gtol=1e-7, maxiter=500)
    return {
        "params": res.x,
        "train": (x_tr, y_tr),
        "test": (x_te, y_te),
        "train_status": int(res.status),
        "grad_norm": float(np.linalg.norm(np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(res.jac)]))),
    }  # fmt: skip


def f32(tree: Any) -> Any:
    return jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree
    )


def agreement(scores: Any, exact: np.ndarray) -> dict[str, float]:
    s = np.asarray(scores, np.float64)
    rows = range(exact.shape[0])
    return {
        "spearman": float(np.mean([spearmanr(s[i], exact[i])[0] for i in rows])),
        "pearson": float(np.mean([pearsonr(s[i], exact[i])[0] for i in rows])),
        "rel_error": float(np.linalg.norm(s - exact) / np.linalg.norm(exact)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer variants and repeats")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=1e-3, help="L2 weight = the damping")
    args = parser.parse_args()
    alpha = args.alpha
    repeats = args.repeats or (2 if args.quick else 5)
    num_train, num_test = 1000, 100

    prob = problem(args.hidden, num_train, num_test, alpha)
    p64 = prob["params"]
    num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(p64))
    print(
        f"MLP 64-{args.hidden}-10 ({num_params:,} parameters) on digits, α = {alpha:g}, N = "
        f"{num_train} train, {num_test} test; trained to ‖∇R‖ = {prob['grad_norm']:.1e} (status "
        f"{prob['train_status']}); JAX {jax.__version__} on {jax.devices()[0].platform}"
    )
    G64 = hf.ggn(mlp, "softmax_cross_entropy", p64, prob["train"][0], prob["train"][1])
    exact_res = influence(
        G64, example_loss, p64, prob["train"], prob["test"], damping=alpha, rtol=1e-10
    )
    exact = np.asarray(exact_res.scores)
    print(f"exact reference (float64 CG, rtol 1e-10): success {bool(exact_res.success.all())}")

    params, train, test = f32(p64), f32(prob["train"]), f32(prob["test"])
    G = hf.ggn(mlp, "softmax_cross_entropy", params, train[0], train[1])
    key = jax.random.PRNGKey(0)
    common = (example_loss, params, train, test)

    variants: list[tuple[str, Any]] = [
        ("cg rtol 1e-4", lambda: influence(G, *common, damping=alpha, rtol=1e-4)),
        ("cg rtol 1e-2", lambda: influence(G, *common, damping=alpha, rtol=1e-2)),
    ]
    ranks = (10, 50) if args.quick else (10, 30, 100)
    for rank in ranks:
        variants.append(
            (
                f"arnoldi rank {rank}",
                lambda rank=rank: influence(
                    G, *common, method="arnoldi", rank=rank, key=key, damping=alpha
                ),
            )
        )
    eig = jax.block_until_ready(hf.eigsh(G, max(ranks), key=key, which="LM"))
    for rank in ranks:
        variants.append(
            (
                f"arnoldi rank {rank}, eigsh reused",
                lambda rank=rank: influence(
                    eig, *common, method="arnoldi", rank=rank, damping=alpha
                ),
            )
        )
    depths = (100,) if args.quick else (100, 1000)
    for depth in depths:
        variants.append(
            (
                f"lissa depth {depth}",
                lambda depth=depth: influence(
                    G, *common, method="lissa", key=key, damping=alpha, lissa_depth=depth, rtol=1e-4
                ),
            )
        )

    rows = []
    for name, fn in variants:
        seconds, res = median_time(fn, repeats)
        rows.append(
            {
                "method": name,
                "seconds_per_100_test": seconds * 100 / num_test,
                "matvecs": int(res.num_matvecs),
                "success_fraction": float(np.mean(np.asarray(res.success))),
                **agreement(res.scores, exact),
            }
        )
    base = rows[0]["seconds_per_100_test"]
    print(f"\nper call for {num_test} test points x {num_train} training points, float32 "
          f"(median of {repeats}, warm); agreement with exact float64 scores")  # fmt: skip
    header = (
        f"{'method':<32} {'s/100 test':>10} {'vs cg':>6} {'A products':>10} {'success':>8} "
        f"{'Spearman':>9} {'Pearson':>8} {'rel err':>8}"
    )
    print(header)
    for r in rows:
        r["time_ratio_vs_cg"] = r["seconds_per_100_test"] / base
        print(
            f"{r['method']:<32} {r['seconds_per_100_test']:>10.3f} {r['time_ratio_vs_cg']:>6.2f} "
            f"{r['matvecs']:>10} {r['success_fraction']:>8.2f} {r['spearman']:>9.3f} "
            f"{r['pearson']:>8.3f} {r['rel_error']:>8.1e}"
        )
    os.makedirs(RESULTS, exist_ok=True)
    name = "influence.json" if alpha == 1e-3 else f"influence_alpha{alpha:g}.json"
    with open(os.path.join(RESULTS, name), "w") as fh:
        json.dump(
            {
                "model": f"MLP 64-{args.hidden}-10, {num_params} parameters, digits",
                "alpha": alpha,
                "num_train": num_train,
                "num_test": num_test,
                "quick": args.quick,
                "repeats": repeats,
                "platform": jax.devices()[0].platform,
                "rows": rows,
            },
            fh,
            indent=2,
        )


if __name__ == "__main__":
    main()

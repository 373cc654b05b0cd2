"""MAP vs Laplace (each structure) on sklearn's digits: test NLL, ECE, accuracy and time.

One MLP (64 → hidden → 10, tanh) is trained once with optax.adam as a MAP (weight decay = the
prior). Then, for each Laplace structure, the posterior is fitted and its prior precision
tuned by the marginal likelihood, and the GLM predictive (probit) is evaluated on the clean
test set and on the test inputs plus Gaussian pixel noise (dataset shift). Times are medians
over repeats of the warm (compiled) call, outputs blocked until ready: "fit" is ``laplace``
plus ``optimize_prior_precision``, "predict" is ``predict`` on the test set.

laplace-torch (``laplace``) and laplax are run side by side only if importable (this script
never installs them); otherwise the table says so.

    python benchmarks/bench_laplace.py [--quick] [--repeats N] [--hidden 32]

Writes benchmarks/results/laplace.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
import laplace_digits as digits

from hessfree import Laplace, laplace

RESULTS = os.path.join(os.path.dirname(__file__), "results")


from _timing import median_time  # noqa: E402


def timed(fn: Callable[[], Any], repeats: int) -> tuple[Any, float]:
    """``(result, median seconds)`` of `repeats` warm calls (one call first to compile)."""
    seconds, out = median_time(fn, repeats)
    return out, seconds


def metrics(probs: jax.Array, y: jax.Array) -> dict[str, float]:
    return {
        "nll": digits.nll(probs, y),
        "ece": digits.ece(probs, y),
        "accuracy": float(jnp.mean(probs.argmax(1) == y)),
    }


def others_available() -> dict[str, bool]:
    return {name: importlib.util.find_spec(name) is not None for name in ("laplace", "laplax")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller network, fewer steps")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--rank", type=int, default=50)
    parser.add_argument("--shift", type=float, default=0.6)
    args = parser.parse_args()
    hidden, steps = (16, 400) if args.quick else (args.hidden, args.steps)

    x_tr, y_tr, x_te, y_te = digits.load(0)
    x_shift = x_te + args.shift * jax.random.normal(jax.random.PRNGKey(2), x_te.shape)
    params = digits.init(jax.random.PRNGKey(0), x_tr.shape[1], hidden, 10)
    params = jax.block_until_ready(digits.train(params, x_tr, y_tr, steps, 1.0, 1e-2))
    body = params["body"]
    feats_tr, feats_te = digits.features(body, x_tr), digits.features(body, x_shift)
    feats_clean = digits.features(body, x_te)

    rows: list[dict[str, Any]] = []
    map_clean = jax.nn.softmax(digits.mlp(params, x_te))
    map_shift = jax.nn.softmax(digits.mlp(params, x_shift))
    rows.append(
        {
            "method": "MAP",
            "num_params": sum(a.size for a in jax.tree_util.tree_leaves(params)),
            "clean": metrics(map_clean, y_te),
            "shift": metrics(map_shift, y_te),
        }
    )

    key = jax.random.PRNGKey(1)
    configs: dict[str, tuple[Callable[[], Laplace], jax.Array, jax.Array]] = {
        "last-layer full": (
            lambda: laplace(
                digits.head, params["head"], feats_tr, y_tr, likelihood="categorical",
                structure="full",
            ).optimize_prior_precision(),
            feats_clean,
            feats_te,
        ),
        "diagonal": (
            lambda: laplace(
                digits.mlp, params, x_tr, y_tr, likelihood="categorical", structure="diagonal",
                chunk_size=256,
            ).optimize_prior_precision(),
            x_te,
            x_shift,
        ),
        f"lowrank (k={args.rank})": (
            lambda: laplace(
                digits.mlp, params, x_tr, y_tr, likelihood="categorical", structure="lowrank",
                rank=args.rank, key=key,
            ).optimize_prior_precision(),
            x_te,
            x_shift,
        ),
        "full (all weights)": (
            lambda: laplace(
                digits.mlp, params, x_tr, y_tr, likelihood="categorical", structure="full",
                chunk_size=128,
            ).optimize_prior_precision(),
            x_te,
            x_shift,
        ),
    }  # fmt: skip
    for name, (fit, clean_inputs, shift_inputs) in configs.items():
        la, fit_time = timed(fit, args.repeats)
        pred, predict_time = timed(
            lambda la=la, x=clean_inputs: la.predict(x, chunk_size=128).probs, args.repeats
        )
        shifted = la.predict(shift_inputs, chunk_size=128).probs
        rows.append(
            {
                "method": f"Laplace {name}",
                "num_params": la.num_params,
                "prior_precision": float(la.prior_precision),
                "log_marginal_likelihood": float(la.log_marginal_likelihood()),
                "fit_s": fit_time,
                "predict_s": predict_time,
                "clean": metrics(pred, y_te),
                "shift": metrics(shifted, y_te),
            }
        )

    others = others_available()
    print(
        f"digits, MLP 64-{hidden}-10 (tanh), {steps} adam steps, N = {x_tr.shape[0]}, "
        f"test {x_te.shape[0]}; shift = Gaussian pixel noise σ = {args.shift}; "
        f"{jax.default_backend()}, median of {args.repeats} warm calls"
    )
    head = f"{'method':28s} {'P':>6s} {'δ*':>7s} {'fit s':>7s} {'pred s':>7s}"
    head += f" {'NLL':>7s} {'ECE':>7s} {'acc':>6s} | {'NLL':>7s} {'ECE':>7s} {'acc':>6s}"
    print(f"{'':70s}{'clean':^23s} | {'shifted':^23s}")
    print(head)
    for r in rows:
        delta = f"{r['prior_precision']:7.3g}" if "prior_precision" in r else f"{'':7s}"
        times = f"{r['fit_s']:7.2f} {r['predict_s']:7.3f}" if "fit_s" in r else f"{'':15s}"
        c, s = r["clean"], r["shift"]
        print(
            f"{r['method']:28s} {r['num_params']:6d} {delta} {times} "
            f"{c['nll']:7.4f} {c['ece']:7.4f} {c['accuracy']:6.3f} | "
            f"{s['nll']:7.4f} {s['ece']:7.4f} {s['accuracy']:6.3f}"
        )
    for name, present in others.items():
        label = {"laplace": "laplace-torch (import laplace)", "laplax": "laplax"}[name]
        if not present:
            print(f"{label}: not installed here, not run (this script does not install it)")
        else:  # pragma: no cover - not installed in this environment
            print(f"{label}: installed, but no side-by-side runner is written yet")

    out = {
        "benchmark": "laplace",
        "quick": args.quick,
        "repeats": args.repeats,
        "hidden": hidden,
        "train_steps": steps,
        "shift": args.shift,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "machine": platform.platform(),
        "others_available": others,
        "rows": rows,
    }
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "laplace.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

"""Laplace on a small MLP for sklearn's digits: calibration of MAP vs the GLM predictive.

Trains a one-hidden-layer MLP with optax.adam (weight decay = the Gaussian prior, so the
trained weights are a MAP), then fits a Laplace posterior, tunes its prior precision by the
marginal likelihood and compares test negative log-likelihood (NLL) and expected calibration
error (ECE, 15 equal-width bins) of the MAP softmax with the Laplace GLM predictive (probit),
on the clean test set and on the test set under input shift (Gaussian pixel noise).

What to expect (measured, see the module's main): on clean digits the MAP of this small MLP
is already well calibrated (ECE ≈ 0.02) and the evidence-tuned Laplace predictive is somewhat
underconfident (higher NLL); under shift the MAP is badly overconfident and Laplace lowers
NLL and ECE substantially, which is the regime Laplace is for.

    python examples/laplace_digits.py [--structure last_layer|diagonal|lowrank] [--shift 0.6]

``last_layer``: a full posterior over the output layer only (features computed once and
passed as the inputs); ``diagonal``: the exact GGN diagonal over all weights; ``lowrank``:
the top-k GGN eigenpairs over all weights plus the prior. Needs scikit-learn and optax.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from hessfree import laplace

NUM_BINS = 15


def load(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Digits (8×8 images, 10 classes) scaled to [0, 1], 70/30 stratified split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x / 16.0, y, test_size=0.3, random_state=seed, stratify=y
    )
    f32 = jnp.float32
    return (jnp.asarray(x_tr, f32), jnp.asarray(y_tr), jnp.asarray(x_te, f32), jnp.asarray(y_te))


def init(key: jax.Array, d_in: int, hidden: int, classes: int) -> dict[str, Any]:
    k1, k2 = jax.random.split(key)
    return {
        "body": {
            "w": jax.random.normal(k1, (d_in, hidden)) / np.sqrt(d_in),
            "b": jnp.zeros(hidden),
        },
        "head": {
            "w": jax.random.normal(k2, (hidden, classes)) / np.sqrt(hidden),
            "b": jnp.zeros(classes),
        },
    }


def features(body: dict[str, Any], x: jax.Array) -> jax.Array:
    return jnp.tanh(x @ body["w"] + body["b"])


def head(p: dict[str, Any], h: jax.Array) -> jax.Array:
    return h @ p["w"] + p["b"]


def mlp(p: dict[str, Any], x: jax.Array) -> jax.Array:
    return head(p["head"], features(p["body"], x))


def train(
    params: dict[str, Any], x: jax.Array, y: jax.Array, steps: int, prior: float, lr: float
) -> dict[str, Any]:
    """Full-batch adam on the negative log joint / N: mean NLL + (δ/2N)‖θ‖²."""
    opt = optax.adam(lr)
    n = x.shape[0]

    def objective(p: dict[str, Any]) -> jax.Array:
        nll = optax.softmax_cross_entropy_with_integer_labels(mlp(p, x), y).mean()
        sq = sum(jnp.sum(a * a) for a in jax.tree_util.tree_leaves(p))
        return nll + 0.5 * prior * sq / n

    @jax.jit
    def run(p: dict[str, Any]) -> dict[str, Any]:
        def step(_: int, carry: tuple[Any, Any]) -> tuple[Any, Any]:
            p, s = carry
            g = jax.grad(objective)(p)
            u, s = opt.update(g, s, p)
            return optax.apply_updates(p, u), s

        return jax.lax.fori_loop(0, steps, step, (p, opt.init(p)))[0]

    return run(params)


def nll(probs: jax.Array, y: jax.Array) -> float:
    p = jnp.take_along_axis(probs, y[:, None], axis=1)[:, 0]
    return float(-jnp.mean(jnp.log(jnp.clip(p, 1e-12, 1.0))))


def ece(probs: jax.Array, y: jax.Array, num_bins: int = NUM_BINS) -> float:
    """``Σ_bins (|bin|/n)·|accuracy − confidence|`` over equal-width confidence bins."""
    probs, y = np.asarray(probs), np.asarray(y)
    conf, pred = probs.max(1), probs.argmax(1)
    correct = (pred == y).astype(float)
    edges = np.linspace(0.0, 1.0, num_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, num_bins - 1)
    total = 0.0
    for b in range(num_bins):
        mask = which == b
        if mask.any():
            total += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total)


def main(
    structure: str = "last_layer",
    hidden: int = 64,
    train_steps: int = 2000,
    prior: float = 1.0,
    lr: float = 1e-2,
    rank: int = 50,
    shift: float = 0.6,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train, fit Laplace, tune δ; MAP vs Laplace test NLL / ECE / accuracy and times.

    Keys ``map_*``/``laplace_*`` are on the clean test set, ``shift_map_*``/``shift_laplace_*``
    on the test inputs plus Gaussian noise of standard deviation `shift`.
    """
    x_tr, y_tr, x_te, y_te = load(seed)
    x_shift = x_te + shift * jax.random.normal(jax.random.PRNGKey(seed + 2), x_te.shape)
    params = init(jax.random.PRNGKey(seed), x_tr.shape[1], hidden, 10)
    start = time.perf_counter()
    params = jax.block_until_ready(train(params, x_tr, y_tr, train_steps, prior, lr))
    train_time = time.perf_counter() - start
    map_probs = jax.nn.softmax(mlp(params, x_te))

    start = time.perf_counter()
    if structure == "last_layer":
        body = params["body"]
        la = laplace(
            head, params["head"], features(body, x_tr), y_tr,
            likelihood="categorical", structure="full", prior_precision=prior,
        )  # fmt: skip

        def inputs_of(x: jax.Array) -> jax.Array:
            return features(body, x)
    else:
        la = laplace(
            mlp, params, x_tr, y_tr, likelihood="categorical", structure=structure,
            prior_precision=prior, rank=rank if structure == "lowrank" else None,
            key=jax.random.PRNGKey(seed + 1),
        )  # fmt: skip

        def inputs_of(x: jax.Array) -> jax.Array:
            return x

    la = la.optimize_prior_precision()
    fit_time = time.perf_counter() - start
    start = time.perf_counter()
    lap_probs = jax.block_until_ready(la.predict(inputs_of(x_te), chunk_size=128).probs)
    predict_time = time.perf_counter() - start
    shift_probs = la.predict(inputs_of(x_shift), chunk_size=128).probs
    assert lap_probs is not None and shift_probs is not None
    map_shift = jax.nn.softmax(mlp(params, x_shift))

    out: dict[str, Any] = {
        "structure": structure,
        "num_params": la.num_params,
        "prior_precision": float(la.prior_precision),
        "log_marginal_likelihood": float(la.log_marginal_likelihood()),
        "train_time_s": train_time,
        "laplace_fit_time_s": fit_time,
        "laplace_predict_time_s": predict_time,
    }
    for prefix, probs in (
        ("map", map_probs),
        ("laplace", lap_probs),
        ("shift_map", map_shift),
        ("shift_laplace", shift_probs),
    ):
        out[prefix + "_nll"] = nll(probs, y_te)
        out[prefix + "_ece"] = ece(probs, y_te)
        out[prefix + "_accuracy"] = float(jnp.mean(probs.argmax(1) == y_te))
    if verbose:
        print(
            f"{structure}: P = {out['num_params']}, δ* = {out['prior_precision']:.3g}, "
            f"log evidence = {out['log_marginal_likelihood']:.1f}, fit {fit_time:.2f} s, "
            f"predict {predict_time:.2f} s"
        )
        print(f"{'':24s} {'NLL':>8s} {'ECE':>8s} {'acc':>8s}")
        for prefix, name in (
            ("map", "MAP, clean"),
            ("laplace", "Laplace, clean"),
            ("shift_map", f"MAP, noise {shift}"),
            ("shift_laplace", f"Laplace, noise {shift}"),
        ):
            print(
                f"{name:24s} {out[prefix + '_nll']:8.4f} {out[prefix + '_ece']:8.4f} "
                f"{out[prefix + '_accuracy']:8.4f}"
            )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--structure", default="last_layer", choices=["last_layer", "diagonal", "lowrank"]
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--prior", type=float, default=1.0)
    parser.add_argument("--shift", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.structure, args.hidden, args.steps, args.prior, shift=args.shift, seed=args.seed)

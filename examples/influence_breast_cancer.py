"""Influence functions on sklearn's breast-cancer data: which training points drive a prediction,
and which training labels are wrong.

L2-regularized logistic regression, ``R(θ) = (1/N) Σ_i ℓ(θ, z_i) + (α/2)‖θ‖²`` (bias
included in θ), trained to a tight gradient tolerance with ``hf.minimize`` (trust-region
Newton-CG). Then

1. for the few test points with the highest loss, the training points whose removal would
   change that loss most (``influence`` + ``predicted_loss_change``, A = the Hessian of R);
2. with a fraction of the training labels flipped (5% by default) and the model retrained,
   the training points ranked by self-influence ``g_iᵀ H⁻¹ g_i``: the flipped ones should come
   first. Reported as the fraction of flipped points among the top k (k = the number
   flipped), next to ranking by the training loss alone, and to chance (the flip fraction).

    python examples/influence_breast_cancer.py [--method cg|arnoldi|lissa] [--flip 0.05]

Needs scikit-learn.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_breast_cancer

import hessfree as hf
from hessfree import influence, predicted_loss_change, self_influence


def load(num_train: int, seed: int) -> tuple[jax.Array, ...]:
    """Standardized features (training statistics), a random train/test split, float32."""
    x, y = load_breast_cancer(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order], y[order].astype(np.float32)
    mean, std = x[:num_train].mean(0), x[:num_train].std(0)
    x = ((x - mean) / std).astype(np.float32)
    return (
        jnp.asarray(x[:num_train]),
        jnp.asarray(y[:num_train]),
        jnp.asarray(x[num_train:]),
        jnp.asarray(y[num_train:]),
    )


def example_loss(params: dict[str, jax.Array], example: tuple[jax.Array, jax.Array]) -> jax.Array:
    """Logistic loss of one example ``(x, y)``, y in {0, 1}: ``softplus(o) − y·o``."""
    x, y = example
    logit = x @ params["w"] + params["b"]
    return jnp.logaddexp(0.0, logit) - y * logit


def objective(
    params: dict[str, jax.Array], x: jax.Array, y: jax.Array, alpha: jax.Array
) -> jax.Array:
    """``(1/N) Σ ℓ + (α/2)‖θ‖²``."""
    losses = jax.vmap(example_loss, (None, 0))(params, (x, y))
    penalty = jnp.sum(params["w"] ** 2) + params["b"] ** 2
    return jnp.mean(losses) + 0.5 * alpha * penalty


def fit(x: jax.Array, y: jax.Array, alpha: float) -> tuple[dict[str, jax.Array], bool]:
    """The minimizer of the objective by hf.minimize (trust-ncg), and whether it converged."""
    start = {"w": jnp.zeros(x.shape[1], x.dtype), "b": jnp.zeros((), x.dtype)}
    res = hf.minimize(objective, start, x, y, jnp.asarray(alpha, x.dtype))
    return res.x, bool(res.success)


def main(
    num_train: int = 400,
    alpha: float = 1e-2,
    flip: float = 0.05,
    method: str = "cg",
    rank: int = 20,
    num_test_points: int = 3,
    top: int = 5,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train, explain the worst test predictions, find flipped labels; returns the numbers."""
    x_tr, y_tr, x_te, y_te = load(num_train, seed)
    alpha_arr = jnp.asarray(alpha, x_tr.dtype)
    options: dict[str, Any] = {"method": method, "key": jax.random.PRNGKey(seed)}
    if method == "arnoldi":
        options["rank"] = rank

    # 1. influence of training points on the worst test predictions
    t0 = time.perf_counter()
    params, ok = fit(x_tr, y_tr, alpha)
    train_time = time.perf_counter() - t0
    t0 = time.perf_counter()
    H = hf.hessian(objective, params, x_tr, y_tr, alpha_arr)
    test_losses = jax.vmap(example_loss, (None, 0))(params, (x_te, y_te))
    worst = np.argsort(-np.asarray(test_losses))[:num_test_points]
    chosen = (x_te[worst], y_te[worst])
    res = influence(H, example_loss, params, (x_tr, y_tr), chosen, **options)
    change = np.asarray(predicted_loss_change(res, num_train))  # (T, N)
    explain_time = time.perf_counter() - t0
    explained = []
    for row, t in enumerate(worst):
        order = np.argsort(-np.abs(change[row]))[:top]
        explained.append(
            {
                "test_index": int(t),
                "test_loss": float(test_losses[t]),
                "train_indices": order.tolist(),
                "predicted_change": change[row, order].tolist(),
                "train_labels": np.asarray(y_tr)[order].tolist(),
            }
        )

    # 2. flipped labels found by self-influence
    rng = np.random.default_rng(seed + 1)
    num_flip = max(1, round(flip * num_train))
    flipped = rng.choice(num_train, num_flip, replace=False)
    y_noisy = np.asarray(y_tr).copy()
    y_noisy[flipped] = 1 - y_noisy[flipped]
    y_noisy = jnp.asarray(y_noisy)
    noisy_params, ok_noisy = fit(x_tr, y_noisy, alpha)
    t0 = time.perf_counter()
    H_noisy = hf.hessian(objective, noisy_params, x_tr, y_noisy, alpha_arr)
    selfinf = self_influence(H_noisy, example_loss, noisy_params, (x_tr, y_noisy), **options)
    self_time = time.perf_counter() - t0
    train_loss = jax.vmap(example_loss, (None, 0))(noisy_params, (x_tr, y_noisy))
    is_flipped = np.zeros(num_train, bool)
    is_flipped[flipped] = True

    def recall(values: jax.Array) -> float:
        top_k = np.argsort(-np.asarray(values))[:num_flip]
        return float(is_flipped[top_k].mean())

    out = {
        "method": method,
        "num_train": num_train,
        "num_params": H.shape[0],
        "train_success": ok and ok_noisy,
        "influence_success": bool(np.all(res.success)),
        "influence_matvecs": int(res.num_matvecs),
        "explained": explained,
        "num_flipped": num_flip,
        "self_influence_success": bool(np.all(selfinf.success)),
        "recall_self_influence": recall(selfinf.scores),
        "recall_train_loss": recall(train_loss),
        "recall_chance": num_flip / num_train,
        "train_seconds": train_time,
        "explain_seconds": explain_time,
        "self_influence_seconds": self_time,
    }
    if verbose:
        print(f"logistic regression, N = {num_train}, P = {H.shape[0]}, alpha = {alpha}, {method}")
        for e in explained:
            print(
                f"\ntest point {e['test_index']} (loss {e['test_loss']:.3f}): removing training "
                f"point -> predicted change of its loss"
            )
            for i, c, lab in zip(
                e["train_indices"], e["predicted_change"], e["train_labels"], strict=True
            ):
                print(f"  train {i:4d} (label {int(lab)}): {c:+.4f}")
        print(
            f"\n{num_flip} of {num_train} labels flipped; fraction of them among the top "
            f"{num_flip} by\n  self-influence: {out['recall_self_influence']:.2f}\n"
            f"  training loss:  {out['recall_train_loss']:.2f}\n"
            f"  chance:         {out['recall_chance']:.2f}"
        )
        print(
            f"\ntimes (compiles included): first training {train_time:.2f} s, influence "
            f"{explain_time:.2f} s, self-influence {self_time:.2f} s"
        )
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--method", default="cg", choices=["cg", "arnoldi", "lissa"])
    parser.add_argument("--flip", type=float, default=0.05)
    parser.add_argument("--num-train", type=int, default=400)
    parser.add_argument("--alpha", type=float, default=1e-2)
    parser.add_argument("--rank", type=int, default=20)
    args = parser.parse_args()
    main(
        num_train=args.num_train, alpha=args.alpha, flip=args.flip, method=args.method,
        rank=args.rank,
    )  # fmt: skip

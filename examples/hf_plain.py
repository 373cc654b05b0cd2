"""Hessian-free training of a plain-pytree MLP classifier on scikit-learn's digits.

The parameters are a dict of arrays and the model a function ``model(params, x)``: the
smallest setup :func:`hessfree.optim.hessian_free` works with. Each step draws a *gradient
batch* from the training set and uses its first quarter as the *curvature batch*: the
gradient (cheap, one backward pass) is taken on many examples, the Gauss-Newton products
inside CG (up to 20 per step) on a few (Martens 2010, sec. 4.3). The whole step (sampling,
gradient, CG, line search, damping update) is one ``jax.jit``.

    python examples/hf_plain.py [--steps 40] [--grad-batch 512] [--curv-batch 128]

Prints the gradient batch's loss, test accuracy and the optimizer's state: the damping λ,
the reduction ratio ρ and the CG iterations of the step. Needs scikit-learn and optax.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from hessfree.optim import hessian_free


def load(seed: int = 0) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Digits (8×8 images, 10 classes), standardized on the training split, 70/30 split."""
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=seed, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    f32 = np.float32
    return (
        jnp.asarray(scaler.transform(x_tr), f32),
        jnp.asarray(y_tr, jnp.int32),
        jnp.asarray(scaler.transform(x_te), f32),
        jnp.asarray(y_te, jnp.int32),
    )


def init(key: jax.Array, sizes: tuple[int, ...]) -> dict[str, Any]:
    """A tanh MLP's weights, ``N(0, 1/fan_in)``, as ``{"layer0": {"w", "b"}, ...}``."""
    params = {}
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (k, m, n) in enumerate(zip(keys, sizes, sizes[1:], strict=False)):
        params[f"layer{i}"] = {
            "w": jax.random.normal(k, (m, n), jnp.float32) / math.sqrt(m),
            "b": jnp.zeros((n,), jnp.float32),
        }
    return params


def model(params: dict[str, Any], x: jax.Array) -> jax.Array:
    """Logits, batch-major: ``x`` is (B, 64), the output (B, 10)."""
    layers = list(params.values())
    for layer in layers[:-1]:
        x = jnp.tanh(x @ layer["w"] + layer["b"])
    return x @ layers[-1]["w"] + layers[-1]["b"]


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    """The batch-mean softmax cross-entropy: the same loss hessian_free is given by name."""
    return optax.softmax_cross_entropy_with_integer_labels(model(params, x), y).mean()


def main(
    steps: int = 40,
    grad_batch: int = 512,
    curv_batch: int = 128,
    hidden: int = 64,
    log_every: int = 5,
    seed: int = 0,
    verbose: bool = True,
    on_step: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Train for `steps` Hessian-free steps; returns the losses, accuracy and optimizer stats.

    ``on_step(step)`` is called after each step (the tests count compilations with it).
    """
    x_tr, y_tr, x_te, y_te = load(seed)
    grad_batch = min(grad_batch, x_tr.shape[0])
    curv_batch = min(curv_batch, grad_batch)
    key, init_key = jax.random.split(jax.random.key(seed))
    params = init(init_key, (x_tr.shape[1], hidden, 10))
    tx = hessian_free(model, "softmax_cross_entropy")  # the defaults: GGN, λ₀ = 1, 20 CG
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, key, x, y):
        # the gradient batch: grad_batch examples drawn without replacement
        idx = jax.random.choice(key, x.shape[0], (grad_batch,), replace=False)
        xb, yb = x[idx], y[idx]
        loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb)
        # the curvature batch: a subset of the gradient batch (here its first curv_batch rows)
        updates, state = tx.update(
            grads, state, params, inputs=xb[:curv_batch], targets=yb[:curv_batch]
        )
        return optax.apply_updates(params, updates), state, loss

    @jax.jit
    def evaluate(params, x, y):
        logits = model(params, x)
        return loss_fn(params, x, y), jnp.mean(jnp.argmax(logits, -1) == y)

    initial_loss = float(evaluate(params, x_tr, y_tr)[0])
    if verbose:
        print(f"plain MLP 64-{hidden}-10, {x_tr.shape[0]} training examples, gradient batch "
              f"{grad_batch}, curvature batch {curv_batch}; initial loss {initial_loss:.4f}")  # fmt: skip
        print(" step   loss   test acc      λ        ρ     CG  skipped")
    skipped, cg_iters, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        key, sub = jax.random.split(key)
        params, state, loss = train_step(params, state, sub, x_tr, y_tr)
        skipped.append(bool(state.skipped))
        cg_iters.append(int(state.cg_iterations))
        if on_step is not None:
            on_step(step)
        if verbose and (step % log_every == 0 or step == 1 or step == steps):
            _, acc = evaluate(params, x_te, y_te)
            print(f"{step:5d} {float(loss):7.4f} {float(acc):8.3f} {float(state.damping):9.3g} "
                  f"{float(state.rho):7.3f} {int(state.cg_iterations):4d}  {bool(state.skipped)}")  # fmt: skip
    train_loss, train_acc = evaluate(params, x_tr, y_tr)
    test_loss, test_acc = evaluate(params, x_te, y_te)
    seconds = time.perf_counter() - start
    if verbose:
        print(f"final: train loss {float(train_loss):.4f} (acc {float(train_acc):.3f}), "
              f"test loss {float(test_loss):.4f}, test accuracy {float(test_acc):.3f}, "
              f"{seconds:.1f} s including compilation")  # fmt: skip
    return {
        "initial_loss": initial_loss,
        "final_loss": float(train_loss),
        "test_loss": float(test_loss),
        "test_accuracy": float(test_acc),
        "damping": float(state.damping),
        "skipped": skipped,
        "cg_iterations": cg_iters,
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--grad-batch", type=int, default=512)
    parser.add_argument("--curv-batch", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.grad_batch, args.curv_batch, args.hidden, seed=args.seed)

"""Hessian-free training of a flax.nnx MLP classifier on scikit-learn's digits.

hessian_free needs a pure ``model(params, inputs)``: ``nnx.split(module, nnx.Param, ...)``
gives the graph definition, the trainable parameters (an ``nnx.State``, a pytree) and the
rest of the module's state (batch-norm statistics, RNG counters; empty here), and
``nnx.merge(graphdef, params, rest)(x)`` runs the module on given parameters. The optimizer
sees only ``params``; the rest is passed through unchanged. Each step draws a *gradient
batch* from the training set and uses its first quarter as the *curvature batch*: the
gradient (cheap, one backward pass) is taken on many examples, the Gauss-Newton products
inside CG (up to 20 per step) on a few (Martens 2010, sec. 4.3). The whole step (sampling,
gradient, CG, line search, damping update) is one ``jax.jit``.

    python examples/hf_flax_nnx.py [--steps 40] [--grad-batch 512] [--curv-batch 128]

Prints the gradient batch's loss, test accuracy and the optimizer's state: the damping λ,
the reduction ratio ρ and the CG iterations of the step. Needs scikit-learn and optax.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
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


class MLP(nnx.Module):
    """64 → hidden → hidden → 10, tanh."""

    def __init__(self, hidden: int, rngs: nnx.Rngs) -> None:
        self.l1 = nnx.Linear(64, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, 10, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def main(
    steps: int = 40,
    grad_batch: int = 512,
    curv_batch: int = 128,
    hidden: int = 64,
    log_every: int = 5,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train for `steps` Hessian-free steps; returns the losses, accuracy and optimizer stats."""
    x_tr, y_tr, x_te, y_te = load(seed)
    grad_batch = min(grad_batch, x_tr.shape[0])
    curv_batch = min(curv_batch, grad_batch)
    key = jax.random.key(seed)
    graphdef, params, rest = nnx.split(MLP(hidden, nnx.Rngs(seed)), nnx.Param, ...)

    def model(params: nnx.State, x: jax.Array) -> jax.Array:
        """Logits (B, 10) of the module with these parameters; x is (B, 64)."""
        return nnx.merge(graphdef, params, rest)(x)

    def loss_fn(params: nnx.State, x: jax.Array, y: jax.Array) -> jax.Array:
        """The batch-mean softmax cross-entropy: the loss hessian_free is given by name."""
        return optax.softmax_cross_entropy_with_integer_labels(model(params, x), y).mean()

    # one model function for the whole run: hessian_free compiles once per model function
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
        print(f"flax.nnx MLP 64-{hidden}-{hidden}-10, {x_tr.shape[0]} training examples, gradient batch "
              f"{grad_batch}, curvature batch {curv_batch}; initial loss {initial_loss:.4f}")  # fmt: skip
        print(" step   loss   test acc      λ        ρ     CG  skipped")
    skipped, cg_iters, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        key, sub = jax.random.split(key)
        params, state, loss = train_step(params, state, sub, x_tr, y_tr)
        skipped.append(bool(state.skipped))
        cg_iters.append(int(state.cg_iterations))
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

"""Hessian-free training of an Equinox autoencoder on scikit-learn's digits (squared error).

An Equinox module is a pytree that holds its arrays and its static parts (activation
functions, shapes) together. ``eqx.partition(module, eqx.is_inexact_array)`` splits it into
the floating-point arrays (the parameters hessian_free optimizes; a pytree of the module's
structure with ``None`` elsewhere) and the rest, and ``eqx.combine(params, static)`` puts a
module back together: ``model(params, x) = eqx.combine(params, static)(x)`` is the pure
function hessian_free needs. Equinox layers act on one example, so the model vmaps over the
batch.

The autoencoder 64 → 32 → code → 32 → 64 (tanh) reconstructs standardized digits with the
built-in ``"mse"`` loss, ``½‖x̂ − x‖²`` per example averaged over the batch; its Gauss-Newton
matrix is ``JᵀJ / B``. Each step draws a *gradient batch* from the training set and uses its
first quarter as the *curvature batch*: the gradient (one backward pass) is taken on many
examples, the Gauss-Newton products inside CG (up to 20 per step) on a few (Martens 2010,
sec. 4.3). The whole step is one ``jax.jit``. For reference the script prints the loss of
the best linear autoencoder with the same code size (PCA).

    python examples/hf_equinox.py [--steps 60] [--code 16] [--grad-batch 512] [--curv-batch 128]

Needs scikit-learn, optax (hessfree.optim) and equinox.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from hessfree.optim import hessian_free


def load(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Digits' pixels (8×8 = 64 features), standardized on the training split, 70/30 split."""
    x, _ = load_digits(return_X_y=True)
    x_tr, x_te = train_test_split(x, test_size=0.3, random_state=seed)
    scaler = StandardScaler().fit(x_tr)
    return scaler.transform(x_tr).astype(np.float32), scaler.transform(x_te).astype(np.float32)


class AutoEncoder(eqx.Module):
    """64 → hidden → code → hidden → 64, tanh units, linear code and output layers."""

    layers: tuple[eqx.nn.Linear, ...]

    def __init__(self, code: int, hidden: int, key: jax.Array) -> None:
        sizes = (64, hidden, code, hidden, 64)
        keys = jax.random.split(key, len(sizes) - 1)
        self.layers = tuple(
            eqx.nn.Linear(m, n, key=k, dtype=jnp.float32)
            for k, m, n in zip(keys, sizes, sizes[1:], strict=False)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """One example: (64,) → (64,)."""
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i not in (1, len(self.layers) - 1):  # the code and the output stay linear
                x = jnp.tanh(x)
        return x


def main(
    steps: int = 60,
    code: int = 16,
    hidden: int = 32,
    grad_batch: int = 512,
    curv_batch: int = 128,
    log_every: int = 10,
    seed: int = 0,
    verbose: bool = True,
) -> dict[str, Any]:
    """Train for `steps` Hessian-free steps; returns the losses and optimizer stats."""
    x_tr_np, x_te_np = load(seed)
    x_tr, x_te = jnp.asarray(x_tr_np), jnp.asarray(x_te_np)
    grad_batch = min(grad_batch, x_tr.shape[0])
    curv_batch = min(curv_batch, grad_batch)
    key, init_key = jax.random.split(jax.random.key(seed))
    # the floating-point arrays are the parameters; the activation, shapes etc. are static
    params, static = eqx.partition(AutoEncoder(code, hidden, init_key), eqx.is_inexact_array)

    def model(params: AutoEncoder, x: jax.Array) -> jax.Array:
        """Reconstructions (B, 64) of x (B, 64) by the module with these parameters."""
        return jax.vmap(eqx.combine(params, static))(x)

    def loss_fn(params: AutoEncoder, x: jax.Array) -> jax.Array:
        """``mean_b ½‖x̂_b − x_b‖²``: hessian_free's "mse" (the targets are the inputs)."""
        return 0.5 * jnp.mean(jnp.sum((model(params, x) - x) ** 2, axis=-1))

    tx = hessian_free(model, "mse")  # the defaults: GGN, λ₀ = 1, at most 20 CG iterations
    state = tx.init(params)

    @jax.jit
    def train_step(params, state, key, x):
        # the gradient batch: grad_batch examples drawn without replacement
        xb = x[jax.random.choice(key, x.shape[0], (grad_batch,), replace=False)]
        loss, grads = jax.value_and_grad(loss_fn)(params, xb)
        # the curvature batch: a subset of the gradient batch; an autoencoder's targets are
        # its inputs
        xc = xb[:curv_batch]
        updates, state = tx.update(grads, state, params, inputs=xc, targets=xc)
        return eqx.apply_updates(params, updates), state, loss

    evaluate = jax.jit(loss_fn)
    initial_loss = float(evaluate(params, x_tr))
    pca = PCA(code).fit(x_tr_np)
    recon = pca.inverse_transform(pca.transform(x_tr_np))
    pca_loss = float(0.5 * np.mean(np.sum((recon - x_tr_np) ** 2, axis=-1)))
    if verbose:
        print(f"Equinox autoencoder 64-{hidden}-{code}-{hidden}-64, {x_tr.shape[0]} training "
              f"examples, gradient batch {grad_batch}, curvature batch {curv_batch}; initial "
              f"loss {initial_loss:.3f}, PCA with {code} components {pca_loss:.3f}")  # fmt: skip
        print(" step    loss   test loss      λ        ρ     CG  skipped")
    skipped, cg_iters, start = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        key, sub = jax.random.split(key)
        params, state, loss = train_step(params, state, sub, x_tr)
        skipped.append(bool(state.skipped))
        cg_iters.append(int(state.cg_iterations))
        if verbose and (step % log_every == 0 or step == 1 or step == steps):
            print(f"{step:5d} {float(loss):7.3f} {float(evaluate(params, x_te)):9.3f} "
                  f"{float(state.damping):9.3g} {float(state.rho):7.3f} "
                  f"{int(state.cg_iterations):4d}  {bool(state.skipped)}")  # fmt: skip
    train_loss, test_loss = float(evaluate(params, x_tr)), float(evaluate(params, x_te))
    seconds = time.perf_counter() - start
    if verbose:
        print(f"final: train loss {train_loss:.3f}, test loss {test_loss:.3f} "
              f"(PCA-{code}: {pca_loss:.3f}), {seconds:.1f} s including compilation")  # fmt: skip
    return {
        "initial_loss": initial_loss,
        "final_loss": train_loss,
        "test_loss": test_loss,
        "pca_loss": pca_loss,
        "damping": float(state.damping),
        "skipped": skipped,
        "cg_iterations": cg_iters,
        "seconds": seconds,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--code", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--grad-batch", type=int, default=512)
    parser.add_argument("--curv-batch", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    main(args.steps, args.code, args.hidden, args.grad_batch, args.curv_batch, seed=args.seed)

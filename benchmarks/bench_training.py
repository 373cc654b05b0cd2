"""Training loss vs wall time: hessfree.optim.hessian_free vs Adam, L-BFGS (and K-FAC if present).

Two problems on scikit-learn's digits (1797 8×8 images, standardized, 70/30 split; 1257
training examples):

- ``autoencoder``: the deep autoencoder 64-128-64-32-8-32-64-128-64 (tanh units, linear code
  and output layers), reconstruction loss ``mean_b ½‖x̂_b − x_b‖²`` ("mse"): the
  pathological-curvature setting of Martens (2010), at digits' scale.
- ``autoencoder_sigmoid``: the same with logistic units, as in Martens (2010): flatter
  saturated regions, the harder case for first-order methods.
- ``classifier``: an MLP 64-128-64-10 (tanh), softmax cross-entropy; test accuracy too.

Every method starts from the same initialization (``N(0, 1/fan_in)`` weights, zero biases),
uses the full training set for its gradient (the loss is deterministic, so each method's
curve is the exact training loss), runs one jitted step function (Adam runs 10 steps per
call, a ``lax.scan``, to spare it Python dispatch; L-BFGS one, as its line search inside a
scan compiles several times slower) warmed up and reset, so compilation is excluded, and
gets the same wall-time budget (``--seconds``, default 20) of its own step time. The methods
take turns of one second each, so that a change in the machine's load falls on all alike.
Evaluations (test accuracy, the final loss) stop the clock.

- ``hessian_free``: the defaults (GGN, λ₀ = 1, at most 20 CG iterations, Armijo line search);
  gradient batch = the whole training set, curvature batch = a fresh random quarter of it
  (314 examples) every step (Martens 2010, sec. 4.3). ``--hf-variant cg_maxiter=50`` adds a
  run with other options (the committed results have that one: see the JSON's meta).
- ``adam``: optax.adam at each learning rate of the grid (``--lrs``), the best by final
  loss at the budget is "best Adam" (all are in the JSON).
- ``lbfgs``: optax.lbfgs (memory 10) with its zoom line search, through
  ``optax.value_and_grad_from_state``.
- ``kfac``: kfac-jax's optimizer with adaptive learning rate, momentum and damping, only if
  ``import kfac_jax`` works (skipped otherwise). kfac-jax 0.0.8 installs beside jax 0.10.2
  but fails inside its own graph matcher (``tag_graph_matcher.eval_jaxpr_eqn``: "too many
  values to unpack") on the first step; the failure is reported and the others go on.

The table gives each method's final loss at the budget, its ratio to hessian_free's, and the
wall time it needs to reach best Adam's final loss (and that time ÷ Adam's own; "not
reached" if it never does); for the classifier also the test accuracy (final, best) and the
time to 97 % test accuracy. The classifier's training loss reaches float32's floor (0) within
seconds, so there the times and accuracies are the informative columns. Results: ``benchmarks/results/training.json`` (with thinned
curves and hessian_free's state per step: λ, ρ, CG iterations, skipped) and
``benchmarks/results/training.png`` (loss vs wall time, log y).

    python benchmarks/bench_training.py [--seconds 20] [--quick] [--problems autoencoder autoencoder_sigmoid classifier]

``--quick``: 0.5 s per method, two learning rates: a smoke run (results to
``training_quick.json`` / ``.png``). Needs scikit-learn, optax and matplotlib.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from hessfree.optim import hessian_free

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
LRS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
QUICK_LRS = (1e-3, 1e-2)
CURVATURE_FRACTION = 4  # the curvature batch is 1/4 of the gradient batch
FIRST_ORDER_CHUNK = 10  # Adam's steps per jitted call
MAX_CURVE_POINTS = 250  # per curve in the JSON
EVAL_START, EVAL_GROWTH = 0.01, 1.15  # evaluations at geometrically spaced times (off the clock)
ACCURACY_TARGET = 0.97  # the classifier's table: time to this test accuracy

COMPILES: list[str] = []
jax.monitoring.register_event_duration_secs_listener(
    lambda name, *_, **__: (
        COMPILES.append(name) if name == "/jax/core/compile/backend_compile_duration" else None
    )
)


# --- problems ----------------------------------------------------------------------------------


class Problem(NamedTuple):
    name: str
    sizes: tuple[int, ...]
    loss: str  # hessian_free's named loss
    model: Callable[..., jax.Array]
    loss_fn: Callable[..., jax.Array]  # (params, x, y) -> batch-mean loss, the same loss
    x_train: jax.Array
    y_train: jax.Array
    x_test: jax.Array
    y_test: jax.Array
    classification: bool


def make_mlp(
    linear: tuple[int, ...], activation: Callable[[jax.Array], jax.Array] = jnp.tanh
) -> Callable[..., jax.Array]:
    """``model(params, x)`` of a list of ``{"w", "b"}`` layers, `activation` except at `linear`."""

    def model(params: list[dict[str, jax.Array]], x: jax.Array) -> jax.Array:
        last = len(params) - 1
        for i, layer in enumerate(params):
            x = x @ layer["w"] + layer["b"]
            if i != last and i not in linear:
                x = activation(x)
        return x

    return model


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> list[dict[str, jax.Array]]:
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        {
            "w": jax.random.normal(k, (m, n), jnp.float32) / math.sqrt(m),
            "b": jnp.zeros((n,), jnp.float32),
        }
        for k, m, n in zip(keys, sizes, sizes[1:], strict=False)
    ]


def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_tr)
    f32 = np.float32
    return scaler.transform(x_tr).astype(f32), y_tr, scaler.transform(x_te).astype(f32), y_te


def make_problems(names: list[str]) -> list[Problem]:
    x_tr, y_tr, x_te, y_te = digits()
    x_tr, x_te = jnp.asarray(x_tr), jnp.asarray(x_te)
    problems = []
    for name, activation in (("autoencoder", jnp.tanh), ("autoencoder_sigmoid", jax.nn.sigmoid)):
        if name not in names:
            continue
        sizes = (64, 128, 64, 32, 8, 32, 64, 128, 64)
        model = make_mlp(linear=(3,), activation=activation)  # the 8-unit code layer is linear

        def ae_loss(params: Any, x: jax.Array, y: jax.Array, model=model) -> jax.Array:
            return 0.5 * jnp.mean(jnp.sum((model(params, x) - y) ** 2, axis=-1))

        problems.append(Problem(name, sizes, "mse", model, ae_loss, x_tr, x_tr, x_te, x_te, False))
    if "classifier" in names:
        sizes = (64, 128, 64, 10)
        clf = make_mlp(linear=())

        def ce_loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
            return optax.softmax_cross_entropy_with_integer_labels(clf(params, x), y).mean()

        y_tr_j, y_te_j = jnp.asarray(y_tr, jnp.int32), jnp.asarray(y_te, jnp.int32)
        problem = Problem(
            "classifier", sizes, "softmax_cross_entropy", clf, ce_loss,
            x_tr, y_tr_j, x_te, y_te_j, True,
        )  # fmt: skip
        problems.append(problem)
    return problems


# --- methods: each is (init(params) -> carry, step(carry, x, y) -> (carry, losses, info)) -------


class Method(NamedTuple):
    name: str
    init: Callable[[Any], Any]
    step: Callable[..., tuple[Any, jax.Array, Any]]  # jitted
    params: Callable[[Any], Any]  # carry -> params
    steps_per_call: int


def hessian_free_method(problem: Problem, **options: Any) -> Method:
    """hessian_free with the defaults (or `options`); full-batch gradient, 1/4 curvature."""
    tx = hessian_free(problem.model, problem.loss, **options)
    name = " ".join(["hessian_free", *(f"{k}={v}" for k, v in options.items())])
    n = problem.x_train.shape[0]
    curvature_size = n // CURVATURE_FRACTION

    def init(params: Any) -> Any:
        return params, tx.init(params), jax.random.key(1)

    @jax.jit
    def step(carry: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array, Any]:
        params, state, key = carry
        key, sub = jax.random.split(key)
        loss, grads = jax.value_and_grad(problem.loss_fn)(params, x, y)  # the full batch
        idx = jax.random.choice(sub, n, (curvature_size,), replace=False)
        updates, state = tx.update(grads, state, params, inputs=x[idx], targets=y[idx])
        info = {
            k: getattr(state, k)
            for k in ("damping", "rho", "cg_iterations", "step_size", "skipped", "converged")
        }
        info |= {"batch_loss_before": state.loss_before, "batch_loss_after": state.loss_after}
        return (optax.apply_updates(params, updates), state, key), loss[None], info

    return Method(name, init, step, lambda c: c[0], 1)


def adam_method(problem: Problem, lr: float) -> Method:
    def init(params: Any) -> Any:
        return params, optax.adam(1e-3).init(params)  # the state does not depend on lr

    @jax.jit
    def step(carry: Any, lr: jax.Array, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array, Any]:
        tx = optax.adam(lr)

        def one(c: Any, _: Any) -> tuple[Any, jax.Array]:
            params, state = c
            loss, grads = jax.value_and_grad(problem.loss_fn)(params, x, y)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), loss

        carry, losses = jax.lax.scan(one, carry, None, length=FIRST_ORDER_CHUNK)
        return carry, losses, None

    lr_array = jnp.asarray(lr, jnp.float32)
    return Method(
        f"adam lr={lr:g}",
        init,
        lambda c, x, y: step(c, lr_array, x, y),
        lambda c: c[0],
        FIRST_ORDER_CHUNK,
    )


def lbfgs_method(problem: Problem) -> Method:
    tx = optax.lbfgs()  # memory 10, zoom line search

    def init(params: Any) -> Any:
        return params, tx.init(params)

    @jax.jit
    def step(carry: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array, Any]:
        def f(params: Any) -> jax.Array:
            return problem.loss_fn(params, x, y)

        value_and_grad = optax.value_and_grad_from_state(f)

        params, state = carry
        loss, grads = value_and_grad(params, state=state)
        updates, state = tx.update(grads, state, params, value=loss, grad=grads, value_fn=f)
        return (optax.apply_updates(params, updates), state), loss[None], None

    return Method("lbfgs", init, step, lambda c: c[0], 1)


def kfac_method(problem: Problem) -> Method | None:  # pragma: no cover - optional dependency
    """kfac-jax's optimizer (adaptive lr, momentum, damping); None without kfac_jax."""
    try:
        import kfac_jax  # pyright: ignore[reportMissingImports]
    except ImportError:
        return None

    def registered_loss(params: Any, batch: tuple[jax.Array, jax.Array]) -> jax.Array:
        x, y = batch
        out = problem.model(params, x)
        if problem.classification:
            kfac_jax.register_softmax_cross_entropy_loss(out, y)
        else:
            kfac_jax.register_squared_error_loss(out, y)
        return problem.loss_fn(params, x, y)

    opt = kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(registered_loss),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=1.0,
        multi_device=False,
        num_burnin_steps=0,  # its burn-in needs a data iterator; the curvature starts at zero
    )
    batch = (problem.x_train, problem.y_train)

    def init(params: Any) -> Any:
        key = jax.random.key(2)
        return params, opt.init(params, key, batch), key, 0

    def step(carry: Any, x: jax.Array, y: jax.Array) -> tuple[Any, jax.Array, Any]:
        params, state, key, i = carry
        key, sub = jax.random.split(key)
        params, state, stats = opt.step(params, state, sub, batch=(x, y), global_step_int=i)
        return (params, state, key, i + 1), jnp.asarray(stats["loss"])[None], None

    return Method("kfac", init, step, lambda c: c[0], 1)


# --- the timed run -----------------------------------------------------------------------------


_EVALUATORS: dict[str, Callable[[Any], dict[str, float]]] = {}


def evaluate(problem: Problem, params: Any) -> dict[str, float]:
    """The full training loss (and test accuracy), jitted once per problem."""
    if problem.name not in _EVALUATORS:

        @jax.jit
        def metrics(params: Any, x: jax.Array, y: jax.Array, xt: jax.Array, yt: jax.Array):
            loss = problem.loss_fn(params, x, y)
            if not problem.classification:
                return loss, jnp.zeros(())
            return loss, jnp.mean(jnp.argmax(problem.model(params, xt), -1) == yt)

        def run_metrics(params: Any) -> dict[str, float]:
            loss, acc = metrics(params, problem.x_train, problem.y_train,
                                problem.x_test, problem.y_test)  # fmt: skip
            out = {"loss": float(loss)}
            return out | {"test_accuracy": float(acc)} if problem.classification else out

        _EVALUATORS[problem.name] = run_metrics
    return _EVALUATORS[problem.name](params)


class Runner:
    """One method's timed run, advanced in slices so that methods can take turns."""

    def __init__(self, method: Method, problem: Problem, params0: Any, seconds: float) -> None:
        self.method, self.problem, self.seconds = method, problem, seconds
        x, y = problem.x_train, problem.y_train
        # compile: two calls, as the carry a step returns may differ in weak types from the
        # initial one; then reset
        warm = method.step(method.init(params0), x, y)[0]
        jax.block_until_ready(method.step(warm, x, y))
        self.evals = [{"time": 0.0, **evaluate(problem, params0)}]
        self.carry = method.init(params0)
        jax.block_until_ready(self.carry)
        self.times: list[float] = []
        self.losses: list[float] = []
        self.infos: list[dict[str, Any]] = []
        self.clock, self.calls, self.compiles = 0.0, 0, 0
        self.next_eval = EVAL_START

    def advance(self, until: float) -> None:
        """Step until this method's clock (time spent in its steps alone) passes `until`."""
        x, y = self.problem.x_train, self.problem.y_train
        start_compiles = len(COMPILES)
        while self.clock < min(until, self.seconds):
            start = time.perf_counter()
            self.carry, chunk, info = self.method.step(self.carry, x, y)
            chunk = np.asarray(chunk)  # blocks
            elapsed = time.perf_counter() - start
            k = len(chunk)
            # the j-th loss is at the parameters the call had after j of its k steps
            self.times.extend(self.clock + elapsed * j / k for j in range(k))
            self.losses.extend(chunk.tolist())
            self.clock += elapsed
            self.calls += 1
            if info is not None:
                self.infos.append({key: np.asarray(v).item() for key, v in info.items()})
            if self.clock >= self.next_eval or self.clock >= self.seconds:  # off the clock
                params = self.method.params(self.carry)
                self.evals.append({"time": self.clock, **evaluate(self.problem, params)})
                self.next_eval = min(EVAL_GROWTH * self.clock, self.clock + self.seconds / 50)
        self.compiles += len(COMPILES) - start_compiles

    def result(self) -> dict[str, Any]:
        if self.compiles:
            print(f"  warning: {self.method.name} compiled {self.compiles} times while timed")
        final = self.evals[-1]
        times, losses = [*self.times, self.clock], [*self.losses, final["loss"]]
        return {
            "method": self.method.name,
            "steps": self.calls * self.method.steps_per_call,
            "seconds": self.clock,
            "final_loss": final["loss"],
            "final_test_accuracy": final.get("test_accuracy"),
            "nan": bool(not np.all(np.isfinite(losses))),
            "compiles_while_timed": self.compiles,
            "times": times,
            "losses": losses,
            "evals": self.evals,
            "state": self.infos,
        }


def run_all(
    methods: list[Method], problem: Problem, params0: Any, seconds: float, turn: float
) -> list[dict[str, Any]]:
    """Each method for `seconds` of its own step time, taking turns of `turn` seconds.

    Turns spread any change in the machine's load (other processes) over all methods alike.
    """
    runners = []
    for method in methods:
        try:
            runners.append(Runner(method, problem, params0, seconds))
        except Exception as err:  # pragma: no cover - an optional method that fails to build
            print(f"  {method.name} failed to compile: {type(err).__name__}: {err}")
    for r in range(1, math.ceil(seconds / turn) + 1):
        for runner in list(runners):
            try:
                runner.advance(r * turn)
            except Exception as err:  # pragma: no cover - the optional kfac-jax, say
                print(f"  {runner.method.name} failed: {type(err).__name__}: {err}")
                runners.remove(runner)
    return [runner.result() for runner in runners]


def time_to_reach(result: dict[str, Any], target: float) -> float | None:
    """The first time the method's training loss is at or below `target` (None if never)."""
    losses = np.asarray(result["losses"])
    hit = np.flatnonzero(np.isfinite(losses) & (losses <= target))
    return float(result["times"][hit[0]]) if hit.size else None


def _round(value: Any) -> Any:
    """Floats to 6 significant digits, in nested lists and dicts (a smaller JSON)."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, list):
        return [_round(v) for v in value]
    if isinstance(value, dict):
        return {k: _round(v) for k, v in value.items()}
    return value


def thin(result: dict[str, Any]) -> dict[str, Any]:
    """At most MAX_CURVE_POINTS curve points (geometric in the index) and state rows."""
    out = _thin(result)
    return {
        k: _round(v) if k in ("times", "losses", "evals", "state") else v for k, v in out.items()
    }


def _thin(result: dict[str, Any]) -> dict[str, Any]:
    out = dict(result)
    n = len(result["losses"])
    if n > MAX_CURVE_POINTS:
        idx = np.unique(np.geomspace(1, n, MAX_CURVE_POINTS).astype(int) - 1)
        idx = np.union1d(idx, [0, n - 1])
        out["times"] = [result["times"][i] for i in idx]
        out["losses"] = [result["losses"][i] for i in idx]
    if len(result["state"]) > MAX_CURVE_POINTS:
        stride = math.ceil(len(result["state"]) / MAX_CURVE_POINTS)
        out["state"] = result["state"][::stride]
        out["state_stride"] = stride
    return out


def hf_summary(result: dict[str, Any]) -> dict[str, Any]:
    rows = result["state"]
    if not rows:
        return {}
    damping = np.asarray([r["damping"] for r in rows])
    rho = np.asarray([r["rho"] for r in rows])
    return {
        "steps": len(rows),
        "skipped": int(sum(r["skipped"] for r in rows)),
        "converged": int(sum(r["converged"] for r in rows)),
        "damping_min": float(damping.min()),
        "damping_median": float(np.median(damping)),
        "damping_max": float(damping.max()),
        "rho_median": float(np.nanmedian(rho)),
        "rho_below_quarter": float(np.mean(rho < 0.25)),
        "cg_mean": float(np.mean([r["cg_iterations"] for r in rows])),
        "cg_at_max": float(np.mean([r["cg_iterations"] >= 50 for r in rows])),  # the default cap
        "line_search_shortened": float(np.mean([0 < r["step_size"] < 1 for r in rows])),
    }


def fmt_time(t: float | None) -> str:
    return "not reached" if t is None else f"{t:.2f} s"


def parse_variant(text: str) -> dict[str, Any]:
    """``"cg_maxiter=20,initial_damping=0.1"`` -> keyword arguments of hessian_free."""
    options = {}
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        options[key.strip()] = json.loads(value.strip().lower())
    return options


def benchmark(
    problem: Problem,
    seconds: float,
    lrs: tuple[float, ...],
    turn: float,
    variants: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    params0 = init_mlp(jax.random.key(0), problem.sizes)
    methods = [hessian_free_method(problem), lbfgs_method(problem)]
    methods += [adam_method(problem, lr) for lr in lrs]
    methods += [hessian_free_method(problem, **options) for options in variants]
    kfac = kfac_method(problem)
    if kfac is None:
        print("  kfac-jax: not importable, skipped")
    else:  # pragma: no cover - optional dependency
        methods.append(kfac)
    runs = {r["method"]: r for r in run_all(methods, problem, params0, seconds, turn)}
    hf, lbfgs = runs.pop("hessian_free"), runs.pop("lbfgs")
    adams = [runs.pop(m.name) for m in methods if m.name.startswith("adam")]
    best_adam = min(adams, key=lambda r: r["final_loss"] if np.isfinite(r["final_loss"]) else 1e30)
    others = list(runs.values())  # the hessian_free variants, kfac
    target = best_adam["final_loss"]
    t_adam = time_to_reach(best_adam, target)
    rows = []
    for r in [hf, best_adam, lbfgs, *others, *(a for a in adams if a is not best_adam)]:
        t = time_to_reach(r, target)
        row = {
            "method": r["method"] + (" (best Adam)" if r is best_adam else ""),
            "steps": r["steps"],
            "final_loss": r["final_loss"],
            "ratio_to_hf": r["final_loss"] / hf["final_loss"] if hf["final_loss"] > 0 else None,
            "time_to_adam_final": t,
            "time_ratio_to_adam": None if t is None or not t_adam else t / t_adam,
            "nan": r["nan"],
        }
        if problem.classification:
            accuracies = [e["test_accuracy"] for e in r["evals"]]
            hit = [e["time"] for e in r["evals"] if e["test_accuracy"] >= ACCURACY_TARGET]
            row |= {
                "final_test_accuracy": r["final_test_accuracy"],
                "best_test_accuracy": max(accuracies),
                "time_to_accuracy_target": hit[0] if hit else None,
            }
        rows.append(row)
    print_table(problem, rows, seconds, target)
    summary = hf_summary(hf)
    print(
        "  hessian_free state over {steps} steps: skipped {skipped}, λ min/median/max "
        "{damping_min:.3g}/{damping_median:.3g}/{damping_max:.3g}, ρ median {rho_median:.3f} "
        "(ρ < 1/4 on {rho_below_quarter:.0%} of steps), CG mean {cg_mean:.1f} (at the cap on "
        "{cg_at_max:.0%}), line search shortened {line_search_shortened:.0%}".format(**summary)
    )
    return {
        "problem": problem.name,
        "sizes": problem.sizes,
        "loss": problem.loss,
        "seconds_per_method": seconds,
        "adam_final_loss": target,
        "table": rows,
        "hessian_free_summary": summary,
        "hessian_free_variant_summaries": {r["method"]: hf_summary(r) for r in others},
        "runs": [thin(r) for r in [hf, lbfgs, *adams, *others]],
    }


def print_table(problem: Problem, rows: list[dict[str, Any]], seconds: float, target: float):
    sizes = "-".join(map(str, problem.sizes))
    print(f"\n{problem.name} {sizes} ({problem.loss}), {seconds:g} s per method; "
          f"best Adam's final loss {target:.4g}")  # fmt: skip
    acc = problem.classification
    width = max(24, *(len(r["method"]) for r in rows))
    head = f"  {'method':{width}s} {'steps':>6s} {'final loss':>10s} {'÷ HF':>6s}"
    head += f" {'t→Adam final':>13s} {'÷ Adam':>6s}"
    head += f" {'test acc':>8s} {'best':>6s} {f't→acc {ACCURACY_TARGET:g}':>11s}" if acc else ""
    print(head)
    for r in rows:
        ratio, time_ratio = r["ratio_to_hf"], r["time_ratio_to_adam"]
        line = f"  {r['method']:{width}s} {r['steps']:6d} {r['final_loss']:10.4g} "
        line += f"{'—' if ratio is None else f'{ratio:.2f}':>6s} "
        line += f"{fmt_time(r['time_to_adam_final']):>13s} "
        line += f"{'—' if time_ratio is None else f'{time_ratio:.2f}':>6s}"
        if acc:
            line += f" {r['final_test_accuracy']:8.3f} {r['best_test_accuracy']:6.3f}"
            line += f" {fmt_time(r['time_to_accuracy_target']):>11s}"
        print(line + ("  (NaN)" if r["nan"] else ""))


def plot(problems: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(p, "loss") for p in problems]
    panels += [(p, "acc") for p in problems if p["loss"] == "softmax_cross_entropy"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4), squeeze=False)
    for ax, (p, kind) in zip(axes[0], panels, strict=False):
        best = next(r["method"] for r in p["table"] if "best Adam" in r["method"])
        for r in p["runs"]:
            if r["method"].startswith("adam") and r["method"] not in best:
                continue
            label = r["method"] + (" (best)" if r["method"] in best else "")
            if kind == "loss":
                ax.plot(r["times"], r["losses"], label=label)
            else:
                ax.plot([e["time"] for e in r["evals"]], [e["test_accuracy"] for e in r["evals"]],
                        label=label)  # fmt: skip
        ax.set_xlabel("wall time (s)")
        if p["loss"] == "softmax_cross_entropy":  # it trains in a fraction of a second
            ax.set_xscale("log")
            ax.set_xlim(left=1e-3)
        if kind == "loss":
            ax.set_yscale("log")
            ax.set_ylabel("training loss")
        else:
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0.8, 1.0)
        ax.set_title(f"{p['problem']} ({'-'.join(map(str, p['sizes']))})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(
    seconds: float = 20.0,
    quick: bool = False,
    problems: tuple[str, ...] = ("autoencoder", "autoencoder_sigmoid", "classifier"),
    lrs: tuple[float, ...] | None = None,
    out: str | None = None,
    classifier_seconds: float | None = None,
    variants: tuple[dict[str, Any], ...] = (),
) -> dict[str, Any]:
    """Run the benchmark; returns (and writes to `out`.json / .png) the results."""
    lrs = lrs or (QUICK_LRS if quick else LRS)
    out = out or os.path.join(RESULTS, "training_quick" if quick else "training")
    classifier_seconds = classifier_seconds or seconds
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0]}); "
          f"hessian_free: full-batch gradient, curvature batch a random "
          f"1/{CURVATURE_FRACTION} of it each step")  # fmt: skip
    done = []
    for problem in make_problems(list(problems)):
        budget = classifier_seconds if problem.classification else seconds
        done.append(benchmark(problem, budget, tuple(lrs), min(1.0, budget), variants))
    report = {
        "meta": {
            "jax": jax.__version__,
            "optax": optax.__version__,
            "backend": jax.default_backend(),
            "device": str(jax.devices()[0]),
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "quick": quick,
            "adam_learning_rates": list(lrs),
            "hessian_free_variants": list(variants),
            "curvature_fraction": 1 / CURVATURE_FRACTION,
            "adam_steps_per_call": FIRST_ORDER_CHUNK,
        },
        "problems": done,
    }
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as fh:
        json.dump(report, fh, indent=1, allow_nan=True)
    plot(done, out + ".png")
    print(f"\nwrote {out}.json and {out}.png")
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=None,
                        help="wall time per method (default 20; --quick 0.5)")  # fmt: skip
    parser.add_argument("--classifier-seconds", type=float, default=None,
                        help="the classifier's budget (default: --seconds)")  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="0.5 s per method, 2 Adam rates")
    parser.add_argument("--problems", nargs="+",
                        default=["autoencoder", "autoencoder_sigmoid", "classifier"],
                        choices=["autoencoder", "autoencoder_sigmoid", "classifier"])  # fmt: skip
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="Adam's grid")
    parser.add_argument("--hf-variant", action="append", default=[], metavar="K=V[,K=V]",
                        help="also run hessian_free with these options, e.g. cg_maxiter=50")  # fmt: skip
    parser.add_argument("--out", default=None, help="path stem of the .json and .png")
    cli = parser.parse_args()
    seconds = cli.seconds if cli.seconds is not None else (0.5 if cli.quick else 20.0)
    main(
        seconds,
        cli.quick,
        tuple(cli.problems),
        cli.lrs and tuple(cli.lrs),
        cli.out,
        cli.classifier_seconds,
        tuple(parse_variant(v) for v in cli.hf_variant),
    )

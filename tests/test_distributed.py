"""Several processes under jax.distributed: 2 processes × 2 CPU devices on 127.0.0.1 (gloo).

Each process runs tests/distributed_worker.py: it shards a batch over all 4 devices, runs hvp,
ggn(...).mv, cg, eigsh, minimize and one hessian_free (optax) step, and compares them with the
same quantities on one device from the whole batch. One test item, so that under pytest-xdist
the two processes start together, from one worker.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

WORKER = Path(__file__).with_name("distributed_worker.py")
NUM_PROCESSES = 2
TIMEOUT_S = 600  # about 1 min alone on 2 cores; 2+ min when the machine is busy
# Every quantity is checked by one of the processes (the one holding its reference).
EXPECTED = {
    "hvp",
    "hvp (jit)",
    "ggn.mv",
    "cg",
    "eigsh",
    "eigsh success",
    "minimize",
    "minimize status and nit",
    "hessian_free updates",
    "hessian_free updates (outside jit)",
    "hessian_free params",
    "hessian_free direction",
    "hessian_free scalars",
    "hessian_free cg_iterations",
} | {
    f"{check} (process {i})"
    for check in ("layout", "bad targets refused")
    for i in range(NUM_PROCESSES)
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(tmp_path: Path) -> list[tuple[int, str, str]]:
    """Start every process on a fresh port; return (exit code, stdout, stderr) for each."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
    env["JAX_PLATFORMS"] = "cpu"
    # The worker sets its own device count; drop one this process's environment may carry
    # (importing tests/sharded_checks.py, as --doctest-modules does, sets 8).
    env["XLA_FLAGS"] = " ".join(
        flag
        for flag in os.environ.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    )
    procs = []
    for i in range(NUM_PROCESSES):
        out, err = tmp_path / f"{port}-{i}.out", tmp_path / f"{port}-{i}.err"
        with out.open("w") as o, err.open("w") as e:
            cmd = [sys.executable, str(WORKER), str(i), str(NUM_PROCESSES), str(port)]
            procs.append((subprocess.Popen(cmd, stdout=o, stderr=e, env=env), out, err))
    deadline = time.monotonic() + TIMEOUT_S
    try:
        for proc, _, _ in procs:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        pass  # reported below with the processes' output
    finally:
        for proc, _, _ in procs:  # past the deadline, or left waiting on a dead peer
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return [(proc.returncode, out.read_text(), err.read_text()) for proc, out, err in procs]


def test_two_processes_match_one_device(tmp_path):
    results = _launch(tmp_path)
    if any("already in use" in err for _, _, err in results):  # the free port was taken
        results = _launch(tmp_path)
    report = "\n\n".join(
        f"process {i}: exit {code}\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"
        for i, (code, out, err) in enumerate(results)
    )
    checked: dict[str, str] = {}
    for _, out, _ in results:  # each process prints its checks as one JSON line, last
        lines = out.strip().splitlines()
        if lines and lines[-1].startswith("{"):
            checked.update(json.loads(lines[-1]))
    failed = {name: trace for name, trace in checked.items() if trace != "ok"}
    assert not failed, "\n\n".join(f"{name}:\n{trace}" for name, trace in failed.items())
    assert all(code == 0 for code, _, _ in results), report
    assert set(checked) == EXPECTED, report

"""Sharded parameters and data on 8 simulated CPU devices (a subprocess: see sharded_checks.py).

One test item, so that under pytest-xdist the subprocess runs once, on one worker; its
failure message names every check that failed, with its traceback.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("sharded_checks.py")
# Read the names without importing the script: importing it would set XLA_FLAGS here.
CHECKS = re.findall(r"^@check\ndef (\w+)\(", SCRIPT.read_text(), flags=re.M)


@pytest.mark.slow
def test_sharded_checks_on_8_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(results) == sorted(CHECKS)
    failed = {name: trace for name, trace in results.items() if trace != "ok"}
    assert not failed, "\n\n".join(f"{name}:\n{trace}" for name, trace in failed.items())

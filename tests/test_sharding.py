"""Sharded parameters and data on 8 simulated CPU devices (a subprocess: see sharded_checks.py)."""

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


@pytest.fixture(scope="module")
def results():
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
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", list(CHECKS))
def test_sharded(results, name):
    assert results[name] == "ok", results[name]

"""The command line runs and prints what it promises."""

import subprocess
import sys

import pytest

from hessfree._cli import main


def test_demo_prints_seed_answer_and_tables(capsys):
    assert main(["demo", "--d", "300"]) == 0
    out = capsys.readouterr().out
    assert "hvp_jvp_of_grad(x, A, v)  = [2. 0.]" in out
    assert "results equal" in out and "flops" in out and "jit ms" in out
    assert "jvp_of_grad (fwd_rev)" in out and "grad_of_grad (rev_rev)" in out


def test_bench_prints_mode_table(capsys):
    assert main(["bench", "quadratic", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for row in (
        "grad",
        "raw fwd_rev",
        "raw rev_rev",
        "raw rev_fwd",
        "hessfree hvp(auto)",
        "cached",
    ):
        assert row in out


def test_bench_rejects_unknown_workload(capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown workload" in capsys.readouterr().out


def test_python_dash_m_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "hessfree", "--help"], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])


@pytest.mark.slow
def test_spectrum_command_writes_the_figure(tmp_path):
    # In a fresh interpreter, as a user runs it.
    out = tmp_path / "spectrum.png"
    proc = subprocess.run(
        [sys.executable, "-m", "hessfree", "spectrum", "--out", str(out), "--k", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert out.exists() and out.stat().st_size > 1000
    assert "eigenvalue" in proc.stdout.lower()
    assert "top-2 eigenvalues" in proc.stdout and "converged: True" in proc.stdout
    assert "[3/3]" in proc.stderr


def test_spectrum_subcommand_survives_importing_its_module():
    import hessfree._cli as cli
    import hessfree._cli.analysis  # noqa: F401  (as `from hessfree._cli.analysis import ...` does)

    run = cli._parser().parse_args(["spectrum"]).run
    assert callable(run) and run.__name__ == "spectrum"

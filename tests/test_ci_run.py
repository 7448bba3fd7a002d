""".ci/run: README's test command first; the slow tests (`-m slow`) as a second step only if the first passed and
enough of the budget is left; non-zero if either step fails, but not when the second collects no test. Run on a copy
of the script whose setup and Python are stand-ins that record their calls (instant)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$*" in
  *"-m slow"*) exit "$SLOW_STATUS" ;;
  *) exit "$FAST_STATUS" ;;
esac
"""


def run_ci(tmp_path: Path, fast: int, slow: int, budget: int = 5400,
           slow_needs: int = 60) -> tuple[int, list[str], str]:
    """Runs a copy of .ci/run whose pytest exits `fast` (step 1) and `slow` (step 2); (status, calls, output)."""
    (tmp_path / ".ci").mkdir()
    shutil.copy(REPO / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "setup_env.sh").write_text("true\n")
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.txt"
    env = {**os.environ, "CALLS": str(calls), "FAST_STATUS": str(fast), "SLOW_STATUS": str(slow),
           "CI_BUDGET_S": str(budget), "CI_SLOW_NEEDS_S": str(slow_needs)}
    result = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True, text=True,
                            timeout=60)
    listed = calls.read_text().splitlines() if calls.exists() else []
    return result.returncode, listed, result.stdout + result.stderr


def test_readme_command_then_the_slow_tests(tmp_path):
    status, calls, _ = run_ci(tmp_path, fast=0, slow=0)
    assert status == 0 and calls == ["-m pytest -q", "-m pytest -q -m slow"]


def test_a_failing_first_step_fails_ci_and_skips_the_slow_tests(tmp_path):
    status, calls, _ = run_ci(tmp_path, fast=1, slow=0)
    assert status == 1 and calls == ["-m pytest -q"]


@pytest.mark.parametrize("slow, expected", [(1, 1), (5, 0)])  # 5: no test collected is not a failure
def test_the_second_steps_status(tmp_path, slow, expected):
    status, calls, output = run_ci(tmp_path, fast=0, slow=slow)
    assert status == expected and len(calls) == 2
    assert ("collected no test" in output) == (slow == 5) and ("failed (exit status 1)" in output) == (slow == 1)


def test_the_slow_tests_are_skipped_when_the_budget_is_short(tmp_path):
    status, calls, output = run_ci(tmp_path, fast=0, slow=1, budget=100, slow_needs=200)
    assert status == 0 and calls == ["-m pytest -q"]
    assert "step 2 (pytest -m slow) skipped: it needs 200 s" in output

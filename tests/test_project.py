"""The project's own contracts that no module test covers: CI runs the lint and every test
under a per-test timeout, and the ``slow`` marker means what pyproject.toml says."""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PYTEST = PYPROJECT["tool"]["pytest"]["ini_options"]


def _names(requirements: list[str]) -> set[str]:
    return {r.split(">")[0].split("=")[0].split("[")[0].strip() for r in requirements}


def test_ci_runs_the_lint_and_the_tests():
    commands = [shlex.split(line) for line in (ROOT / ".ci/run").read_text().splitlines()
                if line.strip() and not line.lstrip().startswith("#")]  # fmt: skip
    assert ["ruff", "check", "src", "tests", "bench", "scripts"] in commands
    assert ["python", "-m", "pytest", "-q"] in commands
    assert commands.index(["python", "-m", "pytest", "-q"]) == len(commands) - 1


def test_every_test_has_a_timeout(request):
    assert "pytest-timeout" in _names(PYPROJECT["project"]["optional-dependencies"]["test"])
    assert 60 <= int(PYTEST["timeout"]) <= 1200
    if request.config.pluginmanager.hasplugin("timeout"):  # this run has it too
        assert float(request.config.getini("timeout")) == float(PYTEST["timeout"])


def test_the_default_run_includes_slow_tests():
    """pyproject.toml says slow tests run by default (``-m "not slow"`` leaves them out): no
    marker filter in addopts, and the one slow test (the q4/q8 quality bounds) needs no file
    outside the repository."""
    assert "-m" not in shlex.split(PYTEST.get("addopts", ""))
    assert any(m.startswith("slow:") for m in PYTEST["markers"])
    assert (ROOT / "tests/data/demo-heldout.txt").is_file()

"""The repository's own checks, run by the test command and so by CI: ruff (lint and format) over
the repository and mypy (strict, configured in pyproject.toml) over the package."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("ruff", "check", "--no-cache", "."), id="ruff-lint"),
        pytest.param(("mypy",), id="mypy"),
    ],
)
def test_the_repository_passes(command: tuple[str, ...]) -> None:
    result = run(*command)
    assert result.returncode == 0, f"{' '.join(command)} found:\n{result.stdout}{result.stderr}"

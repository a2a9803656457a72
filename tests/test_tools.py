"""The repository's own checks, run by the test command and so by CI: ruff (lint and format) over
the repository, mypy (strict, configured in pyproject.toml) over the package, and the documentation
site's strict build (a broken reference or a public object without a docstring fails it)."""

import importlib.util
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fixtures import sphinx

import attn_consistency

REPO = Path(__file__).resolve().parents[1]


def run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("ruff", "check", "--no-cache", "."), id="ruff-lint"),
        pytest.param(("ruff", "format", "--check", "--no-cache", "."), id="ruff-format"),
        pytest.param(("mypy",), id="mypy"),
    ],
)
def test_the_repository_passes(command: tuple[str, ...]) -> None:
    result = run(*command)
    assert result.returncode == 0, f"{' '.join(command)} found:\n{result.stdout}{result.stderr}"


def test_the_documentation_builds_strictly(docs_build) -> None:
    result = docs_build.result  # the build of conftest.py, which tests/test_docs_offline.py reads too
    assert result.returncode == 0, f"the documentation build failed:\n{result.stdout}{result.stderr}"
    api = (docs_build.html / "api.html").read_text()
    for name in attn_consistency.__all__:  # every public object has its entry in the API reference
        module = getattr(attn_consistency, name).__module__  # documented there, or by its package (cam.hook: cam)
        assert any(f'id="{path}.{name}"' in api for path in (module, module.rsplit(".", 1)[0])), name
    presets = (docs_build.html / "reproduction.html").read_text()
    assert "wider-r50-acfs" in presets and "coco-r101-acfs" in presets  # the generated table of presets


def test_a_broken_reference_fails_the_build(tmp_path: Path) -> None:
    # One build for both sides (each build of the API reference takes 10-20 s here): a method
    # referenced as users import it resolves, one that does not exist fails the build, and it is
    # the build's one problem, so that without it the build would pass.
    source = tmp_path / "source"
    source.mkdir()
    good, broken = "{meth}`~attn_consistency.Ramp.state_dict`", "{meth}`~attn_consistency.Ramp.no_such_method`"
    # the API reference of the site (every module of the package), and the two references
    (source / "index.md").write_text((REPO / "docs" / "api.md").read_text() + f"\n{good}\n\n{broken}\n")
    result = sphinx(source, tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr  # warnings made errors; 2 would be a crash
    problems = [line for line in result.stderr.splitlines() if any(f"{k}:" in line for k in ("WARNING", "ERROR"))]
    assert len(problems) == 1, result.stderr
    assert "reference target not found: attn_consistency.Ramp.no_such_method" in problems[0], result.stderr
    assert "state_dict" not in result.stderr


def test_a_missing_docstring_fails_the_build(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    spec = importlib.util.spec_from_file_location("docs_conf", REPO / "docs" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    with caplog.at_level(logging.WARNING):
        conf._check_docstrings(None)
    assert not caplog.records
    monkeypatch.setattr(attn_consistency.Ramp, "__doc__", None)
    monkeypatch.setattr(attn_consistency.strength.Ramp.state_dict, "__doc__", None)
    with caplog.at_level(logging.WARNING):
        conf._check_docstrings(None)
    messages = [record.getMessage() for record in caplog.records]
    assert "attn_consistency.Ramp has no docstring" in messages
    assert "attn_consistency.strength.Ramp.state_dict has no docstring" in messages

"""Shared pytest setup: makes the repository root importable so tests can import ``examples``,
runs torch on one thread, shrinks the ResNets of the preset tests and builds the docs once."""

import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest
import torch
from fixtures import DOCS, sphinx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# one thread for the whole session, the package's doctests included (this file's fixtures reach
# only the tests under tests/): see one_thread
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def one_thread():
    """Run torch on one thread, in every test (a test that needs more sets them; the session's
    count is restored after each test). On a busy 2-core machine OpenMP threads spin against each
    other: a 32 px ResNet-50 step took 10-20x longer with 2 threads than with 1, and a tiny model's
    many small ops slow down the same way (test_cam, test_transforms and test_cam_hardening took
    70-113 s with torch's 2 threads beside other jobs, 18-44 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SLIM_WIDTH = 4  # torchvision's width_per_group: 64 in ResNet-50 and -101


@pytest.fixture
def slim_resnets(monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's randomly initialised ResNet-50 and ResNet-101, as ``build_model`` gets them
    for the presets, at 1/16 of their bottleneck width: the same blocks (23 in ResNet-101's
    layer3), the same state-dict keys and the same 2048-wide features for the head, with 6M
    parameters instead of 26-45M. A preset's one-step run then writes a checkpoint of 25 MB, not
    180-400 MB, and its step and evaluation take a fraction of the time. ImageNet weights
    (``weights="DEFAULT"``) keep the real width; a weights file must be written at this width."""
    import torchvision

    get_model = torchvision.models.get_model

    def slim(name: str, **config: object) -> torch.nn.Module:
        if name in ("resnet50", "resnet101") and config.get("weights") is None:
            config.setdefault("width_per_group", SLIM_WIDTH)
        return get_model(name, **config)

    monkeypatch.setattr(torchvision.models, "get_model", slim)


class DocsBuild(NamedTuple):
    result: subprocess.CompletedProcess[str]
    html: Path


@pytest.fixture(scope="session")
def docs_build(tmp_path_factory: pytest.TempPathFactory) -> DocsBuild:
    """The documentation site built once per session with the strict command (fixtures.sphinx),
    for the tests that check the build and those that read its pages: each build took 10-15 s."""
    out = tmp_path_factory.mktemp("docs")
    return DocsBuild(sphinx(DOCS, out), out / "html")

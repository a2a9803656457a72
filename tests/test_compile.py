"""The recording path under torch.compile, host-device synchronisations of a step, and what the import loads."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from attn_consistency import (
    AttentionConsistencyLoss,
    CAMHook,
    MultiScaleHeads,
    WeightedBCEWithLogitsLoss,
    positive_ratio,
)


class GapFc(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.body(x)).flatten(1))


def _model() -> GapFc:
    torch.manual_seed(0)
    return GapFc()


def test_a_forward_with_a_camhook_compiles_as_one_graph() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    x = torch.randn(4, 3, 28, 28)
    with CAMHook(model) as cam:
        expected_logits = model(x)  # the first forward finds and checks the head, eagerly
        (expected,) = cam.pop()
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
        for _ in range(3):
            logits = compiled(x)
            (heatmaps,) = cam.pop()
            torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(heatmaps, expected, rtol=1e-6, atol=1e-6)
        assert heatmaps.requires_grad
        # the maps carry gradients through the compiled graph, as eager ones do
        (grad,) = torch.autograd.grad(heatmaps.square().sum(), model.body[3].weight)
        (expected_grad,) = torch.autograd.grad(expected.square().sum(), model.body[3].weight)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] == 1  # no recompilation from one call to the next
    assert not counters["graph_break"]


def test_a_forward_with_side_heads_compiles_as_one_graph() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    heads = MultiScaleHeads(model, ["body.2", "body.4"], num_labels=5, channels={"body.2": 8, "body.4": 16})
    x = torch.randn(2, 3, 28, 28)
    expected_logits = model(x)
    (expected,) = heads.pop()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    for _ in range(2):
        logits = compiled(x)
        (record,) = heads.pop()
        torch.testing.assert_close(logits, expected_logits, rtol=1e-6, atol=1e-6)
        assert set(record.heatmaps) == set(expected.heatmaps) == {"body.2", "body.4"}
        for stage, maps in expected.heatmaps.items():
            torch.testing.assert_close(record.heatmaps[stage], maps, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(record.logits[stage], expected.logits[stage], rtol=1e-6, atol=1e-6)
    heads.remove()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]


def test_forwards_without_pop_in_between_stay_right_through_recompilation() -> None:
    # The recording hook appends to a Python list, and dynamo guards on its length: compiled
    # forwards without pop() in between recompile once per length, up to dynamo's recompile
    # limit, after which the frame runs eagerly. Measured here: 12 forwards, 8 graphs. The maps
    # must stay right through all of it; a step that pops (views() does) keeps one graph (above).
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _model()
    x = torch.randn(2, 3, 28, 28)
    with CAMHook(model, max_stored=32) as cam:
        model(x)
        (expected,) = cam.pop()
        compiled = torch.compile(model, backend="eager")
        for _ in range(12):
            compiled(x)
        recorded = cam.pop()
    assert len(recorded) == 12
    for maps in recorded:
        torch.testing.assert_close(maps, expected, rtol=1e-6, atol=1e-6)
    assert 1 < counters["stats"]["unique_graphs"] <= torch._dynamo.config.recompile_limit


class _Syncs(TorchDispatchMode):
    """Counts the ops that make the host wait for the device (a value read or a data-dependent shape)."""

    NAMES = ("_local_scalar_dense", "item", "nonzero", "is_nonzero", "masked_select", "unique")

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func.overloadpacket.__name__
        if name in self.NAMES:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def _four_view_steps(steps: int, diagnostics: bool) -> list[list[str]]:
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    generator = torch.Generator().manual_seed(1)
    targets = (torch.rand(4, 5, generator=generator) > 0.5).float()
    # check_values / check_finite_values False: the data checks that run by default on CPU tensors
    # (and never on an accelerator) read values; this is the accelerator's setting, counted on the CPU
    criterion = WeightedBCEWithLogitsLoss(positive_ratio(targets), check_values=False, check_finite_values=False)
    loss_fn = AttentionConsistencyLoss(check_finite_values=False, diagnostics=diagnostics)
    counts = []
    with CAMHook(model) as cam:
        for _ in range(steps):
            images = torch.randn(4, 3, 28, 28, generator=generator)
            with _Syncs() as mode:
                out = loss_fn.views(model, cam, images, ["flip", "scale"], mode="product", targets=targets,
                                    criterion=criterion)  # fmt: skip
                optimizer.zero_grad()
                out.total.backward()
                optimizer.step()
            counts.append(mode.seen)
    return counts


def test_the_four_view_step_reads_no_value_from_the_device_in_its_steady_state() -> None:
    counts = _four_view_steps(4, diagnostics=False)
    # the first step's forward finds and checks the head (it reads values, once)
    assert counts[0], "the first forward's check reads values: a mode that counts nothing counts nothing"
    assert counts[1:] == [[], [], []], counts[1:]


def test_the_diagnostics_read_at_most_once_per_step() -> None:
    counts = _four_view_steps(4, diagnostics=True)
    assert all(len(seen) <= 1 for seen in counts[1:]), counts[1:]


def test_the_import_loads_no_compiler() -> None:
    code = "import sys, attn_consistency; print(sorted(m for m in ('torch._dynamo', 'kornia', 'timm') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_the_top_level_serves_exactly_the_models_names() -> None:
    # the lazy names of attn_consistency are listed by hand beside attn_consistency.models.__all__
    import attn_consistency
    from attn_consistency import models

    assert attn_consistency._MODELS == set(models.__all__)
    assert all(getattr(attn_consistency, name) is getattr(models, name) for name in models.__all__)

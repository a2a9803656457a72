"""Tests of the benchmark script (benchmarks/run.py). Timings themselves are never asserted."""

import json
import math

import pytest
import torch

from benchmarks import run
from benchmarks.harness import summarize
from benchmarks.reference import grid_flip, lcm_scale_mse
from benchmarks.training_step import VARIANTS

STEP_KEYS = {"times_s", "n", "median", "q1", "q3", "iqr", "min", "max", "memory"}


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def smoke_result(tmp_path_factory):
    output = tmp_path_factory.mktemp("bench") / "smoke.json"
    returned = run.main(["--preset", "smoke", "--output", str(output)])
    return returned, json.loads(output.read_text()), output.with_suffix(".md").read_text()


def test_smoke_benchmark_writes_a_well_formed_result(smoke_result):
    returned, result, _ = smoke_result
    assert result == json.loads(json.dumps(returned))
    assert result["command"].startswith("python -m benchmarks.run --preset smoke")
    for key in ("torch", "torchvision", "kornia", "cpu", "platform", "torch_threads"):
        assert result["environment"][key]
    assert result["settings"]["preset"] == "smoke"
    assert len(result["load_average"]["start"]) == 3

    (step,) = result["step"]
    assert set(step["variants"]) == set(VARIANTS)
    for stats in step["variants"].values():
        assert STEP_KEYS <= set(stats)
        assert len(stats["times_s"]) == stats["n"] == result["settings"]["steps"]
        assert all(_positive_finite(t) for t in stats["times_s"])
        assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
        assert _positive_finite(stats["memory"]["call_peak_bytes"])
    medians = {name: stats["median"] for name, stats in step["variants"].items()}
    assert step["ratios"]["c/b"] == pytest.approx(medians["c_consistency"] / medians["b_multiview"])
    assert step["ratios"]["b/a"] == pytest.approx(medians["b_multiview"] / medians["a_plain"])
    # flip + scale 32/24: (2 * 32^2 + 2 * 24^2) / 32^2, in two forwards of 2N
    assert step["pixel_ratio"] == pytest.approx((2 * 32**2 + 2 * 24**2) / 32**2)
    assert step["view_batch_shapes"] == [[4, 3, 32, 32], [4, 3, 24, 24]]


def test_smoke_loss_benchmarks_agree_with_the_reference(smoke_result):
    _, result, _ = smoke_result
    scale_terms = result["loss"]["scale_term"]
    assert [entry["direction"] for entry in scale_terms] == ["forward", "forward+backward"]
    for entry in scale_terms:
        assert set(entry["variants"]) == {"closed_form", "attention_consistency", "materialised_lcm"}
        assert all(error <= 1e-5 for error in entry["max_relative_error"].values())
        reference = entry["variants"]["materialised_lcm"]["median"]
        assert entry["speedups"]["closed_form"] == pytest.approx(reference / entry["variants"]["closed_form"]["median"])
    (consistency,) = result["loss"]["consistency"]
    assert consistency["batch_used"] == 2
    assert consistency["max_relative_error"] <= 1e-4
    library, authors = consistency["variants"]["library"], consistency["variants"]["authors"]
    assert consistency["speedup"] == pytest.approx(authors["median"] / library["median"])
    assert all(_positive_finite(t) for t in library["times_s"] + authors["times_s"])


def test_smoke_markdown_table(smoke_result):
    returned, _, table = smoke_result
    step = returned["step"][0]
    assert f"Command: `{returned['command']}`" in table
    assert (
        "| case | (a) plain | (b) views, cls only | (c) views + consistency | (c)/(b) | (b)/(a) | pixels (b)/(a) |"
        in table
    )
    row = next(line for line in table.splitlines() if line.startswith(f"| {step['label']} | "))
    assert f"| {step['ratios']['c/b']:.3f}; " in row
    assert "### Scale term alone" in table and "### Four-view consistency" in table


def test_cuda_presets_resolve_without_a_gpu(capsys):
    r50 = run.main(["--preset", "cuda-r50", "--dry-run"])
    assert len(r50["cases"]) == 4  # batch 32 and 64, eager and compile
    assert {(c["batch"], c["compile"]) for c in r50["cases"]} == {(32, False), (32, True), (64, False), (64, True)}
    assert all(c["precision"] == "bf16" and c["channels_last"] and c["arch"] == "resnet50" for c in r50["cases"])
    coco = run.main(["--preset", "cuda-r101-coco", "--dry-run", "--runner", "eager"])
    assert [(c["arch"], c["labels"], c["size"], c["scale_size"]) for c in coco["cases"]] == [
        ("resnet101", 80, 448, 384)
    ]
    assert "loss: coco448: N=64 L=80 C=2048 14x14 vs 12x12" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given when CUDA is missing")
def test_cuda_preset_without_a_gpu_fails_with_a_clear_message(capsys, tmp_path):
    with pytest.raises(SystemExit) as raised:
        run.main(["--preset", "cuda-r50", "--output", str(tmp_path / "r.json")])
    assert raised.value.code == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--arch", "resnet5"], "arch must be 'tiny' or a torchvision"),
        (["--loss-shapes", "1:2:3"], "loss shape must be one of"),
        (["--steps", "0"], "--steps must be >= 1"),
    ],
)
def test_bad_arguments_are_reported(argv, match, capsys):
    with pytest.raises(SystemExit):
        run.main(["--preset", "smoke", "--dry-run", *argv])
    assert match in capsys.readouterr().err


def test_summarize_quartiles_match_numpy_default():
    values = [5.0, 1.0, 4.0, 2.0, 3.0, 10.0]
    stats = summarize(values)
    expected = torch.quantile(
        torch.tensor(values, dtype=torch.float64), torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)
    )
    assert [stats["q1"], stats["median"], stats["q3"]] == pytest.approx(expected.tolist())
    assert (stats["min"], stats["max"], stats["iqr"]) == (
        1.0,
        10.0,
        pytest.approx(expected[2].item() - expected[0].item()),
    )


def test_reference_flip_and_lcm_oracles():
    m = torch.randn(2, 3, 5, 7, dtype=torch.float64)
    torch.testing.assert_close(grid_flip(m), m.flip(-1))
    m_t = torch.randn(2, 3, 4, 6, dtype=torch.float64)
    # 5x7 vs 4x6: LCM grid 20x42; nearest upsampling repeats each cell lcm/size times
    up = m.repeat_interleave(4, -2).repeat_interleave(6, -1)
    up_t = m_t.repeat_interleave(5, -2).repeat_interleave(7, -1)
    torch.testing.assert_close(lcm_scale_mse(m, m_t), ((up - up_t) ** 2).mean())


def test_smoke_with_stages_times_the_multiscale_step_beside_vac(tmp_path):
    # (d): MultiScaleHeads at three stages of the tiny net in place of the single CAMHook of (c)
    output = tmp_path / "stages.json"
    result = run.main(
        [
            "--preset",
            "smoke",
            "--parts",
            "step",
            "--stages",
            "features.1",
            "features.4",
            "features.7",
            "--output",
            str(output),
        ]
    )
    (step,) = result["step"]
    assert set(step["variants"]) == {*VARIANTS, "d_multiscale"}
    assert step["case"]["stages"] == ["features.1", "features.4", "features.7"]
    medians = {name: stats["median"] for name, stats in step["variants"].items()}
    assert step["ratios"]["d/c"] == pytest.approx(medians["d_multiscale"] / medians["c_consistency"])
    assert len(step["paired_ratios"]["d/c"]) and step["paired_ratios"]["d/c"]["n"] == result["settings"]["steps"]
    assert "| (d)/(c) |" in output.with_suffix(".md").read_text()
    with pytest.raises(SystemExit):
        run.main(["--preset", "smoke", "--dry-run", "--stages", "features.1", "features.1"])


def test_smoke_with_gradcam_times_the_fallback_beside_exact_maps(tmp_path):
    # (e): the step of (c) with CAMHook(method='gradcam'), (e)/(c) from one run
    output = tmp_path / "gradcam.json"
    result = run.main(["--preset", "smoke", "--parts", "step", "--gradcam", "--output", str(output)])
    (step,) = result["step"]
    assert set(step["variants"]) == {*VARIANTS, "e_gradcam"} and step["case"]["gradcam"] == "detached"
    medians = {name: stats["median"] for name, stats in step["variants"].items()}
    assert step["ratios"]["e/c"] == pytest.approx(medians["e_gradcam"] / medians["c_consistency"])
    assert "(e)/(c)" in output.with_suffix(".md").read_text()

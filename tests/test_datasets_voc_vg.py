"""PASCAL VOC 2007 and VG-500 readers (examples.datasets) on fixtures in the distributed formats,
and VOC's metrics with difficult entries against scikit-learn."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import VOC_NAMES, noise, save, write_vg500, write_voc
from sklearn.metrics import average_precision_score

from attn_consistency.metrics import average_precision, label_based_metrics
from examples.datasets import VG500, VOC2007, VOC_CLASSES

VOC_LABELS = {
    "000005": {"chair": 1, "diningtable": 0},
    "000007": {"car": 1},
    "000009": {"horse": 1, "person": 1, "chair": 0},
    "000012": {"car": 0, "person": -1},
}


def _expected(labels: dict[str, dict[str, int]]) -> torch.Tensor:
    return torch.tensor(
        [[values.get(name, -1) for name in VOC_NAMES] for values in labels.values()], dtype=torch.float32
    )


@pytest.fixture
def voc_root(tmp_path: Path) -> Path:
    write_voc(tmp_path, VOC_LABELS)
    return tmp_path


@pytest.mark.parametrize("source", ["imagesets", "annotations"])
def test_voc_reads_the_three_values_from_either_source(voc_root: Path, source: str) -> None:
    data = VOC2007(voc_root, "trainval", source=source)
    assert data.label_names == VOC_NAMES == list(VOC_CLASSES)
    assert data.encoding == "signed"
    assert torch.equal(data.targets, _expected(VOC_LABELS))
    assert [p.name for p in data.image_paths] == [f"{i}.jpg" for i in VOC_LABELS]
    image, target = data[2]
    assert image.size == (40, 30) and image.mode == "RGB"
    assert torch.equal(target, _expected(VOC_LABELS)[2])
    assert data.entries[0].endswith("trainval.txt: line 1")


def test_voc_root_may_be_the_voc2007_folder_itself(voc_root: Path) -> None:
    data = VOC2007(voc_root / "VOCdevkit" / "VOC2007", "trainval")
    assert torch.equal(data.targets, _expected(VOC_LABELS))


def _main(root: Path) -> Path:
    return root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"


@pytest.mark.parametrize(
    "content, match",
    [
        (
            "000005 -1\n000007  2\n000009 -1\n000012 -1\n",
            r"car_trainval.txt: line 2 is '000007  2', expected '<image id> <1, -1 or 0>'",
        ),
        ("000005 -1\n000007 1 1\n000009 -1\n000012 -1\n", r"car_trainval.txt: line 2 is"),
        ("000005 -1\n000009 -1\n000012 -1\n", r"car_trainval.txt: has no line for the image id '000007'"),
        (
            "000005 -1\n000007 1\n000009 -1\n000012 -1\n000099 1\n",
            r"car_trainval.txt: lists the id '000099', which is not in the image set",
        ),
        ("000005 -1\n000005 1\n000007 1\n000009 -1\n000012 -1\n", r"car_trainval.txt: line 2 repeats the id '000005'"),
    ],
)
def test_voc_malformed_class_file_names_file_and_line(voc_root: Path, content: str, match: str) -> None:
    (_main(voc_root) / "car_trainval.txt").write_text(content)
    with pytest.raises(ValueError, match=match):
        VOC2007(voc_root, "trainval")


def test_voc_missing_class_file_and_image_set(voc_root: Path) -> None:
    (_main(voc_root) / "sofa_trainval.txt").unlink()
    with pytest.raises(FileNotFoundError, match="class file not found: .*sofa_trainval.txt"):
        VOC2007(voc_root, "trainval")
    with pytest.raises(FileNotFoundError, match="image set file not found: .*test.txt"):
        VOC2007(voc_root, "test")
    with pytest.raises(ValueError, match="split must be one of"):
        VOC2007(voc_root, "train2007")
    with pytest.raises(ValueError, match="source must be 'imagesets' or 'annotations'"):
        VOC2007(voc_root, source="xml")


def test_voc_image_set_line_with_two_fields_and_repeated_id(voc_root: Path) -> None:
    path = _main(voc_root) / "trainval.txt"
    path.write_text("000005\n000007 x\n")
    with pytest.raises(ValueError, match=r"trainval.txt: line 2 is '000007 x', expected one image id"):
        VOC2007(voc_root)
    path.write_text("000005\n000007\n000009\n000012\n000007\n")
    with pytest.warns(UserWarning, match=r"skipped 1 of 5 entries.*line 5 repeats line 2"):
        data = VOC2007(voc_root)
    assert len(data) == 4 and data.skipped
    with pytest.raises(ValueError, match=r"line 5 repeats line 2"):
        VOC2007(voc_root, strict=True)


@pytest.mark.parametrize(
    "xml, match",
    [
        ("<annotation><object><name>car", "000007.xml: not valid XML"),
        (
            "<annotation><object><name>truck</name><difficult>0</difficult></object></annotation>",
            r"000007.xml: object\[0\] has the name 'truck'",
        ),
        (
            "<annotation><object><name>car</name><difficult>2</difficult></object></annotation>",
            r"000007.xml: object\[0\].difficult is '2'",
        ),
    ],
)
def test_voc_malformed_annotation_names_file_and_object(voc_root: Path, xml: str, match: str) -> None:
    (voc_root / "VOCdevkit" / "VOC2007" / "Annotations" / "000007.xml").write_text(xml)
    with pytest.raises(ValueError, match=match):
        VOC2007(voc_root, source="annotations")


def test_voc_missing_image_names_path_and_entry(voc_root: Path) -> None:
    (voc_root / "VOCdevkit" / "VOC2007" / "JPEGImages" / "000009.jpg").unlink()
    data = VOC2007(voc_root)
    with pytest.raises(FileNotFoundError, match=r"000009.jpg \(from .*trainval.txt: line 3\)"):
        data[2]


def test_voc_metrics_with_difficult_entries_match_sklearn_with_those_dropped() -> None:
    generator = torch.Generator().manual_seed(0)
    targets = torch.randint(-1, 2, (60, 20), generator=generator).float()  # 1 / -1 / 0 = difficult
    targets[:3] = 1  # every class has positives
    targets[3:6] = -1  # and negatives
    scores = torch.randn(60, 20, generator=generator) + targets  # informative, not perfect
    per_class = average_precision(scores, targets, encoding="signed")
    oracle = []
    for j in range(20):
        kept = (targets[:, j] != 0).numpy()
        oracle.append(average_precision_score((targets[kept, j] == 1).numpy(), scores[kept, j].numpy()))
    np.testing.assert_allclose(per_class.numpy(), oracle, rtol=1e-6)
    assert label_based_metrics(scores, targets, encoding="signed")["mAP"] == pytest.approx(
        float(np.mean(oracle)), rel=1e-6
    )
    # keeping the difficult entries as negatives gives another value: the test can tell
    as_negative = [average_precision_score((targets[:, j] == 1).numpy(), scores[:, j].numpy()) for j in range(20)]
    assert not np.allclose(as_negative, oracle)


# ---------------------------------------------------------------- VG-500

VG_SPLITS = {
    "train": {"2328403.jpg": [0, 17, 499], "1680.jpg": [3], "512.jpg": []},
    "test": {"2336863.jpg": [17, 3]},
}


@pytest.fixture
def vg_root(tmp_path: Path) -> Path:
    write_vg500(tmp_path, VG_SPLITS)
    return tmp_path


def test_vg500_reads_the_ssgrl_split(vg_root: Path) -> None:
    data = VG500(vg_root, "train")
    assert len(data) == 3 and data.encoding == "binary"
    assert data.label_names[:2] == ["0", "1"] and len(data.label_names) == 500
    expected = torch.zeros(3, 500)
    expected[0, [0, 17, 499]] = 1
    expected[1, 3] = 1
    assert torch.equal(data.targets, expected)
    image, target = data[1]
    assert image.size == (40, 30) and torch.equal(target, expected[1])
    test = VG500(vg_root, "test")
    assert torch.nonzero(test.targets[0]).flatten().tolist() == [3, 17]


def test_vg500_finds_images_in_the_second_image_folder(vg_root: Path) -> None:
    (vg_root / "VG_100K" / "1680.jpg").rename(vg_root / "1680.jpg")
    save(vg_root / "VG_100K_2" / "1680.jpg", noise((20, 10), 7))
    data = VG500(vg_root, "train")
    assert data.image_paths[1] == vg_root / "VG_100K_2" / "1680.jpg"
    assert data[1][0].size == (20, 10)


@pytest.mark.parametrize(
    "labels, match",
    [
        (
            {"2328403.jpg": [0, 500], "1680.jpg": [3], "512.jpg": []},
            r"vg_category_500_labels_index.json: '2328403.jpg' is \[0, 500\], expected a list of label indices in 0..499",
        ),
        ({"2328403.jpg": [0], "1680.jpg": "3", "512.jpg": []}, r"'1680.jpg' is '3'"),
        ({"2328403.jpg": [0], "1680.jpg": [True], "512.jpg": []}, r"'1680.jpg' is \[True\]"),
        (
            {"2328403.jpg": [0], "512.jpg": []},
            r"vg_category_500_labels_index.json: has no entry for '1680.jpg' \(.*train_list_500.txt: line 2\)",
        ),
    ],
)
def test_vg500_malformed_labels_name_file_and_entry(vg_root: Path, labels: dict, match: str) -> None:
    (vg_root / "vg_category_500_labels_index.json").write_text(json.dumps(labels))
    with pytest.raises(ValueError, match=match):
        VG500(vg_root, "train")


def test_vg500_missing_files_repeats_and_empty_lists(vg_root: Path) -> None:
    (vg_root / "train_list_500.txt").write_text("2328403.jpg\n\n1680.jpg\n2328403.jpg\n")
    with pytest.warns(UserWarning, match=r"skipped 1 of 3 entries.*line 4 repeats line 1"):
        assert len(VG500(vg_root, "train")) == 2
    (vg_root / "train_list_500.txt").write_text("\n")
    with pytest.raises(ValueError, match="train_list_500.txt: holds no sample"):
        VG500(vg_root, "train")
    (vg_root / "test_list_500.txt").unlink()
    with pytest.raises(FileNotFoundError, match="image list not found: .*test_list_500.txt"):
        VG500(vg_root, "test")
    (vg_root / "vg_category_500_labels_index.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="vg_category_500_labels_index.json: the top level is a JSON list"):
        VG500(vg_root, "train")


# ---------------------------------------------------------------- issue 18: the file or argument at fault


@pytest.mark.parametrize("content", ["", "\n\n"])
def test_voc_empty_image_set_is_blamed_not_the_first_class_file(voc_root: Path, content: str) -> None:
    (_main(voc_root) / "trainval.txt").write_text(content)
    with pytest.raises(ValueError) as error:
        VOC2007(voc_root, "trainval")
    assert str(error.value) == f"{_main(voc_root) / 'trainval.txt'}: holds no sample"


@pytest.mark.parametrize(
    ("num_labels", "error", "message"),
    [
        (0, ValueError, "num_labels must be a positive int, got 0"),
        (-1, ValueError, "num_labels must be a positive int, got -1"),
        ("500", TypeError, "num_labels must be a positive int, got str '500'"),
        (500.0, TypeError, "num_labels must be a positive int, got float 500.0"),
    ],
)
def test_vg500_num_labels_is_checked_by_name(vg_root: Path, num_labels, error, message: str) -> None:
    with pytest.raises(error) as raised:
        VG500(vg_root, "train", num_labels=num_labels)
    assert str(raised.value) == message

"""The code of the README and of the documentation pages runs as written, so it cannot rot.

Every Python block of README.md and docs/*.md is a named snippet (``<!-- snippet: NAME -->`` before
it), a snippet that appears on several pages holds the same code on each, and every name is run by a
test: here, in tests/test_lightning.py (``lightning``), tests/test_aamn_train.py (``aamn``) and
tests/test_docs_offline.py (the index page's)."""

import re
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = [README, *sorted((REPO / "docs").glob("*.md"))]
SNIPPET = re.compile(r"<!-- snippet: (\S+) -->\s*```python\n(.*?)```", flags=re.S)

# where each snippet is shown: the README's drop-in snippet, the rest on the docs page of its topic
WHERE = {
    "README.md": {"setup", "consistency-loop"},
    "docs/index.md": {"setup", "consistency-loop"},
    "docs/drop-in.md": {"setup", "plain-loop", "consistency-loop", "one-transform"},
    "docs/heatmaps.md": {"transformer"},
    "docs/frameworks.md": {"lightning"},
    "docs/msac.md": {"msac-loop", "msac-predict"},
    "docs/aamn.md": {"aamn"},
}
# run by this file, except lightning (tests/test_lightning.py) and aamn (tests/test_aamn_train.py)
EXECUTED = {"setup", "plain-loop", "consistency-loop", "one-transform", "msac-loop", "msac-predict", "transformer"}
EXECUTED_ELSEWHERE = {"lightning", "aamn"}


def page_snippets(path: Path) -> dict[str, str]:
    return dict(SNIPPET.findall(path.read_text()))


def snippets() -> dict[str, str]:
    """Every named snippet of the README and the docs pages, by name (the same code wherever it
    appears: test_a_snippet_holds_the_same_code_on_every_page)."""
    found: dict[str, str] = {}
    for path in PAGES:
        for name, code in page_snippets(path).items():
            found.setdefault(name, code)
    return found


def where(name: str) -> str:
    return next(str(path.relative_to(REPO)) for path in PAGES if name in page_snippets(path))


def test_readme_has_the_drop_in_snippet():
    assert set(page_snippets(README)) == {"setup", "consistency-loop"}


def test_each_snippet_is_on_the_page_of_its_topic():
    shown = {str(path.relative_to(REPO)): set(page_snippets(path)) for path in PAGES}
    assert {page: names for page, names in shown.items() if names} == WHERE


def test_a_snippet_holds_the_same_code_on_every_page():
    for name in snippets():
        versions = {str(path.relative_to(REPO)): page_snippets(path).get(name) for path in PAGES}
        codes = {code for code in versions.values() if code is not None}
        assert len(codes) == 1, f"the snippet {name!r} differs between {[p for p, c in versions.items() if c]}"


def test_every_python_block_is_a_snippet_a_test_runs():
    for path in PAGES:
        text = path.read_text()
        blocks = len(re.findall(r"^```python$", text, flags=re.M))
        assert blocks == len(SNIPPET.findall(text)), f"{path.name} has a Python block with no snippet marker"
    assert set(snippets()) == EXECUTED | EXECUTED_ELSEWHERE


def test_quick_start_has_exactly_two_commands():
    text = README.read_text()
    block = re.search(r"## Quick start\n.*?```bash\n(.*?)```", text, flags=re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]
    assert len(commands) == 2
    assert "examples.demo" in commands[0] and "pytest" in commands[1]
    # CI runs the README's test command, as written there
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if "pytest" in line]
    assert ci == [commands[1]]


def run(*names: str, namespace: dict | None = None) -> dict:
    code = snippets()
    namespace = {} if namespace is None else namespace
    for name in names:
        exec(compile(code[name], f"{where(name)}:{name}", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("following", ["plain-loop", "consistency-loop", "one-transform"])
def test_snippet_trains_the_model(following):
    namespace = run("setup")
    before = namespace["model"].layer1[0].conv1.weight.detach().clone()
    run(following, namespace=namespace)
    after = namespace["model"].layer1[0].conv1.weight
    assert bool(namespace["loss"].isfinite())
    assert namespace["loss"].requires_grad and namespace["loss"].grad_fn is not None
    assert not bool((after == before).all()), "the snippet's optimizer step changed nothing"


def test_consistency_snippet_runs_the_authors_four_views():
    namespace = run("setup", "consistency-loop")
    out = namespace["out"]
    assert set(out.terms) == {"flip@224", "flip@192", "scale"}
    assert len(out.logits) == 4
    # every term is computed; two steps are too few for the warm-up to start
    assert all(float(term.detach()) > 0 for term in out.terms.values())
    assert float(out.loss.detach()) == 0.0 and namespace["consistency"].multiplier == 0.0


def test_one_transform_snippet_pairs_two_views():
    namespace = run("setup", "one-transform")
    assert namespace["heatmaps"].shape == namespace["heatmaps_t"].shape == (4, 14, 7, 7)


def test_consistency_snippet_uses_the_recommended_setting():
    from examples.train import RECOMMENDED

    namespace = run("setup", "consistency-loop")
    consistency = namespace["consistency"]
    steps = len(namespace["loader"])  # the snippet's run: one epoch
    assert consistency.distance == RECOMMENDED["distance"]
    assert consistency.weights == RECOMMENDED.get("weights", {})
    assert consistency.schedule.steps == round(RECOMMENDED["warmup"] * steps)
    assert consistency.schedule.trigger == RECOMMENDED["warmup_trigger"]
    assert consistency.schedule.delay == round(RECOMMENDED.get("warmup_delay", 0.0) * steps)
    assert consistency.steps == steps  # views() counted every step


@pytest.mark.parametrize("backbone", ["torchvision", "timm"])
def test_msac_snippets_train_the_side_heads_and_predict_with_them(backbone, one_thread):
    namespace = run("setup")
    # the setup's stand-in data at 64 px (8/4/2 maps at the three stages): the same code, a tenth of the time
    targets = namespace["train_targets"]
    namespace["loader"] = [(torch.randn(4, 3, 64, 64), targets[i : i + 4]) for i in (0, 4)]
    if backbone == "timm":  # the same lines on a timm ResNet, whose stages have the same names
        timm = pytest.importorskip("timm")
        torch.manual_seed(0)
        namespace["model"] = timm.create_model("resnet18", pretrained=False, num_classes=14)
    before = namespace["model"].layer2[0].conv1.weight.detach().clone()
    run("msac-loop", "msac-predict", namespace=namespace)
    out, heads = namespace["out"], namespace["heads"]
    stages = ("layer2", "layer3", "layer4")
    assert heads.stages == stages
    assert set(out.terms) == {
        f"{t}/{s}" for t in ("flip@64", "flip@55", "scale") for s in stages
    }  # 2 x 3 flip, 3 scale
    assert all(term.item() > 0 for term in out.terms.values())
    assert out.total.grad_fn is not None and bool(out.total.isfinite())
    assert not torch.equal(namespace["model"].layer2[0].conv1.weight, before)  # the backbone trained
    assert all(p.grad is not None for p in heads.parameters())  # and every side head
    record_logits = namespace["record"].logits
    expected = torch.stack([record_logits[s] for s in stages] + [namespace["output"]]).mean(0)
    torch.testing.assert_close(namespace["scores"], expected)
    assert namespace["scores"].shape == (4, 14) and not namespace["scores"].requires_grad
    heads.remove()


def test_transformer_snippet_trains_a_vit_on_two_patch_grids(one_thread):
    pytest.importorskip("timm")
    namespace = run("setup", "transformer")
    vit, cam, out = namespace["vit"], namespace["cam"], namespace["out"]
    assert cam.layout == "tokens" and cam.norm is vit.fc_norm
    assert set(out.terms) == {"flip@224", "flip@192", "scale"}
    assert all(float(term.detach()) > 0 for term in out.terms.values())
    assert vit.patch_embed.proj.weight.grad is not None and bool(vit.patch_embed.proj.weight.grad.abs().sum() > 0)

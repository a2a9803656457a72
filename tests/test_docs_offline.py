"""The documentation site works with no network: its math is typeset by a MathJax copied into the
site (sphinx-mathjax-offline), no page loads a script or a stylesheet from elsewhere, and, where a
Chromium is installed, a headless browser opening the built pages from disk shows typeset math and
no raw TeX. The snippets of the index page run as written."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
MATH_PAGES = ["math.html", "api.html", "heatmaps.html"]  # the pages whose math was raw TeX offline


@pytest.fixture(scope="module")
def site(docs_build) -> Path:
    """The site, built once per session with the strict command (conftest.py's docs_build, which
    tests/test_tools.py checks too)."""
    result = docs_build.result
    assert result.returncode == 0, f"the documentation build failed:\n{result.stdout}{result.stderr}"
    return docs_build.html


class _Page(HTMLParser):
    """What a page loads (script sources, stylesheets) and the text a browser shows (outside scripts,
    styles and templates)."""

    HIDDEN = {"script", "style", "template", "noscript"}

    def __init__(self) -> None:
        super().__init__()
        self.scripts: list[str] = []
        self.stylesheets: list[str] = []
        self.hidden = 0
        self.parts: list[str] = []
        self.tags: set[str] = set()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        self.tags.add(tag)
        if tag == "script" and values.get("src"):
            self.scripts.append(str(values["src"]))
        if tag == "link" and "stylesheet" in (values.get("rel") or "").split() and values.get("href"):
            self.stylesheets.append(str(values["href"]))
        if tag in self.HIDDEN:
            self.hidden += 1

    def handle_endtag(self, tag: str) -> None:
        if tag in self.HIDDEN:
            self.hidden -= 1

    def handle_data(self, data: str) -> None:
        if not self.hidden:
            self.parts.append(data)

    @property
    def text(self) -> str:
        return "".join(self.parts)


def parse(html: str) -> _Page:
    page = _Page()
    page.feed(html)
    page.close()
    return page


def test_no_page_loads_anything_from_the_network(site: Path) -> None:
    pages = sorted(site.rglob("*.html"))
    assert len(pages) > 10
    remote = {}
    for path in pages:
        page = parse(path.read_text())
        urls = [url for url in page.scripts + page.stylesheets if re.match(r"(https?:)?//", url)]
        if urls:
            remote[str(path.relative_to(site))] = urls
    assert not remote, f"pages that load a script or stylesheet from the network: {remote}"


@pytest.mark.parametrize("name", MATH_PAGES)
def test_the_math_pages_load_the_mathjax_copied_into_the_site(site: Path, name: str) -> None:
    html = (site / name).read_text()
    assert r"\(" in html or r"\[" in html, f"{name} has no math to typeset"
    mathjax = [src for src in parse(html).scripts if "mathjax" in src.lower()]
    assert mathjax, f"{name} loads no MathJax"
    for src in mathjax:
        path = (site / name).parent / src.split("?")[0]
        assert path.is_file(), f"{name} loads {src}, which is not in the built site"
        # tex-chtml.js loads its fonts and the TeX packages it autoloads from beside itself
        assert (path.parent / "output" / "chtml" / "fonts" / "woff-v2").is_dir()
        assert (path.parent / "input" / "tex" / "extensions").is_dir()


@pytest.mark.parametrize("name", MATH_PAGES)
def test_a_headless_browser_shows_the_math_typeset(site: Path, name: str, tmp_path: Path) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("no chromium on PATH (apt-get install chromium): the offline math is not checked in a browser")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
    command += ["--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path}"]
    command += ["--virtual-time-budget=10000", "--dump-dom", (site / name).as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    dom = parse(result.stdout)
    assert "mjx-container" in dom.tags, f"MathJax typeset nothing on {name}"
    for delimiter in (r"\(", r"\["):
        at = dom.text.find(delimiter)
        assert at < 0, f"raw TeX left on {name}: ...{dom.text[max(at - 80, 0) : at + 80]}..."
    # math the Markdown parser did not hand to MathJax (e.g. a line of a formula read as a list
    # item) shows its TeX commands as text
    raw = re.search(r"\\(?:tfrac|frac|overline|mathrm|varepsilon|ell|sum|big|lVert|qquad)\b", dom.text)
    assert raw is None, f"raw TeX left on {name}: ...{dom.text[max(raw.start() - 80, 0) : raw.end() + 80]}..."


def index_snippets() -> dict[str, str]:
    text = (REPO / "docs" / "index.md").read_text()
    return dict(re.findall(r"<!-- snippet: (\S+) -->\s*```python\n(.*?)```", text, flags=re.S))


def test_the_index_page_starts_with_the_install_line_and_the_snippet() -> None:
    text = (REPO / "docs" / "index.md").read_text()
    install, snippet, contents = text.find("pip install -e ."), text.find("<!-- snippet:"), text.find("{toctree}")
    assert 0 <= install < snippet < contents
    for extra in ["examples", "timm", "tensorboard", "lightning", "docs", "pretrained", "dev"]:
        assert f"| `{extra}` |" in text, extra


@pytest.mark.usefixtures("one_thread")
def test_the_index_snippets_train_the_model() -> None:
    code = index_snippets()
    assert list(code) == ["setup", "consistency-loop"]
    namespace: dict[str, Any] = {}
    exec(compile(code["setup"], "docs/index.md:setup", "exec"), namespace)
    # one batch of two of the stand-in images: every line runs, in a quarter of the time
    namespace["loader"] = [(images[:2], labels[:2]) for images, labels in namespace["loader"][:1]]
    model = namespace["model"]
    before = model.layer1[0].conv1.weight.detach().clone()
    exec(compile(code["consistency-loop"], "docs/index.md:consistency-loop", "exec"), namespace)
    out = namespace["out"]
    assert set(out.terms) == {"flip@224", "flip@192", "scale"}
    assert bool(namespace["loss"].isfinite())
    after = model.layer1[0].conv1.weight
    assert not bool((after == before).all()), "the snippet's optimizer step changed nothing"

"""Sphinx configuration of the documentation site (built by tests/test_tools.py, strict)::

    python -m sphinx -W --keep-going -n -b html docs site

``-W`` turns every warning into an error and ``-n`` (nitpicky) warns on every cross-reference that
resolves nowhere, so a broken reference fails the build; :func:`_check_docstrings` fails it for a
public object of the package without a docstring.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import sys
from pathlib import Path
from typing import Any

from sphinx.util import logging

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import attn_consistency  # noqa: E402

project = "attn_consistency"
author = "attn_consistency contributors"
release = attn_consistency.__version__
copyright = "the attn_consistency contributors, MIT License"

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",  # MathJax 3 from the package, copied into the site: math renders offline
    "sphinx.ext.viewcode",
    "myst_parser",
]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
html_theme = "furo"
html_title = "attn_consistency"

# the docstrings are Google style (Args / Returns / Raises) with Sphinx roles and LaTeX
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_custom_sections = [("Shape", "params_style"), ("Modes", "notes_style")]
napoleon_use_rtype = False
autodoc_member_order = "bysource"
autodoc_typehints = "description"
# the public methods a class has from a private base of the package are documented with it; those
# of torch's and Python's classes are not repeated
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
    "inherited-members": "Module,object,tuple,Protocol,Generic,Warning,UserWarning,Exception,ValueError",
}
autodoc_inherit_docstrings = True

# Markdown pages: headings get anchors, and the README's sections are included as they are
myst_heading_anchors = 3
myst_enable_extensions = ["dollarmath"]
# the README's sections start at level 2 or 3 under a page's level-1 title
suppress_warnings = ["myst.header"]

# Types of other packages: their documentation is not fetched (the build runs offline), so a
# reference to them stays plain text instead of failing the build. Everything of this package resolves.
nitpick_ignore_regex = [
    ("py:.*", r"(torch|numpy|np|nn|kornia|collections|typing|contextlib|enum|types|pathlib|weakref)(\..*)?"),
    (
        "py:.*",
        r"(Tensor|Module|Generator|Callable|Iterator|Iterable|Mapping|Sequence|Any|Self|T|NamedTuple|Parameter|dtype|device)",
    ),
    ("py:.*", r"(int|float|str|bool|dict|list|tuple|object|None|type|slice|Warning|UserWarning)"),
    ("py:.*", r"(Size|RemovableHandle|Path|StrPath|Literal|SupportsIndex|IO|TypeVar|Number)"),
    # type aliases of the signatures, and private base classes shown as a class's bases
    ("py:.*", r"(ArrayLike|Encoding)"),
    # nn.Module's own methods, named in the docstrings of the package's modules
    ("py:.*", r"(state_dict|load_state_dict)"),
    ("py:class", r"attn_consistency\.(\w+\.)*_\w+"),
]


def _check_docstrings(app: object) -> None:
    """Warn (an error under ``-W``) for every public object of the package without a docstring:
    each module, each name in its ``__all__``, and the public methods a class defines itself
    (a method that overrides a documented one inherits its docstring)."""
    logger = logging.getLogger(__name__)
    # every module of the package, subpackages included (cam/, transforms/, models/)
    modules = [attn_consistency] + [
        importlib.import_module(info.name)
        for info in pkgutil.walk_packages(attn_consistency.__path__, "attn_consistency.")
        if not any(part.startswith("_") for part in info.name.split("."))
    ]
    checked: set[tuple[type, str]] = set()
    for module in modules:
        if not inspect.getdoc(module):
            logger.warning(f"module {module.__name__} has no docstring")
        for name in getattr(module, "__all__", []):
            obj = getattr(module, name)
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and not inspect.getdoc(obj):
                logger.warning(f"{module.__name__}.{name} has no docstring")
            if not inspect.isclass(obj):
                continue
            # the class's own public methods and those of its bases in the package (CAMHook's and the
            # loss's mixins), each checked once
            for owner in (c for c in obj.__mro__ if c.__module__.startswith("attn_consistency")):
                for member, value in vars(owner).items():
                    function = value.fget if isinstance(value, property) else value
                    if member.startswith("_") or not (inspect.isfunction(function) or isinstance(value, property)):
                        continue
                    if (owner, member) in checked:
                        continue
                    checked.add((owner, member))
                    doc = inspect.getdoc(value) if not isinstance(value, property) else inspect.getdoc(function)
                    bases = owner.__mro__[1:]
                    inherited = any(getattr(getattr(base, member, None), "__doc__", None) for base in bases)
                    if not doc and not inherited:
                        logger.warning(f"{owner.__module__}.{owner.__qualname__}.{member} has no docstring")


def _write_presets(app: object) -> None:
    """docs/_generated/presets.md: every preset of examples/presets.py, from the code itself."""
    from examples.train import PRESETS, TrainConfig

    defaults = TrainConfig()
    lines = ["| preset | settings (those that differ from the defaults) |", "|---|---|"]
    for name in sorted(PRESETS):
        settings = ", ".join(
            f"`{key}={value!r}`" for key, value in PRESETS[name].items() if getattr(defaults, key) != value
        )
        lines.append(f"| `{name}` | {settings or '(the defaults)'} |")
    out = Path(__file__).parent / "_generated"
    out.mkdir(exist_ok=True)
    text = "\n".join(lines) + "\n"
    path = out / "presets.md"
    if not path.exists() or path.read_text() != text:  # unchanged: Sphinx keeps its cache
        path.write_text(text)


def _resolve_package_names(app: Any, env: Any, node: Any, contnode: Any) -> Any:
    """Resolve the names the docstrings use as Sphinx's own search does not.

    The package's objects are documented where they are defined (``attn_consistency.cam.CAMHook``),
    and the docstrings name them as users import them (``attn_consistency.CAMHook``) or by their
    short name from another module (``:class:`CAMHook``` in ``metrics.py``). A name resolves when
    exactly one documented object of the package has it; none or several stay a warning (an error
    under ``-W``), so a broken reference still fails the build.
    """
    if node.get("refdomain") != "py":
        return None
    domain = env.get_domain("py")
    target = node["reftarget"]
    head, _, rest = target.removeprefix("attn_consistency.").partition(".")
    if target.startswith("attn_consistency.") and head in attn_consistency.__all__:
        target = ".".join(filter(None, [getattr(attn_consistency, head).__module__, head, rest]))
        found = [(target, domain.objects[target])] if target in domain.objects else []
    else:
        found = [
            (name, entry)
            for name, entry in domain.objects.items()
            if name.startswith("attn_consistency.") and name.endswith("." + target)
        ]
    if len(found) > 1 and node.get("py:class"):  # a method named inside its class's docstring
        found = [(name, entry) for name, entry in found if name.endswith(f".{node['py:class']}.{target}")]
    if len(found) != 1:
        return None
    name, entry = found[0]
    from sphinx.util.nodes import make_refnode

    return make_refnode(app.builder, node.get("refdoc", env.docname), entry.docname, entry.node_id, contnode, name)


def _skip_tuple_fields(app: Any, what: str, name: str, obj: Any, skip: bool, options: Any) -> bool | None:
    """A NamedTuple's fields are documented by its docstring's Attributes section: not twice."""
    return True if type(obj).__name__ == "_tuplegetter" else None


def setup(app: object) -> None:
    app.connect("autodoc-skip-member", _skip_tuple_fields)  # type: ignore[attr-defined]
    app.connect("missing-reference", _resolve_package_names)  # type: ignore[attr-defined]
    app.connect("builder-inited", _check_docstrings)  # type: ignore[attr-defined]
    app.connect("builder-inited", _write_presets)  # type: ignore[attr-defined]

"""Sphinx configuration of the gbjax documentation site.

Build (warnings are errors, as in CI)::

    pip install -e ".[docs]"
    sphinx-build -W --keep-going -b html docs docs/_build/html

The API pages are written here from each module's ``__all__`` (into
``docs/api/``, regenerated on every build), so every public name is documented
and a public name without a docstring fails the build. The notebooks are copied
from ``notebooks/`` and rendered from their committed outputs (never executed).
"""

from __future__ import annotations

import importlib
import inspect
import os
import pathlib
import pkgutil
import re
import shutil
import sys

DOCS = pathlib.Path(__file__).resolve().parent
ROOT = DOCS.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # importing for autodoc never needs a GPU

import gbjax  # noqa: E402

project = "gbjax"
author = "gbjax authors"
copyright = "gbjax authors"
release = gbjax.__version__
version = release

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.viewcode",
    "myst_nb",
]

# --- sources
exclude_patterns = ["_build", "**/.ipynb_checkpoints", "Thumbs.db", ".DS_Store"]
myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3
nb_execution_mode = "off"  # render the committed outputs; never run the notebooks
suppress_warnings = [
    # The results pages are the experiments' own reports, written for GitHub:
    # they start at any heading level and link to files (CSV, JSON) beside them.
    "myst.header",
    "myst.xref_missing",
]

# --- API reference
autosummary_generate = True
autodoc_default_options = {"members": True, "show-inheritance": True}
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_typehints_format = "short"
autoclass_content = "both"
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields: NamedTuple fields are documented once
napoleon_custom_sections = [("Design", "notes_style")]

# Broken references fail the build (-n with -W), except references to other
# packages (no inventories are fetched: the build works offline) and to gbjax's
# private modules (pointers into the source, not documented pages).
nitpicky = True
nitpick_ignore_regex = [
    (
        r"py:.*",
        r"(jax|jaxlib|numpy|np|flax|nnx|optax|orbax|collections|os|typing|pathlib|argparse)(\..*)?",
    ),
    # the logits-function type alias of gbjax._callables, shown by name in signatures
    (r"py:class", r"LogitsFn"),
    (r"py:.*", r"gbjax(\.\w+)*\._\w+(\..*)?"),
]
templates_path = ["_templates"]

# --- HTML
html_theme = "sphinx_book_theme"
html_title = f"gbjax {release}"
html_theme_options = {
    "show_toc_level": 2,
    "use_download_button": True,
    "navigation_with_keys": False,
}
html_static_path: list[str] = []

# --------------------------------------------------------------------------- #
# The notebooks, copied from notebooks/ (docs/notebooks/ is generated).
# --------------------------------------------------------------------------- #

NOTEBOOKS = ("quickstart", "defences", "robustness_cifar")


def _copy_if_changed(src: pathlib.Path, dst: pathlib.Path) -> None:
    if not dst.exists() or dst.read_bytes() != src.read_bytes():
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)


for _name in NOTEBOOKS:
    _copy_if_changed(ROOT / "notebooks" / f"{_name}.ipynb", DOCS / "notebooks" / f"{_name}.ipynb")

# --------------------------------------------------------------------------- #
# The API pages, one per module, from its __all__ (docs/api/ is generated).
# --------------------------------------------------------------------------- #

# Documented modules, in the order of the reference's table of contents. Every
# name of a module's __all__ appears on its page: documented there when the
# module is its documented home, else as a link to the page that documents it.
API_MODULES = (
    "gbjax",
    "gbjax.data",
    "gbjax.noise",
    "gbjax.defences",
    "gbjax.attacks",
    "gbjax.models",
    "gbjax.augment",
    "gbjax.config",
    "gbjax.train",
    "gbjax.optim",
    "gbjax.evaluate",
    "gbjax.distributed",
)


def _home(module: str, name: str, obj) -> str:
    """The documented module that documents ``module.name`` (itself or another page)."""
    if inspect.ismodule(obj):
        return obj.__name__
    defined = getattr(obj, "__module__", None) or ""
    if module == "gbjax":  # the top level re-exports: link to the module that owns them
        for m in API_MODULES[1:]:
            if defined == m or defined.startswith(m + "."):
                return m
        if name in ("Config", "train_and_evaluate", "restore_model"):
            return "gbjax.config" if name == "Config" else "gbjax.train"
    if module == "gbjax.train" and name in ("Config",):
        return "gbjax.config"
    return module


def _missing_docstring(obj) -> bool:
    if not (inspect.isclass(obj) or callable(obj)) or inspect.ismodule(obj):
        return False  # constants: documented by their module
    return not (getattr(obj, "__doc__", None) or "").strip()


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "class"
    return "function" if callable(obj) else "data"


def _submodules(mod) -> list[tuple[str, str, list[str]]]:
    """``[(submodule, summary, names)]``: a package's public submodules, with the first
    line of each one's docstring and the names of its ``__all__`` that the package
    does not re-export (documented with the submodule). A submodule whose name the
    package gives to another object (``gbjax.attacks.square``, the function) is left
    out: one name cannot be both."""
    if not hasattr(mod, "__path__"):
        return []
    exported = {id(getattr(mod, n)) for n in getattr(mod, "__all__", ())}
    out = []
    for info in pkgutil.iter_modules(mod.__path__):
        full = f"{mod.__name__}.{info.name}"
        if info.name.startswith("_") or full in API_MODULES:
            continue
        sub = importlib.import_module(full)
        if getattr(mod, info.name) is not sub:
            SHADOWED_MODULES.append(full)
            continue
        names = [n for n in getattr(sub, "__all__", ()) if id(getattr(sub, n)) not in exported]
        summary = (inspect.getdoc(sub) or "").strip().split("\n")[0]
        out.append((full, summary, [n for n in names if _home(full, n, getattr(sub, n)) == full]))
    return out


SHADOWED_MODULES: list[str] = []
CANONICAL_SEEN: set[str] = set()
DOCUMENTED: dict[int, str] = {}  # id(object) -> the name it is documented under


def _plain(text: str) -> str:
    """``text`` with reST roles dropped (their targets kept, as literals)."""
    return re.sub(r":\w+:`~?([^`]+)`", r"``\1``", text)


def _autosummary(module: str, names: list[str]) -> list[str]:
    if not names:
        return []
    lines = [f".. currentmodule:: {module}", "", ".. autosummary::", "   :toctree: generated", ""]
    return lines + [f"   {name}" for name in names] + [""]


def _api_page(module: str) -> tuple[str, list[str]]:
    mod = importlib.import_module(module)
    own, aliases, modules, undocumented = [], [], [], []
    for name in getattr(mod, "__all__", ()):
        obj = getattr(mod, name)
        home = _home(module, name, obj)
        if inspect.ismodule(obj):
            modules.append((name, home))
        elif home != module:
            aliases.append((name, f"{home}.{name}", _kind(obj)))
        else:
            own.append(name)
            DOCUMENTED.setdefault(id(obj), f"{module}.{name}")
            if _missing_docstring(obj):
                undocumented.append(f"{module}.{name}")
    lines = [module, "=" * len(module), "", f".. automodule:: {module}", "   :no-members:", ""]
    lines += _autosummary(module, own)
    if aliases or modules:
        lines += [".. rubric:: Also public here", "", f".. currentmodule:: {module}", ""]
        for name, target in modules:
            lines += [f"* ``{module}.{name}``: the module :mod:`{target}`"]
        lines += [""]
        for name, target, kind in aliases:
            role = {"class": "class", "function": "func"}.get(kind, "obj")
            canonical = [] if target in CANONICAL_SEEN else [f"   :canonical: {target}"]
            CANONICAL_SEEN.add(target)  # an alias registered twice is a duplicate
            lines += [f".. py:{kind}:: {name}", *canonical, ""]
            lines += [f"   The same object as :{role}:`{target}`, documented there.", ""]
    subs = _submodules(mod)
    if subs:
        lines += ["Modules", "-------", ""]
    for sub, summary, names in subs:
        # a link target and the docstring's first line (the module docstrings name
        # their private helpers, so they are left to the source)
        lines += [f".. py:module:: {sub}", "", f":mod:`{sub}`: {_plain(summary)}", ""]
        lines += _autosummary(sub, names)
        for name in names:
            DOCUMENTED.setdefault(id(getattr(importlib.import_module(sub), name)), f"{sub}.{name}")
        for name in names:
            if _missing_docstring(getattr(importlib.import_module(sub), name)):
                undocumented.append(f"{sub}.{name}")
    return "\n".join(lines), undocumented


def _write_api() -> list[str]:
    api = DOCS / "api"
    api.mkdir(exist_ok=True)
    undocumented = []
    for module in API_MODULES:
        text, missing = _api_page(module)
        undocumented += missing
        path = api / f"{module}.rst"
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
    index = ["API reference", "=============", ""]
    index += [
        "Every public name (each module's ``__all__``), generated from the docstrings.",
        "",
        ".. toctree::",
        "   :maxdepth: 1",
        "",
    ]
    index += [f"   {module}" for module in API_MODULES] + [""]
    text = "\n".join(index)
    if not (api / "index.rst").exists() or (api / "index.rst").read_text() != text:
        (api / "index.rst").write_text(text)
    return undocumented


_UNDOCUMENTED = _write_api()
nitpick_ignore = [("py:mod", name) for name in SHADOWED_MODULES]

# Public names known to lack a docstring, each with the fix it is waiting for
# (the file is not edited from the documentation's side). Remove an entry once
# fixed; any other public name without a docstring fails the build.
KNOWN_UNDOCUMENTED = {}


def _report_undocumented(app) -> None:
    from sphinx.util import logging

    log = logging.getLogger("gbjax.docs")
    for name in _UNDOCUMENTED:
        if name in KNOWN_UNDOCUMENTED:
            log.info(f"known undocumented public name {name}: {KNOWN_UNDOCUMENTED[name]}")
        else:
            log.warning(f"public name without a docstring: {name}")


# --------------------------------------------------------------------------- #
# Docstrings written as plain text that reStructuredText reads otherwise
# --------------------------------------------------------------------------- #

_COMMAND_STARTS = ("python ", "gbjax ", "$ ", "pip ")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def _plain_text_fixes(lines: list[str]) -> list[str]:
    """Two plain-text habits made valid reST: an indented shell command after a
    paragraph (a block quote whose continuation lines indent further) becomes a
    literal block; a bullet list followed directly by a less indented line gets
    the blank line that ends the list."""
    out: list[str] = []
    bullet_indent = None
    for line in lines:
        stripped = line.strip()
        prev = out[-1] if out else ""
        if (
            stripped.startswith(_COMMAND_STARTS)
            and not prev.strip()
            and len(out) >= 2
            and out[-2].strip()
            and not out[-2].rstrip().endswith("::")
            and _indent(line) > _indent(out[-2])
        ):
            out[-1:] = ["", "::", ""]
        if stripped.startswith(("* ", "- ")):
            bullet_indent = _indent(line)
        elif stripped and bullet_indent is not None and _indent(line) < bullet_indent:
            if prev.strip():
                out.append("")
            bullet_indent = None
        out.append(line)
    return out


def _process_docstring(app, what, name, obj, options, lines) -> None:
    lines[:] = _plain_text_fixes(lines)


# --------------------------------------------------------------------------- #
# Results pages: figures a run did not archive are named, not broken links
# --------------------------------------------------------------------------- #

_IMAGE = re.compile(r"!\[([^\]]*)\]\(([^)\s]+)\)")


def _missing_figures(app, docname: str, source: list[str]) -> None:
    if not docname.startswith("results/"):
        return
    folder = (DOCS / docname).parent

    def replace(m):
        target = m.group(2)
        if "://" in target or (folder / target).exists():
            return m.group(0)
        return f"*(figure not archived with this run: `{target}`)*"

    source[0] = _IMAGE.sub(replace, source[0])


# --------------------------------------------------------------------------- #
# Sphinx 9.0 autosummary cuts a summary inside ``literal`` text ("d2, ... d1"):
# extend it to the first sentence end outside a literal.
# --------------------------------------------------------------------------- #

from sphinx.ext import autosummary as _autosummary  # noqa: E402

_extract_summary = _autosummary.extract_summary


def _balanced_summary(doc, settings) -> str:
    summary = _extract_summary(doc, settings)
    if summary.count("``") % 2 == 0:
        return summary
    stanza = []
    for line in doc:
        if not line.strip():
            if stanza:
                break
            continue
        stanza.append(line.strip())
    sentences = _autosummary.periods_re.split(" ".join(stanza))
    for i in range(len(sentences)):
        candidate = ". ".join(sentences[: i + 1]).rstrip(".") + "."
        if len(candidate) >= len(summary) and candidate.count("``") % 2 == 0:
            return candidate
    return " ".join(stanza)


_autosummary.extract_summary = _balanced_summary


# --------------------------------------------------------------------------- #
# A reference to an object by another of its import paths (``fixed_batches``
# inside gbjax.data.batching, documented as gbjax.data.fixed_batches) resolves to
# the page that documents it.
# --------------------------------------------------------------------------- #


def _lookup(dotted: str):
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part, None)
            if obj is None:
                return None
        return obj
    return None


def _resolve_other_path(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target, module = node["reftarget"], node.get("py:module")
    for candidate in ([f"{module}.{target}"] if module else []) + [target]:
        if not candidate.startswith("gbjax."):
            continue
        documented = DOCUMENTED.get(id(_lookup(candidate)))
        if documented and documented != candidate:
            return env.get_domain("py").resolve_xref(
                env, node["refdoc"], app.builder, node["reftype"], documented, node, contnode
            )
    return None


def setup(app):
    app.connect("missing-reference", _resolve_other_path)
    app.connect("builder-inited", _report_undocumented)
    app.connect("autodoc-process-docstring", _process_docstring, priority=600)
    app.connect("source-read", _missing_figures)

"""Privacy is per module, as in optax and jax (issue 27): a private module
(``gbjax/_xla.py``, ``gbjax/attacks/_core.py``) holds plain names, and no gbjax
module imports an underscore name from another module or reads one off it.
Importing a private module itself (``from gbjax import _xla``) is fine, and so are
dunder names (``__version__``). Tests may import whatever they test."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gbjax"

# Underscore names still crossing modules, in files another change is rewriting:
# (file, "module.name"). Each entry is checked to still be needed.
# TODO(issue 27): move these into private modules under plain names, then empty this.
PENDING: set[tuple[str, str]] = set()


def _module_of(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _is_module(dotted: str, root: pathlib.Path = ROOT) -> bool:
    """Whether ``dotted`` (``gbjax.attacks._core``) names a module or package."""
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    """The absolute module a ``from ... import`` statement in ``module`` reads."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    parts = parts[: len(parts) - node.level + (1 if is_package else 0)]
    return ".".join(parts + ([node.module] if node.module else []))


def violations(source: str, module: str, is_package: bool = False, is_module=_is_module):
    """``(line, "other.module._name")`` for every underscore name of another gbjax
    module that ``source`` (the text of ``module``) imports or reads as an attribute."""
    tree = ast.parse(source)
    bound: dict[str, str] = {}  # local name -> the gbjax module it is bound to
    found = []

    def check(line: int, owner: str, name: str) -> None:
        if _private(name) and owner != module and not is_module(f"{owner}.{name}"):
            found.append((line, f"{owner}.{name}"))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] != "gbjax":
                    continue
                parts = a.name.split(".")
                for i in range(1, len(parts)):  # `import gbjax._xla._x` is not a module
                    check(node.lineno, ".".join(parts[:i]), parts[i])
                if a.asname:
                    bound[a.asname] = a.name
                else:
                    bound[parts[0]] = parts[0]
        elif isinstance(node, ast.ImportFrom):
            owner = _resolve(node, module, is_package)
            if owner.split(".")[0] != "gbjax":
                continue
            for a in node.names:
                check(node.lineno, owner, a.name)
                if is_module(f"{owner}.{a.name}"):
                    bound[a.asname or a.name] = f"{owner}.{a.name}"

    def dotted(expr: ast.expr) -> str | None:
        """The gbjax module an expression such as ``gbjax.attacks`` names, if any."""
        if isinstance(expr, ast.Name):
            return bound.get(expr.id)
        if isinstance(expr, ast.Attribute):
            base = dotted(expr.value)
            if base is not None and is_module(f"{base}.{expr.attr}"):
                return f"{base}.{expr.attr}"
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            owner = dotted(node.value)
            if owner is not None:
                check(node.lineno, owner, node.attr)
    return sorted(set(found))


def _package_violations():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        for line, name in violations(
            path.read_text(), _module_of(rel), is_package=path.name == "__init__.py"
        ):
            found.append((rel, line, name))
    return found


def test_no_underscore_name_crosses_modules():
    found = _package_violations()
    bad = [f"{rel}:{line}: {name}" for rel, line, name in found if (rel, name) not in PENDING]
    assert not bad, "move these into a private module under a plain name (issue 27):\n" + "\n".join(
        bad
    )


def test_the_pending_list_is_still_needed():
    seen = {(rel, name) for rel, _, name in _package_violations()}
    assert not PENDING - seen, f"delete these PENDING entries: {sorted(PENDING - seen)}"


def _fake_modules(*names):
    known = {"gbjax", *names}
    return lambda dotted: dotted in known


def test_the_check_catches_underscore_imports_and_attributes():
    is_module = _fake_modules("gbjax.attacks", "gbjax.attacks.gradient", "gbjax.gb", "gbjax._xla")
    source = (
        "import gbjax\n"
        "import gbjax.gb as G\n"
        "from gbjax import gb, _xla\n"  # a private module: fine
        "from gbjax.attacks.gradient import _project, pgd\n"  # line 4: an underscore name
        "from . import _helper\n"  # line 5: relative, resolves to gbjax.attacks._helper
        "x = gb._cluster_batch\n"  # line 6
        "y = gbjax.gb._key\n"  # line 7
        "z = G._key(_xla.options, gbjax.__version__)\n"  # line 8
        "w = self._private + obj._x\n"  # not modules: fine
    )
    found = violations(source, "gbjax.attacks.apgd", is_module=is_module)
    assert found == [
        (4, "gbjax.attacks.gradient._project"),
        (5, "gbjax.attacks._helper"),
        (6, "gbjax.gb._cluster_batch"),
        (7, "gbjax.gb._key"),
        (8, "gbjax.gb._key"),
    ]


def test_the_check_allows_private_modules_and_own_names():
    is_module = _fake_modules("gbjax.attacks", "gbjax.attacks._core", "gbjax._xla")
    source = (
        "from gbjax.attacks import _core\n"
        "from gbjax.attacks._core import project\n"
        "import gbjax._xla\n"
        "from gbjax._xla import __doc__\n"
        "a = _core.project\n"
        "b = gbjax._xla.options\n"
    )
    assert violations(source, "gbjax.attacks.apgd", is_module=is_module) == []
    # a package's __init__ importing from its own private module by a relative import
    assert violations("from ._core import x\n", "gbjax.attacks", True, is_module) == []


def test_the_real_tree_is_parsed():
    # the check reads real modules: a known private module import is seen as one
    assert _is_module("gbjax._xla") and _is_module("gbjax.attacks._core")
    assert not _is_module("gbjax.attacks.gradient._project")

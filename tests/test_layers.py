"""gbjax's layering (``[tool.importlinter]`` in pyproject.toml) holds on the real tree
and breaks when a lower layer imports a higher one; no function body imports a gbjax
module (an import loop cannot hide there), except the few listed below."""

from __future__ import annotations

import ast
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gbjax"

# gbjax modules that may be imported inside a function: each imports an optional
# dependency when it loads, which must not be a cost (or a failure) of importing gbjax.
OPTIONAL_DEPENDENCY_MODULES = {
    "gbjax._gb_cpu": "numba (gb_cluster's engine='numba' CPU kernel)",
}
# In-function imports still to move, in files that another change is rewriting.
# TODO(issue 27): _gb_cpu.py imports _gb_engine at the top once the CPU-kernel work lands.
PENDING = {
    ("gbjax/_gb_cpu.py", "gbjax._gb_engine"),
}


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root`` with ``root/pyproject.toml``."""
    code = (
        "import sys\n"
        "from importlinter.cli import lint_imports\n"
        "sys.exit(lint_imports(config_filename='pyproject.toml', no_cache=True, no_logo=True))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )


def test_the_layering_contract_holds():
    r = _lint(ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "0 broken" in r.stdout


@pytest.mark.parametrize(
    "path, reverse",
    [
        ("gbjax/defences.py", "gbjax.attacks"),  # the defences <-> attacks loop of issue 27
        ("gbjax/_batching.py", "gbjax.data"),  # the ground floor reaching upstairs
    ],
)
def test_a_reverse_import_breaks_the_contract(tmp_path, path, reverse):
    ignore = shutil.ignore_patterns("__pycache__", "*.nbi", "*.nbc")
    shutil.copytree(PACKAGE, tmp_path / "gbjax", ignore=ignore)
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    with open(tmp_path / path, "a") as f:
        f.write(f"\nimport {reverse}  # noqa: E402\n")
    r = _lint(tmp_path)
    assert r.returncode != 0, r.stdout + r.stderr
    module = path.removesuffix(".py").replace("/", ".")
    assert "BROKEN" in r.stdout and f"{module} -> {reverse}" in r.stdout, r.stdout


def _imported_modules(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The gbjax modules (or names) an import statement in ``module`` reads."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "gbjax"]
    base = node.module or ""
    if node.level:  # relative: resolved against the importing module's package
        parts = module.split(".")[: -node.level]
        base = ".".join(parts + ([base] if base else []))
    if base.split(".")[0] != "gbjax":
        return []
    # `from gbjax import _gb_cpu` imports the module gbjax._gb_cpu
    return [f"{base}.{a.name}" if base == "gbjax" else base for a in node.names]


def _function_body_imports():
    """``(file, line, imported module)`` of every gbjax import inside a function."""
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        module = rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")
        tree = ast.parse(path.read_text(), filename=rel)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    found += [(rel, node.lineno, m) for m in _imported_modules(node, module)]
    return sorted(set(found))


def test_no_function_body_imports_a_gbjax_module():
    found = _function_body_imports()
    bad = [
        f"{rel}:{line}: imports {m} inside a function"
        for rel, line, m in found
        if m not in OPTIONAL_DEPENDENCY_MODULES and (rel, m) not in PENDING
    ]
    assert not bad, "import gbjax modules at the top of the module:\n" + "\n".join(bad)


def test_the_function_body_import_check_sees_imports():
    tree = ast.parse("def f():\n    from gbjax import gb\n    from .cache import x\n")
    fn = tree.body[0]
    assert _imported_modules(fn.body[0], "gbjax.data.preprocess") == ["gbjax.gb"]
    assert _imported_modules(fn.body[1], "gbjax.data.preprocess") == ["gbjax.data.cache"]

"""Docstring examples: every gbjax module's ``>>>`` examples run and pass, and every
public function and class of the public packages shows one (issue 27, item 7)."""

import doctest
import importlib
import inspect
import pkgutil

import pytest

import gbjax

PUBLIC = (
    "gbjax",
    "gbjax.attacks",
    "gbjax.augment",
    "gbjax.config",
    "gbjax.data",
    "gbjax.defences",
    "gbjax.distributed",
    "gbjax.evaluate",
    "gbjax.gb",
    "gbjax.models",
    "gbjax.noise",
    "gbjax.optim",
    "gbjax.train",
)
# Exceptions, result containers and command-line entry points need no example.
EXEMPT_KINDS = (BaseException,)
EXEMPT = {"main", "add_arguments"}


def _modules():
    names = ["gbjax"]
    for info in pkgutil.walk_packages(gbjax.__path__, "gbjax."):
        if info.name.endswith("__main__"):
            continue
        names.append(info.name)
    return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_examples_pass(name):
    module = importlib.import_module(name)
    failed, _ = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert failed == 0, f"{name}: {failed} docstring example(s) failed (run python -m doctest)"


def _needs_example(obj) -> bool:
    if not (inspect.isfunction(obj) or inspect.isclass(obj)):
        return False
    if inspect.isclass(obj) and (
        issubclass(obj, EXEMPT_KINDS) or hasattr(obj, "_fields")  # a NamedTuple of results
    ):
        return False
    return obj.__name__ not in EXEMPT


def missing_examples() -> list[str]:
    out = []
    for pkg in PUBLIC:
        module = importlib.import_module(pkg)
        for n in getattr(module, "__all__", ()):
            obj = getattr(module, n)
            if _needs_example(obj) and ">>>" not in (inspect.getdoc(obj) or ""):
                out.append(f"{pkg}.{n}")
    return sorted(set(out))


def test_every_public_function_has_an_example():
    missing = missing_examples()
    assert not missing, f"{len(missing)} public names without a '>>>' example: {missing}"


def test_the_check_can_fail():
    """A planted public function without an example is reported."""

    def planted(x):
        """No example here."""
        return x

    assert _needs_example(planted) and ">>>" not in planted.__doc__
    assert not _needs_example(ValueError)

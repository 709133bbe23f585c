"""gbjax: granular-ball clustering, pixel embedding and robustness tools in JAX.

One image's path through the library (README, "How the code fits together"):
``gbjax.data`` loads uint8 images; ``gbjax.noise`` corrupts them;
``gbjax.gb_cluster`` / ``gbjax.data.gb_processed`` paint them with their
granular balls; ``gbjax.train_and_evaluate`` trains a ``gbjax.models`` network
and returns it; ``gbjax.defences.Defended`` puts a defence such as
``gbjax.defences.GB`` in front of it; ``gbjax.evaluate`` and ``gbjax.attacks``
measure it clean and under attack.

``gbjax.models``, ``gbjax.train``, ``gbjax.optim`` and ``gbjax.evaluate`` import
Flax or optax and are loaded on first use.
"""

import importlib

from gbjax import attacks, augment, data, defences, noise
from gbjax.attacks import (
    accuracy_under_attack,
    attack_sanity_check,
    bpda,
    fgsm,
    make_attack_logits,
    pgd,
)
from gbjax.defences import GB, Defended
from gbjax.gb import (
    Features,
    GBParams,
    GBResult,
    gb_cluster,
    gb_denoise,
    gb_multiscale,
    memory_estimate,
)

__version__ = "0.2.0"  # the one source of the version (pyproject.toml reads it)

_LAZY = {
    "models": ("gbjax.models", None),
    "train": ("gbjax.train", None),
    "optim": ("gbjax.optim", None),
    "evaluate": ("gbjax.evaluate", None),
    "config": ("gbjax.config", None),
    "train_and_evaluate": ("gbjax.train", "train_and_evaluate"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'gbjax' has no attribute {name!r}")


__all__ = [
    "Features",
    "GBParams",
    "GBResult",
    "gb_cluster",
    "gb_denoise",
    "gb_multiscale",
    "memory_estimate",
    "GB",
    "Defended",
    "attacks",
    "augment",
    "data",
    "defences",
    "noise",
    "fgsm",
    "pgd",
    "bpda",
    "make_attack_logits",
    "accuracy_under_attack",
    "attack_sanity_check",
    *_LAZY,
]

"""gbjax: granular-ball clustering, pixel embedding and robustness tools in JAX.

Submodules: ``gbjax.gb`` (the clustering engine, re-exported here),
``gbjax.data``, ``gbjax.noise``, ``gbjax.attacks``, ``gbjax.models`` and
``gbjax.train`` (the last two import Flax and are loaded on first use).
"""

import importlib

from gbjax import attacks, data, noise
from gbjax.attacks import (
    accuracy_under_attack,
    attack_sanity_check,
    bpda,
    fgsm,
    make_attack_logits,
    pgd,
)
from gbjax.gb import Features, GBResult, gb_cluster, gb_denoise, gb_multiscale, memory_estimate

__version__ = "0.1.0"

_LAZY = {
    "models": ("gbjax.models", None),
    "train": ("gbjax.train", None),
    "PaperConvNet": ("gbjax.models", "PaperConvNet"),
    "PixelEmbedding": ("gbjax.models", "PixelEmbedding"),
    "ResNet18": ("gbjax.models", "ResNet18"),
    "ResNet20": ("gbjax.models", "ResNet20"),
    "ResNet": ("gbjax.models", "ResNet"),
    "pixel_indices": ("gbjax.models", "pixel_indices"),
    "train_and_evaluate": ("gbjax.train", "train_and_evaluate"),
    "restore_model": ("gbjax.train", "restore_model"),
    "Config": ("gbjax.train", "Config"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        mod = importlib.import_module(module)
        return mod if attr is None else getattr(mod, attr)
    raise AttributeError(f"module 'gbjax' has no attribute {name!r}")


__all__ = [
    "Features",
    "GBResult",
    "gb_cluster",
    "gb_denoise",
    "gb_multiscale",
    "memory_estimate",
    "attacks",
    "data",
    "noise",
    "fgsm",
    "pgd",
    "bpda",
    "make_attack_logits",
    "accuracy_under_attack",
    "attack_sanity_check",
    *_LAZY,
]

"""The training configuration: one dataclass, its validation, and config files.

A config file is a Python module with ``get_config(arg=None) -> Config``
(``gbjax/configs/*.py``); ``path/to/file.py:arg`` selects a variant::

    python -m gbjax.train --config gbjax/configs/airbench_cifar10.py:fast --workdir /tmp/ab
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import numbers
import pathlib
from collections.abc import Iterable, Mapping

import numpy as np
from jax.typing import ArrayLike

from gbjax._checks import check_int
from gbjax.augment import TTA_LEVELS
from gbjax.data import DATASETS
from gbjax.gb import GBParams, as_params, gb_cluster

__all__ = ["Config", "validate_config", "load_config", "apply_overrides"]

MODELS = ("paper_convnet", "resnet18", "resnet20", "resnet", "airbench")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
PREPROCESS = ("none", "gb")
AUGMENT = ("none", "crop_flip", "flip_translate", "translate")
LOSS_REDUCTIONS = ("mean", "sum")
_GROUP_KEYS = {"pattern", "lr_scale", "weight_decay", "trainable_epochs", "frozen"}


@dataclasses.dataclass
class Config:
    """Everything a run depends on.  See ``gbjax/configs/*.py`` for examples.

    Example:
      >>> from gbjax.config import Config
      >>> c = Config(model="resnet20", dataset="cifar10", batch_size=128, num_epochs=30)
      >>> c.model, c.optimizer, c.learning_rate  # the rest keeps its defaults
      ('resnet20', 'adam', 0.0001)
      >>> c.to_json_dict()["batch_size"], "data" in c.to_json_dict()
      (128, False)
    """

    # --- data
    dataset: str = "mnist"
    data_dir: str | None = None  # else $GBJAX_DATA_DIR
    # Override loading: {"train": (images, labels), "test": (images, labels)},
    # images uint8 (N, H, W[, C]).  Not written to config.json.
    data: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None
    num_train: int | None = None  # a fixed random subset of N images
    num_test: int | None = None  # (seed 0, whatever config.seed is)
    preprocess: str = "none"  # "none" | "gb" (train and test images, cached on disk)
    # GB's parameters (preprocess "gb"): a gbjax.GBParams, or a dict of gb_denoise's
    # keywords (its GBParams fields and execution knobs such as engine)
    gb: GBParams | dict = dataclasses.field(default_factory=dict)
    cache_dir: str | None = None  # GB cache; else $GBJAX_CACHE_DIR, ~/.cache/gbjax
    # "none" | "crop_flip" (zero pad crop_pad, random crop, random flip) |
    # "flip_translate" (airbench: alternating flip, reflect-padded translate by crop_pad) |
    # "translate" (reflect-padded translate only: for digits, which must not be mirrored)
    augment: str = "none"
    crop_pad: int = 4
    # Adversarial training (docs/methods.md, section 9): {} for none, else
    # {"eps": 8 / 255, "method": "n-fgsm" | "fgsm-rs" | "pgd", "steps": 3, "eval_n": 200,
    # "eval_steps": 10}. Each step trains on adversarial examples of the current model
    # (one gradient step, or ``steps`` projected steps for "pgd");
    # eval_n > 0 logs PGD accuracy at eps on the last eval_n test images each evaluation.
    # "gb": {"threshold": 20.0, "purity": 0.9} puts GB in the loop (GB + adversarial
    # training): the attack goes through GB by BPDA, the step trains on the GB-painted
    # adversarial images, and evaluation paints the (raw) test images first.
    adversarial: dict = dataclasses.field(default_factory=dict)
    # --- model
    # "paper_convnet" | "resnet18" | "resnet20" | "resnet" (generic ResNet:
    # model_kwargs stage_sizes=(...), widths=(...)) | "airbench" (model_kwargs widths=(...))
    model: str = "paper_convnet"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"  # ResNets, airbench: "bfloat16" on GPU
    whiten_num_images: int = 5000  # airbench: training images for the whitening layer
    # --- optimisation
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd"
    learning_rate: float = 1e-4  # peak value for schedules
    schedule: str = "constant"  # "constant" | "cosine" | "onecycle"
    warmup_fraction: float = 0.0  # cosine: warmup; onecycle: rise fraction
    # onecycle: the factor goes linearly start -> 1 (warmup) -> end
    schedule_start_factor: float = 0.04
    schedule_end_factor: float = 0.0
    momentum: float = 0.9
    nesterov: bool = True
    # Coupled (L2) decay of the default group, on kernels/embeddings (ndim > 1) only.
    weight_decay: float = 0.0
    # Named parameter groups, {name: {"pattern": regex on the parameter path,
    # "lr_scale", "weight_decay", "trainable_epochs", "frozen"}}; see gbjax.optim.grouped.
    param_groups: dict = dataclasses.field(default_factory=dict)
    label_smoothing: float = 0.0
    loss_reduction: str = "mean"  # "mean" | "sum" over the batch
    # Lookahead/EMA of the weights every `lookahead_every` steps (0: off), with
    # decay d(t) = lookahead_decay * (t / total_steps) ** lookahead_power.
    lookahead_every: int = 0
    lookahead_decay: float = 0.95**5
    lookahead_power: float = 3.0
    batch_size: int = 64
    eval_batch_size: int = 1000
    num_epochs: float = 1  # may be fractional: ceil(num_epochs * steps_per_epoch) steps
    num_steps: int | None = None  # overrides num_epochs when set
    seed: int = 0
    num_devices: int | None = None  # None: all local devices
    # --- evaluation
    # Test-time augmentation of the final evaluation ("none" | "flip" |
    # "flip_translate"); per-epoch evaluations use it too when eval_tta_every_epoch.
    eval_tta: str = "none"
    eval_tta_every_epoch: bool = False
    # --- loop
    log_every_steps: int = 100
    checkpoint_every_steps: int = 1000
    eval_every_epochs: int = 1  # 0: only at the end
    max_checkpoints_to_keep: int = 2
    progress: bool = True
    # Testing aid: multiply the loss by NaN at this step (exercises the guard).
    debug_nan_step: int = -1

    def to_json_dict(self) -> dict:
        """The fields as a JSON-ready dict, ``data`` left out (``config.json``)."""
        d = dataclasses.asdict(self)
        d.pop("data")
        return d


ADVERSARIAL_METHODS = ("n-fgsm", "fgsm-rs", "pgd")
_ADVERSARIAL_KEYS = ("eps", "method", "steps", "eval_n", "eval_steps", "gb")


def _int(name, v, bad, lo=1, optional=False) -> None:
    """:func:`gbjax._checks.check_int`'s check and message, as an invalid config."""
    try:
        check_int(name, v, lo, optional=optional)
    except ValueError as e:
        bad(str(e))


def _validate_gb(gb, bad) -> None:
    """``Config.gb`` makes a valid :class:`gbjax.GBParams` (its dict form too)."""
    if isinstance(gb, GBParams):
        return
    if not isinstance(gb, dict):
        bad(f"gb must be a gbjax.GBParams or a dict of gb_denoise's keywords, got {gb!r}")
    try:
        _, rest = as_params(None, gb)
    except (TypeError, ValueError) as e:
        bad(f"gb: {e}")
    # gb_cluster's keywords, less those gb_processed sets itself (uint8 pixels in and out)
    knobs = set(inspect.signature(gb_cluster).parameters) - {
        "images",
        "params",
        "progress",
        "scale",
    }
    unknown = sorted(set(rest) - knobs)
    if unknown:
        bad(f"gb: unknown keys {unknown}; allowed: {sorted(knobs)}")


def _validate_adversarial(adv, bad) -> None:
    if not isinstance(adv, dict):
        bad(f"adversarial must be a dict ({{}} for none), got {adv!r}")
    if not adv:
        return
    unknown = sorted(set(adv) - set(_ADVERSARIAL_KEYS))
    if unknown:
        bad(f"unknown adversarial keys {unknown}; allowed: {_ADVERSARIAL_KEYS}")
    eps = adv.get("eps")
    if not (isinstance(eps, numbers.Real) and not isinstance(eps, bool) and 0 < eps <= 1):
        bad(f"adversarial['eps'] must be a number in (0, 1] (images in [0, 1]), got {eps!r}")
    if adv.get("method", "n-fgsm") not in ADVERSARIAL_METHODS:
        bad(f"adversarial['method'] must be one of {ADVERSARIAL_METHODS}, got {adv['method']!r}")
    for k, lo in (("steps", 1), ("eval_n", 0), ("eval_steps", 1)):
        _int(f"adversarial[{k!r}]", adv.get(k, lo), bad, lo)
    if "gb" in adv:  # GB in the loop: a dict of GBParams fields
        if not isinstance(adv["gb"], dict):
            bad(f"adversarial['gb'] must be a dict of GBParams fields, got {adv['gb']!r}")
        try:
            GBParams(**adv["gb"])
        except (TypeError, ValueError) as e:
            bad(f"adversarial['gb']: {e}")


def validate_config(config: Config, num_devices: int | None = None) -> None:
    """Raises ValueError with a clear message for a bad configuration.

    ``num_devices``: the devices there are (default: ``jax.local_device_count()``).

    Example:
      >>> from gbjax.config import Config, validate_config
      >>> validate_config(Config(batch_size=64), num_devices=1)  # fine: returns None
      >>> validate_config(Config(batch_size=0), num_devices=1)
      Traceback (most recent call last):
      ...
      ValueError: invalid config: batch_size: expected an int >= 1, got 0
    """

    def bad(msg):
        raise ValueError(f"invalid config: {msg}")

    if not isinstance(config, Config):
        bad(f"expected gbjax.Config, got {type(config).__name__}")
    choices = {
        "model": MODELS,
        "optimizer": OPTIMIZERS,
        "schedule": SCHEDULES,
        "preprocess": PREPROCESS,
        "augment": AUGMENT,
        "loss_reduction": LOSS_REDUCTIONS,
        "eval_tta": TTA_LEVELS,
    }
    for name, allowed in choices.items():
        if getattr(config, name) not in allowed:
            bad(f"unknown {name} {getattr(config, name)!r}; choose one of {allowed}")
    if config.data is None and config.dataset not in DATASETS:
        bad(f"unknown dataset {config.dataset!r}; choose one of {DATASETS}")
    if not (
        isinstance(config.learning_rate, (int, float))
        and np.isfinite(config.learning_rate)
        and config.learning_rate > 0
    ):
        bad(f"learning_rate must be a positive number, got {config.learning_rate!r}")
    for name in (
        "batch_size",
        "eval_batch_size",
        "log_every_steps",
        "checkpoint_every_steps",
        "max_checkpoints_to_keep",
        "whiten_num_images",
    ):
        _int(name, getattr(config, name), bad)
    if config.num_steps is None:
        e = config.num_epochs
        if not isinstance(e, numbers.Real) or isinstance(e, bool) or not e > 0:
            bad(f"num_epochs must be a positive number, got {e!r}")
    else:
        _int("num_steps", config.num_steps, bad, optional=True)
    _validate_adversarial(config.adversarial, bad)
    _validate_gb(config.gb, bad)
    if not 0.0 <= config.label_smoothing < 1.0:
        bad(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.weight_decay < 0:
        bad(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0.0 <= config.warmup_fraction < 1.0:
        bad(f"warmup_fraction must be in [0, 1), got {config.warmup_fraction}")
    for name in ("schedule_start_factor", "schedule_end_factor"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            bad(f"{name} must be in [0, 1], got {getattr(config, name)}")
    _int("lookahead_every", config.lookahead_every, bad, 0)
    if not 0.0 <= config.lookahead_decay <= 1.0:
        bad(f"lookahead_decay must be in [0, 1], got {config.lookahead_decay}")
    if not isinstance(config.param_groups, dict):
        bad(f"param_groups must be a dict {{name: {{...}}}}, got {config.param_groups!r}")
    for name, g in config.param_groups.items():
        if not isinstance(g, dict) or "pattern" not in g or set(g) - _GROUP_KEYS:
            bad(f"param_groups[{name!r}] must be a dict with 'pattern' and some of {_GROUP_KEYS}")
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
        bad(f"compute_dtype must be float32/bfloat16/float16, got {config.compute_dtype!r}")
    _int("crop_pad", config.crop_pad, bad, 0)
    if num_devices is None:
        import jax

        num_devices = jax.local_device_count()
    ndev = config.num_devices or num_devices
    if ndev > num_devices:
        bad(f"num_devices={ndev} but only {num_devices} devices")
    if config.batch_size % ndev or config.eval_batch_size % ndev:
        bad(
            f"batch_size ({config.batch_size}) and eval_batch_size "
            f"({config.eval_batch_size}) must be multiples of the device count {ndev}"
        )


def load_config(spec: str) -> Config:
    """``path/to/cfg.py[:arg]`` or ``module.name[:arg]`` -> ``get_config(arg)``.

    Example:
      >>> from gbjax.config import load_config
      >>> c = load_config("gbjax.configs.pe_mnist:smoke")  # or "gbjax/configs/pe_mnist.py:smoke"
      >>> c.model, c.num_steps, c.num_train
      ('paper_convnet', 16, 1024)
    """
    path, _, arg = spec.partition(":")
    if path.endswith(".py"):
        modspec = importlib.util.spec_from_file_location(
            "_gbjax_config_" + pathlib.Path(path).stem, path
        )
        if modspec is None:
            raise ValueError(f"cannot load config file {path!r}")
        mod = importlib.util.module_from_spec(modspec)
        modspec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(path)
    return mod.get_config(arg) if arg else mod.get_config()


def apply_overrides(config: Config, overrides: Iterable[str] | None) -> Config:
    """``["key=value", ...]`` (values parsed as Python literals) -> new Config.

    A value that is not a Python literal stays a string; ``config`` is unchanged.

    Example:
      >>> from gbjax.config import Config, apply_overrides
      >>> c = apply_overrides(Config(), ["num_epochs=3", "model_kwargs={'kind': 'raw'}",
      ...                                "optimizer=sgd"])
      >>> c.num_epochs, c.model_kwargs, c.optimizer
      (3, {'kind': 'raw'}, 'sgd')
      >>> apply_overrides(c, ["epochs=3"])
      Traceback (most recent call last):
      ...
      ValueError: bad override 'epochs=3'; expected key=value with key in Config
    """
    fields = {f.name for f in dataclasses.fields(Config)}
    updates = {}
    for item in overrides or ():
        key, sep, val = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"bad override {item!r}; expected key=value with key in Config")
        try:
            updates[key] = ast.literal_eval(val)
        except (ValueError, SyntaxError):
            updates[key] = val
    return dataclasses.replace(config, **updates)

"""Training and evaluation loop for the gbjax classifiers.

A thin CLI over :func:`train_and_evaluate`::

    python -m gbjax.train --config gbjax/configs/pe_mnist.py --workdir /tmp/pe
    python -m gbjax.train --config gbjax/configs/pe_mnist.py:smoke --workdir /tmp/s \
        --set num_epochs=1 --set seed=3

Design
------
* The whole (preprocessed) dataset lives on the device as uint8.  Each step
  gathers its batch on device from the epoch permutation, which is a pure
  function of ``(seed, epoch)``; augmentation keys are a pure function of
  ``(seed, step)``.  So a run killed and restarted with the same command resumes
  from its latest checkpoint and ends bit-for-bit where an uninterrupted run
  ends (on the same machine).
* One jitted train step (functional NNX: ``nnx.split`` once, ``nnx.merge``
  inside ``jax.jit``) that donates the train state; a jitted eval step.  The
  BatchNorm train/eval modes are two graph definitions over the same state.
* Data parallel: a 1-D ``jax.sharding.Mesh`` over the devices; the batch is
  sharded over ``"data"``, parameters and the dataset are replicated.
  (BatchNorm statistics are then global-batch statistics, as on one device.)
* Metrics (JSON lines) go to ``workdir/metrics.jsonl``; each line has
  ``train_time_s`` (summed step time, compile and evaluation excluded) and
  ``elapsed_s`` (wall time since the start of this process), so the time to a
  target accuracy is read off the first eval line that reaches it (see
  ``benchmarks/time_to_target.py``).  Orbax checkpoints go to
  ``workdir/checkpoints`` every ``checkpoint_every_steps`` steps and at the end;
  ``workdir/config.json`` records the configuration.
* A non-finite loss stops the run with :class:`NonFiniteLossError`; checkpoints
  are only written after the loss since the previous one was checked finite, so
  the latest checkpoint is the last good one.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import gzip
import hashlib
import importlib
import importlib.util
import json
import os
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gbjax import models

__all__ = [
    "Config",
    "NonFiniteLossError",
    "build_model",
    "make_optimizer",
    "load_config",
    "restore_model",
    "train_and_evaluate",
    "main",
]

MODELS = ("paper_convnet", "resnet18", "resnet20", "resnet")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("constant", "cosine", "onecycle")
PREPROCESS = ("none", "gb")
AUGMENT = ("none", "crop_flip")
DATASETS = ("mnist", "fashion_mnist", "cifar10")


@dataclasses.dataclass
class Config:
    """Everything a run depends on.  See ``gbjax/configs/*.py`` for examples."""

    # --- data
    dataset: str = "mnist"
    data_dir: str | None = None  # else $GBJAX_DATA_DIR
    # Override loading: {"train": (images, labels), "test": (images, labels)},
    # images uint8 (N, H, W[, C]).  Not written to config.json.
    data: Any = None
    num_train: int | None = None  # a fixed random subset of N images
    num_test: int | None = None  # (seed 0, whatever config.seed is)
    preprocess: str = "none"  # "none" | "gb"
    gb: dict = dataclasses.field(default_factory=dict)  # kwargs of gb_denoise
    cache_dir: str | None = None  # GB cache; else $GBJAX_CACHE_DIR, ~/.cache/gbjax
    augment: str = "none"  # "none" | "crop_flip"
    crop_pad: int = 4
    # --- model
    # "paper_convnet" | "resnet18" | "resnet20" | "resnet" (generic ResNet:
    # model_kwargs stage_sizes=(...), widths=(...))
    model: str = "paper_convnet"
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"  # ResNets: "bfloat16" on GPU
    # --- optimisation
    optimizer: str = "adam"  # "adam" | "adamw" | "sgd"
    learning_rate: float = 1e-4  # peak value for schedules
    schedule: str = "constant"  # "constant" | "cosine" | "onecycle"
    warmup_fraction: float = 0.0  # cosine: warmup; onecycle: rise fraction
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 0.0  # on kernels/embeddings (ndim > 1) only
    label_smoothing: float = 0.0
    batch_size: int = 64
    eval_batch_size: int = 1000
    num_epochs: int = 1
    num_steps: int | None = None  # overrides num_epochs when set
    seed: int = 0
    num_devices: int | None = None  # None: all local devices
    # --- loop
    log_every_steps: int = 100
    checkpoint_every_steps: int = 1000
    eval_every_epochs: int = 1  # 0: only at the end
    max_checkpoints_to_keep: int = 2
    progress: bool = True
    # Testing aid: multiply the loss by NaN at this step (exercises the guard).
    debug_nan_step: int = -1

    def to_json_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("data")
        return d


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


# ----------------------------------------------------------------------------
# configuration


def validate_config(config: Config) -> None:
    """Raises ValueError with a clear message for a bad configuration."""

    def bad(msg):
        raise ValueError(f"invalid config: {msg}")

    if not isinstance(config, Config):
        bad(f"expected gbjax.train.Config, got {type(config).__name__}")
    if config.model not in MODELS:
        bad(f"unknown model {config.model!r}; choose one of {MODELS}")
    if config.optimizer not in OPTIMIZERS:
        bad(f"unknown optimizer {config.optimizer!r}; choose one of {OPTIMIZERS}")
    if config.schedule not in SCHEDULES:
        bad(f"unknown schedule {config.schedule!r}; choose one of {SCHEDULES}")
    if config.preprocess not in PREPROCESS:
        bad(f"unknown preprocess {config.preprocess!r}; choose one of {PREPROCESS}")
    if config.augment not in AUGMENT:
        bad(f"unknown augment {config.augment!r}; choose one of {AUGMENT}")
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
    ):
        v = getattr(config, name)
        if not isinstance(v, int) or v < 1:
            bad(f"{name} must be a positive integer, got {v!r}")
    if config.num_steps is None:
        if not isinstance(config.num_epochs, int) or config.num_epochs < 1:
            bad(f"num_epochs must be a positive integer, got {config.num_epochs!r}")
    elif not isinstance(config.num_steps, int) or config.num_steps < 1:
        bad(f"num_steps must be a positive integer or None, got {config.num_steps!r}")
    if not 0.0 <= config.label_smoothing < 1.0:
        bad(f"label_smoothing must be in [0, 1), got {config.label_smoothing}")
    if config.weight_decay < 0:
        bad(f"weight_decay must be >= 0, got {config.weight_decay}")
    if not 0.0 <= config.warmup_fraction < 1.0:
        bad(f"warmup_fraction must be in [0, 1), got {config.warmup_fraction}")
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
        bad(f"compute_dtype must be float32/bfloat16/float16, got {config.compute_dtype!r}")
    ndev = config.num_devices or jax.local_device_count()
    if ndev > jax.local_device_count():
        bad(f"num_devices={ndev} but only {jax.local_device_count()} devices")
    if config.batch_size % ndev or config.eval_batch_size % ndev:
        bad(
            f"batch_size ({config.batch_size}) and eval_batch_size "
            f"({config.eval_batch_size}) must be multiples of the device count {ndev}"
        )


def load_config(spec: str) -> Config:
    """``path/to/cfg.py[:arg]`` or ``module.name[:arg]`` -> ``get_config(arg)``."""
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


def apply_overrides(config: Config, overrides) -> Config:
    """``["key=value", ...]`` (values parsed as Python literals) -> new Config."""
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


# ----------------------------------------------------------------------------
# data


def _load_mnist_idx(name: str, split: str, data_dir: str):
    """Minimal private IDX loader (used only when gbjax.data is unavailable)."""
    d = pathlib.Path(data_dir) / {"mnist": "mnist", "fashion_mnist": "fashion_mnist"}[name]
    prefix = "train" if split == "train" else "t10k"

    def read(fname):
        with gzip.open(d / fname, "rb") as f:
            raw = f.read()
        ndim = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
        return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)

    x = read(f"{prefix}-images-idx3-ubyte.gz")[..., None]
    y = read(f"{prefix}-labels-idx1-ubyte.gz").astype(np.int32)
    return x, y


def _load_split(config: Config, split: str):
    data_dir = config.data_dir or os.environ.get("GBJAX_DATA_DIR")
    try:
        from gbjax import data as gdata  # written concurrently; optional here

        load = gdata.load
    except (ImportError, AttributeError):
        load = None
    if load is not None:
        return load(config.dataset, split, data_dir=data_dir)
    if config.dataset in ("mnist", "fashion_mnist") and data_dir:
        return _load_mnist_idx(config.dataset, split, data_dir)
    raise ValueError(
        f"cannot load dataset {config.dataset!r}: gbjax.data is "
        "unavailable and no data_dir / GBJAX_DATA_DIR is set"
    )


def _as_nhwc_uint8(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W[, C]), got shape {x.shape}")
    return x


def _gb_cached(images: np.ndarray, params: dict, cache_dir: str | None) -> np.ndarray:
    """gb_denoise(images, **params), cached on disk by (params, data hash)."""
    cache = pathlib.Path(
        cache_dir or os.environ.get("GBJAX_CACHE_DIR") or pathlib.Path.home() / ".cache" / "gbjax"
    )
    from gbjax import gb  # lazy: heavy, and optional for preprocess="none"

    h = hashlib.sha256()
    h.update(f"gb-output-v{gb.OUTPUT_VERSION}".encode())  # stale entries of older engines miss
    h.update(json.dumps(params, sort_keys=True, default=str).encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    path = cache / f"gb_{h.hexdigest()[:32]}.npy"
    if path.exists():
        out = np.load(path)
        if out.shape == images.shape and out.dtype == np.uint8:
            return out
    out = np.asarray(gb.gb_denoise(images, **params))
    if out.shape != images.shape or out.dtype != images.dtype:
        raise RuntimeError(
            f"gb_denoise returned {out.shape} {out.dtype} for {images.shape} {images.dtype}"
        )
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, out)
    os.replace(tmp, path)
    return out


def load_datasets(config: Config):
    """-> (train_x uint8 NHWC, train_y int32, test_x, test_y), preprocessed."""
    if config.data is not None:
        (xtr, ytr), (xte, yte) = config.data["train"], config.data["test"]
    else:
        xtr, ytr = _load_split(config, "train")
        xte, yte = _load_split(config, "test")
    xtr, xte = _as_nhwc_uint8(xtr), _as_nhwc_uint8(xte)
    ytr, yte = np.asarray(ytr, np.int32), np.asarray(yte, np.int32)

    # Subsets are a fixed random sample (seed 0, independent of config.seed, in
    # the original order): some sources (the CIFAR-10 folders) are class-sorted.
    def subset(x, y, n):
        if n is None or n >= len(x):
            return x, y
        idx = np.sort(np.random.default_rng(0).permutation(len(x))[:n])
        return x[idx], y[idx]

    xtr, ytr = subset(xtr, ytr, config.num_train)
    xte, yte = subset(xte, yte, config.num_test)
    if len(xtr) < config.batch_size:
        raise ValueError(
            f"invalid config: {len(xtr)} training images < batch_size {config.batch_size}"
        )
    if config.preprocess == "gb":
        xtr = _gb_cached(xtr, dict(config.gb), config.cache_dir)
        xte = _gb_cached(xte, dict(config.gb), config.cache_dir)
    return xtr, ytr, xte, yte


def _random_crop_flip(key, x_BHWC, pad: int = 4):
    """Private fallback: zero-pad, random crop back to size, random h-flip."""
    B, H, W, C = x_BHWC.shape
    k1, k2, k3 = jax.random.split(key, 3)
    xp = jnp.pad(x_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    dy = jax.random.randint(k1, (B,), 0, 2 * pad + 1)
    dx = jax.random.randint(k2, (B,), 0, 2 * pad + 1)
    crop = jax.vmap(lambda im, i, j: jax.lax.dynamic_slice(im, (i, j, 0), (H, W, C)))
    out = crop(xp, dy, dx)
    flip = jax.random.bernoulli(k3, 0.5, (B,))
    return jnp.where(flip[:, None, None, None], out[:, :, ::-1, :], out)


def _augment_fn():
    try:
        from gbjax.data import random_crop_flip

        return random_crop_flip
    except (ImportError, AttributeError):
        return _random_crop_flip


# ----------------------------------------------------------------------------
# model and optimiser


def build_model(
    config: Config, *, input_shape, num_classes: int, mean, std, rngs: nnx.Rngs
) -> nnx.Module:
    """The configured model.  ``mean``/``std``: training-set statistics in pixel
    units (per channel); the paper network uses their channel average."""
    H, W, C = input_shape
    kw = dict(config.model_kwargs)
    dtype = None if config.compute_dtype == "float32" else jnp.dtype(config.compute_dtype)
    mean = np.asarray(mean, np.float32).reshape(-1)
    std = np.asarray(std, np.float32).reshape(-1)
    if config.model == "paper_convnet":
        if H != W:
            raise ValueError(f"paper_convnet needs square images, got {H}x{W}")
        kw.setdefault("mean", float(mean.mean()))
        kw.setdefault("std", float(std.mean()))
        return models.PaperConvNet(
            num_classes=num_classes, in_channels=C, image_size=H, rngs=rngs, **kw
        )
    kw.setdefault("mean", mean)
    kw.setdefault("std", std)
    if config.model == "resnet":
        missing = {"stage_sizes", "widths"} - set(kw)
        if missing:
            raise ValueError(f"invalid config: model='resnet' needs model_kwargs {sorted(missing)}")
        return models.ResNet(num_classes=num_classes, in_channels=C, dtype=dtype, rngs=rngs, **kw)
    ctor = {"resnet18": models.ResNet18, "resnet20": models.ResNet20}[config.model]
    return ctor(num_classes, in_channels=C, dtype=dtype, rngs=rngs, **kw)


def make_schedule(config: Config, total_steps: int):
    lr = config.learning_rate
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    warm = int(round(config.warmup_fraction * total_steps))
    if config.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 0), total_steps, end_value=0.0)
    # onecycle: linear 0 -> peak over `warm` steps, then linear peak -> 0.
    warm = max(warm, 1)
    return optax.join_schedules(
        [
            optax.linear_schedule(lr / 25.0, lr, warm),
            optax.linear_schedule(lr, 0.0, max(total_steps - warm, 1)),
        ],
        [warm],
    )


def make_optimizer(config: Config, total_steps: int) -> optax.GradientTransformation:
    sched = make_schedule(config, total_steps)
    decay_mask = lambda p: jax.tree.map(lambda a: a.ndim > 1, p)  # noqa: E731
    if config.optimizer == "adamw":
        return optax.adamw(sched, weight_decay=config.weight_decay, mask=decay_mask)
    if config.optimizer == "adam":
        opt = optax.adam(sched)
    else:
        opt = optax.sgd(
            sched,
            momentum=config.momentum or None,
            nesterov=config.nesterov and bool(config.momentum),
        )
    if config.weight_decay:
        opt = optax.chain(optax.add_decayed_weights(config.weight_decay, decay_mask), opt)
    return opt


def root_key(seed: int) -> jax.Array:
    """The run's root PRNG key: ``impl="rbg"``.

    With jax 0.10 on CPU, every compiled threefry random op (the default
    implementation) costs ~15 s of XLA compilation here; RngBitGenerator keys
    compile in well under a second.  Streams are derived with ``fold_in``:
    0 -> parameter init, 1 -> epoch permutations (fold_in epoch), 2 ->
    augmentation (fold_in step).  Note: "rbg" bits may depend on the sharding,
    so a data-parallel run with augmentation is statistically, not bitwise,
    equivalent to a single-device one.
    """
    return jax.random.key(seed, impl="rbg")


def _loss_and_correct(logits, labels, num_classes, label_smoothing):
    onehot = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
    correct = jnp.argmax(logits, -1) == labels
    return loss, correct


# ----------------------------------------------------------------------------
# the loop


class _Trainer:
    """Holds the compiled step functions and shardings for one configuration."""

    def __init__(
        self, config: Config, model: nnx.Module, num_classes: int, num_train: int, total_steps: int
    ):
        self.config = config
        ndev = config.num_devices or jax.local_device_count()
        self.mesh = Mesh(np.asarray(jax.local_devices()[:ndev]), ("data",))
        self.repl = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        model.train()
        self.train_graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        model.eval()
        self.eval_graphdef, _, _ = nnx.split(model, nnx.Param, ...)
        self.tx = make_optimizer(config, total_steps)
        self.steps_per_epoch = num_train // config.batch_size
        self.num_classes = num_classes
        key = root_key(config.seed)
        self.data_key = jax.random.fold_in(key, 1)
        self.aug_key = jax.random.fold_in(key, 2)
        zero = lambda: jnp.zeros((), jnp.float32)  # noqa: E731  (distinct buffers:
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "rest": rest,  # donated)
            "opt_state": self.tx.init(params),
            "loss_sum": zero(),
            "correct_sum": zero(),
            "count": zero(),
        }
        self.init_state = jax.device_put(state, self.repl)
        self.train_step = jax.jit(self._train_step, donate_argnums=(0,), out_shardings=self.repl)
        self.eval_step = jax.jit(self._eval_step)
        self.epoch_perm = jax.jit(
            lambda epoch: jax.random.permutation(
                jax.random.fold_in(self.data_key, epoch), num_train
            ),
            out_shardings=self.repl,
        )
        self.all_finite = jax.jit(
            lambda t: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(t)]))
        )
        self.augment = _augment_fn() if config.augment == "crop_flip" else None

    def _train_step(self, state, images_NHWC, labels_N, perm_N):
        cfg, B = self.config, self.config.batch_size
        step = state["step"]
        start = (step % self.steps_per_epoch) * B
        idx_B = jax.lax.dynamic_slice(perm_N, (start,), (B,))
        x_BHWC = jax.lax.with_sharding_constraint(images_NHWC[idx_B], self.batch_sharding)
        y_B = jax.lax.with_sharding_constraint(labels_N[idx_B], self.batch_sharding)
        if self.augment is not None:
            x_BHWC = self.augment(jax.random.fold_in(self.aug_key, step), x_BHWC, pad=cfg.crop_pad)
            x_BHWC = jax.lax.with_sharding_constraint(x_BHWC, self.batch_sharding)

        def loss_fn(params):
            # fresh Variable objects at this trace level (BatchStat is mutated here)
            rest = jax.tree.map(lambda a: a, state["rest"])
            model = nnx.merge(self.train_graphdef, params, rest)
            logits = model(x_BHWC)
            loss_B, correct_B = _loss_and_correct(
                logits, y_B, self.num_classes, cfg.label_smoothing
            )
            loss = jnp.mean(loss_B)
            if cfg.debug_nan_step >= 0:
                loss = loss * jnp.where(step == cfg.debug_nan_step, jnp.nan, 1.0)
            _, _, new_rest = nnx.split(model, nnx.Param, ...)
            return loss, (jnp.sum(correct_B), new_rest)

        (loss, (correct, new_rest)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        return {
            "step": step + 1,
            "params": params,
            "rest": new_rest,
            "opt_state": opt_state,
            "loss_sum": state["loss_sum"] + loss * B,
            "correct_sum": state["correct_sum"] + correct.astype(jnp.float32),
            "count": state["count"] + B,
        }

    def _eval_step(self, params, rest, images_NHWC, labels_N, start):
        E = self.config.eval_batch_size
        x = jax.lax.dynamic_slice_in_dim(images_NHWC, start, E)
        y = jax.lax.dynamic_slice_in_dim(labels_N, start, E)
        x = jax.lax.with_sharding_constraint(x, self.batch_sharding)
        y = jax.lax.with_sharding_constraint(y, self.batch_sharding)
        model = nnx.merge(self.eval_graphdef, params, rest)
        logits = model(x)
        loss_B, correct_B = _loss_and_correct(logits, y, self.num_classes, 0.0)
        valid = (start + jnp.arange(E)) < self.num_test
        return jnp.sum(jnp.where(valid, loss_B, 0.0)), jnp.sum(jnp.where(valid, correct_B, 0))

    def evaluate(self, state, test_x, test_y):
        """Test loss and accuracy over the (padded, on-device) test set."""
        E = self.config.eval_batch_size
        loss_sum, correct = 0.0, 0
        for start in range(0, self.num_test, E):
            l, c = self.eval_step(state["params"], state["rest"], test_x, test_y, jnp.int32(start))
            loss_sum += float(l)
            correct += int(c)
        return {"test_loss": loss_sum / self.num_test, "test_accuracy": correct / self.num_test}

    def put_test(self, xte, yte):
        """Pads the test set (wrapping) to a multiple of eval_batch_size."""
        E = self.config.eval_batch_size
        self.num_test = len(xte)
        n = -(-len(xte) // E) * E
        idx = np.arange(n) % len(xte)
        return (jax.device_put(xte[idx], self.repl), jax.device_put(yte[idx], self.repl))


def _checkpoint_manager(workdir: pathlib.Path, config: Config):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=config.max_checkpoints_to_keep,
            create=True,
            # synchronous: the train step donates (reuses) the state's buffers
            enable_async_checkpointing=False,
        ),
    )


def _write_jsonl(path: pathlib.Path, record: dict):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike, *, stop_after_step: int | None = None
) -> dict:
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint).

    Returns the final metrics: ``test_accuracy``, ``test_loss``, ``train_loss``
    and ``train_accuracy`` (last logging window), ``step``, ``images_per_sec``
    and ``step_time_ms`` (training only, compilation excluded),
    ``compile_time_s``, ``wall_time_s``.  ``stop_after_step`` (testing aid)
    returns right after that step, as if the process were killed there.
    """
    import orbax.checkpoint as ocp

    t_start = time.perf_counter()
    validate_config(config)
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    xtr, ytr, xte, yte = load_datasets(config)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if config.data is None and config.dataset in DATASETS:
        num_classes = max(num_classes, 10)
    mean = xtr.reshape(-1, xtr.shape[-1]).mean(0, dtype=np.float64)
    std = xtr.reshape(-1, xtr.shape[-1]).std(0, dtype=np.float64)
    if config.model == "paper_convnet":  # the authors' scalar statistics
        mean = np.full_like(mean, xtr.mean(dtype=np.float64))
        std = np.full_like(std, xtr.std(dtype=np.float64))
    # Initialise under jit: one compilation instead of one per initialiser op.
    model = nnx.jit(
        lambda key: build_model(
            config,
            input_shape=xtr.shape[1:],
            num_classes=num_classes,
            mean=mean,
            std=std,
            rngs=nnx.Rngs(params=key),
        )
    )(jax.random.fold_in(root_key(config.seed), 0))
    steps_per_epoch = len(xtr) // config.batch_size
    total_steps = config.num_steps or config.num_epochs * steps_per_epoch
    trainer = _Trainer(config, model, num_classes, len(xtr), total_steps)

    record = config.to_json_dict()
    record.update(
        input_shape=list(xtr.shape[1:]),
        num_classes=num_classes,
        num_train=len(xtr),
        num_test=len(xte),
        total_steps=total_steps,
    )
    (workdir / "config.json").write_text(json.dumps(record, indent=2, default=str))
    metrics_path = workdir / "metrics.jsonl"

    train_x = jax.device_put(xtr, trainer.repl)
    train_y = jax.device_put(ytr, trainer.repl)
    test_x, test_y = trainer.put_test(xte, yte)

    mngr = _checkpoint_manager(workdir, config)
    state = trainer.init_state
    start_step = 0
    latest = mngr.latest_step()
    if latest is not None:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        start_step = int(state["step"])
        _write_jsonl(metrics_path, {"event": "resumed", "step": start_step})
    last_good = latest

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps,
        initial=start_step,
        disable=not config.progress,
        desc=f"{config.model}",
        unit="step",
        dynamic_ncols=True,
    )
    B = config.batch_size
    summary: dict = {}
    compile_time = None
    train_time, train_steps = 0.0, 0  # compile-free timing of the train steps
    epoch = -1
    perm = None
    t_mark, steps_since_mark = None, 0
    last_sync_step = start_step
    try:
        for step in range(start_step, total_steps):
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                perm = trainer.epoch_perm(epoch)
            if t_mark is None:  # first step of this process: measure compile + run
                t0 = time.perf_counter()
                state = trainer.train_step(state, train_x, train_y, perm)
                jax.block_until_ready(state["loss_sum"])
                compile_time = time.perf_counter() - t0
                t_mark, steps_since_mark = time.perf_counter(), 0
            else:
                state = trainer.train_step(state, train_x, train_y, perm)
                steps_since_mark += 1
            bar.update(1)
            done = step + 1
            end_of_epoch = done % steps_per_epoch == 0
            do_eval = done == total_steps or (
                end_of_epoch
                and config.eval_every_epochs
                and (done // steps_per_epoch) % config.eval_every_epochs == 0
            )
            do_ckpt = done % config.checkpoint_every_steps == 0 or done == total_steps
            if not (
                done % config.log_every_steps == 0 or do_eval or do_ckpt or done == stop_after_step
            ):
                continue
            # ---- sync point: check, log, evaluate, checkpoint
            loss_sum = float(state["loss_sum"])
            now = time.perf_counter()
            if steps_since_mark:
                train_time += now - t_mark
                train_steps += steps_since_mark
            if not np.isfinite(loss_sum) or not bool(trainer.all_finite(state["params"])):
                where = (
                    f"checkpoint at step {last_good} in {workdir / 'checkpoints'}"
                    if last_good is not None
                    else "no checkpoint was written"
                )
                msg = (
                    f"non-finite training loss ({loss_sum}) between steps "
                    f"{last_sync_step + 1} and {done}; stopping. Last good {where}."
                )
                _write_jsonl(
                    metrics_path,
                    {"event": "non_finite_loss", "step": done, "last_good_checkpoint": last_good},
                )
                raise NonFiniteLossError(msg)
            count = float(state["count"])
            rec = {
                "step": done,
                "epoch": done / steps_per_epoch,
                "train_loss": loss_sum / max(count, 1.0),
                "train_accuracy": float(state["correct_sum"]) / max(count, 1.0),
                "learning_rate": float(make_schedule(config, total_steps)(done - 1)),
            }
            if steps_since_mark:
                dt = (now - t_mark) / steps_since_mark
                rec.update(images_per_sec=B / dt, step_time_ms=1e3 * dt)
            # Time to a target: the summed time of this process's train steps (the
            # first, compiling step and all evaluations excluded), and all wall time.
            rec.update(train_time_s=train_time, elapsed_s=now - t_start)
            state = dict(
                state,
                **{
                    k: jax.device_put(jnp.zeros((), jnp.float32), trainer.repl)
                    for k in ("loss_sum", "correct_sum", "count")
                },
            )
            if do_eval:
                rec.update(trainer.evaluate(state, test_x, test_y))
            _write_jsonl(metrics_path, rec)
            summary.update(rec)
            bar.set_postfix(
                loss=f"{rec['train_loss']:.4f}",
                acc=f"{rec['train_accuracy']:.3f}",
                img_s=f"{rec.get('images_per_sec', 0):.0f}",
                **({"test": f"{rec['test_accuracy']:.4f}"} if do_eval else {}),
            )
            if do_ckpt:
                mngr.save(done, args=ocp.args.StandardSave(state))
                mngr.wait_until_finished()
                last_good = done
            last_sync_step = done
            t_mark, steps_since_mark = time.perf_counter(), 0
            if done == stop_after_step:
                break
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()

    summary.pop("epoch", None)
    summary.pop("learning_rate", None)
    if train_steps:
        summary["images_per_sec"] = B * train_steps / train_time
        summary["step_time_ms"] = 1e3 * train_time / train_steps
    summary.update(
        step=int(state["step"]),
        compile_time_s=compile_time,
        wall_time_s=time.perf_counter() - t_start,
    )
    _write_jsonl(metrics_path, {"event": "summary", **summary})
    return summary


def time_to_target(workdir: str | os.PathLike, target: float) -> dict | None:
    """The first evaluation in ``workdir/metrics.jsonl`` with test accuracy >= target.

    Returns that line (``step``, ``epoch``, ``test_accuracy``, ...) with
    ``train_time_s`` and ``elapsed_s`` counted from the start of the run, or None
    if no evaluation reached ``target``.  For a run that was resumed, the time of
    the earlier processes (up to their last logged line, including steps that
    were then redone) is added and ``"resumed": True`` is set.
    """
    offset = {"train_time_s": 0.0, "elapsed_s": 0.0}
    last = dict(offset)
    resumed = False
    for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") == "resumed":
            offset = {k: offset[k] + last[k] for k in offset}
            last = {k: 0.0 for k in offset}
            resumed = True
            continue
        if "event" in rec or "train_time_s" not in rec:
            continue
        last = {k: rec[k] for k in offset}
        if rec.get("test_accuracy", -1.0) >= target:
            out = dict(rec, **{k: offset[k] + rec[k] for k in offset})
            if resumed:
                out["resumed"] = True
            return out
    return None


def restore_model(workdir: str | os.PathLike, step: int | None = None) -> nnx.Module:
    """Rebuilds the model of a finished run from ``workdir`` (eval mode)."""
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir)
    rec = json.loads((workdir / "config.json").read_text())
    fields = {f.name for f in dataclasses.fields(Config)}
    config = Config(**{k: v for k, v in rec.items() if k in fields})
    C = rec["input_shape"][-1]
    model = nnx.eval_shape(
        lambda: build_model(
            config,
            input_shape=tuple(rec["input_shape"]),
            num_classes=rec["num_classes"],
            mean=np.zeros(C),
            std=np.ones(C),
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    mngr = ocp.CheckpointManager(
        (workdir / "checkpoints").absolute(), options=ocp.CheckpointManagerOptions(read_only=True)
    )
    step = mngr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / 'checkpoints'}")
    restored = mngr.restore(
        step,
        args=ocp.args.PyTreeRestore(
            {"params": params, "rest": rest},
            restore_args=jax.tree.map(
                lambda _: ocp.ArrayRestoreArgs(
                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])
                ),
                {"params": params, "rest": rest},
            ),
            partial_restore=True,
        ),
    )
    mngr.close()
    model = nnx.merge(graphdef, restored["params"], restored["rest"])
    model.eval()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="path/to/config.py[:arg] or module[:arg]")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (Python literal)",
    )
    args = p.parse_args(argv)
    config = apply_overrides(load_config(args.config), args.set)
    try:
        metrics = train_and_evaluate(config, args.workdir)
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    # Re-import so that config files' `from gbjax.train import Config` and this
    # module's Config are the same class under `python -m gbjax.train`.
    from gbjax.train import main as _main

    sys.exit(_main())

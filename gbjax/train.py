"""Training, in the shape of flax's examples/imagenet: the train state, step and
evaluation as small public pieces, and :func:`train_and_evaluate` as the loop.

    python -m gbjax train --config gbjax/configs/airbench_cifar10.py --workdir /tmp/ab
    python -m gbjax train --config gbjax/configs/pe_mnist.py:smoke --workdir /tmp/s \\
        --set num_epochs=1 --set seed=3

(``python -m gbjax.train`` is the same command.) From Python::

    model, metrics = gbjax.train_and_evaluate(config, workdir)
    gbjax.evaluate.accuracy(model, x_test, y_test)

Pieces
------
* :func:`create_train_state`: the train state of a model under an optimiser (a
  dict pytree of arrays); :func:`train_step`: one update on a batch;
  :func:`eval_step`: ``{"accuracy", "loss"}`` of a state on a test set.
* :func:`make_optimizer` / :func:`make_schedule`: a :class:`Config` as optax
  (the transforms themselves are in :mod:`gbjax.optim`).
* Recipe specifics are hooks, not cases in the step: the augmentation is looked
  up in :data:`AUGMENTATIONS`; a model with an ``init_from_data(images)`` method
  (airbench's whitening layer) gets it called on ``whiten_num_images`` random
  training images; lookahead over BatchNorm statistics, adversarial training and
  ``debug_nan_step`` are functions built from the config once, by
  :class:`Trainer`.
* :class:`Trainer` binds the pieces for one configuration: one jitted step with
  its shardings and PRNG streams.

Design
------
* The whole (preprocessed) data set lives on the device as uint8. Each step
  gathers its batch on device from the epoch permutation, a pure function of
  ``(seed, epoch)``; augmentation keys are a pure function of ``(seed, step)``.
  So a run killed and restarted with the same command resumes from its latest
  checkpoint and ends bit-for-bit where an uninterrupted run ends (same machine).
* Functional NNX: ``nnx.split`` once, ``nnx.merge`` inside ``jax.jit``; the
  step donates the train state. The BatchNorm train and eval modes are two
  graph definitions over the same state; :meth:`Trainer.model` gives the
  eval-mode model of a state, and evaluation is :func:`gbjax.evaluate.evaluate`,
  as everywhere else.
* Data parallel: a 1-D ``jax.sharding.Mesh`` over the devices; the batch is
  sharded over ``"data"``, parameters and the data set are replicated.
* Metrics (JSON lines) go to ``workdir/metrics.jsonl``; each line has
  ``train_time_s`` (summed step time, compile and evaluation excluded) and
  ``elapsed_s`` (wall time since the start of this process, data loading and
  compilation included), so the time to a target accuracy is read off the
  first evaluation that reaches it (:func:`time_to_target`). Orbax checkpoints
  go to ``workdir/checkpoints`` every ``checkpoint_every_steps`` steps and at
  the end, for resuming a killed run, each with a sha256 checked on resume;
  ``workdir/config.json`` records the configuration (and a fingerprint of the
  data) that made the workdir. A run with another configuration is refused
  unless ``--overwrite``; a lock keeps a second run out (:mod:`gbjax._workdir`).
* A non-finite loss stops the run with :class:`NonFiniteLossError`; checkpoints
  are only written after the loss since the previous one was checked finite.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from gbjax import (
    _random,
    _train_loop,
    _workdir,
    _xla,
    attacks,
    augment,
    data,
    defences,
    evaluate,
    models,
    optim,
)
from gbjax._runs import build_model, restore_model, time_to_target
from gbjax._workdir import WorkdirBusyError, WorkdirError, WorkdirMismatchError
from gbjax.config import Config, apply_overrides, load_config, validate_config
from gbjax.gb import GBParams, gb_denoise

__all__ = [
    "TrainResult",
    "Trainer",
    "NonFiniteLossError",
    "WorkdirError",
    "WorkdirMismatchError",
    "WorkdirBusyError",
    "AUGMENTATIONS",
    "build_model",
    "init_model",
    "load_datasets",
    "create_train_state",
    "train_step",
    "eval_step",
    "make_optimizer",
    "make_schedule",
    "lookahead_decay",
    "train_and_evaluate",
    "restore_model",
    "time_to_target",
    "root_key",
    "add_arguments",
    "main",
]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


class TrainResult(NamedTuple):
    """What :func:`train_and_evaluate` returns."""

    model: nnx.Module  # the trained model, in eval mode
    metrics: dict  # the final metrics (see train_and_evaluate)


# ----------------------------------------------------------------------------
# data


def _as_nhwc_uint8(x) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {x.dtype}")
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"images must be (N, H, W[, C]), got shape {x.shape}")
    return x


def load_datasets(config: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """-> (train_x uint8 NHWC, train_y int32, test_x, test_y), preprocessed.

    The data set ``config.dataset`` (or the arrays of ``config.data``), cut to
    the fixed random subsets ``num_train`` / ``num_test``, and GB-processed when
    ``config.preprocess == "gb"``; all host numpy arrays.

    Example:
      >>> import numpy as np
      >>> from gbjax import config, train
      >>> x, y = np.zeros((16, 8, 8), np.uint8), np.arange(16) % 2  # (N, H, W): grey
      >>> cfg = config.Config(data={"train": (x, y), "test": (x[:4], y[:4])},
      ...                    num_train=12, batch_size=4)
      >>> xtr, ytr, xte, yte = train.load_datasets(cfg)
      >>> xtr.shape, xtr.dtype, ytr.dtype, xte.shape
      ((12, 8, 8, 1), dtype('uint8'), dtype('int32'), (4, 8, 8, 1))
    """
    if config.data is not None:
        (xtr, ytr), (xte, yte) = config.data["train"], config.data["test"]
    else:
        data_dir = config.data_dir or os.environ.get("GBJAX_DATA_DIR")
        xtr, ytr = data.load(config.dataset, "train", data_dir=data_dir, progress=config.progress)
        xte, yte = data.load(config.dataset, "test", data_dir=data_dir, progress=config.progress)
    xtr, xte = _as_nhwc_uint8(xtr), _as_nhwc_uint8(xte)
    ytr, yte = np.asarray(ytr, np.int32), np.asarray(yte, np.int32)
    for split, x, y in (("train", xtr, ytr), ("test", xte, yte)):
        if y.shape != (len(x),):  # a gather past the labels' end would clamp, not fail
            raise ValueError(
                f"{split} labels have shape {y.shape} for {len(x)} images; "
                f"pass one integer label per image, shape ({len(x)},)"
            )
    # fixed random subsets (seed 0, whatever the run's seed)
    xtr, ytr = data.random_subset(xtr, ytr, config.num_train)
    xte, yte = data.random_subset(xte, yte, config.num_test)
    if len(xtr) < config.batch_size:
        raise ValueError(
            f"invalid config: {len(xtr)} training images < batch_size {config.batch_size}"
        )
    if config.preprocess == "gb":
        params, kw = (config.gb, {}) if isinstance(config.gb, GBParams) else (None, config.gb)
        kw = dict(kw, cache_dir=config.cache_dir, progress=config.progress)
        xtr, xte = data.gb_processed(xtr, params, **kw), data.gb_processed(xte, params, **kw)
    return xtr, ytr, xte, yte


# ----------------------------------------------------------------------------
# model


def _statistics(config: Config, xtr: np.ndarray):
    c = xtr.shape[-1]
    mean = xtr.reshape(-1, c).mean(0, dtype=np.float64)
    std = xtr.reshape(-1, c).std(0, dtype=np.float64)
    if config.model == "paper_convnet":  # the authors' scalar statistics
        mean = np.full_like(mean, xtr.mean(dtype=np.float64))
        std = np.full_like(std, xtr.std(dtype=np.float64))
    return mean, std


def init_model(config: Config, xtr: np.ndarray, num_classes: int) -> nnx.Module:
    """The model of ``config`` initialised for training images ``xtr`` (uint8 NHWC).

    Parameters come from ``fold_in(root_key(seed), 0)``; data statistics (mean,
    std) from ``xtr``. A model with an ``init_from_data(images)`` method (the
    airbench whitening layer) gets it called on ``whiten_num_images`` random
    training images (drawn with ``numpy.random.default_rng(seed)``).

    Example:
      >>> import numpy as np
      >>> from gbjax import config, train
      >>> x = np.zeros((16, 8, 8, 1), np.uint8)
      >>> x[:, :4] = 100  # mean 50, standard deviation 50
      >>> cfg = config.Config(model="paper_convnet", model_kwargs=dict(kind="raw", features=4))
      >>> m = train.init_model(cfg, x, num_classes=10)
      >>> type(m).__name__, float(m.mean[...]), float(m.std[...]), m(x[:2]).shape
      ('PaperConvNet', 50.0, 50.0, (2, 10))
    """
    mean, std = _statistics(config, xtr)

    # Initialise under jit: one compilation instead of one per initialiser op.
    @nnx.jit
    def make(key):
        return build_model(
            config,
            input_shape=xtr.shape[1:],
            num_classes=num_classes,
            mean=mean,
            std=std,
            rngs=nnx.Rngs(params=key),
        )

    model = make(jax.random.fold_in(root_key(config.seed), 0))
    init_from_data = getattr(model, "init_from_data", None)
    if init_from_data is not None:
        rng = np.random.default_rng(config.seed)
        n = min(config.whiten_num_images, len(xtr))
        init_from_data(xtr[np.sort(rng.permutation(len(xtr))[:n])])
    return model


def root_key(seed: int) -> jax.Array:
    """The run's root PRNG key: ``impl="rbg"``.

    With jax 0.10 on CPU, every compiled threefry random op (the default
    implementation) costs ~15 s of XLA compilation here; RngBitGenerator keys
    compile in well under a second.  Streams are derived with ``fold_in``:
    0 -> parameter init, 1 -> epoch permutations (fold_in epoch), 2 ->
    augmentation (fold_in step), 3 -> the alternating-flip draw, 4 ->
    adversarial examples (fold_in step).  Note: "rbg" bits may depend on the
    sharding, so a data-parallel run with augmentation is statistically, not
    bitwise, equivalent to a single-device one.

    Example:
      >>> import jax
      >>> from gbjax import train
      >>> key = train.root_key(0)
      >>> key.dtype
      key<rbg>
      >>> init_key = jax.random.fold_in(key, 0)  # the stream of parameter init
      >>> draw = lambda k: jax.random.uniform(k, (3,)).tolist()
      >>> draw(init_key) == draw(jax.random.fold_in(train.root_key(0), 0))  # deterministic
      True
    """
    return jax.random.key(seed, impl="rbg")


def loss_and_correct(
    logits: jax.Array, labels: ArrayLike, num_classes: int, label_smoothing: float
) -> tuple[jax.Array, jax.Array]:
    """Per-example cross-entropy (with label smoothing) and correctness."""
    onehot = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
    return loss, jnp.argmax(logits, -1) == labels


# ----------------------------------------------------------------------------
# the optimiser of a Config


def make_schedule(config: Config, total_steps: int) -> optax.Schedule:
    """The learning rate at update ``t`` for ``config.schedule``.

    ``"constant"``: ``learning_rate``; ``"cosine"``: linear warm-up from 0 over
    ``warmup_fraction`` of the steps, then cosine decay to 0; ``"onecycle"``:
    ``learning_rate`` times :func:`gbjax.optim.piecewise_linear` (from
    ``schedule_start_factor`` up to 1 over ``warmup_fraction``, then down to
    ``schedule_end_factor``).

    Example:
      >>> from gbjax import config, train
      >>> cfg = config.Config(learning_rate=0.1, schedule="onecycle", warmup_fraction=0.2,
      ...                    schedule_start_factor=0.0, schedule_end_factor=0.0)
      >>> lr = train.make_schedule(cfg, total_steps=10)
      >>> [round(float(lr(t)), 3) for t in (0, 1, 2, 6, 10)]
      [0.0, 0.05, 0.1, 0.05, 0.0]
    """
    lr = config.learning_rate
    if config.schedule == "constant":
        return optax.constant_schedule(lr)
    if config.schedule == "cosine":
        warm = int(round(config.warmup_fraction * total_steps))
        return optax.warmup_cosine_decay_schedule(0.0, lr, max(warm, 0), total_steps, end_value=0.0)
    factor = optim.piecewise_linear(
        total_steps,
        warmup_steps=int(round(config.warmup_fraction * total_steps)),
        start=config.schedule_start_factor,
        end=config.schedule_end_factor,
    )
    return lambda t: lr * factor(t)


def lookahead_decay(config: Config, total_steps: int) -> Callable[[ArrayLike], jax.Array]:
    """Airbench's decay ``d(t) = lookahead_decay * (t / T) ** lookahead_power``.

    Example:
      >>> from gbjax import config, train
      >>> d = train.lookahead_decay(config.Config(lookahead_decay=0.8, lookahead_power=2.0), 10)
      >>> [round(float(d(t)), 3) for t in (0, 5, 10)]
      [0.0, 0.2, 0.8]
    """
    base, power = config.lookahead_decay, config.lookahead_power
    return lambda t: base * (jnp.asarray(t, jnp.float32) / total_steps) ** power


def _group_specs(config: Config, steps_per_epoch: int) -> dict[str, optim.GroupSpec]:
    specs = {}
    for name, g in config.param_groups.items():
        g = dict(g)
        epochs = g.pop("trainable_epochs", None)
        if epochs is not None:
            g["trainable_steps"] = int(round(epochs * steps_per_epoch))
        specs[name] = optim.GroupSpec(**g)
    return specs


def make_optimizer(
    config: Config, total_steps: int, params: Any = None, steps_per_epoch: int = 1
) -> optax.GradientTransformation:
    """The optimiser of ``config``, from the transforms of :mod:`gbjax.optim`.

    ``config.optimizer`` ("sgd" with momentum/Nesterov, "adam", "adamw") with
    ``config.schedule``; coupled weight decay ``config.weight_decay`` on the
    default group's kernels (ndim > 1); ``config.param_groups`` (needs
    ``params`` to label the leaves; ``trainable_epochs`` counts
    ``steps_per_epoch`` updates an epoch) and ``config.lookahead_every``.

    Example:
      Plain SGD with coupled weight decay: with a zero gradient only the
      decay moves the parameters, and only the kernels (ndim > 1).

      >>> import jax, jax.numpy as jnp, optax
      >>> from gbjax import config, train
      >>> cfg = config.Config(optimizer="sgd", learning_rate=0.1, momentum=0.0, weight_decay=0.5)
      >>> tx = train.make_optimizer(cfg, total_steps=10)
      >>> params = {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}
      >>> zero = jax.tree.map(jnp.zeros_like, params)
      >>> updates, _ = tx.update(zero, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)  # kernel: 1 - 0.1 * 0.5 * 1
      >>> round(float(new["kernel"][0, 0]), 4), float(new["bias"][0])
      (0.95, 1.0)
    """
    sched = make_schedule(config, total_steps)

    def make_chain(lr_scale, weight_decay, mask):
        def lr(t):
            return lr_scale * sched(t)

        if config.optimizer == "adamw":
            return optax.adamw(lr, weight_decay=weight_decay, mask=mask)
        if config.optimizer == "adam":
            opt = optax.adam(lr)
        else:
            m = config.momentum or None
            opt = optax.sgd(lr, momentum=m, nesterov=bool(config.nesterov and m))
        if weight_decay:
            opt = optax.chain(optax.add_decayed_weights(weight_decay, mask), opt)
        return opt

    def kernels(p):
        return jax.tree.map(lambda a: a.ndim > 1, p)

    if config.param_groups:
        if params is None:
            raise ValueError("param_groups need the parameters: make_optimizer(..., params=...)")
        tx = optim.grouped(
            make_chain,
            params,
            _group_specs(config, steps_per_epoch),
            weight_decay=config.weight_decay,
            decay_mask=kernels,
        )
    else:
        tx = make_chain(1.0, config.weight_decay, kernels)
    if config.lookahead_every:
        decay = lookahead_decay(config, total_steps)
        tx = optax.chain(tx, optim.lookahead(config.lookahead_every, decay, final_step=total_steps))
    return tx


# ----------------------------------------------------------------------------
# the recipe's hooks, chosen once per configuration


def _flip_translate(key, x_BHWC, flip_B, epoch, pad):
    x_BHWC = augment.alternating_flip(x_BHWC, flip_B, epoch)
    return augment.random_translate(key, x_BHWC, pad, mode="reflect")


#: ``Config.augment`` -> ``fn(key, x_BHWC, flip_B, epoch, pad) -> x_BHWC``, where
#: ``flip_B`` is the batch's share of the fixed alternating-flip draw.
AUGMENTATIONS: dict[str, Callable] = {
    "none": lambda key, x_BHWC, flip_B, epoch, pad: x_BHWC,
    "crop_flip": lambda key, x_BHWC, flip_B, epoch, pad: augment.random_crop_flip(
        key, x_BHWC, pad=pad
    ),
    "flip_translate": _flip_translate,
    "translate": lambda key, x_BHWC, flip_B, epoch, pad: augment.random_translate(
        key, x_BHWC, pad, mode="reflect"
    ),
}


def _objective(config: Config, num_classes: int) -> Callable:
    """``fn(logits, labels, step) -> (loss to differentiate, summed loss, number
    correct)``: cross-entropy with ``label_smoothing``, summed or averaged over
    the batch (``loss_reduction``), and poisoned with NaN at ``debug_nan_step``."""

    def objective(logits, labels_B, step):
        loss_B, correct_B = loss_and_correct(logits, labels_B, num_classes, config.label_smoothing)
        total = jnp.sum(loss_B)
        loss = total if config.loss_reduction == "sum" else total / labels_B.shape[0]
        return loss, total, jnp.sum(correct_B)

    if config.debug_nan_step < 0:
        return objective

    def poisoned(logits, labels_B, step):  # a testing aid for the non-finite guard
        loss, total, correct = objective(logits, labels_B, step)
        loss = loss * jnp.where(step == config.debug_nan_step, jnp.nan, 1.0)
        total = total * jnp.where(step == config.debug_nan_step, jnp.nan, 1.0)
        return loss, total, correct

    return poisoned


def _stats_lookahead(config: Config, total_steps: int) -> Callable | None:
    """With ``lookahead_every``: ``fn(state) -> state`` after an update, moving the
    BatchNorm statistics as :func:`gbjax.optim.lookahead` moves the parameters
    (slow copy in ``state["slow_stats"]``)."""
    if not config.lookahead_every:
        return None
    decay = lookahead_decay(config, total_steps)

    def follow(state):
        sync, d = optim.lookahead_sync(
            state["step"], sync_period=config.lookahead_every, decay=decay, final_step=total_steps
        )
        fast = state["batch_stats"]
        slow = optim.lookahead_mix(state["slow_stats"], fast, sync, d)
        stats = jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, fast)
        return dict(state, slow_stats=slow, batch_stats=stats)

    return follow


def adversarial_images(
    state: dict[str, Any], x_BHWC: ArrayLike, y_B: ArrayLike, key: jax.Array, *,
    graphdef: nnx.GraphDef, num_classes: int, eps: float, method: str = "n-fgsm",
    steps: int = 3, defence: Callable[[jax.Array], jax.Array] | None = None,
) -> jax.Array:  # fmt: skip
    """Adversarial images of the model of ``state`` (train mode), in [0, 1] floats.

    ``n-fgsm`` (de Jorge et al. 2022): start from uniform noise in
    ``[-2 eps, 2 eps]``, one signed-gradient step of size ``eps``, no
    projection back to the eps-ball (only to [0, 1]); it avoids the
    catastrophic overfitting of plain FGSM training without extra cost.
    ``fgsm-rs`` (Wong, Rice & Kolter 2020): start uniform in ``[-eps, eps]``,
    step ``1.25 eps``, projected to the eps-ball. ``pgd`` (Madry et al. 2018):
    start uniform in ``[-eps, eps]``, ``steps`` signed-gradient steps of size
    ``2.5 eps / steps``, each projected to the eps-ball; ``steps`` + 1
    gradient computations per training step. The gradient is taken in
    train mode (batch statistics, as the step itself); the statistics that
    these extra forward passes would update are discarded.

    With a ``defence`` (a preprocessor of [0, 1] images, such as
    :class:`gbjax.defences.GB`) the model is attacked through it by BPDA
    (forward exact, backward the identity) and the images returned are the
    defence's output on the adversarial images: what the defended model sees.
    """
    eps = jnp.float32(eps)
    through = (lambda v: v) if defence is None else attacks.bpda(defence)
    x = models.to_pixels(x_BHWC) / 255.0
    if method == "n-fgsm":
        radius, step_size, n_steps, project = 2.0 * eps, eps, 1, False
    elif method == "fgsm-rs":
        radius, step_size, n_steps, project = eps, 1.25 * eps, 1, True
    else:
        n_steps = int(steps)
        radius, step_size, project = eps, 2.5 * eps / n_steps, True
    delta = _random.uniform(key, x.shape, jnp.float32, -radius, radius)

    def loss(x_in):
        stats = jax.tree.map(lambda a: a, state["batch_stats"])
        model = nnx.merge(graphdef, state["params"], stats, state["consts"])
        logits = model(through(x_in))
        return jnp.sum(loss_and_correct(logits, y_B, num_classes, 0.0)[0])

    # Unrolled (n_steps is static and small): XLA:CPU runs convolutions inside a
    # while loop about 3x slower (docs/methods.md 7.6); as a fori_loop this one
    # step cost 3x its unrolled time and the N-FGSM training step 2.3x a plain one.
    for _ in range(n_steps):
        g = jax.grad(loss)(jnp.clip(x + delta, 0.0, 1.0))
        delta = delta + step_size * jnp.sign(g)
        delta = jnp.clip(delta, -eps, eps) if project else delta
    x_adv = jnp.clip(x + delta, 0.0, 1.0)
    return jax.lax.stop_gradient(x_adv if defence is None else defence(x_adv))


# ----------------------------------------------------------------------------
# state, step, evaluation


def create_train_state(
    model: nnx.Module, tx: optax.GradientTransformation, *, slow_stats: bool = False
) -> dict[str, Any]:
    """The train state of ``model`` under the optimiser ``tx``.

    Args:
      model: the initialised model (its graph definition is not part of the
        state: take it with :func:`gbjax.models.split_state`).
      tx: the optimiser (:func:`make_optimizer`).
      slow_stats: also keep a slow copy of the BatchNorm statistics, for
        lookahead over them.

    Returns:
      A dict of arrays: ``step``, ``params``, ``batch_stats``, ``consts``,
      ``opt_state``, the logging window's sums ``loss_sum``, ``correct_sum``,
      ``count`` (zeroed at each sync point), and ``slow_stats`` if asked for.

    Example:
      >>> from flax import nnx
      >>> from gbjax import config, models, train
      >>> model = models.ResNet(stage_sizes=(1,), widths=(4,), num_classes=10, rngs=nnx.Rngs(0))
      >>> tx = train.make_optimizer(config.Config(optimizer="adam"), total_steps=10)
      >>> state = train.create_train_state(model, tx)
      >>> sorted(state)
      ['batch_stats', 'consts', 'correct_sum', 'count', 'loss_sum', 'opt_state', 'params', 'step']
      >>> int(state["step"]), sorted(state["params"]), sorted(state["consts"])
      (0, ['blocks', 'head', 'stem', 'stem_bn'], ['mean', 'std'])
    """
    _, params, stats, consts = models.split_state(model)
    zero = lambda: jnp.zeros((), jnp.float32)  # noqa: E731 (distinct buffers: donated)
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "batch_stats": stats,
        "consts": consts,
        "opt_state": tx.init(params),
        "loss_sum": zero(),
        "correct_sum": zero(),
        "count": zero(),
    }
    if slow_stats:
        state["slow_stats"] = jax.tree.map(jnp.copy, stats)
    return state


def train_step(
    state: dict[str, Any],
    images_BHWC: ArrayLike,
    labels_B: ArrayLike,
    *,
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    objective: Callable,
) -> dict[str, Any]:
    """One optimiser update of ``state`` on a batch (pure; jit it).

    Args:
      state: a train state (:func:`create_train_state`).
      images_BHWC, labels_B: the batch (uint8 pixels or floats in [0, 1]).
      graphdef: the model's train-mode graph definition
        (:func:`gbjax.models.split_state`).
      tx: the optimiser the state was created with.
      objective: ``fn(logits, labels, step) -> (loss to differentiate, summed
        loss, number correct)``.

    Returns:
      The next state: ``step`` + 1, updated parameters, optimiser state and
      BatchNorm statistics, and the batch added to the logging window's sums.

    Example:
      Two jitted steps of a tiny network on one batch of 8 images:

      >>> import functools, jax, numpy as np, optax
      >>> from flax import nnx
      >>> from gbjax import models, train
      >>> model = models.PaperConvNet("normalized", image_size=8, features=4, rngs=nnx.Rngs(0))
      >>> tx = optax.adam(1e-2)
      >>> def objective(logits, labels, step):
      ...     loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
      ...     return loss.mean(), loss.sum(), (logits.argmax(-1) == labels).sum()
      >>> step = jax.jit(functools.partial(train.train_step, graphdef=models.split_state(model)[0],
      ...                                  tx=tx, objective=objective))
      >>> x = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 1), dtype=np.uint8)
      >>> y = np.arange(8) % 2
      >>> state = step(train.create_train_state(model, tx), x, y)
      >>> first = float(state["loss_sum"])
      >>> state = step(state, x, y)
      >>> int(state["step"]), float(state["count"])
      (2, 16.0)
      >>> float(state["loss_sum"]) - first < first  # the loss fell
      True
    """
    step = state["step"]
    labels_B = jnp.asarray(labels_B)

    def loss_fn(params):
        # fresh Variable objects at this trace level (BatchStat is mutated here)
        stats = jax.tree.map(lambda a: a, state["batch_stats"])
        model = nnx.merge(graphdef, params, stats, state["consts"])
        loss, total, correct = objective(model(images_BHWC), labels_B, step)
        return loss, (total, correct, models.split_state(model)[2])

    (_, (total, correct, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"]
    )
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return dict(
        state,
        step=step + 1,
        params=optax.apply_updates(state["params"], updates),
        opt_state=opt_state,
        loss_sum=state["loss_sum"] + total,
        correct_sum=state["correct_sum"] + correct.astype(jnp.float32),
        count=state["count"] + labels_B.shape[0],
        batch_stats=new_stats,
    )


def state_model(state: dict[str, Any], graphdef: nnx.GraphDef) -> nnx.Module:
    """The model of ``state`` under ``graphdef`` (it shares the state's arrays)."""
    return nnx.merge(graphdef, state["params"], state["batch_stats"], state["consts"])


def eval_step(
    state: dict[str, Any],
    images: ArrayLike,
    labels: ArrayLike,
    *,
    graphdef: nnx.GraphDef,
    batch_size: int = 500,
    tta: str = "none",
) -> dict[str, float]:
    """``{"accuracy", "loss"}`` of the model of ``state`` on ``(images, labels)``.

    Args:
      state: a train state (:func:`create_train_state`).
      images, labels: the test set (uint8 pixels or floats in [0, 1]).
      graphdef: the model's eval-mode graph definition.
      batch_size, tta: as :func:`gbjax.evaluate.evaluate`.

    Returns:
      ``gbjax.evaluate.evaluate`` of the eval-mode model: fraction correct and
      mean cross-entropy (no label smoothing).

    Example:
      A network whose head is zero: every logit is 0, so the loss is
      ``log(10)`` and the prediction is class 0.

      >>> import numpy as np
      >>> from flax import nnx
      >>> from gbjax import config, models, train
      >>> model = models.ResNet(stage_sizes=(1,), widths=(4,), num_classes=10, rngs=nnx.Rngs(0))
      >>> model.head.kernel[...] = np.zeros((4, 10), np.float32)
      >>> model.eval()
      >>> state = train.create_train_state(model, train.make_optimizer(config.Config(), 10))
      >>> x, y = np.zeros((4, 8, 8, 3), np.uint8), np.array([0, 0, 1, 2])
      >>> ev = train.eval_step(state, x, y, graphdef=models.split_state(model)[0])
      >>> ev["accuracy"], round(ev["loss"], 4)
      (0.5, 2.3026)
    """
    model = state_model(state, graphdef)
    return evaluate.evaluate(model, images, labels, batch_size=batch_size, tta=tta)


class Trainer:
    """The pieces above, bound for one configuration: its optimiser, hooks,
    PRNG streams, shardings and one jitted training step.

    Public pieces, all usable from a benchmark:

    * ``init_state``: the train state (:func:`create_train_state`, replicated);
    * ``put_data(x, y)``: the training set on device (``{"images", "labels",
      "flip"}``, replicated);
    * ``epoch_permutation(epoch)``: the order of one epoch;
    * ``train_step(state, data, perm) -> state``: one jitted step (gather the
      batch, augment, attack, :func:`train_step`, lookahead of the statistics);
      it donates ``state``, so keep only the returned one;
    * ``model(state)``: the eval-mode model of a state (shares its arrays);
    * ``evaluate(state, x, y, tta=...)``: ``{"accuracy", "loss"}`` through
      :func:`eval_step`.

    Example:
      >>> import numpy as np
      >>> from gbjax import config, train
      >>> x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
      >>> y = np.arange(16) % 2
      >>> cfg = config.Config(data={"train": (x, y), "test": (x, y)}, model="paper_convnet",
      ...                    model_kwargs=dict(kind="raw", features=4), batch_size=8,
      ...                    eval_batch_size=16, num_steps=2)
      >>> trainer = train.Trainer(cfg, train.init_model(cfg, x, 2), num_classes=2,
      ...                         num_train=16, total_steps=2)
      >>> data, state = trainer.put_data(x, y), trainer.init_state
      >>> for step in range(2):
      ...     state = trainer.train_step(state, data, trainer.epoch_permutation(0))
      >>> int(state["step"]), sorted(trainer.evaluate(state, x, y))
      (2, ['accuracy', 'loss'])
    """

    def __init__(
        self, config: Config, model: nnx.Module, *, num_classes: int, num_train: int,
        total_steps: int,
    ):  # fmt: skip
        self.config = config
        ndev = config.num_devices or jax.local_device_count()
        self.mesh = Mesh(np.asarray(jax.local_devices()[:ndev]), ("data",))
        self.repl = NamedSharding(self.mesh, P())
        self.batch_sharding = NamedSharding(self.mesh, P("data"))
        self.num_classes = num_classes
        self.num_train = num_train
        self.total_steps = total_steps
        self.steps_per_epoch = num_train // config.batch_size
        model.train()
        self.train_graphdef, params = models.split_state(model)[:2]
        model.eval()
        self.eval_graphdef = models.split_state(model)[0]
        self.tx = make_optimizer(
            config, total_steps, params=params, steps_per_epoch=self.steps_per_epoch
        )
        key = root_key(config.seed)
        self.data_key = jax.random.fold_in(key, 1)
        self.aug_key = jax.random.fold_in(key, 2)
        self.flip_key = jax.random.fold_in(key, 3)
        self.adv_key = jax.random.fold_in(key, 4)
        # the recipe's hooks
        self.augment = AUGMENTATIONS[config.augment]
        self.objective = _objective(config, num_classes)
        self.after_update = _stats_lookahead(config, total_steps)
        self.attack, self.defence = None, None
        if config.adversarial:
            adv = config.adversarial
            if "gb" in adv:  # GB in the loop ({} = GBParams defaults): attacked through, behind it
                self.defence = defences.GB(GBParams(**adv["gb"]))
            self.attack = functools.partial(
                adversarial_images, graphdef=self.train_graphdef, num_classes=num_classes,
                eps=adv["eps"], method=adv.get("method", "n-fgsm"), steps=adv.get("steps", 3),
                defence=self.defence,
            )  # fmt: skip
        state = create_train_state(model, self.tx, slow_stats=bool(config.lookahead_every))
        self.init_state = jax.device_put(state, self.repl)
        self.train_step = jax.jit(
            self.step,
            donate_argnums=(0,),
            out_shardings=self.repl,
            compiler_options=_xla.conv_options(),
        )

        def perm(epoch):
            return jax.random.permutation(jax.random.fold_in(self.data_key, epoch), num_train)

        self._perm = jax.jit(perm, out_shardings=self.repl)
        self.all_finite = jax.jit(
            lambda t: jnp.all(jnp.asarray([jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(t)]))
        )

    def put_data(self, images_NHWC: np.ndarray, labels_N: np.ndarray) -> dict[str, jax.Array]:
        flip = jax.random.bernoulli(self.flip_key, 0.5, (len(images_NHWC),))
        return jax.device_put({"images": images_NHWC, "labels": labels_N, "flip": flip}, self.repl)

    def epoch_permutation(self, epoch: int) -> jax.Array:
        return self._perm(epoch)

    def _batch(self, state, data, perm_N):
        """The step's batch, sharded over ``"data"``: its rows of the epoch
        permutation, augmented, and attacked when training adversarially."""
        step, B = state["step"], self.config.batch_size
        start = (step % self.steps_per_epoch) * B
        idx_B = jax.lax.dynamic_slice(perm_N, (start,), (B,))
        shard = lambda a: jax.lax.with_sharding_constraint(a, self.batch_sharding)  # noqa: E731
        x_BHWC = shard(data["images"][idx_B])
        y_B = shard(data["labels"][idx_B])
        flip_B = data["flip"][idx_B]
        key = jax.random.fold_in(self.aug_key, step)
        epoch = step // self.steps_per_epoch
        x_BHWC = shard(self.augment(key, x_BHWC, flip_B, epoch, self.config.crop_pad))
        if self.attack is not None:
            x_BHWC = shard(self.attack(state, x_BHWC, y_B, jax.random.fold_in(self.adv_key, step)))
        return x_BHWC, y_B

    def step(self, state: dict[str, Any], data: dict[str, jax.Array], perm_N: jax.Array):
        """One training step as a plain traceable function of the state, the
        resident data set and the epoch's permutation; ``train_step`` is it
        compiled with this trainer's shardings (gbjax.distributed compiles it
        with its own)."""
        x_BHWC, y_B = self._batch(state, data, perm_N)
        state = train_step(
            state, x_BHWC, y_B, graphdef=self.train_graphdef, tx=self.tx, objective=self.objective
        )
        return state if self.after_update is None else self.after_update(state)

    def robust_accuracy(self, state: dict[str, Any], x: ArrayLike, y: ArrayLike) -> float:
        """PGD accuracy at ``adversarial['eps']`` (``eval_steps`` steps, one random
        start) of the eval-mode model on ``x`` (uint8): catastrophic overfitting
        shows as this falling to about 0 while clean accuracy holds."""
        adv, model = self.config.adversarial, self.model(state)
        attacked, scored = model, None
        if self.defence is not None:  # through GB by BPDA, scored behind GB
            attacked, scored = attacks.make_attack_logits(model, self.defence, "bpda")
        return float(
            attacks.accuracy_under_attack(
                attacked,
                x,
                y,
                eps_list=[adv["eps"]],
                attack="pgd",
                steps=adv.get("eval_steps", 10),
                key=jax.random.fold_in(self.adv_key, 0x7FFFFFFF),
                eval_logits_fn=scored,
                batch_size=self.config.eval_batch_size,
                progress=False,
            )[0]
        )

    def model(self, state: dict[str, Any]) -> nnx.Module:
        """The eval-mode model of ``state``."""
        return state_model(state, self.eval_graphdef)

    def evaluate(
        self, state: dict[str, Any], x: ArrayLike, y: ArrayLike, *, tta: str = "none"
    ) -> dict[str, float]:
        """Test loss and accuracy of ``state`` on ``x`` (behind GB when it is in the loop:
        the images are painted first)."""
        if self.defence is not None:
            x = np.asarray(gb_denoise(np.asarray(x), self.defence.params))
        return eval_step(
            state, x, y, graphdef=self.eval_graphdef, batch_size=self.config.eval_batch_size,
            tta=tta,
        )  # fmt: skip


# ----------------------------------------------------------------------------
# the loop


def total_steps_of(config: Config, num_train: int) -> int:
    steps_per_epoch = num_train // config.batch_size
    return config.num_steps or int(math.ceil(config.num_epochs * steps_per_epoch))


def train_and_evaluate(
    config: Config, workdir: str | os.PathLike, *, stop_after_step: int | None = None,
    overwrite: bool = False,
) -> TrainResult:  # fmt: skip
    """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint).

    Returns ``(model, metrics)``: the trained model in eval mode, and the final
    metrics: ``test_accuracy`` and ``test_loss`` (with ``config.eval_tta``;
    ``test_accuracy_plain`` without it when TTA is on), ``train_loss`` and
    ``train_accuracy`` (last logging window), ``step``, ``images_per_sec`` and
    ``step_time_ms`` (training only, compilation excluded), ``compile_time_s``,
    ``wall_time_s``. ``stop_after_step`` (testing aid) returns right after that
    step, as if the process were killed there.

    The workdir remembers the configuration that made it (``config.json``, with a
    fingerprint of the data): resuming with another one raises
    :class:`WorkdirMismatchError` naming the fields that differ, and changes
    nothing; ``overwrite=True`` starts over, deleting only the trainer's files. A
    workdir at or beyond the steps asked for trains nothing, says so and returns
    its model and final metrics. Checkpoints carry a sha256; a corrupt one is
    reported and the latest one that verifies is used. A second run in a workdir
    in use raises :class:`WorkdirBusyError`. Details: :mod:`gbjax._workdir`.

    Example:
      Two steps of a tiny network on 16 synthetic images, in a temporary workdir:

      >>> import pathlib, tempfile
      >>> import numpy as np
      >>> from gbjax import config, train
      >>> x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
      >>> y = np.arange(16) % 2
      >>> cfg = config.Config(data={"train": (x, y), "test": (x, y)}, model="paper_convnet",
      ...                    model_kwargs=dict(kind="raw", features=4), batch_size=8,
      ...                    eval_batch_size=16, num_steps=2, progress=False)
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     model, metrics = train.train_and_evaluate(cfg, workdir)
      ...     files = sorted(p.name for p in pathlib.Path(workdir).iterdir())
      >>> metrics["step"], 0.0 <= metrics["test_accuracy"] <= 1.0, model(x).shape
      (2, True, (16, 2))
      >>> files  # and the lock that keeps a second run out while this one runs
      ['.gbjax.lock', 'checkpoints', 'config.json', 'metrics.jsonl']
    """
    t_start = time.perf_counter()
    validate_config(config)
    data = load_datasets(config)
    num_classes = int(max(data[1].max(), data[3].max())) + 1
    if config.data is None:
        num_classes = max(num_classes, 10)
    total_steps = total_steps_of(config, len(data[0]))
    record = _workdir.make_record(config, data, num_classes=num_classes, total_steps=total_steps)
    with _workdir.open_workdir(workdir, record, overwrite=overwrite) as wd:
        return _train(config, wd, data, num_classes, total_steps, t_start, stop_after_step)


def _train(config, wd, data, num_classes, total_steps, t_start, stop_after_step) -> TrainResult:
    """The loop of :func:`train_and_evaluate`, in the open, locked workdir ``wd``."""
    from tqdm.auto import tqdm

    xtr, ytr, xte, yte = data
    trainer = Trainer(
        config, init_model(config, xtr, num_classes), num_classes=num_classes,
        num_train=len(xtr), total_steps=total_steps,
    )  # fmt: skip
    spe = trainer.steps_per_epoch
    metrics_path = wd.path / "metrics.jsonl"
    train_data = trainer.put_data(xtr, ytr)
    mngr = _workdir.checkpoint_manager(wd.path, max_to_keep=config.max_checkpoints_to_keep)
    state = _train_loop.restore_state(mngr, wd.resume_step, trainer.init_state)
    start_step = int(state["step"])
    if start_step >= total_steps:  # nothing to train: the run's own final metrics
        mngr.close()
        ev = lambda: trainer.evaluate(state, xte, yte, tta=config.eval_tta)  # noqa: E731
        return TrainResult(_returned_model(trainer, state), wd.finished_metrics(start_step, ev))
    if start_step or metrics_path.exists():  # resumed (or killed before a checkpoint)
        _train_loop.append_jsonl(metrics_path, {"event": "resumed", "step": start_step})
    cadence = _train_loop.Cadence(
        spe, total_steps, config.log_every_steps, config.eval_every_epochs,
        config.checkpoint_every_steps, stop_after_step,
    )  # fmt: skip
    timer, schedule = _train_loop.StepTimer(), make_schedule(config, total_steps)
    bar = tqdm(
        total=total_steps, initial=start_step, disable=not config.progress,
        desc=f"{config.model}", unit="step", dynamic_ncols=True,
    )  # fmt: skip
    summary: dict = {}
    last_good, last_sync_step = wd.resume_step, start_step
    epoch, perm = -1, None
    try:
        for step in range(start_step, total_steps):
            if step // spe != epoch:
                epoch = step // spe
                perm = trainer.epoch_permutation(epoch)
            state = timer.run(trainer.train_step, state, train_data, perm)
            bar.update(1)
            done = step + 1
            if not cadence.sync(done):
                continue
            # ---- sync point: check, log, evaluate, checkpoint
            rec = _train_loop.window_record(state, done, spe, schedule, timer, config.batch_size)
            if not (math.isfinite(rec["train_loss"]) and trainer.all_finite(state["params"])):
                _non_finite(metrics_path, rec["train_loss"], last_sync_step, done, last_good, wd)
            state = _train_loop.zero_window(state, trainer.repl)
            if cadence.evaluate(done):
                rec.update(_evaluate(trainer, state, xte, yte, final=done == total_steps))
            rec.update(train_time_s=timer.train_time, elapsed_s=time.perf_counter() - t_start)
            _train_loop.append_jsonl(metrics_path, rec)
            summary.update(rec)
            bar.set_postfix(_train_loop.bar_postfix(rec))
            if cadence.checkpoint(done):
                _train_loop.save_checkpoint(mngr, wd, done, state)
                last_good = done
            last_sync_step = done
            timer.restart()
            if cadence.stop(done):
                break
    finally:
        bar.close()
        mngr.wait_until_finished()
        mngr.close()
    summary = _train_loop.run_summary(summary, state, timer, config.batch_size, t_start)
    _train_loop.append_jsonl(metrics_path, {"event": "summary", **summary})
    return TrainResult(_returned_model(trainer, state), summary)


# ---- the loop's helpers


def _non_finite(metrics_path, loss, last_sync_step, done, last_good, wd):
    """Logs the non-finite loss and raises :class:`NonFiniteLossError`."""
    where = (
        f"checkpoint at step {last_good} in {wd.path / 'checkpoints'}"
        if last_good is not None
        else "no checkpoint was written"
    )
    _train_loop.append_jsonl(
        metrics_path, {"event": "non_finite_loss", "step": done, "last_good_checkpoint": last_good}
    )
    raise NonFiniteLossError(
        f"non-finite training loss ({loss}) between steps "
        f"{last_sync_step + 1} and {done}; stopping. Last good {where}."
    )


def _evaluate(trainer: Trainer, state, xte, yte, *, final: bool) -> dict:
    """The test metrics of ``state`` (with ``eval_tta`` at the end, or every epoch
    when ``eval_tta_every_epoch``), and its PGD accuracy when training adversarially."""
    config = trainer.config
    tta = config.eval_tta if (final or config.eval_tta_every_epoch) else "none"
    ev = trainer.evaluate(state, xte, yte, tta=tta)
    out = dict(test_accuracy=ev["accuracy"], test_loss=ev["loss"], tta=tta)
    if tta != "none":
        out["test_accuracy_plain"] = trainer.evaluate(state, xte, yte)["accuracy"]
    n_adv = config.adversarial.get("eval_n", 0) if config.adversarial else 0
    if n_adv:  # held out: the last n_adv test images
        out["pgd_accuracy"] = trainer.robust_accuracy(state, xte[-n_adv:], yte[-n_adv:])
    return out


def _returned_model(trainer: Trainer, state) -> nnx.Module:
    """The eval-mode model of ``state``, as :func:`train_and_evaluate` returns it."""
    model = trainer.model(state)
    if trainer.mesh.size == 1:
        # on one device, plain uncommitted arrays: arrays carrying the trainer's mesh
        # sharding (or committed to a device) would make later jits compile twice,
        # since their outputs inherit it and first and later calls then differ
        graphdef, arrays = nnx.split(model)
        model = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), arrays))
    return model


# ----------------------------------------------------------------------------
# command line (python -m gbjax train; python -m gbjax.train is the same)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The training command's arguments (``--config``, ``--workdir``, ``--set``,
    ``--overwrite``), added to ``parser``."""
    parser.add_argument("--config", required=True, help="path/to/config.py[:arg] or module[:arg]")
    parser.add_argument("--workdir", required=True, help="checkpoints, metrics.jsonl, config.json")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field (a Python literal); repeatable",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in a workdir made with another configuration (deletes only the "
        "trainer's files there: config.json, metrics.jsonl, checkpoints)",
    )


def main(argv=None):
    """The ``python -m gbjax train`` / ``python -m gbjax.train`` command line: trains a
    config in a workdir (see the module docstring); exit 2 on bad arguments or a
    refused workdir, 1 on a non-finite loss."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        config = apply_overrides(load_config(args.config), args.set)
    except ValueError as e:
        p.error(str(e))
    try:
        _, metrics = train_and_evaluate(config, args.workdir, overwrite=args.overwrite)
    except WorkdirError as e:
        p.error(str(e))
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    # Re-import so that config files' `from gbjax.config import Config` and this
    # module's Config are the same class under `python -m gbjax.train`.
    from gbjax.train import main as _main

    sys.exit(_main())

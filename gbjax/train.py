"""Training: a thin CLI over :func:`train_and_evaluate`, which returns the model.

    python -m gbjax.train --config gbjax/configs/airbench_cifar10.py --workdir /tmp/ab
    python -m gbjax.train --config gbjax/configs/pe_mnist.py:smoke --workdir /tmp/s \\
        --set num_epochs=1 --set seed=3

From Python::

    model, metrics = gbjax.train_and_evaluate(config, workdir)
    gbjax.evaluate.accuracy(model, x_test, y_test)

Design
------
* The whole (preprocessed) data set lives on the device as uint8. Each step
  gathers its batch on device from the epoch permutation, a pure function of
  ``(seed, epoch)``; augmentation keys are a pure function of ``(seed, step)``.
  So a run killed and restarted with the same command resumes from its latest
  checkpoint and ends bit-for-bit where an uninterrupted run ends (same machine).
* :class:`Trainer` holds one jitted training step (functional NNX: ``nnx.split``
  once, ``nnx.merge`` inside ``jax.jit``) that donates the train state. The
  BatchNorm train and eval modes are two graph definitions over the same state;
  :meth:`Trainer.model` gives the eval-mode model of a state, and evaluation is
  :func:`gbjax.evaluate.evaluate`, as everywhere else.
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
import json
import math
import os
import pathlib
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gbjax import _workdir, _xla, attacks, augment, data, evaluate, models, optim
from gbjax._runs import build_model, restore_model, time_to_target
from gbjax._workdir import WorkdirBusyError, WorkdirError, WorkdirMismatchError
from gbjax.config import Config, apply_overrides, load_config, validate_config

__all__ = [
    "Config",
    "TrainResult",
    "Trainer",
    "NonFiniteLossError",
    "WorkdirError",
    "WorkdirMismatchError",
    "WorkdirBusyError",
    "build_model",
    "init_model",
    "load_datasets",
    "train_and_evaluate",
    "restore_model",
    "time_to_target",
    "root_key",
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


def load_datasets(config: Config):
    """-> (train_x uint8 NHWC, train_y int32, test_x, test_y), preprocessed."""
    if config.data is not None:
        (xtr, ytr), (xte, yte) = config.data["train"], config.data["test"]
    else:
        data_dir = config.data_dir or os.environ.get("GBJAX_DATA_DIR")
        xtr, ytr = data.load(config.dataset, "train", data_dir=data_dir, progress=config.progress)
        xte, yte = data.load(config.dataset, "test", data_dir=data_dir, progress=config.progress)
    xtr, xte = _as_nhwc_uint8(xtr), _as_nhwc_uint8(xte)
    ytr, yte = np.asarray(ytr, np.int32), np.asarray(yte, np.int32)
    # fixed random subsets (seed 0, whatever the run's seed)
    xtr, ytr = data.random_subset(xtr, ytr, config.num_train)
    xte, yte = data.random_subset(xte, yte, config.num_test)
    if len(xtr) < config.batch_size:
        raise ValueError(
            f"invalid config: {len(xtr)} training images < batch_size {config.batch_size}"
        )
    if config.preprocess == "gb":
        kw = dict(cache_dir=config.cache_dir, progress=config.progress, **config.gb)
        xtr, xte = data.gb_processed(xtr, **kw), data.gb_processed(xte, **kw)
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
    std, and the airbench whitening layer from ``whiten_num_images`` random
    training images) from ``xtr``.
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
    if isinstance(model, models.Airbench):
        rng = np.random.default_rng(config.seed)
        n = min(config.whiten_num_images, len(xtr))
        model.init_whitening(xtr[np.sort(rng.permutation(len(xtr))[:n])])
    return model


def root_key(seed: int) -> jax.Array:
    """The run's root PRNG key: ``impl="rbg"``.

    With jax 0.10 on CPU, every compiled threefry random op (the default
    implementation) costs ~15 s of XLA compilation here; RngBitGenerator keys
    compile in well under a second.  Streams are derived with ``fold_in``:
    0 -> parameter init, 1 -> epoch permutations (fold_in epoch), 2 ->
    augmentation (fold_in step), 3 -> the alternating-flip draw.  Note: "rbg"
    bits may depend on the sharding, so a data-parallel run with augmentation is
    statistically, not bitwise, equivalent to a single-device one.
    """
    return jax.random.key(seed, impl="rbg")


def loss_and_correct(logits, labels, num_classes: int, label_smoothing: float):
    """Per-example cross-entropy (with label smoothing) and correctness."""
    onehot = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        onehot = optax.smooth_labels(onehot, label_smoothing)
    loss = optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot)
    return loss, jnp.argmax(logits, -1) == labels


# ----------------------------------------------------------------------------
# the step


class Trainer:
    """The compiled training step and shardings of one configuration.

    Public pieces, all usable from a benchmark:

    * ``init_state``: the train state (a dict pytree of arrays);
    * ``put_data(x, y)``: the training set on device (``{"images", "labels",
      "flip"}``, replicated);
    * ``epoch_permutation(epoch)``: the order of one epoch;
    * ``train_step(state, data, perm) -> state``: one jitted step; it donates
      ``state``, so keep only the returned one;
    * ``model(state)``: the eval-mode model of a state (shares its arrays);
    * ``evaluate(state, x, y, tta=...)``: ``{"accuracy", "loss"}`` through
      :func:`gbjax.evaluate.evaluate`.
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
        self.train_graphdef, params, stats, consts = models.split_state(model)
        model.eval()
        self.eval_graphdef = models.split_state(model)[0]
        self.tx = optim.make_optimizer(
            config, total_steps, params=params, steps_per_epoch=self.steps_per_epoch
        )
        key = root_key(config.seed)
        self.data_key = jax.random.fold_in(key, 1)
        self.aug_key = jax.random.fold_in(key, 2)
        self.flip_key = jax.random.fold_in(key, 3)
        self.adv_key = jax.random.fold_in(key, 4)
        zero = lambda: jnp.zeros((), jnp.float32)  # distinct buffers: donated
        state = {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "batch_stats": stats,
            "consts": consts,
            "opt_state": self.tx.init(params),
            "loss_sum": zero(),
            "correct_sum": zero(),
            "count": zero(),
        }
        if config.lookahead_every:
            state["slow_stats"] = jax.tree.map(jnp.copy, stats)
        self.init_state = jax.device_put(state, self.repl)
        self.train_step = jax.jit(
            self._train_step,
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

    def put_data(self, images_NHWC: np.ndarray, labels_N: np.ndarray) -> dict:
        flip = jax.random.bernoulli(self.flip_key, 0.5, (len(images_NHWC),))
        return jax.device_put({"images": images_NHWC, "labels": labels_N, "flip": flip}, self.repl)

    def epoch_permutation(self, epoch: int) -> jax.Array:
        return self._perm(epoch)

    def _augment(self, step, x_BHWC, flip_B):
        cfg = self.config
        key = jax.random.fold_in(self.aug_key, step)
        if cfg.augment == "crop_flip":
            return augment.random_crop_flip(key, x_BHWC, pad=cfg.crop_pad)
        if cfg.augment == "flip_translate":
            x_BHWC = augment.alternating_flip(x_BHWC, flip_B, step // self.steps_per_epoch)
            return augment.random_translate(key, x_BHWC, cfg.crop_pad, mode="reflect")
        if cfg.augment == "translate":
            return augment.random_translate(key, x_BHWC, cfg.crop_pad, mode="reflect")
        return x_BHWC

    def _train_step(self, state, data, perm_N):
        cfg, B = self.config, self.config.batch_size
        step = state["step"]
        start = (step % self.steps_per_epoch) * B
        idx_B = jax.lax.dynamic_slice(perm_N, (start,), (B,))
        shard = lambda a: jax.lax.with_sharding_constraint(a, self.batch_sharding)
        x_BHWC = shard(data["images"][idx_B])
        y_B = shard(data["labels"][idx_B])
        x_BHWC = shard(self._augment(step, x_BHWC, data["flip"][idx_B]))
        if cfg.adversarial:
            x_BHWC = shard(self._adversarial(state, step, x_BHWC, y_B))

        def loss_fn(params):
            # fresh Variable objects at this trace level (BatchStat is mutated here)
            stats = jax.tree.map(lambda a: a, state["batch_stats"])
            model = nnx.merge(self.train_graphdef, params, stats, state["consts"])
            logits = model(x_BHWC)
            loss_B, correct_B = loss_and_correct(logits, y_B, self.num_classes, cfg.label_smoothing)
            total = jnp.sum(loss_B)
            loss = total if cfg.loss_reduction == "sum" else total / B
            if cfg.debug_nan_step >= 0:
                loss = loss * jnp.where(step == cfg.debug_nan_step, jnp.nan, 1.0)
                total = total * jnp.where(step == cfg.debug_nan_step, jnp.nan, 1.0)
            new_stats = models.split_state(model)[2]
            return loss, (total, jnp.sum(correct_B), new_stats)

        (_, (total, correct, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state["params"]
        )
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        out = dict(
            state,
            step=step + 1,
            params=optax.apply_updates(state["params"], updates),
            opt_state=opt_state,
            loss_sum=state["loss_sum"] + total,
            correct_sum=state["correct_sum"] + correct.astype(jnp.float32),
            count=state["count"] + B,
        )
        if cfg.lookahead_every:
            # BatchNorm statistics follow the parameters' lookahead (gbjax.optim.lookahead)
            sync, d = optim.lookahead_sync(
                step + 1,
                sync_period=cfg.lookahead_every,
                decay=optim.lookahead_decay(cfg, self.total_steps),
                final_step=self.total_steps,
            )
            slow = optim.lookahead_mix(state["slow_stats"], new_stats, sync, d)
            new_stats = jax.tree.map(lambda s, f: jnp.where(sync, s, f), slow, new_stats)
            out["slow_stats"] = slow
        out["batch_stats"] = new_stats
        return out

    def _adversarial(self, state, step, x_BHWC, y_B):
        """Adversarial images of the current model, in [0, 1] floats.

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
        """
        adv = self.config.adversarial
        eps = jnp.float32(adv["eps"])
        method = adv.get("method", "n-fgsm")
        x = models.to_pixels(x_BHWC) / 255.0
        key = jax.random.fold_in(self.adv_key, step)
        if method == "n-fgsm":
            radius, step_size, n_steps, project = 2.0 * eps, eps, 1, False
        elif method == "fgsm-rs":
            radius, step_size, n_steps, project = eps, 1.25 * eps, 1, True
        else:
            n_steps = int(adv.get("steps", 3))
            radius, step_size, project = eps, 2.5 * eps / n_steps, True
        delta = jax.random.uniform(key, x.shape, jnp.float32, -radius, radius)

        def loss(x_in):
            stats = jax.tree.map(lambda a: a, state["batch_stats"])
            model = nnx.merge(self.train_graphdef, state["params"], stats, state["consts"])
            logits = model(x_in)
            return jnp.sum(loss_and_correct(logits, y_B, self.num_classes, 0.0)[0])

        def one_step(_, delta):
            g = jax.grad(loss)(jnp.clip(x + delta, 0.0, 1.0))
            delta = delta + step_size * jnp.sign(g)
            return jnp.clip(delta, -eps, eps) if project else delta

        delta = jax.lax.fori_loop(0, n_steps, one_step, delta)
        return jax.lax.stop_gradient(jnp.clip(x + delta, 0.0, 1.0))

    def robust_accuracy(self, state, x, y) -> float:
        """PGD accuracy at ``adversarial['eps']`` (``eval_steps`` steps, one random
        start) of the eval-mode model on ``x`` (uint8): catastrophic overfitting
        shows as this falling to about 0 while clean accuracy holds."""
        adv = self.config.adversarial
        return float(
            attacks.accuracy_under_attack(
                self.model(state),
                x,
                y,
                eps_list=[adv["eps"]],
                attack="pgd",
                steps=adv.get("eval_steps", 10),
                key=jax.random.fold_in(self.adv_key, 0x7FFFFFFF),
                batch_size=self.config.eval_batch_size,
                progress=False,
            )[0]
        )

    def model(self, state) -> nnx.Module:
        """The eval-mode model of ``state``."""
        return nnx.merge(self.eval_graphdef, state["params"], state["batch_stats"], state["consts"])

    def evaluate(self, state, x, y, *, tta: str = "none") -> dict:
        return evaluate.evaluate(
            self.model(state), x, y, batch_size=self.config.eval_batch_size, tta=tta
        )


# ----------------------------------------------------------------------------
# the loop


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
    """The run of :func:`train_and_evaluate` in the open, locked workdir ``wd``."""
    import orbax.checkpoint as ocp

    workdir = wd.path
    xtr, ytr, xte, yte = data
    model = init_model(config, xtr, num_classes)
    trainer = Trainer(
        config, model, num_classes=num_classes, num_train=len(xtr), total_steps=total_steps
    )
    steps_per_epoch = trainer.steps_per_epoch

    metrics_path = workdir / "metrics.jsonl"
    train_data = trainer.put_data(xtr, ytr)

    mngr = _checkpoint_manager(workdir, config)
    state = trainer.init_state
    start_step = 0
    latest = wd.resume_step  # the latest checkpoint that verified
    if latest is not None:
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
        )
        state = mngr.restore(latest, args=ocp.args.StandardRestore(abstract))
        start_step = int(state["step"])
        if start_step >= total_steps:  # nothing to train: the run's own final metrics
            mngr.close()
            ev = lambda: trainer.evaluate(state, xte, yte, tta=config.eval_tta)  # noqa: E731
            return TrainResult(_returned_model(trainer, state), wd.finished_metrics(start_step, ev))
        _write_jsonl(metrics_path, {"event": "resumed", "step": start_step})
    elif metrics_path.exists():  # killed before its first checkpoint: starts over
        _write_jsonl(metrics_path, {"event": "resumed", "step": 0})
    last_good = latest

    from tqdm.auto import tqdm

    bar = tqdm(
        total=total_steps, initial=start_step, disable=not config.progress,
        desc=f"{config.model}", unit="step", dynamic_ncols=True,
    )  # fmt: skip
    B = config.batch_size
    summary: dict = {}
    compile_time = None
    train_time, train_steps = 0.0, 0  # compile-free timing of the train steps
    epoch, perm = -1, None
    t_mark, steps_since_mark = None, 0
    last_sync_step = start_step
    schedule = optim.make_schedule(config, total_steps)
    try:
        for step in range(start_step, total_steps):
            if step // steps_per_epoch != epoch:
                epoch = step // steps_per_epoch
                perm = trainer.epoch_permutation(epoch)
            if t_mark is None:  # first step of this process: measure compile + run
                t0 = time.perf_counter()
                state = trainer.train_step(state, train_data, perm)
                jax.block_until_ready(state["loss_sum"])
                compile_time = time.perf_counter() - t0
                t_mark, steps_since_mark = time.perf_counter(), 0
            else:
                state = trainer.train_step(state, train_data, perm)
                steps_since_mark += 1
            bar.update(1)
            done = step + 1
            last = done == total_steps
            end_of_epoch = done % steps_per_epoch == 0
            do_eval = last or (
                end_of_epoch
                and config.eval_every_epochs
                and (done // steps_per_epoch) % config.eval_every_epochs == 0
            )
            do_ckpt = done % config.checkpoint_every_steps == 0 or last
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
                _write_jsonl(
                    metrics_path,
                    {"event": "non_finite_loss", "step": done, "last_good_checkpoint": last_good},
                )
                raise NonFiniteLossError(
                    f"non-finite training loss ({loss_sum}) between steps "
                    f"{last_sync_step + 1} and {done}; stopping. Last good {where}."
                )
            count = float(state["count"])
            rec = {
                "step": done,
                "epoch": done / steps_per_epoch,
                "train_loss": loss_sum / max(count, 1.0),
                "train_accuracy": float(state["correct_sum"]) / max(count, 1.0),
                "learning_rate": float(schedule(done - 1)),
            }
            if steps_since_mark:
                dt = (now - t_mark) / steps_since_mark
                rec.update(images_per_sec=B / dt, step_time_ms=1e3 * dt)
            state = dict(
                state,
                **{
                    k: jax.device_put(jnp.zeros((), jnp.float32), trainer.repl)
                    for k in ("loss_sum", "correct_sum", "count")
                },
            )
            if do_eval:
                tta = config.eval_tta if (last or config.eval_tta_every_epoch) else "none"
                ev = trainer.evaluate(state, xte, yte, tta=tta)
                rec.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"], tta=tta)
                if tta != "none":
                    rec["test_accuracy_plain"] = trainer.evaluate(state, xte, yte)["accuracy"]
                n_adv = config.adversarial.get("eval_n", 0) if config.adversarial else 0
                if n_adv:  # held out: the last n_adv test images
                    rec["pgd_accuracy"] = trainer.robust_accuracy(state, xte[-n_adv:], yte[-n_adv:])
            # Time to a target: the summed time of this process's train steps (the
            # first, compiling step and all evaluations excluded), and all wall time.
            rec.update(train_time_s=train_time, elapsed_s=time.perf_counter() - t_start)
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
                wd.seal(done)  # its checksum, verified on resume
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
    return TrainResult(_returned_model(trainer, state), summary)


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


def main(argv=None):
    """The ``python -m gbjax.train`` / ``gbjax train`` command line: trains a config in
    a workdir (see the module docstring); exit 2 on bad arguments or a refused workdir."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--config", required=True, help="path/to/config.py[:arg] or module[:arg]")
    p.add_argument("--workdir", required=True)
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override a config field (Python literal)",
    )  # fmt: skip
    p.add_argument(
        "--overwrite", action="store_true",
        help="start over in a workdir made with another configuration (deletes only the "
        "trainer's files there: config.json, metrics.jsonl, checkpoints)",
    )  # fmt: skip
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

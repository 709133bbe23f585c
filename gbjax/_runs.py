"""A training run's model and workdir: the configured model, the time to a target
accuracy, and the model of a checkpoint (re-exported by :mod:`gbjax.train`)."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gbjax import models
from gbjax._workdir import checkpoint_manager, verified_step
from gbjax.config import Config

__all__ = ["build_model", "time_to_target", "restore_model"]


def build_model(
    config: Config,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    mean: ArrayLike,
    std: ArrayLike,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """The configured model.  ``mean``/``std``: training-set statistics in pixel
    units (per channel); the paper network uses their channel average.

    ``config.model`` and ``config.model_kwargs`` pick it (:func:`gbjax.models.build`),
    ``config.compute_dtype`` sets its compute dtype.

    Example:
      >>> from flax import nnx
      >>> from gbjax import config, train
      >>> cfg = config.Config(model="resnet", compute_dtype="bfloat16",
      ...                    model_kwargs=dict(stage_sizes=(1,), widths=(4,)))
      >>> m = train.build_model(cfg, input_shape=(8, 8, 3), num_classes=10,
      ...                       mean=[120.0, 110.0, 100.0], std=[60.0] * 3, rngs=nnx.Rngs(0))
      >>> type(m).__name__, m.dtype, m.mean[...].tolist()
      ('ResNet', dtype(bfloat16), [120.0, 110.0, 100.0])
    """
    dtype = None if config.compute_dtype == "float32" else jnp.dtype(config.compute_dtype)
    return models.build(
        config.model,
        input_shape=input_shape,
        num_classes=num_classes,
        data_mean=mean,
        data_std=std,
        dtype=dtype,
        rngs=rngs,
        **config.model_kwargs,
    )


def time_to_target(workdir: str | os.PathLike, target: float) -> dict | None:
    """The first evaluation in ``workdir/metrics.jsonl`` with test accuracy >= target.

    Returns that line (``step``, ``epoch``, ``test_accuracy``, ...) with
    ``train_time_s`` and ``elapsed_s`` counted from the start of the run, or None
    if no evaluation reached ``target``.  For a run that was resumed, the time of
    the earlier processes (up to their last logged line, including steps that
    were then redone) is added and ``"resumed": True`` is set.

    Example:
      A run resumed after its first evaluation:

      >>> import json, pathlib, tempfile
      >>> from gbjax import train
      >>> lines = [{"step": 10, "test_accuracy": 0.6, "train_time_s": 5.0, "elapsed_s": 9.0},
      ...          {"event": "resumed", "step": 10},
      ...          {"step": 20, "test_accuracy": 0.9, "train_time_s": 4.0, "elapsed_s": 7.0}]
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     text = "".join(json.dumps(r) + "\\n" for r in lines)
      ...     _ = (pathlib.Path(workdir) / "metrics.jsonl").write_text(text)
      ...     hit, miss = train.time_to_target(workdir, 0.8), train.time_to_target(workdir, 0.95)
      >>> hit["step"], hit["train_time_s"], hit["elapsed_s"], hit["resumed"], miss
      (20, 9.0, 16.0, True, None)
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
    """The eval-mode model of a run's checkpoint (the latest unless ``step``).

    Checkpoints are checked against their sha256 first: a corrupt latest one is
    reported and the latest one that verifies is restored; a corrupt ``step``
    raises :class:`gbjax._workdir.CorruptCheckpointError`.

    Example:
      The checkpoint of a one-step run gives the model the run returned:

      >>> import tempfile
      >>> import numpy as np
      >>> from gbjax import config, train
      >>> x = np.random.default_rng(0).integers(0, 256, (16, 8, 8, 1), dtype=np.uint8)
      >>> y = np.arange(16) % 2
      >>> cfg = config.Config(data={"train": (x, y), "test": (x, y)}, model="paper_convnet",
      ...                    model_kwargs=dict(kind="raw", features=4), batch_size=8,
      ...                    eval_batch_size=16, num_steps=1, progress=False)
      >>> with tempfile.TemporaryDirectory() as workdir:
      ...     model, _ = train.train_and_evaluate(cfg, workdir)
      ...     restored = train.restore_model(workdir)
      >>> type(restored).__name__, bool((restored(x) == model(x)).all())
      ('PaperConvNet', True)
    """
    import orbax.checkpoint as ocp

    workdir = pathlib.Path(workdir)
    step = verified_step(workdir, step)
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
    model.eval()
    graphdef, params, stats, consts = models.split_state(model)
    target = {"params": params, "batch_stats": stats, "consts": consts}
    mngr = checkpoint_manager(workdir, read_only=True)
    restored = mngr.restore(
        step,
        args=ocp.args.PyTreeRestore(
            target,
            restore_args=jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target),
            partial_restore=True,
        ),
    )
    mngr.close()
    # Uncommitted arrays on the default device, as training returns its model: a
    # committed array's placement is part of every program that takes it (the lowered
    # module names its sharding), so restored and trained models would otherwise
    # compile, and cache, each attack and evaluation program separately.
    restored = jax.tree.map(jnp.asarray, restored)
    return nnx.merge(graphdef, restored["params"], restored["batch_stats"], restored["consts"])

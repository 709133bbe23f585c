"""gbjax across processes, on JAX's own multi-process runtime (:mod:`jax.distributed`).

One Python process runs per host (or per GPU); every process runs the same
program, and JAX connects them through a coordinator (process 0's address).
This module gives gbjax's two data-set-sized jobs a multi-process form:

* **GB preprocessing** (:func:`gb_processed_distributed`): every process clusters
  its own contiguous shard of the data set on its own devices
  (:func:`gb_denoise_local`), and the painted shards are gathered, so every
  process returns the whole GB-processed data set; it is also stored in the
  cache of :func:`gbjax.data.gb_processed` under the same key, so a later
  single-process ``gb_processed`` (or training with ``preprocess="gb"``) is a
  cache hit.
* **Data-parallel training** (:func:`train_data_parallel`): one global
  :class:`jax.sharding.Mesh` over the devices of every process; parameters are
  replicated and each step's batch is sharded over the mesh, each process
  putting only its own rows of every batch on its devices. The step is
  :class:`gbjax.train.Trainer`'s, so a run on P processes takes the same steps
  (same epoch permutations, same global batch, BatchNorm statistics over the
  whole batch) as one process on one device, up to the order of float
  reductions.

Start (every process, before any other JAX call)::

    from gbjax import distributed
    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=i)

or from the command line, on every host::

    gbjax cluster cifar10 --data-dir DATA --threshold 20 --purity 0.9 \\
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id I
    python -m gbjax.distributed train --config gbjax.configs.pe_mnist:smoke \\
        --coordinator 10.0.0.1:1234 --num-processes 2 --process-id I

On a Cloud TPU slice or under SLURM / Open MPI the flags can be left out
(``--auto``): :func:`jax.distributed.initialize` detects them. On CPU the
cross-process collectives use gloo (set here). See the documentation page
"Scaling out" for multi-GPU and TPU commands.

What is not distributed: checkpoints and workdirs of
:func:`gbjax.train.train_and_evaluate` (a multi-process run keeps its state in
memory and returns the model; ``--out`` saves the final parameters), and
``capacity="auto"`` of the GB engine (it re-runs saturated images eagerly; give
a fixed capacity instead).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from jax.typing import ArrayLike

from gbjax import _cli, _xla, gb, train
from gbjax._batching import map_batches
from gbjax._checks import check_int
from gbjax._files import cache_root
from gbjax.config import Config, apply_overrides, load_config, validate_config
from gbjax.data import CorruptDataError, DataNotFoundError
from gbjax.data._entries import gb_key, read_gb_entry, write_gb_entry
from gbjax.data.cache import save_arrays
from gbjax.train import NonFiniteLossError, Trainer, TrainResult, init_model, total_steps_of

__all__ = [
    "initialize",
    "process_shard",
    "gb_denoise_local",
    "gb_processed_distributed",
    "train_data_parallel",
    "main",
]

# --------------------------------------------------------------------------- #
# Start-up
# --------------------------------------------------------------------------- #


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids=None,
    cpu_collectives: str | None = "gloo",
    **kwargs,
) -> None:
    """Join this process to a multi-process JAX run (call before any other JAX call).

    A thin wrapper of :func:`jax.distributed.initialize` that also selects the CPU
    cross-process collectives (gloo), which CPU devices need for any computation
    spanning processes. With every argument ``None`` JAX detects the cluster
    (Cloud TPU, SLURM, Open MPI, ``JAX_COORDINATOR_ADDRESS``). ``num_processes=1``
    without a coordinator does nothing: a single process needs no coordinator.

    Args:
      coordinator_address: ``"host:port"`` of process 0, the same on every process.
      num_processes: how many processes take part.
      process_id: this process's index, ``0 .. num_processes - 1``.
      local_device_ids: restrict this process to these local devices (one GPU
        per process, say); ``None``: all of them.
      cpu_collectives: ``"gloo"`` (default) or ``"mpi"``, for CPU devices;
        ``None`` leaves JAX's setting alone.
      **kwargs: passed on to :func:`jax.distributed.initialize`.

    Raises:
      ValueError: for an inconsistent ``num_processes`` / ``process_id``.
      RuntimeError: (from JAX) when JAX was already used in this process.

    Example:
      >>> import jax
      >>> from gbjax import distributed
      >>> distributed.initialize(num_processes=1, cpu_collectives=None)  # nothing to join
      >>> jax.process_count(), jax.process_index()
      (1, 0)
    """
    import jax

    check_int("num_processes", num_processes, optional=True)
    if process_id is not None and num_processes is not None:
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"process_id must be in 0..{num_processes - 1} for {num_processes} processes, "
                f"got {process_id}"
            )
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    if num_processes == 1 and coordinator_address is None:
        return
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
        **kwargs,
    )


def process_shard(
    n: int, process_index: int | None = None, process_count: int | None = None
) -> slice:
    """The contiguous rows of an ``n``-row data set that one process works on.

    Rows are split as evenly as possible, in order: the first ``n % P``
    processes get one row more than the others.

    Args:
      n: number of rows of the data set.
      process_index: the process (default: this one, :func:`jax.process_index`).
      process_count: the number of processes P (default: :func:`jax.process_count`).

    Returns:
      A ``slice`` of the rows (empty when ``n < P`` for the last processes).

    Example:
      >>> from gbjax import distributed
      >>> [distributed.process_shard(10, i, 3) for i in range(3)]
      [slice(0, 4, None), slice(4, 7, None), slice(7, 10, None)]
    """
    import jax

    P = jax.process_count() if process_count is None else int(process_count)
    i = jax.process_index() if process_index is None else int(process_index)
    if not 0 <= i < P:
        raise ValueError(f"process_index must be in 0..{P - 1}, got {i}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    base, extra = divmod(int(n), P)
    start = i * base + min(i, extra)
    return slice(start, start + base + (1 if i < extra else 0))


# --------------------------------------------------------------------------- #
# GB preprocessing
# --------------------------------------------------------------------------- #

_NOT_GB_KWARGS = ("scale", "progress")


def _check_uint8_nhwc(images) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be uint8 (N, H, W, C), got {images.dtype} of shape {images.shape}"
        )
    return images


def _gb_params(params, gb_kwargs: dict) -> tuple[gb.GBParams, dict]:
    """``gb.as_params`` of the arguments, refusing what cannot run across processes."""
    for k in _NOT_GB_KWARGS:
        if k in gb_kwargs:
            raise ValueError(f"{k}: not a parameter here (uint8 images in, uint8 out)")
    params, rest = gb.as_params(params, gb_kwargs)
    if params.capacity == "auto":
        raise ValueError(
            "capacity='auto' re-runs saturated images eagerly and is not supported across "
            "processes; give a fixed capacity (an int, e.g. 256 or 512)"
        )
    return params, rest


def gb_denoise_local(
    images: ArrayLike,
    params: gb.GBParams | None = None,
    *,
    progress: bool = False,
    memory_budget: int = 2 << 30,
    chunk_size: int | None = None,
    **gb_kwargs: Any,
) -> np.ndarray:
    """:func:`gbjax.gb_denoise` of ``images`` on this process's own devices only.

    Safe in a multi-process run, where each process calls it with different
    images: the batch is sharded over :func:`jax.local_devices` (never over other
    processes' devices) and no collective is run, so processes need not call it
    in step. The painted images equal those of ``gbjax.gb_denoise(images, params,
    **gb_kwargs)`` in a single process.

    Args:
      images: uint8 ``(N, H, W, C)`` (N may be 0).
      params: the GB parameters, a :class:`gbjax.GBParams` (``capacity`` an
        int); or None for the GB keywords in ``gb_kwargs``, not both.
      progress: show a progress bar over chunks.
      memory_budget: bytes per compiled call, as in :func:`gbjax.gb_cluster`.
      chunk_size: images per compiled call (default: from ``memory_budget``, at
        most 128 on CPU, as :func:`gbjax.gb_cluster` picks it).
      **gb_kwargs: the other keyword arguments of :func:`gbjax.gb_cluster`
        (``threshold``, ``purity``, ``capacity`` (an int), ``min_ball_size``,
        ``features``, ...).

    Returns:
      The painted images, uint8 numpy ``(N, H, W, C)``.

    Example:
      >>> import numpy as np
      >>> from gbjax import GBParams, distributed
      >>> x = np.zeros((2, 4, 4, 3), np.uint8)
      >>> x[:, :, 2:] = 200  # two flat halves
      >>> out = distributed.gb_denoise_local(x, GBParams(threshold=20.0, capacity=8))
      >>> out.dtype, out.shape, bool((out == x).all())
      (dtype('uint8'), (2, 4, 4, 3), True)
    """
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    images = _check_uint8_nhwc(images)
    params, rest = _gb_params(params, gb_kwargs)
    if len(images) == 0:
        return images.copy()
    _, H, W, C = images.shape
    if chunk_size is None:
        per = gb.memory_estimate(
            1,
            H,
            W,
            C,
            capacity=params.capacity,
            min_ball_size=params.min_ball_size,
            features=params.features,
        )
        chunk_size = max(1, int(memory_budget // per))
        if jax.default_backend() == "cpu":
            chunk_size = min(chunk_size, 128)
    else:
        check_int("chunk_size", chunk_size)
    devices = jax.local_devices()
    chunk = min(chunk_size, len(images))
    chunk = -(-chunk // len(devices)) * len(devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("batch",)), P("batch"))
    # Traced images take gb_cluster's in-jit path: the engine runs on the devices of
    # its input, here this process's, and eager-only checks are skipped (uint8 values
    # are in range by type; the options are checked while tracing).
    painted = jax.jit(
        lambda x: gb.gb_denoise(x, params=params, memory_budget=memory_budget, **rest),
        in_shardings=sharding,
        out_shardings=sharding,
    )
    out = map_batches(
        painted, images, batch_size=chunk, shrink=False, progress=progress, desc="gb (local)"
    )
    return np.asarray(out)


def _allgather_rows(local: np.ndarray, n: int) -> np.ndarray:
    """Every process's :func:`process_shard` rows of an ``n``-row array, in order."""
    import jax
    from jax.experimental import multihost_utils

    P = jax.process_count()
    if P == 1:
        return local
    per = -(-n // P)  # process_allgather needs the same shape on every process
    pad = np.zeros((per - len(local), *local.shape[1:]), local.dtype)
    gathered = np.asarray(multihost_utils.process_allgather(np.concatenate([local, pad])))
    return np.concatenate(
        [gathered[j][: len(range(n)[process_shard(n, j, P)])] for j in range(P)], axis=0
    )


def _all_processes_agree(flag: bool) -> bool:
    """True when ``flag`` is true on every process (a collective: call it on all)."""
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() == 1:
        return flag
    return bool(np.all(multihost_utils.process_allgather(np.int32(flag))))


def gb_processed_distributed(
    images: ArrayLike,
    params: gb.GBParams | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    use_cache: bool = True,
    progress: bool = False,
    **gb_kwargs: Any,
) -> np.ndarray:
    """:func:`gbjax.data.gb_processed` with the clustering split over processes.

    Every process passes the same data set (each loads it, as in a
    single-process run); each clusters its :func:`process_shard` on its own
    devices (:func:`gb_denoise_local`), the painted shards are gathered, and
    every process returns the whole painted data set. Call it on every process
    (it runs collectives). The result is written to the GB cache under the key
    :func:`gbjax.data.gb_processed` uses for the same images and parameters
    (by every process, atomically; identical contents); when every process finds
    a valid entry, nothing is clustered.

    Args:
      images: uint8 ``(N, H, W, C)``, the same on every process.
      params: the GB parameters, a :class:`gbjax.GBParams` (``capacity`` an
        int); or None for the GB keywords in ``gb_kwargs``, not both.
      cache_dir: the GB cache folder (default ``$GBJAX_CACHE_DIR``, else
        ``~/.cache/gbjax``).
      use_cache: read and write the cache.
      progress: show a progress bar over this process's chunks.
      **gb_kwargs: keyword arguments of :func:`gbjax.gb_cluster`; ``capacity``
        must be an int.

    Returns:
      The painted data set, uint8 numpy ``(N, H, W, C)``, on every process.

    Example:
      In a single process it is :func:`gbjax.data.gb_processed`, entry included:

      >>> import tempfile
      >>> import numpy as np
      >>> from gbjax import GBParams, data, distributed
      >>> x = np.zeros((2, 4, 4, 3), np.uint8)
      >>> x[:, :, 2:] = 200
      >>> p = GBParams(threshold=20.0, capacity=8)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     out = distributed.gb_processed_distributed(x, p, cache_dir=d)
      ...     same = data.gb_processed(x, p, cache_dir=d, progress=False)  # a cache hit
      >>> bool((out == x).all() and (same == out).all())
      True
    """
    images = _check_uint8_nhwc(images)
    params, rest = _gb_params(params, gb_kwargs)
    path = cache_root(cache_dir) / f"gb_{gb_key(images, params)}.npz"
    cached = None
    if use_cache and path.exists():
        cached = read_gb_entry(path, images.shape)
    if use_cache and _all_processes_agree(cached is not None):
        return cached
    n = len(images)
    local = gb_denoise_local(images[process_shard(n)], params, progress=progress, **rest)
    out = _allgather_rows(local, n)
    if use_cache:
        write_gb_entry(path, out)
    return out


# --------------------------------------------------------------------------- #
# Data-parallel training
# --------------------------------------------------------------------------- #


def _global_replicated(tree, sharding):
    """A pytree of (identical) host-local arrays -> global arrays replicated on ``sharding``."""
    import jax

    def one(a):
        a = np.asarray(a)
        return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])

    return jax.tree.map(one, tree)


def _host_copy(tree):
    """Global replicated arrays -> this process's copy, as plain uncommitted arrays."""
    import jax
    import jax.numpy as jnp

    return jax.tree.map(lambda a: jnp.asarray(np.asarray(a.addressable_data(0))), tree)


def _feed(host: np.ndarray, rows: np.ndarray, sharding):
    """The global batch ``host[rows]``; this process reads only its devices' rows."""
    import jax

    shape = (len(rows), *host.shape[1:])
    return jax.make_array_from_callback(shape, sharding, lambda idx: host[rows[idx[0]]])


def _load_data(config):
    """``(xtr, ytr, xte, yte)`` as :func:`gbjax.train.load_datasets`, with GB across processes."""
    xtr, ytr, xte, yte = train.load_datasets(dataclasses.replace(config, preprocess="none"))
    if config.preprocess == "gb":
        # config.gb: the keyword arguments of gb_denoise, or a GBParams
        params = config.gb if isinstance(config.gb, gb.GBParams) else None
        kw = dict(cache_dir=config.cache_dir, progress=config.progress)
        kw.update({} if params is not None else config.gb)
        xtr = gb_processed_distributed(xtr, params, **kw)
        xte = gb_processed_distributed(xte, params, **kw)
    return xtr, ytr, xte, yte


def train_data_parallel(
    config: Config,
    *,
    evaluate: bool = True,
    log: Callable[[dict[str, Any]], None] | None = None,
) -> TrainResult:
    """Train ``config`` data-parallel over every device of every process.

    Call it on every process with the same configuration. Each process loads
    the data set (GB preprocessing split over processes with
    :func:`gb_processed_distributed`), builds the model from the same seed, and
    joins one global mesh over :func:`jax.devices`; the parameters and optimiser
    state are replicated, and each global batch of ``config.batch_size`` images
    is sharded over the mesh, each process putting only its own rows on its
    devices. The step is :class:`gbjax.train.Trainer`'s (same epoch
    permutations, augmentation keys, loss, optimiser), so the run matches a
    single-process one up to float reduction order (and, with augmentation, the
    sharding-dependent random bits noted in :func:`gbjax.train.root_key`).

    Not kept: workdir, checkpoints and metrics file (see
    :func:`gbjax.train.train_and_evaluate` for those on one process).

    Args:
      config: a :class:`gbjax.config.Config`; ``batch_size`` must be a multiple of the
        global device count, and ``num_devices`` ``None`` or that count.
      evaluate: evaluate the final model on the test set (on every process, on
        its own devices).
      log: called on process 0 as ``log(record)`` every ``log_every_steps`` steps
        with ``{"step", "train_loss", "train_accuracy"}``; default: none.

    Returns:
      :class:`gbjax.train.TrainResult`: the trained model in eval mode (a host-local
      copy on every process) and the final metrics (``step``, ``train_loss``,
      ``train_accuracy``, ``images_per_sec``, and ``test_accuracy`` / ``test_loss``
      when ``evaluate``).

    Raises:
      ValueError: for an invalid configuration or a batch that does not divide
        over the devices.
      gbjax.train.NonFiniteLossError: when the loss becomes NaN or infinite.

    Example:
      One step of a tiny convolutional network on eight 8x8 images, in one process:

      >>> import numpy as np
      >>> from gbjax import distributed
      >>> from gbjax.config import Config
      >>> x, y = np.zeros((8, 8, 8, 1), np.uint8), np.arange(8, dtype=np.int32) % 2
      >>> config = Config(
      ...     data={"train": (x, y), "test": (x, y)}, model="paper_convnet",
      ...     model_kwargs=dict(kind="raw", features=4), batch_size=8, eval_batch_size=8,
      ...     num_steps=1, log_every_steps=1, progress=False,
      ... )
      >>> m = distributed.train_data_parallel(config).metrics
      >>> m["step"], m["num_processes"], m["num_devices"], m["test_accuracy"]
      (1, 1, 1, 0.5)
    """
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    ndev = jax.device_count()
    if config.num_devices not in (None, ndev):
        raise ValueError(
            f"invalid config: num_devices={config.num_devices}, but a multi-process run uses "
            f"every device of every process ({ndev}); leave num_devices=None"
        )
    validate_config(config, num_devices=ndev)
    if config.adversarial:
        raise ValueError("adversarial training is not supported across processes yet")
    t0 = time.perf_counter()
    xtr, ytr, xte, yte = _load_data(config)
    num_classes = int(max(ytr.max(), yte.max())) + 1
    if config.data is None:
        num_classes = max(num_classes, 10)
    total_steps = total_steps_of(config, len(xtr))
    model = init_model(config, xtr, num_classes)
    trainer = Trainer(
        config, model, num_classes=num_classes, num_train=len(xtr), total_steps=total_steps
    )
    # The same step on one global mesh: Trainer's step reads these attributes when traced.
    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    trainer.mesh = mesh
    trainer.repl = NamedSharding(mesh, P())
    trainer.batch_sharding = NamedSharding(mesh, P("data"))
    step_fn = jax.jit(
        trainer.step,
        donate_argnums=(0,),
        out_shardings=trainer.repl,
        compiler_options=_xla.conv_options(),
    )
    state = _global_replicated(trainer.init_state, trainer.repl)
    # Each step is fed its global batch directly: a "data set" of B rows in order,
    # whose permutation is the identity (Trainer slices B rows of it from row 0).
    B = config.batch_size
    identity = _global_replicated(np.arange(B, dtype=np.int32), trainer.repl)
    flip = np.asarray(jax.random.bernoulli(trainer.flip_key, 0.5, (len(xtr),)))  # as put_data
    spe = trainer.steps_per_epoch
    epoch, perm = -1, None
    window_start = time.perf_counter()
    metrics: dict = {}
    for step in range(total_steps):
        if step // spe != epoch:
            epoch = step // spe
            perm = np.asarray(trainer.epoch_permutation(epoch))
        rows = perm[(step % spe) * B : (step % spe + 1) * B]
        batch = {
            "images": _feed(xtr, rows, trainer.batch_sharding),
            "labels": _feed(ytr, rows, trainer.batch_sharding),
            "flip": _feed(flip, rows, trainer.batch_sharding),
        }
        state = step_fn(state, batch, identity)
        done = step + 1
        if done % config.log_every_steps and done != total_steps:
            continue
        sums = {
            k: float(state[k].addressable_data(0)) for k in ("loss_sum", "correct_sum", "count")
        }
        if not math.isfinite(sums["loss_sum"]):
            raise NonFiniteLossError(
                f"non-finite training loss ({sums['loss_sum']}) by step {done}"
            )
        elapsed = time.perf_counter() - window_start
        metrics = {
            "step": done,
            "train_loss": sums["loss_sum"] / max(sums["count"], 1.0),
            "train_accuracy": sums["correct_sum"] / max(sums["count"], 1.0),
            "images_per_sec": sums["count"] / elapsed if elapsed > 0 else float("nan"),
        }
        if log is not None and jax.process_index() == 0:
            log(dict(metrics))
        zeros = {k: jnp.zeros((), jnp.float32) for k in ("loss_sum", "correct_sum", "count")}
        state = dict(state, **_global_replicated(zeros, trainer.repl))
        window_start = time.perf_counter()
    local = _host_copy(state)
    model = trainer.model(local)
    if evaluate:
        ev = trainer.evaluate(local, xte, yte, tta=config.eval_tta)
        metrics.update(test_accuracy=ev["accuracy"], test_loss=ev["loss"])
    metrics.update(
        num_processes=jax.process_count(),
        num_devices=ndev,
        wall_time_s=time.perf_counter() - t0,
    )
    return TrainResult(model, metrics)


# --------------------------------------------------------------------------- #
# Command line: python -m gbjax.distributed
# --------------------------------------------------------------------------- #

_EPILOG = """\
examples (run the same command on every process, changing only --process-id):
  python -m gbjax.distributed cluster mnist --data-dir DATA --threshold 20 \\
      --coordinator 127.0.0.1:5555 --num-processes 2 --process-id 0
  python -m gbjax.distributed train --config gbjax.configs.pe_mnist:smoke \\
      --out params.npz --coordinator 127.0.0.1:5555 --num-processes 2 --process-id 0
  python -m gbjax.distributed train --config gbjax.configs.airbench_cifar10 --auto

exit status: 0 done; 1 the work failed (non-finite loss, a process lost);
2 refused before any work (bad options, configuration or data).
"""


def _save_params(path: str, model) -> None:
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model))
    save_arrays(path, {"/".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat})


def add_process_flags(parser: argparse.ArgumentParser) -> None:
    """The flags that join a process to a multi-process run (``--coordinator`` ...).

    Args:
      parser: the parser (or argument group) to add them to.
    """
    g = parser.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="process 0's address")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in the run")
    g.add_argument("--process-id", type=int, metavar="I", help="this process, 0..N-1")
    g.add_argument(
        "--auto",
        action="store_true",
        help="detect the cluster (Cloud TPU, SLURM, Open MPI, JAX_COORDINATOR_ADDRESS)",
    )


def start_from_flags(args: argparse.Namespace) -> bool:
    """Call :func:`initialize` as the flags of :func:`add_process_flags` ask.

    Args:
      args: parsed arguments holding ``coordinator``, ``num_processes``,
        ``process_id`` and ``auto``.

    Returns:
      True when a multi-process run was joined, False for a single process.

    Raises:
      ValueError: for an incomplete or inconsistent set of flags.
    """
    given = [args.coordinator, args.num_processes, args.process_id]
    if args.auto:
        if any(v is not None for v in given):
            raise ValueError("--auto detects the cluster: give it without --coordinator etc.")
        initialize()
        return True
    if all(v is None for v in given):
        return False
    if any(v is None for v in given):
        raise ValueError("give all of --coordinator, --num-processes and --process-id (or --auto)")
    initialize(args.coordinator, args.num_processes, args.process_id)
    return True


def main(argv=None) -> int:
    """Run ``python -m gbjax.distributed``: ``cluster`` or ``train``, then the process flags.

    Args:
      argv: the arguments (default ``sys.argv[1:]``).

    Returns:
      The exit status: 0 done; 1 the work failed; 2 refused before any work.
    """
    p = argparse.ArgumentParser(
        prog="python -m gbjax.distributed",
        description="gbjax across processes: GB preprocessing and data-parallel training.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
    )
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser(
        "cluster",
        help="a data set to its GB-processed copy in the cache, split over processes",
        allow_abbrev=False,
    )
    _cli.add_cluster_arguments(c)
    add_process_flags(c)
    t = sub.add_parser(
        "train", help="data-parallel training over all processes", allow_abbrev=False
    )
    t.add_argument("--config", required=True, help="path/to/config.py[:arg] or module[:arg]")
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (a Python literal); repeatable")  # fmt: skip
    t.add_argument("--out", metavar="FILE.npz", help="process 0 saves the final parameters here")
    add_process_flags(t)
    args = p.parse_args(argv)
    try:
        joined = start_from_flags(args)
    except ValueError as e:
        p.error(str(e))
    if args.command == "cluster":
        across = gb_processed_distributed if joined else None
        return _cli.run_cluster(args, across_processes=across)
    return _run_train(args)


def _run_train(args) -> int:
    import jax

    try:
        config = apply_overrides(load_config(args.config), args.set)
        result = train_data_parallel(
            config, log=lambda r: print(json.dumps(r), file=sys.stderr, flush=True)
        )
    except (ValueError, DataNotFoundError, CorruptDataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if jax.process_index() == 0:
        if args.out:
            _save_params(args.out, result.model)
        print(json.dumps(result.metrics, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

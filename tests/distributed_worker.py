"""One process of tests/test_distributed.py (not a test module itself).

    python distributed_worker.py single OUT.npz
    python distributed_worker.py dist OUT.npz PROCESS_ID NUM_PROCESSES PORT

``single``: the plain single-process library path (``gbjax.gb_denoise`` and
:class:`gbjax.train.Trainer` on one device). ``dist``: the same work through
:mod:`gbjax.distributed` as one of NUM_PROCESSES processes joined at
127.0.0.1:PORT. Each writes the painted images and the trained parameters.
"""

import os
import sys

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.pop("XLA_FLAGS", None)  # one CPU device per process

import numpy as np  # noqa: E402

GB_KW = dict(threshold=20.0, purity=0.9, capacity=32)
STEPS = 3


def images(n=11, size=8, seed=0):
    """Blocky colour images: a few flat regions plus noise, so GB has balls to find."""
    rng = np.random.default_rng(seed)
    x = np.repeat(np.repeat(rng.integers(0, 256, (n, 2, 2, 3)), 4, 1), 4, 2)
    return np.clip(x + rng.integers(-12, 13, x.shape), 0, 255).astype(np.uint8)


def dataset(n, seed, size=8):
    """Learnable 4-class grey images: a bright bar whose row encodes the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n).astype(np.int32)
    x = rng.integers(0, 60, (n, size, size, 1)).astype(np.uint8)
    for i in range(n):
        x[i, 2 * int(y[i]) : 2 * int(y[i]) + 2, 1:-1] = 230
    return x, y


def config():
    from gbjax.config import Config

    return Config(
        data={"train": dataset(48, 0), "test": dataset(16, 1)},
        model="resnet",  # BatchNorm: its statistics must be those of the whole batch
        model_kwargs=dict(stage_sizes=(1,), widths=(4,)),
        optimizer="adam",
        learning_rate=1e-2,
        batch_size=8,
        eval_batch_size=8,
        num_steps=STEPS,
        log_every_steps=STEPS,
        progress=False,
    )


def flat_params(model):
    from flax import nnx

    flat = nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat)))
    return {"param/" + "/".join(map(str, k)): np.asarray(v.get_value()) for k, v in flat}


def single():
    import dataclasses

    import gbjax
    from gbjax import train

    painted = np.asarray(gbjax.gb_denoise(images(), **GB_KW))
    cfg = dataclasses.replace(config(), num_devices=1)
    xtr, ytr, _, _ = train.load_datasets(cfg)
    model = train.init_model(cfg, xtr, 4)
    trainer = train.Trainer(cfg, model, num_classes=4, num_train=len(xtr), total_steps=STEPS)
    data, state, epoch = trainer.put_data(xtr, ytr), trainer.init_state, -1
    for step in range(STEPS):
        if step // trainer.steps_per_epoch != epoch:
            epoch = step // trainer.steps_per_epoch
            perm = trainer.epoch_permutation(epoch)
        state = trainer.train_step(state, data, perm)
    return painted, trainer.model(state), float(state["loss_sum"])


def dist(process_id, num_processes, port):
    from gbjax import distributed

    distributed.initialize(f"127.0.0.1:{port}", num_processes, process_id)
    import jax

    assert jax.process_count() == num_processes and jax.device_count() == num_processes
    painted = distributed.gb_processed_distributed(images(), use_cache=False, **GB_KW)
    result = distributed.train_data_parallel(config(), evaluate=process_id == 0)
    loss = result.metrics["train_loss"] * 8 * STEPS  # summed over every example of every step
    return painted, result.model, loss


def main():
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "single":
        painted, model, loss = single()
    else:
        painted, model, loss = dist(*map(int, sys.argv[3:6]))
    np.savez(out, painted=painted, loss=loss, **flat_params(model))


if __name__ == "__main__":
    main()

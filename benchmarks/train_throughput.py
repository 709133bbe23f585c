"""Training throughput (images/s) per model: gbjax.train's step vs a baseline.

    python benchmarks/train_throughput.py                      # all models
    python benchmarks/train_throughput.py --models pe raw --steps 20 --json out.json

For each model, on synthetic data of the model's input shape, it times

* ``gbjax``: the training step of :mod:`gbjax.train` -- dataset resident on
  the device, batch gathered on device from the epoch permutation, one
  ``jax.jit`` over the functional NNX step (``nnx.split`` once, ``nnx.merge``
  inside) that donates the train state;
* ``baseline``: the idiomatic stateful NNX loop of the Flax tutorials -- an
  ``nnx.jit``-decorated step over ``(model, nnx.Optimizer, batch)`` fed one
  host (numpy) batch per step;

both with the same model, optimiser and batch size, compilation excluded
(warm-up steps first, then ``--rounds`` alternating rounds of ``--steps``
steps each, ended by ``block_until_ready``; median round reported).  Prints a table and (``--json``) writes the figures with
the machine description.  The ratio column is gbjax / baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gbjax import train

MODELS = {
    # name: (Config overrides, image shape)
    "raw": (
        dict(
            model="paper_convnet",
            model_kwargs=dict(kind="raw"),
            optimizer="adam",
            learning_rate=1e-4,
            batch_size=64,
        ),
        (28, 28, 1),
    ),
    "pe": (
        dict(
            model="paper_convnet",
            model_kwargs=dict(kind="embedding"),
            optimizer="adam",
            learning_rate=1e-4,
            batch_size=64,
        ),
        (28, 28, 1),
    ),
    "resnet20": (
        dict(
            model="resnet20",
            optimizer="sgd",
            learning_rate=0.1,
            weight_decay=5e-4,
            label_smoothing=0.1,
            batch_size=128,
            augment="crop_flip",
        ),
        (32, 32, 3),
    ),
    "resnet18": (
        dict(
            model="resnet18",
            optimizer="sgd",
            learning_rate=0.1,
            weight_decay=5e-4,
            label_smoothing=0.1,
            batch_size=128,
            augment="crop_flip",
        ),
        (32, 32, 3),
    ),
}


def _setup(name, n_train, steps):
    overrides, shape = MODELS[name]
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n_train, *shape), dtype=np.uint8)
    y = rng.integers(0, 10, n_train).astype(np.int32)
    cfg = train.Config(
        data={"train": (x, y), "test": (x[:10], y[:10])},
        num_steps=steps,
        progress=False,
        **overrides,
    )
    if jax.default_backend() != "cpu" and cfg.model.startswith("resnet"):
        cfg.compute_dtype = "bfloat16"
    train.validate_config(cfg)
    model = nnx.jit(
        lambda k: train.build_model(
            cfg,
            input_shape=shape,
            num_classes=10,
            mean=x.reshape(-1, shape[-1]).mean(0),
            std=x.reshape(-1, shape[-1]).std(0),
            rngs=nnx.Rngs(params=k),
        )
    )(jax.random.fold_in(train.root_key(0), 0))
    return cfg, model, x, y


def bench_gbjax(cfg, model, x, y, steps, warmup):
    """-> (run(n) -> seconds for n steps, warm-up seconds incl. compilation)."""
    tr = train._Trainer(cfg, model, 10, len(x), 10**9)
    box = {"state": tr.init_state}
    xs, ys = jax.device_put(x, tr.repl), jax.device_put(y, tr.repl)
    perm = tr.epoch_perm(0)

    def run(n):
        t0 = time.perf_counter()
        state = box["state"]
        for _ in range(n):
            state = tr.train_step(state, xs, ys, perm)
        jax.block_until_ready(state)
        box["state"] = state
        return time.perf_counter() - t0

    return run, run(warmup)


def bench_baseline(cfg, model, x, y, steps, warmup):
    tx = train.make_optimizer(cfg, steps + warmup)
    model.train()
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    aug = train._augment_fn() if cfg.augment == "crop_flip" else None
    B = cfg.batch_size

    @nnx.jit
    def step(model, opt, xb, yb, key):
        if aug is not None:
            xb = aug(key, xb, pad=cfg.crop_pad)

        def loss_fn(model):
            logits = model(xb)
            onehot = optax.smooth_labels(jax.nn.one_hot(yb, 10), cfg.label_smoothing)
            return optax.softmax_cross_entropy(logits.astype(jnp.float32), onehot).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    rng = np.random.default_rng(0)
    key = train.root_key(0)

    def run(n):
        t0 = time.perf_counter()
        loss = None
        for i in range(n):
            idx = rng.integers(0, len(x), B)
            loss = step(model, opt, x[idx], y[idx], jax.random.fold_in(key, i))
        jax.block_until_ready(loss)
        return time.perf_counter() - t0

    return run, run(warmup)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating gbjax/baseline rounds; the median is reported",
    )
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    machine = dict(
        backend=jax.default_backend(),
        device=dev.device_kind,
        device_count=jax.device_count(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=__import__("os").cpu_count(),
        jax=jax.__version__,
    )
    print(f"# {machine}")
    print(f"{'model':10s} {'batch':>5s} {'gbjax img/s':>12s} {'baseline img/s':>15s} {'ratio':>6s}")
    rows = []
    for name in args.models:
        cfg, model, x, y = _setup(name, args.n_train, args.steps)
        run_ours, c1 = bench_gbjax(cfg, model, x, y, args.steps, args.warmup)
        cfg, model, x, y = _setup(name, args.n_train, args.steps)
        run_base, c2 = bench_baseline(cfg, model, x, y, args.steps, args.warmup)
        t_ours, t_base = [], []
        for _ in range(args.rounds):  # interleaved, so load drift hits both alike
            t_ours.append(run_ours(args.steps))
            t_base.append(run_base(args.steps))
        ours = cfg.batch_size * args.steps / float(np.median(t_ours))
        base = cfg.batch_size * args.steps / float(np.median(t_base))
        rows.append(
            dict(
                model=name,
                batch_size=cfg.batch_size,
                gbjax_images_per_sec=ours,
                baseline_images_per_sec=base,
                ratio=ours / base,
                gbjax_warmup_s=c1,
                baseline_warmup_s=c2,
                steps=args.steps,
                rounds=args.rounds,
            )
        )
        print(
            f"{name:10s} {cfg.batch_size:5d} {ours:12.1f} {base:15.1f} {ours / base:6.2f}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, results=rows), f, indent=2)


if __name__ == "__main__":
    main()

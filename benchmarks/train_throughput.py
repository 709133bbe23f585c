"""Training throughput (images/s) per model: gbjax's step against baselines, same run.

    python benchmarks/train_throughput.py                          # all models
    python benchmarks/train_throughput.py --models airbench94 --steps 4 --json out.json

For each model, on synthetic uint8 data of the model's input shape, it times

* ``gbjax``: :class:`gbjax.train.Trainer`'s step -- data set resident on the
  device, batch gathered and augmented on device, one ``jax.jit`` over the
  functional NNX step that donates the train state;
* ``nnx.jit``: the idiomatic stateful NNX loop of the Flax tutorials (an
  ``nnx.jit`` step over ``(model, nnx.Optimizer, batch)`` fed one host batch per
  step, no per-jit XLA options), same model, optimiser and batch;
* ``torch`` (airbench models only; needs ``pip install 'gbjax[bench]'``): the
  same network, optimiser groups, loss and augmentation written in PyTorch
  (CPU, float32, channels-last) on batches drawn the same way (its translation
  is one random shift per batch, not per image: slightly less work than ours).

Compilation is excluded: warm-up steps first, then ``--rounds`` alternating
rounds of ``--steps`` steps each, ended by a device sync; the median round is
reported. Prints a table; ``--json`` writes the figures with the machine.
The ratio columns are gbjax / baseline.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gbjax import augment, train
from gbjax.config import Config

AIRBENCH = ("airbench94", "airbench_fast")
MODELS = {
    # name: (config, image shape)
    "raw": (dict(model="paper_convnet", model_kwargs=dict(kind="raw"), batch_size=64), (28, 28, 1)),
    "pe": (
        dict(model="paper_convnet", model_kwargs=dict(kind="embedding"), batch_size=64),
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
    ),  # fmt: skip
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
    ),  # fmt: skip
    "airbench94": ("", (32, 32, 3)),
    "airbench_fast": ("fast", (32, 32, 3)),
}


def make_config(name: str, steps: int) -> tuple[Config, tuple]:
    spec, shape = MODELS[name]
    if name in AIRBENCH:
        from gbjax.configs import airbench_cifar10

        cfg = airbench_cifar10.get_config(spec or None)
    else:
        cfg = Config(**{"optimizer": "adam", "learning_rate": 1e-4, **spec})  # spec wins
    cfg = dataclasses.replace(cfg, num_steps=steps, num_train=None, num_test=None, progress=False)
    if jax.default_backend() != "cpu" and cfg.model != "paper_convnet":
        cfg.compute_dtype = "bfloat16"
    return cfg, shape


def synthetic(shape, n):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    return x, rng.integers(0, 10, n).astype(np.int32)


def images(shape, n, data_dir=None):
    """``n`` training images of this shape: a fixed random subset of CIFAR-10 (32x32x3)
    or MNIST (28x28x1) from ``data_dir`` when given, else uniform noise (synthetic).
    Real images can time differently from noise: on 2026-12-05 PyTorch's `fast` step
    ran at 558 img/s on CIFAR-10 and 616 on noise (docs/results/benchmarks/RUN.md)."""
    if data_dir is None:
        return synthetic(shape, n)
    from gbjax import data

    name = "cifar10" if shape[-1] == 3 else "mnist"
    x, y = data.load(name, "train", data_dir=data_dir, progress=False)
    x, y = data.random_subset(x, np.asarray(y, np.int32), n)
    return np.asarray(x), np.asarray(y, np.int32)


def bench_gbjax(cfg, x, y):
    """-> run(n) -> seconds for n steps."""
    model = train.init_model(cfg, x, 10)
    tr = train.Trainer(cfg, model, num_classes=10, num_train=len(x), total_steps=10**6)
    box = {"state": tr.init_state}
    data = tr.put_data(x, y)
    perm = tr.epoch_permutation(0)

    def run(n):
        t0 = time.perf_counter()
        state = box["state"]
        for _ in range(n):
            state = tr.train_step(state, data, perm)
        jax.block_until_ready(state)
        box["state"] = state
        return time.perf_counter() - t0

    return run


def bench_nnx_jit(cfg, x, y):
    model = train.init_model(cfg, x, 10)
    model.train()
    params = nnx.as_pure(nnx.state(model, nnx.Param))  # arrays: the optimiser sees arrays
    tx = train.make_optimizer(cfg, 10**6, params=params, steps_per_epoch=len(x) // cfg.batch_size)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    B, pad = cfg.batch_size, cfg.crop_pad
    reduce = jnp.sum if cfg.loss_reduction == "sum" else jnp.mean

    @nnx.jit
    def step(model, opt, xb, yb, key):
        if cfg.augment == "crop_flip":
            xb = augment.random_crop_flip(key, xb, pad=pad)
        elif cfg.augment == "flip_translate":
            xb = augment.random_translate(key, augment.random_flip(key, xb), pad, mode="reflect")

        def loss_fn(model):
            onehot = optax.smooth_labels(jax.nn.one_hot(yb, 10), cfg.label_smoothing)
            return reduce(optax.softmax_cross_entropy(model(xb).astype(jnp.float32), onehot))

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

    return run


def torch_step(cfg, x, y, flush_denormal=False):
    """-> step(): one PyTorch training step of the airbench network, optimiser
    groups, loss and augmentation (also profiled by train_profile.py).
    ``flush_denormal``: ``torch.set_flush_denormal(True)`` (XLA:CPU flushes
    denormals by default; PyTorch does not)."""
    import torch
    from torch import nn

    torch.set_flush_denormal(bool(flush_denormal))
    torch.set_num_threads(os.cpu_count() or 1)
    widths = cfg.model_kwargs["widths"]
    mom = cfg.momentum

    def bn(c):
        m = nn.BatchNorm2d(c, eps=1e-12, momentum=1 - 0.6)
        m.weight.requires_grad = False
        return m

    def group(ci, co):
        return nn.Sequential(
            nn.Conv2d(ci, co, 3, padding=1, bias=False), nn.MaxPool2d(2), bn(co), nn.GELU(),
            nn.Conv2d(co, co, 3, padding=1, bias=False), bn(co), nn.GELU(),
        )  # fmt: skip

    net = nn.Sequential(
        nn.Conv2d(3, 24, 2), nn.GELU(), group(24, widths[0]), group(widths[0], widths[1]),
        group(widths[1], widths[2]), nn.MaxPool2d(3), nn.Flatten(),
        nn.Linear(widths[2], 10, bias=False),
    ).to(memory_format=torch.channels_last)  # fmt: skip
    net[0].weight.requires_grad = False
    lr, wd = cfg.learning_rate, cfg.weight_decay
    norm = [
        p for n, p in net.named_parameters() if p.requires_grad and p.ndim == 1 and n != "0.bias"
    ]
    other = [p for p in net.parameters() if p.requires_grad and all(p is not q for q in norm)]
    opt = torch.optim.SGD(
        [dict(params=norm, lr=64 * lr, weight_decay=wd / 64), dict(params=other, lr=lr,
         weight_decay=wd)], momentum=mom, nesterov=True,
    )  # fmt: skip
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing, reduction="sum")
    mean = torch.tensor(x.reshape(-1, 3).mean(0) / 255).float().view(1, 3, 1, 1)
    std = torch.tensor(x.reshape(-1, 3).std(0) / 255).float().view(1, 3, 1, 1)
    images = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    labels = torch.from_numpy(y).long()
    B, pad = cfg.batch_size, cfg.crop_pad
    gen = torch.Generator().manual_seed(0)

    def step():
        idx = torch.randint(0, len(images), (B,), generator=gen)
        xb = (images[idx].float() / 255 - mean) / std
        flip = torch.rand(B, generator=gen) < 0.5
        xb = torch.where(flip.view(-1, 1, 1, 1), xb.flip(-1), xb)
        xp = nn.functional.pad(xb, (pad,) * 4, mode="reflect")
        dy, dx = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        xb = xp[:, :, dy : dy + 32, dx : dx + 32].contiguous(memory_format=torch.channels_last)
        loss = loss_fn(net(xb) / 9, labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def bench_torch(cfg, x, y, flush_denormal=False):
    """The airbench network, optimiser groups, loss and augmentation in PyTorch."""
    step = torch_step(cfg, x, y, flush_denormal)

    def run(n):
        t0 = time.perf_counter()
        for _ in range(n):
            step()
        return time.perf_counter() - t0

    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; median reported")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--n-train", type=int, default=4096)
    p.add_argument("--data-dir", default=None, help="real images from here (default: noise)")
    p.add_argument(
        "--torch-flush-denormal", action="store_true",
        help="PyTorch flushes denormals to zero, as XLA:CPU does by default",
    )  # fmt: skip
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch baseline")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    dev = jax.devices()[0]
    machine = dict(
        data="real: " + args.data_dir if args.data_dir else "synthetic (uniform noise)",
        torch_flush_denormal=args.torch_flush_denormal,
        backend=jax.default_backend(), device=dev.device_kind, device_count=jax.device_count(),
        cpu=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
    )  # fmt: skip
    print(f"# {machine}")
    print(f"{'model':14s} {'batch':>5s} {'gbjax':>8s} {'nnx.jit':>8s} {'ratio':>6s} "
          f"{'torch':>8s} {'ratio':>6s}   (images/s)")  # fmt: skip
    rows = []
    for name in args.models:
        cfg, shape = make_config(name, args.steps)
        x, y = images(shape, max(args.n_train, cfg.batch_size), args.data_dir)
        runners = {"gbjax": bench_gbjax(cfg, x, y), "nnx_jit": bench_nnx_jit(cfg, x, y)}
        if name in AIRBENCH and not args.no_torch:
            runners["torch"] = bench_torch(cfg, x, y, args.torch_flush_denormal)
        for run in runners.values():
            run(args.warmup)
        times = {k: [] for k in runners}
        for _ in range(args.rounds):  # interleaved, so load drift hits all alike
            for k, run in runners.items():
                times[k].append(run(args.steps))
        ips = {k: cfg.batch_size * args.steps / float(np.median(v)) for k, v in times.items()}
        row = dict(model=name, batch_size=cfg.batch_size, steps=args.steps, rounds=args.rounds,
                   **{f"{k}_images_per_sec": v for k, v in ips.items()},
                   ratio_nnx_jit=ips["gbjax"] / ips["nnx_jit"])  # fmt: skip
        if "torch" in ips:
            row["ratio_torch"] = ips["gbjax"] / ips["torch"]
        rows.append(row)
        torch_cols = (f"{ips['torch']:8.1f} {row['ratio_torch']:6.2f}" if "torch" in ips
                      else f"{'-':>8s} {'-':>6s}")  # fmt: skip
        print(f"{name:14s} {cfg.batch_size:5d} {ips['gbjax']:8.1f} {ips['nnx_jit']:8.1f} "
              f"{row['ratio_nnx_jit']:6.2f} {torch_cols}", flush=True)  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, results=rows), f, indent=2)


if __name__ == "__main__":
    main()

"""Two trainings (or attacks) at once, one core each, against one after the other on
all cores.

    python benchmarks/process_parallel.py                  # airbench fast, 6 steps x 3 rounds
    python benchmarks/process_parallel.py --variant "" --steps 3 --json out.json
    python benchmarks/process_parallel.py --data-dir ../shared/data   # CIFAR-10 images
    python benchmarks/process_parallel.py --work pgd --variant "" --batch 250 --steps 1

The main job trains two independent models (unprocessed and GB). On a CPU, XLA runs
one step's operations across the cores, and part of a step (small fusions, layout
copies, BatchNorm's sums, the host's dispatch) does not scale with the cores. Two
processes each pinned to its own core (``os.sched_setaffinity`` before JAX starts)
run the two trainings without sharing any operation. Each round times, in child
processes started from the same interpreter:

* ``all cores``: one training process on every core, ``--steps`` steps;
* ``one core``: one process pinned to the first core it may use, alone on the machine;
* ``two x one core``: two processes pinned to the first two, released together once
  both have compiled and warmed up, ``--steps`` steps each.

``--work pgd`` times the main job's attack work instead: a step is PGD-10 at 1/255
(scored at every iterate, as the cascade's stages are) on two batches of ``--batch``
images, in eval mode, with the labels the network gives them clean (so that every
image is attacked; the network is freshly initialised). The two processes of ``two x
one core`` each attack the same number of images as the single process does.

Printed: images per second of each arrangement and the ratio of the two processes'
total throughput to the single all-core process's (above 1: training the two models,
or attacking two halves of the images, at once is faster than one after the other).
Rounds alternate the arrangements and the median round is reported. The children run
with tcmalloc when it is installed, as the experiments do. The figures hold for this
machine's cores and memory bandwidth only; on an accelerator the question does not
arise (one device per process).
"""

from __future__ import annotations

import argparse
import ctypes.util
import json
import os
import platform
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time
cpus = [int(c) for c in sys.argv[3].split(",")] if sys.argv[3] else None
if cpus is not None:
    os.sched_setaffinity(0, cpus)  # before JAX sizes its thread pools
import jax
from gbjax import train
from gbjax.configs import airbench_cifar10
variant, steps = sys.argv[1], int(sys.argv[2])
cfg = airbench_cifar10.get_config(variant or None)
cfg.num_train = cfg.num_test = None
if sys.argv[4]:
    cfg.batch_size = int(sys.argv[4])
n = 4 * cfg.batch_size
sys.path.insert(0, sys.argv[6])
from train_throughput import images  # CIFAR-10 from a data folder, else uniform noise
x, y = images((32, 32, 3), n, sys.argv[5] or None)
model = train.init_model(cfg, x, 10)
if sys.argv[7] == "pgd":  # the cascade's attack work: PGD-10, scored at every iterate
    import numpy as np
    from gbjax import attacks, evaluate
    model.eval()
    x01 = x[: 2 * cfg.batch_size].astype(np.float32) / 255.0
    y = np.asarray(evaluate.predict(model, x01))  # every image attacked
    def step(_):
        return attacks.accuracy_under_attack(model, x01, y, eps_list=[1 / 255], attack="pgd",
                                             steps=10, batch_size=cfg.batch_size,
                                             key=jax.random.key(0), progress=False)
    state, per_step = step(None), len(x01)  # compile and warm up
else:
    tr = train.Trainer(cfg, model, num_classes=10, num_train=n, total_steps=10**6)
    data, state, perm = tr.put_data(x, y), tr.init_state, tr.epoch_permutation(0)
    step, per_step = (lambda state: tr.train_step(state, data, perm)), cfg.batch_size
    for _ in range(2):  # compile and warm up
        state = step(state)
jax.block_until_ready(state)
print("ready", flush=True)
sys.stdin.readline()  # released by the parent
t0 = time.perf_counter()
for _ in range(steps):
    state = step(state)
jax.block_until_ready(state)
t1 = time.perf_counter()
print(json.dumps(dict(seconds=t1 - t0, images=steps * per_step,
                      cpus=len(os.sched_getaffinity(0)))), flush=True)
"""


def child_env() -> dict:
    env = dict(os.environ)
    lib = ctypes.util.find_library("tcmalloc_minimal")
    if lib and sys.platform.startswith("linux") and "tcmalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = f"{lib} {env.get('LD_PRELOAD', '')}".strip()
    return env


def run_together(
    variant: str,
    steps: int,
    cpu_sets: list[str],
    batch: int | None,
    data_dir: str | None,
    work: str = "train",
) -> dict:
    """Starts one child per CPU set, releases them together once all are ready, and
    returns the wall time from the release to the last finish and each child's figures."""
    here = os.path.dirname(os.path.abspath(__file__))
    extra = [str(batch or ""), data_dir or "", here, work]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, variant, str(steps), cpus, *extra],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=child_env(),
        )
        for cpus in cpu_sets
    ]
    for p in procs:
        line = p.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"child failed before its timed steps: {line!r}")
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        outs.append(json.loads(p.stdout.readline()))
        p.wait()
        if p.returncode:
            raise RuntimeError(f"child exited with {p.returncode}")
    wall = time.perf_counter() - t0
    images = sum(o["images"] for o in outs)
    return dict(wall_s=wall, images_per_sec=images / wall, children=outs)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="fast", help='airbench variant: "" (airbench94), fast')
    p.add_argument("--steps", type=int, default=6, help="timed steps per process and round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: the recipe's)")
    p.add_argument(
        "--data-dir", default=None, help="CIFAR-10 training images from here (default: noise)"
    )
    p.add_argument(
        "--work",
        choices=("train", "pgd"),
        default="train",
        help="train: training steps; pgd: PGD-10 on two batches (the attacks' work)",
    )
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    ncpu = len(os.sched_getaffinity(0))
    if ncpu < 2:
        raise SystemExit("needs at least two cores")
    first, second = (str(c) for c in sorted(os.sched_getaffinity(0))[:2])
    arrangements = {
        "all cores": [""],
        "one core": [first],
        "two x one core": [first, second],
    }
    rounds = {k: [] for k in arrangements}
    for r in range(args.rounds):
        for name, cpu_sets in arrangements.items():
            res = run_together(
                args.variant, args.steps, cpu_sets, args.batch, args.data_dir, args.work
            )
            rounds[name].append(res)
            print(f"round {r} {name}: {res['images_per_sec']:.1f} img/s", flush=True)
    med = {k: sorted(v, key=lambda d: d["images_per_sec"])[len(v) // 2] for k, v in rounds.items()}
    base = med["all cores"]["images_per_sec"]
    print(f"\n{'arrangement':<16} {'img/s':>8} {'vs all cores':>13}")
    for name, d in med.items():
        print(f"{name:<16} {d['images_per_sec']:8.1f} {d['images_per_sec'] / base:13.3f}")
    ratio = med["two x one core"]["images_per_sec"] / base
    what = "trainings" if args.work == "train" else "attack processes (PGD-10)"
    print(
        f"\ntwo {what} at once, one core each: {ratio:.2f}x "
        "the throughput of one after the other on all cores"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    variant=args.variant or "airbench94",
                    work=args.work,
                    steps=args.steps,
                    batch=args.batch,
                    data="real: " + args.data_dir if args.data_dir else "uniform noise",
                    rounds=rounds,
                    median=med,
                    ratio_two_processes=ratio,
                    machine=platform.processor() or platform.machine(),
                    cpus=ncpu,
                    date=time.strftime("%Y-%m-%dT%H:%M:%S"),
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

"""The memory allocator under XLA:CPU: gbjax's training step with glibc's malloc and
with jemalloc or tcmalloc preloaded, same run, interleaved.

    python benchmarks/allocator.py                       # airbench fast, 6 steps x 3 rounds
    python benchmarks/allocator.py --variant "" --steps 4 --json out.json

XLA:CPU allocates every intermediate buffer of a step with ``malloc``. glibc serves
blocks above its mmap threshold with fresh ``mmap`` pages and returns them on ``free``,
so each step faults in (and the kernel zeroes) its activations again: in the quick main
job about 66,000 minor page faults a second and 12% of the CPU time in the kernel.
jemalloc and tcmalloc keep freed pages for reuse; so does glibc told, through
``mallopt``, never to serve a block with ``mmap`` nor to trim its heap
(``glibc-mallopt``). Each allocator times the step in its own child process (a
preloaded one can only be chosen before the process starts, ``LD_PRELOAD``); rounds
alternate between allocators and the median round is reported, with the child's
system-time share and minor page faults. Allocators not installed
(Debian: ``libjemalloc2``, ``libtcmalloc-minimal4``) are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

LIBS = {
    "glibc": None,
    "glibc-mallopt": "mallopt",
    "jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
}

CHILD = r"""
import ctypes, json, os, resource, sys, time
if os.environ.get("BENCH_MALLOPT"):  # glibc kept from returning memory: no mmap, no trim
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-4, 0) == 1  # M_MMAP_MAX
    assert libc.mallopt(-1, 2**30) == 1  # M_TRIM_THRESHOLD
import jax, numpy as np
from gbjax import train
from gbjax.configs import airbench_cifar10
variant, steps = sys.argv[1], int(sys.argv[2])
cfg = airbench_cifar10.get_config(variant or None)
cfg.num_train = cfg.num_test = None
n = 4 * cfg.batch_size
rng = np.random.default_rng(0)
x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
y = rng.integers(0, 10, n).astype(np.int32)
model = train.init_model(cfg, x, 10)
tr = train.Trainer(cfg, model, num_classes=10, num_train=n, total_steps=10**6)
data, state, perm = tr.put_data(x, y), tr.init_state, tr.epoch_permutation(0)
for _ in range(2):  # compile and warm up
    state = tr.train_step(state, data, perm)
jax.block_until_ready(state)
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
for _ in range(steps):
    state = tr.train_step(state, data, perm)
jax.block_until_ready(state)
dt, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
user, sys_ = r1.ru_utime - r0.ru_utime, r1.ru_stime - r0.ru_stime
print(json.dumps(dict(images_per_sec=steps * cfg.batch_size / dt, step_s=dt / steps,
                      sys_share=sys_ / max(user + sys_, 1e-9),
                      minflt_per_step=(r1.ru_minflt - r0.ru_minflt) / steps)))
"""


def run_child(lib, variant, steps):
    env = dict(os.environ)
    if lib == "mallopt":
        env["BENCH_MALLOPT"] = "1"
    elif lib:
        env["LD_PRELOAD"] = lib
    out = subprocess.run(
        [sys.executable, "-c", CHILD, variant, str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", default="fast", help='airbench variant: "" (airbench94), fast')
    p.add_argument("--steps", type=int, default=6, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds")
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    libs = {k: v for k, v in LIBS.items() if v in (None, "mallopt") or os.path.exists(v)}
    rounds = {k: [] for k in libs}
    for r in range(args.rounds):
        for name, lib in libs.items():
            rounds[name].append(run_child(lib, args.variant, args.steps))
            print(f"round {r} {name}: {rounds[name][-1]['images_per_sec']:.1f} img/s", flush=True)
    rows = {}
    for name, rs in rounds.items():
        med = sorted(rs, key=lambda d: d["images_per_sec"])[len(rs) // 2]
        rows[name] = med
    base = rows["glibc"]["images_per_sec"]
    print(f"\n{'allocator':<10} {'img/s':>8} {'ratio':>6} {'sys %':>6} {'minflt/step':>12}")
    for name, d in rows.items():
        print(
            f"{name:<10} {d['images_per_sec']:8.1f} {d['images_per_sec'] / base:6.3f} "
            f"{100 * d['sys_share']:6.1f} {d['minflt_per_step']:12.0f}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                dict(
                    variant=args.variant or "airbench94",
                    steps=args.steps,
                    rounds=rounds,
                    median=rows,
                    machine=platform.processor() or platform.machine(),
                    cpus=os.cpu_count(),
                    date=time.strftime("%Y-%m-%dT%H:%M:%S"),
                ),
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

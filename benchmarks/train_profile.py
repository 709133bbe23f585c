"""Where the airbench training step's time goes, op group by op group, gbjax beside PyTorch.

    python benchmarks/train_profile.py --json train_profile.json        # ~4 min on 2 cores
    python benchmarks/train_profile.py --models airbench_fast --steps 2 --no-torch

For each model (synthetic CIFAR-shaped uint8 data, the batch of its config):

* ``gbjax``: :class:`gbjax.train.Trainer`'s step is timed (median of ``--steps``
  steps), then ``--steps`` steps run under ``jax.profiler``. Each XLA:CPU
  operation of the trace is put in a group by what its fused computation does
  (its optimised HLO): layout transposes, matrix products (BatchNorm's channel
  sums, the head), GELU (``erf``/``exp``), reductions (max-pool, loss), and the
  other elementwise work (BatchNorm's normalisation, optimiser, lookahead,
  augmentation). XLA:CPU runs convolutions asynchronously on Eigen's threads, so
  they do not appear in the trace: their group is the step's time minus the
  rest, and the convolutions are also timed alone (forward, input gradient and
  weight gradient of every conv layer's shape, same compiler options).
* ``torch`` (needs ``pip install 'gbjax[bench]'``): the step of
  ``train_throughput.py``'s PyTorch reference under ``torch.profiler``, its
  operators' self times put in the same groups.

Prints a table per model (ms per step and share) and the ratio of the step
times; ``--json`` writes the figures.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import platform
import re
import sys
import tempfile
import time

import jax
import numpy as np

from gbjax import _xla, train

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_throughput import images, make_config, torch_step  # noqa: E402

GROUPS = (
    "convolutions",
    "layout transposes",
    "matrix products (head)",
    "BatchNorm and GELU",
    "max-pool",
    "optimiser",
    "lookahead",
    "augmentation and batch",
    "zero fills",
    "other (loss, ...)",
)


def _stack_tables(text):
    """stack_frame_id -> the (file, function) names of its frames, innermost first."""
    tables, part = {}, None
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            part = tables.setdefault(line, {})
            continue
        m = re.match(r"^(\d+) (.*)$", line)
        if part is None or not m:
            continue
        part[int(m.group(1))] = m.group(2)
    names = lambda key, i: tables.get(key, {}).get(i, "").strip('"')  # noqa: E731

    def frames(fid, depth=0):
        entry = tables.get("StackFrames", {}).get(fid)
        if not entry or depth > 64:
            return []
        loc = int(re.search(r"file_location_id=(\d+)", entry).group(1))
        parent = int(re.search(r"parent_frame_id=(\d+)", entry).group(1))
        loc_entry = tables.get("FileLocations", {}).get(loc, "")
        f = int((re.search(r"file_name_id=(\d+)", loc_entry) or [0, 0])[1])
        fn = int((re.search(r"function_name_id=(\d+)", loc_entry) or [0, 0])[1])
        here = (names("FileNames", f), names("FunctionNames", fn))
        return [here] + (frames(parent, depth + 1) if parent != fid else [])

    return frames


def _hlo_index(text):
    """instruction name -> (opcode, the text of the computation it calls or its own line)."""
    comps, name = {}, None
    for line in text.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m and not line.startswith(" "):
            name = m.group(1)
            comps[name] = []
        elif name:
            comps[name].append(line)
    index = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*)$", text, re.M):
        calls = re.search(r"calls=%([\w.\-]+)", m.group(4))
        body = "\n".join(comps.get(calls.group(1), [])) if calls else m.group(0)
        index[m.group(1)] = (m.group(3), body, m.group(0))
    return index


def _group_jax(name, opcode, body, line, frames):
    """XLA fuses BatchNorm's normalisation, GELU and their gradients into the same
    loops (recomputing some values in several), so they are one group here. The
    optimiser, lookahead and augmentation are told by the source of the operation
    (the HLO's stack frames)."""
    op_name = (re.search(r'op_name="([^"]*)"', line) or [None, ""])[1]
    sid = re.search(r"stack_frame_id=(\d+)", line)
    stack = frames(int(sid.group(1))) if sid else []
    files = " ".join(f for f, _ in stack)
    funcs = " ".join(fn for _, fn in stack)
    if opcode == "convolution" or "conv_general_dilated" in name:
        return "convolutions"
    if "transpose" in name:
        return "layout transposes"
    if opcode == "dot" or "__ynn_fusion" in line:
        return "matrix products (head)"
    if "lookahead" in funcs:
        return "lookahead"
    if name.startswith("wrapped_reduce") and not stack:
        # XLA:CPU's tree rewrite of a large column sum (reduce-window, then reduce)
        # carries no source; in this step those are BatchNorm's channel sums
        return "BatchNorm and GELU"
    if "/optax/" in files and "/losses/" not in files:
        return "optimiser"
    if "augment.py" in files or "_batch" in funcs:
        return "augmentation and batch"
    if "max_pool" in funcs or op_name.endswith("reduce_max"):
        return "max-pool"
    if any(f in funcs for f in ("_bn_train", "gelu", "_phi_cdf", "BatchNorm")) or (
        any(f" {f}(" in body for f in ("erf", "exponential", "rsqrt")) and "log(" not in body
    ):
        return "BatchNorm and GELU"
    return "other (loss, ...)"


def profile_gbjax(cfg, x, y, steps):
    model = train.init_model(cfg, x, 10)
    tr = train.Trainer(cfg, model, num_classes=10, num_train=len(x), total_steps=10**6)
    state, data, perm = tr.init_state, tr.put_data(x, y), tr.epoch_permutation(0)
    text = tr.train_step.lower(state, data, perm).compile().as_text()  # the timed program
    for _ in range(2):
        state = tr.train_step(state, data, perm)
    jax.block_until_ready(state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state = jax.block_until_ready(tr.train_step(state, data, perm))
        times.append(time.perf_counter() - t0)
    step_ms = 1e3 * float(np.median(times))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                state = tr.train_step(state, data, perm)
            jax.block_until_ready(state)
        paths = glob.glob(os.path.join(d, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(paths[0]) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    index, frames = _hlo_index(text), _stack_tables(text)
    ms = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") != "X" or name not in index:
            continue
        opcode, body, line = index[name]
        if opcode in ("while", "conditional", "call"):
            continue
        ms[_group_jax(name, opcode, body, line, frames)] += e.get("dur", 0) / 1e3 / steps
    others = sum(v for k, v in ms.items() if k != "convolutions")
    if others > step_ms:
        # the traced steps ran slower than the timed ones (a busy machine): the
        # convolutions, timed as the rest, cannot be told
        print(
            f"warning: the traced operations other than convolutions took {others:.1f} ms a "
            f"step, more than the timed step's {step_ms:.1f} ms; the convolution group is "
            "set to 0. Run on an idle machine.",
            file=sys.stderr,
        )
    ms["convolutions"] = max(0.0, step_ms - others)
    return step_ms, dict(ms), _conv_alone(model, cfg.batch_size, x.shape[1:])


def _conv_alone(model, batch, shape):
    """ms of the network's convolutions alone: forward, input and weight gradients."""
    import jax.numpy as jnp

    dn = ("NHWC", "HWIO", "NHWC")
    rng = np.random.default_rng(0)
    h, w = shape[0] - 1, shape[1] - 1  # after the 2x2 whitening conv
    layers, c_in = [], model.whiten_kernel.shape[-1]
    for g in model.groups:
        c_out = g.conv1.kernel.shape[-1]
        layers += [(h, w, c_in, c_out), (h // 2, w // 2, c_out, c_out)]
        h, w, c_in = h // 2, w // 2, c_out
    total = dict(forward=0.0, input_gradient=0.0, weight_gradient=0.0)
    for hh, ww, ci, co in layers:
        xb = jnp.asarray(rng.standard_normal((batch, hh, ww, ci)), jnp.float32)
        k = jnp.asarray(rng.standard_normal((3, 3, ci, co)), jnp.float32)
        dy = jnp.asarray(rng.standard_normal((batch, hh, ww, co)), jnp.float32)

        def conv(a, b):
            return jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=dn)

        fns = dict(
            forward=lambda a, b, d: conv(a, b),
            input_gradient=lambda a, b, d: jax.vjp(lambda u: conv(u, b), a)[1](d)[0],
            weight_gradient=lambda a, b, d: jax.vjp(lambda u: conv(a, u), b)[1](d)[0],
        )
        for key, fn in fns.items():
            f = jax.jit(fn, compiler_options=_xla.conv_options())
            jax.block_until_ready(f(xb, k, dy))
            best = float("inf")
            for _ in range(3):
                t0 = time.perf_counter()
                jax.block_until_ready(f(xb, k, dy))
                best = min(best, time.perf_counter() - t0)
            total[key] += 1e3 * best
    return total


def _group_torch(name):
    n = name.lower()
    if "conv" in n or "mkldnn" in n:
        return "convolutions"
    if "batch_norm" in n or "gelu" in n:
        return "BatchNorm and GELU"
    if "max_pool" in n or "maxpool" in n:
        return "max-pool"
    if n == "aten::fill_":
        return "zero fills"
    if "optim" in n or "_foreach" in n or "sgd" in n:
        return "optimiser"
    if n in ("aten::index", "aten::randint", "aten::reflection_pad2d", "aten::flip", "aten::where"):
        return "augmentation and batch"
    if n in ("aten::mm", "aten::addmm", "aten::linear", "aten::matmul"):
        return "matrix products (head)"
    if n in ("aten::copy_", "aten::contiguous", "aten::clone"):
        return "layout transposes"
    return "other (loss, ...)"


def profile_torch(cfg, x, y, steps):
    import torch

    step = torch_step(cfg, x, y)
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    step_ms = 1e3 * float(np.median(times))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ms = collections.Counter()
    for ev in prof.key_averages():
        if ev.key.startswith("ProfilerStep"):
            continue
        ms[_group_torch(ev.key)] += ev.self_cpu_time_total / 1e3 / steps
    traced = sum(ms.values())
    ms = {k: v * step_ms / traced for k, v in ms.items()}  # profiler overhead scaled out
    return step_ms, ms


def flax_layers_ab(cfg, x, y, steps, rounds=3, gbjax_first=False):
    """Same-run A/B of the step: gbjax's layers (``models.BatchNorm``, ``models.gelu``)
    against flax's (``nnx.BatchNorm``, ``jax.nn.gelu``), interleaved rounds; -> img/s.
    ``gbjax_first``: build and time gbjax's first (the order can matter: run both)."""
    import contextlib

    from flax import nnx

    from gbjax.models import airbench

    @contextlib.contextmanager
    def flax_layers():
        saved = airbench.BatchNorm, airbench.gelu
        airbench.BatchNorm = nnx.BatchNorm
        airbench.gelu = lambda v: jax.nn.gelu(v, approximate=False)
        try:
            yield
        finally:
            airbench.BatchNorm, airbench.gelu = saved

    def runner():
        model = train.init_model(cfg, x, 10)
        tr = train.Trainer(cfg, model, num_classes=10, num_train=len(x), total_steps=10**6)
        box = [tr.init_state]
        data, perm = tr.put_data(x, y), tr.epoch_permutation(0)

        def run(n):
            t0 = time.perf_counter()
            for _ in range(n):
                box[0] = tr.train_step(box[0], data, perm)
            jax.block_until_ready(box[0])
            return time.perf_counter() - t0

        run(2)
        return run

    runs = {}
    if gbjax_first:
        runs["gbjax layers"] = runner()
    with flax_layers():
        runs["flax layers"] = runner()
    if not gbjax_first:
        runs["gbjax layers"] = runner()
    times = {k: [] for k in runs}
    for _ in range(rounds):
        for k, run in runs.items():
            times[k].append(run(steps))
    return {k: cfg.batch_size * steps / float(np.median(v)) for k, v in times.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["airbench94", "airbench_fast"],
                   choices=["airbench94", "airbench_fast"])  # fmt: skip
    p.add_argument("--steps", type=int, default=3, help="timed and profiled steps")
    p.add_argument("--no-torch", action="store_true")
    p.add_argument(
        "--data-dir", default=None, help="real CIFAR-10 images from here (default: noise)"
    )
    p.add_argument("--ab", action="store_true", help="also time the step with flax's layers")
    p.add_argument("--ab-gbjax-first", action="store_true", help="--ab, gbjax's step built first")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    machine = dict(
        data="real: " + args.data_dir if args.data_dir else "synthetic (uniform noise)",
        backend=jax.default_backend(), cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""),
    )  # fmt: skip
    print(f"# {machine}")
    rows = []
    for name in args.models:
        cfg, shape = make_config(name, args.steps)
        x, y = images(shape, 4 * cfg.batch_size, args.data_dir)
        j_ms, j_groups, conv = profile_gbjax(cfg, x, y, args.steps)
        row = dict(model=name, batch_size=cfg.batch_size, gbjax_step_ms=j_ms,
                   gbjax_ms=j_groups, gbjax_convolutions_alone_ms=conv)  # fmt: skip
        t_groups = {}
        if args.ab or args.ab_gbjax_first:
            ab = flax_layers_ab(cfg, x, y, args.steps, gbjax_first=args.ab_gbjax_first)
            row["layers_ab_images_per_sec"] = ab
            row["layers_ab_gbjax_first"] = args.ab_gbjax_first
            print(
                f"\n{name}: step with flax's BatchNorm and GELU {ab['flax layers']:.0f} img/s,"
                f" with gbjax's {ab['gbjax layers']:.0f} img/s"
                f" ({ab['gbjax layers'] / ab['flax layers']:.2f}x; same run, interleaved)"
            )
        if not args.no_torch:
            t_ms, t_groups = profile_torch(cfg, x, y, args.steps)
            row.update(torch_step_ms=t_ms, torch_ms=t_groups, ratio_torch=t_ms / j_ms)
        rows.append(row)
        print(f"\n{name}, batch {cfg.batch_size}: ms per step (share)")
        print(f"  {'group':34s} {'gbjax':>16s} {'torch':>16s}")
        for g in GROUPS:
            a = j_groups.get(g, 0.0)
            b = t_groups.get(g) if t_groups else None
            tb = f"{b:8.1f} ({b / row['torch_step_ms']:5.1%})" if b is not None else f"{'-':>16s}"
            print(f"  {g:34s} {a:8.1f} ({a / j_ms:5.1%}) {tb}")
        tt = f"{row['torch_step_ms']:8.1f}" if t_groups else f"{'-':>8s}"
        print(f"  {'step':34s} {j_ms:8.1f}          {tt}")
        print(f"  convolutions alone (gbjax): forward {conv['forward']:.0f}, input gradient"
              f" {conv['input_gradient']:.0f}, weight gradient {conv['weight_gradient']:.0f} ms"
              f" (sum {sum(conv.values()):.0f})")  # fmt: skip
        if t_groups:
            print(f"  gbjax / torch speed: {row['ratio_torch']:.2f}x "
                  f"({cfg.batch_size / j_ms * 1e3:.0f} against"
                  f" {cfg.batch_size / row['torch_step_ms'] * 1e3:.0f} img/s)")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(machine=machine, results=rows), f, indent=2)


if __name__ == "__main__":
    main()

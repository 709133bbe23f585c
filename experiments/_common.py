"""The experiment skeleton shared by every script in ``experiments/`` (not a public API).

Each experiment is ``run(argv) -> results``: :func:`start` parses the common
flags, picks the mode (``--smoke``, ``--quick`` or full) with its command-line
overrides, the seeds and the output folder, and loads the data; the script
then runs its protocol with the public gbjax API and ends with
:meth:`Run.finish`, which writes ``results.json`` (numbers, configuration,
timings, machine and commit), ``results.md`` (tables beside the papers'),
``results.csv`` and prints a summary. Plots go through :func:`plot_curves`.

Output folders: nothing is lost. Before anything is created, the flags are
checked (argparse errors, exit 2, abbreviations off; a named data folder must
exist) and so is ``--out``: a folder that already holds results, another
experiment's run, or files of the user's own is refused; one holding an
unfinished run of the same arguments (``run.json``) is continued, its finished
trainings reused (:func:`train_model`). ``--overwrite`` starts over in a folder
of this experiment, deleting only what the experiment wrote there (its results
files, the trainer's files in its checkpoint folders and the attack cascades'
saved states, ``state/*.json``). ``--merge`` never
writes into one of its inputs.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as _dt
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

SYNTHETIC_ENV = "GBJAX_SYNTHETIC_DATA"
RUN_FILE = "run.json"  # in each output folder: the experiment and its arguments
RESULT_FILES = ("results.json", "results.md", "results.csv")
STATE_DIR = "state"  # the experiments' attack-cascade states (gbjax.attacks.cascade)
SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


# ----------------------------------------------------------------------------
# the memory allocator

ALLOCATOR_ENV = "GBJAX_ALLOCATOR"  # "tcmalloc" (default, where installed) or "system"
TCMALLOC = "libtcmalloc_minimal.so.4"


def allocator_env(environ, find_library) -> dict | None:
    """The environment to re-run this process with tcmalloc preloaded, or None.

    XLA:CPU allocates every buffer of a step with ``malloc``; glibc's returns large
    blocks to the kernel on ``free``, so each training step faults its activations
    in again (12% of the quick main job's CPU time in the kernel). With tcmalloc
    preloaded the airbench ``fast`` step ran 1.10x faster in the same run
    (``benchmarks/allocator.py``, docs/methods.md 6.5). None when
    ``GBJAX_ALLOCATOR=system``, off Linux, when tcmalloc is already preloaded, or
    when it is not installed (Debian/Ubuntu: ``libtcmalloc-minimal4``).
    """
    if environ.get(ALLOCATOR_ENV, "tcmalloc") != "tcmalloc" or not sys.platform.startswith("linux"):
        return None
    preload = environ.get("LD_PRELOAD", "")
    if "tcmalloc" in preload:
        return None
    lib = find_library("tcmalloc_minimal")
    if not lib:
        return None
    return dict(environ, LD_PRELOAD=f"{lib} {preload}".strip(), **{ALLOCATOR_ENV: "tcmalloc"})


def use_fast_allocator() -> None:
    """Re-executes the experiment's process with tcmalloc preloaded when
    :func:`allocator_env` says so (call first thing under ``__main__``)."""
    import ctypes.util

    env = allocator_env(os.environ, ctypes.util.find_library)
    if env is None:
        return
    print(
        f"[gbjax] re-running with tcmalloc preloaded ({env['LD_PRELOAD']}); "
        f"{ALLOCATOR_ENV}=system keeps the system allocator",
        file=sys.stderr,
        flush=True,
    )
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def allocator() -> str:
    """The allocator this process runs with, for results.json."""
    preload = os.environ.get("LD_PRELOAD", "")
    return "tcmalloc" if "tcmalloc" in preload else (preload or "system")


# ----------------------------------------------------------------------------
# flags


class ExperimentParser(argparse.ArgumentParser):
    """argparse without abbreviations (``--smok`` is an error, not ``--smoke``) that
    also checks, before anything is created, that a named data folder exists."""

    def __init__(self, **kw):
        super().__init__(allow_abbrev=False, **kw)

    def parse_args(self, args=None, namespace=None):
        ns = super().parse_args(args, namespace)
        ns._parser = self  # for usage_error()
        if not (getattr(ns, "merge", None) or use_synthetic(ns)):
            check_data_dir(ns)
        return ns


def usage_error(args, message: str):
    """Exits like an argparse error (usage, ``error: message``, status 2)."""
    parser = getattr(args, "_parser", None)
    if parser is None:
        print(f"error: {message}", file=sys.stderr)
        raise SystemExit(2)
    parser.error(message)


def check_data_dir(args) -> None:
    """``--data-dir`` (else ``$GBJAX_DATA_DIR``), when given, must be a folder."""
    if args.data_dir is not None:
        if not os.path.isdir(args.data_dir):
            usage_error(
                args,
                f"--data-dir {args.data_dir}: no such directory (give the folder holding "
                "mnist/ and cifar10/, or --synthetic for a stand-in)",
            )
        return
    env = os.environ.get("GBJAX_DATA_DIR")
    if env and not os.path.isdir(env):
        usage_error(
            args,
            f"$GBJAX_DATA_DIR={env}: no such directory (set it to the folder holding mnist/ "
            "and cifar10/, or pass --data-dir DIR)",
        )


def base_parser(description: str) -> argparse.ArgumentParser:
    p = ExperimentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick",
        action="store_true",
        help="a CPU run of a few minutes on a subset (numbers labelled 'quick')",
    )
    mode.add_argument(
        "--smoke",
        action="store_true",
        help="tiny end-to-end check (seconds); numbers are meaningless",
    )
    p.add_argument(
        "--data-dir",
        default=None,
        help="directory holding mnist/ and cifar10/ (default: $GBJAX_DATA_DIR)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help=f"use tiny synthetic data instead of real data (also ${SYNTHETIC_ENV}=1)",
    )
    p.add_argument(
        "--seeds",
        default=None,
        help="comma-separated seeds, e.g. 0,1,2 (default: 0 for quick/smoke, 0,1,2 full)",
    )
    p.add_argument(
        "--out", default=None, help="output directory (default: results/<experiment>/<timestamp>/)"
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start over in an --out folder of this experiment that already holds results or "
        "another run (deletes only what the experiment wrote there)",
    )
    p.add_argument("--n-train", type=int, default=None, help="override: training images used")
    p.add_argument("--n-test", type=int, default=None, help="override: test images evaluated")
    p.add_argument("--epochs", type=int, default=None, help="override: training epochs")
    p.add_argument(
        "--eval-every-epochs",
        type=int,
        default=None,
        help="override: score the test set every N epochs during training (0: only at the end)",
    )
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    p.add_argument(
        "--merge",
        nargs="+",
        metavar="DIR",
        default=None,
        help="merge earlier runs (their results.json, e.g. one per seed) into one set of tables",
    )
    return p


def mode_name(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def parse_seeds(args, default: Sequence[int] | None = None) -> list[int]:
    """``--seeds``; else ``default`` (an experiment's mode may set ``"seeds"``); else
    0 for quick/smoke and 0, 1, 2 for the full mode."""
    if args.seeds:
        return [int(s) for s in str(args.seeds).replace(" ", "").split(",") if s != ""]
    if default is not None:
        return [int(s) for s in default]
    return [0] if (args.smoke or args.quick) else [0, 1, 2]


def use_synthetic(args) -> bool:
    return bool(args.synthetic or os.environ.get(SYNTHETIC_ENV, "") not in ("", "0"))


def run_identity(experiment: str, args) -> dict:
    """What makes two runs the same run: the experiment and its arguments (where
    the data and outputs live, progress bars and how the work shares the cores aside:
    a run started before ``--parallel-training`` or ``--parallel-attacks`` existed
    can be continued)."""
    skip = {"out", "overwrite", "no_progress", "data_dir", "parallel_training", "parallel_attacks"}
    kept = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in skip}
    kept["synthetic"] = use_synthetic(args)
    return json.loads(json.dumps({"experiment": experiment, "args": kept}, default=str))


def _read_json(path: pathlib.Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def check_out(experiment: str, args) -> tuple[pathlib.Path, str]:
    """The output folder and what to do with it: ``"new"``, ``"continue"`` (an
    unfinished run of the same arguments) or ``"overwrite"``. Read-only: a folder
    that may not be used is an argparse error (see the module docstring)."""
    if args.out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        args.out = os.path.join("results", experiment, stamp)
    path = pathlib.Path(args.out)
    if not path.exists():
        return path, "new"
    if not path.is_dir():
        usage_error(args, f"--out {path}: exists and is not a folder")
    prev, results = _read_json(path / RUN_FILE), _read_json(path / "results.json")
    if not isinstance(prev, dict) and not isinstance(results, dict):
        if any(path.iterdir()):
            usage_error(
                args,
                f"--out {path}: the folder is not empty and holds no experiment run ({RUN_FILE} "
                "or results.json); choose a new or empty folder (nothing there is touched)",
            )
        return path, "new"
    owner = (prev if isinstance(prev, dict) else results).get("experiment")
    if owner != experiment:
        usage_error(args, f"--out {path} holds a run of {owner!r}; choose another folder")
    if args.overwrite:
        return path, "overwrite"
    if isinstance(results, dict):
        usage_error(
            args,
            f"--out {path} already holds results (results.json); pass --overwrite to replace "
            "them (the run starts over), or choose another folder",
        )
    want, had = run_identity(experiment, args)["args"], prev.get("args", {})
    diff = sorted(k for k in set(want) | set(had) if want.get(k) != had.get(k))
    if diff:
        shown = ", ".join(
            f"--{k.replace('_', '-')} {had.get(k)!r} there, {want.get(k)!r} now" for k in diff
        )
        usage_error(
            args,
            f"--out {path} holds an unfinished run with other arguments ({shown}); rerun with "
            "its arguments to continue it, pass --overwrite to start over, or choose another "
            "folder",
        )
    return path, "continue"


def prepare_out(experiment: str, args, path: pathlib.Path, how: str) -> pathlib.Path:
    """Creates (``new``), continues or clears (``overwrite``: only what the experiment
    wrote) the output folder checked by :func:`check_out`; records ``run.json``."""
    from gbjax import _files, _workdir

    if how == "continue":
        print(f"[{experiment}] continuing the unfinished run in {path}: finished trainings reused")
    if how == "overwrite":
        ckpts = path / "checkpoints"
        for wd in sorted(ckpts.iterdir()) if ckpts.is_dir() else ():
            try:
                _workdir.clear(wd)
            except _workdir.WorkdirBusyError as e:
                usage_error(args, f"--overwrite: {e}")
            except _workdir.WorkdirError:  # not a training folder: not the experiment's
                pass
        for name in RESULT_FILES:
            (path / name).unlink(missing_ok=True)
        # gbjax.attacks.cascade states: a rerun would resume them, with the old models' flags
        for f in sorted((path / STATE_DIR).glob("*.json")):
            f.unlink()
    path.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now().isoformat(timespec="seconds")
    rec = dict(run_identity(experiment, args), argv=sys.argv, started=started)
    _files.write_atomic(path / RUN_FILE, json.dumps(rec, indent=2, default=str))
    return path


# ----------------------------------------------------------------------------
# data


def synthetic_dataset(name: str, split: str, n: int, seed: int = 0):
    """Tiny learnable stand-in: each class is a fixed smooth template plus noise.

    uint8 images of the data set's shape, int32 labels 0..9 (balanced). Only for
    tests and offline smoke runs; never reported as results.
    """
    h, w, c = SHAPES[name]
    tmpl_rng = np.random.default_rng(1234)
    coarse = tmpl_rng.uniform(0, 255, (10, 4, 4, c))
    templates = np.repeat(np.repeat(coarse, -(-h // 4), 1), -(-w // 4), 2)[:, :h, :w, :]
    rng = np.random.default_rng(zlib.crc32(f"{name}/{split}/{seed}".encode()))
    y = (np.arange(n) % 10).astype(np.int32)
    rng.shuffle(y)
    x = templates[y] + rng.normal(0, 30, (n, h, w, c))
    return np.clip(np.round(x), 0, 255).astype(np.uint8), y


def eval_indices(n_total: int, n: int, seed: int = 0) -> np.ndarray:
    """Indices of a fixed random ``n`` of ``n_total`` test images, in random order.

    Not the first ``n``: the CIFAR-10 test images (and ``random_subset``'s
    draws, which keep that order) are sorted by class, so a prefix would be one
    or two classes. In random order, every prefix (Square's first
    ``n_square``, convergence's first ``conv_n``) is a random draw too.
    """
    return np.random.default_rng(seed + 0x5EB5E7).permutation(n_total)[: min(n, n_total)]


# ----------------------------------------------------------------------------
# training


def train_model(config, workdir: pathlib.Path, train: tuple, test: tuple):
    """Trains ``config`` on the given uint8 arrays; returns (eval-mode model, metrics).

    ``workdir`` keeps the run's metrics and final checkpoint. A workdir that already
    holds this configuration's training on these data (an interrupted experiment run
    again with the same arguments) is continued, or reused when finished: its model
    and final metrics come back without training. One of another configuration is
    refused, never deleted (``--overwrite`` starts the experiment's run over)."""
    from gbjax import train as gtrain

    config.data = {"train": train, "test": test}
    try:
        return gtrain.train_and_evaluate(config, workdir)
    except gtrain.WorkdirError as e:
        raise SystemExit(
            f"error: {e}\n(For this experiment: rerun with --overwrite to start its run over, "
            "or choose another --out.)"
        ) from None


def parallel_cpu_sets(
    setting: str, n_sets: int, flag: str = "--parallel-training", *, small: bool = False
) -> list[list[int]] | None:
    """The CPU sets on which to run ``n_sets`` pieces of work at once (trainings, or
    parts of an evaluation), one process pinned to each set, or None to run them one
    after the other in this process.

    On a CPU, XLA spreads each step's operations over the cores, but part of a step
    (small fusions, layout copies, the host's dispatch) does not scale with them:
    on the 2-core development machine two trainings at once, one core each, gave
    1.18x (airbench ``fast``, batch 512) and 1.16x (airbench94) the throughput of one
    process on both cores on CIFAR-10 images (``benchmarks/process_parallel.py``,
    docs/methods.md 6.6).
    ``setting``: "auto" (at once on a CPU backend with a core for every set, on
    Linux, unless ``small``), "on" (the same, an error naming ``flag`` where it
    cannot), "off". ``small``: the work is too little to pay for the processes (smoke
    mode, or fgsm_cifar's evaluation below ``PARTS_MIN_EVAL`` images: each spawned
    process imports JAX and compiles every program again, which costs more than the
    work the second core would share)."""
    if setting == "off" or n_sets < 2 or (setting == "auto" and small):
        return None
    import jax

    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if jax.default_backend() != "cpu" or len(cpus) < n_sets:
        if setting == "on":
            raise SystemExit(
                f"error: {flag} on needs a CPU backend with at least {n_sets} "
                f"cores this process may use (backend {jax.default_backend()}, "
                f"{len(cpus) or 'unknown'} cores); use auto or off"
            )
        return None
    return [cpus[i::n_sets] for i in range(n_sets)]


def _train_pinned(config, workdir, train, test) -> dict:
    """One model's training, in a process of its own (:func:`run_at_once`)."""
    config.progress = False  # two bars from two processes would interleave
    t0 = time.perf_counter()
    _, metrics = train_model(config, workdir, train, test)
    return dict(seconds=time.perf_counter() - t0, test_accuracy=metrics.get("test_accuracy"))


def train_at_once(jobs: dict, cpu_sets: list[list[int]], progress: bool = True) -> dict:
    """Trains every job of ``jobs`` ({name: train_model's arguments}) at the same time,
    each in its own process pinned to its CPU set; returns {name: seconds it took}.

    The trainings write their workdirs as :func:`train_model` does, so the caller then
    gets each model with :func:`train_model` on the same arguments (a finished workdir
    is reused). An error in one training is raised here once the others have finished
    (they run to their end and stay checkpointed, so a rerun reuses them)."""
    if len(cpu_sets) != len(jobs):
        raise ValueError(f"{len(jobs)} jobs but {len(cpu_sets)} CPU sets")
    names = list(jobs)
    print(
        f"training {', '.join(names)} at once, one process each on CPUs "
        + " / ".join(",".join(map(str, c)) for c in cpu_sets),
        flush=True,
    )
    out = run_at_once(
        __file__,
        "_train_pinned",
        [jobs[n] for n in names],
        cpu_sets,
        progress=(lambda: sum(_logged_steps(jobs[n][1]) for n in names)) if progress else None,
        desc="training at once (logged steps)",
    )
    results = dict(zip(names, out))
    for n in names:
        acc = results[n]["test_accuracy"]
        print(f"  {n}: {results[n]['seconds']:.0f} s" + (f", test {acc:.4f}" if acc else ""))
    return {n: results[n]["seconds"] for n in names}


def _logged_steps(workdir) -> int:
    """The last step a training logged in ``workdir``'s metrics.jsonl (0 if none yet)."""
    path = pathlib.Path(workdir) / "metrics.jsonl"
    try:
        lines = path.read_text().strip().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            continue
    return 0


def load_script(path: str | os.PathLike):
    """The experiment script at ``path`` as a module (its ``if __name__ ==
    "__main__"`` part not run), registered in ``sys.modules`` under a private name."""
    import importlib.util

    path = pathlib.Path(path).resolve()
    name = f"_gbjax_script_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses and pickle look modules up by name
    spec.loader.exec_module(mod)
    return mod


def _call_pinned(cpus: list[int], script: str, func: str, args: tuple):
    """``func(*args)`` of the script ``script``, in a fresh process pinned to ``cpus``
    (set before JAX creates its CPU client and sizes its thread pool to them; numba,
    which runs the GB engine on CPU, would otherwise start a thread per machine core)."""
    os.sched_setaffinity(0, cpus)
    os.environ["NUMBA_NUM_THREADS"] = str(len(cpus))
    return getattr(load_script(script), func)(*args)


def run_at_once(
    script: str | os.PathLike,
    func: str,
    calls: Sequence[tuple],
    cpu_sets: list[list[int]],
    *,
    progress: Callable[[], int] | None = None,
    desc: str = "",
    unit: str = "step",
) -> list:
    """``func(*args)`` of the experiment script ``script`` for every ``args`` in
    ``calls``, all at once, each in a fresh (spawned) process pinned to its CPU set;
    returns their results in order. The script is loaded by its path in each process,
    so this works from a notebook and from a test as well as from the command line.

    ``progress``: a function polled every 10 s for a count of work done (a bar).
    An error in one call is raised here once the others have finished."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    if len(cpu_sets) != len(calls):
        raise ValueError(f"{len(calls)} calls but {len(cpu_sets)} CPU sets")
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs JAX
    script = str(pathlib.Path(script).resolve())
    with ProcessPoolExecutor(len(calls), mp_context=ctx, max_tasks_per_child=1) as pool:
        futures = [pool.submit(_call_pinned, c, script, func, a) for c, a in zip(cpu_sets, calls)]
        bar = None
        if progress is not None:
            from tqdm.auto import tqdm

            bar = tqdm(desc=desc, unit=unit)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=10, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                break  # the others run to their end (a pool cannot stop a running call)
            if bar is not None:
                bar.n = progress()
                bar.refresh()
        if bar is not None:
            bar.close()
        return [f.result() for f in futures]  # re-raises a call's error


# ----------------------------------------------------------------------------
# outputs


def environment() -> dict:
    import jax

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "argv": sys.argv,
        "time": _dt.datetime.now().isoformat(timespec="seconds"),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_count": os.cpu_count(),
        "allocator": allocator(),
    }
    for mod in ("jax", "jaxlib", "flax", "optax", "numpy", "orbax.checkpoint", "matplotlib"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            info[f"{mod}_version"] = getattr(m, "__version__", "?")
        except Exception:  # pragma: no cover
            info[f"{mod}_version"] = None
    try:
        info["gbjax_commit"] = (
            subprocess.run(
                ["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
            or None
        )
    except Exception:  # pragma: no cover
        info["gbjax_commit"] = None
    return info


def write_json(path: pathlib.Path, obj) -> None:
    def default(o):
        if isinstance(o, (np.integer,)):
            return int(o)
        if isinstance(o, (np.floating,)):
            return float(o)
        if isinstance(o, np.ndarray):
            return o.tolist()
        return str(o)

    path.write_text(json.dumps(obj, indent=2, default=default))


def write_csv(path: pathlib.Path, rows: Sequence[dict]) -> None:
    keys: list[str] = []
    for r in rows:
        for k in r:
            if k not in keys:
                keys.append(k)
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=keys)
        wr.writeheader()
        wr.writerows(rows)


def mean_std(values: Iterable[float]) -> tuple[float, float]:
    v = np.asarray(list(values), np.float64)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def pct(values: Iterable[float]) -> str:
    """Accuracies in [0,1] -> 'mm.mm' or 'mm.mm ± s.ss' (percent)."""
    v = [float(x) for x in values]
    if not v:
        return "-"
    m, s = mean_std(v)
    return f"{100 * m:.2f}" if len(v) == 1 else f"{100 * m:.2f} ± {100 * s:.2f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [
        "| " + " | ".join(map(str, headers)) + " |",
        "|" + "|".join("---" for _ in headers) + "|",
    ]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cols = [list(map(str, c)) for c in zip(headers, *rows)]
    widths = [max(len(s) for s in c) for c in cols]
    fmt = lambda r: "  ".join(str(s).rjust(w) for s, w in zip(r, widths))  # noqa: E731
    return "\n".join([fmt(headers), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def plot_curves(path: pathlib.Path, panels: Sequence[dict], *, title: str = "") -> None:
    """One PNG with one subplot per panel.

    Each panel: ``{"title", "xlabel", "ylabel", "x", "curves": {label: (mean, std)},
    "paper": {label: (xs, ys)} (optional), "xscale" (optional), "xticklabels"
    (optional), "chance" (optional)}``; accuracies in percent.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, pan in zip(axes[0], panels):
        x = np.asarray(pan["x"], np.float64)
        for label, (m, s) in pan["curves"].items():
            m, s = np.asarray(m, np.float64), np.asarray(s, np.float64)
            (line,) = ax.plot(x, m, marker="o", ms=3, label=label)
            if np.any(s > 0):
                ax.fill_between(x, m - s, m + s, alpha=0.2, color=line.get_color())
        for label, (px, py) in (pan.get("paper") or {}).items():
            ax.scatter(px, py, marker="*", s=90, zorder=5, label=label)
        if pan.get("chance") is not None:
            ax.axhline(pan["chance"], color="grey", ls=":", lw=1, label="chance")
        if pan.get("xscale") == "symlog":
            ax.set_xscale("symlog", linthresh=pan.get("linthresh", 1e-2))
            ax.set_xlim(left=min(x))  # no empty negative half-axis
        elif pan.get("xscale"):
            ax.set_xscale(pan["xscale"])
        if pan.get("xticklabels") is not None:
            ax.set_xticks(x)
            ax.set_xticklabels(pan["xticklabels"], rotation=45, ha="right", fontsize=8)
        ax.set_xlabel(pan.get("xlabel", ""))
        ax.set_ylabel(pan.get("ylabel", "accuracy (%)"))
        ax.set_title(pan.get("title", ""), fontsize=10)
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def resnet_config(mode: dict, seed: int, progress: bool, **overrides):
    """The CIFAR ResNet recipe (``gbjax/configs/resnet18_cifar10.py``) sized by ``mode``.

    Only the final checkpoint is written; ``overrides`` set further Config fields.
    """
    from gbjax.configs import resnet18_cifar10

    cfg = resnet18_cifar10.get_config()
    cfg.model = mode["model"]
    cfg.model_kwargs = dict(mode.get("model_kwargs") or {})
    cfg.compute_dtype = mode["compute_dtype"]
    cfg.batch_size = mode["batch_size"]
    cfg.learning_rate = mode["learning_rate"]
    cfg.num_epochs = mode["epochs"]
    return _finish_config(cfg, mode, seed, progress, overrides)


def airbench_config(mode: dict, seed: int, progress: bool, **overrides):
    """The airbench recipe (``gbjax/configs/airbench_cifar10.py``): ``mode["variant"]``
    ("" = airbench94, "fast", "smoke"), with ``mode["epochs"]`` and
    ``mode["batch_size"]`` (through ``airbench_cifar10.set_batch_size``) when given."""
    from gbjax.configs import airbench_cifar10

    cfg = airbench_cifar10.get_config(mode.get("variant") or None)
    cfg.num_train = cfg.num_test = None  # the experiment passes its own data
    cfg.num_steps = None
    if mode.get("epochs") is not None:
        cfg.num_epochs = mode["epochs"]
    if mode.get("batch_size") is not None:  # the recipe's weight decay follows the batch
        airbench_cifar10.set_batch_size(cfg, mode["batch_size"])
    if mode.get("eval_every_epochs") is not None:  # 0: score the test set only at the end
        cfg.eval_every_epochs = mode["eval_every_epochs"]
    if mode.get("eval_tta") is not None:  # "none": the final score without TTA
        cfg.eval_tta = mode["eval_tta"]
    cfg.whiten_num_images = min(cfg.whiten_num_images, mode["n_train_eff"])
    return _finish_config(cfg, mode, seed, progress, overrides)


def _finish_config(cfg, mode, seed, progress, overrides):
    cfg.eval_batch_size = min(cfg.eval_batch_size, mode["n_test_eff"])
    cfg.seed = seed
    cfg.progress = progress
    cfg.checkpoint_every_steps = 10**9  # only the final checkpoint
    cfg.log_every_steps = min(cfg.log_every_steps, 25)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


class Timer:
    """Wall time since creation, plus ``base`` seconds (a merge: its runs' total)."""

    def __init__(self, base: float = 0.0):
        self.t0 = time.perf_counter()
        self.base = base
        self.marks: dict[str, float] = {}

    def mark(self, name: str, since: float | None = None) -> float:
        dt = time.perf_counter() - (since if since is not None else self.t0)
        self.marks[name] = self.marks.get(name, 0.0) + dt
        return dt

    def total(self) -> float:
        return self.base + time.perf_counter() - self.t0


LABELS = {
    "smoke": "SMOKE (meaningless, tiny)",
    "quick": "QUICK (CPU subset; not the paper's protocol size)",
    "full": "FULL",
}


@dataclasses.dataclass
class Run:
    """One experiment run: its mode, seeds, output folder, timer and data."""

    experiment: str
    mode_name: str  # "smoke" | "quick" | "full"
    mode: dict  # the mode's settings, command-line overrides applied
    seeds: list[int]
    synthetic: bool
    progress: bool
    out: pathlib.Path
    data_dir: str | None
    timer: Timer
    xtr: np.ndarray
    ytr: np.ndarray
    xte: np.ndarray
    yte: np.ndarray

    @property
    def label(self) -> str:
        return LABELS[self.mode_name] + (", SYNTHETIC DATA" if self.synthetic else "")

    def finish(
        self,
        *,
        results: dict,
        markdown: str,
        csv_rows: Sequence[dict],
        summary: str,
    ) -> dict:
        """Adds the run's common fields to ``results``, writes every output, returns it."""
        results = dict(
            experiment=self.experiment,
            mode=self.mode_name,
            synthetic=self.synthetic,
            seeds=self.seeds,
            **results,
            timings=self.timer.marks,
            runtime_seconds=self.timer.total(),
            environment=environment(),
        )
        if getattr(self, "merged_from", None):
            results["merged_from"] = self.merged_from
        write_json(self.out / "results.json", results)
        (self.out / "results.md").write_text(markdown)
        write_csv(self.out / "results.csv", csv_rows)
        print("\n" + summary + f"\n\nruntime {self.timer.total():.0f} s")
        print(f"\nwrote {self.out}/results.json, results.md, results.csv and plots")
        return results


def start_merge(experiment: str, args, dirs: Sequence[str]) -> tuple[Run, dict]:
    """A :class:`Run` (without data) and the union of the ``runs`` of earlier runs'
    ``results.json`` in ``dirs`` (one per seed, say), for re-assembling their tables.

    The runs must be of this experiment, in the same mode and configuration
    (seeds aside); a seed present twice is an error.
    """
    results = []
    for d in dirs:
        path = pathlib.Path(d) / "results.json"
        if not path.is_file():
            usage_error(args, f"--merge: no results.json in {d}")
        results.append(json.loads(path.read_text()))
    first = results[0]
    runs: dict = {}
    for d, res in zip(dirs, results):
        if res.get("experiment") != experiment:
            usage_error(args, f"--merge: {d} holds {res.get('experiment')!r}, not {experiment!r}")
        for k in ("mode", "synthetic"):
            if res.get(k) != first.get(k):
                usage_error(
                    args, f"--merge: {d} differs in {k}: {res.get(k)!r} vs {first.get(k)!r}"
                )
        if res["config"] != first["config"]:
            usage_error(args, f"--merge: {d} was run with another configuration")
        for seed, run in res["runs"].items():
            if int(seed) in runs:
                usage_error(args, f"--merge: seed {seed} appears twice")
            runs[int(seed)] = run
    if args.out is not None and any(
        pathlib.Path(args.out).resolve() == pathlib.Path(d).resolve() for d in dirs
    ):
        usage_error(
            args,
            f"--out {args.out} is one of the --merge inputs; merging into it would overwrite "
            "that run's results: choose another --out",
        )
    out, how = check_out(experiment, args)
    merged_runtime = float(sum(r.get("runtime_seconds") or 0.0 for r in results))
    timer = Timer(base=merged_runtime)
    timer.marks = {"merged_runtime": merged_runtime}
    run = Run(
        experiment=experiment, mode_name=first["mode"], mode=dict(first["config"]),
        seeds=sorted(runs), synthetic=bool(first["synthetic"]), progress=False,
        out=prepare_out(experiment, args, out, how), data_dir=None, timer=timer,
        xtr=None, ytr=None, xte=None, yte=None,
    )  # fmt: skip
    run.merged_from = [
        dict(dir=str(d), commit=res.get("environment", {}).get("gbjax_commit"),
             seeds=sorted(int(s) for s in res["runs"]), runtime_seconds=res.get("runtime_seconds"))
        for d, res in zip(dirs, results)
    ]  # fmt: skip
    return run, runs


def start(experiment: str, args, modes: dict, dataset: str, overrides: Sequence[str]) -> Run:
    """The run of ``args`` (from :func:`base_parser`): mode with the named command-line
    overrides applied, seeds, output folder, and ``mode["n_train"]`` training and
    ``mode["n_test"]`` test images of ``dataset`` (fixed random subsets; synthetic
    data when asked), their effective sizes recorded in the mode."""
    import jax

    from gbjax import data

    mname = mode_name(args)
    mode = dict(modes[mname])
    for k in overrides:
        v = getattr(args, k, None)
        if v is not None:
            mode[k] = v
    synthetic, progress = use_synthetic(args), not args.no_progress
    out, how = check_out(experiment, args)  # before anything is created
    seeds = parse_seeds(args, mode.pop("seeds", None))
    split = {}
    for name, n in (("train", mode["n_train"]), ("test", mode["n_test"])):
        if synthetic:
            split[name] = synthetic_dataset(dataset, name, n or 256)
            continue
        try:
            x, y = data.load(dataset, name, data_dir=args.data_dir, progress=progress)
        except (data.DataNotFoundError, data.CorruptDataError) as e:
            usage_error(args, f"{e}\n(pass --data-dir DIR, set $GBJAX_DATA_DIR, or --synthetic)")
        split[name] = data.random_subset(x, np.asarray(y, np.int32), n)
    mode["n_train_eff"], mode["n_test_eff"] = len(split["train"][0]), len(split["test"][0])
    out = prepare_out(experiment, args, out, how)
    print(
        f"[{experiment}] mode={mname} seeds={seeds} synthetic={synthetic} out={out} "
        f"backend={jax.default_backend()}"
    )
    return Run(
        experiment=experiment, mode_name=mname, mode=mode, seeds=seeds, synthetic=synthetic,
        progress=progress, out=out, data_dir=args.data_dir, timer=Timer(),
        xtr=split["train"][0], ytr=split["train"][1], xte=split["test"][0], yte=split["test"][1],
    )  # fmt: skip

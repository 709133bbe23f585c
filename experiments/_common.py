"""Shared helpers for the experiment scripts (not a public API).

Command-line flags common to every experiment, data loading (real data via
``gbjax.data.load`` or tiny synthetic data for tests), training through
``gbjax.train.train_and_evaluate``, batched evaluation, and the output files:
``results.json`` (numbers, config, seeds, versions, device), ``results.md``
(tables beside the paper's), ``results.csv`` and PNG plots.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np  # noqa: E402

SYNTHETIC_ENV = "GBJAX_SYNTHETIC_DATA"
SHAPES = {"mnist": (28, 28, 1), "fashion_mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


# ----------------------------------------------------------------------------
# flags


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    p.add_argument("--n-train", type=int, default=None, help="override: training images used")
    p.add_argument("--n-test", type=int, default=None, help="override: test images evaluated")
    p.add_argument("--epochs", type=int, default=None, help="override: training epochs")
    p.add_argument("--no-progress", action="store_true", help="disable progress bars")
    return p


def mode_name(args) -> str:
    return "smoke" if args.smoke else "quick" if args.quick else "full"


def parse_seeds(args) -> list[int]:
    if args.seeds:
        return [int(s) for s in str(args.seeds).replace(" ", "").split(",") if s != ""]
    return [0] if (args.smoke or args.quick) else [0, 1, 2]


def use_synthetic(args) -> bool:
    return bool(args.synthetic or os.environ.get(SYNTHETIC_ENV, "") not in ("", "0"))


def out_dir(experiment: str, out: str | None) -> pathlib.Path:
    if out is None:
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        out = os.path.join("results", experiment, stamp)
    path = pathlib.Path(out)
    path.mkdir(parents=True, exist_ok=True)
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


def load_split(
    name: str,
    split: str,
    n: int | None,
    *,
    data_dir: str | None,
    synthetic: bool,
    progress: bool = True,
):
    """(images uint8 NHWC, labels int32): ``n`` images of the split (a fixed random subset)."""
    if synthetic:
        return synthetic_dataset(name, split, n or 256)
    from gbjax import data

    x, y = data.load(name, split, data_dir=data_dir, progress=progress)
    x, y = np.asarray(x), np.asarray(y, np.int32)
    if x.ndim == 3:
        x = x[..., None]
    if n is not None and n < len(x):
        # A fixed random subset (seed 0), not the first n: some sources (the
        # image-folder CIFAR-10) are stored sorted by class.
        idx = np.sort(np.random.default_rng(0).permutation(len(x))[:n])
        x, y = x[idx], y[idx]
    return x, y


# ----------------------------------------------------------------------------
# training and evaluation


def train_model(config, workdir: pathlib.Path, train: tuple, test: tuple):
    """Trains ``config`` on the given uint8 arrays; returns (eval-mode model, metrics)."""
    import shutil

    from gbjax import train as gtrain

    if workdir.exists():  # never resume a stale run with another config
        shutil.rmtree(workdir)
    config.data = {"train": train, "test": test}
    metrics = gtrain.train_and_evaluate(config, workdir)
    model = gtrain.restore_model(workdir)
    model.eval()
    return model, metrics


_EVAL_CACHE: dict = {}


def predict(model, x: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Argmax predictions of an eval-mode nnx model on uint8 or [0,1] images."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(model)
    fn = _EVAL_CACHE.get(graphdef)
    if fn is None:
        fn = jax.jit(lambda s, xb: jnp.argmax(nnx.merge(graphdef, s)(xb), -1))
        _EVAL_CACHE[graphdef] = fn
    n = len(x)
    bs = min(batch_size, n)
    out = []
    for s in range(0, n, bs):
        xb = np.asarray(x[s : s + bs])
        m = len(xb)
        if m < bs:
            xb = np.concatenate([xb, np.repeat(xb[-1:], bs - m, 0)])
        out.append(np.asarray(fn(state, jnp.asarray(xb)))[:m])
    return np.concatenate(out)


def accuracy(model, x, y, batch_size: int = 500) -> float:
    return float(np.mean(predict(model, x, batch_size) == np.asarray(y)))


def chance_level(num_classes: int = 10) -> float:
    return 1.0 / num_classes


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
    cfg.eval_batch_size = min(1000, mode["n_test_eff"])
    cfg.seed = seed
    cfg.progress = progress
    cfg.checkpoint_every_steps = 10**9
    cfg.log_every_steps = 25
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


class Setup:
    """What every experiment's ``run`` starts from (see :func:`setup`)."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def setup(experiment: str, args, modes: dict, dataset: str, overrides: Sequence[str]):
    """Mode with command-line overrides applied, seeds, output folder, timer and data.

    Loads ``mode["n_train"]`` training and ``mode["n_test"]`` test images of
    ``dataset`` (random fixed subsets; synthetic data when asked) and records the
    effective sizes in the mode.
    """
    import jax

    mname = mode_name(args)
    mode = dict(modes[mname])
    for k in overrides:
        v = getattr(args, k, None)
        if v is not None:
            mode[k] = v
    s = Setup(
        mode_name=mname,
        mode=mode,
        seeds=parse_seeds(args),
        synthetic=use_synthetic(args),
        progress=not args.no_progress,
        out=out_dir(experiment, args.out),
        timer=Timer(),
    )
    print(
        f"[{experiment}] mode={mname} seeds={s.seeds} synthetic={s.synthetic} out={s.out} "
        f"backend={jax.default_backend()}"
    )
    s.xtr, s.ytr = load_split(
        dataset,
        "train",
        mode["n_train"],
        data_dir=args.data_dir,
        synthetic=s.synthetic,
        progress=s.progress,
    )
    s.xte, s.yte = load_split(
        dataset,
        "test",
        mode["n_test"],
        data_dir=args.data_dir,
        synthetic=s.synthetic,
        progress=s.progress,
    )
    mode["n_train_eff"], mode["n_test_eff"] = len(s.xtr), len(s.xte)
    return s


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str, since: float | None = None) -> float:
        dt = time.perf_counter() - (since if since is not None else self.t0)
        self.marks[name] = self.marks.get(name, 0.0) + dt
        return dt

    def total(self) -> float:
        return time.perf_counter() - self.t0


def write_outputs(
    out: pathlib.Path, *, results: dict, markdown: str, csv_rows: Sequence[dict], summary: str
) -> None:
    write_json(out / "results.json", results)
    (out / "results.md").write_text(markdown)
    write_csv(out / "results.csv", csv_rows)
    print("\n" + summary)
    print(f"\nwrote {out}/results.json, results.md, results.csv and plots")

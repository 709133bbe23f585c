"""Each experiment's --smoke mode end to end on tiny data, writing every output.

Synthetic stand-in data by default (fast, needs no data set); set
``GBJAX_TEST_REAL_DATA=1`` (with ``GBJAX_DATA_DIR``) to smoke-test on the real
data instead. These run the same code paths as the README commands.
"""

import csv
import importlib.util
import json
import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(f"exp_{name}", ROOT / "experiments" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _data_flags():
    data_dir = os.environ.get("GBJAX_DATA_DIR")
    if os.environ.get("GBJAX_TEST_REAL_DATA") == "1" and data_dir and os.path.isdir(data_dir):
        return ["--data-dir", data_dir]
    return ["--synthetic"]


def _check_outputs(out, experiment, results):
    for f in ("results.json", "results.md", "results.csv"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    pngs = list(out.glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    r = json.loads((out / "results.json").read_text())
    assert r["experiment"] == experiment and r["mode"] == "smoke"
    assert r["seeds"] and r["environment"]["jax_version"]
    assert "config" in r
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(0.0 <= float(row["accuracy"]) <= 1.0 for row in rows)
    md = (out / "results.md").read_text()
    assert "Protocol" in md and "paper" in md.lower()
    return r, rows, md


def test_fgsm_cifar_smoke(tmp_path):
    mod = _load("fgsm_cifar")
    out = tmp_path / "fgsm"
    res = mod.run(["--smoke", "--out", str(out), "--no-progress"] + _data_flags())
    r, rows, md = _check_outputs(out, "fgsm_cifar", res)
    run = r["runs"]["0"]
    for p in ("oblivious", "end_to_end", "bpda"):
        assert len(run["gb"]["fgsm"][p]) == 7 and len(run["gb"]["pgd"][p]) == 7
    assert len(run["unprocessed"]["fgsm"]["none"]) == 7
    assert "95.18" in md and "73.60" in md  # the paper's Table 2 beside ours
    assert (out / "acc_vs_eps.png").is_file()

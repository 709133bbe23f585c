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
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(
        f"exp_{name}", ROOT / "experiments" / f"{name}.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
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


@pytest.mark.slow
def test_fgsm_cifar_smoke(tmp_path):
    mod = _load("fgsm_cifar")
    out = tmp_path / "fgsm"
    res = mod.run(
        ["--smoke", "--out", str(out), "--no-progress", "--pgd-restarts", "2"] + _data_flags()
    )
    r, rows, md = _check_outputs(out, "fgsm_cifar", res)
    assert "2 restarts" in md
    run = r["runs"]["0"]
    for p in ("oblivious", "end_to_end", "bpda"):
        assert len(run["gb"]["fgsm"][p]) == 7 and len(run["gb"]["pgd"][p]) == 8
        assert len(run["gb"]["fgsm_sub"][p]) == 8
        # eps 0 of both subset sweeps is the clean accuracy on the same images
        assert run["gb"]["pgd"][p][0] == run["gb"]["fgsm_sub"][p][0]
        # smoke's PGD subset is the whole test set: FGSM is deterministic, so both sweeps agree
        assert run["gb"]["fgsm_sub"][p][1:] == run["gb"]["fgsm"][p]
    assert len(run["unprocessed"]["fgsm"]["none"]) == 7
    assert "95.18" in md and "73.60" in md  # the paper's Table 2 beside ours
    assert (out / "acc_vs_eps.png").is_file()


@pytest.mark.slow
def test_gaussian_mnist_gb_smoke(tmp_path):
    mod = _load("gaussian_mnist_gb")
    out = tmp_path / "gauss"
    mod.run(
        ["--smoke", "--out", str(out), "--no-progress", "--stds", "0,1,5,10,640"] + _data_flags()
    )
    r, rows, md = _check_outputs(out, "gaussian_mnist_gb", None)
    acc = r["runs"]["0"]["acc"]
    for m in ("unprocessed", "gb"):
        assert set(acc[m]) == {"clip", "wrap"} and len(acc[m]["clip"]) == 5
    assert "90.39" in md and "63.08" in md  # paper Table 1 beside ours
    assert len(rows) == 2 * 2 * 5


@pytest.mark.slow
def test_pe_mnist_noise_smoke(tmp_path):
    mod = _load("pe_mnist_noise")
    out = tmp_path / "pe"
    mod.run(["--smoke", "--out", str(out), "--no-progress"] + _data_flags())
    r, rows, md = _check_outputs(out, "pe_mnist_noise", None)
    acc = r["runs"]["0"]["acc"]
    n_cases = 1 + len(mod.GAUSS) + len(mod.IMPULSE)
    for sem in ("authors", "standard"):
        for net in ("raw", "normalized", "pe"):
            assert len(acc[sem][net]) == n_cases
    assert len(rows) == 2 * 3 * n_cases
    for f in ("fig3_gaussian.png", "fig4_impulse.png", "fig5_normalized.png"):
        assert (out / f).is_file()
    assert "47.62" in md and "9.93" in md  # paper Tables 4 and 5


def test_jpeg_roundtrip_and_synthetic_data():
    pe = _load("pe_mnist_noise")
    import _common as C  # put on sys.path by the experiment module
    import numpy as np

    x, y = C.synthetic_dataset("mnist", "test", 20)
    assert x.shape == (20, 28, 28, 1) and x.dtype == np.uint8 and set(y) <= set(range(10))
    x2, _ = C.synthetic_dataset("mnist", "test", 20)
    np.testing.assert_array_equal(x, x2)  # deterministic across calls
    j = pe.jpeg_roundtrip(x, 75)
    assert j.shape == x.shape and j.dtype == np.uint8 and np.abs(j.astype(int) - x).mean() < 40


def test_plot_training_reads_evals_once_per_step(tmp_path, capsys):
    mod = _load("plot_training")
    wd = tmp_path / "run"
    wd.mkdir()
    lines = [
        {"step": 10, "epoch": 1.0, "test_accuracy": 0.9},
        {"step": 15, "epoch": 1.5, "train_loss": 0.1},  # no eval: skipped
        {"event": "resumed", "step": 10},
        {"step": 10, "epoch": 1.0, "test_accuracy": 0.9},  # redone after resume
        {"step": 20, "epoch": 2.0, "test_accuracy": 0.95},
        {"step": 30, "epoch": 3.0, "test_accuracy": 0.94},
        {"event": "summary", "step": 30, "test_accuracy": 0.94},
    ]
    (wd / "metrics.jsonl").write_text("\n".join(json.dumps(rec) for rec in lines) + "\n")
    assert mod.read_evals(wd) == [(1.0, 90.0), (2.0, 95.0), (3.0, 94.0)]
    out = tmp_path / "c.png"
    assert mod.main(["--run", f"a={wd}", "--hline", "target=98.5", "--out", str(out)]) == 0
    assert out.stat().st_size > 1000
    row = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("a ")][0].split()
    assert row[1:] == ["3", "94.00", "95.00", "2"]  # epochs, last, best, best epoch
    with pytest.raises(SystemExit):
        mod.main(["--run", "no-equals-sign", "--out", str(out)])

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

import numpy as np
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


def _without_runtime(md):
    """A report without its "Runtime:" line (a merge adds its own few seconds)."""
    return "\n".join(line for line in md.splitlines() if not line.startswith("Runtime:"))


def check_fgsm_cifar_smoke(out, eps_labels):
    """The outputs of ``fgsm_cifar.py --smoke`` in ``out``. The run itself happens in
    tests/test_notebook.py, through notebooks/robustness_cifar.ipynb, which calls the
    experiment's ``run`` with ``--smoke`` (one run serves both tests)."""
    r, rows, md = _check_outputs(out, "fgsm_cifar", None)
    run = r["runs"]["0"]
    for m, prots in (("unprocessed", ["none"]), ("gb", ["oblivious", "end_to_end", "bpda"])):
        rec = run[m]
        assert sorted(rec["fgsm"]) == sorted(prots)
        assert rec["n_fgsm"] == 32 < r["config"]["n_test_eff"]  # clean on all, FGSM on a subset
        assert {row["n"] for row in rows if row["model"] == m and row["kind"] == "fgsm"} == {"32"}
        assert all(len(v) == 7 for v in rec["fgsm"].values())
        # the cascade only ever removes images, and the worst case is its last stage
        acc = np.asarray([s["accuracy"] for s in rec["stages"]])
        assert np.all(np.diff(acc, axis=0) <= 1e-12)
        np.testing.assert_allclose(acc[-1], rec["worst_case"])
        # the worst case is at most each single attack on the same images, e.g. FGSM
        assert np.all(np.asarray(rec["worst_case"]) <= np.asarray(acc[len(prots) - 1]) + 1e-12)
        assert all(lo <= w <= hi for (lo, hi), w in zip(rec["worst_case_ci"], rec["worst_case"]))
        assert len(rec["controls"]["noise"]) == 7 and sorted(
            rec["controls"]["large_eps"]
        ) == sorted(prots)
        cv = rec["convergence"]
        assert len(cv["pgd"]) == len(cv["steps"]) and len(cv["pgd_restarts"]) == len(cv["restarts"])
        assert np.all(np.diff(cv["pgd_restarts"]) <= 1e-12)  # more restarts never help the model
    # smoke mode trains and evaluates in this process under auto (the parallel paths:
    # test_fgsm_cifar_in_parts_agrees_with_one_process)
    for m in ("unprocessed", "gb"):
        assert run[m]["train_metrics"]["trained_at_once"] is False
        assert run[m]["train_metrics"]["train_seconds"] > 0
        assert "n_parts" not in run[m]
    assert "train_at_once" not in r["timings"] and "evaluate_at_once" not in r["timings"]
    assert (out / "state" / "gb_seed0.json").is_file()
    assert not (out / "state" / "gb_seed0_part2of2.json").exists()
    stages = [s["stage"] for s in run["gb"]["stages"]]
    assert any(s.startswith("transfer PGD") for s in stages) and stages[-1].startswith("Square")
    assert len(run["gb"]["saturation"]["fgsm_bpda"]) == 7
    s = r["summary"]
    assert set(s["clean_accuracy"]) == {"unprocessed", "gb"}
    assert all(0 <= v <= 1 for v in s["clean_accuracy"].values())
    assert set(s["worst_case"]["gb"]) == set(eps_labels)
    assert "95.18" in md and "73.60" in md  # the paper's Table 2 beside ours
    assert (out / "acc_vs_eps.png").is_file() and (out / "convergence.png").is_file()
    # --merge re-assembles the tables from results.json, running nothing
    merged = out.parent / (out.name + "_merged")
    _load("fgsm_cifar").run(["--merge", str(out), "--out", str(merged), "--no-progress"])
    m = json.loads((merged / "results.json").read_text())
    assert m["runs"] == r["runs"] and m["config"] == r["config"]
    assert _without_runtime((merged / "results.md").read_text()) == _without_runtime(md)
    return r


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
    merged = mod.run(["--merge", str(out), "--out", str(tmp_path / "m")])
    assert merged["runs"]["0"]["acc"] == acc and merged["config"]["stds"] == r["config"]["stds"]


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
    assert r["config"]["protocol"] == "ours" and r["config"]["jpeg_quality"] == 0


@pytest.mark.slow
def test_pe_mnist_noise_authors_protocol_per_seed_runs_merge(tmp_path, capsys):
    mod = _load("pe_mnist_noise")
    for seed in (0, 1):
        mod.run(["--smoke", "--protocol", "authors", "--seeds", str(seed), "--no-progress",
                 "--out", str(tmp_path / f"s{seed}")] + _data_flags())  # fmt: skip
    one = json.loads((tmp_path / "s0" / "results.json").read_text())
    assert one["config"]["protocol"] == "authors" and one["config"]["jpeg_quality"] == 75
    merged = mod.run(["--merge", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out",
                      str(tmp_path / "m")])  # fmt: skip
    assert merged["seeds"] == [0, 1] and sorted(merged["runs"]) == ["0", "1"]
    assert [m["seeds"] for m in merged["merged_from"]] == [[0], [1]]
    # a merge's runtime is its runs' total, not the seconds the merge took
    parts = [m["runtime_seconds"] for m in merged["merged_from"]]
    assert all(p > 0 for p in parts)
    assert sum(parts) <= merged["runtime_seconds"] < sum(parts) + 60
    md = (tmp_path / "m" / "results.md").read_text()
    assert "±" in md and "authors protocol" in md
    # the merged cells are the per-seed numbers, averaged
    a0 = one["runs"]["0"]["acc"]["authors"]["pe"]["clean:None"]
    a1 = json.loads((tmp_path / "s1" / "results.json").read_text())["runs"]["1"]["acc"]
    assert (
        merged["runs"]["1"]["acc"]["authors"]["pe"]["clean:None"]
        == a1["authors"]["pe"]["clean:None"]
    )
    assert merged["runs"]["0"]["acc"]["authors"]["pe"]["clean:None"] == a0
    with pytest.raises(SystemExit) as e:
        mod.run(
            ["--merge", str(tmp_path / "s0"), str(tmp_path / "s0"), "--out", str(tmp_path / "x")]
        )
    assert e.value.code == 2 and "seed 0 appears twice" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


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


@pytest.mark.slow
def test_noise_cifar_smoke(tmp_path):
    mod = _load("noise_cifar")
    out = tmp_path / "noise"
    mod.run(["--smoke", "--out", str(out), "--no-progress"] + _data_flags())
    r, rows, md = _check_outputs(out, "noise_cifar", None)
    acc = r["runs"]["0"]["acc"]
    names = set(mod.defences()) | {"Gaussian augmentation"}
    assert set(acc) == names
    cases = {f"{k}:{s}" for k in mod.KINDS for s in mod.SEVERITIES}
    cases |= {f"paper gaussian:{s}" for s in mod.PAPER_STDS} | {"clean"}
    assert all(set(a) == cases for a in acc.values())
    att = r["runs"]["0"]["attacks"]
    # BPDA for every defence, and end to end as well where the defence is differentiable
    assert set(att) == set(mod.MODES["smoke"]["attack_defences"])
    assert att["none"]["protocol"] == "none" and att["JPEG 75"]["protocol"] == "end_to_end+bpda"
    for a in att.values():
        # the cascade only ever removes images, and the worst case is its last stage
        acc_se = np.asarray([s["accuracy"] for s in a["stages"]])
        n_prot = len(a["protocol"].split("+"))
        n_stages = len(mod.MODES["smoke"]["attacks"]) * n_prot + 1
        assert acc_se.shape == (n_stages, len(mod.ATTACK_EPS))
        assert np.all(np.diff(acc_se, axis=0) <= 1e-12)
        np.testing.assert_allclose(acc_se[-1], a["worst_case"])
    # each defence's attack time is recorded, and they add up to at most the stage's
    secs = [a["seconds"] for a in att.values()]
    assert all(t > 0 for t in secs) and sum(secs) <= r["timings"]["attacks"] + 1e-6
    assert len(rows) == len(names) * len(cases)
    assert "77.8" in md  # the RobustBench anchor beside ours
    assert (out / "acc_vs_severity.png").is_file() and (out / "defences_grid.png").is_file()


# ---------------------------------------------------------------- nothing lost (issue 26)

EXPERIMENTS = ("gaussian_mnist_gb", "pe_mnist_noise", "noise_cifar", "fgsm_cifar", "adaptive_cifar")


def _common():
    _load("gaussian_mnist_gb")
    import _common as C  # put on sys.path by the experiment module

    return C


def _exit_code(fn, *args):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    return e.value.code


def _snapshot(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_abbreviated_flags_are_argparse_errors(name, capsys):
    mod = _load(name)
    assert _exit_code(mod.parse_args, ["--smok", "--synthetic"]) == 2
    assert "unrecognized arguments: --smok" in capsys.readouterr().err
    assert _exit_code(mod.parse_args, ["--smoke", "--synth"]) == 2


def test_plot_training_flags_are_not_abbreviated():
    assert _exit_code(_load("plot_training").main, ["--ru", "a=b", "--out", "x.png"]) == 2


def test_missing_data_dir_is_reported_before_anything_is_created(tmp_path, monkeypatch, capsys):
    from gbjax import data

    def no_load(*a, **k):  # never reached: no download is tried
        raise AssertionError("data.load called")

    monkeypatch.setattr(data, "load", no_load)
    mod, out = _load("gaussian_mnist_gb"), tmp_path / "out"
    missing = str(tmp_path / "no-such-dir")
    assert _exit_code(mod.run, ["--smoke", "--data-dir", missing, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"--data-dir {missing}: no such directory" in err and "usage:" in err
    monkeypatch.setenv("GBJAX_DATA_DIR", missing)
    assert _exit_code(mod.run, ["--smoke", "--out", str(out)]) == 2
    assert f"$GBJAX_DATA_DIR={missing}: no such directory" in capsys.readouterr().err
    assert not out.exists()

    # a folder without the data set: the loader's report, still before any output
    def not_found(*a, **k):
        raise data.DataNotFoundError("Could not find the 'mnist' data set")

    monkeypatch.setattr(data, "load", not_found)
    monkeypatch.setenv("GBJAX_DATA_DIR", str(tmp_path))
    assert _exit_code(mod.run, ["--smoke", "--out", str(out)]) == 2
    assert "Could not find the 'mnist' data set" in capsys.readouterr().err
    assert not out.exists()


def _fake_results(path, experiment="gaussian_mnist_gb"):
    path.mkdir(parents=True, exist_ok=True)
    res = dict(experiment=experiment, mode="smoke", synthetic=True, seeds=[0],
               config={"stds": [0.0]}, runs={"0": {"acc": {}}}, runtime_seconds=1.0)  # fmt: skip
    (path / "results.json").write_text(json.dumps(res))
    (path / "results.md").write_text("# my results\n")
    return path


def test_existing_results_are_never_overwritten(tmp_path, capsys):
    mod = _load("gaussian_mnist_gb")
    out = _fake_results(tmp_path / "out")
    before = _snapshot(out)
    assert _exit_code(mod.run, ["--smoke", "--synthetic", "--out", str(out)]) == 2
    assert "already holds results" in capsys.readouterr().err
    # another experiment's folder, or a folder of the user's, is refused even with --overwrite
    other = _fake_results(tmp_path / "other", experiment="pe_mnist_noise")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    for path in (other, mine):
        argv = ["--smoke", "--synthetic", "--overwrite", "--out", str(path)]
        assert _exit_code(mod.run, argv) == 2
    assert _snapshot(out) == before and (mine / "thesis.tex").read_text() == "x"
    assert "pe_mnist_noise" in json.loads((other / "results.json").read_text())["experiment"]


def test_merge_never_writes_into_its_inputs(tmp_path, capsys):
    mod = _load("gaussian_mnist_gb")
    src = _fake_results(tmp_path / "s0")
    before = _snapshot(src)
    for extra in ([], ["--overwrite"]):
        argv = ["--merge", str(src), "--out", str(tmp_path / "s0" / ".." / "s0")] + extra
        assert _exit_code(mod.run, argv) == 2
        assert "one of the --merge inputs" in capsys.readouterr().err
    assert _snapshot(src) == before


def test_output_folder_is_continued_or_overwritten_only_as_asked(tmp_path, capsys):
    C, mod = _common(), _load("gaussian_mnist_gb")
    out = tmp_path / "out"

    def start(*extra):
        args = mod.parse_args(["--smoke", "--synthetic", "--out", str(out), *extra])
        return C.start(mod.EXPERIMENT, args, mod.MODES, "mnist", ("n_train", "n_test"))

    start()
    run = json.loads((out / C.RUN_FILE).read_text())
    assert run["experiment"] == mod.EXPERIMENT and run["args"]["smoke"] is True
    # a trainer's workdir of this run, holding a file of the user's too
    wd = out / "checkpoints" / "gb_seed0"
    (wd / "checkpoints" / "8").mkdir(parents=True)
    (wd / "config.json").write_text(json.dumps({"model": "airbench", "input_shape": [28, 28, 1]}))
    (wd / "metrics.jsonl").write_text("{}\n")
    (wd / "mine.txt").write_text("keep")
    (out / "notes.txt").write_text("keep")
    assert start().out == out  # the same arguments: the unfinished run is continued
    assert "continuing the unfinished run" in capsys.readouterr().out
    assert (wd / "checkpoints").is_dir()
    assert _exit_code(start, "--seeds", "1") == 2  # other arguments: refused
    assert "--seeds None there, '1' now" in capsys.readouterr().err
    (out / "results.json").write_text(json.dumps({"experiment": mod.EXPERIMENT}))
    assert _exit_code(start) == 2  # finished: refused without --overwrite
    start("--overwrite", "--seeds", "1")
    assert not (out / "results.json").exists()
    assert not (wd / "checkpoints").exists() and not (wd / "config.json").exists()
    assert (wd / "mine.txt").read_text() == "keep" and (out / "notes.txt").read_text() == "keep"
    assert json.loads((out / C.RUN_FILE).read_text())["args"]["seeds"] == "1"


def test_train_model_reuses_its_run_and_deletes_nothing(tmp_path, capsys):
    from test_train import DATA, tiny

    C = _common()
    wd = tmp_path / "checkpoints" / "net_seed0"
    wd.mkdir(parents=True)
    (wd / "keep.txt").write_text("mine")  # a file of the user's: never deleted
    cfg = lambda **kw: tiny(num_steps=4, **kw)  # noqa: E731
    model, m = C.train_model(cfg(), wd, DATA["train"], DATA["test"])
    assert m["step"] == 4 and (wd / "keep.txt").read_text() == "mine"
    capsys.readouterr()
    # the same configuration again (an interrupted experiment rerun): reused, not retrained
    _, again = C.train_model(cfg(), wd, DATA["train"], DATA["test"])
    assert again == m and "nothing to train" in capsys.readouterr().err
    # another configuration: refused, nothing deleted
    before = _snapshot(wd)
    with pytest.raises(SystemExit, match="(?s)seed.*--overwrite"):
        C.train_model(cfg(seed=1), wd, DATA["train"], DATA["test"])
    assert _snapshot(wd) == before


# ---------------------------------------------------------------- attacks built against GB


@pytest.mark.slow
def test_adaptive_cifar_at_specs():
    """``--at`` entries name the models apart, and bad entries are refused."""
    mod = _load("adaptive_cifar")
    specs = mod._at_list("2, 8:pgd3,4:fgsm-rs,2:gb,8:gb:pgd2")
    names = ["at_2", "at_8_pgd3", "at_4_fgsm-rs", "at_2_gb", "at_8_pgd2_gb"]
    assert [mod.at_name(s) for s in specs] == names
    assert mod.at_name(specs[1], 4) == "at_8_4ep_pgd3" and specs[1]["steps"] == 3
    assert [bool(s.get("gb")) for s in specs] == [False, False, False, True, True]
    assert [mod.F.behind_gb(n) for n in ["gb", "unprocessed"] + names] == [True, False] + [
        False, False, False, True, True,
    ]  # fmt: skip
    args = mod.parse_args(["--at", "2:gb", "--threshold", "10"])
    adv = mod.model_specs(mod.MODES["quick"], args)["at_2_gb"][0]
    assert adv["gb"] == dict(threshold=10.0, purity=0.9)
    for bad in ("0", "2:pgdx", "2:madry", "x", "2:pgd3:fgsm-rs"):
        with pytest.raises(ValueError):
            mod._at_list(bad)


def test_adaptive_cifar_models_per_mode():
    """The quick mode trains one adversarial model (2/255), the default two; ``--at``
    overrides both; adversarial trainings score the test set every epoch (catastrophic
    overfitting shows) even where the main job's mode scores it only at the end."""
    mod = _load("adaptive_cifar")
    quick, full = mod.MODES["quick"], mod.MODES["full"]
    assert list(mod.model_specs(quick, mod.parse_args(["--quick"]))) == [
        "unprocessed",
        "gb",
        "at_2",
    ]
    assert list(mod.model_specs(full, mod.parse_args([])))[2:] == ["at_2", "at_8_pgd3"]
    assert list(mod.model_specs(quick, mod.parse_args(["--at", "4"])))[2:] == ["at_4"]
    args = mod.parse_args(["--quick"])
    quick, full = (dict(m, n_train_eff=50000, n_test_eff=10000) for m in (quick, full))
    for mode, epochs in ((quick, 4), (full, 9.9)):
        assert mode["eval_every_epochs"] == 0
        plain = mod.training_config(mode, args, {}, 0, False)
        assert plain.eval_every_epochs == 0 and plain.num_epochs == epochs and not plain.adversarial
        # the plain models' gradient computations: N-FGSM 2 passes a step, PGD-3 4
        for adv, passes in ((dict(eps=2 / 255), 2), (dict(eps=8 / 255, method="pgd", steps=3), 4)):
            at = mod.training_config(mode, args, adv, 0, False)
            assert at.eval_every_epochs == 1 and at.adversarial == adv
            assert at.num_epochs == pytest.approx(epochs / passes)
    at = mod.training_config(quick, mod.parse_args(["--at-epochs", "3"]), dict(eps=0.01), 0, False)
    assert at.num_epochs == 3


def test_adaptive_cifar_reuses_the_main_jobs_cascade(tmp_path, capsys):
    """``--models`` = the main job's folder: its cascade state on the same images starts
    this run's state (the group is not re-run), remembered when the run resumes; a
    state that does not match is reported and the group runs here."""
    import jax.numpy as jnp

    from gbjax import attacks

    mod = _load("adaptive_cifar")

    def logits(x):
        v = x.reshape(-1, 1) - 0.5
        return jnp.concatenate([-v, v], axis=1)

    x = np.array([0.1, 0.49, 0.9, 0.65], np.float32).reshape(4, 1, 1, 1)  # 0.49: 4/255 breaks it
    y = np.array([0, 0, 1, 1])
    stages = (attacks.Stage("FGSM", "fgsm", logits),)
    main, here = tmp_path / "main", tmp_path / "here" / "state" / "gb_seed0.json"
    attacks.cascade(stages, x, y, eps_list=(0.0,) + mod.EPS, state=main / "state" / "gb_seed0.json",
                    progress=False)  # fmt: skip
    group = attacks.Group("main job cascade", stages)
    assert mod.reuse_main_job(None, "gb", 0, here, group, x, y) is None
    assert mod.reuse_main_job(tmp_path / "nothing", "gb", 0, here, group, x, y) is None
    assert not here.exists()
    bad = mod.reuse_main_job(main, "gb", 0, here, group, x[::-1].copy(), y)
    assert bad is None and "not reused: " in capsys.readouterr().out and not here.exists()
    src = str(main / "state" / "gb_seed0.json")
    assert mod.reuse_main_job(main, "gb", 0, here, group, x, y) == src
    assert mod.reuse_main_job(main, "gb", 0, here, group, x, y) == src  # on resuming
    recorded = json.loads(here.read_text())["stages"]  # the group, done before any run here
    assert [s["stage"] for s in recorded] == ["main job cascade"]
    assert recorded[0]["removed"] == [[], [], [1], [1]]
    res = attacks.cascade([group], x, y, eps_list=mod.EPS, state=here, progress=False)
    assert res.accuracy.tolist() == [1.0, 1.0, 0.75, 0.75]


def test_adaptive_cifar_attacks_the_plain_models_before_training_at(tmp_path, monkeypatch):
    """The plain models' rows come first: they are attacked before any adversarial
    training starts (a default run's AT trainings take an hour on 2 CPU cores)."""
    mod = _load("adaptive_cifar")
    calls = []

    def get_models(r, args, xtr_gb, xte_gb, seed, names=None):
        calls.append(("get", tuple(names)))
        return {n: n for n in names}, {n: {} for n in names}

    def evaluate_models(trained, *a, only=None, **k):
        assert {"unprocessed", "gb"} <= set(trained) and set(only) <= set(trained)
        calls.append(("attack", tuple(only)))
        return {n: {} for n in only}

    monkeypatch.setattr(mod, "get_models", get_models)
    monkeypatch.setattr(mod, "evaluate_models", evaluate_models)
    monkeypatch.setattr(mod, "report", lambda r, args, runs: runs)
    flags = ["--smoke", "--out", str(tmp_path / "a"), "--no-progress"] + _data_flags()
    runs = mod.run(flags + ["--n-train", "64", "--n-test", "32"])
    plain, at = ("unprocessed", "gb"), ("at_2", "at_8")
    assert calls == [("get", plain), ("attack", plain), ("get", at), ("attack", at)]
    assert list(runs[0]) == list(plain + at)
    calls.clear()
    mod.run(["--smoke", "--skip-at", "--out", str(tmp_path / "b"), "--no-progress"]
            + _data_flags() + ["--n-train", "64", "--n-test", "32"])  # fmt: skip
    assert calls == [("get", plain), ("attack", plain)]


def test_adaptive_cifar_smoke(tmp_path):
    """The main job's cascade, then the new stages, for none and GB; every stage only
    removes images, and the state file holds them."""
    mod = _load("adaptive_cifar")
    out = tmp_path / "adaptive"
    # adversarial training itself: tests/test_adaptive.py (two smoke trainings fewer here)
    mod.run(["--smoke", "--skip-at", "--out", str(out), "--no-progress"] + _data_flags())
    r, rows, md = _check_outputs(out, "adaptive_cifar", None)
    run = r["runs"]["0"]
    assert set(run) == {"unprocessed", "gb"}
    assert (out / "worst_case_vs_eps.png").is_file()
    for name, rec in run.items():
        acc = np.asarray([s["accuracy"] for s in rec["stages"]])
        assert acc.shape[1] == len(mod.EPS)
        assert np.all(np.diff(acc, axis=0) <= 1e-12), name  # a cascade only removes
        np.testing.assert_allclose(acc[-1], rec["worst_case"])
        assert rec["stages"][0]["stage"] == "main job cascade"
        labels = [s["stage"] for s in rec["stages"]]
        assert any(s.startswith("SPSA") for s in labels) and labels[-1].startswith("Square")
        # removed images are those robust before the stage and not after it
        n = rec["n_eval"]
        kept = np.ones((len(mod.EPS), n), bool)
        for s in rec["stages"]:
            for e, rm in enumerate(s["removed"]):
                assert kept[e, rm].all()
                kept[e, rm] = False
        np.testing.assert_allclose(kept.mean(1), rec["worst_case"])
        state = json.loads((out / "state" / f"{name}_seed0.json").read_text())
        assert [s["stage"] for s in state["stages"]] == labels
    gb_labels = [s["stage"] for s in run["gb"]["stages"]]
    assert any("partition surrogate" in s for s in gb_labels)
    assert any("soft-BPDA" in s for s in gb_labels)
    assert len(run["gb"]["convergence"]["accuracy"]) == len(mod.MODES["smoke"]["conv_steps"])
    assert "Worst case" in md and "partition surrogate" in md
    # --merge re-assembles the tables from results.json, running nothing
    merged = tmp_path / "merged"
    mod.run(["--merge", str(out), "--out", str(merged), "--no-progress"])
    m = json.loads((merged / "results.json").read_text())
    assert m["runs"] == r["runs"] and m["merged_from"][0]["dir"] == str(out)
    assert _without_runtime((merged / "results.md").read_text()) == _without_runtime(md)


def test_eval_subset_is_random_not_the_class_sorted_prefix():
    """The CIFAR-10 test folders are sorted by class: the worst-case subset (and each of
    its prefixes: Square's, convergence's) must be a random draw, not the first n."""
    C = _common()
    y = np.repeat(np.arange(10), 1000)  # class-sorted, like our test set
    idx = C.eval_indices(len(y), 500)
    assert len(idx) == len(set(idx.tolist())) == 500
    assert np.array_equal(idx, C.eval_indices(len(y), 500))  # fixed
    for n in (50, 200, 500):
        assert np.bincount(y[idx[:n]], minlength=10).min() >= 1
    assert len(C.eval_indices(30, 500)) == 30


def test_main_job_scores_the_test_set_once_on_all_images():
    """Clean accuracy on all 10,000 test images, evaluated only at the end of training in
    both modes (dropping the per-epoch passes saved 18-27 s a model in the quick run)."""
    fgsm = _load("fgsm_cifar")
    common = _load("_common")
    quick = fgsm.MODES["quick"]
    assert quick["n_test"] is None and quick["n_fgsm"] == 1000
    cfg = common.airbench_config(dict(quick, n_train_eff=50000, n_test_eff=10000), 0, False)
    assert cfg.eval_every_epochs == 0
    assert cfg.eval_tta == "none"  # the quick tables score the plain model only
    # batch 512 with the recipe's weight decay per example kept (half of batch 1024's)
    ref = common.airbench_config(
        dict(quick, batch_size=None, n_train_eff=50000, n_test_eff=10000), 0, False
    )
    assert (cfg.batch_size, ref.batch_size) == (512, 1024)
    assert cfg.learning_rate == ref.learning_rate
    assert cfg.weight_decay == pytest.approx(ref.weight_decay / 2, rel=1e-12)
    for name, group in ref.param_groups.items():
        assert cfg.param_groups[name]["weight_decay"] == pytest.approx(
            group["weight_decay"] / 2, rel=1e-12
        )
    full = common.airbench_config(
        dict(fgsm.MODES["full"], n_train_eff=50000, n_test_eff=10000), 0, False
    )
    assert full.eval_every_epochs == 0  # 10 x 11 s a model in full_seed0; --eval-every-epochs 1
    assert full.eval_tta == "none"  # nor the default one's (the TTA score took ~190 s)
    args = fgsm.parse_args(["--eval-every-epochs", "1", "--synthetic"])
    assert args.eval_every_epochs == 1


def test_fast_allocator_only_where_installed_and_wanted(monkeypatch):
    """The experiments re-run themselves with tcmalloc preloaded only on Linux, where it
    is installed, not already preloaded and not turned off (GBJAX_ALLOCATOR=system)."""
    common = _load("_common")
    found = lambda name: "libtcmalloc_minimal.so.4" if name == "tcmalloc_minimal" else None  # noqa: E731
    missing = lambda name: None  # noqa: E731
    monkeypatch.setattr(common.sys, "platform", "linux")
    env = common.allocator_env({"PATH": "/bin", "LD_PRELOAD": "libfoo.so"}, found)
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4 libfoo.so" and env["PATH"] == "/bin"
    assert common.allocator_env(env, found) is None  # already preloaded: no second exec
    assert common.allocator_env({}, missing) is None
    assert common.allocator_env({"GBJAX_ALLOCATOR": "system"}, found) is None
    monkeypatch.setattr(common.sys, "platform", "darwin")
    assert common.allocator_env({}, found) is None


def test_only_the_default_mode_evaluates_in_parts_by_default():
    """--parallel-attacks auto splits the evaluation from PARTS_MIN_EVAL worst-case
    images: the default mode's 500 (parts measured 1.02x there), not the quick mode's
    100 (one process measured 1.20x faster) nor smoke's."""
    fgsm = _load("fgsm_cifar")
    sizes = {m: fgsm.MODES[m]["n_eval"] for m in ("smoke", "quick", "full")}
    assert sizes["full"] >= fgsm.PARTS_MIN_EVAL > max(sizes["quick"], sizes["smoke"])


def test_parallel_cpu_sets(monkeypatch):
    """Two models train at once, one process per set of cores, only on a CPU backend
    with a core for each (auto), refused with a message where asked for and impossible."""
    common = _load("_common")
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert common.parallel_cpu_sets("auto", 2) == [[0, 2], [1, 3]]
    assert common.parallel_cpu_sets("on", 3) == [[0, 3], [1], [2]]
    assert common.parallel_cpu_sets("off", 2) is None
    assert common.parallel_cpu_sets("auto", 1) is None  # one model: nothing to share
    assert common.parallel_cpu_sets("auto", 2, small=True) is None  # smoke: not worth it
    assert common.parallel_cpu_sets("on", 2, small=True) == [[0, 2], [1, 3]]  # as asked
    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {5}, raising=False)
    assert common.parallel_cpu_sets("auto", 2) is None
    with pytest.raises(SystemExit, match="at least 2 cores"):
        common.parallel_cpu_sets("on", 2)
    with pytest.raises(SystemExit, match="--parallel-attacks on needs"):
        common.parallel_cpu_sets("on", 2, "--parallel-attacks")
    import jax

    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert common.parallel_cpu_sets("auto", 2) is None  # one device per process there
    with pytest.raises(SystemExit, match="CPU backend"):
        common.parallel_cpu_sets("on", 2)


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two cores",
)
def test_train_at_once_leaves_finished_runs_and_reports_errors(tmp_path):
    """Each training runs in its own pinned process and leaves a finished workdir that
    train_model then restores, with the figures the process reported; a training that
    fails stops the run with its own error."""
    common = _load("fgsm_cifar").C  # importable by name in the child processes
    from gbjax.configs import airbench_cifar10

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)
    y = (np.arange(96) % 10).astype(np.int32)

    def cfg():
        c = airbench_cifar10.get_config("smoke")
        c.num_train = c.num_test = None
        c.num_steps, c.batch_size, c.eval_batch_size, c.whiten_num_images = 2, 32, 32, 64
        c.eval_tta, c.progress = "none", False
        return c

    jobs = {n: (cfg(), tmp_path / n, (x, y), (x[:64], y[:64])) for n in ("a", "b")}
    c0, c1 = sorted(os.sched_getaffinity(0))[:2]  # the cores this process may use
    seconds = common.train_at_once(jobs, [[c0], [c1]], progress=False)
    assert set(seconds) == {"a", "b"} and all(s > 0 for s in seconds.values())
    losses = {}
    for n, job in jobs.items():
        recs = [json.loads(r) for r in (tmp_path / n / "metrics.jsonl").open()]
        assert max(r.get("step", 0) for r in recs) == 2
        losses[n] = [r["train_loss"] for r in recs if "train_loss" in r]
        _, m = common.train_model(*job)  # restored, not trained again
        assert m["step"] == 2 and 0 <= m["test_accuracy"] <= 1
    assert losses["a"] and losses["a"] == losses["b"]  # one job, two cores: same numbers
    bad = dict(jobs, c=(cfg(), tmp_path / "c", (x, y[:10]), (x[:64], y[:64])))
    with pytest.raises(ValueError, match="train labels have shape"):
        common.train_at_once(bad, [[c0], [c1], [c0]], progress=False)


def test_how_trainings_share_the_cores_is_not_part_of_a_run(tmp_path, capsys):
    """An unfinished main job started before --parallel-training existed (its run.json
    lacks the flag), or with another setting of it, is continued, not refused."""
    fgsm = _load("fgsm_cifar")
    C = fgsm.C
    out = tmp_path / "out"
    argv = ["--smoke", "--synthetic", "--out", str(out)]
    ident = C.run_identity(fgsm.EXPERIMENT, fgsm.parse_args(argv))
    assert "parallel_training" not in ident["args"] and "parallel_attacks" not in ident["args"]
    out.mkdir()
    (out / C.RUN_FILE).write_text(json.dumps(ident))
    for setting in ("auto", "off", "on"):
        for flag in ("--parallel-training", "--parallel-attacks"):
            args = fgsm.parse_args([*argv, flag, setting])
            assert C.check_out(fgsm.EXPERIMENT, args) == (out, "continue")


def test_pooled_fractions_are_the_union_s_fraction():
    """Fractions of parts pool into the fraction over their union, element by element in
    lists and dicts; a value that is no fraction of its part's size is refused."""
    fgsm = _load("fgsm_cifar")
    rng = np.random.default_rng(0)
    for _ in range(20):
        ns = rng.integers(1, 60, size=rng.integers(1, 4)).tolist()
        flags = [rng.random((3, n)) < 0.6 for n in ns]
        parts = [dict(a=f.mean(1).tolist(), b={"x": float(f[0].mean())}) for f in flags]
        union = np.concatenate(flags, axis=1)
        got = fgsm._pooled(parts, ns)
        assert got["a"] == pytest.approx(union.mean(1).tolist(), abs=1e-15)
        assert got["b"]["x"] == pytest.approx(union[0].mean(), abs=1e-15)
    with pytest.raises(ValueError, match="not fractions"):
        fgsm._pooled([0.5, 0.3], [4, 4])  # 1.2 of 4 images


def test_clean_flags_are_reused_only_where_all_were_scored():
    """The main job hands its clean flags to the FGSM sweeps only when it scored every
    one of their images (all of them, or a part's share; not the quick mode's subset
    when a part's shares differ)."""
    fgsm = _load("fgsm_cifar")
    n = 10
    right = np.arange(n) % 3 == 0
    np.testing.assert_array_equal(fgsm._known(n, slice(None), right, slice(None)), right)
    where = np.arange(n)[1::2]
    got = fgsm._known(n, where, right[where], np.array([3, 9, 1]))
    np.testing.assert_array_equal(got, right[[3, 9, 1]])
    assert fgsm._known(n, where, right[where], np.array([3, 4])) is None  # 4 not scored


@pytest.mark.slow
@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two cores",
)
def test_fgsm_cifar_in_parts_agrees_with_one_process(tmp_path, monkeypatch):
    """The main job's evaluation split in two parts (every other image each) and
    joined gives what one process gives where no random draw is involved (clean
    accuracy, FGSM): the same trained models, each figure within one image (batches
    of another size may round a logit differently), the same images and stages.

    The first run trains its two models at once in two spawned, pinned processes
    (smoke mode does neither at once unless asked), so ``run_at_once`` runs end to end
    here. The parts then run one after the other in this process, their arguments and
    results through pickle as across the process boundary. Two spawned processes each
    compiled every evaluation program again: measured alone on the 2-core machine,
    53 s on both cores against 41 s in turn here (before 2cabc22), where the second
    part reuses the first's programs (since 2cabc22 the first run's too). A third run,
    of the parts' folder stopped before the join, checks that a run whose evaluation
    started in parts goes on in parts."""
    import pickle
    import shutil

    fgsm = _load("fgsm_cifar")
    at_once = []

    def in_turn(script, func, calls, cpu_sets, **_):
        at_once.append((func, cpu_sets))
        f = getattr(fgsm.C.load_script(script), func)
        return [pickle.loads(pickle.dumps(f(*pickle.loads(pickle.dumps(a))))) for a in calls]

    one, parts = tmp_path / "one", tmp_path / "parts"
    argv = ["--smoke", "--no-progress", *_data_flags()]
    r1 = fgsm.run([*argv, "--out", str(one), "--parallel-training", "on"])
    assert "train_at_once" in r1["timings"]
    for m in ("unprocessed", "gb"):
        assert r1["runs"]["0"][m]["train_metrics"]["trained_at_once"] is True
        assert r1["runs"]["0"][m]["train_metrics"]["train_seconds"] > 0
    parts.mkdir()
    shutil.copytree(one / "checkpoints", parts / "checkpoints")  # trained once
    shutil.copy(one / "run.json", parts / "run.json")
    monkeypatch.setattr(fgsm.C, "run_at_once", in_turn)
    r2 = fgsm.run([*argv, "--out", str(parts), "--parallel-attacks", "on"])
    assert [(f, len(c)) for f, c in at_once] == [("_evaluate_part", 2)]
    assert "train_at_once" not in r2["timings"]  # restored, not trained again
    assert "evaluate_at_once" in r2["timings"] and "evaluate_at_once" not in r1["timings"]
    assert "fgsm_gb_part1" in r2["timings"] and "worst_case_gb_part2" in r2["timings"]
    for m in ("unprocessed", "gb"):
        a, b = r1["runs"]["0"][m], r2["runs"]["0"][m]
        assert b["n_parts"] == 2 and "n_parts" not in a
        assert a["train_metrics"]["step"] == b["train_metrics"]["step"]  # not retrained
        assert (a["n_fgsm"], a["n_eval"], a["eval_indices"]) == (
            b["n_fgsm"], b["n_eval"], b["eval_indices"]
        )  # fmt: skip
        assert a["clean"] == pytest.approx(b["clean"], abs=1 / 48 + 1e-12)
        assert a["clean_eval"] == pytest.approx(b["clean_eval"], abs=1 / a["n_eval"] + 1e-12)
        assert sorted(a["fgsm"]) == sorted(b["fgsm"])
        for prot in a["fgsm"]:
            assert a["fgsm"][prot] == pytest.approx(b["fgsm"][prot], abs=1 / 32 + 1e-12)
        assert [s["stage"] for s in a["stages"]] == [s["stage"] for s in b["stages"]]
        assert a["convergence"]["n"] == b["convergence"]["n"]
        assert len(b["part_stage_seconds"]) == 2
        # the joined state: the whole set's, as one process writes it
        st = json.loads((parts / "state" / f"{m}_seed0.json").read_text())
        assert np.asarray(st["robust"]).shape == (7, a["n_eval"])
        assert st["plan"] == json.loads((one / "state" / f"{m}_seed0.json").read_text())["plan"]
        np.testing.assert_allclose(np.asarray(st["robust"]).mean(1), b["worst_case"])
    # Stopped after its parts, before joining them (no joined state, no results): a
    # rerun with the default --parallel-attacks auto, which would not split this
    # smoke size, goes on in parts (where a second core allows), and the parts'
    # finished cascades are reused, not attacked again.
    resumed = tmp_path / "resumed"
    shutil.copytree(parts, resumed)
    (resumed / "results.json").unlink()
    for m in ("unprocessed", "gb"):
        (resumed / "state" / f"{m}_seed0.json").unlink()
        assert (resumed / "state" / fgsm.part_state(m, 0, (0, 2))).is_file()
    at_once.clear()
    r3 = fgsm.run([*argv, "--out", str(resumed)])
    in_parts = fgsm.C.parallel_cpu_sets("auto", 2, "--parallel-attacks") is not None
    assert [(f, len(c)) for f, c in at_once] == ([("_evaluate_part", 2)] if in_parts else [])
    for m in ("unprocessed", "gb"):
        b, c = r2["runs"]["0"][m], r3["runs"]["0"][m]
        assert c.get("n_parts") == (2 if in_parts else None)
        if in_parts:
            for k in ("worst_case", "fgsm", "clean"):
                assert c[k] == b[k], k
            assert [s["removed"] for s in c["stages"]] == [s["removed"] for s in b["stages"]]

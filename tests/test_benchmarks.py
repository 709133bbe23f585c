"""Smoke tests of the benchmark scripts that have logic beyond timing."""

import importlib.util
import json
import os
import pathlib
import textwrap

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY_CONFIG = textwrap.dedent("""
    import numpy as np
    from gbjax.config import Config

    def get_config(arg=None):
      rng = np.random.default_rng(0)
      y = rng.integers(0, 10, 256).astype(np.int32)
      x = rng.integers(0, 40, (256, 8, 8, 1)).astype(np.uint8)
      x[np.arange(256), np.minimum(y, 7), :, 0] = 250   # class = bright row
      return Config(data={"train": (x, y), "test": (x[:64], y[:64])},
                    model="paper_convnet", model_kwargs=dict(kind="raw", features=8),
                    learning_rate=1e-2,
                    batch_size=32, num_epochs=3, progress=False)
""")


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny_cfg.py"
    path.write_text(TINY_CONFIG)
    return str(path)


def test_time_to_target_reports_first_hit(tiny_config, tmp_path):
    ttt = _load("time_to_target")
    out = tmp_path / "r.json"
    rc = ttt.main(
        [
            "--config",
            tiny_config,
            "--target",
            "0.0",
            "--budget-s",
            "10",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
        ]
    )
    row = json.loads(out.read_text())
    assert rc == 0 and row["reached"] and row["epoch"] == 1.0  # first eval counts
    assert 0 < row["train_time_s"] < row["elapsed_s"] <= row["total_wall_s"]
    assert row["ratio"] == pytest.approx(row["train_time_s"] / 10)


def test_time_to_target_unreached_and_bad_target(tiny_config, tmp_path):
    ttt = _load("time_to_target")
    out = tmp_path / "r.json"
    rc = ttt.main(
        [
            "--config",
            tiny_config,
            "--target",
            "1.0",
            "--set",
            "num_epochs=1",
            "--set",
            "learning_rate=1e-9",
            "--workdir",
            str(tmp_path / "w"),
            "--json",
            str(out),
        ]
    )
    assert rc == 1 and not json.loads(out.read_text())["reached"]
    with pytest.raises(SystemExit):
        ttt.main(["--config", tiny_config, "--target", "93"])


def _tiny_airbench():
    import dataclasses

    import numpy as np

    from gbjax.configs import airbench_cifar10

    cfg = airbench_cifar10.get_config("smoke")
    cfg = dataclasses.replace(cfg, batch_size=16, whiten_num_images=32, num_steps=2, progress=False)
    cfg.model_kwargs = dict(widths=(8, 8, 8))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    return cfg, x, rng.integers(0, 10, 64).astype(np.int32)


@pytest.mark.parametrize("baseline", ["bench_gbjax", "bench_nnx_jit", "bench_torch"])
def test_train_throughput_baselines_step_the_airbench_recipe(baseline):
    """Each timed loop runs (the per-group optimiser and the data pipeline included)."""
    if baseline == "bench_torch":
        pytest.importorskip("torch")  # the optional 'bench' extra
    tt = _load("train_throughput")
    cfg, x, y = _tiny_airbench()
    run = getattr(tt, baseline)(cfg, x, y)
    assert run(1) > 0 and run(2) > 0


def test_train_throughput_configures_every_model():
    """Every model of the default ``--models`` gets its config (a spec that names its
    own optimiser, as the ResNets' do, overrides the default rather than clashing)."""
    tt = _load("train_throughput")
    for name in tt.MODELS:
        cfg, shape = tt.make_config(name, 2)
        assert cfg.num_steps == 2 and len(shape) == 3
    assert tt.make_config("resnet18", 2)[0].optimizer == "sgd"
    assert tt.make_config("raw", 2)[0].optimizer == "adam"


def test_train_profile_groups_cover_the_step():
    """The groups of the gbjax step add up to its time; the head's matrix product
    and the BatchNorm/GELU loops are found in the trace."""
    tp = _load("train_profile")
    cfg, x, y = _tiny_airbench()
    step_ms, groups, conv = tp.profile_gbjax(cfg, x, y, 1)
    assert set(groups) <= set(tp.GROUPS)
    # the convolutions are the step's time less the traced groups; where the traced run
    # was slower than the timed one (the other worker busy), they are 0, with a warning
    others = sum(v for k, v in groups.items() if k != "convolutions")
    assert groups["convolutions"] == pytest.approx(max(0.0, step_ms - others), abs=1e-9)
    assert sum(groups.values()) == pytest.approx(max(step_ms, others), rel=1e-6)
    assert groups["BatchNorm and GELU"] > 0
    assert set(conv) == {"forward", "input_gradient", "weight_gradient"}
    assert all(v > 0 for v in conv.values())


def test_attack_batching_times_both_policies(tmp_path):
    """40 rows at batch <= 250: pow-2 pads to 64, near-equal to 48; both timed."""
    ab = _load("attack_batching")
    out = tmp_path / "ab.json"
    ab.main(["--model", "airbench_fast", "--rows", "40", "--steps", "1", "--repeats", "1",
             "--json", str(out)])  # fmt: skip
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["pow2_batch"], row["pow2_padded_rows"]) == (64, 24)
    assert (row["near-equal/16_batch"], row["near-equal/16_padded_rows"]) == (48, 8)
    assert row["pow2_s"] > 0 and row["near-equal/16_s"] > 0


@pytest.mark.skipif(
    not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs two cores",
)
def test_process_parallel_times_three_arrangements(tmp_path):
    """One round of the smoke network: each arrangement's children ran on the cores
    it says, and the ratio is the pinned pair's throughput over the all-core process's."""
    pp = _load("process_parallel")
    out = tmp_path / "pp.json"
    pp.main(["--variant", "smoke", "--steps", "1", "--rounds", "1", "--batch", "32",
             "--json", str(out)])  # fmt: skip
    d = json.loads(out.read_text())
    cpus = {k: [c["cpus"] for c in v[0]["children"]] for k, v in d["rounds"].items()}
    assert cpus == {"all cores": [len(os.sched_getaffinity(0))], "one core": [1],
                    "two x one core": [1, 1]}  # fmt: skip
    med = d["median"]
    assert all(m["images_per_sec"] > 0 for m in med.values())
    assert d["ratio_two_processes"] == pytest.approx(
        med["two x one core"]["images_per_sec"] / med["all cores"]["images_per_sec"]
    )
    assert med["two x one core"]["children"][0]["images"] == 32
    # the attack work: PGD-10 on two batches per process and step
    pp.main(["--variant", "smoke", "--steps", "1", "--rounds", "1", "--batch", "16",
             "--work", "pgd", "--json", str(out)])  # fmt: skip
    d = json.loads(out.read_text())
    assert d["work"] == "pgd"
    assert [c["images"] for c in d["median"]["two x one core"]["children"]] == [32, 32]


def test_evaluation_work_times_three_settings_with_equal_flags(tmp_path):
    """Randomly initialised smoke networks: every setting timed, the flags agreed (the
    script stops otherwise), and the ratios are of the times it reports."""
    ew = _load("evaluation_work")
    out = tmp_path / "ew.json"
    ew.main(["--variant", "smoke", "--n", "6", "--steps", "3", "--batch-size", "16",
             "--json", str(out)])  # fmt: skip
    d = json.loads(out.read_text())
    assert {(r["model"], r["attack"]) for r in d["rows"]} == {
        (m, a) for m in ("unprocessed", "gb (bpda)") for a in ("pgd", "apgd-ce")
    }
    for r in d["rows"]:
        assert min(r["before_s"], r["shared_s"], r["shared+compact_s"]) > 0
        assert r["speedup"] == pytest.approx(r["before_s"] / r["shared+compact_s"])


def test_train_profile_warns_where_the_traced_step_is_slower(monkeypatch, capsys):
    """A timed step shorter than its traced operations (a busy machine) sets the
    convolution group to 0 and says so, rather than give a negative time."""
    tp = _load("train_profile")
    cfg, x, y = _tiny_airbench()
    ticks = iter(range(10**9))
    # the timed steps take 1 ns each; the trace's own clock is untouched
    monkeypatch.setattr(tp.time, "perf_counter", lambda: next(ticks) * 1e-9)
    step_ms, groups, _ = tp.profile_gbjax(cfg, x, y, 1)
    monkeypatch.undo()
    assert step_ms == pytest.approx(1e-6) and groups["convolutions"] == 0.0
    assert sum(groups.values()) > step_ms
    assert "the convolution group is set to 0" in capsys.readouterr().err


def test_suite_profile_sums_durations_and_compile_seconds(tmp_path, capsys):
    """Setup, call and teardown lines add up per test; compile seconds come from the
    workers' files; a log without --durations lines is refused."""
    sp = _load("suite_profile")
    log = tmp_path / "suite.txt"
    log.write_text(
        "....\n== slowest durations ==\n"
        "3.00s call     tests/test_a.py::test_x\n"
        "0.50s setup    tests/test_a.py::test_x\n"
        "1.50s call     tests/test_b.py::test_y[1]\n"
        "8 passed in 3.1s\n"
    )
    prof = tmp_path / "prof"
    prof.mkdir()
    key, lower = sp.COMPILE, sp.LOWER[0]
    (prof / "compile_gw0.json").write_text(
        json.dumps(
            dict(
                worker="gw0",
                events={"tests/test_a.py::test_x": {key: 2.0}},
                programs={"tests/test_a.py::test_x": {"jit(step)": [1.5, 2], "jit(f)": [0.5, 1]}},
                spans={"tests/test_a.py::test_x": [100.0, 103.5]},
            )
        )
    )
    (prof / "compile_gw1.json").write_text(
        json.dumps(
            dict(
                worker="gw1",
                events={"tests/test_b.py::test_y[1]": {key: 0.5, lower: 0.25, "/other": 9.0}},
                programs={"tests/test_b.py::test_y[1]": {"jit(step)": [0.5, 1]}},
                spans={"tests/test_b.py::test_y[1]": [100.5, 102.0]},
            )
        )
    )
    got = sp.main([str(prof), str(log)])
    assert got == dict(tests=2, seconds=5.0, compile_seconds=2.5, lower_seconds=0.25)
    out = capsys.readouterr().out
    assert "XLA compilation 2.5 s (50%)" in out
    # programs summed over tests: jit(step) 2.0 s in 3 compilations by 2 tests, first
    programs = out[out.index("program\n") :].splitlines()[1:3]
    assert programs[0].split() == ["2.0", "3", "2", "jit(step)"]
    assert programs[1].split() == ["0.5", "1", "1", "jit(f)"]
    # gw1 ended 1.5 s before gw0: its idle tail
    assert "3.5 s from the first test's start" in out
    assert out.splitlines()[-1].split() == ["gw1", "1", "1.5", "2.0", "1.5"]
    log.write_text("8 passed in 3.1s\n")
    with pytest.raises(SystemExit, match="durations"):
        sp.main([str(prof), str(log)])

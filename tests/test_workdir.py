"""Training workdirs: nothing lost, nothing silently wrong (issue 26).

A workdir remembers the configuration that made it, refuses another one without
changing anything, starts over only when asked, says when there is nothing to
train, verifies its checkpoints and admits one writer at a time.
"""

import fcntl
import hashlib
import json
import pathlib
import shutil

import jax
import numpy as np
import pytest
from flax import nnx
from test_train import DATA, read_jsonl, synthetic, tiny

from gbjax import _workdir, train

SHORT = dict(num_steps=8, checkpoint_every_steps=4)


def snapshot(path: pathlib.Path) -> dict:
    """Every file under ``path`` (names and contents)."""
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def params(model):
    return jax.tree.map(np.asarray, nnx.state(model))


def assert_same_params(a, b):
    jax.tree.map(np.testing.assert_array_equal, params(a), params(b))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished 8-step run (checkpoints at steps 4 and 8) and its metrics."""
    wd = tmp_path_factory.mktemp("done") / "wd"
    model, metrics = train.train_and_evaluate(tiny(**SHORT), wd)
    return wd, model, metrics


@pytest.fixture
def wd(done_run, tmp_path):
    """A private copy of the finished run's workdir."""
    dst = tmp_path / "wd"
    shutil.copytree(done_run[0], dst)
    return dst


# ------------------------------------------------------------------ config


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(learning_rate=1e-2), "learning_rate"),
        (dict(seed=3), "seed"),
        (dict(num_train=320), "num_train"),
        (dict(model_kwargs=dict(kind="raw", features=16)), "model_kwargs"),
        (dict(model="resnet", model_kwargs=dict(stage_sizes=(1,), widths=(4,))), "model"),
        (dict(data={"train": synthetic(384, 7), "test": DATA["test"]}), "data_fingerprint"),
        (dict(augment="translate"), "augment"),
    ],
)
def test_other_config_is_refused_and_nothing_changes(wd, done_run, change, field):
    before = snapshot(wd)
    with pytest.raises(train.WorkdirMismatchError, match=rf"(?s)another configuration.*{field}"):
        train.train_and_evaluate(tiny(**SHORT, **change), wd)
    assert snapshot(wd) == before
    # the workdir still restores the run that made it
    assert_same_params(train.restore_model(wd), done_run[1])


def test_refusal_names_every_differing_field(wd):
    with pytest.raises(train.WorkdirMismatchError) as e:
        train.train_and_evaluate(tiny(**SHORT, seed=2, learning_rate=1e-2), wd)
    msg = str(e.value)
    assert "seed: 0 in the workdir, 2 now" in msg and "learning_rate" in msg
    assert "overwrite=True" in msg and "--overwrite" in msg


def test_fields_that_may_differ_resume(wd, done_run):
    shutil.rmtree(wd / "checkpoints" / "8")  # as if killed after step 4's checkpoint
    other = tiny(
        **SHORT, log_every_steps=3, eval_batch_size=50, progress=True, max_checkpoints_to_keep=3
    )
    resumed = train.train_and_evaluate(other, wd).metrics
    assert resumed["step"] == 8
    assert resumed["test_accuracy"] == pytest.approx(done_run[2]["test_accuracy"], abs=0.02)
    saved = json.loads((wd / "config.json").read_text())
    assert saved["log_every_steps"] == 4  # the record of the run that made it


def test_evaluation_settings_are_not_part_of_a_run():
    """How a run is scored (TTA, eval cadence and batch) does not change what it trains,
    so a finished workdir is reused under other evaluation settings; a training field
    is still compared."""
    rec = _workdir.make_record(tiny(**SHORT), (DATA["train"] + DATA["test"]),
                               num_classes=2, total_steps=8)  # fmt: skip
    other = dict(rec, eval_tta="flip_translate", eval_every_epochs=3, eval_batch_size=7)
    assert _workdir.differences(rec, other) == []
    assert [d[0] for d in _workdir.differences(rec, dict(rec, augment="flip"))] == ["augment"]


def test_folders_the_trainer_did_not_make_are_never_cleared(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text('{"my": "settings"}')
    stray = tmp_path / "stray"
    (stray / "checkpoints").mkdir(parents=True)
    (stray / "checkpoints" / "keep.txt").write_text("x")
    for path in (foreign, stray):
        before = snapshot(path)
        for overwrite in (False, True):
            with pytest.raises(train.WorkdirError, match="nothing there|left as it is"):
                train.train_and_evaluate(tiny(**SHORT), path, overwrite=overwrite)
        assert snapshot(path) == before


def test_workdir_of_an_older_gbjax_is_refused_but_restores(wd, done_run):
    rec = json.loads((wd / "config.json").read_text())
    del rec["workdir_format"], rec["data_fingerprint"]
    (wd / "config.json").write_text(json.dumps(rec))
    before = snapshot(wd)
    with pytest.raises(train.WorkdirError, match="older gbjax"):
        train.train_and_evaluate(tiny(**SHORT), wd)
    assert snapshot(wd) == before
    assert_same_params(train.restore_model(wd), done_run[1])


# ------------------------------------------------------------------ length


def test_num_steps_at_or_below_the_checkpoint_says_so(wd, done_run, capsys):
    before = snapshot(wd)
    for n in (8, 5):
        model, m = train.train_and_evaluate(tiny(num_steps=n, checkpoint_every_steps=4), wd)
        err = capsys.readouterr().err
        assert "nothing to train" in err and "step 8" in err
        assert m == done_run[2]  # the run's own final metrics
        assert_same_params(model, done_run[1])
    assert snapshot(wd) == before


def test_a_constant_schedule_may_be_extended(wd):
    _, m = train.train_and_evaluate(tiny(num_steps=12, checkpoint_every_steps=4), wd)
    assert m["step"] == 12 and "test_accuracy" in m
    assert {"event": "resumed", "step": 8} in read_jsonl(wd / "metrics.jsonl")
    rec = json.loads((wd / "config.json").read_text())
    assert rec["num_steps"] == 12 and rec["total_steps"] == 12


def test_a_length_dependent_schedule_is_not_extended(wd):
    rec = json.loads((wd / "config.json").read_text())
    (wd / "config.json").write_text(json.dumps(dict(rec, schedule="cosine")))  # a cosine run
    before = snapshot(wd)
    with pytest.raises(train.WorkdirMismatchError, match="(?s)num_steps.*cosine"):
        train.train_and_evaluate(tiny(num_steps=12, schedule="cosine"), wd)
    assert snapshot(wd) == before
    # at or below its checkpoint, nothing is trained whatever the schedule
    assert train.train_and_evaluate(tiny(num_steps=6, schedule="cosine"), wd).metrics["step"] == 8


def test_cli_refuses_other_config_reports_nothing_to_train_and_overwrites(
    wd, done_run, tmp_path, capsys
):
    cfg_file = tmp_path / "cfg.py"  # the finished run's configuration (SHORT)
    cfg_file.write_text(
        "from test_train import tiny\n\n\n"
        "def get_config(arg=None):\n"
        "    return tiny(num_steps=int(arg or 8), checkpoint_every_steps=4)\n"
    )
    cli = ["--config", str(cfg_file), "--workdir", str(wd)]
    with pytest.raises(SystemExit) as e:
        train.main(cli + ["--set", "seed=3"])
    assert e.value.code == 2 and "seed: 0 in the workdir, 3 now" in capsys.readouterr().err
    cli4 = ["--config", f"{cfg_file}:4", "--workdir", str(wd)]
    assert train.main(cli4) == 0
    out = capsys.readouterr()
    assert "nothing to train" in out.err and json.loads(out.out) == done_run[2]
    with pytest.raises(SystemExit) as e:  # abbreviations are off
        train.main(cli + ["--overwr"])
    assert e.value.code == 2
    # starting over is explicit, and deletes only the trainer's files
    (wd / "notes.txt").write_text("mine")
    (wd / "mine").mkdir()
    assert train.main(cli + ["--set", "seed=3", "--overwrite"]) == 0
    assert "removed config.json, metrics.jsonl, checkpoints" in capsys.readouterr().err
    assert (wd / "notes.txt").read_text() == "mine" and (wd / "mine").is_dir()
    assert json.loads((wd / "config.json").read_text())["seed"] == 3
    events = [r["event"] for r in read_jsonl(wd / "metrics.jsonl") if "event" in r]
    assert events == ["summary"]  # the old run's lines are gone


# ------------------------------------------------------------------ checkpoints


def corrupt(step_dir: pathlib.Path, nbytes: int = 64):
    """Flips ``nbytes`` bytes in the middle of the checkpoint's largest file."""
    files = [p for p in step_dir.rglob("*") if p.is_file() and p.name != _workdir.SUM_NAME]
    big = max(files, key=lambda p: p.stat().st_size)
    raw = bytearray(big.read_bytes())
    mid = len(raw) // 2
    for i in range(mid, min(mid + nbytes, len(raw))):
        raw[i] ^= 0xFF
    big.write_bytes(bytes(raw))


def test_checkpoints_carry_a_checksum(wd):
    for step in (4, 8):
        rec = json.loads((wd / "checkpoints" / str(step) / _workdir.SUM_NAME).read_text())
        assert rec["step"] == step and len(rec["sha256"]) == 64
        assert _workdir.verify(wd, step) is None
    corrupt(wd / "checkpoints" / "8", nbytes=1)  # a single flipped byte is caught
    assert "sha256" in _workdir.verify(wd, 8)


def test_restored_model_compiles_to_the_trained_models_programs(done_run):
    """Restored arrays are placed as training leaves them (uncommitted, on the default
    device): a committed array's sharding is written into every program that takes
    it, so the evaluation of a restored model (the main job's parts) would compile
    each attack again instead of reusing the trained model's programs."""
    wd, trained, _ = done_run
    restored = train.restore_model(wd)
    leaves = jax.tree.leaves(nnx.state(restored))
    assert leaves and {a.dtype for a in leaves} == {
        a.dtype for a in jax.tree.leaves(nnx.state(trained))
    }
    x = np.asarray(DATA["test"][0][:4])
    f = jax.jit(lambda m, x: m(x))
    assert f.lower(restored, x).as_text() == f.lower(trained, x).as_text()
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(trained(x)))


def test_restore_model_skips_a_corrupt_checkpoint(wd, capsys):
    at4 = train.restore_model(wd, step=4)
    corrupt(wd / "checkpoints" / "8")
    model = train.restore_model(wd)
    assert "checkpoint 8" in capsys.readouterr().err
    assert_same_params(model, at4)
    with pytest.raises(_workdir.CorruptCheckpointError, match="step 8"):
        train.restore_model(wd, step=8)


def test_corrupt_checkpoint_is_reported_and_the_previous_good_one_used(wd, done_run, capsys):
    full_model, full = done_run[1:]
    corrupt(wd / "checkpoints" / "8")
    model, m = train.train_and_evaluate(tiny(**SHORT), wd)
    err = capsys.readouterr().err
    assert "checkpoint 8" in err and "corrupt" in err and "resuming from step 4" in err
    recs = read_jsonl(wd / "metrics.jsonl")
    assert any(r.get("event") == "corrupt_checkpoint" and r["step"] == 8 for r in recs)
    assert {"event": "resumed", "step": 4} in recs
    assert (wd / "corrupt_checkpoints" / "8").is_dir()  # kept aside, not deleted
    assert m["test_accuracy"] == full["test_accuracy"]  # resumed exactly
    assert_same_params(model, full_model)


def test_last_good_message_names_a_checkpoint_that_verifies(tmp_path):
    cfg = tiny(num_steps=12, checkpoint_every_steps=4, log_every_steps=1, debug_nan_step=9)
    train.train_and_evaluate(cfg, tmp_path, stop_after_step=9)  # checkpoints 4 and 8
    corrupt(tmp_path / "checkpoints" / "8")
    with pytest.raises(train.NonFiniteLossError, match=r"Last good checkpoint at step (\d+)") as e:
        train.train_and_evaluate(cfg, tmp_path)
    step = int(str(e.value).rsplit("step ", 1)[1].split()[0])
    assert _workdir.verify(tmp_path, step) is None


# ------------------------------------------------------------------ lock


def lock_is_free(wd) -> bool:
    with open(wd / _workdir.LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_a_second_run_cannot_write_a_workdir_in_use(wd, monkeypatch):
    cfg = tiny(**SHORT)
    with open(wd / _workdir.LOCK_NAME, "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another run" holds it
        before = snapshot(wd)
        with pytest.raises(train.WorkdirBusyError, match="in use by another training run"):
            train.train_and_evaluate(cfg, wd)
        assert snapshot(wd) == before
    # released: the run goes ahead, and gives the lock back when it ends ...
    assert train.train_and_evaluate(cfg, wd).metrics["step"] == 8
    assert lock_is_free(wd)

    def crash(*a, **k):  # ... however it ends
        assert not lock_is_free(wd)  # held while the run is on
        raise RuntimeError("killed")

    monkeypatch.setattr(train, "_train", crash)
    with pytest.raises(RuntimeError, match="killed"):
        train.train_and_evaluate(cfg, wd)
    assert lock_is_free(wd)

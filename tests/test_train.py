"""Tests for gbjax.train on tiny synthetic data (no real data set needed)."""

import dataclasses
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from flax import nnx

from gbjax import config, evaluate, models, train

REPO = pathlib.Path(__file__).resolve().parents[1]


def synthetic(n, seed, size=16, channels=1):
    """Learnable 10-class images: a bright bar whose row encodes the class."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, n).astype(np.int32)
    x = rng.integers(0, 60, (n, size, size, channels)).astype(np.uint8)
    for i in range(n):
        r = int(y[i]) * (size - 3) // 9
        x[i, r : r + 3, 2 : size - 2, :] = 230
    return x, y


DATA = {"train": synthetic(384, 0), "test": synthetic(200, 1)}


def tiny(**kw) -> train.Config:
    base = dict(
        data=DATA,
        model="paper_convnet",
        model_kwargs=dict(kind="raw", features=8),
        optimizer="adam",
        learning_rate=3e-3,
        batch_size=32,
        eval_batch_size=100,
        num_epochs=2,
        log_every_steps=4,
        checkpoint_every_steps=1000,
        progress=False,
    )
    base.update(kw)
    return train.Config(**base)


def read_jsonl(path):
    return [json.loads(ln) for ln in pathlib.Path(path).read_text().splitlines()]


def params_of(workdir):
    return jax.tree.map(np.asarray, nnx.state(train.restore_model(workdir)))


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(model="vgg99"), "unknown model"),
        (dict(learning_rate=-1e-3), "learning_rate"),
        (dict(learning_rate=0.0), "learning_rate"),
        (dict(optimizer="rmsprop"), "unknown optimizer"),
        (dict(preprocess="blur"), "unknown preprocess"),
        (dict(batch_size=0), "batch_size"),
        (dict(num_epochs=0), "num_epochs"),
        (dict(label_smoothing=1.5), "label_smoothing"),
        (dict(data=None, dataset="imagenet"), "unknown dataset"),
    ],
)
def test_bad_configs_raise_clear_errors(tmp_path, change, match):
    with pytest.raises(ValueError, match=match):
        train.train_and_evaluate(tiny(**change), tmp_path)


def test_resnet_without_widths_is_rejected(tmp_path):
    cfg = tiny(model="resnet", model_kwargs=dict(stage_sizes=(1,)))
    with pytest.raises(ValueError, match="widths"):
        train.train_and_evaluate(cfg, tmp_path)


@pytest.mark.parametrize("name", ["pe_mnist", "raw_mnist", "resnet18_cifar10", "airbench_cifar10"])
@pytest.mark.parametrize("arg", [None, "smoke"])
def test_shipped_configs_are_valid(name, arg):
    path = REPO / "gbjax" / "configs" / f"{name}.py"
    cfg = train.load_config(f"{path}:{arg}" if arg else str(path))
    train.validate_config(cfg)
    assert cfg.learning_rate > 0
    if arg == "smoke":  # the smoke variant is small enough for the tests
        assert (cfg.num_steps or 0) <= 20 and (cfg.num_train or 10**9) <= 2048


@pytest.mark.parametrize("name", ["pe_mnist", "raw_mnist", "resnet18_cifar10", "airbench_cifar10"])
def test_documented_command_lines_give_valid_configs(name):
    """Every ``python -m gbjax.train`` line in a config's docstring parses and validates."""
    import ast
    import shlex

    path = REPO / "gbjax" / "configs" / f"{name}.py"
    doc = ast.get_docstring(ast.parse(path.read_text())).replace("\\\n", " ")
    commands = [
        ln.strip() for ln in doc.splitlines() if ln.strip().startswith("python -m gbjax.train")
    ]
    assert commands
    for command in commands:
        argv = shlex.split(command)[3:]
        spec = argv[argv.index("--config") + 1].replace("gbjax/configs/", f"{REPO}/gbjax/configs/")
        sets = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
        cfg = train.apply_overrides(train.load_config(spec), sets)
        train.validate_config(cfg)


def test_overrides():
    cfg = train.apply_overrides(tiny(), ["seed=3", "model_kwargs={'kind': 'embedding'}"])
    assert cfg.seed == 3 and cfg.model_kwargs == {"kind": "embedding"}
    with pytest.raises(ValueError, match="override"):
        train.apply_overrides(tiny(), ["nonsense=1"])


# ---------------------------------------------------------------- training


def test_public_pieces_compose_into_the_trainers_step():
    """create_train_state, train_step and eval_step (the flax imagenet shape) give
    what Trainer's jitted step gives on the same batch."""
    cfg = tiny(num_steps=3)
    xtr, ytr, xte, yte = train.load_datasets(cfg)
    model = train.init_model(cfg, xtr, 10)
    trainer = train.Trainer(cfg, model, num_classes=10, num_train=len(xtr), total_steps=3)
    model.train()
    graphdef = models.split_state(model)[0]
    tx = train.make_optimizer(cfg, 3)
    state = train.create_train_state(model, tx)
    step = jax.jit(
        lambda s, x, y: train.train_step(
            s, x, y, graphdef=graphdef, tx=tx, objective=trainer.objective
        )
    )
    data, ref = trainer.put_data(xtr, ytr), trainer.init_state
    for t in range(3):
        perm = trainer.epoch_permutation(0)
        rows = np.asarray(perm)[t * cfg.batch_size : (t + 1) * cfg.batch_size]
        state = step(state, xtr[rows], ytr[rows])
        ref = trainer.train_step(ref, data, perm)
    assert int(state["step"]) == 3 and float(state["count"]) == 3 * cfg.batch_size
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        (state["params"], state["loss_sum"]),
        (ref["params"], ref["loss_sum"]),
    )
    ev = train.eval_step(state, xte, yte, graphdef=trainer.eval_graphdef, batch_size=100)
    assert ev == trainer.evaluate(ref, xte, yte)


def test_recipe_hooks():
    # every Config.augment has its function; a model's init_from_data is called on
    # whiten_num_images random training images (airbench: its whitening layer)
    assert set(train.AUGMENTATIONS) == set(config.AUGMENT)
    cfg = tiny(model="airbench", model_kwargs=dict(widths=(8, 8, 8)), whiten_num_images=50)
    x = synthetic(64, 0, size=8, channels=3)[0]
    model = train.init_model(cfg, x, 10)
    rows = np.sort(np.random.default_rng(cfg.seed).permutation(64)[:50])
    kernel = models.whitening_kernel(
        x[rows], mean=np.asarray(model.mean[...]), std=np.asarray(model.std[...]), kernel_size=2,
        eps=5e-4,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(model.whiten_kernel[...]), kernel, rtol=1e-6)
    assert not hasattr(train.init_model(tiny(), DATA["train"][0], 10), "init_from_data")


def test_tiny_training_learns_and_logs(tmp_path):
    cfg = tiny(num_epochs=3)
    trained, m = train.train_and_evaluate(cfg, tmp_path)
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "event" not in r]
    assert recs[-1]["train_loss"] < 0.5 * recs[0]["train_loss"]  # loss falls
    assert m["test_accuracy"] > 0.5  # chance: 0.1
    assert m["step"] == 3 * (384 // 32)
    assert m["images_per_sec"] > 0 and m["compile_time_s"] > 0
    assert sum("test_accuracy" in r for r in recs) == 3  # every epoch
    times = [r["train_time_s"] for r in recs]
    assert times == sorted(times) and times[-1] > 0
    assert all(r["train_time_s"] < r["elapsed_s"] for r in recs)
    hit = train.time_to_target(tmp_path, 0.5)
    first = next(r for r in recs if r.get("test_accuracy", 0) >= 0.5)
    assert hit["step"] == first["step"] and hit["train_time_s"] == first["train_time_s"]
    assert train.time_to_target(tmp_path, 1.01) is None
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model"] == "paper_convnet" and "data" not in saved
    # the returned model, and the one restored from the checkpoint, reproduce
    # the final test accuracy
    xte, yte = DATA["test"]
    assert evaluate.accuracy(trained, xte, yte) == pytest.approx(m["test_accuracy"])
    model = train.restore_model(tmp_path)
    acc = np.mean(np.argmax(np.asarray(model(xte)), -1) == yte)
    assert acc == pytest.approx(m["test_accuracy"])
    # floats in [0, 1] give the same predictions as uint8
    acc01 = np.mean(np.argmax(np.asarray(model(xte / np.float32(255))), -1) == yte)
    assert abs(acc01 - acc) <= 0.01


def test_resume_is_exact(tmp_path):
    # pixel embedding + batch-norm-free net + on-device augmentation; the
    # interrupted run is "killed" after step 7 (last checkpoint: step 4).
    cfg = tiny(
        model_kwargs=dict(
            kind="embedding", features=8, embed_features=8, num_embeddings=201, scale=100.0
        ),
        augment="crop_flip",
        crop_pad=2,
        checkpoint_every_steps=4,
        num_steps=14,
    )
    full = train.train_and_evaluate(cfg, tmp_path / "a").metrics
    part = train.train_and_evaluate(cfg, tmp_path / "b", stop_after_step=7).metrics
    assert part["step"] == 7
    resumed = train.train_and_evaluate(cfg, tmp_path / "b").metrics
    events = [
        r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if r.get("event") == "resumed"
    ]
    assert events == [{"event": "resumed", "step": 4}]
    recs_b = read_jsonl(tmp_path / "b" / "metrics.jsonl")
    hit = train.time_to_target(tmp_path / "b", 0.0)  # first eval: end of epoch 1
    own = next(r for r in recs_b if r.get("step") == 12 and "test_accuracy" in r)
    before = [r for r in recs_b[: recs_b.index(events[0])] if "train_time_s" in r]
    assert hit["resumed"] and hit["step"] == 12
    assert hit["train_time_s"] == pytest.approx(own["train_time_s"] + before[-1]["train_time_s"])
    assert "resumed" not in train.time_to_target(tmp_path / "a", 0.0)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    assert resumed["test_loss"] == pytest.approx(full["test_loss"], rel=1e-6)
    a, b = params_of(tmp_path / "a"), params_of(tmp_path / "b")
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-6, atol=1e-7), a, b)


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny(debug_nan_step=6, checkpoint_every_steps=4, log_every_steps=2, num_steps=12)
    with pytest.raises(train.NonFiniteLossError, match="non-finite.*step 4"):
        train.train_and_evaluate(cfg, tmp_path)
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [4]
    model = train.restore_model(tmp_path)
    assert all(np.all(np.isfinite(a)) for a in jax.tree.leaves(nnx.state(model)))
    assert read_jsonl(tmp_path / "metrics.jsonl")[-1]["event"] == "non_finite_loss"


def test_gb_preprocess_is_applied_and_cached(tmp_path, monkeypatch):
    import importlib

    gb = importlib.import_module("gbjax.gb")
    calls = []

    def fake_gb_denoise(images, params=None, progress=False):
        calls.append((images.shape, params.threshold))
        return (np.asarray(images) // 64 * 64).astype(np.uint8)

    monkeypatch.setattr(gb, "gb_denoise", fake_gb_denoise)
    cfg = tiny(preprocess="gb", gb=dict(threshold=10.0), cache_dir=str(tmp_path))
    xtr, _, xte, _ = train.load_datasets(cfg)
    assert len(calls) == 2  # train and test
    np.testing.assert_array_equal(xtr, DATA["train"][0] // 64 * 64)
    np.testing.assert_array_equal(xte, DATA["test"][0] // 64 * 64)
    xtr2, _, _, _ = train.load_datasets(cfg)
    assert len(calls) == 2  # served from the cache
    np.testing.assert_array_equal(xtr2, xtr)
    train.load_datasets(dataclasses.replace(cfg, gb=dict(threshold=30.0)))
    assert len(calls) == 4  # new parameters: recompute
    # the same parameters as a GBParams: the same cache entry
    train.load_datasets(dataclasses.replace(cfg, gb=gb.GBParams(threshold=10.0)))
    assert len(calls) == 4 and calls[-1][1] == 30.0
    monkeypatch.setattr(gb, "OUTPUT_VERSION", gb.OUTPUT_VERSION + 1)
    train.load_datasets(cfg)
    assert len(calls) == 6  # newer engine: recompute


def test_config_gb_is_checked_before_any_work():
    """Config.gb: a GBParams or a dict of gb_denoise's keywords, refused when invalid."""
    from gbjax import GBParams
    from gbjax.config import validate_config

    for ok in ({}, dict(threshold=20.0, engine="xla"), GBParams(threshold=10.0)):
        validate_config(tiny(preprocess="gb", gb=ok))
    for bad, match in (
        (dict(thresh=1.0), r"gb: unknown keys \['thresh'\]"),
        (dict(scale=1.0), r"gb: unknown keys \['scale'\]"),  # gb_processed would refuse it
        (dict(threshold=-1.0), "gb: threshold: expected"),
        ([20.0], "gb must be a gbjax.GBParams or a dict"),
    ):
        with pytest.raises(ValueError, match=match):
            validate_config(tiny(preprocess="gb", gb=bad))


SHARDED_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    sys.path.insert(0, {tests!r})
    from test_train import tiny
    from gbjax import evaluate, train
    assert jax.device_count() == 4, jax.devices()
    out = {{}}
    for n in (1, 4):
      # SGD: updates linear in the gradients (Adam amplifies rounding noise)
      cfg = tiny(model="resnet", model_kwargs=dict(stage_sizes=(1, 1), widths=(4, 8)),
                 num_devices=n, num_steps=8, optimizer="sgd", learning_rate=0.05,
                 eval_batch_size=40)
      _, m = train.train_and_evaluate(cfg, {tmp!r} + f"/d{{n}}")
      p = jax.tree.leaves(nnx.state(train.restore_model({tmp!r} + f"/d{{n}}")))
      out[n] = dict(loss=m["test_loss"], acc=m["test_accuracy"],
                    params=[np.asarray(a).ravel().tolist() for a in p])
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_data_parallel_matches_single_device(tmp_path):
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=str(REPO),
    )
    script = SHARDED_SCRIPT.format(tests=str(REPO / "tests"), tmp=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT") :])
    one, four = out["1"], out["4"]
    assert four["loss"] == pytest.approx(one["loss"], rel=1e-3, abs=1e-4)
    assert abs(four["acc"] - one["acc"]) <= 0.01
    for a, b in zip(one["params"], four["params"]):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("bad", ["short", "long", "2d"])
def test_labels_must_match_images(split, bad):
    """Labels of another length were taken silently before: the trainer's gather past
    their end clamps to the last label instead of failing."""
    x, y = DATA[split]
    y = {"short": y[:10], "long": np.concatenate([y, y[:3]]), "2d": y[:, None]}[bad]
    data = dict(DATA, **{split: (x, y)})
    with pytest.raises(ValueError, match="one (integer )?label per image"):
        train.load_datasets(tiny(data=data))


def test_subsets_are_random_not_first_n():
    x, y = DATA["train"]
    order = np.argsort(y, kind="stable")  # class-sorted source
    cfg = tiny(
        data={"train": (x[order], y[order]), "test": DATA["test"]}, num_train=64, num_test=50
    )
    xtr, ytr, xte, yte = train.load_datasets(cfg)
    assert len(xtr) == 64 and len(xte) == 50
    assert len(np.unique(ytr)) >= 8
    xtr2, ytr2, _, _ = train.load_datasets(dataclasses.replace(cfg, seed=5))
    np.testing.assert_array_equal(ytr2, ytr)  # fixed, seed-independent


@pytest.mark.parametrize("batch", [1, 128, 512, 1000, 1024, 4096])
def test_airbench_batch_size_keeps_per_example_rates(batch):
    """The recipe's rates are per 1024 examples: on its summed loss the step size stays
    and the per-step weight decay follows the batch, so decay per epoch is unchanged."""
    from gbjax.configs import airbench_cifar10 as ab

    ref = ab.get_config("fast")
    cfg = ab.set_batch_size(ab.get_config("fast"), batch)
    assert cfg.batch_size == batch and cfg.learning_rate == ref.learning_rate
    per_epoch = lambda c, wd: c.learning_rate * wd / c.batch_size  # noqa: E731
    assert per_epoch(cfg, cfg.weight_decay) == pytest.approx(per_epoch(ref, ref.weight_decay))
    assert cfg.param_groups.keys() == ref.param_groups.keys()
    for name, g in ref.param_groups.items():
        got = cfg.param_groups[name]
        assert got["weight_decay"] / batch == pytest.approx(g["weight_decay"] / 1024)
        assert {k: v for k, v in got.items() if k != "weight_decay"} == {
            k: v for k, v in g.items() if k != "weight_decay"
        }
    assert ab.get_config("fast").weight_decay == ref.weight_decay  # no shared state


def test_airbench_batch_size_refuses_bad_input():
    from gbjax.configs import airbench_cifar10 as ab

    for bad in (0, -512, 512.0, True, "512"):
        with pytest.raises(ValueError, match="positive int"):
            ab.set_batch_size(ab.get_config("fast"), bad)
    cfg = ab.get_config("fast")
    cfg.loss_reduction = "mean"
    with pytest.raises(ValueError, match="summed loss"):
        ab.set_batch_size(cfg, 512)


@pytest.mark.slow
def test_airbench_recipe_tiny_run_learns(tmp_path):
    from gbjax.configs import airbench_cifar10

    cfg = airbench_cifar10.get_config("smoke")
    cfg.data = {"train": synthetic(512, 0, size=32, channels=3),
                "test": synthetic(200, 1, size=32, channels=3)}  # fmt: skip
    cfg.num_train = cfg.num_test = None
    cfg.num_steps, cfg.num_epochs, cfg.progress = None, 6, False
    cfg.eval_batch_size = 100
    model, m = train.train_and_evaluate(cfg, tmp_path)
    assert m["test_accuracy"] > 0.3  # chance: 0.1
    assert m["tta"] == "flip_translate" and "test_accuracy_plain" in m
    # TTA evaluation of the returned model reproduces the logged figure
    xte, yte = cfg.data["test"]
    assert evaluate.accuracy(model, xte, yte, tta="flip_translate") == pytest.approx(
        m["test_accuracy"]
    )
    # all six epochs of full batches ran
    recs = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "event" not in r]
    assert recs[-1]["step"] == 6 * (512 // cfg.batch_size)

"""The `gbjax` command line's `train` and `cluster` subcommands, help texts and exit codes."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

import gbjax
import gbjax.data
import gbjax.train
from gbjax.__main__ import main

GB = dict(threshold=20.0, capacity=32)


def _images(n=6, seed=0):
    rng = np.random.default_rng(seed)
    x = np.repeat(np.repeat(rng.integers(0, 256, (n, 2, 2, 1)), 4, 1), 4, 2)
    return np.clip(x + rng.integers(-9, 10, x.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("command", ["denoise", "train", "cluster"])
def test_help_has_examples_and_exit_codes(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    assert "examples:" in out and f"gbjax {command}" in out
    assert "exit status:" in out and "2  refused before any work" in out


def test_top_level_help_and_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for command in ("denoise", "train", "cluster", "exit status:"):
        assert command in out
    with pytest.raises(SystemExit):
        main(["--version"])
    assert capsys.readouterr().out.strip() == f"gbjax {gbjax.__version__}"


def test_train_delegates_to_gbjax_train(monkeypatch):
    seen = []
    monkeypatch.setattr(gbjax.train, "main", lambda argv: seen.append(argv) or 0)
    argv = ["--config", "gbjax.configs.pe_mnist:smoke", "--workdir", "w", "--set", "seed=1"]
    assert main(["train", *argv]) == 0
    assert seen == [argv]


@pytest.mark.parametrize("module", [["gbjax", "train"], ["gbjax.train"]])
def test_train_entry_points_help(module):
    """``python -m gbjax train`` beside ``denoise``; ``python -m gbjax.train`` its alias."""
    out = subprocess.run(
        [sys.executable, "-m", *module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--config", "--workdir", "--set", "--overwrite"):
        assert flag in out.stdout


def test_train_exit_codes(monkeypatch, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "gbjax.configs.no_such", "--workdir", str(tmp_path)])
    assert e.value.code == 2 and "no_such" in capsys.readouterr().err

    def missing_data(argv):
        raise gbjax.data.DataNotFoundError("mnist: found nowhere")

    monkeypatch.setattr(gbjax.train, "main", missing_data)
    assert main(["train", "--config", "gbjax.configs.raw_mnist", "--workdir", "w"]) == 2
    assert "found nowhere" in capsys.readouterr().err


def test_cluster_dataset_fills_the_gb_processed_cache(monkeypatch, tmp_path, capsys):
    splits = {"train": _images(6, 0), "test": _images(5, 1)}
    monkeypatch.setattr(
        gbjax.data,
        "load",
        lambda name, split, data_dir=None, **kw: (splits[split], np.zeros(len(splits[split]))),
    )
    rc = main(["cluster", "mnist", "--threshold", "20", "--capacity", "32",
               "--cache-dir", str(tmp_path)])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert out.count("gb_") == 2 and "train: 6 images" in out and "test: 5 images" in out
    assert len(list(tmp_path.glob("gb_*.npz"))) == 2
    # gb_processed with the same parameters reads the entries instead of clustering
    monkeypatch.setattr(gbjax.gb, "gb_denoise", lambda *a, **k: pytest.fail("not cached"))
    for x in splits.values():
        got = gbjax.data.gb_processed(x, cache_dir=tmp_path, progress=False, **GB)
        assert got.shape == x.shape and not np.array_equal(got, x)


def test_cluster_config_is_the_cache_training_reads(monkeypatch, tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text(
        textwrap.dedent(
            f"""
            import numpy as np
            from gbjax.config import Config

            def get_config(arg=None):
                rng = np.random.default_rng(0)
                x = np.repeat(np.repeat(rng.integers(0, 256, (8, 2, 2, 1)), 4, 1), 4, 2)
                data = {{"train": (x.astype(np.uint8), np.arange(8) % 2),
                         "test": (x[:4].astype(np.uint8), np.arange(4) % 2)}}
                return Config(data=data, preprocess="gb", gb={GB!r}, batch_size=4,
                              cache_dir={str(tmp_path / "cache")!r}, progress=False)
            """
        )
    )
    assert main(["cluster", "--config", str(cfg), "--quiet"]) == 0
    assert len(list((tmp_path / "cache").glob("gb_*.npz"))) == 2
    from gbjax.config import load_config

    monkeypatch.setattr(gbjax.gb, "gb_denoise", lambda *a, **k: pytest.fail("not cached"))
    xtr, _, xte, _ = gbjax.train.load_datasets(load_config(str(cfg)))
    assert xtr.shape == (8, 8, 8, 1) and xte.shape == (4, 8, 8, 1)
    # a configuration without GB preprocessing is refused before any work
    assert main(["cluster", "--config", str(cfg), "--set", "preprocess='none'"]) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["cluster"], "give a data set"),
        (["cluster", "--config", "gbjax.configs.raw_mnist", "--threshold", "9"], "GB parameters"),
        (["cluster", "mnist", "--set", "seed=1"], "--set needs --config"),
        (["cluster", "--config", "nope.py"], "not found"),
    ],
)
def test_cluster_refusals_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "option",
    [["--capacity", "0"], ["--purity", "2"], ["--thr", "3"], ["--num-processes", "2"]],
)
def test_cluster_bad_options_are_parser_errors(option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["cluster", "mnist", *option])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert option[0] in err or "--coordinator" in err

"""The `python -m gbjax denoise` command line and the k-means baseline."""

import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import gbjax
from gbjax.__main__ import main
from gbjax._kmeans import kmeans_quantize


def _img(seed, shape=(12, 12, 3)):
    rng = np.random.default_rng(seed)
    x = np.zeros(shape, np.uint8)
    x[:, : shape[1] // 2] = rng.integers(0, 256, shape[-1])
    x[:, shape[1] // 2 :] = rng.integers(0, 256, shape[-1])
    return x


@pytest.mark.slow
def test_denoise_folder_and_files(tmp_path):
    (tmp_path / "in" / "sub").mkdir(parents=True)
    a, b = _img(0), _img(1)
    Image.fromarray(a).save(tmp_path / "in" / "a.png")
    Image.fromarray(b).save(tmp_path / "in" / "sub" / "b.png")
    Image.fromarray(_img(2, (12, 12, 1))[..., 0]).save(tmp_path / "g.png")
    rc = main(
        [
            "denoise",
            str(tmp_path / "in"),
            str(tmp_path / "g.png"),
            "-o",
            str(tmp_path / "out"),
            "--threshold",
            "20",
            "--purity",
            "0.9",
            "--quiet",
        ]
    )
    assert rc == 0
    out_a = np.asarray(Image.open(tmp_path / "out" / "in" / "a_gb.png"))
    np.testing.assert_array_equal(out_a, gbjax.gb_denoise(a, threshold=20.0, purity=0.9))
    assert (tmp_path / "out" / "in" / "sub" / "b_gb.png").exists()
    g = np.asarray(Image.open(tmp_path / "out" / "g_gb.png"))
    assert g.shape == (12, 12)


def test_compare_figure_written(tmp_path):
    Image.fromarray(_img(3)).save(tmp_path / "a.png")
    assert (
        main(
            ["denoise", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--compare", "--quiet"]
        )
        == 0
    )
    fig = Image.open(tmp_path / "o" / "a_compare.png")
    assert fig.size[0] > 3 * fig.size[1]  # seven panels side by side


def test_cli_errors(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no such file"):
        main(["denoise", str(tmp_path / "missing.png"), "-o", str(tmp_path)])
    Image.fromarray(_img(4)).save(tmp_path / "a.png")
    assert main(["denoise", str(tmp_path / "a.png"), "-o", str(tmp_path), "--purity", "2"]) == 2
    assert "purity" in capsys.readouterr().err
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SystemExit, match="cannot read image"):
        main(["denoise", str(tmp_path / "bad.png"), "-o", str(tmp_path)])


def test_module_entry_point_help():
    out = subprocess.run(
        [sys.executable, "-m", "gbjax", "denoise", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "--compare" in out.stdout


def test_kmeans_quantize_two_colours_exact():
    x = _img(5)
    q = kmeans_quantize(x, 2, key=jax.random.key(0))
    np.testing.assert_array_equal(q, x)  # two flat halves: k=2 recovers them exactly
    q1 = kmeans_quantize(x, 1, key=jax.random.key(0))
    np.testing.assert_array_equal(
        q1,
        np.round(x.reshape(-1, 3).mean(0)).astype(np.uint8)[None, None].repeat(12, 0).repeat(12, 1),
    )
    with pytest.raises(ValueError, match="k:"):
        kmeans_quantize(x, 0, key=jax.random.key(0))

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
    assert main(["denoise", str(tmp_path / "bad.png"), "-o", str(tmp_path)]) == 1
    assert "cannot read image" in capsys.readouterr().err


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


def _png16_rgb(path, arr_HW3):
    """A 16-bit-per-channel RGB PNG, written by hand (Pillow cannot write one)."""
    import struct
    import zlib

    h, w, _ = arr_HW3.shape
    raw = b"".join(b"\x00" + arr_HW3[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)


def test_unreadable_files_are_reported_and_skipped(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    Image.fromarray(_img(0)).save(tmp_path / "in" / "a.png")
    (tmp_path / "in" / "bad.png").write_bytes(b"not a png")
    Image.fromarray(_img(1)).save(tmp_path / "in" / "c.png")
    rc = main(["denoise", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 1
    assert "bad.png" in err and "1 file(s) could not be read" in err
    assert (tmp_path / "out" / "in" / "a_gb.png").exists()
    assert (tmp_path / "out" / "in" / "c_gb.png").exists()
    # --fail-fast: stop at the first unreadable file, before writing anything
    rc = main(["denoise", str(tmp_path / "in"), "-o", str(tmp_path / "o2"), "--quiet",
               "--fail-fast"])  # fmt: skip
    assert rc == 1 and not (tmp_path / "o2").exists()


def test_16_bit_grey_keeps_precision_and_16_bit_colour_warns(tmp_path, capsys):
    rng = np.random.default_rng(0)
    g = np.zeros((8, 8), np.uint16)
    g[:, :4], g[:, 4:] = 30000 + rng.integers(0, 3, (8, 4)), 50003
    Image.fromarray(g).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert main(["denoise", str(tmp_path / "g16.png"), "-o", str(tmp_path / "o"), "--quiet"]) == 0
    out = np.asarray(Image.open(tmp_path / "o" / "g16_gb.png"))
    assert out.dtype == np.uint16 or out.max() > 255
    want = gbjax.gb_denoise((g / 257.0).astype(np.float32)[..., None], threshold=20.0)
    np.testing.assert_array_equal(out, np.clip(np.round(np.asarray(want)[..., 0] * 257), 0, 65535))
    assert 50003 in out  # a value no 8-bit image could produce (50003 / 257 is not integral)
    _png16_rgb(tmp_path / "c16.png", rng.integers(0, 65536, (6, 6, 3)))
    assert main(["denoise", str(tmp_path / "c16.png"), "-o", str(tmp_path / "o"), "--quiet"]) == 0
    assert "16-bit colour PNG read at 8 bits" in capsys.readouterr().err


def test_saturation_is_reported_and_capacity_auto_grows(tmp_path, capsys):
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)).save(tmp_path / "n.png")
    args = ["denoise", str(tmp_path / "n.png"), "-o", str(tmp_path / "o"), "--quiet",
            "--threshold", "10"]  # fmt: skip
    assert main(args + ["--capacity", "8"]) == 0
    assert "1 of 1 image(s) filled the 8 ball slots" in capsys.readouterr().err
    assert main(args + ["--capacity", "auto"]) == 0
    assert "filled" not in capsys.readouterr().err

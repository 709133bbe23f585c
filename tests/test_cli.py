"""The `python -m gbjax denoise` command line and the k-means baseline."""

import os
import subprocess
import sys
import tempfile
import types

import jax
import numpy as np
import pytest
from PIL import Image
from unreadable import unreadable

import gbjax
import gbjax.__main__ as cli
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
    assert main(["denoise", str(tmp_path / "missing.png"), "-o", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err
    Image.fromarray(_img(4)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit) as e:
        main(["denoise", str(tmp_path / "a.png"), "-o", str(tmp_path), "--purity", "2"])
    assert e.value.code == 2 and "--purity" in capsys.readouterr().err
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
    assert "bad.png" in err and "1 input(s) not written" in err
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
    assert main(args + ["--capacity", "auto", "--overwrite"]) == 0
    assert "filled" not in capsys.readouterr().err


# --------------------------------------------------------------------------- #
# Nothing lost, nothing silently wrong (issue 26)
# --------------------------------------------------------------------------- #


def _save(path, arr):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _run(*args):
    return main(["denoise", *map(str, args), "--quiet"])


def _no_reading(monkeypatch):
    """Fail the test if any input image is read (the refusal must come first)."""

    def boom(path):
        raise AssertionError(f"{path} was read before the refusal")

    monkeypatch.setattr(cli, "_read", boom)


def test_same_stem_in_one_folder_keeps_the_extensions(tmp_path, capsys):
    a_png, a_jpg, b = _img(0), _img(1), _img(2)
    _save(tmp_path / "in" / "a.png", a_png)
    _save(tmp_path / "in" / "a.jpg", a_jpg)
    _save(tmp_path / "in" / "b.png", b)
    assert main(["denoise", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 0
    assert "wrote 3 of 3 image(s)" in capsys.readouterr().out
    out = tmp_path / "out" / "in"
    assert sorted(p.name for p in out.iterdir()) == ["a.jpg_gb.png", "a.png_gb.png", "b_gb.png"]
    got_png = np.asarray(Image.open(out / "a.png_gb.png"))
    np.testing.assert_array_equal(got_png, gbjax.gb_denoise(a_png, threshold=20.0, purity=0.9))
    jpg_read = np.asarray(Image.open(tmp_path / "in" / "a.jpg").convert("RGB"))
    got_jpg = np.asarray(Image.open(out / "a.jpg_gb.png"))
    np.testing.assert_array_equal(got_jpg, gbjax.gb_denoise(jpg_read, threshold=20.0, purity=0.9))


def test_colliding_outputs_are_refused_before_any_work(tmp_path, monkeypatch, capsys):
    _no_reading(monkeypatch)
    _save(tmp_path / "x" / "a.png", _img(0))
    _save(tmp_path / "y" / "a.png", _img(1))
    assert _run(tmp_path / "x" / "a.png", tmp_path / "y" / "a.png", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "collide" in err and str(tmp_path / "x" / "a.png") in err
    assert str(tmp_path / "y" / "a.png") in err
    # two folders of the same name
    _save(tmp_path / "x" / "in" / "c.png", _img(2))
    _save(tmp_path / "y" / "in" / "c.png", _img(3))
    assert _run(tmp_path / "x" / "in", tmp_path / "y" / "in", "-o", tmp_path / "out") == 2
    assert "collide" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_existing_outputs_are_kept_unless_overwrite(tmp_path, monkeypatch, capsys):
    _save(tmp_path / "a.png", _img(0))
    assert _run(tmp_path / "a.png", "-o", tmp_path / "out") == 0
    target = tmp_path / "out" / "a_gb.png"
    target.write_bytes(b"the user's own file")
    with monkeypatch.context() as m:
        _no_reading(m)
        assert _run(tmp_path / "a.png", "-o", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "already exist" in err and "--overwrite" in err
    assert target.read_bytes() == b"the user's own file"
    assert _run(tmp_path / "a.png", "-o", tmp_path / "out", "--overwrite") == 0
    np.testing.assert_array_equal(
        np.asarray(Image.open(target)), gbjax.gb_denoise(_img(0), threshold=20.0, purity=0.9)
    )
    # an output that is one of the inputs is never replaced, even with --overwrite
    _save(tmp_path / "in" / "b.png", _img(1))
    _save(tmp_path / "in" / "b_gb.png", _img(2))
    assert _run(tmp_path / "in", "-o", tmp_path, "--overwrite") == 2
    assert "would replace an input" in capsys.readouterr().err


def test_output_folder_is_checked_before_reading(tmp_path, monkeypatch, capsys):
    _no_reading(monkeypatch)
    _save(tmp_path / "in" / "a.png", _img(0))
    (tmp_path / "file").write_text("not a folder")
    assert _run(tmp_path / "in", "-o", tmp_path / "file") == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "in").write_text("blocks the sub-folder")
    assert _run(tmp_path / "in", "-o", tmp_path / "out") == 2
    assert "is a file" in capsys.readouterr().err
    # a folder without write permission (as root, which ignores it, os.access says no)
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o555)
    real_access = os.access
    ro = str(tmp_path / "ro")
    monkeypatch.setattr(os, "access", lambda p, mode: os.fspath(p) != ro and real_access(p, mode))
    try:
        assert _run(tmp_path / "in", "-o", tmp_path / "ro" / "out") == 2
    finally:
        (tmp_path / "ro").chmod(0o755)
    assert "permission denied" in capsys.readouterr().err


def test_unwritable_output_is_found_before_clustering(tmp_path, monkeypatch, capsys):
    import gbjax.gb

    clustered = []
    real = gbjax.gb.gb_cluster
    monkeypatch.setattr(
        gbjax.gb, "gb_cluster", lambda x, **kw: clustered.append(np.shape(x)) or real(x, **kw)
    )

    def read_only_fs(*a, **k):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only_fs)
    _save(tmp_path / "a.png", _img(0))
    assert _run(tmp_path / "a.png", "-o", tmp_path / "out") == 2
    assert "Read-only file system" in capsys.readouterr().err
    assert all(len(s) == 3 for s in clustered)  # only the 2x2 option check ran


def test_unreadable_subfolder_is_reported(tmp_path, monkeypatch, capsys):
    _save(tmp_path / "in" / "a.png", _img(0))
    _save(tmp_path / "in" / "sub" / "b.png", _img(1))
    with unreadable(tmp_path / "in" / "sub", monkeypatch):
        rc = _run(tmp_path / "in", "-o", tmp_path / "out")
        err = capsys.readouterr().err
        assert rc == 1
        assert "cannot read folder" in err and str(tmp_path / "in" / "sub") in err
        assert "1 input(s) not written" in err
        assert (tmp_path / "out" / "in" / "a_gb.png").exists()
        assert _run(tmp_path / "in", "-o", tmp_path / "o2", "--fail-fast") == 1
        assert not (tmp_path / "o2").exists()


def test_symlinked_folders_are_followed(tmp_path):
    _save(tmp_path / "in" / "a.png", _img(0))
    _save(tmp_path / "elsewhere" / "b.png", _img(1))
    (tmp_path / "in" / "link").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "in" / "loop").symlink_to(tmp_path / "in", target_is_directory=True)
    assert _run(tmp_path / "in", "-o", tmp_path / "out") == 0
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*.png"))
    assert got == ["in/a_gb.png", "in/link/b_gb.png"]  # the loop is not walked again


@pytest.mark.parametrize(
    "option",
    [
        ["--batch-size", "-1"],
        ["--batch-size", "0"],
        ["--capacity", "0"],
        ["--capacity", "many"],
        ["--threshold", "-1"],
        ["--threshold", "nan"],
        ["--purity", "0"],
        ["--min-ball-size", "0"],
        ["--spatial", "-1"],
        ["--comp"],  # abbreviations are off
    ],
)
def test_bad_options_are_parser_errors(tmp_path, option, capsys):
    _save(tmp_path / "a.png", _img(0))
    with pytest.raises(SystemExit) as e:
        main(["denoise", str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *option])
    assert e.value.code == 2
    assert option[0] in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_failing_group_is_reported_and_the_others_written(tmp_path, monkeypatch, capsys):
    import gbjax.gb

    def fake_cluster(x, **kw):
        x = np.asarray(x)
        if x.ndim == 4 and x.shape[1] == 8:
            raise ValueError("image too large for the memory budget")
        n = len(x) if x.ndim == 4 else 1
        return types.SimpleNamespace(image=x, n_balls=np.ones(n), saturated=np.zeros(n, bool))

    monkeypatch.setattr(gbjax.gb, "gb_cluster", fake_cluster)
    _save(tmp_path / "in" / "big.png", _img(0, (8, 8, 3)))
    _save(tmp_path / "in" / "ok.png", _img(1))
    assert main(["denoise", str(tmp_path / "in"), "-o", str(tmp_path / "out")]) == 1
    cap = capsys.readouterr()
    assert "wrote 1 of 2 image(s)" in cap.out
    assert "1 input(s) not written" in cap.err and "memory budget" in cap.err
    assert str(tmp_path / "in" / "big.png") in cap.err
    assert (tmp_path / "out" / "in" / "ok_gb.png").exists()
    assert not (tmp_path / "out" / "in" / "big_gb.png").exists()


def test_memory_budget_option(tmp_path, capsys):
    """An image whose working set exceeds --memory-budget is reported, not written
    (exit 1); a budget that fits writes it."""
    img = _img(3)
    _save(tmp_path / "in" / "big.png", img)
    need = gbjax.memory_estimate(1, img.shape[0], img.shape[1], 3)
    assert gbjax.memory_estimate(1, 2, 2, 3) < need / 2  # the option check passes
    small = need / 2 / 2**30  # GiB
    assert _run(tmp_path / "in", "-o", tmp_path / "out", "--memory-budget", small) == 1
    out = capsys.readouterr()
    assert "memory_budget" in out.out + out.err
    assert not (tmp_path / "out" / "in" / "big_gb.png").exists()
    assert _run(tmp_path / "in", "-o", tmp_path / "out") == 0
    assert (tmp_path / "out" / "in" / "big_gb.png").is_file()
    with pytest.raises(SystemExit) as e:
        main(["denoise", str(tmp_path / "in"), "--memory-budget", "0"])
    assert e.value.code == 2

"""Tests for gbjax.data: loaders on self-written fixtures, cache, errors, helpers.

Real data (``../shared/data`` layout) is used only through ``$GBJAX_DATA_DIR``;
those tests are skipped when it is unset or lacks the files.
"""

import gzip
import hashlib
import io
import os
import pickle
import shutil
import struct
import sys
import tarfile
import types
import urllib.error
import zlib

import numpy as np
import pytest
from PIL import Image
from unreadable import unreadable

from gbjax import data
from gbjax.data import (
    CorruptDataError,
    DataNotFoundError,
    _decode,
    cache,
    decode,
    preprocess,
    sources,
)

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    """Private cache dir, no real network, no tensorflow-datasets, no $GBJAX_DATA_DIR."""
    monkeypatch.setenv("GBJAX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("GBJAX_DATA_DIR", raising=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # import fails

    def no_network(url, dest, progress):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(sources, "_fetch", no_network)


def cache_files(tmp_path):
    d = tmp_path / "cache"
    return sorted(p.name for p in d.iterdir() if p.is_file()) if d.exists() else []


# --------------------------------------------------------------------------- #
# Fixture writers
# --------------------------------------------------------------------------- #


def idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, np.uint8)
    return (
        struct.pack(">BBBB", 0, 0, 0x08, arr.ndim)
        + struct.pack(f">{arr.ndim}I", *arr.shape)
        + arr.tobytes()
    )


def write_idx_set(d, split, x_NHW, y_N, *, gz=True):
    d.mkdir(parents=True, exist_ok=True)
    pre = "train" if split == "train" else "t10k"
    for stem, arr in ((f"{pre}-images-idx3-ubyte", x_NHW), (f"{pre}-labels-idx1-ubyte", y_N)):
        raw = idx_bytes(arr)
        if gz:
            (d / (stem + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (d / stem).write_bytes(raw)


def tiny_mnist(n=7, h=5, w=6, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, h, w), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def cifar_batch_bytes(x_NHWC, y_N):
    d = {
        b"batch_label": b"fixture",
        b"labels": [int(v) for v in y_N],
        b"data": np.ascontiguousarray(x_NHWC.transpose(0, 3, 1, 2).reshape(len(x_NHWC), 3072)),
        b"filenames": [b"f%d.png" % i for i in range(len(x_NHWC))],
    }
    return pickle.dumps(d, protocol=2)


def tiny_cifar(n, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n).astype(
        np.int32
    )


def write_cifar_batches(bdir, train_parts, test):
    bdir.mkdir(parents=True, exist_ok=True)
    for i, (x, y) in enumerate(train_parts, 1):
        (bdir / f"data_batch_{i}").write_bytes(cifar_batch_bytes(x, y))
    (bdir / "test_batch").write_bytes(cifar_batch_bytes(*test))


def png_bytes(a_HWC):
    buf = io.BytesIO()
    Image.fromarray(a_HWC.squeeze(-1) if a_HWC.shape[-1] == 1 else a_HWC).save(buf, format="PNG")
    return buf.getvalue()


def image_tree(
    split_counts, *, classes=("cat", "airplane", "truck"), size=(32, 32), channels=3, seed=0
):
    """{relative path: pixels} for <split>/<class>/<i>.png."""
    rng = np.random.default_rng(seed)
    files = {}
    for split, n_per_class in split_counts.items():
        for cls in classes:
            for i in range(n_per_class):
                files[f"{split}/{cls}/{i:04d}.png"] = rng.integers(
                    0, 256, size + (channels,), dtype=np.uint8
                )
    return files


def expected_from_tree(files, split, classes_order):
    items = sorted(
        (
            (classes_order.index(p.split("/")[-2]), p.split("/")[-1], a)
            for p, a in files.items()
            if p.split("/")[-3] == split
        ),
        key=lambda t: (t[0], t[1]),
    )
    return np.stack([a for _, _, a in items]), np.array([c for c, _, _ in items], np.int32)


def write_tree(root, files):
    for rel, a in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(png_bytes(a))


def write_tar(path, files, *, prefix="", fmt=tarfile.PAX_FORMAT, pax_headers=None, gz=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz" if gz else "w", format=fmt, pax_headers=pax_headers or {}) as tf:
        for rel, a in sorted(files.items()):
            b = a if isinstance(a, bytes) else png_bytes(a)
            info = tarfile.TarInfo(prefix + rel)
            info.size = len(b)
            tf.addfile(info, io.BytesIO(b))


# --------------------------------------------------------------------------- #
# MNIST-format IDX
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("gz", [True, False], ids=["gzip", "raw"])
@pytest.mark.parametrize("dirname", ["mnist", "MNIST/raw"])
def test_idx_loader(tmp_path, gz, dirname):
    xtr, ytr = tiny_mnist(7, seed=1)
    xte, yte = tiny_mnist(3, seed=2)
    write_idx_set(tmp_path / "d" / dirname, "train", xtr, ytr, gz=gz)
    write_idx_set(tmp_path / "d" / dirname, "test", xte, yte, gz=gz)
    for split, (x, y) in {"train": (xtr, ytr), "test": (xte, yte)}.items():
        xi, yi = data.load("mnist", split, tmp_path / "d", progress=False)
        assert xi.dtype == np.uint8 and xi.shape == x.shape + (1,)
        assert yi.dtype == np.int32
        np.testing.assert_array_equal(xi[..., 0], x)
        np.testing.assert_array_equal(yi, y)


@pytest.mark.parametrize("dirname", ["fashion_mnist", "fashion-mnist"])
def test_fashion_mnist_dir_names(tmp_path, dirname):
    x, y = tiny_mnist(4)
    write_idx_set(tmp_path / dirname, "test", x, y)
    for name in ("fashion_mnist", "fashion-mnist"):
        xi, yi = data.load(name, "test", tmp_path, progress=False)
        np.testing.assert_array_equal(xi[..., 0], x)
    with pytest.raises(DataNotFoundError):  # fashion files are not MNIST
        data.load("mnist", "test", tmp_path, download=False)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    x, y = tiny_mnist(4)
    write_idx_set(tmp_path / "env" / "mnist", "test", x, y)
    monkeypatch.setenv("GBJAX_DATA_DIR", str(tmp_path / "env"))
    np.testing.assert_array_equal(data.load("mnist", "test", progress=False)[1], y)


def test_bad_name_and_split():
    with pytest.raises(ValueError, match="name"):
        data.load("imagenet", "train")
    with pytest.raises(ValueError, match="split"):
        data.load("mnist", "validation")


def test_public_api():
    want = {
        "load",
        "load_image_folder",
        "DATASETS",
        "SPLITS",
        "CIFAR10_CLASSES",
        "IMAGE_EXTENSIONS",
        "DataNotFoundError",
        "CorruptDataError",
        "gb_processed",
        "random_subset",
        "fixed_batches",
        "map_batches",
    }
    assert set(data.__all__) == want
    assert all(hasattr(data, n) for n in want)
    assert data.load is sources.load and data.CorruptDataError is decode.CorruptDataError
    assert data.DATASETS == ("mnist", "fashion_mnist", "cifar10") and data.SPLITS == (
        "train",
        "test",
    )


# --------------------------------------------------------------------------- #
# CIFAR-10: python batches and image folders
# --------------------------------------------------------------------------- #


@pytest.fixture
def cifar_batches():
    train = [tiny_cifar(3, seed) for seed in range(5)]
    test = tiny_cifar(4, 9)
    want = {
        "train": (np.concatenate([p[0] for p in train]), np.concatenate([p[1] for p in train])),
        "test": test,
    }
    return train, test, want


@pytest.mark.parametrize("layout", ["extracted", "tar.gz"])
def test_cifar_python_batches(tmp_path, cifar_batches, layout):
    train, test, want = cifar_batches
    bdir = tmp_path / "src" / "cifar-10-batches-py"
    write_cifar_batches(bdir, train, test)
    root = tmp_path / "d"
    if layout == "extracted":
        shutil.copytree(bdir, root / "cifar10" / "cifar-10-batches-py")
    else:
        (root / "cifar10").mkdir(parents=True)
        with tarfile.open(root / "cifar10" / "cifar-10-python.tar.gz", "w:gz") as tf:
            tf.add(bdir, arcname="cifar-10-batches-py")
    for split in ("train", "test"):
        x, y = data.load("cifar10", split, root, progress=False)
        assert x.shape == want[split][0].shape and x.dtype == np.uint8 and y.dtype == np.int32
        np.testing.assert_array_equal(x, want[split][0])  # NCHW rows -> NHWC, exactly
        np.testing.assert_array_equal(y, want[split][1])


def test_cifar_batch_unpickler_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    d = tmp_path / "cifar10" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    (d / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(CorruptDataError, match="test_batch"):
        data.load("cifar10", "test", tmp_path, progress=False)


FILES = image_tree({"train": 3, "test": 2})
CANON = list(data.CIFAR10_CLASSES)


@pytest.mark.parametrize(
    "layout", ["folder", "nested folder", "tar.gz", "tar", "gnu tar", "pax tar", "git-archive tar"]
)
def test_cifar_image_folder(tmp_path, layout):
    d = tmp_path / "cifar10"
    d.mkdir()
    if layout == "folder":
        write_tree(d, FILES)
    elif layout == "nested folder":
        write_tree(d / "cifar10-png", FILES)
    elif layout == "tar.gz":
        write_tar(d / "cifar10-png.tar.gz", FILES, prefix="cifar10-png/")
    elif layout == "tar":
        write_tar(d / "images.tar", FILES, gz=False)
    elif layout == "gnu tar":  # long names force GNU longname headers
        write_tar(d / "x.tgz", FILES, prefix="a" * 120 + "/", fmt=tarfile.GNU_FORMAT)
    elif layout == "pax tar":  # long names in pax "path" records
        write_tar(d / "x.tgz", FILES, prefix="b" * 120 + "/", fmt=tarfile.PAX_FORMAT)
    else:  # a pax global header with a comment, as `git archive` writes
        write_tar(
            d / "x.tar.gz", FILES, prefix="cifar10-jpeg/", pax_headers={"comment": "0123abcd"}
        )
    for split in ("train", "test"):
        x, y = data.load("cifar10", split, tmp_path, progress=False)
        want_x, want_y = expected_from_tree(FILES, split, CANON)
        assert set(np.unique(y)) == {0, 3, 9}  # airplane, cat, truck in CIFAR-10 order
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(x, want_x)


def test_cifar_image_folder_skips_hidden_and_other_files(tmp_path):
    files = dict(FILES)
    files["test/cat/._0000.png"] = b"AppleDouble junk"
    files["test/README.txt"] = b"not an image"
    write_tar(tmp_path / "cifar10" / "a.tar.gz", files)
    x, y = data.load("cifar10", "test", tmp_path, progress=False)
    np.testing.assert_array_equal(x, expected_from_tree(FILES, "test", CANON)[0])


def test_cifar_image_folder_unknown_class(tmp_path):
    files = {"test/dragon/0.png": np.zeros((32, 32, 3), np.uint8)}
    write_tree(tmp_path / "cifar10", files)
    with pytest.raises(CorruptDataError, match="dragon"):
        data.load("cifar10", "test", tmp_path, progress=False)


def test_archive_without_the_split_is_skipped(tmp_path):
    write_tar(
        tmp_path / "cifar10" / "only-train.tar.gz",
        {k: v for k, v in FILES.items() if k.startswith("train")},
    )
    with pytest.raises(DataNotFoundError, match="holds no 'test' images"):
        data.load("cifar10", "test", tmp_path, download=False)
    assert data.load("cifar10", "train", tmp_path, progress=False)[0].shape == (9, 32, 32, 3)


# --------------------------------------------------------------------------- #
# load_image_folder
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("as_tar", [False, True])
def test_load_image_folder(tmp_path, as_tar):
    files = {k[len("train/") :]: v for k, v in FILES.items() if k.startswith("train/")}
    if as_tar:
        path = tmp_path / "mine.tar.gz"
        write_tar(path, files, prefix="mine/")
    else:
        path = tmp_path / "mine"
        write_tree(path, files)
    x, y = data.load_image_folder(path, progress=False)
    sorted_classes = ["airplane", "cat", "truck"]
    want_x, want_y = expected_from_tree(
        {"s/" + k: v for k, v in files.items()}, "s", sorted_classes
    )
    np.testing.assert_array_equal(x, want_x)
    np.testing.assert_array_equal(y, want_y)
    # explicit class order
    x2, y2 = data.load_image_folder(path, classes=["truck", "cat", "airplane"], progress=False)
    np.testing.assert_array_equal(y2, np.sort(2 - want_y))
    with pytest.raises(CorruptDataError, match="truck"):
        data.load_image_folder(path, classes=["cat", "airplane"], progress=False)


def test_load_image_folder_grayscale_and_cache(tmp_path):
    files = image_tree({"s": 2}, classes=("a", "b"), size=(5, 7), channels=1)
    write_tree(tmp_path / "g", {k[2:]: v for k, v in files.items()})
    x, y = data.load_image_folder(tmp_path / "g", cache_dir=tmp_path / "c", progress=False)
    assert x.shape == (4, 5, 7, 1)
    np.testing.assert_array_equal(x, expected_from_tree(files, "s", ["a", "b"])[0])
    assert len(list((tmp_path / "c").glob("*.npz"))) == 1
    x2, _ = data.load_image_folder(tmp_path / "g", cache_dir=tmp_path / "c", progress=False)
    np.testing.assert_array_equal(x2, x)


def test_load_image_folder_size_mismatch_names_the_file(tmp_path):
    write_tree(
        tmp_path / "m",
        {"a/0.png": np.zeros((8, 8, 3), np.uint8), "b/1.png": np.zeros((9, 8, 3), np.uint8)},
    )
    with pytest.raises(CorruptDataError, match=r"1\.png"):
        data.load_image_folder(tmp_path / "m", progress=False)


def test_load_image_folder_wrong_depth(tmp_path):
    write_tree(tmp_path / "w", {"train/a/0.png": np.zeros((8, 8, 3), np.uint8)})
    with pytest.raises(ValueError, match="<class>/<image>"):
        data.load_image_folder(tmp_path / "w", progress=False)


def _png16(path, arr):
    """A 16-bit PNG (greyscale or RGB), written by hand (Pillow cannot write 16-bit RGB)."""
    h, w = arr.shape[:2]
    colour = 2 if arr.ndim == 3 else 0
    raw = b"".join(b"\x00" + arr[r].astype(">u2").tobytes() for r in range(h))

    def chunk(tag, body):
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(raw))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_load_image_folder_refuses_16_bit_images(tmp_path, channels):
    write_tree(tmp_path / "f", {"a/0.png": np.zeros((4, 4, channels), np.uint8)})
    deep = np.full((4, 4) + ((3,) if channels == 3 else ()), 40000, np.uint16)
    _png16(tmp_path / "f" / "b" / "1.png", deep)
    with pytest.raises(ValueError, match=r"(?s)b/1\.png: image with 16-bit.*8 bits first"):
        data.load_image_folder(tmp_path / "f", progress=False)


def test_load_image_folder_unreadable_class_folder_is_an_error(tmp_path, monkeypatch):
    tree = image_tree({"s": 1}, classes=("a", "b", "c"), size=(4, 4))
    write_tree(tmp_path / "f", {k[2:]: v for k, v in tree.items()})
    with unreadable(tmp_path / "f" / "b", monkeypatch):
        with pytest.raises(CorruptDataError, match="cannot read folder .*/f/b"):
            data.load_image_folder(tmp_path / "f", progress=False)
        with pytest.raises(CorruptDataError, match="f/b"):  # the cached path too
            data.load_image_folder(tmp_path / "f", cache_dir=tmp_path / "c", progress=False)
    assert not list((tmp_path).glob("c/*.npz"))


def test_load_image_folder_follows_symlinked_class_folders(tmp_path):
    tree = image_tree({"s": 2}, classes=("a", "b", "c"), size=(4, 4))
    write_tree(tmp_path / "f", {k[2:]: v for k, v in tree.items() if "/b/" not in k})
    write_tree(tmp_path / "elsewhere", {k[2:]: v for k, v in tree.items() if "/b/" in k})
    (tmp_path / "f" / "b").symlink_to(tmp_path / "elsewhere" / "b", target_is_directory=True)
    (tmp_path / "f" / "a" / "loop").symlink_to(tmp_path / "f", target_is_directory=True)
    want_x, want_y = expected_from_tree(tree, "s", ["a", "b", "c"])
    for cache_dir in (None, tmp_path / "c"):
        x, y = data.load_image_folder(tmp_path / "f", cache_dir=cache_dir, progress=False)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(x, want_x)


def test_load_image_folder_refuses_what_would_shift_labels(tmp_path):
    tree = image_tree({"s": 1}, classes=("a", "b", "c"), size=(4, 4))
    write_tree(tmp_path / "f", {k[2:]: v for k, v in tree.items()})
    with pytest.raises(ValueError, match=r"\['a'\] appear more than once"):
        data.load_image_folder(tmp_path / "f", classes=["a", "b", "a", "c"], progress=False)
    with pytest.raises(ValueError, match="not .*string|the string"):
        data.load_image_folder(tmp_path / "f", classes="abc", progress=False)
    (tmp_path / "f" / "b0_empty").mkdir()  # sorts between a and b: would renumber b, c
    with pytest.raises(ValueError, match=r"\['b0_empty'\] hold no images"):
        data.load_image_folder(tmp_path / "f", progress=False)
    _, y = data.load_image_folder(tmp_path / "f", classes=["a", "b0_empty", "b", "c"])
    np.testing.assert_array_equal(y, [0, 2, 3])  # explicit classes: an empty one is fine


@pytest.mark.parametrize("bad", [10, 200, 255])
def test_idx_labels_out_of_range_are_refused(tmp_path, bad):
    x, y = tiny_mnist(5)
    y[3] = bad
    write_idx_set(tmp_path / "mnist", "test", x, y)
    with pytest.raises(CorruptDataError, match=rf"(?s)t10k-labels.*label {bad} at index 3.*0\.\.9"):
        data.load("mnist", "test", tmp_path, progress=False)
    assert cache_files(tmp_path) == []


def test_tfds_labels_out_of_range_are_refused(tmp_path, monkeypatch):
    x, y = tiny_mnist(5)
    y[0] = 200
    fake = types.ModuleType("tensorflow_datasets")
    fake.__version__ = "0.fake"
    fake.load = lambda name, **kw: (x[..., None], y)
    fake.as_numpy = lambda ds: ds
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.setitem(sys.modules, "tensorflow", None)
    with pytest.raises(CorruptDataError, match="label 200 at index 0"):
        data.load("mnist", "test", download=False, progress=False)


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #


def test_cache_hit_skips_decoding(tmp_path, monkeypatch):
    x, y = tiny_mnist(4)
    write_idx_set(tmp_path / "mnist", "test", x, y)
    first = data.load("mnist", "test", tmp_path, progress=False)
    assert len(cache_files(tmp_path)) == 1 and cache_files(tmp_path)[0].endswith(".npz")

    def boom(*a):
        raise AssertionError("decoded again despite a cache entry")

    monkeypatch.setattr(sources, "decode_idx_pair", boom)
    second = data.load("mnist", "test", tmp_path, progress=False)
    np.testing.assert_array_equal(second[0], first[0])
    np.testing.assert_array_equal(second[1], first[1])
    # an explicit cache_dir wins over $GBJAX_CACHE_DIR
    monkeypatch.undo()
    data.load("mnist", "test", tmp_path, cache_dir=tmp_path / "other", progress=False)
    assert len(list((tmp_path / "other").glob("*.npz"))) == 1


def test_changed_source_is_not_served_stale(tmp_path):
    d = tmp_path / "mnist"
    x, y = tiny_mnist(4, seed=1)
    write_idx_set(d, "test", x, y)
    data.load("mnist", "test", tmp_path, progress=False)
    x2, y2 = tiny_mnist(4, seed=2)  # same sizes: only content (and mtime) change
    write_idx_set(d, "test", x2, y2)
    st = (d / "t10k-images-idx3-ubyte.gz").stat()
    os.utime(d / "t10k-images-idx3-ubyte.gz", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    xi, yi = data.load("mnist", "test", tmp_path, progress=False)
    np.testing.assert_array_equal(xi[..., 0], x2)
    assert len(cache_files(tmp_path)) == 1  # the stale entry was replaced


def test_unreadable_cache_entry_is_rebuilt(tmp_path):
    x, y = tiny_mnist(4)
    write_idx_set(tmp_path / "mnist", "test", x, y)
    data.load("mnist", "test", tmp_path, progress=False)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    entry.write_bytes(entry.read_bytes()[:50])  # truncated cache file
    with pytest.warns(UserWarning, match="corrupt or unreadable cache entry"):
        xi, _ = data.load("mnist", "test", tmp_path, progress=False)
    np.testing.assert_array_equal(xi[..., 0], x)
    data.load("mnist", "test", tmp_path, progress=False)  # rebuilt: no warning now


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_cache_write_is_atomic(tmp_path, monkeypatch, error):
    x, y = tiny_mnist(4)
    write_idx_set(tmp_path / "mnist", "test", x, y)
    real_savez = np.savez

    def savez_then_fail(f, **arrays):
        real_savez(f, **arrays)
        f.write(b"partial")
        raise error

    monkeypatch.setattr(np, "savez", savez_then_fail)
    if isinstance(error, OSError):  # cache trouble only warns; the data still loads
        with pytest.warns(UserWarning, match="could not write cache"):
            xi, _ = data.load("mnist", "test", tmp_path, progress=False)
        np.testing.assert_array_equal(xi[..., 0], x)
    else:
        with pytest.raises(KeyboardInterrupt):
            data.load("mnist", "test", tmp_path, progress=False)
    assert cache_files(tmp_path) == []  # no entry, no temp file


def test_save_arrays_round_trips_and_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "derived" / "gb-images.npz"  # the folder is created
    arrays = {"x": np.arange(6, dtype=np.float32).reshape(2, 3), "n": np.array(3)}
    cache.save_arrays(path, arrays)
    got = cache.load_arrays(path)
    assert list(got) == ["x", "n"]
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    real_savez = np.savez

    def savez_then_fail(f, **a):
        real_savez(f, **a)
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", savez_then_fail)
    with pytest.raises(OSError, match="disk full"):
        cache.save_arrays(path, {"x": np.zeros(1)})
    assert os.listdir(path.parent) == ["gb-images.npz"]  # old file kept, no temp file
    np.testing.assert_array_equal(cache.load_arrays(path)["x"], arrays["x"])
    monkeypatch.undo()
    with pytest.raises(ValueError, match="dtype object"):  # would be pickled: refused
        cache.save_arrays(path, {"o": np.array([{}], dtype=object)})
    np.savez(path, o=np.array([{}], dtype=object))
    with pytest.raises(ValueError):  # pickled objects are refused on reading
        cache.load_arrays(path, verify=False)


def _find_all(blob, sub):
    i = blob.find(sub)
    while i >= 0:
        yield i
        i = blob.find(sub, i + 1)


def test_load_arrays_verifies_the_checksum(tmp_path):
    path = tmp_path / "a.npz"
    arrays = {"images": RNG.integers(0, 256, (6, 5, 5, 1), dtype=np.uint8), "labels": np.arange(6)}
    cache.save_arrays(path, arrays)
    blob = path.read_bytes()
    names = [m + k for k in range(len(b"labels")) for m in _find_all(blob, b"labels")]
    for i in sorted(set(range(0, len(blob), 3)) | set(names)):  # refused, or the same arrays
        bad = bytearray(blob)
        bad[i] ^= 0x10
        path.write_bytes(bytes(bad))
        try:
            got = cache.load_arrays(path)
        except Exception:
            continue
        assert list(got) == list(arrays), i
        for k, v in arrays.items():
            assert got[k].dtype == v.dtype and np.array_equal(got[k], v), (i, k)
    # a valid .npz without a checksum (another writer, bit rot re-zipped): refused
    np.savez(path, **arrays)
    with pytest.raises(CorruptDataError, match="no __sha256__ checksum.*verify=False"):
        cache.load_arrays(path)
    np.testing.assert_array_equal(cache.load_arrays(path, verify=False)["labels"], np.arange(6))
    with pytest.raises(ValueError, match="reserved"):
        cache.save_arrays(path, {"__sha256__": np.zeros(1)})


def test_rewritten_data_cache_entry_is_rebuilt_not_served(tmp_path):
    x, y = tiny_mnist(4)
    write_idx_set(tmp_path / "mnist", "test", x, y)
    data.load("mnist", "test", tmp_path, progress=False)
    (entry,) = (tmp_path / "cache").glob("*.npz")
    z = cache.load_arrays(entry)
    np.savez(entry, images=255 - z["images"], labels=z["labels"])  # valid zip, wrong pixels
    with pytest.warns(UserWarning, match="corrupt or unreadable cache entry"):
        xi, _ = data.load("mnist", "test", tmp_path, progress=False)
    np.testing.assert_array_equal(xi[..., 0], x)
    cache.load_arrays(entry)  # rebuilt, with a checksum


def _fake_gb(monkeypatch):
    """gb_denoise replaced by a cheap stand-in that counts its calls."""
    import gbjax.gb

    calls = []
    monkeypatch.setattr(
        gbjax.gb, "gb_denoise", lambda x, progress=True, **kw: calls.append(1) or 255 - x
    )
    return calls


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "no checksum", "legacy npy"])
def test_gb_cache_is_verified_on_read(tmp_path, monkeypatch, damage):
    calls = _fake_gb(monkeypatch)
    x = RNG.integers(0, 256, (3, 6, 6, 1), dtype=np.uint8)
    kw = dict(cache_dir=tmp_path / "gb", threshold=20.0, progress=False)
    np.testing.assert_array_equal(data.gb_processed(x, **kw), 255 - x)
    np.testing.assert_array_equal(data.gb_processed(x, **kw), 255 - x)
    assert len(calls) == 1  # served from the cache
    (entry,) = (tmp_path / "gb").glob("gb_*.npz")
    blob = entry.read_bytes()
    if damage == "flipped byte":
        i = blob.index((255 - x).tobytes()) + 50
        entry.write_bytes(blob[:i] + bytes([blob[i] ^ 1]) + blob[i + 1 :])
    elif damage == "truncated":
        entry.write_bytes(blob[: len(blob) // 2])
    elif damage == "no checksum":
        np.savez(entry, images=np.zeros_like(x))
    else:  # an unverified .npy entry of the earlier format is never served
        entry.unlink()
        np.save(entry.with_suffix(".npy"), np.zeros_like(x))
    if damage == "legacy npy":
        out = data.gb_processed(x, **kw)
        assert not entry.with_suffix(".npy").exists()  # replaced by the verified entry
    else:
        with pytest.warns(UserWarning, match="GB cache entry .* corrupt or unreadable"):
            out = data.gb_processed(x, **kw)
    np.testing.assert_array_equal(out, 255 - x)
    assert len(calls) == 2
    np.testing.assert_array_equal(cache.load_arrays(entry)["images"], 255 - x)  # rebuilt
    assert preprocess.gb_processed is data.gb_processed


# --------------------------------------------------------------------------- #
# Corrupt files
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("damage", ["truncated gzip", "truncated raw", "bad magic", "label count"])
def test_corrupt_idx_names_the_file_and_caches_nothing(tmp_path, damage):
    d = tmp_path / "mnist"
    x, y = tiny_mnist(6)
    gz = damage == "truncated gzip"
    write_idx_set(d, "test", x, y, gz=gz)
    images = d / ("t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    bad = images
    if damage in ("truncated gzip", "truncated raw"):
        images.write_bytes(images.read_bytes()[:-20])
    elif damage == "bad magic":
        images.write_bytes(b"\x12\x34" + images.read_bytes()[2:])
    else:
        write_idx_set(d, "test", x, y[:5], gz=gz)
    with pytest.raises(CorruptDataError, match=bad.name):
        data.load("mnist", "test", tmp_path, progress=False)
    assert cache_files(tmp_path) == []


def test_truncated_archive_and_bad_image_name_the_file(tmp_path):
    d = tmp_path / "cifar10"
    write_tar(d / "imgs.tar.gz", FILES)
    blob = (d / "imgs.tar.gz").read_bytes()
    (d / "imgs.tar.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptDataError, match="imgs.tar.gz"):
        data.load("cifar10", "test", tmp_path, progress=False)
    files = dict(FILES)
    files["test/cat/0001.png"] = png_bytes(FILES["test/cat/0001.png"])[:40]
    write_tar(d / "imgs.tar.gz", files)
    with pytest.raises(CorruptDataError, match="test/cat/0001.png"):
        data.load("cifar10", "test", tmp_path, progress=False)
    assert cache_files(tmp_path) == []


def test_truncated_plain_tar_names_the_file(tmp_path):
    path = tmp_path / "cifar10" / "imgs.tar"
    write_tar(path, FILES, gz=False)
    with tarfile.open(path) as tf:
        m = [m for m in tf.getmembers() if m.isfile()][len(FILES) // 2]
    blob = path.read_bytes()
    path.write_bytes(blob[: m.offset_data + m.size // 2])  # cut inside a member's data
    with pytest.raises(CorruptDataError, match=r"imgs\.tar.*truncated"):
        data.load("cifar10", "test", tmp_path, progress=False)
    assert cache_files(tmp_path) == []


# --------------------------------------------------------------------------- #
# Not found; tensorflow-datasets; download
# --------------------------------------------------------------------------- #


def test_not_found_lists_every_place_tried(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError) as e:
        data.load("cifar10", "test", tmp_path / "empty", download=False)
    msg = str(e.value)
    for part in (
        str(tmp_path / "empty" / "cifar10"),
        "tensorflow-datasets",
        str(tmp_path / "cache" / "downloads"),
        "cifar-10-python.tar.gz",
        "download=False",
        "GBJAX_DATA_DIR",
    ):
        assert part in msg, part
    with pytest.raises(DataNotFoundError, match=r"(?s)data_dir=None.*network disabled in tests"):
        data.load("mnist", "train")  # no data_dir, no env: the failed download is listed too


def test_tensorflow_datasets_path(tmp_path, monkeypatch):
    x, y = tiny_mnist(5)
    calls = []
    fake = types.ModuleType("tensorflow_datasets")
    fake.__version__ = "0.fake"
    fake.load = lambda name, **kw: calls.append((name, kw)) or (x[..., None], y)
    fake.as_numpy = lambda ds: ds
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    monkeypatch.setitem(sys.modules, "tensorflow", None)  # the GPU-hiding step must tolerate no TF
    xi, yi = data.load("mnist", "test", progress=False)
    np.testing.assert_array_equal(xi[..., 0], x)
    assert yi.dtype == np.int32 and calls[0][0] == "mnist" and calls[0][1]["split"] == "test"
    data.load("mnist", "test", progress=False)
    assert len(calls) == 1  # cached


def test_download_path(tmp_path, monkeypatch):
    x, y = tiny_mnist(5)
    src = tmp_path / "server"
    write_idx_set(src, "test", x, y)
    files = {
        f: (src / f).read_bytes()
        for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    }
    fetched = []

    def fake_fetch(url, dest, progress):
        fetched.append(url)
        with open(dest, "wb") as f:
            f.write(files[url.rsplit("/", 1)[-1]])

    table = {
        f: ((f"https://example.invalid/{f}",), ("md5", hashlib.md5(b).hexdigest()))
        for f, b in files.items()
    }
    monkeypatch.setitem(sources._DOWNLOADS, "mnist", table)
    monkeypatch.setattr(sources, "_fetch", fake_fetch)
    xi, yi = data.load("mnist", "test", progress=False)
    np.testing.assert_array_equal(xi[..., 0], x)
    assert sorted(os.listdir(tmp_path / "cache" / "downloads" / "mnist")) == sorted(files)
    n = len(fetched)
    data.load("mnist", "test", progress=False)
    assert len(fetched) == n == 2  # nothing fetched twice

    # a checksum mismatch is an error naming the URL, and leaves no file behind
    shutil.rmtree(tmp_path / "cache")
    monkeypatch.setitem(
        table,
        "t10k-labels-idx1-ubyte.gz",
        (("https://example.invalid/t10k-labels-idx1-ubyte.gz",), ("md5", "0" * 32)),
    )
    with pytest.raises(CorruptDataError, match="t10k-labels-idx1-ubyte.gz.*checksum"):
        data.load("mnist", "test", progress=False)
    assert "t10k-labels-idx1-ubyte.gz" not in os.listdir(tmp_path / "cache" / "downloads" / "mnist")
    assert not [
        f for f in os.listdir(tmp_path / "cache" / "downloads" / "mnist") if f.endswith(".part")
    ]


# --------------------------------------------------------------------------- #
# Real data, via $GBJAX_DATA_DIR (skipped when absent)
# --------------------------------------------------------------------------- #

REAL = os.environ.get("GBJAX_DATA_DIR")  # read before the autouse fixture unsets it


@pytest.fixture
def real_dir():
    if not REAL:
        pytest.skip("GBJAX_DATA_DIR not set")
    return REAL


def test_published_checksums_match_shared_copies(real_dir):
    """The download table's sums match the original MNIST files in the shared data."""
    if not os.path.isdir(os.path.join(real_dir, "mnist")):
        pytest.skip(f"no mnist/ in {real_dir}")
    # (the shared train-images file was rebuilt from a PNG export, so it differs)
    for f in (
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        algo, want = sources._DOWNLOADS["mnist"][f][1]
        assert sources._file_digest(os.path.join(real_dir, "mnist", f), algo) == want


def test_real_mnist(real_dir):
    if not os.path.isdir(os.path.join(real_dir, "mnist")):
        pytest.skip(f"no mnist/ in {real_dir}")
    x, y = data.load("mnist", "test", real_dir, progress=False)
    assert x.shape == (10000, 28, 28, 1) and x.dtype == np.uint8
    np.testing.assert_array_equal(y[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
    x, y = data.load("mnist", "train", real_dir, progress=False)
    assert x.shape == (60000, 28, 28, 1)
    np.testing.assert_array_equal(y[:5], [5, 0, 4, 1, 9])


def test_real_cifar10_test_split(real_dir, monkeypatch):
    if not os.path.isdir(os.path.join(real_dir, "cifar10")):
        pytest.skip(f"no cifar10/ in {real_dir}")
    x, y = data.load("cifar10", "test", real_dir, progress=False)  # decodes 10k JPEGs once
    assert x.shape == (10000, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    assert 100 < x.mean() < 140  # natural images, not zeros
    # the second load is served from the cache: decoding would now fail
    monkeypatch.setattr(_decode, "decode_entries", lambda *a, **k: 1 / 0)
    x2, y2 = data.load("cifar10", "test", real_dir, progress=False)
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)

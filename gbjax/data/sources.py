"""Finding a data set's source: :func:`load`, :func:`load_image_folder` and their search.

:func:`load` tries, in order, and returns the first source that holds the split:

1. A local directory (``data_dir``, else ``$GBJAX_DATA_DIR``), searched as
   ``<dir>/<alias>/`` and ``<dir>/<alias>/raw/`` for each directory alias of the
   data set (:data:`_DIR_ALIASES`). Each directory yields *candidates*
   (:class:`_Candidate`): IDX file pairs for the MNISTs; for CIFAR-10 the python
   batches (extracted or ``cifar-10-python.tar.gz``), an image folder
   ``[<prefix>/]<split>/<class>/``, and every other ``.tar[.gz]``/``.tgz`` as a
   possible image-folder archive.
2. ``tensorflow-datasets``, when importable (TensorFlow is kept off the GPU).
3. Earlier downloads in ``<cache>/downloads/<name>/``, then a fresh download from
   the canonical mirrors (:data:`_DOWNLOADS`), each file verified against its
   published checksum before it is moved into place.

Every candidate is decoded through the cache (``gbjax/data/_entries.py``)
by a decoder from ``gbjax/data/_decode.py``. Each miss is recorded, so that a
:class:`DataNotFoundError` lists every place tried and how to supply the data;
a :class:`~gbjax.data.decode.CorruptDataError` stops the search at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import urllib.request
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from gbjax import _files
from gbjax._checks import check_int
from gbjax.data._decode import (
    Arrays,
    CorruptDataError,
    archive_entries,
    check_classes,
    check_labels,
    class_folders,
    decode_cifar_batches_dir,
    decode_cifar_batches_tar,
    decode_cifar_image_folder,
    decode_cifar_image_tar,
    decode_entries,
    decode_idx_pair,
    folder_entries,
)
from gbjax.data._entries import cached

#: Data set names :func:`load` accepts (``"fashion-mnist"`` is also accepted).
DATASETS = ("mnist", "fashion_mnist", "cifar10")
#: Split names :func:`load` accepts.
SPLITS = ("train", "test")

_DIR_ALIASES = {
    "mnist": ("mnist", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST", "fashionmnist"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10", "CIFAR-10"),
}

_IDX_PREFIX = {"train": "train", "test": "t10k"}

#: Number of classes of each data set: labels outside ``0..n-1`` are refused.
_NUM_CLASSES = {"mnist": 10, "fashion_mnist": 10, "cifar10": 10}

# Canonical download locations and their published MD5 sums (the MNIST and
# Fashion-MNIST sums are the ones torchvision and the data sets' pages publish;
# CIFAR-10's is on https://www.cs.toronto.edu/~kriz/cifar.html). Each entry maps a
# file name to (mirror URLs tried in order, (hash algorithm, hex digest)).
_MNIST_MIRRORS = (
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "https://storage.googleapis.com/cvdf-datasets/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
)
_FASHION_MIRRORS = ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",)
_DOWNLOADS: dict[str, dict[str, tuple[tuple[str, ...], tuple[str, str]]]] = {
    "mnist": {
        f: (tuple(m + f for m in _MNIST_MIRRORS), ("md5", h))
        for f, h in (
            ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
            ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432"),
            ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3"),
            ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c"),
        )
    },
    "fashion_mnist": {
        f: (tuple(m + f for m in _FASHION_MIRRORS), ("md5", h))
        for f, h in (
            ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
            ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
            ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
            ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
        )
    },
    "cifar10": {
        "cifar-10-python.tar.gz": (
            ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
            ("md5", "c58f30108f718f92721af3b95e74349a"),
        ),
    },
}

_SUPPLY_HINT = (
    "To supply the data: put the files in <DIR>/{name}/ ({layout}) and pass "
    "data_dir=<DIR> or set GBJAX_DATA_DIR=<DIR>; or `pip install tensorflow-datasets`; "
    "or call load(..., download=True) on a machine with internet access."
)
_LAYOUT = {
    "mnist": "the four IDX files, e.g. train-images-idx3-ubyte.gz, gzip or raw",
    "fashion_mnist": "the four IDX files, e.g. train-images-idx3-ubyte.gz, gzip or raw",
    "cifar10": (
        "cifar-10-python.tar.gz, or the extracted cifar-10-batches-py/, or an image "
        "folder train|test/<class>/*.png|jpg as a folder or inside a .tar.gz"
    ),
}


class DataNotFoundError(FileNotFoundError):
    """A data set was found in none of the places :func:`load` searches."""


# --------------------------------------------------------------------------- #
# Public loaders
# --------------------------------------------------------------------------- #


def load(
    name: str,
    split: str,
    data_dir: str | os.PathLike | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    progress: bool = True,
) -> Arrays:
    """Load a data set split as ``(images_NHWC uint8, labels_N int32)``.

    Args:
      name: ``"mnist"``, ``"fashion_mnist"`` (``"fashion-mnist"`` accepted) or
        ``"cifar10"``.
      split: ``"train"`` or ``"test"``.
      data_dir: directory holding ``<name>/``; defaults to ``$GBJAX_DATA_DIR``.
      cache_dir: where decoded arrays (and downloads) go; defaults to
        ``$GBJAX_CACHE_DIR``, else ``~/.cache/gbjax``.
      download: allow downloading from the canonical address as a last resort.
      progress: show a tqdm progress bar while decoding or downloading.

    Returns:
      ``images`` of shape (N, 28, 28, 1) for the MNISTs or (N, 32, 32, 3) for
      CIFAR-10, dtype uint8, and ``labels`` of shape (N,), dtype int32.

    Raises:
      ValueError: unknown ``name`` or ``split``.
      DataNotFoundError: found nowhere; the message lists every place tried.
      CorruptDataError: a file was found but is corrupt or truncated.

    Example:
      Two MNIST test images written as IDX files into a data folder:

      >>> import os, struct, tempfile
      >>> import numpy as np
      >>> from gbjax import data
      >>> x = np.zeros((2, 28, 28), np.uint8)
      >>> with tempfile.TemporaryDirectory() as d:
      ...     os.makedirs(f"{d}/mnist")
      ...     with open(f"{d}/mnist/t10k-images-idx3-ubyte", "wb") as f:
      ...         _ = f.write(struct.pack(">IIII", 2051, 2, 28, 28) + x.tobytes())
      ...     with open(f"{d}/mnist/t10k-labels-idx1-ubyte", "wb") as f:
      ...         _ = f.write(struct.pack(">II", 2049, 2) + bytes([7, 2]))
      ...     images, labels = data.load("mnist", "test", d, cache_dir=d, progress=False)
      >>> images.shape, images.dtype, labels.tolist()
      ((2, 28, 28, 1), dtype('uint8'), [7, 2])
    """
    name = _canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache_root = os.fspath(_files.cache_root(cache_dir))
    tried: list[str] = []

    # 1. a local directory
    root = data_dir if data_dir is not None else os.environ.get("GBJAX_DATA_DIR")
    where = "data_dir" if data_dir is not None else "$GBJAX_DATA_DIR"
    if root:
        out = _load_from_root(name, split, os.fspath(root), where, cache_root, progress, tried)
        if out is not None:
            return out
    else:
        tried.append("local directory: none given (data_dir=None and $GBJAX_DATA_DIR is not set)")

    # 2. tensorflow-datasets
    out = _load_tfds(name, split, cache_root, progress, tried)
    if out is not None:
        return out

    # 3. earlier downloads, then a fresh download
    dl_root = os.path.join(cache_root, "downloads")
    out = _load_from_root(name, split, dl_root, "download cache", cache_root, progress, tried)
    if out is not None:
        return out
    if download:
        try:
            _download(name, split, os.path.join(dl_root, name), progress)
        except CorruptDataError:
            raise
        except Exception as e:  # network errors of every kind
            tried.append(f"download from {_download_urls(name, split)}: failed ({e})")
        else:
            out = _load_from_root(
                name, split, dl_root, "download cache", cache_root, progress, tried
            )
            if out is not None:
                return out
    else:
        tried.append(f"download from {_download_urls(name, split)}: disabled (download=False)")

    lines = "\n".join(f"  {i}. {t}" for i, t in enumerate(tried, 1))
    hint = _SUPPLY_HINT.format(name=name, layout=_LAYOUT[name])
    raise DataNotFoundError(
        f"Could not find the {name!r} data set (split {split!r}). Tried, in order:\n{lines}\n{hint}"
    )


def load_image_folder(
    path: str | os.PathLike,
    *,
    classes: Sequence[str] | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> Arrays:
    """Load ``<path>/<class>/<image>`` as ``(images_NHWC uint8, labels_N int32)``.

    ``path`` is a folder, or a ``.tar``/``.tar.gz``/``.tgz`` archive whose images
    sit at ``[<prefix>/]<class>/<image>`` with a single ``<prefix>``. Hidden files
    (names starting with ``.``) and non-image files are ignored. Images are
    ordered by (label, file name).

    Args:
      path: the folder or archive.
      classes: class names in label order, each once; defaults to the sorted
        folder names. A class folder not in ``classes`` is an error.
      cache_dir: if given, decoded arrays are cached there (keyed on the
        source's contents' sizes and mtimes, written atomically, checksummed).
      progress: show a tqdm progress bar while decoding.

    All images must have the same size. If the first image is grayscale the
    result has one channel (others are converted to ``L``); otherwise three
    (``RGB``; alpha is dropped).

    Refused, so that no label is shifted and no pixel changed silently: a
    folder that cannot be read; with ``classes=None``, a class folder without
    images (the later classes would be renumbered); repeated names in
    ``classes``; images with more than 8 bits per channel (16-bit PNGs: convert
    them to 8 bits first). Symlinked folders are followed.

    Example:
      >>> import os, tempfile
      >>> from PIL import Image
      >>> from gbjax import data
      >>> with tempfile.TemporaryDirectory() as d:
      ...     for name, grey in (("cat", 0), ("dog", 255)):
      ...         os.makedirs(f"{d}/{name}")
      ...         Image.new("RGB", (4, 4), (grey,) * 3).save(f"{d}/{name}/a.png")
      ...     images, labels = data.load_image_folder(d, progress=False)
      >>> images.shape, labels.tolist(), int(images[1].min())
      ((2, 4, 4, 3), [0, 1], 255)
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_image_folder: {path} does not exist")
    if classes is not None:
        check_classes(classes)

    def decode() -> Arrays:
        if os.path.isdir(path):
            entries = folder_entries(path, depth=2)
            if classes is None:
                _refuse_empty_classes(path, entries)
        else:
            entries = archive_entries(path, lambda parts: len(parts) >= 2)
            prefixes = sorted({"/".join(p[:-2]) for p, _ in entries})
            if len(prefixes) > 1:
                raise ValueError(
                    f"{path}: images lie under several prefixes {prefixes[:5]}; "
                    "expected [<prefix>/]<class>/<image> with one prefix"
                )
        if not entries:
            raise ValueError(f"{path}: no images found at <class>/<image>")
        names = sorted({p[-2] for p, _ in entries})
        order = tuple(classes) if classes is not None else tuple(names)
        return decode_entries(
            entries,
            order,
            mode=None,
            source=path,
            progress=progress,
            desc=f"decoding {os.path.basename(path)}",
        )

    if cache_dir is None:
        return decode()
    key_name = "folder-" + hashlib.sha256(os.path.abspath(path).encode()).hexdigest()[:8]
    extra = "classes=" + (json.dumps(list(classes)) if classes is not None else "<sorted>")
    out = cached(os.fspath(_files.cache_root(cache_dir)), key_name, "all", (path,), extra, decode)
    assert out is not None
    return out


def _refuse_empty_classes(path: str, entries: list) -> None:
    """With labels numbered by sorted folder name, a class folder without images would shift
    every later label: refuse it."""
    found = {p[-2] for p, _ in entries}
    empty = [c for c in class_folders(path) if c not in found]
    if empty:
        raise ValueError(
            f"{path}: class folder(s) {empty[:5]} hold no images, so the labels of the later "
            "classes would shift; remove the empty folder(s) or pass classes=[...] explicitly"
        )


# --------------------------------------------------------------------------- #
# Source discovery
# --------------------------------------------------------------------------- #


def _canonical_name(name: str) -> str:
    key = str(name).lower().replace("-", "_")
    if key == "fashionmnist":
        key = "fashion_mnist"
    if key not in DATASETS:
        raise ValueError(f"name must be one of {DATASETS}, got {name!r}")
    return key


class _Candidate(NamedTuple):
    describe: str
    paths: tuple[str, ...]  # what the cache key covers
    decode: Callable[[], Arrays | None]  # None: holds no data for this split


def _dataset_dirs(name: str, root: str) -> list[str]:
    dirs = []
    for alias in _DIR_ALIASES[name]:
        d = os.path.join(root, alias)
        for sub in (d, os.path.join(d, "raw")):
            if os.path.isdir(sub) and os.path.realpath(sub) not in {
                os.path.realpath(x) for x in dirs
            }:
                dirs.append(sub)
    return dirs


def _load_from_root(
    name: str, split: str, root: str, where: str, cache_root: str, progress: bool, tried: list[str]
) -> Arrays | None:
    """Try every candidate for ``name``/``split`` under ``root``; record misses in ``tried``."""
    dirs = _dataset_dirs(name, root)
    looked = ", ".join(os.path.join(root, a) for a in _DIR_ALIASES[name])
    if not os.path.isdir(root):
        tried.append(f"{where} {root}: no such directory")
        return None
    if not dirs:
        tried.append(f"{where} {root}: none of {looked} exists")
        return None
    finder = _cifar_candidates if name == "cifar10" else _idx_candidates
    for d in dirs:
        candidates = finder(d, split, progress)
        if not candidates:
            tried.append(f"{where} {d}: holds no recognised {name} files ({_LAYOUT[name]})")
        for cand in candidates:
            out = cached(cache_root, name, split, cand.paths, cand.describe, cand.decode)
            if out is not None:
                return out
            tried.append(f"{where} {cand.describe}: holds no {split!r} images")
    return None


def _first_existing(d: str, stems: Sequence[str]) -> str | None:
    for stem in stems:
        for suffix in (".gz", ""):
            p = os.path.join(d, stem + suffix)
            if os.path.isfile(p):
                return p
    return None


def _idx_candidates(d: str, split: str, progress: bool) -> list[_Candidate]:
    pre = _IDX_PREFIX[split]
    images = _first_existing(d, (f"{pre}-images-idx3-ubyte", f"{pre}-images.idx3-ubyte"))
    labels = _first_existing(d, (f"{pre}-labels-idx1-ubyte", f"{pre}-labels.idx1-ubyte"))
    if images is None or labels is None:
        return []
    return [
        _Candidate(
            f"{images} + {os.path.basename(labels)}",
            (images, labels),
            # MNIST and Fashion-MNIST both have 10 classes
            lambda: decode_idx_pair(images, labels, _NUM_CLASSES["mnist"]),
        )
    ]


def _cifar_candidates(d: str, split: str, progress: bool) -> list[_Candidate]:
    cands: list[_Candidate] = []
    # official python batches, extracted
    for bdir in (os.path.join(d, "cifar-10-batches-py"), d):
        if os.path.isfile(os.path.join(bdir, "test_batch")):
            cands.append(
                _Candidate(bdir, (bdir,), lambda b=bdir: decode_cifar_batches_dir(b, split))
            )
            break
    # official python batches, archived
    tgz = os.path.join(d, "cifar-10-python.tar.gz")
    if os.path.isfile(tgz):
        cands.append(_Candidate(tgz, (tgz,), lambda: decode_cifar_batches_tar(tgz, split)))
    # image folder, as a folder: <d>/<split>/<class>/ or <d>/<prefix>/<split>/<class>/
    for sd in [os.path.join(d, split)] + sorted(
        os.path.join(d, e, split) for e in os.listdir(d) if os.path.isdir(os.path.join(d, e, split))
    ):
        if os.path.isdir(sd):
            cands.append(_Candidate(sd, (sd,), lambda s=sd: decode_cifar_image_folder(s, progress)))
            break
    # image folder inside an archive
    for entry in sorted(os.listdir(d)):
        p = os.path.join(d, entry)
        if entry == "cifar-10-python.tar.gz" or not os.path.isfile(p):
            continue
        if entry.endswith((".tar.gz", ".tgz", ".tar")):
            cands.append(
                _Candidate(p, (p,), lambda p=p: decode_cifar_image_tar(p, split, progress))
            )
    return cands


# --------------------------------------------------------------------------- #
# tensorflow-datasets
# --------------------------------------------------------------------------- #


def _load_tfds(
    name: str, split: str, cache_root: str, progress: bool, tried: list[str]
) -> Arrays | None:
    try:
        import tensorflow_datasets as tfds  # type: ignore[import-not-found]
    except Exception as e:  # ImportError, or a broken TensorFlow install
        tried.append(
            f"tensorflow-datasets: not importable ({type(e).__name__}: {e}); "
            "pip install 'gbjax[tfds]' to enable"
        )
        return None
    version = getattr(tfds, "__version__", "?")

    def decode() -> Arrays:
        _hide_gpus_from_tensorflow()
        ds = tfds.load(name, split=split, batch_size=-1, as_supervised=True)
        x, y = tfds.as_numpy(ds)
        x = np.asarray(x, np.uint8)
        if x.ndim == 3:
            x = x[..., None]
        y = np.asarray(y, np.int32)
        check_labels(y, _NUM_CLASSES[name], f"tfds.load({name!r}, split={split!r})")
        return np.ascontiguousarray(x), y

    try:
        return cached(cache_root, name, split, (), f"tfds-{version}", decode)
    except CorruptDataError:  # e.g. labels out of range: stop, as for a local file
        raise
    except Exception as e:
        call = f"tfds.load({name!r}, split={split!r})"
        tried.append(f"tensorflow-datasets: {call} failed ({type(e).__name__}: {e})")
        return None


def _hide_gpus_from_tensorflow() -> None:
    """Keep TensorFlow (used only for reading) from grabbing accelerator memory."""
    try:
        import tensorflow as tf  # type: ignore[import-not-found]

        tf.config.set_visible_devices([], "GPU")
    except Exception:  # TF missing, or devices already initialised
        pass


# --------------------------------------------------------------------------- #
# Download
# --------------------------------------------------------------------------- #


def _download_files(name: str, split: str) -> list[str]:
    if name == "cifar10":
        return ["cifar-10-python.tar.gz"]
    pre = _IDX_PREFIX[split]
    return [f"{pre}-images-idx3-ubyte.gz", f"{pre}-labels-idx1-ubyte.gz"]


def _download_urls(name: str, split: str) -> str:
    return ", ".join(_DOWNLOADS[name][f][0][0] for f in _download_files(name, split))


def _fetch(url: str, dest: str, progress: bool) -> None:
    """Stream ``url`` into the file ``dest`` (overwritten). Replaced in tests."""
    from tqdm.auto import tqdm

    with urllib.request.urlopen(url, timeout=60) as r, open(dest, "wb") as f:
        total = int(r.headers.get("Content-Length") or 0) or None
        with tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc=f"download {os.path.basename(url)}",
            disable=not progress,
        ) as bar:
            while chunk := r.read(1 << 20):
                f.write(chunk)
                bar.update(len(chunk))


def _file_digest(path: str, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _download(name: str, split: str, dest_dir: str, progress: bool) -> None:
    """Download the files ``name``/``split`` needs into ``dest_dir``, checksum-verified.

    Each file goes to a temporary name and is moved into place only once its
    checksum matches; a mismatch raises :class:`CorruptDataError` and leaves nothing.
    """
    os.makedirs(dest_dir, exist_ok=True)
    for fname in _download_files(name, split):
        final = os.path.join(dest_dir, fname)
        if os.path.isfile(final):
            continue
        urls, (algo, want) = _DOWNLOADS[name][fname]
        errors = []
        for url in urls:
            try:
                with _files.atomic_path(final) as tmp:
                    _fetch(url, tmp, progress)
                    got = _file_digest(tmp, algo)
                    if got != want:
                        raise CorruptDataError(
                            f"{url}: downloaded file fails its checksum "
                            f"({algo} {got}, expected {want})"
                        )
                break
            except CorruptDataError:
                raise
            except Exception as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
        else:
            raise OSError("; ".join(errors))


def random_subset(
    images: np.ndarray, labels: np.ndarray, n: int | None, *, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed random subset of ``n`` examples, kept in their original order.

    Not the first ``n``: some sources (the CIFAR-10 image folders) are stored
    sorted by class. The draw depends only on ``seed`` (default 0) and the
    data set's size, so every run and every experiment sees the same subset.
    ``n=None`` or ``n >= len`` returns the inputs unchanged.

    Example:
      >>> import numpy as np
      >>> from gbjax import data
      >>> x, y = np.arange(10) * 10, np.arange(10) % 2
      >>> xs, ys = data.random_subset(x, y, 4)
      >>> xs.tolist(), ys.tolist()  # the same four every run
      ([20, 40, 60, 70], [0, 0, 0, 1])
    """
    if len(images) != len(labels):
        raise ValueError(
            f"images and labels differ in length: {len(images)} images, {len(labels)} "
            "labels; pass one label per image"
        )
    if n is None or n >= len(images):
        return images, labels
    check_int("n", n)
    idx = np.sort(np.random.default_rng(seed).permutation(len(images))[:n])
    return images[idx], labels[idx]

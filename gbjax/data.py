"""Data sets for gbjax: MNIST, Fashion-MNIST and CIFAR-10 as uint8 arrays.

Public API
----------
``load(name, split, data_dir=None, *, cache_dir=None, download=True, progress=True)``
    ``(images_NHWC uint8, labels_N int32)`` for ``"mnist"``, ``"fashion_mnist"``
    or ``"cifar10"``, split ``"train"`` or ``"test"``.
``load_image_folder(path, *, classes=None, cache_dir=None, progress=True)``
    A user's own ``<path>/<class>/<image>`` folder (or ``.tar[.gz]`` archive).
``epoch_permutation``, ``epoch_batches``, ``iterate_batches``, ``random_crop_flip``
    On-device helpers for the training loop (explicit PRNG keys, jittable).

Where ``load`` looks, in order
------------------------------
1. A local directory: ``data_dir``, else ``$GBJAX_DATA_DIR``, searched as
   ``<dir>/<name>/`` (also ``fashion-mnist``, ``cifar-10``, ... and a torchvision
   style ``raw/`` sub-folder). Recognised there:

   * mnist / fashion_mnist: the standard IDX files
     (``train-images-idx3-ubyte[.gz]``, ``t10k-labels-idx1-ubyte[.gz]``, ...),
     gzip or raw (detected from the bytes, not the name);
   * cifar10: the official python batches (``cifar-10-batches-py/`` or
     ``cifar-10-python.tar.gz``), or an image-folder layout
     ``[<prefix>/]train|test/<class>/*.png|jpg`` as a folder or inside any
     ``.tar``/``.tar.gz``/``.tgz`` in that directory. Labels follow CIFAR-10's
     canonical class order (:data:`CIFAR10_CLASSES`).
2. ``tensorflow-datasets`` when importable (TensorFlow is kept off the GPU).
3. Files previously downloaded to ``<cache_dir>/downloads/<name>/``, then a
   download from the data set's canonical address into that folder, verified
   against the published checksum (``download=False`` disables this).

If nothing works, :class:`DataNotFoundError` lists every place tried and how to
supply the data. A corrupt or truncated file raises :class:`CorruptDataError`
naming the file (it does not fall through to the next source).

Cache
-----
Decoded arrays are cached as uncompressed ``.npz`` files in ``cache_dir``, else
``$GBJAX_CACHE_DIR``, else ``~/.cache/gbjax``. The cache key covers the source's
absolute path, size and modification time (for a folder: every file's relative
path, size and mtime), so a changed source is re-decoded, never served stale.
Entries are written to a temporary file in the cache folder and moved into place
with :func:`os.replace`, so an interrupted run never leaves a partial entry; an
unreadable entry is discarded and rebuilt. An unwritable cache only warns.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import tempfile
import urllib.request
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "CorruptDataError",
    "DataNotFoundError",
    "load",
    "load_image_folder",
    "epoch_permutation",
    "epoch_batches",
    "iterate_batches",
    "random_crop_flip",
]

DATASETS = ("mnist", "fashion_mnist", "cifar10")
SPLITS = ("train", "test")

#: CIFAR-10's canonical class order: label ``i`` is ``CIFAR10_CLASSES[i]``.
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".gif")

# Bump when the decoded representation changes, to invalidate old cache entries.
_CACHE_VERSION = 1

_DIR_ALIASES = {
    "mnist": ("mnist", "MNIST"),
    "fashion_mnist": ("fashion_mnist", "fashion-mnist", "FashionMNIST", "fashionmnist"),
    "cifar10": ("cifar10", "cifar-10", "CIFAR10", "CIFAR-10"),
}

_IDX_PREFIX = {"train": "train", "test": "t10k"}

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


class CorruptDataError(ValueError):
    """A data file exists but is corrupt, truncated or in an unexpected format."""


Arrays = tuple[np.ndarray, np.ndarray]


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
    """
    name = _canonical_name(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    cache_root = _cache_root(cache_dir)
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
      classes: class names in label order; defaults to the sorted folder names.
        A class folder not in ``classes`` is an error.
      cache_dir: if given, decoded arrays are cached there (keyed on the
        source's contents' sizes and mtimes, written atomically).
      progress: show a tqdm progress bar while decoding.

    All images must have the same size. If the first image is grayscale the
    result has one channel (others are converted to ``L``); otherwise three
    (``RGB``; alpha is dropped).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_image_folder: {path} does not exist")

    def decode() -> Arrays:
        if os.path.isdir(path):
            entries = _folder_entries(path, depth=2)
        else:
            entries = _archive_entries(path, lambda parts: len(parts) >= 2)
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
        return _decode_entries(
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
    extra = "classes=" + ("|".join(classes) if classes is not None else "<sorted>")
    out = _cached(_cache_root(cache_dir), key_name, "all", (path,), extra, decode)
    assert out is not None
    return out


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
            out = _cached(cache_root, name, split, cand.paths, cand.describe, cand.decode)
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
            lambda: _decode_idx_pair(images, labels),
        )
    ]


def _cifar_candidates(d: str, split: str, progress: bool) -> list[_Candidate]:
    cands: list[_Candidate] = []
    # official python batches, extracted
    for bdir in (os.path.join(d, "cifar-10-batches-py"), d):
        if os.path.isfile(os.path.join(bdir, "test_batch")):
            cands.append(
                _Candidate(bdir, (bdir,), lambda b=bdir: _decode_cifar_batches_dir(b, split))
            )
            break
    # official python batches, archived
    tgz = os.path.join(d, "cifar-10-python.tar.gz")
    if os.path.isfile(tgz):
        cands.append(_Candidate(tgz, (tgz,), lambda: _decode_cifar_batches_tar(tgz, split)))
    # image folder, as a folder: <d>/<split>/<class>/ or <d>/<prefix>/<split>/<class>/
    for sd in [os.path.join(d, split)] + sorted(
        os.path.join(d, e, split) for e in os.listdir(d) if os.path.isdir(os.path.join(d, e, split))
    ):
        if os.path.isdir(sd):
            cands.append(
                _Candidate(sd, (sd,), lambda s=sd: _decode_cifar_image_folder(s, progress))
            )
            break
    # image folder inside an archive
    for entry in sorted(os.listdir(d)):
        p = os.path.join(d, entry)
        if entry == "cifar-10-python.tar.gz" or not os.path.isfile(p):
            continue
        if entry.endswith((".tar.gz", ".tgz", ".tar")):
            cands.append(
                _Candidate(p, (p,), lambda p=p: _decode_cifar_image_tar(p, split, progress))
            )
    return cands


# --------------------------------------------------------------------------- #
# Decoders
# --------------------------------------------------------------------------- #


def _read_bytes(path: str) -> bytes:
    """Read ``path``, transparently gunzipping; corrupt gzip -> CorruptDataError."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise CorruptDataError(f"{path}: corrupt or truncated gzip data ({e})") from e
    return data


def _read_idx(path: str) -> np.ndarray:
    data = _read_bytes(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CorruptDataError(f"{path}: not an IDX file (bad magic number)")
    if data[2] != 0x08:
        raise CorruptDataError(
            f"{path}: unsupported IDX element type 0x{data[2]:02x} (want 0x08 uint8)"
        )
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    want = math.prod(dims)
    if len(data) - header != want:
        raise CorruptDataError(
            f"{path}: truncated or corrupt IDX file: header says {dims} = {want} bytes of data, "
            f"found {len(data) - header}"
        )
    return np.frombuffer(data, np.uint8, count=want, offset=header).reshape(dims).copy()


def _decode_idx_pair(images_path: str, labels_path: str) -> Arrays:
    x = _read_idx(images_path)
    y = _read_idx(labels_path)
    if x.ndim != 3:
        raise CorruptDataError(f"{images_path}: expected a 3-d IDX image file, got shape {x.shape}")
    if y.ndim != 1:
        raise CorruptDataError(f"{labels_path}: expected a 1-d IDX label file, got shape {y.shape}")
    if len(x) != len(y):
        raise CorruptDataError(
            f"{images_path} has {len(x)} images but {labels_path} has {len(y)} labels"
        )
    return x[..., None], y.astype(np.int32)


class _BatchUnpickler(pickle.Unpickler):
    """Unpickler for CIFAR batches that only builds numpy arrays (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core.") and np.lib.NumpyVersion(np.__version__) >= "2.0.0":
            module = "numpy._core." + module[len("numpy.core.") :]
        return super().find_class(module, name)


def _parse_cifar_batch(data: bytes, where: str) -> Arrays:
    try:
        d = _BatchUnpickler(io.BytesIO(data), encoding="bytes").load()
        x = np.asarray(d[b"data"], dtype=np.uint8)
        y = np.asarray(d[b"labels"], dtype=np.int64)
    except Exception as e:
        raise CorruptDataError(f"{where}: not a readable CIFAR-10 python batch ({e!r})") from e
    if (
        x.ndim != 2
        or x.shape[1] != 3072
        or len(x) != len(y)
        or y.min(initial=0) < 0
        or y.max(initial=0) > 9
    ):
        raise CorruptDataError(
            f"{where}: unexpected CIFAR-10 batch contents (data {x.shape}, labels {y.shape})"
        )
    return x.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), y.astype(np.int32)


def _batch_names(split: str) -> list[str]:
    return [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]


def _concat(parts: list[Arrays]) -> Arrays:
    return np.ascontiguousarray(np.concatenate([p[0] for p in parts])), np.concatenate(
        [p[1] for p in parts]
    )


def _decode_cifar_batches_dir(bdir: str, split: str) -> Arrays:
    parts = []
    for b in _batch_names(split):
        p = os.path.join(bdir, b)
        if not os.path.isfile(p):
            raise CorruptDataError(f"{bdir}: missing CIFAR-10 batch file {b}")
        with open(p, "rb") as f:
            parts.append(_parse_cifar_batch(f.read(), p))
    return _concat(parts)


def _ustar_index(data: bytes) -> list[tuple[str, int, int]] | None:
    """(name, offset, size) of the regular files of a plain ustar archive.

    About ten times faster than :mod:`tarfile` on 60k small members. Returns
    None (caller falls back to :mod:`tarfile`) on anything but plain ustar file
    and directory headers: pax or GNU extensions, links, odd encodings. Header
    checksums are not recomputed here (gzip's CRC already covers a .tar.gz).
    """
    out, off, n = [], 0, len(data)
    while off + 512 <= n:
        h = data[off : off + 512]
        if h[0] == 0:  # end-of-archive block
            return out
        if h[257:262] != b"ustar" or h[124] & 0x80:
            return None
        typ = h[156:157]
        try:
            size = int(h[124:136].rstrip(b"\0 ") or b"0", 8)
            name = h[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = h[345:500].split(b"\0", 1)[0].decode("utf-8")
        except ValueError:
            return None
        off += 512
        if typ in (b"0", b"\0"):
            out.append((f"{prefix}/{name}" if prefix else name, off, size))
        elif typ in (b"g", b"x"):  # pax headers: fine if they change no name or size
            if _pax_keys(data[off : off + size]) - _HARMLESS_PAX_KEYS:
                return None
        elif typ != b"5":
            return None
        off += -(-size // 512) * 512
    return out


_HARMLESS_PAX_KEYS = {"comment", "mtime", "atime", "ctime", "uid", "gid", "uname", "gname"}


def _pax_keys(payload: bytes) -> set[str]:
    """Keys of pax extended-header records (``b"<len> <key>=<value>\\n"``); junk -> {"?"}."""
    keys, i = set(), 0
    try:
        while i < len(payload) and payload[i : i + 1] != b"\0":
            space = payload.index(b" ", i)
            length = int(payload[i:space])
            keys.add(payload[space + 1 : i + length].split(b"=", 1)[0].decode("utf-8"))
            i += length
    except ValueError:
        return {"?"}
    return keys


def _tar_members(path: str) -> tuple[list[tuple[str, int, int]], bytes]:
    """Read a (gzipped) tar fully into memory; return its files as (name, offset, size).

    Raises CorruptDataError, naming ``path``, if it is not a readable archive
    or is truncated.
    """
    data = _read_bytes(path)
    members = _ustar_index(data)
    if members is None:
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
                members = [(m.name, m.offset_data, m.size) for m in tf.getmembers() if m.isfile()]
        except (tarfile.TarError, EOFError) as e:
            raise CorruptDataError(
                f"{path}: not a readable tar archive, or corrupt or truncated ({e})"
            ) from e
    for name, offset, size in members:
        if offset + size > len(data):
            raise CorruptDataError(f"{path}: truncated tar archive (member {name} is cut short)")
    return members, data


def _decode_cifar_batches_tar(path: str, split: str) -> Arrays:
    members, data = _tar_members(path)
    by_base = {m[0].rsplit("/", 1)[-1]: m for m in members}
    parts = []
    for b in _batch_names(split):
        if b not in by_base:
            raise CorruptDataError(f"{path}: missing CIFAR-10 batch file {b}")
        name, offset, size = by_base[b]
        parts.append(_parse_cifar_batch(data[offset : offset + size], f"{path}:{name}"))
    return _concat(parts)


def _is_image_name(fname: str) -> bool:
    return not fname.startswith(".") and fname.lower().endswith(IMAGE_EXTENSIONS)


# An entry is (path parts, bytes-or-filename); parts[-2] is the class, parts[-1] the file.
_Entry = tuple[tuple[str, ...], Any]


def _folder_entries(root: str, depth: int) -> list[_Entry]:
    """Image files exactly ``depth`` levels below ``root`` (``<class>/<file>`` for 2)."""
    entries, misplaced = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        for f in filenames:
            if _is_image_name(f):
                (entries if len(parts) + 1 == depth else misplaced).append(
                    (parts + (f,), os.path.join(dirpath, f))
                )
    if misplaced and not entries:
        raise ValueError(
            f"{root}: images found at {os.path.join(*misplaced[0][0])} but expected <class>/<image>; "
            "pass the folder that directly holds the class folders"
        )
    return entries


def _archive_entries(path: str, keep: Callable[[tuple[str, ...]], bool]) -> list[_Entry]:
    members, data = _tar_members(path)
    out = []
    for name, offset, size in members:
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if parts and _is_image_name(parts[-1]) and keep(parts):
            out.append((parts, data[offset : offset + size]))
    return out


def _decode_cifar_image_folder(split_dir: str, progress: bool) -> Arrays | None:
    entries = _folder_entries(split_dir, depth=2)
    if not entries:
        return None
    return _decode_entries(
        entries,
        CIFAR10_CLASSES,
        mode="RGB",
        source=split_dir,
        progress=progress,
        desc=f"decoding {split_dir}",
    )


def _decode_cifar_image_tar(path: str, split: str, progress: bool) -> Arrays | None:
    entries = _archive_entries(path, lambda parts: len(parts) >= 3 and parts[-3] == split)
    if not entries:
        return None
    return _decode_entries(
        entries,
        CIFAR10_CLASSES,
        mode="RGB",
        source=path,
        progress=progress,
        desc=f"decoding cifar10 {split}",
    )


def _decode_entries(
    entries: list[_Entry],
    classes: Sequence[str],
    *,
    mode: str | None,
    source: str,
    progress: bool,
    desc: str,
) -> Arrays:
    """Decode image entries into one uint8 NHWC array, labels by ``classes`` order."""
    from PIL import Image  # pillow is a core dependency; imported lazily for start-up time
    from tqdm.auto import tqdm

    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({p[-2] for p, _ in entries} - set(index))
    if unknown:
        raise CorruptDataError(
            f"{source}: unexpected class folder(s) {unknown[:5]}; expected some of {list(classes)}"
        )
    entries = sorted(entries, key=lambda e: (index[e[0][-2]], e[0][-1], e[0]))
    labels = np.fromiter((index[p[-2]] for p, _ in entries), np.int32, len(entries))

    def where(e: _Entry) -> str:
        return e[1] if isinstance(e[1], str) else f"{source}:{'/'.join(e[0])}"

    def open_image(e: _Entry):
        src = e[1] if isinstance(e[1], str) else io.BytesIO(e[1])
        try:
            im = Image.open(src)
            im.load()
        except Exception as err:
            raise CorruptDataError(f"{where(e)}: cannot decode image ({err})") from err
        return im

    first = open_image(entries[0])
    if mode is None:
        mode = "L" if first.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
    width, height = first.size
    channels = 1 if mode == "L" else 3
    images = np.empty((len(entries), height, width, channels), np.uint8)
    bar = tqdm(total=len(entries), desc=desc, unit="img", disable=not progress, mininterval=0.5)
    try:
        for i, e in enumerate(entries):
            im = first if i == 0 else open_image(e)
            if im.mode != mode:
                im = im.convert(mode)
            a = np.asarray(im)
            if a.shape[:2] != (height, width):
                raise CorruptDataError(
                    f"{where(e)}: image is {a.shape[1]}x{a.shape[0]} but the first image "
                    f"({where(entries[0])}) is {width}x{height}; all images must have one size"
                )
            images[i] = a.reshape(height, width, channels)
            if i % 1024 == 1023:
                bar.update(1024)
        bar.update(len(entries) % 1024)
    finally:
        bar.close()
    return images, labels


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
        return np.ascontiguousarray(x), np.asarray(y, np.int32)

    try:
        return _cached(cache_root, name, split, (), f"tfds-{version}", decode)
    except Exception as e:
        tried.append(
            f"tensorflow-datasets: tfds.load({name!r}, split={split!r}) failed ({type(e).__name__}: {e})"
        )
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
            fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=f".{fname}.", suffix=".part")
            os.close(fd)
            try:
                _fetch(url, tmp, progress)
                got = _file_digest(tmp, algo)
                if got != want:
                    raise CorruptDataError(
                        f"{url}: downloaded file fails its checksum ({algo} {got}, expected {want})"
                    )
                os.replace(tmp, final)
                break
            except CorruptDataError:
                raise
            except Exception as e:
                errors.append(f"{url}: {type(e).__name__}: {e}")
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        else:
            raise OSError("; ".join(errors))


# --------------------------------------------------------------------------- #
# Cache
# --------------------------------------------------------------------------- #


def _cache_root(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    env = os.environ.get("GBJAX_CACHE_DIR")
    return env if env else os.path.join(os.path.expanduser("~"), ".cache", "gbjax")


def _signature(paths: Sequence[str]) -> str:
    """Path, size and mtime of each source file (of every file below a folder).

    For a folder this is a digest over all files' relative paths, sizes and
    mtimes (about 0.2 s for 50k files), so an edited, added or removed image
    changes the key.
    """
    parts = []
    for p in paths:
        p = os.path.abspath(p)
        if os.path.isdir(p):
            h, stack = hashlib.sha256(), [p]
            while stack:
                d = stack.pop()
                with os.scandir(d) as it:
                    entries = sorted(it, key=lambda e: e.name)
                for e in entries:
                    if e.is_dir():
                        stack.append(e.path)
                    else:
                        st = e.stat()
                        h.update(f"{e.path[len(p) :]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
            parts.append(f"dir:{p}:{h.hexdigest()}")
        else:
            st = os.stat(p)
            parts.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
    return "\n".join(parts)


def _cache_file(
    cache_root: str, name: str, split: str, paths: Sequence[str], extra: str
) -> tuple[str, str]:
    """Return (entry path, glob-style stem shared by entries of the same source)."""
    src = hashlib.sha256(
        "\n".join([extra] + [os.path.abspath(p) for p in paths]).encode()
    ).hexdigest()[:8]
    key = hashlib.sha256(
        f"v{_CACHE_VERSION}\n{name}\n{split}\n{extra}\n{_signature(paths)}".encode()
    ).hexdigest()[:16]
    stem = f"{name}-{split}-{src}-"
    return os.path.join(cache_root, f"{stem}{key}.npz"), stem


def _read_cache(path: str) -> Arrays | None:
    try:
        with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
            x, y = z["images"], z["labels"]
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError("unexpected arrays")
        return x, y.astype(np.int32, copy=False)
    except Exception as e:
        warnings.warn(f"gbjax: discarding unreadable cache entry {path} ({e})", stacklevel=3)
        try:
            os.unlink(path)
        except OSError:
            pass
        return None


def _write_cache(path: str, stem: str, arrays: Arrays) -> None:
    """Write atomically (temp file + os.replace), then drop older entries of this source."""
    root = os.path.dirname(path)
    tmp = None
    try:
        os.makedirs(root, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=arrays[0], labels=arrays[1])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        warnings.warn(
            f"gbjax: could not write cache entry {path} ({e}); continuing without cache",
            stacklevel=3,
        )
        return
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    for entry in os.listdir(root):
        if (
            entry.startswith(os.path.basename(stem))
            and entry.endswith(".npz")
            and entry != os.path.basename(path)
        ):
            try:
                os.unlink(os.path.join(root, entry))
            except OSError:
                pass


def _cached(
    cache_root: str,
    name: str,
    split: str,
    paths: Sequence[str],
    extra: str,
    decode: Callable[[], Arrays | None],
) -> Arrays | None:
    """Serve ``decode()``'s result from the cache, decoding and storing it on a miss."""
    try:
        path, stem = _cache_file(cache_root, name, split, paths, extra)
    except OSError as e:
        raise CorruptDataError(f"cannot read {paths}: {e}") from e
    if os.path.isfile(path):
        out = _read_cache(path)
        if out is not None:
            return out
    out = decode()
    if out is None:
        return None
    _write_cache(path, stem, out)
    return out


# --------------------------------------------------------------------------- #
# On-device helpers for the training loop
# --------------------------------------------------------------------------- #


def epoch_permutation(key: jax.Array, num_examples: int) -> jax.Array:
    """A uniformly random permutation of ``range(num_examples)`` (int32) for one epoch.

    Use a fresh key per epoch, e.g. ``jax.random.fold_in(key, epoch)``.
    """
    return jax.random.permutation(key, int(num_examples)).astype(jnp.int32)


def epoch_batches(
    key: jax.Array | None, num_examples: int, batch_size: int, *, drop_remainder: bool = False
) -> tuple[jax.Array, jax.Array]:
    """Index and mask arrays covering one epoch in fixed-size batches.

    Returns ``(idx_SB int32, mask_SB bool)`` with ``S`` batches of ``B =
    batch_size``. With ``key=None`` the order is ``0..N-1``, else a random
    permutation. The ragged last batch is handled one of two ways:

    * ``drop_remainder=False`` (default): ``S = ceil(N / B)``; the last batch is
      padded with indices wrapped round from the start of the epoch's order
      (valid examples, so no NaNs) and their ``mask`` entries are ``False``. Weight
      per-example losses by ``mask`` and divide by ``mask.sum()``. Every example
      appears exactly once with ``mask=True``. All batches have one shape, so a
      jitted step compiles once.
    * ``drop_remainder=True``: ``S = N // B``; the tail is dropped, ``mask`` is all
      ``True``.

    ``num_examples`` and ``batch_size`` are static; the function can be called
    inside ``jit`` (e.g. to drive a ``lax.scan`` over batches).
    """
    n, b = int(num_examples), int(batch_size)
    if n <= 0:
        raise ValueError(f"num_examples must be positive, got {num_examples}")
    if b <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if drop_remainder and n < b:
        raise ValueError(
            f"batch_size={b} exceeds num_examples={n} with drop_remainder=True: no batches"
        )
    order_N = jnp.arange(n, dtype=jnp.int32) if key is None else epoch_permutation(key, n)
    s = n // b if drop_remainder else -(-n // b)
    pos = jnp.arange(s * b, dtype=jnp.int32)
    idx_SB = order_N[pos % n].reshape(s, b)
    mask_SB = (pos < n).reshape(s, b)
    return idx_SB, mask_SB


def iterate_batches(
    arrays: Any, batch_size: int, *, key: jax.Array | None = None, ragged: str = "pad"
) -> Iterator[tuple[Any, np.ndarray]]:
    """Yield ``(batch, mask_B)`` over one epoch of ``arrays``.

    ``arrays`` is an array or any pytree of arrays (e.g. ``(x, y)``) sharing the
    leading axis. numpy leaves are gathered on the host (feed the batch to a
    jitted step, which transfers it); ``jax.Array`` leaves are gathered on their
    device. ``key`` shuffles (``None``: in order). ``ragged`` picks how a last,
    partial batch is handled:

    * ``"pad"`` (default): every batch has ``batch_size`` rows; the last one is
      filled with examples from the start of the epoch order and ``mask`` marks
      the real rows (see :func:`epoch_batches`). One shape, one compile.
    * ``"drop"``: the partial batch is dropped; ``mask`` is all ``True``.
    * ``"keep"``: the last batch is yielded smaller; ``mask`` is all ``True``
      (a jitted step compiles a second time for that shape).
    """
    if ragged not in ("pad", "drop", "keep"):
        raise ValueError(f"ragged must be 'pad', 'drop' or 'keep', got {ragged!r}")
    leaves = jax.tree_util.tree_leaves(arrays)
    if not leaves:
        raise ValueError("arrays must contain at least one array")
    n = int(leaves[0].shape[0])
    if any(int(a.shape[0]) != n for a in leaves):
        raise ValueError(
            f"all arrays must share the leading axis; got {[a.shape[0] for a in leaves]}"
        )
    idx_SB, mask_SB = epoch_batches(key, n, batch_size, drop_remainder=(ragged == "drop"))
    idx_host_SB, mask_host_SB = np.asarray(idx_SB), np.asarray(mask_SB)

    def take(a: Any, idx_host: np.ndarray, idx_dev: jax.Array) -> Any:
        return a[idx_host] if isinstance(a, np.ndarray) else jnp.take(a, idx_dev, axis=0)

    for s in range(idx_host_SB.shape[0]):
        idx_host, mask = idx_host_SB[s], mask_host_SB[s]
        if ragged == "keep" and not mask.all():
            idx_host, mask = idx_host[mask], mask[mask]
        idx_dev = idx_SB[s] if len(idx_host) == idx_SB.shape[1] else jnp.asarray(idx_host)
        yield jax.tree_util.tree_map(lambda a: take(a, idx_host, idx_dev), arrays), mask


def random_crop_flip(
    key: jax.Array, x_BHWC: jax.Array, pad: int = 4, *, flip: bool = True
) -> jax.Array:
    """Per-image random crop after zero padding, and random horizontal flip.

    The standard CIFAR augmentation: pad each side of H and W by ``pad`` zeros,
    crop back to (H, W) at an offset drawn uniformly from ``0..2*pad`` per image
    and axis, then mirror left-right with probability 1/2 (if ``flip``). Any
    dtype; shape and dtype are preserved. Jittable and differentiable in ``x``;
    ``pad`` and ``flip`` are static.
    """
    if not isinstance(pad, (int, np.integer)) or isinstance(pad, bool) or pad < 0:
        raise ValueError(f"pad must be a non-negative int, got {pad!r}")
    if x_BHWC.ndim != 4:
        raise ValueError(f"x_BHWC must have shape (B, H, W, C), got {x_BHWC.shape}")
    b, h, w, c = x_BHWC.shape
    key_crop, key_flip = jax.random.split(key)
    out_BHWC = x_BHWC
    if pad > 0:
        padded_BHWC = jnp.pad(x_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
        offset_B2 = jax.random.randint(key_crop, (b, 2), 0, 2 * pad + 1)

        def crop(img_HWC: jax.Array, off_2: jax.Array) -> jax.Array:
            return jax.lax.dynamic_slice(img_HWC, (off_2[0], off_2[1], 0), (h, w, c))

        out_BHWC = jax.vmap(crop)(padded_BHWC, offset_B2)
    if flip:
        flip_B = jax.random.bernoulli(key_flip, 0.5, (b,))
        out_BHWC = jnp.where(flip_B[:, None, None, None], out_BHWC[:, :, ::-1, :], out_BHWC)
    return out_BHWC

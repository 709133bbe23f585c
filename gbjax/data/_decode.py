"""Decoders: turn the bytes of a data set's files into ``(images_NHWC uint8, labels_N int32)``.

Formats read here:

* IDX (MNIST, Fashion-MNIST): :func:`decode_idx_pair` reads an images file and
  a labels file, gzip or raw (detected from the bytes, not the name).
* CIFAR-10 python batches: :func:`_parse_cifar_batch` unpickles one batch with
  :class:`_BatchUnpickler`, which builds numpy arrays and nothing else, so a
  malicious pickle cannot run code; the batches are read from a folder or from
  ``cifar-10-python.tar.gz``.
* Image files (PNG, JPEG, ...): "entries" ``(path parts, file name or bytes)``
  gathered from a folder (:func:`folder_entries`) or a tar archive
  (:func:`archive_entries`) are decoded with Pillow by :func:`decode_entries`,
  labelled by their class folder (``parts[-2]``).

Archives are read fully into memory and indexed with :mod:`tarfile`
(:func:`_tar_members`); members are sliced from the bytes rather than extracted.

Every decoder raises :class:`CorruptDataError` naming the offending file (and
member) when the data is corrupt, truncated or of an unexpected shape, or holds
labels outside the data set's classes. Nothing is dropped or changed silently:
folders are walked with symlinks followed (:func:`walk_tree`) and one that
cannot be read is an error; images with more than 8 bits per channel are
refused rather than clipped; repeated class names are refused. Which
files to decode, and caching of the result, are the business of
:mod:`gbjax.data.sources` and :mod:`gbjax.data.cache`.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

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

#: File name endings (lower case) treated as images in image folders and archives.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".webp", ".gif")


class CorruptDataError(ValueError):
    """A data file exists but is corrupt, truncated or in an unexpected format."""


#: ``(images_NHWC uint8, labels_N int32)``.
Arrays = tuple[np.ndarray, np.ndarray]

# An entry is (path parts, bytes-or-filename); parts[-2] is the class, parts[-1] the file.
_Entry = tuple[tuple[str, ...], Any]


# --------------------------------------------------------------------------- #
# Raw bytes and IDX
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


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Refuse labels outside ``0 .. num_classes - 1`` (a training run would see extra classes)."""
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise CorruptDataError(
            f"{where}: label {int(labels[i])} at index {i} ({bad.size} label(s) in all) is outside "
            f"0..{num_classes - 1}; this data set has {num_classes} classes, so the file is "
            "corrupt or not this data set's labels"
        )


def decode_idx_pair(images_path: str, labels_path: str, num_classes: int) -> Arrays:
    """An IDX images file and its labels file; every label must lie in ``0..num_classes-1``."""
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
    check_labels(y, num_classes, labels_path)
    return x[..., None], y.astype(np.int32)


# --------------------------------------------------------------------------- #
# CIFAR-10 python batches
# --------------------------------------------------------------------------- #


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


def decode_cifar_batches_dir(bdir: str, split: str) -> Arrays:
    parts = []
    for b in _batch_names(split):
        p = os.path.join(bdir, b)
        if not os.path.isfile(p):
            raise CorruptDataError(f"{bdir}: missing CIFAR-10 batch file {b}")
        with open(p, "rb") as f:
            parts.append(_parse_cifar_batch(f.read(), p))
    return _concat(parts)


def decode_cifar_batches_tar(path: str, split: str) -> Arrays:
    members, data = _tar_members(path)
    by_base = {m[0].rsplit("/", 1)[-1]: m for m in members}
    parts = []
    for b in _batch_names(split):
        if b not in by_base:
            raise CorruptDataError(f"{path}: missing CIFAR-10 batch file {b}")
        name, offset, size = by_base[b]
        parts.append(_parse_cifar_batch(data[offset : offset + size], f"{path}:{name}"))
    return _concat(parts)


# --------------------------------------------------------------------------- #
# Tar archives
# --------------------------------------------------------------------------- #


def _tar_members(path: str) -> tuple[list[tuple[str, int, int]], bytes]:
    """Read a (gzipped) tar fully into memory; return its files as (name, offset, size).

    Raises CorruptDataError, naming ``path``, if it is not a readable archive
    or is truncated.
    """
    data = _read_bytes(path)
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


# --------------------------------------------------------------------------- #
# Image folders and archives
# --------------------------------------------------------------------------- #


def _is_image_name(fname: str) -> bool:
    return not fname.startswith(".") and fname.lower().endswith(IMAGE_EXTENSIONS)


def walk_tree(
    root: str,
    *,
    skip_hidden: bool,
    on_error: Callable[[OSError], None] | None = None,
):
    """``os.walk(root, followlinks=True)``, sorted, without following a symlink loop.

    Symlinked folders are followed, as ``os.walk(followlinks=True)`` does in a
    user's own script; a link back to a folder already on the current path is
    not entered again (otherwise the walk would never end). A folder that cannot
    be listed is passed to ``on_error`` (an :class:`OSError` with ``.filename``);
    by default it is a :class:`CorruptDataError` naming the folder. ``skip_hidden``
    leaves out folders whose names start with ``.``.
    """

    def refuse(err: OSError) -> None:
        raise CorruptDataError(
            f"cannot read folder {err.filename} ({err.strerror or err}); "
            "fix its permissions or move it out of " + root
        ) from err

    chains = {root: frozenset({os.path.realpath(root)})}
    for dirpath, dirnames, filenames in os.walk(root, onerror=on_error or refuse, followlinks=True):
        chain = chains.pop(dirpath)
        keep = []
        for d in sorted(dirnames):
            if skip_hidden and d.startswith("."):
                continue
            sub = os.path.join(dirpath, d)
            real = os.path.realpath(sub)
            if real not in chain:  # else a symlink back to an enclosing folder
                chains[sub] = chain | {real}
                keep.append(d)
        dirnames[:] = keep
        yield dirpath, dirnames, sorted(filenames)


def folder_entries(root: str, depth: int) -> list[_Entry]:
    """Image files exactly ``depth`` levels below ``root`` (``<class>/<file>`` for 2).

    Symlinked folders are followed; a folder that cannot be read is a
    :class:`CorruptDataError` (never skipped, which would drop a class).
    """
    entries, misplaced = [], []
    for dirpath, _, filenames in walk_tree(root, skip_hidden=True):
        rel = os.path.relpath(dirpath, root)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        for f in filenames:
            if _is_image_name(f):
                (entries if len(parts) + 1 == depth else misplaced).append(
                    (parts + (f,), os.path.join(dirpath, f))
                )
    if misplaced and not entries:
        found = os.path.join(*misplaced[0][0])
        raise ValueError(
            f"{root}: images found at {found} but expected <class>/<image>; "
            "pass the folder that directly holds the class folders"
        )
    return entries


def class_folders(root: str) -> list[str]:
    """Names of the (non-hidden) folders directly in ``root``, symlinks followed, sorted."""
    try:
        names = os.listdir(root)
    except OSError as e:
        raise CorruptDataError(f"cannot read folder {root} ({e.strerror or e})") from e
    return sorted(
        n for n in names if not n.startswith(".") and os.path.isdir(os.path.join(root, n))
    )


def archive_entries(path: str, keep: Callable[[tuple[str, ...]], bool]) -> list[_Entry]:
    members, data = _tar_members(path)
    out = []
    for name, offset, size in members:
        parts = tuple(p for p in name.split("/") if p not in ("", "."))
        if parts and _is_image_name(parts[-1]) and keep(parts):
            out.append((parts, data[offset : offset + size]))
    return out


def decode_cifar_image_folder(split_dir: str, progress: bool) -> Arrays | None:
    entries = folder_entries(split_dir, depth=2)
    if not entries:
        return None
    return decode_entries(
        entries,
        CIFAR10_CLASSES,
        mode="RGB",
        source=split_dir,
        progress=progress,
        desc=f"decoding {split_dir}",
    )


def decode_cifar_image_tar(path: str, split: str, progress: bool) -> Arrays | None:
    entries = archive_entries(path, lambda parts: len(parts) >= 3 and parts[-3] == split)
    if not entries:
        return None
    return decode_entries(
        entries,
        CIFAR10_CLASSES,
        mode="RGB",
        source=path,
        progress=progress,
        desc=f"decoding cifar10 {split}",
    )


def check_classes(classes: Sequence[str]) -> None:
    """Refuse a bare string and repeated names (either would silently shift the labels)."""
    if isinstance(classes, (str, bytes)):
        raise ValueError(f"classes: expected a sequence of class names, got the string {classes!r}")
    seen, dup = set(), []
    for c in classes:
        if c in seen and c not in dup:
            dup.append(c)
        seen.add(c)
    if dup:
        raise ValueError(
            f"classes: {dup[:5]} appear more than once; give each class name once, "
            "in label order (a repeated name would shift the labels after it)"
        )


def _deep_mode(im) -> str | None:
    """A description if ``im`` holds more than 8 bits per channel, else None (before load)."""
    for tile in getattr(im, "tile", None) or ():
        raw = tile[3] if len(tile) > 3 else None
        raw = raw[0] if isinstance(raw, tuple) and raw else raw
        if isinstance(raw, str) and (raw.startswith("I;16") or raw.endswith((";16B", ";16L"))):
            return f"16-bit (mode {im.mode}, raw {raw})"
    if im.mode.startswith(("I", "F")):
        return f"more than 8 bits per channel (mode {im.mode})"
    return None


def decode_entries(
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

    check_classes(classes)
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
            deep = _deep_mode(im)
            im.load()
        except Exception as err:
            raise CorruptDataError(f"{where(e)}: cannot decode image ({err})") from err
        if deep:
            raise ValueError(
                f"{where(e)}: image with {deep}; gbjax data sets are 8-bit (uint8) and this "
                "image would be clipped or rescaled. Convert the images to 8 bits first, e.g. "
                "(a / 257).round().astype(np.uint8) for 16-bit ones"
            )
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

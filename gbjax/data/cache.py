"""The on-disk cache of decoded arrays: keyed on the source, written atomically.

Where: ``cache_dir`` if given, else ``$GBJAX_CACHE_DIR``, else ``~/.cache/gbjax``
(:func:`_cache_root`).

Keys: an entry's file name is ``<name>-<split>-<src>-<key>.npz``. ``<src>``
hashes the source's absolute paths (and a free-form ``extra`` string naming the
decoder), so all entries of one source share a stem; ``<key>`` also covers the
cache format version and :func:`_signature`: each source file's size and
modification time, or for a folder every file's relative path, size and mtime.
A changed source therefore gets a new key and is re-decoded, never served stale;
the superseded entry of that source is deleted once the new one is written.

Atomicity: :func:`save_arrays` writes an uncompressed ``.npz`` to a temporary
file in the destination folder, fsyncs it and moves it into place with
:func:`os.replace`, so an interrupted run never leaves a partial entry.

Integrity: the ``.npz`` also holds a SHA-256 of every array's name, dtype, shape
and bytes (``__sha256__``); :func:`load_arrays` reads the file back without
unpickling anything and refuses it unless the digest matches, so flipped bytes
are never served as data. These two are
the package's building blocks for caching any derived array (for example images
after a preprocessing step) under the same guarantees; :func:`_cached` is the
(images, labels) cache that :mod:`gbjax.data.sources` uses.

Failure handling: an unreadable or corrupt entry is discarded with a warning and rebuilt;
an unwritable cache only warns and the data is returned uncached; an unreadable
*source* (its signature cannot be taken) is a :class:`CorruptDataError`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from gbjax.data.decode import Arrays, CorruptDataError, _walk_tree

# Bump when the decoded representation changes, to invalidate old cache entries.
# 2: entries carry a SHA-256; labels are range-checked; symlinked folders are followed.
_CACHE_VERSION = 2

#: Name of the digest entry that :func:`save_arrays` adds and :func:`load_arrays` checks.
DIGEST_KEY = "__sha256__"


def _cache_root(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return os.fspath(cache_dir)
    env = os.environ.get("GBJAX_CACHE_DIR")
    return env if env else os.path.join(os.path.expanduser("~"), ".cache", "gbjax")


# --------------------------------------------------------------------------- #
# Atomic array files
# --------------------------------------------------------------------------- #


def _digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over each array's name, dtype, shape and bytes, in order."""
    h = hashlib.sha256()
    for name, a in arrays.items():
        a = np.ascontiguousarray(a)
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\n".encode())
        h.update(a.reshape(-1).view(np.uint8))  # no copy for a contiguous array
    return h.hexdigest()


def save_arrays(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` (name -> array) to ``path`` as an uncompressed ``.npz``, atomically.

    The file also holds a SHA-256 of the arrays (entry ``__sha256__``) that
    :func:`load_arrays` verifies. The data goes to a temporary file in
    ``path``'s folder (created if missing), is flushed to disk, and is then
    moved onto ``path`` with :func:`os.replace`: a reader sees either the
    previous file or the complete new one. On any error (including
    ``KeyboardInterrupt``) the temporary file is removed and the error
    propagates, leaving ``path`` as it was. Object (pickled) arrays are refused.
    """
    path = os.fspath(path)
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    for k, v in arrays.items():
        if k == DIGEST_KEY:
            raise ValueError(f"save_arrays: the name {DIGEST_KEY!r} is reserved for the checksum")
        if v.dtype.hasobject:
            raise ValueError(
                f"save_arrays: array {k!r} has dtype object, which would be pickled; "
                "store numeric or string arrays only"
            )
    arrays[DIGEST_KEY] = np.array(_digest(arrays))
    root = os.path.dirname(path) or "."
    os.makedirs(root, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".tmp-", suffix=".npz")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def load_arrays(path: str | os.PathLike, *, verify: bool = True) -> dict[str, np.ndarray]:
    """Read every array of an ``.npz`` written by :func:`save_arrays` into memory.

    The stored SHA-256 is checked: a file whose bytes changed, or that has no
    checksum (written by something else, or by gbjax before checksums), raises
    :class:`~gbjax.data.CorruptDataError` (a ``ValueError``). ``verify=False``
    skips the check, for a file you trust. Pickled object arrays are refused.
    Raises ``OSError`` for a missing file and ``ValueError`` (or another
    exception from numpy/zipfile) for an unreadable one.
    """
    path = os.fspath(path)
    with open(path, "rb") as f, np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    stored = arrays.pop(DIGEST_KEY, None)
    if not verify:
        return arrays
    if stored is None:
        raise CorruptDataError(
            f"{path}: no {DIGEST_KEY} checksum, so its contents cannot be verified; "
            "re-create it with gbjax.data.cache.save_arrays, or pass verify=False if you trust it"
        )
    if stored.shape != () or str(stored) != _digest(arrays):
        raise CorruptDataError(
            f"{path}: contents do not match the stored SHA-256 (the file is corrupt); "
            "delete it and create it again"
        )
    return arrays


# --------------------------------------------------------------------------- #
# Keys
# --------------------------------------------------------------------------- #


def _signature(paths: Sequence[str]) -> str:
    """Path, size and mtime of each source file (of every file below a folder).

    For a folder this is a digest over all files' relative paths, sizes and
    mtimes (about 0.2 s for 50k files), so an edited, added or removed image
    changes the key. Folders are walked as the decoders walk them (symlinks
    followed, loops not); one that cannot be read is a :class:`CorruptDataError`.
    """
    parts = []
    for p in paths:
        p = os.path.abspath(p)
        if os.path.isdir(p):
            h = hashlib.sha256()
            for dirpath, _, filenames in _walk_tree(p, skip_hidden=False):
                for name in filenames:
                    full = os.path.join(dirpath, name)
                    try:
                        st = os.stat(full)
                    except FileNotFoundError:  # a dangling symlink
                        st = os.lstat(full)
                    h.update(f"{full[len(p) :]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
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


# --------------------------------------------------------------------------- #
# (images, labels) entries
# --------------------------------------------------------------------------- #


def _read_cache(path: str) -> Arrays | None:
    try:
        z = load_arrays(path)
        x, y = z["images"], z["labels"]
        if x.dtype != np.uint8 or x.ndim != 4 or y.ndim != 1 or len(x) != len(y):
            raise ValueError("unexpected arrays")
        return x, y.astype(np.int32, copy=False)
    except Exception as e:
        warnings.warn(
            f"gbjax: discarding corrupt or unreadable cache entry {path} ({e}); rebuilding it",
            stacklevel=3,
        )
        try:
            os.unlink(path)
        except OSError:
            pass
        return None


def _write_cache(path: str, stem: str, arrays: Arrays) -> None:
    """Write atomically (see :func:`save_arrays`), then drop older entries of this source."""
    try:
        save_arrays(path, {"images": arrays[0], "labels": arrays[1]})
    except OSError as e:
        warnings.warn(
            f"gbjax: could not write cache entry {path} ({e}); continuing without cache",
            stacklevel=3,
        )
        return
    root = os.path.dirname(path) or "."
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
    """Serve ``decode()``'s result from the cache, decoding and storing it on a miss.

    ``decode`` returning None (the source holds no data for this split) is
    passed through and nothing is stored.
    """
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

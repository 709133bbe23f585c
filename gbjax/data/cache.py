"""The on-disk cache of decoded arrays: keyed on the source, written atomically.

Where: ``cache_dir`` if given, else ``$GBJAX_CACHE_DIR``, else ``~/.cache/gbjax``
(the one cache folder of gbjax, ``gbjax/_files.py``).

Keys: an entry's file name is ``<name>-<split>-<src>-<key>.npz``, where ``<key>``
covers the cache format version and each source file's size and modification
time (for a folder, every file's); a changed source is re-decoded, never served
stale. The keys and entries live in the private ``gbjax/data/_entries.py``.

Atomicity: :func:`save_arrays` writes an uncompressed ``.npz`` to a temporary
file in the destination folder, fsyncs it and moves it into place with
:func:`os.replace`, so an interrupted run never leaves a partial entry.

Integrity: the ``.npz`` also holds a SHA-256 of every array's name, dtype, shape
and bytes (``__sha256__``); :func:`load_arrays` reads the file back without
unpickling anything and refuses it unless the digest matches, so flipped bytes
are never served as data. These two are
the package's building blocks for caching any derived array (for example images
after a preprocessing step) under the same guarantees, and those of the
(images, labels) entries that :mod:`gbjax.data.sources` reads.

Failure handling: an unreadable or corrupt entry is discarded with a warning and rebuilt;
an unwritable cache only warns and the data is returned uncached; an unreadable
*source* (its signature cannot be taken) is a :class:`CorruptDataError`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping

import numpy as np

from gbjax._files import atomic_path
from gbjax.data._decode import CorruptDataError

#: Name of the digest entry that :func:`save_arrays` adds and :func:`load_arrays` checks.
DIGEST_KEY = "__sha256__"


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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


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

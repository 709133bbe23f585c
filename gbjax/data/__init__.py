"""Data sets for gbjax: MNIST, Fashion-MNIST and CIFAR-10 as uint8 arrays.

Public API
----------
``load(name, split, data_dir=None, *, cache_dir=None, download=True, progress=True)``
    ``(images_NHWC uint8, labels_N int32)`` for ``"mnist"``, ``"fashion_mnist"``
    or ``"cifar10"``, split ``"train"`` or ``"test"``.
``load_image_folder(path, *, classes=None, cache_dir=None, progress=True)``
    A user's own ``<path>/<class>/<image>`` folder (or ``.tar[.gz]`` archive).
``random_subset(images, labels, n)``
    A fixed random subset (the same for every run), in the original order.
``gb_processed(images, **gb_kwargs)``
    Granular-ball processing of a whole data set, cached on disk.
``fixed_batches``, ``map_batches``
    Fixed-shape batching (the last batch padded), used by every batched loop.
    On-device helpers for the training loop (explicit PRNG keys, jittable).
``DATASETS``, ``SPLITS``, ``CIFAR10_CLASSES``, ``IMAGE_EXTENSIONS``
    Accepted names and splits, CIFAR-10's label order, image file endings.
``DataNotFoundError``, ``CorruptDataError``
    Raised when a data set is found nowhere, or a file found is corrupt.

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
with :func:`os.replace`, so an interrupted run never leaves a partial entry.
Every entry (and every ``gb_processed`` entry) holds a SHA-256 of its arrays,
checked on each read: a corrupt or unreadable entry is discarded with a warning
and rebuilt, never served. An unwritable cache only warns.

What the loaders refuse
-----------------------
Nothing is dropped or changed silently: labels outside a data set's classes
(MNIST, Fashion-MNIST, CIFAR-10: 0..9) are a :class:`CorruptDataError`; in image
folders a folder that cannot be read is an error (symlinked folders are
followed), as are repeated names in ``classes``, an empty class folder when the
labels come from the sorted folder names, and images with more than 8 bits per
channel (16-bit PNGs: convert them to 8 bits first; they are never clipped).

Modules
-------
:mod:`gbjax.data.sources`
    :func:`load` and :func:`load_image_folder`: the search above, the
    tensorflow-datasets fallback and checksum-verified downloads.
:mod:`gbjax.data.decode`
    Decoders for IDX files, CIFAR-10 python batches, image files and tar archives.
:mod:`gbjax.data.cache`
    The keyed, atomic on-disk cache, and ``save_arrays``/``load_arrays`` for
    caching any other derived array the same way.
:mod:`gbjax.data.preprocess`
    :func:`gb_processed`, GB-processed data sets with their own cache entries.
:mod:`gbjax.data.batching`
    ``Batch``, ``take`` and ``bucket_size``, the pieces of :func:`fixed_batches`.
"""

from gbjax._batching import fixed_batches, map_batches
from gbjax.data._decode import CIFAR10_CLASSES, IMAGE_EXTENSIONS, CorruptDataError
from gbjax.data.preprocess import gb_processed
from gbjax.data.sources import (
    DATASETS,
    SPLITS,
    DataNotFoundError,
    load,
    load_image_folder,
    random_subset,
)

__all__ = [
    "CIFAR10_CLASSES",
    "DATASETS",
    "IMAGE_EXTENSIONS",
    "SPLITS",
    "CorruptDataError",
    "DataNotFoundError",
    "load",
    "load_image_folder",
    "gb_processed",
    "random_subset",
    "fixed_batches",
    "map_batches",
]

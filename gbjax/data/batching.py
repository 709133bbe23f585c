"""Fixed-shape batching: the one helper every batched loop in gbjax uses.

Defined in :mod:`gbjax._batching` (below every other gbjax module, so that the
GB engine, evaluation and attacks batch without importing the data package);
public here; :func:`gbjax.data.fixed_batches` and :func:`gbjax.data.map_batches`
are public in :mod:`gbjax.data` (their one home).
"""

from gbjax._batching import Batch, bucket_size, take

__all__ = ["Batch", "take", "bucket_size"]

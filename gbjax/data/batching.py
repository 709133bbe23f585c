"""Fixed-shape batching: the one helper every batched loop in gbjax uses.

Defined in :mod:`gbjax._batching` (below every other gbjax module, so that the
GB engine, evaluation and attacks batch without importing the data package);
public here and as :func:`gbjax.data.fixed_batches` / :func:`gbjax.data.map_batches`.
"""

from gbjax._batching import Batch, bucket_size, fixed_batches, map_batches, take

__all__ = ["Batch", "fixed_batches", "take", "map_batches", "bucket_size"]

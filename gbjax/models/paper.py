"""The pixel-embedding paper's network and its pixel embedding (docs/methods.md, section 2)."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

from gbjax import _random
from gbjax.models._common import MNIST_MEAN, MNIST_STD, Stat, max_pool, to_pixels


def pixel_indices(
    x: ArrayLike,
    *,
    mean: ArrayLike,
    std: ArrayLike,
    scale: float = 1000.0,
    num_embeddings: int = 2001,
) -> jax.Array:
    """Pixels (0..255 units) -> embedding-table indices, the authors' formula.

    ``index = clip(trunc((x - mean) / std * scale), -h, h) + h`` with
    ``h = (num_embeddings - 1) // 2``, computed in float32 in exactly that order
    (subtract, divide, multiply, truncate towards zero).  Returns int32 indices in
    ``[0, num_embeddings - 1]``.

    Example:
      >>> from gbjax import models
      >>> models.pixel_indices([0.0, 99.0, 100.0, 101.5, 255.0], mean=100.0, std=1.0,
      ...                      scale=1.0, num_embeddings=5).tolist()
      [0, 1, 2, 3, 4]
    """
    if num_embeddings < 3 or num_embeddings % 2 == 0:
        raise ValueError(f"num_embeddings must be odd and >= 3, got {num_embeddings}")
    half = (num_embeddings - 1) // 2
    x = jnp.asarray(x, jnp.float32)
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    z = jnp.trunc((x - mean) / std * jnp.float32(scale))
    z = jnp.clip(z, -half, half)
    return z.astype(jnp.int32) + half


def _batch_stats(p):
    """One mean and std over the whole batch (the authors' statistics).

    The std is floored at 1e-6 so that a constant batch maps to the centre index
    instead of NaN."""
    return jnp.mean(p), jnp.maximum(jnp.std(p), 1e-6)


class PixelEmbedding(nnx.Module):
    """Replaces each scalar pixel by a trainable ``features``-vector.

    Input (B, H, W, C) images (uint8 or [0, 1] floats, see module docstring);
    output (B, H, W, C * features) float32 (the C channels' vectors are
    concatenated).  ``stats="dataset"`` normalises with the fixed ``mean``/``std``
    (pixel units, scalars) -- the sound choice; ``stats="batch"`` reproduces the
    authors' code, which uses one mean and std over the whole current batch (so
    predictions depend on the other images in the batch).

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from gbjax import models
      >>> pe = models.PixelEmbedding(num_embeddings=5, features=2, scale=1.0, mean=100.0,
      ...                            std=1.0, rngs=nnx.Rngs(0))
      >>> x = np.array([0, 100, 255], np.uint8).reshape(1, 1, 3, 1)
      >>> pe.indices(x).ravel().tolist()  # clipped to the table's two ends
      [0, 2, 4]
      >>> out = pe(x)
      >>> out.shape, bool((out[0, 0, 1] == pe.embedding[2]).all())
      ((1, 1, 3, 2), True)
    """

    def __init__(
        self,
        num_embeddings: int = 2001,
        features: int = 64,
        scale: float = 1000.0,
        stats: Literal["dataset", "batch"] = "dataset",
        mean: ArrayLike = MNIST_MEAN,
        std: ArrayLike = MNIST_STD,
        *,
        rngs: nnx.Rngs,
    ):
        if stats not in ("dataset", "batch"):
            raise ValueError(f"stats must be 'dataset' or 'batch', got {stats!r}")
        if num_embeddings < 3 or num_embeddings % 2 == 0:
            raise ValueError(f"num_embeddings must be odd and >= 3, got {num_embeddings}")
        self.num_embeddings = num_embeddings
        self.features = features
        self.scale = float(scale)
        self.stats = stats
        self.mean = Stat(jnp.asarray(mean, jnp.float32))
        self.std = Stat(jnp.asarray(std, jnp.float32))
        self.embedding = nnx.Param(
            _random.uniform(rngs.params(), (num_embeddings, features), jnp.float32, -1.0, 1.0)
        )

    def indices(self, x: ArrayLike) -> jax.Array:
        """The embedding-table index of each pixel of ``x`` (:func:`pixel_indices`)."""
        p_BHWC = to_pixels(x)
        if self.stats == "batch":
            mean, std = _batch_stats(p_BHWC)
        else:
            mean, std = self.mean[...], self.std[...]
        return pixel_indices(
            p_BHWC, mean=mean, std=std, scale=self.scale, num_embeddings=self.num_embeddings
        )

    def __call__(self, x: ArrayLike) -> jax.Array:
        idx_BHWC = self.indices(x)
        e_BHWCF = jnp.take(self.embedding[...], idx_BHWC, axis=0)
        B, H, W, C, F = e_BHWCF.shape
        return e_BHWCF.reshape(B, H, W, C * F)


class PaperConvNet(nnx.Module):
    """The pixel-embedding paper's Table 1 network, three variants.

    input -> [embedding] -> conv3x3 64 + ReLU -> max-pool 2 -> conv3x3 64 + ReLU
    -> max-pool 2 -> flatten -> dense ``num_classes``.  Table 1 gives only the
    output shapes, which need 'SAME' padding; the kernel size, activation and
    initialisation are not stated, so the 3x3 kernels, ReLU and Flax's default
    (LeCun-normal) initialisation are our choices.

    ``kind``:
      * ``"raw"``: raw 0..255 pixel values fed to the first conv (paper's
        "without PE" baseline);
      * ``"normalized"``: ``(x - mean) / std`` (Table 5, "normalisation only");
      * ``"embedding"``: pixel embedding (:class:`PixelEmbedding`).

    ``stats`` ("dataset" or "batch") selects where mean/std come from for the
    "normalized" and "embedding" kinds.  (B, 28, 28, C) -> (B, num_classes).

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = models.PaperConvNet("raw", image_size=8, features=4, rngs=nnx.Rngs(0))
      >>> x = np.zeros((2, 8, 8, 1), np.uint8)
      >>> m(x).shape
      (2, 10)
      >>> bool((m(x) == m(x / np.float32(255))).all())  # uint8 or [0, 1]: the same
      True
    """

    def __init__(
        self,
        kind: Literal["raw", "normalized", "embedding"] = "embedding",
        *,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        features: int = 64,
        embed_features: int = 64,
        num_embeddings: int = 2001,
        scale: float = 1000.0,
        stats: Literal["dataset", "batch"] = "dataset",
        mean: ArrayLike = MNIST_MEAN,
        std: ArrayLike = MNIST_STD,
        rngs: nnx.Rngs,
    ):
        if kind not in ("raw", "normalized", "embedding"):
            raise ValueError(f"kind must be 'raw', 'normalized' or 'embedding', got {kind!r}")
        if stats not in ("dataset", "batch"):
            raise ValueError(f"stats must be 'dataset' or 'batch', got {stats!r}")
        if image_size % 4:
            raise ValueError(f"image_size must be a multiple of 4, got {image_size}")
        self.kind = kind
        self.stats = stats
        self.mean = Stat(jnp.asarray(mean, jnp.float32))
        self.std = Stat(jnp.asarray(std, jnp.float32))
        if kind == "embedding":
            self.embed = PixelEmbedding(
                num_embeddings, embed_features, scale, stats, mean, std, rngs=rngs
            )
            c_in = in_channels * embed_features
        else:
            self.embed = None
            c_in = in_channels
        self.conv1 = nnx.Conv(c_in, features, (3, 3), padding="SAME", rngs=rngs)
        self.conv2 = nnx.Conv(features, features, (3, 3), padding="SAME", rngs=rngs)
        flat = (image_size // 4) ** 2 * features
        self.head = nnx.Linear(flat, num_classes, rngs=rngs)

    def __call__(self, x: ArrayLike) -> jax.Array:
        if self.kind == "embedding":
            h = self.embed(x)
        else:
            h = to_pixels(x)
            if self.kind == "normalized":
                if self.stats == "batch":
                    mean, std = _batch_stats(h)
                else:
                    mean, std = self.mean[...], self.std[...]
                h = (h - mean) / std
        h = nnx.relu(self.conv1(h))
        h = max_pool(h, 2)
        h = nnx.relu(self.conv2(h))
        h = max_pool(h, 2)
        h = h.reshape(h.shape[0], -1)
        return self.head(h)

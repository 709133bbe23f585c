"""Flax NNX image classifiers: the pixel-embedding paper's network and ResNets.

Input convention (all models)
-----------------------------
Every model takes NHWC images either as

* ``uint8`` pixels in 0..255 (what the data pipeline keeps on device), or
* floating point in ``[0, 1]`` (what attacks differentiate through; a pixel
  value ``v`` is ``v / 255``).

Inside the model the input is mapped to pixel units (``uint8`` exactly, floats
by ``* 255``) and any normalisation happens there, so attack budgets
(``eps = 8/255`` and so on) stay in pixel space.  Outputs are logits
``(B, num_classes)``.

Statistics such as the dataset mean and standard deviation are stored in the
model as non-trainable :class:`Stat` variables (they travel with checkpoints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

__all__ = [
    "Stat",
    "to_pixels",
    "pixel_indices",
    "PixelEmbedding",
    "PaperConvNet",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]

# Dataset statistics in pixel units (0..255).  MNIST: scalar over the training
# set; CIFAR-10: per channel over the training set.
MNIST_MEAN = 33.318421
MNIST_STD = 78.567490
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


class Stat(nnx.Variable):
    """A non-trainable constant (dataset statistic) stored in the model state."""


def to_pixels(x: jax.Array) -> jax.Array:
    """Images (uint8 0..255 or float [0, 1]) -> float32 pixel units 0..255."""
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32)
    return x.astype(jnp.float32) * 255.0


def pixel_indices(x, *, mean, std, scale: float = 1000.0, num_embeddings: int = 2001) -> jax.Array:
    """Pixels (0..255 units) -> embedding-table indices, the authors' formula.

    ``index = clip(trunc((x - mean) / std * scale), -h, h) + h`` with
    ``h = (num_embeddings - 1) // 2``, computed in float32 in exactly that order
    (subtract, divide, multiply, truncate towards zero).  Returns int32 indices in
    ``[0, num_embeddings - 1]``.
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
    """

    def __init__(
        self,
        num_embeddings: int = 2001,
        features: int = 64,
        scale: float = 1000.0,
        stats: Literal["dataset", "batch"] = "dataset",
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
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
            jax.random.uniform(rngs.params(), (num_embeddings, features), jnp.float32, -1.0, 1.0)
        )

    def indices(self, x: jax.Array) -> jax.Array:
        p_BHWC = to_pixels(x)
        if self.stats == "batch":
            mean, std = _batch_stats(p_BHWC)
        else:
            mean, std = self.mean[...], self.std[...]
        return pixel_indices(
            p_BHWC, mean=mean, std=std, scale=self.scale, num_embeddings=self.num_embeddings
        )

    def __call__(self, x: jax.Array) -> jax.Array:
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
        mean: float = MNIST_MEAN,
        std: float = MNIST_STD,
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

    def __call__(self, x: jax.Array) -> jax.Array:
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
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        h = nnx.relu(self.conv2(h))
        h = nnx.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        return self.head(h)


class _BasicBlock(nnx.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, *, dtype, rngs):
        conv = lambda i, o, k, s: nnx.Conv(  # noqa: E731
            i,
            o,
            (k, k),
            strides=(s, s),
            padding="SAME" if k == 3 else "VALID",
            use_bias=False,
            dtype=dtype,
            rngs=rngs,
        )
        bn = lambda c, **kw: nnx.BatchNorm(
            c,
            momentum=0.9,
            dtype=dtype,  # noqa: E731
            rngs=rngs,
            **kw,
        )
        self.conv1 = conv(c_in, c_out, 3, stride)
        self.bn1 = bn(c_out)
        self.conv2 = conv(c_out, c_out, 3, 1)
        self.bn2 = bn(c_out, scale_init=nnx.initializers.zeros)  # zero-init residual
        if stride != 1 or c_in != c_out:
            self.proj = conv(c_in, c_out, 1, stride)
            self.proj_bn = bn(c_out)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x):
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        sc = x if self.proj is None else self.proj_bn(self.proj(x))
        return nnx.relu(h + sc)


class ResNet(nnx.Module):
    """CIFAR-style ResNet (3x3 stem, no initial pool) of basic blocks.

    Normalises ``(pixels/255 - mean) / std`` per channel inside the model
    (``mean``/``std`` in pixel units, one per channel or a scalar; default: the
    CIFAR-10 statistics for 3 channels, MNIST's otherwise).  Works for
    28x28x1 and 32x32x3 (any size) inputs; global average pool at the end.
    Uses BatchNorm: call ``model.train()`` / ``model.eval()`` (or split the two
    graph definitions as :mod:`gbjax.train` does).  ``dtype`` is the compute
    dtype (e.g. ``jnp.bfloat16`` on GPU); parameters stay float32.
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        mean=None,
        std=None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if len(stage_sizes) != len(widths):
            raise ValueError("stage_sizes and widths must have the same length")
        if mean is None:
            mean = CIFAR10_MEAN if in_channels == 3 else MNIST_MEAN
        if std is None:
            std = CIFAR10_STD if in_channels == 3 else MNIST_STD
        mean = np.broadcast_to(np.asarray(mean, np.float32), (in_channels,))
        std = np.broadcast_to(np.asarray(std, np.float32), (in_channels,))
        self.mean = Stat(jnp.asarray(mean))
        self.std = Stat(jnp.asarray(std))
        self.dtype = dtype
        self.stem = nnx.Conv(
            in_channels, widths[0], (3, 3), padding="SAME", use_bias=False, dtype=dtype, rngs=rngs
        )
        self.stem_bn = nnx.BatchNorm(widths[0], momentum=0.9, dtype=dtype, rngs=rngs)
        blocks = []
        c_in = widths[0]
        for i, (n, w) in enumerate(zip(stage_sizes, widths)):
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(_BasicBlock(c_in, w, stride, dtype=dtype, rngs=rngs))
                c_in = w
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(c_in, num_classes, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = (to_pixels(x) - self.mean[...]) / self.std[...]
        if self.dtype is not None:
            h = h.astype(self.dtype)
        h = nnx.relu(self.stem_bn(self.stem(h)))
        for block in self.blocks:
            h = block(h)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return self.head(h)


def ResNet18(
    num_classes: int = 10, *, in_channels: int = 3, mean=None, std=None, dtype=None, rngs: nnx.Rngs
) -> ResNet:
    """ResNet-18, CIFAR variant (11.2M parameters): [2,2,2,2] x (64..512)."""
    return ResNet(
        (2, 2, 2, 2),
        (64, 128, 256, 512),
        num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        dtype=dtype,
        rngs=rngs,
    )


def ResNet20(
    num_classes: int = 10, *, in_channels: int = 3, mean=None, std=None, dtype=None, rngs: nnx.Rngs
) -> ResNet:
    """ResNet-20 (He et al. 2016 CIFAR, 0.27M parameters): [3,3,3] x (16,32,64).

    Uses 1x1-conv projection shortcuts (option B) rather than zero padding.
    """
    return ResNet(
        (3, 3, 3),
        (16, 32, 64),
        num_classes,
        in_channels=in_channels,
        mean=mean,
        std=std,
        dtype=dtype,
        rngs=rngs,
    )

"""CIFAR-style ResNets of basic blocks (ResNet-18, ResNet-20 and a generic one)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gbjax.models._common import CIFAR10_MEAN, CIFAR10_STD, MNIST_MEAN, MNIST_STD, Stat, to_pixels


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

    Normalises ``(pixels - mean) / std`` per channel inside the model
    (``mean``/``std`` in pixel units, one per channel or a scalar; default: the
    CIFAR-10 statistics for 3 channels, MNIST's otherwise).  Works for
    28x28x1 and 32x32x3 (any size) inputs; global average pool at the end.
    Uses BatchNorm: call ``model.train()`` / ``model.eval()`` (or split the two
    graph definitions as :mod:`gbjax.train` does).  ``dtype`` is the compute
    dtype (e.g. ``jnp.bfloat16`` on GPU); parameters stay float32.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = models.ResNet(stage_sizes=(1,), widths=(4,), num_classes=10, rngs=nnx.Rngs(0))
      >>> m.eval()  # BatchNorm: running statistics
      >>> m(np.zeros((2, 8, 8, 3), np.uint8)).shape
      (2, 10)
    """

    def __init__(
        self,
        stage_sizes: Sequence[int],
        widths: Sequence[int],
        num_classes: int = 10,
        *,
        in_channels: int = 3,
        mean: ArrayLike | None = None,
        std: ArrayLike | None = None,
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

    def __call__(self, x: ArrayLike) -> jax.Array:
        h = (to_pixels(x) - self.mean[...]) / self.std[...]
        if self.dtype is not None:
            h = h.astype(self.dtype)
        h = nnx.relu(self.stem_bn(self.stem(h)))
        for block in self.blocks:
            h = block(h)
        h = jnp.mean(h.astype(jnp.float32), axis=(1, 2))
        return self.head(h)


def ResNet18(
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    mean: ArrayLike | None = None,
    std: ArrayLike | None = None,
    dtype=None,
    rngs: nnx.Rngs,
) -> ResNet:
    """ResNet-18, CIFAR variant (11.2M parameters): [2,2,2,2] x (64..512).

    Example:
      Its shape only (``nnx.eval_shape`` allocates no parameters):

      >>> import jax
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = nnx.eval_shape(lambda: models.ResNet18(10, rngs=nnx.Rngs(0)))
      >>> sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
      11173962
      >>> len(m.blocks), m.head.kernel.shape
      (8, (512, 10))
    """
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
    num_classes: int = 10,
    *,
    in_channels: int = 3,
    mean: ArrayLike | None = None,
    std: ArrayLike | None = None,
    dtype=None,
    rngs: nnx.Rngs,
) -> ResNet:
    """ResNet-20 (He et al. 2016 CIFAR, 0.27M parameters): [3,3,3] x (16,32,64).

    Uses 1x1-conv projection shortcuts (option B) rather than zero padding.

    Example:
      Its shape only (``nnx.eval_shape`` allocates no parameters):

      >>> import jax
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = nnx.eval_shape(lambda: models.ResNet20(10, rngs=nnx.Rngs(0)))
      >>> sum(p.size for p in jax.tree.leaves(nnx.state(m, nnx.Param)))
      272474
      >>> len(m.blocks), m.head.kernel.shape
      (9, (64, 10))
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

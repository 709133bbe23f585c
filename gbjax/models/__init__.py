"""Flax NNX image classifiers.

* :class:`PaperConvNet` and :class:`PixelEmbedding`: the pixel-embedding
  paper's MNIST network in its raw, normalised and embedding variants;
* :class:`ResNet`, :func:`ResNet18`, :func:`ResNet20`: CIFAR-style ResNets;
* :class:`Airbench`: the airbench94-class network that trains CIFAR-10 to about
  94% in minutes on a GPU and within an hour on a 2-core CPU.

Models are built by name with :func:`build` (the names of ``Config.model``;
:func:`register` adds one), and :func:`split_state` splits a model into the
parts a training state holds.

Every model takes NHWC images as uint8 pixels (0..255) or floats in [0, 1] and
normalises inside (see :mod:`gbjax.models._common`), so attack budgets stay in
pixel space; outputs are logits.
"""

from gbjax.models._common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    BatchNorm,
    Stat,
    gelu,
    in_float32,
    to_pixels,
)
from gbjax.models._registry import build, register, registered, split_state
from gbjax.models.airbench import (
    Airbench,
    dirac_init,
    max_pool,
    whitening_gain,
    whitening_kernel,
)
from gbjax.models.paper import PaperConvNet, PixelEmbedding, pixel_indices
from gbjax.models.resnet import ResNet, ResNet18, ResNet20

__all__ = [
    "Stat",
    "BatchNorm",
    "gelu",
    "to_pixels",
    "in_float32",
    "pixel_indices",
    "PixelEmbedding",
    "PaperConvNet",
    "ResNet",
    "ResNet18",
    "ResNet20",
    "Airbench",
    "dirac_init",
    "max_pool",
    "whitening_kernel",
    "whitening_gain",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "build",
    "register",
    "registered",
    "split_state",
]

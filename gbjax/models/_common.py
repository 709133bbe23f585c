"""Shared model pieces: the input convention and dataset statistics.

Every gbjax model takes NHWC images either as ``uint8`` pixels in 0..255 (what
the data pipeline keeps on device) or as floats in ``[0, 1]`` (what attacks
differentiate through). :func:`to_pixels` maps both to float32 pixel units, and
all normalisation happens inside the model, so attack budgets (``eps = 8/255``)
stay in pixel space. Statistics such as a data set's mean and standard
deviation are stored as non-trainable :class:`Stat` variables, so they travel
with checkpoints.
"""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jax.typing import ArrayLike

# Dataset statistics in pixel units (0..255).  MNIST: scalar over the training
# set; CIFAR-10: per channel over the training set.
MNIST_MEAN = 33.318421
MNIST_STD = 78.567490
CIFAR10_MEAN = (125.307, 122.950, 113.865)
CIFAR10_STD = (62.993, 62.089, 66.705)


M = TypeVar("M", bound=nnx.Module)


class Stat(nnx.Variable):
    """A non-trainable constant (dataset statistic) stored in the model state.

    It travels with the model's state and its checkpoints, but is neither a
    parameter (no gradient, no optimiser state) nor a BatchNorm statistic.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from gbjax import models
      >>> class Centre(nnx.Module):
      ...     def __init__(self, mean):
      ...         self.mean = models.Stat(jnp.float32(mean))
      ...     def __call__(self, x):
      ...         return x - self.mean[...]
      >>> m = Centre(33.0)
      >>> m(jnp.array([33.0, 40.0])).tolist()
      [0.0, 7.0]
      >>> len(nnx.state(m, nnx.Param)), list(nnx.state(m, models.Stat))
      (0, ['mean'])
    """


def to_pixels(x: ArrayLike) -> jax.Array:
    """Images (uint8 0..255 or float [0, 1]) -> float32 pixel units 0..255.

    Example:
      >>> import numpy as np
      >>> from gbjax import models
      >>> models.to_pixels(np.array([0, 128, 255], np.uint8)).tolist()
      [0.0, 128.0, 255.0]
      >>> models.to_pixels(np.array([0.0, 0.5, 1.0])).tolist()
      [0.0, 127.5, 255.0]
    """
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.integer):
        return x.astype(jnp.float32)
    return x.astype(jnp.float32) * 255.0


def in_float32(model: M) -> M:
    """The same model computing in float32: every submodule's compute ``dtype``
    is set to ``None`` (parameters are float32 already and are shared, not copied).

    Attacks and their evaluation run in float32 even when a model was trained
    in bfloat16: a coarser forward pass changes both the gradients an attack
    follows and the predictions it is scored on.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = models.ResNet((1,), (4,), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
      >>> m.stem.dtype
      <class 'jax.numpy.bfloat16'>
      >>> models.in_float32(m) is m, m.stem.dtype
      (True, None)
    """
    for _, module in nnx.iter_modules(model):
        if getattr(module, "dtype", None) is not None:
            module.dtype = None
    return model


def max_pool(x_BHWC: ArrayLike, k: int) -> jax.Array:
    """``k x k`` max-pooling with stride ``k`` and VALID padding (rows/columns past
    the last full window are dropped), as a reshape and a max.

    Same values as ``lax.reduce_window`` (``nnx.max_pool``); on XLA:CPU the
    reduce-window gradient (a select-and-scatter) was measured at 2-3x the cost
    of the convolution before it (airbench and the PE network), this one is cheap.
    At ties the gradient is shared among the tied inputs instead of going to the
    first one.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import models
      >>> x = jnp.arange(20.0).reshape(1, 4, 5, 1)  # the 5th column is dropped
      >>> models.max_pool(x, 2)[0, ..., 0].tolist()
      [[6.0, 8.0], [16.0, 18.0]]
    """
    x_BHWC = jnp.asarray(x_BHWC)
    b, h, w, c = x_BHWC.shape
    ho, wo = h // k, w // k
    if ho == 0 or wo == 0:
        raise ValueError(f"max_pool({k}) of a {h}x{w} map leaves nothing")
    x = x_BHWC[:, : ho * k, : wo * k, :]
    return x.reshape(b, ho, k, wo, k, c).max(axis=(2, 4))

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

import functools
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


@jax.custom_jvp
def gelu(x: ArrayLike) -> jax.Array:
    """The exact GELU, ``x * Phi(x)``, written with ``erf`` as PyTorch's CPU kernel is.

    ``jax.nn.gelu(x, approximate=False)`` is written with ``erfc``, which XLA:CPU
    expands into exponentials and selects; with :class:`BatchNorm` this form makes
    the airbench step 1.10-1.15x faster (``benchmarks/train_profile.py --ab``). The
    values differ by at most about 1e-6 (in the far negative tail, where both are
    about 0); the derivative ``Phi(x) + x phi(x)`` is given directly.

    Example:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> from gbjax import models
      >>> x = jnp.linspace(-6.0, 6.0, 101)
      >>> float(jnp.abs(models.gelu(x) - jax.nn.gelu(x, approximate=False)).max()) < 2e-6
      True
      >>> float(jax.grad(models.gelu)(0.0))
      0.5
    """
    x = jnp.asarray(x)
    return x * _phi_cdf(x)


def _phi_cdf(x):
    return 0.5 * (1.0 + jax.lax.erf(x * jnp.asarray(0.7071067811865476, x.dtype)))


@gelu.defjvp
def _gelu_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    x = jnp.asarray(x)
    cdf = _phi_cdf(x)
    pdf = jnp.exp(-0.5 * x * x) * jnp.asarray(0.3989422804014327, x.dtype)
    return x * cdf, (cdf + x * pdf) * dx


# BatchNorm in training mode with a hand-written backward pass.
#
# On XLA:CPU a sum over the batch and spatial axes of an NHWC map (a "column"
# reduction keeping the channels) becomes a reduce-window and a reduce, at about a
# third of the memory bandwidth (benchmarks/train_profile.py). Autodiff of flax's
# BatchNorm needs three such sums in the backward pass; the backward below needs
# two. Forward values are flax's (two-pass variance, ``x - mean`` times
# ``rsqrt(var + eps)``).
#
# The sums were also written as ``ones @ x``, 3-5x faster alone; in the jitted
# airbench step on real CIFAR-10 that version gave an infinite weight gradient at
# the second step (one sum of finite values came out inf; eager execution of the
# same step was finite), so the sums stay reductions.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn_train(x_NC, scale_C, bias_C, epsilon):
    return _bn_train_fwd(x_NC, scale_C, bias_C, epsilon)[0]


def _bn_train_fwd(x_NC, scale_C, bias_C, epsilon):
    n = x_NC.shape[0]
    mean_C = x_NC.sum(0) / n
    centred = x_NC - mean_C
    var_C = (centred * centred).sum(0) / n
    inv_C = jax.lax.rsqrt(var_C + epsilon)
    xhat = centred * inv_C
    return (xhat * scale_C + bias_C, mean_C, var_C), (xhat, inv_C, scale_C)


def _bn_train_bwd(epsilon, res, cts):
    xhat, inv_C, scale_C = res
    dy = cts[0]  # the statistics' cotangents are ignored: they feed stop_gradient'ed state
    n = dy.shape[0]
    dbias_C = dy.sum(0)
    dscale_C = (dy * xhat).sum(0)
    dx = (scale_C * inv_C) * (dy - (dbias_C + xhat * dscale_C) / n)
    return dx, dscale_C, dbias_C


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


class BatchNorm(nnx.BatchNorm):
    """``nnx.BatchNorm`` over the last axis with faster training-mode statistics.

    Same variables, arguments and results as ``nnx.BatchNorm``; in training mode
    (no mask, no named axis, normalising the last axis) the batch mean and
    two-pass variance, the normalisation and its gradient are one custom-VJP
    function whose backward pass needs two channel sums where autodiff of
    ``nnx.BatchNorm`` needs three (each is slow on XLA:CPU:
    ``benchmarks/train_profile.py``). Evaluation mode and every other case are
    ``nnx.BatchNorm``'s.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from gbjax import models
      >>> x = np.random.default_rng(0).normal(3.0, 2.0, (64, 4, 4, 8)).astype(np.float32)
      >>> ours = models.BatchNorm(8, use_scale=False, rngs=nnx.Rngs(0))
      >>> theirs = nnx.BatchNorm(8, use_scale=False, rngs=nnx.Rngs(0))
      >>> bool(np.allclose(ours(x), theirs(x), atol=1e-5))
      True
      >>> bool(np.allclose(ours.var[...], theirs.var[...], rtol=1e-5))
      True
    """

    def __call__(self, x, use_running_average=None, *, mask=None):
        running = self.use_running_average if use_running_average is None else use_running_average
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        if not (
            running is False
            and mask is None
            and self.axis_name is None
            and [a % jnp.ndim(x) for a in axes] == [jnp.ndim(x) - 1]
        ):
            return super().__call__(x, use_running_average, mask=mask)
        dtype = jnp.promote_types(self.dtype or jnp.result_type(x), jnp.float32)
        x_NC = jnp.asarray(x, dtype).reshape(-1, x.shape[-1])
        c = x_NC.shape[1]
        scale_C = jnp.ones((c,), dtype) if self.scale is None else self.scale[...].astype(dtype)
        bias_C = jnp.zeros((c,), dtype) if self.bias is None else self.bias[...].astype(dtype)
        y_NC, mean_C, var_C = _bn_train(x_NC, scale_C, bias_C, self.epsilon)
        sg = jax.lax.stop_gradient
        self.mean[...] = sg(self.momentum * self.mean[...] + (1 - self.momentum) * mean_C)
        self.var[...] = sg(self.momentum * self.var[...] + (1 - self.momentum) * var_C)
        params = [p[...] for p in (self.scale, self.bias) if p is not None]
        out_dtype = self.dtype or jnp.result_type(x, *params)
        return y_NC.reshape(x.shape).astype(out_dtype)

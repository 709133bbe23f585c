"""An airbench94-class CIFAR-10 network in Flax NNX (docs/methods.md, section 6).

Re-implemented from the published description (K. Jordan, "94% on CIFAR-10 in
3.29 seconds on a single GPU", 2024): a frozen 2x2 patch-whitening convolution
followed by three conv groups and a max-pool head.

    whiten (2x2, VALID, 2*C*4 channels, frozen kernel, trainable bias) -> GELU
    3 x [conv3x3 -> max-pool 2 -> BatchNorm -> GELU -> conv3x3 -> BatchNorm -> GELU]
    max-pool 3 -> linear (no bias) -> x 1/9

* The whitening kernel holds the eigenvectors of the (uncentred) covariance of
  all 2x2 patches of normalised training images, each scaled by
  ``1 / sqrt(eigenvalue + eps)``, and their negatives (:func:`whitening_kernel`).
  It is a :class:`Stat`, not a parameter, so no gradient is ever computed for
  it. Its bias is a parameter; the training recipe freezes it after a few
  epochs (``gbjax/configs/airbench_cifar10.py``).
* Convolutions have no bias; the first ``min(C_in, C_out)`` output filters start
  as the identity ("dirac", :func:`dirac_init`), the others uniform in
  ``+-1/sqrt(fan_in)`` (PyTorch's default, which the recipe was tuned with).
* BatchNorm has no scale (fixed at 1), epsilon 1e-12, momentum 0.6 (running
  statistics keep 60% of their value per step).
* GELU is the exact (erf) form.

Deviations from the published network, each measured or forced:

* Max-pooling is a reshape and a max (:func:`max_pool`), not
  ``lax.reduce_window``: on XLA:CPU the reduce-window gradient (a
  select-and-scatter) took about 40% of a training step; the values and
  gradients are the same (ties aside).
* Data are our JPEG (quality about 75) CIFAR-10, not the lossless original;
  normalisation uses the training set's own mean and standard deviation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.nn.initializers import Initializer
from jax.typing import ArrayLike

from gbjax import _random
from gbjax.models._common import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    BatchNorm,
    Stat,
    gelu,
    max_pool,
    to_pixels,
)

__all__ = [
    "Airbench",
    "dirac_init",
    "whitening_kernel",
    "whitening_gain",
    "torch_default_init",
]


def torch_default_init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
    """PyTorch's default initialisation of conv and linear weights (uniform in
    ``[-1/sqrt(fan_in), 1/sqrt(fan_in)]``), which the airbench recipe assumes.

    The values of ``nnx.initializers.variance_scaling(1/3, "fan_in", "uniform")``, the
    same arithmetic, with the draw made along one axis (:mod:`gbjax._random`): building
    a model compiles its initialisers, and a conv kernel's shaped draw compiled in
    0.5 s (``tests/test_models.py`` checks the values are flax's)."""
    shape = tuple(shape)
    fan_in = shape[-2] * (math.prod(shape) / shape[-2] / shape[-1])  # as jax.nn computes it
    variance = jnp.array((1.0 / 3.0) / fan_in, dtype=dtype)
    return _random.uniform(key, shape, dtype, -1) * jnp.sqrt(3 * variance)


def dirac_init(base: Initializer = torch_default_init) -> Initializer:
    """Initialiser of an HWIO conv kernel: identity on the first ``min(I, O)`` filters.

    Output filter ``o < min(I, O)`` is a delta at the kernel centre on input
    channel ``o`` (the filter passes that channel through unchanged); the
    other filters come from ``base``.

    Example:
      >>> import jax
      >>> from gbjax import models
      >>> k = models.dirac_init()(jax.random.key(0), (3, 3, 2, 3))  # 2 in, 3 out
      >>> k[1, 1, :, :2].tolist()  # filters 0 and 1 pass channels 0 and 1 through
      [[1.0, 0.0], [0.0, 1.0]]
      >>> float(abs(k[..., 2]).max()) <= 1 / (3 * 3 * 2) ** 0.5  # filter 2: from base
      True
    """

    def init(key, shape, dtype=jnp.float32):
        kh, kw, cin, cout = shape
        k = base(key, shape, dtype)
        n = min(cin, cout)
        ident = (
            jnp.zeros((kh, kw, cin, n), dtype)
            .at[kh // 2, kw // 2]
            .set(jnp.eye(cin, n, dtype=dtype))
        )
        return k.at[..., :n].set(ident)

    return init


def whitening_kernel(
    images_NHWC: ArrayLike,
    *,
    mean: ArrayLike,
    std: ArrayLike,
    kernel_size: int = 2,
    eps: float = 5e-4,
) -> np.ndarray:
    """The frozen first layer: ``(k, k, C, 2 * C * k * k)`` HWIO kernel (float32).

    ``images_NHWC`` are in pixel units (uint8 or float 0..255), normalised here by
    ``mean``/``std`` (pixel units, per channel). Every ``k x k`` patch (stride 1,
    VALID) is a vector ``p`` of length ``D = k * k * C`` in HWC order; with the
    eigen-decomposition ``E[p p^T] = V diag(lam) V^T`` (eigenvalues descending),
    the kernel's output ``j < D`` is ``V[:, j] / sqrt(lam_j + eps)`` and output
    ``D + j`` its negative. So the first ``D`` outputs of the patches of these
    images have second moment ``diag(lam / (lam + eps))``, about the identity.
    Computed in float64.

    Example:
      >>> import numpy as np
      >>> from gbjax import models
      >>> x = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 1))
      >>> k = models.whitening_kernel(x, mean=[127.5], std=[64.0])
      >>> k.shape, k.dtype  # 2x2 patches of 1 channel: D = 4 outputs and their negatives
      ((2, 2, 1, 8), dtype('float32'))
      >>> p = np.stack([x[:, i:i + 7, j:j + 7, 0] for i in (0, 1) for j in (0, 1)], -1)
      >>> w = ((p.reshape(-1, 4) - 127.5) / 64.0) @ k.reshape(4, 8)[:, :4]
      >>> np.allclose(w.T @ w / len(w), np.eye(4), atol=1e-2)  # whitened
      True
    """
    x = np.asarray(images_NHWC, np.float64)
    if x.ndim != 4 or len(x) == 0:
        raise ValueError(f"images must be a non-empty (N, H, W, C) array, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("images contain NaN or inf")
    n, h, w, c = x.shape
    k = int(kernel_size)
    if k < 1 or k > min(h, w):
        raise ValueError(f"kernel_size must be in 1..{min(h, w)}, got {kernel_size}")
    x = (x - np.asarray(mean, np.float64).reshape(-1)) / np.asarray(std, np.float64).reshape(-1)
    ho, wo = h - k + 1, w - k + 1
    cols = [x[:, i : i + ho, j : j + wo, :] for i in range(k) for j in range(k)]
    patches = np.stack(cols, axis=3).reshape(-1, k * k * c)  # (P, D), HWC order
    cov = patches.T @ patches / len(patches)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], vec[:, ::-1]
    scaled = vec / np.sqrt(np.maximum(lam, 0.0) + eps)
    kernel = np.concatenate([scaled, -scaled], axis=1).reshape(k, k, c, 2 * k * k * c)
    return kernel.astype(np.float32)


def whitening_gain(kernel_HWIO: ArrayLike, std: ArrayLike, *, eps: float = 1.0) -> np.ndarray:
    """How far an L-infinity perturbation can move each whitened feature.

    For each output ``j`` of the whitening convolution (:func:`whitening_kernel`,
    applied to images normalised by the per-channel ``std``, pixel units), the
    largest change of that output that a perturbation of at most ``eps`` pixel
    units per pixel and channel can cause: ``eps * sum_p |kernel[p, j]| / std_c(p)``
    (reached by ``sign(kernel[:, j])``). The whitened outputs have second moment
    about 1 on training patches, so the gain is in units of their natural spread:
    a gain above 1 at ``eps = 2`` (2/255) means an imperceptible perturbation moves
    that feature by more than its whole natural range, which is how airbench's
    whitening amplifies small perturbations (docs/methods.md, section 9).

    Args:
      kernel_HWIO: ``(k, k, C, O)`` whitening kernel.
      std: per-channel standard deviation (pixel units), shape ``(C,)`` or scalar.
      eps: the perturbation budget in pixel units (``255 * eps`` for [0, 1] images).

    Returns:
      ``(O,)`` float64 gains.

    Example:
      >>> import numpy as np
      >>> k = np.zeros((1, 1, 1, 2)); k[0, 0, 0] = [2.0, -0.5]
      >>> whitening_gain(k, std=[4.0], eps=2.0).tolist()
      [1.0, 0.25]
    """
    k = np.asarray(kernel_HWIO, np.float64)
    if k.ndim != 4:
        raise ValueError(f"kernel must be (k, k, C, O), got shape {k.shape}")
    std_C = np.broadcast_to(np.asarray(std, np.float64).reshape(-1), (k.shape[2],))
    if not np.all(std_C > 0):
        raise ValueError(f"std must be > 0, got {std!r}")
    return float(eps) * np.abs(k / std_C[None, None, :, None]).sum(axis=(0, 1, 2))


class _ConvGroup(nnx.Module):
    def __init__(self, c_in: int, c_out: int, *, momentum: float, epsilon: float, dtype, rngs):
        def conv(i, o):
            return nnx.Conv(
                i, o, (3, 3), padding="SAME", use_bias=False, kernel_init=dirac_init(),
                dtype=dtype, rngs=rngs,
            )  # fmt: skip

        def norm(ch):
            return BatchNorm(
                ch, use_scale=False, use_bias=True, momentum=momentum, epsilon=epsilon,
                use_fast_variance=False, dtype=dtype, rngs=rngs,
            )  # fmt: skip

        self.conv1 = conv(c_in, c_out)
        self.norm1 = norm(c_out)
        self.conv2 = conv(c_out, c_out)
        self.norm2 = norm(c_out)

    def __call__(self, x):
        x = max_pool(self.conv1(x), 2)
        x = gelu(self.norm1(x))
        return gelu(self.norm2(self.conv2(x)))


class Airbench(nnx.Module):
    """The airbench94 network (``widths=(64, 256, 256)``); see the module docstring.

    ``(B, H, W, C)`` uint8 or [0, 1] float images -> ``(B, num_classes)`` logits.
    The final map must be 3x3 or larger for the last max-pool (32x32 and 28x28
    inputs give 3x3). ``mean``/``std`` are per-channel pixel-unit statistics.
    Call :meth:`init_whitening` with training images before training (until
    then the whitening kernel is zero). ``dtype`` is the compute dtype
    (``jnp.bfloat16`` on GPU); parameters and statistics stay float32.

    Example:
      One conv group (the airbench94 network has three) on 8x8 images:
      whitening 8 -> 7, the group's max-pool 7 -> 3, the head's 3 -> 1.

      >>> import numpy as np
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = models.Airbench(widths=(8,), num_classes=10, rngs=nnx.Rngs(0))
      >>> x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
      >>> m.init_whitening(x)
      >>> m.eval()  # BatchNorm: running statistics
      >>> m.whiten_kernel.shape, m(x).shape
      ((2, 2, 3, 24), (2, 10))
    """

    def __init__(
        self,
        widths: Sequence[int] = (64, 256, 256),
        *,
        num_classes: int = 10,
        in_channels: int = 3,
        whiten_kernel_size: int = 2,
        bn_momentum: float = 0.6,
        bn_epsilon: float = 1e-12,
        logit_scale: float = 1.0 / 9.0,
        mean: ArrayLike | None = None,
        std: ArrayLike | None = None,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if len(widths) < 1 or any(int(w) < 1 for w in widths):
            raise ValueError(f"widths must be positive ints, got {widths!r}")
        if mean is None:
            mean = CIFAR10_MEAN if in_channels == 3 else MNIST_MEAN
        if std is None:
            std = CIFAR10_STD if in_channels == 3 else MNIST_STD
        self.mean = Stat(jnp.asarray(np.broadcast_to(np.asarray(mean, np.float32), (in_channels,))))
        self.std = Stat(jnp.asarray(np.broadcast_to(np.asarray(std, np.float32), (in_channels,))))
        k = int(whiten_kernel_size)
        width0 = 2 * in_channels * k * k
        self.whiten_kernel = Stat(jnp.zeros((k, k, in_channels, width0), jnp.float32))
        self.whiten_bias = nnx.Param(jnp.zeros((width0,), jnp.float32))
        groups, c_in = [], width0
        for wdt in widths:
            groups.append(
                _ConvGroup(c_in, int(wdt), momentum=bn_momentum, epsilon=bn_epsilon,
                           dtype=dtype, rngs=rngs)
            )  # fmt: skip
            c_in = int(wdt)
        self.groups = nnx.List(groups)
        self.head = nnx.Linear(
            c_in, num_classes, use_bias=False, kernel_init=torch_default_init, rngs=rngs
        )
        self.logit_scale = float(logit_scale)
        self.dtype = dtype

    def init_whitening(self, images_NHWC: ArrayLike, *, eps: float = 5e-4) -> None:
        """Sets the whitening kernel from these training images (pixel units)."""
        k = self.whiten_kernel.shape[0]
        kernel = whitening_kernel(
            images_NHWC, mean=np.asarray(self.mean[...]), std=np.asarray(self.std[...]),
            kernel_size=k, eps=eps,
        )  # fmt: skip
        if kernel.shape != self.whiten_kernel.shape:
            raise ValueError(
                f"images have {kernel.shape[2]} channels, the model {self.whiten_kernel.shape[2]}"
            )
        self.whiten_kernel[...] = jnp.asarray(kernel)

    def init_from_data(self, images_NHWC: ArrayLike) -> None:
        """The data-dependent initialisation that :func:`gbjax.train.init_model`
        looks for: :meth:`init_whitening` on these training images."""
        self.init_whitening(images_NHWC)

    def __call__(self, x: ArrayLike) -> jax.Array:
        h = (to_pixels(x) - self.mean[...]) / self.std[...]
        kernel = self.whiten_kernel[...]
        if self.dtype is not None:
            h, kernel = h.astype(self.dtype), kernel.astype(self.dtype)
        h = jax.lax.conv_general_dilated(
            h, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        h = gelu(h + self.whiten_bias[...].astype(h.dtype))
        for g in self.groups:
            h = g(h)
        h = max_pool(h, 3)
        h = h.reshape(h.shape[0], -1).astype(jnp.float32)
        return self.head(h) * self.logit_scale

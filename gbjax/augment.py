"""Image augmentation on device, and test-time augmentation (TTA).

All functions take NHWC batches of any dtype (uint8 on the training path),
are jittable, and take explicit PRNG keys.

Training:

* :func:`random_translate`: pad each side by ``pad`` (reflect or zeros), crop
  back at a random offset per image;
* :func:`random_flip`: mirror left-right with probability 1/2 per image;
* :func:`random_crop_flip`: the standard CIFAR recipe (zero pad 4, crop, flip);
* :func:`alternating_flip`: airbench's flip: a fixed random half of the images
  is mirrored on even epochs, and the other half on odd epochs, so every image is
  seen both ways in every two epochs.

Test time:

* :func:`tta_views` and :func:`tta_logits`: the mirrored image and, at level
  ``"flip_translate"``, copies shifted by one pixel up-left and down-right
  (reflect padding), weighted as airbench94 weights them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from gbjax import _random
from gbjax._checks import check_int

__all__ = [
    "random_translate",
    "random_flip",
    "random_crop_flip",
    "alternating_flip",
    "flip_lr",
    "TTA_LEVELS",
    "tta_views",
    "tta_logits",
]

TTA_LEVELS = ("none", "flip", "flip_translate")


def _check_batch(x_BHWC: ArrayLike) -> jax.Array:
    x_BHWC = jnp.asarray(x_BHWC)
    if x_BHWC.ndim != 4:
        raise ValueError(f"x_BHWC must have shape (B, H, W, C), got {x_BHWC.shape}")
    return x_BHWC


def flip_lr(x_BHWC: ArrayLike) -> jax.Array:
    """Mirror every image left-right.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import augment
      >>> x = jnp.arange(3).reshape(1, 1, 3, 1)  # one 1x3 image
      >>> augment.flip_lr(x)[0, 0, :, 0].tolist()
      [2, 1, 0]
    """
    return jnp.asarray(x_BHWC)[:, :, ::-1, :]


def random_translate(
    key: jax.Array,
    x_BHWC: ArrayLike,
    pad: int,
    *,
    mode: Literal["reflect", "constant"] = "reflect",
) -> jax.Array:
    """Shift each image by an offset drawn uniformly from ``-pad..pad`` per axis.

    The image is padded by ``pad`` on each side (``mode`` as in ``jnp.pad``:
    ``"reflect"`` as airbench, ``"constant"`` for zeros) and cropped back to its
    size. Shape and dtype are preserved; ``pad`` is static.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import augment
      >>> x = jnp.arange(16, dtype=jnp.uint8).reshape(1, 4, 4, 1)
      >>> y = augment.random_translate(jax.random.key(0), x, 1)
      >>> y.shape, y.dtype, set(y.ravel().tolist()) <= set(x.ravel().tolist())  # reflected
      ((1, 4, 4, 1), dtype('uint8'), True)
      >>> bool((augment.random_translate(jax.random.key(0), x, 0) == x).all())
      True
    """
    x_BHWC = _check_batch(x_BHWC)
    pad = check_int("pad", pad, 0)
    if pad == 0:
        return x_BHWC
    b, h, w, c = x_BHWC.shape
    if mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {h}x{w}")
    padded = jnp.pad(x_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    off_B2 = _random.randint(key, (b, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, off_B2)


def random_flip(key: jax.Array, x_BHWC: ArrayLike) -> jax.Array:
    """Mirror each image left-right with probability 1/2.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import augment
      >>> x = jnp.arange(12).reshape(4, 1, 3, 1)
      >>> y = augment.random_flip(jax.random.key(0), x)
      >>> all(bool((a == b).all() or (a == b[:, ::-1]).all()) for a, b in zip(y, x))
      True
    """
    x_BHWC = _check_batch(x_BHWC)
    flip_B = jax.random.bernoulli(key, 0.5, (x_BHWC.shape[0],))
    return jnp.where(flip_B[:, None, None, None], flip_lr(x_BHWC), x_BHWC)


def random_crop_flip(
    key: jax.Array, x_BHWC: ArrayLike, pad: int = 4, *, flip: bool = True
) -> jax.Array:
    """The standard CIFAR augmentation: zero-pad by ``pad``, random crop, random flip.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import augment
      >>> x = jnp.full((2, 4, 4, 3), 7, jnp.uint8)
      >>> y = augment.random_crop_flip(jax.random.key(0), x, pad=1)
      >>> y.shape, y.dtype, set(y.ravel().tolist()) <= {0, 7}  # zeros come in at the edges
      ((2, 4, 4, 3), dtype('uint8'), True)
    """
    k_crop, k_flip = jax.random.split(key)
    out = random_translate(k_crop, x_BHWC, pad, mode="constant")
    return random_flip(k_flip, out) if flip else out


def alternating_flip(
    x_BHWC: ArrayLike, base_flip_B: ArrayLike, epoch: int | jax.Array
) -> jax.Array:
    """Airbench's alternating flip of a batch.

    Image ``i`` is mirrored when ``base_flip_B[i] != (epoch is odd)``:
    ``base_flip_B`` is one fixed random draw per training image (gather it with
    the batch's indices), so the choice is deterministic per epoch and flips
    every image from one epoch to the next.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import augment
      >>> x = jnp.arange(6).reshape(2, 1, 3, 1)
      >>> base = jnp.array([True, False])
      >>> [augment.alternating_flip(x, base, e)[:, 0, :, 0].tolist() for e in (0, 1)]
      [[[2, 1, 0], [3, 4, 5]], [[0, 1, 2], [5, 4, 3]]]
    """
    x_BHWC = _check_batch(x_BHWC)
    base_flip_B = jnp.asarray(base_flip_B)
    flip_B = jnp.logical_xor(base_flip_B.astype(bool), (jnp.asarray(epoch) % 2) == 1)
    return jnp.where(flip_B[:, None, None, None], flip_lr(x_BHWC), x_BHWC)


def _shift(x_BHWC, dy: int, dx: int):
    """Content moved by (dy, dx) pixels, reflect-padded at the edges."""
    p = max(abs(dy), abs(dx))
    _, h, w, _ = x_BHWC.shape
    padded = jnp.pad(x_BHWC, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w, :]


def tta_views(x_BHWC: ArrayLike, level: str) -> list[tuple[float, jax.Array]]:
    """``[(weight, view), ...]`` of test-time augmentation; the weights sum to 1.

    * ``"none"``: the image;
    * ``"flip"``: the image and its mirror, 1/2 each;
    * ``"flip_translate"``: half the weight on the ``"flip"`` pair, the other
      half on the pairs of the image shifted by one pixel down-right and
      up-left (reflect padding), 1/8 per view, as airbench94's TTA.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import augment
      >>> x = jnp.zeros((1, 4, 4, 3))
      >>> [w for w, _ in augment.tta_views(x, "flip_translate")]
      [0.25, 0.25, 0.125, 0.125, 0.125, 0.125]
    """
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be one of {TTA_LEVELS}, got {level!r}")
    x_BHWC = _check_batch(x_BHWC)
    if level == "none":
        return [(1.0, x_BHWC)]
    views = [(0.5, x_BHWC), (0.5, flip_lr(x_BHWC))]
    if level == "flip":
        return views
    views = [(0.25, v) for _, v in views]
    for dy, dx in ((1, 1), (-1, -1)):
        s = _shift(x_BHWC, dy, dx)
        views += [(0.125, s), (0.125, flip_lr(s))]
    return views


def tta_logits(
    logits_fn: Callable[[jax.Array], jax.Array], x_BHWC: ArrayLike, level: str
) -> jax.Array:
    """The weighted mean of ``logits_fn`` over :func:`tta_views` (float32).

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import augment
      >>> x = jnp.arange(3.0).reshape(1, 1, 3, 1)
      >>> logits = lambda v: v[:, 0, :, 0]  # the pixels as three class scores
      >>> augment.tta_logits(logits, x, "flip").tolist()  # with its mirror, 1/2 each
      [[1.0, 1.0, 1.0]]
    """
    out = None
    for wgt, view in tta_views(x_BHWC, level):
        z = wgt * logits_fn(view).astype(jnp.float32)
        out = z if out is None else out + z
    return out

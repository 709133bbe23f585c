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

import jax
import jax.numpy as jnp

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


def _check_batch(x_BHWC) -> None:
    if x_BHWC.ndim != 4:
        raise ValueError(f"x_BHWC must have shape (B, H, W, C), got {x_BHWC.shape}")


def flip_lr(x_BHWC: jax.Array) -> jax.Array:
    """Mirror every image left-right."""
    return x_BHWC[:, :, ::-1, :]


def random_translate(key: jax.Array, x_BHWC: jax.Array, pad: int, *, mode: str = "reflect"):
    """Shift each image by an offset drawn uniformly from ``-pad..pad`` per axis.

    The image is padded by ``pad`` on each side (``mode`` as in ``jnp.pad``:
    ``"reflect"`` as airbench, ``"constant"`` for zeros) and cropped back to its
    size. Shape and dtype are preserved; ``pad`` is static.
    """
    _check_batch(x_BHWC)
    pad = check_int("pad", pad, 0)
    if pad == 0:
        return x_BHWC
    b, h, w, c = x_BHWC.shape
    if mode == "reflect" and pad >= min(h, w):
        raise ValueError(f"reflect padding needs pad < image size, got pad={pad} for {h}x{w}")
    padded = jnp.pad(x_BHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode=mode)
    off_B2 = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, c))

    return jax.vmap(crop)(padded, off_B2)


def random_flip(key: jax.Array, x_BHWC: jax.Array) -> jax.Array:
    """Mirror each image left-right with probability 1/2."""
    _check_batch(x_BHWC)
    flip_B = jax.random.bernoulli(key, 0.5, (x_BHWC.shape[0],))
    return jnp.where(flip_B[:, None, None, None], flip_lr(x_BHWC), x_BHWC)


def random_crop_flip(
    key: jax.Array, x_BHWC: jax.Array, pad: int = 4, *, flip: bool = True
) -> jax.Array:
    """The standard CIFAR augmentation: zero-pad by ``pad``, random crop, random flip."""
    k_crop, k_flip = jax.random.split(key)
    out = random_translate(k_crop, x_BHWC, pad, mode="constant")
    return random_flip(k_flip, out) if flip else out


def alternating_flip(x_BHWC: jax.Array, base_flip_B: jax.Array, epoch) -> jax.Array:
    """Airbench's alternating flip of a batch.

    Image ``i`` is mirrored when ``base_flip_B[i] != (epoch is odd)``:
    ``base_flip_B`` is one fixed random draw per training image (gather it with
    the batch's indices), so the choice is deterministic per epoch and flips
    every image from one epoch to the next.
    """
    _check_batch(x_BHWC)
    flip_B = jnp.logical_xor(base_flip_B.astype(bool), (jnp.asarray(epoch) % 2) == 1)
    return jnp.where(flip_B[:, None, None, None], flip_lr(x_BHWC), x_BHWC)


def _shift(x_BHWC, dy: int, dx: int):
    """Content moved by (dy, dx) pixels, reflect-padded at the edges."""
    p = max(abs(dy), abs(dx))
    _, h, w, _ = x_BHWC.shape
    padded = jnp.pad(x_BHWC, ((0, 0), (p, p), (p, p), (0, 0)), mode="reflect")
    return padded[:, p - dy : p - dy + h, p - dx : p - dx + w, :]


def tta_views(x_BHWC: jax.Array, level: str) -> list[tuple[float, jax.Array]]:
    """``[(weight, view), ...]`` of test-time augmentation; the weights sum to 1.

    * ``"none"``: the image;
    * ``"flip"``: the image and its mirror, 1/2 each;
    * ``"flip_translate"``: half the weight on the ``"flip"`` pair, the other
      half on the pairs of the image shifted by one pixel down-right and
      up-left (reflect padding), 1/8 per view, as airbench94's TTA.
    """
    if level not in TTA_LEVELS:
        raise ValueError(f"tta level must be one of {TTA_LEVELS}, got {level!r}")
    _check_batch(x_BHWC)
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


def tta_logits(logits_fn: Callable[[jax.Array], jax.Array], x_BHWC: jax.Array, level: str):
    """The weighted mean of ``logits_fn`` over :func:`tta_views` (float32)."""
    out = None
    for wgt, view in tta_views(x_BHWC, level):
        z = wgt * logits_fn(view).astype(jnp.float32)
        out = z if out is None else out + z
    return out

"""Pixel noise models on uint8 images (METHODS.md section 3).

Every function is pure, takes an explicit PRNG ``key`` (any implementation:
threefry, ``rbg``, or a raw ``PRNGKey``), maps a uint8 array of
any shape to a uint8 array of the same shape, and works under ``jax.jit`` and
``jax.vmap`` (vmap over ``x`` and ``key`` together for independent draws per
image). Parameters are keyword-only. Checks on parameters are done when they
are Python / numpy scalars (a ``ValueError`` naming the argument); traced values
are accepted unchecked so the functions stay jittable with dynamic parameters.
``mode``, ``kind``, ``severity`` and ``per_channel`` are static.

Functions
---------
``gaussian(x, key, *, mean=0.0, std, mode="clip")``
    ``clip``: ``y = clip(round(x + n), 0, 255)``, the usual definition.
    ``wrap``: ``y = (x + (trunc(n) mod 256)) mod 256``, the pixel-embedding (PE)
    authors' code, where ``n ~ Normal(mean, std)`` per element, in pixel units.
``salt_and_pepper(x, key, *, amount, salt_vs_pepper=0.5, per_channel=True)``
    scikit-image's ``random_noise(mode="s&p")``.
``additive_impulse(x, key, *, p, v, per_channel=True)``
    the PE paper's "(p, v)" noise: with probability ``p`` add ``v`` modulo 256.
``corrupt(x, key, *, kind, severity)``
    CIFAR-10-C ``gaussian_noise``, ``shot_noise`` and ``impulse_noise``.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gbjax import _random
from gbjax._checks import fail, is_traced

__all__ = [
    "CORRUPTIONS",
    "CIFAR10C_PARAMS",
    "gaussian",
    "salt_and_pepper",
    "additive_impulse",
    "corrupt",
]

#: CIFAR-10-C parameters per severity 1..5, from ``make_cifar_c.py`` in
#: Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common
#: Corruptions and Perturbations" (ICLR 2019), github.com/hendrycks/robustness
#: (ImageNet-C/create_c/make_cifar_c.py). On images scaled to [0, 1]:
#: gaussian_noise adds Normal(0, c); shot_noise is Poisson(x * c) / c;
#: impulse_noise is skimage s&p with amount c; speckle_noise is
#: x + x * Normal(0, c) (multiplicative, so dark pixels barely change).
CIFAR10C_PARAMS: dict[str, tuple[float, ...]] = {
    "gaussian_noise": (0.04, 0.06, 0.08, 0.09, 0.10),
    "shot_noise": (500.0, 250.0, 100.0, 75.0, 50.0),
    "impulse_noise": (0.01, 0.02, 0.03, 0.05, 0.07),
    "speckle_noise": (0.06, 0.10, 0.12, 0.16, 0.20),
}
CORRUPTIONS = tuple(CIFAR10C_PARAMS)


# --------------------------------------------------------------------------- #
# Argument checks (Python-level, so traced values pass through)
# --------------------------------------------------------------------------- #


def _concrete(value: Any) -> float | None:
    """``float(value)`` for a concrete scalar, None for a tracer (checked elsewhere)."""
    if is_traced(value):
        return None
    try:
        arr = np.asarray(value)
    except Exception:
        raise ValueError(f"expected a scalar, got {value!r}") from None
    if arr.ndim != 0:
        return None  # arrays (e.g. per-image parameters) are accepted unchecked
    return float(arr)


def _check_range(name: str, value: Any, lo: float, hi: float) -> None:
    v = _concrete(value)
    if v is not None and not (lo <= v <= hi):
        fail(name, f"a value in [{lo}, {hi}]", value)


def _check_finite(name: str, value: Any, *, nonneg: bool = False) -> None:
    v = _concrete(value)
    if v is None:
        return
    if not math.isfinite(v):
        fail(name, "a finite number", value)
    if nonneg and v < 0:
        fail(name, "a number >= 0", value)


def _check_image(x: Any) -> jax.Array:
    x = jnp.asarray(x)
    if x.dtype != jnp.uint8:
        raise ValueError(f"x must be a uint8 array (pixel values 0..255), got dtype {x.dtype}")
    return x


def _mask_shape(x: jax.Array, per_channel: bool) -> tuple[int, ...]:
    if per_channel:
        return x.shape
    if x.ndim < 1:
        raise ValueError("per_channel=False needs x with a trailing channel axis")
    return x.shape[:-1] + (1,)


# --------------------------------------------------------------------------- #
# Noise models
# --------------------------------------------------------------------------- #


def gaussian(
    x: ArrayLike,
    key: jax.Array,
    *,
    mean: float = 0.0,
    std: float,
    mode: Literal["clip", "wrap"] = "clip",
) -> jax.Array:
    """Additive Gaussian noise in pixel units (0..255) on a uint8 image.

    Both modes draw the same noise ``n = mean + std * z`` with
    ``z = jax.random.normal(key, x.shape, float32)``, one value per element
    (so the two modes are comparable draw for draw), then:

    * ``mode="clip"``: ``y = clip(round(x + n), 0, 255)``; ``round`` is
      round-half-to-even (``jnp.round``).
    * ``mode="wrap"``: the pixel-embedding authors' code, which casts the noise to
      uint8 and adds it to the uint8 image with uint8 (modulo 256) arithmetic:
      ``y = (x + (trunc(n) mod 256)) mod 256``. Casting a negative float to uint8
      is undefined behaviour in C and so in numpy / TensorFlow; we define it as
      truncation toward zero followed by modulo 256 (two's-complement wrap),
      which is what x86 builds of ``tf.cast`` / ``astype(np.uint8)`` produce for
      moderate values, e.g. ``-3.7 -> -3 -> 253``. So a small negative noise turns a
      dark pixel bright, and ``|n| < 1`` leaves the pixel unchanged.

    Args:
      x: uint8 array, any shape.
      key: PRNG key.
      mean: noise mean, pixel units.
      std: noise standard deviation, pixel units, ``>= 0``.
      mode: ``"clip"`` or ``"wrap"``.

    Returns:
      The noisy uint8 array, the shape of ``x``.

    Raises:
      ValueError: for a non-uint8 ``x``, a non-finite ``mean`` or ``std``, a
        negative ``std`` or another ``mode``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import noise
      >>> x = jnp.full((4, 4, 3), 100, jnp.uint8)
      >>> y = noise.gaussian(x, jax.random.key(0), std=10.0)
      >>> y.shape, y.dtype, bool((y != x).any())
      ((4, 4, 3), dtype('uint8'), True)
      >>> dark = jnp.zeros(3, jnp.uint8)  # -3.7 truncates to -3, wraps to 253
      >>> noise.gaussian(dark, jax.random.key(0), mean=-3.7, std=0.0, mode="wrap").tolist()
      [253, 253, 253]
    """
    x = _check_image(x)
    _check_finite("mean", mean)
    _check_finite("std", std, nonneg=True)
    if mode not in ("clip", "wrap"):
        raise ValueError(f"mode must be 'clip' or 'wrap', got {mode!r}")
    return _gaussian(x, key, mean, std, mode)


@functools.partial(jax.jit, static_argnames=("mode",))
def _gaussian(x: jax.Array, key: jax.Array, mean: Any, std: Any, mode: str) -> jax.Array:
    z = _random.normal(key, x.shape, jnp.float32)
    # barrier: same float arithmetic whether mean/std are traced or folded constants
    mean, std = jax.lax.optimization_barrier(
        (jnp.asarray(mean, jnp.float32), jnp.asarray(std, jnp.float32))
    )
    n = mean + std * z
    if mode == "clip":
        return jnp.clip(jnp.round(x.astype(jnp.float32) + n), 0, 255).astype(jnp.uint8)
    # jnp.mod on floats is exact (fmod plus a sign fix), so this is well defined
    # for any finite n, however large, without an out-of-range int cast.
    n_mod256 = jnp.mod(jnp.trunc(n), 256.0).astype(jnp.int32)  # in 0..255
    return ((x.astype(jnp.int32) + n_mod256) % 256).astype(jnp.uint8)


def salt_and_pepper(
    x: ArrayLike,
    key: jax.Array,
    *,
    amount: float,
    salt_vs_pepper: float = 0.5,
    per_channel: bool = True,
) -> jax.Array:
    """Salt-and-pepper noise as in scikit-image's ``random_noise(mode="s&p")``.

    Each element is replaced independently with probability ``amount``; a
    replaced element becomes 255 (salt) with probability ``salt_vs_pepper``,
    else 0 (pepper). So the expected fraction of replaced elements is
    ``amount`` (some of them may already have held 0 or 255).

    Args:
      x: uint8 array, any shape.
      key: PRNG key.
      amount: replacement probability in [0, 1].
      salt_vs_pepper: probability that a replaced element is salt, in [0, 1].
      per_channel: ``True`` (scikit-image's behaviour) draws per element, so the
        channels of a colour pixel are hit independently. ``False`` treats the
        last axis as channels and replaces whole pixels (all channels at once).

    Returns:
      The noisy uint8 array, the shape of ``x``.

    Raises:
      ValueError: for a non-uint8 ``x`` or a probability outside [0, 1].

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import noise
      >>> x = jnp.full((4, 4, 3), 100, jnp.uint8)
      >>> y = noise.salt_and_pepper(x, jax.random.key(0), amount=0.5, per_channel=False)
      >>> sorted(set(y.reshape(-1).tolist()) - {100})  # replaced: black or white
      [0, 255]
      >>> bool((y.min(axis=-1) == y.max(axis=-1)).all())  # whole pixels at once
      True
    """
    x = _check_image(x)
    _check_range("amount", amount, 0.0, 1.0)
    _check_range("salt_vs_pepper", salt_vs_pepper, 0.0, 1.0)
    return _salt_and_pepper(x, key, amount, salt_vs_pepper, per_channel)


@functools.partial(jax.jit, static_argnames=("per_channel",))
def _salt_and_pepper(
    x: jax.Array, key: jax.Array, amount: Any, salt_vs_pepper: Any, per_channel: bool
) -> jax.Array:
    key_hit, key_salt = jax.random.split(key)
    shape = _mask_shape(x, per_channel)
    hit = _random.bernoulli(key_hit, amount, shape)
    salt = _random.bernoulli(key_salt, salt_vs_pepper, shape)
    value = jnp.where(salt, jnp.uint8(255), jnp.uint8(0))
    return jnp.where(hit, value, x)


def additive_impulse(
    x: ArrayLike, key: jax.Array, *, p: float, v: int, per_channel: bool = True
) -> jax.Array:
    """The pixel-embedding paper's "(p, v)" impulse noise.

    Each element independently, with probability ``p``, has ``v`` added to it
    modulo 256 (uint8 wrap-around, as in the authors' uint8 arithmetic):
    ``y = (x + v) mod 256`` where hit, else ``x``.

    Args:
      x: uint8 array, any shape.
      key: PRNG key.
      p: hit probability in [0, 1].
      v: integer added to hit elements (any sign; taken modulo 256).
      per_channel: as in :func:`salt_and_pepper` (``False``: whole pixels).

    Returns:
      The noisy uint8 array, the shape of ``x``.

    Raises:
      ValueError: for a non-uint8 ``x``, ``p`` outside [0, 1] or a fractional ``v``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import noise
      >>> x = jnp.array([0, 100, 250], jnp.uint8)
      >>> noise.additive_impulse(x, jax.random.key(0), p=1.0, v=10).tolist()  # mod 256
      [10, 110, 4]
    """
    x = _check_image(x)
    _check_range("p", p, 0.0, 1.0)
    v_c = _concrete(v)
    if v_c is not None and v_c != int(v_c):
        raise ValueError(f"v must be an integer, got {v!r}")
    return _additive_impulse(x, key, p, v, per_channel)


@functools.partial(jax.jit, static_argnames=("per_channel",))
def _additive_impulse(x: jax.Array, key: jax.Array, p: Any, v: Any, per_channel: bool) -> jax.Array:
    hit = _random.bernoulli(key, p, _mask_shape(x, per_channel))
    v_mod256 = jnp.mod(jnp.asarray(v, jnp.int32), 256)
    return jnp.where(hit, ((x.astype(jnp.int32) + v_mod256) % 256).astype(jnp.uint8), x)


def corrupt(x: ArrayLike, key: jax.Array, *, kind: str, severity: int) -> jax.Array:
    """CIFAR-10-C style noise corruption at ``severity`` 1..5.

    Follows ``make_cifar_c.py`` (Hendrycks & Dietterich, ICLR 2019) with the
    parameters in :data:`CIFAR10C_PARAMS`, on ``x / 255`` in [0, 1]:

    * ``gaussian_noise``: ``clip(x + Normal(0, c), 0, 1)``, c = .04 .06 .08 .09 .10;
    * ``shot_noise``: ``clip(Poisson(x * c) / c, 0, 1)``, c = 500 250 100 75 50
      (photon counts: larger c, less noise);
    * ``impulse_noise``: salt-and-pepper with amount c = .01 .02 .03 .05 .07
      (:func:`salt_and_pepper`, per element as scikit-image does);
    * ``speckle_noise``: ``clip(x + x * Normal(0, c), 0, 1)``, c = .06 .10 .12 .16 .20.

    The result is scaled by 255 and quantised by truncation, as the reference
    script does (``np.uint8`` of a float in [0, 255]). Computation is in float32
    (the reference uses float64; results can differ by one level at a handful
    of elements that sit on a truncation boundary).

    Args:
      x: uint8 array, any shape.
      key: PRNG key.
      kind: one of :data:`CORRUPTIONS`.
      severity: Python int 1..5 (static).

    Returns:
      The corrupted uint8 array, the shape of ``x``.

    Raises:
      ValueError: for a non-uint8 ``x``, another ``kind`` or ``severity``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from gbjax import noise
      >>> x = jnp.full((4, 4, 3), 128, jnp.uint8)
      >>> y = noise.corrupt(x, jax.random.key(0), kind="gaussian_noise", severity=5)
      >>> y.shape, y.dtype, bool(jnp.abs(y.astype(int) - 128).max() > 0)
      ((4, 4, 3), dtype('uint8'), True)
      >>> noise.CORRUPTIONS
      ('gaussian_noise', 'shot_noise', 'impulse_noise', 'speckle_noise')
    """
    x = _check_image(x)
    if kind not in CIFAR10C_PARAMS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    if (
        isinstance(severity, bool)
        or not isinstance(severity, (int, np.integer))
        or not 1 <= severity <= 5
    ):
        raise ValueError(f"severity must be an int in 1..5, got {severity!r}")
    c = CIFAR10C_PARAMS[kind][int(severity) - 1]
    if kind == "impulse_noise":
        return _salt_and_pepper(x, key, c, 0.5, True)
    return _corrupt(x, key, c, kind)


@functools.partial(jax.jit, static_argnames=("kind",))
def _corrupt(x: jax.Array, key: jax.Array, c: Any, kind: str) -> jax.Array:
    x01 = x.astype(jnp.float32) / 255.0
    # c is traced (one compile for all severities); the barrier stops XLA folding
    # it as a constant under an outer jit, which would change float rounding and
    # so the Poisson draws, making jit and eager results differ.
    c = jax.lax.optimization_barrier(jnp.asarray(c, jnp.float32))
    if kind == "gaussian_noise":
        y01 = x01 + c * _random.normal(key, x.shape, jnp.float32)
    elif kind == "speckle_noise":
        y01 = x01 + x01 * (c * _random.normal(key, x.shape, jnp.float32))
    else:  # shot_noise
        y01 = jax.random.poisson(_threefry_key(key), x01 * c, x.shape).astype(jnp.float32) / c
    return jnp.floor(jnp.clip(y01, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def _threefry_key(key: jax.Array) -> jax.Array:
    """``jax.random.poisson`` needs a threefry key: derive one from any other kind."""
    if str(jax.random.key_impl(key)) == "threefry2x32":
        return key
    return jax.random.wrap_key_data(jax.random.bits(key, (2,), jnp.uint32), impl="threefry2x32")

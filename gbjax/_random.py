"""Random draws that compile fast on CPU and equal ``jax.random``'s, bit for bit.

With JAX's default threefry keys, a draw of a shape with several axes (an image
batch ``(B, H, W, C)``, a mask ``(B, 1, 1, C)``) took XLA:CPU 0.3-0.8 s to compile,
and the same number of values drawn along one axis 0.1-0.2 s (measured on the 2-core
Intel Xeon development machine, jax 0.10.2; ``benchmarks/random_compile.py``).
Threefry numbers the values of a draw in row-major order, with
``jax_threefry_partitionable`` on (the default) or off, so drawing ``prod(shape)``
values and reshaping gives the very values of the shaped draw; only the program is
simpler. Attacks, noise and augmentation draw in many
programs, and the test suite compiles hundreds of them, so this saves compilation
time without changing a drawn value. (The program around the draw is compiled anew,
so a reduction straight over the drawn values may round differently in its last bit:
seen for the sum of a draw, never in an experiment's results, which the three CIFAR
smoke runs reproduced exactly. The trainer's own keys are ``rbg``
(:func:`gbjax.train.root_key`), for which nothing changes.)

Parameters that broadcast against ``shape`` (a per-image budget ``(B, 1, 1, 1)``,
a probability per image) are broadcast and flattened alike. For keys of other
implementations (``rbg``, ``unsafe_rbg``) the shaped draw is used as it is, so every
function here returns exactly what its ``jax.random`` namesake returns for any key.
``tests/test_random.py`` checks that.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

__all__ = ["uniform", "normal", "bernoulli", "randint"]


def _flat(key, shape) -> bool:
    """Whether to draw ``shape`` along one axis: threefry keys and several axes."""
    if len(shape) < 2:
        return False
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        impl = str(jax.random.key_impl(key))
    else:  # a raw uint32 key: the default implementation
        impl = str(jax.config.jax_default_prng_impl)
    return impl == "threefry2x32"


def _draw(draw, key, shape, **params):
    """``draw(key, shape=shape, **params)``, made along one axis where :func:`_flat`
    says so; array parameters (``minval``, ``maxval``, ``p``) are broadcast to
    ``shape`` and flattened alike, scalars and ``dtype`` pass unchanged."""
    shape = tuple(shape)
    if not _flat(key, shape):
        return draw(key, shape=shape, **params)
    flat = {
        k: jnp.broadcast_to(v, shape).reshape(-1) if k != "dtype" and jnp.ndim(v) else v
        for k, v in params.items()
    }
    return draw(key, shape=(math.prod(shape),), **flat).reshape(shape)


def uniform(key, shape, dtype=jnp.float32, minval=0.0, maxval=1.0):
    """``jax.random.uniform(key, shape, dtype, minval, maxval)``."""
    return _draw(jax.random.uniform, key, shape, dtype=dtype, minval=minval, maxval=maxval)


def normal(key, shape, dtype=jnp.float32):
    """``jax.random.normal(key, shape, dtype)``."""
    return _draw(jax.random.normal, key, shape, dtype=dtype)


def bernoulli(key, p, shape):
    """``jax.random.bernoulli(key, p, shape)`` (``shape`` required here)."""
    return _draw(jax.random.bernoulli, key, shape, p=p)


def randint(key, shape, minval, maxval, dtype=jnp.int32):
    """``jax.random.randint(key, shape, minval, maxval, dtype)``."""
    return _draw(jax.random.randint, key, shape, minval=minval, maxval=maxval, dtype=dtype)

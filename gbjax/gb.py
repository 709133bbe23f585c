"""Granular-ball (GB) multi-scale clustering of image pixels, vectorised.

Algorithm 1 of the granular-ball paper (see ``METHODS.md`` section 1), run on
fixed-capacity ball arrays so that clustering a whole batch is one compiled
program:

* every pixel is a feature vector (its colour by default; optionally its
  weighted coordinates and a weighted local-contrast "texture" value);
* all pixels start in ball 0; in each round, every ball whose fraction of
  members strictly within ``threshold`` of its centre (Euclidean distance in
  feature space, the paper's Definition 2) is below ``purity`` is split by
  2-means, all such balls at once;
* rounds go on until no ball splits (the paper's stopping rule), the capacity
  ``K`` is full, or ``max_rounds`` is reached;
* every pixel is painted with its ball's centre; pixels of balls with fewer than
  ``min_ball_size`` members are *noise* and are painted with the centre of the
  nearest kept ball in feature space.

Choices the paper leaves open, each a parameter here:

* **distance**: Euclidean in feature space; a member is *within* when
  ``distance < threshold`` (strict, as in the paper's Definition 2).
* **purity test**: a ball is kept when ``within_fraction >= purity``.
* **2-means initialisation** (deterministic): seed A is the member farthest
  from the ball's centre, seed B the member farthest from seed A (lowest pixel
  index on ties; raster order). Lloyd iterations then alternate assignment (to
  the nearer seed, ties to A) and mean update, until the assignment stops
  changing or ``kmeans_iters`` assignments were made. Side A keeps the parent's
  id, side B gets the next free id (parents in id order), so ids are
  deterministic.
* **capacity**: when more balls want to split than free slots remain, the most
  impure balls split first (lowest ``within_fraction``), then the largest, then
  the lowest id; ``saturated`` is set.
* **feature scaling**: colour in pixel units (0..255) times ``color``; pixel
  coordinates (row, column, in pixels) times ``spatial``; local standard
  deviation of the grey level in a ``texture_window`` box, times ``texture``.
* **noise**: balls with fewer than ``min_ball_size`` members; their pixels are
  painted with the nearest kept centre (or their own ball's centre when no ball
  is kept).

Exactness: with colour-only features and integer pixel values, per-ball sums
and counts are exact in float32 while they stay below 2**24 (any image up to
65,793 pixels), and centres are divided out column by column so that they are
the correctly rounded member means; the partition then matches a float32
reference implementation of Algorithm 1 (the tests' numpy oracle), ball ids
included. The one caveat: a squared distance that ties the threshold, or two
centres, to within float32 rounding may resolve differently, because XLA fuses
multiply-adds (FMA) where numpy does not. Measured: 256 random CIFAR-10 test
images at thresholds 40, 20 and 10 all match the oracle exactly (768 of 768).

Multiscale (:func:`gb_multiscale`): the thresholds run in one pass from the
largest to the smallest, each continuing from the partition at the one before
with all of its balls open. A ball impure at threshold t is impure at every
t' < t (its within fraction can only fall) and its 2-means split depends only
on its members, so the split tree at t' extends the one at t and the final
partition at t' is the same as from a single ball, wherever the capacity does
not bind and ``max_rounds`` does not cap the rounds. Ball ids there: the
largest threshold's are :func:`gb_cluster`'s; at each smaller threshold a ball
of the previous threshold keeps its id for the part of it that stays on side A
in each of its splits, and new balls take ids from the previous ball count
upwards, round by round and, within a round, in the order of their parents' ids.

Speed: most late work concerns few pixels (pure balls never change again;
most 2-means splits converge in a few steps while the batch waits for the
slowest), and the first rounds use few balls. So the pixels still in play are
compacted into smaller fixed buffers as they thin out, and the first rounds run
with K / 8 ball slots per image (see ``_cluster_labels``).

Engines (``engine=``): on a single CPU device with numba installed, the
partition is computed by a compiled per-image loop (:mod:`gbjax._gb_cpu`,
called as an XLA custom call on CPU), which has none of the batch-wide loops
and is several times faster there; the XLA program above serves GPUs, TPUs and
CPU without numba. Both give the same results (docs/methods.md, section 1.6).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from gbjax._batching import map_batches
from gbjax._checks import check_int, check_number, fail, is_traced
from gbjax._gb_engine import (
    Features,
    GBResult,
    cluster_batch,
    image_features,
    multiscale_batch,
)

__all__ = [
    "Features",
    "GBParams",
    "GBResult",
    "gb_cluster",
    "gb_denoise",
    "gb_multiscale",
    "image_features",
    "memory_estimate",
]


# Bumped whenever the engine's output for the same input and parameters
# changes, so that on-disk caches of GB-processed data sets (gbjax.train) miss.
# 2: centres are correctly rounded means (they were off by an ulp on XLA:CPU).
# 3: noise pixels take the exactly nearest kept centre (exact differences, not
#    |c|^2 - 2 x.c), whatever the batch (issue 28).
OUTPUT_VERSION = 3


# Below this many pixels per compiled call (64 CIFAR-10 images), the
# working-set levels and the early-capacity stage are left out: they save
# little on small batches, where the batch waits less for its slowest image,
# and their loops nearly double the compile time (128 images of 32x32x3: 5.7 s
# against 3.3 s on the 2-core development machine), which attacks on small
# batches pay for every attack program they compile.
_MULTILEVEL_MIN_PIXELS = 65536


def _multilevel(pixels: int) -> bool:
    return pixels >= _MULTILEVEL_MIN_PIXELS


# --------------------------------------------------------------------------
# Validation and the public API
# --------------------------------------------------------------------------


def _check_threshold(threshold, name="threshold") -> float:
    return check_number(name, threshold, unit="pixel units")


@dataclasses.dataclass(frozen=True)
class GBParams:
    """The parameters that determine GB's result: a frozen, validated, hashable value.

    Taken by :func:`gb_cluster`, :func:`gb_denoise`, :func:`gb_multiscale`,
    :class:`gbjax.defences.GB` and :func:`gbjax.data.gb_processed` (whose cache
    key it gives), in place of their GB keywords. Each field is checked once,
    here, with the messages :func:`gb_cluster` gives; numbers are normalised
    (``threshold=20`` is ``20.0``) and ``features`` may be given as a dict of
    :class:`Features` fields, so equal parameters are equal values with equal
    hashes, fit for a ``jax.jit`` static argument or a dict key. Change one with
    ``dataclasses.replace``.

    What is not here, and why: the keyword arguments ``chunk_size``,
    ``memory_budget``, ``progress`` and ``engine`` of :func:`gb_cluster` say how
    the result is computed, never what it is (every chunking and both engines
    give identical results, ball ids included); ``scale`` says in which units
    the *input* is (images in [0, 1] with ``scale=255.0`` cluster as the same
    images in 0..255), so it belongs to the images, not to the clustering.

    Attributes:
      threshold: distance (pixel units, in feature space) under which a member
        counts as within its ball.
      purity: a ball is kept when its within fraction is >= purity, else split;
        in (0, 1].
      capacity: K, the fixed number of ball slots per image (an int >= 1); or
        ``"auto"``: start at 256 and re-run the images that fill it with twice
        the capacity, up to ``max_capacity`` (eager calls only).
      min_ball_size: balls with fewer members are noise (1 disables noise).
      max_rounds: cap on split rounds; None: ``capacity``, i.e. no cap.
      features: :class:`Features` (colour only by default), or a dict of its fields.
      kmeans_iters: cap on Lloyd assignments per 2-means split.
      max_capacity: the largest capacity ``capacity="auto"`` may use.

    Raises:
      ValueError: naming the field, for a value out of range or of the wrong type.

    Example:
      >>> from gbjax import GBParams
      >>> p = GBParams(threshold=20, features={"spatial": 0.5})
      >>> p.threshold, p.features.spatial
      (20.0, 0.5)
      >>> p == GBParams(threshold=20.0, features=Features(spatial=0.5)) and len({p, p}) == 1
      True
      >>> GBParams(purity=1.5)
      Traceback (most recent call last):
      ...
      ValueError: purity: expected a number in (0, 1], got 1.5
    """

    threshold: float = 20.0
    purity: float = 0.9
    capacity: int | Literal["auto"] = 256
    min_ball_size: int = 2
    max_rounds: int | None = None
    features: Features = Features()
    kmeans_iters: int = 20
    max_capacity: int = 4096

    def __post_init__(self) -> None:
        put = functools.partial(object.__setattr__, self)
        put("threshold", _check_threshold(self.threshold))
        purity = self.purity
        if not (isinstance(purity, (int, float, np.number)) and 0 < purity <= 1):
            raise ValueError(f"purity: expected a number in (0, 1], got {purity!r}")
        put("purity", float(purity))
        if self.capacity != "auto":
            put("capacity", check_int("capacity", self.capacity))
        put("min_ball_size", check_int("min_ball_size", self.min_ball_size))
        if self.max_rounds is not None:
            put("max_rounds", check_int("max_rounds", self.max_rounds))
        features = self.features
        if features is None:
            features = Features()
        elif isinstance(features, dict):
            features = Features(**features)
        elif not isinstance(features, Features):
            raise ValueError(
                f"features: expected a gbjax.Features, a dict or None, got {features!r}"
            )
        put("features", features)
        put("kmeans_iters", check_int("kmeans_iters", self.kmeans_iters))
        put("max_capacity", check_int("max_capacity", self.max_capacity))


#: The names of :class:`GBParams`' fields, the GB keywords of the functions that take one.
PARAM_NAMES = tuple(f.name for f in dataclasses.fields(GBParams))


def as_params(params: GBParams | None, kwargs: dict[str, Any]) -> tuple[GBParams, dict[str, Any]]:
    """``(params, the other keywords)``: ``params``, else a :class:`GBParams` of the GB
    keywords in ``kwargs`` (those that are None count as not given).

    Args:
      params: a :class:`GBParams`, or None.
      kwargs: keyword arguments, GB parameters (:data:`PARAM_NAMES`) and others.

    Returns:
      The parameters, and the keywords of ``kwargs`` that are not GB parameters.

    Raises:
      ValueError: when ``params`` is given together with any GB keyword, or is not
        a :class:`GBParams`.

    Example:
      >>> as_params(None, {"threshold": 10.0, "progress": False})
      (GBParams(threshold=10.0, ...), {'progress': False})
      >>> as_params(GBParams(), {"purity": 0.5})
      Traceback (most recent call last):
      ...
      ValueError: purity: given both in params and as a keyword; pass one ...
    """
    given = {k: v for k, v in kwargs.items() if k in PARAM_NAMES and v is not None}
    rest = {k: v for k, v in kwargs.items() if k not in PARAM_NAMES}
    if params is None:
        return GBParams(**given), rest
    if not isinstance(params, GBParams):
        fail("params", "a gbjax.GBParams or None", params)
    if given:
        names = ", ".join(sorted(given))
        raise ValueError(
            f"{names}: given both in params and as a keyword; pass one (change a field of "
            f"params with dataclasses.replace(params, {sorted(given)[0]}=...))"
        )
    return params, rest


# Without ``scale``, float images whose largest value is at most this look like
# images in [0, 1] (a little over from noise or rounding), not pixel units 0..255:
# in pixel units they would be nearly black and painted as one ball.
_AMBIGUOUS_FLOAT_MAX = 2.0


def _check_memory_budget(memory_budget) -> None:
    check_number("memory_budget", memory_budget, unit="bytes")


def _fits_int32(dt) -> bool:
    info, i32 = np.iinfo(dt), np.iinfo(np.int32)
    return info.min >= i32.min and info.max <= i32.max


def _narrow_integers(images):
    """Integer images of a dtype wider than int32 (int64, uint32, uint64: a Python
    list of ints is int64) as uint8, their values being in 0..255 (checked before),
    or traced as int32: the painting rounds into the input dtype, which JAX holds
    in 32 bits."""
    dt = np.dtype(images.dtype)
    if not np.issubdtype(dt, np.integer) or _fits_int32(dt):
        return images
    if is_traced(images):
        return images.astype(jnp.int32)
    return np.asarray(images).astype(np.uint8)


def _validate(images: ArrayLike, scale: float | None) -> Any:
    """``images`` checked (shape, dtype, values where concrete) against ``scale``, as
    an array, integers wider than int32 narrowed (:func:`_narrow_integers`)."""
    if not hasattr(images, "shape") or not hasattr(images, "dtype"):
        try:
            images = np.asarray(images)
        except ValueError as e:  # ragged nested lists
            raise ValueError(f"images: expected an array (H, W, C) or (B, H, W, C): {e}") from None
    if images.ndim not in (3, 4):
        raise ValueError(f"images: expected shape (H, W, C) or (B, H, W, C), got {images.shape}")
    if images.shape[-1] not in (1, 3):
        raise ValueError(f"images: expected 1 or 3 channels (last axis), got shape {images.shape}")
    if any(s == 0 for s in images.shape):
        raise ValueError(f"images: empty image or batch, got shape {images.shape}")
    dt = np.dtype(images.dtype)
    if dt == np.bool_ or not (np.issubdtype(dt, np.integer) or np.issubdtype(dt, np.floating)):
        raise ValueError(f"images: expected an integer (uint8) or float dtype, got {dt}")
    if scale is not None:
        if not (isinstance(scale, (int, float, np.number)) and math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale: expected a finite number > 0, got {scale!r}")
        if np.issubdtype(dt, np.integer):
            raise ValueError(
                "scale: only for float images (integer images are in pixel units 0..255)"
            )
    if not is_traced(images):
        a = np.asarray(images)
        if np.issubdtype(dt, np.floating):
            if not np.all(np.isfinite(a)):
                raise ValueError("images: contains NaN or inf")
        lo, hi = a.min(), a.max()
        s = 1.0 if scale is None else float(scale)
        if lo < 0:
            raise ValueError(f"images: expected values >= 0 (pixel units 0..255), got min {lo}")
        if hi * s > 255.0 + 1e-3:
            raise ValueError(
                f"images: expected values in pixel units 0..255, got max {hi}"
                + ("" if scale is None else f" (x scale {scale} = {hi * s})")
            )
        if scale is None and np.issubdtype(dt, np.floating) and 0 < hi <= _AMBIGUOUS_FLOAT_MAX:
            raise ValueError(
                f"images: float values in [{lo:g}, {hi:g}] look like images scaled to [0, 1], "
                "but thresholds are in pixel units 0..255; pass scale=255.0 (or multiply by "
                "255), or scale=1.0 if they really are pixel units"
            )
    return _narrow_integers(images)


def memory_estimate(
    batch: int,
    height: int,
    width: int,
    channels: int = 3,
    *,
    capacity: int = 256,
    min_ball_size: int = 2,
    features: Features | None = None,
) -> int:
    """Rough peak bytes of the compiled program for a batch (float32 working set).

    Per pixel: the features and about a dozen per-pixel temporaries of the round
    and Lloyd loops; plus, when ``min_ball_size > 1``, one (pixels x capacity)
    distance matrix for the nearest-kept-ball search. Per ball: a few (K, F)
    arrays (negligible).

    Args:
      batch, height, width, channels: the batch's shape (B, H, W, C).
      capacity, min_ball_size, features: as in :class:`GBParams`.

    Returns:
      Bytes, an int; :func:`gb_cluster` sizes its chunks by it.

    Example:
      >>> memory_estimate(1, 32, 32)  # one CIFAR-10 image, about 1.1 MiB
      1191936
      >>> memory_estimate(1, 32, 32, min_ball_size=1)  # no noise search
      143360
    """
    n = height * width
    f = (features or Features()).num_features(channels)
    per_image = 4 * n * (4 * f + 16) + 4 * capacity * (4 * f + 16)
    if min_ball_size > 1:
        per_image += 4 * n * capacity
    return batch * per_image


def gb_cluster(
    images: ArrayLike,
    params: GBParams | None = None,
    *,
    threshold: float | None = None,
    purity: float | None = None,
    capacity: int | Literal["auto"] | None = None,
    min_ball_size: int | None = None,
    max_rounds: int | None = None,
    features: Features | dict[str, Any] | None = None,
    kmeans_iters: int | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    memory_budget: int = 2 << 30,
    progress: bool = False,
    max_capacity: int | None = None,
    engine: Literal["auto", "xla", "numba"] = "auto",
) -> GBResult:
    """Granular-ball clustering of one image (H, W, C) or a batch (B, H, W, C).

    The GB parameters come as one :class:`GBParams` (``params``) or as the
    keywords ``threshold`` .. ``max_capacity`` (those not given, or None, take
    :class:`GBParams`' defaults: threshold 20, purity 0.9, capacity 256,
    min_ball_size 2, no round cap, colour features, 20 Lloyd steps, max_capacity
    4096), not both.

    Args:
      images: C = 1 or 3, an array or array-like of any integer dtype or float,
        values in pixel units 0..255. Integer dtypes wider than int32 (int64,
        uint32, uint64; a Python list of ints) are converted to uint8, and so is
        the painted image. Float images need ``scale``: 255.0 for images in
        [0, 1]; without it, float images whose values are all at most 2 are
        refused as ambiguous (pass ``scale=1.0`` for pixel units).
      params: the GB parameters, a :class:`GBParams`; or None for the keywords.
      threshold: distance (pixel units, in feature space) under which a member
        counts as within its ball.
      purity: a ball is kept when its within fraction is >= purity, else split.
      capacity: K, the fixed number of ball slots per image; or ``"auto"``: start
        at 256 and re-run the images that fill it (``saturated``) with twice the
        capacity, until none does or ``max_capacity`` is reached (eager calls
        only). Per-ball fields then have the largest capacity used, zero-padded.
      min_ball_size: balls with fewer members are noise (1 disables noise).
      max_rounds: cap on split rounds (default: ``capacity``, i.e. no cap).
      features: :class:`Features` (colour only by default), or a dict of its fields.
      kmeans_iters: cap on Lloyd assignments per 2-means split.
      scale: multiply float images by this before clustering (and divide the
        painted image by it), e.g. 255.0 for [0, 1] images.
      chunk_size: images per compiled call (default: as many as fit in
        ``memory_budget`` bytes, see :func:`memory_estimate`). The last chunk is
        padded, so every chunk reuses one compilation.
      memory_budget: bytes per chunk used to pick the default ``chunk_size``. A
        single image whose working set (:func:`memory_estimate`) exceeds it is
        refused before anything is allocated: downscale it or raise the budget.
      progress: show a progress bar over chunks.
      max_capacity: the largest capacity ``capacity="auto"`` may use.
      engine: which implementation computes the partition: ``"xla"``, one
        compiled XLA program for the whole batch (any backend); ``"numba"``, a
        compiled per-image CPU loop (needs numba and JAX on CPU) called from that program
        as an XLA custom call, with the features and the painting (and
        its gradient) still in JAX; or ``"auto"`` (default): ``"numba"`` when
        numba is installed and JAX runs on a single CPU device, else ``"xla"``.
        Both give identical results, ball ids and statistics included; on CPU
        the kernel is many times faster (docs/methods.md, section 1).

    Returns:
      A :class:`GBResult`, batch-leading when ``images`` is a batch.

    Raises:
      ValueError: naming the argument, for invalid images or parameters, for
        ``params`` given with a GB keyword, or for an image too large for
        ``memory_budget``.

    Works inside ``jax.jit``/``jax.grad`` on float inputs (value checks are then
    skipped); the painted image is differentiable in the pixel values with the
    partition held fixed.

    With several devices, each chunk is sharded over them along the batch axis.

    Example:
      >>> import numpy as np
      >>> x = np.zeros((4, 4, 3), np.uint8)
      >>> x[:, 2:] = 200  # two flat halves
      >>> res = gb_cluster(x, threshold=20.0)
      >>> int(res.n_balls), res.labels[0].tolist()
      (2, [0, 0, 1, 1])
      >>> bool((res.image == x).all())  # flat balls paint their own colour
      True
      >>> same = gb_cluster(x, GBParams(threshold=20.0))
      >>> bool((same.labels == res.labels).all())
      True
    """
    params, _ = as_params(
        params,
        dict(
            threshold=threshold, purity=purity, capacity=capacity, min_ball_size=min_ball_size,
            max_rounds=max_rounds, features=features, kmeans_iters=kmeans_iters,
            max_capacity=max_capacity,
        ),
    )  # fmt: skip
    images = _validate(images, scale)
    unbatched = images.ndim == 3
    x = images[None] if unbatched else images
    res = _cluster(
        x,
        params.threshold,
        params,
        multiscale=False,
        scale=scale,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        progress=progress,
        engine=_resolve_engine(engine),
    )
    if unbatched:
        res = _first_image(res)
    return res


_ENGINES = ("auto", "xla", "numba")


def _resolve_engine(engine) -> str:
    """``engine`` as "xla" or "numba" ("auto": numba on a single CPU device)."""
    if engine not in _ENGINES:
        raise ValueError(f"engine: expected one of {_ENGINES}, got {engine!r}")
    from gbjax import _gb_cpu

    if engine == "auto":
        cpu = jax.default_backend() == "cpu" and jax.local_device_count() == 1
        return "numba" if cpu and _gb_cpu.available() else "xla"
    if engine == "numba" and not _gb_cpu.available():
        raise ValueError("engine='numba' needs numba (pip install numba); use 'xla' or 'auto'")
    if engine == "numba" and jax.default_backend() != "cpu":
        raise ValueError(
            f"engine='numba' runs on CPU only (an XLA custom call for the CPU), and JAX runs "
            f"on {jax.default_backend()} here; use 'xla' or 'auto'"
        )
    return engine


def _cluster(
    x, thresholds, params: GBParams, *, multiscale, scale, chunk_size, memory_budget, progress,
    engine,
) -> GBResult:  # fmt: skip
    """A validated batch (B, H, W, C) -> GBResult, batch-leading.

    ``multiscale``: ``thresholds`` is a non-increasing tuple and every field has a
    threshold axis after the batch axis (B, T, ...); else it is one threshold.
    """
    kw = dict(
        multiscale=multiscale, scale=scale, chunk_size=chunk_size, memory_budget=memory_budget,
        progress=progress, engine=engine,
    )  # fmt: skip
    if params.capacity == "auto":
        return _auto_capacity(x, thresholds, params, **kw)
    B, H, W, C = x.shape
    _check_single_image_fits(H, W, C, params, memory_budget)
    K = params.capacity
    static = dict(
        K=K,
        max_rounds=params.max_rounds or K,
        kmeans_iters=params.kmeans_iters,
        min_ball_size=params.min_ball_size,
        features=params.features,
        out_dtype=np.dtype(x.dtype),
        engine=engine,
    )
    if multiscale:
        fn, th = multiscale_batch, jnp.asarray(thresholds, jnp.float32)
    else:
        fn, th = cluster_batch, jnp.float32(thresholds)
    args = (th, jnp.float32(params.purity), jnp.float32(1.0 if scale is None else scale))

    def compute(part, pixels: int):
        return fn(part, *args, **static, multilevel=engine == "xla" and _multilevel(pixels))

    if is_traced(x):
        return compute(x, B * H * W)
    return _run_chunked(x, compute, params, engine, chunk_size, memory_budget, progress)


def _check_single_image_fits(H, W, C, params: GBParams, memory_budget) -> None:
    """Refuses, before any allocation, an image whose working set alone exceeds
    ``memory_budget``: chunking splits batches, never one image."""
    _check_memory_budget(memory_budget)
    K, min_ball_size = params.capacity, params.min_ball_size
    need = memory_estimate(
        1, H, W, C, capacity=K, min_ball_size=min_ball_size, features=params.features
    )
    if need <= memory_budget:
        return
    f = math.ceil(10 * math.sqrt(need / memory_budget)) / 10  # per side, rounded up
    raise ValueError(
        f"images: one {H}x{W}x{C} image needs about {need / 2**30:.2f} GiB "
        f"(gbjax.memory_estimate(1, {H}, {W}, {C}, capacity={K}, "
        f"min_ball_size={min_ball_size})), more than memory_budget = "
        f"{memory_budget / 2**30:.2f} GiB, and one image cannot be split. Downscale it "
        f"(by about {f:g}x per side: {int(H / f)}x{int(W / f)}), use a smaller capacity or "
        "min_ball_size=1 (no pixels x capacity search for noise), or raise memory_budget "
        "if the device has the memory"
    )


_PER_BALL = ("centers", "radii", "counts", "within_fraction")


def _auto_capacity(x, thresholds, params: GBParams, **kw) -> GBResult:
    if is_traced(x):
        raise ValueError("capacity='auto' needs concrete images: it re-runs the saturated ones")
    max_capacity = params.max_capacity
    k_axis = 2 if kw["multiscale"] else 1  # the ball axis of batch-leading results

    def at(K):
        return dataclasses.replace(params, capacity=K, max_capacity=K)

    K = min(256, max_capacity)
    res = _cluster(x, thresholds, at(K), **kw)
    while K < max_capacity:
        sat = np.flatnonzero(np.asarray(res.saturated).reshape(len(x), -1).any(axis=1))
        if len(sat) == 0:
            break
        K2 = min(2 * K, max_capacity)
        sub = _cluster(x[sat], thresholds, at(K2), **kw)

        def grow(a, K2=K2):
            pad = [(0, 0)] * a.ndim
            pad[k_axis] = (0, K2 - a.shape[k_axis])
            return jnp.pad(a, pad)

        res = res._replace(**{f: grow(getattr(res, f)) for f in _PER_BALL})
        idx = jnp.asarray(sat)
        res = GBResult(*(a.at[idx].set(b) for a, b in zip(res, sub)))
        K = K2
    return res


# Most images per compiled call on CPU by default, per engine.
_CPU_CHUNK = {"xla": 128, "numba": 1024}


def _run_chunked(x, compute, params: GBParams, engine, chunk_size, memory_budget, progress):
    """``compute(part, pixels)`` over fixed-size chunks of ``x``, each sharded over the
    local devices (XLA engine), concatenated."""
    B, H, W, C = x.shape
    ndev = jax.local_device_count()  # this process's devices (multi-process runs)
    if chunk_size is None:
        per = memory_estimate(
            1,
            H,
            W,
            C,
            capacity=params.capacity,
            min_ball_size=params.min_ball_size,
            features=params.features,
        )
        chunk_size = max(1, int(memory_budget // per))
        if jax.default_backend() == "cpu":
            # Batch-synchronous loops run as long as the slowest image: on CPU,
            # where larger batches buy no parallelism, smaller chunks are faster.
            # The per-image kernel has no such loops; larger chunks spread the
            # call's fixed cost and balance its threads better.
            chunk_size = min(chunk_size, _CPU_CHUNK[engine])
    else:
        check_int("chunk_size", chunk_size)
    chunk = min(int(chunk_size), B)
    if ndev > 1 and engine == "xla":
        chunk = -(-chunk // ndev) * ndev
        sharding = NamedSharding(Mesh(np.array(jax.local_devices()), ("batch",)), P("batch"))
    else:
        sharding = None

    def run(part):
        part = jax.device_put(part, sharding) if sharding is not None else jnp.asarray(part)
        return compute(part, chunk * H * W)

    return map_batches(run, x, batch_size=chunk, shrink=False, progress=progress, desc="gb_cluster")


def gb_denoise(images: ArrayLike, params: GBParams | None = None, **kwargs: Any) -> jax.Array:
    """The GB-painted image: same shape and dtype as ``images``.

    ``gb_cluster(images, params, **kwargs).image``; keyword arguments are those
    of :func:`gb_cluster`.

    Example:
      >>> import numpy as np
      >>> x = np.array([[[10, 10, 10], [12, 12, 12], [200, 200, 200], [203, 203, 203]]] * 2,
      ...              np.uint8)  # a 2x4 image, two near-flat halves
      >>> gb_denoise(x, threshold=20.0)[0, :, 0].tolist()  # each half its mean colour
      [11, 11, 202, 202]
    """
    return gb_cluster(images, params, **kwargs).image


def gb_multiscale(
    images: ArrayLike,
    thresholds: float | Sequence[float] = (40.0, 20.0, 10.0),
    params: GBParams | None = None,
    **kwargs: Any,
) -> GBResult:
    """Coarse-to-fine family: the partitions of :func:`gb_cluster` at every threshold, in one pass.

    ``params`` and the keyword arguments are those of :func:`gb_cluster`
    (``capacity="auto"`` included: an image that saturates at any threshold is
    re-run at every threshold with twice the capacity), except ``threshold``:
    ``thresholds`` take its place (``params.threshold`` is not used). Returns a
    :class:`GBResult` whose fields are stacked on a new leading axis of length
    ``len(thresholds)``, in the caller's order (so ``.image`` is (T, [B,] H, W,
    C)); a single number is one threshold (T = 1).

    The thresholds are run from the largest to the smallest, each continuing
    from the partition at the one before instead of from a single ball: a ball
    impure at a threshold is impure at every smaller one (its within fraction
    can only fall), and a 2-means split depends only on the ball's members, so
    the partition at a smaller threshold refines the one at a larger threshold.
    One compiled program (a scan over the thresholds, which are traced) serves
    every set of T thresholds.

    Equality with :func:`gb_cluster`: at every threshold where the image does
    not saturate, the partition (the same groups of pixels), ``n_balls``, the
    per-ball statistics (permuted with the ids) and ``noise`` equal those of
    ``gb_cluster(images, threshold=t, **kwargs)``, and so does ``image`` except
    for a noise pixel exactly equidistant from two kept centres (the tie goes to
    the lower id); at the largest threshold everything is identical, ids
    included. Exceptions: where the capacity stops a split (``saturated``), which
    balls split depends on the order of the rounds, which differs; where
    ``max_rounds`` binds (it caps the rounds of each threshold's pass, counted
    from that pass's start); and float32 near-ties as in the module docstring.
    ``rounds`` counts the rounds of each threshold's own pass.

    Ball ids: at the largest threshold they are those of :func:`gb_cluster`. At
    each smaller threshold, every ball of the previous (next larger) threshold
    keeps its id for the part of it that stays on side A in each of its splits,
    and the new balls get the ids ``n_prev, n_prev + 1, ...`` (``n_prev`` the
    previous ball count) in the order they are made: round by round, and within
    a round in the order of their parents' ids. So every ball at a threshold
    lies inside the ball with the same id at every larger threshold, if that id
    exists there, and ids ``0..n_prev-1`` are the balls that kept a previous id.

    Returns:
      A :class:`GBResult` with a leading threshold axis on every field.

    Raises:
      ValueError: as :func:`gb_cluster`; and for ``threshold=`` or no thresholds.

    Example:
      >>> import numpy as np
      >>> x = np.array([[[0] * 3, [30] * 3, [100] * 3, [130] * 3]], np.uint8)  # 1x4
      >>> ms = gb_multiscale(x, thresholds=(200.0, 40.0, 10.0))
      >>> ms.n_balls.tolist()  # finer thresholds, more balls
      [1, 2, 4]
      >>> ms.labels[1].tolist() == gb_cluster(x, threshold=40.0).labels.tolist()
      True
    """
    if "threshold" in kwargs:
        raise ValueError("threshold: use thresholds=(...) with gb_multiscale")
    params, rest = as_params(params, kwargs)
    if isinstance(thresholds, str):
        raise ValueError(f"thresholds: expected numbers (pixel units), got {thresholds!r}")
    if np.ndim(thresholds) == 0:
        thresholds = (thresholds,)  # one threshold: a threshold axis of length 1
    thresholds = tuple(thresholds)
    if not thresholds:
        raise ValueError("thresholds: expected at least one threshold")
    for t in thresholds:
        _check_threshold(t, "thresholds")
    return _multiscale(images, thresholds, params, **rest)


def _multiscale(
    images, thresholds, params: GBParams, *, scale=None, chunk_size=None,
    memory_budget=2 << 30, progress=False, engine="auto",
) -> GBResult:  # fmt: skip
    images = _validate(images, scale)
    order = sorted(range(len(thresholds)), key=lambda i: -float(thresholds[i]))
    pos = np.argsort(order)  # pos[i]: where the caller's i-th threshold is in the pass
    unbatched = images.ndim == 3
    x = images[None] if unbatched else images
    res = _cluster(
        x,
        tuple(float(thresholds[i]) for i in order),
        params,
        multiscale=True,
        scale=scale,
        chunk_size=chunk_size,
        memory_budget=memory_budget,
        progress=progress,
        engine=_resolve_engine(engine),
    )
    return _scales_first(res, jnp.asarray(pos, jnp.int32), unbatched=unbatched)


# The results' reshuffles as one compiled program per shape: run eagerly, each field's
# take, moveaxis and indexing compiled on its own (24 small programs for a new shape).
@jax.jit
def _first_image(res: GBResult) -> GBResult:
    return jax.tree_util.tree_map(lambda a: a[0], res)


@functools.partial(jax.jit, static_argnames=("unbatched",))
def _scales_first(res: GBResult, pos, *, unbatched: bool) -> GBResult:
    """``(B, T, ...)`` fields to ``(T, B, ...)``, the scales in the caller's order
    (``pos``), without the batch axis where ``unbatched``."""
    res = jax.tree_util.tree_map(lambda a: jnp.moveaxis(jnp.take(a, pos, axis=1), 1, 0), res)
    if unbatched:
        res = jax.tree_util.tree_map(lambda a: a[:, 0], res)
    return res

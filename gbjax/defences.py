"""Preprocessing defences and the defended model (docs/methods.md, sections 1 and 4).

* :class:`GB`: granular-ball painting as a defence ``g(x)`` on float images in
  [0, 1], hashable (a frozen dataclass), so attacks compile once per parameter
  set;
* :class:`Defended`: a classifier composed with a defence, the function every
  experiment evaluates and attacks, clean and adversarial alike;
* classical denoising defences beside GB (docs/methods.md, section 8), each a
  frozen dataclass called on ``(B, H, W, C)`` float images in [0, 1] (C = 1 or
  3), jitted, returning the same shape and dtype, with a class attribute
  ``differentiable`` (False: attack it with BPDA):

  - :class:`Median`: ``size x size`` median filter (scipy's reflect mode), size
    at most :data:`MAX_MEDIAN_SIZE`;
  - :class:`BitDepth`: rounding to ``2**bits`` levels (ART's FeatureSqueezing);
  - :class:`JPEG`: libjpeg's JPEG round trip at ``quality`` (straight-through
    roundings);
  - :class:`KMeans`: per-image k-means colour quantisation;
  - :class:`TV`: Chambolle total-variation denoising (scikit-image's);
  - :class:`GaussianBlur`: separable Gaussian blur (scipy's), kernel radius at
    most :data:`MAX_BLUR_RADIUS`;
  - :class:`Compose`: several defences in order.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from gbjax import _jpeg, _kmeans, gb
from gbjax._callables import LogitsFn, PytreeCallable, as_logits_fn
from gbjax._checks import check_int, check_number, is_traced
from gbjax._jpeg import jpeg_quant_table

__all__ = [
    "GB",
    "Defended",
    "Median",
    "BitDepth",
    "JPEG",
    "KMeans",
    "TV",
    "GaussianBlur",
    "Compose",
    "jpeg_quant_table",
    "MAX_MEDIAN_SIZE",
    "MAX_BLUR_RADIUS",
]


def _round_straight_through(v):
    """``round(v)`` forward, identity backward."""
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def check_images01(x: ArrayLike, name: str = "x") -> None:
    """Shape (B, H, W, C) float in [0, 1]; value checks only on concrete arrays."""
    if np.ndim(x) != 4:
        raise ValueError(f"{name} must be a (B, H, W, C) batch, got shape {np.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be float in [0, 1], got dtype {jnp.result_type(x)}")
    if is_traced(x):
        return
    a = np.asarray(x)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    if a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name} must be in [0, 1], got values in [{a.min()}, {a.max()}]")


def _param(name: str) -> property:
    return property(lambda self: getattr(self.params, name), doc=f"``params.{name}``.")


@dataclasses.dataclass(frozen=True, init=False)
class GB:
    """Granular-ball painting of ``(B, H, W, C)`` float images in [0, 1].

    ``gb_denoise(x, params, scale=255)``; with ``quantize=True`` (default) the
    painted colours are rounded to the 256 levels of a uint8 image, exactly the
    images a GB model is trained on (``gbjax.data.gb_processed``), with a
    straight-through gradient. The gradient w.r.t. ``x`` is that of the painting
    with the partition held fixed (each pixel moves its ball's centre), so an
    end-to-end attack sees a real, if partial, gradient; BPDA replaces it by the
    identity.

    Hashable and equal by value (a frozen dataclass of a :class:`gbjax.GBParams`
    and ``quantize``), so attacks compile once per parameter set. The GB
    parameters are read as attributes too (``GB(threshold=10).threshold``).

    Args:
      params: the GB parameters, a :class:`gbjax.GBParams`; or None for the
        keywords ``threshold`` .. ``max_capacity`` of :func:`gbjax.gb_cluster`
        (those not given take :class:`gbjax.GBParams`' defaults), not both.
      quantize: round the painted colours to 8-bit levels (straight through).

    Raises:
      ValueError: for invalid parameters, as :class:`gbjax.GBParams`, or both
        ``params`` and a GB keyword.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import GBParams, defences
      >>> g = defences.GB(threshold=20.0)
      >>> g == defences.GB(GBParams(threshold=20.0)), g.threshold, g.purity
      (True, 20.0, 0.9)
      >>> x = jnp.full((1, 4, 4, 3), 0.2).at[:, :, 2:].set(0.8)  # two flat halves
      >>> y = g(x)
      >>> y.shape, (y[0, 0, :, 0] * 255).round().tolist()  # each ball its colour
      ((1, 4, 4, 3), [51.0, 51.0, 204.0, 204.0])
    """

    params: gb.GBParams
    quantize: bool = True

    def __init__(
        self,
        params: gb.GBParams | None = None,
        *,
        threshold: float | None = None,
        purity: float | None = None,
        capacity: int | typing.Literal["auto"] | None = None,
        min_ball_size: int | None = None,
        max_rounds: int | None = None,
        features: gb.Features | dict[str, typing.Any] | None = None,
        kmeans_iters: int | None = None,
        max_capacity: int | None = None,
        quantize: bool = True,
    ) -> None:
        kw = dict(
            threshold=threshold, purity=purity, capacity=capacity, min_ball_size=min_ball_size,
            max_rounds=max_rounds, features=features, kmeans_iters=kmeans_iters,
            max_capacity=max_capacity,
        )  # fmt: skip
        params, _ = gb.as_params(params, kw)
        object.__setattr__(self, "params", params)
        object.__setattr__(self, "quantize", quantize)

    threshold = _param("threshold")
    purity = _param("purity")
    capacity = _param("capacity")
    min_ball_size = _param("min_ball_size")
    max_rounds = _param("max_rounds")
    features = _param("features")
    kmeans_iters = _param("kmeans_iters")
    max_capacity = _param("max_capacity")

    def cluster(self, x: ArrayLike) -> gb.GBResult:
        """The :class:`gbjax.GBResult` of ``x`` (float [0, 1])."""
        check_images01(x)
        return gb.gb_cluster(x, self.params, scale=255.0)

    def __call__(self, x: ArrayLike) -> jax.Array:
        out = self.cluster(x).image
        if self.quantize:
            out = _round_straight_through(out * 255.0) / 255.0
        return out


@jax.tree_util.register_pytree_node_class
class Defended(PytreeCallable):
    """The defended model ``classifier(preprocess(x[, key]))``, a jit-friendly pytree.

    ``classifier``: an eval-mode ``nnx.Module`` or any logits function;
    ``preprocess``: a defence such as :class:`GB` (any ``g(x) -> x'`` on [0, 1]
    float images), or ``None`` for the classifier alone. With
    ``randomized=True`` it is called as ``f(x, key)`` and the key goes to the
    preprocessor. Evaluate it with :mod:`gbjax.evaluate` and attack it with
    :mod:`gbjax.attacks` like any model; uint8 images are divided by 255 first.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> def classifier(x):  # class scores: the mean of each channel
      ...     return x.mean(axis=(1, 2))
      >>> f = defences.Defended(classifier, defences.BitDepth(bits=1))
      >>> f(jnp.full((1, 4, 4, 3), 0.6)).tolist()  # 0.6 squeezed to 1.0 first
      [[1.0, 1.0, 1.0]]
      >>> f(jnp.full((1, 4, 4, 3), 51, jnp.uint8)).tolist()  # uint8: 51 / 255 = 0.2 -> 0
      [[0.0, 0.0, 0.0]]
    """

    def __init__(
        self,
        classifier: LogitsFn,
        preprocess: Callable[..., jax.Array] | None = None,
        *,
        randomized: bool = False,
    ) -> None:
        self.classifier = as_logits_fn(classifier)
        self.preprocess = None if preprocess is None else as_logits_fn(preprocess)
        self.randomized = bool(randomized)

    def __call__(self, x: ArrayLike, key: jax.Array | None = None) -> jax.Array:
        x = jnp.asarray(x)
        if self.preprocess is not None and jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32) / 255.0
        if self.randomized and key is None:
            raise ValueError(
                "this pipeline has a randomised preprocessor: call it as f(x, key) "
                "(attacks: pass eot_samples and key)"
            )
        if self.preprocess is not None:
            x = self.preprocess(x, key) if self.randomized else self.preprocess(x)
        return self.classifier(x)

    def tree_flatten(self):
        return (self.classifier, self.preprocess), self.randomized

    @classmethod
    def tree_unflatten(cls, randomized, children):
        obj = object.__new__(cls)
        obj.classifier, obj.preprocess = children
        obj.randomized = randomized
        return obj

    def __repr__(self):
        return (
            f"Defended(classifier={self.classifier!r}, preprocess={self.preprocess!r}, "
            f"randomized={self.randomized})"
        )


# ---------------------------------------------------------------------------
# Classical preprocessing defences (docs/methods.md, section 8)
# ---------------------------------------------------------------------------


def _straight_through(v, forward):
    """``forward`` (a rounded version of ``v``) forward, identity backward."""
    return v + jax.lax.stop_gradient(forward - v)


@functools.partial(jax.jit, static_argnums=0)
def _apply(defence, x):
    return defence._forward(x)


class _Preprocessor:
    """Shared ``__call__`` of the classical defences: checks ``x`` (a ``(B, H, W, C)``
    float batch in [0, 1], C = 1 or 3), runs the jitted ``_forward`` in at least
    float32 and returns the input's dtype. Subclasses are frozen dataclasses, so
    ``jit`` (static argument) and the attacks compile once per parameter set."""

    #: whether the gradient through the defence is useful to an attacker; where
    #: it is not (zero almost everywhere), attack it with BPDA.
    differentiable: typing.ClassVar[bool] = True

    def __call__(self, x: ArrayLike) -> jax.Array:
        check_images01(x)
        if np.shape(x)[-1] not in (1, 3):
            raise ValueError(f"x must have 1 or 3 channels (last axis), got shape {np.shape(x)}")
        x = jnp.asarray(x)
        return self._jitted(x.astype(jnp.promote_types(x.dtype, jnp.float32))).astype(x.dtype)

    def _jitted(self, x):
        """The compiled ``_forward``, one program per parameter set and shape."""
        return _apply(self, x)

    def _forward(self, x):  # pragma: no cover - abstract
        raise NotImplementedError


def _pad_reflect(x, r: int, axis: int):
    """scipy.ndimage's ``mode='reflect'`` (d c b a | a b c d | d c b a) by ``r`` on ``axis``."""
    pad = [(0, 0)] * x.ndim
    pad[axis] = (r, r)
    return jnp.pad(x, pad, mode="symmetric")


# The filters unroll their windows (size * size slices for Median, 2 r + 1 taps per
# axis for GaussianBlur), so compile time grows with the window: differentiating
# Median(21) took about 15 s on the busy 2-core development machine, Median(65) minutes.
MAX_MEDIAN_SIZE = 15
MAX_BLUR_RADIUS = 32


@dataclasses.dataclass(frozen=True)
class Median(_Preprocessor):
    """``size x size`` median filter per channel, ``scipy.ndimage.median_filter(x,
    size=(size, size, 1), mode="reflect")`` per image (exact). Differentiable almost
    everywhere through the sort: each output pixel's gradient goes to the input
    pixel that is its median. ``size`` is at most :data:`MAX_MEDIAN_SIZE`.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> speck = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)  # one white pixel
      >>> float(defences.Median(3)(speck).max())  # the speck is removed
      0.0
    """

    size: int = 3
    differentiable: typing.ClassVar[bool] = True

    def __post_init__(self):
        if check_int("size", self.size, 1) % 2 == 0:
            raise ValueError(f"size: expected an odd int >= 1, got {self.size!r}")
        if self.size > MAX_MEDIAN_SIZE:
            raise ValueError(
                f"size: at most {MAX_MEDIAN_SIZE} (the window is unrolled into size * size "
                f"slices and larger ones compile for minutes), got {self.size!r}; downscale "
                "the images instead"
            )
        object.__setattr__(self, "size", int(self.size))

    def _forward(self, x):
        k, r = self.size, self.size // 2
        if k == 1:
            return x
        H, W = x.shape[1:3]
        xp = _pad_reflect(_pad_reflect(x, r, 1), r, 2)
        win = [xp[:, i : i + H, j : j + W] for i in range(k) for j in range(k)]
        if k > 7:
            return jnp.sort(jnp.stack(win, -1), axis=-1)[..., k * k // 2]
        return _sorting_network(win)[k * k // 2]  # XLA keeps only what the median needs


def _sorting_network(v: list) -> list:
    """Batcher's odd-even merge sort of the arrays ``v`` (elementwise, by min / max),
    padded to a power of two with +inf (comparisons with the padding are skipped)."""
    n = 1 << (len(v) - 1).bit_length()
    v = list(v) + [None] * (n - len(v))
    p = 1
    while p < n:
        k = p
        while k >= 1:
            for j in range(k % p, n - k, 2 * k):
                for i in range(min(k, n - j - k)):
                    a, b = i + j, i + j + k
                    if a // (2 * p) == b // (2 * p) and v[b] is not None:
                        v[a], v[b] = jnp.minimum(v[a], v[b]), jnp.maximum(v[a], v[b])
            k //= 2
        p *= 2
    return v


@dataclasses.dataclass(frozen=True)
class BitDepth(_Preprocessor):
    """Colour-depth reduction to ``2**bits`` levels, ART's ``FeatureSqueezing``
    (clip range (0, 1)): ``round(x (2**bits - 1)) / (2**bits - 1)``, rounding half
    to even as ``np.rint``. Its gradient is zero almost everywhere: attack it with
    BPDA.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> x = jnp.array([0.2, 0.4, 0.6, 0.9]).reshape(1, 1, 4, 1)
      >>> defences.BitDepth(bits=1)(x)[0, 0, :, 0].tolist()  # two levels: 0 and 1
      [0.0, 0.0, 1.0, 1.0]
      >>> defences.BitDepth.differentiable
      False
    """

    bits: int = 4
    differentiable: typing.ClassVar[bool] = False

    def __post_init__(self):
        object.__setattr__(self, "bits", check_int("bits", self.bits, 1, 8))

    def _forward(self, x):
        n = 2**self.bits - 1
        # the division as a table of correctly rounded k / n (XLA would multiply by 1 / n)
        table = jnp.asarray(np.arange(n + 1, dtype=np.dtype(x.dtype)) / np.dtype(x.dtype).type(n))
        return table[jnp.clip(jnp.round(x * float(n)), 0, n).astype(jnp.int32)]


@dataclasses.dataclass(frozen=True)
class JPEG(_Preprocessor):
    """JPEG compression and decompression at ``quality`` as libjpeg(-turbo) does it
    with its defaults (Pillow's ``Image.save(format="JPEG", quality=quality)``, then
    decoding): 8-bit levels; for colour images JFIF RGB->YCbCr and 4:2:0 chroma
    subsampling (2x2 box average); level shift, 8x8 DCT-II, quantisation with the
    IJG tables scaled by :func:`jpeg_quant_table`, rounding, dequantisation and
    inverse DCT; "fancy" (triangle) chroma upsampling, YCbCr->RGB, clipped and
    rounded to 8-bit levels. The image is padded to a multiple of 8 (16 with
    subsampled chroma) by edge replication and cropped back. The fixed-point
    steps (colour conversions, down- and upsampling) are libjpeg's integer
    arithmetic, including its default integer (``ISLOW``) DCTs, so the result is
    libjpeg's bit for bit. Every rounding has a straight-through gradient, so the
    gradient is that of JPEG without its roundings (useful end to end).

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> x = jnp.full((1, 8, 8, 1), 100 / 255)  # a flat grey block survives JPEG
      >>> y = defences.JPEG(quality=75)(x)
      >>> y.shape, sorted(set((y * 255).round().ravel().tolist()))
      ((1, 8, 8, 1), [100.0])
    """

    quality: int = 75
    differentiable: typing.ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "quality", check_int("quality", self.quality, 1, 100))

    def _tables(self):
        return jpeg_quant_table(self.quality), jpeg_quant_table(self.quality, chroma=True)

    def _jitted(self, x):
        # the tables as arguments: one program per shape for every quality (a sweep over
        # qualities compiles once); inside a larger program they are constants
        return _jpeg_round_trip_jit(x, *self._tables())

    def _forward(self, x):
        return _jpeg_round_trip(x, *self._tables())


def _jpeg_round_trip(x, ql, qc):
    """:class:`JPEG`'s round trip with the luminance and chrominance tables ``ql``,
    ``qc`` (constants or traced)."""
    B, H, W, C = x.shape
    v = _straight_through(x * 255.0, jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0))
    m = 16 if C == 3 else 8
    Hp, Wp = -(-H // m) * m, -(-W // m) * m
    v = jnp.pad(v, ((0, 0), (0, Hp - H), (0, Wp - W), (0, 0)), mode="edge")
    if C == 1:
        return _jpeg.jpeg_codec(v[..., 0], ql)[:, :H, :W, None] / 255.0
    y, cb, cr = _jpeg.rgb_to_ycc(v)
    y = _jpeg.jpeg_codec(y, ql)[:, :H, :W]
    h2, w2 = -(-H // 2), -(-W // 2)  # libjpeg's downsampled_height/width
    cb, cr = (
        _jpeg.upsample(_jpeg.jpeg_codec(_jpeg.downsample(c), qc)[:, :h2, :w2])[:, :H, :W]
        for c in (cb, cr)
    )
    return _jpeg.ycc_to_rgb(y, cb, cr) / 255.0


_jpeg_round_trip_jit = jax.jit(_jpeg_round_trip)


@dataclasses.dataclass(frozen=True)
class KMeans(_Preprocessor):
    """Per-image k-means colour quantisation: ``iters`` Lloyd iterations on the
    pixels' colours (``gbjax._kmeans.lloyd``) from the deterministic
    ``gbjax._kmeans.init_quantiles`` centres (the pixels at evenly spaced ranks
    of the channel sum), then every pixel painted with its centre. ``k`` is
    capped at the number of pixels. Differentiable almost everywhere: with the
    assignment held fixed, a pixel's output is its cluster's mean.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> x = jnp.array([0.1, 0.2, 0.8, 0.9]).reshape(1, 1, 4, 1)
      >>> (defences.KMeans(k=2)(x)[0, 0, :, 0] * 100).round().tolist()  # two colours
      [15.0, 15.0, 85.0, 85.0]
    """

    k: int = 8
    iters: int = 20
    differentiable: typing.ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "k", check_int("k", self.k, 1))
        object.__setattr__(self, "iters", check_int("iters", self.iters, 1))

    def fit(self, x: ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(initial_centres (B, k, C), centres (B, k, C), labels (B, H*W))`` of ``x``."""
        check_images01(x)
        return _kmeans_fit(self, jnp.asarray(x))

    def _forward(self, x):
        _, c, lab = _kmeans_fit(self, x)
        return jnp.take_along_axis(c, lab[..., None], axis=1).reshape(x.shape)


@functools.partial(jax.jit, static_argnums=0)
def _kmeans_fit(defence, x):
    B, H, W, C = x.shape
    k = min(defence.k, H * W)

    def one(px):
        c0 = _kmeans.init_quantiles(px, k)
        return (c0, *_kmeans.lloyd(px, c0, defence.iters))

    return jax.vmap(one)(x.reshape(B, H * W, C))


def _tv_grad(u):
    """Forward differences along H and W (zero in the last row / column), (2, ...)."""
    gy = jnp.concatenate([u[..., 1:, :] - u[..., :-1, :], jnp.zeros_like(u[..., :1, :])], -2)
    gx = jnp.concatenate([u[..., :, 1:] - u[..., :, :-1], jnp.zeros_like(u[..., :, :1])], -1)
    return gy, gx


def _tv_chambolle(img, weight: float, eps: float, n_iter: int):
    """skimage's ``_denoise_tv_chambolle_nd`` on 2-D images ``img`` (..., H, W),
    each with its own stopping test, unrolled into a differentiable ``scan``."""
    tau = 0.25  # 1 / (2 ndim)
    size = img.shape[-1] * img.shape[-2]
    sg = jax.lax.stop_gradient
    lead = img.shape[:-2]
    zeros = jnp.zeros(lead, img.dtype)

    def step(state, i):
        py, px, result, done, e_prev, e_init = state
        d = -(py + px)
        d = d.at[..., 1:, :].add(py[..., :-1, :])
        d = d.at[..., :, 1:].add(px[..., :, :-1])
        out = img + d
        gy, gx = _tv_grad(out)
        s = gy * gy + gx * gx
        norm = jnp.where(s > 0, jnp.sqrt(jnp.where(s > 0, s, 1.0)), 0.0)
        e = (jnp.sum(sg(d) ** 2, (-2, -1)) + weight * jnp.sum(sg(norm), (-2, -1))) / size
        e_init = jnp.where(i == 0, e, e_init)
        stop = (i > 0) & (jnp.abs(e_prev - e) < eps * e_init) & ~done
        result = jnp.where(done[..., None, None], result, out)
        done = done | stop
        scale = 1.0 + norm * (tau / weight)
        py, px = (py - tau * gy) / scale, (px - tau * gx) / scale
        return (py, px, result, done, e, e_init), None

    def body(state, i):
        return jax.lax.cond(
            jnp.all(state[3]), lambda s, i: (s, None), jax.checkpoint(step), state, i
        )

    p0 = jnp.zeros_like(img)
    init = (p0, p0, img, jnp.zeros(lead, bool), zeros, zeros)
    state, _ = jax.lax.scan(body, init, jnp.arange(n_iter))
    return state[2]


@dataclasses.dataclass(frozen=True)
class TV(_Preprocessor):
    """Total-variation denoising by Chambolle's projection algorithm, per image and
    channel: ``skimage.restoration.denoise_tv_chambolle(x, weight=weight, eps=eps,
    max_num_iter=n_iter, channel_axis=-1)``. The defaults are scikit-image's
    (``eps=2e-4``, ``n_iter=200``): each channel stops where the relative decrease
    of the energy falls below ``eps`` (``|E_{n-1} - E_n| < eps E_0``); ``eps=0``
    runs exactly ``n_iter`` iterations. The iterations are unrolled (a ``scan``),
    so the gradient is exact (the stopping iteration held fixed); it keeps three
    images per iteration (each step is recomputed), so when attacking large
    batches a smaller ``n_iter`` saves memory (at the default ``eps`` most
    images stop within 30 iterations).

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> speck = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)  # one white pixel
      >>> y = defences.TV(weight=0.1, n_iter=20)(speck)
      >>> y.shape, 0.0 < float(y.max()) < 1.0  # the speck is flattened
      ((1, 4, 4, 1), True)
    """

    weight: float = 0.1
    n_iter: int = 200
    eps: float = 2e-4
    differentiable: typing.ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "weight", check_number("weight", self.weight))
        object.__setattr__(self, "n_iter", check_int("n_iter", self.n_iter, 1))
        object.__setattr__(self, "eps", check_number("eps", self.eps, strict=False))

    def _forward(self, x):
        out = _tv_chambolle(jnp.moveaxis(x, -1, 1), self.weight, self.eps, self.n_iter)
        return jnp.moveaxis(out, 1, -1)


@dataclasses.dataclass(frozen=True)
class GaussianBlur(_Preprocessor):
    """Separable Gaussian blur over H and W, ``scipy.ndimage.gaussian_filter(x,
    sigma=(sigma, sigma, 0), truncate=truncate, mode="reflect")`` per image: kernel
    radius ``int(truncate sigma + 0.5)`` (at most :data:`MAX_BLUR_RADIUS`), weights
    ``exp(-t^2 / (2 sigma^2))`` normalised to sum 1. Linear, so differentiable.

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> speck = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)  # one white pixel
      >>> y = defences.GaussianBlur(sigma=1.0)(speck)
      >>> y.shape, round(float(y[0, 1, 1, 0]), 3), bool((y > 0).all())  # spread out
      ((1, 4, 4, 1), 0.163, True)
    """

    sigma: float = 1.0
    truncate: float = 4.0
    differentiable: typing.ClassVar[bool] = True

    def __post_init__(self):
        object.__setattr__(self, "sigma", check_number("sigma", self.sigma))
        object.__setattr__(self, "truncate", check_number("truncate", self.truncate))
        r = int(self.truncate * self.sigma + 0.5)
        if r > MAX_BLUR_RADIUS:
            raise ValueError(
                f"sigma: the kernel radius int(truncate * sigma + 0.5) = {r} is over "
                f"{MAX_BLUR_RADIUS} (the 2 r + 1 taps are unrolled and larger kernels compile "
                f"slowly); use sigma < {(MAX_BLUR_RADIUS + 0.5) / self.truncate:.4g} at "
                f"truncate={self.truncate:g}, a smaller truncate, or downscale the images"
            )

    def _forward(self, x):
        r = int(self.truncate * self.sigma + 0.5)
        t = np.arange(-r, r + 1)
        w = np.exp(-0.5 / (self.sigma * self.sigma) * t**2)
        w = (w / w.sum()).astype(np.dtype(x.dtype))
        for axis in (1, 2):
            n, xp = x.shape[axis], _pad_reflect(x, r, axis)
            terms = [float(w[i]) * jax.lax.slice_in_dim(xp, i, i + n, axis=axis) for i in t + r]
            x = functools.reduce(jnp.add, terms)
        return x


@dataclasses.dataclass(frozen=True, init=False)
class Compose(_Preprocessor):
    """``Compose(d1, d2, ...)(x) = ... d2(d1(x))``: defences applied in order.
    Hashable and equal by value when its defences are; differentiable when all
    of them are (a defence without a ``differentiable`` flag, e.g. :class:`GB`,
    counts as differentiable).

    Example:
      >>> import jax.numpy as jnp
      >>> from gbjax import defences
      >>> speck = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(1.0)  # one white pixel
      >>> d = defences.Compose(defences.GaussianBlur(sigma=1.0), defences.BitDepth(bits=2))
      >>> (d(speck)[0, 0, :, 0] * 3).round().tolist(), d.differentiable
      ([0.0, 0.0, 0.0, 0.0], False)
    """

    defences: tuple

    def __init__(self, *defences):
        if not defences:
            raise ValueError("defences: expected at least one defence, got none")
        for d in defences:
            if not callable(d):
                raise ValueError(f"defences: expected callables g(x), got {d!r}")
            try:
                hash(d)
            except TypeError:
                raise ValueError(f"defences: expected hashable defences, got {d!r}") from None
        object.__setattr__(self, "defences", tuple(defences))

    @property
    def differentiable(self) -> bool:
        return all(getattr(d, "differentiable", True) for d in self.defences)

    def _forward(self, x):
        for d in self.defences:
            x = d(x)
        return x

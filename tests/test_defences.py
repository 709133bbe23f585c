"""Classical defences (gbjax.defences) against their reference implementations.

References and tolerances:

* Median vs ``scipy.ndimage.median_filter`` (mode "reflect"): exact (a median
  is one of the input values).
* JPEG vs Pillow (libjpeg-turbo) save/decode: mean absolute difference in
  8-bit levels <= 1.0 (the stated goal); with libjpeg-turbo the round trip is
  bit-exact (max difference 0), checked separately.
* TV vs ``skimage.restoration.denoise_tv_chambolle(channel_axis=-1)``: atol
  1e-5 in [0, 1] units. Both run the same float32 operations in the same
  order, so only reduction order differs (measured <= 2e-7); with the default
  ``eps`` the stopping iteration must agree too (a different stopping
  iteration would differ by ~1e-3, one Chambolle step, and fail).
* KMeans vs ``sklearn.cluster.KMeans(init=<our initial centres>, n_init=1,
  max_iter=iters, tol=0, algorithm="lloyd")``: on well-separated colours
  identical labels and centres within atol 1e-5; on smooth noisy images (a
  continuum of colours, where a float32 near-tie can flip a pixel and the
  change propagates) at most 1% of labels differ, centres within 0.01.
* GaussianBlur vs ``scipy.ndimage.gaussian_filter(sigma=(s, s, 0))``: atol
  1e-6 (scipy accumulates in float64, we in float32).
* BitDepth vs ART's FeatureSqueezing formula by hand: exact.
"""

from __future__ import annotations

import io
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gbjax import attacks
from gbjax.defences import (
    JPEG,
    TV,
    BitDepth,
    Compose,
    GaussianBlur,
    KMeans,
    Median,
    _apply,
    jpeg_quant_table,
)

ndimage = pytest.importorskip("scipy.ndimage")
Image = pytest.importorskip("PIL.Image")


def smooth_noisy(n=4, h=32, w=32, c=3, *, noise=12.0, seed=0):
    """Real-looking uint8 images: smooth random gradients and waves plus Gaussian noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    out = []
    for _ in range(n):
        base = [
            np.sin(2 * np.pi * (rng.uniform(0.3, 2) * xx + rng.uniform(0.3, 2) * yy))
            * rng.uniform(40, 100)
            + rng.uniform(60, 200)
            + rng.uniform(-60, 60) * xx
            for _ in range(c)
        ]
        img = np.stack(base, -1) + rng.normal(0, noise, (h, w, c))
        out.append(np.clip(np.round(img), 0, 255).astype(np.uint8))
    return np.stack(out)


def as01(u8):
    return jnp.asarray(u8, jnp.float32) / 255.0


def cifar_images(n=16):
    if not os.environ.get("GBJAX_DATA_DIR"):
        pytest.skip("GBJAX_DATA_DIR is not set (CIFAR-10 test images)")
    from gbjax import data

    x, _ = data.load("cifar10", "test", download=False, progress=False)
    return np.asarray(x[:: len(x) // n][:n])  # spread over the (possibly class-sorted) split


X01 = as01(smooth_noisy(2, 16, 16, 3, seed=3))

ALL = [
    Median(3),
    BitDepth(4),
    JPEG(75),
    KMeans(4, 5),
    TV(0.1, n_iter=20),
    GaussianBlur(1.0),
    Compose(Median(3), JPEG(50)),
]
IDS = [type(d).__name__ for d in ALL]


# --------------------------------------------------------------------------- #
# Against the references
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("size", [1, 3, 5])
@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 9, 7, 1), (2, 3, 4, 3)])
def test_median_matches_scipy_exactly(size, shape):
    x = as01(smooth_noisy(*shape, noise=30, seed=size))
    ours = np.asarray(Median(size)(x))
    ref = np.stack(
        [ndimage.median_filter(np.asarray(i), size=(size, size, 1), mode="reflect") for i in x]
    )
    np.testing.assert_array_equal(ours, ref)


def pil_jpeg(u8_HWC, quality):
    mode = "L" if u8_HWC.shape[-1] == 1 else "RGB"
    buf = io.BytesIO()
    Image.fromarray(u8_HWC[..., 0] if mode == "L" else u8_HWC, mode).save(
        buf, format="JPEG", quality=quality
    )
    buf.seek(0)
    a = np.asarray(Image.open(buf).convert(mode))
    return a[..., None] if mode == "L" else a


def jpeg_levels_mad(u8, quality):
    """(mean, max) absolute difference in 8-bit levels between JPEG and Pillow."""
    ref = np.stack([pil_jpeg(u, quality) for u in u8]).astype(np.int32)
    out = np.asarray(JPEG(quality)(as01(u8))) * 255.0
    levels = np.round(out).astype(np.int32)
    np.testing.assert_allclose(out, levels, atol=1e-3)  # the output is on 8-bit levels
    d = np.abs(levels - ref)
    return float(d.mean()), int(d.max())


JPEG_SETS = {
    "smooth+noise RGB 32x32": lambda: smooth_noisy(6, 32, 32, 3, seed=1),
    "smooth+noise RGB 37x29": lambda: smooth_noisy(4, 37, 29, 3, seed=2),
    "smooth+noise grey 28x28": lambda: smooth_noisy(6, 28, 28, 1, seed=3),
}


@pytest.mark.parametrize("quality", [50, 75, 90])
@pytest.mark.parametrize("images", list(JPEG_SETS))
def test_jpeg_matches_pillow(images, quality):
    mad, mx = jpeg_levels_mad(JPEG_SETS[images](), quality)
    print(f"JPEG q={quality} {images}: mean |ours - Pillow| = {mad:.4f} levels (max {mx})")
    assert mad <= 1.0


@pytest.mark.parametrize("quality", [50, 75, 90])
def test_jpeg_matches_pillow_on_cifar10(quality):
    mad, mx = jpeg_levels_mad(cifar_images(), quality)
    print(f"JPEG q={quality} CIFAR-10 test: mean |ours - Pillow| = {mad:.4f} levels (max {mx})")
    assert mad <= 1.0


def test_jpeg_bit_exact_with_libjpeg_turbo():
    from PIL import features

    if not features.check_feature("libjpeg_turbo"):
        pytest.skip("Pillow is not built with libjpeg-turbo")
    rng = np.random.default_rng(0)
    sets = [
        smooth_noisy(3, 32, 32, 3, seed=5),
        rng.integers(0, 256, (2, 17, 33, 3)).astype(np.uint8),  # noise, odd size
        rng.choice(np.array([0, 255], np.uint8), (2, 16, 16, 3)),  # saturated colours
        rng.integers(0, 256, (2, 1, 1, 3)).astype(np.uint8),
        smooth_noisy(2, 21, 30, 1, seed=6),
    ]
    for u8 in sets:
        for q in (1, 10, 50, 75, 90, 100):
            assert jpeg_levels_mad(u8, q) == (0.0, 0), (u8.shape, q)


def test_jpeg_qualities_share_one_program_per_shape():
    """The quantisation tables are arguments of JPEG's compiled round trip: a sweep over
    qualities compiles once per shape, and gives what the tables as constants give."""
    from gbjax import defences

    JPEG(10)(X01)
    n = defences._jpeg_round_trip_jit._cache_size()
    got = {q: np.asarray(JPEG(q)(X01)) for q in (50, 90)}
    assert defences._jpeg_round_trip_jit._cache_size() == n
    assert not np.array_equal(got[50], got[90])
    for q, v in got.items():
        np.testing.assert_array_equal(v, np.asarray(jax.jit(JPEG(q)._forward)(X01)))


@pytest.mark.parametrize("quality", [1, 10, 49, 50, 51, 75, 90, 99, 100])
def test_jpeg_quant_tables_match_pillow(quality):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    q = Image.open(buf).quantization  # natural order
    np.testing.assert_array_equal(jpeg_quant_table(quality).ravel(), q[0])
    np.testing.assert_array_equal(jpeg_quant_table(quality, chroma=True).ravel(), q[1])


@pytest.mark.parametrize("weight", [0.05, 0.1, 0.3])
def test_tv_matches_skimage_fixed_iterations(weight):
    restoration = pytest.importorskip("skimage.restoration")
    x = as01(smooth_noisy(3, 24, 20, 3, noise=20, seed=4))
    ours = np.asarray(TV(weight, n_iter=40, eps=0.0)(x))
    ref = np.stack(
        [
            restoration.denoise_tv_chambolle(
                np.asarray(i), weight=weight, eps=0.0, max_num_iter=40, channel_axis=-1
            )
            for i in x
        ]
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(3, 32, 32, 3), (2, 28, 28, 1)])
def test_tv_matches_skimage_defaults(shape):
    restoration = pytest.importorskip("skimage.restoration")
    x = as01(smooth_noisy(*shape, noise=20, seed=5))
    ours = np.asarray(TV(0.1)(x))  # eps=2e-4, n_iter=200: skimage's defaults
    ref = np.stack(
        [restoration.denoise_tv_chambolle(np.asarray(i), weight=0.1, channel_axis=-1) for i in x]
    )
    np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)
    assert np.abs(ours - np.asarray(x)).max() > 0.01  # it did denoise


def palette_images(n, k, *, seed):
    """Pixels drawn from k well-separated colours plus noise (a well-conditioned k-means)."""
    rng = np.random.default_rng(seed)
    pal = rng.permutation(np.stack(np.meshgrid(*[np.linspace(0.1, 0.9, 3)] * 3), -1).reshape(-1, 3))
    idx = rng.integers(0, k, (n, 32, 32))
    x = pal[:k][idx] + rng.normal(0, 0.04, (n, 32, 32, 3))
    return jnp.asarray(np.clip(x, 0, 1), jnp.float32)


def sklearn_from_same_init(x, k, iters):
    cluster = pytest.importorskip("sklearn.cluster")
    c0, c, lab = map(np.asarray, KMeans(k, iters).fit(x))
    for b in range(x.shape[0]):
        sk = cluster.KMeans(
            n_clusters=k, init=c0[b], n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd"
        ).fit(np.asarray(x[b]).reshape(-1, 3))
        yield sk.labels_, sk.cluster_centers_, lab[b], c[b]


@pytest.mark.parametrize("k,iters", [(2, 20), (8, 20), (16, 5)])
def test_kmeans_matches_sklearn_from_same_init(k, iters):
    x = palette_images(3, k, seed=k)
    for sk_lab, sk_c, lab, c in sklearn_from_same_init(x, k, iters):
        np.testing.assert_array_equal(sk_lab, lab)
        np.testing.assert_allclose(sk_c, c, atol=1e-5, rtol=0)
    d = KMeans(k, iters)
    _, c, lab = d.fit(x)
    np.testing.assert_array_equal(
        np.asarray(d(x)), np.asarray(jnp.take_along_axis(c, lab[..., None], 1)).reshape(x.shape)
    )


@pytest.mark.parametrize("k,iters", [(2, 20), (8, 20), (16, 20)])
def test_kmeans_close_to_sklearn_on_smooth_images(k, iters):
    """On a continuum of colours a float32 near-tie (our and BLAS's distance sums
    differ in the last bit) can flip a pixel in an early iteration and move the
    centres a little; at most 1% of labels and 0.01 per centre coordinate."""
    x = as01(smooth_noisy(3, 32, 32, 3, noise=20, seed=k))
    for sk_lab, sk_c, lab, c in sklearn_from_same_init(x, k, iters):
        flipped = float(np.mean(sk_lab != lab))
        print(f"k={k}: labels differing from sklearn {100 * flipped:.2f}%")
        assert flipped <= 0.01
        np.testing.assert_allclose(sk_c, c, atol=1e-2, rtol=0)


def test_kmeans_init_is_deterministic_quantiles():
    x = as01(smooth_noisy(2, 8, 8, 3, seed=1))
    c0, _, _ = KMeans(4).fit(x)
    px = np.asarray(x).reshape(2, 64, 3)
    order = np.argsort(px.sum(-1), axis=1, kind="stable")
    ranks = (2 * np.arange(4) + 1) * 64 // 8
    np.testing.assert_array_equal(np.asarray(c0), np.take_along_axis(px, order[:, ranks, None], 1))
    np.testing.assert_array_equal(np.asarray(KMeans(4)(x)), np.asarray(KMeans(4)(x)))


def test_kmeans_k_above_pixel_count_and_cli_helper():
    from gbjax._kmeans import kmeans_quantize

    x = as01(smooth_noisy(1, 2, 3, 3, seed=2))
    np.testing.assert_allclose(np.asarray(KMeans(50)(x)), np.asarray(x), atol=1e-7)
    img = np.zeros((6, 6, 3), np.uint8)
    img[:, 3:] = (200, 40, 10)
    for key in (None, jax.random.key(0)):  # deterministic init, and k-means++ as the CLI uses
        np.testing.assert_array_equal(kmeans_quantize(img, 2, key=key), img)
    with pytest.raises(ValueError, match="k:"):
        kmeans_quantize(img, 0)


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0, 5.0])
def test_gaussian_blur_matches_scipy(sigma):
    shape = (2, 8, 6, 3) if sigma == 5.0 else (2, 32, 32, 3)  # radius 20 > image side
    x = as01(smooth_noisy(*shape, noise=25, seed=1))
    ours = np.asarray(GaussianBlur(sigma)(x))
    ref = np.stack(
        [ndimage.gaussian_filter(np.asarray(i), sigma=(sigma, sigma, 0), mode="reflect") for i in x]
    )
    np.testing.assert_allclose(ours, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_bit_depth_by_hand(bits):
    x = jnp.asarray(np.linspace(0, 1, 1024, dtype=np.float32).reshape(1, 16, 64, 1))
    levels = 2**bits - 1
    ref = np.rint(np.asarray(x) * levels) / levels  # ART FeatureSqueezing, clip (0, 1)
    out = np.asarray(BitDepth(bits)(x))
    np.testing.assert_array_equal(out, ref.astype(np.float32))
    assert len(np.unique(out)) == levels + 1
    half = jnp.full((1, 1, 1, 1), 0.5, jnp.float32)
    assert float(BitDepth(1)(half)[0, 0, 0, 0]) == 0.0  # half to even, as np.rint


def test_compose_applies_in_order():
    x = X01
    c = Compose(GaussianBlur(1.0), BitDepth(3), Median(3))
    expected = Median(3)(BitDepth(3)(GaussianBlur(1.0)(x)))
    np.testing.assert_array_equal(np.asarray(c(x)), np.asarray(expected))
    assert not c.differentiable
    assert Compose(Median(3), JPEG(50)).differentiable
    assert c != Compose(Median(3), BitDepth(3), GaussianBlur(1.0))  # order matters


# --------------------------------------------------------------------------- #
# Every defence
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_shape_dtype_and_range(d):
    for x in (X01, X01[..., :1], X01.astype(jnp.float16), X01[:1, :5, :7]):
        y = d(x)
        assert y.shape == x.shape and y.dtype == x.dtype
        y = np.asarray(y, np.float32)
        assert np.all(np.isfinite(y)) and y.min() >= 0 and y.max() <= 1 + 1e-6
    assert isinstance(d.differentiable, bool)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_jit_equals_eager(d):
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda z: d(z))(X01)), np.asarray(d(X01)), atol=1e-6, rtol=0
    )


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_hashable_and_equal_by_value(d):
    twin = Compose(*d.defences) if isinstance(d, Compose) else type(d)(**vars(d))
    assert twin == d and hash(twin) == hash(d) and twin is not d
    assert d in {twin}
    d(X01)
    n = _apply._cache_size()
    twin(X01)
    assert _apply._cache_size() == n  # an equal defence reuses the compiled function


def test_different_parameters_are_different():
    assert Median(3) != Median(5) and JPEG(50) != JPEG(75) and TV(0.1) != TV(0.2)
    assert KMeans(4) != KMeans(4, 10) and GaussianBlur(1.0) != GaussianBlur(2.0)
    assert Median(np.int64(3)) == Median(3) and isinstance(Median(np.int64(3)).size, int)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_gradient_exists_and_is_finite(d):
    w = jnp.asarray(np.random.default_rng(0).normal(size=X01.shape), jnp.float32)
    x = X01.at[:, :4, :4].set(0.5)  # a flat patch: TV's |grad| = 0 there
    g = np.asarray(jax.grad(lambda z: jnp.sum(d(z) * w))(x))
    assert g.shape == x.shape and np.all(np.isfinite(g))
    if d.differentiable:
        assert np.abs(g).max() > 0
    else:
        assert np.all(g == 0)


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_bad_input_raises_naming_x(d):
    bad = [
        np.zeros((4, 4, 3), np.float32),  # no batch axis
        np.zeros((1, 4, 4, 3), np.uint8),  # integer dtype
        np.full((1, 4, 4, 3), 1.5, np.float32),  # outside [0, 1]
        np.full((1, 4, 4, 3), -0.1, np.float32),
        np.full((1, 4, 4, 3), np.nan, np.float32),
        np.zeros((1, 4, 4, 2), np.float32),  # 2 channels
    ]
    for x in bad:
        with pytest.raises(ValueError, match=r"^x "):
            d(x)


@pytest.mark.parametrize(
    "make,name",
    [
        (lambda: Median(2), "size"),
        (lambda: Median(0), "size"),
        (lambda: Median(3.0), "size"),
        (lambda: BitDepth(0), "bits"),
        (lambda: BitDepth(9), "bits"),
        (lambda: BitDepth(True), "bits"),
        (lambda: JPEG(0), "quality"),
        (lambda: JPEG(101), "quality"),
        (lambda: KMeans(0), "k"),
        (lambda: KMeans(4, 0), "iters"),
        (lambda: TV(0.0), "weight"),
        (lambda: TV(float("nan")), "weight"),
        (lambda: TV(0.1, n_iter=0), "n_iter"),
        (lambda: TV(0.1, eps=-1.0), "eps"),
        (lambda: GaussianBlur(0.0), "sigma"),
        (lambda: GaussianBlur(-1.0), "sigma"),
        (lambda: GaussianBlur(1.0, truncate=0), "truncate"),
        (lambda: Compose(), "defences"),
        (lambda: Compose(3), "defences"),
        (lambda: Compose(lambda x: x, [1]), "defences"),
        (lambda: jpeg_quant_table(0), "quality"),
    ],
)
def test_bad_parameters_raise_naming_them(make, name):
    with pytest.raises(ValueError, match=rf"^{name}:"):
        make()


def test_filter_windows_are_bounded_so_they_compile_in_bounded_time():
    # Median(65) unrolled 4225 slices and compiled for minutes; refused at once now
    from gbjax.defences import MAX_BLUR_RADIUS, MAX_MEDIAN_SIZE

    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=rf"^size: at most {MAX_MEDIAN_SIZE}"):
        Median(65)
    with pytest.raises(ValueError, match=r"^sigma: .*radius .* = 400 .*sigma < 8\.125"):
        GaussianBlur(100.0)
    with pytest.raises(ValueError, match=r"^sigma: .*radius"):
        GaussianBlur(4.0, truncate=100.0)
    assert time.perf_counter() - t0 < 5.0  # nothing compiled
    assert Median(MAX_MEDIAN_SIZE).size == MAX_MEDIAN_SIZE  # the bound itself is allowed
    assert int(4.0 * GaussianBlur(8.0).sigma + 0.5) == MAX_BLUR_RADIUS


@pytest.mark.parametrize("d", ALL, ids=IDS)
def test_bpda_attack_on_tiny_linear_classifier(d):
    W = jax.random.normal(jax.random.key(0), (16 * 16 * 3, 10)) * 0.05
    clf = lambda z: z.reshape(z.shape[0], -1) @ W
    y = jnp.array([1, 7])
    attack_fn, eval_fn = attacks.make_attack_logits(clf, d, "bpda")
    np.testing.assert_allclose(np.asarray(eval_fn(X01)), np.asarray(clf(d(X01))), atol=1e-5, rtol=0)
    # BPDA: the gradient through g is the identity, i.e. that of f at g(x)
    loss = lambda f, z: -jnp.sum(jax.nn.log_softmax(f(z))[jnp.arange(2), y])
    g = jax.grad(lambda z: loss(attack_fn, z))(X01)
    g_ref = jax.grad(lambda z: loss(clf, z))(d(X01))
    np.testing.assert_allclose(np.asarray(g), np.asarray(g_ref), atol=1e-5, rtol=1e-5)
    x_adv = attacks.fgsm(attack_fn, X01, y, eps=0.03)
    assert float(jnp.abs(x_adv - X01).max()) == pytest.approx(0.03, abs=1e-6)
    assert eval_fn(x_adv).shape == (2, 10)

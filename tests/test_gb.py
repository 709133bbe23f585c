"""Granular-ball engine: oracle equality, properties, bad input, compilation."""

import contextlib
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gb_oracle import gb_oracle, same_partition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gbjax
from gbjax import _gb_cpu
from gbjax import _gb_engine as engine
from gbjax import gb as gbmod

# The two implementations of the partition (gb_cluster's ``engine``): every
# exactness test runs on both.
ENGINES = [
    "xla",
    pytest.param("numba", marks=pytest.mark.skipif(not _gb_cpu.available(), reason="no numba")),
]

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def blobs(seed, n=4, h=16, w=16, c=3, noise=6):
    """Structured test images: a few flat colour regions plus mild noise."""
    rng = np.random.default_rng(seed)
    out = np.empty((n, h, w, c), np.uint8)
    for i in range(n):
        img = np.zeros((h, w, c))
        img[:] = rng.integers(0, 256, c)
        for _ in range(rng.integers(2, 6)):
            r0, c0 = rng.integers(0, h - 2), rng.integers(0, w - 2)
            img[r0 : r0 + rng.integers(2, h), c0 : c0 + rng.integers(2, w)] = rng.integers(
                0, 256, c
            )
        img += rng.normal(0, noise, img.shape)
        out[i] = np.clip(np.round(img), 0, 255)
    return out


def features_np(img, features=None):
    features = features or gbjax.Features()
    return np.asarray(gbmod.image_features(jnp.asarray(img, jnp.float32), features))


@pytest.fixture(scope="module")
def cifar_images():
    data_dir = os.environ.get("GBJAX_DATA_DIR")
    if not data_dir:
        pytest.skip("GBJAX_DATA_DIR not set")
    from gbjax import data

    # GBJAX_DATA_DIR is set: a loader failure is a test failure, not a skip
    x, _ = data.load("cifar10", "test", data_dir=data_dir)
    return np.asarray(x[::997][:10])


@contextlib.contextmanager
def plan(multilevel):
    """Forces gb's multilevel plan (working-set levels, early-capacity stage) on or off."""
    old = gbmod._MULTILEVEL_MIN_PIXELS
    if multilevel is not None:
        gbmod._MULTILEVEL_MIN_PIXELS = 0 if multilevel else 1 << 62
    try:
        yield
    finally:
        gbmod._MULTILEVEL_MIN_PIXELS = old


def assert_matches_oracle(
    images, threshold, purity, capacity=256, multilevel=None, engine="xla", **kw
):
    with plan(multilevel):
        res = gbjax.gb_cluster(
            images, threshold=threshold, purity=purity, capacity=capacity, min_ball_size=1,
            engine=engine, **kw,
        )  # fmt: skip
    for i, img in enumerate(images):
        lab, n, sat = gb_oracle(
            features_np(img, kw.get("features") or gbjax.Features()),
            threshold,
            purity,
            capacity=capacity,
            kmeans_iters=kw.get("kmeans_iters", 20),
            max_rounds=kw.get("max_rounds"),
        )
        got = np.asarray(res.labels[i]).ravel()
        assert int(res.n_balls[i]) == n
        assert bool(res.saturated[i]) == sat
        np.testing.assert_array_equal(got, lab)  # ids are deterministic, not just the grouping
        assert same_partition(got, lab)


# ----------------------------------------------------------------------------- oracle
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("threshold,purity", [(40.0, 0.9), (20.0, 0.9), (10.0, 0.8), (30.0, 1.0)])
def test_matches_oracle_structured(threshold, purity, engine):
    assert_matches_oracle(blobs(0), threshold, purity, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    threshold=st.floats(5.0, 200.0),
    purity=st.floats(0.05, 1.0),
    multilevel=st.booleans(),
)
def test_matches_oracle_random_rgb(engine, seed, threshold, purity, multilevel):
    x = np.random.default_rng(seed).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    # small K: saturation is exercised
    assert_matches_oracle(x, threshold, purity, capacity=32, multilevel=multilevel, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    threshold=st.floats(2.0, 100.0),
    purity=st.floats(0.3, 1.0),
    multilevel=st.booleans(),
)
def test_matches_oracle_random_grey(engine, seed, threshold, purity, multilevel):
    x = np.random.default_rng(seed).integers(0, 256, (2, 6, 5, 1), dtype=np.uint8)
    assert_matches_oracle(x, threshold, purity, capacity=30, multilevel=multilevel, engine=engine)


@pytest.mark.parametrize("engine", ENGINES)
@SETTINGS
@given(
    seed=st.integers(0, 2**31 - 1),
    threshold=st.floats(3.0, 120.0),
    # each capacity and each round cap once (each pair is a program compiled for ~5 s)
    plan=st.sampled_from([(64, None), (72, 3)]),
)
def test_matches_oracle_through_capacity_stages(engine, seed, threshold, plan):
    capacity, max_rounds = plan
    # K >= 64 runs the first rounds with K / 8 slots per image and then K
    # (_gb_engine._early_capacities); 256 random pixels at small thresholds saturate K.
    # One flat image in the batch stops early while the two others go on.
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (3, 16, 16, 3), dtype=np.uint8)
    x[1] = rng.integers(0, 256, 3, dtype=np.uint8)
    assert gbjax._gb_engine._early_capacities(capacity)
    assert_matches_oracle(
        x, threshold, 0.9, capacity=capacity, max_rounds=max_rounds, multilevel=True,
        engine=engine,
    )  # fmt: skip


@pytest.mark.parametrize(
    "iters,multilevel,engine",
    # each iteration count and each XLA plan once (each pair compiles a program, 1.5-3 s)
    [(1, True, "xla"), (3, False, "xla")] + [(i, None, "numba") for i in (1, 3)],
)
def test_matches_oracle_truncated_kmeans(iters, multilevel, engine):
    if engine == "numba" and not _gb_cpu.available():
        pytest.skip("no numba")
    assert_matches_oracle(
        blobs(12), 15.0, 0.9, kmeans_iters=iters, multilevel=multilevel, engine=engine
    )


@pytest.mark.parametrize("engine", ENGINES)
def test_matches_oracle_spatial_features(engine):
    assert_matches_oracle(
        blobs(1, n=2), 25.0, 0.9, features=gbjax.Features(spatial=2.0), engine=engine
    )


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("threshold", [40.0, 20.0, 10.0])
def test_matches_oracle_cifar(cifar_images, threshold, engine):
    assert_matches_oracle(cifar_images, threshold, 0.9, multilevel=True, engine=engine)


@pytest.mark.parametrize("threshold", [40.0, 12.0])
def test_multilevel_plan_equals_flat(threshold):
    # The working-set levels and the early-capacity stage only move work
    # around: every output is bit-identical to the flat plan's. The shape and static
    # settings are those of test_multiscale_matches_independent_calls_structured, so
    # both tests run the same two compiled gb_cluster programs. (Noise painting, off
    # here, comes after the partition: the plan cannot change it.)
    x = blobs(5, n=8, h=20, w=20)
    rng = np.random.default_rng(5)
    x[:, 5:9, 5:9] = rng.integers(0, 256, (8, 4, 4, 3))  # busy patches: many small balls
    kw = dict(threshold=threshold, purity=0.9, capacity=64, min_ball_size=1, engine="xla")
    with plan(False):
        a = gbjax.gb_cluster(x, **kw)
    with plan(True):
        b = gbjax.gb_cluster(x, **kw)
    assert int(np.max(b.n_balls)) > 8  # beyond the early stage's 8 slots per image
    for name, u, v in zip(a._fields, a, b):
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v), err_msg=name)


# ----------------------------------------------------------------------------- properties
@pytest.fixture(scope="module")
def result():
    x = blobs(2, n=6)
    rng = np.random.default_rng(2)
    hit = rng.random(x.shape[:3]) < 0.03  # isolated impulses make tiny (noise) balls
    x[hit] = rng.choice([0, 255], size=(hit.sum(), 1))
    return x, gbjax.gb_cluster(x, threshold=20.0, purity=0.9, capacity=64, min_ball_size=3)


def test_partition_properties(result):
    x, r = result
    B, H, W, _ = x.shape
    labels = np.asarray(r.labels)
    counts = np.asarray(r.counts)
    assert labels.shape == (B, H, W) and labels.dtype == np.int32
    assert r.centers.shape == (B, 64, 3) and r.radii.shape == (B, 64)
    np.testing.assert_array_equal(counts.sum(1), H * W)
    for i in range(B):
        n = int(r.n_balls[i])
        assert labels[i].max() < n
        np.testing.assert_array_equal(np.bincount(labels[i].ravel(), minlength=64), counts[i])
        assert (counts[i, :n] > 0).all() and (counts[i, n:] == 0).all()


def test_centres_radii_within_are_member_statistics(result):
    x, r = result
    for i in range(x.shape[0]):
        f = features_np(x[i])
        lab = np.asarray(r.labels[i]).ravel()
        for k in range(int(r.n_balls[i])):
            m = f[lab == k].astype(np.float64)
            c = m.mean(0)
            d = np.sqrt(((m - c) ** 2).sum(1))
            np.testing.assert_allclose(r.centers[i, k], c, rtol=1e-5, atol=1e-4)
            np.testing.assert_allclose(r.radii[i, k], d.mean(), rtol=1e-4, atol=1e-3)
            np.testing.assert_allclose(r.within_fraction[i, k], (d < 20.0).mean(), atol=1e-6)


def test_centres_are_correctly_rounded_means(result):
    # Integer features: member sums and counts are exact in float32, so each
    # centre must be the float32 division sum / count exactly (no reciprocal).
    x, r = result
    for i in range(x.shape[0]):
        f = features_np(x[i])
        lab = np.asarray(r.labels[i]).ravel()
        n = int(r.n_balls[i])
        sums = np.stack([f[lab == k].sum(0, dtype=np.float64) for k in range(n)]).astype(np.float32)
        cnt = np.bincount(lab, minlength=n)[:n].astype(np.float32)
        np.testing.assert_array_equal(np.asarray(r.centers[i, :n]), sums / cnt[:, None])


@pytest.mark.parametrize("engine", ENGINES)
def test_near_tie_seed_matches_oracle(engine):
    # Seven CIFAR-10 pixels (test image 64 of the benchmark subset) whose two
    # farthest members from the mean tie to within 1e-6: 847 / 7 must be 121,
    # not 121.00001, for the 2-means seed to be the oracle's.
    px = np.array(
        [
            [114, 120, 170],
            [117, 126, 165],
            [122, 131, 160],
            [122, 126, 163],
            [122, 121, 161],
            [124, 118, 156],
            [126, 113, 159],
        ],
        np.uint8,
    )
    img = px.reshape(7, 1, 3)
    for rounds in (1, None):
        r = gbjax.gb_cluster(
            img, threshold=10.0, purity=0.9, min_ball_size=1, max_rounds=rounds, engine=engine
        )
        lab, n, _ = gb_oracle(px.astype(np.float32), 10.0, 0.9, max_rounds=rounds)
        np.testing.assert_array_equal(np.asarray(r.labels).ravel(), lab)
        assert int(r.n_balls) == n


def test_kept_balls_are_pure_or_unsplittable(result):
    x, r = result
    for i in range(x.shape[0]):
        if bool(r.saturated[i]):
            continue
        n = int(r.n_balls[i])
        wf, cnt = np.asarray(r.within_fraction[i, :n]), np.asarray(r.counts[i, :n])
        assert np.all((wf >= 0.9 - 1e-6) | (cnt < 2))


def test_noise_pixels_painted_with_nearest_kept_centre(result):
    x, r = result
    for i in range(x.shape[0]):
        f = features_np(x[i])
        lab = np.asarray(r.labels[i]).ravel()
        cnt = np.asarray(r.counts[i])
        kept = np.flatnonzero(cnt >= 3)
        noise = np.asarray(r.noise[i]).ravel()
        np.testing.assert_array_equal(noise, cnt[lab] < 3)
        img = np.asarray(r.image[i]).reshape(-1, 3)
        cen = np.asarray(r.centers[i])
        for p in range(len(lab)):
            if noise[p]:
                d = ((cen[kept] - f[p]) ** 2).sum(1)
                ok = kept[d <= d.min() * (1 + 1e-5) + 1e-3]  # ties within rounding
                assert any(np.array_equal(img[p], np.clip(np.round(cen[k]), 0, 255)) for k in ok)
            else:
                np.testing.assert_array_equal(img[p], np.clip(np.round(cen[lab[p]]), 0, 255))
    assert np.asarray(r.noise).any(), "fixture should contain noise pixels"


@pytest.mark.parametrize("n_noise", [1, 20, 200, 2000])
def test_nearest_kept_every_compaction_path(n_noise):
    # 1 and 20 noise pixels fit the batch-wide buffers (M/1024 = 4, M/64 = 64),
    # 200 the per-image ones (N/8 = 128 per image), 2000 none: all four paths
    # must agree with a brute-force search.
    B, N, K, F = 4, 1024, 16, 3
    rng = np.random.default_rng(n_noise)
    x = rng.integers(0, 256, (B, N, F)).astype(np.float32)
    c = rng.integers(0, 256, (B, K, F)).astype(np.float32)
    kept = rng.random((B, K)) < 0.6
    kept[:, 0] = True
    noise = np.zeros(B * N, bool)
    noise[rng.choice(B * N, n_noise, replace=False)] = True
    noise = noise.reshape(B, N)
    # a near tie (issue 28): exact squared distances 401.63904 and 401.63644 from
    # a pixel to two centres (member means), which |c|^2 - 2 x.c inverts
    b0, i0 = np.argwhere(noise)[0]
    x[b0, i0] = [204, 225, 36]
    c[b0, :2] = [np.array(s, np.float32) / np.float32(n) for s, n in
                 (([2422, 2834, 234], 12), ([6127, 6323, 1385], 28))]  # fmt: skip
    c[b0, 2:] += 300.0  # every other centre far away
    kept[b0, :2] = True
    got = np.asarray(jax.jit(engine._nearest_kept)(x, c, kept, noise))
    e = x[:, :, None, :] - c[:, None, :, :]  # exact differences, summed left to right
    d = (e[..., 0] * e[..., 0] + e[..., 1] * e[..., 1]) + e[..., 2] * e[..., 2]
    d = np.where(kept[:, None, :], d, np.inf)
    assert got[b0, i0] == 1
    for b, i in zip(*np.nonzero(noise)):
        # the exact nearest, lowest id on ties: the same on every path
        assert got[b, i] == np.argmin(d[b, i])


def test_alone_equals_in_batch_and_deterministic():
    x = blobs(3, n=5)
    batch = gbjax.gb_cluster(x, threshold=15.0)
    again = gbjax.gb_cluster(x, threshold=15.0)
    for a, b in zip(jax.tree_util.tree_leaves(batch), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(a, b)
    alone = gbjax.gb_cluster(x[3], threshold=15.0)
    assert alone.labels.shape == x.shape[1:3] and alone.n_balls.shape == ()
    for a, b in zip(jax.tree_util.tree_leaves(alone), jax.tree_util.tree_leaves(batch)):
        np.testing.assert_array_equal(a, np.asarray(b)[3])


def test_chunked_equals_whole():
    x = blobs(4, n=7)
    whole = gbjax.gb_cluster(x, threshold=20.0)
    chunked = gbjax.gb_cluster(x, threshold=20.0, chunk_size=3, progress=True)
    for a, b in zip(jax.tree_util.tree_leaves(whole), jax.tree_util.tree_leaves(chunked)):
        if np.issubdtype(a.dtype, np.floating):  # reductions may reorder with the batch size
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(a, b)


def test_saturation_flag_and_capacity():
    x = np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    r = gbjax.gb_cluster(x, threshold=10.0, capacity=5)
    assert np.asarray(r.saturated).all() and (np.asarray(r.n_balls) == 5).all()
    r = gbjax.gb_cluster(np.full((4, 4, 3), 7, np.uint8), threshold=10.0, capacity=1)
    assert not bool(r.saturated) and int(r.n_balls) == 1


def test_max_rounds_caps_the_rounds():
    x = blobs(5, n=2)
    r = gbjax.gb_cluster(x, threshold=5.0, max_rounds=2)
    assert (np.asarray(r.rounds) <= 2).all() and (np.asarray(r.n_balls) <= 4).all()


def test_dtypes_and_scale():
    x = blobs(6, n=2)
    r8 = gbjax.gb_cluster(x, threshold=20.0)
    assert r8.image.dtype == np.uint8 and r8.image.shape == x.shape
    rf = gbjax.gb_cluster(x.astype(np.float32) / 255.0, threshold=20.0, scale=255.0)
    assert rf.image.dtype == np.float32
    assert same_partition(r8.labels, rf.labels)
    np.testing.assert_allclose(rf.image * 255.0, np.asarray(r8.image, np.float32), atol=0.5 + 1e-3)
    den = gbjax.gb_denoise(x, threshold=20.0)
    np.testing.assert_array_equal(den, r8.image)
    g = gbjax.gb_cluster(x[..., :1], threshold=20.0)
    assert g.image.shape == x[..., :1].shape and g.centers.shape[-1] == 1


def test_multiscale_coarse_to_fine():
    x = blobs(7, n=3)
    ms = gbjax.gb_multiscale(x, thresholds=(40, 20, 10))
    assert ms.image.shape == (3,) + x.shape
    n = np.asarray(ms.n_balls)
    assert (n[0] <= n[1]).all() and (n[1] <= n[2]).all()
    # the same partition as gb_cluster; ids below the coarsest scale are numbered differently
    np.testing.assert_array_equal(ms.labels[0], gbjax.gb_cluster(x, threshold=40).labels)
    r20 = gbjax.gb_cluster(x, threshold=20)
    for i in range(len(x)):
        assert same_partition(ms.labels[1, i], r20.labels[i])
    np.testing.assert_array_equal(ms.image[1], r20.image)


def assert_multiscale_matches(
    images, thresholds, capacity=256, multilevel=None, oracle=True, engine="xla"
):
    """gb_multiscale against independent gb_cluster calls and the oracle, scale by scale.

    Where neither run saturates: the same partition, ball count, painted image
    and per-ball statistics (matched through the partition); at the largest
    threshold the same ids. Always: ids follow the documented numbering (every
    ball keeps the id of the ball containing it at the next larger threshold,
    or takes a new id from the previous ball count on), so each scale refines
    the one above. Returns the number of (image, threshold) pairs compared.
    """
    kw = dict(purity=0.9, capacity=capacity, min_ball_size=1, engine=engine)
    with plan(multilevel):
        ms = gbjax.gb_multiscale(images, thresholds=thresholds, **kw)
        singles = [gbjax.gb_cluster(images, threshold=t, **kw) for t in thresholds]
    assert ms.labels.shape == (len(thresholds),) + images.shape[:3]
    order = np.argsort([-t for t in thresholds], kind="stable")
    compared = 0
    for i, img in enumerate(images):
        prev = None
        for j in order:
            t, r = thresholds[j], singles[j]
            lab = np.asarray(ms.labels[j, i]).ravel()
            n = int(ms.n_balls[j, i])
            assert lab.max() < n and len(np.unique(lab)) == n
            if prev is None:
                np.testing.assert_array_equal(lab, np.asarray(r.labels[i]).ravel())
            else:
                plab, pn = prev
                for k in np.unique(lab):  # refinement, and the numbering
                    parents = np.unique(plab[lab == k])
                    assert len(parents) == 1
                    assert k >= pn or parents[0] == k
                assert set(range(pn)) <= set(lab.tolist())  # every previous id survives
            prev = (lab, n)
            sat = bool(ms.saturated[j, i]) or bool(r.saturated[i])
            if sat:
                continue
            compared += 1
            ref = np.asarray(r.labels[i]).ravel()
            assert same_partition(lab, ref) and n == int(r.n_balls[i])
            np.testing.assert_array_equal(ms.image[j, i], r.image[i])
            np.testing.assert_array_equal(ms.noise[j, i], r.noise[i])
            # per-ball statistics, matched through the partition
            # (counts and centres exactly; radii and within fractions are sums of
            # non-integers, which the two programs may round differently)
            perm = np.zeros(n, np.int64)
            perm[lab] = ref
            for f in ("counts", "centers", "radii", "within_fraction"):
                a, b = np.asarray(getattr(ms, f)[j, i])[:n], np.asarray(getattr(r, f)[i])[perm]
                if f in ("counts", "centers"):
                    np.testing.assert_array_equal(a, b, err_msg=f)
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6, err_msg=f)
            if oracle:
                o_lab, o_n, o_sat = gb_oracle(features_np(img), t, 0.9, capacity=capacity)
                assert not o_sat and o_n == n and same_partition(lab, o_lab)
    return compared


# the XLA program with and without its multilevel plan, and the CPU kernel
PLANS = [(False, "xla"), (True, "xla")] + [
    pytest.param(
        None, "numba", marks=pytest.mark.skipif(not _gb_cpu.available(), reason="no numba")
    )
]


@pytest.mark.parametrize("thresholds", [(40.0, 20.0, 10.0), (12.0, 35.0, 20.0), (25.0, 8.0, 25.0)])
@pytest.mark.parametrize("multilevel,engine", PLANS)
def test_multiscale_matches_independent_calls_structured(thresholds, multilevel, engine):
    x = blobs(13, n=8, h=20, w=20)
    rng = np.random.default_rng(13)
    x[:, 5:9, 5:9] = rng.integers(0, 256, (8, 4, 4, 3))  # busy patches: many small balls
    n = assert_multiscale_matches(x, thresholds, capacity=64, multilevel=multilevel, engine=engine)
    assert n >= 20


@settings(SETTINGS, max_examples=15)
@given(
    seed=st.integers(0, 2**31 - 1),
    thresholds=st.lists(st.floats(4.0, 150.0), min_size=3, max_size=3),
    multilevel=st.booleans(),
)
def test_multiscale_matches_independent_calls_random(seed, thresholds, multilevel):
    # capacity 32 on 64 random pixels: some scales saturate (those are skipped,
    # but the numbering and refinement still hold there)
    x = np.random.default_rng(seed).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    assert_multiscale_matches(x, tuple(thresholds), capacity=32, multilevel=multilevel)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("thresholds", [(40.0, 20.0, 10.0), (30.0, 15.0, 7.0)])
def test_multiscale_matches_independent_calls_cifar(cifar_images, thresholds, engine):
    n = assert_multiscale_matches(cifar_images, thresholds, multilevel=True, engine=engine)
    assert n >= 2 * len(cifar_images)


def test_multiscale_saturation_carries_to_finer_scales():
    # A ball left impure by the capacity at one threshold is impure at every
    # smaller one, and it is still open there: the finer scales saturate too.
    x = np.random.default_rng(3).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
    ms = gbjax.gb_multiscale(x, thresholds=(10.0, 60.0, 5.0), capacity=32)
    sat = np.asarray(ms.saturated)
    assert not sat[1].any() and sat[0].all() and sat[2].all()
    assert (np.asarray(ms.n_balls)[[0, 2]] == 32).all()


def test_multiscale_unbatched_auto_capacity_and_one_compilation():
    rng = np.random.default_rng(4)
    x = rng.integers(0, 256, (2, 20, 20, 3)).astype(np.uint8)
    x[1] = x[1, :1, :1]  # flat: never saturates
    ths = (30.0, 6.0)
    ms = gbjax.gb_multiscale(x, thresholds=ths, capacity="auto", max_capacity=1024)
    assert not np.asarray(ms.saturated).any() and ms.centers.shape[:3] == (2, 2, 512)
    for j, t in enumerate(ths):
        r = gbjax.gb_cluster(x, threshold=t, capacity="auto", max_capacity=1024)
        for i in range(2):
            assert same_partition(ms.labels[j, i], r.labels[i])
        np.testing.assert_array_equal(ms.image[j], r.image)
    one = gbjax.gb_multiscale(x[0], thresholds=(6.0, 30.0), capacity=512)  # caller's order
    assert one.image.shape == (2,) + x.shape[1:] and one.n_balls.shape == (2,)
    np.testing.assert_array_equal(one.labels[1], ms.labels[0, 0])  # largest threshold: same ids
    np.testing.assert_array_equal(one.image[0], ms.image[1, 0])
    n0 = engine.multiscale_batch._cache_size()
    gbjax.gb_multiscale(x[0], thresholds=(9.0, 33.0), capacity=512)  # traced thresholds
    assert engine.multiscale_batch._cache_size() == n0


def test_multiscale_inside_jit_and_grad():
    x = blobs(14, n=2).astype(np.float32) / 255.0

    def loss(z):
        ms = gbjax.gb_multiscale(z, thresholds=(40.0, 20.0), scale=255.0, min_ball_size=1)
        return jnp.sum(ms.image[1] ** 2)

    g = jax.jit(jax.grad(loss))(jnp.asarray(x))
    r = gbjax.gb_cluster(x, threshold=20.0, scale=255.0, min_ball_size=1)
    np.testing.assert_allclose(g, 2 * np.asarray(r.image), rtol=1e-4, atol=1e-5)


def test_texture_feature_shapes():
    x = blobs(8, n=2)
    f = gbjax.Features(spatial=0.5, texture=2.0, texture_window=3)
    r = gbjax.gb_cluster(x, threshold=20.0, features=f)
    assert r.centers.shape[-1] == 6 and r.image.shape == x.shape
    tex = features_np(x[0], f)[:, 5].reshape(16, 16)
    grey = x[0].astype(np.float64).mean(-1)
    pad = np.pad(grey, 1, mode="edge")
    ref = np.array([[pad[i : i + 3, j : j + 3].std() for j in range(16)] for i in range(16)])
    np.testing.assert_allclose(tex, 2.0 * ref, rtol=1e-3, atol=1e-2)


def test_painted_image_is_differentiable_with_fixed_partition():
    x = blobs(9, n=2).astype(np.float32) / 255.0

    def loss(z):
        return jnp.sum(gbjax.gb_denoise(z, threshold=20.0, scale=255.0) ** 2)

    g = jax.jit(jax.grad(loss))(jnp.asarray(x))
    assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0
    # d/dx of sum_p c[l_p]^2 = 2 c[l_p] (each member gets 2*centre, summed over members / count)
    r = gbjax.gb_cluster(x, threshold=20.0, scale=255.0, min_ball_size=1)
    g1 = jax.grad(
        lambda z: jnp.sum(gbjax.gb_denoise(z, threshold=20.0, scale=255.0, min_ball_size=1) ** 2)
    )(jnp.asarray(x))
    np.testing.assert_allclose(g1, 2 * np.asarray(r.image), rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- compilation
def test_compiles_once_per_shape_and_static_params():
    x = blobs(10, n=3)
    gbjax.gb_cluster(x, threshold=20.0)
    n0 = engine.cluster_batch._cache_size()
    for t, p in [(10.0, 0.8), (33.0, 0.95), (40.0, 1.0)]:
        gbjax.gb_cluster(x, threshold=t, purity=p)
    assert engine.cluster_batch._cache_size() == n0


def _count_eqns(jaxpr):
    """Equations in a jaxpr, sub-jaxprs (loop bodies, branches, pjit) included."""
    n = 0
    for eqn in jaxpr.eqns:
        n += 1
        for v in eqn.params.values():
            for sub in v if isinstance(v, (tuple, list)) else (v,):
                if hasattr(sub, "jaxpr") and hasattr(sub, "consts"):  # ClosedJaxpr
                    n += _count_eqns(sub.jaxpr)
                elif hasattr(sub, "eqns"):  # Jaxpr
                    n += _count_eqns(sub)
    return n


def test_jaxpr_has_no_per_image_or_per_ball_unrolling():
    def n_eqns(B, H, W, K, multilevel=True):
        x = jnp.zeros((B, H, W, 3), jnp.uint8)
        jaxpr = jax.make_jaxpr(
            lambda z: engine.cluster_batch(
                z,
                20.0,
                0.9,
                1.0,
                K=K,
                max_rounds=K,
                kmeans_iters=20,
                min_ball_size=2,
                features=gbjax.Features(),
                out_dtype=np.dtype(np.uint8),
                multilevel=multilevel,
            )
        )(x)
        assert "while" in str(jaxpr)
        return _count_eqns(jaxpr.jaxpr)

    # The program has loops per working-set level (pixel buffers of M, M/8,
    # ..., see _gb_engine._level_sizes), log-depth prefix sums (associative
    # scans) and static branches that drop levels too small to pay, so its size
    # moves a little with the number of pixels M = B * H * W, but it must not grow
    # with the number of images or balls: unrolling over either would multiply
    # it by 64 here.
    for ml in (True, False):
        base = n_eqns(8, 8, 8, 64, ml)
        assert n_eqns(512, 8, 8, 64, ml) < 1.5 * base  # 64x the images
        assert n_eqns(8, 8, 8, 1024, ml) < 1.5 * base  # 16x the balls
        assert n_eqns(4, 8, 16, 128, ml) < 1.5 * base
    assert n_eqns(8, 8, 8, 64, False) < n_eqns(8, 8, 8, 64)
    assert len(engine._level_sizes(10_000 * 1024)) <= 12


@pytest.mark.slow
def test_sharded_over_four_cpu_devices_matches_single_device(tmp_path):
    x = blobs(11, n=6)
    np.save(tmp_path / "x.npy", x)
    ref = gbjax.gb_cluster(x, threshold=20.0)
    np.save(tmp_path / "ref.npy", np.asarray(ref.labels))
    script = textwrap.dedent(f"""
        import jax, numpy as np, gbjax
        assert jax.device_count() == 4, jax.devices()
        x = np.load({str(tmp_path / "x.npy")!r})
        r = gbjax.gb_cluster(x, threshold=20.0)
        assert len(r.labels.sharding.device_set) == 4, r.labels.sharding
        np.testing.assert_array_equal(r.labels, np.load({str(tmp_path / "ref.npy")!r}))
        print("SHARDED_OK")
    """)
    env = dict(
        os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    assert "SHARDED_OK" in out.stdout, out.stderr[-3000:]


# ----------------------------------------------------------------------------- bad input
GOOD = np.zeros((4, 4, 3), np.uint8)


@pytest.mark.parametrize(
    "images,kwargs,match",
    [
        (np.zeros((4, 4), np.uint8), {}, "images: expected shape"),
        (np.zeros((1, 1, 4, 4, 3), np.uint8), {}, "images: expected shape"),
        (np.zeros((4, 4, 2), np.uint8), {}, "1 or 3 channels"),
        (np.zeros((0, 4, 3), np.uint8), {}, "empty"),
        (np.zeros((0, 4, 4, 3), np.uint8), {}, "empty"),
        (np.full((4, 4, 3), np.nan, np.float32), {}, "NaN or inf"),
        (np.full((4, 4, 3), np.inf, np.float32), {}, "NaN or inf"),
        (np.full((4, 4, 3), -1.0, np.float32), {}, ">= 0"),
        (np.full((4, 4, 3), 300.0, np.float32), {}, "0..255"),
        (np.full((4, 4, 3), 0.5, np.float32), {}, "scale=255"),
        (np.zeros((4, 4, 3), bool), {}, "dtype"),
        (GOOD, {"threshold": 0.0}, "threshold"),
        (GOOD, {"threshold": -3.0}, "threshold"),
        (GOOD, {"threshold": float("nan")}, "threshold"),
        (GOOD, {"purity": 0.0}, "purity"),
        (GOOD, {"purity": 1.5}, "purity"),
        (GOOD, {"capacity": 0}, "capacity"),
        (GOOD, {"capacity": 2.5}, "capacity"),
        (GOOD, {"min_ball_size": 0}, "min_ball_size"),
        (GOOD, {"max_rounds": 0}, "max_rounds"),
        (GOOD, {"kmeans_iters": 0}, "kmeans_iters"),
        (GOOD, {"features": "rgb"}, "features"),
        (GOOD, {"scale": 255.0}, "scale"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(images, kwargs, match):
    with pytest.raises(ValueError, match=match):
        gbjax.gb_cluster(images, **kwargs)


# ----------------------------------------------------------------------------- edge cases (#26)


@pytest.mark.parametrize(
    "convert",
    [
        lambda a: a.astype(np.int64),
        lambda a: a.astype(np.uint32),
        lambda a: a.astype(np.uint64),
        lambda a: a.astype(np.int64).tolist(),
        lambda a: jnp.asarray(a, jnp.uint32),
    ],
    ids=["int64", "uint32", "uint64", "list", "jax-uint32"],
)
def test_every_integer_dtype_and_array_like_is_accepted(convert):
    x = blobs(3, n=1, h=6, w=6)[0]
    want = gbjax.gb_denoise(x, threshold=20.0, capacity=16)
    got = gbjax.gb_denoise(convert(x), threshold=20.0, capacity=16)
    assert got.dtype == np.uint8  # wider than int32: converted to uint8, values 0..255
    np.testing.assert_array_equal(got, want)


def test_wide_integer_images_outside_0_255_are_refused():
    for bad, match in ((-1, ">= 0"), (256, "0..255"), (2**40, "0..255")):
        x = np.zeros((4, 4, 3), np.int64)
        x[0, 0, 0] = bad
        with pytest.raises(ValueError, match=match):
            gbjax.gb_cluster(x)


def test_wide_integer_images_traced_run_under_jit():
    x = blobs(4, n=1, h=6, w=6)
    want = gbjax.gb_denoise(x, threshold=20.0, capacity=16)
    got = jax.jit(lambda v: gbjax.gb_denoise(v, threshold=20.0, capacity=16))(
        jnp.asarray(x, jnp.uint32)
    )
    np.testing.assert_array_equal(got, want)


def test_float_images_just_above_1_without_scale_are_refused():
    x = np.linspace(0.0, 1.5, 48, dtype=np.float32).reshape(4, 4, 3)
    with pytest.raises(ValueError, match=r"\[0, 1\].*scale=255.*scale=1.0"):
        gbjax.gb_cluster(x)
    # an explicit scale says which units they are in
    assert gbjax.gb_cluster(x, scale=1.0, capacity=8).image.dtype == np.float32
    assert gbjax.gb_cluster(x / 1.5, scale=255.0, capacity=8).image.dtype == np.float32
    # pixel units 0..255 as floats still need no scale
    assert gbjax.gb_cluster(x * 100.0, capacity=8).image.dtype == np.float32


def test_an_image_over_the_memory_budget_is_refused_before_allocating():
    h, w = 3000, 4000  # a 12-megapixel photo: about 12.7 GiB of working set
    need = gbjax.memory_estimate(1, h, w)
    assert need > 2 << 30
    # a broadcast view: no 36 MB array, and nothing may be allocated for the program
    x = np.broadcast_to(np.zeros((1, 1, 3), np.uint8), (h, w, 3))
    with pytest.raises(ValueError, match=r"12\.70 GiB.*memory_budget.*Downscale"):
        gbjax.gb_cluster(x)
    small = blobs(5, n=2, h=8, w=8)
    per = gbjax.memory_estimate(1, 8, 8, capacity=16)
    with pytest.raises(ValueError, match="memory_budget"):
        gbjax.gb_denoise(small, capacity=16, memory_budget=per - 1)
    with pytest.raises(ValueError, match="memory_budget"):
        gbjax.gb_multiscale(small, capacity=16, memory_budget=per - 1)
    with pytest.raises(ValueError, match="memory_budget"):
        gbjax.gb_cluster(small, capacity=16, chunk_size=1, memory_budget=per - 1)
    with pytest.raises(ValueError, match="memory_budget: expected"):
        gbjax.gb_cluster(small, capacity=16, memory_budget=0)
    assert gbjax.gb_denoise(small, capacity=16, memory_budget=per).shape == small.shape


def test_gb_multiscale_accepts_a_scalar_threshold():
    x = blobs(6, n=2, h=8, w=8)
    ms = gbjax.gb_multiscale(x, thresholds=20, capacity=32)
    assert ms.image.shape == (1,) + x.shape
    one = gbjax.gb_cluster(x, threshold=20.0, capacity=32)
    np.testing.assert_array_equal(ms.labels[0], one.labels)
    np.testing.assert_array_equal(ms.image[0], one.image)
    assert gbjax.gb_multiscale(x[0], thresholds=np.float32(20.0), capacity=32).image.shape == (
        (1,) + x.shape[1:]
    )
    with pytest.raises(ValueError, match="thresholds"):
        gbjax.gb_multiscale(x, thresholds="20")


def test_bad_features():
    with pytest.raises(ValueError, match="features.color"):
        gbjax.Features(color=0.0)
    with pytest.raises(ValueError, match="texture_window"):
        gbjax.Features(texture=1.0, texture_window=2)
    with pytest.raises(ValueError, match="thresholds"):
        gbjax.gb_multiscale(GOOD, thresholds=())


def test_capacity_auto_reruns_only_saturated_images_with_more_slots():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (3, 20, 20, 3)).astype(np.uint8)
    x[1] = x[1, :1, :1]  # a flat image: never saturates
    base = gbjax.gb_cluster(x, threshold=6.0, purity=0.9, capacity=256)
    assert bool(base.saturated[0]) and not bool(base.saturated[1])
    res = gbjax.gb_cluster(x, threshold=6.0, purity=0.9, capacity="auto", max_capacity=1024)
    # 400 pixels fit 512 slots: the largest capacity used is 512, not max_capacity
    assert not np.asarray(res.saturated).any() and res.centers.shape[1] == 512
    big = gbjax.gb_cluster(x[[0, 2]], threshold=6.0, purity=0.9, capacity=1024)
    np.testing.assert_array_equal(res.labels[np.array([0, 2])], big.labels)
    np.testing.assert_array_equal(res.image[1], base.image[1])  # untouched
    np.testing.assert_array_equal(res.counts[1, :256], base.counts[1])
    assert int(res.counts[1, 256:].sum()) == 0
    capped = gbjax.gb_cluster(x, threshold=6.0, purity=0.9, capacity="auto", max_capacity=300)
    assert capped.centers.shape[1] == 300 and bool(capped.saturated[0])
    with pytest.raises(ValueError, match="concrete"):
        jax.jit(lambda v: gbjax.gb_cluster(v, threshold=6.0, capacity="auto", scale=255.0))(
            x.astype(np.float32) / 255
        )


def _benchmark_module():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "gb_throughput.py")
    spec = importlib.util.spec_from_file_location("gb_throughput", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_lean_reference_matches_oracle(request):
    # The benchmark's lean per-image reference is the speed anchor: it must be
    # the same algorithm, so the same partitions, ids and flags as the oracle.
    lean = _benchmark_module().lean_reference_cluster
    rng = np.random.default_rng(21)
    sets = [(blobs(21, n=3), 256), (rng.integers(0, 256, (3, 9, 9, 3), dtype=np.uint8), 24)]
    if os.environ.get("GBJAX_DATA_DIR"):
        sets.append((request.getfixturevalue("cifar_images")[:4], 256))
    for images, capacity in sets:
        for t in (40.0, 20.0, 10.0):
            for img in images:
                got = lean(img, t, 0.9, capacity=capacity)
                lab, n, sat = gb_oracle(features_np(img), t, 0.9, capacity=capacity)
                np.testing.assert_array_equal(got[0], lab)
                assert got[1:] == (n, sat)


@pytest.mark.skipif(not _gb_cpu.available(), reason="no numba")
def test_benchmark_compiled_loop_reference_matches_oracle():
    # The compiled-loop (numba) reference of benchmarks/gb_throughput.py is the
    # speed anchor of issue 28: the same partitions, ids and flags as the oracle.
    ref = _benchmark_module().numba_reference_cluster
    rng = np.random.default_rng(22)
    for images, capacity in ((blobs(22, n=2), 256), (rng.integers(0, 256, (2, 9, 9, 3)), 24)):
        for t in (40.0, 20.0, 10.0):
            for img in images.astype(np.uint8):
                lab, n, sat = gb_oracle(features_np(img), t, 0.9, capacity=capacity)
                got = ref(img, t, 0.9, capacity=capacity)
                np.testing.assert_array_equal(got[0], lab)
                assert got[1:] == (n, sat)

"""GBParams (issue 27, item 3): the GB parameters as one frozen, validated, hashable
value, taken by gb_cluster, gb_multiscale, defences.GB and data.gb_processed."""

import dataclasses

import jax
import numpy as np
import pytest

import gbjax
from gbjax import GBParams, data, defences
from gbjax.data._entries import gb_key


def blobs(seed, n=2, h=8, w=8):
    rng = np.random.default_rng(seed)
    x = np.zeros((n, h, w, 3), np.uint8)
    x[:, : h // 2] = rng.integers(0, 256, (n, 1, 1, 3))
    x[:, h // 2 :] = rng.integers(0, 256, (n, 1, 1, 3))
    return np.clip(x + rng.integers(-6, 7, x.shape), 0, 255).astype(np.uint8)


KW = dict(threshold=15.0, purity=0.8, capacity=16, min_ball_size=3, kmeans_iters=5)


def test_params_are_frozen_hashable_values():
    p = GBParams(**KW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.threshold = 1.0
    assert hash(p) == hash(GBParams(**KW)) and p == GBParams(**KW)
    assert {p: 1}[GBParams(**KW)] == 1
    assert p != GBParams(**dict(KW, threshold=16.0))
    # normalised: equal parameters are equal values however they are spelt
    assert GBParams(threshold=20) == GBParams(threshold=np.float32(20.0)) == GBParams()
    assert isinstance(GBParams(threshold=20).threshold, float)
    spatial = GBParams(features={"spatial": 0.5})
    assert spatial == GBParams(features=gbjax.Features(spatial=0.5))
    assert hash(spatial) == hash(GBParams(features=gbjax.Features(spatial=0.5)))
    assert GBParams(features=None).features == gbjax.Features()
    assert dataclasses.replace(p, threshold=10.0).threshold == 10.0
    assert gbjax.gb.GBParams is GBParams


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"threshold": 0.0}, "threshold: expected a finite number > 0 (pixel units), got 0.0"),
        ({"threshold": float("nan")}, "threshold: expected a finite number > 0"),
        ({"purity": 0.0}, "purity: expected a number in (0, 1], got 0.0"),
        ({"purity": 1.5}, "purity: expected a number in (0, 1], got 1.5"),
        ({"capacity": 0}, "capacity: expected an int >= 1, got 0"),
        ({"capacity": 2.5}, "capacity: expected an int >= 1, got 2.5"),
        ({"min_ball_size": 0}, "min_ball_size: expected an int >= 1, got 0"),
        ({"max_rounds": 0}, "max_rounds: expected an int >= 1, got 0"),
        ({"kmeans_iters": 0}, "kmeans_iters: expected an int >= 1, got 0"),
        ({"max_capacity": 0}, "max_capacity: expected an int >= 1, got 0"),
        ({"features": "rgb"}, "features: expected a gbjax.Features, a dict or None, got 'rgb'"),
    ],
)
def test_invalid_values_are_refused_with_gb_clusters_messages(kwargs, message):
    with pytest.raises(ValueError) as params_error:
        GBParams(**kwargs)
    assert str(params_error.value).startswith(message)
    with pytest.raises(ValueError) as cluster_error:
        gbjax.gb_cluster(np.zeros((4, 4, 3), np.uint8), **kwargs)
    assert str(cluster_error.value) == str(params_error.value)
    with pytest.raises(ValueError, match=str(params_error.value)[:10]):
        defences.GB(**kwargs)


def test_gb_cluster_with_params_equals_the_keywords_exactly():
    x = blobs(0)
    want = gbjax.gb_cluster(x, **KW)
    got = gbjax.gb_cluster(x, GBParams(**KW))
    for a, b, name in zip(got, want, want._fields):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
        assert a.dtype == b.dtype and a.shape == b.shape, name
    np.testing.assert_array_equal(gbjax.gb_denoise(x, GBParams(**KW)), want.image)
    # under jit too (traced images), and with the execution keywords beside params
    with_params = jax.jit(lambda v: gbjax.gb_denoise(v, GBParams(**KW), scale=255.0))
    with_keywords = jax.jit(lambda v: gbjax.gb_denoise(v, scale=255.0, **KW))
    x01 = x.astype(np.float32) / 255.0
    np.testing.assert_array_equal(with_params(x01), with_keywords(x01))
    got = gbjax.gb_cluster(x, GBParams(**KW), chunk_size=1, engine="xla")
    np.testing.assert_array_equal(got.labels, want.labels)


def test_gb_multiscale_with_params_equals_the_keywords():
    x = blobs(1)
    kw = {k: v for k, v in KW.items() if k != "threshold"}  # the thresholds replace it
    want = gbjax.gb_multiscale(x, (30.0, 10.0), **kw)
    got = gbjax.gb_multiscale(x, (30.0, 10.0), GBParams(**dict(KW, threshold=99.0)))
    for a, b, name in zip(got, want, want._fields):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
    with pytest.raises(ValueError, match="threshold: use thresholds"):
        gbjax.gb_multiscale(x, (30.0,), threshold=20.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        gbjax.gb_multiscale(x, (30.0,), thresold=20.0)


@pytest.mark.parametrize("name", ["threshold", "purity", "capacity", "features"])
def test_params_and_a_keyword_together_are_refused(name, tmp_path):
    x = np.zeros((1, 4, 4, 3), np.uint8)
    value = {"features": {"spatial": 1.0}, "capacity": 8}.get(name, 0.5)
    match = f"{name}: given both in params and as a keyword"
    calls = [
        lambda: gbjax.gb_cluster(x, GBParams(), **{name: value}),
        lambda: gbjax.gb_denoise(x, GBParams(), **{name: value}),
        lambda: defences.GB(GBParams(), **{name: value}),
        lambda: data.gb_processed(x, GBParams(), cache_dir=tmp_path, **{name: value}),
    ]
    if name != "threshold":  # gb_multiscale takes thresholds instead
        calls.append(lambda: gbjax.gb_multiscale(x, (20.0,), GBParams(), **{name: value}))
    for call in calls:
        with pytest.raises(ValueError, match=match):
            call()
    with pytest.raises(ValueError, match="params: expected a gbjax.GBParams or None"):
        gbjax.gb_cluster(x, {"threshold": 20.0})


def test_defence_gb_holds_params_and_reads_them_as_attributes():
    g = defences.GB(threshold=20, capacity=32)
    assert g.params == GBParams(threshold=20.0, capacity=32)
    assert (g.threshold, g.purity, g.capacity, g.min_ball_size) == (20.0, 0.9, 32, 2)
    assert g.quantize is True and g.features == gbjax.Features()
    assert g == defences.GB(GBParams(threshold=20.0, capacity=32))
    assert hash(g) == hash(defences.GB(GBParams(threshold=20.0, capacity=32)))
    assert g != defences.GB(threshold=20.0, capacity=32, quantize=False)
    assert dataclasses.replace(g, quantize=False).quantize is False
    with pytest.raises(dataclasses.FrozenInstanceError):
        g.params = GBParams()
    x = blobs(2).astype(np.float32) / 255.0
    want = gbjax.gb_denoise(x, threshold=20.0, capacity=32, scale=255.0)
    np.testing.assert_array_equal(defences.GB(threshold=20.0, capacity=32, quantize=False)(x), want)
    np.testing.assert_array_equal(g.cluster(x).labels, gbjax.gb_cluster(x * 255.0, g.params).labels)


def test_gb_processed_takes_params_and_shares_the_keywords_entry(monkeypatch, tmp_path):
    x = blobs(3)
    out = data.gb_processed(x, GBParams(**KW), cache_dir=tmp_path, progress=False)
    np.testing.assert_array_equal(out, gbjax.gb_denoise(x, **KW))
    assert len(list(tmp_path.glob("gb_*.npz"))) == 1
    monkeypatch.setattr(gbjax.gb, "gb_denoise", lambda *a, **k: pytest.fail("not cached"))
    # the same parameters, spelt as keywords, with int numbers or with execution knobs
    for kw in (KW, dict(KW, threshold=15), dict(KW, engine="xla", chunk_size=1)):
        np.testing.assert_array_equal(
            data.gb_processed(x, cache_dir=tmp_path, progress=False, **kw), out
        )


# Keys of gb_processed entries before GBParams (computed with the keyword-keyed
# gb_key of gbjax 0.2.0 on the image below): still found for the same spelling.
OLD_KEYS = [
    ({"threshold": 20.0, "purity": 0.9}, "5a43b16afb5828480260209b2b7e0a13"),
    ({"threshold": 20.0, "purity": 0.9, "capacity": 32}, "534f83f1a603249e47ff9446ebf81220"),
    ({"threshold": 20.0, "purity": 0.9, "min_ball_size": 1}, "da2706321a6a4ba96c612a13e41e6cdc"),
]


@pytest.mark.parametrize("kwargs,key", OLD_KEYS)
def test_cache_keys_of_entries_written_before_gbparams_are_kept(kwargs, key):
    x = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    assert gb_key(x, GBParams(**kwargs)) == key

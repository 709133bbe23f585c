"""Scoring never goes silently wrong (issue 26): non-finite logits are refused or
counted as wrong, never as a class; labels outside [0, num_classes) and float
images outside [0, 1] are refused by every attack and evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gbjax import attacks as A
from gbjax import evaluate
from gbjax.attacks._core import correct_from_logits

K = 10
_W = jnp.asarray(np.random.default_rng(0).normal(size=(16, K)), jnp.float32)


def linear(v):
    """A tiny linear model on 4x4x1 images."""
    return v.reshape(v.shape[0], -1) @ _W


def nan_model(v):
    """Finite shapes, NaN values: argmax would call every image class 0."""
    return linear(v) * jnp.nan


def _data(n=12, seed=1):
    rng = np.random.default_rng(seed)
    return rng.random((n, 4, 4, 1), np.float32), rng.integers(0, K, n).astype(np.int32)


KEY = jax.random.key(0)
ALL_ATTACKS = ("fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "square", "noise")


# ------------------------------------------------------------------ non-finite logits


def test_correct_from_logits_never_counts_non_finite_as_a_class():
    z = jnp.asarray([[jnp.nan, 1.0], [2.0, 1.0], [jnp.inf, 0.0], [0.0, -jnp.inf]])
    np.testing.assert_array_equal(correct_from_logits(z, jnp.zeros(4, jnp.int32)), [0, 1, 0, 0])


def test_evaluate_refuses_nan_logits():
    x, y = _data()
    with pytest.raises(ValueError, match="NaN or inf logits"):
        evaluate.accuracy(nan_model, x, y)
    with pytest.raises(ValueError, match="NaN or inf logits"):
        evaluate.evaluate(nan_model, x, y)
    with pytest.raises(ValueError, match="NaN or inf logits"):
        evaluate.predict(nan_model, x)
    assert np.isnan(evaluate.predict_logits(nan_model, x)).all()  # raw logits stay available


def test_evaluate_refuses_labels_out_of_range():
    x, y = _data()
    for bad in (K, -1):
        yb = y.copy()
        yb[3] = bad
        with pytest.raises(ValueError, match=r"outside \[0, 10\).*y\[3\]"):
            evaluate.accuracy(linear, x, yb)
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            evaluate.evaluate(linear, x, yb)
    assert 0.0 <= evaluate.accuracy(linear, x, y) <= 1.0


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_accuracy_under_attack_refuses_a_nan_model(attack):
    x, y = _data()
    with pytest.raises(ValueError, match="NaN or inf logits"):
        A.accuracy_under_attack(
            nan_model, x, y, eps_list=[0.0, 0.1], attack=attack, steps=2, queries=3, key=KEY,
            progress=False,
        )  # fmt: skip


def test_accuracy_under_attack_refuses_a_nan_scored_model():
    x, y = _data()
    with pytest.raises(ValueError, match="scored model returned NaN"):
        A.accuracy_under_attack(
            linear, x, y, eval_logits_fn=nan_model, eps_list=[0.1], attack="fgsm", progress=False
        )


def test_sanity_check_refuses_a_nan_model():
    x, y = _data()
    with pytest.raises(ValueError, match="NaN or inf logits"):
        A.attack_sanity_check(nan_model, x, y, eps_list=[0.1, 0.5], num_classes=K, key=KEY)


def _nan_off_clean(v):
    """Class 0 on the clean images (all pixels 0.5), NaN once a pixel moves."""
    z = jnp.zeros((v.shape[0], K)).at[:, 0].set(1.0) + 1e-3 * linear(v)
    away = jnp.max(jnp.abs(v - 0.5).reshape(v.shape[0], -1), -1) > 0.05
    return jnp.where(away[:, None], jnp.nan, z)


def test_apgd_counts_nan_iterates_as_wrong():
    # Right when clean; every APGD iterate (eps 0.1 from pixels at 0.5) has NaN
    # logits, whose argmax is the label 0: such an image must not be "robust".
    x = np.full((6, 4, 4, 1), 0.5, np.float32)
    y = np.zeros(6, np.int32)
    acc = A.accuracy_under_attack(
        _nan_off_clean, x, y, eps_list=[0.0, 0.1], attack="apgd-ce", steps=3, key=KEY,
        progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(acc, [1.0, 0.0])


def _inf_off_clean(v):
    """Class 0 on the clean images (all pixels 0.5), +inf for class 0 once a pixel moves."""
    z = jnp.zeros((v.shape[0], K)).at[:, 0].set(1.0) + 1e-3 * linear(v)
    away = jnp.max(jnp.abs(v - 0.5).reshape(v.shape[0], -1), -1) > 0.05
    return jnp.where(away[:, None], z.at[:, 0].set(jnp.inf), z)


def test_square_counts_inf_logits_as_wrong():
    x = np.full((6, 4, 4, 1), 0.5, np.float32)
    y = np.zeros(6, np.int32)
    acc = A.accuracy_under_attack(
        _inf_off_clean, x, y, eps_list=[0.0, 0.1], attack="square", queries=4, key=KEY,
        progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(acc, [1.0, 0.0])


# ------------------------------------------------------------------ labels out of range


def _bad_labels(y, value=K):
    y = y.copy()
    y[2] = value
    return y


@pytest.mark.parametrize("value", [K, -1])
def test_every_attack_refuses_labels_out_of_range(value):
    x, y = _data()
    yb = jnp.asarray(_bad_labels(y, value))
    calls = {
        "fgsm": lambda: A.fgsm(linear, x, yb, eps=0.1),
        "pgd": lambda: A.pgd(linear, x, yb, eps=0.1, step_size=0.05, steps=2, key=KEY),
        "apgd": lambda: A.apgd(linear, x, yb, eps=0.1, steps=2, key=KEY),
        "square": lambda: A.square(linear, x, yb, eps=0.1, queries=2, key=KEY),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
            call()
            pytest.fail(f"{name} accepted labels outside [0, {K})")


def test_loss_helpers_refuse_labels_out_of_range():
    x, y = _data()
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        A.loss_gradient(linear, x, _bad_labels(y))
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        A.attack_loss(linear, x, _bad_labels(y, -1))
    assert np.isfinite(np.asarray(A.attack_loss(linear, x, y))).all()


def test_apgd_label_check_uses_the_randomised_models_class_count():
    x, y = _data()

    def noisy(v, k):
        return linear(v + 0.01 * jax.random.normal(k, v.shape))

    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        A.apgd(noisy, x, _bad_labels(y), eps=0.1, steps=2, key=KEY, eot_samples=2)


@pytest.mark.parametrize("attack", ALL_ATTACKS)
def test_accuracy_under_attack_refuses_labels_out_of_range(attack):
    x, y = _data()
    with pytest.raises(ValueError, match=r"outside \[0, 10\)"):
        A.accuracy_under_attack(
            linear, x, _bad_labels(y), eps_list=[0.1], attack=attack, steps=2, queries=3,
            key=KEY, progress=False,
        )  # fmt: skip


def test_sanity_check_refuses_labels_and_class_counts_that_disagree():
    x, y = _data()
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*num_classes"):
        A.attack_sanity_check(linear, x, y, eps_list=[0.1], num_classes=5, key=KEY)
    with pytest.raises(ValueError, match="num_classes=12 but the scored model returns 10"):
        A.attack_sanity_check(linear, x, y, eps_list=[0.1], num_classes=12, key=KEY)


# ------------------------------------------------------------------ images outside [0, 1]


def test_every_attack_refuses_float_images_in_0_255():
    x, y = _data()
    x255 = x * 255.0
    calls = {
        "fgsm": lambda: A.fgsm(linear, x255, y, eps=8 / 255),
        "pgd": lambda: A.pgd(linear, x255, y, eps=0.1, step_size=0.05, steps=2, key=KEY),
        "apgd": lambda: A.apgd(linear, x255, y, eps=0.1, steps=2, key=KEY),
        "square": lambda: A.square(linear, x255, y, eps=0.1, queries=2, key=KEY),
        "accuracy_under_attack": lambda: A.accuracy_under_attack(
            linear, x255, y, eps_list=[0.1], attack="fgsm", progress=False
        ),
        "jax.Array": lambda: A.fgsm(linear, jnp.asarray(x255), y, eps=0.1),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=r"\[0, 1\].*x / 255"):
            call()
            pytest.fail(f"{name} accepted images in 0..255")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        A.fgsm(linear, x - 0.5, y, eps=0.1)  # normalised images: normalise inside the model
    with pytest.raises(ValueError, match="NaN or inf"):
        A.fgsm(linear, np.full_like(x, np.nan), y, eps=0.1)


def test_images_in_range_still_pass_uint8_and_traced():
    x, y = _data()
    x8 = (x * 255).astype(np.uint8)
    acc = A.accuracy_under_attack(linear, x8, y, eps_list=[0.0], attack="fgsm", progress=False)
    assert acc.shape == (1,)
    # under jit the values are not known: the attack runs (checks skip tracers)
    out = jax.jit(lambda v, t: A.fgsm(linear, v, t, eps=0.1))(x, y)
    assert out.shape == x.shape and float(jnp.max(jnp.abs(out - x))) <= 0.1 + 1e-6


def test_a_wider_clip_range_is_an_explicit_choice():
    x, y = _data()
    xs = 2.0 * x - 1.0  # images in [-1, 1], attacked in that range on purpose
    out = A.fgsm(linear, xs, y, eps=0.1, clip=(-1.0, 1.0))
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    with pytest.raises(ValueError, match=r"\[-1, 1\] \(clip\)"):
        A.fgsm(linear, 3.0 * xs, y, eps=0.1, clip=(-1.0, 1.0))

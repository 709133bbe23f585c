"""Attacks as frozen specs (issue 27, item 3): the string form and the specs run the
same attack, Stage.describe() is pinned for the string form (state files record it),
one loop knob (chunk, with unroll a deprecated alias) and one spelling of targeting."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from gbjax import attacks
from gbjax.attacks import APGD, FGSM, PGD, SPSA, Noise, Square, Stage
from gbjax.attacks._specs import resolve


def _logits(x):  # two classes on one-pixel images: class 1 above 0.5
    v = x.reshape(x.shape[0], -1).mean(-1, keepdims=True) - 0.5
    return jnp.concatenate([-v, v], axis=1)


def _linear(k=4, seed=0):
    w = jax.random.normal(jax.random.key(seed), (16, k))
    return Partial(lambda w, v: v.reshape(v.shape[0], -1) @ w, w)


def _batch(n=12, seed=1, k=4):
    x = np.asarray(jax.random.uniform(jax.random.key(seed), (n, 4, 4, 1)))
    y = np.asarray(jnp.argmax(_linear(k)(x), -1)).astype(np.int32)
    return x, y


# ---------------------------------------------------------------- describe


def test_describe_of_the_string_form_is_pinned():
    """The texts of the running experiments' state files: unchanged, byte for byte."""
    f, g = _logits, _linear()
    cases = [
        (Stage("PGD-10 bpda", "pgd", f, eval_logits_fn=g, chunk=1, steps=10),
         "pgd(chunk=1, steps=10)"),
        (Stage("FGSM bpda", "fgsm", f, eval_logits_fn=g, chunk=None),
         "fgsm(chunk=None)"),
        (Stage("fgsm oblivious", "fgsm", f, fold=10, steps=1, chunk=None),
         "fgsm(chunk=None, steps=1, fold=10)"),
        (Stage("APGD-DLR bpda", "apgd-dlr", f, chunk=None, steps=100),
         "apgd-dlr(chunk=None, steps=100)"),
        (Stage("Square-5000 (first 100)", "square", g, first=100, fold="square",
               queries=5000, chunk=1),
         "square(chunk=1, queries=5000, first=100, fold='square')"),
        (Stage("SPSA-20x64", "spsa", g, steps=20, samples=64), "spsa(samples=64, steps=20)"),
        (Stage("b", "pgd", f, steps=3, random_start=False),
         "pgd(random_start=False, steps=3)"),
        (Stage("t", "apgd-t", f, n_targets=3, steps=10, restarts=2),
         "apgd-t(n_targets=3, restarts=2, steps=10)"),
    ]  # fmt: skip
    for stage, text in cases:
        assert stage.describe() == text, stage.name
    group = attacks.Group("old", tuple(s for s, _ in cases[:2]))
    assert group.describe() == (
        "group[PGD-10 bpda: pgd(chunk=1, steps=10); FGSM bpda: fgsm(chunk=None)]"
    )


def test_a_spec_describes_as_the_string_form_with_its_changed_options():
    f = _logits
    pairs = [
        (Stage("s", PGD(steps=20), f, chunk=1), Stage("s", "pgd", f, chunk=1, steps=20)),
        (Stage("s", PGD(), f), Stage("s", "pgd", f)),
        (Stage("s", FGSM(loss="margin"), f), Stage("s", "fgsm", f, loss="margin")),
        (
            Stage("s", APGD("dlr-targeted", steps=10, n_targets=3), f),
            Stage("s", "apgd-t", f, steps=10, n_targets=3),
        ),
        (Stage("s", APGD("dlr"), f, first=5), Stage("s", "apgd-dlr", f, first=5)),
        (Stage("s", Square(queries=100), f), Stage("s", "square", f, queries=100)),
        (Stage("s", SPSA(samples=16), f), Stage("s", "spsa", f, samples=16)),
        (Stage("s", Noise(), f, fold=3), Stage("s", "noise", f, fold=3)),
    ]
    for spec_form, string_form in pairs:
        assert spec_form.describe() == string_form.describe()
        assert spec_form.spec == string_form.spec


# ---------------------------------------------------------------- the specs


def test_specs_are_frozen_hashable_and_validated():
    assert PGD(steps=10) == PGD() and hash(PGD(steps=10)) == hash(PGD())
    assert len({PGD(), PGD(steps=20), APGD(), APGD("dlr"), FGSM(), Square(), SPSA()}) == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        PGD().steps = 3
    bad = [
        (lambda: PGD(steps=0), "steps"),
        (lambda: PGD(restarts=True), "restarts"),
        (lambda: PGD(loss="dlr"), "loss"),
        (lambda: PGD(rel_step=-1.0), "rel_step"),
        (lambda: PGD(random_start="yes"), "random_start"),
        (lambda: FGSM(loss="x"), "loss"),
        (lambda: APGD("margin"), "loss"),
        (lambda: APGD(steps=2.5), "steps"),
        (lambda: APGD("ce", n_targets=3), "n_targets"),
        (lambda: Square(queries=0), "queries"),
        (lambda: Square(p_init=1.5), "p_init"),
        (lambda: SPSA(samples=1), "samples"),
        (lambda: SPSA(lr=0.0), "lr"),
    ]
    for make, name in bad:
        with pytest.raises(ValueError, match=name):
            make()
    assert [s.attack for s in (FGSM(), PGD(), APGD(), APGD("dlr"), APGD("dlr-targeted"))] == [
        "fgsm",
        "pgd",
        "apgd-ce",
        "apgd-dlr",
        "apgd-t",
    ]
    assert {Square().attack, SPSA().attack, Noise().attack} == {"square", "spsa", "noise"}


def test_the_string_form_translates_in_one_place():
    assert resolve("pgd") == PGD()
    assert resolve("pgd", steps=3, loss="margin", restarts=None) == PGD(steps=3, loss="margin")
    # targeting: "apgd-t" and n_targets are APGD's targeted loss
    assert resolve("apgd-t", n_targets=3, steps=7) == APGD("dlr-targeted", steps=7, n_targets=3)
    # options of other attacks are ignored by the string form, as they always were
    assert resolve("apgd-ce", n_targets=3, queries=10, loss="margin") == APGD()
    assert resolve("fgsm", steps=5) == FGSM()
    assert resolve("spsa", steps=np.int64(4), samples=8) == SPSA(steps=4, samples=8)
    with pytest.raises(ValueError, match="restarts applies to PGD and APGD only"):
        resolve("square", restarts=2)
    with pytest.raises(ValueError, match="attack must be one of"):
        resolve("cw")
    with pytest.raises(ValueError, match="attack must be one of"):
        resolve(PGD)  # the class, not a spec


def test_a_spec_with_conflicting_loose_options_is_refused():
    x, y = _batch()
    fn, key = _linear(), jax.random.key(0)
    kw = dict(eps_list=[0.1], key=key, progress=False)
    with pytest.raises(ValueError, match="steps=20 conflicts with PGD"):
        attacks.accuracy_under_attack(fn, x, y, attack=PGD(steps=10), steps=20, **kw)
    with pytest.raises(ValueError, match="queries=5 does not apply to PGD"):
        attacks.accuracy_under_attack(fn, x, y, attack=PGD(), queries=5, **kw)
    with pytest.raises(ValueError, match="stage 's': steps=3 conflicts"):
        Stage("s", PGD(steps=10), fn, steps=3)
    with pytest.raises(ValueError, match="stage 's': restarts"):
        Stage("s", "square", fn, restarts=2)
    # agreeing options are fine
    a = attacks.accuracy_under_attack(fn, x, y, attack=PGD(steps=2), steps=2, **kw)
    b = attacks.accuracy_under_attack(fn, x, y, attack=PGD(steps=2), **kw)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "spec, string, options",
    [
        (FGSM(), "fgsm", {}),
        (FGSM(loss="margin"), "fgsm", dict(loss="margin")),
        (PGD(steps=3, restarts=2), "pgd", dict(steps=3, restarts=2)),
        (PGD(steps=2, random_start=False, rel_step=1.0), "pgd",
         dict(steps=2, random_start=False, rel_step=1.0)),
        (APGD(steps=4), "apgd-ce", dict(steps=4)),
        (APGD("dlr", steps=4), "apgd-dlr", dict(steps=4)),
        (APGD("dlr-targeted", steps=3, n_targets=2), "apgd-t", dict(steps=3, n_targets=2)),
        (Square(queries=6), "square", dict(queries=6)),
        (SPSA(steps=2, samples=4), "spsa", dict(steps=2, samples=4)),
        (Noise(), "noise", {}),
    ],
)  # fmt: skip
def test_spec_and_string_forms_give_identical_flags(spec, string, options):
    x, y = _batch()
    fn = _linear()
    kw = dict(eps_list=[0.05, 0.2], key=jax.random.key(3), per_image=True, progress=False)
    kw["chunk"] = 1 if isinstance(spec, Square) else None
    a = attacks.accuracy_under_attack(fn, x, y, attack=spec, **kw)
    b = attacks.accuracy_under_attack(fn, x, y, attack=string, **options, **kw)
    np.testing.assert_array_equal(a.robust, b.robust)


# ---------------------------------------------------------------- chunk and unroll


def test_unroll_is_a_deprecated_alias_of_chunk():
    x, y = _batch(6)
    fn = _linear()
    kw = dict(eps=0.2, step_size=0.03, steps=5, key=jax.random.key(2))
    with pytest.warns(DeprecationWarning, match="chunk"):
        looped = attacks.pgd(fn, x, y, unroll=1, **kw)
    with pytest.warns(DeprecationWarning, match="chunk"):
        unrolled = attacks.pgd(fn, x, y, unroll=True, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # chunk alone warns nothing
        whole = attacks.pgd(fn, x, y, chunk=5, **kw)
        on_cpu = jax.default_backend() == "cpu"
        np.testing.assert_array_equal(whole, unrolled if on_cpu else looped)
        for chunk in (1, 2, 3):
            np.testing.assert_allclose(attacks.pgd(fn, x, y, chunk=chunk, **kw), looped, atol=1e-6)
    with pytest.raises(ValueError, match="not both"), pytest.warns(DeprecationWarning):
        attacks.pgd(fn, x, y, unroll=1, chunk=1, **kw)
    with pytest.raises(ValueError, match="chunk"):
        attacks.pgd(fn, x, y, chunk=0, **kw)
    ev = dict(eps_list=[0.1, 0.3], attack="pgd", steps=3, key=jax.random.key(0), progress=False)
    with pytest.warns(DeprecationWarning, match="chunk"):
        old = attacks.accuracy_under_attack(fn, x, y, unroll=1, **ev)
    np.testing.assert_array_equal(attacks.accuracy_under_attack(fn, x, y, chunk=3, **ev), old)


def test_pgd_chunks_with_restarts_pick_the_same_best():
    x, y = _batch(8)
    fn = _linear()
    kw = dict(eps=0.1, step_size=0.03, steps=4, key=jax.random.key(5), restarts=3)
    np.testing.assert_allclose(
        attacks.pgd(fn, x, y, chunk=3, **kw), attacks.pgd(fn, x, y, chunk=4, **kw), atol=1e-6
    )
    # inside a user's jit, with the steps concrete
    out = jax.jit(lambda v: attacks.pgd(fn, v, y, chunk=1, **kw))(x)
    np.testing.assert_allclose(out, attacks.pgd(fn, x, y, chunk=1, **kw), atol=1e-6)

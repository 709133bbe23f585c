"""gbjax.attacks.cascade: stages on the survivors, per-stage records, the state file."""

import doctest
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gbjax import attacks
from gbjax.attacks import _cascade
from gbjax.attacks.evaluation import AttackResult

N, EPS = 6, (0.1, 0.2)


class FakeAttacks:
    """Stands in for accuracy_under_attack: a stage's ``logits_fn`` is the set of images
    it breaks per eps; records each call's ``robust_so_far`` and image count."""

    def __init__(self, fail_on=None):
        self.calls, self.fail_on = [], fail_on

    def __call__(self, breaks, x, y, *, eps_list, robust_so_far, desc, **kw):
        if desc == self.fail_on:
            raise KeyboardInterrupt  # a sweep stopped in this stage
        before = np.asarray(robust_so_far, bool)
        self.calls.append(dict(stage=desc, before=before.copy(), n=len(x), kw=kw))
        after = before.copy()
        for e, idx in enumerate(breaks):
            after[e, [i for i in idx if i < len(x)]] = False
        return AttackResult(eps=tuple(eps_list), robust=after)


@pytest.fixture
def fake(monkeypatch):
    f = FakeAttacks()
    monkeypatch.setattr(_cascade, "accuracy_under_attack", f)
    return f


def _x():
    return np.zeros((N, 2, 2, 1), np.float32), np.zeros(N, np.int32)


STAGES = (
    attacks.Stage("a", "fgsm", ((0,), (0, 1))),
    attacks.Stage("b", "pgd", ((0, 2), (2,)), steps=3, random_start=False),
    attacks.Stage("c", "apgd-ce", ((4,), (3, 4)), steps=5),
)


def test_stages_remove_only_what_they_break_later_stages_see_survivors(fake):
    x, y = _x()
    res = attacks.cascade(STAGES, x, y, eps_list=EPS, key=jax.random.key(0), progress=False)
    assert [r.name for r in res.stages] == ["a", "b", "c"]
    # each stage removes the images it breaks among those still robust, nothing else
    removed = [[r.tolist() for r in s.removed] for s in res.stages]
    assert removed == [[[0], [0, 1]], [[2], [2]], [[4], [3, 4]]]
    # each stage saw exactly the survivors of the stages before it
    assert fake.calls[0]["before"].all()
    for call, prev in zip(fake.calls[1:], res.stages):
        np.testing.assert_array_equal(call["before"], prev.robust)
    assert fake.calls[1]["kw"]["steps"] == 3 and fake.calls[2]["kw"]["steps"] == 5
    # overall = the per-image AND of every stage alone
    alone = []
    for s in STAGES:
        r = np.ones((len(EPS), N), bool)
        for e, idx in enumerate(s.logits_fn):
            r[e, list(idx)] = False
        alone.append(r)
    np.testing.assert_array_equal(res.robust, attacks.worst_case(alone))
    np.testing.assert_array_equal(res.robust, res.stages[-1].robust)
    np.testing.assert_allclose(res.accuracy, [3 / 6, 1 / 6])
    np.testing.assert_allclose(
        [s.accuracy for s in res.stages], [[5 / 6, 4 / 6], [4 / 6, 3 / 6], [3 / 6, 1 / 6]]
    )
    assert all(s.seconds >= 0 for s in res.stages)
    assert res.records()[1] == dict(
        stage="b", accuracy=[4 / 6, 3 / 6], removed=[[2], [2]], seconds=res.records()[1]["seconds"]
    )


def _logits(x):  # two classes on one-pixel images: class 1 when the pixel exceeds 0.5
    v = x.reshape(-1, 1) - 0.5
    return jnp.concatenate([-v, v], axis=1)


def test_real_attacks_overall_is_the_and_of_stages_alone():
    x = jnp.array([0.1, 0.45, 0.9, 0.65, 0.25, 0.58]).reshape(-1, 1, 1, 1)
    y = jnp.array([0, 0, 1, 1, 0, 0])  # the last one is wrong clean
    stages = [
        attacks.Stage("FGSM", "fgsm", _logits),
        attacks.Stage("PGD-2", "pgd", _logits, steps=2, random_start=False, loss="margin"),
    ]
    res = attacks.cascade(stages, x, y, eps_list=EPS, progress=False, batch_size=4)
    kw = dict(eps_list=EPS, per_image=True, progress=False, batch_size=4)
    alone = [
        attacks.accuracy_under_attack(_logits, x, y, attack=s.attack, **kw, **dict(s.options))
        for s in stages
    ]
    np.testing.assert_array_equal(res.robust, attacks.worst_case(alone))
    # the first stage also removes the image misclassified clean
    assert [r.tolist() for r in res.stages[0].removed] == [[1, 5], [1, 3, 5]]


def test_first_attacks_a_prefix_only(fake):
    x, y = _x()
    stage = attacks.Stage("sq", "square", ((0, 4), (1, 5)), first=3, queries=7)
    res = attacks.cascade([stage], x, y, eps_list=EPS, key=jax.random.key(0), progress=False)
    assert fake.calls[0]["n"] == 3 and fake.calls[0]["kw"]["queries"] == 7
    assert [r.tolist() for r in res.stages[0].removed] == [[0], [1]]
    assert res.robust.shape == (len(EPS), N)


def test_resume_skips_done_stages(fake, monkeypatch, tmp_path):
    x, y = _x()
    state = tmp_path / "state" / "m.json"
    key = jax.random.key(0)
    stopped = FakeAttacks(fail_on="c")
    monkeypatch.setattr(_cascade, "accuracy_under_attack", stopped)
    with pytest.raises(KeyboardInterrupt):
        attacks.cascade(STAGES, x, y, eps_list=EPS, key=key, state=state, progress=False)
    assert [c["stage"] for c in stopped.calls] == ["a", "b"]
    assert [s["stage"] for s in json.loads(state.read_text())["stages"]] == ["a", "b"]
    # run again: only the stage not done runs, from the saved flags
    monkeypatch.setattr(_cascade, "accuracy_under_attack", fake)
    res = attacks.cascade(STAGES, x, y, eps_list=EPS, key=key, state=state, progress=False)
    assert [c["stage"] for c in fake.calls] == ["c"]
    uninterrupted = FakeAttacks()
    monkeypatch.setattr(_cascade, "accuracy_under_attack", uninterrupted)
    ref = attacks.cascade(STAGES, x, y, eps_list=EPS, key=key, progress=False)
    np.testing.assert_array_equal(res.robust, ref.robust)
    for a, b in zip(res.stages, ref.stages):
        np.testing.assert_array_equal(a.robust, b.robust)
        assert a.as_json() | {"seconds": 0} == b.as_json() | {"seconds": 0}
    # all done: nothing runs
    again = attacks.cascade(STAGES, x, y, eps_list=EPS, key=key, state=state, progress=False)
    assert len(fake.calls) == 1 and again.records() == res.records()
    saved = json.loads(state.read_text())
    assert saved["stages"] == res.records() and saved["robust"] == res.robust.tolist()


def test_mismatched_state_is_refused(fake, tmp_path):
    x, y = _x()
    state = tmp_path / "m.json"
    kw = dict(key=jax.random.key(0), state=state, progress=False)
    attacks.cascade(STAGES[:2], x, y, eps_list=EPS, **kw)
    saved = state.read_text()
    other_x = x.copy()
    other_x[0, 0, 0, 0] = 0.5
    renamed = (attacks.Stage("z", "fgsm", ((0,), (0, 1))),) + STAGES[1:]
    resteps = STAGES[:1] + (attacks.Stage("b", "pgd", ((0, 2), (2,)), steps=4),) + STAGES[2:]
    cases = [
        ("other images", STAGES, other_x, y, EPS),
        ("eps", STAGES, x, y, (0.1, 0.3)),
        ("2 eps and 6 images", STAGES, x, y, (0.1,)),
        ("holds the stages", renamed, x, y, EPS),
        ("was made with stage 1 as", resteps, x, y, EPS),
        ("holds the stages", STAGES[:1], x, y, EPS),  # fewer stages than done
    ]
    for why, stages, xs, ys, eps in cases:
        with pytest.raises(ValueError, match=why):
            attacks.cascade(stages, xs, ys, eps_list=eps, **kw)
    with pytest.raises(ValueError, match="6 images, not 2 and 5"):
        attacks.cascade(STAGES, x[:5], y[:5], eps_list=EPS, **kw)
    assert state.read_text() == saved and len(fake.calls) == 2  # nothing ran, nothing written
    state.write_text("{")
    with pytest.raises(ValueError, match="not a cascade state"):
        attacks.cascade(STAGES, x, y, eps_list=EPS, **kw)


def test_adaptive_cifar_state_file_loads_and_resumes(fake, tmp_path):
    """A state file of experiments/adaptive_cifar.py as written before the cascade moved
    into the library: a group recorded as one stage whose sub-stages kept only their
    accuracies, no eps, images or plan; it loads, and the cascade continues after it."""
    x, y = _x()
    robust = np.ones((2, N), bool)
    robust[0, [1]] = robust[1, [1, 2, 3]] = False  # main job cascade
    after_spsa = robust.copy()
    after_spsa[1, 0] = False
    subs = [
        dict(stage="FGSM none", accuracy=[1.0, 4 / 6]),
        dict(stage="PGD-2 none", accuracy=robust.mean(1).tolist()),
    ]
    main = dict(
        stage="main job cascade",
        accuracy=robust.mean(1).tolist(),
        removed=[[1], [1, 2, 3]],
        seconds=63.6,
        sub_stages=subs,
    )
    spsa = dict(stage="SPSA-3x8", accuracy=after_spsa.mean(1).tolist(), removed=[[], [0]])
    old = dict(stages=[main, dict(spsa, seconds=2.0)], robust=after_spsa.tolist())
    state = tmp_path / "gb_seed0.json"
    state.write_text(json.dumps(old))
    stages = [
        attacks.Group(
            "main job cascade",
            [
                attacks.Stage("FGSM none", "fgsm", ((), ())),
                attacks.Stage("PGD-2 none", "pgd", ((), ())),
            ],
        ),
        attacks.Stage("SPSA-3x8", "spsa", ((), ())),
        attacks.Stage("Square-8 (all)", "square", ((5,), (5,))),
    ]
    res = attacks.cascade(
        stages, x, y, eps_list=EPS, key=jax.random.key(1), state=state, progress=False
    )
    assert [c["stage"] for c in fake.calls] == ["Square-8 (all)"]
    np.testing.assert_array_equal(fake.calls[0]["before"], after_spsa)
    records = res.records()
    assert records[:2] == old["stages"]  # read back unchanged
    first = res.stages[0]
    np.testing.assert_array_equal(first.robust, robust)
    assert [s.name for s in first.sub_stages] == ["FGSM none", "PGD-2 none"]
    assert first.sub_stages[0].robust is None  # the old file kept no per-image flags for them
    saved = json.loads(state.read_text())
    assert saved["stages"] == records and saved["robust"] == res.robust.tolist()
    assert {"eps", "images", "plan"} <= set(saved)
    # the file written now loads as well (and refuses a changed group)
    attacks.cascade(stages, x, y, eps_list=EPS, key=jax.random.key(1), state=state, progress=False)
    assert len(fake.calls) == 1
    regrouped = [attacks.Group("main job cascade", stages[0].stages[:1])] + stages[1:]
    with pytest.raises(ValueError, match="main job cascade"):
        attacks.cascade(regrouped, x, y, eps_list=EPS, key=jax.random.key(1), state=state)


def test_group_is_one_stage_with_sub_stage_records(fake, tmp_path):
    x, y = _x()
    state = tmp_path / "g.json"
    group = attacks.Group("base", STAGES[:2])
    res = attacks.cascade(
        [group, STAGES[2]], x, y, eps_list=EPS, key=jax.random.key(0), state=state, progress=False
    )
    flat = attacks.cascade(STAGES, x, y, eps_list=EPS, key=jax.random.key(0), progress=False)
    np.testing.assert_array_equal(res.robust, flat.robust)
    base = res.stages[0]
    np.testing.assert_array_equal(base.robust, flat.stages[1].robust)
    assert [r.tolist() for r in base.removed] == [[0, 2], [0, 1, 2]]
    assert [s.as_json()["removed"] for s in base.sub_stages] == [
        flat.records()[0]["removed"],
        flat.records()[1]["removed"],
    ]
    # resumed, the group's sub-stage flags come back from the file
    again = attacks.cascade(
        [group, STAGES[2]], x, y, eps_list=EPS, key=jax.random.key(0), state=state, progress=False
    )
    for a, b in zip(again.stages[0].sub_stages, base.sub_stages):
        np.testing.assert_array_equal(a.robust, b.robust)


def test_invalid_stages_are_refused():
    x, y = _x()
    with pytest.raises(TypeError, match="unknown option"):
        attacks.Stage("a", "pgd", _logits, step=3)
    with pytest.raises(TypeError, match="unknown option"):
        attacks.Stage("a", "pgd", _logits, robust_so_far=None)
    with pytest.raises(ValueError, match="attack must be one of"):
        attacks.Stage("a", "cw", _logits)
    with pytest.raises(ValueError, match="first"):
        attacks.Stage("a", "pgd", _logits, first=0)
    with pytest.raises(ValueError, match="named 'a'"):
        attacks.cascade([attacks.Stage("a", "fgsm", _logits)] * 2, x, y, eps_list=EPS)
    with pytest.raises(ValueError, match="need a PRNG key"):
        attacks.cascade([attacks.Stage("a", "apgd-ce", _logits)], x, y, eps_list=EPS)
    s = attacks.Stage("a", "pgd", _logits, steps=3, chunk=1)
    assert s == attacks.Stage("a", "pgd", _logits, chunk=1, steps=3) and hash(s) == hash(
        attacks.Stage("a", "pgd", _logits, chunk=1, steps=3)
    )
    assert s.describe() == "pgd(chunk=1, steps=3)"


def test_docstring_example():
    failed, attempted = doctest.testmod(_cascade, optionflags=doctest.ELLIPSIS)[:2]
    assert attempted > 0 and failed == 0


# ---------------------------------------------------------------- reuse_group


def test_reuse_group_equals_running_the_group(fake, tmp_path):
    """A cascade at 3 budgets, reused as a group at 2 of them, then one more stage: the
    same flags and records as running the group itself there, and the group's
    stages are not called again."""
    x, y = _x()
    eps3 = (0.05,) + EPS
    three = tuple(
        attacks.Stage(s.name, s.attack, ((5,),) + s.logits_fn, **dict(s.options))
        for s in STAGES[:2]
    )
    attacks.cascade(three, x, y, eps_list=eps3, key=jax.random.key(0), state=tmp_path / "old",
                    progress=False)  # fmt: skip
    group = attacks.Group("old", three)
    kw = dict(eps_list=EPS, key=jax.random.key(0), progress=False)
    # the same stages at the last 2 budgets (the fake breaks per eps position)
    fresh = attacks.cascade([attacks.Group("old", STAGES[:2]), STAGES[2]], x, y, **kw)
    n_calls = len(fake.calls)
    assert attacks.reuse_group(tmp_path / "old", tmp_path / "new", group, x, y, eps_list=EPS)
    res = attacks.cascade([group, STAGES[2]], x, y, state=tmp_path / "new", **kw)
    assert [c["stage"] for c in fake.calls[n_calls:]] == ["c"]  # only the new stage ran
    np.testing.assert_array_equal(res.robust, fresh.robust)
    for a, b in zip(res.stages, fresh.stages):
        assert a.name == b.name and [r.tolist() for r in a.removed] == [
            r.tolist() for r in b.removed
        ]
        assert [s.name for s in a.sub_stages] == [s.name for s in b.sub_stages]
    # a state already there is left alone; a missing source is no reuse
    before = (tmp_path / "new").read_text()
    assert not attacks.reuse_group(tmp_path / "old", tmp_path / "new", group, x, y, eps_list=EPS)
    assert (tmp_path / "new").read_text() == before
    assert not attacks.reuse_group(tmp_path / "none", tmp_path / "n2", group, x, y, eps_list=EPS)


def test_reuse_group_refuses_what_does_not_match(fake, tmp_path):
    x, y = _x()
    attacks.cascade(STAGES[:2], x, y, eps_list=EPS, key=jax.random.key(0),
                    state=tmp_path / "old", progress=False)  # fmt: skip
    group = attacks.Group("old", STAGES[:2])
    cases = [
        (dict(eps_list=(0.3,)), "no flags at eps"),
        (dict(eps_list=EPS, x=x + 1.0), "other images"),
        (dict(eps_list=EPS, group=attacks.Group("old", STAGES[:1])), "ran the stages"),
        (dict(eps_list=EPS, group=attacks.Group("old", (STAGES[0], STAGES[2]))), "ran the stages"),
    ]
    for kw, match in cases:
        args = dict(x=x, y=y, group=group) | kw
        with pytest.raises(ValueError, match=match):
            attacks.reuse_group(tmp_path / "old", tmp_path / "new", args.pop("group"),
                                args.pop("x"), args.pop("y"), **args)  # fmt: skip
        assert not (tmp_path / "new").exists()
    (tmp_path / "bad").write_text("{}")
    with pytest.raises(ValueError, match="not a cascade state"):
        attacks.reuse_group(tmp_path / "bad", tmp_path / "new", group, x, y, eps_list=EPS)


# ---------------------------------------------------------------- join_cascades

# eight one-pixel images, two of them wrong clean (positions 5 and 7)
XJ = jnp.array([0.1, 0.45, 0.9, 0.65, 0.25, 0.58, 0.8, 0.3]).reshape(-1, 1, 1, 1)
YJ = jnp.array([0, 0, 1, 1, 0, 0, 1, 1])
JOIN_STAGES = (
    attacks.Stage("FGSM", "fgsm", _logits),
    attacks.Group(
        "base",
        (
            attacks.Stage("PGD-2", "pgd", _logits, steps=2, random_start=False, loss="margin"),
            attacks.Stage("PGD-3", "pgd", _logits, steps=3, random_start=False),
        ),
    ),
)
EPS_J = (0.05, 0.1, 0.2)


def _parts(positions, stages=JOIN_STAGES):
    return [
        attacks.cascade(stages, XJ[p], YJ[p], eps_list=EPS_J, progress=False, batch_size=3)
        for p in positions
    ]


@pytest.mark.parametrize(
    "positions",
    [
        [[0, 2, 4, 6], [1, 3, 5, 7]],  # every other image, as fgsm_cifar splits
        [[7, 0, 3], [5], [6, 1, 2, 4]],  # three parts, any order within a part
        [list(range(8))],  # one part: the cascade itself
    ],
)
def test_join_cascades_equals_one_cascade_over_the_whole_set(positions):
    """With attacks that draw nothing at random, the joined parts are the cascade over
    the whole set: flags, accuracies and removed images of every stage and sub-stage."""
    whole = attacks.cascade(JOIN_STAGES, XJ, YJ, eps_list=EPS_J, progress=False, batch_size=3)
    parts = _parts([np.asarray(p) for p in positions])
    joined = attacks.join_cascades(parts, positions)
    assert joined.eps == whole.eps
    np.testing.assert_array_equal(joined.robust, whole.robust)
    np.testing.assert_allclose(joined.accuracy, whole.accuracy)
    assert 0 < whole.accuracy.min() and whole.accuracy.max() < 1  # a case that can fail
    for a, b in zip(joined.stages, whole.stages):
        assert a.name == b.name
        np.testing.assert_array_equal(a.robust, b.robust)
        assert [r.tolist() for r in a.removed] == [r.tolist() for r in b.removed]
        assert [s.as_json()["removed"] for s in a.sub_stages] == [
            s.as_json()["removed"] for s in b.sub_stages
        ]
        # a stage's seconds: the longest part's (they ran at the same time)
        assert a.seconds == max(p.stages[[s.name for s in p.stages].index(a.name)].seconds
                                for p in parts)  # fmt: skip


def test_join_cascades_writes_the_state_of_the_whole_set(tmp_path, monkeypatch):
    """The joined state is one that cascade over the whole set reads as finished
    (nothing runs again) and that reuse_group accepts; an existing one is not replaced."""
    positions = [np.arange(0, 8, 2), np.arange(1, 8, 2)]
    state = tmp_path / "s" / "m.json"
    parts = _parts(positions)
    flat_parts = _parts(positions, (JOIN_STAGES[0], *JOIN_STAGES[1].stages))
    joined = attacks.join_cascades(parts, positions, state=state, stages=JOIN_STAGES, x=XJ, y=YJ)

    def no_attack(*a, **k):
        raise AssertionError("a stage ran again")

    monkeypatch.setattr(_cascade, "accuracy_under_attack", no_attack)
    again = attacks.cascade(JOIN_STAGES, XJ, YJ, eps_list=EPS_J, state=state, progress=False)
    np.testing.assert_array_equal(again.robust, joined.robust)
    assert again.records() == joined.records()
    # a joined state of plain stages is reused as a group, as adaptive_cifar reuses the
    # main job's (at a subset of its budgets)
    flat = (JOIN_STAGES[0], *JOIN_STAGES[1].stages)
    attacks.join_cascades(flat_parts, positions, state=tmp_path / "f.json", stages=flat, x=XJ, y=YJ)
    group = attacks.Group("main", flat)
    assert attacks.reuse_group(tmp_path / "f.json", tmp_path / "r.json", group, XJ, YJ,
                               eps_list=EPS_J[1:])  # fmt: skip
    reused = attacks.cascade([group], XJ, YJ, eps_list=EPS_J[1:], state=tmp_path / "r.json",
                             progress=False)  # fmt: skip
    np.testing.assert_array_equal(reused.robust, joined.robust[1:])
    before = state.read_text()
    with pytest.raises(ValueError, match="exists"):
        attacks.join_cascades(parts, positions, state=state, stages=JOIN_STAGES, x=XJ, y=YJ)
    assert state.read_text() == before


def test_join_cascades_refuses_parts_that_do_not_fit(tmp_path):
    positions = [np.arange(0, 8, 2), np.arange(1, 8, 2)]
    parts = _parts(positions)
    cases = [
        (dict(parts=[]), "at least one part"),
        (dict(positions=positions[:1]), "2 parts but 1"),
        (dict(positions=[positions[0], positions[0]]), "exactly once"),
        (dict(positions=[positions[0], positions[1] + 1]), "exactly once"),
        (dict(positions=[positions[0][:3], np.r_[positions[1], 6]]), "flags of shape"),
        (dict(parts=[parts[0], parts[1]._replace(eps=(0.1,) * 3)]), "ran at eps"),
        (dict(parts=[parts[0], _parts(positions[1:], JOIN_STAGES[:1])[0]]), "ran the stages"),
        (dict(state=tmp_path / "s.json"), "needs the whole set's stages"),
        (dict(state=tmp_path / "s.json", stages=JOIN_STAGES[:1], x=XJ, y=YJ), "not the parts'"),
        (dict(state=tmp_path / "s.json", stages=JOIN_STAGES, x=XJ[:4], y=YJ[:4]), "8 images"),
    ]
    for kw, match in cases:
        args = dict(parts=parts, positions=positions) | kw
        with pytest.raises(ValueError, match=match):
            attacks.join_cascades(args.pop("parts"), args.pop("positions"), **args)
    assert not (tmp_path / "s.json").exists()
    old = parts[
        1
    ]._replace(  # a record read from an old state file that kept no flags
        stages=(parts[1].stages[0]._replace(robust=None),) + parts[1].stages[1:]
    )
    with pytest.raises(ValueError, match="no flags to join"):
        attacks.join_cascades([parts[0], old], positions)

"""Tests for the evaluation-grade attacks: per-iterate scoring, APGD, Square, losses,
worst cases and the cascade."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.tree_util import Partial

from gbjax import attacks as A
from gbjax.attacks import losses
from gbjax.attacks.apgd import checkpoints
from gbjax.attacks.square import p_schedule

H, W, K = 4, 4, 3
D = H * W


def _mlp(params, x):
    (w1, b1), (w2, b2) = params
    return jnp.tanh(x.reshape(x.shape[0], -1) @ w1 + b1) @ w2 + b2


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on separable templates; (logits fn, x, y)."""
    k = jax.random.split(jax.random.key(7), 5)
    tmpl = jax.random.uniform(k[0], (K, D))
    y = jax.random.randint(k[1], (160,), 0, K)
    x = jnp.clip(tmpl[y] + 0.15 * jax.random.normal(k[2], (160, D)), 0, 1).reshape(160, H, W, 1)
    params = ((0.5 * jax.random.normal(k[3], (D, 16)), jnp.zeros(16)),
              (0.5 * jax.random.normal(k[4], (16, K)), jnp.zeros(K)))  # fmt: skip
    opt = optax.adam(0.05)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(_mlp(p, x), y).mean()

    def step(carry, _):
        p, s = carry
        u, s = opt.update(jax.grad(loss)(p), s)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), None, length=200)
    return Partial(_mlp, params), np.asarray(x), np.asarray(y)


# ---------------------------------------------------------------- losses


def test_losses_match_their_formulas():
    z = jnp.asarray([[3.0, 1.0, 2.0, -1.0], [0.0, 5.0, 4.0, 1.0]])
    y = jnp.asarray([0, 2])
    np.testing.assert_allclose(losses.per_example_loss("margin", z, y), [2.0 - 3.0, 5.0 - 4.0])
    # DLR: -(z_y - max_other) / (z_(1) - z_(3))
    np.testing.assert_allclose(
        losses.per_example_loss("dlr", z, y), [-(3 - 2) / (3 - 1), -(4 - 5) / (5 - 1)], rtol=1e-6
    )
    t = jnp.asarray([2, 1])
    want = [-(3 - 2) / (3 - (1 + -1) / 2), -(4 - 5) / (5 - (1 + 0) / 2)]
    np.testing.assert_allclose(losses.per_example_loss("dlr-targeted", z, y, t), want, rtol=1e-6)
    ce = optax.softmax_cross_entropy_with_integer_labels(z, y)
    np.testing.assert_allclose(losses.per_example_loss("ce", z, y), ce)
    with pytest.raises(ValueError, match="loss"):
        losses.per_example_loss("hinge", z, y)


def test_targeted_dlr_uses_the_ranked_wrong_classes():
    z = jnp.asarray([[3.0, 1.0, 2.0, -1.0], [0.0, 5.0, 4.0, 1.0]])
    y = jnp.asarray([0, 2])
    np.testing.assert_array_equal(losses.ranked_targets(z, y, 1), [2, 1])
    np.testing.assert_array_equal(losses.ranked_targets(z, y, 2), [1, 3])
    np.testing.assert_array_equal(losses.ranked_targets(z, y, 3), [3, 0])
    with pytest.raises(ValueError, match="rank"):
        losses.ranked_targets(z, y, 4)


def test_targeted_apgd_lands_on_its_target():
    w = jax.random.normal(jax.random.key(3), (D, 5))
    fn = Partial(lambda w, v: 4.0 * v.reshape(v.shape[0], -1) @ w, w)
    x = jax.random.uniform(jax.random.key(4), (12, H, W, 1))
    y = jnp.argmax(fn(x), -1)
    for rank in (1, 2):
        target = losses.ranked_targets(fn(x), y, rank)
        adv = A.apgd(fn, x, y, eps=0.5, steps=20, loss="dlr-targeted", target_rank=rank,
                     key=jax.random.key(rank), chunk=2)  # fmt: skip
        pred = np.asarray(jnp.argmax(fn(adv), -1))
        assert (pred == np.asarray(target)).mean() > 0.5


# ---------------------------------------------------------------- scoring


def test_every_iterate_is_scored_not_only_the_last():
    """PGD walks through a band the scored model gets wrong and out again."""

    def attacked(v):  # pushes the mean pixel up
        m = v.reshape(v.shape[0], -1).mean(-1)
        return jnp.stack([jnp.zeros_like(m), m], -1)

    def scored(v):  # right, except for a mean pixel in (0.57, 0.63)
        m = v.reshape(v.shape[0], -1).mean(-1)
        band = ((m > 0.57) & (m < 0.63)).astype(jnp.float32)
        return jnp.stack([1.0 - band, band], -1)

    x = np.full((1, 2, 2, 1), 0.5, np.float32)
    y = np.zeros(1, np.int32)
    kw = dict(eps_list=[0.3], attack="pgd", steps=5, rel_step=5 * 0.05 / 0.3,
              random_start=False, eval_logits_fn=scored, progress=False)  # fmt: skip
    final = A.pgd(attacked, x, y, eps=0.3, step_size=0.05, steps=5, random_start=False)
    assert float(jnp.mean(final)) == pytest.approx(0.75)
    assert int(jnp.argmax(scored(final), -1)[0]) == 0  # the last iterate is classified right
    assert A.accuracy_under_attack(attacked, x, y, **kw)[0] == 0.0  # but 0.6 was not
    # one step ends at 0.55, before the band
    assert A.accuracy_under_attack(attacked, x, y, **dict(kw, steps=1, rel_step=0.05 / 0.3))[0] == 1


def test_misclassified_clean_images_never_count_as_robust(trained):
    fn, x, y = trained
    wrong = np.asarray(jnp.argmax(fn(x), -1)) != y
    y_bad = np.where(wrong, y, (y + 1) % K)  # make many clean predictions wrong
    res = A.accuracy_under_attack(fn, x, y_bad, eps_list=[0.0, 0.05], attack="fgsm",
                                  per_image=True, progress=False)  # fmt: skip
    clean_ok = np.asarray(jnp.argmax(fn(x), -1)) == y_bad
    assert not res.robust[:, ~clean_ok].any()
    np.testing.assert_array_equal(res.robust[0], clean_ok)


def _all_budgets_and_each_alone(fn, x, y, eps, prior, kw):
    """Per-image flags ``(E, N)`` of one call over every budget of ``eps``, and of one
    call per budget (with the matching row of the ``prior`` flags, if any)."""
    together = A.accuracy_under_attack(fn, x, y, eps_list=eps, robust_so_far=prior, **kw)
    alone = [
        A.accuracy_under_attack(
            fn, x, y, eps_list=[e], robust_so_far=None if prior is None else prior[i], **kw
        ).robust[0]
        for i, e in enumerate(eps)
    ]
    return together.robust, np.stack(alone)


@pytest.mark.parametrize("loss", ["ce", "margin"])
@pytest.mark.parametrize("chunk", [None, 1])
def test_fgsm_sweep_from_one_gradient_equals_one_budget_at_a_time(trained, loss, chunk):
    """A sweep over several budgets takes FGSM's gradient once per image; its flags
    must be those of attacking each budget on its own (the per-budget path), with
    and without a cascade's ``robust_so_far``."""
    fn, x, y = trained
    eps = [0.0, 0.05, 0.1, 0.2, 0.3]
    rng = np.random.default_rng(0)
    so_far = rng.random((len(eps), len(y))) < 0.7
    kw = dict(attack=A.FGSM(loss=loss), per_image=True, progress=False, chunk=chunk,
              batch_size=64)  # fmt: skip
    plain = A.accuracy_under_attack(fn, x, y, eps_list=eps, **kw).robust
    assert 0.1 < plain[-1].mean() < plain[-2].mean() < plain[0].mean()  # not trivial
    for prior in (None, so_far):
        sweep, alone = _all_budgets_and_each_alone(fn, x, y, eps, prior, kw)
        np.testing.assert_array_equal(sweep, alone)


@pytest.mark.parametrize("chunk", [None, 1])
def test_budgets_attacked_together_equal_one_budget_at_a_time(trained, chunk):
    """The images of every budget run as one set of rows, each with its own eps;
    for a deterministic attack (PGD from x) the flags are those of each budget
    attacked on its own, with and without a cascade's prior flags."""
    fn, x, y = trained
    eps = [0.0, 0.05, 0.1, 0.2, 0.3]
    prior = np.random.default_rng(1).random((len(eps), len(y))) < 0.8
    kw = dict(attack=A.PGD(steps=4, random_start=False), per_image=True, progress=False,
              chunk=chunk, batch_size=64)  # fmt: skip
    for so_far in (None, prior):
        together, alone = _all_budgets_and_each_alone(fn, x, y, eps, so_far, kw)
        np.testing.assert_array_equal(together, alone)
    assert 0.05 < together[-1].mean() < together[1].mean()


def test_attack_kernels_keep_each_row_in_its_own_budget(trained):
    """With one eps per row, every attack's result stays in that row's ball, and the
    larger budgets are used (the rows do not all get the smallest or the largest)."""
    from gbjax.attacks.apgd import apgd_run
    from gbjax.attacks.scored import pgd_robust
    from gbjax.attacks.spsa import spsa_run
    from gbjax.attacks.square import square_run

    fn, x, y = trained
    xs, ys = jnp.asarray(x[:48]), jnp.asarray(y[:48])
    eps_r = jnp.asarray(np.tile([0.02, 0.1, 0.3], 16), jnp.float32)
    key = jax.random.key(3)
    results = {
        "pgd": pgd_robust(fn, fn, xs, ys, key, eps_r, 2.5 * eps_r / 5, 5, 0.0, 1.0, chunk=1)[1],
        "apgd": apgd_run(fn, fn, xs, ys, key, eps_r, steps=5, loss="ce", chunk=2, stop_early=False)[
            1
        ],  # fmt: skip
        "square": square_run(fn, xs, ys, key, eps_r, queries=20, chunk=5)[1],
        "spsa": spsa_run(fn, xs, ys, key, eps_r, steps=3, samples=8, lr=0.05)[1],
    }
    for name, adv in results.items():
        dev = np.asarray(jnp.max(jnp.abs(adv - xs).reshape(48, -1), axis=1))
        assert np.all(dev <= np.asarray(eps_r) + 1e-6), name
        for e in (0.1, 0.3):  # the rows of a larger budget move further than 0.02
            assert dev[np.asarray(eps_r) == e].max() > 0.05, (name, e)


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-dlr"])
def test_cascade_only_attacks_survivors_and_never_raises_accuracy(trained, attack):
    fn, x, y = trained
    eps = [0.15, 0.25]
    # chunk 2: two unrolled steps per program (test_apgd_chunk_changes_nothing_but_the_program)
    kw = dict(eps_list=eps, key=jax.random.key(0), steps=10, per_image=True, progress=False,
              chunk=2)  # fmt: skip
    first = A.accuracy_under_attack(fn, x, y, attack="fgsm", **kw)
    second = A.accuracy_under_attack(fn, x, y, attack=attack, robust_so_far=first.robust, **kw)
    assert not (second.robust & ~first.robust).any()
    alone = A.accuracy_under_attack(fn, x, y, attack=attack, **kw)
    np.testing.assert_array_equal(A.worst_case([first, alone]), first.robust & alone.robust)


def test_apgd_at_least_as_strong_as_pgd(trained):
    fn, x, y = trained
    kw = dict(eps_list=[0.15, 0.2, 0.25], steps=20, key=jax.random.key(1), progress=False,
              chunk=2)  # fmt: skip
    pgd = A.accuracy_under_attack(fn, x, y, attack="pgd", **kw)
    apgd = A.accuracy_under_attack(fn, x, y, attack="apgd-ce", **kw)
    assert np.all(apgd <= pgd + 1.0 / len(y)), (apgd, pgd)
    assert np.any((pgd > 0.1) & (pgd < 0.95))  # the comparison is not trivial


@pytest.mark.parametrize("loss", ["ce", "dlr"])
def test_apgd_chunk_changes_nothing_but_the_program(trained, loss):
    """Steps per compiled call only group the same iterations (each step folds its own
    index into the key), so the MLP tests may run APGD in small chunks, which compile
    faster than the default 10 unrolled steps."""
    fn, x, y = trained
    kw = dict(eps=0.2, steps=7, loss=loss, key=jax.random.key(2))
    one = np.asarray(A.apgd(fn, x[:48], y[:48], chunk=1, **kw))
    assert np.abs(one - x[:48]).max() > 0.05  # the attack moved the images
    for chunk in (3, 10):  # 10: one call holds all 7 steps and 3 past the end
        np.testing.assert_array_equal(
            one, np.asarray(A.apgd(fn, x[:48], y[:48], chunk=chunk, **kw))
        )


def test_targeted_apgd_refuses_fewer_than_four_classes(trained):
    """The targeted DLR loss needs 4 classes; with 3 it used to be 0 everywhere, so
    APGD-T moved the images only by its random start and reported them as attacked."""
    fn, x, y = trained  # 3 classes
    with pytest.raises(ValueError, match="at least 4 classes"):
        A.apgd(fn, x[:8], y[:8], eps=0.1, steps=2, loss="dlr-targeted", key=jax.random.key(0))
    with pytest.raises(ValueError, match="at least 4 classes"):
        A.accuracy_under_attack(fn, x[:8], y[:8], attack="apgd-t", eps_list=[0.1], steps=2,
                                key=jax.random.key(0), progress=False)  # fmt: skip


def test_square_succeeds_where_gradients_vanish():
    """A quantising first layer has zero input gradient: PGD cannot move, Square can."""
    w = jax.random.normal(jax.random.key(5), (D, K))

    def quantised(w, v):
        return jnp.round(v.reshape(v.shape[0], -1) * 4) / 4 @ w

    fn = Partial(quantised, w)
    x = np.asarray(jax.random.uniform(jax.random.key(6), (48, H, W, 1)))
    y = np.asarray(jnp.argmax(fn(x), -1))
    g = jax.grad(lambda v: jnp.sum(fn(v)))(jnp.asarray(x))
    assert float(jnp.abs(g).max()) == 0.0
    kw = dict(eps_list=[0.25], key=jax.random.key(0), progress=False)
    pgd = A.accuracy_under_attack(fn, x, y, attack="pgd", random_start=False, steps=5, **kw)
    # chunk 4: fewer unrolled queries to compile per program (in the suite on the
    # 2-core machine this test compiled for 15 s, against 18 s with chunk 10)
    sq = A.accuracy_under_attack(fn, x, y, attack="square", queries=300, chunk=4, **kw)
    assert pgd[0] == 1.0
    assert sq[0] < 0.6
    adv = A.square(fn, x, y, eps=0.25, queries=300, key=jax.random.key(0), chunk=4)
    assert float(jnp.abs(adv - x).max()) <= 0.25 + 1e-6
    assert float(jnp.mean(jnp.argmax(fn(adv), -1) == y)) == pytest.approx(sq[0])


def test_square_chunk_changes_nothing_but_the_program(monkeypatch):
    """Queries per compiled call only group the same iterations: any chunk gives the
    same images, and one larger than the attack is cut to it (no no-op iterations)."""
    import sys

    sq = sys.modules["gbjax.attacks.square"]  # the module (the package exports the function)

    w = jax.random.normal(jax.random.key(7), (D, K))
    fn = Partial(lambda w, v: v.reshape(v.shape[0], -1) @ w, w)
    x = np.asarray(jax.random.uniform(jax.random.key(8), (6, H, W, 1)))
    y = np.asarray(jnp.argmax(fn(x), -1))
    kw = dict(eps=0.05, queries=4, key=jax.random.key(3))
    one = A.square(fn, x, y, chunk=1, **kw)
    calls, queries = [], sq._queries
    monkeypatch.setattr(sq, "_queries", lambda *a, n: calls.append(n) or queries(*a, n=n))
    big = A.square(fn, x, y, chunk=25, **kw)
    assert calls == [3]  # one call of the 3 queries after the start, not 25 unrolled
    np.testing.assert_array_equal(np.asarray(one), np.asarray(big))
    # chunk 2: the second call's last iteration is past the attack and changes nothing
    np.testing.assert_array_equal(np.asarray(big), np.asarray(A.square(fn, x, y, chunk=2, **kw)))


def test_noise_control_is_weaker_than_an_attack(trained):
    fn, x, y = trained
    kw = dict(eps_list=[0.2, 0.3], key=jax.random.key(2), progress=False)
    noise = A.accuracy_under_attack(fn, x, y, attack="noise", **kw)
    pgd = A.accuracy_under_attack(fn, x, y, attack="pgd", **kw)
    assert np.all(pgd < noise - 0.1)


# ---------------------------------------------------------------- pieces


@settings(max_examples=30, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=6, max_size=6), min_size=1, max_size=4))
def test_worst_case_is_at_most_every_component(rows):
    parts = [np.asarray(r, bool).reshape(2, 3) for r in rows]
    wc = A.worst_case(parts)
    for p in parts:
        assert (wc <= p).all()
        assert wc.mean() <= p.mean()
    with pytest.raises(ValueError):
        A.worst_case([])


def test_wilson_interval():
    lo, hi = A.wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)
    assert A.wilson_interval(0, 20)[0] == 0.0 and A.wilson_interval(0, 20)[1] > 0.1
    assert A.wilson_interval(20, 20)[1] == 1.0


def test_apgd_checkpoints_follow_the_paper():
    ck, win = checkpoints(100)
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    ends = np.flatnonzero(ck) + 1
    assert list(ends[:4]) == [22, 41, 57, 70]
    assert win[ck].min() == 6


def test_square_p_schedule():
    got = [float(p_schedule(0.8, i, 10000)) for i in (0, 10, 11, 51, 201, 8001, 9999)]
    assert got == pytest.approx([0.8, 0.8, 0.4, 0.2, 0.1, 0.8 / 512, 0.8 / 512])
    assert float(p_schedule(0.8, 50, 100)) == pytest.approx(0.8 / 128)  # rescaled to 10000


def test_bad_arguments():
    fn = Partial(lambda v: v.reshape(v.shape[0], -1)[:, :3])
    x, y = np.zeros((2, 2, 2, 1), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="attack"):
        A.accuracy_under_attack(fn, x, y, eps_list=[0.1], attack="cw")
    with pytest.raises(ValueError, match="key"):
        A.accuracy_under_attack(fn, x, y, eps_list=[0.1], attack="square")
    with pytest.raises(ValueError, match="loss"):
        A.apgd(fn, x, y, eps=0.1, loss="margin", key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        A.square(fn, x, y, eps=0.1)
    with pytest.raises(ValueError, match="eps_list"):
        A.accuracy_under_attack(fn, x, y, eps_list=[], attack="fgsm")


def test_one_module_wrapped_twice_shares_the_forward_pass():
    """An nnx module is wrapped in a new Partial each time; pairs made for one module,
    and the module bare beside Defended(module), still count as one forward pass."""
    from flax import nnx

    from gbjax.attacks.evaluation import _same_forward
    from gbjax.defences import Defended

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, K, rngs=rngs)

        def __call__(self, v):
            return self.lin(v.reshape(v.shape[0], -1))

    net, other = Net(nnx.Rngs(0)), Net(nnx.Rngs(1))

    def quantise(v):
        return jnp.round(v * 8) / 8

    wrap = A.as_logits_fn
    pairs = {p: A.make_attack_logits(net, quantise, p) for p in A.PROTOCOLS}
    scored = pairs["end_to_end"][1]
    assert _same_forward(pairs["bpda"][0], scored)  # the experiments' pairing
    assert _same_forward(pairs["end_to_end"][0], pairs["bpda"][1])
    assert not _same_forward(pairs["oblivious"][0], scored)
    assert _same_forward(wrap(net), Defended(net)) and _same_forward(Defended(net), wrap(net))
    assert _same_forward(wrap(net), wrap(net))
    # never the same: another module of the same structure, another preprocessor
    assert not _same_forward(wrap(net), Defended(other))
    assert not _same_forward(A.make_attack_logits(other, quantise, "bpda")[0], scored)
    assert not _same_forward(
        A.make_attack_logits(net, lambda v: jnp.round(v * 8) / 8, "bpda")[0], scored
    )
    assert not _same_forward(wrap(net), Defended(net, quantise))
    # and sharing leaves the scores as they were
    x = np.asarray(jax.random.uniform(jax.random.key(3), (24, H, W, 1)))
    y = np.asarray(jnp.argmax(net(quantise(x)), -1))
    kw = dict(eps_list=[0.05, 0.2], attack="pgd", steps=3, key=jax.random.key(0), progress=False)
    got = A.accuracy_under_attack(net, x, y, eval_logits_fn=Defended(net), per_image=True, **kw)
    ref = A.accuracy_under_attack(
        net, x, y, eval_logits_fn=Defended(net, lambda v: v), per_image=True, **kw
    )
    np.testing.assert_array_equal(got.robust, ref.robust)


def test_bpda_pair_reuses_the_forward_pass_and_scores_the_same():
    from gbjax.attacks.evaluation import _same_forward

    w = jax.random.normal(jax.random.key(8), (D, K))
    clf = Partial(lambda w, v: v.reshape(v.shape[0], -1) @ w, w)

    def quantise(v):
        return jnp.round(v * 8) / 8

    pairs = {p: A.make_attack_logits(clf, quantise, p) for p in A.PROTOCOLS}
    assert _same_forward(*pairs["bpda"]) and _same_forward(*pairs["end_to_end"])
    assert not _same_forward(*pairs["oblivious"])
    x = np.asarray(jax.random.uniform(jax.random.key(9), (40, H, W, 1)))
    y = np.asarray(jnp.argmax(clf(quantise(x)), -1))
    a, e = pairs["bpda"]
    kw = dict(eps_list=[0.05, 0.1], attack="pgd", steps=3, key=jax.random.key(0), progress=False)
    fast = A.accuracy_under_attack(a, x, y, eval_logits_fn=e, **kw)
    # the same scores when the scored function is a distinct but equal object
    slow = A.accuracy_under_attack(
        a, x, y, eval_logits_fn=A.make_attack_logits(clf, quantise, "bpda")[1], **kw
    )
    np.testing.assert_array_equal(fast, slow)


@pytest.mark.parametrize("attack", ["pgd", "apgd-ce", "apgd-dlr", "apgd-t"])
def test_dropping_fallen_rows_keeps_every_flag(trained, attack):
    """``compact=True`` (used by the evaluation drivers) goes on with the still-robust
    rows in smaller batches; the flags are those of the full batch, and the batches
    do get smaller."""
    from gbjax.attacks import scored
    from gbjax.attacks.apgd import apgd_run

    fn, x, y = trained
    shapes = set()

    def seen(params, v):  # traced once per batch shape
        shapes.add(v.shape[0])
        z = _mlp(params, v)
        if attack == "apgd-t":  # the targeted loss needs 4 classes: a fourth, never first
            z = jnp.concatenate([z, jnp.min(z, axis=1, keepdims=True) - 1.0], axis=1)
        return z

    counted = Partial(seen, fn.args[0])
    n = 96
    # rows with a wrong label fall at the first iterate, others as eps grows
    y_wrong = np.where(np.arange(n) % 3 == 0, (y[:n] + 1) % K, y[:n])
    xb, yb = jnp.asarray(x[:n]), jnp.asarray(y_wrong)
    eps = jnp.asarray(np.linspace(0.02, 0.4, n), jnp.float32)
    key = jax.random.key(4)
    got = {}
    for compact in (False, True):
        shapes.clear()
        if attack == "pgd":
            ok, _ = scored.pgd_robust(
                counted, counted, xb, yb, key, eps, eps / 4, 12, 0.0, 1.0,
                shared=True, chunk=1, compact=compact,
            )  # fmt: skip
        else:
            loss = {"apgd-ce": "ce", "apgd-dlr": "dlr", "apgd-t": "dlr-targeted"}[attack]
            ok, _ = apgd_run(
                counted, counted, xb, yb, key, eps, steps=12, loss=loss, shared=True,
                chunk=1, compact=compact,
            )  # fmt: skip
        got[compact] = np.asarray(ok)
        if compact:
            assert min(shapes) < n, shapes
        else:
            assert shapes == {n}
    assert 0 < got[False].sum() < n  # the test means something: some fell, some stood
    np.testing.assert_array_equal(got[True], got[False])


def test_clean_flags_given_or_computed_only_where_needed_give_the_same_flags(trained, monkeypatch):
    """The clean pass runs only on images still robust at some budget, and ``clean=``
    (the caller's own clean flags) skips it; the flags are the same every way."""
    from gbjax.attacks import scored

    fn, x, y = trained
    n = 64
    x, y = x[:n], np.where(np.arange(n) % 5 == 0, (y[:n] + 1) % K, y[:n])  # some wrong
    right = np.asarray(jnp.argmax(fn(jnp.asarray(x)), -1)) == y
    assert 0 < right.sum() < n
    prior = np.random.default_rng(0).random((2, n)) < 0.5
    prior[:, :8] = False  # eight images fallen everywhere already
    kw = dict(eps_list=[0.05, 0.1], attack="fgsm", per_image=True, progress=False)
    seen = []
    real = scored.correct

    def counting(eval_fn, xb, *a, **k):
        seen.append(xb.shape[0])
        return real(eval_fn, xb, *a, **k)

    monkeypatch.setattr(scored, "correct", counting)
    computed = A.accuracy_under_attack(fn, x, y, robust_so_far=prior, batch_size=16, **kw)
    assert sum(seen) < n  # the eight fallen images (and more) were not scored clean
    seen.clear()
    given = A.accuracy_under_attack(fn, x, y, robust_so_far=prior, clean=right, **kw)
    assert seen == []
    alone = A.accuracy_under_attack(fn, x, y, **kw)  # no prior: every image scored clean
    np.testing.assert_array_equal(computed.robust, given.robust)
    np.testing.assert_array_equal(computed.robust, alone.robust & prior)
    assert not computed.robust[:, ~right].any()
    with pytest.raises(ValueError, match="clean must be"):
        A.accuracy_under_attack(fn, x, y, clean=right[:-1], **kw)
    with pytest.raises(ValueError, match="clean must be"):
        A.accuracy_under_attack(fn, x, y, clean=right.astype(int), **kw)

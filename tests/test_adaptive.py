"""Attacks built against GB (issue 25): SPSA, the soft-assignment and partition
surrogates of GB's painting, and adversarial training."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.tree_util import Partial

from gbjax import attacks as A
from gbjax import defences
from gbjax.configs import airbench_cifar10
from gbjax.train import train_and_evaluate

H, W, K = 4, 4, 3
D = H * W


def _quantised(w, v):
    # 32 levels: SPSA's probes (delta = 0.01) cross a level often enough to see it
    return jnp.round(v.reshape(v.shape[0], -1) * 32) / 32 @ w


def test_spsa_succeeds_where_gradients_vanish():
    """A quantising first layer has zero input gradient: PGD cannot move, SPSA can."""
    fn = Partial(_quantised, jax.random.normal(jax.random.key(5), (D, K)))
    x = np.asarray(jax.random.uniform(jax.random.key(6), (48, H, W, 1)))
    y = np.asarray(jnp.argmax(fn(x), -1))
    g = jax.grad(lambda v: jnp.sum(fn(v)))(jnp.asarray(x))
    assert float(jnp.abs(g).max()) == 0.0
    kw = dict(eps_list=[0.25], key=jax.random.key(0), progress=False)
    pgd = A.accuracy_under_attack(fn, x, y, attack="pgd", random_start=False, steps=5, **kw)
    sp = A.accuracy_under_attack(fn, x, y, attack="spsa", steps=20, samples=32, **kw)
    assert pgd[0] == 1.0
    assert sp[0] < 0.6, sp
    adv = A.spsa(fn, x, y, eps=0.25, steps=20, samples=32, key=jax.random.key(0))
    assert adv.shape == x.shape and adv.dtype == x.dtype
    assert float(jnp.abs(adv - x).max()) <= 0.25 + 1e-6
    assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0


def test_spsa_scores_every_iterate():
    """An image fooled at some iterate stays non-robust even if a later one is right:
    the per-iterate flags are at most the final-iterate correctness."""
    fn = Partial(_quantised, jax.random.normal(jax.random.key(1), (D, K)))
    x = np.asarray(jax.random.uniform(jax.random.key(2), (32, H, W, 1)))
    y = np.asarray(jnp.argmax(fn(x), -1))
    from gbjax.attacks.spsa import spsa_run

    robust, adv = spsa_run(fn, x, y, jax.random.key(3), 0.2, steps=10, samples=16)
    final_ok = np.asarray(jnp.argmax(fn(adv), -1) == y)
    assert np.all(robust <= final_ok)


def test_spsa_bad_arguments():
    fn = Partial(_quantised, jnp.ones((D, K)))
    x, y = np.zeros((2, H, W, 1), np.float32), np.zeros(2, np.int32)
    with pytest.raises(ValueError, match="key"):
        A.spsa(fn, x, y, eps=0.1, key=None)
    with pytest.raises(ValueError, match="samples"):
        A.spsa(fn, x, y, eps=0.1, samples=1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="key"):
        A.accuracy_under_attack(fn, x, y, eps_list=[0.1], attack="spsa")
    with pytest.raises(ValueError, match="samples"):
        A.accuracy_under_attack(
            fn, x, y, eps_list=[0.1], attack="spsa", samples=0, key=jax.random.key(0)
        )


# ---------------------------------------------------------------- GB surrogates


def _photo(seed, n=2, size=8):
    rng = np.random.default_rng(seed)
    base = rng.uniform(0, 1, (n, 2, 2, 3))
    img = np.repeat(np.repeat(base, size // 2, 1), size // 2, 2)
    return np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("soft_purity", [False, True])
def test_surrogate_forward_is_gb_exactly(soft_purity):
    gb = defences.GB(threshold=20.0, purity=0.9)
    x = jnp.asarray(_photo(0))
    g = A.bpda(gb, A.SoftGB(gb, tau=100.0, soft_purity=soft_purity))
    np.testing.assert_array_equal(np.asarray(g(x)), np.asarray(gb(x)))
    w = jax.random.normal(jax.random.key(0), x.shape)
    # compiled: run eagerly, each operation of the gradient compiles on its own
    grad = jax.jit(jax.grad(lambda v: jnp.sum(w * g(v))))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(jnp.abs(grad).max()) > 0
    # the surrogate's gradient is not BPDA's identity
    assert not np.allclose(np.asarray(grad), np.asarray(w), atol=1e-3)


def test_soft_assignment_at_low_temperature_paints_nearest_kept_centre():
    """Numpy oracle: with a tiny tau, every pixel is painted with the kept centre nearest
    to it (the centres of GB's partition)."""
    gb = defences.GB(threshold=20.0, purity=0.9, quantize=False)
    x = _photo(1, n=3)
    res = gb.cluster(jnp.asarray(x))
    out = np.asarray(A.SoftGB(gb, tau=1e-3)(jnp.asarray(x)))
    for b in range(len(x)):
        X = x[b].reshape(-1, 3).astype(np.float64) * 255.0
        lab = np.asarray(res.labels[b]).reshape(-1)
        ids = np.unique(lab)
        cent = np.stack([X[lab == k].mean(0) for k in ids])
        kept = np.array([(lab == k).sum() >= gb.min_ball_size for k in ids])
        d2 = ((X[:, None, :] - cent[None]) ** 2).sum(-1)
        d2[:, ~kept] = np.inf
        want = cent[d2.argmin(1)] / 255.0
        np.testing.assert_allclose(out[b].reshape(-1, 3), want, atol=2e-4)


def _two_tone(offset=18.0, size=8):
    """One pure ball: half the pixels ``offset`` below 100 in the red channel, half
    above; every pixel within the threshold (20) of the centre, none far inside."""
    img = np.full((1, size, size, 3), 100.0, np.float32)
    img[0, :, : size // 2, 0] = 100.0 - offset
    img[0, :, size // 2 :, 0] = 100.0 + offset
    a = np.where(np.arange(size) < size // 2, 1.0, -1.0)
    a = np.broadcast_to(a[None, :, None], (size, size, 3)).copy()
    a[..., 1:] = 0.0
    return img / 255.0, a


def test_partition_attack_changes_the_partition_where_the_fixed_gradient_cannot():
    """A classifier that reads the contrast between the halves sees none in GB's
    painting (one ball); its gradient through the painting with the partition held
    fixed is zero (up to rounding), so the end-to-end FGSM step cannot split the ball. The partition
    surrogate's gradient pushes the pixels across the threshold: the ball splits."""
    gb = defences.GB(threshold=20.0, purity=0.9)
    x, a = _two_tone()
    x = jnp.asarray(x)
    a = jnp.asarray(a)

    def clf(v):
        s = jnp.sum(a * v, axis=(1, 2, 3))
        return jnp.stack([-s, s], -1)

    # the painting scores s = 0; the raw image scores s < 0, so against label 1 the
    # attacker gains by splitting the ball (pushing the halves apart)
    y = jnp.ones(1, jnp.int32)
    assert int(gb.cluster(x).n_balls[0]) == 1
    eps = 4.0 / 255.0
    e2e, _ = A.make_attack_logits(Partial(clf), gb, "end_to_end")
    g = np.asarray(A.loss_gradient(e2e, x, y))
    # zero up to float rounding, and the same for every member: with the partition
    # held fixed, a step can only shift the whole ball, never split it
    assert np.abs(g).max() < 1e-6 and np.ptp(g[..., 0]) == 0.0
    adv_e2e = A.fgsm(e2e, x, y, eps=eps)
    assert int(gb.cluster(adv_e2e).n_balls[0]) == 1
    surrogate = A.SoftGB(gb, tau=100.0, soft_purity=True)
    part, _ = A.make_attack_logits(Partial(clf), gb, "bpda", backward=surrogate)
    adv = A.fgsm(part, x, y, eps=eps)
    assert float(jnp.abs(adv - x).max()) <= eps + 1e-6
    assert int(gb.cluster(adv).n_balls[0]) >= 2


def test_surrogate_rejects_bad_settings():
    gb = defences.GB()
    for kw in (dict(tau=0.0), dict(width=-1.0), dict(purity_width=float("nan"))):
        with pytest.raises(ValueError):
            A.SoftGB(gb, **kw)


# ---------------------------------------------------------------- adversarial training


def _bands(n, seed):
    """CIFAR-shaped images whose class is a faint horizontal band: a class signal of
    a few grey levels that an eps = 8/255 attack can erase."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 4).astype(np.int32)
    x = rng.normal(128, 20, (n, 32, 32, 3))
    for c in range(4):
        x[y == c, 8 * c : 8 * c + 8] += 12.0
    return np.clip(np.round(x), 0, 255).astype(np.uint8), y


def test_adversarial_training_lowers_pgd_loss(tmp_path):
    """N-FGSM and PGD-2 training at 8/255 against a plainly trained twin (same data,
    seed and steps): their PGD loss on held-out images is lower."""
    xtr, ytr = _bands(512, 0)
    xte, yte = _bands(128, 1)
    out = {}
    at = dict(eps=8 / 255, eval_n=32, eval_steps=3)
    for name, adv in (("plain", {}), ("adv", at), ("pgd", dict(at, method="pgd", steps=2))):
        c = airbench_cifar10.get_config("smoke")
        c.data = {"train": (xtr, ytr), "test": (xte, yte)}
        c.num_train = c.num_test = None
        c.num_steps, c.progress, c.adversarial = 16, False, adv
        out[name] = train_and_evaluate(c, tmp_path / name)
    assert "pgd_accuracy" in out["pgd"].metrics and "pgd_accuracy" not in out["plain"].metrics
    x01 = jnp.asarray(xte, jnp.float32) / 255.0
    losses = {}
    for name, res in out.items():
        adv = A.pgd(res.model, x01, jnp.asarray(yte), eps=8 / 255, step_size=2 / 255,
                    steps=10, key=jax.random.key(0))  # fmt: skip
        losses[name] = float(jnp.mean(A.attack_loss(res.model, adv, jnp.asarray(yte))))
    assert losses["adv"] < losses["plain"] and losses["pgd"] < losses["plain"], losses


def _smoke_trainer(xtr, ytr, adv):
    from gbjax import train

    c = airbench_cifar10.get_config("smoke")
    c.data = {"train": (xtr, ytr), "test": (xtr, ytr)}
    c.num_train = c.num_test = None
    c.num_steps, c.progress, c.adversarial = 2, False, adv
    return train.Trainer(
        c, train.init_model(c, xtr, 4), num_classes=4, num_train=len(xtr), total_steps=2
    )


def test_adversarial_images_through_a_defence():
    """With a defence, the attack goes through it by BPDA and returns the defence's
    output: an identity defence changes nothing; a quantiser's output is on its grid
    and is the quantiser applied to an attack on the quantised model."""
    from gbjax import train

    x, y = _bands(16, 2)
    trainer = _smoke_trainer(x, y, dict(eps=8 / 255))
    state, key = trainer.init_state, jax.random.key(3)
    kw = dict(graphdef=trainer.train_graphdef, num_classes=4, eps=8 / 255)

    def adversarial(defence=None):  # compiled, as in the train step (not op by op)
        f = functools.partial(train.adversarial_images, defence=defence, **kw)
        return jax.jit(f)(state, x, y, key)

    plain = adversarial()
    same = adversarial(lambda v: v)
    np.testing.assert_array_equal(np.asarray(plain), np.asarray(same))

    def quarter(v):
        return jnp.round(v * 4) / 4

    q = np.asarray(adversarial(quarter))
    np.testing.assert_array_equal(q, np.round(q * 4) / 4)
    assert not np.array_equal(np.asarray(plain), np.round(np.asarray(plain) * 4) / 4)
    assert not np.array_equal(q, np.asarray(quarter(plain)))  # the gradient saw the quantiser


def test_gb_in_the_loop_trainer_paints_test_images_and_attacks_through_gb():
    """``adversarial['gb']``: the trainer's defence is GB with those parameters; its
    evaluation scores the painted images (the same as the model on gb_denoise's output)."""
    from gbjax import GBParams, gb_denoise, train

    x, y = _bands(32, 4)
    trainer = _smoke_trainer(x, y, dict(eps=2 / 255, gb=dict(threshold=20.0, purity=0.9)))
    assert trainer.defence == defences.GB(GBParams(threshold=20.0, purity=0.9))
    state = trainer.init_state
    ev = trainer.evaluate(state, x, y)
    painted = np.asarray(gb_denoise(x, threshold=20.0, purity=0.9))
    assert not np.array_equal(painted, x)
    ref = train.eval_step(state, painted, y, graphdef=trainer.eval_graphdef, batch_size=64)
    assert ev == pytest.approx(ref, abs=1e-6)
    assert 0.0 <= trainer.robust_accuracy(state, x[:8], y[:8]) <= 1.0


def test_gb_in_the_loop_adversarial_training_runs(tmp_path):
    """GB + N-FGSM end to end on tiny data: the jitted step paints with GB and attacks
    through it; the PGD accuracy (through GB by BPDA) is logged; bad GB keys refused."""
    from gbjax.config import validate_config

    xtr, ytr = _bands(256, 0)
    xte, yte = _bands(64, 1)
    c = airbench_cifar10.get_config("smoke")
    c.data = {"train": (xtr, ytr), "test": (xte, yte)}
    c.num_train = c.num_test = None
    c.num_steps, c.progress = 4, False
    c.adversarial = dict(eps=2 / 255, eval_n=16, eval_steps=2, gb=dict(threshold=20.0))
    res = train_and_evaluate(c, tmp_path / "gb_at")
    assert 0.0 <= res.metrics["pgd_accuracy"] <= 1.0 and np.isfinite(res.metrics["test_loss"])
    for bad in ({"threshold": -1.0}, {"thresh": 20.0}, 20.0):
        c.adversarial = dict(eps=2 / 255, gb=bad)
        with pytest.raises(ValueError, match="gb"):
            validate_config(c)

"""Tests for gbjax.attacks: FGSM, PGD, BPDA, EOT and the accuracy helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.tree_util import Partial

from gbjax import attacks as A

H, W_, C, K = 4, 4, 1, 3  # tiny images, 3 classes
D = H * W_ * C


# ---------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------


def linear_apply(params, x_BHWC):
    W_DK, b_K = params
    return x_BHWC.reshape(x_BHWC.shape[0], -1) @ W_DK + b_K


def make_linear(seed=0):
    kw, kb = jax.random.split(jax.random.key(seed))
    params = (jax.random.normal(kw, (D, K)), 0.1 * jax.random.normal(kb, (K,)))
    return params, Partial(linear_apply, params)


def mlp_apply(params, x_BHWC):
    (W1, b1), (W2, b2) = params
    h = jnp.tanh(x_BHWC.reshape(x_BHWC.shape[0], -1) @ W1 + b1)
    return h @ W2 + b2


def random_batch(seed, n=8):
    kx, ky = jax.random.split(jax.random.key(seed))
    x = jax.random.uniform(kx, (n, H, W_, C))
    y = jax.random.randint(ky, (n,), 0, K)
    return x, y


def np_fgsm_linear(params, x, y, eps, targeted=False):
    """FGSM by hand: d CE / dx = W (softmax(logits) - onehot(y)), reshaped."""
    W_DK, b_K = (np.asarray(p, np.float64) for p in params)
    x = np.asarray(x, np.float64)
    x_BD = x.reshape(x.shape[0], -1)
    logits = x_BD @ W_DK + b_K
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    grad_BD = (p - np.eye(K)[np.asarray(y)]) @ W_DK.T
    s = -1.0 if targeted else 1.0
    return np.clip(x_BD + s * eps * np.sign(grad_BD), 0.0, 1.0).reshape(x.shape)


@pytest.fixture(scope="module")
def trained():
    """A small MLP trained on separable synthetic templates (about 1 s)."""
    key = jax.random.key(42)
    k_t, k_n, k_y, k_1, k_2 = jax.random.split(key, 5)
    templates_KD = jax.random.uniform(k_t, (K, D))
    n = 192
    y = jax.random.randint(k_y, (n,), 0, K)
    x = jnp.clip(templates_KD[y] + 0.15 * jax.random.normal(k_n, (n, D)), 0, 1)
    x = x.reshape(n, H, W_, C)
    params = (
        (0.5 * jax.random.normal(k_1, (D, 16)), jnp.zeros(16)),
        (0.5 * jax.random.normal(k_2, (16, K)), jnp.zeros(K)),
    )
    opt = optax.adam(0.05)

    def loss(p):
        return optax.softmax_cross_entropy_with_integer_labels(mlp_apply(p, x), y).mean()

    def step(carry, _):
        p, s = carry
        g = jax.grad(loss)(p)
        u, s = opt.update(g, s)
        return (optax.apply_updates(p, u), s), None

    (params, _), _ = jax.jit(lambda p: jax.lax.scan(step, (p, opt.init(p)), None, 200))(params)
    fn = Partial(mlp_apply, params)
    acc = float(jnp.mean(jnp.argmax(fn(x), -1) == y))
    assert acc > 0.95, acc
    return fn, x, y


# ---------------------------------------------------------------------------
# FGSM
# ---------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    eps=st.floats(0.0, 0.5),
    targeted=st.booleans(),
)
def test_fgsm_matches_analytic_linear_softmax(seed, eps, targeted):
    params, fn = make_linear(seed % 7)
    x, y = random_batch(seed)
    got = A.fgsm(fn, x, y, eps=eps, targeted=targeted)
    want = np_fgsm_linear(params, x, y, eps, targeted)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


def test_eps_zero_returns_x():
    _, fn = make_linear()
    x, y = random_batch(1)
    np.testing.assert_array_equal(A.fgsm(fn, x, y, eps=0.0), x)
    np.testing.assert_array_equal(
        A.pgd(fn, x, y, eps=0, step_size=0.1, steps=3, key=jax.random.key(0)), x
    )


def test_no_retrace_for_new_params_or_nnx_models():
    traces = []

    def counted_apply(params, x):
        traces.append(1)
        return linear_apply(params, x)

    x, y = random_batch(2)
    for seed in range(3):
        params, _ = make_linear(seed)
        A.fgsm(Partial(counted_apply, params), x, y, eps=0.1 * (seed + 1))
        A.pgd(
            Partial(counted_apply, params),
            x,
            y,
            eps=0.1,
            step_size=0.02,
            steps=seed + 2,
            key=jax.random.key(seed),
            chunk=1,
        )
    n_first = len(traces)
    assert n_first <= 4  # one trace of fgsm, one of pgd (forward + grad per trace)
    params, _ = make_linear(5)
    A.fgsm(Partial(counted_apply, params), x, y, eps=0.3)
    assert len(traces) == n_first

    from flax import nnx

    class Lin(nnx.Module):
        def __init__(self, rngs):
            self.lin = nnx.Linear(D, K, rngs=rngs)

        def __call__(self, x):
            traces.append(1)
            return self.lin(x.reshape(x.shape[0], -1))

    A.fgsm(Lin(nnx.Rngs(0)), x, y, eps=0.1)
    n_nnx = len(traces)
    out = A.fgsm(Lin(nnx.Rngs(1)), x, y, eps=0.1)
    assert len(traces) == n_nnx
    # the second model's own weights were used
    m = Lin(nnx.Rngs(1))
    ref = A.fgsm(Partial(lambda x: m(x)), x, y, eps=0.1)
    np.testing.assert_allclose(out, ref, atol=1e-6)


# ---------------------------------------------------------------------------
# PGD
# ---------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    eps=st.floats(0.0, 0.6),
    rel_step=st.floats(0.1, 3.0),
    steps=st.integers(1, 12),
    random_start=st.booleans(),
    targeted=st.booleans(),
)
def test_pgd_stays_in_ball_and_box(seed, eps, rel_step, steps, random_start, targeted):
    _, fn = make_linear(seed % 5)
    x, y = random_batch(seed)
    # chunk=1: one compiled step serves every drawn step count
    x_adv = A.pgd(
        fn,
        x,
        y,
        eps=eps,
        step_size=max(rel_step * eps, 1e-3),
        steps=steps,
        key=jax.random.key(seed),
        random_start=random_start,
        targeted=targeted,
        chunk=1,
    )
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    x_adv = np.asarray(x_adv)
    assert np.all(np.abs(x_adv - np.asarray(x)) <= eps + 1e-6)
    assert np.all((x_adv >= 0.0) & (x_adv <= 1.0))


def test_pgd_custom_clip_range():
    _, fn = make_linear()
    x, y = random_batch(3)
    x = 0.2 + 0.6 * x
    x_adv = A.pgd(fn, x, y, eps=0.3, step_size=0.1, steps=5, key=jax.random.key(0), clip=(0.1, 0.9))
    assert float(x_adv.min()) >= 0.1 and float(x_adv.max()) <= 0.9


def test_pgd_at_least_as_strong_as_fgsm(trained):
    fn, x, y = trained
    x, y = x[:64], y[:64]
    eps = 0.15
    x_f = A.fgsm(fn, x, y, eps=eps)
    x_p = A.pgd(
        fn, x, y, eps=eps, step_size=2.5 * eps / 20, steps=20, key=jax.random.key(0), chunk=1
    )
    loss_clean = float(A.attack_loss(fn, x, y).mean())
    loss_f = float(A.attack_loss(fn, x_f, y).mean())
    loss_p = float(A.attack_loss(fn, x_p, y).mean())
    assert loss_clean < loss_f <= loss_p + 1e-4, (loss_clean, loss_f, loss_p)
    acc_f = float(jnp.mean(jnp.argmax(fn(x_f), -1) == y))
    acc_p = float(jnp.mean(jnp.argmax(fn(x_p), -1) == y))
    assert acc_p <= acc_f


def test_targeted_moves_toward_target(trained):
    fn, x, y = trained
    x, y = x[:32], y[:32]
    target = (y + 1) % K
    p_clean = jax.nn.softmax(fn(x))[jnp.arange(32), target]
    x_f = A.fgsm(fn, x, target, eps=0.1, targeted=True)
    x_p = A.pgd(
        fn,
        x,
        target,
        eps=0.3,
        step_size=0.05,
        steps=20,
        key=jax.random.key(1),
        targeted=True,
        chunk=1,
    )
    p_f = jax.nn.softmax(fn(x_f))[jnp.arange(32), target]
    p_p = jax.nn.softmax(fn(x_p))[jnp.arange(32), target]
    assert float(p_f.mean()) > float(p_clean.mean())
    assert float(p_p.mean()) > float(p_f.mean())
    assert float(jnp.mean(jnp.argmax(fn(x_p), -1) == target)) > 0.8
    # targeted loss goes down, untargeted one (towards the same labels) goes up
    assert float(A.attack_loss(fn, x_f, target).mean()) < float(A.attack_loss(fn, x, target).mean())


# ---------------------------------------------------------------------------
# BPDA and protocols
# ---------------------------------------------------------------------------


def quantise(x):
    return jnp.round(x * 8) / 8


def smooth_quantise(x):
    # a differentiable approximation of quantise with a non-trivial derivative
    return x - jnp.sin(2 * jnp.pi * 8 * x) / (2 * jnp.pi * 8)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_bpda_forward_exact_backward_identity_or_smooth_vjp(seed):
    x, _ = random_batch(seed)
    w = jax.random.normal(jax.random.key(seed + 1), x.shape)
    g = A.bpda(quantise)
    np.testing.assert_array_equal(g(x), quantise(x))
    # end-to-end gradient of the quantiser is zero: gradient masking
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(w * quantise(v)))(x), 0.0)
    # identity backward: d/dx sum(w * g(x)) == w
    np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(w * g(v)))(x), w, rtol=1e-6)
    # identity backward composes with the chain rule
    gx = jax.grad(lambda v: jnp.sum(jnp.sin(g(v))))(x)
    np.testing.assert_allclose(gx, jnp.cos(quantise(x)), rtol=1e-5, atol=1e-6)
    # smooth backward: gradient is the VJP of the approximation
    gs = A.bpda(quantise, smooth_quantise)
    np.testing.assert_array_equal(gs(x), quantise(x))
    got = jax.grad(lambda v: jnp.sum(w * gs(v)))(x)
    want = jax.vjp(smooth_quantise, x)[1](w)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_bpda_inside_jit_and_with_key_argument():
    x, _ = random_batch(0)
    g = A.bpda(lambda v, key: quantise(v + 0.05 * jax.random.normal(key, v.shape)))
    key = jax.random.key(3)
    grad = jax.jit(jax.grad(lambda v, k: jnp.sum(3.0 * g(v, k))))(x, key)
    np.testing.assert_allclose(grad, 3.0)


def test_bpda_identity_needs_shape_preserving_forward():
    g = A.bpda(lambda v: v.mean(axis=-1))
    with pytest.raises(ValueError, match="shape"):
        jax.grad(lambda v: g(v).sum())(jnp.ones((2, 4, 4, 3)))


def test_three_protocols_on_quantiser_defence():
    params, fn = make_linear(0)
    x, y = random_batch(7, n=64)
    # label the data with the defended model so that clean accuracy is 1
    y = jnp.argmax(fn(quantise(x)), -1)
    key = jax.random.key(0)
    acc = {}
    for protocol in A.PROTOCOLS:
        attack_fn, eval_fn = A.make_attack_logits(fn, quantise, protocol)
        np.testing.assert_allclose(eval_fn(x), fn(quantise(x)), rtol=1e-6)
        x_adv = A.pgd(
            attack_fn,
            x,
            y,
            eps=0.25,
            step_size=0.05,
            steps=10,
            key=key,
            random_start=False,
            chunk=1,
        )
        acc[protocol] = float(jnp.mean(jnp.argmax(eval_fn(x_adv), -1) == y))
    # the end-to-end gradient is zero (gradient masking): the attack cannot move
    assert acc["end_to_end"] == 1.0
    # BPDA and oblivious break the quantiser on a linear model (identity is exact a.e.)
    assert acc["bpda"] < 0.3 and acc["oblivious"] < 0.3
    attack_fn, _ = A.make_attack_logits(fn, quantise, "oblivious")
    np.testing.assert_allclose(attack_fn(x), fn(x))


# ---------------------------------------------------------------------------
# EOT
# ---------------------------------------------------------------------------


def random_scale(x, key):
    """Randomised 'defence' whose gradient depends on the key."""
    s = jax.random.uniform(key, (x.shape[0], 1, 1, 1), minval=-1.0, maxval=1.0)
    return x * s


def test_eot_averages_gradients_over_draws():
    _, fn = make_linear(1)
    x, y = random_batch(4)
    attack_fn, _ = A.make_attack_logits(fn, random_scale, "end_to_end", randomized=True)
    key, n = jax.random.key(9), 6

    def loss(v, k):
        return jnp.sum(optax.softmax_cross_entropy_with_integer_labels(attack_fn(v, k), y))

    manual = sum(jax.grad(loss)(x, k) for k in jax.random.split(key, n)) / n
    got = A.loss_gradient(attack_fn, x, y, key=key, eot_samples=n)
    np.testing.assert_allclose(got, manual, rtol=1e-5, atol=1e-6)
    one = A.loss_gradient(attack_fn, x, y, key=key, eot_samples=1)
    assert not np.allclose(one, manual)
    # FGSM with EOT steps along the sign of the averaged gradient
    x_f = A.fgsm(attack_fn, x, y, eps=0.1, key=key, eot_samples=n)
    np.testing.assert_allclose(x_f, jnp.clip(x + 0.1 * jnp.sign(manual), 0, 1), atol=1e-6)
    # PGD with EOT runs and stays in the ball
    x_p = A.pgd(attack_fn, x, y, eps=0.1, step_size=0.03, steps=4, key=key, eot_samples=3, chunk=1)
    assert float(jnp.abs(x_p - x).max()) <= 0.1 + 1e-6


def test_eot_converges_to_expected_gradient():
    # logits = s * (x W) with s ~ U(0, 1): at x = 0 the softmax is uniform for every s,
    # so grad_x CE = s * W (1/K - onehot(y)) and its expectation uses E[s] = 0.5.
    W = jax.random.normal(jax.random.key(0), (D, K))

    def fn(x, key):
        s = jax.random.uniform(key, ())
        return s * (x.reshape(x.shape[0], -1) @ W)

    x, y = random_batch(5, n=1)
    x = jnp.zeros_like(x)  # at x=0 softmax is uniform: grad = s * W (1/K - onehot)
    g = A.loss_gradient(fn, x, y, key=jax.random.key(1), eot_samples=4000)
    want = 0.5 * (W @ (jnp.full(K, 1 / K) - jax.nn.one_hot(y[0], K))).reshape(x.shape)
    np.testing.assert_allclose(g, want, atol=0.05 * float(jnp.abs(want).max()))


def test_randomized_pipeline_needs_key():
    _, fn = make_linear()
    attack_fn, eval_fn = A.make_attack_logits(fn, random_scale, "bpda", randomized=True)
    x, y = random_batch(0)
    with pytest.raises(ValueError, match="key"):
        eval_fn(x)
    with pytest.raises(ValueError, match="key"):
        A.fgsm(attack_fn, x, y, eps=0.1, eot_samples=2)


# ---------------------------------------------------------------------------
# Accuracy helpers
# ---------------------------------------------------------------------------


def test_accuracy_under_attack_ragged_batches_compile_once():
    traces = []

    def counted(params, x):
        traces.append(1)
        return linear_apply(params, x)

    params, _ = make_linear(2)
    fn = Partial(counted, params)
    x, y = random_batch(11, n=50)
    eps_list = [0.0, 0.05, 0.2]
    acc = A.accuracy_under_attack(
        fn,
        np.asarray(x),
        np.asarray(y),
        eps_list=eps_list,
        attack="fgsm",
        batch_size=16,
        progress=False,
    )
    # robust: right on the clean image and on the adversarial one
    clean_ok = np.argmax(linear_apply(params, x), -1) == np.asarray(y)
    want = [
        np.mean(
            clean_ok
            & (
                np.argmax(linear_apply(params, np_fgsm_linear(params, x, y, e)), -1)
                == np.asarray(y)
            )
        )
        for e in eps_list
    ]
    np.testing.assert_allclose(acc, want)
    assert acc[0] == pytest.approx(float(jnp.mean(jnp.argmax(fn(x), -1) == y)))
    n_traces = len(traces)
    # new eps values, same shapes: nothing is traced again
    A.accuracy_under_attack(
        fn,
        np.asarray(x),
        np.asarray(y),
        eps_list=[0.1, 0.3],
        attack="fgsm",
        batch_size=16,
        progress=False,
    )
    assert len(traces) == n_traces
    # uint8 input is scaled by 1/255 on device
    x8 = np.round(np.asarray(x) * 255).astype(np.uint8)
    acc8 = A.accuracy_under_attack(
        fn, x8, np.asarray(y), eps_list=[0.0], attack="fgsm", batch_size=16, progress=False
    )
    clean8 = np.mean(np.argmax(fn(jnp.asarray(x8, jnp.float32) / 255), -1) == np.asarray(y))
    assert acc8[0] == pytest.approx(clean8)


def test_sanity_check_pgd_le_fgsm_and_chance(trained):
    fn, x, y = trained
    report = A.attack_sanity_check(
        fn,
        x,
        y,
        eps_list=[0.0, 0.05, 0.15, 0.5],
        num_classes=K,
        key=jax.random.key(0),
        batch_size=64,
        steps=10,
        chunk=10,
        raise_on_failure=True,
    )
    assert report.ok
    assert report.fgsm_accuracy[0] == report.pgd_accuracy[0] > 0.95
    assert report.pgd_accuracy[-1] <= 1 / K
    assert "PGD <= FGSM: True" in str(report)


def test_accuracy_under_attack_with_protocol_and_eot():
    _, fn = make_linear(3)
    x, y = random_batch(12, n=20)

    def jitter(v, key):  # a mildly randomised defence: small additive noise
        return v + 0.01 * jax.random.normal(key, v.shape)

    attack_fn, eval_fn = A.make_attack_logits(fn, jitter, "bpda", randomized=True)
    kw = dict(attack="pgd", steps=3, batch_size=8, eval_logits_fn=eval_fn,
              key=jax.random.key(0), eot_samples=2, chunk=3, progress=False)  # fmt: skip
    acc = A.accuracy_under_attack(attack_fn, x, y, eps_list=[0.0, 0.05, 0.3], **kw)
    # eps 0 is the randomised model's clean accuracy; the attack only lowers it,
    # and at eps 0.3 on this linear model it succeeds on most images
    assert acc[0] >= acc[1] >= acc[2]
    assert acc[2] < acc[0] - 0.2
    # the same call is deterministic for a given key
    np.testing.assert_array_equal(
        A.accuracy_under_attack(attack_fn, x, y, eps_list=[0.0, 0.05, 0.3], **kw), acc
    )


@pytest.mark.parametrize("targeted", [False, True])
def test_pgd_restarts_pick_per_example_best_of_the_runs(trained, targeted):
    fn, x, y = trained
    x, y = x[:64], (y[:64] + 1) % K if targeted else y[:64]
    key = jax.random.key(7)
    args = dict(eps=0.08, step_size=0.02, steps=4, targeted=targeted, chunk=1)
    one = A.pgd(fn, x, y, key=key, **args)
    np.testing.assert_array_equal(A.pgd(fn, x, y, key=key, restarts=1, **args), one)
    # the candidates by hand: restart 0 is the plain run, restart r uses fold_in(key, r)
    cands = [one] + [A.pgd(fn, x, y, key=jax.random.fold_in(key, r), **args) for r in (1, 2)]
    best = np.asarray(A.pgd(fn, x, y, key=key, restarts=3, **args))
    logits = [np.asarray(fn(c)) for c in cands]
    hit = np.stack([(z.argmax(-1) == np.asarray(y)) == targeted for z in logits])  # (R, B)
    loss = np.stack([np.asarray(A.attack_loss(fn, c, y)) for c in cands])
    score = -loss if targeted else loss
    for i in range(len(y)):
        # the result is one of the three iterates, and the best one by (success, score)
        match = [r for r in range(3) if np.array_equal(best[i], np.asarray(cands[r][i]))]
        assert match, i
        r = match[0]
        assert hit[r, i] == hit[:, i].any()
        assert score[r, i] >= score[hit[:, i] == hit[r, i], i].max() - 1e-6
    # more restarts never make the attack weaker on these examples
    succ = lambda xa: (np.asarray(fn(xa)).argmax(-1) == np.asarray(y)) == targeted
    assert np.all(succ(best) >= succ(one))


def test_accuracy_under_attack_restarts_is_worst_case_over_restarts(trained):
    fn, x, y = trained
    kw = dict(
        eps_list=[0.0, 0.1, 0.2],
        attack="pgd",
        steps=2,
        batch_size=50,
        key=jax.random.key(3),
        chunk=2,
        progress=False,
    )
    a1 = A.accuracy_under_attack(fn, x, y, **kw)
    a4 = A.accuracy_under_attack(fn, x, y, restarts=4, **kw)
    assert a4[0] == a1[0]  # eps 0: every restart is the clean image
    assert np.all(a4 <= a1)  # restart 0 is the restarts=1 attack
    # restarts fool different examples: four restarts break some image one does not
    assert np.any(a4 < a1)
    # per image: robust under 4 restarts implies robust under the first
    p1 = A.accuracy_under_attack(fn, x, y, per_image=True, **kw)
    p4 = A.accuracy_under_attack(fn, x, y, restarts=4, per_image=True, **kw)
    assert not (p4.robust & ~p1.robust).any()


def test_restarts_bad_args():
    _, fn = make_linear()
    x, y = random_batch(0)
    args = dict(eps=0.1, step_size=0.01, steps=3, key=jax.random.key(0))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="restarts"):
            A.pgd(fn, x, y, restarts=bad, **args)
    with pytest.raises(ValueError, match="random_start"):
        A.pgd(fn, x, y, restarts=2, random_start=False, **args)
    with pytest.raises(ValueError, match="restarts"):
        A.accuracy_under_attack(fn, x, y, eps_list=[0.1], attack="fgsm", restarts=2, progress=False)


# ---------------------------------------------------------------------------
# Argument validation
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(eps=-0.1), "eps"),
        (dict(eps=float("nan")), "eps"),
        (dict(eps=0.1, clip=(1.0, 0.0)), "clip"),
        (dict(eps=0.1, clip=(0.0,)), "clip"),
        (dict(eps=0.1, clip="bad"), "clip"),
        (dict(eps=0.1, eot_samples=0, key=jax.random.key(0)), "eot_samples"),
        (dict(eps=0.1, eot_samples=2), "key"),
    ],
)
def test_fgsm_bad_args(kwargs, name):
    _, fn = make_linear()
    x, y = random_batch(0)
    with pytest.raises(ValueError, match=name):
        A.fgsm(fn, x, y, **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(eps=-1.0), "eps"),
        (dict(steps=0), "steps"),
        (dict(steps=2.5), "steps"),
        (dict(step_size=0.0), "step_size"),
        (dict(step_size=-0.1), "step_size"),
        (dict(clip=(0.5, 0.5)), "clip"),
        (dict(key=None), "key"),
    ],
)
def test_pgd_bad_args(kwargs, name):
    _, fn = make_linear()
    x, y = random_batch(0)
    args = dict(eps=0.1, step_size=0.01, steps=3, key=jax.random.key(0))
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        A.pgd(fn, x, y, **args)


def test_other_bad_args():
    _, fn = make_linear()
    x, y = random_batch(0)
    with pytest.raises(ValueError, match="x must be a float"):
        A.fgsm(fn, (x * 255).astype(jnp.uint8), y, eps=0.1)
    with pytest.raises(ValueError, match="y must"):
        A.fgsm(fn, x, y[:3], eps=0.1)
    with pytest.raises(ValueError, match="protocol"):
        A.make_attack_logits(fn, quantise, "adaptive")
    with pytest.raises(ValueError, match="attack"):
        A.accuracy_under_attack(fn, x, y, eps_list=[0.1], attack="cw")
    with pytest.raises(ValueError, match="batch_size"):
        A.accuracy_under_attack(fn, x, y, eps_list=[0.1], attack="fgsm", batch_size=0)
    with pytest.raises(ValueError, match="num_classes"):
        A.attack_sanity_check(fn, x, y, eps_list=[0.1], num_classes=1, key=jax.random.key(0))
    # random_start without key, no-random-start without key is fine
    A.pgd(fn, x, y, eps=0.1, step_size=0.01, steps=2, random_start=False)
    with pytest.raises(ValueError, match="key"):
        A.accuracy_under_attack(fn, x, y, eps_list=[0.1], attack="pgd")


@pytest.mark.filterwarnings("ignore:unroll= is deprecated:DeprecationWarning")
def test_pgd_unroll_modes_agree():
    """The deprecated unroll= (chunk's old form) still works in every mode."""
    _, fn = make_linear(4)
    x, y = random_batch(6)
    kw = dict(eps=0.2, step_size=0.03, steps=5, key=jax.random.key(2))
    looped = A.pgd(fn, x, y, unroll=1, **kw)
    for unroll in (True, 2, None):
        np.testing.assert_allclose(A.pgd(fn, x, y, unroll=unroll, **kw), looped, atol=1e-6)
    with pytest.raises(ValueError, match="unroll"):
        A.pgd(fn, x, y, unroll=0, **kw)
    # under an outer jit, steps traced: the while-loop form is used
    out = jax.jit(
        lambda s: A.pgd(fn, x, y, eps=0.2, step_size=0.03, steps=s, key=jax.random.key(2))
    )(5)
    np.testing.assert_allclose(out, looped, atol=1e-6)


@pytest.mark.slow
def test_gb_denoise_attackable_three_ways():
    """The granular-ball preprocessor works with every protocol (about 20 s of compiles)."""
    import functools

    from gbjax import gb

    # static configuration goes in functools.partial (jax Partial would trace it)
    pre = functools.partial(gb.gb_denoise, scale=255.0, capacity=16)
    params, fn = make_linear(0)
    x, y = random_batch(3, n=4)
    x = jax.image.resize(x, (4, 8, 8, 1), "nearest")
    W = jnp.tile(params[0], (4, 1))
    fn = Partial(lambda W, v: v.reshape(v.shape[0], -1) @ W, W)
    g = A.bpda(pre)
    np.testing.assert_array_equal(g(x), pre(x))
    np.testing.assert_allclose(jax.grad(lambda v: jnp.sum(g(v)))(x), 1.0)
    clean = float(A.attack_loss(fn, pre(x), y).mean())
    for protocol in A.PROTOCOLS:
        attack_fn, eval_fn = A.make_attack_logits(fn, pre, protocol)
        x_adv = A.fgsm(attack_fn, x, y, eps=0.1)
        assert float(jnp.abs(x_adv - x).max()) <= 0.1 + 1e-6
        if protocol != "end_to_end":
            assert float(A.attack_loss(eval_fn, x_adv, y).mean()) > clean, protocol

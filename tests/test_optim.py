"""Tests for gbjax.optim, and a Config's optimiser (gbjax.train.make_optimizer), against
hand-computed updates (numpy, float64)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gbjax import optim, train
from gbjax.config import Config

RNG = np.random.default_rng(0)


def _params():
    return {
        "conv": {"kernel": jnp.asarray(RNG.normal(size=(2, 3)), jnp.float32)},
        "norm1": {"bias": jnp.asarray(RNG.normal(size=(3,)), jnp.float32)},
        "whiten_bias": jnp.asarray(RNG.normal(size=(3,)), jnp.float32),
        "head": {"bias": jnp.asarray(RNG.normal(size=(3,)), jnp.float32)},
    }


def test_param_labels_first_matching_group_wins():
    groups = {
        "norm_bias": optim.GroupSpec(pattern=r"norm\d+/bias"),
        "any_bias": optim.GroupSpec(pattern=r"bias"),
    }
    labels = optim.param_labels(_params(), groups)
    assert labels == {
        "conv": {"kernel": "default"},
        "norm1": {"bias": "norm_bias"},
        "whiten_bias": "any_bias",
        "head": {"bias": "any_bias"},
    }
    with pytest.raises(ValueError, match="reserved"):
        optim.grouped(lambda *a: optax.sgd(1.0), _params(), {"default": groups["any_bias"]},
                      weight_decay=0.0)  # fmt: skip


def test_piecewise_linear_factor():
    f = optim.piecewise_linear(10, warmup_steps=4, start=0.2, end=0.05)
    got = [float(f(t)) for t in range(12)]
    want = [0.2 + 0.8 * t / 4 for t in range(4)] + [1 - 0.95 * (t - 4) / 6 for t in range(4, 10)]
    want += [0.05, 0.05]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def _torch_sgd(params, grads_seq, *, lr_fn, groups, momentum):
    """PyTorch SGD (Nesterov, weight_decay added to the gradient) per group, by hand.

    ``groups``: leaf name -> (lr multiplier, weight decay, trainable steps or None)."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    buf = {k: np.zeros_like(v) for k, v in p.items()}
    for t, g in enumerate(grads_seq):
        for k in p:
            scale, wd, until = groups[k]
            if until is not None and t >= until:
                continue  # frozen: PyTorch skips the parameter (requires_grad=False)
            d = g[k] + wd * p[k]
            buf[k] = momentum * buf[k] + d
            p[k] = p[k] - lr_fn(t) * scale * (d + momentum * buf[k])
    return p


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in path): v
            for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip


def test_make_optimizer_groups_match_hand_computed_sgd():
    cfg = Config(
        optimizer="sgd", momentum=0.85, nesterov=True, learning_rate=0.1, schedule="onecycle",
        warmup_fraction=0.25, schedule_start_factor=0.2, schedule_end_factor=0.07,
        weight_decay=0.3,
        param_groups={
            "norm_bias": dict(pattern=r"norm\d+/bias", lr_scale=8.0, weight_decay=0.01),
            "whiten_bias": dict(pattern="whiten_bias", weight_decay=0.3, trainable_epochs=2),
        },
    )  # fmt: skip
    total, spe = 8, 1  # trainable_epochs=2 -> 2 steps
    params = _params()
    tx = train.make_optimizer(cfg, total, params=params, steps_per_epoch=spe)
    state = tx.init(params)
    grads_seq = [jax.tree.map(lambda a: jnp.asarray(RNG.normal(size=a.shape), a.dtype), params)
                 for _ in range(total)]  # fmt: skip
    p = params
    for g in grads_seq:
        u, state = tx.update(g, state, p)
        p = optax.apply_updates(p, u)
    sched = train.make_schedule(cfg, total)
    fp, fg = _flat(params), [_flat(g) for g in grads_seq]
    groups = {
        "conv/kernel": (1.0, 0.3, None),  # default group: decay on ndim > 1 ...
        "head/bias": (1.0, 0.0, None),  # ... and none on vectors
        "norm1/bias": (8.0, 0.01, None),
        "whiten_bias": (1.0, 0.3, 2),
    }
    want = _torch_sgd(fp, fg, lr_fn=lambda t: float(sched(t)), groups=groups, momentum=0.85)
    got = _flat(p)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # the frozen group really stopped after 2 updates
    assert not np.allclose(got["whiten_bias"], fp["whiten_bias"])


@pytest.mark.parametrize("final_step", [None, 7])
def test_lookahead_matches_hand_computation(final_step):
    period, d = 2, 0.25
    tx = optax.chain(optax.sgd(1.0), optim.lookahead(period, lambda t: d, final_step=final_step))
    p = {"w": jnp.asarray(RNG.normal(size=(4,)), jnp.float32)}
    state = tx.init(p)
    grads = [np.asarray(RNG.normal(size=(4,)), np.float32) for _ in range(7)]
    fast, slow = np.asarray(p["w"], np.float64), np.asarray(p["w"], np.float64)
    for t, g in enumerate(grads, start=1):
        u, state = tx.update({"w": jnp.asarray(g)}, state, p)
        p = optax.apply_updates(p, u)
        fast = fast - g
        if t % period == 0:
            slow = d * slow + (1 - d) * fast
            fast = slow.copy()
        elif t == final_step:
            fast = slow.copy()  # decay 1: the fast weights take the slow ones
        np.testing.assert_allclose(p["w"], fast, rtol=1e-5, atol=1e-6, err_msg=f"t={t}")
    np.testing.assert_allclose(state[1].slow["w"], slow, rtol=1e-5, atol=1e-6)


def test_lookahead_mix_keeps_integer_leaves_and_unsynced_values():
    slow = {"a": jnp.ones(3), "n": jnp.asarray(1, jnp.int32)}
    fast = {"a": jnp.zeros(3), "n": jnp.asarray(5, jnp.int32)}
    out = optim.lookahead_mix(slow, fast, jnp.asarray(True), 0.75)
    np.testing.assert_allclose(out["a"], 0.75)
    assert int(out["n"]) == 5
    out = optim.lookahead_mix(slow, fast, jnp.asarray(False), 0.75)
    np.testing.assert_array_equal(out["a"], slow["a"])


def test_param_groups_need_params():
    cfg = dataclasses.replace(Config(), param_groups={"b": dict(pattern="bias")})
    with pytest.raises(ValueError, match="params"):
        train.make_optimizer(cfg, 10)

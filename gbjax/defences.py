"""Preprocessing defences and the defended model (docs/methods.md, sections 1 and 4).

* :class:`GB`: granular-ball painting as a defence ``g(x)`` on float images in
  [0, 1], hashable (a frozen dataclass), so attacks compile once per parameter
  set;
* :class:`Defended`: a classifier composed with a defence, the function every
  experiment evaluates and attacks, clean and adversarial alike.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from gbjax.attacks._core import PytreeCallable, as_logits_fn

__all__ = ["GB", "Defended"]


def _round_straight_through(v):
    """``round(v)`` forward, identity backward."""
    return v + jax.lax.stop_gradient(jnp.round(v) - v)


def check_images01(x, name: str = "x") -> None:
    """Shape (B, H, W, C) float in [0, 1]; value checks only on concrete arrays."""
    if np.ndim(x) != 4:
        raise ValueError(f"{name} must be a (B, H, W, C) batch, got shape {np.shape(x)}")
    if not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise ValueError(f"{name} must be float in [0, 1], got dtype {jnp.result_type(x)}")
    if isinstance(x, jax.core.Tracer):
        return
    a = np.asarray(x)
    if a.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    if a.min() < 0 or a.max() > 1:
        raise ValueError(f"{name} must be in [0, 1], got values in [{a.min()}, {a.max()}]")


@dataclasses.dataclass(frozen=True)
class GB:
    """Granular-ball painting of ``(B, H, W, C)`` float images in [0, 1].

    ``gb_denoise(x, threshold=, purity=, capacity=, min_ball_size=, scale=255)``;
    with ``quantize=True`` (default) the painted colours are rounded to the 256
    levels of a uint8 image, exactly the images a GB model is trained on
    (``gbjax.data.gb_processed``), with a straight-through gradient. The
    gradient w.r.t. ``x`` is that of the painting with the partition held fixed
    (each pixel moves its ball's centre), so an end-to-end attack sees a real,
    if partial, gradient; BPDA replaces it by the identity.
    """

    threshold: float = 20.0
    purity: float = 0.9
    capacity: int = 256
    min_ball_size: int = 2
    quantize: bool = True

    def __post_init__(self):
        if not (isinstance(self.threshold, (int, float)) and math.isfinite(self.threshold)
                and self.threshold > 0):  # fmt: skip
            raise ValueError(f"threshold: expected a finite number > 0, got {self.threshold!r}")
        if not (isinstance(self.purity, (int, float)) and 0 < self.purity <= 1):
            raise ValueError(f"purity: expected a number in (0, 1], got {self.purity!r}")

    def cluster(self, x):
        """The :class:`gbjax.GBResult` of ``x`` (float [0, 1])."""
        from gbjax import gb

        check_images01(x)
        return gb.gb_cluster(
            x, threshold=self.threshold, purity=self.purity, capacity=self.capacity,
            min_ball_size=self.min_ball_size, scale=255.0,
        )  # fmt: skip

    def __call__(self, x):
        out = self.cluster(x).image
        if self.quantize:
            out = _round_straight_through(out * 255.0) / 255.0
        return out


@jax.tree_util.register_pytree_node_class
class Defended(PytreeCallable):
    """The defended model ``classifier(preprocess(x[, key]))``, a jit-friendly pytree.

    ``classifier``: an eval-mode ``nnx.Module`` or any logits function;
    ``preprocess``: a defence such as :class:`GB` (any ``g(x) -> x'`` on [0, 1]
    float images), or ``None`` for the classifier alone. With
    ``randomized=True`` it is called as ``f(x, key)`` and the key goes to the
    preprocessor. Evaluate it with :mod:`gbjax.evaluate` and attack it with
    :mod:`gbjax.attacks` like any model; uint8 images are divided by 255 first.
    """

    def __init__(self, classifier, preprocess=None, *, randomized: bool = False):
        self.classifier = as_logits_fn(classifier)
        self.preprocess = None if preprocess is None else as_logits_fn(preprocess)
        self.randomized = bool(randomized)

    def __call__(self, x, key=None):
        if self.preprocess is not None and jnp.issubdtype(x.dtype, jnp.integer):
            x = x.astype(jnp.float32) / 255.0
        if self.randomized and key is None:
            raise ValueError(
                "this pipeline has a randomised preprocessor: call it as f(x, key) "
                "(attacks: pass eot_samples and key)"
            )
        if self.preprocess is not None:
            x = self.preprocess(x, key) if self.randomized else self.preprocess(x)
        return self.classifier(x)

    def tree_flatten(self):
        return (self.classifier, self.preprocess), self.randomized

    @classmethod
    def tree_unflatten(cls, randomized, children):
        obj = object.__new__(cls)
        obj.classifier, obj.preprocess = children
        obj.randomized = randomized
        return obj

    def __repr__(self):
        return (
            f"Defended(classifier={self.classifier!r}, preprocess={self.preprocess!r}, "
            f"randomized={self.randomized})"
        )

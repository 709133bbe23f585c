"""Batched prediction and accuracy: the one place every caller evaluates a model.

``model`` is anything :func:`gbjax.attacks.as_logits_fn` accepts: an eval-mode
``nnx.Module`` (call ``model.eval()`` first), a :class:`gbjax.defences.Defended`
model, a ``jax.tree_util.Partial`` or a plain callable. Images are uint8 NHWC
or floats in [0, 1]. The data are cut into fixed-size batches (the last one
padded, see :func:`gbjax.data.map_batches`), so a whole evaluation compiles
once per (model structure, batch shape, TTA level).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

from gbjax import _xla
from gbjax._batching import map_batches
from gbjax._callables import LogitsFn, as_logits_fn
from gbjax.augment import TTA_LEVELS, tta_logits

__all__ = ["predict_logits", "predict", "accuracy", "evaluate"]


@_xla.conv_jit(static_argnames=("tta",))
def _logits(fn, x_BHWC, *, tta):
    return tta_logits(fn, x_BHWC, tta)


def _check(x, y=None):
    shape = np.shape(x)
    if len(shape) != 4:
        raise ValueError(f"x must be a batch of NHWC images, got shape {shape}")
    if shape[0] == 0:
        raise ValueError("x is empty")
    dt = np.dtype(getattr(x, "dtype", np.float32))
    if not (dt == np.uint8 or np.issubdtype(dt, np.floating)):
        raise ValueError(f"x must be uint8 or float in [0, 1], got dtype {dt}")
    if y is not None and (np.ndim(y) != 1 or np.shape(y)[0] != shape[0]):
        raise ValueError(f"y must have shape ({shape[0]},), got {np.shape(y)}")


def _check_logits(logits: np.ndarray, y=None) -> None:
    """Refuses non-finite logits (``argmax`` of NaN is class 0, so a broken model
    would be scored as predicting class 0) and labels outside ``[0, num_classes)``."""
    bad = np.flatnonzero(~np.all(np.isfinite(logits), axis=-1))
    if len(bad):
        raise ValueError(
            f"the model returned NaN or inf logits for {len(bad)} of {len(logits)} images "
            f"(e.g. image {bad[0]}); argmax would count them as class 0. Fix the model "
            "(weights, input scaling, normalisation), or inspect predict_logits(...)"
        )
    if y is None:
        return
    y = np.asarray(y)
    k = logits.shape[-1]
    out = np.flatnonzero((y < 0) | (y >= k))
    if len(out):
        raise ValueError(
            f"y holds labels outside [0, {k}) (the model has {k} logits): {len(out)} of "
            f"{len(y)}, e.g. y[{out[0]}] = {y[out[0]]}; relabel the data to 0..{k - 1}"
        )


def predict_logits(
    model: LogitsFn,
    x: ArrayLike,
    *,
    batch_size: int = 500,
    tta: str = "none",
    progress: bool = False,
) -> np.ndarray:
    """Logits ``(N, num_classes)`` float32 of ``model`` on ``x``, a host numpy array.

    ``tta``: ``"none"``, ``"flip"`` or ``"flip_translate"``
    (:func:`gbjax.augment.tta_views`).

    Example:
      >>> import numpy as np
      >>> from gbjax import evaluate
      >>> def model(x):  # a "model": the brightest channel is the class
      ...     return x.mean(axis=(1, 2))
      >>> x = np.zeros((2, 4, 4, 3), np.float32)
      >>> x[0, ..., 2] = 1.0  # image 0 is blue: class 2
      >>> x[1, ..., 0] = 1.0  # image 1 is red: class 0
      >>> evaluate.predict_logits(model, x).tolist()
      [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]
    """
    _check(x)
    if tta not in TTA_LEVELS:
        raise ValueError(f"tta must be one of {TTA_LEVELS}, got {tta!r}")
    fn = as_logits_fn(model)
    out = map_batches(
        lambda xb: _logits(fn, jnp.asarray(xb), tta=tta),
        x,
        batch_size=batch_size,
        progress=progress,
        desc=f"predict (tta={tta})",
    )
    return np.asarray(out, np.float32)


def predict(
    model: LogitsFn,
    x: ArrayLike,
    *,
    batch_size: int = 500,
    tta: str = "none",
    progress: bool = False,
) -> np.ndarray:
    """Predicted labels ``(N,)`` int32 (numpy). Raises ``ValueError`` when a logit is NaN
    or inf (there is no predicted class; :func:`predict_logits` returns them as they are).

    Example:
      >>> import numpy as np
      >>> from gbjax import evaluate
      >>> def model(x):  # a "model": the brightest channel is the class
      ...     return x.mean(axis=(1, 2))
      >>> x = np.zeros((2, 4, 4, 3), np.float32)
      >>> x[0, ..., 2] = 1.0  # image 0 is blue: class 2
      >>> x[1, ..., 0] = 1.0  # image 1 is red: class 0
      >>> evaluate.predict(model, x).tolist()
      [2, 0]
    """
    logits = predict_logits(model, x, batch_size=batch_size, tta=tta, progress=progress)
    _check_logits(logits)
    return np.argmax(logits, -1).astype(np.int32)


def evaluate(
    model: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    batch_size: int = 500,
    tta: str = "none",
    progress: bool = False,
) -> dict[str, float]:
    """``{"accuracy", "loss"}`` of ``model`` on ``(x, y)``: fraction correct and mean
    cross-entropy (no label smoothing). Raises ``ValueError`` on NaN or inf logits and
    on labels outside ``[0, num_classes)``.

    Example:
      >>> import numpy as np
      >>> from gbjax import evaluate
      >>> def model(x):  # a "model": the brightest channel is the class
      ...     return x.mean(axis=(1, 2))
      >>> x = np.zeros((2, 4, 4, 3), np.float32)
      >>> x[0, ..., 2] = 1.0  # image 0 is blue: class 2
      >>> x[1, ..., 0] = 1.0  # image 1 is red: class 0
      >>> r = evaluate.evaluate(model, x, np.array([2, 0]))
      >>> r["accuracy"], round(r["loss"], 4)  # -log(e / (e + 2))
      (1.0, 0.5514)
    """
    _check(x, y)
    logits = predict_logits(model, x, batch_size=batch_size, tta=tta, progress=progress)
    _check_logits(logits, y)
    y = np.asarray(y).astype(np.int32)
    loss = optax.softmax_cross_entropy_with_integer_labels(jnp.asarray(logits), jnp.asarray(y))
    return {
        "accuracy": float(np.mean(np.argmax(logits, -1) == y)),
        "loss": float(jnp.mean(loss)),
    }


def accuracy(
    model: LogitsFn,
    x: ArrayLike,
    y: ArrayLike,
    *,
    batch_size: int = 500,
    tta: str = "none",
    progress: bool = False,
) -> float:
    """Fraction of ``x`` that ``model`` classifies as ``y``. Raises ``ValueError`` on
    NaN or inf logits and on labels outside ``[0, num_classes)``.

    Example:
      >>> import numpy as np
      >>> from gbjax import evaluate
      >>> def model(x):  # a "model": the brightest channel is the class
      ...     return x.mean(axis=(1, 2))
      >>> x = np.zeros((2, 4, 4, 3), np.float32)
      >>> x[0, ..., 2] = 1.0  # image 0 is blue: class 2
      >>> x[1, ..., 0] = 1.0  # image 1 is red: class 0
      >>> evaluate.accuracy(model, x, np.array([2, 1]))  # image 1 is not class 1
      0.5
    """
    _check(x, y)
    logits = predict_logits(model, x, batch_size=batch_size, tta=tta, progress=progress)
    _check_logits(logits, y)
    return float(np.mean(np.argmax(logits, -1) == np.asarray(y)))

"""Model construction by name: the registry behind ``Config.model``, and the split
of a model into the parts a training state holds.

Each entry is a *builder*, called as ``builder(*, input_shape, num_classes,
data_mean, data_std, dtype, rngs, **kwargs)``: ``input_shape`` is ``(H, W, C)``;
``data_mean``/``data_std`` are the training images' per-channel statistics in
pixel units (float32 ``(C,)``), the model's own ``mean``/``std`` unless
``kwargs`` give them; ``dtype`` is the compute dtype (``None``: float32);
``kwargs`` are the configuration's ``model_kwargs``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from flax import nnx
from jax.typing import ArrayLike

from gbjax.models.airbench import Airbench
from gbjax.models.paper import PaperConvNet
from gbjax.models.resnet import ResNet, ResNet18, ResNet20

__all__ = ["register", "registered", "build", "split_state"]

Builder = Callable[..., nnx.Module]
_BUILDERS: dict[str, Builder] = {}


def register(name: str, builder: Builder | None = None) -> Builder | Callable[[Builder], Builder]:
    """Registers ``builder`` as the model ``name`` (usable as a decorator).

    The builder is called as described in :mod:`gbjax.models` (see
    :func:`build`); registering a name twice is refused.

    Returns:
      ``builder``; without it, a decorator that registers the function it decorates.

    Example:
      >>> import numpy as np
      >>> from flax import nnx
      >>> from gbjax import models
      >>> @models.register("linear")
      ... def linear(*, input_shape, num_classes, data_mean, data_std, dtype, rngs, **kw):
      ...     return nnx.Linear(int(np.prod(input_shape)), num_classes, rngs=rngs)
      >>> m = models.build("linear", input_shape=(2, 2, 1), num_classes=3, data_mean=[0.0],
      ...                  data_std=[1.0], rngs=nnx.Rngs(0))
      >>> m.kernel.shape
      (4, 3)
      >>> models.register("linear", linear)
      Traceback (most recent call last):
      ...
      ValueError: model 'linear' is already registered
      >>> del _BUILDERS["linear"]  # (this example leaves the registry as it found it)
    """
    if builder is None:
        return lambda b: register(name, b)
    if not isinstance(name, str) or not name:
        raise ValueError(f"a model name must be a non-empty string, got {name!r}")
    if name in _BUILDERS:
        raise ValueError(f"model {name!r} is already registered")
    _BUILDERS[name] = builder
    return builder


def registered() -> tuple[str, ...]:
    """The names :func:`build` accepts, in registration order.

    Example:
      >>> from gbjax import models
      >>> models.registered()
      ('paper_convnet', 'resnet18', 'resnet20', 'resnet', 'airbench')
    """
    return tuple(_BUILDERS)


def build(
    name: str,
    *,
    input_shape: Sequence[int],
    num_classes: int,
    data_mean: ArrayLike,
    data_std: ArrayLike,
    rngs: nnx.Rngs,
    dtype=None,
    **kwargs,
) -> nnx.Module:
    """The model registered as ``name`` for images of ``input_shape`` ``(H, W, C)``.

    ``data_mean``/``data_std``: the training images' per-channel statistics in
    pixel units (the model's ``mean``/``std`` unless ``kwargs`` give them; the
    paper network takes their channel average); ``dtype``: the compute dtype
    (``None``: float32); ``kwargs``: the model's own keyword arguments
    (``Config.model_kwargs``).

    Example:
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = models.build("paper_convnet", input_shape=(8, 8, 1), num_classes=10,
      ...                  data_mean=[30.0], data_std=[70.0], rngs=nnx.Rngs(0),
      ...                  kind="raw", features=4)
      >>> type(m).__name__, float(m.mean[...]), m.head.kernel.shape
      ('PaperConvNet', 30.0, (16, 10))
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {registered()}")
    return _BUILDERS[name](
        input_shape=tuple(input_shape),
        num_classes=num_classes,
        data_mean=np.asarray(data_mean, np.float32).reshape(-1),
        data_std=np.asarray(data_std, np.float32).reshape(-1),
        dtype=dtype,
        rngs=rngs,
        **kwargs,
    )


def split_state(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State, nnx.State]:
    """``(graphdef, params, batch statistics, constants)`` of ``model``: the parts
    a training state and a checkpoint hold.

    Example:
      >>> from flax import nnx
      >>> from gbjax import models
      >>> m = models.ResNet(stage_sizes=(1,), widths=(4,), num_classes=10, rngs=nnx.Rngs(0))
      >>> graphdef, params, stats, consts = models.split_state(m)
      >>> sorted(params["head"]), sorted(stats["stem_bn"]), sorted(consts)
      (['bias', 'kernel'], ['mean', 'var'], ['mean', 'std'])
      >>> nnx.merge(graphdef, params, stats, consts).head.kernel.shape  # and back
      (4, 10)
    """
    return nnx.split(model, nnx.Param, nnx.BatchStat, ...)


@register("paper_convnet")
def _paper_convnet(*, input_shape, num_classes, data_mean, data_std, dtype, rngs, **kw):
    H, W, C = input_shape
    if H != W:
        raise ValueError(f"paper_convnet needs square images, got {H}x{W}")
    kw.setdefault("mean", float(data_mean.mean()))
    kw.setdefault("std", float(data_std.mean()))
    return PaperConvNet(num_classes=num_classes, in_channels=C, image_size=H, rngs=rngs, **kw)


@register("resnet18")
def _resnet18(*, input_shape, num_classes, data_mean, data_std, dtype, rngs, **kw):
    kw.setdefault("mean", data_mean)
    kw.setdefault("std", data_std)
    return ResNet18(num_classes, in_channels=input_shape[-1], dtype=dtype, rngs=rngs, **kw)


@register("resnet20")
def _resnet20(*, input_shape, num_classes, data_mean, data_std, dtype, rngs, **kw):
    kw.setdefault("mean", data_mean)
    kw.setdefault("std", data_std)
    return ResNet20(num_classes, in_channels=input_shape[-1], dtype=dtype, rngs=rngs, **kw)


@register("resnet")
def _resnet(*, input_shape, num_classes, data_mean, data_std, dtype, rngs, **kw):
    missing = {"stage_sizes", "widths"} - set(kw)
    if missing:
        raise ValueError(f"invalid config: model='resnet' needs model_kwargs {sorted(missing)}")
    kw.setdefault("mean", data_mean)
    kw.setdefault("std", data_std)
    C = input_shape[-1]
    return ResNet(num_classes=num_classes, in_channels=C, dtype=dtype, rngs=rngs, **kw)


@register("airbench")
def _airbench(*, input_shape, num_classes, data_mean, data_std, dtype, rngs, **kw):
    kw.setdefault("mean", data_mean)
    kw.setdefault("std", data_std)
    C = input_shape[-1]
    return Airbench(num_classes=num_classes, in_channels=C, dtype=dtype, rngs=rngs, **kw)

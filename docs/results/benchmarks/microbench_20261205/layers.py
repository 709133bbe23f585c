"""Per-layer microbenchmarks behind docs/methods.md 6.4 (issue 28), on this CPU.

    python docs/results/benchmarks/microbench_20261205/layers.py > layers.txt

1. BatchNorm's channel sums on XLA:CPU: a reduction over batch and space (what flax and
   models.BatchNorm use) against ``ones @ x`` (faster alone, but see methods.md 6.4).
2. A conv layer's weight gradient: XLA's (autodiff of ``lax.conv_general_dilated``)
   against a matrix product of im2col patches and against nine shifted products, for
   the airbench94 layer shapes at batch 256; forward and input gradient beside, and the
   forward compiled without gbjax's options (``fwd default``: this jaxlib's default
   YNN convolution fusions).
All under gbjax's per-jit XLA options (``gbjax._xla.conv_options``) unless said, best of
5 (3 for the convolutions), compilation excluded.
"""

import time

import jax
import jax.numpy as jnp
import numpy as np

from gbjax import _xla

OPTS = _xla.conv_options()
DN = ("NHWC", "HWIO", "NHWC")


def best_ms(f, *args, reps=5, options=OPTS):
    g = jax.jit(f, compiler_options=options)
    out = jax.block_until_ready(g(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(g(*args))
        ts.append(time.perf_counter() - t0)
    return 1e3 * min(ts), out


def _ones_dot(x_NC):
    return jnp.ones((x_NC.shape[0],), x_NC.dtype) @ x_NC


def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def wgrad_xla(x, dy, w):
    return jax.vjp(lambda v: conv(x, v), w)[1](dy)[0]


def wgrad_im2col(x, dy, w):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate(
        [xp[:, i : i + h, j : j + wd, :] for i in range(3) for j in range(3)], axis=-1
    ).reshape(-1, 9 * c)
    d = dy.reshape(-1, dy.shape[-1])
    return jax.lax.dot_general(cols, d, (((0,), (0,)), ((), ()))).reshape(3, 3, c, -1)


def wgrad_shifted(x, dy, w):
    n, h, wd, c = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    d = dy.reshape(-1, dy.shape[-1])
    parts = [
        jax.lax.dot_general(
            xp[:, i : i + h, j : j + wd, :].reshape(-1, c), d, (((0,), (0,)), ((), ()))
        )
        for i in range(3)
        for j in range(3)
    ]
    return jnp.stack(parts).reshape(3, 3, c, -1)


def main():
    rng = np.random.default_rng(0)
    print(f"# jax {jax.__version__}, options {OPTS}")
    print("\nBatchNorm channel sums (ms); the map passed as NHWC (reshaped inside the jit, as")
    print("in models.BatchNorm) or already as (N*H*W, C):")
    for shape in [(1024, 15, 15, 64), (1024, 7, 7, 256)]:
        x4 = jnp.asarray(rng.standard_normal(shape) + 3, jnp.float32)
        x2 = x4.reshape(-1, shape[-1])
        cells = []
        for label, x in (("NHWC", x4), ("2-D", x2)):
            red, a = best_ms(lambda v: v.reshape(-1, v.shape[-1]).sum(0), x)
            dot, b = best_ms(lambda v: _ones_dot(v.reshape(-1, v.shape[-1])), x)
            err = float(jnp.abs(a - b).max() / jnp.abs(a).max())
            cells.append(f"{label}: reduction {red:5.1f} ones @ x {dot:5.1f} (rel diff {err:.0e})")
        print(f"  {str(shape):20s} " + "   ".join(cells))
    print("\nconv layers at batch 256 (ms): forward, input gradient, weight gradient x3 forms")
    total = {k: 0.0 for k in ("fwd", "fwd default", "xgrad", "xla", "im2col", "shifted")}
    for hw, ci, co in [(31, 24, 64), (15, 64, 64), (15, 64, 256), (7, 256, 256), (3, 256, 256)]:
        x = jnp.asarray(rng.standard_normal((256, hw, hw, ci)), jnp.float32)
        w = jnp.asarray(rng.standard_normal((3, 3, ci, co)) * 0.1, jnp.float32)
        dy = jnp.asarray(rng.standard_normal((256, hw, hw, co)), jnp.float32)
        row = {
            "fwd": best_ms(lambda a, d, k: conv(a, k), x, dy, w, reps=3)[0],
            "fwd default": best_ms(lambda a, d, k: conv(a, k), x, dy, w, reps=3, options=None)[0],
            "xgrad": best_ms(
                lambda a, d, k: jax.vjp(lambda u: conv(u, k), a)[1](d)[0], x, dy, w, reps=3
            )[0],  # noqa: E501
        }
        ref = None
        for name, f in (("xla", wgrad_xla), ("im2col", wgrad_im2col), ("shifted", wgrad_shifted)):
            row[name], out = best_ms(f, x, dy, w, reps=3)
            ref = out if ref is None else ref
            assert float(jnp.abs(out - ref).max() / jnp.abs(ref).max()) < 1e-4
        for k, v in row.items():
            total[k] += v
        print(
            f"  {hw:2d}x{hw:<2d} {ci:3d}->{co:3d}: "
            + "  ".join(f"{k} {v:6.1f}" for k, v in row.items())
        )
    print("  total: " + "  ".join(f"{k} {v:6.1f}" for k, v in total.items()))
    print(
        f"  weight gradient: im2col / XLA {total['im2col'] / total['xla']:.2f}x,"
        f" shifted / XLA {total['shifted'] / total['xla']:.2f}x;"
        f" XLA weight gradient / forward {total['xla'] / total['fwd']:.2f}x;"
        f" forward, default options / gbjax's {total['fwd default'] / total['fwd']:.2f}x"
    )


if __name__ == "__main__":
    main()

"""libjpeg's baseline JPEG round trip in JAX, bit for bit (the codec behind
:class:`gbjax.defences.JPEG`; docs/methods.md, section 8).

Every step is libjpeg(-turbo)'s integer arithmetic with its defaults: the JFIF
colour conversions in 16-bit fixed point, 2x2 box downsampling and "fancy"
upsampling of the chroma, the integer ``ISLOW`` DCTs, and quantisation with the
IJG tables scaled by :func:`jpeg_quant_table`. Each rounding has a
straight-through gradient (identity backward), so the codec can be attacked end
to end. A module of its own because it is one self-contained algorithm
(tables, fixed-point constants, DCT passes) that the defences only call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from gbjax._checks import check_int

__all__ = ["jpeg_quant_table", "jpeg_codec", "rgb_to_ycc", "ycc_to_rgb", "downsample",
           "upsample"]  # fmt: skip


def _straight_through(v, forward):
    """``forward`` (a rounded version of ``v``) forward, identity backward."""
    return v + jax.lax.stop_gradient(forward - v)


# libjpeg's jcparam.c: the IJG (JPEG standard Annex K) tables, natural order.
_JPEG_LUMA = np.array(
    [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
     14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
     18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
     49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99],
    np.int64,
).reshape(8, 8)  # fmt: skip
_JPEG_CHROMA = np.full((8, 8), 99, np.int64)
_JPEG_CHROMA[:4, :4] = [[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]]


def jpeg_quant_table(quality: int, chroma: bool = False) -> np.ndarray:
    """libjpeg's quantisation table at ``quality`` (``jpeg_set_quality(q, force_baseline=TRUE)``).

    Scale ``s = 5000 // q`` for ``q < 50``, else ``200 - 2 q``; entries
    ``(T s + 50) // 100`` clipped to 1..255.

    Args:
      quality: 1..100, as Pillow's ``quality``.
      chroma: the chrominance table (else luminance).

    Returns:
      The (8, 8) int64 numpy table, in natural (row-major) order.

    Example:
      >>> from gbjax.defences import jpeg_quant_table
      >>> jpeg_quant_table(50)[0, :4].tolist()  # the IJG luminance table itself
      [16, 11, 10, 16]
      >>> jpeg_quant_table(90)[0, :4].tolist()  # finer steps at higher quality
      [3, 2, 2, 3]
    """
    quality = check_int("quality", quality, 1, 100)
    s = 5000 // quality if quality < 50 else 200 - 2 * quality
    base = _JPEG_CHROMA if chroma else _JPEG_LUMA
    return np.clip((base * s + 50) // 100, 1, 255)


_FIX = lambda v: float(int(v * 65536 + 0.5))  # libjpeg's FIX(), SCALEBITS = 16


def rgb_to_ycc(rgb):
    """jccolor.c in 16-bit fixed point (exact in float32: every term is an integer
    below 2**24); straight-through rounding."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    half, s = 32768.0, 65536.0
    y = _FIX(0.299) * r + _FIX(0.587) * g + _FIX(0.114) * b
    cb = -_FIX(0.16874) * r - _FIX(0.33126) * g + _FIX(0.5) * b
    cr = _FIX(0.5) * r - _FIX(0.41869) * g - _FIX(0.08131) * b
    out = []
    for v, lin, bias, offset in (  # Cb and Cr round with 0.5 - 2**-16, as libjpeg does
        (y, 0.299 * r + 0.587 * g + 0.114 * b, half, 0.0),
        (cb, -0.168736 * r - 0.331264 * g + 0.5 * b + 128.0, half - 1, 128.0),
        (cr, 0.5 * r - 0.418688 * g - 0.081312 * b + 128.0, half - 1, 128.0),
    ):
        exact = jnp.floor((jax.lax.stop_gradient(v) + bias) / s) + offset
        out.append(_straight_through(lin, exact))
    return out


def ycc_to_rgb(y, cb, cr):
    """jdcolor.c's ``ycc_rgb_convert`` (fixed point, exact in float32), clipped to 0..255."""
    half, s = 32768.0, 65536.0
    cb, cr = cb - 128.0, cr - 128.0
    sg = jax.lax.stop_gradient
    r = jnp.floor((_FIX(1.402) * sg(cr) + half) / s)
    g = jnp.floor((-_FIX(0.34414) * sg(cb) + half - _FIX(0.71414) * sg(cr)) / s)
    b = jnp.floor((_FIX(1.772) * sg(cb) + half) / s)
    rgb = (
        _straight_through(y + 1.402 * cr, y + r),
        _straight_through(y - 0.344136 * cb - 0.714136 * cr, y + g),
        _straight_through(y + 1.772 * cb, y + b),
    )
    return jnp.clip(jnp.stack(rgb, -1), 0.0, 255.0)


def downsample(c):
    """jcsample.c's ``h2v2_downsample``: 2x2 box sums, ``(sum + bias) >> 2`` with the
    bias alternating 1, 2 along each row."""
    B, H, W = c.shape
    s = c.reshape(B, H // 2, 2, W // 2, 2).sum((2, 4))
    bias = jnp.asarray(np.where(np.arange(W // 2) % 2 == 0, 1.0, 2.0), c.dtype)
    return _straight_through(s / 4.0, jnp.floor((jax.lax.stop_gradient(s) + bias) / 4.0))


def upsample(c):
    """jdsample.c's ``h2v2_fancy_upsample`` (triangle filter, weights 9/16, 3/16, 3/16,
    1/16; edge samples replicated), integer results as libjpeg rounds them."""
    B, h, w = c.shape
    cp = jnp.pad(c, ((0, 0), (1, 1), (0, 0)), mode="edge")
    # vertical: row 2i from rows i and i-1, row 2i+1 from rows i and i+1
    up, down = 3.0 * c + cp[:, :-2], 3.0 * c + cp[:, 2:]
    cs = jnp.stack([up, down], 2).reshape(B, 2 * h, w)
    csp = jnp.pad(cs, ((0, 0), (0, 0), (1, 1)), mode="edge")
    left, right = 3.0 * cs + csp[:, :, :-2], 3.0 * cs + csp[:, :, 2:]
    sg = jax.lax.stop_gradient
    even = _straight_through(left / 16.0, jnp.floor((sg(left) + 8.0) / 16.0))
    odd = _straight_through(right / 16.0, jnp.floor((sg(right) + 7.0) / 16.0))
    return jnp.stack([even, odd], 3).reshape(B, 2 * h, 2 * w)


# jfdctint.c / jidctint.c (Loeffler-Ligtenberg-Moschytz, CONST_BITS 13, PASS1_BITS 2)
_F0298, _F0390, _F0541, _F0765, _F0899, _F1175 = 2446, 3196, 4433, 6270, 7373, 9633
_F1501, _F1847, _F1961, _F2053, _F2562, _F3072 = 12299, 15137, 16069, 16819, 20995, 25172


def _fdct_islow_raw(x):
    """One 1-D pass of ``jpeg_fdct_islow`` before its final descaling: a linear map
    of the 8 inputs (there is no rounding inside a pass)."""
    tmp0, tmp7, tmp1, tmp6 = x[0] + x[7], x[0] - x[7], x[1] + x[6], x[1] - x[6]
    tmp2, tmp5, tmp3, tmp4 = x[2] + x[5], x[2] - x[5], x[3] + x[4], x[3] - x[4]
    tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    z1 = (tmp12 + tmp13) * _F0541
    o0, o4, o2, o6 = tmp10 + tmp11, tmp10 - tmp11, z1 + tmp13 * _F0765, z1 - tmp12 * _F1847
    z1, z2, z3, z4 = tmp4 + tmp7, tmp5 + tmp6, tmp4 + tmp6, tmp5 + tmp7
    z5 = (z3 + z4) * _F1175
    tmp4, tmp5, tmp6, tmp7 = tmp4 * _F0298, tmp5 * _F2053, tmp6 * _F3072, tmp7 * _F1501
    z1, z2 = z1 * -_F0899, z2 * -_F2562
    z3, z4 = z3 * -_F1961 + z5, z4 * -_F0390 + z5
    o7, o5, o3, o1 = tmp4 + z1 + z3, tmp5 + z2 + z4, tmp6 + z2 + z3, tmp7 + z1 + z4
    return [o0, o1, o2, o3, o4, o5, o6, o7]


def _idct_islow_raw(x):
    """One 1-D pass of ``jpeg_idct_islow`` before its final descaling (linear)."""
    z1 = (x[2] + x[6]) * _F0541
    tmp2, tmp3 = z1 - x[6] * _F1847, z1 + x[2] * _F0765
    tmp0, tmp1 = (x[0] + x[4]) * 8192, (x[0] - x[4]) * 8192  # << CONST_BITS
    tmp10, tmp13, tmp11, tmp12 = tmp0 + tmp3, tmp0 - tmp3, tmp1 + tmp2, tmp1 - tmp2
    tmp3, tmp2, tmp1, tmp0 = x[1], x[3], x[5], x[7]
    z1, z2, z3, z4 = tmp0 + tmp3, tmp1 + tmp2, tmp0 + tmp2, tmp1 + tmp3
    z5 = (z3 + z4) * _F1175
    tmp3, tmp2, tmp1, tmp0 = tmp3 * _F1501, tmp2 * _F3072, tmp1 * _F2053, tmp0 * _F0298
    z4, z3 = z4 * -_F0390 + z5, z3 * -_F1961 + z5
    z1, z2 = z1 * -_F0899, z2 * -_F2562
    tmp3, tmp2, tmp1, tmp0 = tmp3 + z1 + z4, tmp2 + z2 + z3, tmp1 + z2 + z4, tmp0 + z1 + z3
    out = [tmp10 + tmp3, tmp11 + tmp2, tmp12 + tmp1, tmp13 + tmp0]
    return out + [tmp13 - tmp0, tmp12 - tmp1, tmp11 - tmp2, tmp10 - tmp3]


def _pass_matrix(raw) -> np.ndarray:
    return np.stack(raw(list(np.eye(8, dtype=np.int64))), 0).astype(np.int32)  # (out, in)


_FDCT_M, _IDCT_M = _pass_matrix(_fdct_islow_raw), _pass_matrix(_idct_islow_raw)
# Output descaling, DESCALE(v, n) = (v + 2**(n-1)) >> n, per output row; the
# first FDCT pass left-shifts its outputs 0 and 4 by PASS1_BITS instead.
_EVEN04 = np.arange(8) % 4 == 0
_FDCT_PASS1 = (np.where(_EVEN04, 4, 1)[:, None] * _FDCT_M, np.where(_EVEN04, 0, 11))
_FDCT_PASS2 = (_FDCT_M, np.where(_EVEN04, 2, 15))


def _int_pass(x, m, shift):
    """``DESCALE(m @ x, shift)`` along the last axis, int32 (libjpeg's 32-bit arithmetic)."""
    v = jnp.einsum("kj,...j->...k", jnp.asarray(m), x, preferred_element_type=jnp.int32)
    shift = np.broadcast_to(np.asarray(shift), (8,))
    half = np.where(shift > 0, np.left_shift(1, np.maximum(shift - 1, 0)), 0)
    return jnp.right_shift(v + jnp.asarray(half, jnp.int32), jnp.asarray(shift, jnp.int32))


def jpeg_codec(c, qtable):
    """libjpeg's integer round trip of one component (B, H, W), H and W multiples of
    8, 8-bit levels: level shift, ``jpeg_fdct_islow``, quantisation (``(|t| + 4 Q)
    // (8 Q)`` with the sign of ``t``), dequantisation, ``jpeg_idct_islow`` and its
    range limit. Straight-through: its gradient is the identity (the DCTs are
    orthogonal; only the roundings are skipped)."""
    B, H, W = c.shape
    v = jax.lax.stop_gradient(c).astype(jnp.int32) - 128
    blk = v.reshape(B, H // 8, 8, W // 8, 8).swapaxes(2, 3)  # (B, bi, bj, row, col)
    ws = _int_pass(blk, *_FDCT_PASS1)  # rows
    coef = _int_pass(ws.swapaxes(-1, -2), *_FDCT_PASS2).swapaxes(-1, -2)  # columns, scaled by 8
    q = jnp.asarray(qtable, jnp.int32)
    qc = jnp.sign(coef) * ((jnp.abs(coef) + 4 * q) // (8 * q))
    ws = _int_pass((qc * q).swapaxes(-1, -2), _IDCT_M, 11).swapaxes(-1, -2)  # columns
    x = _int_pass(ws, _IDCT_M, 18)  # rows
    x = jnp.bitwise_and(x + 512, 1023) - 512  # range_limit[x & RANGE_MASK]
    rec = jnp.clip(x + 128, 0, 255).swapaxes(2, 3).reshape(B, H, W)
    return _straight_through(c, rec.astype(c.dtype))

"""Device functions the forward and backward kernels share: scalar passing and the placement of
a program on its tile (the launch heuristic is in ``config``).

Work layout (both directions): a program owns a TILE_H x TILE_W tile of pixels of one depth
plane of one image (2-D inputs are volumes of depth 1), laid across threads with W fastest
(contiguous, coalesced for NCHW logits), and a BLOCK_C-wide chunk of classes held in registers:
every register tile is [BLOCK_C, TILE_H * TILE_W]. Per window offset, the neighbour's label,
weight and statistics are loaded once and reused by every class of the chunk. The window radii,
stride, C, D, H, W and B are runtime arguments: one binary serves every kernel_size, image and
volume size.
"""

import triton
import triton.language as tl


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """The float passed as ``split_scalar(value)``, in ACC precision."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def tile_pixels(tiles_h, tiles_w, planes, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                WIDE: tl.constexpr):
    """This program's image and depth plane (int64 scalars: their base offsets may exceed 2^31)
    and the (row, column) grid coordinates of its TILE_H x TILE_W pixels, int32 unless WIDE,
    so that every offset inside a plane computed from them stays in range. Programs run over
    (image, plane, tile row, tile column), the tile column fastest; 2-D inputs have one plane."""
    pid = tl.program_id(0).to(tl.int64)
    tile_col = pid % tiles_w
    rest = pid // tiles_w
    tile_row = (rest % tiles_h).to(tl.int32)
    rest = rest // tiles_h
    plane = rest % planes
    image = rest // planes
    lane = tl.arange(0, TILE_H * TILE_W)
    rows = tile_row * TILE_H + lane // TILE_W
    cols = tile_col.to(tl.int32) * TILE_W + lane % TILE_W
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    return image, plane, rows, cols


@triton.jit
def class_lanes(c0, BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """Class indices [c0, c0 + BLOCK_C), int64 when WIDE (their offsets may pass 2^31)."""
    cls = c0 + tl.arange(0, BLOCK_C)
    if WIDE:
        cls = cls.to(tl.int64)
    return cls


@triton.jit
def window_weight(dd, du, dv, weight_base, inv_base):
    """omega = weight_base ** (1 - d), d = max(|dd|, |du|, |dv|) (dd = 0 in 2-D), as
    weight_base * inv_base ** d: exact for power-of-two bases (2 at the centre, 1, 1/2, ...),
    within a few ulp otherwise, and no table to copy to the device."""
    d = tl.maximum(tl.maximum(tl.abs(dd), tl.abs(du)), tl.abs(dv))
    w = weight_base
    for _ in range(d):
        w = w * inv_base
    return w


@triton.jit
def power_of(r, e):
    """r ** e for r >= 0 (or NaN, which propagates), with 0 ** 0 == 1."""
    p = tl.exp(e * tl.log(tl.where(r == 0, 1.0, r)))
    return tl.where(r == 0, tl.where(e == 0, 1.0, 0.0), p)

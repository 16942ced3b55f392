"""Device functions the forward and backward kernels share: scalar passing, the placement of a
program on its tile, window weights and powers (the launch heuristic is in ``config``)."""

import triton
import triton.language as tl


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """The float passed as ``config.split_scalar(value)``, in ACC precision."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def tile_coordinates(tiles_h, tiles_w, planes, ROWS: tl.constexpr, TILE_W: tl.constexpr,
                     WIDE: tl.constexpr):
    """This program's image and depth plane (int64 scalars: their base offsets may exceed 2^31),
    the first of its ROWS rows (a scalar) and its TILE_W columns, int32 unless WIDE, so that every
    offset inside a plane computed from them stays in range. Programs run over (image, plane, tile
    row, tile column), the tile column fastest; 2-D inputs have one plane."""
    pid = tl.program_id(0).to(tl.int64)
    tile_col = pid % tiles_w
    rest = pid // tiles_w
    tile_row = rest % tiles_h
    rest = rest // tiles_h
    plane = rest % planes
    image = rest // planes
    row0 = (tile_row * ROWS).to(tl.int32)
    cols = tile_col.to(tl.int32) * TILE_W + tl.arange(0, TILE_W)
    if WIDE:
        row0 = row0.to(tl.int64)
        cols = cols.to(tl.int64)
    return image, plane, row0, cols


@triton.jit
def omega_at(DU: tl.constexpr, far, far_omega, base, inv_base):
    """omega(d) = weight_base ** (1 - d) at d = max(|DU|, far): DU the compile-time row offset,
    far = max(|column offset|, |depth offset|) known at run time, far_omega = omega(far) (from
    :func:`omega_of`). weight_base * inv_base ** d: exact for power-of-two bases (2 at the
    centre, 1, 1/2, ...), within a few ulp otherwise."""
    w = base
    # |DU| as two ranges, one of them empty (JIT code has no abs() of a compile-time constant).
    for _ in tl.static_range(DU):
        w = w * inv_base
    for _ in tl.static_range(-DU):
        w = w * inv_base
    return tl.where((far <= DU) | (far <= -DU), w, far_omega)  # far <= |DU| (far >= 0)


@triton.jit
def omega_of(far, base, inv_base, RADIUS: tl.constexpr):
    """omega(far) for a run-time 0 <= far <= RADIUS, by selection among the RADIUS + 1 values
    (no loop with a data-dependent trip count)."""
    w = base
    out = base
    for d in tl.static_range(1, RADIUS + 1):
        w = w * inv_base
        out = tl.where(far == d, w, out)
    return out


@triton.jit
def power_of(r, e):
    """r ** e for r >= 0 (or NaN, which propagates), with 0 ** 0 == 1."""
    p = tl.exp(e * tl.log(tl.where(r == 0, 1.0, r)))
    return tl.where(r == 0, tl.where(e == 0, 1.0, 0.0), p)


@triton.jit
def lane_offsets(cls, class_stride, pixels, TILE_W: tl.constexpr):
    """Offsets [classes, lanes] of a [CLASS_TILE, TILE_W] tile: cls * class_stride + pixels.
    The pixels' columns are clamped into the image, which hides from Triton that the lanes read
    (mostly) consecutive addresses; without that knowledge Triton 3.6 lays the lanes along the
    classes (uncoalesced loads, kilobytes of spills). The hint restores it; it cannot mislead a
    vectorisation, since a lane holds one pixel (TILE_W lanes, one warp)."""
    tl.static_assert(TILE_W == 32)
    return tl.max_contiguous(cls[:, None] * class_stride + pixels[None, :], [1, TILE_W])


@triton.jit
def clamp(i, hi):
    """i clamped into [0, hi]: loads stay inside the tensor without a mask; the coefficient of a
    clamped neighbour is 0 (see the kernels)."""
    return tl.minimum(tl.maximum(i, 0), hi)


@triton.jit
def also(mask, condition):
    """mask & condition for a block mask and a scalar condition (tl.where: Triton's interpreter
    types ``block & scalar`` as an integer block)."""
    return tl.where(condition, mask, False)

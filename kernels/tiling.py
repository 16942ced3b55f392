"""Device functions the forward and backward kernels share: scalar passing, the placement of a
program on its tile, window weights and powers (the launch heuristic is in ``config``)."""

import triton
import triton.language as tl


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """The float passed as ``config.split_scalar(value)``, in ACC precision."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def tile_indices(tiles_h, tiles_w, planes):
    """(image, plane, tile row, tile column) of this program, int64: programs run over them in
    that order, the tile column fastest."""
    pid = tl.program_id(0).to(tl.int64)
    tile_col = pid % tiles_w
    rest = pid // tiles_w
    tile_row = rest % tiles_h
    rest = rest // tiles_h
    return rest // planes, rest % planes, tile_row, tile_col


@triton.jit
def class_range(c0, CLASS_TILE: tl.constexpr, C: tl.constexpr, WIDE: tl.constexpr):
    """Classes c0 .. c0 + CLASS_TILE - 1 (int64 where WIDE: times a class stride they can pass
    2^31) and which of them exist (compile-time per register where c0 is: padded lanes fold
    away)."""
    cls = c0 + tl.arange(0, CLASS_TILE)
    cmask = cls < C
    if WIDE:
        cls = cls.to(tl.int64)
    return cls, cmask


@triton.jit
def image_of_P(P_ptr, image, D, H, W, C: tl.constexpr, TILE_W: tl.constexpr,
               WIDE: tl.constexpr):
    """(P's part for ``image``, whose D x H x W centres it holds in blocks of TILE_W, each block
    C x TILE_W values (block_lanes); the image's number of centres, int64 where WIDE)."""
    if WIDE:
        n = D.to(tl.int64) * H * W
    else:
        n = D * H * W
    return P_ptr + image * (C * TILE_W) * ((n + TILE_W - 1) // TILE_W), n


@triton.jit
def tile_coordinates(tiles_h, tiles_w, planes, ROWS: tl.constexpr, TILE_W: tl.constexpr,
                     WIDE: tl.constexpr):
    """This program's image and depth plane (int64 scalars: their base offsets may exceed 2^31),
    the first of its ROWS rows (a scalar) and its TILE_W columns, int32 unless WIDE, so that every
    offset inside a plane computed from them stays in range. Programs run over (image, plane, tile
    row, tile column), the tile column fastest; 2-D inputs have one plane."""
    image, plane, tile_row, tile_col = tile_indices(tiles_h, tiles_w, planes)
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
def window_weight(du, DV: tl.constexpr, RADIUS: tl.constexpr, base, inv_base):
    """omega(max(du, |DV|)) = weight_base ** (1 - d) for a warp-uniform run-time du >= 0 (the row
    and depth distance) and a compile-time column offset DV: the weights of distances |DV| ..
    RADIUS by selection, each a product of compile-time length (exact for power-of-two bases)."""
    w = base
    for _ in tl.static_range(DV):
        w = w * inv_base
    for _ in tl.static_range(-DV):
        w = w * inv_base
    out = w  # omega(|DV|), for du <= |DV|
    for d in tl.static_range(1, RADIUS + 1):
        w = base
        for _ in tl.static_range(d):
            w = w * inv_base
        out = tl.where((du == d) & (d > DV) & (d > -DV), w, out)
    return out


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
def finite_centres(P, s, cls, c0):
    """(P, dL) of a row of centres with a non-finite pooled vector's NaN moved from P to dL: such
    a centre's P is NaN in every class (its forward's sums all took the NaN), and G adds P times
    a coefficient that is 0 for pixels of another class, whose gradient 0 * NaN would poison.
    The first class tells (compile-time per register: the others fold away)."""
    first = tl.sum(tl.where((cls == c0)[:, None], P, -0.0), axis=0)
    bad = first != first
    return tl.where(bad[None, :], 0.0, P), tl.where(bad, float("nan"), s)


@triton.jit
def minkowski_share(L, unit, power1):
    """(L / t)^(k - 1) with unit = 1 / t and power1 = k - 1: d loss / d L of the Minkowski mean up
    to a constant factor, relative to a maximum t so that it neither overflows nor underflows. The
    forward takes it per centre against its tile's max L, the backward per tile against the
    global max L (docs/math.md, "Numerics")."""
    return power_of(L * unit, power1)


@triton.jit
def power_of(r, e):
    """r ** e for r >= 0 (or NaN, which propagates), with 0 ** 0 == 1."""
    p = tl.exp(e * tl.log(tl.where(r == 0, 1.0, r)))
    return tl.where(r == 0, tl.where(e == 0, 1.0, 0.0), p)


@triton.jit
def tile_scale_factors(grad, scal_ptr, power_hi, power_lo, ACC: tl.constexpr):
    """(grad * a, 1 / max L, k - 1) for the backward of the Minkowski mean: a tile's share of
    d loss / d L_p is grad * a * (t / max L)^(k-1) for its max L t (the forward put w_p (L_p /
    t)^(k-1) into P). The combine's float64 scalars, rounded to ACC once (max L is an ACC value,
    exact in ACC)."""
    top = tl.load(scal_ptr + 1)
    unit = (1.0 / tl.where(top > 0, top, 1.0)).to(ACC)
    return grad * tl.load(scal_ptr + 2).to(ACC), unit, scalar(power_hi, power_lo, ACC) - 1.0


@triton.jit
def lane_offsets(cls, class_stride, pixels, TILE_W: tl.constexpr):
    """Offsets [classes, lanes] of a [CLASS_TILE, TILE_W] tile: cls * class_stride + pixels,
    with the hints that give the layout the kernels are written for, one pixel per lane and
    every class of it in the lane's registers. The pixels' columns may be clamped into the image,
    which hides from Triton that the lanes read (mostly) consecutive addresses; without that
    knowledge Triton 3.6 lays the lanes along the classes (uncoalesced loads, kilobytes of
    spills): max_contiguous restores it. Where the strides are multiples of 16 (W = 1024), Triton
    would load 4 pixels per lane as one vector and spread the classes over 4 lanes (layout
    conversions and spills): multiple_of 1 keeps it to one pixel per lane. Neither hint can
    mislead a vectorisation, since a lane holds one pixel (TILE_W lanes, one warp)."""
    tl.static_assert(TILE_W == 32)
    return tl.multiple_of(
        tl.max_contiguous(cls[:, None] * class_stride + pixels[None, :], [1, TILE_W]), [1, 1])


@triton.jit
def block_lanes(img_ptr, n, c0, CLASS_TILE: tl.constexpr, C: tl.constexpr,
                TILE_W: tl.constexpr):
    """Pointers [CLASS_TILE, TILE_W] to classes c0 .. c0 + CLASS_TILE - 1 of the centres with flat
    indices ``n`` (>= 0) in an image of P, whose layout is blocked: TILE_W consecutive centres,
    then their C classes at a stride of TILE_W (docs/contract.md's P is ours to lay out). A lane's
    classes sit at compile-time offsets from one pointer, so a load or store per class needs no
    address arithmetic; with the user's NCHW class stride (H * W, a run-time value) each costs
    two or three instructions."""
    tl.static_assert(TILE_W == 32)
    lanes = img_ptr + (n >> 5) * (C * TILE_W) + (n & 31) + c0 * TILE_W
    # The lanes' axis as contiguous: see lane_offsets (a block boundary breaks the run, which
    # cannot mislead a vectorisation: a lane holds one centre).
    return tl.max_contiguous(lanes[None, :] + (tl.arange(0, CLASS_TILE) * TILE_W)[:, None],
                             [1, TILE_W])


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

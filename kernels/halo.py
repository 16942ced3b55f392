"""The window-row kernels: forward and backward of the common case (stride 1, every class of a
pixel in one lane, K <= 7), each in one pass over the logits and one launch.

A program is one warp whose 32 lanes hold 32 consecutive pixels of a row, of which the middle
32 - 2r are the tile's centres (or, in the backward, its output pixels) and r on each side the
halo. A window row is loaded once per class, one value per lane, and its column shifts come from
the neighbouring lanes (``tl.gather`` along the lanes: warp shuffles, no shared memory), so a
lane keeps one row of C values live instead of K shifted copies. That is what lets the kernels
run at 128-144 registers up to C = 26 (14-16 warps per SM to hide the loads' latency) where the
kernels of ``forward``/``backward`` hold C x K values per window row (up to 255 registers).

ROWS centre rows share every loaded window row: the rows are a block dimension of the
accumulators ([ROWS, CLASS_TILE, 32]), each window row added to every centre row it is in the
window of. The window rows that reach every centre row are a run-time loop; the ROWS - 1 above
and below them, which do not, are unrolled, so that the rows they miss are never touched (a
multiply-add by a zero weight would still issue: 5 of 30 per centre row and class at K = 5).

Forward: the z-score statistics of each loaded pixel come from the row in registers (no
statistics pass), then z = (x - m) * rstd is pooled. Per tile it writes the Minkowski partials
and P exactly as ``forward._forward_kernel`` does (same meaning, same P layout), so the combine
is shared. Backward: the gather of docs/math.md over the centre rows, then the z-score Jacobian,
as ``backward._backward_kernel``; each centre's d loss / d L from its tile's max L (one power per
loaded centre row, then shifted like P).

DRAM traffic per pixel (C classes of E bytes, labels of Y bytes): the forward reads the logits
and labels and writes P (C*E) and L (4 B, reduction="none" only); the backward reads P, the
logits and the labels and writes the gradient (C*E); window rows and halo come from L1/L2.
Interpolating (upsample="bilinear"), both read the low-resolution logits interpolated along
the columns instead (upsample.columns_interpolated: the logits' height, the target's width, each
pixel's classes centred, so that the z-score needs no mean and the forward pools x with 1 / std
in each coefficient) and blend two of their rows per output row; the backward stages each
tile's share of every input row of the low-resolution logits' gradient (and of each band's
first row, the band above's share apart), which _upsample_columns_kernel sums into the gradient
(bench/upsample_model.py counts it all).
"""

import triton
import triton.language as tl

from .tiling import (also, clamp, class_range, finite_centres, image_of_P, minkowski_share,
                     omega_of, scalar, tile_indices, tile_scale_factors)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
LANES = tl.constexpr(32)


@triton.jit
def _tile(tiles_h, tiles_w, planes, W, ROWS: tl.constexpr, RADIUS: tl.constexpr,
          WIDE: tl.constexpr):
    """(image: an int64 scalar; plane, first row: scalars; the lanes' pixel columns [32]; the centre
    rows [ROWS]; the centre lanes, r .. 31 - r inside the image [32]). Programs run over (image,
    plane, tile row, tile column), the column fastest; tile column t covers centres t * (32 - 2r)
    ..; its lanes start r columns to the left."""
    image, plane, tile_row, tile_col = tile_indices(tiles_h, tiles_w, planes)
    row0 = (tile_row * ROWS).to(tl.int32)
    cols = (tile_col * (LANES - 2 * RADIUS)).to(tl.int32) - RADIUS + tl.arange(0, LANES)
    rows = row0 + tl.arange(0, ROWS)
    if WIDE:
        row0, cols, rows = row0.to(tl.int64), cols.to(tl.int64), rows.to(tl.int64)
    else:  # 32-bit offsets inside an image; only the image's base offset needs 64 bits
        plane = plane.to(tl.int32)
    lane = tl.arange(0, LANES)
    return image, plane, row0, cols, rows, (lane >= RADIUS) & (lane < LANES - RADIUS) & (cols < W)


@triton.jit
def _source(DV: tl.constexpr):
    """The lane each lane reads to see its neighbour DV columns away (lanes beyond the warp's edge
    read an edge lane: only halo lanes do, and their results are never used)."""
    return tl.minimum(tl.maximum(tl.arange(0, LANES) + DV, 0), LANES - 1)


@triton.jit
def _shift(v, DV: tl.constexpr):
    """Lane values [32] moved by DV lanes (warp shuffles; none for DV = 0, which Triton would
    still shuffle)."""
    if DV == 0:
        return v
    return tl.gather(v, _source(DV), 0)


@triton.jit
def _shift_rows(v, DV: tl.constexpr):
    """Per-class lane values [CLASS_TILE, 32] moved by DV lanes."""
    if DV == 0:
        return v
    return tl.gather(v, tl.broadcast_to(_source(DV)[None, :], v.shape), 1)


@triton.jit
def _shift3(v, DV: tl.constexpr):
    """Per-row and class lane values [N, CLASS_TILE, 32] moved by DV lanes."""
    return tl.gather(v, tl.broadcast_to(_source(DV)[None, None, :], v.shape), 2)


@triton.jit
def _outer(a, b):
    """a[:, None] + b[None, :], offsets [N, 32] of the lanes' pixels b, marked as consecutive along
    the lanes with one element per lane: clamped columns and blocked P hide that from Triton, and
    without it Triton 3.6 lays the lanes along the classes (uncoalesced loads, shared-memory
    conversions, spills); see tiling.lane_offsets. (The hint must mark an operation computed
    here: on a function's argument Triton drops it.)"""
    return tl.multiple_of(tl.max_contiguous(a[:, None] + b[None, :], [1, LANES]), [1, 1])


@triton.jit
def _class_ptrs(base, lanes, cls_off):
    """Pointers [N, 32]: base + lanes (the lanes' offsets [32], consecutive along the lanes as
    _outer marks them) + cls_off[:, None], the class offsets added to one 64-bit address per lane
    so that they become the loads' immediate offsets instead of an address computation each."""
    p = tl.max_contiguous(tl.multiple_of(base + lanes, [1]), [LANES])
    return p[None, :] + cls_off[:, None]


@triton.jit
def _class_ptrs3(base, lanes, cls_off):
    """Pointers [ROWS, N, 32] from the rows' lane offsets [ROWS, 32], as _class_ptrs."""
    p = tl.max_contiguous(tl.multiple_of(base + lanes, [1, 1]), [1, LANES])
    return p[:, None, :] + cls_off[None, :, None]


@triton.jit
def _omega(du, DV: tl.constexpr, RADIUS: tl.constexpr, base, inv_base, ROWS: tl.constexpr):
    """omega(max(du, |DV|)) [ROWS] for the rows' distances du [ROWS] (max with DV and -DV: JIT
    code has no abs() of a compile-time constant)."""
    far = tl.maximum(tl.maximum(du, DV), -DV)
    return tl.zeros([ROWS], base.dtype) + omega_of(far, base, inv_base, RADIUS)


@triton.jit
def _interpolated(x_plane, cls, cmask, qi, cols, H, W, sxh, idx_ptr, lam_ptr,
                  ACC: tl.constexpr, C: tl.constexpr):
    """(v [CLASS_TILE, 32], f: a scalar, flag [32]): the logits of output row qi at the lanes'
    columns, bilinearly interpolated, are f * v where flag is 0 and not finite where it is NaN (v
    is finite: the column pass stores a non-finite pixel as zeros and a NaN flag). The plane holds
    the low-resolution rows already interpolated along the columns (W wide, in blocks of 32
    columns: upsample.columns_interpolated, rows sxh apart), so two loads per class from L1/L2,
    each class at a compile-time offset from the lane's address, and one multiply-add: v = x[ia]
    + rho x[ib] (kernels/upsample.py's _factored, PyTorch's (1 - l) x[i0] + l x[i1] to a
    rounding); the flags blend alike, so that a NaN spreads as PyTorch's blend spreads it (with a
    weight of 0 too). The addresses are clamped into the image, so the loads need no mask (a
    masked load zeroes its registers first: an instruction per class); the caller weights what
    lies outside by 0."""
    qic = clamp(qi, H - 1)
    q = clamp(cols, W - 1)
    lanes = (q >> 5) * ((C + 1) * LANES) + (q & (LANES - 1))
    m = cmask[:, None]
    rho = tl.load(lam_ptr + H + W + qic).to(ACC)
    ra = x_plane + tl.load(idx_ptr + qic).to(cols.dtype) * sxh
    rb = x_plane + tl.load(idx_ptr + H + qic).to(cols.dtype) * sxh
    xa = tl.load(_class_ptrs(ra, lanes, cls * LANES), mask=m)
    xb = tl.load(_class_ptrs(rb, lanes, cls * LANES), mask=m)
    flag = tl.load(ra + lanes + C * LANES) + rho * tl.load(rb + lanes + C * LANES)
    return xa + rho * xb, tl.load(lam_ptr + 2 * H + W + qic).to(ACC), flag


@triton.jit
def _row_logits(x_plane, cls, cmask, qi, cols, H, W, sxc, sxh, sxw, eps, idx_ptr, lam_ptr,
                ACC: tl.constexpr, C: tl.constexpr, ZSCORE: tl.constexpr,
                UPSAMPLE: tl.constexpr):
    """One loaded row of pixels (row qi, the lanes' columns): (z [CLASS_TILE, 32], ok: in the
    image [32], nan: 1 where the pixel is finite, NaN where not, scale: the factor of z in each
    coefficient [32]). z is 0 where the pixel is outside the image or not finite, so that a
    pixel that takes part nowhere contributes exact zeros and one that takes part carries its
    NaN through its coefficient; elsewhere scale is nan. UPSAMPLE: the pixels are interpolated
    from low-resolution logits (_interpolated: f * x, and a flag, NaN where not finite) whose
    classes the column pass centred, so the mean is 0 already, and which are finite (a
    non-finite pixel is zeros and its flag), so z = x needs no select: outside the image (rows
    and columns clamped into it) and beside a centre of another class its coefficient is 0, and
    the flag rides on the coefficient: scale is f / std + flag (f + flag without the z-score),
    one multiply per pixel and window column instead of one per class."""
    ok = also((cols >= 0) & (cols < W), (qi >= 0) & (qi < H))
    if UPSAMPLE:
        x, f, flag = _interpolated(x_plane, cls, cmask, qi, cols, H, W, sxh, idx_ptr, lam_ptr,
                                   ACC, C)
        scale = f + flag
        if ZSCORE:
            # sums over the padded classes add -0.0, which folds away at compile time (+0.0
            # does not: x + 0.0 is not x for x = -0.0)
            x = tl.where(cmask[:, None], x, 0.0)
            var = tl.sum(tl.where(cmask[:, None], x * x, -0.0), axis=0) / C * (f * f)
            scale = f * (1.0 / tl.sqrt(var + eps)) + flag
        return x, ok, 1.0 + flag, scale
    qic = clamp(qi, H - 1)
    qjc = clamp(cols, W - 1)
    x = tl.load(x_plane + _outer(cls * sxc, qic * sxh + qjc * sxw),
                mask=cmask[:, None] & ok[None, :], other=0.0).to(ACC)
    if ZSCORE:
        # (the padded classes' -0.0: see above)
        m = tl.sum(tl.where(cmask[:, None], x, -0.0), axis=0) / C
        dev = tl.where(cmask[:, None], x - m[None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.where(cmask[:, None], dev * dev, -0.0), axis=0) / C + eps)
        finite = rstd == rstd  # a NaN or infinite logit makes the pixel's variance NaN
        z = dev * rstd[None, :]
    else:
        total = tl.sum(tl.where(cmask[:, None], x, -0.0), axis=0)
        finite = (total - total) == 0
        z = x
    z = tl.where((finite & ok)[None, :], z, 0.0)
    nan = tl.where(finite, 1.0, float("nan"))
    return z, ok, nan, nan


@triton.jit
def _labels(y_plane, qi, cols, ok, H, W, syh, syw):
    """Labels (int32: they are only compared) of a row of pixels, -1 outside the image: -1 is
    never a valid centre's label (labels are checked to lie in [0, C) or be ignore_index, and an
    ignored centre's results are discarded)."""
    y = tl.load(y_plane + clamp(qi, H - 1) * syh + clamp(cols, W - 1) * syw, mask=ok, other=0)
    return tl.where(ok, y.to(tl.int32), -1)


@triton.jit
def _window_row(acc, xi, count, t, x_plane, y_plane, plane_ok, far, row0, cols, cls, cmask,
                y_c, H, W, sxc, sxh, sxw, syh, syw, eps, base, inv_base, idx_ptr, lam_ptr,
                ACC: tl.constexpr, C: tl.constexpr, RADIUS: tl.constexpr, ROWS: tl.constexpr,
                ZSCORE: tl.constexpr, UPSAMPLE: tl.constexpr, WEIGHT_NORM: tl.constexpr,
                STATIC: tl.constexpr):
    """The forward's sums plus window row row0 - r + t (the plane at depth distance far) pooled
    into the centre rows; STATIC: t is a compile-time constant, and only the centre rows it
    reaches are updated."""
    qi = tl.where(plane_ok, row0 - RADIUS + t, -1)  # a plane outside: no row inside
    z, ok, fin, scale = _row_logits(x_plane, cls, cmask, qi, cols, H, W, sxc, sxh, sxw, eps,
                                    idx_ptr, lam_ptr, ACC, C, ZSCORE, UPSAMPLE)
    y_q = _labels(y_plane, qi, cols, ok, H, W, syh, syw)
    # each centre row's distance to this window row (depth included)
    du = tl.maximum(tl.abs(t - RADIUS - tl.arange(0, ROWS)), far)                  # [ROWS]
    near = du <= RADIUS
    rows_in = (tl.abs(t - RADIUS - tl.arange(0, ROWS)) <= RADIUS)[:, None]          # [ROWS, 1]
    for DV in tl.static_range(-RADIUS, RADIUS + 1):
        same = (_shift(y_q, DV)[None, :] == y_c) & near[:, None]                   # [ROWS, 32]
        omega = _omega(du, DV, RADIUS, base, inv_base, ROWS)                        # [ROWS]
        # a non-finite neighbour's coefficient is NaN (its z is 0): every class of the centre's
        # pooled vector turns NaN, and with the weight normaliser xi too
        a = tl.where(same, omega[:, None] * _shift(scale, DV)[None, :], 0.0)
        update = acc + a[:, None, :] * _shift_rows(z, DV)[None, :, :]
        if WEIGHT_NORM and UPSAMPLE:  # a holds f (and 1 / std) too
            weight = tl.where(same, omega[:, None] * _shift(fin, DV)[None, :], 0.0)
        else:
            weight = a
        if STATIC:
            acc = tl.where(rows_in[:, :, None], update, acc)
            if WEIGHT_NORM:
                xi = tl.where(rows_in, xi + weight, xi)
            else:
                count = tl.where(rows_in, count + same.to(tl.int32), count)
        else:
            acc = update
            if WEIGHT_NORM:
                xi += weight
            else:
                count += same.to(tl.int32)
    return acc, xi, count


@triton.jit
def _window_rows(acc, xi, count, pd, dd, far, D, x_img, y_img, sxd, syd, row0, cols, cls, cmask,
                 y_c, H, W, sxc, sxh, sxw, syh, syw, eps, base, inv_base, idx_ptr, lam_ptr,
                 ACC: tl.constexpr, C: tl.constexpr, RADIUS: tl.constexpr, ROWS: tl.constexpr,
                 ZSCORE: tl.constexpr, UPSAMPLE: tl.constexpr, WEIGHT_NORM: tl.constexpr):
    """The forward's sums plus every window row of plane pd + dd (depth distance far)."""
    qd = pd + dd
    plane_ok = (qd >= 0) & (qd < D)
    qdc = clamp(qd, D - 1)
    x_plane = x_img + qdc * sxd
    y_plane = y_img + qdc * syd
    # Window rows t in [ROWS - 1, 2r] reach every centre row: a run-time loop. The others,
    # above and below, are unrolled: t is then a compile-time constant and so is each
    # register's centre row, so the updates of the rows they cannot reach fold away (where
    # multiply-adds by a zero weight would not: 0 * z is not 0 to the compiler).
    A: tl.constexpr = min(ROWS - 1, 2 * RADIUS + 1)
    B: tl.constexpr = 2 * RADIUS + 1
    for t in tl.static_range(0, A):
        acc, xi, count = _window_row(acc, xi, count, t, x_plane, y_plane, plane_ok, far, row0,
                                     cols, cls, cmask, y_c, H, W, sxc, sxh, sxw, syh, syw, eps,
                                     base, inv_base, idx_ptr, lam_ptr, ACC, C, RADIUS, ROWS,
                                     ZSCORE, UPSAMPLE, WEIGHT_NORM, True)
    for t in range(A, B):
        acc, xi, count = _window_row(acc, xi, count, t, x_plane, y_plane, plane_ok, far, row0,
                                     cols, cls, cmask, y_c, H, W, sxc, sxh, sxw, syh, syw, eps,
                                     base, inv_base, idx_ptr, lam_ptr, ACC, C, RADIUS, ROWS,
                                     ZSCORE, UPSAMPLE, WEIGHT_NORM, False)
    for t in tl.static_range(B, ROWS + 2 * RADIUS):
        acc, xi, count = _window_row(acc, xi, count, t, x_plane, y_plane, plane_ok, far, row0,
                                     cols, cls, cmask, y_c, H, W, sxc, sxh, sxw, syh, syw, eps,
                                     base, inv_base, idx_ptr, lam_ptr, ACC, C, RADIUS, ROWS,
                                     ZSCORE, UPSAMPLE, WEIGHT_NORM, True)
    return acc, xi, count


@triton.jit(do_not_specialize=["D", "H", "W", "tiles_h", "tiles_w", "radius_d", "ignore_index"])
def _halo_forward_kernel(
    x_ptr,        # logits (B, C, D, H, W), any strides; UPSAMPLE: the low-resolution logits
                  # interpolated along the columns (B, H_in, cdiv(W, 32), C + 1, 32)
    y_ptr,        # target (B, D, H, W), any integer dtype, any strides
    weight_ptr,   # (C,) ACC: class weights (read only if HAS_WEIGHT)
    P_ptr,        # out (B, blocks, C, 32), logits dtype: P (scaled for MEAN), tiling.block_lanes
    L_ptr,        # out (B, D, H, W) contiguous, ACC: L_p, 0 at invalid centres (not MEAN)
    part_ptr,     # out (n_tiles, 3) ACC: per tile max L, sum w (L / max L)^k, sum w
    ticket_ptr,   # out int32: zeroed for the combine
    idx_ptr,      # int32 and ACC tables of kernels/upsample.py (read only if UPSAMPLE)
    lam_ptr,
    D, H, W, tiles_h, tiles_w,
    sxb, sxc, sxd, sxh, sxw,  # logits strides of B, C, D, H, W (UPSAMPLE: the columns' B, H)
    syb, syd, syh, syw,       # target strides of B, D, H, W
    radius_d, ignore_index,
    eps_hi, eps_lo, power_hi, power_lo, base_hi, base_lo,  # as split_scalar()
    C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr, ROWS: tl.constexpr,
    ZSCORE: tl.constexpr, WEIGHT_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    NEED_P: tl.constexpr, MEAN: tl.constexpr, WIDE: tl.constexpr, UPSAMPLE: tl.constexpr,
    POWER1: tl.constexpr = 0,  # k - 1 where a small integer (1, 2, 3; UPSAMPLE only), else 0
    PIVOT: tl.constexpr = False,  # the label's value as the softmax's reference (UPSAMPLE only,
                                  # where forward.label_pivot holds)
):
    """The costs of a tile of ROWS x (32 - 2r) centres; P and the partials as
    forward._forward_kernel writes them (MEAN: P scaled by w_p (L_p / t)^(k-1), t the tile's max
    L, and no L). D, H, W: the target's sizes; UPSAMPLE: the logits are at low resolution and each
    loaded row is interpolated in registers (D = 1)."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    eps = scalar(eps_hi, eps_lo, ACC)
    power = scalar(power_hi, power_lo, ACC)
    base = scalar(base_hi, base_lo, ACC)
    inv_base = 1.0 / base
    image, pd, row0, cols, rows, centre_lane = _tile(tiles_h, tiles_w, D, W, ROWS, RADIUS, WIDE)
    cls, cmask = class_range(0, CLASS_TILE, C, WIDE)
    x_img = x_ptr + image * sxb
    y_img = y_ptr + image * syb
    P_img, plane = image_of_P(P_ptr, image, D, H, W, C, LANES, WIDE)

    # The centres: lanes r .. 31 - r of each row.
    live = centre_lane[None, :] & (rows < H)[:, None]                       # [ROWS, 32]
    y_c = tl.load(y_img + pd * syd + _outer(clamp(rows, H - 1) * syh, clamp(cols, W - 1) * syw),
                  mask=live, other=0)
    valid = live & (y_c.to(tl.int64) != ignore_index)
    y_c = y_c.to(tl.int32)
    y_cls = tl.minimum(tl.maximum(y_c, 0), C - 1)  # in bounds whatever check_target allowed
    if UPSAMPLE:
        # An invalid centre pools nothing (-3 is no pixel's label, -1 marks those outside): its
        # sums stay exact zeros, and with g = 0 below its P is e * 0 = 0 without a select per
        # class. (The plain kernels keep the select: their launch plans were measured so.)
        y_c = tl.where(valid, y_c, -3)

    acc = tl.zeros([ROWS, CLASS_TILE, LANES], dtype=ACC)
    xi = tl.zeros([ROWS, LANES], dtype=ACC)
    count = tl.zeros([ROWS, LANES], dtype=tl.int32)  # without the weight normaliser: xi, counted
    if UPSAMPLE:  # an image: its one plane at distance 0, a constant in every window row
        acc, xi, count = _window_rows(acc, xi, count, pd, 0, 0, D, x_img, y_img, sxd, syd, row0,
                                      cols, cls, cmask, y_c, H, W, sxc, sxh, sxw, syh, syw, eps,
                                      base, inv_base, idx_ptr, lam_ptr, ACC, C, RADIUS, ROWS,
                                      ZSCORE, UPSAMPLE, WEIGHT_NORM)
    else:
        for dd in range(-radius_d, radius_d + 1):
            acc, xi, count = _window_rows(acc, xi, count, pd, dd, tl.abs(dd), D, x_img, y_img,
                                          sxd, syd, row0, cols, cls, cmask, y_c, H, W, sxc, sxh,
                                          sxw, syh, syw, eps, base, inv_base, idx_ptr, lam_ptr,
                                          ACC, C, RADIUS, ROWS, ZSCORE, UPSAMPLE, WEIGHT_NORM)
    if not WEIGHT_NORM:
        xi = count.to(ACC)

    # L = logsumexp(f) - f[y] with f = acc / xi, differences taken in acc's units before the
    # scaling, so that L is exactly 0 where y's value dominates.
    k = LOG2E / tl.where(xi > 0, xi, 1.0)
    if PIVOT:
        # The label's value as the reference, no max over the classes: each exponent is one
        # multiply-add, acc k - (acc_y k) (the label's own, the product's rounding error: its
        # exponential is 1 to a rounding, taken as 1 below). The bound keeps every other
        # exponential above 0, so L > 0 but for roundings.
        acc_y = tl.sum(tl.where(cls[None, :, None] == y_cls[:, None, :], acc, -0.0), axis=1)
        top = acc_y * k
        e = tl.where(cmask[None, :, None],
                     tl.exp2(acc * k[:, None, :] - top[:, None, :]), -0.0)
    else:
        top = tl.max(tl.where(cmask[None, :, None], acc, float("-inf")), axis=1)
        # padded classes: -0.0, which a sum drops at compile time (+0.0 it would have to add)
        e = tl.where(cmask[None, :, None], tl.exp2((acc - top[:, None, :]) * k[:, None, :]),
                     -0.0)
    total = tl.sum(e, axis=1)
    if PIVOT:
        L = tl.log2(total) * LN2
        L = tl.where(L < 0, 0.0, L)  # rounding only; NaN stays NaN
    else:
        acc_y = tl.sum(tl.where(cls[None, :, None] == y_cls[:, None, :], acc, -0.0), axis=1)
        L = (top - acc_y) / tl.where(xi > 0, xi, 1.0) \
            + tl.log2(tl.where(total == 0, 1.0, total)) * LN2
        L = tl.where(L < 0, 0.0, L)  # rounding only (L >= 0 exactly); NaN stays NaN
    L = tl.where(valid, L, 0.0)

    # Minkowski partials scaled by the tile's max L: L^k never overflows or underflows.
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + y_cls, mask=valid, other=0.0)
    else:
        w = valid.to(ACC)
    w = tl.where(valid, w, 0.0)
    has_nan = tl.max(tl.max((L != L).to(tl.int32), axis=1), axis=0)
    l_max = tl.max(tl.max(L, axis=1), axis=0)
    l_max = tl.where(has_nan > 0, float("nan"), l_max)
    unit = 1.0 / tl.where(l_max > 0, l_max, 1.0)
    if POWER1 == 0:
        r = minkowski_share(L, unit, power - 1.0)
    else:  # (L / t)^(k-1) as products: no log and exp per centre
        r = L * unit
        if POWER1 >= 2:
            r = r * (L * unit)
        if POWER1 >= 3:
            r = r * (L * unit)
    tile = tl.program_id(0).to(tl.int64)
    if tile == 0:  # the combine's ticket, zeroed here: it runs after this kernel on the stream
        tl.store(ticket_ptr, 0)
    tl.store(part_ptr + 3 * tile, l_max)
    tl.store(part_ptr + 3 * tile + 1, tl.sum(tl.sum(w * r * L * unit, axis=1), axis=0))
    tl.store(part_ptr + 3 * tile + 2, tl.sum(tl.sum(w, axis=1), axis=0))

    n = _outer((pd * H + rows) * W, cols)  # the centres' flat index in the image
    if MEAN:
        # d loss / d L_p = [a * (t / max L)^(k-1)] * [w_p (L_p / t)^(k-1)]: the second factor
        # goes into P now, the first (per tile) comes from the combine.
        g = w * r
    else:
        tl.store(L_ptr + image * plane + n, L, mask=live)
        g = valid.to(ACC) if UPSAMPLE else tl.full([ROWS, LANES], 1.0, ACC)
    if NEED_P:
        scale = g / tl.where(xi > 0, xi, 1.0)
        share = scale / total
        # P_c = e_c * share - [c == y] scale: every class without the label's term, then the
        # label's class again from the same e_y (a second store to the same address by the same
        # lane, which lands last): the per-class comparison with y would otherwise stay live
        # across the exponentials, packed into registers bit by bit
        if UPSAMPLE:  # share and scale are 0 at invalid centres, whose e is finite
            P = e * share[:, None, :]
            if PIVOT:  # e_y = 1 (to a rounding)
                P_y = share - scale
            else:
                P_y = tl.exp2((acc_y - top) * k) * share - scale
        else:
            # (a NaN at invalid centres out)
            P = tl.where(valid[:, None, :], e * share[:, None, :], 0.0)
            e_y = tl.exp2((acc_y - top) * k)
            P_y = tl.where(valid, e_y * share - scale, 0.0)
        lanes = (n >> 5) * (C * LANES) + (n & 31)
        tl.store(_class_ptrs3(P_img, lanes, cls * LANES),
                 P.to(P_ptr.dtype.element_ty), mask=cmask[None, :, None] & live[:, None, :])
        tl.store(P_img + lanes + y_cls * LANES, P_y.to(P_ptr.dtype.element_ty), mask=live)
        # The padding of the image's last block of P: zeros, so that P is a function of the
        # inputs (never read). The program whose tile holds the image's last centre writes it.
        if (pd == D - 1) & (row0 + ROWS >= H) & (tl.program_id(0) % tiles_w == tiles_w - 1):
            m = ((plane - 1) // LANES) * LANES + tl.arange(0, LANES)
            tl.store(_class_ptrs(P_img, (m >> 5) * (C * LANES) + (m & 31), cls * LANES),
                     tl.zeros([CLASS_TILE, LANES], P_ptr.dtype.element_ty),
                     mask=cmask[:, None] & (m >= plane)[None, :])


@triton.jit
def _gather_row(G, t, y_img, P_img, s_ptr, s_img, grad, unit, power1, pdc, plane_ok, far,
                tile_plane, row0, cols, col_in, y_q, H, W, ftiles_w, syd, syh, syw, base,
                inv_base, cls, cmask, C: tl.constexpr, RADIUS: tl.constexpr, ROWS: tl.constexpr,
                FROWS: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
                STATIC: tl.constexpr, UPSAMPLE: tl.constexpr):
    """G plus what centre row row0 - r + t (depth pdc) owes the rows' pixels (see _gather);
    STATIC: t is a compile-time constant, and only the rows it reaches are updated."""
    TW: tl.constexpr = LANES - 2 * RADIUS
    pi = row0 - RADIUS + t
    ok = also(col_in, (pi >= 0) & (pi < H) & plane_ok)
    pic = clamp(pi, H - 1)
    pjc = clamp(cols, W - 1)
    y_p = _labels(y_img + pdc * syd, tl.where(plane_ok, pi, -1), cols, ok, H, W, syh, syw)
    n = (pdc * H + pic) * W + pjc  # the centres' flat index in the image
    if MEAN:
        if UPSAMPLE:  # s_ptr: each lane's column of forward tiles (_gather)
            t_max = tl.load(s_ptr + (pic // FROWS) * ftiles_w)
        else:
            t_max = tl.load(s_ptr + (tile_plane + pic // FROWS) * ftiles_w + pjc // TW)
        if UPSAMPLE:  # log2 t, and unit is (k - 1) log2 max L: one exp2 (k = 1: 0^0 = 1)
            s = grad * tl.where(power1 == 0, 1.0, tl.exp2(power1 * t_max - unit))
        else:
            s = grad * minkowski_share(t_max, unit, power1)
    else:
        s = tl.load(s_img + n)
    s = tl.where(ok, s, 0.0)
    if UPSAMPLE and MEAN:
        # The address is clamped into the image and s is 0 where not ok; a NaN in P there
        # (a NaN cost) makes every gradient element NaN anyway. Unmasked, the load needs no
        # zeroed registers first (an instruction per class).
        Pr = tl.load(_class_ptrs(P_img, (n >> 5) * (C * LANES) + (n & 31), cls * LANES),
                     mask=cmask[:, None]).to(ACC)
    else:
        Pr = tl.load(_class_ptrs(P_img, (n >> 5) * (C * LANES) + (n & 31), cls * LANES),
                     mask=cmask[:, None] & ok[None, :], other=0.0).to(ACC)
    if not MEAN:
        Pr, s = finite_centres(Pr, s, cls, 0)
    du = tl.maximum(tl.abs(t - RADIUS - tl.arange(0, ROWS)), far)
    near = du <= RADIUS
    for DV in tl.static_range(-RADIUS, RADIUS + 1):
        same = (_shift(y_p, DV)[None, :] == y_q) & near[:, None]
        omega = _omega(du, DV, RADIUS, base, inv_base, ROWS)
        a = tl.where(same, omega[:, None] * _shift(s, DV)[None, :], 0.0)
        if STATIC:  # the rows out of the centre row's reach fold away (see the forward)
            rows_in = tl.abs(t - RADIUS - tl.arange(0, ROWS)) <= RADIUS
            G = tl.where(rows_in[:, None, None],
                         G + a[:, None, :] * _shift_rows(Pr, DV)[None, :, :], G)
        else:
            G += a[:, None, :] * _shift_rows(Pr, DV)[None, :, :]
    return G


@triton.jit
def _gather(y_img, P_img, s_ptr, s_img, grad, unit, power1, image, qd, row0, cols, y_q, D, H,
            W, ftiles_h, ftiles_w, syd, syh, syw, radius_d, base, inv_base, cls, cmask,
            C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr, ROWS: tl.constexpr,
            FROWS: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
            UPSAMPLE: tl.constexpr = False):
    """G [ROWS, CLASS_TILE, 32] of the pixels q of rows row0 .. row0 + ROWS - 1 (labels y_q, -2
    where not an output pixel): the sum over the centres p whose window holds q, with y_p == y_q,
    of omega * dL_p * P_p, gathered from the centre rows, each loaded once. MEAN: dL_p = grad * a
    * (t / max L)^(k-1), t the max L of p's forward tile (FROWS rows of 32 - 2r centres), times
    the factor w_p (L_p / t)^(k-1) already in P; else dL from the map at s_img. The centre rows
    that reach some output rows but not all are unrolled (see _halo_forward_kernel). UPSAMPLE
    (the interpolating backward): with MEAN, s_ptr holds log2 t and unit is (k - 1) log2 max L
    (_halo_upsample_backward_kernel), and P's loads are unmasked."""
    G = tl.zeros([ROWS, CLASS_TILE, LANES], dtype=ACC)
    col_in = (cols >= 0) & (cols < W)
    if UPSAMPLE and MEAN:  # each lane's column of the image's forward tiles, once (D = 1)
        s_ptr += image * ftiles_h * ftiles_w + clamp(cols, W - 1) // (LANES - 2 * RADIUS)
    for dd in range(-radius_d, radius_d + 1):
        pd = qd - dd
        plane_ok = (pd >= 0) & (pd < D)
        pdc = clamp(pd, D - 1)
        far = tl.abs(dd)
        tile_plane = (image * D + pdc) * ftiles_h
        # As the forward's window rows (_halo_forward_kernel): the centre rows that reach every
        # output row are a run-time loop, the others unrolled.
        A: tl.constexpr = min(ROWS - 1, 2 * RADIUS + 1)
        B: tl.constexpr = 2 * RADIUS + 1
        for t in tl.static_range(0, A):
            G = _gather_row(G, t, y_img, P_img, s_ptr, s_img, grad, unit, power1, pdc, plane_ok,
                            far, tile_plane, row0, cols, col_in, y_q, H, W, ftiles_w, syd, syh,
                            syw, base, inv_base, cls, cmask, C, RADIUS, ROWS, FROWS, MEAN, ACC,
                            True, UPSAMPLE)
        for t in range(A, B):
            G = _gather_row(G, t, y_img, P_img, s_ptr, s_img, grad, unit, power1, pdc, plane_ok,
                            far, tile_plane, row0, cols, col_in, y_q, H, W, ftiles_w, syd, syh,
                            syw, base, inv_base, cls, cmask, C, RADIUS, ROWS, FROWS, MEAN, ACC,
                            False, UPSAMPLE)
        for t in tl.static_range(B, ROWS + 2 * RADIUS):
            G = _gather_row(G, t, y_img, P_img, s_ptr, s_img, grad, unit, power1, pdc, plane_ok,
                            far, tile_plane, row0, cols, col_in, y_q, H, W, ftiles_w, syd, syh,
                            syw, base, inv_base, cls, cmask, C, RADIUS, ROWS, FROWS, MEAN, ACC,
                            True, UPSAMPLE)
    return tl.where(cmask[None, :, None], G, 0.0)


@triton.jit
def _backward_scalars(grad_ptr, scal_ptr, eps_hi, eps_lo, base_hi, base_lo, power_hi, power_lo,
                      ACC: tl.constexpr, MEAN: tl.constexpr):
    """(eps, base, 1 / base, grad, unit, power - 1) of a backward: the scalars as split_scalar()
    passed them; MEAN: d output / d loss times a, and the factors of each tile's share
    (tiling.tile_scale_factors), else zeros (unused)."""
    eps = scalar(eps_hi, eps_lo, ACC)
    base = scalar(base_hi, base_lo, ACC)
    grad = tl.zeros([], dtype=ACC)
    unit = grad
    power1 = grad
    if MEAN:
        grad, unit, power1 = tile_scale_factors(tl.load(grad_ptr).to(ACC), scal_ptr, power_hi,
                                                power_lo, ACC)
    return eps, base, 1.0 / base, grad, unit, power1


@triton.jit
def _jacobian(x, G, cmask, eps, C: tl.constexpr, ZSCORE: tl.constexpr):
    """dx [ROWS, CLASS_TILE, 32] = rstd (G - mean_c G - z mean_c(G z)) of the pixels whose logits
    are x (every class in the lane), G itself without the z-score."""
    if ZSCORE:  # -0.0 for the padded classes: their terms fold away (see _row_logits)
        real = cmask[None, :, None]
        m = tl.sum(tl.where(real, x, -0.0), axis=1) / C
        dev = tl.where(real, x - m[:, None, :], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(tl.where(real, dev * dev, -0.0), axis=1) / C + eps)
        mean_G = tl.sum(tl.where(real, G, -0.0), axis=1) / C
        mean_Gz = tl.sum(tl.where(real, G * dev, -0.0), axis=1) * rstd / C
        return rstd[:, None, :] * (G - mean_G[:, None, :] - dev * (rstd * mean_Gz)[:, None, :])
    return G


@triton.jit(do_not_specialize=["D", "H", "W", "tiles_h", "tiles_w", "ftiles_h", "ftiles_w",
                               "radius_d"])
def _halo_backward_kernel(
    x_ptr,       # logits (B, C, D, H, W), any strides
    y_ptr,       # target (B, D, H, W), any integer dtype, any strides
    P_ptr,       # (B, blocks, C, 32), logits dtype: P (scaled for MEAN), tiling.block_lanes
    s_ptr,       # MEAN: (forward tiles,) ACC, each forward tile's max L t (the combine's);
                 # else (B, D, H, W) contiguous ACC, the map dL = d output / d L
    grad_ptr,    # 0-dim: d output / d loss (read only if MEAN)
    scal_ptr,    # (3,) float64: the loss, max L, a (read only if MEAN)
    dx_ptr,      # out (B, C, D, H, W), logits dtype, strides sdb/sdc/sdd/sdh/sdw
    D, H, W, tiles_h, tiles_w, ftiles_h, ftiles_w,
    sxb, sxc, sxd, sxh, sxw,
    syb, syd, syh, syw,
    sdb, sdc, sdd, sdh, sdw,
    radius_d,
    eps_hi, eps_lo, base_hi, base_lo, power_hi, power_lo,  # as split_scalar()
    C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr, ROWS: tl.constexpr,
    FROWS: tl.constexpr, ZSCORE: tl.constexpr, MEAN: tl.constexpr, WIDE: tl.constexpr,
):
    """dx of a tile of ROWS x (32 - 2r) pixels q: G_q (_gather), then dx_q = rstd_q (G_q -
    mean_c G_q - z_q mean_c(G_q z_q)) (_jacobian)."""
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    eps, base, inv_base, grad, unit, power1 = _backward_scalars(
        grad_ptr, scal_ptr, eps_hi, eps_lo, base_hi, base_lo, power_hi, power_lo, ACC, MEAN)
    image, qd, row0, cols, rows, out_lane = _tile(tiles_h, tiles_w, D, W, ROWS, RADIUS, WIDE)
    cls, cmask = class_range(0, CLASS_TILE, C, WIDE)
    y_img = y_ptr + image * syb
    P_img, plane = image_of_P(P_ptr, image, D, H, W, C, LANES, WIDE)

    live = out_lane[None, :] & (rows < H)[:, None]                            # [ROWS, 32]
    y_q = tl.load(y_img + qd * syd + _outer(clamp(rows, H - 1) * syh, clamp(cols, W - 1) * syw),
                  mask=live, other=0).to(tl.int32)
    y_q = tl.where(live, y_q, -2)  # never a centre's (-1 marks centres outside the image)
    G = _gather(y_img, P_img, s_ptr, s_ptr + image * plane, grad, unit, power1, image, qd, row0,
                cols, y_q, D, H, W, ftiles_h, ftiles_w, syd, syh, syw, radius_d, base,
                inv_base, cls, cmask, C, CLASS_TILE, RADIUS, ROWS, FROWS, MEAN, ACC)

    # The Jacobian: every class of the output pixels in the lane.
    x_plane = x_ptr + image * sxb + qd * sxd
    pix = rows[:, None] * sxh + cols[None, :] * sxw
    mask3 = cmask[None, :, None] & live[:, None, :]
    x = G
    if ZSCORE:
        x = tl.load(_class_ptrs3(x_plane, pix, cls * sxc), mask=mask3, other=0.0).to(ACC)
    dx = _jacobian(x, G, cmask, eps, C, ZSCORE)
    dpix = rows[:, None] * sdh + cols[None, :] * sdw
    tl.store(_class_ptrs3(dx_ptr + image * sdb + qd * sdd, dpix, cls * sdc),
             dx.to(dx_ptr.dtype.element_ty), mask=mask3)


@triton.jit
def _flush(dst, acc, cmask, key, wa, wb, nxt, store, k, tail, first, SPAN: tl.constexpr,
           STEPS: tl.constexpr, TAIL: tl.constexpr):
    """Stage a finished low-resolution row of the gradient at ``dst`` (its tile's input columns,
    [CLASS_TILE, SPAN] in the accumulation dtype, for _upsample_columns_kernel): acc ([1,
    CLASS_TILE, 32]: the layout _gather's rows have, so that adding a row converts nothing) holds
    what its output rows owe it at the tile's output columns; each input column the tile touches
    sums the lanes whose stencil holds it, with their weights (the transposed interpolation). A
    lane's stencil starts at input column ``key`` (runs of lanes, at most 2^STEPS long), weight
    ``wa`` there and ``wb`` at the next column where ``nxt``. Segmented sums of acc * wa towards
    each run's first lane and of acc * wb towards its last (STEPS shuffle-adds each, in a fixed
    order) leave a column's total at its run's first lane: its own run's first sum plus the run
    before's last (``store`` lanes, at column ``k`` of the tile's). The last run's second sum, owed
    to the column after it, is stored by the lane after it, or with TAIL (no lane after: K = 1) by
    the ``tail`` lane itself. The image's first run can be longer (align_corners=False clamps
    the first output columns' sources to column 0): ``first`` more steps (a run-time loop, none
    but in the image's first tile)."""
    lane = tl.arange(0, LANES)
    cls = tl.arange(0, acc.shape[1])
    # wheres, not products with 0: a NaN stays in its stencil's columns, as PyTorch's; and on
    # the classes, so that the class tile's padding stays a constant 0 the compiler drops
    real = cmask[None, :, None]
    # the second sums first, then the run before's joins each run's first lane before the first
    # sums: two values per class live, not three
    last = tl.where(real & nxt[None, None, :], acc * wb[None, None, :], 0.0)
    for s in tl.static_range(STEPS):
        behind = (lane >= (1 << s)) & (_shift(key, -(1 << s)) == key)
        last = tl.where(real & behind[None, None, :], last + _shift3(last, -(1 << s)), last)
    for s in range(STEPS, STEPS + first):
        src = tl.maximum(lane - (1 << s), 0)
        behind = (lane >= (1 << s)) & (tl.gather(key, src, 0) == key)
        last = tl.where(real & behind[None, None, :],
                        last + tl.gather(last, tl.broadcast_to(src[None, None, :], last.shape), 2),
                        last)
    if TAIL:
        tl.store(_class_ptrs3(dst, k[None, :] + 1, cls * SPAN), last,
                 mask=real & tail[None, None, :])
    lead = (lane > 0) & (_shift(key, -1) != key)
    total = tl.where(real, acc * wa[None, None, :], 0.0)
    total = tl.where(real & lead[None, None, :], total + _shift3(last, -1), total)
    for s in tl.static_range(STEPS):
        ahead = (lane + (1 << s) < LANES) & (_shift(key, 1 << s) == key)
        total = tl.where(real & ahead[None, None, :], total + _shift3(total, 1 << s), total)
    for s in range(STEPS, STEPS + first):
        src = tl.minimum(lane + (1 << s), LANES - 1)
        ahead = (lane + (1 << s) < LANES) & (tl.gather(key, src, 0) == key)
        total = tl.where(real & ahead[None, None, :],
                         total + tl.gather(total, tl.broadcast_to(src[None, None, :],
                                                                  total.shape), 2),
                         total)
    # the class offsets (SPAN apart) are immediates of one address per lane
    tl.store(_class_ptrs3(dst, k[None, :], cls * SPAN), total,
             mask=real & store[None, None, :])


@triton.jit(do_not_specialize=["H", "W", "H_in", "bands", "tiles", "band", "ftiles_h",
                               "ftiles_w", "extra"])
def _halo_upsample_backward_kernel(
    x_ptr,       # low-resolution logits interpolated along the columns, blocks of 32 columns
                 # (B, H_in, cdiv(W, 32), C + 1, 32) (upsample.columns_interpolated)
    y_ptr,       # target (B, H, W), any integer dtype, any strides
    P_ptr,       # (B, blocks, C, 32) over the target's pixels, as _halo_backward_kernel's
    s_ptr,       # as _halo_backward_kernel's (the forward's tiles and centres: the target's),
                 # but with MEAN log2 of each forward tile's max L
    grad_ptr,
    scal_ptr,
    stage_ptr,   # out (B, H_in, tiles, C, SPAN) ACC: each input row at its tiles' columns
    above_ptr,   # out (B, bands, tiles, C, SPAN) ACC: each band's first row, as the band
                 # above owes it (b > 0)
    idx_ptr,     # int32 and ACC tables of kernels/upsample.py
    lam_ptr,
    H, W, H_in, bands, tiles, ftiles_h, ftiles_w,
    band,        # input rows per program (kernels/upsample.py's band_rows)
    extra,       # more shuffle-adds for the image's first column (kernels/upsample.py's Plan)
    sxb, sxh,    # the columns' image and row strides
    syb, syh, syw,
    eps_hi, eps_lo, base_hi, base_lo, power_hi, power_lo,  # as split_scalar()
    C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr, FROWS: tl.constexpr,
    ZSCORE: tl.constexpr, MEAN: tl.constexpr, WIDE: tl.constexpr, ROWS: tl.constexpr,
    STEPS: tl.constexpr,  # log2 of the most output columns whose stencils start at one column
    SPAN: tl.constexpr,   # the most input columns a tile touches (kernels/upsample.py's Plan)
):
    """The gradient of a band of input rows at the input columns a tile of 32 - 2r output
    columns touches, staged for _upsample_columns_kernel, deterministic and without atomics: the
    program walks down the output rows whose stencil's first row is in the band, ROWS at a time
    (their gradients at the output columns formed in registers: _gather, then _jacobian at the
    interpolated logits, row by row), and adds each row's, weighted, to the two input rows of
    its stencil (A, B). Output rows map to input rows in order, one step at a time
    (upsampling), so when the stencil moves down, A's row has all it is owed: _flush stages it.
    Every output row is formed once: the band above's last output rows owe the band's first
    row too, and stage that share apart. Tiles do not overlap; two tiles stage the input
    columns they share, each its own share."""
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    TW: tl.constexpr = LANES - 2 * RADIUS
    eps, base, inv_base, grad, unit, power1 = _backward_scalars(
        grad_ptr, scal_ptr, eps_hi, eps_lo, base_hi, base_lo, power_hi, power_lo, ACC, MEAN)
    if MEAN:  # s_ptr holds log2 t: a tile's share (t / max L)^(k-1) is one exp2 (_gather)
        max_l = tl.load(scal_ptr + 1)
        unit = power1 * tl.log2(tl.where(max_l > 0, max_l, 1.0)).to(ACC)
    pid = tl.program_id(0).to(tl.int64)
    tile = pid % tiles
    rest = pid // tiles
    image = rest // bands
    b = rest % bands
    i0 = (b * band).to(tl.int32)
    i_end = tl.minimum(i0 + band, H_in)
    c_first = (tile * TW).to(tl.int32)
    c_last = tl.minimum(c_first + TW - 1, W - 1)
    inv = idx_ptr + 2 * H + 2 * W  # first and last output row of each input row
    # The output rows whose stencil starts in the band: those after the last that holds the row
    # above it, to the last that holds its last row (first rows are non-decreasing).
    q_start = tl.where(i0 > 0, tl.load(inv + H_in + tl.maximum(i0 - 1, 0)) + 1, 0)
    q_stop = tl.load(inv + H_in + i_end - 1)
    jlo = tl.load(idx_ptr + 2 * H + c_first)  # i0 of the tile's first output column
    lane = tl.arange(0, LANES)
    cols = c_first - RADIUS + lane
    if WIDE:  # the output rows and columns index the target and P: int64 offsets from them
        q_start, q_stop = q_start.to(tl.int64), q_stop.to(tl.int64)
        cols = cols.to(tl.int64)
    out_lane = (lane >= RADIUS) & (lane < LANES - RADIUS) & (cols <= c_last)
    colc = clamp(cols, W - 1)
    # The transposed interpolation's lanes (_flush): each output lane's stencil starts at input
    # column w0 (key: runs of lanes, a distinct key per halo lane), weight wa there and wb at
    # w0 + 1 (nxt: the stencil reaches it; at the last input column both weights are w0's).
    w0 = tl.load(idx_ptr + 2 * H + colc)
    w1 = tl.load(idx_ptr + 2 * H + W + colc)
    lw = tl.load(lam_ptr + H + colc).to(ACC)
    nxt = out_lane & (w1 != w0)
    wa = tl.where(out_lane, tl.where(nxt, 1.0 - lw, 1.0), 0.0)
    wb = tl.where(nxt, lw, 0.0)
    key = tl.where(out_lane, w0, -1 - lane)
    # Stores: a run's first lane, at its column's place among the tile's (k); the column after
    # the last output lane's, where its stencil reaches it (tail), by the lane after it (a halo
    # lane), or without one (K = 1) by the last lane itself in a second store (_flush's TAIL).
    store = out_lane & ((lane == 0) | (_shift(key, -1) != key))
    tail = nxt & ((lane == LANES - 1) | (_shift(out_lane.to(tl.int32), 1) == 0))
    k = w0 - jlo
    if RADIUS > 0:
        store = store | (_shift(tail.to(tl.int32), -1) > 0)
        k = tl.where(out_lane, k, _shift(k, -1) + 1)
    # the image's first tile: its first run may take more steps (a run-time count, so that the
    # loops stay loops that the other tiles skip)
    first = tl.where(tile == 0, extra, 0)
    cls, cmask = class_range(0, CLASS_TILE, C, WIDE)
    y_img = y_ptr + image * syb
    P_img, plane = image_of_P(P_ptr, image, tl.full([], 1, tl.int32), H, W, C, LANES, WIDE)
    x_plane = x_ptr + image * sxb
    # input row i of this tile: staged at stage + i * step; the next band's first row, as this
    # band owes it, at below
    stage = stage_ptr + (image * H_in * tiles + tile) * (C * SPAN)
    step = tiles.to(tl.int64) * (C * SPAN)
    below = above_ptr + ((image * bands + b + 1) * tiles + tile) * (C * SPAN)

    A = tl.zeros([1, CLASS_TILE, LANES], dtype=ACC)
    B = tl.zeros([1, CLASS_TILE, LANES], dtype=ACC)
    a = i0  # A's input row (the first output row's stencil starts there); B's is a + 1
    for q0 in range(q_start, q_stop + 1, ROWS):
        # The first row's stencil, before the gather: a flush then holds no G. Where it moved
        # down (h0 == a + 1), A's row is owed nothing more. (A loop over the rows passed, one
        # or none, not an if: so bench/kernel_report.py can count it by how often it runs.)
        h0 = tl.minimum(tl.load(idx_ptr + q0), tl.load(idx_ptr + H + q0))
        for _ in range(a, h0):
            _flush(stage + a * step, A, cmask, key, wa, wb, nxt, store, k, tail, first,
                   SPAN, STEPS, RADIUS == 0)
            A = B
            B = tl.zeros([1, CLASS_TILE, LANES], dtype=ACC)
            a += 1
        q = q0 + tl.arange(0, ROWS)
        y_q = tl.load(y_img + _outer(tl.minimum(q, q_stop) * syh, colc * syw),
                      mask=out_lane[None, :] & (q <= q_stop)[:, None], other=0).to(tl.int32)
        y_q = tl.where(out_lane[None, :] & (q <= q_stop)[:, None], y_q, -2)
        G = _gather(y_img, P_img, s_ptr, s_ptr + image * plane, grad, unit, power1, image, 0,
                    q0, cols, y_q, 1, H, W, ftiles_h, ftiles_w, 0, syh, syw, 0, base, inv_base,
                    cls, cmask, C, CLASS_TILE, RADIUS, ROWS, FROWS, MEAN, ACC, True)
        # one output row at a time: its stencil's rows decide where its gradient goes (a row
        # past the band's last, in its last step, adds zeros)
        for r in tl.static_range(ROWS):
            qr = tl.minimum(q0 + r, q_stop)
            ia = tl.load(idx_ptr + qr)  # the stencil's rows, the larger weight's first
            ib = tl.load(idx_ptr + H + qr)
            h0 = tl.minimum(ia, ib)
            h1 = tl.maximum(ia, ib)
            lh = tl.load(lam_ptr + qr).to(ACC)
            if r > 0:
                for _ in range(a, h0):
                    _flush(stage + a * step, A, cmask, key, wa, wb, nxt, store, k,
                           tail, first, SPAN, STEPS, RADIUS == 0)
                    A = B
                    B = tl.zeros([1, CLASS_TILE, LANES], dtype=ACC)
                    a += 1
            # row r of G: a sum with -0.0 over the rows, which folds to a register pick
            Gr = tl.sum(tl.where((tl.arange(0, ROWS) == r)[:, None, None], G, -0.0), axis=0)
            top = tl.where(h1 == h0, 1.0, 1.0 - lh)  # the last input row takes both weights
            # The row's gradient at the interpolated logits f * v (_interpolated) is rstd * u,
            # u = G - v * c: the z-score's Jacobian without its - mean_c G, which is 0 up to P's
            # rounding (P sums to 0 over the classes at every centre, the softmax's gradient, so
            # G does at every pixel). rstd (and the pixel's NaN flag) and the row's weights ride
            # on one factor per lane and accumulator, 0 off the output lanes and rows, where u is
            # finite (v is; G too, unless a NaN cost makes every gradient element NaN).
            keep = out_lane & (q0 + r <= q_stop)
            u = Gr
            wgt = tl.full([LANES], 1.0, ACC)
            if ZSCORE:
                v, f, flag = _interpolated(x_plane, cls, cmask, qr, cols, H, W, sxh, idx_ptr,
                                           lam_ptr, ACC, C)
                v = tl.where(cmask[:, None], v, 0.0)
                f2 = f * f
                wgt = 1.0 / tl.sqrt(tl.sum(tl.where(cmask[:, None], v * v, -0.0), axis=0)
                                    * (f2 / C) + eps)
                c = tl.sum(tl.where(cmask[:, None], Gr * v, -0.0), axis=0) * (wgt * wgt * (f2 / C))
                u = Gr - v * c[None, :]
                wgt += flag  # NaN where the pixel is not finite (v is finite: _interpolated)
            # wheres on the classes: the class tile's padding stays a constant 0 that the
            # compiler drops (a product with 0 it must keep), instead of registers and sums
            # nobody stores
            ta = tl.where(keep, top * wgt, 0.0)
            tb = tl.where(keep, (1.0 - top) * wgt, 0.0)
            A = tl.where(cmask[None, :, None], A + ta[None, None, :] * u[None, :, :], 0.0)
            B = tl.where(cmask[None, :, None], B + tb[None, None, :] * u[None, :, :], 0.0)
    # The last output row's stencil starts at i_end - 1, or at i_end - 2 where i_end - 1 is
    # only ever a stencil's second row (align_corners=True, whose scale can round below
    # (n - 1) / (m - 1)): then B's row is the band's last (the loop's one trip). A band with no
    # output rows (such a last row alone) stores zeros.
    _flush(stage + a * step, A, cmask, key, wa, wb, nxt, store, k, tail, first, SPAN, STEPS,
           RADIUS == 0)
    for _ in range(a + 1, i_end):
        a += 1
        _flush(stage + a * step, B, cmask, key, wa, wb, nxt, store, k, tail, first, SPAN, STEPS,
               RADIUS == 0)
        B = tl.zeros([1, CLASS_TILE, LANES], dtype=ACC)
    if i_end < H_in:  # the next band's first row: this band's share (zeros if it owes none)
        _flush(below, B, cmask, key, wa, wb, nxt, store, k, tail, first, SPAN, STEPS,
               RADIUS == 0)


@triton.jit(do_not_specialize=["H", "W", "H_in", "W_in", "bands", "tiles", "band"])
def _upsample_columns_kernel(
    stage_ptr,   # (B, H_in, tiles, C, SPAN) ACC, _halo_upsample_backward_kernel's
    above_ptr,   # (B, bands, tiles, C, SPAN) ACC, its band-above shares
    idx_ptr,     # int32 tables of kernels/upsample.py
    dx_ptr,      # out (B, C, H_in, W_in), any floating dtype, strides sdb/sdc/sdh/sdw
    scale_ptr,   # (B,) ACC: each image's factor (read only if SCALE)
    H, W, H_in, W_in, bands, tiles, band,
    sdb, sdc, sdh, sdw,
    C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr, SPAN: tl.constexpr,
    SCALE: tl.constexpr,
):
    """32 input columns of one input row of the gradient from what the backward staged: the
    share of the tile whose output columns start the column's stencils, then, where the column
    is shared, the next tile's; in the first row of a band after the first, then the band
    above's shares, in the same order. Every column is summed in that fixed order, then (SCALE)
    multiplied by the image's factor and rounded once to the gradient's dtype."""
    TW: tl.constexpr = LANES - 2 * RADIUS
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(W_in, LANES)
    rest = pid // blocks
    row = rest % H_in
    image = rest // H_in
    j = (pid % blocks).to(tl.int32) * LANES + tl.arange(0, LANES)
    jm = j < W_in
    jc = tl.minimum(j, W_in - 1)
    inv_w = idx_ptr + 2 * H + 2 * W + 2 * H_in  # first and last output column of each input one
    t1 = tl.load(inv_w + jc) // TW
    t2 = tl.load(inv_w + W_in + jc) // TW
    k1 = j - tl.load(idx_ptr + 2 * H + t1 * TW)
    k2 = j - tl.load(idx_ptr + 2 * H + t2 * TW)
    cls = tl.arange(0, CLASS_TILE)
    m = (cls < C)[:, None] & jm[None, :]
    two = m & (t2 != t1)[None, :]
    # one address per lane and share, the classes (SPAN apart) its loads' immediate offsets
    lanes1 = t1 * (C * SPAN) + k1
    lanes2 = t2 * (C * SPAN) + k2
    staged = stage_ptr + (image * H_in + row) * tiles * (C * SPAN)
    total = (tl.load(_class_ptrs(staged, lanes1, cls * SPAN), mask=m, other=0.0)
             + tl.load(_class_ptrs(staged, lanes2, cls * SPAN), mask=two, other=0.0))
    b = row // band
    if (row == b * band) & (row > 0):
        above = above_ptr + (image * bands + b) * tiles * (C * SPAN)
        total += (tl.load(_class_ptrs(above, lanes1, cls * SPAN), mask=m, other=0.0)
                  + tl.load(_class_ptrs(above, lanes2, cls * SPAN), mask=two, other=0.0))
    if SCALE:
        total = total * tl.load(scale_ptr + image)
    out = dx_ptr + image * sdb + row * sdh
    tl.store(out + (cls.to(tl.int64) * sdc)[:, None] + (j.to(tl.int64) * sdw)[None, :],
             total.to(dx_ptr.dtype.element_ty), mask=m)

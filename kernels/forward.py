"""The forward kernel of the locally adaptive loss (outside the window-row kernels of halo.py)
and its launch helper.

Names as in docs/contract.md and docs/math.md. For 2-D images (B, C, H, W) and 3-D volumes
(B, C, D, H, W) alike (an image is a volume of depth 1 with a depth radius of 0), after the
statistics pass of stats.py (zscore=True): ``_forward_kernel``, per tile of ROWS x 32 centres,
the pooled vector f of every centre, the cost L = logsumexp(f) - f[y], the tile's Minkowski
partials (max L, sum w (L / max L)^k, sum w, with w the class weight of each valid centre) and
P = (softmax(f) - onehot(y)) / xi for the backward (0 at invalid centres). combine.py then adds
the partials into the loss.

The z-score is folded into the pooling: with a_q = omega * [y_q == y_p] * rstd_q,
``f_p = (1 / xi_p) (sum_q a_q x_q - sum_q a_q m_q)``: per neighbour and class one multiply-add
of the raw logit, the mean's term once per neighbour and lane (m_q and rstd_q come from
``_zscore_stats_kernel``). The price is one rounding of sum a_q x_q, an error of about
|mean| / std float32 ulps of z, which only logits with a common offset far beyond their spread
would notice.

Work per program: one warp, its 32 lanes on 32 consecutive columns, each lane holding every
class (or a chunk of them) of ROWS vertically adjacent centres (one at strides > 1). For the
common windows (UNROLL: K <= 7 where the registers allow, see config.ROW_PLANS) the window's
rows are a run-time loop and each row is added to every centre of the lane (weight 0 outside a
centre's window), so a row is loaded once for ROWS centres; its columns are unrolled,
compile-time offsets from one pointer per class (no address arithmetic per class and column),
rows are clamped into the image and columns outside it masked. The generic path (any K, one
row) runs both as run-time loops, the neighbour coordinates clamped into the image. Either way
a neighbour outside the window, the image or the centre's class has coefficient 0, and its
values are replaced by 0 when they are not finite (a where, or the load's mask), so that a NaN
in a pixel that takes part nowhere (ignored, another class) stays out of the loss, as in
F.cross_entropy; a non-finite pixel that takes part makes its coefficient NaN.

Why this design ("store", docs/contract.md's "The gradient, written out"): the backward needs
g_p over a window of every pixel and only the Minkowski factor is global, so the forward stores
P (C values per centre in the logits' dtype, in blocks of 32 centres with the classes of a block
at a stride of 32: tiling.block_lanes) and the backward is one gather whose per-class loads
need no address arithmetic. Recomputing f in the
backward would pool over a halo of radius 2r and exchange P between lanes, which Triton offers
only through the experimental Gluon API. The price is memory: P and the gradient coexist during
the backward, 2x the logits at stride 1.

DRAM traffic per pixel at stride 1 (C classes of E bytes, labels of Y bytes; a tile's halo comes
from L1/L2, as neighbouring tiles read the same rows): the statistics pass reads the logits and
writes 8 B; the forward reads the logits (C*E), the 8 B and the labels (Y) and writes P (C*E)
and L (4 B, reduction="none" only). bench/kernel_report.py counts it per launch for the
performance model.
"""

import math

import torch
import triton
import triton.language as tl

from . import halo
from .config import (TILE_W, accumulation_dtype, cdiv, launch_config, needs_wide_index, span,
                     split_scalar, target_of, tile_grid)
from .geometry import as_volume, centre_shape, grid_of
from .stats import zscore_stats
from .upsample import columns_interpolated, fusable, plan_of, upsample_tables
from .tiling import (also, block_lanes, clamp, class_range, image_of_P, lane_offsets,
                     minkowski_share, omega_of, scalar, tile_coordinates, window_weight)


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _standardised(x, m_q, r_q, col_in, ZSCORE: tl.constexpr):
    """(x, m, scale) of one loaded neighbour, [CLASS_TILE, TILE_W], [TILE_W] and [TILE_W]: its
    z-score is (x - m) * scale, with m_q and r_q from the statistics pass. x and m are 0 where
    the pixel is not finite (and where its column is outside the image: loaded from the clamped
    edge column), and scale NaN, so that the coefficient (not the values) carries a non-finite
    pixel's NaN to the centres it takes part in, and a pixel that takes part nowhere contributes
    exact zeros."""
    if ZSCORE:
        finite = r_q == r_q  # a NaN or infinite logit makes the pixel's rstd NaN
        scale = r_q
    else:
        total = tl.sum(x, axis=0)
        finite = (total - total) == 0
        scale = tl.where(finite, 1.0, float("nan"))
    keep = finite & col_in
    return tl.where(keep[None, :], x, 0.0), tl.where(keep, m_q, 0.0), scale


@triton.jit
def _take(acc, xi, shift, x, m, same, omega, scale, WEIGHT_NORM: tl.constexpr):
    """Add one neighbour to one centre: with its coefficient a = omega * rstd_q where it takes
    part (else 0), acc += a * x_q per class and shift += a * m_q once per lane, so that acc -
    shift is the pooled sum of a * (x_q - m_q) with no subtraction per class and neighbour; xi
    counts it (or its weight)."""
    a = tl.where(same, omega * scale, 0.0)
    acc += a[None, :] * x
    shift += a * m
    if WEIGHT_NORM:
        xi += tl.where(same, omega, 0.0)
    else:
        xi += tl.where(same, 1.0, 0.0)
    return acc, xi, shift


@triton.jit
def _take_row(acc, xi, shift, y, O: tl.constexpr, t, far, DV: tl.constexpr, x, m, ok, y_q, scale,
              base, inv_base, RADIUS: tl.constexpr, ROWS: tl.constexpr,
              WEIGHT_NORM: tl.constexpr):
    """_take for the lane's centre O (a no-op where O >= ROWS) from window row t and column
    offset DV: its distance max(|t - O - RADIUS|, far) decides the weight, none beyond RADIUS."""
    if O < ROWS:
        du = tl.maximum(tl.abs(t - O - RADIUS), far)
        acc, xi, shift = _take(acc, xi, shift, x, m, ok & (y_q == y) & (du <= RADIUS),
                               window_weight(du, DV, RADIUS, base, inv_base), scale, WEIGHT_NORM)
    return acc, xi, shift


@triton.jit
def _neighbour_row(x_plane, y_plane, mean_img, rstd_img, cls, cmask, qdc, qi, qj, qjc, col_in,
                   col_ok, H, W, sxc, sxh, sxw, syh, syw, m_q, r_q, ACC: tl.constexpr,
                   ZSCORE: tl.constexpr, TILE_W: tl.constexpr):
    """One window row of the lanes' neighbours (row qi, columns qj): (x, m, scale, label, in the
    window's image), see _standardised."""
    qic = clamp(qi, H - 1)
    ok = also(col_ok, (qi >= 0) & (qi < H))
    y_q = tl.load(y_plane + qic * syh + qjc * syw).to(tl.int32)
    x = tl.load(x_plane + lane_offsets(cls, sxc, qic * sxh + qjc * sxw, TILE_W),
                mask=cmask[:, None], other=0.0).to(ACC)
    if ZSCORE:
        q = (qdc * H + qic) * W + qjc
        m_q = tl.load(mean_img + q)
        r_q = tl.load(rstd_img + q)
    x, m, scale = _standardised(x, m_q, r_q, col_in, ZSCORE)
    return x, m, scale, y_q, ok


@triton.jit
def _pool(x_img, y_img, mean_img, rstd_img, c0, D, H, W, pd, row0, pj, y0, y1, y2, y3,
          sxc, sxd, sxh, sxw, syd, syh, syw, radius, radius_d, base, inv_base,
          ACC: tl.constexpr, C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr,
          ROWS: tl.constexpr, TILE_W: tl.constexpr, ZSCORE: tl.constexpr,
          WEIGHT_NORM: tl.constexpr, UNROLL: tl.constexpr, WIDE: tl.constexpr):
    """Pooled sums (times xi) and xi of the ROWS centres of each lane, for classes
    [c0, c0 + CLASS_TILE): the centres sit at pixel rows row0 + RADIUS + o (o < ROWS; row0 is the
    first window row), column pj, depth pd; y0..y3 their labels. The loops: see the module's
    docstring (unrolling the rows too, ptxas hoists every row's loads at once and spills)."""
    cls, cmask = class_range(c0, CLASS_TILE, C, WIDE)
    acc0 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    acc1 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    acc2 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    acc3 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    xi0 = tl.zeros([TILE_W], dtype=ACC)
    xi1 = tl.zeros([TILE_W], dtype=ACC)
    xi2 = tl.zeros([TILE_W], dtype=ACC)
    xi3 = tl.zeros([TILE_W], dtype=ACC)
    sh0 = tl.zeros([TILE_W], dtype=ACC)
    sh1 = tl.zeros([TILE_W], dtype=ACC)
    sh2 = tl.zeros([TILE_W], dtype=ACC)
    sh3 = tl.zeros([TILE_W], dtype=ACC)
    m_q = tl.zeros([TILE_W], dtype=ACC)
    r_q = tl.zeros([TILE_W], dtype=ACC)
    for dd in range(-radius_d, radius_d + 1):
        qd = pd + dd
        qdc = clamp(qd, D - 1)
        x_plane = x_img + qdc * sxd
        y_plane = y_img + qdc * syd
        if not UNROLL:  # the generic path: any window, one row
            for dv in range(-radius, radius + 1):
                qj = pj + dv
                col_in = (qj >= 0) & (qj < W)
                col_ok = also(col_in, (qd >= 0) & (qd < D))
                qjc = clamp(qj, W - 1)
                far = tl.maximum(tl.abs(dv), tl.abs(dd))
                for t in range(0, 2 * radius + 1):
                    x, m, scale, y_q, ok = _neighbour_row(
                        x_plane, y_plane, mean_img, rstd_img, cls, cmask, qdc, row0 + t, qj,
                        qjc, col_in, col_ok, H, W, sxc, sxh, sxw, syh, syw, m_q, r_q, ACC,
                        ZSCORE, TILE_W)
                    omega = omega_of(tl.maximum(tl.abs(t - radius), far), base, inv_base,
                                     RADIUS)
                    acc0, xi0, sh0 = _take(acc0, xi0, sh0, x, m, ok & (y_q == y0), omega,
                                           scale, WEIGHT_NORM)
        else:
            # Window rows in a run-time loop, each serving the ROWS centres of the lane (weight
            # 0 outside a centre's window: every row is added to every centre, which costs
            # (ROWS + 2 RADIUS) / (2 RADIUS + 1) times the multiply-adds of the window and saves
            # the loads); its columns unrolled, as compile-time offsets from one pointer per
            # class (no address arithmetic per class and column). Columns outside the image are
            # masked, not clamped. Everything about a row's weights is warp-uniform.
            plane_ok = (qd >= 0) & (qd < D)
            far = tl.abs(dd)
            for t in range(0, ROWS + 2 * RADIUS):
                qi = row0 + t
                qic = clamp(qi, H - 1)
                row_ok = plane_ok & (qi >= 0) & (qi < H)
                x_row = x_plane + lane_offsets(cls, sxc, qic * sxh + pj * sxw, TILE_W)
                y_row = y_plane + qic * syh + pj * syw
                q_row = (qdc * H + qic) * W + pj
                for DV in tl.static_range(-RADIUS, RADIUS + 1):
                    col_in = (pj + DV >= 0) & (pj + DV < W)
                    ok = also(col_in, row_ok)
                    y_q = tl.load(y_row + DV * syw, mask=col_in).to(tl.int32)
                    if ZSCORE:
                        # The masked load's zeros stand for _standardised's where per class.
                        m_q = tl.load(mean_img + q_row + DV, mask=col_in, other=0.0)
                        scale = tl.load(rstd_img + q_row + DV, mask=col_in, other=0.0)
                        keep = col_in & (scale == scale)
                        x = tl.load(x_row + DV * sxw, mask=cmask[:, None] & keep[None, :],
                                    other=0.0).to(ACC)
                        m = tl.where(keep, m_q, 0.0)
                    else:
                        x = tl.load(x_row + DV * sxw, mask=cmask[:, None] & col_in[None, :])
                        x, m, scale = _standardised(x.to(ACC), m_q, r_q, col_in, ZSCORE)
                    # every row to every centre o of the lane: a weight where its distance
                    # (depth included) is within RADIUS
                    acc0, xi0, sh0 = _take_row(acc0, xi0, sh0, y0, 0, t, far, DV, x, m, ok, y_q,
                                               scale, base, inv_base, RADIUS, ROWS, WEIGHT_NORM)
                    acc1, xi1, sh1 = _take_row(acc1, xi1, sh1, y1, 1, t, far, DV, x, m, ok, y_q,
                                               scale, base, inv_base, RADIUS, ROWS, WEIGHT_NORM)
                    acc2, xi2, sh2 = _take_row(acc2, xi2, sh2, y2, 2, t, far, DV, x, m, ok, y_q,
                                               scale, base, inv_base, RADIUS, ROWS, WEIGHT_NORM)
                    acc3, xi3, sh3 = _take_row(acc3, xi3, sh3, y3, 3, t, far, DV, x, m, ok, y_q,
                                               scale, base, inv_base, RADIUS, ROWS, WEIGHT_NORM)
    return (acc0 - sh0[None, :], acc1 - sh1[None, :], acc2 - sh2[None, :], acc3 - sh3[None, :],
            xi0, xi1, xi2, xi3)


@triton.jit
def _centre(y_img, pd, ci, cj, Hc, Wc, syd, syh, syw, ignore_index, C: tl.constexpr,
            STRIDE: tl.constexpr):
    """Label (as int32: labels are only compared, and int64 ones would take two registers each),
    live (in the centre grid) and valid (live and not ignored) of the centres (ci, cj), and the
    label clamped into [0, C) wherever it selects a class. Labels outside [0, C) only get here
    with check_target=False: the loss is then unspecified, every access stays in bounds."""
    live = also(cj < Wc, ci < Hc)
    y = tl.load(y_img + pd * syd + (ci * STRIDE) * syh + (cj * STRIDE) * syw, mask=live,
                other=0)
    valid = live & (y.to(tl.int64) != ignore_index)
    y = y.to(tl.int32)
    return y, live, valid, tl.minimum(tl.maximum(y, 0), C - 1)


@triton.jit
def _cost(acc, xi, cmask, cls, y_cls):
    """The pieces of L and P, with f = acc / xi: the max of acc, e = exp(f - max f) = 2^((acc -
    max acc) * log2(e) / xi) per class (one exp2: Triton's exp is exp2 of a product), their sum
    and acc[y]. Differences are taken in acc's units before any scaling, so that L is 0 exactly
    where y's value dominates the others (a product before the difference would leave a rounding
    error of |f| ulps)."""
    k = LOG2E / tl.where(xi > 0, xi, 1.0)
    a = tl.where(cmask[:, None], acc, float("-inf"))
    top = tl.max(a, axis=0)
    e = tl.exp2((a - top[None, :]) * k[None, :])
    acc_y = tl.sum(tl.where(cls[:, None] == y_cls[None, :], acc, 0.0), axis=0)
    return top, e, tl.sum(e, axis=0), acc_y


@triton.jit
def _loss_of(top, total, acc_y, xi, valid):
    """L = logsumexp(f) - f[y] = (max acc - acc[y]) / xi + log(sum e) from _cost (total == 0 only
    in the rows a lane does not own: the log stays finite there; a NaN total stays NaN)."""
    L = (top - acc_y) / tl.where(xi > 0, xi, 1.0) + tl.log2(tl.where(total == 0, 1.0, total)) * LN2
    L = tl.where(L < 0, 0.0, L)  # rounding only (L >= 0 exactly); NaN stays NaN
    return tl.where(valid, L, 0.0)


@triton.jit
def _store_P(P_ptr, P_img, e, e_scale, scale, valid, live, cls, c0, cmask, y_cls, centre,
             C: tl.constexpr, TILE_W: tl.constexpr):
    """P = (softmax(f) - onehot(y)) * scale at valid centres (scale = 1 / xi, times the centre's
    share of the Minkowski factor for the mean), 0 elsewhere (a where, not a product with a
    mask: a NaN at an invalid centre must not reach the gradient). softmax(f) * scale =
    e * e_scale: e the exponentials of _cost and e_scale = scale / their sum, or e = softmax(f)
    and e_scale = scale (one multiply-add per class either way)."""
    P = e * e_scale[None, :] - tl.where(cls[:, None] == y_cls[None, :], scale[None, :], 0.0)
    P = tl.where(valid[None, :], P, 0.0)
    tl.store(block_lanes(P_img, centre, c0, cls.shape[0], C, TILE_W),
             P.to(P_ptr.dtype.element_ty), mask=cmask[:, None] & live[None, :])


@triton.jit
def _zero_padding(P_ptr, P_img, n_centres, last, c0, cmask, C: tl.constexpr,
                  CLASS_TILE: tl.constexpr, TILE_W: tl.constexpr):
    """Zeros into the padding of an image's last block of P (flat indices n_centres .. the next
    multiple of TILE_W), by the program whose tile holds the image's last centre (``last``): never
    read, but written, so that P is a function of the inputs."""
    n = ((n_centres - 1) // TILE_W) * TILE_W + tl.arange(0, TILE_W)
    tl.store(block_lanes(P_img, n, c0, CLASS_TILE, C, TILE_W),
             tl.zeros([CLASS_TILE, TILE_W], P_ptr.dtype.element_ty),
             mask=cmask[:, None] & also(n >= n_centres, last)[None, :])


@triton.jit
def _weight_of(weight_ptr, y_cls, valid, ACC: tl.constexpr, HAS_WEIGHT: tl.constexpr):
    """w_p: the class weight of a valid centre (1 without weights), 0 elsewhere."""
    if HAS_WEIGHT:
        w = tl.load(weight_ptr + y_cls, mask=valid, other=0.0)
    else:
        w = valid.to(ACC)
    return tl.where(valid, w, 0.0)


@triton.jit(do_not_specialize=["D", "H", "W", "Dc", "Hc", "Wc", "tiles_h", "tiles_w",
                               "radius", "radius_d", "chunks", "ignore_index"])
def _forward_kernel(
    x_ptr,        # logits (B, C, D, H, W), any strides
    y_ptr,        # target (B, D, H, W), any integer dtype, any strides
    weight_ptr,   # (C,) ACC: class weights (read only if HAS_WEIGHT)
    mean_ptr,     # (B, D, H, W) contiguous, ACC: per-pixel mean (read only if ZSCORE)
    rstd_ptr,     # (B, D, H, W) contiguous, ACC: per-pixel rstd (likewise)
    P_ptr,        # out (B, blocks, C, TILE_W), logits dtype: P, or P scaled (MEAN), in blocks of
                  # TILE_W centres (tiling.block_lanes)
    L_ptr,        # out (B, Dc, Hc, Wc) contiguous, ACC: L_p, 0 at invalid centres (not MEAN)
    part_ptr,     # out (n_tiles, 3) ACC: per tile max L, sum w (L / max L)^k, sum w
    ticket_ptr,   # out int32: zeroed for the combine
    D, H, W, Dc, Hc, Wc, tiles_h, tiles_w,
    sxb, sxc, sxd, sxh, sxw,  # logits strides of B, C, D, H, W
    syb, syd, syh, syw,       # target strides of B, D, H, W
    radius, radius_d, chunks, ignore_index,
    power_hi, power_lo, base_hi, base_lo,  # as split_scalar()
    C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr, STRIDE: tl.constexpr,
    ROWS: tl.constexpr, TILE_W: tl.constexpr, ZSCORE: tl.constexpr, WEIGHT_NORM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr, NEED_P: tl.constexpr, MEAN: tl.constexpr, UNROLL: tl.constexpr,
    WIDE: tl.constexpr,
):
    """MEAN (reduction="mean"): P is stored scaled by the centre's share of the Minkowski
    factor, w_p (L_p / t)^(k-1) with t the tile's max L (so it stays <= 1: no overflow, and the
    backward needs no L), and L is not stored. Otherwise L is stored and P plain."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    SINGLE: tl.constexpr = C <= CLASS_TILE
    PARK: tl.constexpr = P_ptr.dtype.element_ty == ACC  # class chunks pooled once, see below
    # the row paths written below; the generic window path holds one row
    tl.static_assert(ROWS <= 4 and (ROWS == 1 or (STRIDE == 1 and UNROLL)))
    power = scalar(power_hi, power_lo, ACC)
    base = scalar(base_hi, base_lo, ACC)
    inv_base = 1.0 / base
    image, cd, ci0, cj = tile_coordinates(tiles_h, tiles_w, Dc, ROWS, TILE_W, WIDE)
    pd = cd * STRIDE
    if not WIDE:
        pd = pd.to(tl.int32)
    pj = cj * STRIDE
    row0 = ci0 * STRIDE - RADIUS  # the first window row; with ROWS > 1, STRIDE == 1
    x_img = x_ptr + image * sxb
    y_img = y_ptr + image * syb
    if WIDE:
        plane = D.to(tl.int64) * H * W
        first = cd * Hc * Wc  # the flat index of the plane's first centre
    else:
        plane = D * H * W
        first = (cd * Hc * Wc).to(tl.int32)
    mean_img = mean_ptr + image * plane
    rstd_img = rstd_ptr + image * plane
    P_img, class_plane = image_of_P(P_ptr, image, Dc, Hc, Wc, C, TILE_W, WIDE)
    L_img = L_ptr + (image * Dc + cd) * Hc * Wc

    y0, live0, valid0, c0 = _centre(y_img, pd, ci0, cj, Hc, Wc, syd, syh, syw, ignore_index,
                                    C, STRIDE)
    y1, live1, valid1, c1 = _centre(y_img, pd, ci0 + 1, cj, Hc, Wc, syd, syh, syw,
                                    ignore_index, C, STRIDE)
    y2, live2, valid2, c2 = _centre(y_img, pd, ci0 + 2, cj, Hc, Wc, syd, syh, syw,
                                    ignore_index, C, STRIDE)
    y3, live3, valid3, c3 = _centre(y_img, pd, ci0 + 3, cj, Hc, Wc, syd, syh, syw,
                                    ignore_index, C, STRIDE)

    if SINGLE:
        cls = tl.arange(0, CLASS_TILE)
        cmask = cls < C  # compile-time per register: padded lanes fold away
        a0, a1, a2, a3, xi0, xi1, xi2, xi3 = _pool(
            x_img, y_img, mean_img, rstd_img, 0, D, H, W, pd, row0, pj, y0, y1, y2, y3,
            sxc, sxd, sxh, sxw, syd, syh, syw, radius, radius_d, base, inv_base,
            ACC, C, CLASS_TILE, RADIUS, ROWS, TILE_W, ZSCORE, WEIGHT_NORM, UNROLL, WIDE)
        m0, e0, s0, fy0 = _cost(a0, xi0, cmask, cls, c0)
        m1, e1, s1, fy1 = _cost(a1, xi1, cmask, cls, c1)
        m2, e2, s2, fy2 = _cost(a2, xi2, cmask, cls, c2)
        m3, e3, s3, fy3 = _cost(a3, xi3, cmask, cls, c3)
    else:
        # Online logsumexp over class chunks (the running max m of acc and sum s of exp(f -
        # m / xi)); fy is acc[y].
        m0 = tl.full([TILE_W], float("-inf"), ACC)
        m1, m2, m3 = m0, m0, m0
        s0 = tl.zeros([TILE_W], ACC)
        s1, s2, s3 = s0, s0, s0
        fy0, fy1, fy2, fy3 = s0, s0, s0, s0
        xi0, xi1, xi2, xi3 = s0, s0, s0, s0  # the same in every chunk, needed after the loop
        for chunk in range(chunks):
            cls = chunk * CLASS_TILE + tl.arange(0, CLASS_TILE)
            cmask = cls < C
            a0, a1, a2, a3, xi0, xi1, xi2, xi3 = _pool(
                x_img, y_img, mean_img, rstd_img, chunk * CLASS_TILE, D, H, W, pd, row0, pj,
                y0, y1, y2, y3, sxc, sxd, sxh, sxw, syd, syh, syw, radius, radius_d, base,
                inv_base, ACC, C, CLASS_TILE, RADIUS, ROWS, TILE_W, ZSCORE, WEIGHT_NORM, UNROLL,
                WIDE)
            if NEED_P and PARK:
                c_lo = chunk * CLASS_TILE
                _park(P_img, a0, live0, c_lo, cmask, first + ci0 * Wc + cj, C, TILE_W)
                if ROWS > 1:
                    _park(P_img, a1, live1, c_lo, cmask, first + (ci0 + 1) * Wc + cj, C, TILE_W)
                if ROWS > 2:
                    _park(P_img, a2, live2, c_lo, cmask, first + (ci0 + 2) * Wc + cj, C, TILE_W)
                if ROWS > 3:
                    _park(P_img, a3, live3, c_lo, cmask, first + (ci0 + 3) * Wc + cj, C, TILE_W)
            m0, s0, fy0 = _merge(a0, xi0, cmask, cls, c0, m0, s0, fy0)
            if ROWS > 1:
                m1, s1, fy1 = _merge(a1, xi1, cmask, cls, c1, m1, s1, fy1)
            if ROWS > 2:
                m2, s2, fy2 = _merge(a2, xi2, cmask, cls, c2, m2, s2, fy2)
            if ROWS > 3:
                m3, s3, fy3 = _merge(a3, xi3, cmask, cls, c3, m3, s3, fy3)
    L0 = _loss_of(m0, s0, fy0, xi0, valid0)
    L1 = _loss_of(m1, s1, fy1, xi1, valid1)
    L2 = _loss_of(m2, s2, fy2, xi2, valid2)
    L3 = _loss_of(m3, s3, fy3, xi3, valid3)

    # Minkowski partials scaled by the tile's max L: L^k never overflows or underflows.
    w0 = _weight_of(weight_ptr, c0, valid0, ACC, HAS_WEIGHT)
    w1 = _weight_of(weight_ptr, c1, valid1, ACC, HAS_WEIGHT)
    w2 = _weight_of(weight_ptr, c2, valid2, ACC, HAS_WEIGHT)
    w3 = _weight_of(weight_ptr, c3, valid3, ACC, HAS_WEIGHT)
    top = L0
    nan = L0 != L0
    if ROWS > 1:
        top = tl.maximum(top, L1)
        nan = nan | (L1 != L1)
    if ROWS > 2:
        top = tl.maximum(top, L2)
        nan = nan | (L2 != L2)
    if ROWS > 3:
        top = tl.maximum(top, L3)
        nan = nan | (L3 != L3)
    l_max = tl.max(top, axis=0)
    l_max = tl.where(tl.max(nan.to(tl.int32), axis=0) > 0, float("nan"), l_max)
    unit = 1.0 / tl.where(l_max > 0, l_max, 1.0)
    r0 = minkowski_share(L0, unit, power - 1.0)
    r1 = minkowski_share(L1, unit, power - 1.0)
    r2 = minkowski_share(L2, unit, power - 1.0)
    r3 = minkowski_share(L3, unit, power - 1.0)
    scaled = w0 * r0 * L0 * unit
    weights = w0
    if ROWS > 1:
        scaled += w1 * r1 * L1 * unit
        weights += w1
    if ROWS > 2:
        scaled += w2 * r2 * L2 * unit
        weights += w2
    if ROWS > 3:
        scaled += w3 * r3 * L3 * unit
        weights += w3
    tile = tl.program_id(0).to(tl.int64)
    if tile == 0:  # the combine's ticket, zeroed here: it runs after this kernel on the stream
        tl.store(ticket_ptr, 0)
    tl.store(part_ptr + 3 * tile, l_max)
    tl.store(part_ptr + 3 * tile + 1, tl.sum(scaled, axis=0))
    tl.store(part_ptr + 3 * tile + 2, tl.sum(weights, axis=0))
    if MEAN:
        # d loss / d L_p = a * w_p * (L_p / max L)^(k-1) = [a * (t / max L)^(k-1)] * [w_p *
        # (L_p / t)^(k-1)]: the second factor goes into P now, the first (per tile) comes from
        # the combine.
        g0, g1, g2, g3 = w0 * r0, w1 * r1, w2 * r2, w3 * r3
    else:
        tl.store(L_img + ci0 * Wc + cj, L0, mask=live0)
        if ROWS > 1:
            tl.store(L_img + (ci0 + 1) * Wc + cj, L1, mask=live1)
        if ROWS > 2:
            tl.store(L_img + (ci0 + 2) * Wc + cj, L2, mask=live2)
        if ROWS > 3:
            tl.store(L_img + (ci0 + 3) * Wc + cj, L3, mask=live3)
        g0 = tl.full([TILE_W], 1.0, ACC)
        g1, g2, g3 = g0, g0, g0

    if NEED_P:
        last = ((cd == Dc - 1) & (ci0 + ROWS >= Hc)
                & (tl.program_id(0) % tiles_w == tiles_w - 1))  # holds the image's last centre
        if SINGLE:
            _zero_padding(P_ptr, P_img, class_plane, last, 0, cmask, C, CLASS_TILE, TILE_W)
            # softmax(f) = exp(f - max) / sum: the exponentials of the logsumexp, reused.
            _store_P(P_ptr, P_img, e0, g0 / (xi0 * s0), g0 / xi0, valid0, live0, cls, 0, cmask,
                     c0, first + ci0 * Wc + cj, C, TILE_W)
            if ROWS > 1:
                _store_P(P_ptr, P_img, e1, g1 / (xi1 * s1), g1 / xi1, valid1, live1, cls, 0,
                         cmask, c1, first + (ci0 + 1) * Wc + cj, C, TILE_W)
            if ROWS > 2:
                _store_P(P_ptr, P_img, e2, g2 / (xi2 * s2), g2 / xi2, valid2, live2, cls, 0,
                         cmask, c2, first + (ci0 + 2) * Wc + cj, C, TILE_W)
            if ROWS > 3:
                _store_P(P_ptr, P_img, e3, g3 / (xi3 * s3), g3 / xi3, valid3, live3, cls, 0,
                         cmask, c3, first + (ci0 + 3) * Wc + cj, C, TILE_W)
        else:
            # The logsumexp is known now: each chunk's pooled sums again, and its P. PARK: the
            # first loop parked the sums in P's place (P holds them exactly: the accumulation
            # dtype), each lane reads back what it wrote. Else (16-bit P, which would round
            # them): every chunk pooled again.
            for chunk in range(chunks):
                cls = chunk * CLASS_TILE + tl.arange(0, CLASS_TILE)
                cmask = cls < C
                c_lo = chunk * CLASS_TILE
                if PARK:
                    a0 = _unpark(P_img, live0, c_lo, cmask, first + ci0 * Wc + cj, C, TILE_W)
                    if ROWS > 1:
                        a1 = _unpark(P_img, live1, c_lo, cmask, first + (ci0 + 1) * Wc + cj, C,
                                     TILE_W)
                    if ROWS > 2:
                        a2 = _unpark(P_img, live2, c_lo, cmask, first + (ci0 + 2) * Wc + cj, C,
                                     TILE_W)
                    if ROWS > 3:
                        a3 = _unpark(P_img, live3, c_lo, cmask, first + (ci0 + 3) * Wc + cj, C,
                                     TILE_W)
                else:
                    a0, a1, a2, a3, xi0, xi1, xi2, xi3 = _pool(
                        x_img, y_img, mean_img, rstd_img, chunk * CLASS_TILE, D, H, W, pd, row0,
                        pj, y0, y1, y2, y3, sxc, sxd, sxh, sxw, syd, syh, syw, radius, radius_d,
                        base, inv_base, ACC, C, CLASS_TILE, RADIUS, ROWS, TILE_W, ZSCORE,
                        WEIGHT_NORM, UNROLL, WIDE)
                _zero_padding(P_ptr, P_img, class_plane, last, c_lo, cmask, C, CLASS_TILE, TILE_W)
                _store_P(P_ptr, P_img, _softmax(a0, xi0, m0, s0), g0 / xi0, g0 / xi0, valid0,
                         live0, cls, c_lo, cmask, c0, first + ci0 * Wc + cj, C, TILE_W)
                if ROWS > 1:
                    _store_P(P_ptr, P_img, _softmax(a1, xi1, m1, s1), g1 / xi1, g1 / xi1, valid1,
                             live1, cls, c_lo, cmask, c1, first + (ci0 + 1) * Wc + cj, C, TILE_W)
                if ROWS > 2:
                    _store_P(P_ptr, P_img, _softmax(a2, xi2, m2, s2), g2 / xi2, g2 / xi2, valid2,
                             live2, cls, c_lo, cmask, c2, first + (ci0 + 2) * Wc + cj, C, TILE_W)
                if ROWS > 3:
                    _store_P(P_ptr, P_img, _softmax(a3, xi3, m3, s3), g3 / xi3, g3 / xi3, valid3,
                             live3, cls, c_lo, cmask, c3, first + (ci0 + 3) * Wc + cj, C, TILE_W)


@triton.jit
def _park(P_img, acc, live, c0, cmask, centre, C: tl.constexpr, TILE_W: tl.constexpr):
    """One class chunk's pooled sums into P's place until the logsumexp is known."""
    tl.store(block_lanes(P_img, centre, c0, acc.shape[0], C, TILE_W), acc,
             mask=cmask[:, None] & live[None, :])


@triton.jit
def _unpark(P_img, live, c0, cmask, centre, C: tl.constexpr, TILE_W: tl.constexpr):
    return tl.load(block_lanes(P_img, centre, c0, cmask.shape[0], C, TILE_W),
                   mask=cmask[:, None] & live[None, :], other=0.0)


@triton.jit
def _softmax(acc, xi, top, total):
    """softmax(f) of one class chunk, f = acc / xi, from the centre's max of acc and sum of
    exponentials (_merge)."""
    k = LOG2E / tl.where(xi > 0, xi, 1.0)
    return tl.exp2((acc - top[None, :]) * k[None, :] - tl.log2(total)[None, :])


@triton.jit
def _merge(acc, xi, cmask, cls, y_cls, m_run, s_run, f_y):
    """One class chunk into the online logsumexp of a centre."""
    top, _, total, fy_chunk = _cost(acc, xi, cmask, cls, y_cls)
    m_new = tl.maximum(m_run, top)
    k = LOG2E / tl.where(xi > 0, xi, 1.0)
    s_run = s_run * tl.exp2((m_run - m_new) * k) + total * tl.exp2((top - m_new) * k)
    return m_new, s_run, f_y + fy_chunk


def tile_plan(logits, *, kernel_size, stride, weighted=False, upsample=False):
    """The forward's tiles as "ROWSxCOLUMNS" centres: the one part of the launch plan that shapes
    an output (the per-tile partials). The custom operator takes it as an argument, so that a
    traced graph records it: Inductor's FX graph cache keys on the graph, and a plan that changed
    (another lad_triton or Triton) must not replay shapes traced under the old one.
    ``upsample``: the kernels interpolate (their tiles' rows are config.HALO_UPSAMPLE_PLANS')."""
    classes = int(logits.shape[1])  # int(): under dynamic shapes C specialises, as the kernel's
    cfg = launch_config(classes, stride, kernel_size, accumulation_dtype(logits.dtype),
                        weighted, upsample=upsample, **target_of(logits))
    return f"{cfg.forward_rows}x{cfg.tile_w - (kernel_size - 1 if cfg.halo else 0)}"


def allocate(logits, *, kernel_size, stride, need_grad, mean, plan, size=None):
    """The forward's outputs (L, partials, ticket, P), allocated with ``new_empty`` so that the fake
    implementation (torch.compile's shape propagation) shares this one definition. L is empty
    for the mean (``mean``), P when no gradient is needed. ``plan``: tile_plan's. ``size``: the
    target's spatial size where the logits are at a lower resolution (``upsample``)."""
    batch, classes, depth, height, width = as_volume(logits, 4)[0]
    if size is not None:
        height, width = size
    acc = accumulation_dtype(logits.dtype)
    d_c, h_c, w_c = centre_shape((depth, height, width), stride)
    rows, cols = map(int, plan.split("x"))
    n_tiles = batch * d_c * cdiv(h_c, rows) * cdiv(w_c, cols)
    centres = (batch, d_c, h_c, w_c) if logits.dim() == 5 else (batch, h_c, w_c)
    new = lambda *shape, dtype=acc: logits.new_empty(shape, dtype=dtype)  # noqa: E731
    # P in blocks of TILE_W centres (tiling.block_lanes), each image padded to whole blocks.
    blocks = cdiv(d_c * h_c * w_c, TILE_W)
    return (new(0) if mean else new(*centres), new(n_tiles, 3), new(1, dtype=torch.int32),
            new(batch, blocks, classes, TILE_W, dtype=logits.dtype) if need_grad
            else new(0, dtype=logits.dtype))


def interpolates(logits, size, mode, align_corners, *, kernel_size, stride, weighted,
                 need_grad):
    """Whether the kernels interpolate ``logits`` to ``size`` themselves (the forward and the
    backward: the backward also needs every input column's stencils to fit in a warp's output
    lanes)."""
    cfg = launch_config(int(logits.shape[1]), stride, kernel_size,
                        accumulation_dtype(logits.dtype), weighted, **target_of(logits))
    if not fusable(logits, size, mode, cfg.halo):
        return False
    return not need_grad or plan_of(logits, size, align_corners, kernel_size).fits


def small_power(power):
    """k - 1 where the Minkowski exponent k is 2, 3 or 4 (the interpolating forward then takes
    (L / t)^(k-1) as products), else 0."""
    k = float(power)
    return int(k) - 1 if k in (2.0, 3.0, 4.0) else 0


def label_pivot(classes, kernel_size, weight_base, zscore):
    """Whether the softmax may take the label's pooled value as its reference instead of the
    largest (the interpolating forward then needs no max over the classes, and the label's
    exponential is 1 exactly): with the z-score each pixel's |z| <= sqrt(C), so a pooled value
    is at most omega's largest times that (the count normaliser divides a sum of omega-weighted
    z by the count of terms; the weight normaliser takes a weighted mean). The bound keeps every
    exponential of a difference of two, and their sum over C classes, below 2^64, so that
    dividing by the sum leaves P's smallest factors far from float32's subnormals."""
    if not zscore:
        return False
    log_omega = max((1 - d) * math.log2(float(weight_base)) for d in range(kernel_size // 2 + 1))
    if log_omega > 8:
        return False
    return 2 * 2**log_omega * math.sqrt(classes) * math.log2(math.e) + math.log2(classes) <= 64


def forward(logits, target, weight, *, kernel_size, power, stride, ignore_index, eps,
            weight_base, normalizer, zscore, need_grad, mean, plan=None, upsample="",
            align_corners=False, columns=None, P=None):
    """Launch the forward on (B, C, H, W) or (B, C, D, H, W) logits. Returns (L, partials, ticket,
    P): the costs on the centre grid (B, *centres) (empty for the mean), the (n_tiles, 3)
    Minkowski partials, the combine's ticket (zeroed), and P for the backward (empty when
    ``need_grad`` is False; scaled for the mean, see ``_forward_kernel``). ``plan``: the
    caller's tile_plan, checked. ``weight`` is None or C class weights in the accumulation dtype.
    No host sync; the z-score statistics are a temporary of the forward. ``upsample="bilinear"``:
    the logits are at a lower resolution than the target and the window-row kernels interpolate
    them in registers (``interpolates`` must hold), from ``columns`` (their rows interpolated
    along the columns, upsample.columns_interpolated) where the caller has them; everything else
    is at the target's size. ``P``: a buffer for P (allocate's shape) where the caller reuses
    one."""
    volume = logits.dim() == 5
    x = logits
    size = None
    if upsample:  # the kernel blends rows of the logits interpolated along the columns
        size = tuple(target.shape[-2:])
        _, up_index, up_weight = upsample_tables(logits, size, align_corners, kernel_size)
        if columns is None:
            columns = columns_interpolated(logits, size, align_corners, kernel_size)
        x = columns
    (batch, classes, depth, height, width), sx = as_volume(logits, 4)
    y_shape, sy = as_volume(target, 3)
    x_span = span((classes, depth, height, width), sx[1:])
    if upsample:  # the kernel reads blocks of columns (B, H_in, blocks, C + 1, 32): image, row
        height, width = size  # strides only
        sx = (x.stride(0), 0, 0, x.stride(1), 0)
        x_span = span(x.shape[1:], x.stride()[1:])
    acc = accumulation_dtype(logits.dtype)
    cfg = launch_config(classes, stride, kernel_size, acc, weight is not None,
                        upsample=bool(upsample), **target_of(logits))
    cols = cfg.tile_w - (kernel_size - 1 if cfg.halo else 0)
    planned = f"{cfg.forward_rows}x{cols}"
    if plan is not None and plan != planned:  # the traced graph's shapes would not match
        raise RuntimeError(f"lad_triton: the forward's tiles are {planned}, the caller traced "
                           f"{plan}")
    L, partials, ticket, new_P = allocate(logits, kernel_size=kernel_size, stride=stride,
                                          need_grad=need_grad and P is None, mean=mean,
                                          plan=planned, size=size)
    P = new_P if P is None else P
    d_c, h_c, w_c = centre_shape((depth, height, width), stride)
    wide = needs_wide_index(x_span, span(y_shape[1:], sy[1:]),
                            classes * cdiv(d_c * h_c * w_c, cfg.tile_w) * cfg.tile_w,
                            depth * height * width)
    if cfg.halo:
        tiles_h, tiles_w, programs = tile_grid(cfg, cfg.forward_rows, kernel_size,
                                               (batch, depth, height, width))
        halo._halo_forward_kernel[(programs,)](
            x, target, partials if weight is None else weight, P, L, partials, ticket,
            up_index if upsample else ticket, up_weight if upsample else partials,
            depth, height, width, tiles_h, tiles_w, *sx, *sy,
            kernel_size // 2 if volume else 0, ignore_index, *split_scalar(eps),
            *split_scalar(power), *split_scalar(weight_base),
            C=classes, CLASS_TILE=cfg.class_tile, RADIUS=kernel_size // 2,
            ROWS=cfg.forward_rows, ZSCORE=zscore, WEIGHT_NORM=normalizer == "weight",
            HAS_WEIGHT=weight is not None, NEED_P=need_grad, MEAN=mean, WIDE=wide,
            UPSAMPLE=bool(upsample), POWER1=small_power(power) if upsample else 0,
            PIVOT=bool(upsample) and label_pivot(classes, kernel_size, weight_base, zscore),
            **cfg.forward_launch)
        return L, partials, ticket, P
    assert not upsample, "the generic kernels do not interpolate (interpolates())"
    stats = (batch, depth, height, width) if zscore else (0,)
    mean_, rstd = logits.new_empty(stats, dtype=acc), logits.new_empty(stats, dtype=acc)
    if zscore:
        zscore_stats(logits, mean_, rstd, sx, (batch, classes, depth, height, width), eps, cfg,
                     wide)
    tiles_h, tiles_w, programs = grid_of(cfg.forward_rows, cfg.tile_w, (batch, d_c, h_c, w_c))
    radius = kernel_size // 2
    _forward_kernel[(programs,)](
        logits, target, partials if weight is None else weight, mean_, rstd, P, L, partials,
        ticket, depth, height, width, d_c, h_c, w_c, tiles_h, tiles_w, *sx, *sy,
        radius, radius if volume else 0, cfg.chunks, ignore_index,
        *split_scalar(power), *split_scalar(weight_base),
        C=classes, CLASS_TILE=cfg.class_tile, RADIUS=radius, STRIDE=stride,
        ROWS=cfg.forward_rows,
        TILE_W=cfg.tile_w, ZSCORE=zscore, WEIGHT_NORM=normalizer == "weight",
        HAS_WEIGHT=weight is not None, NEED_P=need_grad, MEAN=mean, UNROLL=cfg.unrolled,
        WIDE=wide, **cfg.forward_launch)
    return L, partials, ticket, P


# Whether @triton.jit made these kernels interpreted (TRITON_INTERPRET when this module was
# imported): a plain bool, which torch.compile reads as a constant, where looking at a compiled
# kernel's type inside a traced function is an error ("TritonKernelVariable() has no type").
INTERPRETED = type(_forward_kernel).__name__ == "InterpretedFunction"

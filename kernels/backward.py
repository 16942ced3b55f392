"""Backward kernel of the locally adaptive loss and its launch helper.

``_backward_kernel`` computes the gradient of docs/math.md from what the forward stored per
centre: P_p = (softmax(f_p) - onehot(y_p)) / xi_p, 0 at invalid centres. Per tile of ROWS x 32
pixels q it gathers G_q = sum over the centres p whose window holds q, with y_p == y_q, of
omega(d) * dL_p * P_p (the window is symmetric, so this is the forward's pooling read
backwards: a gather, never a scatter, no atomics; a centre row loaded once serves every pixel of
the lane whose window holds it), then applies the z-score Jacobian
dx_q = rstd_q * (G_q - mean_c G_q - z_q * mean_c(G_q z_q)).

dL_p = d loss / d L_p is never written as a map for the Minkowski mean (MEAN): the forward
stored P scaled by w_p (L_p / t)^(k-1), t the max L of p's forward tile, and
``_tile_scales_kernel`` writes each tile's a * (t / max L)^(k-1) from the combine's t, a and max
L, so the kernel multiplies by the upstream gradient and one number per forward tile. Otherwise
(reduction="none", and any reduction computed in PyTorch) the caller passes the map dL.

The Jacobian needs every class of G_q and the pixel's z-score statistics, which the kernel
recomputes from the logits it loads for the Jacobian (the forward's statistics were a
temporary): in registers when a lane holds every class (C <= CLASS_TILE); beyond, a first pass
over class chunks merges the statistics, a second gathers G chunk by chunk for the Jacobian's two
class means and a third turns G into the gradient. G is parked in the gradient's place between
the two when that holds it exactly (the gradient in the accumulation dtype: float32 and float64
logits), else (16-bit logits) the third pass gathers G again. 2-D images run as volumes of
depth 1.

DRAM traffic per pixel at stride 1 (C classes of E bytes, labels of Y bytes): reads P (C*E), the
logits (C*E) and labels (Y), writes the gradient (C*E); dL (4 B) only for the map.
"""

import math

import torch
import triton
import triton.language as tl

from . import halo
from .config import (TILE_W, accumulation_dtype, cdiv, launch_config, needs_wide_index, span,
                     split_scalar, target_of, tile_grid)
from .geometry import as_volume, centre_shape
from .stats import pixel_logits, pixel_stats
from .upsample import BAND, band_rows, columns_interpolated, plan_of, upsample_tables
from .tiling import (also, block_lanes, clamp, class_range, finite_centres, image_of_P,
                     lane_offsets, minkowski_share, omega_at, omega_of, scalar,
                     tile_coordinates, tile_scale_factors)


@triton.jit
def _add(G, P, same, omega, s):
    return G + tl.where(same, omega * s, 0.0)[None, :] * P


@triton.jit
def _centre_row(P_img, s_ptr, s_img, y_img, c0, cmask, cd, pi, pj, cj, col_in, col_ok,
                tile_plane, H, Hc, Wc, syd, syh, syw, grad, ftiles_w, ACC: tl.constexpr,
                C: tl.constexpr, CLASS_TILE: tl.constexpr, STRIDE: tl.constexpr,
                FROWS: tl.constexpr, TILE_W: tl.constexpr, MEAN: tl.constexpr):
    """One row of the lanes' window centres (pixel row pi, columns pj): (P, dL, label, a centre
    in the image and on the stride grid)."""
    ci = clamp(pi // STRIDE, Hc - 1)
    ok = also(col_ok, (pi >= 0) & (pi < H) & (pi % STRIDE == 0))
    y_p = tl.load(y_img + (cd * STRIDE) * syd + (ci * STRIDE) * syh
                  + (cj * STRIDE) * syw).to(tl.int32)
    centre = (cd * Hc + ci) * Wc + cj
    if MEAN:
        s = grad * tl.load(s_ptr + (tile_plane + ci // FROWS) * ftiles_w + cj // TILE_W)
    else:
        s = tl.load(s_img + centre)
    P = tl.load(block_lanes(P_img, centre, c0, CLASS_TILE, C, TILE_W), mask=cmask[:, None],
                other=0.0).to(ACC)
    if not MEAN:  # (with the mean, a NaN cost makes every gradient element NaN anyway)
        P, s = finite_centres(P, s, c0 + tl.arange(0, CLASS_TILE), c0)
    return P, s, y_p, ok


@triton.jit
def _gather(P_img, s_ptr, s_img, y_img, c0, image, D, H, W, Dc, Hc, Wc, qd, row0,
            qj, yq0, yq1, yq2, yq3, syd, syh, syw, radius, radius_d, grad, ftiles_h, ftiles_w,
            base, inv_base,
            ACC: tl.constexpr, C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr,
            STRIDE: tl.constexpr, ROWS: tl.constexpr, FROWS: tl.constexpr, TILE_W: tl.constexpr,
            MEAN: tl.constexpr, WIDE: tl.constexpr):
    """G of the ROWS pixels of each lane (rows row0 + RADIUS + o, column qj, depth qd; labels
    yq0..yq3) for classes [c0, c0 + CLASS_TILE): the adjoint pooling of docs/math.md. With
    ROWS > 1, centre row t (pixel row row0 + t) is loaded once and added to each pixel o whose
    window holds it; with one row the rows are a run-time loop (see forward._pool). MEAN: dL_p =
    grad * the scale of p's forward tile (FROWS x TILE_W centres) times the factor already in
    P; else dL_p from the map."""
    cls, cmask = class_range(c0, CLASS_TILE, C, WIDE)
    G0 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    G1 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    G2 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    G3 = tl.zeros([CLASS_TILE, TILE_W], dtype=ACC)
    for dd in range(-radius_d, radius_d + 1):
        pd = qd - dd
        cd = clamp(pd // STRIDE, Dc - 1)
        plane_ok = (pd >= 0) & (pd < D) & (pd % STRIDE == 0)
        tile_plane = (image * Dc + cd) * ftiles_h
        for dv in range(-radius, radius + 1):
            pj = qj - dv
            col_in = (pj >= 0) & (pj < W) & (pj % STRIDE == 0)
            col_ok = also(col_in, plane_ok)
            cj = clamp(pj // STRIDE, Wc - 1)
            far = tl.maximum(tl.abs(dv), tl.abs(dd))
            if ROWS == 1:
                for t in range(0, 2 * radius + 1):
                    P, s, y_p, ok = _centre_row(
                        P_img, s_ptr, s_img, y_img, c0, cmask, cd, row0 + t, pj, cj, col_in,
                        col_ok, tile_plane, H, Hc, Wc, syd, syh, syw, grad, ftiles_w, ACC,
                        C, CLASS_TILE, STRIDE, FROWS, TILE_W, MEAN)
                    omega = omega_of(tl.maximum(tl.abs(t - radius), far), base, inv_base,
                                     RADIUS)
                    G0 = _add(G0, P, ok & (y_p == yq0), omega, s)
            else:
                far_omega = omega_of(far, base, inv_base, RADIUS)
                for t in tl.static_range(ROWS + 2 * RADIUS):
                    P, s, y_p, ok = _centre_row(
                        P_img, s_ptr, s_img, y_img, c0, cmask, cd, row0 + t, pj, cj, col_in,
                        col_ok, tile_plane, H, Hc, Wc, syd, syh, syw, grad, ftiles_w, ACC,
                        C, CLASS_TILE, STRIDE, FROWS, TILE_W, MEAN)
                    if t <= 2 * RADIUS:
                        G0 = _add(G0, P, ok & (y_p == yq0),
                                  omega_at(t - RADIUS, far, far_omega, base, inv_base), s)
                    if ROWS > 1 and t >= 1 and t <= 2 * RADIUS + 1:
                        G1 = _add(G1, P, ok & (y_p == yq1),
                                  omega_at(t - 1 - RADIUS, far, far_omega, base, inv_base), s)
                    if ROWS > 2 and t >= 2 and t <= 2 * RADIUS + 2:
                        G2 = _add(G2, P, ok & (y_p == yq2),
                                  omega_at(t - 2 - RADIUS, far, far_omega, base, inv_base), s)
                    if ROWS > 3 and t >= 3 and t <= 2 * RADIUS + 3:
                        G3 = _add(G3, P, ok & (y_p == yq3),
                                  omega_at(t - 3 - RADIUS, far, far_omega, base, inv_base), s)
    return G0, G1, G2, G3


@triton.jit
def _pixel(y_img, qd, qi, qj, H, W, sxh, sxw, sdh, sdw, syd, syh, syw):
    """Label (int32, as the forward compares them), live flag, logits offset and gradient offset
    of the pixels (qd, qi, qj)."""
    live = also(qj < W, qi < H)
    y = tl.load(y_img + qd * syd + qi * syh + qj * syw, mask=live, other=0).to(tl.int32)
    return y, live, qi * sxh + qj * sxw, qi * sdh + qj * sdw


@triton.jit
def _store_dx(dx_plane, dx_ptr, G, x, m, r, mean_G, mean_Gz, cls, cmask, dpix, live, sdc,
              ZSCORE: tl.constexpr):
    """dx = rstd * (G - mean_c G - z * mean_c(G z)), z = (x - m) * rstd (G with no z-score)."""
    dx = G
    if ZSCORE:
        z = tl.where(cmask[:, None], (x - m[None, :]) * r[None, :], 0.0)
        dx = r[None, :] * (G - mean_G[None, :] - z * mean_Gz[None, :])
    tl.store(dx_plane + lane_offsets(cls, sdc, dpix, dpix.shape[0]), dx.to(dx_ptr.dtype.element_ty),
             mask=cmask[:, None] & live[None, :])


@triton.jit
def _finish(x_plane, dx_plane, dx_ptr, G, cls, cmask, pix, dpix, live, eps, sxc, sdc,
            ACC: tl.constexpr, C: tl.constexpr, ZSCORE: tl.constexpr):
    """Every class in the lane: the pixel's statistics, the Jacobian and the store."""
    # Padded classes out of the class sums: else their G (0 * omega * dL per neighbour, which
    # IEEE cannot fold to 0) would be live and cost a multiply-add per neighbour each.
    G = tl.where(cmask[:, None], G, 0.0)
    x = G
    m = tl.zeros([G.shape[1]], dtype=ACC)
    r = m
    mean_G = m
    mean_Gz = m
    if ZSCORE:
        x = pixel_logits(x_plane, cls, cmask, pix, live, sxc, ACC)
        m = tl.sum(x, axis=0) / C
        dev = tl.where(cmask[:, None], x - m[None, :], 0.0)
        r = 1.0 / tl.sqrt(tl.sum(dev * dev, axis=0) / C + eps)
        mean_G = tl.sum(G, axis=0) / C
        mean_Gz = tl.sum(G * dev, axis=0) * r / C
    _store_dx(dx_plane, dx_ptr, G, x, m, r, mean_G, mean_Gz, cls, cmask, dpix, live, sdc, ZSCORE)


@triton.jit
def _means(x_plane, G, cls, cmask, pix, live, m, r, mean_G, mean_Gz, sxc, ACC: tl.constexpr,
           C: tl.constexpr):
    """One class chunk into the Jacobian's two class means of a pixel."""
    x = pixel_logits(x_plane, cls, cmask, pix, live, sxc, ACC)
    z = tl.where(cmask[:, None], (x - m[None, :]) * r[None, :], 0.0)
    return mean_G + tl.sum(G, axis=0) / C, mean_Gz + tl.sum(G * z, axis=0) / C


@triton.jit
def _park(dx_plane, G, cls, cmask, dpix, live, sdc):
    """One class chunk of G into the gradient's place until the Jacobian's means are known."""
    tl.store(dx_plane + lane_offsets(cls, sdc, dpix, dpix.shape[0]), G,
             mask=cmask[:, None] & live[None, :])


@triton.jit
def _park_load(dx_plane, cls, cmask, dpix, live, sdc):
    return tl.load(dx_plane + lane_offsets(cls, sdc, dpix, dpix.shape[0]),
                   mask=cmask[:, None] & live[None, :], other=0.0)


@triton.jit
def _finish_chunk(x_plane, dx_plane, dx_ptr, G, cls, cmask, pix, dpix, live, m, r, mean_G,
                  mean_Gz, sxc, sdc, ACC: tl.constexpr, ZSCORE: tl.constexpr):
    x = G
    if ZSCORE:
        x = pixel_logits(x_plane, cls, cmask, pix, live, sxc, ACC)
    _store_dx(dx_plane, dx_ptr, G, x, m, r, mean_G, mean_Gz, cls, cmask, dpix, live, sdc, ZSCORE)


@triton.jit(do_not_specialize=["D", "H", "W", "Dc", "Hc", "Wc", "tiles_h", "tiles_w", "ftiles_h",
                               "ftiles_w", "radius", "radius_d", "chunks"])
def _backward_kernel(
    x_ptr,       # logits (B, C, D, H, W), any strides
    y_ptr,       # target (B, D, H, W), any integer dtype, any strides
    P_ptr,       # (B, blocks, C, TILE_W), logits dtype: P (scaled for MEAN), tiling.block_lanes
    s_ptr,       # MEAN: (forward tiles,) ACC, per tile a * (t / max L)^(k-1) (_tile_scales_kernel);
                 # else (B, Dc, Hc, Wc) contiguous ACC, the map dL = d output / d L
    grad_ptr,    # 0-dim: d output / d loss (read only if MEAN)
    dx_ptr,      # out (B, C, D, H, W), logits dtype, strides sdb/sdc/sdd/sdh/sdw
    D, H, W, Dc, Hc, Wc, tiles_h, tiles_w, ftiles_h, ftiles_w,
    sxb, sxc, sxd, sxh, sxw,
    syb, syd, syh, syw,
    sdb, sdc, sdd, sdh, sdw,
    radius, radius_d, chunks,
    eps_hi, eps_lo, base_hi, base_lo,  # as split_scalar()
    C: tl.constexpr, CLASS_TILE: tl.constexpr, RADIUS: tl.constexpr, STRIDE: tl.constexpr,
    ROWS: tl.constexpr, FROWS: tl.constexpr, TILE_W: tl.constexpr, ZSCORE: tl.constexpr,
    MEAN: tl.constexpr, WIDE: tl.constexpr,
):
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    SINGLE: tl.constexpr = C <= CLASS_TILE
    PARK: tl.constexpr = dx_ptr.dtype.element_ty == ACC  # G gathered once, see the docstring
    tl.static_assert(ROWS <= 4 and (ROWS == 1 or STRIDE == 1))  # the row paths written below
    eps = scalar(eps_hi, eps_lo, ACC)
    base = scalar(base_hi, base_lo, ACC)
    inv_base = 1.0 / base
    image, qd, q0, qj = tile_coordinates(tiles_h, tiles_w, D, ROWS, TILE_W, WIDE)
    if not WIDE:
        qd = qd.to(tl.int32)
    row0 = q0 - RADIUS  # the first centre row any pixel of the tile gathers from
    grad = tl.zeros([], dtype=ACC)
    if MEAN:
        grad = tl.load(grad_ptr).to(ACC)
    x_plane = x_ptr + image * sxb + qd * sxd
    dx_plane = dx_ptr + image * sdb + qd * sdd
    y_img = y_ptr + image * syb
    P_img, class_plane = image_of_P(P_ptr, image, Dc, Hc, Wc, C, TILE_W, WIDE)
    s_img = s_ptr + image * class_plane

    y0, live0, pix0, dpix0 = _pixel(y_img, qd, q0, qj, H, W, sxh, sxw, sdh, sdw, syd, syh, syw)
    y1, live1, pix1, dpix1 = _pixel(y_img, qd, q0 + 1, qj, H, W, sxh, sxw, sdh, sdw, syd, syh,
                                    syw)
    y2, live2, pix2, dpix2 = _pixel(y_img, qd, q0 + 2, qj, H, W, sxh, sxw, sdh, sdw, syd, syh,
                                    syw)
    y3, live3, pix3, dpix3 = _pixel(y_img, qd, q0 + 3, qj, H, W, sxh, sxw, sdh, sdw, syd, syh,
                                    syw)

    if SINGLE:
        cls, cmask = class_range(0, CLASS_TILE, C, WIDE)
        G0, G1, G2, G3 = _gather(
            P_img, s_ptr, s_img, y_img, 0, image, D, H, W, Dc, Hc, Wc, qd, row0,
            qj, y0, y1, y2, y3, syd, syh, syw, radius, radius_d, grad, ftiles_h, ftiles_w, base,
            inv_base, ACC, C, CLASS_TILE, RADIUS, STRIDE, ROWS, FROWS, TILE_W, MEAN, WIDE)
        _finish(x_plane, dx_plane, dx_ptr, G0, cls, cmask, pix0, dpix0, live0, eps, sxc, sdc,
                ACC, C, ZSCORE)
        if ROWS > 1:
            _finish(x_plane, dx_plane, dx_ptr, G1, cls, cmask, pix1, dpix1, live1, eps, sxc,
                    sdc, ACC, C, ZSCORE)
        if ROWS > 2:
            _finish(x_plane, dx_plane, dx_ptr, G2, cls, cmask, pix2, dpix2, live2, eps, sxc,
                    sdc, ACC, C, ZSCORE)
        if ROWS > 3:
            _finish(x_plane, dx_plane, dx_ptr, G3, cls, cmask, pix3, dpix3, live3, eps, sxc,
                    sdc, ACC, C, ZSCORE)
    else:
        zero = tl.zeros([TILE_W], dtype=ACC)
        m0, m1, m2, m3, r0, r1, r2, r3 = zero, zero, zero, zero, zero, zero, zero, zero
        mG0, mG1, mG2, mG3 = zero, zero, zero, zero
        mGz0, mGz1, mGz2, mGz3 = zero, zero, zero, zero
        if ZSCORE:
            # First the pixels' statistics, then the Jacobian's two class means; G is
            # recomputed below.
            m0, r0 = pixel_stats(x_plane, pix0, live0, eps, sxc, chunks, ACC, C, CLASS_TILE,
                                 TILE_W, WIDE)
            if ROWS > 1:
                m1, r1 = pixel_stats(x_plane, pix1, live1, eps, sxc, chunks, ACC, C,
                                     CLASS_TILE, TILE_W, WIDE)
            if ROWS > 2:
                m2, r2 = pixel_stats(x_plane, pix2, live2, eps, sxc, chunks, ACC, C,
                                     CLASS_TILE, TILE_W, WIDE)
            if ROWS > 3:
                m3, r3 = pixel_stats(x_plane, pix3, live3, eps, sxc, chunks, ACC, C,
                                     CLASS_TILE, TILE_W, WIDE)
            for chunk in range(chunks):
                cls, cmask = class_range(chunk * CLASS_TILE, CLASS_TILE, C, WIDE)
                G0, G1, G2, G3 = _gather(
                    P_img, s_ptr, s_img, y_img, chunk * CLASS_TILE, image, D, H, W, Dc, Hc, Wc,
                    qd, row0, qj, y0, y1, y2, y3, syd, syh, syw, radius, radius_d,
                    grad, ftiles_h, ftiles_w, base, inv_base, ACC, C, CLASS_TILE, RADIUS,
                    STRIDE, ROWS, FROWS, TILE_W, MEAN, WIDE)
                if PARK:
                    _park(dx_plane, G0, cls, cmask, dpix0, live0, sdc)
                    if ROWS > 1:
                        _park(dx_plane, G1, cls, cmask, dpix1, live1, sdc)
                    if ROWS > 2:
                        _park(dx_plane, G2, cls, cmask, dpix2, live2, sdc)
                    if ROWS > 3:
                        _park(dx_plane, G3, cls, cmask, dpix3, live3, sdc)
                mG0, mGz0 = _means(x_plane, G0, cls, cmask, pix0, live0, m0, r0, mG0, mGz0, sxc,
                                   ACC, C)
                if ROWS > 1:
                    mG1, mGz1 = _means(x_plane, G1, cls, cmask, pix1, live1, m1, r1, mG1, mGz1,
                                       sxc, ACC, C)
                if ROWS > 2:
                    mG2, mGz2 = _means(x_plane, G2, cls, cmask, pix2, live2, m2, r2, mG2, mGz2,
                                       sxc, ACC, C)
                if ROWS > 3:
                    mG3, mGz3 = _means(x_plane, G3, cls, cmask, pix3, live3, m3, r3, mG3, mGz3,
                                       sxc, ACC, C)
        for chunk in range(chunks):
            cls, cmask = class_range(chunk * CLASS_TILE, CLASS_TILE, C, WIDE)
            if ZSCORE and PARK:
                G0 = _park_load(dx_plane, cls, cmask, dpix0, live0, sdc)
                if ROWS > 1:
                    G1 = _park_load(dx_plane, cls, cmask, dpix1, live1, sdc)
                if ROWS > 2:
                    G2 = _park_load(dx_plane, cls, cmask, dpix2, live2, sdc)
                if ROWS > 3:
                    G3 = _park_load(dx_plane, cls, cmask, dpix3, live3, sdc)
            else:
                G0, G1, G2, G3 = _gather(
                    P_img, s_ptr, s_img, y_img, chunk * CLASS_TILE, image, D, H, W, Dc, Hc, Wc,
                    qd, row0, qj, y0, y1, y2, y3, syd, syh, syw, radius, radius_d,
                    grad, ftiles_h, ftiles_w, base, inv_base, ACC, C, CLASS_TILE, RADIUS,
                    STRIDE, ROWS, FROWS, TILE_W, MEAN, WIDE)
            _finish_chunk(x_plane, dx_plane, dx_ptr, G0, cls, cmask, pix0, dpix0, live0, m0, r0,
                          mG0, mGz0, sxc, sdc, ACC, ZSCORE)
            if ROWS > 1:
                _finish_chunk(x_plane, dx_plane, dx_ptr, G1, cls, cmask, pix1, dpix1, live1, m1,
                              r1, mG1, mGz1, sxc, sdc, ACC, ZSCORE)
            if ROWS > 2:
                _finish_chunk(x_plane, dx_plane, dx_ptr, G2, cls, cmask, pix2, dpix2, live2, m2,
                              r2, mG2, mGz2, sxc, sdc, ACC, ZSCORE)
            if ROWS > 3:
                _finish_chunk(x_plane, dx_plane, dx_ptr, G3, cls, cmask, pix3, dpix3, live3, m3,
                              r3, mG3, mGz3, sxc, sdc, ACC, ZSCORE)



SCALES_BLOCK = 1024


@triton.jit(do_not_specialize=["n"])
def _tile_scales_kernel(
    tile_max_ptr,  # (n,) ACC: each forward tile's max L t (the combine's)
    scal_ptr,      # (3,) float64: the loss, max L, a
    scale_ptr,     # out (n,) ACC: a * (t / max L)^(k-1)
    n, power_hi, power_lo,
    BLOCK: tl.constexpr,
):
    """Each forward tile's share of d loss / d L for ``_backward_kernel``, which would otherwise
    take the power once per neighbour, class chunk and pass (the window-row backward takes it
    once per centre row, kernels/halo.py)."""
    ACC: tl.constexpr = tile_max_ptr.dtype.element_ty
    a, unit, power1 = tile_scale_factors(tl.full([], 1.0, ACC), scal_ptr, power_hi, power_lo,
                                         ACC)
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    t_max = tl.load(tile_max_ptr + i, mask=i < n, other=0.0)
    tl.store(scale_ptr + i, a * minkowski_share(t_max, unit, power1), mask=i < n)


def backward(s, logits, target, P, *, kernel_size, stride, eps, weight_base, zscore, plan,
             weighted=False, grad=None, scalars=None, power=1.0, upsample="",
             align_corners=False, out=None, columns=None, staging=None):
    """Launch the backward: d output / d logits in the logits' dtype and memory format. With
    ``grad`` (d output / d loss, 0-dim) ``s`` is each forward tile's max L, ``scalars`` the
    combine's float64 (loss, max L, a), ``power`` the Minkowski exponent and P the forward's
    scaled P (the Minkowski mean); without, ``s`` is the map dL on the centre grid. ``plan``:
    the forward's tiles ("ROWSxCOLUMNS", forward.tile_plan), which ``s`` and P are laid out by;
    ``weighted``: the forward had class weights (the backward's own launch plan depends on
    it). ``upsample="bilinear"``: the forward's (low-resolution logits); the gradient is theirs,
    formed without the target-sized gradient (halo._halo_upsample_backward_kernel), into ``out``
    where given (any floating dtype, the logits' shape), from the forward's ``columns``
    (upsample.columns_interpolated's) where given; with ``staging`` (upsample_staging's buffers,
    or views of them for part of the batch) the shares are staged there and left to
    upsample_gradient (nothing is returned)."""
    if upsample:
        return _upsample_backward(s, logits, target, P, kernel_size=kernel_size, eps=eps,
                                  weight_base=weight_base, zscore=zscore, plan=plan,
                                  weighted=weighted, grad=grad, scalars=scalars, power=power,
                                  align_corners=align_corners, out=out, columns=columns,
                                  staging=staging)
    volume = logits.dim() == 5
    dx = torch.empty_like(logits)
    (batch, classes, depth, height, width), sx = as_volume(logits, 4)
    y_shape, sy = as_volume(target, 3)
    sdx = as_volume(dx, 4)[1]
    d_c, h_c, w_c = centre_shape((depth, height, width), stride)
    mean = grad is not None
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    cfg = launch_config(classes, stride, kernel_size, acc, weighted, **target_of(logits))
    tiles_h, tiles_w, programs = tile_grid(cfg, cfg.backward_rows, kernel_size,
                                           (batch, depth, height, width))
    forward_rows, forward_cols = map(int, plan.split("x"))
    forward_tiles = (cdiv(h_c, forward_rows), cdiv(w_c, forward_cols))
    if not mean:
        s = s.to(acc).contiguous()
    pixels = (classes, depth, height, width)
    wide = needs_wide_index(span(pixels, sx[1:]), span(pixels, sdx[1:]),
                            span(y_shape[1:], sy[1:]), math.prod(P.shape[1:]),
                            depth * height * width)
    radius = kernel_size // 2
    if cfg.halo:
        halo._halo_backward_kernel[(programs,)](
            logits, target, P, s, grad if mean else s, scalars if mean else s, dx,
            depth, height, width, tiles_h, tiles_w, *forward_tiles, *sx, *sy, *sdx,
            radius if volume else 0, *split_scalar(eps), *split_scalar(weight_base),
            *split_scalar(power),
            C=classes, CLASS_TILE=cfg.class_tile, RADIUS=radius, ROWS=cfg.backward_rows,
            FROWS=forward_rows, ZSCORE=zscore, MEAN=mean, WIDE=wide, **cfg.backward_launch)
        return dx
    if mean:  # each forward tile's share of d loss / d L, once
        n = s.shape[0]
        scales = torch.empty_like(s)
        _tile_scales_kernel[(max(1, cdiv(n, SCALES_BLOCK)),)](
            s, scalars, scales, n, *split_scalar(power), BLOCK=SCALES_BLOCK, num_warps=4)
        s = scales
    _backward_kernel[(programs,)](
        logits, target, P, s, grad if mean else s, dx,
        depth, height, width, d_c, h_c, w_c, tiles_h, tiles_w, *forward_tiles,
        *sx, *sy, *sdx,
        radius, radius if volume else 0, cfg.chunks,
        *split_scalar(eps), *split_scalar(weight_base),
        C=classes, CLASS_TILE=cfg.class_tile, RADIUS=radius, STRIDE=stride,
        ROWS=cfg.backward_rows, FROWS=forward_rows, TILE_W=cfg.tile_w, ZSCORE=zscore,
        MEAN=mean, WIDE=wide, **cfg.backward_launch)
    return dx


def _bands(h_in, size, kernel_size):
    """(input rows per band, bands, column tiles) of the interpolating backward."""
    band = min(BAND, h_in) if BAND else band_rows(h_in, size[0])
    return band, cdiv(h_in, band), cdiv(size[1], TILE_W - (kernel_size - 1))


def _upsample_geometry(logits, size, align_corners, kernel_size):
    """(plan, int32 tables, weight tables, input rows per band, bands, tiles) of the
    interpolating backward."""
    up, index, weight = upsample_tables(logits, size, align_corners, kernel_size)
    return (up, index, weight) + _bands(logits.shape[-2], size, kernel_size)


def upsample_staging(logits, size, align_corners, kernel_size):
    """The interpolating backward's staging buffers for ``logits`` (the whole batch): every
    input row at each tile's columns, and each band's first row as the band above owes it,
    shares in the accumulation dtype that _upsample_columns_kernel sums in a fixed order. Plain
    Python on the sizes (no tables), so that fake tensors get them too."""
    up = plan_of(logits, size, align_corners, kernel_size)
    batch, classes, h_in = logits.shape[:3]
    _, bands, tiles = _bands(h_in, size, kernel_size)
    acc = accumulation_dtype(logits.dtype)
    stage = logits.new_empty((batch, h_in, tiles, classes, up.span), dtype=acc)
    above = logits.new_empty((batch, bands, tiles, classes, up.span) if bands > 1 else (0,),
                             dtype=acc)
    return stage, above


def _upsample_backward(s, logits, target, P, *, kernel_size, eps, weight_base, zscore, plan,
                       weighted, grad, scalars, power, align_corners, out, columns,
                       staging=None):
    batch, classes, h_in, w_in = logits.shape
    height, width = target.shape[-2:]
    up, index, weight, band, bands, tiles = _upsample_geometry(logits, (height, width),
                                                               align_corners, kernel_size)
    if columns is None:  # the Jacobian blends two rows of these per output row, as the forward
        # (without the z-score the kernel reads none: any tensor stands in)
        columns = (columns_interpolated(logits, (height, width), align_corners, kernel_size)
                   if zscore else logits.new_empty((1, 1)))
    mean = grad is not None
    acc = accumulation_dtype(logits.dtype)
    cfg = launch_config(classes, 1, kernel_size, acc, weighted, upsample=True,
                        **target_of(logits))
    forward_rows, forward_cols = map(int, plan.split("x"))
    # with the mean the kernel takes each tile's share as one exp2 of log2 t (once per tile here
    # where the kernel would take a log per lane and centre row)
    s = s.log2() if mean else s.to(acc).contiguous()
    sy = as_volume(target, 3)[1]
    wide = needs_wide_index(span(columns.shape[1:], columns.stride()[1:]),
                            math.prod(logits.shape[1:]),
                            span((height, width), sy[2:]), math.prod(P.shape[1:]),
                            height * width)
    stage, above = (staging if staging is not None
                    else upsample_staging(logits, (height, width), align_corners, kernel_size))
    halo._halo_upsample_backward_kernel[(batch * bands * tiles,)](
        columns, target, P, s, grad if mean else s, scalars if mean else s, stage, above, index,
        weight, height, width, h_in, bands, tiles, cdiv(height, forward_rows),
        cdiv(width, forward_cols), band, up.extra, columns.stride(0), columns.stride(1), sy[0],
        *sy[2:],
        *split_scalar(eps), *split_scalar(weight_base), *split_scalar(power),
        C=classes, CLASS_TILE=cfg.class_tile, RADIUS=kernel_size // 2, FROWS=forward_rows,
        ZSCORE=zscore, MEAN=mean, WIDE=wide, ROWS=cfg.backward_rows, STEPS=up.steps,
        SPAN=up.span,
        **cfg.backward_launch)
    if staging is not None:
        return None
    return upsample_gradient(stage, above, logits, (height, width), align_corners, kernel_size,
                             out=out)


def upsample_gradient(stage, above, logits, size, align_corners, kernel_size, out=None,
                      scale=None):
    """The low-resolution logits' gradient from the interpolating backward's staged shares
    (upsample_staging's, filled), into ``out`` where given (any floating dtype, the logits'
    shape), else in the logits' dtype; ``scale`` (B,) in the accumulation dtype, where given,
    multiplies each image's gradient before its one rounding."""
    dx = torch.empty_like(logits) if out is None else out
    batch, classes, h_in, w_in = logits.shape
    up, index, _, band, bands, tiles = _upsample_geometry(logits, size, align_corners,
                                                          kernel_size)
    acc = accumulation_dtype(logits.dtype)
    class_tile = launch_config(classes, 1, kernel_size, acc, False, upsample=True,
                               **target_of(logits)).class_tile
    halo._upsample_columns_kernel[(batch * h_in * cdiv(w_in, TILE_W),)](
        stage, above, index, dx, stage if scale is None else scale, *size, h_in, w_in, bands,
        tiles, band, *dx.stride(), C=classes, CLASS_TILE=class_tile, RADIUS=kernel_size // 2,
        SPAN=up.span, SCALE=scale is not None, num_warps=1)
    return dx

"""Backward kernel of the locally adaptive loss and its launch helper.

With P_p = (softmax(f_p) - onehot(y_p)) / xi_p saved by the forward (0 at invalid centres) and
dL_p = d loss / d L_p from the reduction (``lad_triton/reduction.py``: the Minkowski factor,
class weights, or the upstream map), ``_backward_kernel`` computes the gradient of docs/math.md:
per tile of pixels q, it gathers G_q = sum over the centres p whose window holds q, with
y_p == y_q, of omega(d) * dL_p * P_p (the window is symmetric, so this is the forward's pooling
read backwards: a gather, never a scatter, no atomics), then applies the z-score Jacobian
dx_q = rstd_q * (G_q - mean_c G_q - z_q * mean_c(G_q z_q)). The Jacobian needs every class of
G_q: one pass when C fits the class chunk (C <= 256), else a first pass for the two class means
and a second that recomputes G chunk by chunk. 2-D images run as volumes of depth 1.

Traffic and arithmetic per pixel, stride 1, logits of E bytes per element, labels of Y bytes:
reads P and dL of its K^2 neighbour centres (C*E + 4 B from DRAM, K^2 times that through L1),
labels (Y), its logits (C*E) and stats (8 B); writes dx (C*E); the reduction's dL costs 8 B per
centre. ~2*K^2*C flops for the gather (a multiply-add per neighbour and class) and ~8C for the
Jacobian. P is E bytes per class except for half-precision logits with C > 32 (4 B, see
``config.p_dtype``). For C=21 float32 logits and uint8 labels: 273 B per pixel; forward +
backward 546 B, 6.5x the 84 B of logits (bfloat16: 294 B, 7x the 42 B), against 2x for the floor
(logits read once, gradient written once, labels once: 169 B) and ~5x for a store design
without a separate statistics pass. In 3-D the window holds K^3 neighbours: K^3 in
place of K^2 above.
"""

import torch
import triton
import triton.language as tl

from .forward import as_volume
from .config import accumulation_dtype, launch_config, needs_wide_index, span, split_scalar
from .tiling import class_lanes, scalar, tile_pixels, window_weight


@triton.jit
def _gathered_chunk(
    P_img, s_img, y_img, c0, C, D, H, W, Dc, Hc, Wc, qd, qi, qj, y_q, live,
    syd, syh, syw, stride, radius, radius_d, weight_base, inv_base,
    ACC: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """G for classes [c0, c0 + BLOCK_C) of the pixels (qd, qi, qj) of one image: the adjoint
    pooling of docs/math.md, gathering omega * dL_p * P_p from the same-class centres p whose window holds q."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    cmask = cls < C
    class_plane = Dc * Hc * Wc
    G = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for dd in range(-radius_d, radius_d + 1):
        pd = qd - dd
        # tl.where, not &: the interpreter types (block mask & scalar condition) as an int.
        plane_ok = tl.where((pd >= 0) & (pd < D) & (pd % stride == 0), live, False)
        y_plane = y_img + pd * syd
        centre_plane = (pd // stride) * Hc * Wc
        for du in range(-radius, radius + 1):
            pi = qi - du
            row_ok = plane_ok & (pi >= 0) & (pi < H) & (pi % stride == 0)
            for dv in range(-radius, radius + 1):
                pj = qj - dv
                same = row_ok & (pj >= 0) & (pj < W) & (pj % stride == 0)
                y_p = tl.load(y_plane + pi * syh + pj * syw, mask=same, other=0)
                same = same & (y_p == y_q)
                centre = (pi // stride) * Wc + pj // stride
                s = tl.load(s_img + centre_plane + centre, mask=same, other=0.0)
                beta = tl.where(same, window_weight(dd, du, dv, weight_base, inv_base) * s, 0.0)
                P = tl.load(P_img + centre_plane + cls[:, None] * class_plane + centre[None, :],
                            mask=cmask[:, None] & same[None, :], other=0.0).to(ACC)
                G += beta[None, :] * P
    return G


@triton.jit
def _z_chunk(x_plane, c0, C, sxc, x_pix, live, m_q, r_q,
             ACC: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """z for classes [c0, c0 + BLOCK_C) of the pixels at offsets x_pix, 0 on padded classes (so
    that a NaN pixel's padding cannot reach the class means)."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    cmask = cls < C
    x = tl.load(x_plane + cls[:, None] * sxc + x_pix[None, :],
                mask=cmask[:, None] & live[None, :], other=0.0).to(ACC)
    return tl.where(cmask[:, None], (x - m_q[None, :]) * r_q[None, :], 0.0)


@triton.jit(do_not_specialize=["C", "D", "H", "W", "Dc", "Hc", "Wc", "tiles_h", "tiles_w",
                               "stride", "radius", "radius_d"])
def _backward_kernel(
    x_ptr,       # logits (B, C, D, H, W), any strides
    y_ptr,       # target (B, D, H, W), any integer dtype, any strides
    mean_ptr,    # (B, D, H, W) contiguous, ACC (read only if ZSCORE)
    rstd_ptr,    # (B, D, H, W) contiguous, ACC (read only if ZSCORE)
    P_ptr,       # (B, C, Dc, Hc, Wc) contiguous, p_dtype(): (softmax(f) - onehot(y)) / xi
    s_ptr,       # (B, Dc, Hc, Wc) contiguous, ACC: d loss / d L_p
    dx_ptr,      # out (B, C, D, H, W), logits dtype, strides sdb/sdc/sdd/sdh/sdw
    C, D, H, W, Dc, Hc, Wc, tiles_h, tiles_w,
    sxb, sxc, sxd, sxh, sxw,
    syb, syd, syh, syw,
    sdb, sdc, sdd, sdh, sdw,
    stride, radius, radius_d, base_hi, base_lo,
    ZSCORE: tl.constexpr, SINGLE_CHUNK: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    weight_base = scalar(base_hi, base_lo, ACC)
    inv_base = 1.0 / weight_base
    image, qd, qi, qj = tile_pixels(tiles_h, tiles_w, D, TILE_H, TILE_W, WIDE)
    live = (qi < H) & (qj < W)
    x_plane = x_ptr + image * sxb + qd * sxd
    y_img = y_ptr + image * syb
    dx_plane = dx_ptr + image * sdb + qd * sdd
    P_img = P_ptr + image * C * Dc * Hc * Wc
    s_img = s_ptr + image * Dc * Hc * Wc
    y_q = tl.load(y_img + qd * syd + qi * syh + qj * syw, mask=live, other=0)
    x_pix = qi * sxh + qj * sxw
    d_pix = qi * sdh + qj * sdw
    m_q = tl.zeros([BLOCK_P], dtype=ACC)
    r_q = tl.zeros([BLOCK_P], dtype=ACC)
    if ZSCORE:
        q = (image * D + qd) * H * W + qi * W + qj
        m_q = tl.load(mean_ptr + q, mask=live, other=0.0)
        r_q = tl.load(rstd_ptr + q, mask=live, other=0.0)

    mean_G = tl.zeros([BLOCK_P], dtype=ACC)
    mean_Gz = tl.zeros([BLOCK_P], dtype=ACC)
    if ZSCORE and not SINGLE_CHUNK:
        # First pass: the two class means of the Jacobian; G is recomputed below.
        for c0 in range(0, C, BLOCK_C):
            G = _gathered_chunk(P_img, s_img, y_img, c0, C, D, H, W, Dc, Hc, Wc, qd, qi, qj,
                                y_q, live, syd, syh, syw, stride, radius, radius_d, weight_base,
                                inv_base, ACC, WIDE, BLOCK_C, BLOCK_P)
            z = _z_chunk(x_plane, c0, C, sxc, x_pix, live, m_q, r_q, ACC, WIDE, BLOCK_C)
            mean_G += tl.sum(G, axis=0) / C
            mean_Gz += tl.sum(G * z, axis=0) / C

    for c0 in range(0, C, BLOCK_C):
        G = _gathered_chunk(P_img, s_img, y_img, c0, C, D, H, W, Dc, Hc, Wc, qd, qi, qj, y_q,
                            live, syd, syh, syw, stride, radius, radius_d, weight_base,
                            inv_base, ACC, WIDE, BLOCK_C, BLOCK_P)
        dx = G
        if ZSCORE:
            z = _z_chunk(x_plane, c0, C, sxc, x_pix, live, m_q, r_q, ACC, WIDE, BLOCK_C)
            if SINGLE_CHUNK:
                mean_G = tl.sum(G, axis=0) / C
                mean_Gz = tl.sum(G * z, axis=0) / C
            dx = r_q[None, :] * (G - mean_G[None, :] - z * mean_Gz[None, :])
        cls = class_lanes(c0, BLOCK_C, WIDE)
        tl.store(dx_plane + cls[:, None] * sdc + d_pix[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=(cls < C)[:, None] & live[None, :])


def backward(dL, logits, target, P, mean, rstd, *, kernel_size, stride, weight_base, zscore):
    """Launch the backward: d loss / d logits from dL = d loss / d L (the centre grid's shape),
    in the logits' dtype and memory format."""
    volume = logits.dim() == 5
    dx = torch.empty_like(logits)
    x, y, dxv = as_volume(logits, 4), as_volume(target, 3), as_volume(dx, 4)
    batch, classes, depth, height, width = x.shape
    d_c, h_c, w_c = P.shape[2:]
    acc = accumulation_dtype(logits.dtype)
    s = dL.to(acc).reshape(batch, d_c, h_c, w_c).contiguous()
    cfg = launch_config("backward", classes, acc)
    tiles_h, tiles_w = triton.cdiv(height, cfg.tile_h), triton.cdiv(width, cfg.tile_w)
    wide = needs_wide_index(span(x.shape[1:], x.stride()[1:]),
                            span(dxv.shape[1:], dxv.stride()[1:]),
                            span(y.shape[1:], y.stride()[1:]), classes * d_c * h_c * w_c)
    _backward_kernel[(batch * depth * tiles_h * tiles_w,)](
        x, y, mean, rstd, P, s, dxv,
        classes, depth, height, width, d_c, h_c, w_c, tiles_h, tiles_w,
        *x.stride(), *y.stride(), *dxv.stride(),
        stride, kernel_size // 2, kernel_size // 2 if volume else 0, *split_scalar(weight_base),
        ZSCORE=zscore, SINGLE_CHUNK=cfg.single_chunk, WIDE=wide,
        BLOCK_C=cfg.block_c, TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, **cfg.launch)
    return dx

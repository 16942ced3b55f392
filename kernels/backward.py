"""Backward kernels of the locally adaptive loss and their launch helper.

With P_p = (softmax(f_p) - onehot(y_p)) / xi_p saved by the forward (0 at invalid centres), the
gradient of docs/math.md is computed in two launches:

1. ``_centre_scale_kernel``: s_p = d loss / d L_p per centre: ``grad * a * (L_p / max L)^(k-1)``
   for reduction="mean" (a and max L read from the forward's device-side stats: no host sync),
   the upstream map at the centre for reduction="none".
2. ``_backward_kernel``: per tile of pixels q, gather G_q = sum over the centres p whose window
   holds q, with y_p == y_q, of omega(d) * s_p * P_p (the window is symmetric, so this is the
   forward's pooling read backwards: a gather, never a scatter, no atomics), then the z-score
   Jacobian dx_q = rstd_q * (G_q - mean_c G_q - z_q * mean_c(G_q z_q)). The Jacobian needs every
   class of G_q: one pass when C fits the class chunk (C <= 256), else a first pass for the two
   class means and a second that recomputes G chunk by chunk.

Traffic and arithmetic per pixel, stride 1, logits of E bytes per element, labels of Y bytes:
reads P and s of its K^2 neighbour centres (4C + 4 B from DRAM, K^2 times that through L1),
labels (Y), its logits (C*E) and stats (8 B); writes dx (C*E); the scale kernel adds 8 B per
centre. ~2*K^2*C flops for the gather (a multiply-add per neighbour and class) and ~8C for the
Jacobian. For C=21 float32 logits and uint8 labels: 273 B per pixel; forward + backward 546 B,
6.5x the 84 B of logits, against 2x for the floor (logits read once, gradient written once,
labels once: 169 B) and ~5x for PERF_NOTES' store estimate, which had no separate statistics
pass.
"""

import torch
import triton
import triton.language as tl

from .tiling import (class_lanes, launch_config, needs_wide_index, power_of, scalar, span,
                     split_scalar, tile_pixels, window_weight)


@triton.jit(do_not_specialize=["n_centres", "Hc", "Wc", "stride"])
def _centre_scale_kernel(
    L_ptr,       # (B, Hc, Wc) contiguous, ACC: L_p from the forward
    stats_ptr,   # (2,) ACC: global max L and a, from the forward's finish kernel
    grad_ptr,    # upstream gradient: () for MEAN, else (B, H, W) with strides sgb/sgh/sgw
    s_ptr,       # out (B, Hc, Wc) contiguous, ACC: d loss / d L_p
    n_centres, Hc, Wc, stride,
    sgb, sgh, sgw,
    power_hi, power_lo,
    MEAN: tl.constexpr, BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = s_ptr.dtype.element_ty
    n = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = n < n_centres
    if MEAN:
        L = tl.load(L_ptr + n, mask=live, other=0.0)
        g_max = tl.load(stats_ptr)
        a = tl.load(stats_ptr + 1)
        grad = tl.load(grad_ptr).to(ACC)
        power = scalar(power_hi, power_lo, ACC)
        s = grad * a * power_of(L / tl.where(g_max > 0, g_max, 1.0), power - 1.0)
    else:
        cj = n % Wc
        rest = n // Wc
        s = tl.load(grad_ptr + (rest // Hc) * sgb + (rest % Hc) * stride * sgh + cj * stride * sgw,
                    mask=live, other=0.0).to(ACC)
    tl.store(s_ptr + n, s, mask=live)


@triton.jit
def _gathered_chunk(
    P_img, s_img, y_img, c0, C, H, W, Hc, Wc, qi, qj, y_q, live,
    syh, syw, stride, radius, weight_base, inv_base,
    ACC: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """G for classes [c0, c0 + BLOCK_C) of the pixels (qi, qj) of one image: SPEC's adjoint
    pooling, gathering s_p * omega * P_p from the same-class centres p whose window holds q."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    cmask = cls < C
    centre_plane = Hc * Wc
    G = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for du in range(-radius, radius + 1):
        pi = qi - du
        row_ok = live & (pi >= 0) & (pi < H) & (pi % stride == 0)
        for dv in range(-radius, radius + 1):
            pj = qj - dv
            same = row_ok & (pj >= 0) & (pj < W) & (pj % stride == 0)
            y_p = tl.load(y_img + pi * syh + pj * syw, mask=same, other=0)
            same = same & (y_p == y_q)
            centre = (pi // stride) * Wc + pj // stride
            s = tl.load(s_img + centre, mask=same, other=0.0)
            beta = tl.where(same, window_weight(du, dv, weight_base, inv_base) * s, 0.0)
            P = tl.load(P_img + cls[:, None] * centre_plane + centre[None, :],
                        mask=cmask[:, None] & same[None, :], other=0.0)
            G += beta[None, :] * P
    return G


@triton.jit
def _z_chunk(x_img, c0, C, sxc, x_pix, live, m_q, r_q,
             ACC: tl.constexpr, WIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """z for classes [c0, c0 + BLOCK_C) of the pixels at offsets x_pix, 0 on padded classes (so
    that a NaN pixel's padding cannot reach the class means)."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    cmask = cls < C
    x = tl.load(x_img + cls[:, None] * sxc + x_pix[None, :],
                mask=cmask[:, None] & live[None, :], other=0.0).to(ACC)
    return tl.where(cmask[:, None], (x - m_q[None, :]) * r_q[None, :], 0.0)


@triton.jit(do_not_specialize=["C", "H", "W", "Hc", "Wc", "tiles_h", "tiles_w", "stride",
                               "radius"])
def _backward_kernel(
    x_ptr,       # logits (B, C, H, W), any strides
    y_ptr,       # target (B, H, W), any integer dtype, any strides
    mean_ptr,    # (B, H, W) contiguous, ACC (read only if ZSCORE)
    rstd_ptr,    # (B, H, W) contiguous, ACC (read only if ZSCORE)
    P_ptr,       # (B, C, Hc, Wc) contiguous, ACC: (softmax(f) - onehot(y)) / xi from the forward
    s_ptr,       # (B, Hc, Wc) contiguous, ACC: d loss / d L_p
    dx_ptr,      # out (B, C, H, W), logits dtype, strides sdb/sdc/sdh/sdw
    C, H, W, Hc, Wc, tiles_h, tiles_w,
    sxb, sxc, sxh, sxw,
    syb, syh, syw,
    sdb, sdc, sdh, sdw,
    stride, radius, base_hi, base_lo,
    ZSCORE: tl.constexpr, SINGLE_CHUNK: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    ACC: tl.constexpr = P_ptr.dtype.element_ty
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    weight_base = scalar(base_hi, base_lo, ACC)
    inv_base = 1.0 / weight_base
    image, qi, qj = tile_pixels(tiles_h, tiles_w, TILE_H, TILE_W, WIDE)
    live = (qi < H) & (qj < W)
    x_img = x_ptr + image * sxb
    y_img = y_ptr + image * syb
    dx_img = dx_ptr + image * sdb
    P_img = P_ptr + image * C * Hc * Wc
    s_img = s_ptr + image * Hc * Wc
    y_q = tl.load(y_img + qi * syh + qj * syw, mask=live, other=0)
    x_pix = qi * sxh + qj * sxw
    d_pix = qi * sdh + qj * sdw
    m_q = tl.zeros([BLOCK_P], dtype=ACC)
    r_q = tl.zeros([BLOCK_P], dtype=ACC)
    if ZSCORE:
        q = image * H * W + qi * W + qj
        m_q = tl.load(mean_ptr + q, mask=live, other=0.0)
        r_q = tl.load(rstd_ptr + q, mask=live, other=0.0)

    mean_G = tl.zeros([BLOCK_P], dtype=ACC)
    mean_Gz = tl.zeros([BLOCK_P], dtype=ACC)
    if ZSCORE and not SINGLE_CHUNK:
        # First pass: the two class means of the Jacobian; G is recomputed below.
        for c0 in range(0, C, BLOCK_C):
            G = _gathered_chunk(P_img, s_img, y_img, c0, C, H, W, Hc, Wc, qi, qj, y_q, live,
                                syh, syw, stride, radius, weight_base, inv_base,
                                ACC, WIDE, BLOCK_C, BLOCK_P)
            z = _z_chunk(x_img, c0, C, sxc, x_pix, live, m_q, r_q, ACC, WIDE, BLOCK_C)
            mean_G += tl.sum(G, axis=0) / C
            mean_Gz += tl.sum(G * z, axis=0) / C

    for c0 in range(0, C, BLOCK_C):
        G = _gathered_chunk(P_img, s_img, y_img, c0, C, H, W, Hc, Wc, qi, qj, y_q, live,
                            syh, syw, stride, radius, weight_base, inv_base,
                            ACC, WIDE, BLOCK_C, BLOCK_P)
        dx = G
        if ZSCORE:
            z = _z_chunk(x_img, c0, C, sxc, x_pix, live, m_q, r_q, ACC, WIDE, BLOCK_C)
            if SINGLE_CHUNK:
                mean_G = tl.sum(G, axis=0) / C
                mean_Gz = tl.sum(G * z, axis=0) / C
            dx = r_q[None, :] * (G - mean_G[None, :] - z * mean_Gz[None, :])
        cls = class_lanes(c0, BLOCK_C, WIDE)
        tl.store(dx_img + cls[:, None] * sdc + d_pix[None, :],
                 dx.to(dx_ptr.dtype.element_ty), mask=(cls < C)[:, None] & live[None, :])


SCALE_BLOCK = 1024


def backward(grad_loss, logits, target, P, L, mean, rstd, stats, *, kernel_size, power, stride,
             weight_base, zscore, reduction, block_c=None):
    """Launch the backward: d loss / d logits in the logits' dtype and memory format."""
    batch, classes, height, width = logits.shape
    h_c, w_c = L.shape[1], L.shape[2]
    s = torch.empty_like(L)
    n_centres = L.numel()
    sg = grad_loss.stride() if reduction == "none" else (0, 0, 0)
    _centre_scale_kernel[(triton.cdiv(n_centres, SCALE_BLOCK),)](
        L, stats, grad_loss, s, n_centres, h_c, w_c, stride, *sg, *split_scalar(power),
        MEAN=reduction == "mean", BLOCK=SCALE_BLOCK)

    cfg = launch_config("backward", classes, P.dtype, block_c)
    tiles_h, tiles_w = triton.cdiv(height, cfg.tile_h), triton.cdiv(width, cfg.tile_w)
    dx = torch.empty_like(logits)
    wide = needs_wide_index(span(logits.shape[1:], logits.stride()[1:]),
                            span(dx.shape[1:], dx.stride()[1:]),
                            span(target.shape[1:], target.stride()[1:]), classes * h_c * w_c)
    _backward_kernel[(batch * tiles_h * tiles_w,)](
        logits, target, mean, rstd, P, s, dx,
        classes, height, width, h_c, w_c, tiles_h, tiles_w,
        *logits.stride(), *target.stride(), *dx.stride(),
        stride, kernel_size // 2, *split_scalar(weight_base),
        ZSCORE=zscore, SINGLE_CHUNK=cfg.single_chunk, WIDE=wide,
        BLOCK_C=cfg.block_c, TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, num_warps=cfg.num_warps)
    return dx

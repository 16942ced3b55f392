"""Forward kernels of the locally adaptive loss and their launch helper.

Three launches (names as in SPEC and docs/math.md):

1. ``_zscore_stats_kernel`` (zscore=True only): per pixel, mean and rstd = 1/sqrt(var + eps)
   over the classes, chunks merged with Chan's formula.
2. ``_forward_kernel``: per tile of centres, for each class chunk and each window offset, the
   same-class weighted sum of the neighbours' z; then xi, f, an online logsumexp over chunks,
   L = lse(f) - f[y], per-tile Minkowski partials, and P = (softmax(f) - onehot(y)) / xi for
   the backward (0 at invalid centres). With several class chunks, f is parked in P's own slots
   until lse is known, then rewritten as P by the same program.
3. ``_minkowski_finish_kernel``: one program combines the tiles' partials in a fixed order (no
   atomics: bitwise repeatable) into the loss and the two scalars the backward needs.

Why this design ("store", SPEC's "The gradient, written out"): the backward needs g_p over a
window of every pixel, and only the Minkowski factor is global. Storing P costs one float32
buffer of the centres (C x 4 B per centre) and makes the backward a single gather; recomputing f
in the backward would instead redo the K^2-neighbour pooling over a halo of radius 2r
(K^2 x C more multiply-adds per pixel) and need the recomputed g of the halo in on-chip memory,
which Triton only offers through the experimental Gluon API. The price is memory: during the
backward, P and the gradient coexist, about 2x float32 logits (3x for bfloat16) over the inputs,
where a recompute design would hold ~1.2x.

Traffic and arithmetic per pixel, stride 1, logits of E bytes per element, labels of Y bytes,
float32 buffers (DRAM bytes assume a tile's halo is served from L1/L2, as neighbouring tiles
read the same rows):

- stats: reads C*E, writes 8 B (mean, rstd); ~5C flops.
- forward: reads C*E of logits, Y of labels and 8 B of stats from DRAM, but K^2*(C*E + Y + 8) B
  through L1 (every neighbour of every centre); writes P (4C B) and L (4 B). ~4*K^2*C flops for
  the pooling (z = (x - m) * rstd, then a multiply-add per neighbour and class) and ~6C for the
  softmax and P.
- total forward DRAM: 2*C*E + 4C + Y + 20 B: for C=21 float32 logits and uint8 labels, 273 B
  per pixel, 3.3x the 84 B of logits.
"""

import torch
import triton
import triton.language as tl

from .tiling import (class_lanes, launch_config, needs_wide_index, power_of, scalar, span,
                     split_scalar, tile_pixels, window_weight)


# Sizes are never specialised (no recompile per B, H, W); strides keep Triton's ==1 and
# divisible-by-16 specialisations, which decide vectorised loads.
@triton.jit(do_not_specialize=["C", "H", "W", "tiles_h", "tiles_w"])
def _zscore_stats_kernel(
    x_ptr,        # logits (B, C, H, W), any strides, float16/bfloat16/float32/float64
    mean_ptr,     # out (B, H, W) contiguous, accumulation dtype: mean over classes
    rstd_ptr,     # out (B, H, W) contiguous, accumulation dtype: 1 / sqrt(var + eps)
    C, H, W, tiles_h, tiles_w,
    sxb, sxc, sxh, sxw,  # logits strides of B, C, H, W
    eps_hi, eps_lo,      # eps as split_scalar()
    WIDE: tl.constexpr, BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    image, qi, qj = tile_pixels(tiles_h, tiles_w, TILE_H, TILE_W, WIDE)
    live = (qi < H) & (qj < W)
    x_img = x_ptr + image * sxb
    pix = qi * sxh + qj * sxw
    # Chan et al.'s pairwise update: each chunk's mean and squared deviations are exact two-pass
    # sums in registers, merged without the cancellation of E[x^2] - E[x]^2.
    count = tl.zeros([BLOCK_P], dtype=ACC)
    mean = tl.zeros([BLOCK_P], dtype=ACC)
    m2 = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cls = class_lanes(c0, BLOCK_C, WIDE)
        cmask = cls < C
        x = tl.load(x_img + cls[:, None] * sxc + pix[None, :],
                    mask=cmask[:, None] & live[None, :], other=0.0).to(ACC)
        n_chunk = tl.sum(cmask.to(ACC), axis=0)
        mean_chunk = tl.sum(x, axis=0) / n_chunk
        dev = tl.where(cmask[:, None], x - mean_chunk[None, :], 0.0)
        m2_chunk = tl.sum(dev * dev, axis=0)
        total = count + n_chunk
        delta = mean_chunk - mean
        mean += delta * (n_chunk / total)
        m2 += m2_chunk + delta * delta * (count * n_chunk / total)
        count = total
    rstd = 1.0 / tl.sqrt(m2 / C + scalar(eps_hi, eps_lo, ACC))
    q = image * H * W + qi * W + qj
    tl.store(mean_ptr + q, mean, mask=live)
    tl.store(rstd_ptr + q, rstd, mask=live)


@triton.jit
def _pooled_chunk(
    x_img, y_img, mean_img, rstd_img, c0, C, H, W, pi, pj, y_p, live,
    sxc, sxh, sxw, syh, syw, radius, weight_base, inv_base,
    ACC: tl.constexpr, ZSCORE: tl.constexpr, WEIGHT_NORM: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """f and xi for classes [c0, c0 + BLOCK_C) of the centres at pixels (pi, pj) of one image:
    f = (1 / xi) sum over same-class neighbours q of omega(d) * z_q (SPEC steps 1-6)."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    cmask = cls < C
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    xi = tl.zeros([BLOCK_P], dtype=ACC)
    for du in range(-radius, radius + 1):
        qi = pi + du
        row_ok = live & (qi >= 0) & (qi < H)
        for dv in range(-radius, radius + 1):
            qj = pj + dv
            same = row_ok & (qj >= 0) & (qj < W)
            y_q = tl.load(y_img + qi * syh + qj * syw, mask=same, other=0)
            same = same & (y_q == y_p)
            w = window_weight(du, dv, weight_base, inv_base)
            x_q = tl.load(x_img + cls[:, None] * sxc + (qi * sxh + qj * sxw)[None, :],
                          mask=cmask[:, None] & same[None, :], other=0.0).to(ACC)
            if ZSCORE:
                m_q = tl.load(mean_img + qi * W + qj, mask=same, other=0.0)
                r_q = tl.load(rstd_img + qi * W + qj, mask=same, other=0.0)
                x_q = (x_q - m_q[None, :]) * r_q[None, :]
            acc += tl.where(same, w, 0.0)[None, :] * x_q
            if WEIGHT_NORM:
                xi += tl.where(same, w, 0.0)
            else:
                xi += same.to(ACC)
    # xi >= 1 at every centre in the image; lanes past its edge have xi = 0 and are never stored.
    return acc * (1.0 / tl.where(xi > 0, xi, 1.0))[None, :], xi


@triton.jit
def _lse_update(f, c0, C, y_cls, m_run, s_run, f_y, WIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """Online logsumexp over class chunks: the running max and sum of exp, and f[y] once the
    chunk holding y passes."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    f_lse = tl.where((cls < C)[:, None], f, float("-inf"))
    m_new = tl.maximum(m_run, tl.max(f_lse, axis=0))
    s_run = s_run * tl.exp(m_run - m_new) + tl.sum(tl.exp(f_lse - m_new[None, :]), axis=0)
    f_y += tl.sum(tl.where(cls[:, None] == y_cls[None, :], f, 0.0), axis=0)
    return m_new, s_run, f_y


@triton.jit
def _write_P(P_img, f, lse, inv_xi, valid, y_cls, centre, c0, C, centre_plane,
             WIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """P = (softmax(f) - onehot(y)) / xi at valid centres, 0 elsewhere (a where, not a product
    with a mask: a NaN at an invalid centre must not reach the gradient). centre < 0: no centre."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    P = (tl.exp(f - lse[None, :]) - (cls[:, None] == y_cls[None, :]).to(f.dtype)) * inv_xi[None, :]
    P = tl.where(valid[None, :], P, 0.0)
    tl.store(P_img + cls[:, None] * centre_plane + centre[None, :], P,
             mask=(cls < C)[:, None] & (centre >= 0)[None, :])


@triton.jit(do_not_specialize=["C", "H", "W", "Hc", "Wc", "tiles_h", "tiles_w", "stride",
                               "radius", "ignore_index"])
def _forward_kernel(
    x_ptr,        # logits (B, C, H, W), any strides
    y_ptr,        # target (B, H, W), any integer dtype, any strides
    mean_ptr,     # (B, H, W) contiguous, ACC: per-pixel mean (read only if ZSCORE)
    rstd_ptr,     # (B, H, W) contiguous, ACC: per-pixel rstd (read only if ZSCORE)
    P_ptr,        # out (B, C, Hc, Wc) contiguous, ACC: (softmax(f) - onehot(y)) / xi (if NEED_P)
    L_ptr,        # out (B, Hc, Wc) contiguous, ACC: L_p, 0 at invalid centres
    part_ptr,     # out (n_tiles, 2) ACC: per tile max L and sum (L / max L)^k over valid centres
    count_ptr,    # out (n_tiles,) int32: per tile number of valid centres
    map_ptr,      # out (B, H, W) logits dtype, strides smb/smh/smw: L at centres (if WRITE_MAP)
    C, H, W, Hc, Wc, tiles_h, tiles_w,
    sxb, sxc, sxh, sxw,  # logits strides of B, C, H, W
    syb, syh, syw,       # target strides of B, H, W
    smb, smh, smw,       # map strides of B, H, W
    stride, radius, ignore_index,
    power_hi, power_lo, base_hi, base_lo,  # power k and weight_base as split_scalar()
    ZSCORE: tl.constexpr, WEIGHT_NORM: tl.constexpr, NEED_P: tl.constexpr,
    WRITE_MAP: tl.constexpr, SINGLE_CHUNK: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    ACC: tl.constexpr = L_ptr.dtype.element_ty
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    power = scalar(power_hi, power_lo, ACC)
    weight_base = scalar(base_hi, base_lo, ACC)
    inv_base = 1.0 / weight_base
    image, ci, cj = tile_pixels(tiles_h, tiles_w, TILE_H, TILE_W, WIDE)
    live = (ci < Hc) & (cj < Wc)
    pi = ci * stride
    pj = cj * stride
    x_img = x_ptr + image * sxb
    y_img = y_ptr + image * syb
    mean_img = mean_ptr + image * H * W
    rstd_img = rstd_ptr + image * H * W
    centre_plane = Hc * Wc
    P_img = P_ptr + image * C * centre_plane
    centre = tl.where(live, ci * Wc + cj, -1)
    y_p = tl.load(y_img + pi * syh + pj * syw, mask=live, other=0)
    valid = live & (y_p.to(tl.int64) != ignore_index)
    # A label outside [0, C) only gets here with check_target=False; it is only ever compared,
    # never used as an address, and clamping keeps its one-hot inside the classes.
    y_cls = tl.minimum(tl.maximum(y_p.to(tl.int32), 0), C - 1)

    if SINGLE_CHUNK:
        # Straight-line: one [BLOCK_C, BLOCK_P] tile of f lives in registers, nothing is carried.
        f, xi = _pooled_chunk(x_img, y_img, mean_img, rstd_img, 0, C, H, W, pi, pj, y_p, live,
                              sxc, sxh, sxw, syh, syw, radius, weight_base, inv_base,
                              ACC, ZSCORE, WEIGHT_NORM, WIDE, BLOCK_C, BLOCK_P)
        m_run, s_run, f_y = _lse_update(f, 0, C, y_cls, tl.full([BLOCK_P], float("-inf"), ACC),
                                        tl.zeros([BLOCK_P], ACC), tl.zeros([BLOCK_P], ACC),
                                        WIDE, BLOCK_C)
    else:
        m_run = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
        s_run = tl.zeros([BLOCK_P], dtype=ACC)
        f_y = tl.zeros([BLOCK_P], dtype=ACC)
        xi = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            f_c, xi = _pooled_chunk(x_img, y_img, mean_img, rstd_img, c0, C, H, W, pi, pj, y_p,
                                    live, sxc, sxh, sxw, syh, syw, radius, weight_base,
                                    inv_base, ACC, ZSCORE, WEIGHT_NORM, WIDE, BLOCK_C, BLOCK_P)
            m_run, s_run, f_y = _lse_update(f_c, c0, C, y_cls, m_run, s_run, f_y, WIDE, BLOCK_C)
            if NEED_P:
                # Park f in P's slots until lse is known; this program alone owns them.
                cls = class_lanes(c0, BLOCK_C, WIDE)
                tl.store(P_img + cls[:, None] * centre_plane + centre[None, :], f_c,
                         mask=(cls < C)[:, None] & live[None, :])
    lse = m_run + tl.log(s_run)
    L = lse - f_y
    L = tl.where(L < 0, 0.0, L)  # rounding only (L >= 0 exactly); NaN stays NaN
    L = tl.where(valid, L, 0.0)
    tl.store(L_ptr + image * centre_plane + centre, L, mask=live)
    if WRITE_MAP:
        tl.store(map_ptr + image * smb + pi * smh + pj * smw,
                 L.to(map_ptr.dtype.element_ty), mask=live)

    # Minkowski partials scaled by the tile's max L: L^k never overflows or underflows.
    has_nan = tl.max((L != L).to(tl.int32), axis=0)
    l_max = tl.where(has_nan > 0, float("nan"), tl.max(L, axis=0))
    ratio = L / tl.where(l_max > 0, l_max, 1.0)
    s_tile = tl.sum(tl.where(valid, power_of(ratio, power), 0.0), axis=0)
    tile = tl.program_id(0).to(tl.int64)
    tl.store(part_ptr + 2 * tile, l_max)
    tl.store(part_ptr + 2 * tile + 1, s_tile)
    tl.store(count_ptr + tile, tl.sum(valid.to(tl.int32), axis=0))

    if NEED_P:
        inv_xi = tl.where(valid, 1.0 / tl.where(valid, xi, 1.0), 0.0)
        if SINGLE_CHUNK:
            _write_P(P_img, f, lse, inv_xi, valid, y_cls, centre, 0, C, centre_plane, WIDE,
                     BLOCK_C)
        else:
            tl.debug_barrier()  # the parked f of every thread is visible to every thread
            for c0 in range(0, C, BLOCK_C):
                cls = class_lanes(c0, BLOCK_C, WIDE)
                f = tl.load(P_img + cls[:, None] * centre_plane + centre[None, :],
                            mask=(cls < C)[:, None] & live[None, :], other=0.0)
                _write_P(P_img, f, lse, inv_xi, valid, y_cls, centre, c0, C, centre_plane,
                         WIDE, BLOCK_C)


@triton.jit(do_not_specialize=["n_tiles"])
def _minkowski_finish_kernel(
    part_ptr,    # (n_tiles, 2) ACC: per tile max L and sum (L / max L)^k
    count_ptr,   # (n_tiles,) int32: per tile valid centres
    n_tiles,
    loss_ptr,    # out (), logits dtype: ((1/M) sum L^k)^(1/k), 0 when M == 0 or every L == 0
    stats_ptr,   # out (2,) ACC: global max L and a = (mean (L/max)^k)^(1/k - 1) / M
    power_hi, power_lo,
    BLOCK: tl.constexpr,
):
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    power = scalar(power_hi, power_lo, ACC)
    lane = tl.arange(0, BLOCK)
    top = tl.zeros([BLOCK], dtype=ACC)
    nan = tl.zeros([BLOCK], dtype=tl.int32)
    count = tl.zeros([BLOCK], dtype=tl.int64)
    for t0 in range(0, n_tiles, BLOCK):
        t = t0 + lane
        l_max = tl.load(part_ptr + 2 * t, mask=t < n_tiles, other=0.0)
        top = tl.maximum(top, l_max)
        nan = tl.maximum(nan, (l_max != l_max).to(tl.int32))
        count += tl.load(count_ptr + t, mask=t < n_tiles, other=0).to(tl.int64)
    g_max = tl.where(tl.max(nan, axis=0) > 0, float("nan"), tl.max(top, axis=0))
    m = tl.maximum(tl.sum(count, axis=0), 1).to(ACC)
    scale = tl.where(g_max > 0, g_max, 1.0)
    total = tl.zeros([BLOCK], dtype=ACC)
    for t0 in range(0, n_tiles, BLOCK):
        t = t0 + lane
        l_max = tl.load(part_ptr + 2 * t, mask=t < n_tiles, other=0.0)
        s_tile = tl.load(part_ptr + 2 * t + 1, mask=t < n_tiles, other=0.0)
        total += s_tile * power_of(l_max / scale, power)
    mean_ratio = tl.sum(total, axis=0) / m
    loss = g_max * power_of(mean_ratio, 1.0 / power)
    a = tl.where(g_max == 0, 0.0, power_of(mean_ratio, 1.0 / power - 1.0) / m)
    tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    tl.store(stats_ptr, g_max)
    tl.store(stats_ptr + 1, a)


# One program adds every tile's partials: 1024 lanes over 8 warps (4 per thread: float64 lanes
# over 4 warps spilled).
FINISH_BLOCK, FINISH_WARPS = 1024, 8


def accumulation_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(logits, target, *, kernel_size, power, stride, ignore_index, eps, weight_base,
            normalizer, zscore, reduction, need_grad, block_c=None):
    """Launch the forward. Returns the loss (logits dtype: 0-dim, or the (B, H, W) map) and, when
    ``need_grad``, what the backward needs: P, L, mean, rstd and stats (None otherwise). No host
    sync. ``block_c`` overrides the class chunk (tests)."""
    batch, classes, height, width = logits.shape
    acc = accumulation_dtype(logits.dtype)
    dev = logits.device
    h_c, w_c = -(-height // stride), -(-width // stride)
    cfg = launch_config("forward", classes, acc, block_c)
    sx = logits.stride()
    # mean, rstd, L and the map are contiguous per image and no wider than the logits.
    wide = needs_wide_index(span(logits.shape[1:], sx[1:]),
                            span(target.shape[1:], target.stride()[1:]), classes * h_c * w_c)

    mean = rstd = torch.empty(0, dtype=acc, device=dev)
    if zscore:
        mean = torch.empty((batch, height, width), dtype=acc, device=dev)
        rstd = torch.empty_like(mean)
        tiles_h, tiles_w = triton.cdiv(height, cfg.tile_h), triton.cdiv(width, cfg.tile_w)
        _zscore_stats_kernel[(batch * tiles_h * tiles_w,)](
            logits, mean, rstd, classes, height, width, tiles_h, tiles_w, *sx,
            *split_scalar(eps), WIDE=wide, BLOCK_C=cfg.block_c, TILE_H=cfg.tile_h,
            TILE_W=cfg.tile_w, num_warps=cfg.num_warps)

    tiles_h, tiles_w = triton.cdiv(h_c, cfg.tile_h), triton.cdiv(w_c, cfg.tile_w)
    n_tiles = batch * tiles_h * tiles_w
    P = torch.empty((batch, classes, h_c, w_c) if need_grad else (0,), dtype=acc, device=dev)
    L = torch.empty((batch, h_c, w_c), dtype=acc, device=dev)
    partials = torch.empty((n_tiles, 2), dtype=acc, device=dev)
    counts = torch.empty((n_tiles,), dtype=torch.int32, device=dev)
    loss_map = torch.empty(0, dtype=logits.dtype, device=dev)
    if reduction == "none":
        # Off the stride grid the map is 0, and no program writes there.
        alloc = torch.empty if stride == 1 else torch.zeros
        loss_map = alloc((batch, height, width), dtype=logits.dtype, device=dev)
    sm = loss_map.stride() if reduction == "none" else (0, 0, 0)

    _forward_kernel[(n_tiles,)](
        logits, target, mean, rstd, P, L, partials, counts, loss_map,
        classes, height, width, h_c, w_c, tiles_h, tiles_w,
        *sx, *target.stride(), *sm,
        stride, kernel_size // 2, ignore_index, *split_scalar(power), *split_scalar(weight_base),
        ZSCORE=zscore, WEIGHT_NORM=normalizer == "weight", NEED_P=need_grad,
        WRITE_MAP=reduction == "none", SINGLE_CHUNK=cfg.single_chunk, WIDE=wide,
        BLOCK_C=cfg.block_c, TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, num_warps=cfg.num_warps)

    stats = torch.empty(2, dtype=acc, device=dev)
    if reduction == "none":
        return loss_map, ((P, L, mean, rstd, stats) if need_grad else None)
    loss = torch.empty((), dtype=logits.dtype, device=dev)
    _minkowski_finish_kernel[(1,)](partials, counts, n_tiles, loss, stats, *split_scalar(power),
                                   BLOCK=FINISH_BLOCK, num_warps=FINISH_WARPS)
    return loss, ((P, L, mean, rstd, stats) if need_grad else None)

"""Forward kernels of the locally adaptive loss and their launch helper.

Two launches (names as in docs/contract.md and docs/math.md), for 2-D images (B, C, H, W) and 3-D volumes
(B, C, D, H, W) alike (an image is a volume of depth 1 and a depth radius of 0):

1. ``_zscore_stats_kernel`` (zscore=True only): per pixel, mean and rstd = 1/sqrt(var + eps)
   over the classes, chunks merged with Chan's formula.
2. ``_forward_kernel``: per tile of centres, for each class chunk and each window offset, the
   same-class weighted sum of the neighbours' z; then xi, f, an online logsumexp over chunks,
   L = lse(f) - f[y], the tile's Minkowski partials (max L, sum w (L / max L)^k, sum w, with w
   the class weight of each valid centre) and P = (softmax(f) - onehot(y)) / xi for the
   backward (0 at invalid centres). With several class chunks, f is parked in P's own slots
   until lse is known, then rewritten as P by the same program.

The partials (12 bytes per tile) are combined into the loss by ``lad_triton/reduction.py`` in a
fixed order, with no atomics: bitwise repeatable, and across processes when synchronised.

Why this design ("store", docs/contract.md's "The gradient, written out"): the backward needs g_p over a
window of every pixel, and only the Minkowski factor is global. Storing P costs one buffer of
the centres (C x E B per centre, see ``config.p_dtype``) and makes the backward a single gather;
recomputing f in the backward would instead redo the K^2-neighbour pooling over a halo of
radius 2r (K^2 x C more multiply-adds per pixel) and need the recomputed g of the halo in
on-chip memory, which Triton only offers through the experimental Gluon API. The price is
memory: during the backward, P and the gradient coexist, about 2x the logits over the inputs (3x
half-precision logits with C > 32, whose P is float32), where a recompute design would hold
~1.2x.

Traffic and arithmetic per pixel, stride 1, logits and P of E bytes per element (P: 4 B for
half-precision logits with C > 32), labels of Y bytes, float32 statistics (DRAM bytes assume
a tile's halo is served from L1/L2, as neighbouring tiles read the same rows):

- stats: reads C*E, writes 8 B (mean, rstd); ~5C flops.
- forward: reads C*E of logits, Y of labels and 8 B of stats from DRAM, but K^2*(C*E + Y + 8) B
  through L1 (every neighbour of every centre); writes P (C*E B) and L (4 B). ~4*K^2*C flops for
  the pooling (z = (x - m) * rstd, then a multiply-add per neighbour and class) and ~6C for the
  softmax and P.
- total forward DRAM: 3*C*E + Y + 20 B: for C=21 float32 logits and uint8 labels, 273 B
  per pixel, 3.3x the 84 B of logits (bfloat16: 147 B, 3.5x the 42 B).
"""

import torch
import triton
import triton.language as tl

from .config import (accumulation_dtype, launch_config, needs_wide_index, p_dtype, span,
                     split_scalar)
from .tiling import class_lanes, power_of, scalar, tile_pixels, window_weight


# Sizes are never specialised (no recompile per B, D, H, W); strides keep Triton's ==1 and
# divisible-by-16 specialisations, which decide vectorised loads.
@triton.jit(do_not_specialize=["C", "D", "H", "W", "tiles_h", "tiles_w"])
def _zscore_stats_kernel(
    x_ptr,        # logits (B, C, D, H, W), any strides, float16/bfloat16/float32/float64
    mean_ptr,     # out (B, D, H, W) contiguous, accumulation dtype: mean over classes
    rstd_ptr,     # out (B, D, H, W) contiguous, accumulation dtype: 1 / sqrt(var + eps)
    C, D, H, W, tiles_h, tiles_w,
    sxb, sxc, sxd, sxh, sxw,  # logits strides of B, C, D, H, W
    eps_hi, eps_lo,           # eps as split_scalar()
    WIDE: tl.constexpr, BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    image, qd, qi, qj = tile_pixels(tiles_h, tiles_w, D, TILE_H, TILE_W, WIDE)
    live = (qi < H) & (qj < W)
    x_plane = x_ptr + image * sxb + qd * sxd
    pix = qi * sxh + qj * sxw
    # Chan et al.'s pairwise update: each chunk's mean and squared deviations are exact two-pass
    # sums in registers, merged without the cancellation of E[x^2] - E[x]^2.
    count = tl.zeros([BLOCK_P], dtype=ACC)
    mean = tl.zeros([BLOCK_P], dtype=ACC)
    m2 = tl.zeros([BLOCK_P], dtype=ACC)
    for c0 in range(0, C, BLOCK_C):
        cls = class_lanes(c0, BLOCK_C, WIDE)
        cmask = cls < C
        x = tl.load(x_plane + cls[:, None] * sxc + pix[None, :],
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
    q = (image * D + qd) * H * W + qi * W + qj
    tl.store(mean_ptr + q, mean, mask=live)
    tl.store(rstd_ptr + q, rstd, mask=live)


@triton.jit
def _pooled_chunk(
    x_img, y_img, mean_img, rstd_img, c0, C, D, H, W, pd, pi, pj, y_p, live,
    sxc, sxd, sxh, sxw, syd, syh, syw, radius, radius_d, weight_base, inv_base,
    ACC: tl.constexpr, ZSCORE: tl.constexpr, WEIGHT_NORM: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """f and xi for classes [c0, c0 + BLOCK_C) of the centres at (pd, pi, pj) of one image:
    f = (1 / xi) sum over same-class neighbours q of omega(d) * z_q (steps 1-6 of docs/contract.md)."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    cmask = cls < C
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    xi = tl.zeros([BLOCK_P], dtype=ACC)
    for dd in range(-radius_d, radius_d + 1):
        qd = pd + dd
        # tl.where, not &: the interpreter types (block mask & scalar condition) as an int.
        plane_ok = tl.where((qd >= 0) & (qd < D), live, False)
        x_plane = x_img + qd * sxd
        y_plane = y_img + qd * syd
        stat_plane = qd * H * W
        for du in range(-radius, radius + 1):
            qi = pi + du
            row_ok = plane_ok & (qi >= 0) & (qi < H)
            for dv in range(-radius, radius + 1):
                qj = pj + dv
                same = row_ok & (qj >= 0) & (qj < W)
                y_q = tl.load(y_plane + qi * syh + qj * syw, mask=same, other=0)
                same = same & (y_q == y_p)
                w = window_weight(dd, du, dv, weight_base, inv_base)
                x_q = tl.load(x_plane + cls[:, None] * sxc + (qi * sxh + qj * sxw)[None, :],
                              mask=cmask[:, None] & same[None, :], other=0.0).to(ACC)
                if ZSCORE:
                    q = stat_plane + qi * W + qj
                    m_q = tl.load(mean_img + q, mask=same, other=0.0)
                    r_q = tl.load(rstd_img + q, mask=same, other=0.0)
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
def _write_P(P_img, f, lse, inv_xi, valid, y_cls, centre, c0, C, class_plane,
             WIDE: tl.constexpr, BLOCK_C: tl.constexpr):
    """P = (softmax(f) - onehot(y)) / xi at valid centres, 0 elsewhere (a where, not a product
    with a mask: a NaN at an invalid centre must not reach the gradient). centre < 0: no centre."""
    cls = class_lanes(c0, BLOCK_C, WIDE)
    P = (tl.exp(f - lse[None, :]) - (cls[:, None] == y_cls[None, :]).to(f.dtype)) * inv_xi[None, :]
    P = tl.where(valid[None, :], P, 0.0)
    tl.store(P_img + cls[:, None] * class_plane + centre[None, :],
             P.to(P_img.dtype.element_ty), mask=(cls < C)[:, None] & (centre >= 0)[None, :])


@triton.jit(do_not_specialize=["C", "D", "H", "W", "Dc", "Hc", "Wc", "tiles_h", "tiles_w",
                               "stride", "radius", "radius_d", "ignore_index"])
def _forward_kernel(
    x_ptr,        # logits (B, C, D, H, W), any strides
    y_ptr,        # target (B, D, H, W), any integer dtype, any strides
    weight_ptr,   # (C,) ACC: class weights (read only if HAS_WEIGHT)
    mean_ptr,     # (B, D, H, W) contiguous, ACC: per-pixel mean (read only if ZSCORE)
    rstd_ptr,     # (B, D, H, W) contiguous, ACC: per-pixel rstd (read only if ZSCORE)
    P_ptr,        # out (B, C, Dc, Hc, Wc) contiguous, p_dtype(): (softmax(f) - onehot(y)) / xi
    L_ptr,        # out (B, Dc, Hc, Wc) contiguous, ACC: L_p, 0 at invalid centres
    part_ptr,     # out (n_tiles, 3) ACC: per tile max L, sum w (L / max L)^k, sum w
    C, D, H, W, Dc, Hc, Wc, tiles_h, tiles_w,
    sxb, sxc, sxd, sxh, sxw,  # logits strides of B, C, D, H, W
    syb, syd, syh, syw,       # target strides of B, D, H, W
    stride, radius, radius_d, ignore_index,
    power_hi, power_lo, base_hi, base_lo,  # power k and weight_base as split_scalar()
    ZSCORE: tl.constexpr, WEIGHT_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
    NEED_P: tl.constexpr, SINGLE_CHUNK: tl.constexpr, WIDE: tl.constexpr,
    BLOCK_C: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    ACC: tl.constexpr = L_ptr.dtype.element_ty
    BLOCK_P: tl.constexpr = TILE_H * TILE_W
    power = scalar(power_hi, power_lo, ACC)
    weight_base = scalar(base_hi, base_lo, ACC)
    inv_base = 1.0 / weight_base
    image, cd, ci, cj = tile_pixels(tiles_h, tiles_w, Dc, TILE_H, TILE_W, WIDE)
    live = (ci < Hc) & (cj < Wc)
    pd = cd * stride
    pi = ci * stride
    pj = cj * stride
    x_img = x_ptr + image * sxb
    y_img = y_ptr + image * syb
    mean_img = mean_ptr + image * D * H * W
    rstd_img = rstd_ptr + image * D * H * W
    class_plane = Dc * Hc * Wc  # < 2^31; products with the class lanes are int64 when WIDE
    P_img = P_ptr + image * C * class_plane + cd * Hc * Wc
    centre = tl.where(live, ci * Wc + cj, -1)
    y_p = tl.load(y_img + pd * syd + pi * syh + pj * syw, mask=live, other=0)
    valid = live & (y_p.to(tl.int64) != ignore_index)
    # A label outside [0, C) only gets here with check_target=False; it is only ever compared,
    # and clamped wherever it selects a class (one-hot, class weight).
    y_cls = tl.minimum(tl.maximum(y_p.to(tl.int32), 0), C - 1)

    if SINGLE_CHUNK:
        # Straight-line: one [BLOCK_C, BLOCK_P] tile of f lives in registers, nothing is carried.
        f, xi = _pooled_chunk(x_img, y_img, mean_img, rstd_img, 0, C, D, H, W, pd, pi, pj, y_p,
                              live, sxc, sxd, sxh, sxw, syd, syh, syw, radius, radius_d,
                              weight_base, inv_base, ACC, ZSCORE, WEIGHT_NORM, WIDE, BLOCK_C,
                              BLOCK_P)
        m_run, s_run, f_y = _lse_update(f, 0, C, y_cls, tl.full([BLOCK_P], float("-inf"), ACC),
                                        tl.zeros([BLOCK_P], ACC), tl.zeros([BLOCK_P], ACC),
                                        WIDE, BLOCK_C)
    else:
        m_run = tl.full([BLOCK_P], float("-inf"), dtype=ACC)
        s_run = tl.zeros([BLOCK_P], dtype=ACC)
        f_y = tl.zeros([BLOCK_P], dtype=ACC)
        xi = tl.zeros([BLOCK_P], dtype=ACC)
        for c0 in range(0, C, BLOCK_C):
            f_c, xi = _pooled_chunk(x_img, y_img, mean_img, rstd_img, c0, C, D, H, W, pd, pi,
                                    pj, y_p, live, sxc, sxd, sxh, sxw, syd, syh, syw, radius,
                                    radius_d, weight_base, inv_base, ACC, ZSCORE, WEIGHT_NORM,
                                    WIDE, BLOCK_C, BLOCK_P)
            m_run, s_run, f_y = _lse_update(f_c, c0, C, y_cls, m_run, s_run, f_y, WIDE, BLOCK_C)
            if NEED_P:
                # Park f in P's slots until lse is known; this program alone owns them.
                cls = class_lanes(c0, BLOCK_C, WIDE)
                tl.store(P_img + cls[:, None] * class_plane + centre[None, :], f_c,
                         mask=(cls < C)[:, None] & live[None, :])
    lse = m_run + tl.log(s_run)
    L = lse - f_y
    L = tl.where(L < 0, 0.0, L)  # rounding only (L >= 0 exactly); NaN stays NaN
    L = tl.where(valid, L, 0.0)
    tl.store(L_ptr + (image * Dc + cd) * Hc * Wc + centre, L, mask=live)

    # Minkowski partials scaled by the tile's max L: L^k never overflows or underflows.
    if HAS_WEIGHT:
        w_p = tl.load(weight_ptr + y_cls, mask=valid, other=0.0)
    else:
        w_p = valid.to(ACC)
    w_p = tl.where(valid, w_p, 0.0)
    has_nan = tl.max((L != L).to(tl.int32), axis=0)
    l_max = tl.where(has_nan > 0, float("nan"), tl.max(L, axis=0))
    ratio = L / tl.where(l_max > 0, l_max, 1.0)
    tile = tl.program_id(0).to(tl.int64)
    tl.store(part_ptr + 3 * tile, l_max)
    tl.store(part_ptr + 3 * tile + 1, tl.sum(w_p * power_of(ratio, power), axis=0))
    tl.store(part_ptr + 3 * tile + 2, tl.sum(w_p, axis=0))

    if NEED_P:
        inv_xi = tl.where(valid, 1.0 / tl.where(valid, xi, 1.0), 0.0)
        if SINGLE_CHUNK:
            _write_P(P_img, f, lse, inv_xi, valid, y_cls, centre, 0, C, class_plane, WIDE,
                     BLOCK_C)
        else:
            tl.debug_barrier()  # the parked f of every thread is visible to every thread
            for c0 in range(0, C, BLOCK_C):
                cls = class_lanes(c0, BLOCK_C, WIDE)
                f = tl.load(P_img + cls[:, None] * class_plane + centre[None, :],
                            mask=(cls < C)[:, None] & live[None, :], other=0.0)
                _write_P(P_img, f, lse, inv_xi, valid, y_cls, centre, c0, C, class_plane,
                         WIDE, BLOCK_C)


def as_volume(t, dims):
    """A (B, [C,] H, W) image as a (B, [C,] 1, H, W) volume view; volumes unchanged."""
    return t if t.dim() == dims + 1 else t.unsqueeze(-3)


def centre_shape(spatial, stride):
    return tuple(-(-n // stride) for n in spatial)


def allocate(logits, *, stride, zscore, need_grad):
    """The forward's outputs (L, partials, P, mean, rstd), allocated with ``new_empty`` so that
    the fake implementation (torch.compile's shape propagation) shares this one definition."""
    x = as_volume(logits, 4)
    batch, classes, depth, height, width = x.shape
    acc = accumulation_dtype(logits.dtype)
    d_c, h_c, w_c = centre_shape((depth, height, width), stride)
    # int(): under torch.compile's dynamic shapes C specialises, as the kernel's BLOCK_C does.
    cfg = launch_config("forward", int(classes), acc)
    n_tiles = batch * d_c * -(-h_c // cfg.tile_h) * -(-w_c // cfg.tile_w)
    centres = (batch, d_c, h_c, w_c) if logits.dim() == 5 else (batch, h_c, w_c)
    new = lambda *shape, dtype=acc: logits.new_empty(shape, dtype=dtype)  # noqa: E731
    p_shape = (batch, classes, d_c, h_c, w_c) if need_grad else (0,)
    return (new(*centres), new(n_tiles, 3),
            new(*p_shape, dtype=p_dtype(logits.dtype, int(classes))),
            new(batch, depth, height, width) if zscore else new(0),
            new(batch, depth, height, width) if zscore else new(0))


def forward(logits, target, weight, *, kernel_size, power, stride, ignore_index, eps,
            weight_base, normalizer, zscore, need_grad):
    """Launch the forward on (B, C, H, W) or (B, C, D, H, W) logits. Returns (L, partials, P,
    mean, rstd): the costs on the centre grid (B, *centres), the (n_tiles, 3) Minkowski
    partials, and what the backward needs (empty tensors when ``need_grad`` is False). ``weight``
    is None or C class weights in the accumulation dtype. No host sync."""
    volume = logits.dim() == 5
    x, y = as_volume(logits, 4), as_volume(target, 3)
    batch, classes, depth, height, width = x.shape
    L, partials, P, mean, rstd = allocate(logits, stride=stride, zscore=zscore,
                                          need_grad=need_grad)
    d_c, h_c, w_c = centre_shape((depth, height, width), stride)
    cfg = launch_config("forward", classes, L.dtype)
    sx, sy = x.stride(), y.stride()
    # mean, rstd and L are contiguous per image and no wider than the logits.
    wide = needs_wide_index(span(x.shape[1:], sx[1:]), span(y.shape[1:], sy[1:]),
                            classes * d_c * h_c * w_c)
    if zscore:
        tiles_h, tiles_w = triton.cdiv(height, cfg.tile_h), triton.cdiv(width, cfg.tile_w)
        _zscore_stats_kernel[(batch * depth * tiles_h * tiles_w,)](
            x, mean, rstd, classes, depth, height, width, tiles_h, tiles_w, *sx,
            *split_scalar(eps), WIDE=wide, BLOCK_C=cfg.block_c, TILE_H=cfg.tile_h,
            TILE_W=cfg.tile_w, **cfg.launch)
    tiles_h, tiles_w = triton.cdiv(h_c, cfg.tile_h), triton.cdiv(w_c, cfg.tile_w)
    _forward_kernel[(partials.shape[0],)](
        x, y, partials if weight is None else weight, mean, rstd, P, L, partials,
        classes, depth, height, width, d_c, h_c, w_c, tiles_h, tiles_w, *sx, *sy,
        stride, kernel_size // 2, kernel_size // 2 if volume else 0, ignore_index,
        *split_scalar(power), *split_scalar(weight_base),
        ZSCORE=zscore, WEIGHT_NORM=normalizer == "weight", HAS_WEIGHT=weight is not None,
        NEED_P=need_grad, SINGLE_CHUNK=cfg.single_chunk, WIDE=wide,
        BLOCK_C=cfg.block_c, TILE_H=cfg.tile_h, TILE_W=cfg.tile_w, **cfg.launch)
    return L, partials, P, mean, rstd

"""The z-score statistics pass of the kernels other than the window-row ones (kernels/halo.py
z-scores in registers): per pixel the mean over classes and rstd = 1 / sqrt(var + eps), into a
buffer that lives only until the forward kernel has read it. Its device helpers also serve the
backward, which recomputes a pixel's statistics from the logits it loads.

DRAM traffic per pixel: reads the logits (C classes of E bytes), writes 8 B (float32) or 16 B
(float64)."""

import triton
import triton.language as tl

from .geometry import grid_of
from .config import split_scalar
from .tiling import also, class_range, lane_offsets, scalar, tile_coordinates


# Sizes are never specialised (no recompile per B, D, H, W); strides keep Triton's ==1 and
# divisible-by-16 specialisations. The window radii are run-time loop bounds (the loops stay
# loops: their trip counts are what the performance model multiplies by) and compile-time
# constants (RADIUS: the rows unrolled per loop iteration).
@triton.jit(do_not_specialize=["D", "H", "W", "tiles_h", "tiles_w", "chunks"])
def _zscore_stats_kernel(
    x_ptr,        # logits (B, C, D, H, W), any strides
    mean_ptr,     # out (B, D, H, W) contiguous, ACC: mean over classes
    rstd_ptr,     # out (B, D, H, W) contiguous, ACC: 1 / sqrt(var + eps)
    D, H, W, tiles_h, tiles_w, chunks,
    sxb, sxc, sxd, sxh, sxw,  # logits strides of B, C, D, H, W
    eps_hi, eps_lo,           # eps as split_scalar()
    C: tl.constexpr, CLASS_TILE: tl.constexpr, ROWS: tl.constexpr, TILE_W: tl.constexpr,
    WIDE: tl.constexpr,
):
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    image, plane, row0, cols = tile_coordinates(tiles_h, tiles_w, D, ROWS, TILE_W, WIDE)
    live = also(cols < W, row0 < H)
    pix = row0 * sxh + cols * sxw
    x_plane = x_ptr + image * sxb + plane * sxd
    mean, rstd = pixel_stats(x_plane, pix, live, scalar(eps_hi, eps_lo, ACC), sxc, chunks, ACC,
                             C, CLASS_TILE, TILE_W, WIDE)
    q = (image * D + plane) * H * W + row0 * W + cols
    tl.store(mean_ptr + q, mean, mask=live)
    tl.store(rstd_ptr + q, rstd, mask=live)


@triton.jit
def chan_update(x, cmask, count, mean, m2):
    """Merge one chunk of classes into a running (count, mean, sum of squared deviations), Chan
    et al.'s pairwise update: the chunk's mean and deviations are exact two-pass sums in
    registers, merged without the cancellation of E[x^2] - E[x]^2."""
    n_chunk = tl.sum(cmask.to(x.dtype), axis=0)
    mean_chunk = tl.sum(x, axis=0) / n_chunk
    dev = tl.where(cmask[:, None], x - mean_chunk[None, :], 0.0)
    total = count + n_chunk
    delta = mean_chunk - mean
    mean += delta * (n_chunk / total)
    m2 += tl.sum(dev * dev, axis=0) + delta * delta * (count * n_chunk / total)
    return total, mean, m2


@triton.jit
def pixel_logits(x_plane, cls, cmask, pix, live, sxc, ACC: tl.constexpr):
    """The logits [CLASS_TILE, TILE_W] of classes ``cls`` at pixel offsets ``pix``, masked."""
    return tl.load(x_plane + lane_offsets(cls, sxc, pix, pix.shape[0]),
                   mask=cmask[:, None] & live[None, :], other=0.0).to(ACC)


@triton.jit
def pixel_stats(x_plane, pix, live, eps, sxc, chunks, ACC: tl.constexpr, C: tl.constexpr,
                CLASS_TILE: tl.constexpr, TILE_W: tl.constexpr, WIDE: tl.constexpr):
    """Mean and rstd of the pixels at ``pix`` over every class, chunk by chunk."""
    count = tl.zeros([TILE_W], dtype=ACC)
    mean = tl.zeros([TILE_W], dtype=ACC)
    m2 = tl.zeros([TILE_W], dtype=ACC)
    for chunk in range(chunks):
        cls, cmask = class_range(chunk * CLASS_TILE, CLASS_TILE, C, WIDE)
        x = pixel_logits(x_plane, cls, cmask, pix, live, sxc, ACC)
        count, mean, m2 = chan_update(x, cmask, count, mean, m2)
    return mean, 1.0 / tl.sqrt(m2 / C + eps)


def zscore_stats(logits, mean, rstd, sx, volume_shape, eps, cfg, wide):
    """Launch the statistics pass of (B, C, D, H, W) logits with strides ``sx`` into ``mean`` and
    ``rstd`` ((B, D, H, W), the accumulation dtype)."""
    batch, classes, depth, height, width = volume_shape
    tiles_h, tiles_w, programs = grid_of(1, cfg.tile_w, (batch, depth, height, width))
    _zscore_stats_kernel[(programs,)](
        logits, mean, rstd, depth, height, width, tiles_h, tiles_w, cfg.chunks, *sx,
        *split_scalar(eps), C=classes, CLASS_TILE=cfg.class_tile, ROWS=1,
        TILE_W=cfg.tile_w, WIDE=wide, **cfg.forward_launch)

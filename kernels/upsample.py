"""What the window-row kernels need to score low-resolution logits (``upsample="bilinear"``)
without materialising their interpolation: PyTorch's source indices and weights per output row
and column, the inverse map the backward tiles by, which problems take that path, and the column
pass (the logits interpolated along the columns only, which the kernels blend two rows of). The
tables are plain Python, computed once per (sizes, convention, dtype, device) and cached: they
are a few kilobytes, and rebuilding them would cost host time on every call.

Linear interpolation along one axis maps output index q to source coordinate

    src(q) = q * (n - 1) / (m - 1)                  align_corners=True  (0 when m == 1)
    src(q) = max(0, (q + 1/2) * n / m - 1/2)        align_corners=False

(n input, m output samples), then i0 = min(floor(src), n - 1), i1 = i0 + (i0 < n - 1) and
weights 1 - l, l with l = src - i0 clamped to [0, 1]; equal sizes are the identity. The scale
and src are computed in PyTorch's own precision for the logits' dtype (float32, float64 for
float64 logits), in its order of operations, so the kernels read the weights F.interpolate uses.
"""

import collections
import functools
import math
import struct

import torch
import triton
import triton.language as tl

from .config import TILE_W, accumulation_dtype, cdiv

# The interpolating backward's input rows per program (a band). Every output row is formed once
# (a band's first row is summed from the band above's share and its own), so a band's size only
# sets the grid and how often a program stages a row: bands of about BAND_OUTPUT_ROWS output rows
# model fastest at both benchmark workloads (a half batch's backward, DeepLab-like 65 -> 513 rows,
# 8x: 2 input rows, 85 us; 3 and 4: 100, 100; SegFormer-like 128 -> 512, 4x: 4 rows, 153 us; 2, 3,
# 6 and 8: 158, 167, 176, 166). BAND, where set, overrides band_rows (the tests take every size).
# Neither depends on the GPU, so neither does the gradient.
BAND = None
BAND_OUTPUT_ROWS = 16


def band_rows(h_in, h):
    """The interpolating backward's input rows per program for h_in input and h output rows."""
    return min(max(1, round(BAND_OUTPUT_ROWS * h_in / h)), h_in)


def _round32(value):
    """``value`` rounded to float32 (a float64 sum, product or quotient of float32 values rounded
    so is the float32 operation's result)."""
    return struct.unpack("f", struct.pack("f", value))[0]


def _axis(n, m, align_corners, wide):
    """(i0, i1, l) along one axis as lists, as PyTorch's upsample_bilinear2d computes them: in
    float64 where ``wide`` (float64 logits), else in float32, rounded where its kernels round.
    Plain Python, so that torch.compile traces none of it (the plan is decided while
    tracing)."""
    if n == m:
        return list(range(m)), list(range(m)), [0.0] * m
    r = (lambda v: v) if wide else _round32
    if align_corners:
        scale = r(r(n - 1) / r(m - 1)) if m > 1 else 0.0
        src = [r(scale * q) for q in range(m)]
    else:
        scale = r(n / m)
        # one rounding of scale * (q + 1/2) - 1/2: PyTorch's kernels compile it to a fused
        # multiply-add (the float64 product of two float32 values is exact)
        src = [max(0.0, r(scale * (q + 0.5) - 0.5)) for q in range(m)]
    i0 = [min(int(math.floor(v)), n - 1) for v in src]
    lam = [min(max(r(v - i), 0.0), 1.0) for v, i in zip(src, i0)]
    return i0, [i + (i < n - 1) for i in i0], lam


def _footprint(i0, i1, n):
    """(first, last): for each input index, the first and last output index whose stencil holds
    it (with any weight, 0 included). Every input index is in some stencil when m >= n."""
    first, last = [len(i0)] * n, [-1] * n
    for q, pair in enumerate(zip(i0, i1)):
        for i in pair:
            first[i], last[i] = min(first[i], q), max(last[i], q)
    return first, last


class Plan:
    """How the kernels interpolate one problem: ``rows`` and ``cols``, the tables of each axis
    ((i0, i1, l) per output index, then (first, last) per input index); ``fits``: every input
    column's stencils span at most a warp's output lanes, so that at most two of the backward's
    column tiles share a column; ``span``: the most input columns one tile's output columns
    touch; ``steps``: log2 of the most output columns whose stencils start at one input column
    but the first (rounded up), the backward's shuffle-adds per column sum; ``extra``: the more
    the first column needs (align_corners=False clamps the first output columns' sources to
    it: 6 output columns at 4x where the others have 4), which only the image's first tile
    takes."""

    def __init__(self, size_in, size_out, align_corners, wide, lanes):
        (h_in, w_in), (h, w) = size_in, size_out
        self.rows = _axis(h_in, h, align_corners, wide)
        self.cols = _axis(w_in, w, align_corners, wide)
        self.rows += _footprint(*self.rows[:2], h_in)
        self.cols += _footprint(*self.cols[:2], w_in)
        first, last = self.cols[3:]
        self.fits = max(b - a + 1 for a, b in zip(first, last)) <= lanes
        i0, i1 = self.cols[:2]
        self.span = max(i1[min(c + lanes, w) - 1] - i0[c] + 1 for c in range(0, w, lanes))
        runs = collections.Counter(i0)
        first, runs[0] = runs[0], 1
        self.steps = (max(runs.values()) - 1).bit_length()
        self.extra = max(0, (first - 1).bit_length() - self.steps)


@functools.lru_cache(maxsize=64)
def _plan(size_in, size_out, align_corners, wide, lanes):
    return Plan(size_in, size_out, align_corners, wide, lanes)


def plan_of(logits, size, align_corners, kernel_size):
    """The Plan for bilinear interpolation of ``logits`` to spatial ``size`` under a K x K window
    (the window-row kernels' 32 - (K - 1) output lanes)."""
    return _plan(tuple(int(n) for n in logits.shape[-2:]), tuple(int(n) for n in size),
                 bool(align_corners), logits.dtype == torch.float64, TILE_W - (kernel_size - 1))


def _factored(i0, i1, lam, wide):
    """Each output row's blend (1 - l) x[i0] + l x[i1] as f (x[ia] + rho x[ib]), ia the input row
    of the larger weight f and rho = the other weight / f in [0, 1]: the kernels blend a class
    with one multiply-add, and f rides on the z-score's per-pixel factor (one multiply per
    pixel instead of one per class). (ia, ib, rho, f) as lists, 1 - l rounded as PyTorch's."""
    r = (lambda v: v) if wide else _round32
    ia, ib, rho, f = [], [], [], []
    for a, b, l in zip(i0, i1, lam):
        h0 = r(1.0 - l)
        if l > h0:
            a, b, h0, l = b, a, l, h0
        ia.append(a)
        ib.append(b)
        rho.append(r(l / h0))
        f.append(h0)
    return ia, ib, rho, f


@functools.lru_cache(maxsize=64)
def _tables(plan, dtype, device):
    """``plan``'s tables on ``device``: int32 ia, ib of every output row (H each: _factored's; i0 =
    min(ia, ib), i1 = max(ia, ib)) and i0, i1 of every column (W each), then first and last
    output row of every input row (H_in each) and output column of every input column (W_in
    each); in ``dtype``: l of every output row, then column, then rho and f of every row."""
    ia, ib, rho, f = _factored(*plan.rows[:3], dtype == torch.float64)
    index = torch.tensor(ia + ib + plan.cols[0] + plan.cols[1]
                         + plan.rows[3] + plan.rows[4] + plan.cols[3] + plan.cols[4],
                         dtype=torch.int32)
    weight = torch.tensor(plan.rows[2] + plan.cols[2] + rho + f, dtype=dtype)
    return index.to(device), weight.to(device)


def upsample_tables(logits, size, align_corners, kernel_size):
    """(plan, int32 tables, weight tables) for the kernels' launch."""
    plan = plan_of(logits, size, align_corners, kernel_size)
    return (plan, *_tables(plan, accumulation_dtype(logits.dtype), logits.device))


LANES = tl.constexpr(TILE_W)


@triton.jit
def _blend(p0, p1, lw, ok, ACC: tl.constexpr, SAME: tl.constexpr):
    """PyTorch's linear blend of the values at p0 and p1 (SAME: the value at p0, copied)."""
    x0 = tl.load(p0, mask=ok, other=0.0).to(ACC)
    if SAME:
        return x0
    return (1.0 - lw) * x0 + lw * tl.load(p1, mask=ok, other=0.0).to(ACC)


@triton.jit(do_not_specialize=["H", "H_in", "W", "blocks"])
def _column_pass_kernel(x_ptr, idx_ptr, lam_ptr, out_ptr, H, H_in, W, blocks, sxb, sxc, sxh, sxw,
                        C: tl.constexpr, SAME: tl.constexpr):
    """32 output columns of one input row, class by class: PyTorch's linear blend of the two input
    columns of each stencil (SAME: the widths are equal, and the row is copied, as F.interpolate
    copies it) less the pixel's mean over the classes, stored as a block of (C + 1) x 32 values:
    a pixel with a non-finite class stores zeros and NaN in the last row, the flag (0 where
    finite), which the kernels blend like a class so that the NaN spreads as F.interpolate
    spreads it while the values they pool stay finite. One value per lane and class: no padded
    classes to load, and no layout for Triton to convert between the loads and the store."""
    ACC: tl.constexpr = out_ptr.dtype.element_ty
    pid = tl.program_id(0).to(tl.int64)
    rest = pid // blocks  # image * H_in + row
    j = (pid % blocks).to(tl.int32) * LANES + tl.arange(0, LANES)
    ok = j < W
    jc = tl.minimum(j, W - 1)
    row = x_ptr + (rest // H_in) * sxb + (rest % H_in) * sxh
    p0 = row + tl.load(idx_ptr + 2 * H + jc).to(tl.int64) * sxw  # any stride: 64-bit
    p1 = row + tl.load(idx_ptr + 2 * H + W + jc).to(tl.int64) * sxw
    lw = tl.load(lam_ptr + H + jc).to(ACC)
    out = out_ptr + pid * ((C + 1) * LANES) + tl.arange(0, LANES)
    # The classes' mean of the blended values first, then each value less it (a second read,
    # from L1): the rows' blend keeps the mean 0, so the kernels' z-score needs none, and the
    # loss and its gradient are unchanged (a pixel's logits count only through differences
    # between its classes, with or without the z-score).
    total = tl.zeros([LANES], ACC)
    q0, q1 = p0, p1
    for c in tl.static_range(C):  # pointers stepped by the class stride (no 32-bit c * sxc)
        total += _blend(q0, q1, lw, ok, ACC, SAME)
        q0 += sxc
        q1 += sxc
    mean = total / C
    finite = (total - total) == 0  # a NaN or infinite class makes the sum NaN or infinite
    for c in tl.static_range(C):
        tl.store(out + c * LANES, tl.where(finite, _blend(p0, p1, lw, ok, ACC, SAME) - mean, 0.0),
                 mask=ok)
        p0 += sxc
        p1 += sxc
    tl.store(out + C * LANES, tl.where(finite, 0.0, float("nan")), mask=ok)


def columns_interpolated(logits, size, align_corners, kernel_size, out=None):
    """The logits' rows interpolated along the columns to the target's width ``size[1]``, in the
    accumulation dtype, F.interpolate's column weights (one rounding, as PyTorch's bilinear
    kernels blend a row) less each pixel's mean over the classes (which the loss and its
    gradient do not depend on; the kernels' z-score then takes the mean for 0), laid out in
    blocks of 32 columns: (B, H_in, cdiv(W, 32), C + 1, 32), so that the kernels reach every
    class of a lane's column at a compile-time offset from one address (the last block's
    columns past W are never written nor read); the last row of a block is each column's flag, 0
    or NaN where a class is not finite (its classes are then 0: _column_pass_kernel). The
    forward then blends two of these rows per output row: half the loads and a third of the
    arithmetic of blending four low-resolution pixels per class and pixel, for a buffer
    (C + 1) / C / (H / H_in) the target's size. ``out``: a buffer of that shape to write, where
    the caller reuses one."""
    batch, classes, h_in, w_in = logits.shape
    height, width = size
    _, index, weight = upsample_tables(logits, size, align_corners, kernel_size)
    blocks = cdiv(width, TILE_W)
    if out is None:
        out = logits.new_empty((batch, h_in, blocks, classes + 1, TILE_W),
                               dtype=accumulation_dtype(logits.dtype))
    _column_pass_kernel[(batch * h_in * blocks,)](
        logits, index, weight, out, height, h_in, width, blocks, *logits.stride(),
        C=classes, SAME=w_in == width, num_warps=1)
    return out


def fusable(logits, size_out, mode, halo):
    """Whether the window-row kernels interpolate these logits themselves: bilinear, upsampling
    (or equal) on both axes (the backward walks each input row's output rows in order) and a
    problem the window-row kernels take (``halo``: launch_config's). Elsewhere the loss
    interpolates with F.interpolate first (README.md, "Limitations")."""
    return (mode == "bilinear" and halo and logits.dim() == 4
            and all(m >= n for n, m in zip(logits.shape[2:], size_out)))

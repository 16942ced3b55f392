"""What the forward and backward kernels share: the launch heuristic, scalar passing, and the
device functions that place a program on its tile.

Work layout (both directions): a program owns a TILE_H x TILE_W tile of pixels of one depth
plane of one image (2-D inputs are volumes of depth 1), laid across threads with W fastest
(contiguous, coalesced for NCHW logits), and a BLOCK_C-wide chunk of classes held in registers:
every register tile is [BLOCK_C, TILE_H * TILE_W]. Per window offset, the neighbour's label,
weight and statistics are loaded once and reused by every class of the chunk. The window radii,
stride, C, D, H, W and B are runtime arguments: one binary serves every kernel_size, image and
volume size.
"""

import struct

import torch
import triton
import triton.language as tl

# Elements of a [BLOCK_C, BLOCK_P] register tile per program, warps, and the register cap
# (maxnreg) per kernel family. Backward: 2048 over 2 warps, so for C <= 32 each thread owns one
# pixel and all its classes (loads coalesced across the 32 pixels of a warp, the Jacobian's class
# means inside the thread); it needs 160-250 registers. Forward (and z-score statistics): 1024
# over 8 warps, 4 per thread, capped at 64 registers (128 when it loops over class chunks,
# doubled for float64): 4 CTAs of 256 threads per SM. Without an explicit cap ptxas picked 40-64
# registers on its own and spilled 8-48 bytes, differently under Triton 3.6 and 3.9 and after
# every code change; with these caps bench/kernel_report.py finds no spill in any kernel under
# either version. Performance is unmeasured until a GPU run: retune there.
TILE_ELEMENTS = {"forward": 1024, "backward": 2048}
NUM_WARPS = {"forward": 8, "backward": 2}
MAX_REGISTERS = {("forward", True): 64, ("forward", False): 128, ("backward", True): 255,
                 ("backward", False): 255}
# The forward loops over class chunks with an online logsumexp, so its chunk only bounds padding
# and registers: C=150 runs 5 chunks of 32 = 160 lanes (64-class chunks padded to 192 and took
# 249-254 registers). The backward's z-score Jacobian needs every class
# of G at once: chunks up to 256 keep it single-pass for VOC (21), Cityscapes (19), ADE20K (150)
# and COCO-Stuff (171/182); wider C recomputes G in a second pass.
MAX_BLOCK_C = {"forward": 32, "backward": 256}
MIN_BLOCK_P, MAX_BLOCK_P = 16, 256
TILE_W = 32  # up to 32 consecutive pixels of a class row: 128 B of float32 per load


class LaunchConfig:
    """Block sizes of one kernel family for one (C, dtype)."""

    def __init__(self, block_c, tile_h, tile_w, num_warps, single_chunk, max_registers):
        self.block_c, self.tile_h, self.tile_w = block_c, tile_h, tile_w
        self.num_warps, self.single_chunk = num_warps, single_chunk
        self.max_registers = max_registers

    @property
    def launch(self):
        """Launch options: ``kernel[grid](..., **cfg.launch)``."""
        return dict(num_warps=self.num_warps, maxnreg=self.max_registers)

    @property
    def block_p(self):
        return self.tile_h * self.tile_w

    def __repr__(self):
        return (f"BLOCK_C={self.block_c} TILE={self.tile_h}x{self.tile_w} "
                f"num_warps={self.num_warps} maxnreg={self.max_registers}")


def launch_config(family, classes, acc_dtype):
    """The one launch heuristic: BLOCK_C = C rounded up to a power of two, capped per family;
    pixels per program = TILE_ELEMENTS[family] / BLOCK_C (halved for float64, whose registers
    are twice as wide) within [MIN_BLOCK_P, MAX_BLOCK_P]; a tile larger than that (a 256-class
    backward chunk) gets more warps rather than more elements per thread; the register cap of
    MAX_REGISTERS. Depends on C and
    dtype only, never on B, D, H or W. (Tests lower MAX_BLOCK_C to exercise the multi-chunk
    paths at small C.)"""
    block_c = min(triton.next_power_of_2(classes), MAX_BLOCK_C[family])
    elements = TILE_ELEMENTS[family] // (2 if acc_dtype == torch.float64 else 1)
    block_p = max(MIN_BLOCK_P, min(MAX_BLOCK_P, elements // block_c))
    tile_w = min(TILE_W, block_p)
    num_warps = NUM_WARPS[family] * max(1, block_c * block_p // elements)
    single_chunk = classes <= block_c
    registers = MAX_REGISTERS[family, single_chunk] * (2 if acc_dtype == torch.float64 else 1)
    return LaunchConfig(block_c, block_p // tile_w, tile_w, num_warps, single_chunk,
                        min(255, registers))


def split_scalar(value):
    """A float as a (hi, lo) pair of float32 values with hi + lo == value to ~2^-48: Triton's
    interpreter passes Python floats to kernels as float32 whatever the annotation, and float64
    kernels need eps, power and weight_base to float64 precision. Kernels rebuild the value with
    :func:`scalar`."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    lo = struct.unpack("f", struct.pack("f", value - hi))[0]
    return hi, lo


@triton.jit
def scalar(hi, lo, ACC: tl.constexpr):
    """The float passed as ``split_scalar(value)``, in ACC precision."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


def needs_wide_index(*spans):
    """Whether offsets *inside one image* can reach 2^30 (half of int32's range, leaving room
    for window offsets past the edge, which are masked but still computed). Each span is the
    largest such offset of one tensor, e.g. sum((size - 1) * |stride|) over its C, H, W axes.
    Image base offsets are int64 regardless (B * C * H * W may exceed 2^31 elements)."""
    return max(spans) >= 2**30


def span(shape, strides):
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides) if n > 0)


@triton.jit
def tile_pixels(tiles_h, tiles_w, planes, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
                WIDE: tl.constexpr):
    """This program's image and depth plane (int64 scalars: their base offsets may exceed 2^31)
    and the (row, column) grid coordinates of its TILE_H x TILE_W pixels, int32 unless WIDE,
    so that every offset inside a plane computed from them stays in range. Programs run over
    (image, plane, tile row, tile column), the tile column fastest; 2-D inputs have one plane."""
    pid = tl.program_id(0).to(tl.int64)
    tile_col = pid % tiles_w
    rest = pid // tiles_w
    tile_row = (rest % tiles_h).to(tl.int32)
    rest = rest // tiles_h
    plane = rest % planes
    image = rest // planes
    lane = tl.arange(0, TILE_H * TILE_W)
    rows = tile_row * TILE_H + lane // TILE_W
    cols = tile_col.to(tl.int32) * TILE_W + lane % TILE_W
    if WIDE:
        rows = rows.to(tl.int64)
        cols = cols.to(tl.int64)
    return image, plane, rows, cols


@triton.jit
def class_lanes(c0, BLOCK_C: tl.constexpr, WIDE: tl.constexpr):
    """Class indices [c0, c0 + BLOCK_C), int64 when WIDE (their offsets may pass 2^31)."""
    cls = c0 + tl.arange(0, BLOCK_C)
    if WIDE:
        cls = cls.to(tl.int64)
    return cls


@triton.jit
def window_weight(dd, du, dv, weight_base, inv_base):
    """omega = weight_base ** (1 - d), d = max(|dd|, |du|, |dv|) (dd = 0 in 2-D), as
    weight_base * inv_base ** d: exact for power-of-two bases (2 at the centre, 1, 1/2, ...),
    within a few ulp otherwise, and no table to copy to the device."""
    d = tl.maximum(tl.maximum(tl.abs(dd), tl.abs(du)), tl.abs(dv))
    w = weight_base
    for _ in range(d):
        w = w * inv_base
    return w


@triton.jit
def power_of(r, e):
    """r ** e for r >= 0 (or NaN, which propagates), with 0 ** 0 == 1."""
    p = tl.exp(e * tl.log(tl.where(r == 0, 1.0, r)))
    return tl.where(r == 0, tl.where(e == 0, 1.0, 0.0), p)

"""What is known about the kernels without Triton: the accumulation dtype, the launch
heuristic, P's storage dtype, scalar passing and index widths. Pure Python, so that the package's
PyTorch path and the benchmark's traffic model import it on machines without Triton."""

import struct

import torch


def accumulation_dtype(dtype):
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32 (the contract's
    "Output dtype and accuracy")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a, b):
    return -(-a // b)


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
    block_c = min(next_power_of_2(classes), MAX_BLOCK_C[family])
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


def needs_wide_index(*spans):
    """Whether offsets *inside one image* can reach 2^30 (half of int32's range, leaving room
    for window offsets past the edge, which are masked but still computed). Each span is the
    largest such offset of one tensor, e.g. sum((size - 1) * |stride|) over its C, H, W axes.
    Image base offsets are int64 regardless (B * C * H * W may exceed 2^31 elements)."""
    return max(spans) >= 2**30


def span(shape, strides):
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides) if n > 0)


def p_dtype(dtype, classes):
    """P's storage dtype for logits of ``dtype`` with ``classes`` classes: the logits' own, P
    being rounded once, as the gradient it becomes is; but the accumulation dtype when the
    forward loops over class chunks, as it parks the pooled logits f in P's slots until their
    logsumexp is known and f in bfloat16 would cost |f| * 2^-9 absolutely (~1% relative error in
    softmax(f)). For bfloat16 logits with C <= 32 (VOC, Cityscapes) it saves a third of the
    backward's peak memory and a fifth of the DRAM traffic, and adds P's rounding to the
    gradient's error: 5.9e-3 of its norm against 1.7e-3 for the PyTorch backend, whose P is
    float32 (``TRITON_INTERPRET=1 python -m bench.agreement --size 33``; the contract allows
    2e-2)."""
    acc = accumulation_dtype(dtype)
    return dtype if launch_config("forward", classes, acc).single_chunk else acc

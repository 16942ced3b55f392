"""What is known about the kernels without Triton: the accumulation dtype, the launch heuristic,
scalar passing, index widths and the loops each kernel runs. Pure Python, so that the package's
PyTorch path and the benchmark's traffic model import it on machines without Triton."""

import re
import struct
from importlib.metadata import PackageNotFoundError, version

import torch


def _has_triton():
    try:
        version("triton")
    except PackageNotFoundError:
        return False
    return True


def accumulation_dtype(dtype):
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32 (the contract's
    "Output dtype and accuracy")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def next_power_of_2(n):
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a, b):
    return -(-a // b)


# Work layout, every kernel: a program is one warp; its 32 lanes hold 32 consecutive pixels of a
# row (W, the contiguous axis of NCHW logits: each load instruction reads 32 consecutive values,
# one 128-B line for float32), and each lane holds every class of its pixel in registers (the
# class tile), so that per neighbour the label, weight and statistics are handled once per pixel
# and the class reductions (logsumexp, the Jacobian's means) stay inside the thread. Classes are
# a compile-time constant: the padded lanes of the class tile (C=21 in a 32-wide tile) fold away
# at compile time, so padding costs registers, not instructions.
#
# Rows: a lane owns `rows` vertically adjacent pixels of its column (stride 1). A window row
# loaded once serves every one of them: per class and pixel, (rows + K - 1) * K / rows loads
# instead of K^2 (11.7 instead of 25 at K=5, rows=3), which is what keeps the stencil's
# instruction count down (python -m bench.kernel_report --model). Each row costs C accumulator
# registers; the counts below are the most that compile without spills (bench/kernel_report.py
# checks C = 19, 21, 150, 1024 and K = 3, 5, 7 under Triton 3.6 and 3.9; a fourth forward row
# spills a few bytes): the backward holds two rows (P, read in its blocked layout, needs no
# pointer per class); Triton 3.6 holds two forward rows and one backward row. With stride > 1
# the windows of neighbouring centres barely overlap: one row. The kernels take any row counts
# (tests force 1 to 4 under the interpreter), so a GPU's measurements can retune this table
# alone.
TILE_W = 32
NUM_WARPS = 1
# Up to CLASS_TILE classes a lane holds all of them; beyond, the kernels loop over chunks of
# CHUNK_TILE classes: the forward pools every chunk twice (once for the logsumexp, once for P),
# the backward three times (the pixels' statistics, the Jacobian's class means, the gradient).
CLASS_TILE = 32
CHUNK_TILE = 16
INTERPRETER_CHUNK_SCALE = 8
# Register caps (maxnreg), each found by bench/kernel_report.py: the ptxas of Triton 3.9 spills
# least when left to choose for the forward (a cap of 255 made it spill more); the backward, and
# every kernel under Triton 3.6 (whose ptxas, left alone, stops at 64 registers and spills
# kilobytes), want the cap.
NEW_PTXAS = tuple(map(int, re.findall(r"\d+", version("triton"))[:2])) >= (3, 9) \
    if _has_triton() else True
FORWARD_MAX_REGISTERS = None if NEW_PTXAS else 255
BACKWARD_MAX_REGISTERS = 255


class LaunchConfig:
    """Block sizes of the forward and backward for one problem."""

    def __init__(self, classes, class_tile, forward_rows, backward_rows, max_registers=None):
        self.classes, self.class_tile = classes, class_tile
        self.max_registers = max_registers
        self.forward_rows, self.backward_rows = forward_rows, backward_rows
        self.single_chunk = classes <= class_tile
        self.chunks = cdiv(classes, class_tile)
        self.tile_w, self.num_warps = TILE_W, NUM_WARPS

    @property
    def launch(self):
        """Launch options of the forward: ``kernel[grid](..., **cfg.launch)``. One stage: the
        kernels' loops hold no tl.dot for the pipeliner to overlap, and the model counts loops as
        written."""
        options = dict(num_warps=self.num_warps, num_stages=1)
        return dict(options, maxnreg=self.max_registers) if self.max_registers else options

    @property
    def backward_launch(self):
        """The backward holds two rows of gradients and the Jacobian's sums: maxnreg=255 keeps
        ptxas from stopping short and spilling."""
        return dict(self.launch, maxnreg=BACKWARD_MAX_REGISTERS)

    def __repr__(self):
        return (f"class_tile={self.class_tile} chunks={self.chunks} "
                f"rows={self.forward_rows}/{self.backward_rows} tile_w={self.tile_w} "
                f"num_warps={self.num_warps}")


# The architecture the launch heuristic plans for when the tensors do not say (CPU tensors under
# the interpreter, meta tensors in bench/kernel_report.py, which sets it per compile target).
DEFAULT_ARCH = 90
TARGET_ARCH = None


def arch_of(tensor):
    """sm_XY as the integer XY: the tensor's CUDA device, else TARGET_ARCH or DEFAULT_ARCH."""
    if TARGET_ARCH is not None:
        return TARGET_ARCH
    if tensor.is_cuda:
        major, minor = torch.cuda.get_device_capability(tensor.device)
        return 10 * major + minor
    return DEFAULT_ARCH


def target_of(tensor):
    """launch_config's arch and interpreted arguments for kernels launched on ``tensor``: CPU
    tensors run under Triton's interpreter unless bench/kernel_report.py plans for a GPU."""
    return dict(arch=arch_of(tensor), interpreted=TARGET_ARCH is None and not tensor.is_cuda)


def launch_config(classes, stride=1, kernel_size=5, acc_dtype=torch.float32, weighted=False,
                  arch=DEFAULT_ARCH, interpreted=False):
    """The one launch heuristic, shared by the forward and the backward (the backward indexes
    the forward's tiles). Depends on C, K, the stride, the accumulation dtype, class weights, the
    architecture and Triton's ptxas (sm_80's and Triton 3.6's spill at fewer rows than sm_90's
    under Triton 3.9), never on B, D, H or W. The row counts are the most that compile without
    spills in bench/kernel_report.py's configurations. Under the interpreter (``interpreted``),
    which pays per operation and program, not per element, and has no registers to run out of:
    4 rows per lane and class chunks INTERPRETER_CHUNK_SCALE times wider, the same code with
    fewer programs and trips (tests/test_fused.py forces the GPUs' row counts and chunks)."""
    classes = int(classes)
    if classes > CLASS_TILE:  # chunks of classes, one row
        chunk = CHUNK_TILE if kernel_size <= 5 else CHUNK_TILE // 2
        # Triton 3.9's ptxas, left to choose, stops at 96 registers and spills 8 B on sm_80.
        return LaunchConfig(classes, chunk * (INTERPRETER_CHUNK_SCALE if interpreted else 1),
                            1, 1, 128 if NEW_PTXAS else FORWARD_MAX_REGISTERS)
    class_tile = next_power_of_2(max(classes, 2))
    if interpreted:  # the fewest programs and chunks; the GPUs' plans are tested explicitly
        return LaunchConfig(classes, class_tile, *((4, 4) if stride == 1 else (1, 1)))
    if acc_dtype == torch.float64:  # registers twice as wide: a quarter of the classes
        return LaunchConfig(classes, min(class_tile, CHUNK_TILE // 2), 1, 1,
                            FORWARD_MAX_REGISTERS)
    if stride > 1:
        rows = (1, 1)
    elif NEW_PTXAS:
        rows = (3 if kernel_size <= 5 else 2, 2)
    else:  # Triton 3.6's ptxas spills at three forward rows (volumes) and two backward rows
        rows = (2, 1)
    if arch < 90:
        rows = (max(1, rows[0] // 2), max(1, rows[1] // 2))
    return LaunchConfig(classes, class_tile, *rows, FORWARD_MAX_REGISTERS)


def split_scalar(value):
    """A float as a (hi, lo) pair of float32 values with hi + lo == value to ~2^-48: Triton's
    interpreter passes Python floats to kernels as float32 whatever the annotation, and float64
    kernels need eps, power and weight_base to float64 precision. Kernels rebuild the value with
    ``tiling.scalar``."""
    hi = struct.unpack("f", struct.pack("f", value))[0]
    lo = struct.unpack("f", struct.pack("f", value - hi))[0]
    return hi, lo


def needs_wide_index(*spans):
    """Whether offsets *inside one image* can reach 2^30 (half of int32's range, leaving room
    for the arithmetic around them). Each span is the largest such offset of one tensor, e.g.
    sum((size - 1) * |stride|) over its C, D, H, W axes. Image base offsets are int64 regardless
    (B * C * H * W may exceed 2^31 elements)."""
    return max(spans) >= 2**30


def span(shape, strides):
    return sum((n - 1) * abs(s) for n, s in zip(shape, strides) if n > 0)

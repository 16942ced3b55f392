"""What is known about the kernels without Triton: the accumulation dtype, the launch heuristic,
scalar passing, index widths and the loops each kernel runs. Pure Python, so that the package's
PyTorch path and the benchmark's traffic model import it on machines without Triton."""

import functools
import re
import struct
from importlib.metadata import PackageNotFoundError, version

import torch


def _triton_version():
    """(major, minor) of the installed Triton, None without one; read from its metadata, so that
    nothing imports Triton to ask (the package's one "is Triton there?" check)."""
    try:
        return tuple(map(int, re.findall(r"\d+", version("triton"))[:2]))
    except PackageNotFoundError:
        return None


TRITON_VERSION = _triton_version()


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
# registers and the forward's unrolled window columns C * K more: ROW_PLANS (below) holds the
# most rows that compile without spills, by C, K and Triton's ptxas. With stride > 1 the windows
# of neighbouring centres barely overlap: one row. The kernels take any row counts (tests force
# 1 to 4 under the interpreter), so a GPU's measurements can retune the table alone.
TILE_W = 32
NUM_WARPS = 1
# Up to CLASS_TILE classes a lane holds all of them; beyond, the kernels loop over chunks of
# CHUNK_TILE classes. The forward pools every chunk once for the logsumexp and parks the pooled
# sums in P's place until it is known, the backward gathers every chunk once for the Jacobian's
# class means and parks G in the gradient's place (a pass over the logits for the pixels'
# statistics comes first); with 16-bit logits, whose P and gradient would round what is parked,
# both pool every chunk a second time instead.
CLASS_TILE = 32
CHUNK_TILE = 16
INTERPRETER_CHUNK_SCALE = 8
# Register cap (maxnreg) of every kernel unless ROW_PLANS sets a lower one: left to choose, ptxas
# stops short of what a lane's rows need and spills (Triton 3.6's at 64 registers, 3.9's at 96 to
# 128 for small C, class chunks and float64); bench/kernel_report.py checks that every plan
# compiles without spills under its cap.
NEW_PTXAS = TRITON_VERSION is None or TRITON_VERSION >= (3, 9)
MAX_REGISTERS = 255


class LaunchConfig:
    """Block sizes and register caps of the forward and backward for one problem."""

    def __init__(self, classes, class_tile, forward_rows, backward_rows, unrolled=True,
                 forward_registers=MAX_REGISTERS, backward_registers=MAX_REGISTERS, halo=False):
        self.classes, self.class_tile = classes, class_tile
        # the window-row kernels (kernels/halo.py) instead of forward's and backward's
        self.halo = halo
        self.forward_registers, self.backward_registers = forward_registers, backward_registers
        self.forward_rows, self.backward_rows = forward_rows, backward_rows
        # the forward's window columns as compile-time offsets; with the window-row kernels,
        # the interpolating backward's centre rows
        self.unrolled = unrolled
        self.single_chunk = classes <= class_tile
        self.chunks = cdiv(classes, class_tile)
        self.tile_w, self.num_warps = TILE_W, NUM_WARPS

    def _launch(self, registers):
        # One stage: the kernels' loops hold no tl.dot for the pipeliner to overlap, and the
        # model counts loops as written.
        return dict(num_warps=self.num_warps, num_stages=1, maxnreg=registers)

    @property
    def forward_launch(self):
        """Launch options of the statistics and the forward."""
        return self._launch(self.forward_registers)

    @property
    def backward_launch(self):
        return self._launch(self.backward_registers)

    def __repr__(self):
        return (f"class_tile={self.class_tile} chunks={self.chunks} "
                f"rows={self.forward_rows}/{self.backward_rows} unrolled={self.unrolled} "
                f"maxnreg={self.forward_registers}/{self.backward_registers} "
                f"tile_w={self.tile_w} num_warps={self.num_warps} halo={self.halo}")


# The architecture the launch heuristic plans for when the tensors do not say (CPU tensors under
# the interpreter, meta tensors in bench/kernel_report.py, which sets it per compile target).
DEFAULT_ARCH = 90
TARGET_ARCH = None


def arch_of(tensor):
    """sm_XY as the integer XY: the tensor's CUDA device, else TARGET_ARCH or DEFAULT_ARCH."""
    if TARGET_ARCH is not None:
        return TARGET_ARCH
    if tensor.is_cuda:
        return _cuda_arch(tensor.get_device())
    return DEFAULT_ARCH


@functools.lru_cache(maxsize=None)
def _cuda_arch(index):
    # Asked once per device: torch's query costs microseconds of host time on every call.
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def target_of(tensor):
    """launch_config's arch and interpreted arguments for kernels launched on ``tensor``: CPU
    tensors run under Triton's interpreter unless bench/kernel_report.py plans for a GPU."""
    return dict(arch=arch_of(tensor), interpreted=TARGET_ARCH is None and not tensor.is_cuda)


# Rows per lane of the forward and the backward for K = 3, 5, 7, by the largest C of one class
# tile (C > 32: chunks of 16 classes, 8 at K = 7), on sm_90, and each kernel's register cap
# (maxnreg). A lane's registers grow with C x (rows + K), and with one-warp programs the warps an
# SM holds (65536 / 32 / registers) are all that hides the loads' latency: fewer rows under a
# lower cap can beat the most rows that fit in 255. The entries are what a GPU measured fastest
# where it was timed, else the most rows that compile without spills (docs/performance.md, "Launch
# plans", has the figures); python -m bench.kernel_report checks every cap spill-free. 0 forward
# rows: the generic window path (one row, run-time loops), which also takes every K > 7.
# Entries: (largest C, forward rows, backward rows[, forward caps, backward caps]), by K = 3, 5, 7.
ROW_PLANS = {
    "3.9": dict(single=[(21, (2, 3, 2), (2, 3, 3), (168, 255, 255), (168, 255, 255)),
                        (24, (3, 2, 0), (3, 3, 1)), (28, (3, 2, 0), (3, 1, 1)),
                        (32, (3, 1, 0), (3, 1, 1))],
                chunks=((2, 2, 2), (2, 2, 2), (168, 216, 255), (255, 255, 255))),
    "3.6": dict(single=[(21, (2, 3, 2), (2, 2, 2), (168, 255, 255), (168, 255, 255)),
                        (24, (3, 2, 1), (2, 2, 1)), (28, (3, 2, 0), (2, 2, 1)),
                        (32, (3, 1, 0), (2, 2, 1))],
                chunks=((2, 2, 2), (2, 2, 2), (168, 168, 255), (255, 255, 255))),
}
MAX_UNROLLED_K = 7

# The window-row kernels (kernels/halo.py) take stride 1, C <= CLASS_TILE (HALO_FLOAT64_CLASSES
# for float64, whose registers are twice as wide) and K <= 7: rows of centres per program (a power
# of 2: a block dimension) and their register caps on sm_90 (largest C, forward, backward): the
# fewest that compile without spills under Triton 3.6 and 3.9, which are also where a GPU timed
# them fastest (docs/performance.md, "Launch plans"). Since their edge window rows are unrolled
# (2026-12-05) the forward needs 144 from C = 24 (8-24 B of spills at 128).
HALO = True
HALO_ROWS = 2
HALO_REGISTERS = ((23, 128, 136), (26, 144, 136), (32, 168, 168))
HALO_FLOAT64_CLASSES = 16
HALO_ROWS_INTERPRETED = 4
# Where they interpolate low-resolution logits (upsample="bilinear"), one table per Triton (3.6,
# the GPU's; 3.9 and later, whose ptxas spills elsewhere), by the largest C: the forward's centre
# rows per tile and its caps, the backward's caps and the output rows it steps at a time (each by
# K = 3, 5, 7), on sm_90; elsewhere the plain kernels' rows, one step row and no caps. The
# backward steps four output rows where that compiles without spills at 255 registers (a step's
# rows gather from the same K + 3 centre rows: two loaded per output row at K = 5, where two
# steps load three; 15% less modelled time at DeepLab-like sizes at 8 warps per SM instead of
# 11-12), else two, else one. The forward takes four centre rows where they compile without
# spills (eight loaded rows per four centre rows instead of twelve: 10-30% less modelled time,
# still issue-bound, at 232 (3.6) and 248 (3.9) registers at C = 21, K = 5), else two. The caps before the centred column pass
# (2026-12-05) were the lowest spill-free ones (steps of 8) that a search found under each
# Triton at 16 x 16 -> 64 x 64 for float32 logits with uint8 and int64 labels and bfloat16
# logits, the two versions' maxima. Since then each version's plans were checked again under
# it, through bench/kernel_report.py's compile path, for every C and K: at 65 x 65 -> 513 x 513
# (float32, int64 labels, odd strides, 8x) and 16 x 16 -> 64 x 64 in bfloat16, and for C = 16-24
# also at 16 x 16 -> 64 x 64 in float32 (uint8 labels, and for most of them int64); four-row
# steps tried at 255 (not at K = 3, where they spilled at every C tried), a spilling cap raised
# by 8 until none spilled, two forward rows where four spilled at 255. ptxas is monotonic
# neither in the cap nor in C: four forward rows at C = 21, K = 5 spill 8 bytes under 3.9 at 232
# (at 65 x 65 -> 513 x 513) and take 240, and none under 3.6; four-row backward steps at K = 5
# compile without spills up to C = 21 under 3.9 but not at C = 8, 12, 16 and 20 under 3.6. The
# binary depends on the upsampling's width scale (the backward's STEPS and SPAN) and on which
# strides are multiples of 16, so other sizes may differ: C = 32, K = 7's backward spilled 16
# bytes at 184 under 3.6 at 8 x 65 x 65 -> 513 x 513 with align_corners=False (the default
# report's size) and takes 192, checked there and at the sizes above under both. Since the
# kernels' fewer instructions of 2026-12-06 (the column pass's flags, factored blends, integer
# Minkowski powers) each version's plans were checked again under it: every C and K at 65 x 65
# -> 513 x 513 (float32, int64 labels) and 16 x 16 -> 64 x 64 in bfloat16 (C = 19 and 21 also
# at 16 x 16 -> 64 x 64 in float32 with uint8 and int64 labels; no longer the other C of 16-24,
# to finish within the session), a spilling cap raised by 8 until none spilled, two forward
# rows (four: the fewer) where four spilled at 255. 3.6's needed only C = 32, K = 3's backward
# at 200; 3.9's needed higher caps at C = 5-24 (mostly in bfloat16) and C = 26, 30, 32, and two
# forward rows at C = 9, 12-16 and 22-23 for K = 7, C = 16 and 22-23 for K = 5; a non-integer
# exponent (2.5: the forward's log and exp, another binary) then spilled only under 3.9 at C = 6,
# K = 7 in bfloat16 (176 -> 184). The kernels of the later 2026-12-06 commits (the label as the
# softmax's reference, the first column's extra steps) were checked again under each version at
# every C and K, at both sizes, the forward with k = 3 and (bfloat16) 2.5: a spilling cap raised
# by 8 until none spilled, two forward rows where four spilled at 255. 3.6 needed only C = 8,
# K = 5's backward at 160; 3.9 needed higher forward caps at C = 4-11 for K = 5 or 7 (up to
# 248) and two forward rows at C = 12, 17 and 21 for K = 5. `python -m bench.kernel_report
# --all-classes` now compiles these variants. No GPU has timed any of them yet.
HALO_UPSAMPLE_PLANS = {
    "3.6": (
        (2, (4, 4, 4), (128, 128, 128), (152, 255, 255), (2, 4, 4)),
        (3, (4, 4, 4), (128, 128, 168), (152, 255, 255), (2, 4, 4)),
        (4, (4, 4, 4), (168, 128, 128), (152, 255, 255), (2, 4, 4)),
        (5, (4, 4, 4), (168, 128, 168), (152, 255, 255), (2, 4, 4)),
        (6, (4, 4, 4), (168, 128, 168), (152, 255, 255), (2, 4, 4)),
        (7, (4, 4, 4), (192, 128, 168), (152, 255, 255), (2, 4, 4)),
        (8, (4, 4, 4), (168, 128, 168), (152, 160, 176), (2, 2, 2)),
        (9, (4, 4, 4), (192, 128, 168), (152, 255, 255), (2, 4, 4)),
        (10, (4, 4, 4), (192, 168, 192), (152, 255, 255), (2, 4, 4)),
        (11, (4, 4, 4), (232, 168, 192), (152, 255, 255), (2, 4, 4)),
        (12, (4, 4, 4), (232, 232, 232), (152, 152, 152), (2, 2, 2)),
        (13, (4, 4, 4), (255, 232, 232), (160, 255, 255), (2, 4, 4)),
        (14, (4, 4, 4), (232, 232, 232), (160, 255, 255), (2, 4, 4)),
        (15, (2, 4, 4), (128, 232, 232), (152, 255, 255), (2, 4, 4)),
        (16, (2, 4, 4), (128, 232, 232), (200, 200, 152), (2, 2, 1)),
        (17, (2, 4, 2), (128, 232, 128), (168, 255, 255), (2, 4, 4)),
        (18, (2, 4, 4), (128, 232, 232), (160, 255, 255), (2, 4, 4)),
        (19, (2, 4, 4), (128, 232, 232), (184, 255, 255), (2, 4, 4)),
        (20, (2, 2, 2), (128, 128, 128), (192, 176, 168), (2, 2, 2)),
        (21, (2, 4, 2), (128, 232, 128), (192, 255, 255), (2, 4, 4)),
        (22, (2, 4, 2), (128, 240, 128), (184, 255, 184), (2, 4, 2)),
        (23, (2, 4, 2), (128, 255, 136), (192, 192, 192), (2, 2, 2)),
        (24, (2, 2, 2), (128, 128, 136), (200, 200, 200), (2, 2, 2)),
        (25, (2, 2, 2), (128, 128, 144), (208, 208, 208), (2, 2, 2)),
        (26, (2, 2, 2), (136, 136, 144), (224, 216, 168), (2, 2, 1)),
        (27, (2, 2, 2), (144, 144, 144), (232, 224, 176), (2, 2, 1)),
        (28, (2, 2, 2), (144, 144, 144), (184, 176, 184), (1, 1, 1)),
        (29, (2, 2, 2), (144, 144, 144), (200, 176, 176), (1, 1, 1)),
        (30, (2, 2, 2), (144, 152, 192), (200, 184, 184), (1, 1, 1)),
        (31, (2, 2, 2), (168, 168, 168), (216, 192, 192), (1, 1, 1)),
        (32, (2, 2, 2), (168, 168, 168), (200, 192, 192), (1, 1, 1)),
    ),
    "3.9": (
        (2, (4, 4, 4), (128, 128, 128), (152, 255, 255), (2, 4, 4)),
        (3, (4, 4, 4), (128, 128, 168), (152, 255, 255), (2, 4, 4)),
        (4, (4, 4, 4), (168, 128, 160), (152, 255, 255), (2, 4, 4)),
        (5, (4, 4, 4), (168, 160, 192), (152, 255, 255), (2, 4, 4)),
        (6, (4, 4, 4), (168, 128, 200), (152, 255, 255), (2, 4, 4)),
        (7, (4, 4, 4), (192, 128, 224), (152, 255, 255), (2, 4, 4)),
        (8, (4, 4, 4), (168, 128, 248), (152, 255, 255), (2, 4, 4)),
        (9, (4, 4, 2), (200, 160, 168), (152, 255, 255), (2, 4, 4)),
        (10, (4, 4, 4), (192, 248, 240), (152, 255, 255), (2, 4, 4)),
        (11, (4, 4, 4), (232, 248, 232), (152, 255, 255), (2, 4, 4)),
        (12, (4, 2, 2), (232, 232, 232), (160, 255, 255), (2, 4, 4)),
        (13, (4, 4, 2), (255, 240, 232), (168, 255, 255), (2, 4, 4)),
        (14, (4, 4, 2), (240, 232, 232), (168, 255, 255), (2, 4, 4)),
        (15, (2, 4, 2), (128, 232, 232), (152, 255, 255), (2, 4, 4)),
        (16, (2, 2, 2), (128, 232, 232), (200, 255, 255), (2, 4, 4)),
        (17, (2, 2, 2), (128, 232, 128), (176, 255, 255), (2, 4, 4)),
        (18, (2, 4, 4), (128, 232, 232), (160, 255, 255), (2, 4, 4)),
        (19, (2, 4, 2), (128, 232, 128), (192, 255, 255), (2, 4, 4)),
        (20, (2, 2, 2), (128, 128, 128), (208, 255, 255), (2, 4, 4)),
        (21, (2, 2, 2), (128, 248, 128), (208, 255, 255), (2, 4, 4)),
        (22, (2, 2, 2), (128, 232, 255), (216, 184, 184), (2, 2, 2)),
        (23, (2, 2, 2), (128, 255, 255), (192, 192, 192), (2, 2, 2)),
        (24, (2, 2, 2), (128, 128, 128), (232, 200, 200), (2, 2, 2)),
        (25, (2, 2, 2), (128, 128, 144), (208, 208, 208), (2, 2, 2)),
        (26, (2, 2, 2), (136, 128, 144), (224, 216, 168), (2, 2, 1)),
        (27, (2, 2, 2), (144, 144, 144), (232, 224, 176), (2, 2, 1)),
        (28, (2, 2, 2), (144, 144, 144), (184, 184, 184), (1, 1, 1)),
        (29, (2, 2, 2), (144, 144, 144), (208, 184, 176), (1, 1, 1)),
        (30, (2, 2, 2), (152, 144, 192), (192, 192, 184), (1, 1, 1)),
        (31, (2, 2, 2), (168, 168, 168), (216, 192, 192), (1, 1, 1)),
        (32, (2, 2, 2), (168, 168, 168), (208, 192, 192), (1, 1, 1)),
    ),
}


def _ptxas(new_ptxas=None):
    """The key of ROW_PLANS and HALO_UPSAMPLE_PLANS for a ptxas (None: the installed Triton's)."""
    return "3.9" if (NEW_PTXAS if new_ptxas is None else new_ptxas) else "3.6"


def upsample_plan(classes):
    """The HALO_UPSAMPLE_PLANS entry of ``classes`` for the installed Triton's ptxas."""
    return next(p for p in HALO_UPSAMPLE_PLANS[_ptxas()] if classes <= p[0])


def _plan(classes, kernel_size, new_ptxas):
    """(forward rows, backward rows, forward cap, backward cap) at stride 1 on sm_90."""
    plans = ROW_PLANS[_ptxas(new_ptxas)]
    if kernel_size > MAX_UNROLLED_K:
        return 0, 1, MAX_REGISTERS, MAX_REGISTERS
    k = (kernel_size - 3) // 2 if kernel_size >= 3 else 0
    if classes > CLASS_TILE:
        entry = plans["chunks"]
    else:
        entry = next(e[1:] for e in plans["single"] if classes <= e[0])
    caps = entry[2:] or ((MAX_REGISTERS,) * 3,) * 2
    return entry[0][k], entry[1][k], caps[0][k], caps[1][k]


def plan_rows(classes, kernel_size, new_ptxas=None):
    """(forward rows, backward rows) at stride 1 on sm_90 from ROW_PLANS."""
    return _plan(classes, kernel_size, new_ptxas)[:2]


def plan_registers(classes, kernel_size, new_ptxas=None):
    """(forward cap, backward cap) of the plan's rows at stride 1 on sm_90 (ROW_PLANS)."""
    return _plan(classes, kernel_size, new_ptxas)[2:]


def launch_config(classes, stride=1, kernel_size=5, acc_dtype=torch.float32, weighted=False,
                  arch=DEFAULT_ARCH, interpreted=False, upsample=False):
    """The one launch heuristic, shared by the forward and the backward (the backward indexes
    the forward's tiles). Depends on C, K, the stride, the accumulation dtype, the architecture
    and Triton's ptxas (ROW_PLANS; sm_80 holds half the rows of sm_90, rounded down, at least
    one; the window-row kernels HALO_ROWS everywhere), and on ``upsample`` (the kernels
    interpolate: on sm_90 the forward's rows and both caps of HALO_UPSAMPLE_PLANS, K = 1 taking
    K = 3's, so the forward's tiles differ (tile_plan is told); the backward's rows are the
    output rows it steps at a time), never on B, D, H or W.
    Under the interpreter (``interpreted``), which pays per operation and program, not per
    element, and has no registers to run out of: 4 rows per lane and class chunks
    INTERPRETER_CHUNK_SCALE times wider, the same code with fewer programs and trips
    (tests/test_fused.py forces the GPUs' row counts, chunks and the generic window path)."""
    classes = int(classes)
    wide = acc_dtype == torch.float64
    if (HALO and stride == 1 and kernel_size <= MAX_UNROLLED_K
            and classes <= min(CLASS_TILE, HALO_FLOAT64_CLASSES if wide else CLASS_TILE)):
        rows, unrolled = HALO_ROWS, True
        caps = next(c[1:] for c in HALO_REGISTERS if classes <= c[0])
        step_rows = None  # interpolating: the output rows the backward steps at a time
        if upsample:
            plan = upsample_plan(classes)
            k = (kernel_size - 3) // 2 if kernel_size >= 3 else 0
            # where compiled without spills: sm_90, registers not twice as wide
            planned = arch == 90 and not wide
            caps, step_rows = (plan[2][k], plan[3][k]), plan[4][k] if planned else 1
            rows = plan[1][k] if planned else rows
            if kernel_size < 3:  # K = 3's rows; its forward caps spill here under Triton 3.6
                caps = (MAX_REGISTERS, caps[1])
        if interpreted:
            rows = HALO_ROWS_INTERPRETED
        if interpreted or arch != 90 or wide:  # wide: registers twice as wide
            caps = (MAX_REGISTERS, MAX_REGISTERS)
        return LaunchConfig(classes, next_power_of_2(max(classes, 2)), rows, step_rows or rows,
                            unrolled, forward_registers=caps[0], backward_registers=caps[1],
                            halo=True)
    chunked = classes > CLASS_TILE
    if chunked:
        class_tile = CHUNK_TILE if kernel_size <= 5 else CHUNK_TILE // 2
    elif acc_dtype == torch.float64:  # registers twice as wide: a quarter of the classes
        class_tile = min(next_power_of_2(max(classes, 2)), CHUNK_TILE // 2)
    else:
        class_tile = next_power_of_2(max(classes, 2))
    # Under the interpreter the fewest programs and chunks (float64 keeps the GPUs' class tile);
    # the GPUs' plans are tested explicitly.
    if interpreted:
        rows = 4 if stride == 1 else 1
        unrolled = kernel_size <= MAX_UNROLLED_K
        return LaunchConfig(classes, class_tile * (INTERPRETER_CHUNK_SCALE if chunked else 1),
                            rows if unrolled else 1, rows, unrolled=unrolled)
    forward, backward = plan_rows(classes, kernel_size)
    # The caps were measured for the plan's rows on sm_90; elsewhere (other rows, float64's
    # registers twice as wide, other GPUs) 255, which the report checks them under.
    caps = plan_registers(classes, kernel_size)
    if stride > 1 or acc_dtype == torch.float64:  # windows barely overlap; wide registers
        forward, backward, caps = min(forward, 1), 1, (MAX_REGISTERS, MAX_REGISTERS)
    if arch < 90:
        forward, backward = forward // 2 if forward > 1 else forward, max(1, backward // 2)
    if arch != 90:
        caps = (MAX_REGISTERS, MAX_REGISTERS)
    return LaunchConfig(classes, class_tile, max(forward, 1), backward, unrolled=forward > 0,
                        forward_registers=caps[0], backward_registers=caps[1])


def tile_grid(cfg, rows, kernel_size, grid):
    """(tiles_h, tiles_w, programs) for tiles of ``rows`` rows over a (B, D, H, W) grid of
    centres or pixels: 32 columns each, or with the window-row kernels 32 - (K - 1), the rest of
    the warp's lanes being the window's halo."""
    batch, depth, height, width = grid
    cols = cfg.tile_w - (kernel_size - 1 if cfg.halo else 0)
    tiles_h, tiles_w = cdiv(height, rows), cdiv(width, cols)
    return tiles_h, tiles_w, batch * depth * tiles_h * tiles_w


@functools.lru_cache(maxsize=256)
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

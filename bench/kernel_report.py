"""Compile every kernel ahead of time for sm_80 and sm_90 and report its resources, or model its
H100 time from the compiled code; needs no GPU.

    python -m bench.kernel_report [--quick] [--json FILE]           # registers, spills, shared
    python -m bench.kernel_report --model [--quick] [--json FILE]   # the performance model

The launch helpers run for real with the kernels replaced by recorders, so both compile exactly
what the dispatcher launches: the same arguments, block sizes and num_warps, with Triton's
launch-time specialisation reproduced (16-byte aligned pointers, ints equal to 1 or divisible by
16 unless marked do_not_specialize). Each cubin goes through the ``cuobjdump`` that Triton's
wheel carries.

Resources: one line per kernel, arch and config, ``regs=N spills=N shared=N`` (spills = local
memory + stack bytes per thread). Configs: the dispatcher's defaults for C in {19, 21, 150,
1024}, K in {3, 5, 7}, float32 and bfloat16 logits, then every other compile-time path once (no
z-score, weight normaliser, no gradient, class weights, stride 2, float64, a 3-D volume, strides
that are multiples of 16). Every binary must compile and spill nothing: exit status 1 otherwise.

Model (``--model``, bench/perf_model.py explains the three bounds): for each workload the whole
loss runs forward and backward through the public API on CPU tensors of the full size, with the
kernels recorded instead of launched and every PyTorch operator outside them recorded too (the
glue). Per kernel launch: programs, warps, registers, spills, SASS instructions one warp
executes (loops times their trip counts), global loads and stores, the design's DRAM bytes, and
the issue-, L1- and DRAM-bound times on an H100; the kernel's time is their maximum. The
workload's modelled time is the sum over kernels, plus the glue's DRAM traffic, plus
``perf_model.LAUNCH_S`` per launch. It is a model: the GPU's own measurement replaces it
whenever one is lent (bench/gpu.py).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from contextlib import contextmanager

# Compiling is the point: the kernels must be JIT functions, not interpreted ones.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import perf_model  # noqa: E402
import lad_triton  # noqa: E402
from lad_triton import dispatch  # noqa: E402
from lad_triton.kernels import backward as kb  # noqa: E402
from lad_triton.kernels import combine as kc  # noqa: E402
from lad_triton.kernels import config as kernel_config  # noqa: E402
from lad_triton.kernels import forward as kf  # noqa: E402
from lad_triton.kernels import halo as kh  # noqa: E402
from lad_triton.kernels import labels as kl  # noqa: E402
from lad_triton.kernels import stats as ks  # noqa: E402
from lad_triton.kernels import upsample as ku  # noqa: E402

ARCHS = (80, 90)
TYPE_CODES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
              torch.float64: "fp64", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16",
              torch.int32: "i32", torch.int64: "i64"}
KERNELS = {"_zscore_stats_kernel": ks, "_forward_kernel": kf, "_combine_kernel": kc,
           "_backward_kernel": kb, "_count_bad_labels_kernel": kl,
           "_halo_forward_kernel": kh, "_halo_backward_kernel": kh, "_tile_scales_kernel": kb,
           "_halo_upsample_backward_kernel": kh, "_upsample_columns_kernel": kh,
           "_column_pass_kernel": ku}


class Recorder:
    """Stands in for a JIT kernel: records ``kernel[grid](*args, **kwargs)`` instead of launching."""

    def __init__(self, name, fn):
        self.name, self.fn, self.calls = name, fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@contextmanager
def recording(arch=90):
    """Replace every kernel by a Recorder and let the fused backend run on any device, planning
    launches for sm_<arch>; yields the list that fills with (name, jit function, grid, args,
    kwargs) in launch order."""
    launches = []
    kernel_config.TARGET_ARCH = arch
    saved = {name: getattr(mod, name) for name, mod in KERNELS.items()}
    unavailable = dispatch.fused_unavailable

    class InOrder(Recorder):
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append((self.name, self.fn, grid, a, k))

    for name, mod in KERNELS.items():
        setattr(mod, name, InOrder(name, saved[name]))
    dispatch.fused_unavailable = lambda logits: None
    try:
        yield launches
    finally:
        for name, mod in KERNELS.items():
            setattr(mod, name, saved[name])
        dispatch.fused_unavailable = unavailable
        kernel_config.TARGET_ARCH = None


def record_launches(classes, dtype, kernel_size, shape=(8, 513, 513), arch=90,
                    labels=torch.uint8, **overrides):
    """The launches of one forward and backward on ``meta`` tensors of spatial ``shape`` ((H, W)
    images or (D, H, W) volumes, batch first) with C = classes, uint8 labels: (kernel name, jit
    function, args, kwargs). Overrides: the loss's options, plus ``need_grad``, ``weighted``
    and ``low``: the logits' (h, w), lower than ``shape``'s, interpolated in the kernels with
    ``align_corners``."""
    options = dict(kernel_size=kernel_size, power=3.0, stride=1, ignore_index=255, eps=1e-5,
                   weight_base=2.0, normalizer="count", zscore=True)
    options.update(overrides)
    need_grad = options.pop("need_grad", True)
    weighted = options.pop("weighted", False)
    low = options.pop("low", None)
    upsample = dict(upsample="bilinear" if low else "",
                    align_corners=options.pop("align_corners", False))
    acc = kf.accumulation_dtype(dtype)
    batch, spatial = shape[0], tuple(shape[1:])
    logits = torch.empty((batch, classes) + tuple(low or spatial), dtype=dtype, device="meta")
    target = torch.empty((batch,) + spatial, dtype=labels, device="meta")
    weight = torch.empty(classes, dtype=acc, device="meta") if weighted else None
    mean = options.pop("reduction", "mean") == "mean"
    backward_options = {k: options[k] for k in ("kernel_size", "stride", "eps", "weight_base",
                                                "zscore")}
    with recording(arch) as launches:
        backward_options["plan"] = kf.tile_plan(logits, kernel_size=options["kernel_size"],
                                                stride=options["stride"], weighted=weighted,
                                                upsample=bool(low))
        kl.count_bad_labels(target, classes, options["ignore_index"])
        L, partials, ticket, P = kf.forward(logits, target, weight, need_grad=need_grad,
                                            mean=mean, **upsample, **options)
        backward_options.update(upsample)
        _, scalars, tile_max = kc.combine(partials, ticket, options["power"], dtype)
        if need_grad and mean:
            kb.backward(tile_max, logits, target, P, weighted=weighted,
                        grad=torch.empty((), dtype=dtype, device="meta"), scalars=scalars,
                        power=options["power"], **backward_options)
        elif need_grad:
            kb.backward(L, logits, target, P, **backward_options)
    return [(name, fn, args, kwargs) for name, fn, _, args, kwargs in launches]


def compile_source(fn, args, kwargs):
    """ASTSource with the signature and specialisation a launch with these arguments gets."""
    signature, constexprs, attrs = {}, {}, {}
    values = dict(zip(fn.arg_names, args))
    values.update({k: v for k, v in kwargs.items() if k in fn.arg_names})
    for index, param in enumerate(fn.params):
        name, value = param.name, values[param.name]
        if param.is_constexpr:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_CODES[value.dtype]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 256-B aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1 and not param.do_not_specialize:
                signature[name], constexprs[name] = "constexpr", 1
                continue
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0 and not param.do_not_specialize:
                attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    # The JIT fuses multiply-adds (Triton 3.6; 3.9 by default too); ASTSource compiles default
    # to no fusion, which would report another binary.
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3),
               "enable_fp_fusion": True}
    if kwargs.get("maxnreg"):
        options["maxnreg"] = kwargs["maxnreg"]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs), options


def cuobjdump(cubin, flag):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, flag, f.name], check=True, capture_output=True,
                              text=True).stdout


def resources(cubin):
    out = cuobjdump(cubin, "--dump-resource-usage")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    regs, stack, shared, local = map(int, found.groups())
    # A per-thread stack frame is local memory too (a register array the compiler could not keep
    # in registers): count it as spilled.
    return dict(regs=regs, stack=stack, shared=shared, spills=local + stack)


_COMPILED = {}


def compiled(fn, args, kwargs, arch):
    """(resources, cubin) of one launch for sm_<arch>, compiled once per distinct binary."""
    src, options = compile_source(fn, args, kwargs)
    key = (src.hash(), str(options), arch)
    if key not in _COMPILED:
        try:
            binary = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
            _COMPILED[key] = (resources(binary.asm["cubin"]), binary.asm["cubin"])
        except Exception as err:  # report every failure, then exit 1
            _COMPILED[key] = (dict(error=f"{type(err).__name__}: {err}"[:300]), None)
    return _COMPILED[key]


def describe(name, args, kwargs):
    shown = {k: v for k, v in kwargs.items()
             if k in ("C", "CLASS_TILE", "ROWS", "UNROLL", "RADIUS", "STRIDE", "TILE_W", "BLOCK",
                      "UPSAMPLE",
                      "num_warps")}
    return " ".join(f"{k}={v}" for k, v in shown.items())


def configs(quick, all_classes=False):
    """(label, C, dtype, K, option overrides, is a dispatcher default). The defaults take the
    edges of config.ROW_PLANS (C = 21, 24, 28, 32); ``all_classes``: every C from 2 to 32 (ptxas
    is not monotonic in C), also interpolating (config.HALO_UPSAMPLE_PLANS) at two sizes, in
    float32 and bfloat16, and with a non-integer Minkowski exponent."""
    classes = (21, 150) if quick else (19, 21, 24, 28, 32, 150, 1024)
    sizes = (5,) if quick else (3, 5, 7)
    for c in range(2, 33) if all_classes else classes:
        for dtype in (torch.float32, torch.bfloat16):
            for k in sizes:
                yield f"C={c} {TYPE_CODES[dtype]} K={k}", c, dtype, k, {}, True
    if all_classes:
        for c in range(2, 33):
            for k in sizes:
                for dtype in (torch.float32, torch.bfloat16):
                    yield (f"C={c} {TYPE_CODES[dtype]} K={k} (16, 16) -> (64, 64)", c, dtype, k,
                           dict(low=(16, 16), shape=(2, 64, 64), align_corners=False), False)
                # another binary: 8x (the backward's STEPS and SPAN), odd strides, int64 labels
                yield (f"C={c} fp32 K={k} (65, 65) -> (513, 513) i64", c, torch.float32, k,
                       dict(low=(65, 65), shape=(2, 513, 513), align_corners=True,
                            labels=torch.int64), False)
                # a non-integer Minkowski exponent: the forward's log and exp, another binary
                # (bfloat16 has spilled where float32 did not)
                yield (f"C={c} bf16 K={k} (16, 16) -> (64, 64) power 2.5", c, torch.bfloat16, k,
                       dict(low=(16, 16), shape=(2, 64, 64), align_corners=False, power=2.5),
                       False)
        return
    for c, low, shape, corners in ((21, (65, 65), (8, 513, 513), True),
                                   (19, (128, 256), (8, 512, 1024), False),
                                   (32, (65, 65), (8, 513, 513), False))[:2 if quick else 3]:
        for dtype in (torch.float32, torch.bfloat16):  # interpolated in the kernels
            for k in (5,) if quick or c != 21 else (3, 5, 7):
                yield (f"C={c} {TYPE_CODES[dtype]} K={k} {low} -> {shape[1:]}", c, dtype, k,
                       dict(low=low, shape=shape, align_corners=corners), False)
    variants = [dict(zscore=False, normalizer="weight"), dict(need_grad=False),
                dict(need_grad=False, zscore=False), dict(weighted=True), dict(stride=2),
                dict(reduction="none"), dict(labels=torch.int64)]
    for c in ((21,) if quick else (19, 21, 1024)):
        for v in variants:
            yield f"C={c} fp32 K=5 {v}", c, torch.float32, 5, v, False
    yield "C=21 fp64 K=5", 21, torch.float64, 5, {}, False
    if not quick:  # one row at strides > 1 and float64: unrolled or generic by C and K
        for c, k in ((28, 5), (32, 7)):
            yield f"C={c} fp32 K={k} stride 2", c, torch.float32, k, dict(stride=2), False
            yield f"C={c} fp64 K={k}", c, torch.float64, k, {}, False
    for c in ((21,) if quick else (21, 150)):  # the generic window path
        yield f"C={c} bf16 K=9", c, torch.bfloat16, 9, {}, False
    for dtype in (torch.float32, torch.bfloat16):
        yield (f"C=14 {TYPE_CODES[dtype]} K=3 3-D (2, 96, 128, 128)", 14, dtype, 3,
               dict(shape=(2, 96, 128, 128)), False)
        # strides that are multiples of 16 (Triton specialises them): another layout to keep
        yield (f"C=19 {TYPE_CODES[dtype]} K=5 (4, 512, 1024)", 19, dtype, 5,
               dict(shape=(4, 512, 1024)), False)


def report(args):
    print(f"triton {triton.__version__}, torch {torch.__version__}; "
          f"logits (8, C, 513, 513), uint8 target")
    rows, failures, binaries = [], 0, set()
    for label, classes, dtype, k, overrides, default in configs(args.quick, args.all_classes):
        # --quick: the other compile-time paths for sm_90 only (the test's time in CI)
        for arch in ARCHS if (default or not args.quick) and not args.all_classes else (90,):
            for name, fn, a, kw in record_launches(classes, dtype, k, arch=arch, **overrides):
                res, _ = compiled(fn, a, kw, arch)
                binaries.add((compile_source(fn, a, kw)[0].hash(), arch))
                block = describe(name, a, kw)
                rows.append(dict(kernel=name, arch=f"sm_{arch}", config=label, default=default,
                                 block=block, **res))
                if "error" in res:
                    failures += 1
                    print(f"{name:22} sm_{arch} {label:34} FAILED {res['error']}")
                    continue
                verdict = "" if res["spills"] == 0 else "  SPILLS"
                failures += res["spills"] > 0
                print(f"{name:22} sm_{arch} {label:34} regs={res['regs']} "
                      f"spills={res['spills']} shared={res['shared']}  {block}{verdict}")
    print(f"{len(binaries)} distinct binaries, {len(rows)} rows, "
          f"{'all compile with zero spills' if not failures else f'{failures} FAILED or spilled'}")
    return dict(triton=triton.__version__, rows=rows), failures


# --- the performance model ------------------------------------------------------------------

# name, (B, C, H, W), K, dtype, the issue's target in ms (None: within 3x of its DRAM time).
WORKLOADS = [
    ("voc", (8, 21, 513, 513), 3, torch.float32, 0.30),
    ("voc", (8, 21, 513, 513), 5, torch.float32, 0.45),
    ("voc", (8, 21, 513, 513), 5, torch.bfloat16, 0.35),
    ("voc", (8, 21, 513, 513), 7, torch.float32, 0.80),
    ("voc", (8, 21, 513, 513), 3, torch.bfloat16, None),
    ("voc", (8, 21, 513, 513), 7, torch.bfloat16, None),
    ("cityscapes", (4, 19, 512, 1024), 5, torch.float32, 0.45),
    ("cityscapes", (4, 19, 512, 1024), 5, torch.bfloat16, None),
    ("ade", (8, 150, 512, 512), 5, torch.bfloat16, "3x DRAM"),
    ("ade", (8, 150, 512, 512), 5, torch.float32, None),
]
# Pointer arguments each kernel streams through DRAM once (read or written); the rest are
# scalars or tables that stay in cache.
STREAMED = {
    "_zscore_stats_kernel": ("x_ptr", "mean_ptr", "rstd_ptr"),
    "_forward_kernel": ("x_ptr", "y_ptr", "mean_ptr", "rstd_ptr", "P_ptr", "L_ptr", "part_ptr"),
    "_combine_kernel": ("part_ptr", "tile_max_ptr"),
    "_count_bad_labels_kernel": ("y_ptr",),
    "_backward_kernel": ("x_ptr", "y_ptr", "P_ptr", "s_ptr", "dx_ptr"),
    "_halo_forward_kernel": ("x_ptr", "y_ptr", "P_ptr", "L_ptr", "part_ptr"),
    "_halo_backward_kernel": ("x_ptr", "y_ptr", "P_ptr", "s_ptr", "dx_ptr"),
    "_tile_scales_kernel": ("tile_max_ptr", "scale_ptr"),
    "_halo_upsample_backward_kernel": ("x_ptr", "y_ptr", "P_ptr", "s_ptr", "stage_ptr",
                                       "above_ptr"),
    "_upsample_columns_kernel": ("stage_ptr", "above_ptr", "dx_ptr"),
    "_column_pass_kernel": ("x_ptr", "out_ptr"),
}
# Operators that move no data (or a handful of bytes on the host's side of the launch).
_NO_TRAFFIC = re.compile(r"^(empty|empty_like|empty_strided|new_empty|new_empty_strided|view|"
                         r"_unsafe_view|as_strided|unsqueeze|squeeze|expand|t|transpose|permute|slice|select|"
                         r"alias|detach|lift_fresh|_to_copy_noop|sym_size|sym_stride|"
                         r"sym_numel|sym_storage_offset|is_same_size|_local_scalar_dense)(\.|$)")


def loop_trips(name, values):
    """The trip counts of a kernel's run-time loops, outermost first in program order (see the
    kernels: depth offsets, column offsets, class chunks; the combine's rounds)."""
    if name == "_combine_kernel":  # the last program: the blocks' maxima, then their sums
        return [values["rounds"]] * 2
    if name in ("_count_bad_labels_kernel", "_tile_scales_kernel"):
        return []
    if name == "_zscore_stats_kernel":
        return [values["chunks"]]
    if name == "_halo_upsample_backward_kernel":
        # In program order: the band's output rows, ROWS per step; in each step the input rows
        # finished before its first row and between its rows (band - 1 a band, shared by the
        # step's rows: loops of one trip or none), and the window rows that reach both; after,
        # a row that ends a band early (align_corners=True rounding: none as a rule). In each
        # flush, its two sums' extra steps (the image's first tile only: a loop each).
        band = min(values["band"], values["H_in"])
        step = values["ROWS"]
        steps = values["H"] * band / values["H_in"] / step
        flushes = (band - 1) / step / steps
        window = 2 * values["RADIUS"] + 1 - min(step - 1, 2 * values["RADIUS"] + 1)
        extra = [values["extra"] / values["tiles"]] * 2
        return ([steps, flushes] + extra + [window] + ([flushes] + extra) * (step - 1)
                + extra + [0] + extra + extra)
    if name in ("_upsample_columns_kernel", "_column_pass_kernel"):  # no loops
        return []
    if name in ("_halo_forward_kernel", "_halo_backward_kernel"):
        # depth offsets (none interpolating: an image); the window rows that reach every
        # centre row (the others and the columns are unrolled; none where the centre rows
        # outnumber the window's: no loop)
        window = 2 * values["RADIUS"] + 2 - min(values["ROWS"], 2 * values["RADIUS"] + 2)
        depth = [] if values.get("UPSAMPLE") else [2 * values["radius_d"] + 1]
        return depth + ([window] if window else [])
    if name == "_forward_kernel" and values["UNROLL"]:
        # depth offsets, window rows (the columns are unrolled)
        window = [2 * values["radius_d"] + 1, values["ROWS"] + 2 * values["radius"]]
    else:
        window = [2 * values["radius_d"] + 1, 2 * values["radius"] + 1]
        if values["ROWS"] == 1:  # one row per lane: the window's rows are a loop too
            window.append(2 * values["radius"] + 1)
    if values["C"] <= values["CLASS_TILE"]:
        return window
    # Class chunks: a second pass over them, which reads back what the first parked where the
    # output holds the accumulation dtype (no window loops), else pools again.
    if name == "_forward_kernel":
        parked = values["P_ptr"].dtype == values["part_ptr"].dtype
        if not values["NEED_P"]:
            return [values["chunks"]] + window
        return [values["chunks"]] + window + [values["chunks"]] + ([] if parked else window)
    if values["ZSCORE"]:  # the pixels' statistics (one loop per row of the lane), 2 passes
        parked = values["dx_ptr"].dtype == values["s_ptr"].dtype
        return ([values["chunks"]] * values["ROWS"] + [values["chunks"]] + window
                + [values["chunks"]] + ([] if parked else window))
    return [values["chunks"]] + window


class GlueRecorder(TorchDispatchMode):
    """Every PyTorch operator the loss runs outside the kernels, with the bytes it touches."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.__name__ if hasattr(func, "__name__") else str(func)
        if not _NO_TRAFFIC.match(name) and getattr(func, "namespace", "") != "lad_triton":
            tensors = [t for t in _flat((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            moved = sum(t.numel() * t.element_size() for t in tensors)
            self.ops.append((str(func), moved))
        return out


def _flat(tree):
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _flat(item)
    elif isinstance(tree, dict):
        for item in tree.values():
            yield from _flat(item)
    else:
        yield tree


def model_workload(shape, kernel_size, dtype, check_target=False, low=None,
                   align_corners=False):
    """(kernel models, glue ops) of one forward + backward of the default loss; ``low``: the
    logits' (h, w) below the target's, with upsample="bilinear"."""
    batch, classes, height, width = shape
    logits = torch.zeros((batch, classes) + tuple(low or (height, width)), dtype=dtype,
                         requires_grad=True)
    target = torch.zeros((batch, height, width), dtype=torch.int64)
    upsample = dict(upsample="bilinear", align_corners=align_corners) if low else {}
    glue = GlueRecorder()
    with recording() as launches, glue:
        loss = lad_triton.locally_adaptive_loss(logits, target, kernel_size=kernel_size,
                                                backend="triton", check_target=check_target,
                                                **upsample)
        # As the benchmark's pass: the gradient returned, not accumulated into .grad (which
        # under a dispatch mode copies it, an artifact of the mode).
        torch.autograd.grad(loss, logits)
    models = []
    for name, fn, grid, args, kwargs in launches:
        values = dict(zip(fn.arg_names, args))
        values.update(kwargs)
        resources_, cubin = compiled(fn, args, kwargs, 90)
        if cubin is None:
            raise RuntimeError(f"{name} does not compile: {resources_['error']}")
        moved, seen = 0, set()
        for arg in STREAMED[name]:
            t = values[arg]
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                moved += t.numel() * t.element_size()
        models.append(perf_model.model_kernel(
            name, cuobjdump(cubin, "--dump-sass"), loop_trips(name, values), grid[0],
            kwargs.get("num_warps", 4), moved, resources_["regs"], resources_["spills"]))
    return models, glue.ops


def model(args):
    rows = []
    workloads = WORKLOADS[:3] if args.quick else WORKLOADS
    print(f"Performance model of one forward + backward on an H100 SXM, read from the sm_90 "
          f"SASS (triton {triton.__version__}): {perf_model.SMS} SMs x {perf_model.SCHEDULERS} "
          f"schedulers x {perf_model.CLOCK_HZ / 1e9:.3f} GHz, L1 {perf_model.L1_BYTES_PER_CLOCK} "
          f"B/clock/SM, DRAM {perf_model.DRAM_BYTES_PER_S / 1e12:.1f} TB/s, "
          f"{perf_model.LAUNCH_S * 1e6:.0f} us per launch; int64 labels; a model, not a "
          "measurement.\n")
    for name, shape, k, dtype, target in workloads:
        kernels, glue = model_workload(shape, k, dtype)
        glue_s = sum(b for _, b in glue) / perf_model.DRAM_BYTES_PER_S
        launches = len(kernels) + len(glue)
        total = sum(m.time_s for m in kernels) + glue_s + launches * perf_model.LAUNCH_S
        dram = sum(m.dram_s for m in kernels) + glue_s
        label = f"{name} {'x'.join(map(str, shape))} K={k} {str(dtype)[6:]}"
        print(f"== {label}: modelled {total * 1e3:.3f} ms (DRAM alone {dram * 1e3:.3f} ms)"
              + (f", target {target if isinstance(target, str) else f'{target} ms'}"
                 if target else ""))
        print(f"   {'kernel':22} {'programs':>8} {'warps':>5} {'regs':>4} {'spill':>5} "
              f"{'instr/warp':>10} {'LDG':>6} {'STG':>5} {'DRAM MB':>8} {'issue us':>8} "
              f"{'L1 us':>7} {'DRAM us':>7}  bound")
        for m in kernels:
            print(f"   {m.name:22} {m.programs:8d} {m.warps:5d} {m.registers:4d} {m.spills:5d} "
                  f"{m.instructions:10d} {m.memory_instructions.get('LDG', 0):6d} "
                  f"{m.memory_instructions.get('STG', 0):5d} {m.dram_bytes / 1e6:8.1f} "
                  f"{m.issue_s * 1e6:8.1f} {m.l1_s * 1e6:7.1f} {m.dram_s * 1e6:7.1f}  {m.bound}")
        print(f"   glue: {len(glue)} PyTorch operators, {sum(b for _, b in glue) / 1e6:.2f} MB"
              + (": " + ", ".join(sorted({op.split('.')[1] if '.' in op else op
                                         for op, _ in glue})) if glue else ""))
        rows.append(dict(workload=name, shape=list(shape), kernel_size=k, dtype=str(dtype)[6:],
                         target=target, modelled_ms=total * 1e3, dram_ms=dram * 1e3,
                         launches=launches, glue=[dict(op=o, bytes=b) for o, b in glue],
                         kernels=[dict(name=m.name, programs=m.programs, warps=m.warps,
                                       registers=m.registers, spills=m.spills,
                                       instructions_per_warp=m.instructions,
                                       memory_instructions=m.memory_instructions,
                                       wavefronts_per_warp=m.wavefronts, loops=m.loops,
                                       dram_bytes=m.dram_bytes, issue_us=m.issue_s * 1e6,
                                       l1_us=m.l1_s * 1e6, dram_us=m.dram_s * 1e6,
                                       bound=m.bound) for m in kernels]))
    print()
    print(summary_table(rows))
    return dict(triton=triton.__version__, torch=torch.__version__,
                constants=dict(sms=perf_model.SMS, schedulers=perf_model.SCHEDULERS,
                               clock_hz=perf_model.CLOCK_HZ,
                               l1_bytes_per_clock=perf_model.L1_BYTES_PER_CLOCK,
                               dram_bytes_per_s=perf_model.DRAM_BYTES_PER_S,
                               launch_s=perf_model.LAUNCH_S), rows=rows), 0


def summary_table(rows):
    """The model's figures as the README shows them: one line per workload."""
    short = {"_zscore_stats_kernel": "stats", "_forward_kernel": "forward",
             "_halo_forward_kernel": "forward", "_combine_kernel": "combine",
             "_backward_kernel": "backward", "_halo_backward_kernel": "backward",
             "_tile_scales_kernel": "scales"}
    lines = ["| workload (fwd+bwd) | modelled | DRAM alone | target | per kernel: time, bound |",
             "|---|---|---|---|---|"]
    for r in rows:
        target = r["target"]
        target = (f"{target} ms" if isinstance(target, float) else
                  f"<= {3 * r['dram_ms']:.2f} ms (3x DRAM)" if target else "-")
        kernels = ", ".join(f"{short.get(k['name'], k['name'])} "
                            f"{max(k['issue_us'], k['l1_us'], k['dram_us']):.0f} us {k['bound']}"
                            for k in r["kernels"])
        shape = "x".join(map(str, r["shape"]))
        lines.append(f"| {r['workload']} {shape} K={r['kernel_size']} {r['dtype']} | "
                     f"{r['modelled_ms']:.3f} ms | {r['dram_ms']:.3f} ms | {target} | {kernels} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="store_true", help="the performance model")
    parser.add_argument("--quick", action="store_true", help="fewer configs or workloads")
    parser.add_argument("--all-classes", action="store_true",
                        help="the default configs for every C from 2 to 32, sm_90 only")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    result, failures = (model if args.model else report)(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

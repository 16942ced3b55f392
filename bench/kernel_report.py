"""Compile every kernel ahead of time for sm_80 and sm_90 and report its resources; needs no GPU.

    python bench/kernel_report.py [--quick] [--json FILE]

The launch helpers run for real on ``meta`` tensors with the kernels replaced by recorders, so
the report compiles exactly what the dispatcher launches: the same arguments, block sizes and
num_warps, with Triton's launch-time specialisation reproduced (16-byte aligned pointers, ints
equal to 1 or divisible by 16 unless marked do_not_specialize). Each cubin goes through the
``cuobjdump --dump-resource-usage`` that Triton's wheel carries; one line per kernel, arch and
config: ``regs=N spills=N shared=N`` (spills = local memory + stack bytes per thread).

Configs: the dispatcher's defaults for C in {19, 21, 150, 1024}, K in {3, 5, 7}, float32 and
bfloat16 logits (K is a runtime argument: the three K share one binary), then every other
compile-time path once (no z-score, weight normaliser, no gradient, class weights, float64, a
3-D volume). Every binary must compile and spill nothing: exit status 1 otherwise.
"""

import argparse
import json
import os
import re
import subprocess
import sys

# Compiling is the point: the kernels must be JIT functions, not interpreted ones.
os.environ["TRITON_INTERPRET"] = "0"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from lad_triton.kernels import backward as kb  # noqa: E402
from lad_triton.kernels import forward as kf  # noqa: E402

ARCHS = (80, 90)
TYPE_CODES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
              torch.float64: "fp64", torch.uint8: "u8", torch.int8: "i8", torch.int16: "i16",
              torch.int32: "i32", torch.int64: "i64"}
KERNELS = {"_zscore_stats_kernel": kf, "_forward_kernel": kf, "_backward_kernel": kb}
DEFAULTS = dict(kernel_size=5, power=3.0, stride=1, ignore_index=255, eps=1e-5, weight_base=2.0,
                normalizer="count", zscore=True)


class Recorder:
    """Stands in for a JIT kernel: records ``kernel[grid](*args, **kwargs)`` instead of launching."""

    def __init__(self, name, fn):
        self.name, self.fn, self.calls = name, fn, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((args, kwargs))


def record_launches(classes, dtype, kernel_size, shape=(8, 513, 513), **overrides):
    """Run the forward and backward launch helpers on meta tensors of spatial ``shape`` ((H, W)
    images or (D, H, W) volumes, batch first) with C = classes; return the recorded launches as
    (kernel name, jit function, args, kwargs). Overrides: the forward's options, plus
    ``need_grad`` and ``weighted``."""
    options = dict(DEFAULTS, kernel_size=kernel_size)
    options.update(overrides)
    need_grad = options.pop("need_grad", True)
    weighted = options.pop("weighted", False)
    acc = kf.accumulation_dtype(dtype)
    recorders = {name: Recorder(name, getattr(mod, name)) for name, mod in KERNELS.items()}
    for name, mod in KERNELS.items():
        setattr(mod, name, recorders[name])
    try:
        batch, spatial = shape[0], tuple(shape[1:])
        logits = torch.empty((batch, classes) + spatial, dtype=dtype, device="meta")
        target = torch.empty((batch,) + spatial, dtype=torch.uint8, device="meta")
        weight = torch.empty(classes, dtype=acc, device="meta") if weighted else None
        L, _, P, mean, rstd = kf.forward(logits, target, weight, need_grad=need_grad, **options)
        if need_grad:
            kb.backward(torch.empty_like(L), logits, target, P, mean, rstd,
                        **{k: options[k] for k in ("kernel_size", "stride", "weight_base",
                                                   "zscore")})
    finally:
        for name, mod in KERNELS.items():
            setattr(mod, name, recorders[name].fn)
    return [(r.name, r.fn, a, k) for r in recorders.values() for a, k in r.calls]


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


def resources(cubin):
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = f"/tmp/lad_triton_report_{os.getpid()}.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([tool, "--dump-resource-usage", path], check=True,
                             capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", out)
    regs, stack, shared, local = map(int, found.groups())
    # A per-thread stack frame is local memory too (a register array the compiler could not keep
    # in registers): count it as spilled.
    return dict(regs=regs, stack=stack, shared=shared, spills=local + stack)


def describe(name, args, kwargs):
    shown = {k: v for k, v in kwargs.items()
             if k in ("BLOCK_C", "TILE_H", "TILE_W", "BLOCK_P", "BLOCK", "num_warps", "maxnreg")}
    flags = {k: v for k, v in kwargs.items() if isinstance(v, bool)}
    return " ".join(f"{k}={v}" for k, v in shown.items()), flags


def configs(quick):
    """(label, C, dtype, K, option overrides, is a dispatcher default)."""
    classes = (21, 150) if quick else (19, 21, 150, 1024)
    sizes = (5,) if quick else (3, 5, 7)
    for c in classes:
        for dtype in (torch.float32, torch.bfloat16):
            for k in sizes:
                yield f"C={c} {TYPE_CODES[dtype]} K={k}", c, dtype, k, {}, True
    variants = [dict(zscore=False, normalizer="weight"), dict(need_grad=False),
                dict(need_grad=False, zscore=False), dict(weighted=True)]
    for c in ((21,) if quick else (21, 1024)):
        for v in variants:
            yield f"C={c} fp32 K=5 {v}", c, torch.float32, 5, v, False
    yield "C=21 fp64 K=5", 21, torch.float64, 5, {}, False
    for dtype in (torch.float32, torch.bfloat16):
        yield (f"C=14 {TYPE_CODES[dtype]} K=3 3-D (2, 96, 128, 128)", 14, dtype, 3,
               dict(shape=(2, 96, 128, 128)), False)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer configs (tests)")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args(argv)
    print(f"triton {triton.__version__}, torch {torch.__version__}; "
          f"logits (8, C, 513, 513), uint8 target")
    compiled, rows, failures = {}, [], 0
    for label, classes, dtype, k, overrides, default in configs(args.quick):
        for name, fn, a, kw in record_launches(classes, dtype, k, **overrides):
            src, options = compile_source(fn, a, kw)
            for arch in ARCHS:
                key = (src.hash(), str(options), arch)
                if key not in compiled:
                    try:
                        binary = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                                options=options)
                        compiled[key] = resources(binary.asm["cubin"])
                    except Exception as err:  # report every failure, then exit 1
                        compiled[key] = dict(error=f"{type(err).__name__}: {err}"[:300])
                res = compiled[key]
                block, flags = describe(name, a, kw)
                row = dict(kernel=name, arch=f"sm_{arch}", config=label, default=default,
                           block=block, **res)
                rows.append(row)
                if "error" in res:
                    failures += 1
                    print(f"{name:26} sm_{arch} {label:34} FAILED {res['error']}")
                    continue
                verdict = "" if res["spills"] == 0 else "  SPILLS"
                failures += res["spills"] > 0
                print(f"{name:26} sm_{arch} {label:34} regs={res['regs']} spills={res['spills']} "
                      f"shared={res['shared']}  {block}{verdict}")
    print(f"{len(compiled)} distinct binaries, {len(rows)} rows, "
          f"{'all compile with zero spills' if not failures else f'{failures} FAILED or spilled'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(triton=triton.__version__, rows=rows), f, indent=1)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())

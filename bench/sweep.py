"""``python -m bench.sweep [--dry-run] [--json FILE]``: the fused kernels' device time under other
launch plans than kernels/config.py's, for retuning ROW_PLANS and the register cap on a GPU.

Each variant forces the forward's and the backward's rows per lane and the register cap
(maxnreg) of every kernel. Registers per lane decide how many warps an SM holds (65536 / 32 /
registers), so the variants trade the rows' saved loads against latency hiding: something the
performance model (bench.kernel_report --model) does not see. Every variant is compiled first,
one process each, in parallel (compiling, not running, is what takes the time); then one process
times them with torch.profiler, per kernel, the mean of ``--repeats`` forward + backward calls.
``--dry-run``: one tiny workload under Triton's interpreter on the CPU, proving the code path.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (workload, shape, K, dtype, [(forward rows, backward rows, maxnreg), ...]); None: the plan's.
# (2, 2, 184): at C = 21, K = 5 two forward rows spill 48 B at 168 registers under Triton 3.6
# (the fastest forward measured, 12 warps per SM) and none at 184 in the default options (10).
ROWS_AND_CAPS = [(1, 1, 96), (1, 1, 128), (1, 1, 168), (1, 1, 255), (2, 2, 128), (2, 2, 168),
                 (2, 2, 184), (2, 2, 255), (3, 3, 168), (3, 3, 255)]
WORKLOADS = [
    ("voc", (8, 21, 513, 513), 5, "float32", [None] + ROWS_AND_CAPS),
    ("voc", (8, 21, 513, 513), 5, "bfloat16", [None] + ROWS_AND_CAPS),
    ("voc", (8, 21, 513, 513), 3, "float32", [None] + ROWS_AND_CAPS),
    # K = 7 measured 2-3x its model on the first visits, its plan never swept.
    ("voc", (8, 21, 513, 513), 7, "float32",
     [None, (1, 1, 168), (1, 1, 255), (1, 2, 255), (2, 1, 255), (2, 2, 168)]),
    ("ade", (8, 150, 512, 512), 5, "bfloat16",
     [None, (1, 1, 96), (1, 1, 128), (1, 1, 168), (2, 2, 128), (2, 2, 168), (2, 2, 255)]),
]
DRY_WORKLOADS = [("tiny", (1, 5, 4, 36), 3, "float32", [None, (2, 1, 255)])]


def force(variant):
    """Make the kernels launch with ``variant`` = (forward rows, backward rows, maxnreg)."""
    from lad_triton.kernels import backward, config, forward

    def launch_config(*args, **kwargs):
        cfg = config.launch_config(*args, **kwargs)  # the plan, never an earlier variant's
        if variant is not None:
            cfg.forward_rows, cfg.backward_rows, cap = variant
            cfg.forward_registers = cfg.backward_registers = cap
            cfg.unrolled = True
        return cfg

    forward.launch_config = backward.launch_config = launch_config


def run_once(shape, kernel_size, dtype, device, seed=0):
    import torch

    import lad_triton

    batch, classes, height, width = shape
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(shape, generator=gen).to(device=device, dtype=getattr(torch, dtype))
    logits.requires_grad_(True)
    target = torch.randint(0, classes, (batch, height, width), generator=gen).to(device)
    return lambda: torch.autograd.grad(lad_triton.locally_adaptive_loss(
        logits, target, kernel_size=kernel_size, backend="triton", check_target=False), logits)


def time_variant(shape, kernel_size, dtype, variant, device, repeats):
    """{kernel name: mean us per forward + backward} and the loss's value, under ``variant``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    force(variant)
    run = run_once(shape, kernel_size, dtype, device)
    grad = run()[0]  # compiles (from the disk cache after the parallel phase)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
        if cuda:
            torch.cuda.synchronize(device)
    times = {e.key: (e.device_time_total if cuda else e.cpu_time_total) / repeats
             for e in prof.key_averages() if e.key.startswith("_") and e.key.endswith("_kernel")}
    return times, float(grad.double().abs().sum())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--only", nargs="+", metavar="NAME-K-DTYPE",
                        help="only these workloads, e.g. voc-7-float32")
    parser.add_argument("--compile-one", help=argparse.SUPPRESS)  # a compile worker: index
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    workloads = DRY_WORKLOADS if args.dry_run else WORKLOADS
    if args.only:
        workloads = [w for w in workloads if f"{w[0]}-{w[2]}-{w[3]}" in args.only]
        if not workloads:
            parser.error(f"--only {' '.join(args.only)}: no such workload")
    jobs = [(w, v) for w in workloads for v in w[4]]
    if args.compile_one is not None:
        (name, shape, k, dtype, _), variant = jobs[int(args.compile_one)]
        force(variant)
        run_once(shape, k, dtype, device)()
        return 0
    if not args.dry_run:  # compile every variant at once, a process each, at most 14 at a time
        start, running, codes = time.monotonic(), [], []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
        for i in range(len(jobs)):
            while len(running) >= max(1, (os.cpu_count() or 2) - 2):
                codes.append(running.pop(0).wait())
            running.append(subprocess.Popen(
                [sys.executable, "-m", "bench.sweep", "--compile-one", str(i)]
                + (["--only", *args.only] if args.only else []), cwd=ROOT, env=env))
        codes += [p.wait() for p in running]
        print(f"sweep: {len(jobs)} variants compiled in {time.monotonic() - start:.0f} s, "
              f"{sum(c != 0 for c in codes)} failed", flush=True)
    rows = []
    for (name, shape, k, dtype, _), variant in jobs:
        try:
            times, check = time_variant(shape, k, dtype, variant, device,
                                        1 if args.dry_run else args.repeats)
            row = dict(workload=name, shape=list(shape), kernel_size=k, dtype=dtype,
                       variant=variant, us=times, total_us=sum(times.values()), check=check)
        except Exception as err:  # a variant that does not compile or run: say so, go on
            row = dict(workload=name, shape=list(shape), kernel_size=k, dtype=dtype,
                       variant=variant, error=f"{type(err).__name__}: {err}"[:500])
        rows.append(row)
        us = row.get("us", {})
        print(f"{name} K={k} {dtype:8} {str(variant or 'plan'):16} "
              + (f"total {row['total_us']:8.1f} us  fwd {us.get('_forward_kernel', 0):7.1f}  "
                 f"bwd {us.get('_backward_kernel', 0):7.1f}  check {row['check']:.6e}"
                 if "us" in row else row["error"]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(device=str(device), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

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

# (workload, shape, K, dtype, [variant, ...]). A variant: None, the plan; "old", the plan of the
# kernels of forward.py and backward.py; (forward rows, backward rows, maxnreg) of those kernels;
# ("halo", forward rows, backward rows, forward maxnreg, backward maxnreg) of kernels/halo.py.
# The first variant of each workload is the reference its gradients are compared with.
HALO_VARIANTS = [("halo", 1, 1, 128, 128), ("halo", 2, 2, 128, 128), ("halo", 2, 2, 168, 128),
                 ("halo", 2, 2, 168, 168), ("halo", 4, 4, 255, 255), ("halo", 1, 2, 128, 128),
                 ("halo", 2, 4, 128, 255)]
WORKLOADS = [
    ("voc", (8, 21, 513, 513), 5, "float32", ["old", (2, 2, 168)] + HALO_VARIANTS),
    ("voc", (8, 21, 513, 513), 5, "bfloat16", ["old"] + HALO_VARIANTS),
    ("voc", (8, 21, 513, 513), 3, "float32", ["old"] + HALO_VARIANTS),
    ("voc", (8, 21, 513, 513), 7, "float32", ["old"] + HALO_VARIANTS),
    ("voc", (8, 21, 513, 513), 3, "bfloat16", ["old", ("halo", 2, 2, 128, 128),
                                               ("halo", 4, 4, 255, 255)]),
    ("cityscapes", (4, 19, 512, 1024), 5, "float32", ["old", ("halo", 1, 1, 128, 128),
                                                      ("halo", 2, 2, 128, 128),
                                                      ("halo", 4, 4, 255, 255)]),
    ("cityscapes", (4, 19, 512, 1024), 5, "bfloat16", ["old", ("halo", 2, 2, 128, 128),
                                                       ("halo", 4, 4, 255, 255)]),
]
DRY_WORKLOADS = [("tiny", (1, 5, 4, 36), 3, "float32",
                  ["old", (2, 1, 255), ("halo", 2, 1, 128, 128)])]


def force(variant):
    """Make the kernels launch with ``variant`` (see WORKLOADS)."""
    from lad_triton.kernels import backward, config, forward

    def launch_config(*args, **kwargs):
        config.HALO = variant is None or (variant != "old" and variant[0] == "halo")
        cfg = config.launch_config(*args, **kwargs)  # the plan, never an earlier variant's
        if variant not in (None, "old"):
            if variant[0] == "halo":
                assert cfg.halo, "the workload does not take the window-row kernels"
                (_, cfg.forward_rows, cfg.backward_rows, cfg.forward_registers,
                 cfg.backward_registers) = variant
            else:
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
    def run():
        loss = lad_triton.locally_adaptive_loss(logits, target, kernel_size=kernel_size,
                                                backend="triton", check_target=False)
        return loss, torch.autograd.grad(loss, logits)[0]

    return run


def time_variant(shape, kernel_size, dtype, variant, device, repeats):
    """{kernel name: mean us per forward + backward} and the loss's value, under ``variant``."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    force(variant)
    run = run_once(shape, kernel_size, dtype, device)
    loss, grad = run()  # compiles (from the disk cache after the parallel phase)
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
    return times, float(loss), grad


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
    rows, reference = [], {}
    for (name, shape, k, dtype, variants), variant in jobs:
        try:
            times, check, grad = time_variant(shape, k, dtype, variant, device,
                                              1 if args.dry_run else args.repeats)
            # Every variant computes the same function: its gradient against the workload's
            # first variant's, relative to its norm (the contract's measure).
            key = (name, shape, k, dtype)
            if variant == variants[0]:
                reference[key] = grad.double()
            ref = reference.get(key)
            grad_err = (float((grad.double() - ref).norm() / ref.norm()) if ref is not None
                        else float("nan"))
            del grad
            row = dict(workload=name, shape=list(shape), kernel_size=k, dtype=dtype,
                       variant=variant, us=times, total_us=sum(times.values()), check=check,
                       grad_err=grad_err)
        except Exception as err:  # a variant that does not compile or run: say so, go on
            row = dict(workload=name, shape=list(shape), kernel_size=k, dtype=dtype,
                       variant=variant, error=f"{type(err).__name__}: {err}"[:500])
        rows.append(row)
        us = row.get("us", {})
        fwd = us.get("_forward_kernel", 0) + us.get("_zscore_stats_kernel", 0) \
            + us.get("_halo_forward_kernel", 0)
        bwd = us.get("_backward_kernel", 0) + us.get("_halo_backward_kernel", 0)
        print(f"{name} K={k} {dtype:8} {str(variant or 'plan'):28} "
              + (f"total {row['total_us']:8.1f} us  fwd+stats {fwd:7.1f}  bwd {bwd:7.1f}  "
                 f"loss {row['check']:.6e}  grad err {row['grad_err']:.1e}"
                 if "us" in row else row["error"]), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(dict(device=str(device), rows=rows), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``python -m bench``: the main job. Times every implementation on the best device present
(``pytest bench/``), measures that device's copy bandwidth in the same run, and prints one
table: rows workload x pass; per implementation the median time, throughput and peak memory;
the ratios of the fused kernels' time to cross-entropy's, the unfused baseline's and its
``torch.compile``d version's; and the fused kernels' efficiencies against the copy bandwidth.
Writes ``<device>-<date>.{json,md,png}`` to ``bench/runs/`` (git-ignored) or ``--out DIR``;
``--save-reference`` writes them to ``bench/results/`` instead, the committed results that
bench/README.md quotes.

    python -m bench [--quick] [--device cuda|cpu] [--run-slow] [--impl NAME ...]
                    [--out DIR | --save-reference]

Columns: ``ms`` median time of one call (CUDA synchronised); ``Mpx/s`` pixels per second;
``MiB`` peak memory the call allocates beyond its inputs (CUDA: max_memory_allocated; CPU: the
profiler's allocation events, see workloads.peak_memory_mib) and in brackets that peak over the
logits' size. ``min eff`` = minimal bytes (logits read once, gradient written once, labels once)
/ time / copy bandwidth; ``design eff`` = the fused kernels' documented DRAM bytes / time / copy
bandwidth.
"""

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import workloads as wl  # noqa: E402

PASS_SHORT = {"forward": "fwd", "forward+backward": "fwd+bwd"}


def environment(device):
    import lad_triton

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{torch.get_num_threads()} torch threads)")
    return dict(device=name, device_type=device.type, torch=torch.__version__,
                triton=triton_version, lad_triton=lad_triton.__version__,
                python=platform.python_version(),
                date=datetime.date.today().isoformat(), **source_commit())


def source_commit():
    """The commit the results come from: $LAD_TRITON_COMMIT where a copy of the checkout was
    sent elsewhere (a lent GPU machine: its copy's git history need not be this one's), else
    git's HEAD and whether tracked files differ from it."""
    if os.environ.get("LAD_TRITON_COMMIT"):
        return dict(commit=os.environ["LAD_TRITON_COMMIT"], dirty=None)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=root, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return dict(commit=None, dirty=None)
    return dict(commit=head or None, dirty=bool(status.strip()) if head else None)


def missing_requirements(device):
    """One line naming what this machine lacks for the suite on ``device``, with the command
    that installs it, or None."""
    import importlib.util

    for module, package in (("pytest", "pytest"), ("pytest_benchmark", "pytest-benchmark")):
        if importlib.util.find_spec(module) is None:
            return (f"{package} is not installed; from the repository: "
                    "pip install -e '.[bench]'")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return ("--device cuda, but this torch sees no CUDA device (torch "
                    f"{torch.__version__}); run on a CUDA machine or drop --device")
        if importlib.util.find_spec("triton") is None:
            return ("Triton is not installed, so the fused kernels cannot be timed: "
                    "pip install -e '.[bench,triton]' (CUDA builds of torch on Linux bring it)")
    return None


def run_suite(args, json_path):
    import lad_triton

    # -qq and --tb=short: the suite prints its own progress line per benchmark (conftest.py);
    # a failure shows its message, not pages of source.
    command = [sys.executable, "-m", "pytest", str(HERE / "test_throughput.py"), "-qq",
               "--tb=short", "-rfE", "-p", "no:cacheprovider", f"--benchmark-json={json_path}",
               f"--device={args.device}", "--benchmark-disable-gc", "--benchmark-quiet",
               "-W", "ignore::DeprecationWarning", "-W", "ignore::UserWarning"]
    command += ["--quick"] if args.quick else []
    command += [f"--impl={impl}" for impl in args.impl or []]
    command += ["--run-slow"] if args.run_slow else []
    # The suite imports the lad_triton this process imported (installed, or this source tree).
    package_parent = str(Path(lad_triton.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (package_parent, os.environ.get("PYTHONPATH")) if p)}
    env.pop("TRITON_INTERPRET", None)
    for name in [n for n in env if n.startswith("PYTEST_XDIST_")]:
        del env[name]  # started from an xdist worker, pytest-benchmark would disable itself
    result = subprocess.run(command, env=env, cwd=HERE.parent)
    # Any exit but 0 fails the run: 1 a failed test (a loss the float64 check refused, see
    # test_throughput.warm_up_and_check), 5 nothing collected (nothing was timed or checked).
    if result.returncode != 0:
        raise SystemExit(f"the benchmark suite failed (exit {result.returncode}"
                         + (": no benchmark collected)" if result.returncode == 5 else ")"))


def rows_from(json_path, bandwidth):
    data = json.loads(Path(json_path).read_text())
    rows = []
    for bench in data["benchmarks"]:
        info, stats = bench["extra_info"], bench["stats"]
        seconds = stats["median"]
        pixels = info["pixels_per_s"] * seconds
        row = dict(info, median_ms=1e3 * seconds, q1_ms=1e3 * stats["q1"],
                   q3_ms=1e3 * stats["q3"], rounds=stats["rounds"],
                   peak_over_logits=info["peak_mem_mib"] / info["logits_mib"],
                   min_bytes_efficiency=info["min_bytes_per_pixel"] * pixels / seconds
                   / 1e9 / bandwidth)
        if info["impl"] == "triton":
            row["design_efficiency"] = (info["design_bytes_per_pixel"] * pixels / seconds / 1e9
                                        / bandwidth)
        rows.append(row)
    return rows


def group_key(row):
    b, c, h, w = row["shape"]
    return (row["workload"], row["kernel_size"], row["dtype"], row["pass"],
            f"{row['workload']} K={row['kernel_size']} {row['dtype']} ({b}x{c}x{h}x{w})")


def grouped(rows):
    """{group_key: {impl: row}}, in the order the tables list them."""
    groups = {}
    for row in rows:
        groups.setdefault(group_key(row), {})[row["impl"]] = row
    return {key: groups[key] for key in sorted(groups, key=lambda k: k[:4])}


def table(rows, skipped):
    """The Markdown table: every implementation and figure (time with its quartiles,
    throughput, peak memory, the fused kernels' ratios and efficiencies)."""
    groups = grouped(rows)
    header = (["workload", "pass"] + list(wl.IMPLS)
              + [name for _, name in RATIOS] + ["min eff", "design eff"])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for key, impls in groups.items():
        cells = [key[4], PASS_SHORT[key[3]]]
        for impl in wl.IMPLS:
            r = impls.get(impl)
            cells.append("-" if r is None else
                         f"{r['median_ms']:.3g} ms (quartiles {r['q1_ms']:.3g}-{r['q3_ms']:.3g}), "
                         f"{r['pixels_per_s'] / 1e6:.3g} Mpx/s, "
                         f"{r['peak_mem_mib']:.0f} MiB ({r['peak_over_logits']:.2g}x)")
        fused = impls.get("triton")
        for other, _ in RATIOS:
            cells.append(f"{fused['median_ms'] / impls[other]['median_ms']:.2f}"
                         if fused and other in impls else "-")
        cells.append(f"{fused['min_bytes_efficiency']:.0%}" if fused else "-")
        cells.append(f"{fused['design_efficiency']:.0%}" if fused else "-")
        lines.append("| " + " | ".join(cells) + " |")
    if skipped:
        lines.append("")
        lines += [f"- {reason}" for reason in sorted(skipped)]
    return "\n".join(lines)


# A spread (interquartile range over the median) above this flags a time as noisy: on a busy
# machine one implementation's rounds can span 25x while another's stay tight, and a median
# alone then ranks them wrongly.
NOISY = 0.2
DTYPE_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
RATIOS = (("cross_entropy", "fused/CE"), ("torch", "fused/torch"),
          ("torch_compile", "fused/compile"), ("interp_triton", "fused/interp"))
# The terminal's column names, short enough for five implementations and three ratios.
SHORT = {"triton": "fused", "torch": "torch", "torch_compile": "compiled",
         "cross_entropy": "CE", "torch_unfold": "unfold", "interp_triton": "interp+f",
         "fused/CE": "f/CE", "fused/torch": "f/torch", "fused/compile": "f/compiled",
         "fused/interp": "f/interp"}


def _unit(largest_ms):
    """The unit in which a row's largest time has at most three digits before the point."""
    if largest_ms < 1:
        return "us", 1e3
    return ("ms", 1.0) if largest_ms < 1000 else ("s", 1e-3)


def _digits(value):
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}" if value >= 1 else f"{value:.2g}"


def terminal_table(rows):
    """The table as the terminal shows it, under 120 columns: per row one unit (us, ms or s)
    and per implementation that ran the median and its spread, +-(q3 - q1) / 2 as a share of
    the median, marked ``!`` above NOISY; the fused kernels' ratios where they ran. The Markdown
    table (:func:`table`) and the PNG keep everything."""
    groups = grouped(rows)
    impls = [i for i in wl.IMPLS if any(i in g for g in groups.values())]
    ratios = [(other, name) for other, name in RATIOS
              if any("triton" in g and other in g for g in groups.values())]
    header = ["workload", "pass", "unit"] + [SHORT[n] for n in impls + [n for _, n in ratios]]
    body, noisy, shapes = [], False, {}
    for key, found in groups.items():
        first = found[next(iter(found))]
        shapes[key[0]] = "x".join(map(str, first["shape"]))
        if first.get("low"):  # logits at a head's resolution
            shapes[key[0]] = "x".join(map(str, first["shape"][:2] + first["low"])) + (
                " -> " + "x".join(map(str, first["shape"][2:])))
        unit, scale = _unit(max(r["median_ms"] for r in found.values()))
        cells = [f"{key[0]} K={key[1]} {DTYPE_SHORT.get(key[2], key[2])}", PASS_SHORT[key[3]],
                 unit]
        for impl in impls:
            r = found.get(impl)
            if r is None:
                cells.append("-")
                continue
            spread = (r["q3_ms"] - r["q1_ms"]) / 2 / r["median_ms"]
            noisy |= spread > NOISY
            cells.append(f"{_digits(r['median_ms'] * scale)} ±{spread:.0%}"
                         + ("!" if spread > NOISY else ""))
        fused = found.get("triton")
        for other, _ in ratios:
            cells.append(f"{fused['median_ms'] / found[other]['median_ms']:.2f}"
                         if fused and other in found else "-")
        body.append(cells)
    widths = [max(len(str(line[i])) for line in [header] + body) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) if i < 3 else cell.rjust(width)
                       for i, (cell, width) in enumerate(zip(line, widths))).rstrip()
             for line in [header] + body]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("B x C x H x W: " + ", ".join(f"{k} {v}" for k, v in shapes.items()))
    lines.append("median ±(q3 - q1) / 2 over the rounds, as a share of the median. fused = triton, "
                 "compiled = torch_compile,")
    lines.append("CE = cross_entropy, unfold = torch_unfold, interp+f = F.interpolate then fused"
                 + (";" if ratios else ""))
    if ratios:
        lines.append("f/CE, f/torch, f/compiled, f/interp: the fused time over theirs")
    if noisy:
        lines.append(f"! WARNING: spread above {NOISY:.0%} of the median (a busy machine?): "
                     "rerun before comparing these medians")
    return "\n".join(lines)


def describe(env, bandwidth):
    """The report's first line; a missing Triton said in words."""
    triton = f"triton {env['triton']}" if env["triton"] else "Triton not installed"
    return (f"device {env['device']}, torch {env['torch']}, {triton}, "
            f"copy bandwidth {bandwidth:.0f} GB/s")


def skipped_reasons(device, args):
    reasons = set()
    for w in wl.workloads():
        for impl in wl.IMPLS:
            reason = wl.unavailable(impl, w, device)
            if reason and not (device.type == "cpu" and w.slow and not args.run_slow):
                reasons.add(f"{impl}: {reason}" if impl != "torch_unfold"
                            else f"{impl} on {w.id}: {reason}")
    if args.impl:
        reasons.add(f"only {', '.join(args.impl)} timed (--impl)")
    if device.type == "cpu" and not args.run_slow:
        reasons.add("full-size workloads (VOC, Cityscapes, ADE20K) are not timed on a CPU "
                    "unless --run-slow")
    return reasons


def cross_entropy_profile(device):
    """Where F.cross_entropy's forward + backward spends its time on the VOC-like fp32 batch:
    CUDA kernels by total time, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    w = wl.Workload("voc", 8, 21, 513, 513, 5, torch.float32, slow=True)
    logits, target = w.inputs(device)
    run = wl.pass_runner(wl.loss_function("cross_entropy", w), logits, target,
                         "forward+backward")
    for _ in range(3):
        run()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize(device)
    kernels = [dict(kernel=e.key, calls=e.count // 5,
                    us_per_call_pass=e.device_time_total / 5)
               for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(kernels, key=lambda k: -k["us_per_call_pass"])[:10]


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install '.[bench]'): no plot")
        return None
    groups = sorted({group_key(r)[:5] for r in rows})
    labels = [f"{g[4].split(' (')[0]} {PASS_SHORT[g[3]]}" for g in groups]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(groups)), 8), sharex=True)
    width = 0.8 / len(wl.IMPLS)
    for i, impl in enumerate(wl.IMPLS):
        by_group = {group_key(r)[:5]: r for r in rows if r["impl"] == impl}
        xs = [j + i * width for j, g in enumerate(groups) if g in by_group]
        if not xs:
            continue
        present = [g for g in groups if g in by_group]
        axes[0].bar(xs, [by_group[g]["pixels_per_s"] / 1e6 for g in present], width,
                    label=impl)
        axes[1].bar(xs, [by_group[g]["peak_over_logits"] for g in present], width, label=impl)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("throughput, Mpx/s (log)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("peak memory / logits size (log)")
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    axes[1].set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axes[0].legend(fontsize=8)
    axes[0].set_title(f"lad_triton benchmarks: {rows[0]['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true",
                        help="K=5, forward+backward, VOC-like (CUDA) or small float32 (CPU), "
                             "fewer rounds")
    parser.add_argument("--impl", action="append", choices=wl.IMPLS,
                        help="time only this implementation (repeatable; default: all)")
    parser.add_argument("--run-slow", action="store_true",
                        help="also the full-size workloads on a CPU")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=str(HERE / "runs"),
                       help="folder for the table, JSON and PNG (default bench/runs, git-ignored)")
    where.add_argument("--save-reference", action="store_true",
                       help="write to bench/results/, the committed results bench/README.md quotes")
    args = parser.parse_args(argv)
    if args.save_reference:
        args.out = str(HERE / "results")
    device = torch.device(args.device)
    problem = missing_requirements(device)
    if problem:
        raise SystemExit(f"python -m bench: {problem}")
    env = environment(device)
    print(", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    bandwidth = wl.copy_bandwidth_gbps(device)
    print(f"copy bandwidth (read + write): {bandwidth:.1f} GB/s", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        json_path = Path(tmp) / "benchmarks.json"
        run_suite(args, json_path)
        rows = rows_from(json_path, bandwidth) if json_path.exists() else []
    if not rows:
        raise SystemExit("no benchmark ran")

    report = dict(environment=env, copy_bandwidth_gbps=bandwidth, quick=args.quick, rows=rows,
                  skipped=sorted(skipped_reasons(device, args)))
    if device.type == "cuda":
        report["cross_entropy_kernels"] = cross_entropy_profile(device)
    text = table(rows, report["skipped"])
    print()
    print(describe(env, bandwidth))
    print(terminal_table(rows))
    print("\n".join(f"- {reason}" for reason in report["skipped"]))
    if "cross_entropy_kernels" in report:
        print("\nF.cross_entropy forward+backward, VOC-like fp32: CUDA kernels per call")
        for k in report["cross_entropy_kernels"]:
            print(f"  {k['us_per_call_pass']:9.1f} us  x{k['calls']}  {k['kernel'][:100]}")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower().split(" (")[0]).strip("-")
    stem = out / f"{slug}-{env['date']}{'-quick' if args.quick else ''}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1))
    stem.with_suffix(".md").write_text(f"{describe(env, bandwidth)}, {env['date']}\n\n{text}\n")
    png = plot(rows, stem.with_suffix(".png"))
    print(f"\nwrote {stem.with_suffix('.json')}, {stem.with_suffix('.md')}"
          + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())

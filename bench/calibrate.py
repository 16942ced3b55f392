"""``python -m bench.calibrate [--quick] [--json FILE] [--markdown FILE]``: the calibrated
performance model (bench/perf_model.py, ``calibrated``) against every kernel time the H200
visits committed under bench/results/. ``--design REV...``: instead, the model (its committed
constants) of those commits' kernels at the issue's target workloads, beside cross-entropy's
measured kernels (docs/performance.md, "Designs judged by the model").

For each committed figure (a kernel's mean device time in one workload under one launch plan)
it rebuilds the binary the GPU ran: the figure's file names the commit whose code ran (FIGURES
below; the visits of 2026-11-26 predate the commit field, so those are read from the history and
checked against the model figures the file itself recorded), that commit's tree is extracted
with ``git archive`` into bench/.calibration-cache/ (ignored), and a worker process run on that
tree forces the sweep's variant with that tree's own ``bench.sweep.force`` and records the
launches with that tree's ``bench.kernel_report.model_workload`` under the installed Triton (run
it with the GPU's Triton, 3.6). The worker keeps each launch's SASS, trip counts, grid, registers
and DRAM bytes on disk, so a second run compiles nothing.

Then it fits two constants (``perf_model.fit``) on the fitted set and reports measured vs
modelled with residuals, fitted and held-out apart. Held out: every figure of the window-row
kernels (_halo_*: designed after the fitted figures were taken; they test whether the model
judges a new design) and every Cityscapes-like figure (a row width of 1024: aligned rows, a
workload the fit never sees). ``--quick``: only figures already cached (no compiling).
``--refit``: the figures' inputs as bench/results/calibration-triton-3.6.json stores them (a
change to the model's formulas, not to the binaries, needs nothing compiled).
"""

import argparse
import base64
import gzip
import hashlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
CACHE = ROOT / "bench" / ".calibration-cache"
sys.path.insert(0, str(ROOT / "bench"))

import perf_model  # noqa: E402

# Committed file -> the commit whose kernels it measured. The 2026-12-04 files say so in their
# env.json; the 2026-11-26 ones are dated from the history (the commit that first carried the
# results, or the code change just before) and checked against the model the file recorded.
FIGURES = {
    "nvidia-h200-2026-11-26-kernels.json": "ecfc24b",
    "nvidia-h200-2026-11-26-sweep.json": "5ba7b62",
    "nvidia-h200-2026-11-26-after-kernels.json": "5ba7b62",
    "nvidia-h200-2026-11-26-2-kernels.json": "be08a88",
    "nvidia-h200-2026-11-26-3-kernels.json": "77fe8ea",
    "nvidia-h200-2026-11-26-3-sweep.json": "77fe8ea",
    "nvidia-h200-2026-12-04-kernels.json": "3b2eec4",
    "nvidia-h200-2026-12-04-sweep.json": "3b2eec4",
    "nvidia-h200-2026-12-04-2-kernels.json": "55f5eb1",
}
# The kernels the model is about: the combine (one program, 3-100 us of launch and atomics) and
# the label check are not pixel-parallel and are left out of fit and table.
KERNELS = ("_zscore_stats_kernel", "_forward_kernel", "_backward_kernel",
           "_halo_forward_kernel", "_halo_backward_kernel")


def held_out(fig):
    return fig["kernel"].startswith("_halo") or fig["workload"] == "cityscapes"


def _key(variant):
    return json.loads(json.dumps(variant))  # tuples -> lists, as the JSON files hold them


def figures(files=FIGURES):
    """Every committed kernel time: dicts of file, commit, workload, shape, K, dtype, variant,
    kernel, measured_us."""
    out = []
    for name, commit in files.items():
        rows = json.loads((RESULTS / name).read_text())["rows"]
        for r in rows:
            if "sweep" in name:
                if "us" not in r:
                    continue
                times, variant = r["us"], _key(r["variant"])
                recorded = None
            else:
                times = {k["kernel"]: k["us"] for k in r["measured"]["lad"]}
                variant = None
                model = r.get("model") or []  # the issue-only model's per-kernel figures
                recorded = {k["name"]: k for k in (model if isinstance(model, list)
                                                   else model.get("kernels", []))}
            for kernel, us in times.items():
                if kernel in KERNELS:
                    out.append(dict(file=name, commit=commit, workload=r["workload"],
                                    shape=r["shape"], kernel_size=r["kernel_size"],
                                    dtype=r["dtype"], variant=variant, kernel=kernel,
                                    measured_us=us,
                                    recorded_issue_us=(recorded or {}).get(kernel, {}).get(
                                        "issue_us")))
    return out


# --- compiling the binaries a figure ran (a worker per commit) --------------------------------

def job_id(commit, shape, k, dtype, variant):
    text = json.dumps([commit, shape, k, dtype, variant])
    return hashlib.sha1(text.encode()).hexdigest()[:16]


# A commit whose kernel report did not know all its kernels yet gets the report of the commit
# that taught it them (e0e2955: the window-row kernels' streamed tensors and trip counts; the
# kernels stay the measured commit's).
REPORT_FROM = {"3b2eec4": "e0e2955"}


def tree(commit):
    """The commit's files, extracted once into the cache."""
    path = CACHE / "trees" / commit
    if not (path / ".done").exists():
        path.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(path)], input=archive, check=True)
        if commit in REPORT_FROM:
            report = subprocess.run(["git", "-C", str(ROOT), "show",
                                     f"{REPORT_FROM[commit]}:bench/kernel_report.py"],
                                    check=True, capture_output=True).stdout
            (path / "bench" / "kernel_report.py").write_bytes(report)
        (path / ".done").write_text(commit)
    return path


WORKER = r'''
import base64, gzip, json, os, sys
os.environ["TRITON_INTERPRET"] = "0"
jobs = json.load(open(sys.argv[1]))
import torch
from bench import kernel_report as kr
sweep = None
try:
    from bench import sweep
except ImportError:
    pass
captured = []
original = kr.perf_model.model_kernel
def capture(name, sass_text, trips, programs, warps, dram_bytes, registers=0, spills=0):
    m = original(name, sass_text, trips, programs, warps, dram_bytes, registers, spills)
    captured.append(dict(name=name, trips=list(trips), programs=programs, warps=warps,
                         dram_bytes=dram_bytes, registers=registers, spills=spills,
                         recorded_issue_us=m.issue_s * 1e6,
                         sass=base64.b64encode(gzip.compress(sass_text.encode())).decode()))
    return m
kr.perf_model.model_kernel = capture
for job in jobs:
    variant = job["variant"]
    if variant is not None:
        variant = tuple(variant) if variant != "old" else variant
    if sweep is not None:
        sweep.force(variant)
    captured.clear()
    try:
        kr.model_workload(tuple(job["shape"]), job["kernel_size"], getattr(torch, job["dtype"]))
        out = dict(launches=list(captured))
    except Exception as err:
        import traceback
        out = dict(error=f"{type(err).__name__}: {err}"[:500], where=traceback.format_exc()[-1500:])
    with open(job["out"], "w") as f:
        json.dump(out, f)
    print(job["label"], "error" if "error" in out else "ok", flush=True)
'''


def compile_jobs(jobs, python, log=print):
    """Run the worker once per commit on its pending jobs (one process at a time: the machine's
    cores are shared)."""
    by_commit = {}
    for job in jobs:
        if not Path(job["out"]).exists():
            by_commit.setdefault(job["commit"], []).append(job)
    for commit, pending in by_commit.items():
        path = tree(commit)
        (CACHE / "worker.py").write_text(WORKER)
        spec = CACHE / f"jobs-{commit}.json"
        spec.write_text(json.dumps(pending))
        start = time.monotonic()
        log(f"calibrate: compiling {len(pending)} workloads at {commit}")
        env = {**os.environ, "PYTHONPATH": str(path), "TRITON_INTERPRET": "0"}
        subprocess.run([python, str(CACHE / "worker.py"), str(spec)], cwd=path, env=env,
                       check=False)
        log(f"calibrate: {commit} took {time.monotonic() - start:.0f} s")


def load_job(job):
    path = Path(job["out"])
    return json.loads(path.read_text()) if path.exists() else None


# --- the model's inputs from a launch ---------------------------------------------------------

def inputs(launch, fig):
    """The calibrated model's inputs (perf_model.Inputs) of one recorded launch."""
    sass = gzip.decompress(base64.b64decode(launch["sass"])).decode()
    instrs = perf_model.parse_sass(sass)
    counts = perf_model.executed_counts(instrs, launch["trips"])
    width = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}[fig["dtype"]]
    radius = fig["kernel_size"] // 2
    row = fig["shape"][-1]
    # The old kernels load each column shift from centres whose tile starts on a multiple of
    # 32 columns; the window-row kernels load each window row once from a start shifted by the
    # halo, at a tile step of 32 - (K - 1) columns: any offset.
    if launch["name"].startswith("_halo"):
        passes = perf_model.l1_passes(row, width, None)
    else:
        passes = perf_model.l1_passes(row, width, range(-radius, radius + 1))
    return perf_model.inputs_from_sass(instrs, counts, launch["programs"], launch["warps"],
                                       launch["registers"], launch["dram_bytes"], passes,
                                       launch["spills"])


def build(python, quick=False, log=print):
    figs = figures()
    jobs = {}
    for f in figs:
        jid = job_id(f["commit"], f["shape"], f["kernel_size"], f["dtype"], f["variant"])
        f["job"] = jid
        jobs[jid] = dict(commit=f["commit"], shape=f["shape"], kernel_size=f["kernel_size"],
                         dtype=f["dtype"], variant=f["variant"], out=str(CACHE / f"{jid}.json"),
                         label=f"{f['commit']} {f['workload']} K={f['kernel_size']} "
                               f"{f['dtype']} {f['variant']}")
    CACHE.mkdir(parents=True, exist_ok=True)
    if not quick:
        compile_jobs(list(jobs.values()), python, log)
    rows, missing = [], []
    for f in figs:
        done = load_job(jobs[f["job"]])
        launches = [] if done is None or "error" in done else \
            [l for l in done["launches"] if l["name"] == f["kernel"]]
        if not launches:
            missing.append(dict(f, why=(done or {}).get("error", "not compiled")))
            continue
        launch = launches[0]
        f["inputs"] = inputs(launch, f)
        f["registers"], f["spills"] = launch["registers"], launch["spills"]
        f["code_check"] = (None if f["recorded_issue_us"] is None else
                           abs(launch["recorded_issue_us"] / f["recorded_issue_us"] - 1) < 0.01)
        rows.append(f)
    return rows, missing


# --- the fit and the report -------------------------------------------------------------------

def report(rows, missing, fit, elapsed):
    lines = []
    p = fit["params"]
    for part, keep in (("fitted", False), ("held out", True)):
        subset = [r for r in rows if held_out(r) == keep]
        res = [r["residual"] for r in subset]
        if res:
            lines.append(f"{part}: {len(subset)} figures, |residual| median "
                         f"{statistics.median(abs(x) for x in res):.1%}, worst "
                         f"{max(res, key=abs):+.1%}, within 25%: "
                         f"{sum(abs(x) <= 0.25 for x in res)}/{len(res)}")
    head = (f"Calibrated model ({fit['n']} fitted figures, {len(rows) - fit['n']} held out, "
            f"{len(missing)} not rebuilt): latency {p.latency_cycles:.0f} cycles per memory "
            f"round, issue efficiency {p.issue_efficiency:.2f}; H200 {perf_model.H200.sms} SMs "
            f"x {perf_model.H200.schedulers} schedulers x {perf_model.H200.clock_hz / 1e9:.2f} "
            f"GHz, DRAM {perf_model.H200.dram_bytes_per_s / 1e12:.1f} TB/s (not fitted). "
            f"Residual = modelled / measured - 1. Built in {elapsed:.0f} s.")
    table = ["| set | file | workload | K | dtype | variant | kernel | regs | warps/SM | "
             "rounds/warp | L1 passes | measured us | modelled us | residual | bound |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (held_out(r), r["kernel"], r["workload"],
                                         r["kernel_size"], r["dtype"], r["file"])):
        i = r["inputs"]
        variant = "plan" if r["variant"] is None else (
            "old" if r["variant"] == "old" else ",".join(map(str, r["variant"])))
        table.append(
            f"| {'held out' if held_out(r) else 'fitted'} | {r['file'][12:-5]} | "
            f"{r['workload']} | {r['kernel_size']} | {r['dtype']} | {variant} | "
            f"{r['kernel'].strip('_').replace('_kernel', '')} | {r['registers']}"
            f"{' (spills)' if r['spills'] else ''} | {i.warps_per_sm} | {i.rounds} | "
            f"{i.l1_passes:.2f} | {r['measured_us']:.1f} | {r['modelled_us']:.1f} | "
            f"{r['residual']:+.1%} | {r['bound']} |")
    notes = [f"- not rebuilt: {m['file']} {m['workload']} K={m['kernel_size']} {m['dtype']} "
             f"{m['variant']} {m['kernel']}: {m['why'][:120]}" for m in missing]
    checks = [r for r in rows if r["code_check"] is not None]
    notes.append(f"- code check: {sum(r['code_check'] for r in checks)}/{len(checks)} figures "
                 "whose file recorded the issue-only model at the time give the same issue time "
                 "from the rebuilt binary (within 1%)")
    return "\n".join([head, ""] + lines + [""] + table + [""] + notes) + "\n"


def stored(path=RESULTS / "calibration-triton-3.6.json"):
    """(rows, missing) as a committed run stored them, each figure with the model's inputs read
    from its binary: a change to the model's formula refits from them without compiling."""
    done = json.loads(Path(path).read_text())
    fields = perf_model.Inputs.__dataclass_fields__
    rows = [dict(r, inputs=perf_model.Inputs(**{k: v for k, v in r["inputs"].items()
                                                if k in fields})) for r in done["rows"]]
    return rows, done["missing"]


def run(args):
    start = time.monotonic()
    rows, missing = stored() if args.refit else build(args.python, args.quick)
    fitted = [r for r in rows if not held_out(r)]
    params = perf_model.fit([r["inputs"] for r in fitted], [r["measured_us"] * 1e-6
                                                             for r in fitted])
    for r in rows:
        t = perf_model.calibrated(r["inputs"], params)
        r["modelled_us"] = t.time_s * 1e6
        r["bound"] = t.bound
        r["residual"] = r["modelled_us"] / r["measured_us"] - 1
    fit = dict(params=params, n=len(fitted))
    text = report(rows, missing, fit, time.monotonic() - start)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    if args.json:
        out = dict(constants=dict(latency_cycles=params.latency_cycles,
                                  issue_efficiency=params.issue_efficiency,
                                  **{k: getattr(perf_model.H200, k)
                                     for k in perf_model.H200.__dataclass_fields__}),
                   rows=[{k: (v.__dict__ if k == "inputs" else v) for k, v in r.items()}
                         for r in rows], missing=missing)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


# --- a design judged by the fitted model --------------------------------------------------------

# The issue's target workloads, and the visit whose F.cross_entropy times they are set against.
DESIGN_WORKLOADS = [("voc", (8, 21, 513, 513), k, d) for k in (3, 5, 7)
                    for d in ("float32", "bfloat16")] + [
    ("cityscapes", (4, 19, 512, 1024), 5, "float32"),
    ("cityscapes", (4, 19, 512, 1024), 5, "bfloat16"),
    ("ade", (8, 150, 512, 512), 5, "float32"), ("ade", (8, 150, 512, 512), 5, "bfloat16")]
CROSS_ENTROPY_FROM = "nvidia-h200-2026-12-04-2-kernels.json"


def cross_entropy_us():
    """(workload, K, dtype) -> F.cross_entropy's forward + backward, kernels and one synced call,
    as the last visit measured them."""
    out = {}
    for r in json.loads((RESULTS / CROSS_ENTROPY_FROM).read_text())["rows"]:
        m = r["measured"]
        out[(r["workload"], r["kernel_size"], r["dtype"])] = (
            sum(k["us"] for k in m["cross_entropy"]), m["cross_entropy_call_us"])
    return out


def design(revs, python, log=print):
    """The fitted model's per-kernel times for each commit in ``revs`` at DESIGN_WORKLOADS."""
    constants = json.loads((RESULTS / "calibration-triton-3.6.json").read_text())["constants"]
    params = perf_model.Params(constants["latency_cycles"], constants["issue_efficiency"])
    CACHE.mkdir(parents=True, exist_ok=True)
    commits = [subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=7", rev], check=True,
                              capture_output=True, text=True).stdout.strip() for rev in revs]
    jobs = []
    for commit in commits:
        for name, shape, k, dtype in DESIGN_WORKLOADS:
            jid = job_id(commit, list(shape), k, dtype, None)
            jobs.append(dict(commit=commit, shape=list(shape), kernel_size=k, dtype=dtype,
                             variant=None, out=str(CACHE / f"{jid}.json"), workload=name,
                             label=f"{commit} {name} K={k} {dtype}"))
    compile_jobs(jobs, python, log)
    ce = cross_entropy_us()
    lines = [f"Calibrated model (L = {params.latency_cycles:.0f} cycles, issue efficiency "
             f"{params.issue_efficiency:.3f}, bench/results/calibration-triton-3.6.json) of each "
             f"commit's kernels; F.cross_entropy measured on the H200 ({CROSS_ENTROPY_FROM}).", "",
             "| commit | workload | K | dtype | kernel | registers | modelled us | bound |",
             "|---|---|---|---|---|---|---|---|"]
    totals = []
    for job in jobs:
        done = load_job(job)
        if done is None or "error" in done:
            lines.append(f"| {job['commit']} | {job['workload']} | {job['kernel_size']} | "
                         f"{job['dtype']} | (did not compile: {(done or {}).get('error')}) |||")
            continue
        fig = dict(dtype=job["dtype"], kernel_size=job["kernel_size"], shape=job["shape"])
        total = 0.0
        for launch in done["launches"]:
            if launch["name"] not in KERNELS:
                continue
            t = perf_model.calibrated(inputs(launch, fig), params)
            total += t.time_s * 1e6
            lines.append(f"| {job['commit']} | {job['workload']} | {job['kernel_size']} | "
                         f"{job['dtype']} | {launch['name']} | {launch['registers']} | "
                         f"{t.time_s * 1e6:.0f} | {t.bound} |")
        totals.append((job, total))
    lines += ["", "| commit | workload | K | dtype | kernels, modelled us | F.cross_entropy "
              "kernels us | one call us | ratio of kernels |", "|---|---|---|---|---|---|---|---|"]
    for job, total in totals:
        kernels, call = ce.get((job["workload"], job["kernel_size"], job["dtype"]), (None, None))
        ratio = "-" if kernels is None else f"{total / kernels:.2f}x"
        lines.append(f"| {job['commit']} | {job['workload']} | {job['kernel_size']} | "
                     f"{job['dtype']} | {total:.0f} | "
                     f"{'-' if kernels is None else f'{kernels:.0f}'} | "
                     f"{'-' if call is None else f'{call:.0f}'} | {ratio} |")
    lines += ["", "The combine (one launch of a few microseconds) and the host's time are not in "
              "the kernels' sum; F.cross_entropy's kernels include its fills."]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json")
    parser.add_argument("--markdown")
    parser.add_argument("--quick", action="store_true", help="only figures already compiled")
    parser.add_argument("--refit", action="store_true",
                        help="refit from the inputs the committed JSON stores (no compiling)")
    parser.add_argument("--python", default=sys.executable,
                        help="the interpreter whose Triton compiles (the GPU ran 3.6)")
    parser.add_argument("--design", nargs="+", metavar="REV",
                        help="instead: model these commits' kernels at the target workloads "
                             "with the committed constants")
    args = parser.parse_args(argv)
    if args.design:
        text = design(args.design, args.python)
        print(text)
        if args.markdown:
            Path(args.markdown).write_text(text)
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())

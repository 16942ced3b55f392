"""``python -m bench.gpu STAGE --out DIR``: every GPU measurement this project needs, in stages
that each fit a ten-minute command on a bare CUDA machine (installs nothing; run from the
checkout), each writing its results into DIR as soon as it ends, so that a visit cut short
still returns what it measured:

    python -m bench.gpu env --out DIR       # GPU, driver, torch, Triton, 1 GiB copy bandwidth
    python -m bench.gpu tests --out DIR     # the test suite compiled on the GPU (budgeted)
    python -m bench.gpu bench --out DIR     # python -m bench on CUDA: every workload and impl
    python -m bench.gpu kernels --out DIR   # each fused kernel measured beside the model, and
                                            # low-resolution logits three ways
    python -m bench.gpu all --out DIR       # env, the first tests, kernels, bench, the rest of
                                            # the tests, in one --deadline; then DIR/summary.md
    python -m bench.gpu ingest DIR          # here, afterwards: DIR into bench/results/ + bench/README.md

DIR receives at most seven plain files: env.json, tests.json, tests.xml (junit), bench.json,
bench.md, kernels.json, summary.md. ``--dry-run`` runs every stage's code path on the CPU (tiny
shapes, the PyTorch backend, the interpreter for the kernels), so that the script is proven
while no GPU is lent (tests/test_gpu_script.py).
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("env", "tests", "bench", "kernels")
# The tests that say whether the kernels are right on this GPU run first; the rest after, in
# what is left of the stage's budget.
FIRST_TESTS = ["tests/test_fused.py", "tests/test_cuda_graphs.py", "tests/test_precision.py",
               "tests/test_reference.py", "tests/test_compile.py", "tests/test_amp.py",
               "tests/test_validation.py"]
# --dry-run: one file each way, enough to run the path.
DRY_TESTS = (["tests/test_module.py"],
             ["tests/test_validation.py::test_bad_option_raises_value_error"])
# Beside the suite, what only a GPU at full size shows (GPU-only: on a CPU only their dry runs
# have run): the fused loss and gradient against the float64 F.unfold reference at the VOC-like
# benchmark size, and 20 calls bitwise equal plus the PyTorch backend on CUDA tensors
# (bench/repeat_check.py). (name, arguments, --dry-run's arguments.)
CHECKS = (("agreement", ["-m", "bench.agreement", "--batch", "8", "--size", "513"],
           ["-m", "bench.agreement", "--batch", "1", "--size", "20", "--classes", "5"]),
          ("repeat_check", ["-m", "bench.repeat_check"], ["-m", "bench.repeat_check",
                                                           "--dry-run"]))
# The fused kernels as the profiler names them (Triton launches a kernel under its function's
# name), in launch order.
FUSED_KERNELS = ("_count_bad_labels_kernel", "_zscore_stats_kernel", "_forward_kernel",
                 "_halo_forward_kernel", "_combine_kernel", "_tile_scales_kernel",
                 "_backward_kernel", "_halo_backward_kernel")


def child_env(dry_run):
    """This checkout first on the path; the interpreter only where there is no GPU."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p), "PYTHONUNBUFFERED": "1"}
    env.pop("TRITON_INTERPRET", None)
    for name in [n for n in env if n.startswith("PYTEST_")]:
        del env[name]  # run from a pytest-xdist worker, the children would think they are one
    if dry_run:
        env["TRITON_INTERPRET"] = "1"
    return env


def write_json(path, data):
    path.write_text(json.dumps(data, indent=1, default=str))
    print(f"wrote {path}", flush=True)


def stage_env(out, dry_run):
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    import workloads as wl
    from bench.__main__ import environment

    device = torch.device("cpu" if dry_run else "cuda")
    info = environment(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(capability=f"sm_{props.major}{props.minor}", sms=props.multi_processor_count,
                    memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,"
                              "clocks.max.mem,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=60)
        info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        info["nvidia_smi"] = f"not available: {err}"
    info["copy_bandwidth_gbps"] = wl.copy_bandwidth_gbps(device, mib=16 if dry_run else 1024)
    write_json(out / "env.json", info)
    return info


def _run_until(command, budget_s, env):
    """Run command, interrupted (SIGINT to its process group, as a terminal's Ctrl-C) when
    budget_s runs out so that pytest still writes what it has; killed 60 s later.
    (exit code or 'timeout', seconds)."""
    start = time.monotonic()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, start_new_session=True)
    try:
        code = proc.wait(timeout=max(1.0, budget_s))
    except subprocess.TimeoutExpired:
        code = "timeout"
        _signal_group(proc, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    finally:  # interrupted here: leave no workers behind in their own session
        if proc.poll() is None:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    return code, time.monotonic() - start


def _signal_group(proc, sig):
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:  # ended meanwhile
        pass


def _pytest(files, junit, budget_s, dry_run):
    """One pytest run, interrupted at budget_s. On a GPU machine, workers compile in parallel:
    compiling the kernels, not running them, is what takes a GPU test run's time."""
    command = [sys.executable, "-m", "pytest", *files, "-q", "-rfE", "--tb=short",
               "-p", "no:cacheprovider", f"--junitxml={junit}"]
    if not dry_run:
        command += ["-n", str(max(1, min(12, (os.cpu_count() or 2) - 2)))]
    return _run_until(command, budget_s, child_env(dry_run))


def run_check(name, args, budget_s, dry_run, folder):
    """One of CHECKS, its output kept (the last 4000 characters) for the summary."""
    log = folder / f"{name}.log"
    with open(log, "w") as sink:
        start = time.monotonic()
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=child_env(dry_run),
                                stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(timeout=max(1.0, budget_s))
        except subprocess.TimeoutExpired:
            code = "timeout"
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
    return dict(part=name, command=" ".join(["python", *args]), exit=code,
                seconds=round(time.monotonic() - start, 1),
                output=log.read_text(errors="replace")[-4000:])


def stage_tests(out, dry_run, budget_s, parts=("first", "checks", "rest")):
    """The suite in two parts, the kernels' own tests first (and within each part the slowest
    first: tests/conftest.py's SLOW_FIRST), then CHECKS, then the rest; a later call with
    parts=("rest",) adds to what an earlier one wrote. A part the budget leaves no time for is
    recorded as not started, one cut by it as "timeout": the summary says so."""
    every = dict(zip(("first", "rest"), DRY_TESTS if dry_run else (
        FIRST_TESTS, sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                            if str(p.relative_to(ROOT)) not in FIRST_TESTS))))
    merged, runs = ET.Element("testsuites"), []
    if parts[0] != "first" and (out / "tests.json").exists():
        merged = ET.parse(out / "tests.xml").getroot()
        runs = json.loads((out / "tests.json").read_text())["runs"]
    with tempfile.TemporaryDirectory() as tmp:
        deadline = time.monotonic() + budget_s
        for name in parts:
            if time.monotonic() >= deadline - 5:
                names = [c[0] for c in CHECKS] if name == "checks" else [name]
                runs += [dict(part=n, exit="not started", seconds=0) for n in names]
                continue
            if name == "checks":
                for check, args, dry_args in CHECKS:
                    left = deadline - time.monotonic()
                    runs.append(run_check(check, dry_args if dry_run else args, left, dry_run,
                                          Path(tmp)) if left > 5 else
                                dict(part=check, exit="not started", seconds=0))
                continue
            files = every[name]
            junit = Path(tmp) / f"{name}.xml"
            code, seconds = _pytest(files, junit, deadline - time.monotonic(), dry_run)
            run = dict(part=name, files=files, exit=code, seconds=round(seconds, 1))
            if junit.exists():
                root = ET.parse(junit).getroot()
                suites = [root] if root.tag == "testsuite" else list(root)
                for suite in suites:
                    suite.set("name", name)
                    merged.append(suite)
                    for key in ("tests", "failures", "errors", "skipped"):
                        run[key] = run.get(key, 0) + int(suite.get(key, 0))
            runs.append(run)
    failed = [f"{case.get('classname')}::{case.get('name')}: "
              f"{(case[0].get('message') or '')[:300]}"
              for case in merged.iter("testcase")
              if len(case) and case[0].tag in ("failure", "error")]
    ET.ElementTree(merged).write(out / "tests.xml", encoding="utf-8", xml_declaration=True)
    result = dict(budget_s=budget_s, runs=runs, failed=failed)
    write_json(out / "tests.json", result)
    return result


def stage_bench(out, dry_run, budget_s=None, quick=False):
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "bench", "--out", tmp]
        # The dry run proves the path with the two implementations that need no compiler.
        command += (["--device", "cpu", "--quick", "--impl=torch", "--impl=cross_entropy"]
                    if dry_run else ["--device", "cuda"])
        command += ["--quick"] if quick and not dry_run else []
        code, _ = _run_until(command, budget_s or 1e9, child_env(dry_run))
        produced = {p.suffix: p for p in Path(tmp).iterdir()}
        for suffix in (".json", ".md"):
            if suffix in produced:
                shutil.copy(produced[suffix], out / f"bench{suffix}")
    print(f"python -m bench exited {code}", flush=True)
    return dict(exit=code)


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_us(run, device, repeats):
    """The median of one call from the host's start to the device's end, as python -m bench
    times it: the kernels plus the host time the device waits for."""
    wall = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        _sync(device)
        wall.append(time.perf_counter() - start)
    return sorted(wall)[len(wall) // 2] * 1e6


def _kernel_times(run, device, repeats):
    """The 12 costliest kernels of one call (torch.profiler; on the CPU, operators): name, calls
    and time per call."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            run()
        _sync(device)
    events = [e for e in prof.key_averages()
              if (e.device_time_total if cuda else e.cpu_time_total) > 0]
    return sorted((dict(kernel=e.key, calls=e.count / repeats,
                        us=(e.device_time_total if cuda else e.self_cpu_time_total) / repeats)
                   for e in events), key=lambda k: -k["us"])[:12]


def measured_kernels(shape, kernel_size, dtype, device, repeats):
    """Per fused kernel, the mean device time of one forward + backward (torch.profiler), and
    F.cross_entropy's kernels the same way."""
    import torch
    import torch.nn.functional as F

    import lad_triton

    batch, classes, height, width = shape
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    logits.requires_grad_(True)
    target = torch.randint(0, classes, (batch, height, width), generator=gen).to(device)

    # The gradient returned, not accumulated into logits.grad: as python -m bench times a pass.
    def lad(check_target=False):
        torch.autograd.grad(lad_triton.locally_adaptive_loss(
            logits, target, kernel_size=kernel_size, backend="triton",
            check_target=check_target), logits)

    def lad_checked():  # the default: the label check's one sync inside the call
        lad(check_target=True)

    def cross_entropy():
        torch.autograd.grad(F.cross_entropy(logits, target, ignore_index=255), logits)

    result = {}
    for name, run in (("lad", lad), ("lad_checked", lad_checked),
                      ("cross_entropy", cross_entropy)):
        run()  # compile, warm the caches
        _sync(device)
        result[f"{name}_call_us"] = _call_us(run, device, repeats)
        # The host's time per call while the device runs behind (no sync between calls): what
        # a training step pays on the CPU side.
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        result[f"{name}_host_us"] = (time.perf_counter() - start) / repeats * 1e6
        _sync(device)
        if name != "lad_checked":
            result[name] = _kernel_times(run, device, repeats)
    return result


MODEL_SCRIPT = """
import json, sys, torch
from bench import kernel_report as kr
workloads = kr.WORKLOADS if sys.argv[1] == "all" else [
    ("tiny", (1, 5, 4, 36), 3, torch.float32, None)]
rows = []
for name, shape, k, dtype, _ in workloads:
    models, _ = kr.model_workload(shape, k, dtype)
    rows.append(dict(workload=name, shape=list(shape), kernel_size=k, dtype=str(dtype)[6:],
                     model=[dict(name=m.name, us=m.time_s * 1e6, issue_us=m.issue_s * 1e6,
                                 l1_us=m.l1_s * 1e6, dram_us=m.dram_s * 1e6, bound=m.bound)
                            for m in models]))
print(json.dumps(rows))
"""


WARM_SCRIPT = """
import sys, torch, lad_triton
b, c, h, w, k = map(int, sys.argv[1:6])
x = torch.randn(b, c, h, w, device="cuda", dtype=getattr(torch, sys.argv[6]), requires_grad=True)
y = torch.randint(0, c, (b, h, w), device="cuda")
lad_triton.locally_adaptive_loss(x, y, kernel_size=k, backend="triton",
                                 check_target=False).backward()
torch.cuda.synchronize()
"""


def model_rows(dry_run, model_file=None):
    """The model's rows: read from a file that ``python -m bench.kernel_report --model --json``
    wrote (the same Triton version: compiling every workload for the model takes minutes of a
    lent machine's time), else computed here."""
    if model_file:
        data = json.loads(Path(model_file).read_text())
        import triton

        if data["triton"] != triton.__version__:
            print(f"kernels: the model file is for Triton {data['triton']}, this machine has "
                  f"{triton.__version__}", flush=True)
        return [dict(workload=r["workload"], shape=r["shape"], kernel_size=r["kernel_size"],
                     dtype=r["dtype"], model_triton=data["triton"],
                     model=[dict(name=k["name"], issue_us=k["issue_us"], l1_us=k["l1_us"],
                                 dram_us=k["dram_us"], bound=k["bound"],
                                 us=max(k["issue_us"], k["l1_us"], k["dram_us"]))
                            for k in r["kernels"]])
                for r in data["rows"]]
    print("kernels: the performance model", flush=True)
    model = subprocess.run([sys.executable, "-c", MODEL_SCRIPT, "tiny" if dry_run else "all"],
                           cwd=ROOT, env=child_env(False), capture_output=True, text=True)
    if model.returncode != 0:
        raise SystemExit(f"the performance model failed:\n{model.stderr[-3000:]}")
    return json.loads(model.stdout.strip().splitlines()[-1])


def stage_kernels(out, dry_run, model_file=None):
    import torch

    device = torch.device("cpu" if dry_run else "cuda")
    # The model reads code compiled for sm_90 without a GPU: bench.kernel_report turns the
    # interpreter off for its process, so it runs in its own.
    rows = model_rows(dry_run, model_file)
    if not dry_run:  # compile every workload's kernels at once, one process each
        start = time.monotonic()
        warm = [subprocess.Popen([sys.executable, "-c", WARM_SCRIPT,
                                  *map(str, row["shape"]), str(row["kernel_size"]), row["dtype"]],
                                 cwd=ROOT, env=child_env(False)) for row in rows]
        codes = [p.wait() for p in warm]
        print(f"kernels: compiled in {time.monotonic() - start:.0f} s, exits {codes}", flush=True)
    for row in rows:
        print(f"kernels: {row['workload']} {row['shape']} K={row['kernel_size']} {row['dtype']}",
              flush=True)
        try:
            row["measured"] = measured_kernels(tuple(row["shape"]), row["kernel_size"],
                                               getattr(torch, row["dtype"]), device,
                                               1 if dry_run else 20)
        except Exception as err:  # keep the other workloads' figures
            row["measured"] = dict(error=f"{type(err).__name__}: {err}"[:1000])
        write_json(out / "kernels.json", dict(device=str(device), rows=rows))  # as it goes
    print("kernels: low-resolution logits", flush=True)
    try:
        upsample = measured_upsample(device, 1 if dry_run else 20, dry_run)
    except Exception as err:
        upsample = dict(error=f"{type(err).__name__}: {err}"[:1000])
    write_json(out / "kernels.json", dict(device=str(device), rows=rows, upsample=upsample))
    return rows


# Logits at a head's resolution: the loss that interpolates in its kernels beside F.interpolate
# + the loss and F.interpolate + F.cross_entropy (bench/upsample_model.py models them).
UPSAMPLE_WORKLOADS = [("deeplab-up", (8, 21, 65, 65), (513, 513), True),
                      ("segformer-up", (8, 19, 128, 256), (512, 1024), False)]


UPSAMPLE_WAYS = ("lad_upsample", "lad_upsample_whole_batch", "interpolate_lad",
                 "interpolate_cross_entropy")


def measured_upsample(device, repeats, dry_run):
    """Per workload of UPSAMPLE_WORKLOADS (a tiny one in a dry run) and way, float32, K = 5: the
    median synced call, the device time of each kernel (torch.profiler) and, on CUDA, the peak
    memory of forward + backward beyond the inputs. "lad_upsample_whole_batch" is the loss with
    its gradient formed for the whole batch at once (lad_triton.fused.GRADIENT_PARTS = 1): what
    the two parts cost in time for the memory they save."""
    import torch
    import torch.nn.functional as F

    import lad_triton
    from bench.workloads import peak_memory_mib
    from lad_triton import fused

    cases = [("tiny-up", (1, 5, 4, 4), (9, 11), True)] if dry_run else UPSAMPLE_WORKLOADS
    rows = []
    for name, shape, size, corners in cases:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
        t = torch.randint(0, shape[1], (shape[0],) + size, generator=gen).to(device)

        def up():
            return F.interpolate(x, size=size, mode="bilinear", align_corners=corners)

        ways = {"lad_upsample": lambda: lad_triton.locally_adaptive_loss(
                    x, t, backend="triton", check_target=False, upsample="bilinear",
                    align_corners=corners),
                "lad_upsample_whole_batch": lambda: _whole_batch(fused, lambda: (
                    lad_triton.locally_adaptive_loss(
                        x, t, backend="triton", check_target=False, upsample="bilinear",
                        align_corners=corners))),
                "interpolate_lad": lambda: lad_triton.locally_adaptive_loss(
                    up(), t, backend="triton", check_target=False),
                "interpolate_cross_entropy": lambda: F.cross_entropy(up(), t, ignore_index=255)}
        row = dict(workload=name, shape=list(shape), size=list(size), align_corners=corners)
        for way, loss in ways.items():
            def run(loss=loss):
                return torch.autograd.grad(loss(), x)

            run()  # compile, warm the caches
            _sync(device)
            row[way] = dict(call_us=_call_us(run, device, repeats),
                            kernels=_kernel_times(run, device, repeats),
                            peak_mib=(peak_memory_mib(run, device) if device.type == "cuda"
                                      else None))
        rows.append(row)
    return rows


def _whole_batch(fused, loss):
    saved, fused.GRADIENT_PARTS = fused.GRADIENT_PARTS, 1
    try:
        return loss()
    finally:
        fused.GRADIENT_PARTS = saved


def calibration_lines(kernels):
    """Measured / modelled per fused kernel and workload, as a markdown table: every fused kernel
    the call launched, and every kernel the model has (a kernel the model does not know, or the
    call did not launch, shows "-")."""
    lines = ["| workload | kernel | modelled us | measured us | measured / modelled |",
             "|---|---|---|---|---|"]
    for row in kernels.get("rows", []):
        label = f"{row['workload']} {'x'.join(map(str, row['shape']))} K={row['kernel_size']} " \
                f"{row['dtype']}"
        measured = {m["kernel"]: m["us"] for m in row.get("measured", {}).get("lad", [])}
        models = {m["name"]: m for m in (row["model"] if isinstance(row["model"], list) else [])}
        for name in [k for k in FUSED_KERNELS if k in measured or k in models]:
            us, model = measured.get(name), models.get(name)
            ratio = f"{us / model['us']:.2f}" if us and model and model["us"] else "-"
            modelled = "-" if model is None else f"{model['us']:.1f}"
            lines.append(f"| {label} | {name} | {modelled} | "
                         f"{'-' if us is None else f'{us:.1f}'} | {ratio} |")
        call = row.get("measured", {}).get("lad_call_us")
        if call is not None:
            launched = sum(measured.get(k, 0) for k in FUSED_KERNELS)
            got = row["measured"]
            ce = got.get("cross_entropy_call_us")
            lines.append(f"| {label} | one call, host to device end (kernels {launched:.0f} us; "
                         f"F.cross_entropy {ce:.0f} us) | - | {call:.1f} | - |")
            if "lad_host_us" in got:  # visits before the host figures had none
                lines.append(
                    f"| {label} | host time per call, no sync (F.cross_entropy "
                    f"{got['cross_entropy_host_us']:.0f} us); one call with check_target=True "
                    f"{got['lad_checked_call_us']:.0f} us | - | {got['lad_host_us']:.1f} | - |")
    return lines


SKIPPED_STAGES = []  # stages of this process's `all` that the deadline left out


def run_verdict(run):
    """One word per run: passed only when it ran to its end with exit 0. A run cut at its
    budget (pytest interrupted: exit 'timeout', or 2 after the SIGINT) did not finish, whatever
    it had passed by then."""
    if run["exit"] == "not started":
        return "NOT STARTED (no time left in the budget)"
    if run["exit"] == "timeout":
        return "DID NOT FINISH (cut at its time budget: what had not run by then never ran)"
    if run["exit"] == 0 and not run.get("failures") and not run.get("errors"):
        return "passed"
    return f"FAILED (exit {run['exit']})"


def summary(out):
    """summary.md from whatever stages wrote their files, headed by the commit they ran and
    the files they are in."""
    parts = ["# lad_triton on a GPU: bench.gpu summary", ""]
    if (out / "env.json").exists():
        env = json.loads((out / "env.json").read_text())
        dirty = {True: ", with uncommitted changes", False: "", None: ""}[env.get("dirty")]
        parts += [f"Commit {env.get('commit') or 'not recorded'}{dirty}; files: "
                  + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file()
                                     and p.name != "summary.md")) + ".", ""]
        parts += [", ".join(f"{k} {v}" for k, v in env.items()), ""]
    if SKIPPED_STAGES:
        parts += [f"Stages NOT RUN (the deadline came first): {', '.join(SKIPPED_STAGES)}", ""]
    if (out / "tests.json").exists():
        tests = json.loads((out / "tests.json").read_text())
        parts += ["## tests", ""] + [
            f"- {r['part']}: {run_verdict(r)}; exit {r['exit']}, {r.get('tests', 0)} tests, "
            f"{r.get('failures', 0)} failures, {r.get('errors', 0)} errors, "
            f"{r.get('skipped', 0)} skipped, {r['seconds']} s" if "output" not in r else
            f"- {r['part']} (`{r['command']}`, GPU-only check): {run_verdict(r)}; "
            f"{r['seconds']} s" for r in tests["runs"]]
        parts += [f"- FAILED {f}" for f in tests["failed"]] + [""]
        for r in tests["runs"]:
            if "output" in r:
                parts += [f"### {r['part']}", "", "```", r["output"].rstrip(), "```", ""]
    if (out / "bench.md").exists():
        parts += ["## python -m bench", "", (out / "bench.md").read_text(), ""]
    if (out / "kernels.json").exists():
        kernels = json.loads((out / "kernels.json").read_text())
        parts += ["## fused kernels, measured beside the model", ""]
        parts += calibration_lines(kernels) + [""]
        for row in kernels["rows"][:1]:
            parts += ["F.cross_entropy forward + backward, first workload, per call:", ""]
            parts += [f"- {k['us']:.1f} us x{k['calls']:g} {k['kernel'][:100]}"
                      for k in row.get("measured", {}).get("cross_entropy", [])]
        parts += ["", "## low-resolution logits, float32, K = 5", ""] + upsample_lines(
            kernels.get("upsample"))
    (out / "summary.md").write_text("\n".join(parts) + "\n")
    print(f"wrote {out / 'summary.md'}", flush=True)


def upsample_lines(rows):
    """The summary's table of measured_upsample: per workload and way, one synced call, the sum
    of its kernels and the peak memory."""
    if not rows or "error" in rows:
        return [f"not measured: {(rows or {}).get('error', 'no figures')}"]
    lines = ["| workload | way | one call us | kernels us | peak MiB |", "|---|---|---|---|---|"]
    for row in rows:
        for way in UPSAMPLE_WAYS:
            if way not in row:  # a visit before the way was timed
                continue
            r = row[way]
            peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
            lines.append(f"| {row['workload']} {'x'.join(map(str, row['shape']))} -> "
                         f"{'x'.join(map(str, row['size']))} | {way} | {r['call_us']:.0f} | "
                         f"{sum(k['us'] for k in r['kernels']):.0f} | {peak} |")
    return lines


README_MARKERS = ("<!-- gpu:begin -->", "<!-- gpu:end -->")


def ingest(folder, readme=ROOT / "bench" / "README.md", results=ROOT / "bench" / "results"):
    """The returned files into bench/results/<gpu>-<date>.* and bench/README.md's GPU section."""
    env = json.loads((folder / "env.json").read_text())
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    stem = f"{slug}-{env['date']}"
    visit = 1
    while (results / f"{stem}-env.json").exists():  # a second visit the same day keeps the first
        visit += 1
        stem = f"{slug}-{env['date']}-{visit}"
    results.mkdir(parents=True, exist_ok=True)
    copied = []
    for name in ("env.json", "tests.json", "tests.xml", "bench.json", "bench.md",
                 "kernels.json", "summary.md"):
        if (folder / name).exists():
            target = results / (f"{stem}.{name.split('.')[1]}" if name.startswith("bench.")
                                else f"{stem}-{name}")
            shutil.copy(folder / name, target)
            copied.append(target)
    text = readme.read_text()
    begin, end = README_MARKERS
    if begin in text and end in text:
        block = [begin, "", f"Measured with `python -m bench.gpu all` on {env['device']}, torch "
                 f"{env['torch']}, Triton {env['triton']}, {env['date']}, at commit "
                 f"{env.get('commit') or '(not recorded)'}"
                 f"{' with uncommitted changes' if env.get('dirty') else ''} "
                 f"(`bench/results/{stem}*`, `{stem}-summary.md` for what ran and what did not).",
                 ""]
        if (folder / "bench.md").exists():
            block += [(folder / "bench.md").read_text().strip(), ""]
        if (folder / "kernels.json").exists():
            block += calibration_lines(json.loads((folder / "kernels.json").read_text())) + [""]
        head, rest = text.split(begin, 1)
        readme.write_text(head + "\n".join(block) + end + rest.split(end, 1)[1])
        copied.append(readme)
    for path in copied:
        print(f"wrote {path}")
    return copied


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=STAGES + ("all", "ingest"))
    parser.add_argument("folder", nargs="?", help="ingest: the folder a visit returned")
    parser.add_argument("--out", help="the folder the stage writes into")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU: every stage's code path, tiny shapes")
    parser.add_argument("--budget", type=float, default=540.0,
                        help="tests: seconds for the whole stage (default 540); all: for the "
                             "first tests")
    parser.add_argument("--deadline", type=float, default=None,
                        help="all: seconds for everything; the bench and the rest of the tests "
                             "are cut to fit")
    parser.add_argument("--model", help="kernels: the model's JSON (python -m "
                        "bench.kernel_report --model --json FILE) instead of compiling it here")
    parser.add_argument("--bench-quick", action="store_true", help="bench: python -m bench --quick")
    args = parser.parse_args(argv)
    if args.stage == "ingest":
        if not args.folder:
            parser.error("ingest needs the folder: python -m bench.gpu ingest DIR")
        ingest(Path(args.folder))
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    if args.dry_run:  # before anything imports Triton: the fused kernels run interpreted
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("python -m bench.gpu: this torch sees no CUDA device; --dry-run runs "
                         "the stages' code on the CPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # all: what says whether the kernels are right first, then the measurements, then the
    # rest of the suite in whatever time is left.
    stages = (("env", "tests:first", "kernels", "bench", "tests:rest") if args.stage == "all"
              else (args.stage,))
    end = time.monotonic() + (args.deadline or 1e9)
    for stage in stages:
        start = time.monotonic()
        left = end - start
        if left < 20:
            print(f"== bench.gpu {stage}: skipped, the deadline is near", flush=True)
            SKIPPED_STAGES.append(stage)
            summary(out)
            continue
        print(f"== bench.gpu {stage} ({datetime.datetime.now():%H:%M:%S}, {left:.0f} s left)",
              flush=True)
        if stage == "env":
            stage_env(out, args.dry_run)
        elif stage == "tests":
            stage_tests(out, args.dry_run, min(args.budget, left))
        elif stage == "tests:first":
            stage_tests(out, args.dry_run, min(args.budget, left), parts=("first", "checks"))
        elif stage == "tests:rest":
            stage_tests(out, args.dry_run, left - 10, parts=("rest",))
        elif stage == "bench":
            if left < 90:
                print("== bench.gpu bench: skipped, too little time left", flush=True)
                SKIPPED_STAGES.append(stage)
                summary(out)
                continue
            stage_bench(out, args.dry_run, left - 30, args.bench_quick)
        else:
            stage_kernels(out, args.dry_run, args.model)
        print(f"== bench.gpu {stage}: {time.monotonic() - start:.0f} s", flush=True)
        summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())

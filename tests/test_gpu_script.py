"""bench/gpu.py, the script a GPU visit runs, proven on the CPU: every stage's code path in its
--dry-run mode, the output limits of a visit, and the step that brings the results home."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The dry run proves on a CPU what a GPU visit runs for real; on a GPU machine bench.gpu itself is
# the test. (There, with Triton 3.6 and numpy 2.5 as on the lent H200s, Triton's interpreter
# fails: "only 0-dimensional arrays can be converted to Python scalars".)
pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the dry run is the CPU's stand-in for a GPU visit")
FILES = {"env.json", "tests.json", "tests.xml", "bench.json", "bench.md", "kernels.json",
         "summary.md"}


@pytest.fixture
def visit(tmp_path_factory):
    out = tmp_path_factory.mktemp("visit")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    result = subprocess.run([sys.executable, "-m", "bench.gpu", "all", "--out", str(out),
                             "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def every_stage_writes_its_file_within_a_visits_limits(visit):
    files = {p.name for p in visit.iterdir()}
    assert files == FILES  # at most 8 plain files, one folder: what a visit can bring back
    assert all((visit / f).stat().st_size < 16 * 2**20 for f in files)
    env = json.loads((visit / "env.json").read_text())
    assert env["copy_bandwidth_gbps"] > 0 and env["torch"]

    tests = json.loads((visit / "tests.json").read_text())
    # The GPU-only checks (bench.agreement at full size, bench.repeat_check) between the two
    # parts of the suite; here their dry runs, on the CPU.
    assert [r["part"] for r in tests["runs"]] == ["first", "agreement", "repeat_check", "rest"]
    assert all(r["exit"] == 0 for r in tests["runs"]), tests
    assert all(r["tests"] > 0 for r in tests["runs"] if "output" not in r), tests
    assert tests["failed"] == []
    summary = (visit / "summary.md").read_text()
    assert f"Commit {env['commit']}" in summary and "env.json" in summary
    assert summary.count(": passed;") == 4 and "agrees" in summary, summary

    bench = json.loads((visit / "bench.json").read_text())
    assert {r["impl"] for r in bench["rows"]} >= {"cross_entropy", "torch"}


def kernels_stage_puts_the_model_beside_a_measurement(visit):
    (row,) = json.loads((visit / "kernels.json").read_text())["rows"]
    assert [k["name"] for k in row["model"]] == ["_halo_forward_kernel",
                                                 "_combine_kernel",
                                                 "_halo_backward_kernel"]
    assert all(k["us"] == max(k["issue_us"], k["l1_us"], k["dram_us"]) for k in row["model"])
    # On the CPU the profiler sees the loss's autograd Function, not the kernels (they run
    # interpreted; in eager mode it calls the custom operators' implementations directly).
    assert "error" not in row["measured"], row["measured"]
    measured = {k["kernel"] for k in row["measured"]["lad"]}
    assert row["measured"]["lad_call_us"] > 0 and row["measured"]["cross_entropy_call_us"] > 0
    assert all(row["measured"][f"{name}_host_us"] > 0
               for name in ("lad", "lad_checked", "cross_entropy"))
    assert "FusedMinkowskiMean" in measured
    assert any("log_softmax" in k["kernel"] for k in row["measured"]["cross_entropy"])
    # The low-resolution logits four ways (the loss with its gradient formed in two parts of the
    # batch and in one), each timed and profiled.
    upsample = json.loads((visit / "kernels.json").read_text())["upsample"]
    assert "error" not in upsample, upsample
    assert all(row[way]["call_us"] > 0 and row[way]["kernels"] for row in upsample
               for way in ("lad_upsample", "lad_upsample_whole_batch", "interpolate_lad",
                           "interpolate_cross_entropy"))
    summary = (visit / "summary.md").read_text()
    assert "| tiny-up 1x5x4x4 -> 9x11 | lad_upsample |" in summary
    assert "measured beside the model" in summary and "| _halo_forward_kernel |" in summary
    assert "host time per call, no sync" in summary


def ingest_files_the_results_and_fills_the_readme(visit, tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import gpu

    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- gpu:begin -->\npending\n<!-- gpu:end -->\n\nrest\n")
    folder = tmp_path / "returned"
    shutil.copytree(visit, folder)
    written = gpu.ingest(folder, readme=readme, results=tmp_path / "results")
    names = sorted(p.name for p in written if p != readme)
    date = json.loads((visit / "env.json").read_text())["date"]
    assert all(date in n for n in names) and any(n.endswith(".json") and "-" + date + ".json"
                                                in n for n in names)
    text = readme.read_text()
    assert "pending" not in text and text.endswith("<!-- gpu:end -->\n\nrest\n")
    assert "python -m bench.gpu all" in text and "| _halo_forward_kernel |" in text
    # A second visit the same day is filed beside the first, never over it.
    first = {p: p.read_bytes() for p in written if p != readme}
    again = gpu.ingest(folder, readme=readme, results=tmp_path / "results")
    assert all(p.read_bytes() == data for p, data in first.items())
    assert all(f"{date}-2" in p.name for p in again if p != readme) and len(again) == len(written)


def test_a_visit_dry_run(visit, tmp_path):
    # One test over the one dry run: pytest-xdist would run a module fixture once per worker.
    every_stage_writes_its_file_within_a_visits_limits(visit)
    kernels_stage_puts_the_model_beside_a_measurement(visit)
    ingest_files_the_results_and_fills_the_readme(visit, tmp_path)


def test_sweep_dry_run_times_every_variant_of_the_same_loss(tmp_path):
    # bench.sweep on the CPU (the interpreter is on: this module skips where CUDA is): each
    # variant (kernels, rows per lane, register cap) forced on the kernels, and the loss and
    # gradient the same, since a launch plan must not change the math. In this process: a child
    # would spend as long importing torch and Triton as the sweep runs.
    sys.path.insert(0, str(ROOT))
    from bench import sweep
    from lad_triton.kernels import backward, config, forward

    out = tmp_path / "sweep.json"
    try:
        assert sweep.main(["--dry-run", "--json", str(out), "--only", "tiny-3-float32"]) == 0
    finally:  # the sweep leaves its last variant forced on the kernels' modules
        forward.launch_config = backward.launch_config = config.launch_config
        config.HALO = True
    rows = json.loads(out.read_text())["rows"]
    assert [v if isinstance(v, str) else tuple(v) for v in (r["variant"] for r in rows)] \
        == sweep.DRY_WORKLOADS[0][4]
    # (No times on the CPU: the interpreted kernels are no profiler events.)
    assert all("error" not in r and "us" in r for r in rows), rows
    # Other rows per lane add in another order: float32 rounding apart.
    assert all(abs(r["check"] - rows[0]["check"]) <= 1e-5 * abs(rows[0]["check"]) for r in rows)
    assert rows[0]["grad_err"] == 0 and all(r["grad_err"] <= 1e-5 for r in rows)
    with pytest.raises(SystemExit):
        sweep.main(["--dry-run", "--only", "no-such-workload"])


def test_host_profile_dry_run(tmp_path):
    sys.path.insert(0, str(ROOT))
    from bench import host_profile

    assert host_profile.main(["--dry-run", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "host_profile.txt").read_text()
    for name in ("lad", "lad_checked", "lad_forward", "cross_entropy"):
        assert f" {name} " in text
    assert "by tottime" in text and "locally_adaptive_loss" in text
    # The split puts the time in the Function's backward, which the timers saw run, and its
    # profile names the backward's launch helper.
    split = text[text.index("split of one fused"):text.index("cProfile of Function.backward")]
    backward = float(re.search(r"Function.backward (\d+)", split).group(1))
    assert backward > 0
    assert "kernels/backward.py" in text.split("cProfile of Function.backward")[1]


def test_a_stage_cut_short_is_not_counted_as_passed(tmp_path):
    # bench.gpu's summary: a pytest run interrupted at its budget, or never started, says so
    # (a visit's test stage once hit its limit with 272 run and was read as passed).
    sys.path.insert(0, str(ROOT))
    from bench import gpu

    runs = [dict(part="first", exit="timeout", seconds=540.0, tests=272, failures=0),
            dict(part="rest", exit="not started", seconds=0),
            dict(part="agreement", command="python -m bench.agreement", exit=1, seconds=9.0,
                 output="DISAGREES")]
    (tmp_path / "tests.json").write_text(json.dumps(dict(budget_s=540, runs=runs, failed=[])))
    (tmp_path / "env.json").write_text(json.dumps(dict(commit="abc123", dirty=True)))
    gpu.summary(tmp_path)
    text = (tmp_path / "summary.md").read_text()
    assert "Commit abc123, with uncommitted changes" in text
    assert "- first: DID NOT FINISH" in text and "- rest: NOT STARTED" in text
    assert "FAILED (exit 1)" in text and "passed" not in text


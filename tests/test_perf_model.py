"""The performance model (bench/perf_model.py) on a kernel whose counts are known by hand: a
loop of n iterations, each loading one float32 per lane of one warp (one 128-byte load
instruction, one add), then one store. (The barrier in the loop keeps LLVM from unrolling so
small a loop by four with a remainder, which would leave three loops' worth of structure to
declare.) Compiled for sm_90 without a GPU, in a subprocess (this process runs Triton's
interpreter)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import json, sys
sys.path.insert(0, sys.argv[1])
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import perf_model

@triton.jit
def sum_rows(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(n):
        acc += tl.load(x_ptr + i * BLOCK + offs)
        tl.debug_barrier()
    tl.store(out_ptr + offs, acc)

src = ASTSource(fn=sum_rows, signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32",
                                        "BLOCK": "constexpr"},
                constexprs={"BLOCK": 32},
                attrs={(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]]})
binary = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                        options=dict(num_warps=1, num_stages=1))
sass = perf_model.sass(binary.asm["cubin"])
instrs = perf_model.parse_sass(sass)
loops = perf_model.find_loops(instrs)
bodies = [[i for i in instrs if head <= i.addr <= end] for head, end in loops]
out = dict(loops=len(loops), body=[len(b) for b in bodies],
           body_loads=[sum(i.base == "LDG" for i in b) for b in bodies])
for n in (10, 110):
    m = perf_model.model_kernel("sum_rows", sass, [n], 1, 1, 0)
    out[n] = dict(instructions=m.instructions, memory=m.memory_instructions,
                  wavefronts=m.wavefronts, lone_issue_s=m.issue_s)
big = perf_model.model_kernel("sum_rows", sass, [1000], 132 * 4 * 10, 1, 1000 * 128 * 5280)
out["big"] = dict(instructions=big.instructions, issue_s=big.issue_s, l1_s=big.l1_s,
                  dram_s=big.dram_s, time_s=big.time_s)
try:
    perf_model.model_kernel("sum_rows", sass, [10, 10], 1, 1, 0)
except ValueError as err:
    out["refused"] = str(err)
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    pytest.importorskip("triton")
    probe = tmp_path_factory.mktemp("model") / "probe.py"  # @triton.jit needs a source file
    probe.write_text(PROBE)
    result = subprocess.run([sys.executable, str(probe), str(ROOT / "bench")],
                            capture_output=True, text=True,
                            env={**os.environ, "TRITON_INTERPRET": "0"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_the_loop_is_found_and_multiplied_by_its_trips(counts):
    assert counts["loops"] == 1 and counts["body_loads"] == [1]  # one 32-lane load
    few, many = counts["10"], counts["110"]
    assert many["instructions"] - few["instructions"] == 100 * counts["body"][0]
    assert few["memory"] == {"LDG": 10, "STG": 1}
    assert many["memory"] == {"LDG": 110, "STG": 1}
    assert many["wavefronts"] == 111  # 128 B each: one wavefront per load and per store


def test_declared_trips_must_match_the_loops(counts):
    assert "the SASS has 1 loops" in counts["refused"]


def test_the_three_bounds_by_hand(counts):
    big = counts["big"]
    programs = 132 * 4 * 10  # ten warps per scheduler
    assert big["issue_s"] == pytest.approx(40 * big["instructions"] / (4 * 1.755e9))
    assert big["l1_s"] == pytest.approx(1001 * programs / (132 * 1.755e9))
    assert big["dram_s"] == pytest.approx(1000 * 128 * programs / 3.0e12)
    assert big["time_s"] == max(big["issue_s"], big["l1_s"], big["dram_s"])
    # one program of one warp: a lone warp issues one instruction per clock
    assert counts["10"]["lone_issue_s"] == pytest.approx(counts["10"]["instructions"] / 1.755e9)

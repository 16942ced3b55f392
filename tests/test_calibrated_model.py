"""The calibrated model's terms (bench/perf_model.py, issue 24) on synthetic inputs, and the
fit of bench.calibrate recovering known constants: no compiling, no GPU."""

import sys
from dataclasses import replace
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
pytest.importorskip("triton")  # perf_model finds cuobjdump through Triton

import perf_model as pm  # noqa: E402


def kernel(**changes):
    """A row loop like the old forward's: 6 rounds of loads per warp, 1-warp programs, enough
    of them for many waves on 132 SMs."""
    x = pm.Inputs(programs=132 * 64 * 20, warps=1, instructions=3000, rounds=6, wavefronts=400,
                  l1_passes=1.0, dram_bytes=0, warps_per_sm=8)
    return replace(x, **changes)


def test_warps_per_sm_from_registers():
    assert pm.warps_per_sm(255) == 8      # 256 per lane: 65536 / (256 x 32)
    assert pm.warps_per_sm(168) == 12
    assert pm.warps_per_sm(128) == 16
    assert pm.warps_per_sm(121) == 16     # allocated by 8 per lane: 128
    assert pm.warps_per_sm(32) == 32      # one-warp programs: at most 32 blocks per SM
    assert pm.warps_per_sm(32, warps_per_program=4) == 64
    assert pm.warps_per_sm(64, warps_per_program=4, shared_bytes=100 * 1024) == 8


def test_more_registers_fewer_warps_longer_when_latency_bound():
    p = pm.Params(latency_cycles=4000, issue_efficiency=0.7)
    times = [pm.calibrated(kernel(warps_per_sm=pm.warps_per_sm(r)), p) for r in (128, 168, 255)]
    assert all(t.bound == "latency" for t in times)
    assert times[0].time_s < times[1].time_s < times[2].time_s
    assert times[2].time_s / times[1].time_s == pytest.approx(12 / 8)
    # with no latency to hide, the issue rate bounds it whatever the occupancy
    p0 = pm.Params(latency_cycles=0, issue_efficiency=0.7)
    assert {pm.calibrated(kernel(warps_per_sm=w), p0).bound for w in (8, 16)} == {"issue"}


def test_independent_loads_in_one_round_cost_one_latency():
    p = pm.Params(latency_cycles=2000, issue_efficiency=0.7)
    few, many = kernel(rounds=6), kernel(rounds=12)
    assert pm.calibrated(many, p).latency_s > 1.7 * pm.calibrated(few, p).latency_s


def test_misaligned_rows_take_more_l1_passes():
    assert pm.l1_passes(512, 4, [0]) == 1           # aligned rows, unshifted
    assert pm.l1_passes(1024, 4, range(-2, 3)) == pytest.approx(1 + 4 / 5)  # 4 of 5 shifts
    assert pm.l1_passes(513, 4, range(-2, 3)) == pytest.approx(1 + 31 / 32)  # rows drift 4 B
    assert pm.l1_passes(513, 2, None) < pm.l1_passes(513, 4, None) <= 2
    p = pm.Params(latency_cycles=0, issue_efficiency=1.0)
    aligned = pm.calibrated(kernel(l1_passes=1.0, instructions=10), p)
    shifted = pm.calibrated(kernel(l1_passes=pm.l1_passes(513, 4, range(-2, 3)),
                                   instructions=10), p)
    assert shifted.bound == "L1" and shifted.l1_s == pytest.approx(aligned.l1_s * (1 + 31 / 32))


def test_fit_recovers_known_constants():
    truth = pm.Params(latency_cycles=1200, issue_efficiency=0.6)
    xs = [kernel(warps_per_sm=w, rounds=r, instructions=i)
          for w in (8, 12, 16, 32) for r in (2, 6, 12) for i in (500, 3000, 20000)]
    measured = [pm.calibrated(x, truth).time_s for x in xs]
    got = pm.fit(xs, measured)
    assert got.latency_cycles == pytest.approx(truth.latency_cycles, rel=0.02)
    assert got.issue_efficiency == pytest.approx(truth.issue_efficiency, abs=0.01)

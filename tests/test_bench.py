"""The benchmark's own claims: its F.unfold baseline computes the same loss, its CPU memory meter
measures what is allocated, and its traffic model is the kernels' documented one."""

import sys
from pathlib import Path

import pytest
import torch

from cases import make_logits, make_target
from oracle import lad_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import workloads as wl  # noqa: E402


@pytest.mark.parametrize("kernel_size", [1, 3, 5])
def test_unfold_baseline_is_the_same_loss(kernel_size):
    logits = make_logits((2, 4, 6, 7), dtype=torch.float64, seed=kernel_size)
    target = make_target(2, 6, 7, 4, n_labels=2, seed=kernel_size)
    x = logits.clone().requires_grad_(True)
    loss = wl.lad_unfold(x, target, kernel_size)
    (grad,) = torch.autograd.grad(loss, x)
    ref = lad_reference(logits, target, kernel_size=kernel_size)
    assert torch.allclose(loss, ref.loss, rtol=1e-10)
    assert torch.allclose(grad, ref.grad, rtol=1e-8, atol=1e-12)


def test_cpu_peak_memory_counts_allocations_beyond_the_inputs():
    mib = 2**20

    def run():
        a = torch.ones(8 * mib, dtype=torch.uint8)  # 8 MiB, freed at return: still the peak
        b = torch.ones(2 * mib, dtype=torch.uint8)
        del a
        return b

    assert wl.peak_memory_mib(run, torch.device("cpu")) == pytest.approx(10, abs=0.1)


def test_traffic_model_is_the_kernels_documented_one():
    # kernels/backward.py: "For C=21 float32 logits and uint8 labels: forward + backward 546 B";
    # the benchmark's labels are int64 (7 B more per read, two reads).
    w = wl.Workload("voc", 8, 21, 513, 513, 5, torch.float32, slow=True)
    assert wl.design_bytes_per_pixel(w, "forward+backward") == 546 + 2 * 7
    assert wl.min_bytes_per_pixel(w, "forward+backward") == 2 * 84 + 8
    assert wl.min_bytes_per_pixel(w, "forward") == 84 + 8
    # bfloat16: P in the logits' dtype ("bfloat16: 294 B"), but float32 when C > 32.
    w = wl.Workload("voc", 8, 21, 513, 513, 5, torch.bfloat16, slow=True)
    assert wl.design_bytes_per_pixel(w, "forward+backward") == 294 + 2 * 7
    w = wl.Workload("ade", 8, 150, 512, 512, 5, torch.bfloat16, slow=True)
    assert wl.design_bytes_per_pixel(w, "forward") == 2 * 150 * 2 + 150 * 4 + 8 + 20

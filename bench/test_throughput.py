"""Time and peak memory of every implementation x workload x pass (see workloads.py).

Each benchmark runs its pass once untimed (warm-up, compilation, the numerics check), measures
peak memory on one more call, then times ``rounds`` calls (CUDA synchronised before the clock
is read) and records in ``extra_info``: impl, device, dtype, shape, kernel_size, pass,
pixels_per_s, peak_mem_mib, gbps (minimal bytes over the median time), and the model's
min_bytes_per_pixel, design_bytes_per_pixel and flops_per_pixel."""

import pytest
import torch

from workloads import (IMPLS, PASSES, design_bytes_per_pixel, flops_per_pixel, loss_function,
                       min_bytes_per_pixel, pass_runner, peak_memory_mib, unavailable, workloads)

CASES = [(w, impl, p) for w in workloads() for impl in IMPLS for p in PASSES]


def case_id(case):
    w, impl, p = case
    return f"{w.id}-{impl}-{'fwd' if p == 'forward' else 'fwdbwd'}"


def check_numerics(fn, logits, target, w, pass_):
    """torch.compile and F.unfold must compute the eager PyTorch implementation's loss, and for
    forward + backward its gradient (relative to its norm: the values differ in summation order
    only)."""
    eager = loss_function("torch", w)
    expected = eager(logits, target).float()
    got = fn(logits, target).float()
    tol = 1e-4 if w.dtype == torch.float32 else 2e-2
    assert abs(got.item() - expected.item()) <= tol * abs(expected.item()), (got, expected)
    if pass_ != "forward":
        (expected,) = torch.autograd.grad(eager(logits, target), logits)
        (got,) = torch.autograd.grad(fn(logits, target), logits)
        error = (got.float() - expected.float()).norm() / expected.float().norm()
        assert error <= tol, error


@pytest.mark.parametrize("case", CASES, ids=[case_id(c) for c in CASES])
def test_loss(benchmark, case, device, quick, request):
    w, impl, pass_ = case
    reason = unavailable(impl, w, device)
    if reason:
        pytest.skip(reason)
    logits, target = w.inputs(device)
    fn = loss_function(impl, w)
    run = pass_runner(fn, logits, target, pass_)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    run()  # warm-up: compilation, autotuning, allocator
    sync()
    if impl in ("torch_compile", "torch_unfold"):
        check_numerics(fn, logits, target, w, pass_)
    peak = peak_memory_mib(run, device)

    def timed():
        run()
        sync()

    rounds = (10 if quick else 30) if device.type == "cuda" else (5 if quick else 10)
    benchmark.pedantic(timed, rounds=rounds, warmup_rounds=2, iterations=1)
    median = benchmark.stats.stats.median
    request.node.user_properties.append(("median_ms", 1e3 * median))
    benchmark.extra_info.update(
        impl=impl, workload=w.name, device=torch.cuda.get_device_name(device)
        if device.type == "cuda" else "cpu", dtype=str(w.dtype)[6:], shape=list(w.shape),
        kernel_size=w.kernel_size, **{"pass": pass_},
        pixels_per_s=w.pixels / median, peak_mem_mib=peak,
        gbps=min_bytes_per_pixel(w, pass_) * w.pixels / median / 1e9,
        logits_mib=logits.numel() * logits.element_size() / 2**20,
        min_bytes_per_pixel=min_bytes_per_pixel(w, pass_),
        design_bytes_per_pixel=design_bytes_per_pixel(w, pass_),
        flops_per_pixel=flops_per_pixel(w, pass_))

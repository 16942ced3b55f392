"""Time and peak memory of every implementation x workload x pass (see workloads.py).

Each benchmark runs its pass once untimed (warm-up, compilation), its loss and gradient checked
against the float64 reference within the contract's tolerance (every implementation, the fused
one first: IMPLS's order), measures
peak memory on one more call, then times ``rounds`` calls (CUDA synchronised before the clock
is read) and records in ``extra_info``: impl, device, dtype, shape, kernel_size, pass,
pixels_per_s, peak_mem_mib, gbps (minimal bytes over the median time), and the model's
min_bytes_per_pixel, design_bytes_per_pixel and flops_per_pixel."""

import pytest
import torch

from workloads import (IMPLS, PASSES, design_bytes_per_pixel, flops_per_pixel,
                       lad_unfold_float64, loss_function, min_bytes_per_pixel, pass_runner,
                       peak_memory_mib, unavailable, workloads)

CASES = [(w, impl, p) for w in workloads() for impl in IMPLS for p in PASSES]


def case_id(case):
    w, impl, p = case
    return f"{w.id}-{impl}-{'fwd' if p == 'forward' else 'fwdbwd'}"


# docs/contract.md, "Output dtype and accuracy": (loss, gradient) relative error against float64.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 5e-3),
             torch.bfloat16: (1e-2, 2e-2)}


def rel(got, expected):
    got, expected = got.detach().double(), expected.detach().double()
    norm = torch.linalg.vector_norm(expected).item()
    return torch.linalg.vector_norm(got - expected).item() / (norm or 1.0)


def reference(impl, w, logits, target, pass_):
    """The float64 loss and gradient the implementation should give on these (rounded) logits:
    LAD by the F.unfold formulation one image at a time (workloads.lad_unfold_float64, which
    shares no code with lad_triton; tests/test_bench.py checks it against the tests' oracle),
    F.cross_entropy in float64 for the cross-entropy baseline."""
    # One workload's references at a time (the cases run workload by workload, its inputs the
    # same seeded tensors): computed once for its five implementations, not five times.
    key = (w.id, impl == "cross_entropy", pass_)
    if key not in _REFERENCES:
        if len(_REFERENCES) > 4:
            _REFERENCES.clear()
        x = logits.detach().double().requires_grad_(pass_ != "forward")
        # With low-resolution logits both are defined on their interpolation (float64, exact
        # up to rounding), and the gradient goes back through it.
        high = x if not w.low else torch.nn.functional.interpolate(
            x, size=target.shape[-2:], mode="bilinear", align_corners=w.align_corners)
        if impl == "cross_entropy":
            loss = torch.nn.functional.cross_entropy(high, target, ignore_index=255)
            _REFERENCES[key] = (loss.detach(), torch.autograd.grad(loss, x)[0]
                                if pass_ != "forward" else None)
        else:
            loss, grad = lad_unfold_float64(high.detach(), target, w.kernel_size,
                                            with_grad=pass_ != "forward")
            if grad is not None and w.low:
                (grad,) = torch.autograd.grad(high, x, grad)
            _REFERENCES[key] = (loss, grad)
    return _REFERENCES[key]


_REFERENCES = {}


def warm_up_and_check(impl, fn, logits, target, w, pass_):
    """The warm-up call (compilation, autotuning, the allocator) of one pass, whose loss and,
    for forward + backward, gradient must be the float64 reference's within the contract's
    tolerance: the times below are then those of a loss that was checked at this very size
    (on a GPU the benchmarked sizes; on a CPU the quick ones). An assertion fails the test, and
    python -m bench with it."""
    loss = fn(logits, target)
    grad = torch.autograd.grad(loss, logits)[0] if pass_ != "forward" else None
    ref_loss, ref_grad = reference(impl, w, logits, target, pass_)
    loss_tol, grad_tol = TOLERANCE[w.dtype]
    loss_err = rel(loss, ref_loss)
    assert loss_err <= loss_tol, f"{impl} {w.id}: loss {loss.item()} against float64 " \
        f"{ref_loss.item()}, relative error {loss_err:.2e} > {loss_tol}"
    if grad is not None:
        grad_err = rel(grad, ref_grad)
        assert grad_err <= grad_tol, f"{impl} {w.id}: gradient relative error {grad_err:.2e} " \
            f"> {grad_tol}"


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
    warm_up_and_check(impl, fn, logits, target, w, pass_)
    sync()
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
        low=list(w.low) if w.low else None,
        kernel_size=w.kernel_size, **{"pass": pass_},
        pixels_per_s=w.pixels / median, peak_mem_mib=peak,
        gbps=min_bytes_per_pixel(w, pass_) * w.pixels / median / 1e9,
        logits_mib=logits.numel() * logits.element_size() / 2**20,
        min_bytes_per_pixel=min_bytes_per_pixel(w, pass_),
        design_bytes_per_pixel=design_bytes_per_pixel(w, pass_),
        flops_per_pixel=flops_per_pixel(w, pass_))

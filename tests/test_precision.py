"""The contract's tolerance table: low-precision logits against the float64 definition, every backend."""

import pytest
import torch

from cases import BACKENDS, DEVICE, TOLERANCE, grad_out_for, make_logits, make_target, rel_err
from lad_triton import locally_adaptive_loss
from oracle import lad_reference


def errors(backend, dtype, classes, reduction, seed):
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((2, classes, 6, 7), dtype=dtype, scale=3.0, seed=seed, device=device)
    target = make_target(2, 6, 7, classes, n_labels=3, seed=seed, device=device)
    options = dict(kernel_size=5, reduction=reduction)
    logits.requires_grad_(True)
    loss = locally_adaptive_loss(logits, target, backend=backend, **options)
    grad_out = grad_out_for(loss, seed).to(device)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    assert loss.dtype == dtype and grad.dtype == dtype
    # The reference reads the same rounded logits: this measures the computation, not the
    # input's rounding.
    ref_loss, ref_grad, _, _ = lad_reference(logits.cpu(), target.cpu(), grad_out.cpu().double(),
                                             **options)
    return rel_err(loss, ref_loss), rel_err(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes", [2, 21])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tolerance_table(backend, dtype, classes, reduction):
    loss_err, grad_err = errors(backend, dtype, classes, reduction, seed=classes)
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert loss_err <= loss_tol and grad_err <= grad_tol


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_error_is_at_most_about_twice_pytorchs(dtype):
    # flash-attention's rule: the kernel may be at most ~2x as far from float64 as PyTorch itself
    # is in the same dtype (plus a quarter of the contract's tolerance, for errors near rounding level).
    loss_tol, grad_tol = TOLERANCE[dtype]
    for seed in range(2):
        fused = errors("triton", dtype, 21, "mean", seed)
        unfused = errors("torch", dtype, 21, "mean", seed)
        assert fused[0] <= 2 * unfused[0] + loss_tol / 4
        assert fused[1] <= 2 * unfused[1] + grad_tol / 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_far_from_zero(backend):
    # The fused forward pools raw logits and subtracts the pooled per-pixel means once
    # (kernels/forward.py), which rounds at the scale of the logits, not of their spread: about
    # |mean| / std float32 ulps of each z-score. Logits of spread 3 around offsets up to +-100
    # (30x the spread) still meet float32's tolerance.
    device = DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(11)
    logits = make_logits((2, 21, 6, 7), scale=3.0, seed=11)
    logits = (logits + 100 * (2 * torch.rand(2, 1, 6, 7, generator=gen) - 1)).to(device)
    target = make_target(2, 6, 7, 21, n_labels=3, seed=11, device=device)
    logits.requires_grad_(True)
    loss = locally_adaptive_loss(logits, target, backend=backend, kernel_size=5)
    (grad,) = torch.autograd.grad(loss, logits)
    ref_loss, ref_grad, _, _ = lad_reference(logits.detach().cpu().double(), target.cpu(),
                                             torch.ones((), dtype=torch.float64), kernel_size=5)
    loss_tol, grad_tol = TOLERANCE[torch.float32]
    assert rel_err(loss, ref_loss) <= loss_tol and rel_err(grad, ref_grad) <= grad_tol

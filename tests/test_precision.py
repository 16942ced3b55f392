"""SPEC's tolerance table: low-precision logits against the float64 definition."""

import pytest
import torch

from cases import TOLERANCE, grad_out_for, make_logits, make_target, rel_err
from lad_triton import locally_adaptive_loss
from oracle import lad_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("classes", [2, 21])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_tolerance_table(dtype, classes, reduction):
    logits = make_logits((2, classes, 6, 7), dtype=dtype, scale=3.0, seed=classes)
    target = make_target(2, 6, 7, classes, n_labels=3, seed=classes)
    options = dict(kernel_size=5, reduction=reduction)
    logits.requires_grad_(True)
    loss = locally_adaptive_loss(logits, target, backend="torch", **options)
    grad_out = grad_out_for(loss)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    # The reference reads the same rounded logits: this measures the computation, not the
    # input's rounding.
    ref_loss, ref_grad, _, _ = lad_reference(logits, target, grad_out.double(), **options)

    assert loss.dtype == dtype and grad.dtype == dtype
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert rel_err(loss, ref_loss) <= loss_tol
    assert rel_err(grad, ref_grad) <= grad_tol

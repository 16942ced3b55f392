"""Autocast / AMP (issue 5): half-precision logits from an autocast region are read as they are
(no float32 copy on the fused path), the loss is computed in float32 and comes back, with the
gradient, in the logits' dtype; float16 training with GradScaler works."""

import sys
from pathlib import Path

import pytest
import torch

from cases import BACKENDS, DEVICE, TOLERANCE, make_labels, rel_err
from lad_triton import LocallyAdaptiveLoss
from oracle import lad_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from workloads import peak_memory_mib  # noqa: E402


def setup(backend, classes=5, spatial=(12, 13)):
    device = torch.device(DEVICE if backend == "triton" else "cpu")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, classes, 1)).to(device)
    images = torch.randn(2, 3, *spatial, device=device)
    target = make_labels(2, spatial, classes, n_labels=3, ignore_frac=0.1, device=device)
    return device, model, images, target


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_step(backend, dtype):
    device, model, images, target = setup(backend)
    criterion = LocallyAdaptiveLoss(backend=backend, kernel_size=3)
    with torch.autocast(device.type, dtype=dtype):
        logits = model(images)
        loss = criterion(logits, target)
    assert logits.dtype == dtype and loss.dtype == dtype
    # float16 gradients of a mean over 312 pixels reach float16's subnormals (below 6.1e-5),
    # where its relative precision is gone: an upstream gradient of 2^10, as GradScaler's, as
    # bench/agreement.py does. (bfloat16 has float32's range.)
    scale = 1024.0 if dtype == torch.float16 else 1.0
    (grad,) = torch.autograd.grad(loss, logits, torch.tensor(scale, dtype=dtype, device=device))
    assert grad.dtype == dtype
    # The float64 oracle on the half-precision logits as autocast produced them, within the
    # contract's tolerance for the dtype (docs/contract.md, "Output dtype and accuracy").
    ref = lad_reference(logits.detach().cpu(), target.cpu(), kernel_size=3)
    loss_tol, grad_tol = TOLERANCE[dtype]
    assert rel_err(loss, ref.loss) <= loss_tol, (loss, ref.loss)
    assert rel_err(grad.double() / scale, ref.grad) <= grad_tol


@pytest.mark.skipif(DEVICE == "cuda", reason="the CPU allocation meter; on CUDA see bench/")
def test_fused_path_makes_no_float32_copy_of_half_logits():
    device, model, images, target = setup("triton", classes=16, spatial=(24, 24))
    criterion = LocallyAdaptiveLoss(backend="triton", kernel_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(images).detach()
    assert logits.dtype == torch.bfloat16
    copy_mib = logits.numel() * 4 / 2**20
    with torch.no_grad():  # evaluation: no P buffer either, so any float32 copy would show
        peak = peak_memory_mib(lambda: criterion(logits, target), device)
    assert peak < 0.5 * copy_mib, (peak, copy_mib)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_training_with_grad_scaler(backend):
    device, model, images, target = setup(backend)
    criterion = LocallyAdaptiveLoss(backend=backend, kernel_size=3, power=2.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        with torch.autocast(device.type, dtype=torch.float16):
            loss = criterion(model(images), target)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.float().item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses

"""What a user must know, as the README states it under "Limitations", checked: two classes under
the z-score, one NaN poisons the whole gradient."""

import warnings

import pytest
import torch
import torch.nn.functional as F

import lad_triton.functional
from cases import BACKENDS, DEVICE, make_logits, make_target
from lad_triton import locally_adaptive_loss


def gradient(logits, target, **options):
    x = logits.detach().clone().requires_grad_(True)
    locally_adaptive_loss(x, target, **options).backward()
    return x.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:locally_adaptive_loss with C=2")
def test_two_classes_under_the_zscore_train_only_near_ties(backend):
    # With C = 2 the z-scored logits are (d, -d) / sqrt(d^2 + eps), d = (x0 - x1) / 2: +-1 unless
    # |d| is ~sqrt(eps), and the Jacobian is eps / (d^2 + eps)^(3/2). So the gradient lives on
    # the few pixels whose logits nearly tie. Without the z-score it spreads over the image.
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((2, 2, 16, 16), seed=4, device=device)
    target = make_target(2, 16, 16, 2, ignore_frac=0.0, seed=4, device=device)
    gap = (logits[:, 0] - logits[:, 1]).abs().flatten().cpu()
    nearest_ties = gap.argsort()[: gap.numel() // 20]  # the 5 % closest to a tie
    for zscore, (low, high) in ((True, (0.999, 1.0)), (False, (0.0, 0.3))):
        norms = gradient(logits, target, zscore=zscore, backend=backend).pow(2).sum(1)
        share = (norms.flatten().cpu()[nearest_ties].sum() / norms.sum().cpu()).item()
        assert low <= share <= high, (zscore, share)


def test_two_classes_under_the_zscore_warn_once(monkeypatch):
    monkeypatch.setattr(lad_triton.functional, "_WARNED", set())
    logits = make_logits((1, 2, 4, 4))
    target = make_target(1, 4, 4, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # kernel_size=3: K = 5 is larger than these 4 x 4 images, which warns too
        locally_adaptive_loss(logits, target, zscore=False, kernel_size=3)
        locally_adaptive_loss(make_logits((1, 3, 4, 4)), make_target(1, 4, 4, 3), kernel_size=3)
        assert not caught
        locally_adaptive_loss(logits, target, kernel_size=3)
        locally_adaptive_loss(logits, target, kernel_size=3)
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    assert "zscore=False" in str(caught[0].message)
    assert caught[0].filename == __file__  # points at the caller's line


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_nan_logit_makes_the_whole_gradient_nan(backend):
    # The Minkowski mean couples every pixel through a = (S / M)^(1/k - 1) / M, so a NaN cost
    # reaches every pixel's gradient, ignored ones included; F.cross_entropy's stays at the pixel.
    # GradScaler skips such a step.
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((2, 4, 6, 7), seed=5, device=device)
    target = make_target(2, 6, 7, 4, ignore_frac=0.2, seed=5, device=device)
    target[1, 3, 3] = 2
    logits[1, 0, 3, 3] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        grad = gradient(logits, target, backend=backend)
    assert torch.isnan(grad).all()
    x = logits.detach().clone().requires_grad_(True)
    F.cross_entropy(x, target.long(), ignore_index=255).backward()
    assert torch.isnan(x.grad).sum() == 4  # the NaN pixel's classes only

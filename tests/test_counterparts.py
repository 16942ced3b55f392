"""Focal loss and center loss (issue 6) against independent float64 references written from
Lin et al. and Wen et al., their edge cases and bad inputs."""

import pytest
import torch
import torch.nn.functional as F

from cases import make_labels, make_logits, rel_err
from lad_triton import CenterLoss, FocalLoss, focal_loss


def focal_reference(logits, target, alpha, gamma, ignore_index=255, reduction="mean"):
    """Per-pixel loops: -alpha (1 - p_t)^gamma log p_t, mean over non-ignored pixels."""
    x = logits.detach().double().requires_grad_(True)
    batch, classes, height, width = x.shape
    terms, out = [], torch.zeros(batch, height, width, dtype=torch.float64)
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                label = int(target[b, i, j])
                if label == ignore_index:
                    continue
                p = torch.softmax(x[b, :, i, j], 0)[label]
                term = -alpha * (1 - p) ** gamma * torch.log(p)
                terms.append(term)
                out = out.index_put((torch.tensor(b), torch.tensor(i), torch.tensor(j)), term)
    if reduction == "none":
        loss = out
    else:
        total = sum(terms, torch.zeros((), dtype=torch.float64))
        loss = total / max(len(terms), 1) if reduction == "mean" else total
    return loss, x


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (1.0, 0.0), (0.5, 1.5), (0.25, 5.0)])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_focal_loss_matches_reference(alpha, gamma, reduction):
    logits = make_logits((2, 5, 4, 6), dtype=torch.float64, seed=int(gamma * 10))
    target = make_labels(2, (4, 6), 5, ignore_frac=0.3, seed=3)
    ref, x = focal_reference(logits, target, alpha, gamma, reduction=reduction)
    grad_out = torch.rand_like(ref) + 0.5
    (ref_grad,) = torch.autograd.grad(ref, x, grad_out)
    y = logits.clone().requires_grad_(True)
    loss = focal_loss(y, target, alpha=alpha, gamma=gamma, reduction=reduction)
    (grad,) = torch.autograd.grad(loss, y, grad_out)
    assert loss.dtype == torch.float64
    assert rel_err(loss, ref) < 1e-12 and rel_err(grad, ref_grad) < 1e-12


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_focal_reads_a_channel_target_as_the_loss_does(reduction):
    # check_tensors accepts (B, 1, H, W) for the LAD (issue 13); the focal loss reads it alike.
    logits = make_logits((2, 5, 4, 6), dtype=torch.float64)
    target = make_labels(2, (4, 6), 5, ignore_frac=0.3, seed=5)
    ref, _ = focal_reference(logits, target, 0.25, 2.0, reduction=reduction)
    assert rel_err(focal_loss(logits, target[:, None], reduction=reduction), ref) < 1e-12


def test_focal_with_gamma_0_and_alpha_1_is_cross_entropy():
    logits = make_logits((2, 7, 5, 6), seed=4)
    target = make_labels(2, (5, 6), 7, ignore_frac=0.2)
    ce = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.allclose(focal_loss(logits, target, alpha=1.0, gamma=0.0), ce, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_focal_loss_is_stable_in_half_precision(dtype):
    # Saturated logits: p_t rounds to 1 or to 0 in half precision; no log(0), no inf, no NaN.
    target = make_labels(2, (6, 6), 4, ignore_frac=0.1)
    onehot = F.one_hot(target.clamp(max=3), 4).permute(0, 3, 1, 2).float()
    for sign in (1.0, -1.0):
        logits = (sign * 3e4 * onehot).to(dtype).requires_grad_(True)
        loss = focal_loss(logits, target)
        loss.backward()
        assert loss.dtype == dtype and torch.isfinite(loss)
        assert torch.isfinite(logits.grad).all()
    logits = make_logits((2, 4, 6, 6), dtype=dtype, seed=2)
    reference = focal_loss(logits.double(), target)
    assert rel_err(focal_loss(logits, target), reference) < 1e-2


def test_focal_all_ignored_gives_exact_zero():
    logits = make_logits((1, 3, 4, 4)).requires_grad_(True)
    loss = FocalLoss()(logits, torch.full((1, 4, 4), 255))
    loss.backward()
    assert torch.equal(loss, torch.zeros(())) and torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("kwargs,message", [
    (dict(alpha=0.0), r"alpha must be a finite number > 0, got alpha=0\.0"),
    (dict(gamma=-1.0), r"gamma must be a finite number >= 0, got gamma=-1\.0"),
    (dict(reduction="avg"), r"reduction must be one of \('mean', 'sum', 'none'\)"),
    (dict(ignore_index=2.5), r"ignore_index must be an integer"),
])
def test_focal_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FocalLoss(**kwargs)
    with pytest.raises(ValueError, match=message):
        focal_loss(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), **kwargs)


def test_focal_bad_tensors():
    with pytest.raises(TypeError, match="logits must be a floating tensor"):
        focal_loss(torch.zeros(1, 3, 2, 2, dtype=torch.long), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got target\[0, 1, 1\]=3"):
        focal_loss(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 1], [2, 3]]]))


def center_reference(features, target, centers, lambda_c, ignore_index=255):
    x = features.detach().double().requires_grad_(True)
    total, count = torch.zeros((), dtype=torch.float64), 0
    for b in range(x.shape[0]):
        for i in range(x.shape[2]):
            for j in range(x.shape[3]):
                label = int(target[b, i, j])
                if label == ignore_index:
                    continue
                total = total + ((x[b, :, i, j] - centers[label].double()) ** 2).sum()
                count += 1
    return lambda_c / 2 * total / max(count, 1), x


def update_reference(features, target, centers, alpha, ignore_index=255):
    """Wen et al.: c_j <- c_j - alpha * sum_{i: y_i=j} (c_j - x_i) / (1 + n_j), class by class."""
    new = centers.double().clone()
    pixels = features.double().movedim(1, -1).reshape(-1, features.shape[1])
    labels = target.reshape(-1).tolist()
    for j in range(centers.shape[0]):
        members = [pixels[i] for i, label in enumerate(labels) if label == j]
        delta = sum((centers[j].double() - x for x in members), torch.zeros(centers.shape[1],
                                                                           dtype=torch.float64))
        new[j] = centers[j].double() - alpha * delta / (1 + len(members))
    return new


def test_center_loss_and_update_match_references():
    torch.manual_seed(0)
    criterion = CenterLoss(4, 6, alpha=0.5, lambda_c=0.3)
    criterion.centers.copy_(torch.randn(4, 6))
    features = torch.randn(2, 6, 5, 4, dtype=torch.float64).requires_grad_(True)
    target = make_labels(2, (5, 4), 4, ignore_frac=0.3)
    ref, x = center_reference(features, target, criterion.centers, 0.3)
    (ref_grad,) = torch.autograd.grad(ref, x)
    loss = criterion(features, target)
    (grad,) = torch.autograd.grad(loss, features)
    # float64 features: the contract's float64 tolerance (1e-6 let a wrong term of 1e-7 pass).
    # The centres are float32 parameters, upcast exactly, so the references see the same values.
    assert rel_err(loss, ref) < 1e-10 and rel_err(grad, ref_grad) < 1e-10
    expected = update_reference(features.detach(), target, criterion.centers, 0.5)
    criterion.update(features, target)
    # The update runs in the centres' dtype, float32 (a buffer): the contract's float32 1e-5.
    assert criterion.centers.dtype == torch.float32
    assert rel_err(criterion.centers, expected) < 1e-5


def test_ignored_pixels_neither_add_loss_nor_pull_centres():
    criterion = CenterLoss(3, 2)
    features = torch.randn(1, 2, 3, 3)
    target = torch.full((1, 3, 3), 255)
    assert torch.equal(criterion(features, target), torch.zeros(()))
    before = criterion.centers.clone()
    criterion.update(features * 100, target)
    assert torch.equal(criterion.centers, before)
    # A class absent from the batch keeps its centre; a present one moves towards its pixels.
    target[0, 0, 0] = 1
    criterion.update(features, target)
    assert torch.equal(criterion.centers[[0, 2]], before[[0, 2]])
    assert torch.allclose(criterion.centers[1], 0.5 * features[0, :, 0, 0] / 2)


def test_centres_are_a_buffer():
    criterion = CenterLoss(5, 3)
    assert list(criterion.parameters()) == [] and "centers" in criterion.state_dict()
    assert criterion.to(torch.float64).centers.dtype == torch.float64


@pytest.mark.parametrize("kwargs,message", [
    (dict(num_classes=0, feature_dim=3), r"num_classes must be an integer >= 1"),
    (dict(num_classes=3, feature_dim=0), r"feature_dim must be an integer >= 1"),
    (dict(num_classes=3, feature_dim=2, alpha=1.5), r"alpha must be a number in \(0, 1\]"),
    (dict(num_classes=3, feature_dim=2, lambda_c=-1.0), r"lambda_c must be a finite number >= 0"),
])
def test_center_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CenterLoss(**kwargs)


def test_center_bad_tensors():
    criterion = CenterLoss(3, 4)
    with pytest.raises(ValueError, match=r"features must have shape \(B, D=4, H, W\)"):
        criterion(torch.randn(1, 5, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="target must have the features' batch and spatial shape"):
        criterion(torch.randn(1, 4, 2, 2), torch.zeros(1, 3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"got target\[0, 0, 1\]=7"):
        criterion(torch.randn(1, 4, 1, 2), torch.tensor([[[0, 7]]]))

"""What the framework adapters need from the loss (issue 13): per-pixel weights, targets with a
channel of size 1, and reduction="sum"; both backends against the float64 oracle, their edge
cases and their bad inputs."""

import pytest
import torch

import lad_triton.functional
from cases import (BACKENDS, DEVICE, check_against_oracle, make_labels, make_logits,
                   make_pixel_weight, rel_err)
from lad_triton import LocallyAdaptiveLoss, locally_adaptive_loss
from oracle import lad_reference


def class_weights(classes, seed=0):
    gen = torch.Generator().manual_seed(seed + 11)
    return torch.rand(classes, generator=gen, dtype=torch.float64) * 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("options", [dict(kernel_size=3),
                                     dict(kernel_size=5, stride=2, power=2.3, normalizer="weight",
                                          weight=class_weights(5))])
def test_pixel_weights(backend, reduction, options):
    check_against_oracle((2, 5, 7, 8), dict(options, reduction=reduction), backend=backend,
                         n_labels=4, seed=5, pixel_weight=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_pixel_weights_with_layouts_and_half_precision(backend, layout):
    # "sliced" also makes the pixel weight a strided view.
    check_against_oracle((2, 4, 6, 7), dict(kernel_size=3, weight=class_weights(4)),
                         backend=backend, layout=layout, dtype=torch.bfloat16, n_labels=3,
                         seed=7, pixel_weight=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pixel_weights_on_volumes(backend, reduction):
    check_against_oracle((1, 3, 3, 4, 5), dict(kernel_size=3, power=1.5, reduction=reduction),
                         backend=backend, n_labels=2, seed=9, pixel_weight=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_sum_and_none_without_weights(backend, reduction):
    check_against_oracle((2, 4, 6, 5), dict(kernel_size=3, stride=2, reduction=reduction),
                         backend=backend, n_labels=2, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sum_is_the_sum_of_the_map_not_a_power_sum(backend):
    # Under power != 1 "sum" adds the weighted costs themselves: neither S = sum w L^k nor the
    # Minkowski mean times a count.
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((2, 5, 6, 7), device=device)
    target = make_labels(2, (6, 7), 5, n_labels=3, device=device)
    pixel_weight = make_pixel_weight(2, (6, 7), device=device)
    common = dict(kernel_size=3, power=3.0, backend=backend, pixel_weight=pixel_weight)
    total = locally_adaptive_loss(logits, target, reduction="sum", **common)
    cost_map = locally_adaptive_loss(logits, target, reduction="none", **common)
    assert torch.allclose(total, cost_map.sum(), rtol=1e-6)
    assert not torch.allclose(total, (cost_map ** 3).sum(), rtol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_all_zero_pixel_weights_give_exact_zero(backend, reduction):
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((1, 4, 5, 5), device=device).requires_grad_(True)
    target = make_labels(1, (5, 5), 4, ignore_frac=0.0, device=device)
    loss = locally_adaptive_loss(logits, target, pixel_weight=torch.zeros(1, 5, 5, device=device),
                                 reduction=reduction, backend=backend)
    loss.backward()
    assert torch.equal(loss, torch.zeros((), device=device))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_zero_pixel_weight_drops_the_centre_but_not_the_neighbour(backend):
    # A centre of weight 0 leaves the mean, yet its logits still pool into its neighbours' f:
    # the same loss as the mean over the other centres, taken from the cost map.
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((1, 3, 6, 6), device=device)
    target = make_labels(1, (6, 6), 3, n_labels=2, ignore_frac=0.0, device=device)
    keep = torch.ones(1, 6, 6, device=device)
    keep[0, 2:4, 1:5] = 0
    loss = locally_adaptive_loss(logits, target, kernel_size=3, pixel_weight=keep,
                                 backend=backend)
    costs = locally_adaptive_loss(logits, target, kernel_size=3, reduction="none",
                                  backend=backend)
    expected = (costs[keep > 0].double() ** 3).mean() ** (1 / 3)
    assert rel_err(loss, expected) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spatial", [(6, 7), (3, 4, 5)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_target_with_a_channel_of_one(backend, spatial, reduction):
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((2, 4) + spatial, device=device).requires_grad_(True)
    target = make_labels(2, spatial, 4, n_labels=3, dtype=torch.int16, device=device)
    options = dict(kernel_size=3, reduction=reduction, backend=backend)
    loss = locally_adaptive_loss(logits, target.unsqueeze(1), **options)
    grad_out = torch.rand_like(loss)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    ref = lad_reference(logits.detach().cpu(), target.cpu(), grad_out.cpu().double(),
                        kernel_size=3, reduction=reduction)
    assert loss.shape == ref.loss.shape
    assert rel_err(loss, ref.loss) < 1e-5 and rel_err(grad, ref.grad) < 1e-5


def test_a_channel_target_is_read_as_a_view(monkeypatch):
    seen = []
    original = lad_triton.functional.centre_weights

    def spy(target, *args, **kwargs):
        seen.append(target)
        return original(target, *args, **kwargs)

    monkeypatch.setattr(lad_triton.functional, "centre_weights", spy)
    target = make_labels(2, (5, 6), 3).unsqueeze(1)
    locally_adaptive_loss(make_logits((2, 3, 5, 6)), target, kernel_size=3)
    (read,) = seen
    assert read.shape == (2, 5, 6) and read.data_ptr() == target.data_ptr()


def test_module_forwards_pixel_weight():
    logits = make_logits((2, 4, 5, 6))
    target = make_labels(2, (5, 6), 4)
    pixel_weight = make_pixel_weight(2, (5, 6))
    criterion = LocallyAdaptiveLoss(kernel_size=3, reduction="sum")
    assert torch.equal(criterion(logits, target, pixel_weight),
                       locally_adaptive_loss(logits, target, kernel_size=3, reduction="sum",
                                             pixel_weight=pixel_weight))


def test_values_are_checked_in_the_one_host_sync(monkeypatch):
    calls = []
    for name in ("tolist", "item"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name,
                            lambda self, *a, _f=original, _n=name: calls.append(_n) or _f(self, *a))
    locally_adaptive_loss(make_logits((2, 4, 5, 6)), make_labels(2, (5, 6), 4),
                          weight=torch.rand(4), pixel_weight=make_pixel_weight(2, (5, 6)))
    assert calls == ["item"]  # one sync for the labels and both weights


LOGITS = torch.randn(2, 5, 4, 6)
TARGET = torch.randint(0, 5, (2, 4, 6))


@pytest.mark.parametrize("pixel_weight,message", [
    (torch.ones(2, 4), r"pixel_weight must have shape \(B, H, W\) = \(2, 4, 6\), got "
                       r"pixel_weight.shape=\(2, 4\)"),
    (torch.ones(2, 1, 4, 6), r"got pixel_weight.shape=\(2, 1, 4, 6\)"),
    (torch.ones(2, 4, 6, device="meta"), r"pixel_weight must be on the logits' device cpu, got "
                                         r"pixel_weight.device=meta"),
    (torch.ones(2, 4, 6, dtype=torch.int64), r"pixel_weight must be None or a floating tensor "
                                             r"of per-pixel weights, got "
                                             r"pixel_weight=torch.int64"),
    ([[1.0] * 6] * 4, r"got pixel_weight=list"),
])
def test_bad_pixel_weight_raises_value_error(pixel_weight, message):
    with pytest.raises(ValueError, match=message):
        locally_adaptive_loss(LOGITS, TARGET, pixel_weight=pixel_weight)


@pytest.mark.parametrize("bad", [-0.5, float("inf"), float("nan")])
def test_negative_or_non_finite_pixel_weight_raises(bad):
    pixel_weight = torch.ones(2, 4, 6)
    pixel_weight[1, 3, 2] = bad
    with pytest.raises(ValueError, match=rf"pixel_weight must hold finite, non-negative weights, "
                                         rf"got pixel_weight\[1, 3, 2\]={bad} \(a weight of "
                                         rf"0 leaves a pixel out as a centre\)"):
        locally_adaptive_loss(LOGITS, TARGET, pixel_weight=pixel_weight)
    # The value check is the one host sync that check_target=False skips.
    locally_adaptive_loss(LOGITS, TARGET, pixel_weight=pixel_weight, check_target=False)


@pytest.mark.parametrize("target,message", [
    (TARGET.unsqueeze(1).expand(2, 2, 4, 6),
     r"target must have shape \(B, H, W\) = \(2, 4, 6\) or \(B, 1, H, W\) to match "
     r"logits.shape=\(2, 5, 4, 6\), got target.shape=\(2, 2, 4, 6\)"),
    (TARGET[:, None, None], r"got target.shape=\(2, 1, 1, 4, 6\)"),
])
def test_target_channel_other_than_one_raises(target, message):
    with pytest.raises(ValueError, match=message):
        locally_adaptive_loss(LOGITS, target)

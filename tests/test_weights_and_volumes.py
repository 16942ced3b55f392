"""Class weights and 3-D volumes (issue 5): both backends against the float64 oracle, their
edge cases and their bad inputs."""

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cases import BACKENDS, DEVICE, check_against_oracle, make_labels, make_logits
from lad_triton import LocallyAdaptiveLoss, locally_adaptive_loss


def class_weights(classes, seed=0, zeros=1):
    gen = torch.Generator().manual_seed(seed + 7)
    w = torch.rand(classes, generator=gen, dtype=torch.float64) * 3
    w[torch.randperm(classes, generator=gen)[:zeros]] = 0.0
    return w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("options", [dict(kernel_size=3), dict(kernel_size=5, stride=2, power=2.3,
                                                                 normalizer="weight")])
def test_class_weights(backend, reduction, options):
    check_against_oracle((2, 5, 7, 8), dict(options, reduction=reduction,
                                            weight=class_weights(5)),
                         backend=backend, n_labels=4, seed=3)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_class_weights_in_low_precision(backend, dtype):
    check_against_oracle((2, 6, 7, 8), dict(kernel_size=5, weight=class_weights(6, zeros=0)),
                         backend=backend, dtype=dtype, n_labels=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_weights_of_the_present_classes_all_zero_give_exact_zero(backend):
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((1, 4, 5, 5), device=device).requires_grad_(True)
    target = make_labels(1, (5, 5), 4, n_labels=4, ignore_frac=0.0, device=device)
    weight = torch.zeros(4, device=device)
    loss = locally_adaptive_loss(logits, target, weight=weight, backend=backend)
    loss.backward()
    assert torch.equal(loss, torch.zeros((), device=device))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uniform_weights_change_nothing(backend):
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((2, 4, 6, 6), device=device)
    target = make_labels(2, (6, 6), 4, device=device)
    plain = locally_adaptive_loss(logits, target, backend=backend)
    weighted = locally_adaptive_loss(logits, target, backend=backend,
                                     weight=torch.full((4,), 2.5, device=device))
    assert torch.allclose(plain, weighted, rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("stride", [1, 2])
def test_volumes(backend, reduction, stride):
    check_against_oracle((1, 3, 4, 5, 6), dict(kernel_size=3, stride=stride, reduction=reduction),
                         backend=backend, n_labels=2, seed=stride)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_volume_layouts_weights_and_zscore_off(backend, layout):
    check_against_oracle((1, 4, 3, 4, 5), dict(kernel_size=3, zscore=False, power=1.5,
                                               weight=class_weights(4)),
                         backend=backend, layout=layout, n_labels=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_volume_window_larger_than_the_volume(backend):
    check_against_oracle((1, 2, 2, 3, 1), dict(kernel_size=5), backend=backend, ignore_frac=0.0)


@st.composite
def volume_problems(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 5)), draw(st.integers(1, 4)),
             draw(st.integers(1, 5)), draw(st.integers(1, 5)))
    options = dict(kernel_size=draw(st.sampled_from([1, 3, 5])),
                   stride=draw(st.integers(1, 2)), power=draw(st.sampled_from([1.0, 3.0])),
                   normalizer=draw(st.sampled_from(["count", "weight"])),
                   zscore=draw(st.booleans()), reduction=draw(st.sampled_from(["mean", "none"])))
    if draw(st.booleans()):
        options["weight"] = class_weights(shape[1], seed=draw(st.integers(0, 99)))
    data = dict(n_labels=draw(st.integers(1, shape[1])), ignore_frac=draw(st.sampled_from([0.0, 0.3])),
                seed=draw(st.integers(0, 2**31 - 1)))
    return shape, options, data


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_volumes(backend):
    # Interpreted, an example takes seconds: 3 drawn in CI (max(3, 200 // 70) under the "ci"
    # profile), 42 under HYPOTHESIS_PROFILE=explore (3000), after the pins, which run every time:
    # the defaults (K = 5, zscore=True) on a volume deeper than one slice (a window across
    # slices, which D = 1 draws never test), and stride 2 with D > 1 and every label ignored in
    # most windows.
    examples = (max(3, settings().max_examples // 70) if backend == "triton"
                else max(10, settings().max_examples // 4))

    @settings(max_examples=examples)
    @given(volume_problems())
    @example(((1, 3, 4, 4, 5), {}, dict(n_labels=2, ignore_frac=0.3, seed=3)))
    @example(((2, 4, 3, 5, 4), dict(kernel_size=3, stride=2, reduction="none"),
              dict(n_labels=3, ignore_frac=0.9, seed=4)))
    def check(problem):
        shape, options, data = problem
        check_against_oracle(shape, options, backend=backend, **data)

    check()


LOGITS = torch.randn(2, 5, 4, 6)
TARGET = torch.randint(0, 5, (2, 4, 6))


@pytest.mark.parametrize("weight,message", [
    (torch.ones(4), r"weight must have shape \(C,\) = \(5,\), got weight.shape=\(4,\)"),
    (torch.ones(5, 1), r"weight must have shape \(C,\) = \(5,\), got weight.shape=\(5, 1\)"),
    (torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]), r"weight must hold finite, non-negative"),
    (torch.tensor([1.0, float("inf"), 1.0, 1.0, 1.0]), r"weight must hold finite, non-negative"),
    (torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0]), r"weight must hold finite, non-negative"),
    (torch.ones(5, device="meta"), r"weight must be on the logits' device cpu, got "
                                   r"weight.device=meta"),
    (torch.ones(5, dtype=torch.int64), r"weight must be None or a floating tensor"),
    ([1.0] * 5, r"weight must be None or a floating tensor of C class weights, got weight=list"),
])
def test_bad_weight_raises_value_error(weight, message):
    with pytest.raises(ValueError, match=message):
        locally_adaptive_loss(LOGITS, TARGET, weight=weight)


@pytest.mark.parametrize("logits,target,message", [
    (torch.randn(2, 3, 4, 5, 6), torch.zeros(2, 4, 5, dtype=torch.long),
     r"target must have shape \(B, D, H, W\) = \(2, 4, 5, 6\)"),
    (torch.randn(2, 3, 4, 5, 6, 7), torch.zeros(2, 4, 5, 6, 7, dtype=torch.long),
     r"logits must be 4-D \(B, C, H, W\) or 5-D \(B, C, D, H, W\)"),
])
def test_bad_volume_shapes(logits, target, message):
    with pytest.raises(ValueError, match=message):
        locally_adaptive_loss(logits, target)


def test_module_weight_is_a_buffer_that_follows_to_and_state_dict():
    criterion = LocallyAdaptiveLoss(weight=torch.ones(5))
    assert list(criterion.parameters()) == [] and "weight" in dict(criterion.named_buffers())
    moved = criterion.to(torch.float64)
    assert moved.weight.dtype == torch.float64
    assert torch.equal(criterion.state_dict()["weight"], torch.ones(5, dtype=torch.float64))

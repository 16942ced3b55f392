"""The torch backend against the independent float64 oracle: SPEC's definition, both passes."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from cases import LAYOUTS, TARGET_DTYPES, grad_out_for, make_logits, make_target
from lad_triton import locally_adaptive_loss
from oracle import lad_reference, within


def check_against_oracle(shape, options, *, layout="contiguous", target_dtype=torch.int64,
                         ignore_frac=0.2, n_labels=None, seed=0, tol=1e-10):
    batch, classes, height, width = shape
    logits = make_logits(shape, dtype=torch.float64, layout=layout, seed=seed)
    target = make_target(batch, height, width, classes, dtype=target_dtype,
                         ignore_index=options.get("ignore_index", 255), ignore_frac=ignore_frac,
                         n_labels=n_labels, sliced=layout == "sliced", seed=seed)
    logits.requires_grad_(True)
    loss = locally_adaptive_loss(logits, target, backend="torch", **options)
    grad_out = grad_out_for(loss, seed)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    ref = lad_reference(logits, target, grad_out, **options)

    assert loss.dtype == torch.float64 and loss.shape == ref.loss.shape
    assert grad.shape == logits.shape
    # Relative error, plus float64's rounding of terms that cancel (see oracle.py): a saturated
    # cost or C = 2 under the z-score leaves a result far smaller than its terms, which no
    # float64 evaluation resolves to 1e-10 of itself. A wrong formula misses by O(||grad||).
    assert within(loss, ref.loss, ref.loss_floor, tol), (loss, ref.loss)
    assert within(grad, ref.grad, ref.grad_floor, tol)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_window_sizes(kernel_size, reduction):
    check_against_oracle((2, 4, 7, 9), dict(kernel_size=kernel_size, reduction=reduction),
                         n_labels=2, seed=kernel_size)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("power", [1.0, 2.0, 3.0, 4.5])
def test_stride_and_power(stride, power):
    check_against_oracle((2, 3, 8, 7), dict(stride=stride, power=power, kernel_size=3),
                         n_labels=2, seed=stride * 10 + int(power * 2))


@pytest.mark.parametrize("normalizer", ["count", "weight"])
@pytest.mark.parametrize("zscore", [True, False])
@pytest.mark.parametrize("weight_base", [2.0, 0.5, 3.0])
def test_normalizer_zscore_weights(normalizer, zscore, weight_base):
    check_against_oracle((1, 5, 6, 6), dict(normalizer=normalizer, zscore=zscore,
                                            weight_base=weight_base, eps=1e-3), n_labels=3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES)
def test_layouts_and_target_dtypes(layout, target_dtype):
    check_against_oracle((2, 5, 5, 6), dict(kernel_size=3), layout=layout,
                         target_dtype=target_dtype, n_labels=2)


@pytest.mark.parametrize("ignore_index", [255, -100, 0, 3])
def test_ignore_index_values(ignore_index):
    # 0 and 3 are also class ids: with them as ignore_index those classes simply are ignored.
    check_against_oracle((2, 4, 6, 6), dict(ignore_index=ignore_index, kernel_size=3),
                         target_dtype=torch.int32, ignore_frac=0.3, n_labels=3)


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (1, 3, 1, 5), (2, 2, 4, 1), (1, 4, 2, 3)])
def test_images_smaller_than_window(shape):
    check_against_oracle(shape, dict(kernel_size=7), ignore_frac=0.0)


@st.composite
def lad_problems(draw):
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 8)), draw(st.integers(1, 11)),
             draw(st.integers(1, 11)))
    options = dict(
        kernel_size=draw(st.sampled_from([1, 3, 5, 7, 9])),
        power=draw(st.sampled_from([1.0, 1.5, 2.0, 3.0, 4.25])),
        stride=draw(st.integers(1, 3)),
        ignore_index=draw(st.sampled_from([255, -100, 1])),
        eps=draw(st.sampled_from([1e-5, 1e-2])),
        weight_base=draw(st.sampled_from([2.0, 1.5, 0.5])),
        normalizer=draw(st.sampled_from(["count", "weight"])),
        zscore=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "none"])),
    )
    data = dict(
        layout=draw(st.sampled_from(LAYOUTS)),
        target_dtype=draw(st.sampled_from(TARGET_DTYPES)),
        ignore_frac=draw(st.sampled_from([0.0, 0.25, 0.9])),
        n_labels=draw(st.integers(1, shape[1])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return shape, options, data


@given(lad_problems())
def test_random_problems(problem):
    shape, options, data = problem
    check_against_oracle(shape, options, **data)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("zscore", [True, False])
def test_gradcheck(reduction, zscore):
    logits = make_logits((2, 3, 5, 4), dtype=torch.float64, seed=7).requires_grad_(True)
    target = make_target(2, 5, 4, 3, n_labels=2, seed=7)
    assert torch.autograd.gradcheck(
        lambda x: locally_adaptive_loss(x, target, kernel_size=3, power=2.5, stride=1,
                                        zscore=zscore, reduction=reduction, backend="torch"),
        (logits,))

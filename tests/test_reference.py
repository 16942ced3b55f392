"""The torch backend against the independent float64 oracle: the contract's definition, both passes.
(tests/test_fused.py holds the same checks for the fused kernels.)"""

import pytest
import torch
from hypothesis import example, given

from cases import (LAYOUTS, TARGET_DTYPES, check_against_oracle, lad_problems, make_logits,
                   make_target)
from lad_triton import locally_adaptive_loss


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


# Pinned, every run: the defaults (K = 5, power 3, zscore=True), C > 32, a window past every
# border (K = 9 on 3 x 11), every centre ignored (the loss exactly 0), windows mostly ignored.
@given(lad_problems())
@example(((2, 5, 9, 9), {}, dict(n_labels=3, seed=1)))
@example(((1, 40, 4, 5), dict(kernel_size=3), dict(n_labels=5, seed=2)))
@example(((1, 3, 3, 11), dict(kernel_size=9, stride=2), dict(n_labels=2, seed=3)))
@example(((2, 4, 4, 5), {}, dict(ignore_frac=1.0, seed=4)))
@example(((1, 4, 6, 7), dict(zscore=False), dict(ignore_frac=0.9, n_labels=2, seed=5)))
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


def test_the_zscore_avoids_var_mean():
    # On a CPU torch.var_mean over the class dimension (not the innermost) took 10x as long as
    # two means (32 ms against 3.5 ms on 8 x 21 x 128 x 128, one thread), more than
    # F.cross_entropy's whole forward + backward; the values are checked above.
    from torch.profiler import profile

    logits = make_logits((2, 5, 6, 7)).requires_grad_(True)
    target = make_target(2, 6, 7, 5)
    with profile() as prof:
        locally_adaptive_loss(logits, target, kernel_size=3, backend="torch").backward()
    ops = {event.key for event in prof.key_averages()}
    assert "aten::mean" in ops and not {"aten::var_mean", "aten::var", "aten::std"} & ops

"""The contract's edge cases: exact zeros, NaN propagation, the degenerate case, determinism."""

import pytest
import torch
import torch.nn.functional as F

from cases import BACKENDS, DEVICE, TOLERANCE, make_logits, make_target, rel_err
from lad_triton import LocallyAdaptiveLoss, locally_adaptive_loss
from oracle import lad_reference, within

DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def loss_and_grad(logits, target, grad_out=None, *, backend="torch", **options):
    """Loss and gradient on the backend's device (the fused kernels on the GPU when there is
    one), returned on the CPU."""
    device = DEVICE if backend == "triton" else "cpu"
    logits = logits.detach().to(device).requires_grad_(True)
    grad_out = None if grad_out is None else grad_out.to(device)
    loss = locally_adaptive_loss(logits, target.to(device), backend=backend, **options)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    return loss.cpu(), grad.cpu()


@pytest.mark.parametrize("zscore", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_all_ignored_gives_exact_zero(zscore, dtype, backend):
    logits = make_logits((2, 4, 5, 6), dtype=dtype)
    target = torch.full((2, 5, 6), 255, dtype=torch.uint8)
    loss, grad = loss_and_grad(logits, target, backend=backend, zscore=zscore)
    assert loss.dtype == dtype and loss.shape == ()
    assert torch.equal(loss, torch.zeros((), dtype=dtype))
    assert torch.equal(grad, torch.zeros_like(logits))


def test_valid_pixels_only_off_the_stride_grid_give_exact_zero(backend):
    logits = make_logits((1, 3, 5, 5))
    target = torch.full((1, 5, 5), 255)
    target[0, 1, 1] = target[0, 3, 2] = 2  # valid labels, but never on the stride-2 grid
    loss, grad = loss_and_grad(logits, target, backend=backend, stride=2)
    assert torch.equal(loss, torch.zeros(())) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 4, 0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_empty_batch(shape, reduction, backend):
    logits = torch.randn(shape)
    target = torch.zeros((shape[0],) + shape[2:], dtype=torch.int64)
    loss, grad = loss_and_grad(logits, target, torch.ones(()) if reduction == "mean" else
                               torch.ones((shape[0],) + shape[2:]), backend=backend,
                               reduction=reduction)
    assert loss.shape == (() if reduction == "mean" else (shape[0],) + shape[2:])
    assert torch.equal(loss, torch.zeros_like(loss))
    assert grad.shape == shape


@pytest.mark.parametrize("power", [1.0, 3.0])
def test_saturated_costs_give_zero_loss_and_zero_gradient(power, backend):
    # zscore=False with a huge margin: every L_p rounds to exactly 0, so S == 0, where a naive
    # (S / M) ** (1 / k) backward gives 0 * inf = NaN.
    target = make_target(2, 6, 6, 5, ignore_frac=0.2)
    logits = 1e4 * F.one_hot(target.clamp(max=4), 5).permute(0, 3, 1, 2).float()
    loss, grad = loss_and_grad(logits, target, backend=backend, zscore=False, power=power)
    assert torch.equal(loss, torch.zeros(()))
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("margin", [10.0, -1e4])
def test_power_of_costs_neither_underflows_nor_overflows(margin, backend):
    # zscore=False, two classes, every pixel's cost L = log(1 + exp(-margin)): 4.5e-5 (L**12
    # underflows float32 to 0) or 1e4 (L**12 overflows float32 to inf). The loss is L.
    target = torch.zeros(1, 3, 3, dtype=torch.int64)
    logits = torch.zeros(1, 2, 3, 3)
    logits[:, 0] = margin
    loss, grad = loss_and_grad(logits, target, backend=backend, kernel_size=1,
                               normalizer="weight", zscore=False, power=12.0)
    ref = lad_reference(logits, target, kernel_size=1, normalizer="weight", zscore=False,
                        power=12.0)
    expected = torch.nn.functional.softplus(torch.tensor(-margin, dtype=torch.float64))
    assert within(ref.loss, expected, ref.loss_floor, 1e-10)  # the oracle agrees with softplus
    # The float32 contract (1e-5) plus float32's rounding of the terms that cancel, derived:
    # L = logsumexp(f) - f_y from two terms of size |lse| + |f_y| (the oracle's loss_floor, 20 at
    # margin 10), each rounded to float32, so |error of L| <= ~2 eps32 (|lse| + |f_y|), 1.1e-2
    # of L = 4.5e-5 (measured: 8.3e-3, the torch backend); likewise softmax - onehot = -4.5e-5
    # from two terms of size 1 in the gradient (grad_floor). A wrong formula misses by
    # O(result), 5x this bound at margin 10 and 1e5x at -1e4.
    eps32 = torch.finfo(torch.float32).eps
    for got, want, floor in ((loss, ref.loss, ref.loss_floor), (grad, ref.grad, ref.grad_floor)):
        err = torch.linalg.vector_norm(got.double() - want).item()
        bound = (TOLERANCE[torch.float32][0] * torch.linalg.vector_norm(want).item()
                 + 4 * eps32 * torch.linalg.vector_norm(floor).item())
        assert err <= bound, (err, bound)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "none", "sum"])
@pytest.mark.parametrize("kernel_size, chunks", [(5, False), (9, False), (5, True)])
def test_non_finite_logits_propagate(bad, reduction, kernel_size, chunks, backend, monkeypatch):
    # fused: the window-row kernels (K = 5), the generic ones (K = 9), and those in class chunks
    # of 2 (the second starting at class 2)
    if chunks:
        from lad_triton.kernels import config as kernel_config

        for name, value in (("CLASS_TILE", 2), ("CHUNK_TILE", 2), ("INTERPRETER_CHUNK_SCALE", 1)):
            monkeypatch.setattr(kernel_config, name, value)
    logits = make_logits((1, 4, 5, 12))
    target = torch.ones(1, 5, 12, dtype=torch.int64)
    target[0, :, 4] = 2  # centres of another class beside the bad pixel: they must stay finite
    logits[0, 2, 2, 3] = bad
    loss, grad = loss_and_grad(logits, target, torch.ones(1, 5, 12) if reduction == "none" else
                               torch.ones(()), backend=backend, reduction=reduction,
                               kernel_size=kernel_size)
    if reduction == "sum":
        # d sum / d L = 1: the gradient is the map's with every d L = 1, non-finite where it is
        ref = lad_reference(logits, target, torch.ones(1, 5, 12, dtype=torch.float64),
                            reduction="none", kernel_size=kernel_size)
        assert torch.isnan(loss) and torch.equal(torch.isfinite(grad), torch.isfinite(ref.grad))
        gkeep = torch.isfinite(ref.grad)
        assert gkeep.any() and rel_err(grad[gkeep], ref.grad[gkeep]) <= TOLERANCE[torch.float32][1]
    elif reduction == "mean":
        # docs/contract.md: the Minkowski mean couples every pixel, so one NaN cost makes the
        # loss and *every* gradient element NaN (not just one: `not isfinite(grad).all()` let a
        # gradient with one NaN and wrong values elsewhere pass).
        assert torch.isnan(loss) and torch.isnan(grad).all()
    else:
        # The map: non-finite exactly where the oracle's is (the bad pixel's neighbours'
        # windows), and the oracle's values everywhere else.
        grad_out = torch.ones(1, 5, 12, dtype=torch.float64)
        ref = lad_reference(logits, target, grad_out, reduction=reduction,
                            kernel_size=kernel_size)
        assert torch.equal(torch.isfinite(loss), torch.isfinite(ref.loss))
        assert torch.equal(torch.isfinite(grad), torch.isfinite(ref.grad))
        assert not torch.isfinite(loss[0, 2, 3]) and torch.isfinite(loss[0, 0, 11])
        assert torch.isfinite(loss[0, :, 4]).all()
        keep, gkeep = torch.isfinite(ref.loss), torch.isfinite(ref.grad)
        assert rel_err(loss[keep], ref.loss[keep]) <= TOLERANCE[torch.float32][0]
        assert rel_err(grad[gkeep], ref.grad[gkeep]) <= TOLERANCE[torch.float32][1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_degenerate_case_is_cross_entropy(dtype, reduction, backend):
    # docs/contract.md: kernel_size=1, zscore=False, normalizer="weight", power=1 is F.cross_entropy.
    logits = make_logits((2, 7, 9, 11), dtype=dtype, seed=3)
    target = make_target(2, 9, 11, 7, ignore_frac=0.3, seed=3)
    options = dict(kernel_size=1, zscore=False, normalizer="weight", power=1.0,
                   reduction=reduction)
    grad_out = None if reduction == "mean" else torch.rand(2, 9, 11, dtype=dtype)
    loss, grad = loss_and_grad(logits, target, grad_out, backend=backend, **options)
    x = logits.detach().requires_grad_(True)
    ce = F.cross_entropy(x, target, ignore_index=255, reduction=reduction)
    (ce_grad,) = torch.autograd.grad(ce, x, grad_out)
    tol = TOLERANCE[dtype][0]
    assert rel_err(loss, ce) <= tol and rel_err(grad, ce_grad) <= tol


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_nan_at_an_ignored_pixel_stays_there_like_cross_entropy(backend):
    # The loss stays finite; the gradient is NaN at that pixel only (NaN * 0 in the z-score
    # Jacobian), exactly the pattern F.cross_entropy gives (its log_softmax backward).
    logits = make_logits((1, 3, 4, 4))
    target = torch.zeros(1, 4, 4, dtype=torch.int64)
    target[0, 1, 1] = 255
    logits[0, :, 1, 1] = float("nan")
    loss, grad = loss_and_grad(logits, target, backend=backend)
    x = logits.clone().requires_grad_(True)
    ce = F.cross_entropy(x, target, ignore_index=255)
    (ce_grad,) = torch.autograd.grad(ce, x)
    assert torch.isfinite(loss) and torch.isfinite(ce)
    assert torch.equal(torch.isfinite(grad), torch.isfinite(ce_grad))


@pytest.mark.parametrize("target_dtype", [torch.int64, torch.uint8])
def test_unchecked_out_of_range_labels_stay_in_bounds(target_dtype, backend):
    logits = make_logits((2, 5, 6, 6))
    target = make_target(2, 6, 6, 5, dtype=target_dtype, seed=4)
    target[0, 0, :3] = torch.tensor([5, 7, 200], dtype=target_dtype)
    if target_dtype == torch.int64:
        target[1, 2, 2] = -7
    loss, grad = loss_and_grad(logits, target, backend=backend, check_target=False)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bitwise_deterministic(reduction, backend):
    # Smaller for the interpreter, which runs one program at a time.
    shape = (2, 21, 17, 19) if backend == "torch" else (2, 21, 9, 13)
    logits = make_logits(shape, seed=5)
    target = make_target(shape[0], shape[2], shape[3], 21, n_labels=4, seed=5)
    grad_out = None if reduction == "mean" else torch.rand(shape[0], shape[2], shape[3])
    first = loss_and_grad(logits, target, grad_out, backend=backend, reduction=reduction)
    # The interpreter runs one program at a time: one repeat there; a GPU's scheduling varies.
    for _ in range(1 if backend == "triton" and logits.device.type == "cpu" else 2):
        again = loss_and_grad(logits, target, grad_out, backend=backend, reduction=reduction)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_output_dtype_and_gradient_layout(dtype, layout, backend):
    logits = make_logits((1, 3, 5, 6), dtype=dtype, layout=layout)
    target = make_target(1, 5, 6, 3)
    for reduction, shape in (("mean", ()), ("none", (1, 5, 6))):
        loss, grad = loss_and_grad(logits, target, torch.ones(shape, dtype=dtype),
                                   backend=backend, reduction=reduction)
        assert loss.dtype == dtype and loss.shape == shape
        assert grad.dtype == dtype and grad.shape == logits.shape
        assert grad.stride() == logits.stride()


@pytest.mark.parametrize("target_dtype", [torch.uint8, torch.int64])
@pytest.mark.parametrize("weighted", [False, True])
def test_target_gets_no_gradient_and_is_not_modified(backend, target_dtype, weighted):
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((1, 3, 4, 4), device=device).requires_grad_(True)
    target = make_target(1, 4, 4, 3, dtype=target_dtype, device=device)
    target[0, 0, 0] = 7  # out of range, allowed with check_target=False: clamped, not rewritten
    before = target.clone()
    weight = torch.ones(3, device=device) if weighted else None
    locally_adaptive_loss(logits, target, backend=backend, weight=weight,
                          check_target=False).backward()
    assert torch.equal(target, before) and logits.grad is not None


def test_evaluation_does_not_build_what_only_the_backward_needs(backend, monkeypatch):
    # Under no_grad a Function still sees needs_input_grad=True; the functional must not ask the
    # backend for the backward's tensors (P: a buffer of the logits' size).
    import lad_triton.kernels.forward as fused_forward
    import lad_triton.unfused as unfused

    module, name = (fused_forward, "forward") if backend == "triton" else (unfused, "costs_forward")
    seen = []
    original = getattr(module, name)

    def spy(*args, **kwargs):
        seen.append(kwargs["need_grad"])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((1, 3, 5, 5), device=device).requires_grad_(True)
    target = make_target(1, 5, 5, 3, device=device)
    with torch.no_grad():
        evaluated = locally_adaptive_loss(logits, target, backend=backend)
    trained = locally_adaptive_loss(logits, target, backend=backend)
    assert seen == [False, True] and torch.equal(evaluated, trained.detach())


def test_module_matches_functional_and_has_no_parameters():
    logits = make_logits((2, 4, 6, 6))
    target = make_target(2, 6, 6, 4)
    options = dict(kernel_size=3, power=2.0, stride=2, normalizer="weight", backend="torch")
    criterion = LocallyAdaptiveLoss(**options)
    assert torch.equal(criterion(logits, target), locally_adaptive_loss(logits, target, **options))
    assert list(criterion.parameters()) == []
    assert "kernel_size=3" in repr(criterion) and "normalizer='weight'" in repr(criterion)


def test_auto_backend_on_cpu_is_the_torch_backend():
    logits = make_logits((2, 4, 6, 6))
    target = make_target(2, 6, 6, 4)
    assert torch.equal(locally_adaptive_loss(logits, target),
                       locally_adaptive_loss(logits, target, backend="torch"))

"""``upsample``: the loss of logits smaller (or larger) than the target is the loss of
``F.interpolate(logits, size=<target's>, mode, align_corners)``, against an oracle that
interpolates with explicit index loops from PyTorch's source-coordinate rule (tests/oracle.py)
and then evaluates the loss in float64; the gradient reaches the low-resolution logits."""

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from cases import DEVICE, TOLERANCE, grad_out_for, make_labels, make_logits, rel_err
from lad_triton import LocallyAdaptiveLoss, locally_adaptive_loss
from oracle import interpolate_reference, lad_reference, source_index, within


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("size_in,size_out", [((3, 5), (12, 20)), ((5, 4), (13, 7)),
                                              ((1, 6), (4, 1)), ((7, 9), (4, 5)),
                                              ((2, 3, 4), (5, 7, 6))])
def test_the_oracle_interpolates_as_pytorch(size_in, size_out, align_corners):
    # The oracle's index loops are PyTorch's rule: integer and non-integer scales, sizes of 1,
    # downsampling, volumes.
    x = torch.randn((2, 3) + size_in, dtype=torch.float64)
    mode = "bilinear" if len(size_in) == 2 else "trilinear"
    expected = F.interpolate(x, size=size_out, mode=mode, align_corners=align_corners)
    assert torch.allclose(interpolate_reference(x, size_out, align_corners), expected,
                          rtol=1e-13, atol=1e-13)


@st.composite
def upsample_problems(draw, max_in=6, max_out=13, volumes=True):
    """(logits shape, target spatial size, options, seed): integer and non-integer scales, odd
    sizes, sizes of 1, the target smaller than the logits too."""
    dims = 3 if volumes and draw(st.booleans()) else 2
    size_in = tuple(draw(st.integers(1, max_in if dims == 2 else 3)) for _ in range(dims))
    if draw(st.booleans()):  # an integer scale, as a head at 1/2, 1/4 of the mask's size
        scale = draw(st.sampled_from([2, 3, 4]))
        size_out = tuple(min(n * scale, max_out if dims == 2 else 6) for n in size_in)
    else:
        size_out = tuple(draw(st.integers(1, max_out if dims == 2 else 6)) for _ in range(dims))
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 6))) + size_in
    options = dict(kernel_size=draw(st.sampled_from([1, 3, 5])),
                   power=draw(st.sampled_from([1.0, 2.0, 3.0])),
                   stride=draw(st.sampled_from([1, 2])),
                   reduction=draw(st.sampled_from(["mean", "none", "sum"])),
                   align_corners=draw(st.booleans()),
                   upsample="bilinear" if dims == 2 else "trilinear")
    return shape, size_out, options, draw(st.integers(0, 2**31 - 1))


def check_upsampled(shape, size_out, options, seed, *, backend="torch", dtype=torch.float64,
                    pixel_weight=False, weight=False):
    """The loss and low-resolution gradient of one backend against the oracle: exact
    interpolation, then the float64 loss, then the transposed interpolation of its gradient."""
    batch, classes = shape[:2]
    device = DEVICE if backend == "triton" else "cpu"
    gen = torch.Generator().manual_seed(seed)
    logits = make_logits(shape, dtype=dtype, seed=seed, device=device).requires_grad_(True)
    target = make_labels(batch, list(size_out), classes, dtype=torch.uint8, ignore_frac=0.2,
                         seed=seed, device=device)
    extra = {}
    if weight:
        extra["weight"] = (0.5 + torch.rand(classes, generator=gen, dtype=torch.float64)).to(
            dtype).to(device)
    if pixel_weight:
        extra["pixel_weight"] = torch.rand((batch,) + tuple(size_out), generator=gen,
                                           dtype=torch.float64).to(dtype).to(device)
    loss = locally_adaptive_loss(logits, target, backend=backend, **options, **extra)
    grad_out = grad_out_for(loss, seed).to(device)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)

    low = logits.detach().cpu().double().requires_grad_(True)
    high = interpolate_reference(low, size_out, options["align_corners"])
    plain = {k: v for k, v in options.items() if k not in ("upsample", "align_corners")}
    ref = lad_reference(high.detach(), target.cpu(), grad_out.cpu().double(), **plain,
                        **{k: v.cpu() for k, v in extra.items()})
    (ref_grad,) = torch.autograd.grad(high, low, ref.grad)
    # The interpolation's weights are >= 0: the rounding floor travels back the same way.
    (grad_floor,) = torch.autograd.grad(interpolate_reference(
        low, size_out, options["align_corners"]), low, ref.grad_floor)

    assert loss.dtype == dtype and loss.shape == ref.loss.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    if dtype == torch.float64:
        assert within(loss, ref.loss, ref.loss_floor, 1e-10), (loss, ref.loss)
        assert within(grad, ref_grad, grad_floor, 1e-10)
    else:  # the contract's tolerance, of the result and of the terms that cancel in it (C = 2)
        loss_tol, grad_tol = TOLERANCE[dtype]
        assert close(loss, ref.loss, ref.loss_floor, loss_tol), (loss, ref.loss)
        assert close(grad, ref_grad, grad_floor, grad_tol)
    return loss, grad


def close(actual, expected, floor, tol):
    """||actual - expected|| <= tol (||expected|| + ||floor||): the contract's relative error,
    of the result and of the terms that cancel in it (C = 2 under the z-score leaves a gradient
    far below them, which no float32 evaluation resolves to 1e-5 of itself)."""
    norm = torch.linalg.vector_norm
    return float(norm(actual.detach().double().cpu() - expected)) <= tol * float(
        norm(expected) + norm(floor))


@given(upsample_problems())
def test_torch_backend_is_the_interpolated_loss(problem):
    check_upsampled(*problem)


# Each example runs the interpreted kernels for seconds: 5 drawn under the "ci" profile.
@settings(max_examples=max(5, settings().max_examples // 40))
@given(upsample_problems(max_in=5, max_out=9, volumes=False),
       st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_fused_backend_is_the_interpolated_loss(problem, dtype):
    check_upsampled(*problem, backend="triton", dtype=dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_class_and_pixel_weights_live_on_the_target_grid(backend):
    check_upsampled((2, 5, 4, 6), (9, 11), dict(kernel_size=3, power=3.0, stride=1,
                                                reduction="mean", align_corners=False,
                                                upsample="bilinear"),
                    seed=7, backend=backend, dtype=torch.float32, pixel_weight=True,
                    weight=True)


def test_a_wrong_convention_is_caught():
    # The comparison can fail: align_corners=True scored against False's interpolation misses.
    logits = make_logits((1, 4, 3, 5), dtype=torch.float64, seed=3)
    target = make_labels(1, [9, 13], 4, seed=3)
    ours = locally_adaptive_loss(logits, target, upsample="bilinear", align_corners=True,
                                 kernel_size=3)
    other = lad_reference(interpolate_reference(logits, (9, 13), False), target,
                          kernel_size=3).loss
    assert rel_err(ours, other) > 1e-3


def test_module_and_cross_entropy_style_loop():
    # The module stores the options; a head's logits at 1/4 of the mask's size train as they
    # would after F.interpolate, and the map of reduction="none" has the target's size.
    torch.manual_seed(0)
    head = torch.nn.Conv2d(3, 5, 1).double()
    images = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    masks = torch.randint(0, 5, (2, 16, 16), dtype=torch.uint8)
    criterion = LocallyAdaptiveLoss(kernel_size=5, upsample="bilinear")
    assert "upsample='bilinear'" in repr(criterion)
    loss = criterion(head(images), masks)
    expected = locally_adaptive_loss(F.interpolate(head(images), size=(16, 16),
                                                   mode="bilinear", align_corners=False), masks)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert head.weight.grad is not None and torch.isfinite(head.weight.grad).all()
    costs = locally_adaptive_loss(head(images), masks, upsample="bilinear", reduction="none")
    assert costs.shape == (2, 16, 16)


def test_volumes_with_a_channel_target():
    # (B, 1, D, H, W) labels, as MONAI keeps them, set the size trilinear interpolates to.
    logits = make_logits((1, 3, 2, 3, 3), dtype=torch.float64, seed=5)
    labels = make_labels(1, [4, 5, 6], 3, seed=5)
    ours = locally_adaptive_loss(logits, labels[:, None], upsample="trilinear", kernel_size=3)
    ref = lad_reference(interpolate_reference(logits, (4, 5, 6), False), labels, kernel_size=3)
    assert within(ours, ref.loss, ref.loss_floor, 1e-10)


def test_empty_inputs():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = locally_adaptive_loss(logits, torch.zeros(2, 0, 8, dtype=torch.uint8),
                                 upsample="bilinear", reduction="none")
    assert loss.shape == (2, 0, 8)
    mean = locally_adaptive_loss(logits, torch.zeros(2, 0, 8, dtype=torch.uint8),
                                 upsample="bilinear")
    mean.backward()
    assert float(mean.detach()) == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    empty_batch = torch.randn(0, 3, 4, 4, requires_grad=True)
    assert float(locally_adaptive_loss(empty_batch, torch.zeros(0, 8, 8, dtype=torch.uint8),
                                       upsample="bilinear")) == 0.0


@pytest.mark.parametrize("kwargs,shapes,message", [
    (dict(upsample="nearest"), ((1, 3, 4, 4), (1, 8, 8)), "upsample must be None, 'bilinear'"),
    (dict(upsample="trilinear"), ((1, 3, 4, 4), (1, 8, 8)),
     "upsample must be 'bilinear' for 4-D logits"),
    (dict(upsample="bilinear"), ((1, 3, 2, 4, 4), (1, 4, 8, 8)),
     "upsample must be 'trilinear' for 5-D logits"),
    (dict(align_corners=True), ((1, 3, 8, 8), (1, 8, 8)), "align_corners must be False without"),
    (dict(upsample="bilinear", align_corners=1), ((1, 3, 4, 4), (1, 8, 8)),
     "align_corners must be True or False"),
    (dict(), ((1, 3, 4, 4), (1, 8, 8)), "target must have shape (B, H, W) = (1, 4, 4)"),
    (dict(upsample="bilinear"), ((2, 3, 4, 4), (1, 8, 8)),
     "target must have shape (B, H, W) or (B, 1, H, W) with B = 2, any H, W"),
    (dict(upsample="bilinear"), ((1, 3, 4, 4), (1, 2, 8, 8)), "with B = 1, any H, W"),
    (dict(upsample="bilinear"), ((1, 3, 4, 4), (8, 8)), "with B = 1, any H, W"),
    (dict(upsample="bilinear", pixel_weight=torch.ones(1, 4, 4)), ((1, 3, 4, 4), (1, 8, 8)),
     "pixel_weight must have shape (B, H, W) = (1, 8, 8)"),
    (dict(upsample="bilinear"), ((1, 3, 0, 4), (1, 8, 8)),
     "logits must have a non-empty spatial size to upsample from"),
])
def test_bad_input(kwargs, shapes, message):
    logits, target = torch.randn(shapes[0]), torch.zeros(shapes[1], dtype=torch.uint8)
    with pytest.raises(ValueError) as info:
        locally_adaptive_loss(logits, target, **kwargs)
    assert message in str(info.value)


@pytest.mark.parametrize("kwargs", [dict(upsample="nearest"), dict(align_corners=True),
                                    dict(upsample="bilinear", align_corners="yes")])
def test_the_module_refuses_bad_options_at_construction(kwargs):
    with pytest.raises(ValueError, match="upsample|align_corners"):
        LocallyAdaptiveLoss(**kwargs)


def test_under_torch_compile():
    # One graph (fullgraph=True), the eager value and gradient.
    def loss_fn(x, t):
        return locally_adaptive_loss(x, t, kernel_size=3, upsample="bilinear",
                                     align_corners=True, backend="torch")

    x = make_logits((2, 5, 4, 6), dtype=torch.float32, seed=1).requires_grad_(True)
    t = make_labels(2, [9, 11], 5, dtype=torch.uint8, seed=1)
    compiled = torch.compile(loss_fn, fullgraph=True)(x, t)
    (grad,) = torch.autograd.grad(compiled, x)
    eager = loss_fn(x, t)
    (expected,) = torch.autograd.grad(eager, x)
    assert rel_err(compiled, eager) < 1e-6 and rel_err(grad, expected) < 1e-5


# The fused kernels interpolate in registers: bilinear, the target at least the logits' size
# on both axes, the window-row kernels' problems (stride 1, K <= 7, C <= 32 or 16 in float64).
# The full-resolution logits and their gradient never exist: F.interpolate is never called and
# the autograd graph goes from the loss straight to the low-resolution logits.


@pytest.fixture
def interpolations(monkeypatch):
    """The F.interpolate calls the loss makes (the oracle interpolates by index loops). The fused
    kernels' column pass (kernels/upsample.py's columns_interpolated) is a kernel of its own, to
    a buffer of the logits' height: never the target's size, which the peak memory test
    checks."""
    calls = []
    original = F.interpolate

    def spy(*args, **kwargs):
        calls.append(kwargs.get("size"))
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "interpolate", spy)
    return calls


def in_kernels(shape, size_out, options, seed, dtype, interpolations, **extra):
    loss, grad = check_upsampled(shape, size_out, dict(options, upsample="bilinear"), seed,
                                 backend="triton", dtype=dtype, **extra)
    assert interpolations == [], "the loss interpolated with PyTorch instead of in the kernels"
    return loss, grad


@st.composite
def register_problems(draw):
    """Upsampling on both axes by integer factors (1 to 4, and 10: one input column's stencils
    almost a warp wide, so input columns shared by column tiles) or any larger size (non-integer
    scales), both conventions, the options the window-row kernels take, and the backward's
    bands of one input row or more (each band's first row summed from two programs' shares)."""
    size_in, size_out = [], []
    for _ in range(2):
        n = draw(st.integers(1, 5))
        if draw(st.booleans()):
            m = n * draw(st.sampled_from([1, 2, 3, 4, 10]))
        else:
            m = draw(st.integers(n, 3 * n + 4))
        size_in.append(n)
        size_out.append(min(m, 40))
    shape = (draw(st.integers(1, 2)), draw(st.integers(2, 7))) + tuple(size_in)
    options = dict(kernel_size=draw(st.sampled_from([3, 5, 7])),
                   power=draw(st.sampled_from([1.0, 3.0])),
                   reduction=draw(st.sampled_from(["mean", "mean", "none", "sum"])),
                   align_corners=draw(st.booleans()),
                   zscore=draw(st.booleans()),
                   normalizer=draw(st.sampled_from(["count", "weight"])))
    return (shape, tuple(size_out), options, draw(st.integers(0, 2**31 - 1)),
            draw(st.sampled_from([1, 2, 3])))


@settings(max_examples=max(8, settings().max_examples // 25))
@given(register_problems(), st.sampled_from([torch.float64, torch.float32, torch.bfloat16]))
def test_the_kernels_interpolate_in_registers(problem, dtype):
    shape, size_out, options, seed, band = problem
    from lad_triton.kernels import backward

    with pytest.MonkeyPatch.context() as patch:
        calls = []
        original = F.interpolate
        patch.setattr(F, "interpolate", lambda *a, **k: calls.append(k) or original(*a, **k))
        patch.setattr(backward, "BAND", band)
        in_kernels(shape, size_out, options, seed, dtype, calls)


@pytest.mark.parametrize("align_corners", [False, True])
def test_class_and_pixel_weights_and_many_tiles_in_registers(align_corners, interpolations):
    # 8 -> 90 columns: four tiles of 28 output columns, sharing input columns at each edge
    # (one or two, each tile's share staged), stencils up to a tile wide; 3 -> 7 rows, a
    # non-integer scale.
    in_kernels((2, 5, 3, 8), (7, 90), dict(kernel_size=5, align_corners=align_corners), 11,
               torch.float32, interpolations, pixel_weight=True, weight=True)


@pytest.mark.parametrize("rows, step", [(1, 1), (2, 2), (4, 1), (4, 2), (2, 4), (4, 4)])
def test_the_gpus_plans_in_registers(rows, step, interpolations, monkeypatch):
    # The interpreter runs HALO_ROWS_INTERPRETED centre rows per forward tile (4); a GPU runs
    # config.HALO_UPSAMPLE_PLANS' (2 or 4; 1 keeps the rows a parameter), and the backward steps
    # four, two or one output rows at a time, as the plans say: each, with the forward's tiles
    # (rows) the backward reads the tile scales by.
    from lad_triton.kernels import config

    monkeypatch.setattr(config, "HALO_ROWS_INTERPRETED", rows)
    plan = ((32, (rows,) * 3, (255,) * 3, (255,) * 3, (step,) * 3),)
    monkeypatch.setattr(config, "HALO_UPSAMPLE_PLANS", {"3.6": plan, "3.9": plan})
    in_kernels((2, 6, 4, 5), (13, 31), dict(kernel_size=5, align_corners=rows == 2), 7 + rows,
               torch.float32, interpolations, weight=True)


@pytest.mark.parametrize("band, reduction", [(1, "none"), (3, "mean"), (7, "none")])
def test_every_band_and_the_rows_two_bands_share(band, reduction, monkeypatch):
    # The interpolating backward's programs take bands of input rows (upsample.BAND: 2); the
    # first row of every band after the first is owed by both programs, which stage their
    # shares apart for _upsample_columns_kernel to add, as two column tiles do where they share
    # a column (40 output columns: two tiles). One input row per band (every row shared), 3 (a
    # last band cut short) and 7 (one band of every input row), against the float64 oracle,
    # and bitwise repeatable.
    from lad_triton.kernels import backward as kb

    monkeypatch.setattr(kb, "BAND", band)
    options = dict(kernel_size=5, upsample="bilinear", align_corners=band == 3, power=3.0,
                   reduction=reduction)
    _, grad = check_upsampled((1, 5, 7, 6), (18, 40), options, 5 + band, backend="triton",
                              dtype=torch.float32)
    logits = make_logits((1, 5, 7, 6), seed=5 + band, device=DEVICE).requires_grad_(True)
    target = make_labels(1, [18, 40], 5, dtype=torch.uint8, seed=5 + band, device=DEVICE)
    again = [torch.autograd.grad(locally_adaptive_loss(logits, target, backend="triton",
                                                       **options).sum(), logits)[0]
             for _ in range(2)]
    assert torch.equal(again[0], again[1])


def test_interpolating_plans_apply_where_they_were_compiled(monkeypatch):
    # config.HALO_UPSAMPLE_PLANS holds, per Triton, sm_90's rows and caps (compiled without spills
    # there): elsewhere, and in float64 (registers twice as wide), the plain kernels' rows and no
    # caps. Its backward steps the plan's output rows at a time on sm_90, else one. tile_plan,
    # told of upsample, gives the forward's tiles, which the forward checks against its own.
    from lad_triton.kernels import config
    from lad_triton.kernels.forward import tile_plan

    # one table per Triton (their ptxas spill at different caps), each covering C <= 32
    for plans in config.HALO_UPSAMPLE_PLANS.values():
        assert [p[0] for p in plans] == sorted(p[0] for p in plans) and plans[-1][0] == 32
    with monkeypatch.context() as patch:
        patch.setattr(config, "HALO_UPSAMPLE_PLANS",
                      {"3.6": ((32, (4,) * 3, (232,) * 3, (200,) * 3, (2,) * 3),),
                       "3.9": ((32, (2,) * 3, (128,) * 3, (255,) * 3, (4,) * 3),)})
        for new_ptxas, want in ((False, (4, 2, 232, 200)), (True, (2, 4, 128, 255))):
            patch.setattr(config, "NEW_PTXAS", new_ptxas)
            cfg = config.launch_config(21, 1, 5, torch.float32, arch=90, upsample=True)
            assert (cfg.forward_rows, cfg.backward_rows, cfg.forward_registers,
                    cfg.backward_registers) == want
    for classes in (2, 5, 16, 17, 18, 21, 24, 32):
        plan = config.upsample_plan(classes)
        for k in (3, 5, 7):
            i = (k - 3) // 2
            cfg = config.launch_config(classes, 1, k, torch.float32, arch=90, upsample=True)
            assert (cfg.forward_rows, cfg.backward_rows, cfg.forward_registers,
                    cfg.backward_registers) == (plan[1][i], plan[4][i], plan[2][i],
                                                plan[3][i])
            assert cfg.forward_rows in (2, 4) and cfg.backward_rows in (1, 2, 4)
            for arch, acc in ((80, torch.float32), (100, torch.float32), (90, torch.float64)):
                if acc == torch.float64 and classes > config.HALO_FLOAT64_CLASSES:
                    continue
                cfg = config.launch_config(classes, 1, k, acc, arch=arch, upsample=True)
                assert (cfg.halo, cfg.forward_rows) == (True, config.HALO_ROWS)
                assert cfg.backward_rows == 1
                assert cfg.forward_registers == cfg.backward_registers == config.MAX_REGISTERS
            cfg = config.launch_config(classes, 1, k, torch.float32, upsample=True,
                                       interpreted=True)
            assert cfg.forward_rows == config.HALO_ROWS_INTERPRETED
            logits = torch.empty((1, classes, 4, 4), device="meta")
            for arch, up in ((90, False), (90, True), (80, True), (None, True)):
                monkeypatch.setattr(config, "TARGET_ARCH", arch)  # None: the interpreter's
                rows = (plan[1][i] if (arch, up) == (90, True) else config.HALO_ROWS
                        if arch else config.HALO_ROWS_INTERPRETED)
                assert tile_plan(logits, kernel_size=k, stride=1,
                                 upsample=up) == f"{rows}x{32 - (k - 1)}"


def test_k_1_whose_last_lane_stores_the_column_after_it(interpolations):
    # K = 1: no halo lanes, so a tile's last output lane (lane 31) stages the share it owes the
    # input column after its stencil's first itself (_flush's TAIL); 8 -> 90 columns: three
    # tiles of 32, the first two ending inside a stencil.
    in_kernels((2, 4, 3, 8), (7, 90), dict(kernel_size=1, align_corners=False), 3,
               torch.float32, interpolations)


@pytest.mark.parametrize("w_in, w_out", [(16, 64), (8, 64), (6, 41)])
def test_the_first_columns_longer_run_in_registers(w_in, w_out, interpolations):
    # align_corners=False clamps the first output columns' sources to input column 0, so more
    # output columns start their stencil there than at any other column (6 against 4 at 4x, 12
    # against 8 at 8x): the image's first tile alone takes the shuffle-adds that run needs
    # beyond the others' (Plan.extra). Without them column 0's gradient misses the run's last
    # output columns.
    from lad_triton.kernels.upsample import Plan

    assert Plan((3, w_in), (9, w_out), False, False, 28).extra == 1
    in_kernels((2, 3, 3, w_in), (9, w_out), dict(kernel_size=5, align_corners=False,
                                                 reduction="none"), 4, torch.float32,
               interpolations)


@pytest.mark.parametrize("base", [2.0, 4.0, 100.0])
def test_the_label_as_the_softmax_reference_where_nothing_can_overflow(base, interpolations):
    # With the z-score every pooled value is bounded (|z| <= sqrt(C), times omega's largest),
    # and the interpolating forward takes the label's value as the softmax's reference instead
    # of the max where no exponential of a difference can pass 2^64 (forward.label_pivot): base
    # 2 and 4 do (4 near the bound at C = 21), 100 keeps the max. Against the oracle, with every
    # pixel's class 0 far above the others and its label's class far below them (class 1, or
    # random): exponents of up to about 30 at base 4.
    from lad_triton.kernels.forward import label_pivot

    assert label_pivot(21, 5, base, True) == (base < 100) and not label_pivot(21, 5, base, False)
    assert label_pivot(21, 5, 4.0, True) and not label_pivot(21, 5, 5.0, True)
    assert not label_pivot(21, 7, 1e-200, True)  # omega's largest past float64: no overflow
    logits = make_logits((2, 21, 4, 5), seed=9)
    logits[:, 0] += 40.0
    logits[:, 1] -= 40.0
    target = make_labels(2, [13, 17], 21, dtype=torch.uint8, ignore_frac=0.1, seed=9)
    target[(target != 255) & (target % 3 == 0)] = 1
    adversarial(logits, target, dict(kernel_size=5, weight_base=base,
                                                  align_corners=False), interpolations)


def adversarial(logits, target, options, interpolations):
    """The fused loss and its gradient on these logits and labels against the float64 oracle
    (the contract's float32 tolerance), interpolated in the kernels."""
    low = logits.to(DEVICE).requires_grad_(True)
    loss = locally_adaptive_loss(low, target.to(DEVICE), backend="triton", upsample="bilinear",
                                 **options)
    (grad,) = torch.autograd.grad(loss, low)
    assert interpolations == []
    ref_low = logits.double().requires_grad_(True)
    high = interpolate_reference(ref_low, tuple(target.shape[-2:]), options["align_corners"])
    plain = {k: v for k, v in options.items() if k != "align_corners"}
    ref = lad_reference(high.detach(), target, **plain)
    (ref_grad,) = torch.autograd.grad(high, ref_low, ref.grad)
    (grad_floor,) = torch.autograd.grad(interpolate_reference(
        ref_low, tuple(target.shape[-2:]), options["align_corners"]), ref_low, ref.grad_floor)
    loss_tol, grad_tol = TOLERANCE[torch.float32]
    assert close(loss, ref.loss, ref.loss_floor, loss_tol), (loss, ref.loss)
    assert close(grad, ref_grad, grad_floor, grad_tol)
    return loss, grad


def test_rows_wider_than_one_column_program_in_registers(interpolations):
    # 90 -> 1000 columns: 34 column tiles of 30, 33 boundaries, three programs of the column
    # sums per input row (32 input columns each).
    in_kernels((1, 3, 2, 90), (5, 1000), dict(kernel_size=3, align_corners=False), 5,
               torch.float32, interpolations)


def test_no_interpolation_node_and_bitwise_repeatable(interpolations):
    logits = make_logits((2, 6, 5, 4), seed=2, device=DEVICE).requires_grad_(True)
    target = make_labels(2, [17, 13], 6, dtype=torch.uint8, seed=2, device=DEVICE)
    grads = []
    for _ in range(2):
        loss = locally_adaptive_loss(logits, target, backend="triton", upsample="bilinear")
        # the loss's node takes the low-resolution logits themselves
        assert [type(n).__name__ for n, _ in loss.grad_fn.next_functions if n] == [
            "AccumulateGrad"]
        grads.append(torch.autograd.grad(loss, logits)[0])
    assert torch.equal(grads[0], grads[1])
    assert interpolations == []


def test_where_the_kernels_cannot_they_interpolate_first(interpolations):
    # 2 -> 64 columns under K = 5: one input column's stencils span more output columns than a
    # warp's 28 output lanes, so the backward cannot tile them: the loss interpolates first
    # when a gradient is needed, in the kernels otherwise. Downsampling, stride 2, trilinear:
    # F.interpolate always. Every way is the same function.
    shape, size_out = (1, 4, 3, 2), (5, 64)
    options = dict(kernel_size=5, align_corners=False, upsample="bilinear", power=3.0,
                   stride=1, reduction="mean")
    loss, _ = check_upsampled(shape, size_out, options, 5, backend="triton",
                              dtype=torch.float32)
    assert interpolations == [(5, 64)]
    logits = make_logits(shape, seed=5, device=DEVICE)
    target = make_labels(1, list(size_out), 4, dtype=torch.uint8, seed=5, device=DEVICE)
    with torch.no_grad():
        again = locally_adaptive_loss(logits, target, backend="triton", kernel_size=5,
                                      upsample="bilinear")
    assert interpolations == [(5, 64)] and rel_err(again, loss) < 1e-6
    for shape, size_out, extra in [((1, 4, 6, 6), (9, 4), {}), ((1, 4, 3, 3), (7, 7),
                                                                dict(stride=2))]:
        check_upsampled(shape, size_out, dict(options, **extra), 6, backend="triton",
                        dtype=torch.float32)
        assert interpolations[-1] == size_out


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy meets the NaN
# Without the z-score, only NaN: there the fused kernels take a pixel with an infinite logit
# as non-finite in every class (one flag per pixel), where the oracle and the torch backend
# keep IEEE arithmetic per class (-inf in a class not the label's: a finite loss). That holds
# at full resolution too (docs/performance.md, "Limitations in detail").
@pytest.mark.parametrize("zscore, bad", [(True, float("nan")), (True, float("inf")),
                                         (True, float("-inf")), (False, float("nan"))])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_non_finite_low_resolution_logit_spreads_as_after_f_interpolate(zscore, bad,
                                                                           align_corners,
                                                                           backend):
    # One bad logit at a head's pixel is non-finite in every output pixel whose stencil holds
    # that pixel (PyTorch blends with weight 0 too), and the loss map and the gradient are
    # non-finite exactly where the float64 oracle's are, its values elsewhere. The kernels'
    # column pass centres each pixel's classes, which turns one infinite class into a pixel
    # of NaN and -inf: the pattern must not change for that.
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits((1, 4, 7, 8), seed=11)
    logits[0, 1, 1, 2] = bad
    target = make_labels(1, [17, 19], 4, n_labels=2, ignore_frac=0.0, seed=11)
    options = dict(upsample="bilinear", align_corners=align_corners, kernel_size=5,
                   zscore=zscore, reduction="none")
    low = logits.to(device).requires_grad_(True)
    loss = locally_adaptive_loss(low, target.to(device), backend=backend, **options)
    grad_out = grad_out_for(loss, 11)
    (grad,) = torch.autograd.grad(loss, low, grad_out)

    ref_low = logits.double().requires_grad_(True)
    high = interpolate_reference(ref_low, (17, 19), align_corners)
    ref = lad_reference(high.detach(), target, grad_out.cpu().double(), kernel_size=5,
                        zscore=zscore, reduction="none")
    (ref_grad,) = torch.autograd.grad(high, ref_low, ref.grad)
    loss, grad = loss.detach().cpu(), grad.cpu()
    keep, gkeep = torch.isfinite(ref.loss), torch.isfinite(ref_grad)
    assert not keep.all() and keep.any() and not gkeep.all() and gkeep.any()
    assert torch.equal(torch.isfinite(loss), keep)
    assert torch.equal(torch.isfinite(grad), gkeep)
    assert rel_err(loss[keep], ref.loss[keep]) <= TOLERANCE[torch.float32][0]
    assert rel_err(grad[gkeep], ref_grad[gkeep]) <= TOLERANCE[torch.float32][1]


def test_the_footprints_and_what_fits_a_warp():
    # Each input column's first and last output column (its stencils', zero weights included)
    # against a brute-force count, and "fits": no column's stencils wider than a warp's output
    # lanes, so that at most two of the backward's column tiles share a column.
    from lad_triton.kernels.upsample import Plan, _axis, _footprint

    seen = set()
    for n, m, align_corners, lanes in [(65, 513, True, 28), (256, 1024, False, 28),
                                       (5, 17, False, 26), (2, 64, False, 28), (7, 7, True, 30),
                                       (3, 41, True, 28), (3, 43, False, 28), (2, 27, True, 28)]:
        i0, i1, _ = _axis(n, m, align_corners, False)
        first, last = _footprint(i0, i1, n)
        widths = []
        for j in range(n):
            cols = [q for q in range(m) if j in (i0[q], i1[q])]
            assert (first[j], last[j]) == (cols[0], cols[-1])
            widths.append(len(range(cols[0], cols[-1] + 1)))
        fits = Plan((1, n), (1, m), align_corners, False, lanes).fits
        assert fits is (max(widths) <= lanes)
        seen.add(fits)
    assert seen == {True, False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n,m", [(65, 513), (128, 512), (5, 17), (7, 7), (1, 9), (3, 1000)])
def test_the_kernels_tables_are_pytorchs_weights(n, m, align_corners, dtype):
    # The kernels' indices and weights, computed in plain Python in PyTorch's precision,
    # reproduce F.interpolate along an axis (to its rounding) and the oracle's rule.
    from lad_triton.kernels.upsample import _axis

    i0, i1, lam = _axis(n, m, align_corners, dtype == torch.float64)
    x = torch.randn(1, 1, 1, n, dtype=dtype, generator=torch.Generator().manual_seed(n + m))
    expected = F.interpolate(x, size=(1, m), mode="bilinear", align_corners=align_corners)[0, 0, 0]
    lam_ = torch.tensor(lam, dtype=dtype)
    ours = (1 - lam_) * x[0, 0, 0, i0] + lam_ * x[0, 0, 0, i1]
    # a source coordinate near n carries n ulps of its own: that is the rounding allowed
    eps = torch.finfo(dtype).eps
    assert torch.allclose(ours, expected, rtol=0, atol=4 * eps * n * float(x.abs().max()))
    # as dense weights (a source coordinate on an integer may round to either side of it)
    ours, rule = torch.zeros(m, n, dtype=torch.float64), torch.zeros(m, n, dtype=torch.float64)
    for q in range(m):
        j0, j1, w1 = source_index(q, n, m, align_corners)
        rule[q, j0] += 1 - w1
        rule[q, j1] += w1
        ours[q, i0[q]] += 1 - lam[q]
        ours[q, i1[q]] += lam[q]
    assert float((ours - rule).abs().max()) <= 4 * eps * max(1, n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("n,m", [(65, 513), (128, 512), (5, 17), (7, 7), (1, 9), (3, 1000)])
def test_the_kernels_row_blend_is_pytorchs_with_its_larger_weight_factored(n, m, align_corners,
                                                                            dtype):
    # The kernels blend an output row as f (x[ia] + rho x[ib]): one multiply-add per class, f
    # riding on the z-score's factor per pixel. Its rows are PyTorch's two, the larger weight
    # f = max(1 - l, l) in [1/2, 1] comes first and rho <= 1 is the other over it, so that in
    # the accumulation dtype it reproduces (1 - l) x[i0] + l x[i1] to a few roundings.
    from lad_triton.kernels.upsample import _axis, _factored

    wide = dtype == torch.float64
    i0, i1, lam = _axis(n, m, align_corners, wide)
    ia, ib, rho, f = _factored(i0, i1, lam, wide)
    assert all(sorted(pair) == [a, b] for pair, a, b in zip(zip(ia, ib), i0, i1))
    one_less = [float(torch.tensor(1 - l, dtype=dtype)) for l in lam]  # rounded as PyTorch's
    assert all(0.5 <= v <= 1 and v == max(h, l) for v, h, l in zip(f, one_less, lam))
    assert all(0 <= r <= 1 for r in rho)
    assert any(a != b and a == j for a, b, j in zip(ia, ib, i1)) or m <= n or n == 1  # swaps
    x = torch.randn(n, dtype=dtype, generator=torch.Generator().manual_seed(n * m))
    lam_, rho_, f_ = (torch.tensor(v, dtype=dtype) for v in (lam, rho, f))
    ours = f_ * (x[ia] + rho_ * x[ib])
    theirs = (1 - lam_) * x[i0] + lam_ * x[i1]
    eps = torch.finfo(dtype).eps
    assert torch.allclose(ours, theirs, rtol=0, atol=4 * eps * float(x.abs().max()))


def test_the_backward_bands_hold_about_16_output_rows():
    # The interpolating backward's grid: bands of about 16 output rows, what models fastest at
    # both benchmark workloads (2 input rows at DeepLab-like 8x, 4 at SegFormer-like 4x),
    # never empty nor past the input's rows. (Correctness holds at every band: the tests
    # above set BAND to 1, 2, 3 and 7.)
    from lad_triton.kernels.upsample import band_rows

    assert band_rows(65, 513) == 2 and band_rows(128, 512) == 4
    for h_in in range(1, 40):
        for h in (h_in, 2 * h_in + 1, 4 * h_in, 16 * h_in, 64 * h_in):
            band = band_rows(h_in, h)
            assert 1 <= band <= h_in
            if 1 < band < h_in:  # not held to a bound: the output rows nearest 16
                assert abs(band * h / h_in - 16) <= h / h_in / 2 + 1e-9


@pytest.mark.parametrize("power", [2.0, 2.5, 4.0])
def test_every_minkowski_exponent_in_registers(power, interpolations):
    # The interpolating forward takes a centre's (L / t)^(k-1) as products for k = 2, 3 and 4
    # (a compile-time specialisation: kernels.forward.small_power) and by a log and an exp
    # otherwise; the problems above draw k = 1 and 3.
    from lad_triton.kernels.forward import small_power

    assert small_power(power) == (int(power) - 1 if power in (2.0, 4.0) else 0)
    in_kernels((2, 5, 4, 6), (13, 17), dict(kernel_size=5, power=power, align_corners=False,
                                            reduction="mean"), int(10 * power), torch.float32,
               interpolations)


@pytest.mark.parametrize("power", [1.0, 3.0])
def test_tiles_of_zero_costs_in_the_gradient_formed_in_the_forward(power):
    # Without the z-score a label leading by far costs exactly 0: a forward tile of such
    # centres has max L t = 0, whose share of the mean's gradient the interpolating backward
    # takes as 2^((k - 1)(log2 t - log2 max L)): 0 for k > 1, and for k = 1 (0^0 = 1) a product
    # 0 * -inf it must not form (a NaN would reach every pixel of the same class nearby).
    gen = torch.Generator().manual_seed(int(power))
    logits = torch.randn(1, 3, 4, 16, generator=gen, dtype=torch.float64)
    logits[:, 0, :, :9] = 500.0  # class 0 far ahead on the left
    target = torch.randint(0, 3, (1, 16, 64), generator=gen)
    target[:, :, :32] = 0
    options = dict(kernel_size=3, power=power, zscore=False, upsample="bilinear",
                   align_corners=False)
    low = logits.float().to(DEVICE).requires_grad_(True)
    loss = locally_adaptive_loss(low, target.to(DEVICE), backend="triton", **options)
    (grad,) = torch.autograd.grad(loss, low)

    ref_low = logits.clone().requires_grad_(True)
    high = interpolate_reference(ref_low, (16, 64), False)
    ref = lad_reference(high.detach(), target, kernel_size=3, power=power, zscore=False)
    (ref_grad,) = torch.autograd.grad(high, ref_low, ref.grad)
    (grad_floor,) = torch.autograd.grad(interpolate_reference(ref_low, (16, 64), False), ref_low,
                                        ref.grad_floor)
    assert torch.isfinite(grad).all() and float(grad.abs().max()) > 0
    assert close(loss, ref.loss, ref.loss_floor, TOLERANCE[torch.float32][0])
    assert close(grad, ref_grad, grad_floor, TOLERANCE[torch.float32][1])
    # whole forward tiles cost 0: the centres of the first 30 columns (the first tile's 30 at
    # K = 3, as many as 4 rows and their window reach) have class 0 far ahead
    high32 = F.interpolate(logits, size=(16, 64), mode="bilinear")[0]
    assert bool((high32[0, :, :31] - high32[1:, :, :31].amax(0) > 300).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("w_in, w_out", [(5, 37), (9, 9), (3, 64)])
def test_the_column_pass_buffer_is_the_column_blend_less_its_class_mean(w_in, w_out,
                                                                          align_corners, dtype):
    # The kernels read the logits blended along the columns (PyTorch's column weights) with each
    # pixel's class mean taken out, in blocks of 32 columns: (B, h, cdiv(W, 32), C + 1, 32), the
    # last row a flag: 0 where the pixel is finite, NaN where not, and then its classes 0. The
    # loss itself cannot see the mean (it counts only differences between classes); the
    # kernels' z-score takes it for 0, so a buffer that kept it fails the loss tests too, and
    # this test pins the buffer itself.
    from lad_triton.kernels.upsample import columns_interpolated

    batch, classes, h = 2, 7, 3
    logits = make_logits((batch, classes, h, w_in), dtype=dtype, seed=w_in + w_out)
    bad = logits.clone()
    bad[0, 2, 1, w_in // 2] = float("nan")
    bad[1, 0, 2, 0] = float("inf")
    with torch.no_grad():
        got, got_bad = (columns_interpolated(x.to(DEVICE), (2 * h, w_out), align_corners, 5).cpu()
                        for x in (logits, bad))
    blocks = -(-w_out // 32)
    assert got.shape == (batch, h, blocks, classes + 1, 32)
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    got, got_bad = (x.permute(0, 1, 2, 4, 3).reshape(batch, h, blocks * 32, classes + 1)
                    [:, :, :w_out] for x in (got, got_bad))
    # the flags: NaN exactly where F.interpolate's column blend of the bad logits, row by row,
    # is not finite (a weight of 0 spreads a NaN too; a width it keeps, it copies)
    rows = bad.double().permute(0, 2, 1, 3).reshape(batch * h, classes, 1, w_in)
    blend_bad = F.interpolate(rows, size=(1, w_out), mode="bilinear", align_corners=align_corners)
    not_finite = ~torch.isfinite(blend_bad).all(dim=1).reshape(batch, h, w_out)
    assert not_finite.any() and not not_finite.all()
    assert torch.equal(torch.isnan(got_bad[..., -1]), not_finite)
    assert bool((got_bad[..., -1][~not_finite] == 0).all())
    assert bool((got_bad[..., :-1][not_finite] == 0).all())
    assert torch.equal(got_bad[..., :-1][~not_finite], got[..., :-1][~not_finite])
    assert bool((got[..., -1] == 0).all())
    got = got[..., :-1]
    blend = interpolate_reference(logits.double(), (h, w_out), align_corners)
    expected = (blend - blend.mean(dim=1, keepdim=True)).permute(0, 2, 3, 1)
    assert torch.isfinite(got).all()
    # one rounding of the blend, of the mean and of the difference: a few ulps of the logits
    eps = torch.finfo(got.dtype).eps
    err = float((got.double() - expected).abs().max())
    assert err <= 8 * eps * float(logits.double().abs().max()), err
    assert float(got.double().sum(dim=-1).abs().max()) <= 8 * classes * eps * float(
        logits.double().abs().max())


def test_the_fused_loss_on_low_resolution_logits_under_torch_compile():
    # One graph: the kernels' plan is decided in plain Python while tracing.
    def loss_fn(x, t):
        return locally_adaptive_loss(x, t, kernel_size=3, upsample="bilinear",
                                     align_corners=True, backend="triton")

    x = make_logits((2, 5, 4, 6), seed=1, device=DEVICE).requires_grad_(True)
    t = make_labels(2, [9, 11], 5, dtype=torch.uint8, seed=1, device=DEVICE)
    compiled = torch.compile(loss_fn, fullgraph=True)(x, t)
    (grad,) = torch.autograd.grad(compiled, x)
    eager = loss_fn(x, t)
    (expected,) = torch.autograd.grad(eager, x)
    assert torch.equal(compiled, eager) and torch.equal(grad, expected)


def test_peak_memory_is_half_a_P_not_the_full_resolution_logits_and_gradient():
    # Forward + backward on 1/4-resolution logits: the fused mean forms the gradient in the
    # forward, half the batch at a time, so its peak is P (the target's size in the logits'
    # dtype) of one half, that half's logits interpolated along the columns (the rows the
    # kernels blend: 1/4 of the target's size) and staged shares of the low-resolution
    # gradient, and the first half's low-resolution gradient G; F.interpolate +
    # F.cross_entropy keeps the upsampled logits' log-probabilities, their gradient and the
    # logits' gradient (3x). A design that kept P for the whole batch, or materialised the
    # upsampled logits or their gradient, would reach 1x or 2x.
    # CPU: allocation events; CUDA: max_memory_allocated.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    from workloads import peak_memory_mib

    from lad_triton.fused import GRADIENT_PARTS

    high = (33, 33) if DEVICE == "cpu" else (257, 257)
    logits = make_logits((2, 21, 9, 9) if DEVICE == "cpu" else (2, 21, 65, 65), device=DEVICE)
    logits.requires_grad_(True)
    target = make_labels(2, list(high), 21, dtype=torch.uint8, device=DEVICE)

    def fused():
        return torch.autograd.grad(locally_adaptive_loss(
            logits, target, backend="triton", upsample="bilinear", check_target=False), logits)

    def cross_entropy():
        upsampled = F.interpolate(logits, size=high, mode="bilinear", align_corners=False)
        return torch.autograd.grad(F.cross_entropy(upsampled, target.long(), ignore_index=255),
                                   logits)

    size = logits.element_size() / 2**20
    full = 2 * 21 * high[0] * high[1] * size
    ours, theirs = (peak_memory_mib(run, torch.device(DEVICE)) for run in (fused, cross_entropy))
    # one part's P (padded to blocks of 32 pixels), columns (float32, in blocks of 32 columns:
    # 33 -> 64 here; one buffer of each serves every part) and staged shares of the
    # low-resolution gradient (float32, per input row, column tile of 28, input column a tile
    # touches (at most 9 at both sizes: 28 output columns reach 7 input columns and a part of 2
    # more) and class, and again per band of input rows: the band above's share), the first
    # part's float32 gradient G kept for the backward, and a little more
    from lad_triton.kernels.upsample import band_rows

    images = math.ceil(2 / GRADIENT_PARTS)
    assert images == 1
    h_in, tiles = logits.shape[2], math.ceil(high[1] / 28)
    padded = images * 21 * math.ceil(high[0] * high[1] / 32) * 32 * size
    bands = math.ceil(h_in / band_rows(h_in, high[0]))
    staged = images * (h_in + bands) * tiles * 9 * 21 * 4 / 2**20
    columns = images * 22 * h_in * math.ceil(high[1] / 32) * 32 * 4 / 2**20  # blocks, flags
    expected = padded + columns + staged + logits[:images].numel() * 4 / 2**20
    assert expected <= ours <= 1.03 * expected and theirs >= 2.9 * full, (ours, expected, theirs)
    assert ours <= theirs / 3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("parts", [1, 2, 3])
def test_the_gradient_formed_in_the_forward_part_by_part(parts, dtype, interpolations,
                                                         monkeypatch):
    # The mean on low-resolution logits forms its gradient in the forward, part by part of the
    # batch, each part's against the part's own max L, then scales each part by a (M_i / M)^(k-1)
    # in the backward. Image 1's logits are sharpened so that its costs dwarf the others' (M_i / M
    # far from 1): a factor missing, wrong, or applied to another part's images is off by orders
    # of magnitude there (without the z-score, which would undo the sharpening). 3 images: one
    # part of 3, parts of 2 + 1, three of 1; class weights, ignored pixels, power 3, an upstream
    # gradient of 0.7.
    from lad_triton import fused

    monkeypatch.setattr(fused, "GRADIENT_PARTS", parts)
    logits = make_logits((3, 4, 4, 5), dtype=torch.float64, seed=parts, device=DEVICE)
    logits[1] *= 20
    logits = logits.to(dtype).requires_grad_(True)
    target = make_labels(3, [11, 13], 4, dtype=torch.uint8, ignore_frac=0.2, seed=parts,
                         device=DEVICE)
    weight = torch.tensor([0.5, 1.5, 1.0, 2.0], dtype=dtype, device=DEVICE)
    options = dict(kernel_size=5, power=3.0, zscore=False, upsample="bilinear",
                   align_corners=False, weight=weight, backend="triton")
    loss = locally_adaptive_loss(logits, target, **options)
    (grad,) = torch.autograd.grad(0.7 * loss, logits)
    assert interpolations == [] and grad.dtype == dtype

    low = logits.detach().cpu().double().requires_grad_(True)
    high = interpolate_reference(low, (11, 13), False)
    ref = lad_reference(high.detach(), target.cpu(), torch.tensor(0.7, dtype=torch.float64),
                        kernel_size=5, power=3.0, zscore=False, weight=weight.cpu())
    (ref_grad,) = torch.autograd.grad(high, low, ref.grad)
    (floor,) = torch.autograd.grad(interpolate_reference(low, (11, 13), False), low,
                                   ref.grad_floor)
    per_image = [float(g.abs().sum()) for g in ref_grad]
    assert per_image[1] > 100 * max(per_image[0], per_image[2]), per_image
    tol = 1e-10 if dtype == torch.float64 else TOLERANCE[dtype][1]
    for b in range(3):  # each image against its own size: image 1's would hide the others'
        assert close(grad[b], ref_grad[b], floor[b], tol), b
    # The loss is the whole batch's partials combined, bitwise what the forward alone gives.
    with torch.no_grad():
        assert torch.equal(loss, locally_adaptive_loss(logits, target, **options))


def test_the_gradient_formed_in_the_forward_is_kept_once_and_differentiable_once(
        interpolations):
    # The backward only scales what the forward kept: a second backward (retain_graph) gives the
    # same gradient, and a gradient of the gradient raises rather than returning one without the
    # logits' graph (the kernels' gradient has no formula of its own): a gradient penalty added
    # to a term that has a graph would otherwise contribute nothing, silently.
    logits = make_logits((2, 3, 3, 4), device=DEVICE).requires_grad_(True)
    target = make_labels(2, [7, 9], 3, seed=5, device=DEVICE)
    loss = locally_adaptive_loss(logits, target, kernel_size=3, upsample="bilinear",
                                 backend="triton")
    first = torch.autograd.grad(loss, logits, retain_graph=True)[0]
    assert torch.equal(torch.autograd.grad(loss, logits)[0], first)
    for upstream in (None, torch.ones((), device=DEVICE, requires_grad=True)):
        (grad,) = torch.autograd.grad(locally_adaptive_loss(
            logits, target, kernel_size=3, upsample="bilinear", backend="triton"), logits,
            upstream, create_graph=True)
        assert torch.equal(grad.detach(), first) and grad.requires_grad
        penalty = (logits ** 2).sum() + grad.pow(2).sum()
        with pytest.raises(RuntimeError, match="no second derivative"):
            penalty.backward()


@pytest.mark.parametrize("strides", [(3 * (2**30 + 1), 2**30 + 1, 9, 1), (2**32, 1, 2**30 + 1, 3),
                                     (1, 3, 9, 2**28)])
def test_low_resolution_logits_past_2_to_the_31_in_registers(strides, interpolations,
                                                             monkeypatch):
    # Views into an 8 GiB float32 storage (virtual: only the touched pages are allocated) of
    # logits as wide as the target (rows upsampled only): the column pass reads them through
    # their strides with int64 offsets and copies them into its compact blocks, which the
    # kernels then read with 32-bit ones (the wide flag each launch chose is recorded), forward
    # and interpolating backward: bitwise the dense result. Their int64 offsets (a column buffer
    # past 2^30 elements per image) are forced on the dense logits: bitwise the same again.
    from lad_triton.kernels import backward as kernels_backward
    from lad_triton.kernels import forward as kernels_forward

    wide, forced = [], []
    for module in (kernels_forward, kernels_backward):
        def spy(*spans, original=module.needs_wide_index):
            wide.append(original(*spans))
            return wide[-1] or bool(forced)

        monkeypatch.setattr(module, "needs_wide_index", spy)
    shape = (1, 3, 3, 9)
    storage = torch.empty(2**31 + 4096, dtype=torch.float32, device=DEVICE)
    logits = storage.as_strided(shape, strides)
    dense = make_logits(shape, seed=12, device=DEVICE)
    logits.copy_(dense)
    target = make_labels(1, [7, 9], 3, n_labels=2, seed=12, device=DEVICE)
    results = []
    for x in (logits.detach().requires_grad_(True), dense.detach().requires_grad_(True)):
        loss = locally_adaptive_loss(x, target, kernel_size=3, backend="triton",
                                     upsample="bilinear", align_corners=True)
        results.append((loss, torch.autograd.grad(loss, x)[0]))
    assert wide == [False] * 4  # forward, backward; strided, then dense
    forced.append(True)
    x = dense.detach().requires_grad_(True)
    loss = locally_adaptive_loss(x, target, kernel_size=3, backend="triton",
                                 upsample="bilinear", align_corners=True)
    results.append((loss, torch.autograd.grad(loss, x)[0]))
    for loss, grad in results[:1] + results[2:]:
        assert torch.equal(loss, results[1][0]) and torch.equal(grad, results[1][1])
    assert interpolations == []


@pytest.mark.parametrize("width", [10, 3])
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
def test_any_layout_in_registers(layout, width, interpolations):
    # The logits are read through their strides (by the column pass, which copies them where
    # the target is as wide as they are) and their gradient written in their memory format.
    logits = make_logits((2, 5, 4, 3), layout=layout, seed=4, device=DEVICE)
    target = make_labels(2, [11, width], 5, dtype=torch.int16, seed=4, device=DEVICE)
    dense = logits.contiguous()
    out = []
    for x in (logits.detach().requires_grad_(True), dense.detach().requires_grad_(True)):
        loss = locally_adaptive_loss(x, target, kernel_size=5, backend="triton",
                                     upsample="bilinear")
        out.append((loss, torch.autograd.grad(loss, x)[0]))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    if layout == "channels_last":
        assert out[0][1].is_contiguous(memory_format=torch.channels_last)
    assert interpolations == []


@pytest.mark.parametrize("band", [1, 2, 3])
@pytest.mark.parametrize("rows", [(4, 38), (2, 83), (8, 24)])
def test_a_last_input_row_that_is_only_ever_an_i1(rows, band, interpolations, monkeypatch):
    # align_corners=True's float32 scale can round below (n - 1) / (m - 1): the last output row
    # then has i0 = n - 2, and input row n - 1 is only ever an i1. The backward must still
    # store it: in a band of its own (band 1; 3 at n = 4) only the band above's share,
    # the band itself forming no output row; else as its band's last row.
    from lad_triton.kernels import backward, upsample

    n, m = rows
    assert upsample._axis(n, m, True, False)[0][-1] == n - 2  # the case this test is for
    monkeypatch.setattr(backward, "BAND", band)
    in_kernels((2, 4, n, 3), (m, 7), dict(kernel_size=3, align_corners=True, power=3.0,
                                           stride=1, reduction="mean"),
               n + m, torch.float32, interpolations)

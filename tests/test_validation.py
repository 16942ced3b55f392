""""Bad input" of docs/contract.md: every misuse raises the stated exception, naming the argument, what was
expected and what it got."""

import re
import warnings

import pytest
import torch

from lad_triton import LocallyAdaptiveLoss, locally_adaptive_loss

LOGITS = torch.randn(2, 5, 4, 6)
TARGET = torch.randint(0, 5, (2, 4, 6))

BAD_OPTIONS = [
    ("kernel_size", 4, r"kernel_size must be an odd integer >= 1.*got kernel_size=4"),
    ("kernel_size", 0, r"got kernel_size=0"),
    ("kernel_size", -3, r"got kernel_size=-3"),
    ("kernel_size", 5.0, r"got kernel_size=5\.0"),
    ("kernel_size", True, r"got kernel_size=True"),
    ("power", 0.5, r"power must be a finite number >= 1.*got power=0\.5"),
    ("power", float("inf"), r"got power=inf"),
    ("power", float("nan"), r"got power=nan"),
    ("stride", 0, r"stride must be an integer >= 1.*got stride=0"),
    ("stride", 1.5, r"got stride=1\.5"),
    ("ignore_index", 2.5, r"ignore_index must be an integer, got ignore_index=2\.5"),
    ("eps", 0.0, r"eps must be a finite number > 0, got eps=0\.0"),
    ("eps", -1e-5, r"got eps=-1e-05"),
    ("eps", float("nan"), r"got eps=nan"),
    ("weight_base", 0.0, r"weight_base must be a finite number > 0.*got weight_base=0\.0"),
    ("weight_base", -2.0, r"got weight_base=-2\.0"),
    ("reduction", "max", r"reduction must be one of \('mean', 'sum', 'none'\), "
                         r"got reduction='max'"),
    ("normalizer", "area", r"normalizer must be one of \('count', 'weight'\).*'area'"),
    ("backend", "cuda", r"backend must be one of \('auto', 'torch', 'triton'\).*'cuda'"),
    ("zscore", 1, r"zscore must be True or False, got zscore=1"),
    ("check_target", "yes", r"check_target must be True or False"),
    ("pooling", "max", r"pooling must be one of \('minkowski', 'lmp', 'topk'\), got pooling='max'"),
    ("lmp_ratio", 0.0, r"lmp_ratio must be a number in \(0, 1\].*got lmp_ratio=0\.0"),
    ("lmp_ratio", 1.5, r"got lmp_ratio=1\.5"),
    ("lmp_ratio", float("nan"), r"got lmp_ratio=nan"),
    ("lmp_p", 1.0, r"lmp_p must be a finite number > 1.*got lmp_p=1\.0"),
    ("lmp_p", float("inf"), r"got lmp_p=inf"),
    ("topk_ratio", -0.2, r"topk_ratio must be a number in \(0, 1\].*got topk_ratio=-0\.2"),
    ("topk_ratio", True, r"got topk_ratio=True"),
]


@pytest.mark.parametrize("name,value,message", BAD_OPTIONS)
def test_bad_option_raises_value_error(name, value, message):
    with pytest.raises(ValueError, match=message):
        locally_adaptive_loss(LOGITS, TARGET, **{name: value})
    with pytest.raises(ValueError, match=message):
        LocallyAdaptiveLoss(**{name: value})


@pytest.mark.parametrize("pooling", ["lmp", "topk"])
@pytest.mark.parametrize("name,value,message", [
    ("reduction", "none", r"reduction must be 'mean' with pooling='{}'.*got reduction='none'"),
    # Refused before the check that torch.distributed is initialised: the reason is the pooling.
    ("sync", True, r"sync must be False with pooling='{}'.*got sync=True"),
])
def test_pooling_needs_a_local_mean(pooling, name, value, message):
    with pytest.raises(ValueError, match=message.format(pooling)):
        locally_adaptive_loss(LOGITS, TARGET, pooling=pooling, **{name: value})
    with pytest.raises(ValueError, match=message.format(pooling)):
        LocallyAdaptiveLoss(pooling=pooling, **{name: value})


@pytest.mark.parametrize("logits,target,message", [
    (torch.randn(5, 4, 6), TARGET,
     r"logits must be 4-D \(B, C, H, W\) or 5-D \(B, C, D, H, W\), got logits.shape=\(5, 4, 6\)"),
    (torch.randn(2, 1, 4, 6), TARGET, r"C >= 2 classes.*got logits.shape=\(2, 1, 4, 6\)"),
    (LOGITS, TARGET[:, :3], r"target must have shape \(B, H, W\) = \(2, 4, 6\).*"
                            r"got target.shape=\(2, 3, 6\)"),
    (LOGITS, TARGET[0], r"got target.shape=\(4, 6\)"),
    (LOGITS, TARGET.to("meta"), r"target must be on the logits' device cpu.*meta"),
])
def test_bad_shapes_and_devices_raise_value_error(logits, target, message):
    with pytest.raises(ValueError, match=message):
        locally_adaptive_loss(logits, target)


@pytest.mark.parametrize("logits,target,message", [
    (LOGITS.long(), TARGET, r"logits must be a floating tensor.*got logits.dtype=torch.int64"),
    (LOGITS.to(torch.complex64), TARGET, r"got logits.dtype=torch.complex64"),
    (LOGITS, TARGET.float(), r"target must be an integer tensor.*got target.dtype=torch.float32;"),
    (LOGITS, TARGET.bool(), r"got target.dtype=torch.bool"),
    (LOGITS.tolist(), TARGET, r"logits must be a torch.Tensor, got logits='list'"),
    (LOGITS, TARGET.tolist(), r"target must be a torch.Tensor, got target='list'"),
])
def test_bad_types_raise_type_error(logits, target, message):
    with pytest.raises(TypeError, match=message):
        locally_adaptive_loss(logits, target)


# Each message names the likely fix; none offers check_target=False, which only skips the
# check (after which label 7 with C = 5 gave a finite, meaningless loss).
@pytest.mark.parametrize("dtype,bad,ignore_index,fix", [
    (torch.int64, 5, 255, r"if the data has 6 or more classes, the model must output that many "
                          r"\(the logits have C=5\); if the labels are coded otherwise, remap "
                          r"them to \[0, 5\); if 5 marks pixels to ignore, pass ignore_index=5"),
    (torch.int64, -1, 255, r"labels outside the classes: -1\. if the labels are coded otherwise, "
                           r"remap them to \[0, 5\); if -1 marks pixels to ignore, pass "
                           r"ignore_index=-1$"),
    (torch.int32, 255, -100, r"if 255 marks pixels to ignore \(Pascal VOC, Cityscapes\), pass "
                             r"ignore_index=255, not -100"),
    (torch.uint8, 200, 255, r"the model must output that many"),
    (torch.uint8, 156, -100, r"ignore_index=156"),  # uint8 156 == -100 in torch: must not pass
    (torch.int16, 300, 255, r"if the data has 301 or more classes"),
])
def test_out_of_range_label_raises_naming_the_fix(dtype, bad, ignore_index, fix):
    target = TARGET.to(dtype).clone()
    target[1, 2, 3] = bad
    for call in (lambda: locally_adaptive_loss(LOGITS, target, ignore_index=ignore_index),
                 lambda: LocallyAdaptiveLoss(ignore_index=ignore_index)(LOGITS, target)):
        with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, 5\) or "
                                             rf"ignore_index={ignore_index}, got target\[1, 2, "
                                             rf"3\]={bad}; ") as err:
            call()
        assert re.search(fix, str(err.value)), str(err.value)
        assert "check_target" not in str(err.value)


def test_several_out_of_range_labels_are_listed():
    target = TARGET.clone()
    target[0, 0, 0], target[1, 3, 5] = 7, 9
    with pytest.raises(ValueError, match=r"labels outside the classes: 7, 9\. if the data has "
                                         r"10 or more classes.*if one of them marks pixels to "
                                         r"ignore, pass it as ignore_index"):
        locally_adaptive_loss(LOGITS, target)


@pytest.mark.parametrize("weight", [torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0]),
                                    torch.tensor([1.0, float("nan"), 1.0, 1.0, 1.0])])
def test_bad_class_weight_values_name_the_fix(weight):
    for call in (lambda: locally_adaptive_loss(LOGITS, TARGET, weight=weight),
                 lambda: LocallyAdaptiveLoss(weight=weight)(LOGITS, TARGET)):
        with pytest.raises(ValueError, match=r"weight must hold finite, non-negative class "
                                             r"weights, got weight=\[.*\] \(a weight of 0 leaves "
                                             r"a class out; for weights from class frequencies, "
                                             r"clamp them at 0\)$"):
            call()


@pytest.mark.parametrize("weight,message", [
    ([1.0, 2.0, 3.0, 4.0, 5.0], r"weight must be None or a floating tensor of C class weights, "
                                r"got weight=list \(torch.tensor\(weight\) makes one\)"),
    ((1.0,) * 5, r"got weight=tuple"),
    (torch.ones(5, dtype=torch.int64), r"got weight=torch.int64 \(weight.float\(\) makes one\)"),
    (torch.ones(1, 5), r"weight must be None or a 1-D floating tensor of C class weights, got "
                       r"weight.shape=\(1, 5\)"),
])
def test_module_rejects_a_weight_that_is_not_a_float_vector(weight, message):
    with pytest.raises(ValueError, match=message):
        LocallyAdaptiveLoss(weight=weight)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return  # the functional form says the shape against C instead
    with pytest.raises(ValueError, match=message):
        locally_adaptive_loss(LOGITS, TARGET, weight=weight)


@pytest.mark.parametrize("target,error,message", [
    (TARGET.float(), TypeError, r"got target.dtype=torch.float32; pass class indices, "
                                r"target.long\(\) \(for float label maps with integral values, "
                                r"as MONAI carries them, lad_triton.integrations.monai"),
    (TARGET.bool(), TypeError, r"got target.dtype=torch.bool; pass class indices, e.g. "
                               r"target.long\(\)"),
    # one-hot, as float (the usual case) and as integers
    (torch.nn.functional.one_hot(TARGET, 5).permute(0, 3, 1, 2).float(), TypeError,
     r"it has the logits' shape: for a one-hot \(or soft\) target pass its class indices, "
     r"target.argmax\(1\)"),
    (torch.nn.functional.one_hot(TARGET, 5).permute(0, 3, 1, 2), ValueError,
     r"got target.shape=\(2, 5, 4, 6\); it has the logits' shape: for a one-hot target pass "
     r"its class indices, target.argmax\(1\)"),
])
def test_float_and_one_hot_targets_name_the_fix(target, error, message):
    with pytest.raises(error, match=message):
        locally_adaptive_loss(LOGITS, target)
    with pytest.raises(error, match=message):
        LocallyAdaptiveLoss()(LOGITS, target)


def test_a_window_larger_than_the_image_warns_once_per_process(monkeypatch):
    from lad_triton import functional

    monkeypatch.setattr(functional, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        locally_adaptive_loss(torch.randn(1, 3, 16, 16), torch.randint(0, 3, (1, 16, 16)),
                              kernel_size=15)
        locally_adaptive_loss(torch.randn(1, 3, 16, 4), torch.randint(0, 3, (1, 16, 4)),
                              kernel_size=15)  # longer than 4, not than 16: the window fits
        assert not caught
        for kernel_size in (31, 101):
            locally_adaptive_loss(torch.randn(1, 3, 16, 16), torch.randint(0, 3, (1, 16, 16)),
                                  kernel_size=kernel_size)
        LocallyAdaptiveLoss(kernel_size=9)(torch.randn(1, 3, 4, 8, 8),
                                           torch.randint(0, 3, (1, 4, 8, 8)))
    assert len(caught) == 1 and issubclass(caught[0].category, UserWarning)
    assert str(caught[0].message).startswith(
        "locally_adaptive_loss with kernel_size=31, larger than the image (16 x 16): every "
        "centre's window covers the whole image. Upsample the logits")
    assert caught[0].filename == __file__


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_ignore_index_and_class_labels_pass_the_check(dtype):
    target = TARGET.to(dtype).clone()
    target[0, 0, :2] = torch.tensor([255, 4], dtype=dtype)
    assert torch.isfinite(locally_adaptive_loss(LOGITS, target))


def test_uint8_labels_with_an_unrepresentable_ignore_index():
    # ignore_index=-100 cannot occur in a uint8 mask: all labels are classes and must be in range.
    target = TARGET.to(torch.uint8)
    assert torch.isfinite(locally_adaptive_loss(LOGITS, target, ignore_index=-100))


@pytest.mark.parametrize("bad", ["label", "weight", "pixel_weight", None])
def test_fused_path_checks_values_before_launching_the_loss(bad, monkeypatch):
    # On the fused path the value check's one sync comes first, so the loss's forward runs on the
    # GPU while the host launches the backward (validation.check_values says what the other order
    # measured); the errors are the PyTorch path's.
    pytest.importorskip("triton")
    from lad_triton import functional
    from lad_triton.kernels import forward as kf

    order = []
    for module, name in ((functional, "check_values"), (kf, "forward")):
        original = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, _f=original, _n=name, **k:
                            (order.append(_n), _f(*a, **k))[1])
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on a CPU
    logits = LOGITS.to(device)
    target, weight, pixel_weight = (t.to(device) for t in (TARGET.clone(), torch.ones(5),
                                                           torch.ones(2, 4, 6)))
    if bad == "label":
        target[0, 1, 2] = 7
    elif bad == "weight":
        weight[3] = -1.0
    elif bad == "pixel_weight":
        pixel_weight[1, 0, 5] = float("nan")
    messages = {"label": r"got target\[0, 1, 2\]=7", "weight": r"weight must hold finite",
                "pixel_weight": r"got pixel_weight\[1, 0, 5\]=nan"}
    for kwargs in (dict(weight=weight), dict(pixel_weight=pixel_weight)):
        if bad in ("weight", "pixel_weight") and bad not in kwargs:
            continue
        order.clear()
        call = lambda: locally_adaptive_loss(logits, target, backend="triton", **kwargs)  # noqa
        if bad is None:
            assert torch.isfinite(call())
            assert order == ["check_values", "forward"], order
        else:
            with pytest.raises(ValueError, match=messages[bad]):
                call()
            assert order == ["check_values"], order


def test_options_seen_valid_are_not_trusted_for_other_values_or_types():
    # check_options remembers valid options by name, type and value: 1 passing must not let True
    # (a bool is not a window size) or 1.0 through, nor a bad value after a good one.
    locally_adaptive_loss(LOGITS, TARGET, kernel_size=1, power=2.0)
    for name, value in (("kernel_size", True), ("kernel_size", 1.0), ("power", 0.5)):
        options = dict(kernel_size=1, power=2.0)
        options[name] = value
        with pytest.raises(ValueError, match=rf"got {name}={value}"):
            locally_adaptive_loss(LOGITS, TARGET, **options)


def test_a_flag_the_second_look_cannot_explain_raises_runtime_error(monkeypatch):
    # The error path looks again to say where; if it finds nothing (a tensor modified in between)
    # it says so instead of failing on a missing pixel weight.
    from lad_triton import validation

    looks = iter([torch.ones(2, 4, 6, dtype=torch.bool), torch.zeros(2, 4, 6, dtype=torch.bool)])
    monkeypatch.setattr(validation, "_bad_labels", lambda *a: next(looks))
    with pytest.raises(RuntimeError, match="second look did not find"):
        validation.check_values(TARGET, None, 5, 255)

""""Bad input" of docs/contract.md: every misuse raises the stated exception, naming the argument, what was
expected and what it got."""

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
    (LOGITS, TARGET.float(), r"target must be an integer tensor.*got target.dtype=torch.float32"),
    (LOGITS, TARGET.bool(), r"got target.dtype=torch.bool"),
    (LOGITS.tolist(), TARGET, r"logits must be a torch.Tensor, got logits='list'"),
    (LOGITS, TARGET.tolist(), r"target must be a torch.Tensor, got target='list'"),
])
def test_bad_types_raise_type_error(logits, target, message):
    with pytest.raises(TypeError, match=message):
        locally_adaptive_loss(logits, target)


@pytest.mark.parametrize("dtype,bad,ignore_index", [
    (torch.int64, 5, 255),      # == C
    (torch.int64, -1, 255),     # negative
    (torch.int32, 255, -100),   # 255 is not the ignore_index here
    (torch.uint8, 200, 255),
    (torch.uint8, 156, -100),   # torch would compare uint8 156 == -100 as True: must not pass
    (torch.int16, 300, 255),
])
def test_out_of_range_label_raises(dtype, bad, ignore_index):
    target = TARGET.to(dtype).clone()
    target[1, 2, 3] = bad
    with pytest.raises(ValueError, match=rf"target must hold class indices in \[0, 5\) or "
                                         rf"ignore_index={ignore_index}, got target\[1, 2, 3\]"
                                         rf"={bad} \(check_target=False skips this check\)"):
        locally_adaptive_loss(LOGITS, target, ignore_index=ignore_index)


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

"""lad_triton.integrations.mmseg against the real mmsegmentation 1.x (issue 13): the loss built
from its registry by a config, called by the real ``BaseDecodeHead.loss_by_feat`` and
``OHEMPixelSampler``, equals ``loss_weight`` times the float64 oracle.

mmsegmentation 1.2.2 needs mmcv < 2.2, whose full build has no CPU wheel; here it runs with
``mmcv-lite<2.2`` (mmcv without its compiled ops). ``mmseg.registry`` imports with it, but a
look-up by name imports ``mmseg.models``, which imports ``mmcv.ops`` (point sampling,
deformable attention) at module level. Where ``mmcv.ops`` cannot import, the package's
``stub_mmcv_ops()`` (which the example in docs/integrations.md calls) installs a placeholder whose every member
raises if used: the registry, the FCN head, the OHEM sampler and the loss never touch one, so
what runs is mmseg's own code.
"""

import sys
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from cases import framework, make_labels, make_logits, rel_err, readme_example
from lad_triton import locally_adaptive_loss
from oracle import lad_reference

INSTALL = 'pip install -e ".[mmseg]" "mmcv-lite<2.2"'
framework("mmengine", INSTALL)
framework("mmseg.registry", INSTALL)

from lad_triton.integrations.mmseg import stub_mmcv_ops  # noqa: E402

STUBBED = stub_mmcv_ops()  # what the example in docs/integrations.md does on a CPU
import mmseg.models  # noqa: E402,F401  (registers FCNHead, OHEMPixelSampler)
from mmengine.structures import PixelData  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

import lad_triton.integrations.mmseg as adapter  # noqa: E402

CLASS_WEIGHT = [1.0, 0.5, 2.0, 0.0, 1.5]


def test_registered_in_mmseg_registry():
    assert MODELS.scope == "mmseg"
    assert MODELS.get("LocallyAdaptiveLoss") is adapter.LocallyAdaptiveLoss


def test_custom_imports_in_a_config_file_register_it(tmp_path):
    # The config route of docs/integrations.md: mmengine imports the module named in custom_imports.
    from mmengine.config import Config

    path = tmp_path / "config.py"
    path.write_text('custom_imports = dict(imports=["lad_triton.integrations.mmseg"], '
                    'allow_failed_imports=False)\n'
                    'loss = dict(type="LocallyAdaptiveLoss", kernel_size=3, loss_weight=0.4)\n')
    loss = MODELS.build(Config.fromfile(str(path)).loss)
    assert isinstance(loss, adapter.LocallyAdaptiveLoss) and loss.loss_weight == 0.4


def reference(logits, labels, pixel_weight=None, reduction="mean", **options):
    return lad_reference(logits, labels, reduction=reduction, weight=torch.tensor(CLASS_WEIGHT),
                         pixel_weight=pixel_weight, **options).loss


def build(**extra):
    return MODELS.build(dict(type="LocallyAdaptiveLoss", kernel_size=3, power=3.0,
                             loss_weight=0.7, class_weight=CLASS_WEIGHT, **extra))


def test_weight_none_is_loss_weight_times_the_loss():
    loss = build()
    logits = make_logits((2, 5, 7, 8), dtype=torch.float64).requires_grad_(True)
    labels = make_labels(2, (7, 8), 5, n_labels=4)
    value = loss(logits, labels, ignore_index=255)
    assert loss.loss_name == "loss_lad"
    assert rel_err(value, 0.7 * reference(logits, labels, kernel_size=3)) < 1e-10
    expected = 0.7 * locally_adaptive_loss(logits, labels, kernel_size=3,
                                           weight=torch.tensor(CLASS_WEIGHT, dtype=torch.float64))
    assert torch.allclose(value, expected, rtol=1e-12)


def test_weight_map_avg_factor_and_reduction_override():
    loss = build()
    logits = make_logits((2, 5, 6, 7), dtype=torch.float64)
    labels = make_labels(2, (6, 7), 5, n_labels=4, seed=2)
    weight = torch.rand(2, 6, 7, dtype=torch.float64) * (torch.rand(2, 6, 7) > 0.3)
    ref_mean = reference(logits, labels, weight, kernel_size=3)
    assert rel_err(loss(logits, labels, weight), 0.7 * ref_mean) < 1e-10

    # avg_factor replaces sum w_p: (sum w L^k / (avg_factor + eps))^(1/k).
    w_sum = sum(CLASS_WEIGHT[y] * w for y, w in zip(labels.flatten().tolist(),
                                                     weight.flatten().tolist()) if y != 255)
    eps = torch.finfo(torch.float32).eps
    expected = 0.7 * (ref_mean ** 3 * w_sum / (17.0 + eps)) ** (1 / 3)
    assert rel_err(loss(logits, labels, weight, avg_factor=17.0), expected) < 1e-10

    none_map = loss(logits, labels, weight, reduction_override="none")
    assert none_map.shape == (2, 6, 7)
    assert rel_err(none_map, 0.7 * reference(logits, labels, weight, "none", kernel_size=3)) < 1e-10
    # avg_factor does not apply to the map (mmseg's weight_reduce_loss leaves it as it is).
    assert torch.equal(loss(logits, labels, weight, avg_factor=3.0, reduction_override="none"),
                       none_map)
    total = loss(logits, labels, weight, reduction_override="sum")
    assert rel_err(total, 0.7 * reference(logits, labels, weight, "sum", kernel_size=3)) < 1e-10
    with pytest.raises(ValueError, match='avg_factor can not be used with reduction="sum"'):
        loss(logits, labels, weight, avg_factor=3.0, reduction_override="sum")


@pytest.mark.parametrize("config,message", [
    (dict(class_weight="weights.npy"), r"class_weight must be None or a list of C class weights"),
    (dict(power=0.5), r"power must be a finite number >= 1"),
    (dict(ignore_index=255), r"unexpected keyword argument 'ignore_index'"),
])
def test_bad_config_raises(config, message):
    with pytest.raises((ValueError, TypeError), match=message):
        MODELS.build(dict(type="LocallyAdaptiveLoss", **config))


def decode_head(**extra):
    torch.manual_seed(0)
    config = dict(
        type="FCNHead", in_channels=4, channels=8, num_convs=1, concat_input=False,
        num_classes=5, norm_cfg=None, align_corners=False, ignore_index=255,
        loss_decode=dict(type="LocallyAdaptiveLoss", kernel_size=3, loss_weight=0.7,
                         class_weight=CLASS_WEIGHT))
    return MODELS.build({**config, **extra}).double()


def data_samples(labels):
    samples = []
    for y in labels:
        sample = SegDataSample()
        sample.gt_sem_seg = PixelData(data=y[None])
        samples.append(sample)
    return samples


def test_loss_by_feat_without_sampler():
    head = decode_head()
    seg_logits = make_logits((2, 5, 4, 5), dtype=torch.float64).requires_grad_(True)
    labels = make_labels(2, (8, 10), 5, n_labels=4)
    losses = head.loss_by_feat(seg_logits, data_samples(labels))
    upsampled = F.interpolate(seg_logits.detach(), size=(8, 10), mode="bilinear",
                              align_corners=False)
    assert rel_err(losses["loss_lad"], 0.7 * reference(upsampled, labels, kernel_size=3)) < 1e-10
    losses["loss_lad"].backward()
    # The gradient through the head's upsampling: the oracle's gradient with respect to the
    # upsampled logits, taken back through the same F.interpolate (linear: exact in float64).
    # (`grad.abs().sum() > 0` let any nonzero gradient pass.)
    x = seg_logits.detach().requires_grad_(True)
    up = F.interpolate(x, size=(8, 10), mode="bilinear", align_corners=False)
    ref = lad_reference(up.detach(), labels, weight=torch.tensor(CLASS_WEIGHT), kernel_size=3)
    (expected,) = torch.autograd.grad(up, x, 0.7 * ref.grad)
    assert rel_err(seg_logits.grad, expected) < 1e-10


def test_loss_by_feat_with_the_ohem_sampler():
    # OHEMPixelSampler ranks the valid pixels by the loss's reduction_override="none" map and
    # keeps the min_kept * N hardest; the loss is then the weighted mean over those.
    head = decode_head(sampler=dict(type="OHEMPixelSampler", min_kept=12))
    seg_logits = make_logits((2, 5, 4, 5), dtype=torch.float64, seed=4)
    labels = make_labels(2, (8, 10), 5, n_labels=4, seed=4)
    losses = head.loss_by_feat(seg_logits, data_samples(labels))

    upsampled = F.interpolate(seg_logits, size=(8, 10), mode="bilinear", align_corners=False)
    cost_map = reference(upsampled, labels, reduction="none", kernel_size=3)
    valid = labels != 255
    hardest = cost_map[valid].argsort(descending=True)[:24]
    kept = torch.zeros(int(valid.sum()), dtype=torch.float64)
    kept[hardest] = 1.0
    pixel_weight = torch.zeros(2, 8, 10, dtype=torch.float64)
    pixel_weight[valid] = kept
    expected = 0.7 * reference(upsampled, labels, pixel_weight, kernel_size=3)
    assert rel_err(losses["loss_lad"], expected) < 1e-10
    # Not the unweighted mean: the sampler's map took effect.
    assert rel_err(losses["loss_lad"], 0.7 * reference(upsampled, labels, kernel_size=3)) > 1e-3


def low_resolution_loss(upsample=True):
    return dict(type="LocallyAdaptiveLoss", kernel_size=3, loss_weight=0.7,
                class_weight=CLASS_WEIGHT, upsample=upsample)


def loss_by_feat_seen(head, seg_logits, labels):
    """(the head's losses, (the logits the loss scored, its keywords)): the one call of
    locally_adaptive_loss that loss_by_feat makes, recorded."""
    calls = []
    scored = adapter.locally_adaptive_loss
    with mock.patch.object(adapter, "locally_adaptive_loss",
                           side_effect=lambda x, *a, **k: calls.append((x, k)) or scored(
                               x, *a, **k)):
        losses = head.loss_by_feat(seg_logits, data_samples(labels))
    (call,) = calls
    return losses, call


@pytest.mark.parametrize("align_corners", [False, True])
def test_the_loss_scores_the_heads_logits_before_its_resize(align_corners):
    # upsample=True: the loss gets the head's (N, C, h, w) logits and the head's align_corners,
    # not the resized ones; the value and the gradient are those of the resize then the loss,
    # and acc_seg is mmseg's accuracy of the resized logits.
    from mmseg.models.losses import accuracy

    head = decode_head(align_corners=align_corners, loss_decode=low_resolution_loss())
    seg_logits = make_logits((2, 5, 4, 5), dtype=torch.float64, seed=2).requires_grad_(True)
    labels = make_labels(2, (9, 10), 5, n_labels=4, seed=2)
    losses, (given, options) = loss_by_feat_seen(head, seg_logits, labels)
    assert given is seg_logits
    assert options["upsample"] == "bilinear" and options["align_corners"] is align_corners
    x = seg_logits.detach().requires_grad_(True)
    up = F.interpolate(x, size=(9, 10), mode="bilinear", align_corners=align_corners)
    assert torch.equal(losses["acc_seg"], accuracy(up.detach(), labels, ignore_index=255))
    ref = lad_reference(up.detach(), labels, weight=torch.tensor(CLASS_WEIGHT), kernel_size=3)
    assert rel_err(losses["loss_lad"], 0.7 * ref.loss) < 1e-10
    losses["loss_lad"].backward()
    (expected,) = torch.autograd.grad(up, x, 0.7 * ref.grad)
    assert rel_err(seg_logits.grad, expected) < 1e-10


def test_the_ohem_sampler_with_the_heads_logits():
    # The sampler ranks the loss's map of the no-grad resize (the loss reads the head's logits
    # on it); the loss and its gradient are those of the resize then the sampled loss.
    head = decode_head(sampler=dict(type="OHEMPixelSampler", min_kept=12), loss_decode=low_resolution_loss())
    seg_logits = make_logits((2, 5, 4, 5), dtype=torch.float64, seed=4).requires_grad_(True)
    labels = make_labels(2, (8, 10), 5, n_labels=4, seed=4)
    losses = head.loss_by_feat(seg_logits, data_samples(labels))
    losses["loss_lad"].backward()
    x = seg_logits.detach().requires_grad_(True)
    plain = decode_head(sampler=dict(type="OHEMPixelSampler", min_kept=12))
    expected = plain.loss_by_feat(x, data_samples(labels))["loss_lad"]
    (grad,) = torch.autograd.grad(expected, x)
    assert rel_err(losses["loss_lad"], expected) < 1e-10
    assert rel_err(seg_logits.grad, grad) < 1e-10 and float(grad.abs().sum()) > 0


def test_a_head_with_other_losses_resizes_for_all_of_them():
    # Cross-entropy beside LAD needs the resized logits with their gradient: the head resizes as
    # mmseg does, and LAD scores those (no upsample), as does upsample=False.
    for losses in ([low_resolution_loss(), dict(type="CrossEntropyLoss", loss_weight=0.3)],
                   low_resolution_loss(upsample=False)):
        head = decode_head(loss_decode=losses)
        seg_logits = make_logits((2, 5, 4, 5), dtype=torch.float64, seed=3)
        labels = make_labels(2, (8, 10), 5, n_labels=4, seed=3)
        result, (given, options) = loss_by_feat_seen(head, seg_logits, labels)
        assert given.shape == (2, 5, 8, 10) and "upsample" not in options
        upsampled = F.interpolate(seg_logits, size=(8, 10), mode="bilinear",
                                  align_corners=False)
        assert rel_err(result["loss_lad"], 0.7 * reference(upsampled, labels, kernel_size=3)) \
            < 1e-10


def test_the_placeholder_raises_only_when_a_compiled_op_is_used():
    import mmcv.ops

    if not STUBBED:
        pytest.skip("the compiled mmcv is installed: stub_mmcv_ops() left it alone")
    assert stub_mmcv_ops() is False  # in place now: nothing to do
    with pytest.raises(RuntimeError, match=r"mmcv.ops.point_sample needs the compiled mmcv"):
        mmcv.ops.point_sample(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2))


def test_readme_example_runs():
    exec(readme_example("mmseg"), {})


def test_without_mmseg_it_registers_in_mmengine():
    import subprocess
    from pathlib import Path

    probe = ("import sys; sys.modules['mmseg'] = None; "
             "import lad_triton.integrations.mmseg as adapter; "
             "from mmengine.registry import MODELS; "
             "print(MODELS.scope, "
             "MODELS.get('LocallyAdaptiveLoss') is adapter.LocallyAdaptiveLoss)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                         check=True, capture_output=True, text=True).stdout
    assert out.split() == ["mmengine", "True"]

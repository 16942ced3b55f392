"""lad_triton.integrations.monai against the real MONAI and nnU-Net v2 (issue 13): label maps as
they come ((B, 1, ...), integer or integral float), inside ``monai.losses.DeepSupervisionLoss``,
and the nnU-Net trainer subclass of docs/integrations.md running the real trainer's ``train_step``."""

import pytest
import torch

from cases import framework, make_labels, make_logits, readme_example, rel_err
from lad_triton import locally_adaptive_loss
from lad_triton.integrations.monai import LocallyAdaptiveLoss
from oracle import lad_reference

monai = framework("monai", 'pip install -e ".[monai]"')


def nearest_exact(labels, factor):
    """MONAI's nearest-exact downsampling by an integer factor, by index: source pixel
    floor((j + 0.5) * factor) = factor * j + factor // 2."""
    step = slice(factor // 2, None, factor)
    return labels[(slice(None),) * 2 + (step,) * (labels.dim() - 2)]


def test_deep_supervision_loss_reaches_every_head():
    from monai.losses import DeepSupervisionLoss

    labels = make_labels(2, (8, 8, 8), 3, n_labels=3, ignore_frac=0.1)
    heads = [make_logits((2, 3) + (8 // f,) * 3, dtype=torch.float64, seed=f).requires_grad_(True)
             for f in (1, 2, 4)]
    criterion = LocallyAdaptiveLoss(kernel_size=3)
    loss = DeepSupervisionLoss(criterion, weight_mode="exp")(heads, labels[:, None].double())
    loss.backward()
    for head in heads:
        assert head.grad is not None and head.grad.abs().sum() > 0

    # Level 0 is the loss on the integer labels; the total weights the levels 1, 1/2, 1/4.
    assert torch.equal(criterion(heads[0], labels[:, None].double()),
                       locally_adaptive_loss(heads[0], labels, kernel_size=3))
    expected = sum(w * lad_reference(head.detach(), nearest_exact(labels[:, None], f)[:, 0],
                                     kernel_size=3).loss
                   for w, f, head in zip((1.0, 0.5, 0.25), (1, 2, 4), heads))
    assert rel_err(loss, expected) < 1e-5  # DeepSupervisionLoss casts the heads to float32


def test_meta_tensors():
    from monai.data import MetaTensor

    logits = make_logits((1, 3, 4, 5, 6))
    labels = make_labels(1, (4, 5, 6), 3)[:, None]
    criterion = LocallyAdaptiveLoss(kernel_size=3)
    meta_logits = MetaTensor(logits.clone()).requires_grad_(True)
    loss = criterion(meta_logits, MetaTensor(labels.float()))
    assert type(loss) is torch.Tensor
    assert torch.equal(loss, criterion(logits, labels))
    loss.backward()
    assert meta_logits.grad.abs().sum() > 0


def test_readme_monai_example_runs():
    exec(readme_example("monai"), {})


def tiny_plans(ignore):
    """nnU-Net v2 plans for a 4-stage 3-D U-Net on 16^3 patches (deep supervision at 3
    resolutions), and a dataset.json with three classes and, optionally, an ignore label."""
    conv = "torch.nn.modules.conv.Conv3d"
    plans = {
        "dataset_name": "Dataset999_Tiny", "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [1.0] * 3,
        "original_median_shape_after_transp": [16] * 3, "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2], "transpose_backward": [0, 1, 2],
        "experiment_planner_used": "ExperimentPlanner", "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {}, "continue_training": False,
        "configurations": {"3d_fullres": {
            "data_identifier": "tiny", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [16] * 3, "median_image_size_in_voxels": [16] * 3,
            "spacing": [1.0] * 3, "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False], "batch_dice": False,
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {}, "resampling_fn_seg_kwargs": {},
            "resampling_fn_probabilities_kwargs": {},
            "architecture": {
                "network_class_name":
                    "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 4, "features_per_stage": [4, 8, 8, 8], "conv_op": conv,
                    "kernel_sizes": [[3, 3, 3]] * 4, "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
                    "n_conv_per_stage": [1] * 4, "n_conv_per_stage_decoder": [1] * 3,
                    "conv_bias": True, "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-5, "affine": True}, "dropout_op": None,
                    "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True}},
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}}}}
    labels = {"background": 0, "liver": 1, "tumour": 2}
    if ignore:
        labels["ignore"] = 3
    dataset_json = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 2,
                    "file_ending": ".nii.gz"}
    return plans, dataset_json


@pytest.mark.parametrize("ignore", [False, True])
def test_readme_nnunet_trainer_runs_the_real_train_step(ignore, tmp_path, monkeypatch):
    # nnU-Net reads its folders from the environment when a trainer is made.
    framework("nnunetv2", 'pip install nnunetv2 (keeping this torch)')
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "preprocessed"))
    folder = tmp_path / "preprocessed" / "Dataset999_Tiny" / "tiny"
    folder.mkdir(parents=True)
    (folder / "case_000.npz").touch()  # initialize() infers the dataset format from it
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import \
        DownsampleSegForDSTransform

    namespace = {}
    exec(readme_example("nnunet"), namespace)
    plans, dataset_json = tiny_plans(ignore)
    trainer = namespace["nnUNetTrainerLAD"](plans, "3d_fullres", 0, dataset_json,
                                            device=torch.device("cpu"))
    trainer.initialize()

    # A batch as nnU-Net's data loader makes it: int16 segmentations (B, 1, ...), downsampled
    # per deep-supervision scale by nnU-Net's own transform.
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(2, 1, 16, 16, 16, generator=gen)
    seg = torch.randint(0, 4 if ignore else 3, (2, 1, 16, 16, 16), generator=gen,
                        dtype=torch.int16)
    scales = trainer._get_deep_supervision_scales()
    target = [torch.stack([DownsampleSegForDSTransform(scales)(segmentation=s)["segmentation"][i]
                           for s in seg]) for i in range(len(scales))]
    assert len(target) == 3 and target[2].shape == (2, 1, 4, 4, 4)

    weights = torch.tensor([1.0, 0.5, 0.0]) / 1.5  # nnU-Net's: halving, the lowest dropped
    with torch.no_grad():
        outputs = trainer.network(data)
        expected = sum(w * locally_adaptive_loss(out, t[:, 0].long(), kernel_size=3,
                                                 ignore_index=3 if ignore else -1)
                       for w, out, t in zip(weights, outputs, target) if w > 0)
    before = [p.detach().clone() for p in trainer.network.parameters()]
    result = trainer.train_step({"data": data, "target": target})
    assert abs(float(result["loss"]) - float(expected)) <= 1e-5 * float(expected)
    assert any(not torch.equal(b, p) for b, p in zip(before, trainer.network.parameters()))

"""The locally adaptive loss for MONAI and nnU-Net pipelines, taking their label maps as they
come: ``(B, 1, H, W)`` or ``(B, 1, D, H, W)``, integer, or float holding integral values. MONAI
carries labels as float tensors (its ``DeepSupervisionLoss`` resizes them with
``F.interpolate``, which refuses integer tensors); nnU-Net v2 as int16. It imports neither
framework::

    from monai.losses import DeepSupervisionLoss
    from lad_triton.integrations.monai import LocallyAdaptiveLoss

    loss = DeepSupervisionLoss(LocallyAdaptiveLoss(kernel_size=3), weight_mode="exp")
    value = loss([head0, head1, head2], labels)    # heads (B, C, ...), labels (B, 1, D, H, W)
"""

import torch

from ..module import LocallyAdaptiveLoss as _LocallyAdaptiveLoss


def _plain(tensor):
    """A MetaTensor (MONAI's tensor subclass carrying metadata) as a plain tensor, an alias
    that keeps the autograd graph; anything else as it is."""
    if isinstance(tensor, torch.Tensor) and type(tensor) is not torch.Tensor:
        return tensor.as_subclass(torch.Tensor)
    return tensor


def as_class_indices(target, check=True):
    """A MONAI label map as an integer tensor: integer tensors as they are, floating ones as
    int64 after checking (with ``check``, one device-to-host sync) that every value is finite
    and integral; without the check a fractional label is truncated, an unspecified loss."""
    target = _plain(target)
    if not (isinstance(target, torch.Tensor) and target.is_floating_point()):
        return target
    if check:
        bad = ~torch.isfinite(target) | (target != torch.round(target))
        if bad.any():
            where = tuple(bad.nonzero()[0].tolist())
            value = target[where].item()
            hint = (" (a label map resized with a mode other than 'nearest' mixes classes: "
                    "resize it with mode='nearest')" if value - value == 0 else "")
            raise ValueError("target must hold integral class indices (or ignore_index), got "
                             f"target[{', '.join(map(str, where))}]={value}{hint}")
    return target.long()


class LocallyAdaptiveLoss(_LocallyAdaptiveLoss):
    """:class:`lad_triton.LocallyAdaptiveLoss` (same keywords, same loss) whose ``forward(input,
    target, pixel_weight=None)`` also takes float label maps with integral values, as MONAI
    carries them, ``(B, 1, ...)`` ones and MetaTensors; a non-integral or non-finite float
    label raises ``ValueError`` (with ``check_target=True``, the default, at the cost of one
    more host sync for float labels)."""

    def forward(self, input, target, pixel_weight=None):
        target = as_class_indices(target, check=self.options["check_target"])
        return super().forward(_plain(input), target, _plain(pixel_weight))

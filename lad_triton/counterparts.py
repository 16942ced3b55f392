"""The paper's counterparts, for segmentation: focal loss (Lin et al.) and center loss (Wen et
al.), as the paper sets them up (its section 4.1). ``examples/paper`` compares them with the
locally adaptive loss."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from .validation import check_tensors, check_values, fail, is_int, is_real

FOCAL_REDUCTIONS = ("mean", "sum", "none")


def _check_focal_options(alpha, gamma, ignore_index, reduction):
    if not (is_real(alpha) and math.isfinite(alpha) and alpha > 0):
        fail(ValueError, "alpha", "a finite number > 0", alpha)
    if not (is_real(gamma) and math.isfinite(gamma) and gamma >= 0):
        fail(ValueError, "gamma", "a finite number >= 0", gamma)
    if not is_int(ignore_index):
        fail(ValueError, "ignore_index", "an integer", ignore_index)
    if reduction not in FOCAL_REDUCTIONS:
        fail(ValueError, "reduction", f"one of {FOCAL_REDUCTIONS}", reduction)


def focal_loss(logits, target, *, alpha=0.25, gamma=2.0, ignore_index=255, reduction="mean",
               check_target=True):
    """Multi-class focal loss for segmentation: ``-alpha * (1 - p_t)**gamma * log p_t`` per pixel,
    p_t the softmax probability of the pixel's label, averaged over the pixels that are not
    ``ignore_index`` (0 when there are none).

    Args:
        logits: ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) float16, bfloat16, float32 or float64.
        target: ``(B, H, W)`` (or ``(B, 1, H, W)``) integer labels in ``[0, C)`` or
            ``ignore_index``.
        alpha: the balancing factor, > 0 (0.25, the paper's and Lin et al.'s).
        gamma: the focusing exponent, >= 0 (2); gamma=0 and alpha=1 give cross-entropy.
        reduction: ``"mean"`` (over non-ignored pixels), ``"sum"`` or ``"none"`` (the map, 0 at
            ignored pixels).
        check_target: raise on a label neither in ``[0, C)`` nor ``ignore_index`` (a sync).

    Half-precision logits are computed in float32 from ``log_softmax`` (no log(0)), with
    ``1 - p_t`` as ``-expm1(log p_t)``, exact where p_t is near 1; the result comes back in the
    logits' dtype.
    """
    _check_focal_options(alpha, gamma, ignore_index, reduction)
    check_tensors(logits, target)
    if target.dim() == logits.dim():
        target = target.squeeze(1)  # (B, 1, H, W), as the loss reads it: a view
    if check_target and target.numel():
        check_values(target, None, logits.shape[1], ignore_index)
    x = logits if logits.dtype == torch.float64 else logits.float()
    y = target.long()
    valid = y != ignore_index
    y_safe = torch.where(valid, y, 0).clamp(0, logits.shape[1] - 1)
    log_pt = F.log_softmax(x, dim=1).gather(1, y_safe.unsqueeze(1)).squeeze(1)
    # clamp: the derivative of (1 - p)^gamma at p = 1 is infinite for gamma < 1.
    one_minus_pt = (-torch.expm1(log_pt)).clamp_min(torch.finfo(x.dtype).tiny)
    loss = torch.where(valid, -alpha * one_minus_pt.pow(gamma) * log_pt, 0)
    if reduction == "mean":
        loss = loss.sum() / valid.sum().clamp_min(1)
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype)


class FocalLoss(nn.Module):
    """:func:`focal_loss` as a criterion (same keywords)."""

    def __init__(self, *, alpha=0.25, gamma=2.0, ignore_index=255, reduction="mean",
                 check_target=True):
        super().__init__()
        _check_focal_options(alpha, gamma, ignore_index, reduction)
        self.options = dict(alpha=alpha, gamma=gamma, ignore_index=ignore_index,
                            reduction=reduction, check_target=check_target)

    def forward(self, logits, target):
        return focal_loss(logits, target, **self.options)

    def extra_repr(self):
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class CenterLoss(nn.Module):
    """Center loss for segmentation, as the paper uses it beside softmax cross-entropy.

    ``forward(features, target)`` is ``lambda_c / 2 * mean over valid pixels of
    ||x_p - c_{y_p}||^2``: x_p the pixel's feature vector from the layer before the classifier
    (``(B, D, H, W)``; the target at the features' resolution), c_j the class centres, a
    ``(num_classes, D)`` buffer. ``update(features, target)``, called after each optimiser step,
    moves the centres by Wen et al.'s rule ``c_j <- c_j - alpha * sum_{i: y_i = j} (c_j - x_i)
    / (1 + n_j)``. Ignored pixels neither add loss nor pull centres. The paper trains with
    ``F.cross_entropy(logits, y) + center(features, y_features)``, alpha = 0.5,
    lambda_c = 3e-4.
    """

    def __init__(self, num_classes, feature_dim, *, alpha=0.5, lambda_c=3e-4, ignore_index=255):
        super().__init__()
        if not (is_int(num_classes) and num_classes >= 1):
            fail(ValueError, "num_classes", "an integer >= 1", num_classes)
        if not (is_int(feature_dim) and feature_dim >= 1):
            fail(ValueError, "feature_dim", "an integer >= 1", feature_dim)
        if not (is_real(alpha) and 0 < alpha <= 1):
            fail(ValueError, "alpha", "a number in (0, 1] (the centres' update rate)", alpha)
        if not (is_real(lambda_c) and math.isfinite(lambda_c) and lambda_c >= 0):
            fail(ValueError, "lambda_c", "a finite number >= 0", lambda_c)
        if not is_int(ignore_index):
            fail(ValueError, "ignore_index", "an integer", ignore_index)
        self.num_classes, self.feature_dim = num_classes, feature_dim
        self.alpha, self.lambda_c, self.ignore_index = alpha, lambda_c, ignore_index
        self.register_buffer("centers", torch.zeros(num_classes, feature_dim))

    def _pixels(self, features, target):
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            raise TypeError("features must be a floating tensor (B, D, H, W), got "
                            f"{getattr(features, 'dtype', type(features).__name__)}")
        if features.dim() not in (4, 5) or features.shape[1] != self.feature_dim:
            raise ValueError(f"features must have shape (B, D={self.feature_dim}, H, W), got "
                             f"features.shape={tuple(features.shape)}")
        if not isinstance(target, torch.Tensor) or target.is_floating_point():
            raise TypeError("target must be an integer tensor (B, H, W) of labels")
        if tuple(target.shape) != (features.shape[0],) + tuple(features.shape[2:]):
            raise ValueError("target must have the features' batch and spatial shape "
                             f"{(features.shape[0],) + tuple(features.shape[2:])}, got "
                             f"target.shape={tuple(target.shape)}")
        if target.device != features.device:
            raise ValueError(f"target must be on the features' device {features.device}, got "
                             f"target.device={target.device}")
        if target.numel():
            check_values(target, None, self.num_classes, self.ignore_index)
        x = features.movedim(1, -1).reshape(-1, self.feature_dim)
        y = target.reshape(-1).long()
        valid = y != self.ignore_index
        return x, torch.where(valid, y, 0), valid

    def forward(self, features, target):
        x, y, valid = self._pixels(features, target)
        x = x if x.dtype == torch.float64 else x.float()
        distance = (x - self.centers.to(x.dtype)[y]).pow(2).sum(dim=1)
        mean = torch.where(valid, distance, 0).sum() / valid.sum().clamp_min(1)
        return (0.5 * self.lambda_c * mean).to(features.dtype)

    @torch.no_grad()
    def update(self, features, target):
        """Move the centres towards this batch's features (no gradient; after the step)."""
        x, y, valid = self._pixels(features.detach(), target)
        member = F.one_hot(y, self.num_classes).to(self.centers.dtype) * valid.unsqueeze(1)
        counts = member.sum(dim=0).unsqueeze(1)
        sums = member.t() @ x.to(self.centers.dtype)
        self.centers -= self.alpha * (counts * self.centers - sums) / (1 + counts)

    def extra_repr(self):
        return (f"num_classes={self.num_classes}, feature_dim={self.feature_dim}, "
                f"alpha={self.alpha}, lambda_c={self.lambda_c}, ignore_index={self.ignore_index}")

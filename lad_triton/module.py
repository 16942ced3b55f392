"""``LocallyAdaptiveLoss``: the ``nn.Module`` form of :func:`locally_adaptive_loss`."""

from torch import nn

from .functional import locally_adaptive_loss
from .validation import check_options, check_weight_type


class LocallyAdaptiveLoss(nn.Module):
    """The locally adaptive loss as a criterion: stores the keywords of
    :func:`lad_triton.locally_adaptive_loss` (which documents them) and calls it in
    ``forward(logits, target, pixel_weight=None)``. Drop-in for
    ``nn.CrossEntropyLoss(ignore_index=255)``::

        criterion = LocallyAdaptiveLoss(kernel_size=5, power=3.0)
        loss = criterion(model(images), masks)      # (B, C, H, W) logits, (B, H, W) masks
        loss.backward()

    It has no parameters; ``weight`` is a buffer, so it follows ``.to()`` and ``state_dict``.
    Invalid keywords raise at construction, with the functional's messages.
    """

    def __init__(self, *, kernel_size=5, power=3.0, stride=1, ignore_index=255, eps=1e-5,
                 weight_base=2.0, normalizer="count", zscore=True, reduction="mean",
                 pooling="minkowski", lmp_ratio=0.3, lmp_p=1.7, topk_ratio=0.2, weight=None,
                 backend="auto", check_target=True, sync=False, process_group=None,
                 upsample=None, align_corners=False):
        super().__init__()
        self.options = dict(kernel_size=kernel_size, power=power, stride=stride,
                            ignore_index=ignore_index, eps=eps, weight_base=weight_base,
                            normalizer=normalizer, zscore=zscore, reduction=reduction,
                            pooling=pooling, lmp_ratio=lmp_ratio, lmp_p=lmp_p,
                            topk_ratio=topk_ratio, backend=backend, check_target=check_target,
                            sync=sync, upsample=upsample, align_corners=align_corners)
        check_options(process_group=process_group, **self.options)
        if weight is not None:
            check_weight_type(weight)
            if weight.dim() != 1:
                raise ValueError("weight must be None or a 1-D floating tensor of C class "
                                 f"weights, got weight.shape={tuple(weight.shape)}")
        self.register_buffer("weight", None if weight is None else weight.detach().clone())
        self.process_group = process_group

    def forward(self, logits, target, pixel_weight=None):
        """The loss of ``logits`` against ``target``; ``pixel_weight``: the optional per-pixel
        weight map of :func:`lad_triton.locally_adaptive_loss`."""
        return locally_adaptive_loss(logits, target, weight=self.weight,
                                     pixel_weight=pixel_weight,
                                     process_group=self.process_group, **self.options)

    def extra_repr(self):
        text = ", ".join(f"{name}={value!r}" for name, value in self.options.items())
        if self.weight is not None:
            text += f", weight=<{self.weight.numel()} class weights>"
        if self.process_group is not None:
            text += ", process_group=<ProcessGroup>"
        return text

    def __getstate__(self):
        if self.process_group is not None:
            raise TypeError("LocallyAdaptiveLoss with a process_group cannot be pickled (process "
                            "groups cannot); use sync=True for the default group, or set "
                            "process_group after unpickling")
        return super().__getstate__()

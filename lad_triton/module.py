"""``LocallyAdaptiveLoss``: the ``nn.Module`` form of :func:`locally_adaptive_loss`."""

from torch import nn

from .functional import locally_adaptive_loss
from .validation import check_options


class LocallyAdaptiveLoss(nn.Module):
    """The locally adaptive loss as a criterion: stores the keywords of
    :func:`lad_triton.locally_adaptive_loss` (which documents them) and calls it in
    ``forward(logits, target)``. Drop-in for ``nn.CrossEntropyLoss(ignore_index=255)``::

        criterion = LocallyAdaptiveLoss(kernel_size=5, power=3.0)
        loss = criterion(model(images), masks)      # (B, C, H, W) logits, (B, H, W) masks
        loss.backward()

    Invalid keywords raise at construction, with the functional's messages.
    """

    def __init__(self, *, kernel_size=5, power=3.0, stride=1, ignore_index=255, eps=1e-5,
                 weight_base=2.0, normalizer="count", zscore=True, reduction="mean",
                 backend="auto", check_target=True):
        super().__init__()
        self.options = dict(kernel_size=kernel_size, power=power, stride=stride,
                            ignore_index=ignore_index, eps=eps, weight_base=weight_base,
                            normalizer=normalizer, zscore=zscore, reduction=reduction,
                            backend=backend, check_target=check_target)
        check_options(**self.options)

    def forward(self, logits, target):
        return locally_adaptive_loss(logits, target, **self.options)

    def extra_repr(self):
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())

"""``locally_adaptive_loss``: validate once, pick a backend, run it."""

import torch

from .backends import select_backend
from .unfused import UnfusedLAD
from .validation import check_options, check_tensors


def locally_adaptive_loss(logits, target, *, kernel_size=5, power=3.0, stride=1,
                          ignore_index=255, eps=1e-5, weight_base=2.0, normalizer="count",
                          zscore=True, reduction="mean", backend="auto", check_target=True):
    r"""The locally adaptive loss (LAD) of Guo et al. for semantic segmentation.

    For every valid centre pixel p, the z-scored logits z_q of the neighbours q in a K x K
    window that share p's label are averaged with weights omega(d) = weight_base**(1-d), d the
    chessboard distance from p; the cost is the softmax cross-entropy of that pooled vector
    against p's label, and the loss is the Minkowski (power-k) mean of the costs::

        f_p  = (1 / xi_p) * sum_{q in window(p), y_q == y_p} omega(d(p, q)) * z_q
        L_p  = logsumexp(f_p) - f_p[y_p]
        loss = ((1 / M) * sum_{valid p} L_p ** k) ** (1 / k)

    ``shared/SPEC.md`` (mirrored in ``docs/math.md``) is the exact definition.

    Args:
        logits: ``(B, C, H, W)`` float16, bfloat16, float32 or float64 scores, any strides;
            C >= 2. The paper's x.
        target: ``(B, H, W)`` uint8, int8, int16, int32 or int64 labels in ``[0, C)`` or
            ``ignore_index``, on the logits' device. The paper's y.
        kernel_size: odd window size, the paper's K (its filter is (K, K, C)). Default 5.
        power: Minkowski exponent, the paper's k, >= 1. Default 3; 1 is a plain mean.
        stride: only pixels with ``i % s == 0 and j % s == 0`` are centres, the paper's
            stride s. Default 1 (every pixel).
        ignore_index: label of pixels that are neither centres nor anyone's neighbours (they
            match no valid centre's class). Default 255, as in Pascal VOC masks.
        eps: added to the per-pixel variance of the z-score. Default 1e-5.
        weight_base: base of the window weights omega(d) = weight_base ** (1 - d), the paper's
            omega_d: 2 at the centre, 1 on the first ring, 1/2 on the second. Default 2.
        normalizer: the paper's xi: ``"count"`` (default), the number of same-class
            neighbours, centre included; ``"weight"``, the sum of their weights.
        zscore: standardise each pixel's logits over classes first (the paper's normalised
            x). Default True.
        reduction: ``"mean"`` (default): the Minkowski mean, a 0-dim tensor, 0 when no
            centre is valid. ``"none"``: the map of L_p, shape ``(B, H, W)``, 0 at invalid
            centres.
        backend: ``"auto"`` (default: the fused kernels for float16/bfloat16/float32 CUDA
            tensors when Triton imports, else PyTorch), ``"torch"`` (the unfused PyTorch
            implementation) or ``"triton"`` (the fused kernels; on CPU tensors only under
            Triton's interpreter). A performance knob: every backend computes the same function.
        check_target: check that every label is in ``[0, C)`` or ``ignore_index`` (one
            device-to-host sync). With False an out-of-range label gives an unspecified loss
            but never an out-of-bounds access. Default True.

    Returns:
        The loss in the logits' dtype: 0-dim for ``"mean"``, ``(B, H, W)`` for ``"none"``.
        Differentiable with respect to ``logits``; the gradient comes back in their dtype.

    Raises:
        TypeError: logits not floating, target not integer.
        ValueError: a shape, device, option or (with ``check_target``) label outside the
            contract; the message names the argument, what was expected and what it got.
        RuntimeError: ``backend="triton"`` where the fused kernels cannot run, saying why.
    """
    options = dict(kernel_size=kernel_size, power=power, stride=stride, ignore_index=ignore_index,
                   eps=eps, weight_base=weight_base, normalizer=normalizer, zscore=zscore,
                   reduction=reduction)
    check_options(backend=backend, check_target=check_target, **options)
    check_tensors(logits, target, ignore_index=ignore_index, check_target=check_target)
    chosen = select_backend(backend, logits)
    if logits.numel() == 0:  # empty batch: exactly 0 (a map of zeros), zero gradient
        return (logits.sum() if reduction == "mean" else logits.sum(dim=1)) * 0
    # Inside Function.forward needs_input_grad stays True under no_grad: decide here, so that
    # evaluation neither computes nor keeps what only the backward needs.
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    if chosen == "triton":
        from .fused import FusedLAD

        return FusedLAD.apply(logits, target, *options.values(), need_grad, None)
    return UnfusedLAD.apply(logits, target, *options.values(), need_grad)

"""``locally_adaptive_loss``: validate once, pick a backend for the costs, reduce them."""

import warnings

import torch
import torch.nn.functional as F

from .dispatch import label_counter, select_backend
from .options import CostOptions, accumulation_dtype
from .pooling import pooled_mean
from .reduction import centre_weights, cost_map, minkowski_mean, valid_centres, weighted_sum
from .unfused import UnfusedCosts
from .validation import check_options, check_tensors, check_values, sync_group
from .dispatch import check_labels


def locally_adaptive_loss(logits, target, *, kernel_size=5, power=3.0, stride=1,
                          ignore_index=255, eps=1e-5, weight_base=2.0, normalizer="count",
                          zscore=True, reduction="mean", pooling="minkowski", lmp_ratio=0.3,
                          lmp_p=1.7, topk_ratio=0.2, weight=None, pixel_weight=None,
                          backend="auto", check_target=True, sync=False, process_group=None,
                          upsample=None, align_corners=False):
    r"""The locally adaptive loss (LAD) of Guo et al. for semantic segmentation.

    For every valid centre pixel p, the z-scored logits z_q of the neighbours q in a K x K
    window (K x K x K in a volume) that share p's label are averaged with weights
    omega(d) = weight_base**(1-d), d the chessboard distance from p; the cost is the softmax
    cross-entropy of that pooled vector against p's label, and the loss is the Minkowski
    (power-k) mean of the costs, weighted by class (``weight``) and by pixel (``pixel_weight``)
    when given::

        f_p  = (1 / xi_p) * sum_{q in window(p), y_q == y_p} omega(d(p, q)) * z_q
        L_p  = logsumexp(f_p) - f_p[y_p]
        w_p  = weight[y_p] * pixel_weight_p                  (each factor 1 when not given)
        loss = (sum_{valid p} w_p L_p ** k / sum_{valid p} w_p) ** (1 / k)

    ``docs/contract.md`` is the exact definition (every parameter, dtype, tolerance and error);
    ``docs/math.md`` derives the gradient.

    Args:
        logits: ``(B, C, H, W)`` images or ``(B, C, D, H, W)`` volumes, float16, bfloat16,
            float32 or float64, any strides; C >= 2. The paper's x.
        target: ``(B, H, W)`` or ``(B, D, H, W)`` uint8, int8, int16, int32 or int64 labels in
            ``[0, C)`` or ``ignore_index``, on the logits' device. The paper's y. A channel of
            size 1, ``(B, 1, H, W)`` or ``(B, 1, D, H, W)`` (MONAI's, nnU-Net's), is read as
            ``(B, H, W)`` or ``(B, D, H, W)`` (a view, no copy).
        kernel_size: odd window size, the paper's K (its filter is (K, K, C)). Default 5.
        power: Minkowski exponent, the paper's k, >= 1. Default 3; 1 is a plain mean.
        stride: only pixels whose every coordinate is a multiple of s are centres, the
            paper's stride s. Default 1 (every pixel).
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
            centre is valid. ``"sum"``: sum_p w_p * L_p, a 0-dim tensor: the sum of the weighted
            costs, without the Minkowski exponent (for ``power != 1`` it is not the mean times
            a count). ``"none"``: the map of w_p * L_p, shape ``(B, H, W)`` (``(B, D, H, W)``),
            0 at invalid centres.
        pooling: how ``reduction="mean"`` turns the costs into the loss, over the n valid
            centres' class-weighted costs l_p = w_p * L_p: ``"minkowski"`` (default), the
            Minkowski mean above; ``"lmp"``, loss max-pooling (Rota Bulo et al., CVPR 2017): the
            largest sum_p v_p l_p over weightings v >= 0 with ||v||_p <= n**(-1/q) (the uniform
            weighting's p-norm) and v_p <= tau = m**(-1/p) * n**(-1/q), q = p / (p - 1),
            m = max(1, floor(lmp_ratio * n)); ``"topk"``, the mean of the ceil(topk_ratio * n)
            largest l_p (ties: first on the centre grid). Their gradient holds the maximising
            weights constant. Not with ``reduction="none"``, ``sync`` or ``process_group``.
        lmp_ratio: m / n for ``pooling="lmp"``: the share of centres that may take the
            largest weight tau, in (0, 1]. Default 0.3.
        lmp_p: p of ``pooling="lmp"``, finite and > 1. Default 1.7. Towards 1 the loss tends to
            the mean of the m largest costs, towards infinity to their plain mean.
        topk_ratio: the share of centres ``pooling="topk"`` averages, in (0, 1]. Default 0.2.
        weight: optional ``(C,)`` float tensor of non-negative class weights, as in
            ``nn.CrossEntropyLoss``: w_p = weight[y_p]. On the logits' device.
        pixel_weight: optional ``(B, H, W)`` (``(B, D, H, W)``) float tensor of non-negative
            per-pixel weights multiplying each centre's weight: w_p = weight[y_p] *
            pixel_weight_p (e.g. an OHEM sampler's map). On the logits' device; no gradient.
        backend: ``"auto"`` (default: the fused kernels for float16/bfloat16/float32 CUDA
            tensors when Triton imports, else PyTorch), ``"torch"`` (the unfused PyTorch
            implementation) or ``"triton"`` (the fused kernels; on CPU tensors only under
            Triton's interpreter). A performance knob: every backend computes the same function.
        check_target: check that every label is in ``[0, C)`` or ``ignore_index`` and every
            class and pixel weight finite and non-negative (one device-to-host sync). With False an
            out-of-range label gives an unspecified loss but never an out-of-bounds access.
            Default True.
        sync: with ``reduction="mean"`` and ``pooling="minkowski"`` under torch.distributed,
            the exact Minkowski mean over every rank's valid pixels (all-reduce of three
            numbers) instead of this rank's own. Default False: a local mean, as
            ``F.cross_entropy``.
        process_group: the group to synchronise over (implies ``sync``); default the world.
        upsample: None (default: the logits have the target's spatial size), ``"bilinear"``
            (images) or ``"trilinear"`` (volumes): the logits may have another spatial size,
            a head's output at 1/4 or 1/8 of the mask's, and the loss is that of
            ``F.interpolate(logits, size=<the target's spatial size>, mode=upsample,
            align_corners=align_corners)``, as segmentation models upsample before
            cross-entropy. The gradient flows back to the low-resolution logits.
        align_corners: PyTorch's ``align_corners`` of that interpolation (Hugging Face's
            models: False; mmsegmentation: the head's flag). Default False; True needs
            ``upsample``.

    Returns:
        The loss in the logits' dtype: 0-dim for ``"mean"`` and ``"sum"``, ``(B, H, W)``
        (``(B, D, H, W)``, the target's size) for ``"none"``.
        Differentiable with respect to ``logits``; the gradient comes back in their dtype.

    Raises:
        TypeError: logits not floating, target not integer.
        ValueError: a shape, device, option (or combination: ``pooling`` other than
            ``"minkowski"`` with ``reduction`` other than ``"mean"``, ``sync`` or
            ``process_group``) or (with ``check_target``) label or weight value outside the
            contract; the message names the argument, what was expected and what it got.
        RuntimeError: ``backend="triton"`` where the fused kernels cannot run, saying why.
    """
    options = CostOptions(kernel_size=kernel_size, stride=stride, ignore_index=ignore_index,
                          eps=eps, weight_base=weight_base, normalizer=normalizer, zscore=zscore)
    check_options(power=power, reduction=reduction, pooling=pooling, lmp_ratio=lmp_ratio,
                  lmp_p=lmp_p, topk_ratio=topk_ratio, backend=backend,
                  check_target=check_target, sync=sync, process_group=process_group,
                  upsample=upsample, align_corners=align_corners, **options._asdict())
    check_tensors(logits, target, weight, pixel_weight, upsample)
    if target.dim() == logits.dim():
        target = target.squeeze(1)  # (B, 1, H, W) -> (B, H, W): a view
    chosen = select_backend(backend, logits)
    # Inside an autograd Function needs_input_grad stays True under no_grad: decided here, so
    # that evaluation neither computes nor keeps what only the backward needs (and whether the
    # kernels can interpolate depends on it: the backward's tiling is the stricter).
    need_grad = logits.requires_grad and torch.is_grad_enabled()
    spatial = tuple(target.shape[1:])
    in_kernels = None  # (mode, align_corners) where the fused kernels interpolate themselves
    if upsample is not None:
        if chosen == "triton" and 0 not in spatial and logits.numel() > 0:
            from .fused import interpolates

            if interpolates(logits, spatial, upsample, align_corners, options, weight,
                            need_grad):
                in_kernels = (upsample, align_corners)
        if in_kernels is None:
            logits = _upsampled(logits, spatial, upsample, align_corners)
    classes = logits.shape[1]
    if classes == 2 and zscore:
        _warn_binary_zscore()
    if not torch.compiler.is_compiling() and kernel_size > max(spatial, default=0):
        _warn_large_window(kernel_size, spatial)
    guard = None
    if check_target and target.numel() > 0:
        if torch.compiler.is_compiling():
            guard = check_labels(target, weight, classes, ignore_index, pixel_weight)
        else:
            check_values(target, weight, classes, ignore_index, pixel_weight,
                         count_bad=label_counter(target))
    if logits.numel() == 0:  # empty batch: exactly 0 (a map of zeros), zero gradient
        return (logits.sum(dim=1) if reduction == "none" else logits.sum()) * 0
    acc = accumulation_dtype(logits.dtype)
    if weight is not None:
        weight = weight.detach().to(acc).contiguous()
    if pixel_weight is not None:
        pixel_weight = pixel_weight.detach().to(acc)

    group = sync_group(sync, process_group) if reduction == "mean" else None
    if chosen == "triton":
        from .fused import fused_cost_map, fused_mean

        # The kernels reduce the Minkowski mean themselves with class weights; pixel weights,
        # the sum and the other poolings reduce the costs L in PyTorch (as reduction="none").
        if reduction == "mean" and pooling == "minkowski" and pixel_weight is None:
            out = fused_mean(logits, target, weight, options, power, group, need_grad,
                             in_kernels)
            return out if guard is None else out + guard.to(out.dtype)
        L = fused_cost_map(logits, target, weight, options, power, need_grad, in_kernels)
    else:
        L = UnfusedCosts.apply(logits, target, options, need_grad)

    valid = valid_centres(target, ignore_index, stride)
    w = centre_weights(target, valid, weight, classes, stride, pixel_weight)
    if reduction == "none":
        out = cost_map(L, w, stride, target.shape[1:]).to(logits.dtype)
    elif reduction == "sum":
        out = weighted_sum(L, w).to(logits.dtype)
    elif pooling == "minkowski":
        out = minkowski_mean(L, w, None, float(power), group).to(logits.dtype)
    else:
        out = pooled_mean(L, w, valid, pooling, lmp_ratio=float(lmp_ratio), lmp_p=float(lmp_p),
                          topk_ratio=float(topk_ratio)).to(logits.dtype)
    return out if guard is None else out + guard.to(out.dtype)


def _upsampled(logits, size, mode, align_corners):
    """The logits at the target's ``size``: ``upsample``'s definition, F.interpolate's values.
    The PyTorch backend scores this tensor; the fused one where its kernels do not interpolate
    in registers (kernels/upsample.py's ``fusable``; README.md, "Limitations")."""
    if 0 in size:  # nothing to interpolate to: an empty map, and a zero gradient
        return (logits.sum() * 0).expand(logits.shape[:2] + size)
    return F.interpolate(logits, size=size, mode=mode, align_corners=align_corners)


_WARNED = set()


def _warn_binary_zscore():
    """Once per process: with two classes the z-score leaves each pixel +-1 (docs/contract.md)."""
    if "binary" in _WARNED or torch.compiler.is_compiling():
        return
    _WARNED.add("binary")
    warnings.warn(
        "locally_adaptive_loss with C=2 classes and zscore=True: each pixel's z-scored logits "
        "are +-1 up to eps/variance, so the loss only responds to pixels whose two logits nearly "
        "tie and the gradient vanishes elsewhere. For binary segmentation pass zscore=False.",
        UserWarning, stacklevel=3)


def _warn_large_window(kernel_size, spatial):
    """Once per process (not per shape: a data set of small crops would warn every step): a
    window longer than the image on every axis pools each centre with every pixel of its class,
    more likely logits left at the features' resolution than a choice."""
    if "window" in _WARNED:
        return
    _WARNED.add("window")
    warnings.warn(
        f"locally_adaptive_loss with kernel_size={kernel_size}, larger than the image "
        f"({' x '.join(map(str, spatial))}): every centre's window covers the whole image. "
        "Upsample the logits to the mask's size (upsample='bilinear' does it inside the loss), "
        "or pass a smaller kernel_size (this warning is shown once per process).", UserWarning,
        stacklevel=3)

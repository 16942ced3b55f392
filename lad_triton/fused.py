"""The autograd Function of the fused Triton kernels (``backend="triton"``).

Between forward and backward it keeps the caller's logits and target (no copies), P (C floats
per centre: one float32 buffer of the logits' size at stride 1, float64 for float64 logits), L,
the z-score mean and rstd (one float each per pixel) and two scalars: nothing K*K-sized. The backward reads the Minkowski factor from device memory,
so neither pass syncs with the host.
"""

import torch
from torch.autograd.function import once_differentiable

from .kernels import backward as kernels_backward
from .kernels import forward as kernels_forward


class FusedLAD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, kernel_size, power, stride, ignore_index, eps, weight_base,
                normalizer, zscore, reduction, need_grad, block_c):
        loss, saved = kernels_forward.forward(
            logits, target, kernel_size=kernel_size, power=power, stride=stride,
            ignore_index=ignore_index, eps=eps, weight_base=weight_base, normalizer=normalizer,
            zscore=zscore, reduction=reduction, need_grad=need_grad, block_c=block_c)
        if need_grad:
            ctx.save_for_backward(logits, target, *saved)
            ctx.options = dict(kernel_size=kernel_size, power=power, stride=stride,
                               weight_base=weight_base, zscore=zscore, reduction=reduction,
                               block_c=block_c)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, target, P, L, mean, rstd, stats = ctx.saved_tensors
        grad = kernels_backward.backward(grad_loss, logits, target, P, L, mean, rstd, stats,
                                         **ctx.options)
        return (grad,) + (None,) * 12

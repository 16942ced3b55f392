"""The fused Triton kernels as PyTorch custom operators (``torch.library``), so that
``torch.compile`` traces each as one node (no graph break) and ``opcheck`` can verify them.

``lad_triton::fused_costs`` maps logits to the costs L on the centre grid and the per-tile
Minkowski partials; its autograd formula is ``lad_triton::fused_costs_backward``. Between the
two it keeps the caller's logits and target (no copies), P (C values per centre: one buffer of
the logits' size and dtype at stride 1; float32 for half-precision logits with C > 32, see
``kernels.forward.p_dtype``) and the z-score mean and rstd (one float each per pixel): nothing
K*K-sized, and neither pass syncs with the host.
"""

from typing import Optional

import torch
from torch import Tensor

from .kernels import backward as kernels_backward
from .kernels import forward as kernels_forward


@torch.library.custom_op("lad_triton::fused_costs", mutates_args=())
def fused_costs(logits: Tensor, target: Tensor, weight: Optional[Tensor], kernel_size: int,
                power: float, stride: int, ignore_index: int, eps: float, weight_base: float,
                normalizer: str, zscore: bool,
                need_grad: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(L, partials, P, mean, rstd); see kernels/forward.py."""
    return kernels_forward.forward(
        logits, target, weight, kernel_size=kernel_size, power=power, stride=stride,
        ignore_index=ignore_index, eps=eps, weight_base=weight_base, normalizer=normalizer,
        zscore=zscore, need_grad=need_grad)


@fused_costs.register_fake
def _(logits, target, weight, kernel_size, power, stride, ignore_index, eps, weight_base,
      normalizer, zscore, need_grad):
    return kernels_forward.allocate(logits, stride=stride, zscore=zscore, need_grad=need_grad)


@torch.library.custom_op("lad_triton::fused_costs_backward", mutates_args=())
def fused_costs_backward(dL: Tensor, logits: Tensor, target: Tensor, P: Tensor, mean: Tensor,
                         rstd: Tensor, kernel_size: int, stride: int, weight_base: float,
                         zscore: bool) -> Tensor:
    """d loss / d logits from dL = d loss / d L; see kernels/backward.py."""
    return kernels_backward.backward(dL, logits, target, P, mean, rstd, kernel_size=kernel_size,
                                     stride=stride, weight_base=weight_base, zscore=zscore)


@fused_costs_backward.register_fake
def _(dL, logits, target, P, mean, rstd, kernel_size, stride, weight_base, zscore):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, _, kernel_size, _, stride, _, _, weight_base, _, zscore, _ = inputs
    _, partials, P, mean, rstd = output
    ctx.save_for_backward(logits, target, P, mean, rstd)
    ctx.options = (kernel_size, stride, weight_base, zscore)
    ctx.mark_non_differentiable(partials, P, mean, rstd)


def _backward(ctx, dL, *_):
    logits, target, P, mean, rstd = ctx.saved_tensors
    if P.numel() == 0 and logits.numel() > 0:
        raise RuntimeError("lad_triton::fused_costs ran with need_grad=False, so it kept nothing "
                           "to differentiate; call it with need_grad=True")
    dx = fused_costs_backward(dL, logits, target, P, mean, rstd, *ctx.options)
    return (dx,) + (None,) * 11


fused_costs.register_autograd(_backward, setup_context=_setup_context)

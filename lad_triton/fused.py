"""The fused Triton kernels as PyTorch custom operators (``torch.library``), so that
``torch.compile`` traces each as one node (no graph break) and ``opcheck`` can verify them, and
the autograd wiring of the fused Minkowski mean.

- ``lad_triton::fused_costs`` maps logits to the per-tile Minkowski partials and P for the
  backward (C values per centre in the logits' dtype: one logits-sized buffer at stride 1),
  and, unless ``mean``, the costs L on the centre grid. Its autograd formula,
  ``lad_triton::fused_costs_backward``, takes the map d loss / d L: it serves reduction="none"
  and any reduction computed in PyTorch.
- ``FusedMinkowskiMean`` is reduction="mean": the costs with ``mean=True`` (P scaled by each
  centre's share of the Minkowski factor, no L), then ``lad_triton::fused_combine`` (one small
  launch adds the partials into the loss, max L and a and keeps each tile's max L; the
  synchronised mean all-reduces them in PyTorch instead), and ``lad_triton::fused_mean_backward``.
  So between the forward and the backward the loss keeps P and a few numbers per tile, no zero
  gradient is materialised for non-differentiable outputs, and neither pass syncs with the host.
- ``FusedGradientMean`` is reduction="mean" on low-resolution logits the kernels interpolate:
  ``lad_triton::fused_mean_gradient`` runs the forward and the backward's kernels part by part
  of the batch in the forward, so that P exists for one part at a time, and keeps the
  low-resolution gradient of the first parts and the staged shares of the last, which
  ``lad_triton::fused_upsample_gradient`` turns into the gradient, scaled, in the backward.

In eager mode the mean calls the operators' implementations directly (``_eager``): an
operator's Python dispatch costs tens of microseconds of host time per call, which a training
step waits for when the GPU runs ahead of it. ``torch.compile`` still sees the operators.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from .kernels import backward as kernels_backward
from .kernels import combine as kernels_combine
from .kernels import forward as kernels_forward
from .kernels.config import accumulation_dtype, cdiv
from .kernels.upsample import columns_interpolated
from .reduction import synced_scalars


def _on_device(tensor):
    """Kernels launch on the current CUDA device: make it the tensor's (nothing on the CPU, nor
    where it already is: switching costs host time on every call)."""
    if not tensor.is_cuda or tensor.get_device() == torch.cuda.current_device():
        return _NO_DEVICE
    return torch.cuda.device(tensor.device)


def _operator(name, impl, mutates_args=()):
    """The custom operator ``name`` implemented by ``impl``; ``_eager(op)`` finds impl again."""
    op = torch.library.custom_op(name, mutates_args=mutates_args)(impl)
    _IMPLS[op] = impl
    return op


_IMPLS = {}


def _plain(args):
    """Plain tensors and no Python dispatch mode: nothing (a fake tensor mode, make_fx, a
    FlopCounterMode, a tensor subclass) that must see the operator rather than its launches."""
    return torch._C._len_torch_dispatch_stack() == 0 and all(
        type(a) in (Tensor, torch.nn.Parameter) for a in args if isinstance(a, Tensor))


def _eager(op):
    """``op`` under torch.compile (one traced node), under anything else that traces or
    dispatches (``_plain``), or where autograd must see it (a gradient of the gradient: the
    operator raises, as it has no formula); else its implementation."""
    impl = _IMPLS[op]

    def call(*args):
        if torch.compiler.is_compiling() or torch.is_grad_enabled() or not _plain(args):
            return op(*args)
        return impl(*args)

    return call


class _NoDevice:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


_NO_DEVICE = _NoDevice()


def _fused_costs(logits: Tensor, target: Tensor, weight: Optional[Tensor], power: float,
                 kernel_size: int, stride: int, ignore_index: int, eps: float, weight_base: float,
                 normalizer: str, zscore: bool, need_grad: bool, mean: bool, plan: str,
                 upsample: str, align_corners: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(L, partials, ticket, P); see kernels/forward.py. ``plan``: kernels_forward.tile_plan's
    (the forward computes the same; the argument puts it into traced graphs). ``upsample``:
    "bilinear" where the kernels interpolate low-resolution logits to the target's size, else
    ""."""
    with _on_device(logits):
        return kernels_forward.forward(
            logits, target, weight, kernel_size=kernel_size, power=power, stride=stride,
            ignore_index=ignore_index, eps=eps, weight_base=weight_base, normalizer=normalizer,
            zscore=zscore, need_grad=need_grad, mean=mean, plan=plan, upsample=upsample,
            align_corners=align_corners)


fused_costs = _operator("lad_triton::fused_costs", _fused_costs)


@fused_costs.register_fake
def _(logits, target, weight, power, kernel_size, stride, ignore_index, eps, weight_base,
      normalizer, zscore, need_grad, mean, plan, upsample, align_corners):
    return kernels_forward.allocate(logits, kernel_size=kernel_size, stride=stride,
                                    need_grad=need_grad, mean=mean, plan=plan,
                                    size=tuple(target.shape[-2:]) if upsample else None)


def _fused_costs_backward(dL: Tensor, logits: Tensor, target: Tensor, P: Tensor,
                          kernel_size: int, stride: int, eps: float, weight_base: float,
                          zscore: bool, plan: str, upsample: str, align_corners: bool) -> Tensor:
    """d output / d logits from the map dL = d output / d L; see kernels/backward.py. ``plan``,
    ``upsample``, ``align_corners``: the forward's."""
    with _on_device(logits):
        return kernels_backward.backward(dL, logits, target, P, kernel_size=kernel_size,
                                         stride=stride, eps=eps, weight_base=weight_base,
                                         zscore=zscore, plan=plan, upsample=upsample,
                                         align_corners=align_corners)


fused_costs_backward = _operator("lad_triton::fused_costs_backward", _fused_costs_backward)


@fused_costs_backward.register_fake
def _(dL, logits, target, P, kernel_size, stride, eps, weight_base, zscore, plan, upsample,
      align_corners):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    (logits, target, _, _, kernel_size, stride, _, eps, weight_base, _, zscore, _,
     mean, plan, upsample, align_corners) = inputs
    _, partials, ticket, P = output
    ctx.save_for_backward(logits, target, P)
    ctx.options = (kernel_size, stride, eps, weight_base, zscore, plan, upsample, align_corners)
    ctx.mean = mean
    ctx.mark_non_differentiable(partials, ticket, P)
    # Only L is differentiable: no logits-sized zero gradient for P (nor for the partials).
    ctx.set_materialize_grads(False)


def _backward(ctx, dL, *_):
    logits, target, P = ctx.saved_tensors
    if ctx.mean or (P.numel() == 0 and logits.numel() > 0):
        raise RuntimeError("lad_triton::fused_costs ran with need_grad=False or mean=True, so it "
                           "kept nothing to differentiate L with")
    if dL is None:
        return _input_grads(None, fused_costs)
    return _input_grads(fused_costs_backward(dL, logits, target, P, *ctx.options), fused_costs)


fused_costs.register_autograd(_backward, setup_context=_setup_context)


def _fused_combine(partials: Tensor, ticket: Tensor, power: float,
                   loss_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """(loss, scalars, tile_max): the Minkowski mean, float64 (loss, max L, a) and each tile's
    max L; see kernels/forward.py."""
    with _on_device(partials):
        return kernels_combine.combine(partials, ticket, power, loss_dtype)


# The ticket counts the combine's finished blocks (the forward zeroed it).
fused_combine = _operator("lad_triton::fused_combine", _fused_combine, mutates_args=("ticket",))


@fused_combine.register_fake
def _(partials, ticket, power, loss_dtype):
    return (partials.new_empty((), dtype=loss_dtype),
            partials.new_empty(3, dtype=torch.float64), partials.new_empty(partials.shape[0]))


def _fused_mean_backward(grad: Tensor, tile_max: Tensor, scalars: Tensor, logits: Tensor,
                         target: Tensor, P: Tensor, kernel_size: int, stride: int, eps: float,
                         weight_base: float, zscore: bool, weighted: bool, power: float,
                         plan: str) -> Tensor:
    """d output / d logits of the fused Minkowski mean; see kernels/backward.py. ``plan``: the
    forward's, whose tiles ``tile_max`` holds."""
    with _on_device(logits):
        return kernels_backward.backward(tile_max, logits, target, P, kernel_size=kernel_size,
                                         stride=stride, eps=eps, weight_base=weight_base,
                                         zscore=zscore, plan=plan, weighted=weighted, grad=grad,
                                         scalars=scalars, power=power)


fused_mean_backward = _operator("lad_triton::fused_mean_backward", _fused_mean_backward)


@fused_mean_backward.register_fake
def _(grad, tile_max, scalars, logits, target, P, kernel_size, stride, eps, weight_base, zscore,
      weighted, power, plan):
    return torch.empty_like(logits)


# The mean on low-resolution logits forms its gradient in the forward, one part of the batch at a
# time (FusedGradientMean): P exists for one part only. Two parts hold P to half the batch's for
# two more launches of each kernel (host time, and a second tail of programs per kernel).
GRADIENT_PARTS = 2


def _fused_mean_gradient(logits: Tensor, target: Tensor, weight: Optional[Tensor], power: float,
                         kernel_size: int, stride: int, ignore_index: int, eps: float,
                         weight_base: float, normalizer: str, zscore: bool, plan: str,
                         upsample: str, align_corners: bool,
                         parts: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(partials, ticket, G, stage, above, scalars) of the Minkowski mean: the forward's partials
    and ticket as ``fused_costs`` gives them for the whole batch, and d loss / d logits up to one
    factor per part of the batch, formed right after each part's forward from its P, which then
    goes. The batch runs in ``parts`` parts of cdiv(B, parts) images. Part i's gradient is the
    backward's with grad = 1 and part i's own ``scalars[i]`` = (1, max L, a = 1): its tiles'
    d loss / d L relative to the part's max L (kernels/backward.py), since the batch's is not
    known until every part has run. The parts before the last keep it as G (the logits' shape
    in the accumulation dtype); the last keeps its staged shares (kernels/backward.py's
    upsample_staging), which ``fused_upsample_gradient`` sums into the gradient in the backward,
    scaled, where it scales G: the last part's column sums and its scaling are one pass."""
    batch = logits.shape[0]
    size = cdiv(batch, parts)
    head = (cdiv(batch, size) - 1) * size  # the images before the last part
    acc = accumulation_dtype(logits.dtype)
    G = logits.new_empty((head,) + tuple(logits.shape[1:]), dtype=acc)
    scalars = logits.new_ones((cdiv(batch, size), 3), dtype=torch.float64)
    one = logits.new_ones((), dtype=acc)
    partials, ticket = [], None
    # the first part's column buffer and P serve every part (the first is the largest): the
    # kernels of a part run after the previous part's on the stream
    columns_buffer = P_buffer = None
    with _on_device(logits):
        for i, b in enumerate(range(0, batch, size)):
            part = slice(b, b + size)
            n = logits[part].shape[0]
            columns = columns_interpolated(
                logits[part], tuple(target.shape[-2:]), align_corners, kernel_size,
                out=None if columns_buffer is None else columns_buffer[:n])
            _, part_partials, ticket, P = kernels_forward.forward(
                logits[part], target[part], weight, kernel_size=kernel_size, power=power,
                stride=stride, ignore_index=ignore_index, eps=eps, weight_base=weight_base,
                normalizer=normalizer, zscore=zscore, need_grad=True, mean=True, plan=plan,
                upsample=upsample, align_corners=align_corners, columns=columns,
                P=None if P_buffer is None else P_buffer[:n])
            if columns_buffer is None:
                columns_buffer, P_buffer = columns, P
            if not zscore:  # the backward reads them only for the z-score's Jacobian
                columns = None
            tile_max = part_partials[:, 0]
            # the combine's max L: NaN tiles left out (their NaN reaches the loss and a)
            scalars[i, 1] = tile_max.nan_to_num(0.0, math.inf).amax()
            last = b >= head
            if last:  # allocated after the other parts' (theirs go with their column sums)
                stage, above = kernels_backward.upsample_staging(
                    logits[part], tuple(target.shape[-2:]), align_corners, kernel_size)
            kernels_backward.backward(tile_max, logits[part], target[part], P,
                                      kernel_size=kernel_size, stride=stride, eps=eps,
                                      weight_base=weight_base, zscore=zscore, plan=plan,
                                      weighted=weight is not None, grad=one,
                                      scalars=scalars[i], power=power, upsample=upsample,
                                      align_corners=align_corners, columns=columns,
                                      out=None if last else G[part],
                                      staging=(stage, above) if last else None)
            partials.append(part_partials)
    return torch.cat(partials), ticket, G, stage, above, scalars


fused_mean_gradient = _operator("lad_triton::fused_mean_gradient", _fused_mean_gradient)


@fused_mean_gradient.register_fake
def _(logits, target, weight, power, kernel_size, stride, ignore_index, eps, weight_base,
      normalizer, zscore, plan, upsample, align_corners, parts):
    _, partials, ticket, _ = kernels_forward.allocate(
        logits, kernel_size=kernel_size, stride=stride, need_grad=False, mean=True, plan=plan,
        size=tuple(target.shape[-2:]))
    batch = logits.shape[0]
    size = cdiv(batch, parts)
    head = (cdiv(batch, size) - 1) * size
    return (partials, ticket,
            logits.new_empty((head,) + tuple(logits.shape[1:]),
                             dtype=accumulation_dtype(logits.dtype)),
            *kernels_backward.upsample_staging(logits[head:], tuple(target.shape[-2:]),
                                               align_corners, kernel_size),
            logits.new_empty((cdiv(batch, size), 3), dtype=torch.float64))


def _fused_upsample_gradient(G: Tensor, stage: Tensor, above: Tensor, logits: Tensor,
                             scale: Tensor, size: list[int], align_corners: bool,
                             kernel_size: int) -> Tensor:
    """d loss / d logits (their dtype) from ``fused_mean_gradient``'s G of the first images and
    staged shares of the rest, each image's multiplied by ``scale`` (B,), in the accumulation
    dtype, before its one rounding."""
    dx = torch.empty_like(logits)
    scale = scale.to(accumulation_dtype(logits.dtype)).contiguous()
    head = G.shape[0]
    if head:
        dx[:head] = G * scale[:head].view((-1,) + (1,) * (G.dim() - 1))
    with _on_device(logits):
        kernels_backward.upsample_gradient(stage, above, logits[head:], tuple(size),
                                           align_corners, kernel_size, out=dx[head:],
                                           scale=scale[head:])
    return dx


fused_upsample_gradient = _operator("lad_triton::fused_upsample_gradient",
                                    _fused_upsample_gradient)


@fused_upsample_gradient.register_fake
def _(G, stage, above, logits, scale, size, align_corners, kernel_size):
    return torch.empty_like(logits)


def plan_of(logits, kernel_size, stride, weight=None, upsample=None):
    """The forward's tiles, as fused_costs takes them (``upsample``: as costs')."""
    return kernels_forward.tile_plan(logits, kernel_size=kernel_size, stride=stride,
                                     weighted=weight is not None, upsample=upsample is not None)


def _input_grads(dx, op):
    """The gradients of ``op``'s inputs: ``dx`` for the logits (the first), None for the rest."""
    return (dx,) + (None,) * (len(op._opoverload._schema.arguments) - 1)


def costs(logits, target, weight, options, power, need_grad, mean, plan=None, upsample=None):
    """``fused_costs`` on a CostOptions: the one place the options become the operator's
    arguments. ``plan``: plan_of's, computed here unless given. ``upsample``: None, or
    (mode, align_corners) for low-resolution logits the kernels interpolate."""
    if plan is None:
        plan = plan_of(logits, options.kernel_size, options.stride, weight, upsample)
    return _eager(fused_costs)(
        logits, target, weight, float(power), options.kernel_size, options.stride,
        options.ignore_index, float(options.eps), float(options.weight_base),
        options.normalizer, options.zscore, need_grad, mean, plan, *_upsample_args(upsample))


def _upsample_args(upsample):
    return ("", False) if upsample is None else (upsample[0], bool(upsample[1]))


def interpolates(logits, size, upsample, align_corners, options, weight, need_grad):
    """Whether the kernels score these low-resolution logits themselves (else the loss
    interpolates with F.interpolate first)."""
    return kernels_forward.interpolates(logits, size, upsample, align_corners,
                                        kernel_size=options.kernel_size, stride=options.stride,
                                        weighted=weight is not None, need_grad=need_grad)


def count_bad_labels(target, classes, ignore_index):
    """The label check's one pass on the GPU (kernels/labels.py), for validation.check_values."""
    from .kernels.labels import count_bad_labels as count

    with _on_device(target):  # Triton launches on the current device
        return count(target, classes, ignore_index)


def _reduce(partials, ticket, power, group, dtype):
    """(loss, float64 (loss, max L, a), each tile's max L) from the partials: the combine kernel
    locally, PyTorch across processes."""
    if group is None:
        return _eager(fused_combine)(partials, ticket, power, dtype)
    return (*synced_scalars(partials, power, group, dtype), partials[:, 0].contiguous())


class FusedMinkowskiMean(torch.autograd.Function):
    """reduction="mean" on the fused kernels: logits -> loss, and its exact gradient."""

    @staticmethod
    def forward(ctx, logits, target, weight, options, power, group):
        plan = plan_of(logits, options.kernel_size, options.stride, weight)
        _, partials, ticket, P = costs(logits, target, weight, options, power, True, True, plan)
        loss, scalars, tile_max = _reduce(partials, ticket, power, group, logits.dtype)
        ctx.save_for_backward(tile_max, scalars, logits, target, P)
        ctx.options = (options.kernel_size, options.stride, float(options.eps),
                       float(options.weight_base), options.zscore, weight is not None,
                       float(power), plan)
        return loss

    @staticmethod
    def backward(ctx, grad):
        tile_max, scalars, logits, target, P = ctx.saved_tensors
        dx = _eager(fused_mean_backward)(grad, tile_max, scalars, logits, target, P,
                                         *ctx.options)
        return dx, None, None, None, None, None


class FusedGradientMean(torch.autograd.Function):
    """reduction="mean" on low-resolution logits the kernels interpolate: the gradient is formed
    in the forward, part by part of the batch (``fused_mean_gradient``), so that P, the size of
    the full-resolution logits, exists for one part at a time and nothing of the target's size
    is kept for the backward, which scales the low-resolution gradient of the first parts and
    sums the last part's staged shares, scaled, in one launch (Liger-Kernel's move for an LLM's
    logits). The cost: the backward's work is done even where no backward follows."""

    @staticmethod
    def forward(ctx, logits, target, weight, options, power, group, upsample):
        plan = plan_of(logits, options.kernel_size, options.stride, weight, upsample)
        partials, ticket, G, stage, above, part_scalars = _eager(fused_mean_gradient)(
            logits, target, weight, float(power), options.kernel_size, options.stride,
            options.ignore_index, float(options.eps), float(options.weight_base),
            options.normalizer, options.zscore, plan, *_upsample_args(upsample), GRADIENT_PARTS)
        loss, scalars, _ = _reduce(partials, ticket, power, group, logits.dtype)
        # Part i's shares took its tiles' d loss / d L as (t / M_i)^(k-1) for its own max L M_i;
        # the batch's is a * (t / M)^(k-1): the part's factor a * (M_i / M)^(k-1), 0^0 = 1 as
        # the kernels' power_of (k = 1).
        top = scalars[1]
        share = scalars[2] * (part_scalars[:, 1] / torch.where(top > 0, top, 1.0)) ** (power - 1)
        ctx.save_for_backward(G, stage, above, share, logits)
        ctx.part = cdiv(logits.shape[0], share.shape[0])  # images per part
        ctx.upsample = (list(target.shape[-2:]), bool(upsample[1]), options.kernel_size)
        return loss

    @staticmethod
    def backward(ctx, grad):
        G, stage, above, share, logits = ctx.saved_tensors
        scale = (grad.to(share.dtype) * share).to(stage.dtype)
        per_image = scale.repeat_interleave(ctx.part)[:logits.shape[0]]
        dx = _eager(fused_upsample_gradient)(G, stage, above, logits, per_image, *ctx.upsample)
        if torch.is_grad_enabled():  # create_graph: dx's graph must reach the logits, and raise
            dx = _NoSecondDerivative.apply(dx, logits)
        return dx, None, None, None, None, None, None


class _NoSecondDerivative(torch.autograd.Function):
    """dx, differentiable in name only: its backward raises. The gradient G was formed by the
    kernels, which have no formula for their own derivative; without this a gradient penalty on
    dx (create_graph=True) would get a dx with no graph and silently contribute nothing."""

    @staticmethod
    def forward(ctx, dx, logits):
        return dx

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError("lad_triton: the fused loss on low-resolution logits has no second "
                           "derivative (its gradient comes from the kernels); use "
                           "backend='torch' for a gradient of the gradient")


def fused_mean(logits, target, weight, options, power, group, need_grad, upsample=None):
    """The fused Minkowski mean: through autograd when a gradient is needed (the gradient formed
    in the forward where the kernels interpolate), else the forward and the combine alone (no
    P). ``options``: a CostOptions; ``upsample``: as costs'."""
    if need_grad and upsample is None:
        return FusedMinkowskiMean.apply(logits, target, weight, options, float(power), group)
    if need_grad:
        return FusedGradientMean.apply(logits, target, weight, options, float(power), group,
                                       upsample)
    _, partials, ticket, _ = costs(logits, target, weight, options, power, False, True,
                                   upsample=upsample)
    return _reduce(partials, ticket, power, group, logits.dtype)[0]


def fused_cost_map(logits, target, weight, options, power, need_grad, upsample=None):
    """The costs L on the centre grid, differentiable (the other reductions reduce them)."""
    return costs(logits, target, weight, options, power, need_grad, False,
                 upsample=upsample)[0]

"""From the costs L on the centre grid to the loss: step 9 of docs/contract.md with class and pixel
weights, shared by both backends, synchronised across processes on request (docs/math.md derives
the formulas).

With w_p = weight[y_p] * pixel_weight_p at a valid centre (either factor 1 when not given; 0 at
invalid centres):

- reduction="mean": ``(sum_p w_p L_p^k / sum_p w_p)^(1/k)``, 0 when the denominator or every L is
  0; d loss / d L_p = a * w_p * (L_p / max L)^(k-1), a = (mean (L/max L)^k)^(1/k - 1) / sum w.
- reduction="sum": ``sum_p w_p L_p`` (no exponent); d loss / d L_p = w_p.
- reduction="none": the map w_p * L_p, 0 off the stride grid.

The mean is computed from per-tile partials (max L, sum w (L / max L)^k, sum w), which the fused
forward kernel writes (with class weights; with pixel weights the fused backend's L comes here)
and which are computed here otherwise: scaled by the max, L^k neither overflows nor underflows.
Combined in float64 in a fixed order: bitwise repeatable.

The other poolings of the costs, loss max-pooling and top-k, are in ``pooling.py``.
"""

import torch
import torch.distributed as dist


def valid_centres(target, ignore_index, stride):
    """The valid centres, a bool map on the centre grid: on the stride grid and not ignored."""
    centres = (slice(None),) + (slice(None, None, stride),) * (target.dim() - 1)
    y = target[centres]  # a view: no copy of the labels
    info = torch.iinfo(y.dtype)
    # Compare in the labels' own dtype (torch would wrap an ignore_index it cannot hold).
    if info.min <= ignore_index <= info.max:
        return y != ignore_index
    return torch.ones_like(y, dtype=torch.bool)


def centre_weights(target, valid, weight, classes, stride, pixel_weight=None):
    """w_p on the centre grid: weight[y_p] * pixel_weight_p (True without either) at valid
    centres, 0 (False) elsewhere. Labels outside [0, C) (check_target=False) are clamped:
    unspecified, in bounds."""
    centres = (slice(None),) + (slice(None, None, stride),) * (target.dim() - 1)
    w = valid
    if weight is not None:
        y = target[centres]
        # int64 indices: a uint8 index tensor would be read as a boolean mask.
        w = torch.where(valid, weight[y.long().clamp(0, classes - 1)], 0)
    if pixel_weight is not None:
        # where, not a product with the mask: a weight at an ignored pixel never reaches the sum.
        w = torch.where(valid, pixel_weight[centres] * w, 0)
    return w


def weight_total(target, weight, classes, stride, ignore_index, pixel_weight=None):
    """sum_p w_p over the valid centres, float64: the weighted mean's denominator. ``weight`` and
    ``pixel_weight`` in the accumulation dtype, or None."""
    w = centre_weights(target, valid_centres(target, ignore_index, stride), weight, classes,
                       stride, pixel_weight)
    return w.sum(dtype=torch.float64)


def cost_map(L, w, stride, spatial_shape):
    """reduction="none": w_p * L_p at the centres, 0 elsewhere, shape (B, *spatial_shape)."""
    weighted = L * w
    if stride == 1:
        return weighted
    out = weighted.new_zeros((L.shape[0],) + tuple(spatial_shape))
    out[(slice(None),) + (slice(None, None, stride),) * len(spatial_shape)] = weighted
    return out


def weighted_sum(L, w):
    """reduction="sum": sum_p w_p L_p in L's dtype; d loss / d L_p = w_p (autograd)."""
    return (L * w.to(L.dtype)).sum()


def local_partials(L, w, power):
    """One row of partials over all centres (the PyTorch backend's single "tile")."""
    l_max = L.amax() if L.numel() else L.new_zeros(())
    ratio = L / torch.where(l_max > 0, l_max, 1)
    w = w.to(L.dtype)
    return torch.stack([l_max, (w * ratio.pow(power)).sum(), w.sum()]).unsqueeze(0)


def scalars_from_partials(partials, power, group=None):
    """(loss, max L, a) in float64 from per-tile partials, all-reduced over ``group`` (None:
    local). d loss / d L_p = a * w_p * (L_p / max L)^(k-1)."""
    parts = partials.to(torch.float64)
    l_max, scaled, weights = parts[:, 0], parts[:, 1], parts[:, 2]
    nan = torch.isnan(l_max).any()
    top = l_max.amax() if len(parts) else parts.new_zeros(())
    if group is not None:
        # Max first (NaN travels as a flag: MAX does not propagate it everywhere).
        both = torch.stack([torch.where(nan, 0, top), nan.double()])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
        top, nan = both[0], both[1] > 0
    top = torch.where(nan, float("nan"), top)
    total = (scaled * (l_max / torch.where(top > 0, top, 1)).pow(power)).sum()
    weight_sum = weights.sum()
    if group is not None:
        sums = torch.stack([total, weight_sum])
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        total, weight_sum = sums[0], sums[1]
    mean_ratio = total / torch.where(weight_sum > 0, weight_sum, 1)
    loss = top * mean_ratio.pow(1.0 / power)
    a = torch.where((top == 0) | (weight_sum == 0), 0,
                    mean_ratio.pow(1.0 / power - 1.0) / torch.where(weight_sum > 0,
                                                                    weight_sum, 1))
    return torch.stack([loss, top, a])


def synced_scalars(partials, power, group, dtype):
    """(loss in ``dtype``, float64 (loss, max L, a)) over every rank of ``group``."""
    scalars = scalars_from_partials(partials, power, group)
    return scalars[0].to(dtype), scalars


class MinkowskiMean(torch.autograd.Function):
    """The weighted Minkowski mean of L from its partials, and its exact derivative."""

    @staticmethod
    def forward(ctx, L, w, partials, power, group):
        if partials is None:
            partials = local_partials(L, w, power)
        loss, top, a = scalars_from_partials(partials, power, group)
        ctx.save_for_backward(L, w, top.to(L.dtype), a.to(L.dtype))
        ctx.power = power
        return loss.to(L.dtype)

    @staticmethod
    def backward(ctx, grad):
        L, w, top, a = ctx.saved_tensors
        ratio = L / torch.where(top > 0, top, 1)
        dL = (grad.to(L.dtype) * a) * w * ratio.pow(ctx.power - 1.0)
        return dL, None, None, None, None


def minkowski_mean(L, w, partials, power, group=None):
    return MinkowskiMean.apply(L, w, partials, power, group)

"""The unfused PyTorch implementation of the loss: ``backend="torch"``, the CPU path, and the
baseline the benchmarks measure the fused kernels against.

It follows SPEC step by step with SPEC's names (z, omega, xi, f, L, g, G, a); the gradient is
derived in ``docs/math.md``. To be a fair baseline it is vectorised the way one would write it by
hand in PyTorch: every pixel at once, one loop over the K*K window offsets, each offset a pair
of shifted *views* (no copies, no ``F.unfold``) accumulated in place. The backward is written by
hand rather than left to autograd, because autograd through K*K in-place slice updates keeps K*K
masks and zero-fills a full logits-sized buffer per offset.

forward::

    z = (x - mean_c x) * rstd                      # rstd = 1 / sqrt(var_c x + eps)
    for each offset delta of the window:           # centres p on the stride grid, q = p + delta
        same = y[q] == y[p]
        f[p]  += omega(delta) * where(same, z[q], 0)
        xi[p] += (1 or omega(delta)) * same
    f /= xi;  L = logsumexp_c(f) - f[y];  loss = Minkowski mean of L over valid centres
    P = dloss/dL_p * (softmax(f_p) - onehot(y_p)) / xi_p     # saved for the backward

backward::

    g = grad_loss * P                              # zero off the grid and at ignored centres
    for each offset delta:  G[q] += omega(delta) * where(same, g[p], 0)     # adjoint pooling
    dx = rstd * (G - mean_c G - z * mean_c(G * z))                          # z-score Jacobian

Complexity, with N = B*H*W pixels and N_c ~ N / s^2 centres on the stride grid:

- time: O(K^2 * C * N_c) for the pooling and for its adjoint, O(C * N) for the z-score and its
  Jacobian; each offset is a handful of elementwise kernels over its C x N_c region.
- memory, in the accumulation dtype (float32, float64 for float64 logits): the forward keeps z
  (C*N), f (C*N_c) and one offset's temporary (C*N_c) alive at once, plus a float32 copy of the
  logits for float16/bfloat16 input; between forward and backward it holds P (C*N_c) and the
  per-pixel mean and rstd (2*N) beside the caller's logits and target; the backward allocates G
  and a recomputed z (C*N each) and one offset's temporary.
"""

import torch
from torch.autograd.function import once_differentiable


def accumulation_dtype(dtype):
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32 (SPEC)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grid_pair(size, stride, delta):
    """Slices along one axis: the centres (indices on the stride grid, centre c at pixel
    stride*c) whose neighbour stride*c + delta lies in [0, size), and those neighbours (pixel
    indices). None when no centre has its neighbour inside the image."""
    centres = -(-size // stride)
    lo = -(-max(0, -delta) // stride)
    hi = min(centres - 1, (size - 1 - delta) // stride)
    if hi < lo:
        return None
    return slice(lo, hi + 1), slice(stride * lo + delta, stride * hi + delta + 1, stride)


def _window(target, kernel_size, stride, weight_base):
    """Yield, for every window offset that reaches inside the image, its weight omega, the index
    of the centres and of their neighbours into (B, C, ., .) tensors, and the same-class mask
    (B, 1, ., .). The window is clipped at the borders: no padding, no wrap-around."""
    _, height, width = target.shape
    radius = kernel_size // 2
    y_centre = target[:, ::stride, ::stride]
    for du in range(-radius, radius + 1):
        rows = _grid_pair(height, stride, du)
        if rows is None:
            continue
        for dv in range(-radius, radius + 1):
            cols = _grid_pair(width, stride, dv)
            if cols is None:
                continue
            omega = float(weight_base) ** (1 - max(abs(du), abs(dv)))
            same = y_centre[:, rows[0], cols[0]] == target[:, rows[1], cols[1]]
            yield (omega, (slice(None), slice(None), rows[0], cols[0]),
                   (slice(None), slice(None), rows[1], cols[1]), same.unsqueeze(1))


def minkowski_mean(L, valid, power):
    """``((1/M) sum_valid L^k)^(1/k)`` and its derivative with respect to each L_p.

    Computed as ``L_max * (mean (L/L_max)^k)^(1/k)`` so that L^k neither overflows nor
    underflows in float32. L is 0 at invalid centres. When M == 0 or every L is 0 the loss and
    the derivative are exactly 0 (the plain formula's backward would give 0 * inf = NaN); a NaN
    in L propagates to both.
    """
    count = valid.sum().to(L.dtype).clamp_min(1)
    L_max = L.amax() if L.numel() else L.new_zeros(())
    ratio = L / torch.where(L_max > 0, L_max, 1)
    mean_ratio = ratio.pow(power).sum() / count
    loss = L_max * mean_ratio.pow(1.0 / power)
    coef = torch.where(L_max == 0, 0, mean_ratio.pow(1.0 / power - 1.0) / count)
    return loss, coef * ratio.pow(power - 1.0)


def lad_forward(logits, target, *, kernel_size, power, stride, ignore_index, eps, weight_base,
                normalizer, zscore, reduction, need_grad):
    """The loss (0-dim, or the (B, H, W) map) in the accumulation dtype, and what the backward
    needs: (P, mean, rstd), or None when ``need_grad`` is False."""
    acc = accumulation_dtype(logits.dtype)
    batch, classes, height, width = logits.shape
    x = logits.to(acc)
    mean = rstd = None
    if zscore:
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        rstd = torch.rsqrt(var + eps)
        z = (x - mean) * rstd
    else:
        z = x
    del x

    y_centre = target[:, ::stride, ::stride]
    f = z.new_zeros((batch, classes) + y_centre.shape[1:])
    xi = z.new_zeros((batch, 1) + y_centre.shape[1:])
    for omega, centre, neighbour, same in _window(target, kernel_size, stride, weight_base):
        f[centre].add_(torch.where(same, z[neighbour], 0), alpha=omega)
        xi[centre].add_(same.to(acc), alpha=omega if normalizer == "weight" else 1.0)
    del z
    f.div_(xi)

    # Labels outside [0, C) only get here with check_target=False: clamp them so that no index
    # is out of bounds; their loss value is unspecified.
    y = y_centre.long()
    valid = y != ignore_index
    y_safe = torch.where(valid, y, 0).clamp_(0, classes - 1).unsqueeze(1)
    lse = torch.logsumexp(f, dim=1)
    L = torch.where(valid, (lse - f.gather(1, y_safe).squeeze(1)).clamp_min(0), 0)

    if reduction == "mean":
        loss, dloss_dL = minkowski_mean(L, valid, power)
    else:
        loss = L if stride == 1 else L.new_zeros((batch, height, width))
        if stride > 1:
            loss[:, ::stride, ::stride] = L
        dloss_dL = torch.ones_like(L)
    if not need_grad:
        return loss, None

    # P = dloss/dL_p * (softmax(f_p) - onehot(y_p)) / xi_p, built in place in f. masked_fill
    # (not a product with the mask) keeps a NaN at an ignored centre out of the gradient.
    probs = f.sub_(lse.unsqueeze(1)).exp_()
    probs.scatter_(1, y_safe, probs.gather(1, y_safe) - 1)
    P = probs.mul_((dloss_dL / xi.squeeze(1)).unsqueeze(1)).masked_fill_(~valid.unsqueeze(1), 0)
    return loss, (P, mean, rstd)


def lad_backward(grad_loss, logits, target, P, mean, rstd, *, kernel_size, stride, weight_base,
                 zscore, reduction):
    """d loss / d logits, in the accumulation dtype and the logits' layout."""
    acc = P.dtype
    if reduction == "mean":
        g = P * grad_loss.to(acc)
    else:
        g = P * grad_loss[:, ::stride, ::stride].unsqueeze(1).to(acc)
    G = torch.zeros_like(logits, dtype=acc)
    for omega, centre, neighbour, same in _window(target, kernel_size, stride, weight_base):
        G[neighbour].add_(torch.where(same, g[centre], 0), alpha=omega)
    del g
    if not zscore:
        return G
    z = (logits.to(acc) - mean).mul_(rstd)
    mean_G = G.mean(dim=1, keepdim=True)
    mean_Gz = (G * z).mean(dim=1, keepdim=True)
    return G.sub_(mean_G).sub_(z.mul_(mean_Gz)).mul_(rstd)


class UnfusedLAD(torch.autograd.Function):
    """Autograd wiring of :func:`lad_forward` and :func:`lad_backward`."""

    @staticmethod
    def forward(ctx, logits, target, kernel_size, power, stride, ignore_index, eps, weight_base,
                normalizer, zscore, reduction, need_grad):
        loss, saved = lad_forward(
            logits, target, kernel_size=kernel_size, power=power, stride=stride,
            ignore_index=ignore_index, eps=eps, weight_base=weight_base, normalizer=normalizer,
            zscore=zscore, reduction=reduction, need_grad=need_grad)
        if need_grad:
            P, mean, rstd = saved
            ctx.save_for_backward(logits, target, P, mean, rstd)
            ctx.options = dict(kernel_size=kernel_size, stride=stride, weight_base=weight_base,
                               zscore=zscore, reduction=reduction)
        return loss.to(logits.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        logits, target, P, mean, rstd = ctx.saved_tensors
        grad = lad_backward(grad_loss, logits, target, P, mean, rstd, **ctx.options)
        return (grad.to(logits.dtype),) + (None,) * 11

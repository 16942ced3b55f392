"""The unfused PyTorch implementation of the costs L: ``backend="torch"``, the CPU path, and the
baseline the benchmarks measure the fused kernels against (the reduction to the loss is shared:
``lad_triton/reduction.py``). 2-D images (B, C, H, W) and 3-D volumes (B, C, D, H, W).

It follows docs/contract.md step by step with its names (z, omega, xi, f, L, g, G, a); the gradient is
derived in ``docs/math.md``. To be a fair baseline it is vectorised the way one would write it by
hand in PyTorch: every pixel at once, one loop over the K*K window offsets, each offset a pair
of shifted *views* (no copies, no ``F.unfold``) accumulated in place. The backward is written by
hand rather than left to autograd, because autograd through K*K in-place slice updates keeps K*K
masks and zero-fills a full logits-sized buffer per offset. In 3-D the window has K^3 offsets.

forward::

    z = (x - mean_c x) * rstd                      # rstd = 1 / sqrt(var_c x + eps)
    for each offset delta of the window:           # centres p on the stride grid, q = p + delta
        same = y[q] == y[p]
        f[p]  += omega(delta) * where(same, z[q], 0)
        xi[p] += (1 or omega(delta)) * same
    f /= xi;  L = logsumexp_c(f) - f[y]            # 0 at invalid centres
    P = (softmax(f_p) - onehot(y_p)) / xi_p        # saved for the backward, 0 at invalid centres

backward, from dL = d loss / d L::

    g = dL * P
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

import itertools

import torch
from torch.autograd.function import once_differentiable

from .options import accumulation_dtype


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
    """Yield, for every window offset that reaches inside the image (or volume), its weight
    omega, the index of the centres and of their neighbours into (B, C, *spatial) tensors, and
    the same-class mask (B, 1, *centres). The window is clipped at the borders: no padding, no
    wrap-around."""
    spatial = target.shape[1:]
    radius = kernel_size // 2
    y_centre = target[(slice(None),) + (slice(None, None, stride),) * len(spatial)]
    for offset in itertools.product(range(-radius, radius + 1), repeat=len(spatial)):
        pairs = [_grid_pair(size, stride, delta) for size, delta in zip(spatial, offset)]
        if None in pairs:
            continue
        omega = float(weight_base) ** (1 - max(abs(delta) for delta in offset))
        centres = tuple(pair[0] for pair in pairs)
        neighbours = tuple(pair[1] for pair in pairs)
        same = y_centre[(slice(None),) + centres] == target[(slice(None),) + neighbours]
        yield (omega, (slice(None), slice(None)) + centres,
               (slice(None), slice(None)) + neighbours, same.unsqueeze(1))


def costs_forward(logits, target, *, kernel_size, stride, ignore_index, eps, weight_base,
                  normalizer, zscore, need_grad):
    """L on the centre grid (B, *centres) in the accumulation dtype, and what the backward
    needs: (P, mean, rstd), or None when ``need_grad`` is False."""
    acc = accumulation_dtype(logits.dtype)
    classes = logits.shape[1]
    x = logits.to(acc)
    mean = rstd = None
    if zscore:
        # Two plain means, not torch.var_mean: on a CPU var_mean over the class dimension (not
        # the innermost) took 10x as long (32 ms against 3.5 ms on 8 x 21 x 128 x 128, one
        # thread), more than the rest of the forward's z-score. The deviations are kept: z is
        # them scaled.
        mean = x.mean(dim=1, keepdim=True)
        z = x - mean
        rstd = torch.rsqrt(z.square().mean(dim=1, keepdim=True).add_(eps))
        z.mul_(rstd)
    else:
        z = x
    del x

    y_centre = target[(slice(None),) + (slice(None, None, stride),) * (target.dim() - 1)]
    f = z.new_zeros((logits.shape[0], classes) + y_centre.shape[1:])
    xi = z.new_zeros((logits.shape[0], 1) + y_centre.shape[1:])
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
    if not need_grad:
        return L, None

    # P = (softmax(f_p) - onehot(y_p)) / xi_p, built in place in f. masked_fill (not a product
    # with the mask) keeps a NaN at an invalid centre out of the gradient.
    probs = f.sub_(lse.unsqueeze(1)).exp_()
    probs.scatter_(1, y_safe, probs.gather(1, y_safe) - 1)
    P = probs.div_(xi).masked_fill_(~valid.unsqueeze(1), 0)
    return L, (P, mean, rstd)


def costs_backward(dL, logits, target, P, mean, rstd, *, kernel_size, stride, weight_base,
                   zscore):
    """d loss / d logits from dL = d loss / d L, in the accumulation dtype and the logits'
    layout."""
    g = P * dL.unsqueeze(1).to(P.dtype)
    G = torch.zeros_like(logits, dtype=P.dtype)
    for omega, centre, neighbour, same in _window(target, kernel_size, stride, weight_base):
        G[neighbour].add_(torch.where(same, g[centre], 0), alpha=omega)
    del g
    if not zscore:
        return G
    z = (logits.to(P.dtype) - mean).mul_(rstd)
    mean_G = G.mean(dim=1, keepdim=True)
    mean_Gz = (G * z).mean(dim=1, keepdim=True)
    return G.sub_(mean_G).sub_(z.mul_(mean_Gz)).mul_(rstd)


class UnfusedCosts(torch.autograd.Function):
    """Autograd wiring of :func:`costs_forward` and :func:`costs_backward`: logits -> L."""

    @staticmethod
    def forward(ctx, logits, target, options, need_grad):
        """``options``: a CostOptions."""
        L, saved = costs_forward(logits, target, **options._asdict(), need_grad=need_grad)
        if need_grad:
            P, mean, rstd = saved
            ctx.save_for_backward(logits, target, P, mean, rstd)
            ctx.options = dict(kernel_size=options.kernel_size, stride=options.stride,
                               weight_base=options.weight_base, zscore=options.zscore)
        return L

    @staticmethod
    @once_differentiable
    def backward(ctx, dL):
        logits, target, P, mean, rstd = ctx.saved_tensors
        grad = costs_backward(dL, logits, target, P, mean, rstd, **ctx.options)
        return grad.to(logits.dtype), None, None, None

"""An obviously-correct float64 evaluation of docs/contract.md, for tests only.

Explicit Python loops over pixels (or voxels) and window offsets, written from the text of
docs/contract.md; autograd gives
the gradient (the contract's step 10: the derivative of a float64 autograd evaluation is the ground
truth). It shares no code with lad_triton. Slow: tiny inputs only.

Besides the loss and the gradient it returns their *rounding floors*: the magnitudes of the
terms that cancel on the way (``logsumexp(f) - f[y]`` for a saturated cost, ``softmax - onehot``,
the z-score Jacobian's ``G - mean G - z mean(G z)``, which for C = 2 leaves an O(eps / var)
residue of O(1) terms). Any float64 evaluation, this one included, is only exact to ~1e-16 of
those, however small the result; tests add that much to their relative tolerance.
"""

import itertools
import math
from typing import NamedTuple

import torch


class Reference(NamedTuple):
    loss: torch.Tensor
    grad: torch.Tensor
    loss_floor: torch.Tensor  # per loss element: size of the cancelling terms
    grad_floor: torch.Tensor  # per gradient element: likewise


def lad_reference(logits, target, grad_out=None, *, kernel_size=5, power=3.0, stride=1,
                  ignore_index=255, eps=1e-5, weight_base=2.0, normalizer="count", zscore=True,
                  reduction="mean", weight=None, pixel_weight=None):
    """Reference(loss, d(loss . grad_out)/d logits, floors) in float64 for the logits as given
    (read at their own precision, then upcast). Images (B, C, H, W) or volumes (B, C, D, H, W),
    target (B, H, W) or (B, D, H, W); ``weight``: optional class weights; ``pixel_weight``:
    optional per-pixel weights of the target's shape. A centre's weight is the product of its
    class's and its own. grad_out defaults to ones."""
    x = logits.detach().to(torch.float64).requires_grad_(True)
    batch, classes = x.shape[:2]
    spatial = tuple(x.shape[2:])
    labels = target.reshape(batch, -1).tolist()  # Python ints: no dtype wrap-around
    class_weight = None if weight is None else weight.double().tolist()
    pixel_weights = (None if pixel_weight is None
                     else pixel_weight.double().reshape(batch, -1).tolist())
    radius = kernel_size // 2
    positions = list(itertools.product(*(range(n) for n in spatial)))
    flat = {pos: i for i, pos in enumerate(positions)}
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=len(spatial)))

    z = torch.zeros_like(x)
    rstd = {}
    for b in range(batch):
        for pos in positions:
            v = x[(b, slice(None)) + pos]
            rstd[b, pos] = 1.0
            if zscore:
                m = v.mean()
                var = ((v - m) ** 2).mean()
                v = (v - m) / torch.sqrt(var + eps)
                rstd[b, pos] = 1.0 / (var.item() + eps) ** 0.5
            z[(b, slice(None)) + pos] = v

    costs = {}     # centre -> L_p
    windows = {}   # centre -> (xi_p, [(neighbour, omega)], |lse_p| + |f_p[y_p]|, w_p)
    for b in range(batch):
        for pos in positions:
            if any(c % stride for c in pos):
                continue
            label = labels[b][flat[pos]]
            if label == ignore_index:
                continue
            pooled = torch.zeros(classes, dtype=torch.float64)
            xi = 0.0
            members = []
            for off in offsets:
                q = tuple(c + o for c, o in zip(pos, off))
                if not all(0 <= c < n for c, n in zip(q, spatial)):
                    continue
                if labels[b][flat[q]] != label:
                    continue
                w = weight_base ** (1 - max(abs(o) for o in off))
                pooled = pooled + w * z[(b, slice(None)) + q]
                xi += 1.0 if normalizer == "count" else w
                members.append(((b, q), w))
            f = pooled / xi
            lse = torch.logsumexp(f, 0)
            costs[b, pos] = (lse - f[label]).clamp_min(0)
            w_p = 1.0 if class_weight is None else class_weight[label]
            if pixel_weights is not None:
                w_p *= pixel_weights[b][flat[pos]]
            windows[b, pos] = (xi, members, abs(lse.item()) + abs(f[label].item()), w_p)

    shape = (batch,) + spatial
    if reduction == "none":
        loss = torch.zeros(shape, dtype=torch.float64)
        loss_floor = torch.zeros(shape, dtype=torch.float64)
        for (b, pos), cost in costs.items():
            index = tuple(torch.tensor(i) for i in (b,) + pos)
            loss = loss.index_put(index, cost * windows[b, pos][3])
            loss_floor[(b,) + pos] = windows[b, pos][2] * windows[b, pos][3]
    elif reduction == "sum":
        # The weighted costs added up: no Minkowski exponent.
        loss = sum((windows[p][3] * c for p, c in costs.items()),
                   torch.zeros((), dtype=torch.float64))
        loss_floor = torch.tensor(sum(w[2] * w[3] for w in windows.values()), dtype=torch.float64)
    else:
        weights = sum(w[3] for w in windows.values())
        total = sum((windows[p][3] * c ** power for p, c in costs.items()),
                    torch.zeros((), dtype=torch.float64))
        if weights == 0 or total.item() == 0.0:  # the contract: M == 0 or S == 0 gives exactly 0
            loss = torch.zeros((), dtype=torch.float64)
        else:
            loss = (total / weights) ** (1.0 / power)
        # The Minkowski mean moves by at most max |error of L_p| (over weighted centres).
        loss_floor = torch.tensor(max((w[2] for w in windows.values() if w[3] > 0), default=0.0),
                                  dtype=torch.float64)

    if grad_out is None:
        grad_out = torch.ones_like(loss)
    grad = torch.zeros_like(x)
    grad_floor = torch.zeros_like(x)
    if loss.requires_grad:
        centres = list(costs)
        grads = torch.autograd.grad(loss, [x] + [costs[p] for p in centres],
                                    grad_out.to(torch.float64), allow_unused=True)
        grad = grads[0]
        pooled_abs = {}  # sum over centres p of omega * |d loss / d L_p| / xi_p, per neighbour
        for p, dL in zip(centres, grads[1:]):
            xi, members, _, _ = windows[p]
            c = 0.0 if dL is None else abs(dL.item()) / xi
            for q, w in members:
                pooled_abs[q] = pooled_abs.get(q, 0.0) + 2.0 * w * c  # |softmax| + |onehot|
        for (b, pos), g_abs in pooled_abs.items():
            zq = z[(b, slice(None)) + pos].detach().abs()
            spread = 2.0 + zq * zq.max() if zscore else torch.ones_like(zq)
            grad_floor[(b, slice(None)) + pos] = rstd[b, pos] * g_abs * spread
    return Reference(loss.detach(), grad, loss_floor, grad_floor)


def within(actual, expected, floor, tol):
    """||actual - expected|| <= tol * ||expected|| + float64 rounding of the cancelling terms."""
    actual = actual.detach().double().cpu()
    err = torch.linalg.vector_norm(actual - expected).item()
    bound = (tol * torch.linalg.vector_norm(expected).item()
             + 64 * torch.finfo(torch.float64).eps * torch.linalg.vector_norm(floor).item())
    return err <= bound


def lmp_reference(costs, ratio, p):
    """Loss max-pooling's weights v for ``costs`` (Python floats l_i >= 0 of the n valid centres),
    from the contract's definition: v_i = min(tau, c * l_i^(q-1)), with c found by bisection on
    log c until the p-norm constraint is met to the last bit (all tau on the positive costs when
    that is feasible). In logarithms, as l^(q-1) leaves float64's range for p near 1."""
    n = len(costs)
    if n == 0:
        return []
    q = p / (p - 1)
    m = max(1, math.floor(ratio * n))
    tau = m ** (-1 / p) * n ** (-1 / q)

    def weights(log_c):
        return [min(tau, math.exp(min(log_c + (q - 1) * math.log(x), 700))) if x > 0 else 0.0
                for x in costs]

    def feasible(v):
        # ||v||_p^p <= n^(-p/q) = m tau^p, as sum (v_i / tau)^p <= m with the capped terms (1
        # each) counted apart, so that the small uncapped ones are not lost next to them.
        capped = sum(1 for x in v if x == tau)
        return sum((x / tau) ** p for x in v if x < tau) <= m - capped

    if sum(1 for x in costs if x > 0) <= m:  # every positive cost at tau is feasible
        return [tau if x > 0 else 0.0 for x in costs]
    lo, hi = -1.0, 1.0
    while not feasible(weights(lo)):
        lo *= 2
    while feasible(weights(hi)):
        hi *= 2
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            return weights(lo)
        if feasible(weights(mid)):
            lo = mid
        else:
            hi = mid


def topk_reference(costs, ratio):
    """Top-k pooling's weights for ``costs`` (Python floats of the n valid centres in centre-grid
    order): 1/k on the k = ceil(ratio * n) largest, equal costs taken in grid order."""
    k = math.ceil(ratio * len(costs))
    chosen = sorted(range(len(costs)), key=lambda i: (-costs[i], i))[:k]
    return [1.0 / k if i in chosen else 0.0 for i in range(len(costs))]


def source_index(dst, size_in, size_out, align_corners):
    """(i0, i1, weight of i1) of PyTorch's linear interpolation along one axis for output index
    ``dst``, from the documented source-coordinate rule, in float64: with align_corners the
    corner samples map onto each other (dst * (in - 1) / (out - 1)); without, the pixel centres
    do ((dst + 1/2) * in / out - 1/2, clamped at 0)."""
    if align_corners:
        src = dst * (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
    else:
        src = max(0.0, (dst + 0.5) * size_in / size_out - 0.5)
    i0 = min(int(math.floor(src)), size_in - 1)
    i1 = min(i0 + 1, size_in - 1)
    return i0, i1, src - i0


def interpolate_reference(x, size, align_corners):
    """Bilinear (4-D) or trilinear (5-D) interpolation of ``x`` to spatial ``size``, axis by axis
    with explicit index loops (linear interpolation is separable). Differentiable: the
    transposed interpolation of a gradient is autograd's."""
    for axis, size_out in enumerate(size, start=2):
        size_in = x.shape[axis]
        slices = []
        for dst in range(size_out):
            i0, i1, w1 = source_index(dst, size_in, size_out, align_corners)
            slices.append(x.select(axis, i0) * (1 - w1) + x.select(axis, i1) * w1)
        x = torch.stack(slices, dim=axis)
    return x

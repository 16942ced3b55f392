"""An obviously-correct float64 evaluation of SPEC, for tests only.

Explicit Python loops over pixels and window offsets, written from SPEC's text; autograd gives
the gradient (SPEC step 10: the derivative of a float64 autograd evaluation is the ground
truth). It shares no code with lad_triton. Slow: tiny inputs only.

Besides the loss and the gradient it returns their *rounding floors*: the magnitudes of the
terms that cancel on the way (``logsumexp(f) - f[y]`` for a saturated cost, ``softmax - onehot``,
the z-score Jacobian's ``G - mean G - z mean(G z)``, which for C = 2 leaves an O(eps / var)
residue of O(1) terms). Any float64 evaluation, this one included, is only exact to ~1e-16 of
those, however small the result; tests add that much to their relative tolerance.
"""

from typing import NamedTuple

import torch


class Reference(NamedTuple):
    loss: torch.Tensor
    grad: torch.Tensor
    loss_floor: torch.Tensor  # per loss element: size of the cancelling terms
    grad_floor: torch.Tensor  # per gradient element: likewise


def lad_reference(logits, target, grad_out=None, *, kernel_size=5, power=3.0, stride=1,
                  ignore_index=255, eps=1e-5, weight_base=2.0, normalizer="count", zscore=True,
                  reduction="mean"):
    """Reference(loss, d(loss . grad_out)/d logits, floors) in float64 for the logits as given
    (read at their own precision, then upcast). grad_out defaults to ones."""
    x = logits.detach().to(torch.float64).requires_grad_(True)
    batch, classes, height, width = x.shape
    labels = target.tolist()  # Python ints: no dtype wrap-around in comparisons
    radius = kernel_size // 2

    z = {}
    rstd = {}
    for b in range(batch):
        for i in range(height):
            for j in range(width):
                v = x[b, :, i, j]
                rstd[b, i, j] = 1.0
                if zscore:
                    m = v.mean()
                    var = ((v - m) ** 2).mean()
                    v = (v - m) / torch.sqrt(var + eps)
                    rstd[b, i, j] = 1.0 / (var.item() + eps) ** 0.5
                z[b, i, j] = v

    costs = {}     # centre -> L_p
    windows = {}   # centre -> (xi_p, [(neighbour, omega)], |lse_p| + |f_p[y_p]|)
    for b in range(batch):
        for i in range(0, height, stride):
            for j in range(0, width, stride):
                label = labels[b][i][j]
                if label == ignore_index:
                    continue
                pooled = torch.zeros(classes, dtype=torch.float64)
                xi = 0.0
                members = []
                for du in range(-radius, radius + 1):
                    for dv in range(-radius, radius + 1):
                        qi, qj = i + du, j + dv
                        if not (0 <= qi < height and 0 <= qj < width):
                            continue
                        if labels[b][qi][qj] != label:
                            continue
                        w = weight_base ** (1 - max(abs(du), abs(dv)))
                        pooled = pooled + w * z[b, qi, qj]
                        xi += 1.0 if normalizer == "count" else w
                        members.append(((b, qi, qj), w))
                f = pooled / xi
                lse = torch.logsumexp(f, 0)
                costs[b, i, j] = (lse - f[label]).clamp_min(0)
                windows[b, i, j] = (xi, members, abs(lse.item()) + abs(f[label].item()))

    if reduction == "none":
        loss = torch.zeros(batch, height, width, dtype=torch.float64)
        loss_floor = torch.zeros(batch, height, width, dtype=torch.float64)
        for p, cost in costs.items():
            loss = loss.index_put((torch.tensor(p[0]), torch.tensor(p[1]), torch.tensor(p[2])),
                                  cost)
            loss_floor[p] = windows[p][2]
    else:
        total = sum((c ** power for c in costs.values()), torch.zeros((), dtype=torch.float64))
        if not costs or total.item() == 0.0:  # SPEC: M == 0 or S == 0 gives exactly 0
            loss = torch.zeros((), dtype=torch.float64)
        else:
            loss = (total / len(costs)) ** (1.0 / power)
        # The Minkowski mean moves by at most max |error of L_p|.
        loss_floor = torch.tensor(max((w[2] for w in windows.values()), default=0.0),
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
            xi, members, _ = windows[p]
            c = 0.0 if dL is None else abs(dL.item()) / xi
            for q, w in members:
                pooled_abs[q] = pooled_abs.get(q, 0.0) + 2.0 * w * c  # |softmax| + |onehot|
        for (b, i, j), g_abs in pooled_abs.items():
            zq = z[b, i, j].detach().abs()
            spread = 2.0 + zq * zq.max() if zscore else torch.ones_like(zq)
            grad_floor[b, :, i, j] = rstd[b, i, j] * g_abs * spread
    return Reference(loss.detach(), grad, loss_floor, grad_floor)


def within(actual, expected, floor, tol):
    """||actual - expected|| <= tol * ||expected|| + float64 rounding of the cancelling terms."""
    actual = actual.detach().double().cpu()
    err = torch.linalg.vector_norm(actual - expected).item()
    bound = (tol * torch.linalg.vector_norm(expected).item()
             + 64 * torch.finfo(torch.float64).eps * torch.linalg.vector_norm(floor).item())
    return err <= bound

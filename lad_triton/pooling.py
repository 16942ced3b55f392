"""Loss max-pooling and top-k pooling of the costs: ``pooling="lmp"`` and ``"topk"``, the
alternatives to the Minkowski mean of ``reduction.py`` (docs/contract.md, step 9; docs/math.md
derives what follows).

Both act on ``l_p = w_p L_p`` (class-weighted costs, 0 at invalid centres) over the n valid
centres, so they serve both backends: autograd carries their ``d loss / d L`` into the backward
of whichever computed L. Each loss is the largest value of ``sum_p v_p l_p`` over a set of
weightings v that does not depend on l, so its gradient is the best weighting held constant
(Danskin's theorem): ``d loss / d l_p = v_p``. The code finds v without gradient and returns
``sum_p v_p l_p``.

Both rank the costs with one stable sort (ties keep the order of the centre grid, flattened):
no host sync, no loop over centres, the same bits on every call.
"""

import torch


def pooled_mean(L, w, valid, pooling, *, lmp_ratio, lmp_p, topk_ratio):
    """The loss ``sum_p v_p w_p L_p`` for ``pooling`` "lmp" or "topk", 0-dim in L's dtype."""
    l = L * w
    with torch.no_grad():
        if pooling == "lmp":
            v = lmp_weights(l.detach(), valid, lmp_ratio, lmp_p)
        else:
            v = topk_weights(l.detach(), valid, topk_ratio)
    return (v.to(l.dtype) * l).sum()


def _ranked(l, valid):
    """The costs of the valid centres sorted in decreasing order, then the invalid centres (so
    that a 0 cost of a valid centre ranks above them), and the permutation that sorted them."""
    key = torch.where(valid, l, float("-inf")).reshape(-1)
    ranked, order = torch.sort(key, descending=True, stable=True)
    return ranked, order


def _unrank(v_ranked, order, like):
    return torch.empty_like(v_ranked).scatter_(0, order, v_ranked).view(like.shape)


def topk_weights(l, valid, ratio):
    """v_p = 1/k for the k = ceil(ratio * n) largest costs (ties: the first on the centre grid),
    0 elsewhere; all 0 when n = 0."""
    ranked, order = _ranked(l, valid)
    k = torch.ceil(ratio * valid.sum().double())
    rank = torch.arange(ranked.numel(), device=l.device)
    return _unrank(torch.where(rank < k, 1.0 / k, 0.0), order, l)


def lmp_weights(l, valid, ratio, p):
    """The maximiser v of ``sum_p v_p l_p`` over ``v >= 0``, ``||v||_p <= n^(-1/q)``,
    ``v <= tau = m^(-1/p) n^(-1/q)`` (q = p / (p - 1), m = max(1, floor(ratio * n))):
    ``v_p = min(tau, c l_p^(q-1))``, found exactly.

    The capped centres are a prefix of the ranked costs. With r the costs over the largest one,
    S_j = sum_{i >= j} r_i^q and j capped (ranks 0..j-1), the p-norm constraint gives
    ``c = tau ((m - j) / S_j)^(1/p) / l_max`` (B^p = m tau^p: the budget left after j caps is
    (m - j) tau^p), and rank j is uncapped iff ``(m - j) r_j^q <= S_j``; that test fails for every
    j below the right one and holds from it on (docs/math.md), so the right j is the first that
    passes. j = m always passes, and so does the first zero cost: when at most m costs are
    positive they all get tau (the "all tau" case) and zero costs get 0, the formula's value
    for every c. Everything is in logarithms: r^q underflows float64 for q ~ 100 (p near 1).
    """
    ranked, order = _ranked(l, valid)
    x = ranked.double().clamp(min=0)  # invalid centres rank last, as cost 0
    count = ranked.numel()
    n = valid.sum().double()
    m = torch.clamp(torch.floor(ratio * n), min=1)
    q = p / (p - 1)
    tau = m.pow(-1 / p) * n.clamp(min=1).pow(-1 / q)

    top = x[0]
    log_r = torch.log(x / torch.where(top > 0, top, 1))  # -inf at zero costs
    # One past the end: rank `count` has cost 0, so that j = count exists (then S_j = 0).
    log_r_end = torch.cat([log_r, log_r.new_full((1,), float("-inf"))])
    log_S = torch.logcumsumexp((q * log_r_end).flip(0), 0).flip(0)
    j = torch.arange(count + 1, device=l.device, dtype=torch.float64)
    # log(m - j) is NaN past m: those ranks fail, and j = m (log 0 = -inf) always passes.
    passes = torch.log(m - j) + q * log_r_end <= log_S
    first = passes.to(torch.int8).argmax(0, keepdim=True)  # the first of equal maxima
    # log(c l_max / tau), NaN when S_j = 0 (then only zero costs are uncapped: they get 0).
    # gather, not log_S[first]: indexing by a tensor reads it on the host.
    log_c = ((torch.log(m - first) - log_S.gather(0, first)) / p).squeeze(0)
    first = first.squeeze(0)
    uncapped = torch.where(torch.isneginf(log_r), 0.0,
                           torch.exp(log_c + (q - 1) * log_r).clamp(max=1))
    share = torch.where(j[:count] < first, 1.0, uncapped)
    return _unrank(tau * share, order, l)

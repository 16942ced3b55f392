"""The combine: the forward's per-tile Minkowski partials added, in one launch and a fixed order,
into the loss and the numbers the backward needs (docs/math.md, "Numerics"). No float atomics:
bitwise repeatable."""

import torch
import triton
import triton.language as tl

from .config import cdiv, split_scalar
from .tiling import power_of, scalar


@triton.jit(do_not_specialize=["n", "blocks", "rounds"])
def _combine_kernel(
    part_ptr,     # (n, 3) ACC: per tile max L, sum w (L / max L)^k, sum w
    block_ptr,    # out (blocks, 3) float64: per block of BLOCK tiles the same three, the max NaN
                  # if a tile's is
    ticket_ptr,   # int32, zeroed by the forward kernel: how many blocks are done
    out_ptr,      # out (3,) float64: the loss, max L, a
    tile_max_ptr,  # out (n,) ACC: each tile's max L, all the backward keeps of the partials
    loss_ptr,     # out 0-dim, the logits' dtype: the loss
    n, blocks, rounds, power_hi, power_lo,
    BLOCK: tl.constexpr,
):
    """The Minkowski mean of docs/math.md from the forward's partials, in one launch and a fixed
    order (bitwise repeatable, no float atomics): each program adds its BLOCK tiles (each tile's
    sum rescaled from its own max to the block's, docs/math.md "Numerics"), then takes a ticket;
    the program that takes the last adds the blocks' sums in float64, in block order, and stores
    the loss, max L and a = (S / M)^(1/k - 1) / M. The backward turns a, max L and each tile's
    max L (copied out here, so that the partials can go) into each tile's d loss / d L itself.
    One launch of many programs: one program over every tile runs on one SM, and a second launch
    for the blocks costs host time."""
    ACC: tl.constexpr = part_ptr.dtype.element_ty
    power = scalar(power_hi, power_lo, ACC)
    power64 = scalar(power_hi, power_lo, tl.float64)
    block = tl.program_id(0).to(tl.int64)  # 3 * i: past 2^31 for 700 M tiles
    offs = tl.arange(0, BLOCK)
    i = block * BLOCK + offs
    l_max = tl.load(part_ptr + 3 * i, mask=i < n, other=0.0)
    tl.store(tile_max_ptr + i, l_max, mask=i < n)
    nan = tl.max((l_max != l_max).to(tl.int32), axis=0)
    top = tl.max(tl.where(l_max == l_max, l_max, 0.0), axis=0)
    unit = 1.0 / tl.where(top > 0, top, 1.0)
    scaled = tl.load(part_ptr + 3 * i + 1, mask=i < n, other=0.0)
    total = tl.sum((scaled * power_of(l_max * unit, power)).to(tl.float64), axis=0)
    weights = tl.sum(tl.load(part_ptr + 3 * i + 2, mask=i < n, other=0.0).to(tl.float64), axis=0)
    tl.store(block_ptr + 3 * block, tl.where(nan > 0, float("nan"), top.to(tl.float64)))
    tl.store(block_ptr + 3 * block + 1, total)
    tl.store(block_ptr + 3 * block + 2, weights)
    # Every thread's stores of the block's sums before the ticket (the scalar atomic runs in one
    # thread), and acq_rel: they are visible to whoever takes a later ticket.
    tl.debug_barrier()
    if tl.atomic_add(ticket_ptr, 1) == blocks - 1:
        tl.store(ticket_ptr, 0)  # as the forward left it: a second combine on it works too
        b_top = tl.zeros([BLOCK], dtype=tl.float64)
        b_nan = tl.zeros([BLOCK], dtype=tl.int32)
        for r in range(rounds):
            b = r * BLOCK + offs
            b_max = tl.load(block_ptr + 3 * b, mask=b < blocks, other=0.0)
            b_nan = tl.maximum(b_nan, (b_max != b_max).to(tl.int32))
            b_top = tl.maximum(b_top, tl.where(b_max == b_max, b_max, 0.0))
        top64 = tl.where(tl.max(b_nan, axis=0) > 0, float("nan"), tl.max(b_top, axis=0))
        unit64 = 1.0 / tl.where(top64 > 0, top64, 1.0)
        b_total = tl.zeros([BLOCK], dtype=tl.float64)
        b_weights = tl.zeros([BLOCK], dtype=tl.float64)
        for r in range(rounds):
            b = r * BLOCK + offs
            b_max = tl.load(block_ptr + 3 * b, mask=b < blocks, other=0.0)
            b_sum = tl.load(block_ptr + 3 * b + 1, mask=b < blocks, other=0.0)
            b_total += b_sum * power_of(b_max * unit64, power64)
            b_weights += tl.load(block_ptr + 3 * b + 2, mask=b < blocks, other=0.0)
        total64 = tl.sum(b_total, axis=0)
        weights64 = tl.sum(b_weights, axis=0)
        mean_ratio = total64 / tl.where(weights64 > 0, weights64, 1.0)
        loss = top64 * power_of(mean_ratio, 1.0 / power64)
        a = tl.where((top64 == 0) | (weights64 == 0), 0.0,
                     power_of(mean_ratio, 1.0 / power64 - 1.0)
                     / tl.where(weights64 > 0, weights64, 1.0))
        tl.store(out_ptr, loss)
        tl.store(out_ptr + 1, top64)
        tl.store(out_ptr + 2, a)
        if loss_ptr.dtype.element_ty == tl.float64:
            tl.store(loss_ptr, loss)
        else:  # via float32: Triton's interpreter casts float64 to bfloat16 wrongly
            tl.store(loss_ptr, loss.to(tl.float32).to(loss_ptr.dtype.element_ty))




COMBINE_BLOCK = 1024


def combine(partials, ticket, power, loss_dtype, block=COMBINE_BLOCK):
    """(loss, scalars, tile_max): the loss (0-dim, ``loss_dtype``), float64 (loss, max L, a) and
    each tile's max L from the forward's partials, in one launch of cdiv(tiles, block) programs
    (a power of 2; tests take small blocks). ``ticket``: the forward's, zeroed by it. No host
    sync."""
    scalars = partials.new_empty(3, dtype=torch.float64)
    tile_max = partials.new_empty(partials.shape[0])
    loss = partials.new_empty((), dtype=loss_dtype)
    n = partials.shape[0]
    blocks = max(1, cdiv(n, block))
    block_sums = partials.new_empty((blocks, 3), dtype=torch.float64)
    # maxnreg: Triton 3.6's ptxas stops at 64 registers and spills the float64 sums on sm_80.
    _combine_kernel[(blocks,)](partials, block_sums, ticket, scalars, tile_max, loss, n, blocks,
                               cdiv(blocks, block), *split_scalar(power), BLOCK=block,
                               num_warps=8, num_stages=1, maxnreg=128)
    return loss, scalars, tile_max

"""The label check (``check_target=True``) in one pass over the labels: per block of labels, how
many are neither in [0, C) nor ignore_index. PyTorch's version reads the labels once per
comparison (four or five passes); this one reads them once and adds each block's count into
one integer (no further launch before the one device-to-host sync the check costs)."""

import torch
import triton
import triton.language as tl


BLOCK = 4096


@triton.jit
def _count_bad_labels_kernel(
    y_ptr,        # labels, contiguous, any integer dtype
    out_ptr,      # in/out 0-dim int64, zeroed: the count of bad labels
    n, classes, ignore_index,
    HAS_IGNORE: tl.constexpr,  # ignore_index fits the labels' dtype
    BLOCK: tl.constexpr,
):
    start = tl.program_id(0).to(tl.int64) * BLOCK
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    y = tl.load(y_ptr + offs, mask=inside, other=0).to(tl.int64)
    bad = (y < 0) | (y >= classes)
    if HAS_IGNORE:
        bad = bad & (y != ignore_index)
    # An integer sum: exact in any order, so one atomic per block keeps it deterministic.
    tl.atomic_add(out_ptr, tl.sum((bad & inside).to(tl.int64), axis=0))


def count_bad_labels(target, classes, ignore_index):
    """A 0-dim int64 tensor on the labels' device: how many labels are neither in [0, classes)
    nor ``ignore_index``. ``target`` must be contiguous. No host sync."""
    info = torch.iinfo(target.dtype)
    n = target.numel()
    programs = triton.cdiv(n, BLOCK)
    count = torch.zeros((), dtype=torch.int64, device=target.device)
    _count_bad_labels_kernel[(programs,)](
        target, count, n, classes, ignore_index,
        HAS_IGNORE=info.min <= ignore_index <= info.max, BLOCK=BLOCK, num_warps=8)
    return count

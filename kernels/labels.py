"""The label check (``check_target=True``) in one pass over the labels: per block of labels, how
many are neither in [0, C) nor ignore_index. PyTorch's version reads the labels once per
comparison (four or five passes); this one reads them once and writes one int per block, which
the caller sums in the one device-to-host sync the check costs."""

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _count_bad_labels_kernel(
    y_ptr,        # labels, contiguous, any integer dtype
    out_ptr,      # out (programs,) int32: the block's count of bad labels
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
    tl.store(out_ptr + tl.program_id(0), tl.sum((bad & inside).to(tl.int32), axis=0))


def count_bad_labels(target, classes, ignore_index):
    """A 0-dim int64 tensor on the labels' device: how many labels are neither in [0, classes)
    nor ``ignore_index``. ``target`` must be contiguous. No host sync."""
    info = torch.iinfo(target.dtype)
    n = target.numel()
    programs = triton.cdiv(n, BLOCK)
    counts = torch.empty(programs, dtype=torch.int32, device=target.device)
    _count_bad_labels_kernel[(programs,)](
        target, counts, n, classes, ignore_index,
        HAS_IGNORE=info.min <= ignore_index <= info.max, BLOCK=BLOCK, num_warps=8)
    return counts.sum(dtype=torch.int64)

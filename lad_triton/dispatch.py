"""Which implementation computes the costs, and which checks the labels. One capability check
for the fused kernels serves ``backend="auto"`` (which falls back to PyTorch, logging why) and
``backend="triton"`` (which raises that same reason). The fused modules are imported only when
used: importing lad_triton imports neither Triton nor the kernels."""

import logging
from typing import Optional

import torch
from torch import Tensor

from .kernels.config import TRITON_VERSION
from .validation import check_values

log = logging.getLogger("lad_triton")

# Decided once, when lad_triton is imported, without importing Triton: under torch.compile the
# loss's code is traced, and an `import triton` that fails there is an import Dynamo cannot
# trace, so a step compiled with fullgraph=True broke where Triton is not installed.
TRITON_FOUND = TRITON_VERSION is not None


def fused_unavailable(logits):
    """Why the fused Triton kernels cannot run on these logits, or None when they can."""
    if not TRITON_FOUND:
        return "Triton is not importable (not installed: pip install triton)"
    from .kernels import interpreted as kernels_interpreted

    try:
        interpreted = kernels_interpreted()  # imports Triton
    except ImportError as err:  # installed but broken (a numpy it does not support, say)
        return f"Triton is not importable ({err})"
    if logits.device.type == "cpu":
        if interpreted:
            return None
        return ("the logits are on the CPU and Triton's interpreter is off (set "
                "TRITON_INTERPRET=1 before lad_triton's kernels are first used)")
    if logits.device.type != "cuda":
        return f"the fused kernels need a CUDA device, got logits on {logits.device}"
    return None


def select_backend(backend, logits):
    """'torch' or 'triton' for an already validated ``backend`` argument."""
    if backend == "torch" or (backend == "auto" and logits.device.type != "cuda"):
        return "torch"
    reason = fused_unavailable(logits)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}. "
                               "Use backend='torch' or backend='auto'.")
        return "triton"
    if reason is not None:
        log.debug("backend='auto' uses PyTorch: %s", reason)
        return "torch"
    if logits.dtype == torch.float64:
        log.debug("backend='auto' uses PyTorch for float64 logits")
        return "torch"
    return "triton"


def label_counter(target):
    """The fused backend's one-kernel label count for contiguous CUDA labels, else None (the
    PyTorch comparisons of validation.check_values)."""
    if target.is_cuda and target.is_contiguous() and TRITON_FOUND:
        from .fused import count_bad_labels

        return count_bad_labels
    return None


@torch.library.custom_op("lad_triton::check_labels", mutates_args=())
def check_labels(target: Tensor, weight: Optional[Tensor], classes: int, ignore_index: int,
                 pixel_weight: Optional[Tensor]) -> Tensor:
    """:func:`validation.check_values` as an operator for torch.compile: raises inside the
    compiled graph instead of breaking it. Returns a 0-dim zero that the loss adds, so the check
    is not dead code."""
    check_values(target, weight, classes, ignore_index, pixel_weight,
                 count_bad=label_counter(target))
    return torch.zeros((), device=target.device)


@check_labels.register_fake
def _(target, weight, classes, ignore_index, pixel_weight):
    return target.new_empty((), dtype=torch.float32)

"""Which implementation computes the costs. One capability check for the fused kernels serves
``backend="auto"`` (which falls back to PyTorch, logging why) and ``backend="triton"`` (which
raises that same reason).

(Not named backends.py: torch.compile skips every file whose path contains "triton/backends",
which lad_triton/backends.py does.)"""

import logging

import torch

log = logging.getLogger("lad_triton")


def fused_unavailable(logits):
    """Why the fused Triton kernels cannot run on these logits, or None when they can."""
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"Triton is not importable ({err})"
    from . import kernels

    if logits.device.type == "cpu":
        if kernels.interpreted():
            return None
        return ("the logits are on the CPU and Triton's interpreter is off (set "
                "TRITON_INTERPRET=1 before lad_triton's kernels are first used)")
    if logits.device.type != "cuda":
        return f"the fused kernels need a CUDA device, got logits on {logits.device}"
    return None


def select_backend(backend, logits):
    """'torch' or 'triton' for an already validated ``backend`` argument."""
    if backend == "torch":
        return "torch"
    reason = fused_unavailable(logits)
    if backend == "triton":
        if reason is not None:
            raise RuntimeError(f"backend='triton' cannot run here: {reason}. "
                               "Use backend='torch' or backend='auto'.")
        return "triton"
    if logits.device.type != "cuda":
        return "torch"
    if reason is not None:
        log.debug("backend='auto' uses PyTorch: %s", reason)
        return "torch"
    if logits.dtype == torch.float64:
        log.debug("backend='auto' uses PyTorch for float64 logits")
        return "torch"
    return "triton"

"""Which implementation computes the costs. One capability check for the fused kernels serves
``backend="auto"`` (which falls back to PyTorch, logging why) and ``backend="triton"`` (which
raises that same reason).

(Not named backends.py: torch.compile skips every file whose path contains "triton/backends",
which lad_triton/backends.py does.)"""

import importlib.util
import logging

import torch

log = logging.getLogger("lad_triton")

# Decided once, when lad_triton is imported, without importing Triton: under torch.compile the
# loss's code is traced, and an `import triton` that fails there is an import Dynamo cannot
# trace, so a step compiled with fullgraph=True broke where Triton is not installed.
TRITON_FOUND = importlib.util.find_spec("triton") is not None


def fused_unavailable(logits):
    """Why the fused Triton kernels cannot run on these logits, or None when they can."""
    if not TRITON_FOUND:
        return "Triton is not importable (not installed: pip install triton)"
    from . import kernels

    try:
        interpreted = kernels.interpreted()  # imports Triton
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

"""Triton kernels of lad_triton and their launch helpers: ``forward`` and ``backward``, with
the tiling and launch heuristic they share in ``tiling``. Installed as ``lad_triton.kernels``
(the top-level name ``kernels`` belongs to another PyPI project)."""

from . import backward, forward

# @triton.jit reads TRITON_INTERPRET when these modules are first imported: for the life of
# the process the kernels then either run under Triton's CPU interpreter or compile for a GPU.
INTERPRETED = type(forward._forward_kernel).__name__ == "InterpretedFunction"

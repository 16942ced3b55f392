"""Triton kernels of lad_triton and their launch helpers: ``forward`` and ``backward``, the device
functions they share in ``tiling``, and in ``config`` what is known about them without Triton
(launch heuristic, dtypes). Installed as ``lad_triton.kernels`` (the top-level name ``kernels``
belongs to another PyPI project). Importing this package does not import Triton; importing
``forward`` or ``backward`` does."""


def interpreted():
    """Whether the kernels run under Triton's CPU interpreter. @triton.jit reads TRITON_INTERPRET
    when the kernel modules are first imported: for the life of the process the kernels then
    either run interpreted or compile for a GPU."""
    from . import forward

    return forward.INTERPRETED

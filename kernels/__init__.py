"""Triton kernels of lad_triton and their launch helpers, installed as ``lad_triton.kernels``
(the top-level name ``kernels`` belongs to another PyPI project). The fused forward and
backward kernels land here (issue 3); until then ``backend="triton"`` raises."""

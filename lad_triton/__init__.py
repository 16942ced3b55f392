"""lad_triton: the locally adaptive loss for semantic segmentation, fused in Triton."""

import os as _os

from .counterparts import CenterLoss, FocalLoss, focal_loss
from .functional import locally_adaptive_loss
from .module import LocallyAdaptiveLoss

# Installs map the repository's top-level kernels/ to lad_triton/kernels. Run from a source
# checkout (python -m bench, python -m pytest), find it where it lies.
if not _os.path.isdir(_os.path.join(__path__[0], "kernels")):
    __path__.append(_os.path.dirname(__path__[0]))

__all__ = ["CenterLoss", "FocalLoss", "LocallyAdaptiveLoss", "focal_loss",
           "locally_adaptive_loss"]
__version__ = "0.1.0"

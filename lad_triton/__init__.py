"""lad_triton: the locally adaptive loss for semantic segmentation, fused in Triton."""

from .functional import locally_adaptive_loss
from .module import LocallyAdaptiveLoss

__all__ = ["LocallyAdaptiveLoss", "locally_adaptive_loss"]
__version__ = "0.1.0"

"""lad_triton: the locally adaptive loss for semantic segmentation, fused in Triton."""

import importlib.util as _util
import os as _os
import sys as _sys


def _alias_source_kernels():
    """Installs place the repository's top-level kernels/ at lad_triton/kernels. Imported from a
    source checkout (python -m bench, python -m pytest), register that one folder as
    lad_triton.kernels, and nothing else of the repository under lad_triton."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    folder = _os.path.join(_os.path.dirname(here), "kernels")
    if (_os.path.isdir(_os.path.join(here, "kernels")) or not _os.path.isdir(folder)
            or __name__ + ".kernels" in _sys.modules):
        return
    spec = _util.spec_from_file_location(__name__ + ".kernels",
                                         _os.path.join(folder, "__init__.py"),
                                         submodule_search_locations=[folder])
    module = _util.module_from_spec(spec)
    _sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # as an import of the subpackage binds it


_alias_source_kernels()

from .counterparts import CenterLoss, FocalLoss, focal_loss  # noqa: E402
from .functional import locally_adaptive_loss  # noqa: E402
from .module import LocallyAdaptiveLoss  # noqa: E402

__all__ = ["CenterLoss", "FocalLoss", "LocallyAdaptiveLoss", "focal_loss",
           "locally_adaptive_loss"]
__version__ = "0.1.0"

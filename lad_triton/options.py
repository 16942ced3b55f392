"""What the costs depend on, as one value built and validated once per call, and the contract's
accumulation dtype. The bottom of the package: it imports nothing of it."""

from typing import NamedTuple

import torch


class CostOptions(NamedTuple):
    """The options of the costs L (docs/contract.md, steps 1-7; the defaults are the API's),
    checked by ``validation.check_options``. A NamedTuple, which ``torch.compile`` traces as constants; the
    fused backend turns it into its custom operators' arguments in one place (``fused.py``)."""

    kernel_size: int
    stride: int
    ignore_index: int
    eps: float
    weight_base: float
    normalizer: str
    zscore: bool


def accumulation_dtype(dtype):
    """float64 stays float64; float32, float16 and bfloat16 accumulate in float32 (the contract's
    "Output dtype and accuracy")."""
    return torch.float64 if dtype == torch.float64 else torch.float32

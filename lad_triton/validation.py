"""Every rule of SPEC "Bad input", checked once, before any computation.

Messages have one shape: ``<argument> must be <what was expected>, got <argument>=<value>``.
Hyper-parameters are checked by :func:`check_options` (also at module construction), tensors by
:func:`check_tensors`. Only the target-value check reads tensor data, which costs a
device-to-host sync; ``check_target=False`` skips it.
"""

import math
import numbers

import torch

REDUCTIONS = ("mean", "none")
NORMALIZERS = ("count", "weight")
BACKENDS = ("auto", "torch", "triton")
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def _fail(exc_type, name, expected, got):
    raise exc_type(f"{name} must be {expected}, got {name}={got!r}")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _positive_finite(value):
    return _is_real(value) and math.isfinite(value) and value > 0


def check_options(*, kernel_size, power, stride, ignore_index, eps, weight_base, normalizer,
                  zscore, reduction, backend, check_target):
    """Raise ``ValueError`` for any hyper-parameter outside SPEC's domain."""
    if not (_is_int(kernel_size) and kernel_size >= 1 and kernel_size % 2 == 1):
        _fail(ValueError, "kernel_size", "an odd integer >= 1 (the window size K)", kernel_size)
    if not (_is_real(power) and math.isfinite(power) and power >= 1):
        _fail(ValueError, "power", "a finite number >= 1 (the Minkowski exponent k)", power)
    if not (_is_int(stride) and stride >= 1):
        _fail(ValueError, "stride", "an integer >= 1 (the centre-grid step s)", stride)
    if not _is_int(ignore_index):
        _fail(ValueError, "ignore_index", "an integer", ignore_index)
    if not _positive_finite(eps):
        _fail(ValueError, "eps", "a finite number > 0", eps)
    if not _positive_finite(weight_base):
        _fail(ValueError, "weight_base", "a finite number > 0 (omega(d) = weight_base**(1-d))",
              weight_base)
    if normalizer not in NORMALIZERS:
        _fail(ValueError, "normalizer", f"one of {NORMALIZERS}", normalizer)
    if not isinstance(zscore, bool):
        _fail(ValueError, "zscore", "True or False", zscore)
    if reduction not in REDUCTIONS:
        _fail(ValueError, "reduction", f"one of {REDUCTIONS}", reduction)
    if backend not in BACKENDS:
        _fail(ValueError, "backend", f"one of {BACKENDS}", backend)
    if not isinstance(check_target, bool):
        _fail(ValueError, "check_target", "True or False", check_target)


def check_tensors(logits, target, *, ignore_index, check_target):
    """Raise ``TypeError``/``ValueError`` for logits and target that SPEC does not accept."""
    if not isinstance(logits, torch.Tensor):
        _fail(TypeError, "logits", "a torch.Tensor", type(logits).__name__)
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError("logits must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got logits.dtype={logits.dtype}")
    if not isinstance(target, torch.Tensor):
        _fail(TypeError, "target", "a torch.Tensor", type(target).__name__)
    if target.dtype not in TARGET_DTYPES:
        raise TypeError("target must be an integer tensor (uint8, int8, int16, int32 or int64), "
                        f"got target.dtype={target.dtype}")
    if logits.dim() != 4:
        raise ValueError(f"logits must be 4-D (B, C, H, W), got logits.shape={tuple(logits.shape)}")
    batch, classes, height, width = logits.shape
    if classes < 2:
        raise ValueError(f"logits must have C >= 2 classes on dim 1, got logits.shape="
                         f"{tuple(logits.shape)}")
    if tuple(target.shape) != (batch, height, width):
        raise ValueError(f"target must have shape (B, H, W) = {(batch, height, width)} to match "
                         f"logits.shape={tuple(logits.shape)}, got target.shape="
                         f"{tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"target must be on the logits' device {logits.device}, got "
                         f"target.device={target.device}")
    if check_target and target.numel() > 0:
        _check_target_values(target, classes, ignore_index)


def _check_target_values(target, classes, ignore_index):
    # Compare only against values the dtype can hold: torch wraps a Python int that does not fit
    # (uint8 == -100 is uint8 == 156), which would let bad labels through or flag good ones.
    info = torch.iinfo(target.dtype)
    bad = torch.zeros_like(target, dtype=torch.bool)
    if info.min < 0:
        bad |= target < 0
    if classes <= info.max:
        bad |= target >= classes
    if info.min <= ignore_index <= info.max:
        bad &= target != ignore_index
    if bad.any():  # the one device-to-host sync; check_target=False skips it
        where = tuple(bad.nonzero()[0].tolist())
        value = target[where].item()
        raise ValueError(
            f"target must hold class indices in [0, {classes}) or ignore_index={ignore_index}, "
            f"got target[{', '.join(map(str, where))}]={value} "
            "(check_target=False skips this check)")

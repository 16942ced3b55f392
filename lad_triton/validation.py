"""Every rule of "Bad input" in docs/contract.md (and of class weights and process groups), checked once,
before any computation.

Messages have one shape: ``<argument> must be <what was expected>, got <argument>=<value>``.
Hyper-parameters are checked by :func:`check_options` (also at module construction), tensors by
:func:`check_tensors`. Only the label, class weight and pixel weight *values* need tensor data,
read in one device-to-host sync by :func:`check_values`; ``check_target=False`` skips it. Under
``torch.compile`` the same check runs inside the ``lad_triton::check_labels`` custom operator
(dispatch.py), so it raises without a graph break.
"""

import numbers

import torch
import torch.distributed as dist

REDUCTIONS = ("mean", "sum", "none")
POOLINGS = ("minkowski", "lmp", "topk")
NORMALIZERS = ("count", "weight")
BACKENDS = ("auto", "torch", "triton")
# upsample: the interpolation of low-resolution logits to the target's size, by the logits' rank
UPSAMPLE_MODES = {4: "bilinear", 5: "trilinear"}
LOGITS_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def fail(exc_type, name, expected, got):
    raise exc_type(f"{name} must be {expected}, got {name}={got!r}")


def is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _finite(value):
    """math.isfinite for a real number, written so that torch.compile can trace it where it made
    the number symbolic (it changed between calls): a comparison it guards on, where
    math.isfinite breaks the graph."""
    return value - value == 0


def _positive_finite(value):
    return is_real(value) and _finite(value) and value > 0


def _ratio(value):
    return is_real(value) and 0 < value <= 1


_VALID_OPTIONS = set()


def check_options(**options):
    """Raise ``ValueError`` for any hyper-parameter outside the contract's domain. Options seen
    valid before pass at once (a training loop passes the same ones every step): a set lookup
    by name, type and value, not a dozen checks of host time per call. Not under torch.compile,
    which runs the checks once per compile anyway: there the lookup would make Dynamo guard on
    each option's value and on the set's size, and compile afresh for every new value."""
    if torch.compiler.is_compiling():
        _check_options(**options)
        return
    try:
        key = tuple((name, type(value), value) for name, value in options.items())
        if key in _VALID_OPTIONS:
            return
    except TypeError:  # an unhashable value: checked (and rejected) below
        key = None
    _check_options(**options)
    # Not with a process group: whether torch.distributed is initialised may change.
    if (key is not None and not options.get("sync") and options.get("process_group") is None
            and len(_VALID_OPTIONS) < 1024):
        _VALID_OPTIONS.add(key)


def _check_options(*, kernel_size, power, stride, ignore_index, eps, weight_base, normalizer,
                   zscore, reduction, backend, check_target, sync=False, process_group=None,
                   pooling="minkowski", lmp_ratio=0.3, lmp_p=1.7, topk_ratio=0.2, upsample=None,
                   align_corners=False):
    if not (is_int(kernel_size) and kernel_size >= 1 and kernel_size % 2 == 1):
        fail(ValueError, "kernel_size", "an odd integer >= 1 (the window size K)", kernel_size)
    if not (is_real(power) and _finite(power) and power >= 1):
        fail(ValueError, "power", "a finite number >= 1 (the Minkowski exponent k)", power)
    if not (is_int(stride) and stride >= 1):
        fail(ValueError, "stride", "an integer >= 1 (the centre-grid step s)", stride)
    if not is_int(ignore_index):
        fail(ValueError, "ignore_index", "an integer", ignore_index)
    if not _positive_finite(eps):
        fail(ValueError, "eps", "a finite number > 0", eps)
    if not _positive_finite(weight_base):
        fail(ValueError, "weight_base", "a finite number > 0 (omega(d) = weight_base**(1-d))",
              weight_base)
    if normalizer not in NORMALIZERS:
        fail(ValueError, "normalizer", f"one of {NORMALIZERS}", normalizer)
    if not isinstance(zscore, bool):
        fail(ValueError, "zscore", "True or False", zscore)
    if reduction not in REDUCTIONS:
        fail(ValueError, "reduction", f"one of {REDUCTIONS}", reduction)
    if pooling not in POOLINGS:
        fail(ValueError, "pooling", f"one of {POOLINGS}", pooling)
    if not _ratio(lmp_ratio):
        fail(ValueError, "lmp_ratio", "a number in (0, 1] (the share of centres loss max-pooling "
              "may weight fully)", lmp_ratio)
    if not (is_real(lmp_p) and _finite(lmp_p) and lmp_p > 1):
        fail(ValueError, "lmp_p", "a finite number > 1 (the p-norm of loss max-pooling)", lmp_p)
    if not _ratio(topk_ratio):
        fail(ValueError, "topk_ratio", "a number in (0, 1] (the share of centres top-k pooling "
              "averages)", topk_ratio)
    if backend not in BACKENDS:
        fail(ValueError, "backend", f"one of {BACKENDS}", backend)
    if not isinstance(check_target, bool):
        fail(ValueError, "check_target", "True or False", check_target)
    if not isinstance(sync, bool):
        fail(ValueError, "sync", "True or False", sync)
    if upsample is not None and upsample not in UPSAMPLE_MODES.values():
        fail(ValueError, "upsample", "None, 'bilinear' (images) or 'trilinear' (volumes)",
             upsample)
    if not isinstance(align_corners, bool):
        fail(ValueError, "align_corners", "True or False", align_corners)
    if align_corners and upsample is None:
        fail(ValueError, "align_corners", "False without upsample (it says how upsample maps "
             "the logits' pixels onto the target's)", align_corners)
    if process_group is not None and not (dist.is_available()
                                          and isinstance(process_group, dist.ProcessGroup)):
        fail(ValueError, "process_group", "None or a torch.distributed ProcessGroup",
              process_group)
    if pooling != "minkowski":
        # Both rank every centre's cost: across processes that needs a global sort.
        if reduction != "mean":
            fail(ValueError, "reduction", f"'mean' with pooling={pooling!r} ('none' and 'sum' "
                  "do not pool the costs)", reduction)
        if sync:
            fail(ValueError, "sync", f"False with pooling={pooling!r} (it ranks the costs of "
                  "this process only; use pooling='minkowski' to synchronise)", sync)
        if process_group is not None:
            fail(ValueError, "process_group", f"None with pooling={pooling!r} (it ranks the "
                  "costs of this process only; use pooling='minkowski' to synchronise)",
                  process_group)
    if (sync or process_group is not None) and not (dist.is_available()
                                                    and dist.is_initialized()):
        raise ValueError("sync=True or process_group needs torch.distributed to be initialised "
                         "(torch.distributed.init_process_group), got an uninitialised one")


def sync_group(sync, process_group):
    """The group to synchronise the mean over, or None (local mean)."""
    if process_group is not None:
        return process_group
    return dist.group.WORLD if sync else None


def check_tensors(logits, target, weight=None, pixel_weight=None, upsample=None):
    """Raise ``TypeError``/``ValueError`` for logits, target, class weights and pixel weights that
    the contract does not accept (shapes, dtypes, devices; not values: :func:`check_values`).
    The target may carry a channel of size 1, ``(B, 1, H, W)`` as MONAI and nnU-Net keep it.
    With ``upsample`` the logits' spatial size may differ from the target's, which sets it."""
    if not isinstance(logits, torch.Tensor):
        fail(TypeError, "logits", "a torch.Tensor", type(logits).__name__)
    if logits.dtype not in LOGITS_DTYPES:
        raise TypeError("logits must be a floating tensor (float16, bfloat16, float32 or "
                        f"float64), got logits.dtype={logits.dtype}")
    if not isinstance(target, torch.Tensor):
        fail(TypeError, "target", "a torch.Tensor", type(target).__name__)
    if target.dtype not in TARGET_DTYPES:
        raise TypeError("target must be an integer tensor (uint8, int8, int16, int32 or int64), "
                        f"got target.dtype={target.dtype}; {_index_hint(logits, target)}")
    if logits.dim() not in (4, 5):
        raise ValueError("logits must be 4-D (B, C, H, W) or 5-D (B, C, D, H, W), got "
                         f"logits.shape={tuple(logits.shape)}")
    batch, classes = logits.shape[:2]
    spatial = tuple(logits.shape[2:])
    if classes < 2:
        raise ValueError(f"logits must have C >= 2 classes on dim 1, got logits.shape="
                         f"{tuple(logits.shape)}")
    names = "(B, H, W)" if logits.dim() == 4 else "(B, D, H, W)"
    channel = "(B, 1, H, W)" if logits.dim() == 4 else "(B, 1, D, H, W)"
    if upsample is not None:
        if upsample != UPSAMPLE_MODES[logits.dim()]:
            raise ValueError(f"upsample must be {UPSAMPLE_MODES[logits.dim()]!r} for "
                             f"{logits.dim()}-D logits, got upsample={upsample!r} with "
                             f"logits.shape={tuple(logits.shape)}")
        # The target sets the spatial size; the logits' is the interpolation's source.
        if target.dim() in (logits.dim() - 1, logits.dim()):
            grid = tuple(target.shape[-len(spatial):])
            if 0 in spatial and 0 not in grid:
                raise ValueError("logits must have a non-empty spatial size to upsample from, "
                                 f"got logits.shape={tuple(logits.shape)} with target.shape="
                                 f"{tuple(target.shape)}")
            spatial = grid
    if upsample is not None and tuple(target.shape) not in ((batch,) + spatial,
                                                             (batch, 1) + spatial):
        raise ValueError(f"target must have shape {names} or {channel} with B = {batch}, any "
                         f"{names[4:-1]} (upsample interpolates the logits to it), got "
                         f"target.shape={tuple(target.shape)}")
    if tuple(target.shape) not in ((batch,) + spatial, (batch, 1) + spatial):
        hint = ("; it has the logits' shape: for a one-hot target pass its class indices, "
                "target.argmax(1)" if tuple(target.shape) == tuple(logits.shape) else "")
        raise ValueError(f"target must have shape {names} = {(batch,) + spatial} or {channel} "
                         f"to match logits.shape={tuple(logits.shape)}, got target.shape="
                         f"{tuple(target.shape)}{hint}")
    if target.device != logits.device:
        raise ValueError(f"target must be on the logits' device {logits.device}, got "
                         f"target.device={target.device}")
    if weight is not None:
        check_weight_type(weight)
        if tuple(weight.shape) != (classes,):
            raise ValueError(f"weight must have shape (C,) = ({classes},), got "
                             f"weight.shape={tuple(weight.shape)}")
        if weight.device != logits.device:
            raise ValueError(f"weight must be on the logits' device {logits.device}, got "
                             f"weight.device={weight.device}")
    if pixel_weight is not None:
        if not isinstance(pixel_weight, torch.Tensor) or not pixel_weight.is_floating_point():
            got = (pixel_weight.dtype if isinstance(pixel_weight, torch.Tensor)
                   else type(pixel_weight).__name__)
            raise ValueError("pixel_weight must be None or a floating tensor of per-pixel "
                             f"weights, got pixel_weight={got}")
        if tuple(pixel_weight.shape) != (batch,) + spatial:
            raise ValueError(f"pixel_weight must have shape {names} = {(batch,) + spatial}, got "
                             f"pixel_weight.shape={tuple(pixel_weight.shape)}")
        if pixel_weight.device != logits.device:
            raise ValueError(f"pixel_weight must be on the logits' device {logits.device}, got "
                             f"pixel_weight.device={pixel_weight.device}")


def _index_hint(logits, target):
    """What to pass instead of a target that is not an integer tensor of class indices."""
    if isinstance(target, torch.Tensor) and tuple(target.shape) == tuple(logits.shape):
        return ("it has the logits' shape: for a one-hot (or soft) target pass its class "
                "indices, target.argmax(1)")
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        return ("pass class indices, target.long() (for float label maps with integral values, "
                "as MONAI carries them, lad_triton.integrations.monai.LocallyAdaptiveLoss "
                "checks and converts them)")
    return "pass class indices, e.g. target.long()"


def check_weight_type(weight):
    """``weight`` (class weights) is None or a floating tensor: its shape and device need the
    logits (:func:`check_tensors`), its values a sync (:func:`check_values`)."""
    if not isinstance(weight, torch.Tensor):
        raise ValueError("weight must be None or a floating tensor of C class weights, got "
                         f"weight={type(weight).__name__} (torch.tensor(weight) makes one)")
    if not weight.is_floating_point():
        raise ValueError("weight must be None or a floating tensor of C class weights, got "
                         f"weight={weight.dtype} (weight.float() makes one)")


def _bad_labels(target, classes, ignore_index):
    """Boolean map of the labels neither in [0, C) nor ignore_index."""
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
    return bad


def check_values(target, weight, classes, ignore_index, pixel_weight=None, count_bad=None):
    """Raise ``ValueError`` for a label neither in [0, C) nor ignore_index, a negative or
    non-finite class weight, or a negative or non-finite pixel weight. One device-to-host sync,
    of one number. ``count_bad(target, classes, ignore_index)``, where a backend gives one (the
    fused backend's reads the labels once, in one kernel), counts the bad labels; else a few
    PyTorch comparisons do.

    The sync comes before the loss launches anything, so that the GPU runs the forward while the
    host goes on to the backward's launches (after the forward, it would leave the GPU idle
    through them)."""
    if count_bad is not None:
        flag = count_bad(target, classes, ignore_index)
    else:
        flag = _bad_labels(target, classes, ignore_index).any()
    if weight is not None:
        flag = flag + ((weight < 0) | ~torch.isfinite(weight)).any()
    if pixel_weight is not None:
        flag = flag + ((pixel_weight < 0) | ~torch.isfinite(pixel_weight)).any()
    if not flag.item():  # the one sync
        return
    # The error path takes more passes, to say where.
    bad = _bad_labels(target, classes, ignore_index)
    if bad.any():
        where = tuple(bad.nonzero()[0].tolist())
        value = target[where].item()
        raise ValueError(
            f"target must hold class indices in [0, {classes}) or ignore_index={ignore_index}, "
            f"got target[{', '.join(map(str, where))}]={value}; "
            + _label_fix(target[bad].unique().tolist(), classes, ignore_index))
    if weight is not None and ((weight < 0) | ~torch.isfinite(weight)).any():
        raise ValueError("weight must hold finite, non-negative class weights, got "
                         f"weight={weight.tolist()} (a weight of 0 leaves a class out; for "
                         "weights from class frequencies, clamp them at 0)")
    bad_pixel = (None if pixel_weight is None
                 else (pixel_weight < 0) | ~torch.isfinite(pixel_weight))
    if bad_pixel is not None and bad_pixel.any():
        where = tuple(bad_pixel.nonzero()[0].tolist())
        value = pixel_weight[where].item()
        raise ValueError("pixel_weight must hold finite, non-negative weights, got "
                         f"pixel_weight[{', '.join(map(str, where))}]={value} (a weight of 0 "
                         "leaves a pixel out as a centre)")
    raise RuntimeError("lad_triton's value check flagged a value that its second look did not "
                       "find (was a tensor modified during the call?)")


def _label_fix(values, classes, ignore_index):
    """The likely fixes for the labels ``values`` (sorted, all outside [0, C) and not
    ``ignore_index``), most likely first."""
    shown = ", ".join(map(str, values[:8])) + (", ..." if len(values) > 8 else "")
    if 255 in values and ignore_index != 255:
        return (f"the target holds 255 (labels outside the classes: {shown}): if 255 marks "
                f"pixels to ignore (Pascal VOC, Cityscapes), pass ignore_index=255, not "
                f"{ignore_index}")
    fixes = []
    if values[-1] >= classes:
        fixes.append(f"if the data has {values[-1] + 1} or more classes, the model must output "
                     f"that many (the logits have C={classes})")
    fixes.append(f"if the labels are coded otherwise, remap them to [0, {classes})")
    if len(values) == 1:
        fixes.append(f"if {values[0]} marks pixels to ignore, pass ignore_index={values[0]}")
    else:
        fixes.append("if one of them marks pixels to ignore, pass it as ignore_index")
    return f"labels outside the classes: {shown}. " + "; ".join(fixes)

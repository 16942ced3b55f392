"""The locally adaptive loss for Hugging Face transformers' semantic segmentation models.

``SegformerForSemanticSegmentation.forward`` upsamples its logits to the labels' size (bilinear,
``align_corners=False``) and scores them with ``CrossEntropyLoss(ignore_index=
config.semantic_loss_ignore_index)``, ``CrossEntropyLoss`` being a name its modeling module
imports from ``torch.nn``. Six other models compute their loss with that same module-level name
(transformers 5.x): UperNet (logits upsampled to the image, ``config.loss_ignore_index``, plus
an auxiliary head), DPT and Data2VecVision (plus an auxiliary head), MobileViT, MobileViTV2 and
MobileNetV2; :data:`PATCHED_MODELS` lists them. BEiT, Sapiens2 and Tipsv2Dpt call
``self.loss_function`` instead and are not patched (use :func:`compute_loss_func` with them).

- :func:`apply_lad_to_segformer` makes LAD the loss of those models: each ``CrossEntropyLoss
  (ignore_index=...)`` the patched forward creates becomes :class:`lad_triton.
  LocallyAdaptiveLoss` with that ignore index (auxiliary losses included, with the model's
  weighting). On a model instance it patches that instance only; without one, the classes.
- :func:`compute_loss_func` gives a function for ``Trainer(compute_loss_func=...)``.

Low-resolution logits. The models upsample their head's logits with ``nn.functional.
interpolate(..., mode="bilinear")`` before the loss. Inside a patched forward the modeling
module's ``nn`` records each bilinear interpolation it makes, and the loss, handed such a
result, scores the head's logits with ``upsample="bilinear"`` and the call's ``align_corners``:
the same loss, whose gradient the fused kernels form at the head's resolution (no gradient of
the upsampled logits, no scatter back through the interpolation). The upsampled tensor is still
computed, as the model returns or discards it.

Gradient accumulation. The Trainer passes ``num_items_in_batch``, the number of ``labels !=
-100`` over every micro-batch of the accumulated step (so a 255 ignore label is counted), and
then does not divide the loss by the number of accumulation steps. Both entry points therefore
return each micro-batch's loss times its share of that count, ``(labels != -100).sum() /
num_items_in_batch``, counted by the Trainer's own rule: the shares add up to 1 over the step,
whatever the ignore label, and the step's gradient is that of the micro-batch losses averaged
with weights proportional to their labelled pixels. For ``power = 1`` (a plain mean of the
costs, with ``ignore_index=-100``) that is the loss of the whole accumulated batch; for
``power != 1`` it is the weighted average of the micro-batches' Minkowski means, not the
Minkowski mean of their union (which no micro-batch can know before the last one).
"""

import functools
import importlib
import inspect
import sys
import weakref
from collections.abc import Mapping
from contextvars import ContextVar

import torch

from ..functional import locally_adaptive_loss
from ..module import LocallyAdaptiveLoss

# Modeling module -> the class whose forward creates CrossEntropyLoss(ignore_index=...).
PATCHED_MODELS = {
    "transformers.models.segformer.modeling_segformer": "SegformerForSemanticSegmentation",
    "transformers.models.upernet.modeling_upernet": "UperNetForSemanticSegmentation",
    "transformers.models.dpt.modeling_dpt": "DPTForSemanticSegmentation",
    "transformers.models.data2vec.modeling_data2vec_vision":
        "Data2VecVisionForSemanticSegmentation",
    "transformers.models.mobilevit.modeling_mobilevit": "MobileViTForSemanticSegmentation",
    "transformers.models.mobilevitv2.modeling_mobilevitv2": "MobileViTV2ForSemanticSegmentation",
    "transformers.models.mobilenet_v2.modeling_mobilenet_v2":
        "MobileNetV2ForSemanticSegmentation",
}

# The loss options of the patched forward running now (None outside one), and the bilinear
# interpolations it has made: id(result) -> (weak result, its version, weak input,
# align_corners). Weak: a feature map the model interpolates and drops must not stay alive.
_ACTIVE = ContextVar("lad_triton_transformers_options", default=None)
_INTERPOLATED = ContextVar("lad_triton_transformers_interpolated", default=None)
_CLASS_OPTIONS = {}  # patched class -> its loss options (apply_lad_to_segformer(None, ...))


class _CrossEntropyOrLAD:
    """Stands for ``torch.nn.CrossEntropyLoss`` in a patched modeling module. Inside a patched
    forward, ``CrossEntropyLoss(ignore_index=i)`` (the segmentation loss's call) gives LAD with
    ``ignore_index=i``; every other call, and every call elsewhere, the real class."""

    def __init__(self, original):
        self.original = original

    def __call__(self, *args, **kwargs):
        options = _ACTIVE.get()
        if options is None or args or set(kwargs) != {"ignore_index"}:
            return self.original(*args, **kwargs)
        criterion = LocallyAdaptiveLoss(ignore_index=kwargs["ignore_index"], **options)
        made = _INTERPOLATED.get()

        def loss(logits, labels):
            # The class weight follows the logits to their device.
            head, align_corners = _interpolated_from(made, logits, labels)
            if head is None:
                return criterion.to(logits.device)(logits, labels)
            criterion.to(head.device)
            options = dict(criterion.options, upsample="bilinear", align_corners=align_corners)
            return locally_adaptive_loss(head, labels, weight=criterion.weight,
                                         process_group=criterion.process_group, **options)

        return loss


def _interpolated_from(made, logits, labels):
    """(the input, align_corners) of the recorded interpolation that gave ``logits``, unchanged
    since and at the labels' size; (None, None) for any other tensor."""
    record = made.get(id(logits)) if made is not None else None
    if record is None or labels.dim() != 3 or labels.shape[-2:] != logits.shape[-2:]:
        return None, None
    out, version, head, align_corners = record
    head = head()
    if out() is not logits or logits._version != version or head is None:
        return None, None
    return head, align_corners


class _Functional:
    """``torch.nn.functional`` for a patched modeling module: inside a patched forward its
    ``interpolate`` records each bilinear call to an explicit size (module docstring); calls
    with ``scale_factor`` or ``antialias`` compute other weights and are not recorded."""

    def __getattr__(self, name):
        return getattr(torch.nn.functional, name)

    @staticmethod
    def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,
                    recompute_scale_factor=None, antialias=False):
        out = torch.nn.functional.interpolate(input, size, scale_factor, mode, align_corners,
                                              recompute_scale_factor, antialias)
        made = _INTERPOLATED.get()
        if (made is not None and mode == "bilinear" and input.dim() == 4 and size is not None
                and not antialias):
            made[id(out)] = (weakref.ref(out), out._version, weakref.ref(input),
                             bool(align_corners))
        return out


class _NN:
    """``torch.nn`` as a patched modeling module sees it: the same, but for ``functional``."""

    functional = _Functional()

    def __getattr__(self, name):
        return getattr(torch.nn, name)


def _check_options(loss_kwargs):
    """Validate the loss keywords now, with the functional's messages."""
    if "ignore_index" in loss_kwargs:
        raise ValueError("ignore_index must be left to the model (its config's "
                         "semantic_loss_ignore_index), got ignore_index="
                         f"{loss_kwargs['ignore_index']!r}")
    for name in ("upsample", "align_corners"):
        if name in loss_kwargs:
            raise ValueError(f"{name} must be left to the model (it upsamples its logits, and "
                             f"the loss follows its interpolation), got {name}="
                             f"{loss_kwargs[name]!r}")
    if loss_kwargs.get("reduction", "mean") != "mean":
        raise ValueError("reduction must be 'mean' (a model's loss is a scalar mean), got "
                         f"reduction={loss_kwargs['reduction']!r}")
    LocallyAdaptiveLoss(**loss_kwargs)
    return dict(loss_kwargs)


def _batch_share(labels, num_items_in_batch, dtype):
    """This micro-batch's share of the accumulated step, by the Trainer's count (module
    docstring); 1 without ``num_items_in_batch``."""
    if num_items_in_batch is None:
        return torch.ones((), dtype=dtype, device=labels.device)
    count = (labels != -100).sum()
    total = torch.as_tensor(num_items_in_batch, device=labels.device)
    return torch.where(total > 0, count / total.clamp(min=1e-12), 0).to(dtype)


def _labels(model, args, kwargs):
    """The ``labels`` argument of a call of the model's forward, by keyword or position."""
    if "labels" in kwargs:
        return kwargs["labels"]
    bound = inspect.signature(type(model).forward).bind_partial(model, *args)
    return bound.arguments.get("labels")


def _run(forward, model, options, args, kwargs):
    """``forward(*args, **kwargs)`` with LAD as the loss. The outermost patch decides: an
    instance's options outrank its class's, and the loss is scaled once."""
    if _ACTIVE.get() is not None:
        return forward(*args, **kwargs)
    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    token, made = _ACTIVE.set(options), _INTERPOLATED.set({})
    try:
        output = forward(*args, **kwargs)
    finally:
        _ACTIVE.reset(token)
        _INTERPOLATED.reset(made)
    if num_items_in_batch is None:
        return output
    labels = _labels(model, args, kwargs)
    if labels is None:
        return output
    if isinstance(output, Mapping):
        if output.get("loss") is not None:
            loss = output["loss"]
            output["loss"] = loss * _batch_share(labels, num_items_in_batch, loss.dtype)
        return output
    loss = output[0]
    return (loss * _batch_share(labels, num_items_in_batch, loss.dtype),) + tuple(output[1:])


def _install_switch(module):
    if not isinstance(module.CrossEntropyLoss, _CrossEntropyOrLAD):
        module.CrossEntropyLoss = _CrossEntropyOrLAD(module.CrossEntropyLoss)
    if getattr(module, "nn", None) is torch.nn:
        module.nn = _NN()


def _patch_class(cls, options):
    _CLASS_OPTIONS[cls] = options
    if "_lad_original_forward" in cls.__dict__:
        return
    original = cls.forward

    @functools.wraps(original)
    def forward(self, *args, **kwargs):
        return _run(functools.partial(original, self), self, _CLASS_OPTIONS[cls], args, kwargs)

    cls._lad_original_forward = original
    cls.forward = forward


def _patched_class_of(model):
    for cls in type(model).__mro__:
        if PATCHED_MODELS.get(cls.__module__) == cls.__name__:
            return cls
    names = ", ".join(sorted(PATCHED_MODELS.values()))
    raise ValueError(f"model must be one of {names} (or a subclass), got "
                     f"model={type(model).__name__}")


class _InstanceForward:
    """A patched instance's forward: the one it had (its class's, unless something else had
    replaced it on the instance), with LAD as the loss. An object, not a closure, so that
    ``copy.deepcopy`` of the model binds the copy's to the copy. Its ``__signature__`` is the
    model's forward's: the Trainer reads it to pick the dataset columns to keep and to decide
    whether to pass ``num_items_in_batch``."""

    def __init__(self, model, inner):
        self.model = model
        self.inner = inner
        self.__signature__ = inspect.signature(inner or type(model).forward.__get__(model))

    def __call__(self, *args, **kwargs):
        inner = self.inner or functools.partial(type(self.model).forward, self.model)
        return _run(inner, self.model, self.model._lad_loss_options, args, kwargs)


def apply_lad_to_segformer(model=None, **loss_kwargs):
    """Make the locally adaptive loss the loss of a transformers segmentation model.

    Args:
        model: an instance of one of :data:`PATCHED_MODELS` (Segformer, UperNet, DPT,
            Data2VecVision, MobileViT, MobileViTV2, MobileNetV2 ``...ForSemanticSegmentation``)
            or of a subclass: only this instance is patched (other instances of its class keep
            cross-entropy). None: every instance of those classes, present and future.
        **loss_kwargs: keywords of :class:`lad_triton.LocallyAdaptiveLoss` (``kernel_size``,
            ``power``, ``weight``, ...), but not ``ignore_index``, which is the model's
            (``config.semantic_loss_ignore_index``; UperNet's ``config.loss_ignore_index``), and
            ``reduction``, which stays ``"mean"``.

    The forward with ``labels`` then returns LAD on the logits upsampled to the labels' size
    (as the model upsamples them for cross-entropy; computed from the head's logits with
    ``upsample="bilinear"``, module docstring), auxiliary heads included with the model's
    ``auxiliary_loss_weight``; with ``num_items_in_batch`` (the Trainer's gradient
    accumulation) the loss is scaled as the module docstring says. Calling it again replaces the
    options. Returns ``model``.

    Raises:
        ValueError: a model of another class, one with ``config.num_labels < 2`` (those use a
            binary cross-entropy), or an invalid loss keyword.
    """
    options = _check_options(loss_kwargs)
    if model is None:
        for module_name, class_name in PATCHED_MODELS.items():
            try:
                module = importlib.import_module(module_name)
            except ImportError:  # a model this transformers does not have
                continue
            _install_switch(module)
            _patch_class(getattr(module, class_name), options)
        return None
    cls = _patched_class_of(model)
    if model.config.num_labels < 2:
        raise ValueError("model.config.num_labels must be >= 2 (LAD scores C >= 2 classes; "
                         "with one label the model uses a binary cross-entropy), got "
                         f"model.config.num_labels={model.config.num_labels}")
    _install_switch(sys.modules[cls.__module__])
    model._lad_loss_options = options
    current = model.__dict__.get("forward")
    if not isinstance(current, _InstanceForward):
        model.forward = _InstanceForward(model, current)
    return model


def compute_loss_func(**loss_kwargs):
    """A loss function for ``transformers.Trainer(compute_loss_func=...)``.

    Args:
        **loss_kwargs: keywords of :class:`lad_triton.LocallyAdaptiveLoss`; ``ignore_index``
            defaults to 255, transformers' default ``semantic_loss_ignore_index`` (pass your
            model's if it differs); ``reduction`` must stay ``"mean"``.

    Returns:
        ``loss_func(outputs, labels, num_items_in_batch=None)``: LAD of ``outputs.logits``
        (``(B, C, h, w)``), upsampled to the labels' ``(H, W)`` bilinearly with
        ``align_corners=False`` as the models do (the loss's ``upsample="bilinear"``, which
        this function sets), against ``labels`` ``(B, H, W)``; times the
        micro-batch's share of ``num_items_in_batch`` when the Trainer passes it (module
        docstring). Only the main logits: an auxiliary head's logits are not in the outputs.
    """
    if loss_kwargs.get("reduction", "mean") != "mean":
        raise ValueError("reduction must be 'mean' (the Trainer expects a scalar mean), got "
                         f"reduction={loss_kwargs['reduction']!r}")
    for name in ("upsample", "align_corners"):
        if name in loss_kwargs:
            raise ValueError(f"{name} must be left to compute_loss_func (the models upsample "
                             "bilinearly with align_corners=False), got "
                             f"{name}={loss_kwargs[name]!r}")
    criterion = LocallyAdaptiveLoss(upsample="bilinear", align_corners=False, **loss_kwargs)

    def loss_func(outputs, labels, num_items_in_batch=None):
        if labels is None:
            raise ValueError("labels must be the (B, H, W) segmentation maps, got labels=None "
                             "(the Trainer passes the batch's 'labels')")
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        loss = criterion.to(logits.device)(logits, labels)
        return loss * _batch_share(labels, num_items_in_batch, loss.dtype)

    return loss_func

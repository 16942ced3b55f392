"""The locally adaptive loss as an mmsegmentation 1.x loss: importing this module registers
``"LocallyAdaptiveLoss"`` in ``mmseg.registry.MODELS`` (in ``mmengine.registry.MODELS`` when
mmseg does not import), so a config can name it::

    custom_imports = dict(imports=["lad_triton.integrations.mmseg"], allow_failed_imports=False)
    model = dict(decode_head=dict(
        loss_decode=dict(type="LocallyAdaptiveLoss", kernel_size=5, power=3.0, loss_weight=1.0)))

It follows the calls of mmseg's ``BaseDecodeHead.loss_by_feat`` and ``OHEMPixelSampler``:
``forward(cls_score, label, weight=None, avg_factor=None, reduction_override=None,
ignore_index=255)`` with ``cls_score`` ``(N, C, H, W)`` upsampled logits, ``label`` ``(N, H, W)``
(or ``(N, 1, H, W)``), ``weight`` the sampler's ``(N, H, W)`` pixel weights, and the decode
head's ``ignore_index``. Where mmseg's ``CrossEntropyLoss`` averages ``weight * loss`` over every
pixel, this loss is the weighted Minkowski mean of :func:`lad_triton.locally_adaptive_loss`
with ``pixel_weight=weight``: ``(sum_p w_p L_p^k / sum_p w_p)^(1/k)``, ``w_p = class_weight[y_p]
* weight_p``. ``avg_factor`` replaces the denominator ``sum_p w_p`` (plus mmseg's float32 eps,
as its ``weight_reduce_loss`` adds); ``reduction_override="none"`` returns the ``(N, H, W)`` map
``w_p L_p``, which the OHEM sampler ranks. Every result is multiplied by ``loss_weight``.

Low-resolution logits (``upsample=True``; default False). ``loss_by_feat`` resizes the head's
logits to the label's size (bilinear, the head's ``align_corners``) before its losses. When
every loss of a head is this one with ``upsample=True``, the resize inside ``loss_by_feat`` is
computed without autograd, for the accuracy and the pixel sampler only, and the loss scores the
head's logits as they came with ``upsample="bilinear"`` and the head's ``align_corners``: the
same value and gradient. On the fused backend the kernels interpolate in registers, so the
logits' full-resolution gradient never exists (the resize's own copy, without autograd, still
does through the forward); on the PyTorch backend the loss interpolates again. A head with other
losses beside it, or one whose ``loss_by_feat`` is its own, passes the resized logits as
before. Building a loss with ``upsample=True`` wraps ``BaseDecodeHead.loss_by_feat`` and the
``resize`` of mmseg's decode-head module for the rest of the process; heads without such a
loss run mmseg's code unchanged.

On a machine without the compiled mmcv (``mmcv-lite``, the CPU install), call
:func:`stub_mmcv_ops` before mmseg builds anything: ``mmseg.models`` imports ``mmcv.ops`` at
module level, which mmcv-lite lacks.
"""

import functools
import importlib
import sys
import types
from contextvars import ContextVar

import torch
from torch import nn

from ..functional import locally_adaptive_loss
from ..options import accumulation_dtype
from ..reduction import weight_total
from ..validation import REDUCTIONS, check_options

try:
    from mmseg.registry import MODELS
except ImportError:  # mmseg absent (or without its mmcv): mmengine's root registry
    from mmengine.registry import MODELS



class _CompiledOpsMissing(types.ModuleType):
    """Stands for ``mmcv.ops`` where only mmcv-lite is installed: every member is a class that
    raises when it is built or called, so that only code that uses a compiled op fails."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)

        def unavailable(*args, **kwargs):
            raise RuntimeError(f"mmcv.ops.{name} needs the compiled mmcv (mmcv-lite is "
                               "installed); install mmcv<2.2 as OpenMMLab says for your CUDA")

        return type(name, (), {"__init__": unavailable, "__call__": unavailable})


def stub_mmcv_ops():
    """Let mmsegmentation import with ``mmcv-lite`` (mmcv without its compiled ops, the only
    mmcv < 2.2 with CPU wheels). ``mmseg.models`` imports ``mmcv.ops`` (point sampling,
    deformable attention) at module level, so a registry look-up by name fails with
    ``No module named 'mmcv._ext'``. Where ``mmcv.ops`` cannot import, this puts a placeholder in
    ``sys.modules`` whose members raise ``RuntimeError`` if used; the registry, the decode heads
    that need no compiled op (FCN, for one), the OHEM sampler and this loss never use them. With
    the compiled mmcv it does nothing. Returns whether it installed the placeholder.

    Call it before mmseg builds a model (a config can run it through ``custom_imports`` of a
    module of yours that calls it). It changes what ``import mmcv.ops`` gives for the whole
    process, which is why importing this module does not do it."""
    try:
        importlib.import_module("mmcv.ops")
    except ImportError:
        stub = sys.modules["mmcv.ops"] = _CompiledOpsMissing("mmcv.ops")
        sys.modules["mmcv"].ops = stub  # what `import mmcv.ops; mmcv.ops.X` reads
        return True
    return False


@MODELS.register_module(name="LocallyAdaptiveLoss")
class LocallyAdaptiveLoss(nn.Module):
    """The locally adaptive loss as an mmseg decode-head loss (see the module's docstring).

    Args: the keywords of :func:`lad_triton.locally_adaptive_loss` (``kernel_size``, ``power``,
    ``stride``, ``eps``, ``weight_base``, ``normalizer``, ``zscore``, ``reduction``, ``backend``,
    ``check_target``, ``sync``), except ``ignore_index``, which the decode head passes to
    ``forward``, and ``weight``, which is ``class_weight`` here; plus

        loss_weight: the factor of the loss, as in every mmseg loss. Default 1.0.
        loss_name: the key of the loss in the decode head's loss dict; mmseg adds the entries
            whose key starts with ``loss_`` to the total. Default ``"loss_lad"``.
        class_weight: None, or a list of C non-negative class weights (the loss's ``weight``).
    """

    def __init__(self, *, kernel_size=5, power=3.0, stride=1, eps=1e-5, weight_base=2.0,
                 normalizer="count", zscore=True, reduction="mean", backend="auto",
                 check_target=True, sync=False, loss_weight=1.0, loss_name="loss_lad",
                 class_weight=None, upsample=False):
        super().__init__()
        self.options = dict(kernel_size=kernel_size, power=power, stride=stride, eps=eps,
                            weight_base=weight_base, normalizer=normalizer, zscore=zscore,
                            backend=backend, check_target=check_target, sync=sync)
        check_options(ignore_index=255, reduction=reduction, **self.options)
        if not isinstance(loss_weight, (int, float)) or isinstance(loss_weight, bool):
            raise ValueError(f"loss_weight must be a number, got loss_weight={loss_weight!r}")
        if not isinstance(loss_name, str):
            raise ValueError(f"loss_name must be a string, got loss_name={loss_name!r}")
        if class_weight is not None and not (
                isinstance(class_weight, (list, tuple))
                and all(isinstance(v, (int, float)) for v in class_weight)):
            raise ValueError("class_weight must be None or a list of C class weights, got "
                             f"class_weight={class_weight!r}")
        if not isinstance(upsample, bool):
            raise ValueError(f"upsample must be True or False, got upsample={upsample!r}")
        self.upsample = upsample
        if upsample:
            _low_resolution_heads()
        self.reduction = reduction
        self.loss_weight = float(loss_weight)
        self.class_weight = None if class_weight is None else [float(v) for v in class_weight]
        self._loss_name = loss_name

    @property
    def loss_name(self):
        """The key of this loss in the decode head's loss dict (mmseg's loss interface)."""
        return self._loss_name

    def forward(self, cls_score, label, weight=None, avg_factor=None, reduction_override=None,
                ignore_index=255, **kwargs):
        """``loss_weight`` times the loss of ``cls_score`` ``(N, C, H, W)`` against ``label``
        ``(N, H, W)``, weighted per pixel by ``weight`` ``(N, H, W)`` when given."""
        if kwargs:
            raise TypeError(f"LocallyAdaptiveLoss.forward got unexpected keyword arguments "
                            f"{sorted(kwargs)}")
        if reduction_override not in (None,) + REDUCTIONS:
            raise ValueError(f"reduction_override must be None or one of {REDUCTIONS}, got "
                             f"reduction_override={reduction_override!r}")
        reduction = reduction_override or self.reduction
        if avg_factor is not None and reduction == "sum":
            raise ValueError('avg_factor can not be used with reduction="sum"')  # mmseg's rule
        class_weight = None
        if self.class_weight is not None:
            class_weight = torch.tensor(self.class_weight, dtype=torch.float32,
                                        device=cls_score.device)
        source = getattr(cls_score, _SOURCE, None) if self.upsample else None
        interpolation = {}
        if source is not None:  # the head's logits, before its resize (module docstring)
            cls_score, align_corners = source
            interpolation = dict(upsample="bilinear", align_corners=bool(align_corners))
        loss = locally_adaptive_loss(cls_score, label, weight=class_weight, pixel_weight=weight,
                                     ignore_index=ignore_index, reduction=reduction,
                                     **self.options, **interpolation)
        if avg_factor is not None and reduction == "mean":
            # (S / W)^(1/k) -> (S / avg_factor)^(1/k): multiply by (W / avg_factor)^(1/k). W
            # depends on labels and weights only, so the gradient is the loss's, rescaled.
            eps = torch.finfo(torch.float32).eps
            total = self._weight_sum(cls_score, label, class_weight, weight, ignore_index)
            factor = (total / (avg_factor + eps)) ** (1.0 / self.options["power"])
            loss = loss * factor.to(loss.dtype)
        return self.loss_weight * loss

    def _weight_sum(self, cls_score, label, class_weight, weight, ignore_index):
        """sum_p w_p over the valid centres: the weighted mean's denominator, in float64."""
        if label.dim() == cls_score.dim():
            label = label.squeeze(1)
        acc = accumulation_dtype(cls_score.dtype)
        return weight_total(label, None if class_weight is None else class_weight.to(acc),
                            cls_score.shape[1], self.options["stride"], ignore_index,
                            None if weight is None else weight.detach().to(acc))

    def extra_repr(self):
        options = dict(self.options, reduction=self.reduction, loss_weight=self.loss_weight,
                       loss_name=self._loss_name, class_weight=self.class_weight,
                       upsample=self.upsample)
        return ", ".join(f"{name}={value!r}" for name, value in options.items())


# The attribute of a resized-logits tensor that carries (the head's logits, align_corners), and
# whether loss_by_feat runs for a head whose losses all take them.
_SOURCE = "_lad_triton_source"
_DEFERRED = ContextVar("lad_triton_mmseg_deferred", default=False)


def _low_resolution_heads():
    """Make mmseg's BaseDecodeHead.loss_by_feat hand this loss the logits before its resize
    (module docstring). Once, and only where mmseg's decode heads are loaded: a head that builds
    this loss has imported them (importing them here would import mmcv.ops)."""
    module = sys.modules.get("mmseg.models.decode_heads.decode_head")
    if module is None or getattr(module.BaseDecodeHead.loss_by_feat, "_lad_triton", False):
        return
    original_loss_by_feat, original_resize = module.BaseDecodeHead.loss_by_feat, module.resize

    @functools.wraps(original_resize)
    def resize(input, *args, **kwargs):
        # mmseg's resize(input, size=None, scale_factor=None, mode='nearest', align_corners=None,
        # warning=True)
        named = dict(zip(("size", "scale_factor", "mode", "align_corners"), args), **kwargs)
        if not (_DEFERRED.get() and named.get("mode") == "bilinear"
                and named.get("size") is not None):
            return original_resize(input, *args, **kwargs)
        # The resize of loss_by_feat: for the accuracy and the sampler, which need no gradient;
        # the loss finds the head's logits on it.
        with torch.no_grad():
            out = original_resize(input, *args, **kwargs)
        setattr(out, _SOURCE, (input, named.get("align_corners")))
        return out

    @functools.wraps(original_loss_by_feat)
    def loss_by_feat(self, seg_logits, batch_data_samples):
        losses = (self.loss_decode if isinstance(self.loss_decode, nn.ModuleList)
                  else [self.loss_decode])
        # Only this class's forward reads the source: a subclass overriding it would score the
        # resize without a gradient.
        deferred = all(type(loss).forward is LocallyAdaptiveLoss.forward and loss.upsample
                       for loss in losses)
        token = _DEFERRED.set(deferred)
        try:
            return original_loss_by_feat(self, seg_logits, batch_data_samples)
        finally:
            _DEFERRED.reset(token)

    loss_by_feat._lad_triton = True
    module.resize = resize
    module.BaseDecodeHead.loss_by_feat = loss_by_feat

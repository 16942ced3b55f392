"""Adapters to the frameworks segmentation models are trained with, one module per framework.

Each module imports its framework when it is itself imported; ``import lad_triton`` imports none
of them (``tests/test_integrations.py`` checks it). Install a framework with the package's extra
of its name (``pip install "lad-triton[mmseg]"``, ``[transformers]``, ``[monai]``).

- ``lad_triton.integrations.mmseg``: registers ``"LocallyAdaptiveLoss"`` in mmsegmentation's
  model registry, for ``loss_decode=dict(type="LocallyAdaptiveLoss", ...)`` in a config.
- ``lad_triton.integrations.transformers``: ``apply_lad_to_segformer`` (the loss of Hugging Face
  Segformer and the models that compute theirs the same way) and ``compute_loss_func`` (for
  ``Trainer(compute_loss_func=...)``).
- ``lad_triton.integrations.monai``: ``LocallyAdaptiveLoss`` taking MONAI's and nnU-Net's
  ``(B, 1, ...)`` label maps, integer or float.
"""

"""The framework adapters without their frameworks (issue 13): ``import lad_triton`` imports none
of the frameworks, and the MONAI / nnU-Net adapter, which imports neither, reads their label
maps. The adapters against the real frameworks: tests/test_integration_*.py."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cases import make_labels, make_logits, rel_err
from lad_triton.integrations.monai import LocallyAdaptiveLoss
from oracle import lad_reference

FRAMEWORKS = ("mmseg", "mmengine", "mmcv", "transformers", "accelerate", "monai", "nnunetv2")


def test_import_lad_triton_imports_no_framework():
    probe = ("import sys, torch, lad_triton, lad_triton.integrations; "
             "x = torch.randn(1, 3, 4, 4, requires_grad=True); "
             "y = torch.zeros(1, 4, 4, dtype=torch.long); "
             "lad_triton.LocallyAdaptiveLoss()(x, y).backward(); "
             f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                         check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_monai_adapter_imports_no_framework():
    probe = ("import sys, lad_triton.integrations.monai; "
             f"print([m for m in {FRAMEWORKS!r} if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1],
                         check=True, capture_output=True, text=True).stdout
    assert out.strip() == "[]"


def test_integral_float_labels_with_a_channel_are_the_integer_labels():
    # No framework needed: the adapter imports neither MONAI nor nnU-Net.
    logits = make_logits((2, 4, 3, 5, 6), dtype=torch.float64).requires_grad_(True)
    labels = make_labels(2, (3, 5, 6), 4, n_labels=3)
    loss = LocallyAdaptiveLoss(kernel_size=3)(logits, labels[:, None].float())
    ref = lad_reference(logits, labels, kernel_size=3)
    assert rel_err(loss, ref.loss) < 1e-10
    (grad,) = torch.autograd.grad(loss, logits)
    assert rel_err(grad, ref.grad) < 1e-10
    assert torch.equal(loss, LocallyAdaptiveLoss(kernel_size=3)(logits, labels[:, None].short()))


@pytest.mark.parametrize("bad", [0.5, float("nan"), float("inf")])
def test_non_integral_float_labels_raise(bad):
    labels = make_labels(1, (4, 5), 3, ignore_frac=0.0)[:, None].float()
    labels[0, 0, 2, 3] = bad
    criterion = LocallyAdaptiveLoss(kernel_size=3)
    with pytest.raises(ValueError, match=rf"target must hold integral class indices \(or "
                                         rf"ignore_index\), got target\[0, 0, 2, 3\]={bad}"):
        criterion(make_logits((1, 3, 4, 5)), labels)


def test_unchecked_float_labels_are_truncated():
    labels = make_labels(1, (4, 5), 3, ignore_frac=0.0)
    fractional = labels[:, None].float() + 0.25
    criterion = LocallyAdaptiveLoss(kernel_size=3, check_target=False)
    logits = make_logits((1, 3, 4, 5))
    assert torch.equal(criterion(logits, fractional), criterion(logits, labels))

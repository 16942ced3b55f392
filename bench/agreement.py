"""``python -m bench.agreement``: the loss and its gradient of one VOC-like sample batch by every
backend usable here, in each dtype, against an independent float64 reference, with the
contract's tolerance (docs/contract.md) as the verdict. Exits 1 if any backend disagrees. (The
main job, ``python -m bench``, times them.)

The reference is ``bench/workloads.py``'s ``lad_unfold`` evaluated in float64 with autograd's
gradient: the ``F.unfold`` formulation, which shares no code with lad_triton and which
``tests/test_bench.py`` checks against the tests' loop-by-loop oracle (too slow for this batch).
It also prints how far the cross-entropy settings of the loss (kernel_size=1, zscore=False,
normalizer="weight", power=1) are from ``F.cross_entropy`` in float32.

On a CPU the fused kernels only run under Triton's interpreter, slowly:
``TRITON_INTERPRET=1 python -m bench.agreement --size 33``."""

import argparse
import platform
import time
import warnings

import torch
import torch.nn.functional as F

import lad_triton
from bench.workloads import lad_unfold_float64
from lad_triton import locally_adaptive_loss
from lad_triton.dispatch import fused_unavailable

# Under Triton's interpreter numpy warns about the NaN that a masked-off lane (a padded class, a
# column outside the image) computes and no store keeps: noise, not a finding.
warnings.filterwarnings("ignore", "invalid value encountered", RuntimeWarning)

# The contract's "Output dtype and accuracy": (loss, gradient) relative tolerance.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 5e-3),
             torch.bfloat16: (1e-2, 2e-2)}


def sample_batch(batch, classes, size, device, seed=0):
    """Rectangles of random classes on a background, a 255 'ignore' band on their boundaries
    (as in VOC masks), and logits of scale ~3 that lean towards the true class."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.zeros(batch, size, size, dtype=torch.uint8)
    for b in range(batch):
        for _ in range(6):
            c = int(torch.randint(1, classes, (1,), generator=gen))
            i0, j0 = torch.randint(0, size - 8, (2,), generator=gen).tolist()
            h, w = torch.randint(8, size // 2, (2,), generator=gen).tolist()
            target[b, i0:i0 + h, j0:j0 + w] = 255
            target[b, i0 + 2:i0 + h - 2, j0 + 2:j0 + w - 2] = c
    onehot = F.one_hot(target.long().clamp(max=classes - 1), classes).permute(0, 3, 1, 2)
    logits = 3 * torch.randn(batch, classes, size, size, generator=gen) + 2 * onehot
    return logits.to(device), target.to(device)


# float16 gradients of a mean over ~30k pixels sit in float16's subnormal range (below 6.1e-5;
# the demo prints the median magnitudes of LAD's and cross-entropy's), so float16 training
# scales the loss (GradScaler) and so does this check, by --fp16-scale; the gradient is unscaled
# in float64.
GRAD_SCALE = {torch.float16: 1024.0}


def loss_and_grad(logits, target, reference=False, **options):
    """The loss and its gradient by lad_triton, or (reference=True) by the float64 F.unfold
    formulation on the same values."""
    x = logits.detach().requires_grad_(True)
    if reference:  # one image at a time: 8 x 21 x 513^2 unfolds to 9 GB an image in float64
        return lad_unfold_float64(logits.detach(), target.long(), options["kernel_size"])
    loss = locally_adaptive_loss(x, target, **options)
    scale = GRAD_SCALE.get(x.dtype, 1.0)
    (loss * scale).backward()
    return loss.detach(), x.grad.double() / scale


def rel(a, b):
    return (torch.linalg.vector_norm(a.double() - b.double())
            / torch.linalg.vector_norm(b.double())).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--classes", type=int, default=21)
    parser.add_argument("--size", type=int, default=129)
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--fp16-scale", type=float, default=GRAD_SCALE[torch.float16],
                        help="loss scale of the float16 check (1: none)")
    args = parser.parse_args()
    GRAD_SCALE[torch.float16] = args.fp16_scale

    device = "cuda" if torch.cuda.is_available() else "cpu"
    logits, target = sample_batch(args.batch, args.classes, args.size, device)
    options = dict(kernel_size=args.kernel_size)
    print(f"lad_triton {lad_triton.__version__}, torch {torch.__version__}, "
          f"python {platform.python_version()}, device {device}")
    print(f"batch {tuple(logits.shape)} logits, uint8 target with 255 = ignore, "
          f"kernel_size={args.kernel_size}, power=3")

    ref_loss, ref_grad = loss_and_grad(logits, target, reference=True, **options)
    x = logits.double().requires_grad_(True)
    ce = F.cross_entropy(x, target.long(), ignore_index=255)
    (ce_grad,) = torch.autograd.grad(ce, x)
    print(f"float64 reference (F.unfold) loss {ref_loss.item():.8f}   "
          f"(F.cross_entropy: {ce.item():.6f})")
    print(f"median |gradient|: {ref_grad.abs().median().item():.2g} "
          f"(F.cross_entropy: {ce_grad.abs().median().item():.2g}); float16 loss scale "
          f"{GRAD_SCALE[torch.float16]:g}\n")
    print(f"{'backend':8} {'dtype':9} {'loss':>12} {'loss err':>9} {'grad err':>9} "
          f"{'fwd+bwd ms':>11}  verdict")

    failures = 0
    for backend in ("torch", "triton"):
        for dtype, (loss_tol, grad_tol) in TOLERANCE.items():
            x = logits.to(dtype)
            try:
                loss_and_grad(x, target, backend=backend, **options)  # warm-up, compilation
                start = time.perf_counter()
                loss, grad = loss_and_grad(x, target, backend=backend, **options)
                if device == "cuda":
                    torch.cuda.synchronize()
                ms = 1e3 * (time.perf_counter() - start)
            except (NotImplementedError, RuntimeError) as err:
                print(f"{backend:8} {str(dtype)[6:]:9} unavailable here: {err}")
                break
            # Against the float64 reference on the same rounded logits (the contract's table).
            loss64, grad64 = loss_and_grad(x, target, reference=True, **options)
            loss_err, grad_err = rel(loss, loss64), rel(grad, grad64)
            ok = loss_err <= loss_tol and grad_err <= grad_tol
            failures += not ok
            # Under Triton's CPU interpreter a time says nothing about the kernels.
            timing = "interp." if backend == "triton" and device == "cpu" else f"{ms:.1f}"
            print(f"{backend:8} {str(dtype)[6:]:9} {loss.item():12.6f} {loss_err:9.1e} "
                  f"{grad_err:9.1e} {timing:>11}  {'agrees' if ok else 'DISAGREES'}")
    print()
    cross_entropy_settings(logits, target, device)
    return 1 if failures else 0


def cross_entropy_settings(logits, target, device):
    """kernel_size=1, zscore=False, normalizer="weight", power=1 is F.cross_entropy in exact
    arithmetic; print how far apart the two are computed in float32."""
    x = logits.float()
    ce = F.cross_entropy(x, target.long(), ignore_index=255)
    for backend in ("torch", "triton"):
        if backend == "triton" and fused_unavailable(x) is not None:
            continue
        lad = locally_adaptive_loss(x, target, kernel_size=1, zscore=False, normalizer="weight",
                                    power=1.0, backend=backend)
        print(f"cross-entropy settings, {backend} float32: {lad.item():.8f} against "
              f"F.cross_entropy {ce.item():.8f}, relative difference "
              f"{abs(lad.item() - ce.item()) / abs(ce.item()):.1e}")


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m bench.repeat_check [--dry-run]``: on a GPU, what only a GPU can show about the
fused loss's results: that 20 calls on the same inputs give bitwise the same loss and gradient
(programs run concurrently there, so a race or an order-dependent sum would show), and that the
fused loss and the PyTorch backend agree on CUDA tensors within the contract's tolerance. Prints
one line per check and exits 1 if any fails."""

import argparse
import sys

# The contract's tolerances (docs/contract.md): loss relative, gradient ||g - g_ref|| / ||g_ref||.
TOLERANCE = {"float32": (1e-5, 1e-5), "bfloat16": (1e-2, 2e-2), "float16": (2e-3, 5e-3)}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.repeat_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args(argv)
    if args.dry_run:
        import os
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    import lad_triton

    device = "cpu" if args.dry_run else "cuda"
    shapes = [((1, 5, 6, 40), 5)] if args.dry_run else [((8, 21, 513, 513), 5),
                                                         ((4, 19, 512, 1024), 3),
                                                         ((2, 21, 97, 203), 7)]
    failed = 0
    for shape, k in shapes:
        for dtype in ("float32", "bfloat16"):
            gen = torch.Generator().manual_seed(1000 * k + shape[1] + (dtype == "bfloat16"))
            x = (3 * torch.randn(shape, generator=gen)).to(device=device,
                                                           dtype=getattr(torch, dtype))
            y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen)
            y[torch.rand(y.shape, generator=gen) < 0.1] = 255
            y = y.to(torch.uint8).to(device)
            x.requires_grad_(True)

            def fused():
                loss = lad_triton.locally_adaptive_loss(x, y, kernel_size=k, backend="triton")
                return loss.detach(), torch.autograd.grad(loss, x)[0]

            loss0, grad0 = fused()
            same = all(torch.equal(loss0, loss) and torch.equal(grad0, grad)
                       for loss, grad in (fused() for _ in range(args.repeats)))
            failed += not same
            print(f"{shape} K={k} {dtype}: {args.repeats} more calls bitwise equal: {same}",
                  flush=True)
            # The PyTorch backend on the same CUDA tensors, in float64: the reference.
            x64 = x.detach().double().requires_grad_(True)
            ref = lad_triton.locally_adaptive_loss(x64, y, kernel_size=k, backend="torch")
            gref = torch.autograd.grad(ref, x64)[0]
            loss_err = abs(float(loss0.double() - ref.detach())) / max(abs(float(ref)), 1e-30)
            grad_err = float((grad0.double() - gref).norm() / gref.norm())
            tol = TOLERANCE[dtype]
            ok = loss_err <= tol[0] and grad_err <= tol[1]
            failed += not ok
            print(f"{shape} K={k} {dtype}: against the PyTorch backend in float64 on "
                  f"{device}: loss {loss_err:.1e} (<= {tol[0]}), gradient {grad_err:.1e} "
                  f"(<= {tol[1]}): {'ok' if ok else 'FAILED'}", flush=True)
            del x, x64, gref, grad0
    print(f"repeat_check: {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

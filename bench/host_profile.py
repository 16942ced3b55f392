"""``python -m bench.host_profile --out DIR``: where a fused call's host time goes, on a GPU.

Per workload, four calls timed three ways: ``host`` (the host's time per call while the
device runs behind, no sync between calls), ``pipelined`` (the same loop until the device ends)
and ``synced`` (one call from the host's start to the device's end, the median): the fused
loss's forward + backward (``check_target=False``), the same with the label check's one sync
(the default), its forward alone (no gradient) and ``F.cross_entropy``'s forward + backward.
Then a cProfile of the fused forward + backward at the small shape, where the device never
holds the host back, by time spent in each function itself and cumulated. Writes
DIR/host_profile.txt. ``--dry-run``: a tiny shape on the CPU under Triton's interpreter, to
prove the code path.
"""

import argparse
import collections
import cProfile
import io
import os
import pstats
import sys
import time
from pathlib import Path

SHAPES = [(1, 21, 64, 64), (8, 21, 513, 513)]


def calls(x, y, kernel_size):
    import torch
    import torch.nn.functional as F

    import lad_triton

    def lad(check_target=False):
        return torch.autograd.grad(lad_triton.locally_adaptive_loss(
            x, y, kernel_size=kernel_size, backend="triton", check_target=check_target), x)

    return {"lad": lad, "lad_checked": lambda: lad(True),
            "lad_forward": lambda: lad_triton.locally_adaptive_loss(
                x.detach(), y, kernel_size=kernel_size, backend="triton", check_target=False),
            "cross_entropy": lambda: torch.autograd.grad(F.cross_entropy(x, y, ignore_index=255),
                                                         x)}


def split(run, repeats, label):
    """Where one fused forward + backward's host time goes, per call: the loss call and in it the
    autograd Function's forward and the launch helpers; torch.autograd.grad and in it the
    Function's backward, which runs on autograd's device thread (a CUDA tensor's backward does),
    where the cProfile of the main thread cannot see it: it gets its own profile here."""
    import lad_triton
    from lad_triton import fused
    from lad_triton.kernels import backward as kb
    from lad_triton.kernels import combine as kc
    from lad_triton.kernels import forward as kf

    spent = collections.Counter()
    backward_profile = cProfile.Profile()

    def timed(name, fn, profile=None):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            if profile is not None:
                profile.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                if profile is not None:
                    profile.disable()
                spent[name] += time.perf_counter() - start
        return wrapper

    function = fused.FusedMinkowskiMean
    saved = [(lad_triton, "locally_adaptive_loss"), (kf, "forward"), (kc, "combine"),
             (kb, "backward")]
    originals = [getattr(owner, name) for owner, name in saved]
    methods = (function.forward, function.backward)
    try:
        for (owner, name), fn in zip(saved, originals):
            setattr(owner, name, timed(f"{owner.__name__}.{name}", fn))
        function.forward = staticmethod(timed("Function.forward", methods[0]))
        function.backward = staticmethod(timed("Function.backward", methods[1], backward_profile))
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        total = time.perf_counter() - start
    finally:
        for (owner, name), fn in zip(saved, originals):
            setattr(owner, name, fn)
        function.forward, function.backward = (staticmethod(m) for m in methods)
    us = {k: v / repeats * 1e6 for k, v in spent.items()}
    loss = us.get("lad_triton.locally_adaptive_loss", 0.0)
    call = total / repeats * 1e6
    lines = [f"split of one fused forward + backward at {label}, host us per call "
             f"(no sync; the timers add ~1 us each):",
             f"  call {call:.0f} = loss call {loss:.0f} + torch.autograd.grad {call - loss:.0f}",
             f"  loss call: Function.forward {us.get('Function.forward', 0):.0f} (the forward "
             f"launch helper {us.get('lad_triton.kernels.forward.forward', 0):.0f}, the combine's "
             f"{us.get('lad_triton.kernels.combine.combine', 0):.0f}); validation and dispatch "
             f"the rest",
             f"  torch.autograd.grad: Function.backward {us.get('Function.backward', 0):.0f} on "
             f"autograd's thread (the backward launch helper "
             f"{us.get('lad_triton.kernels.backward.backward', 0):.0f}); the engine and the "
             f"hand-offs to that thread and back the rest"]
    text = io.StringIO()
    pstats.Stats(backward_profile, stream=text).sort_stats("tottime").print_stats(25)
    return "\n".join(lines) + f"\ncProfile of Function.backward on its thread, by tottime:\n" \
        f"{text.getvalue()}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"
    import torch

    device = torch.device("cpu" if args.dry_run else "cuda")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    shapes, repeats = ([(1, 3, 4, 8)], 1) if args.dry_run else (SHAPES, args.repeats)
    warm, timed = (0, 1) if args.dry_run else (3, max(3, repeats // 5))
    lines = []

    def say(text):
        print(text, flush=True)
        lines.append(text)

    say(f"device {device}, torch {torch.__version__}, K={args.kernel_size}, float32")
    profiled = None
    for shape in shapes:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
        y = torch.randint(0, shape[1], (shape[0],) + shape[2:], generator=gen).to(device)
        for name, run in calls(x, y, args.kernel_size).items():
            if profiled is None:  # the small shape's fused forward + backward
                profiled = run
            for _ in range(warm):
                run()  # compile, warm the caches
            sync()
            start = time.perf_counter()
            for _ in range(repeats):
                run()
            host = (time.perf_counter() - start) / repeats
            sync()
            pipelined = (time.perf_counter() - start) / repeats
            walls = []
            for _ in range(timed):
                start = time.perf_counter()
                run()
                sync()
                walls.append(time.perf_counter() - start)
            say(f"{'x'.join(map(str, shape))} {name:14} host {host * 1e6:7.0f} us/call, "
                f"pipelined {pipelined * 1e6:7.0f}, synced {sorted(walls)[len(walls) // 2] * 1e6:7.0f}")
    say(split(profiled, repeats, f"{'x'.join(map(str, shapes[0]))}"))
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeats if args.dry_run else 2 * repeats):
        profiled()
    profiler.disable()
    sync()
    for key in ("tottime", "cumulative"):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(40)
        say(f"cProfile of the fused forward + backward calls at "
            f"{'x'.join(map(str, shapes[0]))}, by {key}:\n{text.getvalue()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "host_profile.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

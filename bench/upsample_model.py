"""``python -m bench.upsample_model``: DRAM traffic and peak memory of the loss on low-resolution
logits, three ways, at the workloads the upsampling benchmarks use: ``F.interpolate`` then
``F.cross_entropy`` (what segmentation heads do today), ``F.interpolate`` then this loss (what
``upsample=`` computes until the kernels interpolate), and the fused design (kernels that
interpolate in registers and a backward that gathers each low-resolution pixel's footprint).

Bytes are counted pass by pass from what each kernel reads and writes in DRAM, as PyTorch's
kernels and the design's do (a tensor read once per kernel that reads it; halo re-reads served by
L2 are not counted). Time is those bytes over the copy bandwidth a GPU visit measured: a floor,
not a prediction, since it leaves out launches, host time and instruction issue (the fused
kernels at VOC-like K = 5 are issue-bound, docs/performance.md). Peak memory is the largest sum
of the tensors alive at once beyond the inputs, through forward and backward.
"""

import argparse
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The H200's device-to-device copy bandwidth, bytes read + written per second, as the last GPU
# visit measured it (bench/results/nvidia-h200-2026-12-04-2-summary.md).
H200_COPY_BYTES_PER_S = 4088e9


@dataclass(frozen=True)
class Upsampling:
    name: str
    batch: int
    classes: int
    low: tuple      # the head's (h, w)
    high: tuple     # the label's (H, W)
    align_corners: bool
    element: int = 4  # float32 logits
    label: int = 8    # int64 labels, as the benchmarks pass them
    parts: int = 2    # lad_triton.fused.GRADIENT_PARTS: the batch's parts, P formed for one

    @property
    def head(self):
        """Images before the last part (lad_triton.fused's _fused_mean_gradient)."""
        part = -(-self.batch // self.parts)
        return (-(-self.batch // part) - 1) * part

    def logits(self, size):
        return self.batch * self.classes * size[0] * size[1] * self.element

    @property
    def labels(self):
        return self.batch * self.high[0] * self.high[1] * self.label

    @property
    def columns(self):
        """The low-resolution logits interpolated along the columns, float32, in blocks of 32
        columns and a row of flags (B, h, cdiv(W, 32), C + 1, 32): the rows the fused kernels
        blend (kernels/upsample.py's columns_interpolated)."""
        return self.batch * (self.classes + 1) * self.low[0] * -(-self.high[1] // 32) * 32 * 4

    @property
    def span(self):
        """Input columns a tile of 28 output columns (K = 5) touches, at most (the buffers'
        width: kernels/upsample.py's Plan.span)."""
        return -(-28 * self.low[1] // self.high[1]) + 2

    @property
    def stage(self):
        """The backward's staging buffer: each input row's float32 share at every tile's input
        columns, per class (kernels/halo.py's _upsample_columns_kernel sums it)."""
        return int(self.batch * self.low[0] * -(-self.high[1] // 28) * self.span
                   * self.classes * 4)

    @property
    def above(self):
        """The band above's shares of each band's first row (bands of kernels/upsample.py's
        band_rows input rows: 2 at 8x, 4 at 4x), staged apart."""
        band = min(max(1, round(16 * self.low[0] / self.high[0])), self.low[0])
        return self.stage * -(-self.low[0] // band) // self.low[0]


WORKLOADS = (
    Upsampling("DeepLab-like", 8, 21, (65, 65), (513, 513), True),
    Upsampling("SegFormer-like", 8, 19, (128, 256), (512, 1024), False),
)


def traffic(w):
    """{way: (DRAM bytes of forward + backward, peak bytes beyond the inputs)}."""
    low, high, y = w.logits(w.low), w.logits(w.high), w.labels
    part = -(-w.batch // w.parts)  # images per part
    head = low * w.head // w.batch  # G of the parts before the last
    return {
        # upsample writes the logits; log_softmax reads them and writes its output, which it
        # keeps for the backward; nll reads the labels. Backward: nll writes the gradient of
        # the log-probabilities (zeros, then the labels' entries), log_softmax's backward reads
        # it and its output and writes the logits' gradient, upsample's backward reads that
        # and adds into the low-resolution gradient (zeroed first; its atomics stay in L2).
        "interpolate + cross-entropy": (
            low + high + (high + high) + y + (high + y) + (3 * high) + (high + 2 * low),
            # the backward of log_softmax: its output, its incoming gradient and its result
            3 * high),
        # upsample writes the logits; the fused forward reads them and the labels and writes P;
        # the backward reads P, the logits and the labels and writes their gradient, which
        # upsample's backward reads.
        "interpolate + LAD": (
            low + high + (high + y + high) + (high + high + y + high) + (high + 2 * low),
            # the logits (kept by the loss), P and the logits' gradient
            3 * high),
        # Part by part of the batch, in the forward: the column pass kernel reads the part's
        # low-resolution logits and writes them interpolated along the columns; the forward
        # kernel reads those and the labels and writes the part's P (the label's size, the
        # logits' dtype); the backward's kernel reads P, the columns and the labels and writes
        # its tiles' float32 shares of the low-resolution gradient (staged), which the column
        # sums read to write G (float32), but the last part's, kept for the backward. The
        # autograd backward reads G and writes its part of the logits' gradient, and the last
        # part's column sums write the rest. Alive at the peak: one part's columns, P and
        # staged shares, and the first parts' G.
        "fused upsampling": (
            (low + w.columns) + (w.columns + y + high)
            + (high + w.columns + y + 2 * (w.stage + w.above) + low) + 2 * head,
            (w.columns + high + w.stage + w.above) * part // w.batch + head),
    }


def report(bandwidth=H200_COPY_BYTES_PER_S):
    lines = ["| workload | way | DRAM, fwd + bwd | floor at the copy bandwidth | peak memory | "
             "vs interpolate + cross-entropy (time floor, memory) |", "|---|---|---|---|---|---|"]
    for w in WORKLOADS:
        ways = traffic(w)
        base_bytes, base_peak = ways["interpolate + cross-entropy"]
        for way, (nbytes, peak) in ways.items():
            lines.append(f"| {w.name} {w.batch}x{w.classes}x{w.low[0]}x{w.low[1]} -> "
                         f"{w.high[0]}x{w.high[1]} | {way} | {nbytes / 1e6:.0f} MB | "
                         f"{nbytes / bandwidth * 1e6:.0f} us | {peak / 2**20:.0f} MiB | "
                         f"{nbytes / base_bytes:.2f}x, {peak / base_peak:.2f}x |")
    return "\n".join(lines)


# --- the calibrated model of the kernels that interpolate ------------------------------------

# F.cross_entropy's forward + backward kernels at the label's size, as the H200 measured them
# (calibrate.CROSS_ENTROPY_FROM): VOC-like 8x21x513x513 is DeepLab-like's label size;
# Cityscapes-like is 4x19x512x1024, half of SegFormer-like's batch (the kernels are bandwidth
# bound: twice the pixels, twice the time).
CROSS_ENTROPY_AT = {"DeepLab-like": (("voc", 5, "float32"), 1),
                    "SegFormer-like": (("cityscapes", 5, "float32"), 2)}


def calibrated(bandwidth=H200_COPY_BYTES_PER_S):
    """The calibrated model (bench/perf_model.py, constants fitted on the H200's kernel times
    with Triton 3.6's binaries) of the fused kernels at each workload, float32, K = 5, against
    interpolate + cross-entropy: F.cross_entropy's kernels as the H200 measured them plus the
    interpolation's forward and backward at their DRAM floor (which its backward's atomics
    exceed: the baseline is taken at its fastest). Compiles with the installed Triton."""
    import base64
    import gzip
    import json

    import torch

    import calibrate
    import kernel_report as kr
    import perf_model

    constants = json.loads((calibrate.RESULTS / "calibration-triton-3.6.json").read_text())
    params = perf_model.Params(constants["constants"]["latency_cycles"],
                               constants["constants"]["issue_efficiency"])
    ce = calibrate.cross_entropy_us()
    captured = []
    original = kr.perf_model.model_kernel

    def capture(name, sass_text, trips, programs, warps, dram_bytes, registers=0, spills=0):
        captured.append(dict(name=name, trips=list(trips), programs=programs, warps=warps,
                             dram_bytes=dram_bytes, registers=registers, spills=spills,
                             sass=base64.b64encode(gzip.compress(sass_text.encode())).decode()))
        return original(name, sass_text, trips, programs, warps, dram_bytes, registers, spills)

    lines = [f"Calibrated model (latency {params.latency_cycles:.0f} cycles, issue efficiency "
             f"{params.issue_efficiency:.3f}) of the kernels compiled by Triton "
             f"{kr.triton.__version__}, float32 logits, int64 labels, K = 5, forward + backward; "
             "F.cross_entropy's kernels measured on the H200; F.interpolate at its DRAM floor.",
             "", "| workload | LAD | kernel | registers | programs | modelled us | bound |",
             "|---|---|---|---|---|---|---|"]
    totals = []
    kr.perf_model.model_kernel = capture
    try:
        for w in WORKLOADS:
            shape = (w.batch, w.classes) + w.high
            fig = dict(dtype="float32", kernel_size=5, shape=list(shape))
            sums = []
            for low, way in ((w.low, "upsample='bilinear'"), (None, "after F.interpolate")):
                captured.clear()
                kr.model_workload(shape, 5, torch.float32, low=low,
                                  align_corners=w.align_corners)
                total = 0.0
                for launch in captured:
                    t = perf_model.calibrated(calibrate.inputs(launch, fig), params)
                    total += t.time_s * 1e6
                    lines.append(f"| {w.name} | {way} | {launch['name']} | "
                                 f"{launch['registers']} | {launch['programs']} | "
                                 f"{t.time_s * 1e6:.0f} | {t.bound} |")
                if low:  # at its DRAM floor, as F.interpolate: the autograd backward reads G
                    # of the parts before the last and writes their gradient
                    head = w.logits(w.low) * w.head // w.batch
                    op_us = 2 * head / bandwidth * 1e6
                    total += op_us
                    lines.append(f"| {w.name} | {way} | G of the first half scaled "
                                 f"(PyTorch), DRAM floor | - | - | {op_us:.0f} | DRAM |")
                sums.append(total)
            key, scale = CROSS_ENTROPY_AT[w.name]
            interp = (w.logits(w.low) + w.logits(w.high)  # forward: read low, write high
                      + w.logits(w.high) + 2 * w.logits(w.low)) / bandwidth * 1e6
            totals.append((w, *sums, ce[key][0] * scale, interp))
    finally:
        kr.perf_model.model_kernel = original
    lines += ["", "| workload | LAD, upsample='bilinear' | F.interpolate + LAD | "
              "F.interpolate + F.cross_entropy | upsample='bilinear' / (interpolate + "
              "cross-entropy) |", "|---|---|---|---|---|"]
    for w, fused, after, ce_us, interp in totals:
        lines.append(f"| {w.name} {w.batch}x{w.classes}x{w.low[0]}x{w.low[1]} -> "
                     f"{w.high[0]}x{w.high[1]} | {fused:.0f} us | {after + interp:.0f} us | "
                     f"{ce_us + interp:.0f} us | {fused / (ce_us + interp):.2f}x |")
    lines += ["", "LAD: the fused kernels, modelled; F.cross_entropy: its kernels as measured; "
              "F.interpolate forward + backward: its DRAM floor."]
    lines += ["", "Launch and host time are in neither side's sum."]
    return "\n".join(lines)


# --- peak memory, measured -----------------------------------------------------------------

def measured_memory(device=None):
    """Peak memory of forward + backward beyond the inputs, three ways, measured
    (workloads.peak_memory_mib: allocation events on a CPU, where the fused kernels run in
    Triton's interpreter, so the size is small; max_memory_allocated on CUDA, at the DeepLab-like
    size), float32 logits at 1/4 and 1/8 of int64 labels' size, K = 5."""
    import torch
    import torch.nn.functional as F

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cpu":  # before the kernels are first imported
        os.environ["TRITON_INTERPRET"] = "1"
    from lad_triton import locally_adaptive_loss
    from workloads import peak_memory_mib

    if device.type == "cpu":
        cases = [((2, 21, 9, 9), (33, 33), False), ((2, 21, 5, 5), (33, 33), True)]
    else:
        cases = [((8, 21, 65, 65), (513, 513), True), ((8, 19, 128, 256), (512, 1024), False)]
    lines = [f"Peak memory of forward + backward beyond the inputs on {device.type} (float32 "
             "logits, int64 labels, K = 5):", "",
             "| logits -> labels | align_corners | interpolate + cross-entropy | interpolate + "
             "LAD (fused) | LAD, upsample='bilinear' (fused) | fused / (interpolate + "
             "cross-entropy) |", "|---|---|---|---|---|---|"]
    gen = torch.Generator().manual_seed(0)
    for shape, high, corners in cases:
        x = torch.randn(shape, generator=gen).to(device).requires_grad_(True)
        t = torch.randint(0, shape[1], (shape[0],) + high, generator=gen).to(device)

        def up():
            return F.interpolate(x, size=high, mode="bilinear", align_corners=corners)

        ways = [
            lambda: F.cross_entropy(up(), t, ignore_index=255),
            lambda: locally_adaptive_loss(up(), t, backend="triton", check_target=False),
            lambda: locally_adaptive_loss(x, t, backend="triton", upsample="bilinear",
                                          align_corners=corners, check_target=False)]
        peaks = [peak_memory_mib(lambda f=f: torch.autograd.grad(f(), x), device) for f in ways]
        lines.append(f"| {'x'.join(map(str, shape))} -> {'x'.join(map(str, high))} | "
                     f"{corners} | " + " | ".join(f"{p:.3g} MiB" for p in peaks)
                     + f" | {peaks[2] / peaks[0]:.2f}x |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", type=float, default=H200_COPY_BYTES_PER_S / 1e9,
                        help="copy bandwidth in GB/s (default: the H200's, measured)")
    extra = parser.add_mutually_exclusive_group()  # compiled kernels, or interpreted ones
    extra.add_argument("--calibrated", action="store_true",
                       help="also the calibrated model of the kernels (compiles them: run "
                            "with Triton 3.6, the GPU's)")
    extra.add_argument("--memory", action="store_true",
                       help="also measure peak memory (on a CPU under Triton's interpreter)")
    args = parser.parse_args(argv)
    print(report(args.bandwidth * 1e9))
    if args.memory:
        print()
        print(measured_memory())
    if args.calibrated:
        print()
        print(calibrated(args.bandwidth * 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

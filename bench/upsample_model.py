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
from dataclasses import dataclass

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

    def logits(self, size):
        return self.batch * self.classes * size[0] * size[1] * self.element

    @property
    def labels(self):
        return self.batch * self.high[0] * self.high[1] * self.label


WORKLOADS = (
    Upsampling("DeepLab-like", 8, 21, (65, 65), (513, 513), True),
    Upsampling("SegFormer-like", 8, 19, (128, 256), (512, 1024), False),
)


def traffic(w):
    """{way: (DRAM bytes of forward + backward, peak bytes beyond the inputs)}."""
    low, high, y = w.logits(w.low), w.logits(w.high), w.labels
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
        # The forward reads the low-resolution logits and the labels and writes P (the label's
        # size, the logits' dtype); the backward reads P, the low-resolution logits and the
        # labels and writes the low-resolution gradient.
        "fused upsampling": (
            (low + y + high) + (high + low + y + low),
            high + low),
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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bandwidth", type=float, default=H200_COPY_BYTES_PER_S / 1e9,
                        help="copy bandwidth in GB/s (default: the H200's, measured)")
    args = parser.parse_args(argv)
    print(report(args.bandwidth * 1e9))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

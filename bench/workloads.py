"""What the benchmarks run: workloads, the implementations compared, the traffic model and the
memory meters. ``test_throughput.py`` times them; ``python -m bench`` reports.

Implementations (all take (B, C, H, W) logits and int64 (B, H, W) targets, 255 = ignore):

- ``triton``: the fused kernels, ``locally_adaptive_loss(backend="triton")``; CUDA only.
- ``torch``: the unfused PyTorch implementation, ``backend="torch"``.
- ``torch_compile``: the same under ``torch.compile`` (its numerics are checked before timing).
- ``cross_entropy``: ``F.cross_entropy(ignore_index=255)``: what the loss replaces.
- ``torch_unfold``: the ``F.unfold`` formulation of published neighbourhood losses, with
  K^2 * C * H * W memory; run only where it fits.
- ``interp_triton``: ``F.interpolate`` then the fused kernels, on workloads with ``low``: what
  ``upsample=`` cost before the kernels interpolated in registers.

Workloads with ``low`` give the logits at a head's resolution, below the label's: cross-entropy
is then ``F.interpolate`` (bilinear, the workload's ``align_corners``) + ``F.cross_entropy``, as
segmentation heads compute it, and LAD is the loss with ``upsample="bilinear"`` (the fused
kernels interpolate in registers).

Passes: ``forward`` is the training forward (logits require grad, so what the backward needs is
built and kept); ``forward+backward`` adds the gradient with respect to the logits.
"""

import gc
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lad_triton import locally_adaptive_loss

IGNORE = 255
PASSES = ("forward", "forward+backward")
IMPLS = ("triton", "torch", "torch_compile", "cross_entropy", "torch_unfold", "interp_triton")


@dataclass(frozen=True)
class Workload:
    name: str
    batch: int
    classes: int
    height: int
    width: int
    kernel_size: int
    dtype: torch.dtype
    slow: bool  # too big to time on a CPU in minutes
    low: tuple = None  # the logits' (h, w) where a head predicts below the label's size
    align_corners: bool = False  # the interpolation's, with low

    @property
    def shape(self):
        """(B, C, H, W) at the label's size: what the per-pixel figures count."""
        return (self.batch, self.classes, self.height, self.width)

    @property
    def logits_shape(self):
        return (self.batch, self.classes) + (self.low or (self.height, self.width))

    @property
    def low_share(self):
        """The logits' pixels per label pixel: 1 without low."""
        return self.low[0] * self.low[1] / (self.height * self.width) if self.low else 1.0

    @property
    def pixels(self):
        return self.batch * self.height * self.width

    @property
    def id(self):
        return f"{self.name}-K{self.kernel_size}-{str(self.dtype)[6:]}"

    def inputs(self, device, seed=0):
        """Logits of scale ~3 leaning towards the true class, and rectangles of classes with a
        255 band on their edges, as in VOC masks."""
        gen = torch.Generator().manual_seed(seed)
        b, c, h, w = self.shape
        target = torch.randint(0, c, (b, 1, h // 16 + 1, w // 16 + 1), generator=gen)
        target = F.interpolate(target.float(), scale_factor=16, mode="nearest")[:, 0, :h, :w]
        target = target.long()
        edge = torch.zeros_like(target, dtype=torch.bool)
        edge[:, 1:, :] |= target[:, 1:, :] != target[:, :-1, :]
        edge[:, :, 1:] |= target[:, :, 1:] != target[:, :, :-1]
        lean = target if not self.low else F.interpolate(
            target[:, None].float(), size=self.low, mode="nearest")[:, 0].long()
        logits = 3 * torch.randn(self.logits_shape, generator=gen)
        logits += 2 * F.one_hot(lean, c).permute(0, 3, 1, 2)
        target[edge] = IGNORE
        return (logits.to(device=device, dtype=self.dtype).requires_grad_(True),
                target.to(device))


def workloads():
    """VOC-, Cityscapes- and ADE20K-like shapes and a small one a 2-core CPU times in seconds."""
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        out.append(Workload("small", 2, 21, 129, 129, 5, dtype, slow=False))
        for k in (3, 5, 7):
            out.append(Workload("voc", 8, 21, 513, 513, k, dtype, slow=True))
        out.append(Workload("cityscapes", 4, 19, 512, 1024, 5, dtype, slow=True))
        out.append(Workload("ade", 8, 150, 512, 512, 5, dtype, slow=True))
        # logits at a head's resolution: DeepLab's 1/8 (align_corners=True), SegFormer's 1/4
        out.append(Workload("small-up", 2, 21, 129, 129, 5, dtype, slow=False, low=(33, 33)))
        out.append(Workload("deeplab-up", 8, 21, 513, 513, 5, dtype, slow=True, low=(65, 65),
                            align_corners=True))
        out.append(Workload("segformer-up", 8, 19, 512, 1024, 5, dtype, slow=True,
                            low=(128, 256)))
    return out


# --- traffic and arithmetic per pixel (roofline) --------------------------------------------

def min_bytes_per_pixel(w, pass_):
    """The floor: logits read once, labels read once and, with the backward, the gradient
    written once (int64 labels here: 8 B)."""
    e = torch.finfo(w.dtype).bits // 8
    logits = w.classes * e * w.low_share  # at the logits' resolution
    return logits * (2 if pass_ == "forward+backward" else 1) + 8


def flops_per_pixel(w, pass_):
    """Arithmetic of the definition: pooling K^2 * C multiply-adds (and as many for its
    adjoint), z-score, softmax and Jacobian ~8C each way."""
    k2c = w.kernel_size ** 2 * w.classes
    forward = 2 * k2c + 8 * w.classes
    return forward if pass_ == "forward" else 2 * forward


def design_bytes_per_pixel(w, pass_):
    """DRAM bytes of the fused kernels per pixel, as the kernels count them (zscore=True, stride
    1, reduction="mean"): the forward reads the logits and the labels and writes P (the logits'
    size and dtype), the backward reads P, the logits and the labels and writes the gradient.
    Where the window-row kernels do not apply (C > 32, K > 7) a statistics pass reads the logits
    once more and writes 8 B that the forward reads. The per-tile partials and scales are a few
    bytes per 100 pixels."""
    e = torch.finfo(w.dtype).bits // 8
    y = 8  # int64 labels
    forward = 2 * w.classes * e + y
    if w.classes > 32 or w.kernel_size > 7:  # the statistics: logits read, 8 B written and read
        forward += w.classes * e + 16
    backward = 3 * w.classes * e + y
    if w.low:  # the logits and their gradient at the head's size; P at the label's
        forward = w.classes * e * (1 + w.low_share) + y
        backward = w.classes * e * (1 + 2 * w.low_share) + y
    return forward if pass_ == "forward" else forward + backward


# --- implementations --------------------------------------------------------------------------

def _unfold_costs(x, target, kernel_size, eps=1e-5, weight_base=2.0):
    """(cost per centre, valid) of lad_unfold's F.unfold formulation, in x's dtype."""
    b, c, h, w = x.shape
    k, r = kernel_size, kernel_size // 2
    var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
    z = (x - mean) / torch.sqrt(var + eps)
    z_win = F.unfold(z, k, padding=r).view(b, c, k * k, h * w)
    y_win = F.unfold(target.unsqueeze(1).to(x.dtype), k, padding=r).view(b, k * k, h * w)
    inside = F.unfold(torch.ones(1, 1, h, w, device=x.device, dtype=x.dtype), k,
                      padding=r).bool()
    y = target.view(b, 1, h * w)
    same = (y_win == y) & inside.view(1, k * k, h * w)
    du, dv = torch.meshgrid(torch.arange(-r, r + 1), torch.arange(-r, r + 1), indexing="ij")
    omega = weight_base ** (1.0 - torch.maximum(du.abs(), dv.abs()).reshape(-1).to(x.dtype))
    weights = same * omega.to(x.device).view(1, k * k, 1)
    f = (z_win * weights.unsqueeze(1)).sum(2) / same.sum(1, keepdim=True)
    valid = y.squeeze(1) != IGNORE
    cost = torch.logsumexp(f, 1) - f.gather(1, y.clamp(0, c - 1)).squeeze(1)
    return torch.where(valid, cost.clamp_min(0), 0), valid


def lad_unfold(logits, target, kernel_size, power=3.0, eps=1e-5, weight_base=2.0):
    """The locally adaptive loss as published neighbourhood losses write it: F.unfold to a
    (B, C, K*K, H*W) tensor, masked weighted sum, cross-entropy, Minkowski mean. Same numbers as
    lad_triton (stride 1, count normaliser); memory K^2 x the logits."""
    x = logits.to(torch.float64 if logits.dtype == torch.float64 else torch.float32)
    cost, valid = _unfold_costs(x, target, kernel_size, eps, weight_base)
    mean_k = cost.pow(power).sum() / valid.sum().clamp_min(1)
    return mean_k.pow(1.0 / power).to(logits.dtype)


def lad_unfold_float64(logits, target, kernel_size, power=3.0, with_grad=True):
    """(loss, gradient or None) of lad_unfold in float64 on the logits' values, one image at a
    time, so that the benchmarked sizes fit (8 x 150 x 512^2 at K = 5 unfolds to 63 GB in
    float64 at once, 8 GB an image): the costs first, then per image the gradient of its costs
    with the Minkowski mean's weights a L_p^(k-1), a = (S/M)^(1/k - 1) / M (docs/contract.md,
    "The gradient, written out"), the same chain rule autograd takes through lad_unfold."""
    costs = []
    with torch.no_grad():
        for i in range(logits.shape[0]):
            costs.append(_unfold_costs(logits[i:i + 1].double(), target[i:i + 1], kernel_size))
    total = sum(c.pow(power).sum() for c, _ in costs)
    count = sum(v.sum() for _, v in costs).clamp_min(1)
    if total == 0:
        return torch.zeros((), dtype=torch.float64, device=logits.device), (
            torch.zeros_like(logits, dtype=torch.float64) if with_grad else None)
    loss = (total / count) ** (1.0 / power)
    if not with_grad:
        return loss, None
    a = (total / count) ** (1.0 / power - 1.0) / count
    grad = torch.empty_like(logits, dtype=torch.float64)
    for i, (cost, _) in enumerate(costs):
        x = logits[i:i + 1].detach().double().requires_grad_(True)
        again, _ = _unfold_costs(x, target[i:i + 1], kernel_size)
        (grad[i:i + 1],) = torch.autograd.grad(again, x, a * cost.pow(power - 1))
    return loss, grad


def loss_function(impl, w):
    """(logits, target) -> loss for one implementation and workload."""
    k = w.kernel_size
    if impl == "cross_entropy" and w.low:
        return lambda x, t: F.cross_entropy(
            F.interpolate(x, size=t.shape[-2:], mode="bilinear", align_corners=w.align_corners),
            t, ignore_index=IGNORE)
    if impl == "cross_entropy":
        return lambda x, t: F.cross_entropy(x, t, ignore_index=IGNORE)
    if impl == "torch_unfold":
        return lambda x, t: lad_unfold(x, t, k)
    if impl == "interp_triton":
        return lambda x, t: locally_adaptive_loss(
            F.interpolate(x, size=t.shape[-2:], mode="bilinear", align_corners=w.align_corners),
            t, kernel_size=k, backend="triton", check_target=False)
    backend = "triton" if impl == "triton" else "torch"
    interpolation = dict(upsample="bilinear", align_corners=w.align_corners) if w.low else {}
    # check_target=False: the benchmark times the loss, not the one-off label check (a sync).
    fn = lambda x, t: locally_adaptive_loss(x, t, kernel_size=k, backend=backend,  # noqa: E731
                                            check_target=False, **interpolation)
    return torch.compile(fn) if impl == "torch_compile" else fn


def unavailable(impl, w, device):
    """Why this implementation is not timed on this workload and device, or None."""
    if impl in ("triton", "interp_triton") and device.type != "cuda":
        return "the fused kernels only run compiled on CUDA (interpreter timings mean nothing)"
    if impl == "interp_triton" and not w.low:
        return "F.interpolate first only where the logits are at a head's resolution"
    if impl == "torch_unfold" and w.low:
        return "the F.unfold formulation takes logits at the label's size"
    if impl == "torch_unfold":
        need = 4 * w.batch * w.classes * w.kernel_size ** 2 * w.height * w.width * 4
        have = (torch.cuda.get_device_properties(device).total_memory if device.type == "cuda"
                else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        if need > 0.4 * have:
            return f"F.unfold needs ~{need / 2**30:.0f} GiB here, {have / 2**30:.0f} GiB present"
    return None


def pass_runner(fn, logits, target, pass_):
    """A zero-argument callable running one pass."""
    if pass_ == "forward":
        return lambda: fn(logits, target)
    return lambda: torch.autograd.grad(fn(logits, target), logits)


# --- memory ------------------------------------------------------------------------------------

def peak_memory_mib(run, device):
    """Peak memory one call allocates beyond its inputs (the result included).

    CUDA: torch.cuda.max_memory_allocated() after a reset, minus what was allocated before.
    CPU: the running sum of the allocations and frees that torch.profiler records with
    profile_memory=True during the call (tensors only; the CPU allocator has no peak counter).
    Triton's interpreter holds its last launch's tensors until its next launch: one small
    launch first, so that the call's first launch frees nothing allocated before it (which would
    lower its peak).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out
        return peak / 2**20
    from torch.profiler import ProfilerActivity, profile

    if os.environ.get("TRITON_INTERPRET") == "1":
        from lad_triton.kernels.labels import count_bad_labels

        count_bad_labels(torch.zeros(1, dtype=torch.uint8), 2, 255)
        gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = run()
        del out
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak / 2**20


def copy_bandwidth_gbps(device, mib=1024, rounds=10):
    """Device-to-device copy (CPU: memory-to-memory) of a large buffer, bytes read + written
    over time, median of ``rounds``: the ceiling the efficiencies are measured against."""
    import time

    src = torch.empty(mib * 2**20, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    times = []
    for _ in range(rounds + 2):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            times.append(time.perf_counter() - t0)
    times = sorted(times[2:])
    return 2 * src.numel() / times[len(times) // 2] / 1e9

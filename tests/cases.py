"""Random inputs and the tolerance table shared by the tests."""

import torch

# SPEC "Output dtype and accuracy": (loss, gradient) relative error against float64.
TOLERANCE = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 5e-3),
    torch.bfloat16: (1e-2, 2e-2),
}
TARGET_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
LAYOUTS = ("contiguous", "channels_last", "sliced")


def make_logits(shape, *, dtype=torch.float32, layout="contiguous", scale=3.0, seed=0,
                device="cpu"):
    """Random logits of the given scale, in the given memory layout (values independent of it).
    'sliced' is a strided view into a larger tensor: every class and spatial stride differs
    from the dense one."""
    gen = torch.Generator().manual_seed(seed)
    batch, classes, height, width = shape
    if layout == "sliced":
        big = torch.randn(batch, 2 * classes + 1, height + 2, width + 3, generator=gen) * scale
        x = big[:, 1::2, 1:height + 1, 2:width + 2]
    else:
        x = torch.randn(shape, generator=gen) * scale
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def make_target(batch, height, width, classes, *, dtype=torch.int64, ignore_index=255,
                ignore_frac=0.2, n_labels=None, sliced=False, seed=0, device="cpu"):
    """Random labels drawn from n_labels of the classes (fewer labels: more same-class
    neighbours), with about ignore_frac of them set to ignore_index when the dtype can hold it."""
    gen = torch.Generator().manual_seed(seed + 1)
    n_labels = classes if n_labels is None else min(n_labels, classes)
    chosen = torch.randperm(classes, generator=gen)[:n_labels]
    if sliced:
        big = chosen[torch.randint(0, n_labels, (batch, height + 1, 2 * width), generator=gen)]
        y = big[:, 1:, ::2]
    else:
        y = chosen[torch.randint(0, n_labels, (batch, height, width), generator=gen)]
    info = torch.iinfo(dtype)
    if ignore_frac > 0 and info.min <= ignore_index <= info.max:
        drop = torch.rand(y.shape, generator=gen) < ignore_frac
        y = torch.where(drop, ignore_index, y)
    return y.to(device=device, dtype=dtype)


def rel_err(actual, expected):
    """||actual - expected|| / ||expected|| in float64 (absolute when expected is 0)."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    diff = torch.linalg.vector_norm(actual - expected).item()
    norm = torch.linalg.vector_norm(expected).item()
    return diff / norm if norm > 0 else diff


def grad_out_for(loss, seed=0):
    """A random upstream gradient of the loss's shape (never all ones)."""
    gen = torch.Generator().manual_seed(seed + 2)
    return (0.5 + torch.rand(loss.shape, generator=gen, dtype=torch.float64)).to(loss.dtype)

"""Random inputs, the tolerance table and the oracle comparison shared by the tests."""

import importlib
import os
from pathlib import Path

import pytest
import torch
from hypothesis import strategies as st

# The fused kernels run compiled on a GPU when there is one, else under Triton's interpreter.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "triton")

# docs/contract.md, "Output dtype and accuracy": (loss, gradient) relative error against float64.
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
    """Random logits of the given scale, (B, C, H, W) or (B, C, D, H, W), in the given memory
    layout (values independent of it). 'sliced' is a strided view into a larger tensor: every
    class and spatial stride differs from the dense one."""
    gen = torch.Generator().manual_seed(seed)
    batch, classes, *spatial = shape
    if layout == "sliced":
        big = torch.randn(batch, 2 * classes + 1, *(n + 2 for n in spatial), generator=gen)
        x = big[(slice(None), slice(1, None, 2)) + tuple(slice(1, n + 1) for n in spatial)] * scale
    else:
        x = torch.randn(shape, generator=gen) * scale
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last if len(shape) == 4
                         else torch.channels_last_3d)
    return x


def make_labels(batch, spatial, classes, *, dtype=torch.int64, ignore_index=255, ignore_frac=0.2,
                n_labels=None, sliced=False, seed=0, device="cpu"):
    """Random labels of shape (batch, *spatial) drawn from n_labels of the classes (fewer labels:
    more same-class neighbours), with about ignore_frac of them set to ignore_index when the dtype
    can hold it."""
    gen = torch.Generator().manual_seed(seed + 1)
    n_labels = classes if n_labels is None else min(n_labels, classes)
    chosen = torch.randperm(classes, generator=gen)[:n_labels]
    if sliced:
        *lead, width = spatial
        big = chosen[torch.randint(0, n_labels, (batch, *(n + 1 for n in lead), 2 * width),
                                   generator=gen)]
        y = big[(slice(None),) + tuple(slice(1, None) for _ in lead) + (slice(None, None, 2),)]
    else:
        y = chosen[torch.randint(0, n_labels, (batch, *spatial), generator=gen)]
    info = torch.iinfo(dtype)
    if ignore_frac > 0 and info.min <= ignore_index <= info.max:
        drop = torch.rand(y.shape, generator=gen) < ignore_frac
        y = torch.where(drop, ignore_index, y)
    return y.to(device=device, dtype=dtype)


def make_target(batch, height, width, classes, **kwargs):
    """make_labels for (B, H, W) images."""
    return make_labels(batch, (height, width), classes, **kwargs)


def make_pixel_weight(batch, spatial, *, zero_frac=0.2, sliced=False, seed=0, device="cpu"):
    """Random non-negative per-pixel weights of shape (batch, *spatial) in [0, 3), about zero_frac
    of them exactly 0; 'sliced' makes it a strided view into a larger tensor."""
    gen = torch.Generator().manual_seed(seed + 3)
    big = torch.rand((batch,) + tuple(2 * n for n in spatial), generator=gen,
                     dtype=torch.float64) * 3
    big = torch.where(torch.rand(big.shape, generator=gen) < zero_frac, 0.0, big)
    w = big[(slice(None),) + (slice(None, None, 2),) * len(spatial)]
    return (w if sliced else w.contiguous()).to(device=device, dtype=torch.float32)


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


def check_against_oracle(shape, options, *, backend="torch", dtype=torch.float64,
                         layout="contiguous", target_dtype=torch.int64, ignore_frac=0.2,
                         n_labels=None, seed=0, apply=None, pixel_weight=False):
    """Loss and gradient of one backend against the float64 oracle, on fresh random inputs.
    ``pixel_weight=True`` adds a random per-pixel weight map (a strided view with
    ``layout="sliced"``).

    float64 is held to the contract's 1e-10 plus float64's rounding of terms that cancel (see oracle.py);
    other dtypes to the contract's table. ``apply(logits, target)`` replaces the public function (tests
    of internal paths)."""
    from lad_triton import locally_adaptive_loss
    from oracle import lad_reference, within

    batch, classes, *spatial = shape
    device = DEVICE if backend == "triton" else "cpu"
    logits = make_logits(shape, dtype=dtype, layout=layout, seed=seed, device=device)
    target = make_labels(batch, spatial, classes, dtype=target_dtype,
                         ignore_index=options.get("ignore_index", 255), ignore_frac=ignore_frac,
                         n_labels=n_labels, sliced=layout == "sliced", seed=seed, device=device)
    if isinstance(options.get("weight"), torch.Tensor):
        options = dict(options, weight=options["weight"].to(device))
    if pixel_weight:
        options = dict(options, pixel_weight=make_pixel_weight(
            batch, spatial, sliced=layout == "sliced", seed=seed, device=device))
    logits.requires_grad_(True)
    if apply is None:
        loss = locally_adaptive_loss(logits, target, backend=backend, **options)
    else:
        loss = apply(logits, target)
    grad_out = grad_out_for(loss, seed).to(device)
    (grad,) = torch.autograd.grad(loss, logits, grad_out)
    ref = lad_reference(logits.cpu(), target.cpu(), grad_out.cpu().double(),
                        **{k: v.cpu() if isinstance(v, torch.Tensor) else v
                           for k, v in options.items()})

    assert loss.dtype == dtype and loss.shape == ref.loss.shape
    assert grad.dtype == dtype and grad.shape == logits.shape
    if dtype == torch.float64:
        # Relative error, plus float64's rounding of terms that cancel (see oracle.py): a
        # saturated cost or C = 2 under the z-score leaves a result far smaller than its terms,
        # which no float64 evaluation resolves to 1e-10 of itself. A wrong formula misses by
        # O(||grad||).
        assert within(loss, ref.loss, ref.loss_floor, 1e-10), (loss, ref.loss)
        assert within(grad, ref.grad, ref.grad_floor, 1e-10)
    else:
        loss_tol, grad_tol = TOLERANCE[dtype]
        assert rel_err(loss, ref.loss) <= loss_tol, (loss, ref.loss)
        assert rel_err(grad, ref.grad) <= grad_tol
    return loss.detach(), grad


@st.composite
def lad_problems(draw, max_side=11, max_classes=8, kernel_sizes=(1, 3, 5, 7, 9), min_classes=2,
                 strides=(1, 2, 3)):
    """(shape, options, data) of one random problem: every parameter of the contract, layouts, target
    dtypes and ignore patterns. min_classes, kernel_sizes and strides narrow it to one kernel path
    (tests/test_fused.py)."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(min_classes, max_classes)),
             draw(st.integers(1, max_side)), draw(st.integers(1, max_side)))
    options = dict(
        kernel_size=draw(st.sampled_from(kernel_sizes)),
        power=draw(st.sampled_from([1.0, 1.5, 2.0, 2.3, 3.0, 4.25])),
        stride=draw(st.sampled_from(strides)),
        ignore_index=draw(st.sampled_from([255, -100, 1])),
        eps=draw(st.sampled_from([1e-5, 1e-2])),
        weight_base=draw(st.sampled_from([2.0, 1.3, 0.5])),
        normalizer=draw(st.sampled_from(["count", "weight"])),
        zscore=draw(st.booleans()),
        reduction=draw(st.sampled_from(["mean", "none"])),
    )
    data = dict(
        layout=draw(st.sampled_from(LAYOUTS)),
        target_dtype=draw(st.sampled_from(TARGET_DTYPES)),
        ignore_frac=draw(st.sampled_from([0.0, 0.25, 0.9])),
        n_labels=draw(st.integers(1, shape[1])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )
    return shape, options, data


def readme_example(name):
    """The code of the fenced block that follows ``<!-- example:name -->`` in README.md or
    docs/integrations.md (as .ci/run finds it), so that the tests run the snippets as a reader
    copies them."""
    root = Path(__file__).resolve().parents[1]
    lines = [line for doc in ("README.md", "docs/integrations.md")
             for line in (root / doc).read_text().splitlines()]
    start = lines.index(f"<!-- example:{name} -->") + 1
    assert lines[start].startswith("```"), f"no code block after <!-- example:{name} -->"
    end = lines.index("```", start + 1)
    return "\n".join(lines[start + 1:end])


def framework(name, install):
    """Import a training framework for its adapter's tests. Where it is not installed the tests
    skip, saying what installs it, except when LAD_TRITON_REQUIRE_FRAMEWORKS=1 (.ci/run sets it):
    there a framework test that cannot run fails, since CI must run every one."""
    try:
        return importlib.import_module(name)
    except Exception as err:  # not installed, or broken (mmseg refuses a too new mmcv)
        reason = f"{name} is not importable ({err}); {install} installs it"
        if os.environ.get("LAD_TRITON_REQUIRE_FRAMEWORKS") == "1":
            pytest.fail(f"{reason} (LAD_TRITON_REQUIRE_FRAMEWORKS=1: CI runs every framework "
                        "test)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)

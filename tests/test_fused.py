"""The fused Triton backend (``backend="triton"``) against the float64 oracle, every parameter
of the contract, and the kernels' own guarantees (class chunking, int64 offsets, saved tensors,
specialisation). Runs under Triton's interpreter on CPU, compiled when CUDA is present."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import lad_triton
from cases import (DEVICE, LAYOUTS, TARGET_DTYPES, check_against_oracle, lad_problems,
                   make_logits, make_target)
from lad_triton import fused, locally_adaptive_loss
import lad_triton.kernels.config as kernel_config

ROOT = Path(__file__).resolve().parents[1]
# Subprocesses import the lad_triton this test process imported (installed, or a source tree).
PACKAGE_PARENT = str(Path(lad_triton.__file__).resolve().parents[1])


def subprocess_env(**extra):
    path = os.pathsep.join(p for p in (PACKAGE_PARENT, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


# 11 and 13 take the path 9 and 15 take (the window wider than the 7-row image).
@pytest.mark.parametrize("kernel_size", [1, 3, 5, 7, 9, 15])
def test_window_sizes_up_to_15(kernel_size):
    check_against_oracle((1, 3, 7, 11), dict(kernel_size=kernel_size), backend="triton",
                         n_labels=2, seed=kernel_size)


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_stride_and_reduction(stride, reduction):
    check_against_oracle((2, 4, 8, 7), dict(stride=stride, reduction=reduction, kernel_size=3,
                                            power=2.3), backend="triton", n_labels=2,
                         seed=stride)


@pytest.mark.parametrize("normalizer", ["count", "weight"])
@pytest.mark.parametrize("zscore", [True, False])
def test_normalizer_and_zscore(normalizer, zscore):
    check_against_oracle((2, 5, 6, 7), dict(normalizer=normalizer, zscore=zscore,
                                            weight_base=1.3, eps=1e-3), backend="triton",
                         n_labels=3)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("target_dtype", TARGET_DTYPES)
def test_layouts_and_target_dtypes(layout, target_dtype):
    check_against_oracle((2, 5, 5, 6), dict(kernel_size=3), backend="triton", layout=layout,
                         target_dtype=target_dtype, n_labels=2)


@pytest.mark.parametrize("classes", [2, 19, 21, 150, 1024])
def test_class_counts(classes):
    # 150 and 1024 take several forward class chunks; 1024 also the backward's two-pass Jacobian.
    check_against_oracle((1, classes, 4, 5), dict(kernel_size=3), backend="triton",
                         n_labels=3, seed=classes)


@pytest.mark.parametrize("options,block_c", [
    (dict(kernel_size=5), 4),
    (dict(kernel_size=3, stride=2, normalizer="weight", reduction="none"), 2),
    (dict(kernel_size=3, zscore=False, power=1.5), 2),
    (dict(kernel_size=3, zscore=False, power=1.5), 4),
])
def test_class_chunk_paths(block_c, options, monkeypatch):
    # Force several class chunks at C=7: the statistics pass, the forward's two passes over the
    # chunks (logsumexp, then P), the backward's two (the Jacobian's means, then the gradient),
    # the second of each from what the first parked.
    monkeypatch.setattr(kernel_config, "CLASS_TILE", block_c)
    monkeypatch.setattr(kernel_config, "CHUNK_TILE", block_c)
    monkeypatch.setattr(kernel_config, "INTERPRETER_CHUNK_SCALE", 1)
    check_against_oracle((1, 7, 6, 7), options, backend="triton", n_labels=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_class_chunks_in_every_dtype(dtype, monkeypatch):
    # float32 (as float64 above) parks the pooled sums in P and G in the gradient between the
    # passes over the chunks; 16-bit P and gradients would round them, so those pool again.
    monkeypatch.setattr(kernel_config, "CLASS_TILE", 4)
    monkeypatch.setattr(kernel_config, "CHUNK_TILE", 4)
    monkeypatch.setattr(kernel_config, "INTERPRETER_CHUNK_SCALE", 1)
    check_against_oracle((2, 11, 6, 7), dict(kernel_size=5), backend="triton", dtype=dtype,
                         n_labels=4)


@pytest.mark.parametrize("rows", [(1, 1), (2, 2), (3, 1)])
def test_class_chunks_with_rows(rows, monkeypatch):
    # Class chunks with the row counts a GPU plans for them (two each way on sm_90, one on
    # sm_80) and one it does not; the interpreter's plan gives them four.
    from lad_triton.kernels import backward as kb
    from lad_triton.kernels import forward as kf

    monkeypatch.setattr(kernel_config, "CLASS_TILE", 4)
    monkeypatch.setattr(kernel_config, "CHUNK_TILE", 4)
    monkeypatch.setattr(kernel_config, "INTERPRETER_CHUNK_SCALE", 1)
    planned = kernel_config.launch_config

    def with_rows(*args, **kwargs):
        cfg = planned(*args, **kwargs)
        assert cfg.chunks > 1
        cfg.forward_rows, cfg.backward_rows = rows
        return cfg

    monkeypatch.setattr(kf, "launch_config", with_rows)
    monkeypatch.setattr(kb, "launch_config", with_rows)
    check_against_oracle((1, 7, 7, 9), dict(kernel_size=5), backend="triton", n_labels=3,
                         seed=10 + sum(rows))


@pytest.mark.parametrize("options", [dict(kernel_size=9),
                                     dict(kernel_size=5, zscore=False, reduction="none"),
                                     dict(kernel_size=3, normalizer="weight", stride=2)])
def test_generic_window_path(options, monkeypatch):
    # The forward's generic window path (run-time loops, one row), which takes every K > 7 and
    # the C and K whose unrolled columns do not fit a lane's registers (config.ROW_PLANS).
    from lad_triton.kernels import backward as kb
    from lad_triton.kernels import forward as kf

    planned = kernel_config.launch_config

    def generic(*args, **kwargs):
        cfg = planned(*args, **kwargs)
        cfg.forward_rows, cfg.unrolled = 1, False
        return cfg

    monkeypatch.setattr(kernel_config, "HALO", False)
    monkeypatch.setattr(kf, "launch_config", generic)
    monkeypatch.setattr(kb, "launch_config", generic)
    check_against_oracle((1, 5, 9, 12), options, backend="triton", n_labels=2)


def test_window_row_plans():
    # Stride 1, a lane's classes in one tile and K <= 7 take the window-row kernels, with rows a
    # power of 2 (a block dimension) and a register cap only on sm_90; everything else not.
    plan = kernel_config.launch_config
    for c in (2, 19, 21, 32):
        for k in (1, 3, 5, 7):
            cfg = plan(c, kernel_size=k)
            assert cfg.halo and cfg.forward_rows in (1, 2, 4) and cfg.backward_rows in (1, 2, 4)
            assert cfg.forward_registers <= 168 and cfg.backward_registers <= 168
            assert plan(c, kernel_size=k, arch=80).forward_registers == 255
    assert not any(cfg.halo for cfg in (plan(33), plan(150), plan(21, stride=2),
                                        plan(21, kernel_size=9)))


def test_row_plans(monkeypatch):
    # The kernels of forward.py and backward.py: K > 7 and the plans' zero rows take the generic
    # path; strides > 1 and float64 one row; sm_80 fewer rows than sm_90; every C and K some rows.
    monkeypatch.setattr(kernel_config, "HALO", False)
    plan = kernel_config.launch_config
    for new in (True, False):
        for c in range(2, 200):
            for k in (1, 3, 5, 7, 9, 31):
                forward, backward = kernel_config.plan_rows(c, k, new)
                assert 0 <= forward <= 4 and 1 <= backward <= 4
                caps = kernel_config.plan_registers(c, k, new)
                assert all(128 <= cap <= 255 for cap in caps)
                if k > 7:
                    assert forward == 0
                elif c <= 21:  # VOC, Cityscapes and the like: the unrolled columns
                    assert forward > 0
    assert not plan(21, kernel_size=9).unrolled and plan(21, kernel_size=9).forward_rows == 1
    assert plan(21, kernel_size=5).unrolled
    assert plan(32, kernel_size=7).forward_rows == 1 and not plan(32, kernel_size=7).unrolled
    # The lower register caps were measured for the plans' rows on sm_90 only.
    assert plan(21, kernel_size=3).forward_registers < 255
    chunked = plan(150, kernel_size=5)
    assert chunked.forward_registers < chunked.backward_registers == 255
    assert plan(21, kernel_size=3, arch=100).forward_registers == 255
    for c in (21, 150):
        assert (plan(c, stride=2).forward_rows, plan(c, stride=2).backward_rows) == (1, 1)
        assert plan(c, acc_dtype=torch.float64).forward_rows == 1
        for cfg in (plan(c, stride=2), plan(c, acc_dtype=torch.float64), plan(c, arch=80)):
            assert cfg.forward_registers == cfg.backward_registers == 255
        for k in (3, 5, 7):
            gpu, older = plan(c, kernel_size=k), plan(c, kernel_size=k, arch=80)
            assert older.forward_rows == max(1, gpu.forward_rows // 2)
            assert older.backward_rows == max(1, gpu.backward_rows // 2)
            assert older.unrolled == gpu.unrolled


@pytest.mark.parametrize("rows", [(1, 2), (2, 3), (3, 1), (4, 4)])
@pytest.mark.parametrize("options", [dict(kernel_size=3),
                                     dict(kernel_size=5, reduction="none", zscore=False)])
def test_every_row_count(rows, options, monkeypatch):
    # A lane's rows (forward and backward apart: the backward reads the forward's tiles) as the
    # launch heuristic may pick them on some GPU and Triton, whatever it picks here; 9 rows are
    # no multiple of any of them. The kernels of forward.py and backward.py.
    from lad_triton.kernels import backward as kb
    from lad_triton.kernels import forward as kf

    monkeypatch.setattr(kernel_config, "HALO", False)
    planned = kernel_config.launch_config

    def with_rows(*args, **kwargs):
        cfg = planned(*args, **kwargs)
        cfg.forward_rows, cfg.backward_rows = rows
        return cfg

    monkeypatch.setattr(kf, "launch_config", with_rows)
    monkeypatch.setattr(kb, "launch_config", with_rows)
    check_against_oracle((2, 4, 9, 11), options, backend="triton", n_labels=2, seed=sum(rows))


@pytest.mark.parametrize("rows", [(1, 2), (2, 4), (4, 1), (2, 2)])
@pytest.mark.parametrize("options", [dict(kernel_size=5),
                                     dict(kernel_size=3, reduction="none", zscore=False),
                                     dict(kernel_size=7, normalizer="weight")])
def test_window_row_kernels_every_row_count(rows, options, monkeypatch):
    # The window-row kernels with the rows a GPU's plan may give them (the interpreter's plan is
    # 4 each way), forward and backward apart: the backward reads the forward's tiles. 70
    # columns: tiles of 32 - (K - 1) centres, the last one partial.
    from lad_triton.kernels import backward as kb
    from lad_triton.kernels import forward as kf

    planned = kernel_config.launch_config

    def with_rows(*args, **kwargs):
        cfg = planned(*args, **kwargs)
        assert cfg.halo
        cfg.forward_rows, cfg.backward_rows = rows
        return cfg

    monkeypatch.setattr(kf, "launch_config", with_rows)
    monkeypatch.setattr(kb, "launch_config", with_rows)
    check_against_oracle((2, 6, 7, 70), options, backend="triton", n_labels=3, seed=sum(rows))


@pytest.mark.parametrize("shape", [(1, 2, 1, 1), (1, 3, 1, 6), (2, 2, 5, 1), (1, 4, 2, 3)])
def test_images_smaller_than_window(shape):
    check_against_oracle(shape, dict(kernel_size=7), backend="triton", ignore_frac=0.0)


# The fused kernels' paths, each its own property so that every run reaches every one (a
# single property over all of them left it to the draw: its 6 derandomized examples never took
# a class chunk). (strategy, what every launch's plan must show, how often the GPU's plan is
# forced). Under the interpreter launch_config plans 4 rows and class chunks 8x wider than a
# GPU's (kernels/config.py): with `gpu` the plan is the one an sm_90 gets (window-row kernels 2
# rows, the old kernels ROW_PLANS' rows, chunks of 16 or 8 classes), so the tiles and loops the
# GPU runs are checked against the oracle too. Class chunks exist only in that plan (C <= 128
# is one chunk under the interpreter's).
KERNEL_PATHS = {
    "window_rows": (lad_problems(max_side=9, max_classes=8, kernel_sizes=(1, 3, 5, 7),
                                 strides=(1,)), lambda cfg: cfg.halo, st.booleans()),
    "old_kernels": (lad_problems(max_side=9, max_classes=8, kernel_sizes=(1, 3, 5, 7),
                                 strides=(2, 3)),
                    lambda cfg: not cfg.halo and cfg.unrolled, st.booleans()),
    # C = 9 to 16 in chunks of 8 (4 at K = 7: CHUNK_TILE // 2), see small_class_tiles: the
    # same kernels and loops as C = 150 in chunks of 16, at a tenth of the interpreter's time
    # (C = 40 at K = 7 took 33 s an example, so K = 7 is a pin); the pins take C = 33 and 40
    # with the GPU's tiles.
    "class_chunks": (lad_problems(max_side=5, min_classes=9, max_classes=16,
                                  kernel_sizes=(1, 3, 5)),
                     lambda cfg: not cfg.halo and cfg.chunks > 1, st.booleans()),
    # K = 11 and 13 take K = 9's path (run-time window loops), at twice its time.
    "generic_window": (lad_problems(max_side=7, max_classes=6, kernel_sizes=(9,)),
                       lambda cfg: not cfg.halo and not cfg.unrolled, st.booleans()),
}
DEFAULTS = dict(layout="contiguous", target_dtype=torch.int64, ignore_frac=0.25, n_labels=3,
                seed=5)


@contextlib.contextmanager
def recorded_plans(gpu):
    """Every launch plan of the forward and backward in the block, as they ran; with ``gpu``
    the plan an sm_90 gets instead of the interpreter's."""
    from lad_triton.kernels import backward as kb
    from lad_triton.kernels import forward as kf

    planned, plans = kernel_config.launch_config, []

    def plan(*args, **kwargs):
        if gpu:
            kwargs["interpreted"] = False
        plans.append(planned(*args, **kwargs))
        return plans[-1]

    with mock.patch.object(kf, "launch_config", plan), mock.patch.object(kb, "launch_config", plan):
        yield plans


@contextlib.contextmanager
def small_class_tiles(classes):
    """Class chunks of 8 classes (C > 8) in both plans, where C <= 40 would otherwise need the
    GPU's plan for any (the interpreter's chunks are 128 wide); the C = 33 and 40 pins keep the
    real tiles."""
    if classes > 32:
        yield
        return
    with mock.patch.multiple(kernel_config, CLASS_TILE=8, CHUNK_TILE=8,
                             INTERPRETER_CHUNK_SCALE=1):
        yield


def check_path(path, problem, gpu):
    shape, options, data = problem
    tiles = small_class_tiles(shape[1]) if path == "class_chunks" else contextlib.nullcontext()
    with tiles, recorded_plans(gpu) as plans:
        check_against_oracle(shape, options, backend="triton", **data)
    reached = KERNEL_PATHS[path][1]
    assert plans and all(reached(cfg) for cfg in plans), (path, plans)


def kernel_path_property(path, *pins):
    """A property over one kernel path with its pinned cases (@example: they run every time,
    before the random ones). Each example runs the interpreted kernels (~2-6 s): 3 drawn per
    path under the "ci" profile, 50 under HYPOTHESIS_PROFILE=explore."""
    strategy, _, gpu = KERNEL_PATHS[path]

    @settings(max_examples=max(3, settings().max_examples // 60))
    @given(problem=strategy, gpu=gpu)
    def test(problem, gpu):
        check_path(path, problem, gpu)

    for pin in pins:
        test = example(*pin)(test)
    test.__name__ = f"test_random_problems_{path}"
    return test


# The defaults (K = 5, power 3, zscore=True, ...) in both plans; image borders: 31 columns are a
# full tile of 26 (K = 7) centres and a partial one, 3 rows no multiple of 2 or 4; windows with
# every neighbour ignored, and every centre ignored (the loss exactly 0).
test_random_problems_window_rows = kernel_path_property(
    "window_rows",
    (((2, 5, 9, 9), {}, DEFAULTS), False), (((2, 5, 9, 9), {}, DEFAULTS), True),
    (((1, 4, 3, 31), dict(kernel_size=7), DEFAULTS), True),
    (((1, 3, 5, 6), {}, dict(DEFAULTS, ignore_frac=0.9)), False),
    (((1, 3, 4, 5), {}, dict(DEFAULTS, ignore_frac=1.0)), True))
test_random_problems_old_kernels = kernel_path_property(
    "old_kernels",
    (((2, 5, 9, 9), dict(stride=2), DEFAULTS), True),
    (((1, 5, 7, 9), dict(stride=3, kernel_size=7), dict(DEFAULTS, ignore_frac=0.9)), False))
test_random_problems_class_chunks = kernel_path_property(
    "class_chunks", (((1, 40, 4, 5), {}, DEFAULTS), True),
    (((1, 33, 3, 4), dict(kernel_size=3, stride=2, zscore=False), DEFAULTS), True),
    (((1, 12, 4, 5), dict(kernel_size=7), DEFAULTS), False))
test_random_problems_generic_window = kernel_path_property(
    "generic_window", (((1, 3, 7, 8), dict(kernel_size=9), DEFAULTS), True),
    (((1, 4, 5, 6), dict(kernel_size=9, reduction="none"), DEFAULTS), False))


@pytest.mark.parametrize("shape,strides", [
    # batch stride 2^31: image base offsets need int64
    ((2, 3, 5, 6), (2**31, 30, 6, 1)),
    # class / row strides of 2^30 + 1 fit int32, their products with an index do not: the WIDE
    # (int64) path for offsets inside an image
    ((1, 3, 5, 6), (3 * (2**30 + 1), 2**30 + 1, 6, 1)),
    ((1, 2, 3, 4), (2**32, 1, 2**30 + 1, 2)),
])
def test_offsets_past_2_to_the_31(shape, strides):
    # Views into a 4 GiB float16 storage (virtual: only the touched pages are ever allocated).
    storage = torch.empty(2**31 + 4096, dtype=torch.float16, device=DEVICE)
    logits = storage.as_strided(shape, strides)
    dense = make_logits(shape, dtype=torch.float16, seed=11, device=DEVICE)
    logits.copy_(dense)
    target = make_target(shape[0], shape[2], shape[3], shape[1], n_labels=2, seed=11,
                         device=DEVICE)
    x = logits.detach().requires_grad_(True)
    loss = locally_adaptive_loss(x, target, kernel_size=3, backend="triton")
    (grad,) = torch.autograd.grad(loss, x)
    y = dense.detach().requires_grad_(True)
    ref = locally_adaptive_loss(y, target, kernel_size=3, backend="triton")
    (ref_grad,) = torch.autograd.grad(ref, y)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


# float16 takes bfloat16's path (2-byte logits and P).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [5, 40])
def test_saved_tensors_are_bounded(dtype, classes):
    # docs/performance.md "Memory": between forward and backward, besides the logits and target, one buffer of
    # the logits' size and dtype (P) and a few numbers per tile of centres; nothing K*K-sized,
    # no per-pixel statistics (the forward's are a temporary).
    batch, height, width = 2, 9, 11
    logits = make_logits((batch, classes, height, width), dtype=dtype,
                         device=DEVICE).requires_grad_(True)
    target = make_target(batch, height, width, classes, device=DEVICE)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = locally_adaptive_loss(logits, target, kernel_size=5, backend="triton")
    extra = {t.untyped_storage().data_ptr(): t for t in saved
             if t.data_ptr() not in (logits.data_ptr(), target.data_ptr())}.values()
    # P's images are padded to whole blocks of 32 centres (kernels/tiling.block_lanes).
    padded = batch * 32 * -(-height * width // 32)
    extra_bytes = sum(t.untyped_storage().nbytes() for t in extra)
    # Per forward tile its max L (4 B), and three float64 scalars; the GPU's tiles hold fewer
    # centres than the interpreter's, so the bound counts the plan's tiles.
    rows, cols = map(int, fused.plan_of(logits, 5, 1).split("x"))
    tiles = batch * -(-height // rows) * -(-width // cols)
    assert extra_bytes <= logits.element_size() * classes * padded + 4 * tiles + 24
    assert all(t.numel() <= classes * padded for t in extra)
    loss.backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("classes", [5, 40])
def test_peak_memory_of_forward_and_backward_is_twice_the_logits(dtype, classes):
    # P and the gradient, each of the logits' size and dtype, and small change: a statistics
    # buffer of 8 B per pixel lives only during the forward. The old design kept P in float32
    # for half-precision logits beyond 32 classes (3x) and autograd zero-filled a P-sized
    # gradient for P (3x): both fail here. CPU: allocation events; CUDA: max_memory_allocated.
    sys.path.insert(0, str(ROOT / "bench"))
    from workloads import peak_memory_mib

    # CUDA's allocator rounds every block up to 512 B: a few such small buffers are 5% of
    # 24x40 float32 logits at C=5 (measured on an H200), so on a GPU the image is larger.
    h, w = (24, 40) if DEVICE == "cpu" else (96, 160)
    logits = make_logits((1, classes, h, w), dtype=dtype, device=DEVICE).requires_grad_(True)
    target = make_target(1, h, w, classes, device=DEVICE)

    def run():
        loss = locally_adaptive_loss(logits, target, kernel_size=3, backend="triton")
        return torch.autograd.grad(loss, logits)

    peak = peak_memory_mib(run, torch.device(DEVICE)) * 2**20
    logits_bytes = logits.numel() * logits.element_size()
    # beyond P and the gradient: the per-tile partials (3 floats a tile), the loss, its scalars
    # and the combine's ticket (a few dozen bytes), and 1% (CUDA rounds blocks to 512 B)
    rows, cols = map(int, fused.plan_of(logits, 3, 1).split("x"))
    partials = -(-h // rows) * -(-w // cols) * 3 * 4
    assert peak <= 2.01 * logits_bytes + partials + 64, (peak / logits_bytes, partials)


def autograd_nodes(tensor):
    """Names of every node of the autograd graph that produced ``tensor``."""
    names, todo, seen = set(), [tensor.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def test_auto_uses_the_fused_kernels_only_on_cuda():
    logits = make_logits((1, 3, 4, 4), device=DEVICE).requires_grad_(True)
    target = make_target(1, 4, 4, 3, device=DEVICE)
    auto = autograd_nodes(locally_adaptive_loss(logits, target))
    fused = autograd_nodes(locally_adaptive_loss(logits, target, backend="triton"))
    unfused = autograd_nodes(locally_adaptive_loss(logits, target, backend="torch"))
    assert "UnfusedCostsBackward" in unfused and "UnfusedCostsBackward" not in fused
    assert auto == (fused if DEVICE == "cuda" else unfused)


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(**env), cwd=ROOT / "tests")


@pytest.mark.skipif(DEVICE == "cuda", reason="on a GPU the fused kernels run compiled")
def test_triton_backend_on_cpu_without_the_interpreter_says_why():
    result = run_python(
        "import torch; from lad_triton import locally_adaptive_loss as f\n"
        "x = torch.randn(1, 3, 4, 4); t = torch.zeros(1, 4, 4, dtype=torch.long)\n"
        "assert torch.isfinite(f(x, t))  # auto: PyTorch\n"
        "f(x, t, backend='triton')", TRITON_INTERPRET="0")
    assert result.returncode != 0
    assert "RuntimeError: backend='triton' cannot run here" in result.stderr
    assert "TRITON_INTERPRET=1" in result.stderr


def test_without_triton_auto_falls_back_and_triton_raises():
    result = run_python(
        "import sys; sys.modules['triton'] = None\n"
        "import torch; from lad_triton import locally_adaptive_loss as f\n"
        "x = torch.randn(1, 3, 4, 4); t = torch.zeros(1, 4, 4, dtype=torch.long)\n"
        "assert torch.isfinite(f(x, t))\n"
        "f(x, t, backend='triton')")
    assert result.returncode != 0
    assert "backend='triton' cannot run here: Triton is not importable" in result.stderr


def test_one_binary_per_stride_divisibility_never_per_shape():
    # The specialisation key of every launch (signature, constexprs, divisibility attributes,
    # as bench/kernel_report.py reproduces Triton's) must not change with B, H or W, only with
    # whether strides are multiples of 16. Needs the JIT kernels: the interpreter is off there.
    result = run_python(
        f"import sys, torch; sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        "from kernel_report import compile_source, record_launches\n"
        "def keys(b, h, w):\n"
        "    return {n: compile_source(fn, a, kw)[0].hash() for n, fn, a, kw in\n"
        "            record_launches(21, torch.float32, 5, shape=(b, h, w))}\n"
        "aligned = [keys(b, h, w) for b in (1, 3, 8)\n"
        "           for h, w in ((64, 64), (96, 128), (512, 1024))]\n"
        "odd = [keys(b, h, w) for b in (1, 3, 8) for h, w in ((65, 65), (129, 257), (513, 513))]\n"
        "print(len(aligned[0]), len({str(sorted(k.items())) for k in aligned}),\n"
        "      len({str(sorted(k.items())) for k in odd}))", TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr[-3000:]
    kernels, aligned_variants, odd_variants = map(int, result.stdout.split())
    # label check, forward (the window-row kernel: no statistics pass), combine, backward
    assert kernels == 4 and aligned_variants == 1 and odd_variants == 1


def test_kernel_report_compiles_everything_without_spills(tmp_path):
    # Compiled for sm_80 and sm_90 without a GPU (the interpreter forgives what ptxas does not).
    # --quick: C = 21 and 150 (one class tile, chunks of classes), float32 and bfloat16, K = 5;
    # every kernel option at C = 21, float64, a volume and K = 9 (the generic window path), for
    # sm_90; the full report (C = 19, 21, 24, 28, 32, 150, 1024, K = 3, 5, 7) is
    # `python -m bench.kernel_report`, its latest run in bench/results/.
    out = tmp_path / "report.json"
    result = subprocess.run([sys.executable, "-m", "bench.kernel_report", "--quick", "--json",
                             str(out)], capture_output=True, text=True, cwd=ROOT,
                            env=subprocess_env(TRITON_INTERPRET="0"))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    import json

    rows = json.loads(out.read_text())["rows"]
    assert all("error" not in r and r["spills"] == 0 for r in rows)
    seen = {(r["kernel"], r["arch"], r["config"]) for r in rows}
    common = {"_count_bad_labels_kernel", "_combine_kernel"}
    kernels = {21: common | {"_halo_forward_kernel", "_halo_backward_kernel"},
               150: common | {"_zscore_stats_kernel", "_forward_kernel", "_tile_scales_kernel",
                              "_backward_kernel"}}
    for classes in (21, 150):
        for kernel in kernels[classes]:
            for arch in ("sm_80", "sm_90"):
                for dtype in ("fp32", "bf16"):
                    assert (kernel, arch, f"C={classes} {dtype} K=5") in seen
    # the window-row kernels that interpolate low-resolution logits (upsample="bilinear")
    interpolating = {(r["kernel"], r["config"].split()[1]) for r in rows if "->" in r["config"]
                     and ("UPSAMPLE=True" in r["block"]
                          or r["kernel"] == "_halo_upsample_backward_kernel")}
    assert {("_halo_forward_kernel", "fp32"), ("_halo_upsample_backward_kernel", "fp32"),
            ("_halo_forward_kernel", "bf16"),
            ("_halo_upsample_backward_kernel", "bf16")} <= interpolating
    generic = [r for r in rows if (r["kernel"], r["arch"], r["config"])
               == ("_forward_kernel", "sm_90", "C=21 bf16 K=9")]
    assert len(generic) == 1 and "UNROLL=False" in generic[0]["block"]


@pytest.mark.parametrize("dtype", TARGET_DTYPES)
@pytest.mark.parametrize("ignore_index", [255, -100])
def test_one_pass_label_check_counts_what_the_rule_says(dtype, ignore_index):
    # The label check on CUDA reads the labels once (kernels/labels.py); count against the rule
    # evaluated on Python ints.
    from lad_triton.kernels.labels import count_bad_labels

    gen = torch.Generator().manual_seed(7)
    info = torch.iinfo(dtype)
    values = torch.randint(max(info.min, -300), min(info.max, 300) + 1, (5, 17, 13),
                           generator=gen)
    values[0, :4] = ignore_index if info.min <= ignore_index <= info.max else 0
    target = values.to(dtype).to(DEVICE)
    classes = 21
    expected = sum(1 for v in target.cpu().flatten().tolist()
                   if not (0 <= v < classes or v == ignore_index))
    assert expected > 0
    assert count_bad_labels(target, classes, ignore_index).item() == expected


@pytest.mark.skipif(torch.cuda.device_count() < 2,
                    reason="needs two CUDA devices: logits on the second while the first is current")
def test_launches_follow_the_logits_device():
    logits = make_logits((2, 5, 9, 11), device="cuda:1").requires_grad_(True)
    target = make_target(2, 9, 11, 5, device="cuda:1")
    with torch.cuda.device(0):
        loss = locally_adaptive_loss(logits, target, kernel_size=3, backend="triton")
        (grad,) = torch.autograd.grad(loss, logits)
    with torch.cuda.device(1):
        ref = locally_adaptive_loss(logits, target, kernel_size=3, backend="triton")
        (ref_grad,) = torch.autograd.grad(ref, logits)
    assert torch.equal(loss, ref) and torch.equal(grad, ref_grad)


def test_eager_mean_calls_the_operators_implementations():
    # A custom operator's Python dispatch costs tens of microseconds of host time per call; in
    # eager mode the mean skips it (torch.compile still sees the operators: test_compile.py).
    from torch.profiler import ProfilerActivity, profile

    logits = make_logits((1, 5, 9, 11), device=DEVICE).requires_grad_(True)
    target = make_target(1, 9, 11, 5, device=DEVICE)
    loss = lambda: locally_adaptive_loss(logits, target, kernel_size=3,  # noqa: E731
                                         backend="triton")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        grad, = torch.autograd.grad(loss(), logits)
        with torch.no_grad():
            loss()
    events = {e.key for e in prof.key_averages()}
    assert "FusedMinkowskiMean" in events
    assert not any(e.startswith("lad_triton::") for e in events), events
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # A gradient of the gradient still goes through the backward operator, which says it has
    # no formula rather than returning a gradient without a graph.
    grad, = torch.autograd.grad(loss(), logits, create_graph=True)
    with pytest.raises(RuntimeError, match="no autograd formula"):
        grad.sum().backward()


@pytest.mark.parametrize("tiles, block", [(1, 1024), (1000, 1024), (5000, 1024), (600, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combine_by_blocks_against_float64(tiles, block, dtype):
    # The Minkowski mean from the forward's per-tile partials (max L, sum w (L / max L)^k,
    # sum w) in two levels, by blocks of tiles and then by the program that takes the last
    # ticket, against the formula in float64 on the same partials, including tiles whose max is
    # 0 (no valid centre); bitwise repeatable. Blocks of 16 take the second level through 3
    # rounds, as 3 M tiles would with the GPUs' 1024.
    from lad_triton.kernels import combine as kc

    gen = torch.Generator().manual_seed(tiles)
    power = 2.5
    top = 4 * torch.rand(tiles, generator=gen, dtype=torch.float64)
    top *= 10.0 ** -(torch.arange(tiles) // block % 4)  # blocks of maxima 1000x apart
    top[3::7] = 0
    weights = torch.rand(tiles, generator=gen, dtype=torch.float64) * 30 * (top > 0)
    scaled = weights * torch.rand(tiles, generator=gen, dtype=torch.float64)
    partials = torch.stack([top, scaled, weights], 1).to(dtype).to(DEVICE)
    ticket = torch.zeros(1, dtype=torch.int32, device=DEVICE)  # as the forward leaves it

    def combine():  # on one ticket: the last program zeroes it again
        return kc.combine(partials, ticket, power, dtype, block)

    loss, scalars, tile_max = combine()
    p = partials.cpu().double()
    big = p[:, 0].max()
    total = (p[:, 1] * (p[:, 0] / big) ** power).sum()
    mean_ratio = total / p[:, 2].sum()
    a = mean_ratio ** (1 / power - 1) / p[:, 2].sum()
    tol = dict(rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    torch.testing.assert_close(scalars.cpu()[0], big * mean_ratio ** (1 / power), **tol)
    torch.testing.assert_close(scalars.cpu()[1:], torch.stack([big, a]), **tol)
    torch.testing.assert_close(loss.cpu().double(), scalars.cpu()[0], **tol)
    assert torch.equal(tile_max, partials[:, 0])  # all the backward keeps of the partials
    again = combine()
    assert all(torch.equal(x, y) for x, y in zip((loss, scalars, tile_max), again))
    assert ticket.item() == 0
    partials[min(tiles - 1, 2100), 0] = float("nan")  # a NaN cost anywhere: the loss is NaN
    loss, scalars, _ = combine()
    assert torch.isnan(loss) and torch.isnan(scalars).all()


def test_fake_tensors_and_dispatch_modes_see_the_operators():
    # Shape propagation (FakeTensorMode, as torch.compile and torch.export use it) runs the
    # operators' fake implementations: the eager shortcut must not launch kernels on fake data.
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        logits = torch.empty(1, 5, 9, 11, device=DEVICE, requires_grad=True)
        target = torch.zeros(1, 9, 11, dtype=torch.long, device=DEVICE)
        loss = locally_adaptive_loss(logits, target, kernel_size=3, backend="triton",
                                     check_target=False)
        grad, = torch.autograd.grad(loss, logits)
    assert loss.shape == () and grad.shape == logits.shape



def test_a_forward_and_backward_is_three_launches():
    # The host pays for every launch: a forward + backward of the public API with
    # check_target=False launches the forward, the combine and the backward where the
    # window-row kernels apply (C <= 32, K <= 7, stride 1), and the statistics and each tile's
    # scales besides elsewhere; the label check adds one. Recorded, not run (needs the JIT
    # kernels: the interpreter is off there).
    result = run_python(
        f"import sys, torch; sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
        "from kernel_report import recording\n"
        "import lad_triton\n"
        "for classes, k in ((21, 5), (19, 7), (40, 5)):\n"
        "    x = torch.randn(2, classes, 9, 40, requires_grad=True)\n"
        "    y = torch.randint(0, classes, (2, 9, 40))\n"
        "    with recording() as launches:\n"
        "        loss = lad_triton.locally_adaptive_loss(x, y, kernel_size=k, backend='triton',\n"
        "                                                check_target=False)\n"
        "        torch.autograd.grad(loss, x)\n"
        "    print(' '.join(name for name, *_ in launches))", TRITON_INTERPRET="0")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    window_rows = ["_halo_forward_kernel _combine_kernel _halo_backward_kernel"] * 2
    assert lines == window_rows + ["_zscore_stats_kernel _forward_kernel _combine_kernel "
                                   "_tile_scales_kernel _backward_kernel"]


@pytest.mark.parametrize("options", [dict(kernel_size=5), dict(kernel_size=3, stride=2)])
def test_the_backward_takes_the_forwards_tiles_from_its_plan(options, monkeypatch):
    # Each forward tile's max L is found by the forward's plan, which the backward is handed: a
    # backward whose own heuristic would tile the centres otherwise still gets the gradient right
    # (window-row kernels, then the others).
    from lad_triton.kernels import backward as kb

    planned = kernel_config.launch_config

    def other_tiles(*args, **kwargs):
        cfg = planned(*args, **kwargs)
        cfg.forward_rows += 1
        return cfg

    monkeypatch.setattr(kb, "launch_config", other_tiles)
    check_against_oracle((2, 5, 9, 11), options, backend="triton", n_labels=3)

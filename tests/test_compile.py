"""torch.compile (issue 5): a training step with the loss compiles with fullgraph=True and no
graph break on both backends and with every pooling (the fused kernels are custom operators; on
a CPU they run in Triton's interpreter), gives eager's loss and gradients, still rejects bad
labels; every custom operator passes torch.library.opcheck."""

import pytest
import torch
import torch._dynamo
from torch.library import opcheck

from cases import BACKENDS, DEVICE, make_labels, make_logits
from lad_triton import LocallyAdaptiveLoss
from lad_triton.dispatch import check_labels


def model_and_batch(device, spatial=(9, 11), classes=5):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d if len(spatial) == 2 else torch.nn.Conv3d
    model = conv(3, classes, 3, padding=1).to(device)
    images = torch.randn(2, 3, *spatial, device=device)
    target = make_labels(2, spatial, classes, n_labels=3, device=device)
    return model, images, target


def compiler(inductor_on_cpu=False):
    """torch.compile's backend for a test. On a CPU, Inductor generates and builds C++: tens of
    seconds per graph. There, the cases that say so compile with Inductor (the fused kernels'
    training step and volume); the others check what does not depend on the code generator
    (Dynamo's single graph, the custom operators' fake kernels under AOTAutograd, the values)
    with aot_eager. Inductor on the PyTorch backend's forward and backward runs in CI all the
    same: the README's first command, `python -m bench --quick`, compiles it for its
    torch_compile rows and checks its loss and gradient against eager (52 s of C++ builds as a
    test here). On a GPU every case uses Inductor."""
    return "inductor" if inductor_on_cpu or DEVICE == "cuda" else "aot_eager"


def compiles_like_eager(step, model, images, target, backend):
    """One graph, no break (fullgraph=True raises at the first break, with its reason); the
    compiled step's loss and parameter gradients are eager's."""
    loss = torch.compile(step, fullgraph=True, backend=backend)(images, target)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    eager = step(images, target)
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    assert torch.allclose(loss, eager, rtol=1e-5, atol=1e-7)
    for got, expected in zip(grads, eager_grads):
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-7)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", BACKENDS)
# kernel_size=3: the PyTorch backend unrolls one step per window offset into the graph, and
# Inductor's compile time on a CPU grows with them; what compiles does not depend on K.
@pytest.mark.parametrize("options", [dict(kernel_size=3), dict(reduction="none", stride=2,
                                                              kernel_size=3),
                                     dict(weight=True, kernel_size=3)])
def test_training_step_compiles_without_graph_breaks(backend, options):
    device = DEVICE if backend == "triton" else "cpu"
    model, images, target = model_and_batch(device)
    options = dict(options)  # parametrize shares the dict between cases
    if options.pop("weight", False):
        options["weight"] = torch.rand(5, device=device)
    criterion = LocallyAdaptiveLoss(backend=backend, **options)

    def step(images, target):
        return criterion(model(images), target).sum()

    compiles_like_eager(step, model, images, target,
                        compiler(backend == "triton" and options == dict(kernel_size=3)))


@pytest.mark.parametrize("pooling", ["lmp", "topk"])
def test_pooling_compiles_without_graph_breaks(pooling):
    # The pooling acts on L whichever backend computed it: one backend suffices. No graph break
    # also means no host sync (.item() breaks the graph).
    model, images, target = model_and_batch("cpu")
    criterion = LocallyAdaptiveLoss(backend="torch", kernel_size=3, pooling=pooling)

    def step(images, target):
        return criterion(model(images), target)

    compiles_like_eager(step, model, images, target, compiler())


@pytest.mark.parametrize("backend", BACKENDS)
def test_volumes_compile(backend):
    device = DEVICE if backend == "triton" else "cpu"
    model, images, target = model_and_batch(device, spatial=(3, 4, 5), classes=4)
    criterion = LocallyAdaptiveLoss(backend=backend, kernel_size=3)
    step = lambda x, t: criterion(model(x), t)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend=compiler(backend == "triton"))
    assert torch.allclose(compiled(images, target), step(images, target), rtol=1e-5)


def test_pixel_weight_and_channel_target_compile():
    # The pixel weight's value check runs inside lad_triton::check_labels, like the labels'.
    model, images, target = model_and_batch("cpu")
    pixel_weight = torch.rand(target.shape)
    criterion = LocallyAdaptiveLoss(kernel_size=3, reduction="sum")
    step = lambda x, t, w: criterion(model(x), t, w)  # noqa: E731
    compiled = torch.compile(step, fullgraph=True, backend=compiler())
    assert torch.allclose(compiled(images, target[:, None], pixel_weight),
                          step(images, target, pixel_weight), rtol=1e-5)
    pixel_weight[0, 1, 2] = -1.0
    with pytest.raises(ValueError, match=r"got pixel_weight\[0, 1, 2\]=-1\.0"):
        compiled(images, target[:, None], pixel_weight)


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_still_rejects_bad_labels(backend):
    device = DEVICE if backend == "triton" else "cpu"
    model, images, target = model_and_batch(device)
    criterion = LocallyAdaptiveLoss(backend=backend, kernel_size=3)
    compiled = torch.compile(lambda x, t: criterion(model(x), t), fullgraph=True,
                             backend=compiler())
    compiled(images, target)
    bad = target.clone()
    bad[1, 2, 3] = 9
    with pytest.raises(ValueError, match=r"got target\[1, 2, 3\]=9"):
        compiled(images, bad)


def fused_cases():
    from lad_triton.fused import plan_of

    logits = make_logits((1, 5, 6, 7), device=DEVICE).requires_grad_(True)
    target = make_labels(1, (6, 7), 5, n_labels=3, device=DEVICE)
    volume = make_logits((1, 3, 3, 4, 5), device=DEVICE).requires_grad_(True)
    labels3 = make_labels(1, (3, 4, 5), 3, device=DEVICE)
    weight = torch.rand(5, device=DEVICE)
    low = make_logits((2, 5, 3, 4), device=DEVICE).requires_grad_(True)
    wide = make_labels(2, (7, 9), 5, n_labels=3, device=DEVICE)
    common = (3.0, 3, 1, 255, 1e-5, 2.0)  # power, kernel_size, stride, ignore_index, eps, base
    cases = [
        (logits, target, None) + common + ("count", True, True, False),
        (logits, target, weight) + common + ("weight", False, True, False),
        (logits.detach(), target, None) + common + ("count", True, False, False),
        (logits, target, None, 2.3, 5, 2, 255, 1e-5, 1.5, "count", True, True, False),
        (volume, labels3, None) + common + ("count", True, True, False),
        (logits.detach(), target, weight) + common + ("count", True, True, True),
        (low, wide, None) + common + ("count", True, True, False),
    ]
    # the last: logits at a head's resolution, which the kernels interpolate to the target's
    return [case + (plan_of(case[0], case[4], case[5], case[2],
                            ("bilinear", True) if case[0] is low else None),)
            + (("bilinear", True) if case[0] is low else ("", False)) for case in cases]


@pytest.mark.parametrize("case", range(7))
def test_opcheck_fused_costs(case):
    from lad_triton.fused import fused_costs

    opcheck(fused_costs, fused_cases()[case])


@pytest.mark.parametrize("case", [0, 6])
def test_opcheck_fused_costs_backward(case):
    from lad_triton.fused import fused_costs, fused_costs_backward

    args = fused_cases()[case]
    L, _, _, P = fused_costs(*args)
    opcheck(fused_costs_backward, (torch.randn_like(L), args[0].detach(), args[1], P, 3, 1,
                                   1e-5, 2.0, True, *args[-3:]))


def test_opcheck_fused_combine_and_mean_backward():
    from lad_triton.fused import fused_combine, fused_costs, fused_mean_backward

    args = fused_cases()[5]
    _, partials, ticket, P = fused_costs(*args)
    opcheck(fused_combine, (partials, ticket, 3.0, torch.float32))
    _, scalars, tile_max = fused_combine(partials, ticket, 3.0, torch.float32)
    opcheck(fused_mean_backward, (torch.ones((), device=DEVICE), tile_max, scalars, args[0],
                                  args[1], P, 3, 1, 1e-5, 2.0, True, True, 3.0, args[-3]))


def test_opcheck_fused_mean_gradient():
    from lad_triton.fused import fused_mean_gradient

    args = fused_cases()[6]  # low-resolution logits, which the kernels interpolate
    assert args[-2] == "bilinear"
    opcheck(fused_mean_gradient, (args[0].detach(),) + args[1:3]
            + (3.0, 3, 1, 255, 1e-5, 2.0, "count", True) + args[-3:] + (2,))


def test_opcheck_fused_upsample_gradient():
    from lad_triton.fused import fused_mean_gradient, fused_upsample_gradient

    args = fused_cases()[6]
    # batches of 1 (no G: one part), 2 and 3 (two parts of 2 and 1 images)
    for batch in (1, 2, 3):
        logits = args[0].detach().repeat(2, 1, 1, 1)[:batch]
        target = args[1].repeat(2, 1, 1)[:batch]
        _, _, G, stage, above, _ = fused_mean_gradient(
            logits, target, args[2], 3.0, 3, 1, 255, 1e-5, 2.0, "count", True, *args[-3:], 2)
        assert G.shape[0] == (0, 1, 2)[batch - 1] and stage.shape[0] == batch - G.shape[0]
        scale = torch.rand(batch, device=DEVICE)
        opcheck(fused_upsample_gradient, (G, stage, above, logits, scale,
                                          list(target.shape[-2:]), args[-1], 3))
        opcheck(fused_mean_gradient, (logits, target, args[2], 3.0, 3, 1, 255, 1e-5, 2.0,
                                      "count", True) + args[-3:] + (2,))


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("pixel_weighted", [False, True])
def test_opcheck_check_labels(weighted, pixel_weighted):
    target = make_labels(2, (4, 5), 5, dtype=torch.uint8)
    opcheck(check_labels, (target, torch.rand(5) if weighted else None, 5, 255,
                           torch.rand(2, 4, 5) if pixel_weighted else None))


CPU_LOSS_ON_A_GPU_MACHINE = """
import sys, torch, torch.utils._triton
# What differs on a machine with a GPU: there Dynamo wraps Triton's compiled kernels as
# TritonKernelVariables (has_triton() is True), and the dispatcher's check whether the kernels
# are interpreted once looked at a kernel's type inside the traced code, which torch 2.11's
# Dynamo rejects ("TritonKernelVariable() has no type"; 2.13's accepts it).
torch.utils._triton.has_triton = lambda: True
import lad_triton
x = torch.randn(2, 4, 8, 9, requires_grad=True)
y = torch.randint(0, 4, (2, 8, 9))
loss = lambda a, b: lad_triton.locally_adaptive_loss(a, b, kernel_size=3)  # auto: CPU -> torch
compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
assert torch.allclose(compiled(x, y), loss(x, y), rtol=1e-5)
print("ok")
"""


WITHOUT_TRITON = """
import sys
sys.modules["triton"] = None  # `import triton` raises ImportError, as where it is not installed
import torch
from lad_triton import LocallyAdaptiveLoss
torch.manual_seed(0)
model = torch.nn.Conv2d(3, 5, 3, padding=1)
criterion = LocallyAdaptiveLoss(kernel_size=3)  # backend="auto"
step = lambda images, masks: criterion(model(images), masks)
images, masks = torch.randn(2, 3, 9, 11), torch.randint(0, 5, (2, 9, 11))
compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
assert torch.allclose(compiled(images, masks), step(images, masks), rtol=1e-5)
assert "triton" not in {name.split(".")[0] for name, m in sys.modules.items() if m}
print("ok")
"""


def run_script(script):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_cpu_logits_compile_where_the_kernels_are_compiled_for_a_gpu():
    # A user evaluating on the CPU of a GPU machine: Triton present, not interpreted.
    run_script(CPU_LOSS_ON_A_GPU_MACHINE)


def test_a_step_compiles_whole_without_triton():
    # The README's CPU install has no Triton: choosing the backend must not import it inside the
    # traced loss (Dynamo cannot trace a failing import). .ci/run also runs the README's compile
    # snippet in a venv without Triton, with Inductor.
    run_script(WITHOUT_TRITON)


def test_options_that_change_between_calls_compile(backend="torch"):
    # After a float option changes, torch.compile traces it as a symbol: the option checks must
    # trace too (math.isfinite did not: "torch.* op returned non-Tensor"). The checks come
    # before the backend is chosen: one backend shows it.
    from lad_triton import locally_adaptive_loss

    torch._dynamo.reset()
    logits = make_logits((1, 5, 6, 7), device=DEVICE)
    target = make_labels(1, (6, 7), 5, device=DEVICE)
    loss = torch.compile(lambda x, y, p, eps: locally_adaptive_loss(
        x, y, kernel_size=3, power=p, eps=eps, backend=backend), fullgraph=True,
        backend=compiler())
    # Compiled first, as a training step is (check_options skips its cache while compiling).
    for p, eps in ((2.0, 1e-5), (3.0, 1e-4), (4.5, 1e-3)):
        got = loss(logits, target, p, eps)
        expected = locally_adaptive_loss(logits, target, kernel_size=3, power=p, eps=eps,
                                         backend=backend)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


def test_eager_calls_with_other_options_leave_a_compiled_loss_compiled():
    # check_options remembers options it has seen valid; read under Dynamo, that set made every
    # compiled graph guard on its size, so an eager call with new options (an evaluation with
    # reduction="none", say) recompiled the training step at its next call.
    from torch._dynamo.testing import CompileCounter

    from lad_triton import locally_adaptive_loss

    logits = make_logits((1, 5, 6, 7), device=DEVICE)
    target = make_labels(1, (6, 7), 5, device=DEVICE)
    counter = CompileCounter()
    compiled = torch.compile(lambda x, y: locally_adaptive_loss(x, y, kernel_size=3,
                                                                backend="torch"),
                             fullgraph=True, backend=counter)
    first = compiled(logits, target)
    for power in (2.0, 4.0):
        locally_adaptive_loss(logits, target, kernel_size=3, power=power, backend="torch")
    assert torch.equal(compiled(logits, target), first)
    assert counter.frame_count == 1


PLAN_CHANGE = """
import torch, lad_triton
from torch._dynamo.utils import counters
from lad_triton.kernels import config
torch.manual_seed(0)
x = torch.randn(1, 5, 9, 40, requires_grad=True)
y = torch.randint(0, 5, (1, 9, 40))
def step(a, b):
    return lad_triton.locally_adaptive_loss(a, b, kernel_size=3, backend="triton",
                                            check_target=False)
for rows in (4, 2):  # the interpreter's plan, then another: as a new lad_triton or Triton plans
    config.HALO_ROWS_INTERPRETED = rows
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True)(x, y)
    want = step(x, y)
    assert torch.allclose(loss, want, rtol=1e-6), (rows, loss, want)
    torch.autograd.grad(loss, x)
print("ok", counters["inductor"]["fxgraph_cache_miss"], counters["inductor"]["fxgraph_cache_hit"])
"""


def test_a_changed_launch_plan_is_not_replayed_from_the_fx_graph_cache(tmp_path):
    # Inductor's FX graph cache keys on the traced graph. The forward's tiles shape its
    # partials; were they not in the graph (the operator's plan argument), a warm cache would
    # replay a graph traced under an earlier plan, whose size assertions then fail on the new
    # partials. Inductor (C++ on a CPU), in a child with a fresh cache directory.
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TRITON_INTERPRET": "1", "TORCHINDUCTOR_CACHE_DIR": str(tmp_path),
           "TORCHINDUCTOR_FX_GRAPH_CACHE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH")) if p)
    result = subprocess.run([sys.executable, "-c", PLAN_CHANGE], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]

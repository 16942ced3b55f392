"""A training step's loss captured in a CUDA graph, and under torch.compile's reduce-overhead mode
(which captures one too): the fused loss has no host sync with check_target=False and its
launches read nothing from the host between calls, so a replay on new inputs must give what an
eager call gives. CUDA only: there is nothing to capture on a CPU (these tests skip there, and
python -m bench.gpu runs them on a GPU)."""

import pytest
import torch

from cases import make_labels, make_logits
from lad_triton import locally_adaptive_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="CUDA graphs need a CUDA device")


def step(x, y, kernel_size):
    loss = locally_adaptive_loss(x, y, kernel_size=kernel_size, check_target=False)
    return loss, torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,kernel_size", [((2, 21, 67, 90), 5), ((1, 40, 33, 40), 3)])
def test_captured_step_replays_like_eager(shape, kernel_size, dtype):
    batch, classes, height, width = shape
    x = make_logits(shape, dtype=dtype, device="cuda").requires_grad_(True)
    y = make_labels(batch, (height, width), classes, dtype=torch.uint8, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (compiles) off the capture
        step(x, y, kernel_size)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss, grad = step(x, y, kernel_size)
    for seed in (1, 2):  # new inputs into the captured buffers, then a replay
        with torch.no_grad():
            x.copy_(make_logits(shape, dtype=dtype, device="cuda", seed=seed))
            y.copy_(make_labels(batch, (height, width), classes, dtype=torch.uint8,
                                device="cuda", seed=seed))
        graph.replay()
        want_loss, want_grad = step(x, y, kernel_size)
        assert torch.equal(loss, want_loss) and torch.equal(grad, want_grad)


def test_reduce_overhead_compiles_a_step_like_eager():
    # The loss compiled (Dynamo does not trace torch.autograd.grad itself), its backward through
    # AOTAutograd's compiled graph: both replayed as CUDA graphs after the first calls.
    shape = (2, 19, 40, 56)
    x = make_logits(shape, device="cuda").requires_grad_(True)
    y = make_labels(2, (40, 56), 19, dtype=torch.uint8, device="cuda")
    compiled = torch.compile(
        lambda a, b: locally_adaptive_loss(a, b, kernel_size=5, check_target=False),
        mode="reduce-overhead", fullgraph=True)
    for seed in (1, 2, 3):  # the first calls record, later ones replay the graph
        with torch.no_grad():
            x.copy_(make_logits(shape, device="cuda", seed=seed))
        loss = compiled(x, y)
        grad = torch.autograd.grad(loss, x)[0]
        want_loss, want_grad = step(x, y, 5)
        torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-7)

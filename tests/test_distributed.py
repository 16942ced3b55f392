"""Data-parallel training (issue 5): two gloo processes on this machine with sync=True give the
loss and gradients of one process on the concatenated batch; without sync each rank has its
local mean, as F.cross_entropy."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lad_triton
from cases import BACKENDS, make_labels, make_logits
from lad_triton import locally_adaptive_loss

HERE = Path(__file__).resolve().parent


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_synced_equal_one_process_on_the_whole_batch(backend, tmp_path):
    if backend == "triton" and torch.cuda.is_available():
        pytest.skip("the gloo ranks run on the CPU: the fused kernels need the interpreter there")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(lad_triton.__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]),
        "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}",
               str(HERE / "ddp_worker.py"), str(tmp_path), backend]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    logits = make_logits((2, 5, 7, 8), dtype=torch.float64, seed=21)
    target = make_labels(2, (7, 8), 5, n_labels=3, ignore_frac=0.3, seed=21)
    weight = torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    for name, options in (("synced", {}), ("group", {}),
                          ("synced_weighted", dict(weight=weight, power=2.5))):
        x = logits.clone().requires_grad_(True)
        whole = locally_adaptive_loss(x, target, backend=backend, kernel_size=3, **options)
        whole.backward()
        for rank, result in enumerate(ranks):
            loss, grad = result[name]
            part = slice(rank, rank + 1)
            assert torch.allclose(loss, whole.detach(), rtol=1e-12), (name, loss, whole)
            assert torch.allclose(grad, x.grad[part], rtol=1e-10, atol=1e-15), name
    x = make_logits((2, 5, 3, 4), dtype=torch.float64, seed=22).requires_grad_(True)
    whole = locally_adaptive_loss(x, target, backend=backend, kernel_size=3, power=3.0,
                                  upsample="bilinear")
    whole.backward()
    for rank, result in enumerate(ranks):
        loss, grad = result["synced_upsample"]
        assert torch.allclose(loss, whole.detach(), rtol=1e-12), (loss, whole)
        assert torch.allclose(grad, x.grad[rank:rank + 1], rtol=1e-10, atol=1e-15)
    for rank, result in enumerate(ranks):
        part = slice(rank, rank + 1)
        local = locally_adaptive_loss(logits[part], target[part], backend=backend, kernel_size=3)
        assert torch.allclose(result["local"][0], local, rtol=1e-12)
        assert "cannot be pickled" in result["pickle_error"]
        synced, grouped = result["pooling_errors"]
        assert synced.startswith("sync must be False with pooling='lmp'"), synced
        assert grouped.startswith("process_group must be None with pooling='lmp'"), grouped
    # The halves differ, so a sync that did nothing could not pass the checks above.
    assert not torch.allclose(ranks[0]["local"][0], ranks[0]["synced"][0], rtol=1e-3)


def test_sync_needs_an_initialised_process_group():
    logits = make_logits((1, 3, 4, 4))
    target = make_labels(1, (4, 4), 3)
    with pytest.raises(ValueError, match="sync=True or process_group needs torch.distributed"):
        locally_adaptive_loss(logits, target, sync=True)
    with pytest.raises(ValueError, match="process_group must be None or a torch.distributed"):
        locally_adaptive_loss(logits, target, process_group="world")

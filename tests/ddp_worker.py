"""One rank of tests/test_distributed.py, started by torchrun: the rank's half of a fixed batch,
the loss (synchronised or local) and the gradient of the rank's logits, saved for the test."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from cases import make_labels, make_logits  # noqa: E402
from lad_triton import LocallyAdaptiveLoss, locally_adaptive_loss  # noqa: E402


def main(out_dir, backend):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    logits = make_logits((2, 5, 7, 8), dtype=torch.float64, seed=21)
    target = make_labels(2, (7, 8), 5, n_labels=3, ignore_frac=0.3, seed=21)
    weight = torch.tensor([1.0, 2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    part = slice(rank * 2 // world, (rank + 1) * 2 // world)
    results = {}
    for name, options in (("synced", dict(sync=True)),
                          ("group", dict(process_group=dist.new_group([0, 1]))),
                          ("synced_weighted", dict(sync=True, weight=weight, power=2.5)),
                          ("local", dict())):
        x = logits[part].clone().requires_grad_(True)
        loss = locally_adaptive_loss(x, target[part], backend=backend, kernel_size=3, **options)
        loss.backward()
        results[name] = (loss.detach(), x.grad)
    # Logits at a lower resolution: the fused mean forms each rank's gradient against the rank's
    # own max L, scaled by the synchronised one in the backward.
    low = make_logits((2, 5, 3, 4), dtype=torch.float64, seed=22)
    x = low[part].clone().requires_grad_(True)
    loss = locally_adaptive_loss(x, target[part], backend=backend, kernel_size=3, sync=True,
                                 power=3.0, upsample="bilinear")
    loss.backward()
    results["synced_upsample"] = (loss.detach(), x.grad)
    # Pooling by rank needs every rank's costs in one order: refused with a group, saying why.
    results["pooling_errors"] = []
    for options in (dict(sync=True), dict(process_group=dist.group.WORLD)):
        try:
            locally_adaptive_loss(logits[part], target[part], pooling="lmp", **options)
            results["pooling_errors"].append(None)
        except ValueError as err:
            results["pooling_errors"].append(str(err))
    # A criterion holding a process group refuses to be pickled, saying why.
    import pickle

    try:
        pickle.dumps(LocallyAdaptiveLoss(process_group=dist.group.WORLD))
        results["pickle_error"] = None
    except TypeError as err:
        results["pickle_error"] = str(err)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

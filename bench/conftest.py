"""Options of the benchmark suite: ``pytest bench/ [--device cuda|cpu] [--quick] [--run-slow]``.

No TRITON_INTERPRET here: interpreter timings mean nothing, so the fused kernels are timed only
where they compile (CUDA)."""

import pytest
import torch


def pytest_addoption(parser):
    group = parser.getgroup("lad_triton benchmarks")
    group.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to time on (default: cuda if present)")
    group.addoption("--quick", action="store_true",
                    help="VOC-like (CUDA) or small (CPU), K=5, forward+backward, fewer rounds")
    group.addoption("--run-slow", action="store_true",
                    help="also time the full-size workloads on a CPU (minutes each)")


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


def pytest_collection_modifyitems(config, items):
    on_cpu = config.getoption("--device") == "cpu"
    quick = config.getoption("--quick")
    keep = []
    for item in items:
        case = getattr(item, "callspec", None)
        case = case.params.get("case") if case else None
        if case is not None:
            workload, _, pass_ = case
            if quick and (workload.kernel_size != 5 or pass_ != "forward+backward"
                          or workload.name not in (("small",) if on_cpu else ("voc",))):
                continue
            if on_cpu and workload.slow and not config.getoption("--run-slow"):
                item.add_marker(pytest.mark.skip(
                    reason="full-size workload on a CPU: pass --run-slow to time it"))
        keep.append(item)
    items[:] = keep

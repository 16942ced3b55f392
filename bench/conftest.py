"""Options of the benchmark suite: ``pytest bench/ [--device cuda|cpu] [--quick] [--run-slow]
[--impl NAME ...]``,
and its progress: one line per timed benchmark (what runs, then its median), not pytest's dots.

No TRITON_INTERPRET here: interpreter timings mean nothing, so the fused kernels are timed only
where they compile (CUDA)."""

import pytest
import torch

from workloads import unavailable


def pytest_addoption(parser):
    group = parser.getgroup("lad_triton benchmarks")
    group.addoption("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device to time on (default: cuda if present)")
    group.addoption("--quick", action="store_true",
                    help="VOC-like (CUDA) or small float32 (CPU), K=5, forward+backward, "
                         "fewer rounds")
    group.addoption("--impl", action="append", default=None,
                    help="time only this implementation (repeatable; default: all)")
    group.addoption("--run-slow", action="store_true",
                    help="also time the full-size workloads on a CPU (minutes each)")


@pytest.fixture(scope="session")
def device(request):
    return torch.device(request.config.getoption("--device"))


@pytest.fixture(scope="session")
def quick(request):
    return request.config.getoption("--quick")


def pytest_collection_modifyitems(config, items):
    device = torch.device(config.getoption("--device"))
    on_cpu = device.type == "cpu"
    quick = config.getoption("--quick")
    impls = config.getoption("--impl")
    keep = []
    for item in items:
        case = getattr(item, "callspec", None)
        case = case.params.get("case") if case else None
        if case is not None:
            workload, impl, pass_ = case
            if impls and impl not in impls:
                continue
            # On a CPU, float32 only: the quick look needs one dtype, and a second doubles the
            # torch.compile builds that take most of its time there.
            if quick and (workload.kernel_size != 5 or pass_ != "forward+backward"
                          or workload.name not in (("small", "small-up") if on_cpu
                                                   else ("voc", "deeplab-up"))
                          or (on_cpu and workload.dtype != torch.float32)):
                continue
            reason = unavailable(impl, workload, device)
            if on_cpu and workload.slow and not config.getoption("--run-slow"):
                reason = "full-size workload on a CPU: pass --run-slow to time it"
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
        keep.append(item)
    items[:] = keep
    config.stash[TIMED] = [item.nodeid for item in keep if not item.get_closest_marker("skip")]


TIMED = pytest.StashKey[list]()


def _label(nodeid):
    return nodeid.split("[", 1)[-1].rstrip("]")


def pytest_runtest_logstart(nodeid, location):
    config = _CONFIG[0]
    timed = config.stash.get(TIMED, [])
    if nodeid in timed:
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        reporter.write(f"[{timed.index(nodeid) + 1:2}/{len(timed)}] {_label(nodeid):42} ",
                       flush=True)


def pytest_runtest_logreport(report):
    config = _CONFIG[0]
    if report.when != "call" or report.nodeid not in config.stash.get(TIMED, []):
        return
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    median = dict(report.user_properties).get("median_ms")
    reporter.write_line(f"{median:.3g} ms" if report.passed and median is not None
                        else report.outcome.upper())


@pytest.hookimpl(wrapper=True)
def pytest_report_teststatus(report, config):
    category, _, _ = yield
    return category, "", ""  # no dots or words: the lines above are the progress


_CONFIG = []


def pytest_configure(config):
    _CONFIG[:] = [config]

import os

import torch

# Triton reads TRITON_INTERPRET when it is imported: set it before anything imports triton, so
# that without a GPU the fused kernels run under Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402


def _import_installed_kernels():
    """Hugging Face's transformers imports an installed top-level package named ``kernels``;
    pytest puts this checkout on sys.path (pyproject: pythonpath), where the folder kernels/
    (installed as lad_triton.kernels, which nothing imports as ``kernels``) would shadow it.
    Import the installed one first, from sys.path without the checkout, where there is one."""
    import importlib.metadata
    import sys

    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = sys.path[:]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != here]
    try:
        import kernels  # noqa: F401
    finally:
        sys.path[:] = saved


_import_installed_kernels()

# "ci" draws new examples on every run, from one seed per run that the header and every failure
# print; replay a run with HYPOTHESIS_SEED=<seed> (or pytest --hypothesis-seed=<seed>), or one
# failing example with the @reproduce_failure blob it prints (print_blob). Replaying the same
# draws forever (derandomize=True, as before) would never look anywhere new: a wrong kernel
# that those few draws miss would pass every run. HYPOTHESIS_PROFILE=explore draws ~15x more.
settings.register_profile("ci", max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, max_examples=3000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """One seed for the run: --hypothesis-seed, else $HYPOTHESIS_SEED, else a fresh one. It goes
    into the environment, so that pytest-xdist's workers (started after this, inheriting it)
    draw from the same seed, and into Hypothesis as --hypothesis-seed would put it."""
    from hypothesis import core

    seed = config.getoption("hypothesis_seed", None) or os.environ.get("HYPOTHESIS_SEED")
    if seed is None:
        import secrets

        seed = secrets.randbelow(2**32)
    os.environ["HYPOTHESIS_SEED"] = str(seed)
    core.global_force_seed = int(seed)
    if not hasattr(config, "workerinput"):  # pytest-xdist's controller, before its workers
        _warm_yapf_grammar()


def _warm_yapf_grammar():
    """yapf, which mmengine imports, pickles its grammar into the user's cache on its first
    import after an install (the pickle is older than the installed grammar file); workers that
    import it at once can read another's half-written pickle (EOFError: "Ran out of input").
    Importing it once here, before the workers start, writes it once."""
    try:
        import yapf  # noqa: F401
    except Exception:  # not installed (the framework tests skip or fail on their own terms)
        pass


def _replay_line():
    seed = os.environ["HYPOTHESIS_SEED"]
    return f"hypothesis seed {seed}: replay this run's draws with HYPOTHESIS_SEED={seed} pytest ..."


def pytest_report_header(config):
    return _replay_line()


import pytest  # noqa: E402


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and report.when == "call":  # wherever a @given may sit (nested, too)
        report.sections.append(("hypothesis seed", _replay_line()))
    return report


# pytest -n N runs N worker processes: one torch thread each, not N times the cores.
workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, torch.get_num_threads() // workers)))


def _call_helpers_without_repatching():
    """Triton's interpreter re-patches triton.language on every call of a @triton.jit helper (a
    scan of the module's members), although an earlier call from the same module, in the same
    launch, has patched it already: that scan was a third of the interpreted kernels' time.
    Patch once per launch and helper module; the rest is Triton's own path."""
    from triton.runtime import interpreter

    grid_call = interpreter.GridExecutor.__call__
    patch_lang = interpreter._patch_lang
    patched = []  # per launch in progress: the ids of the helper modules' globals

    def launch(self, *args, **kwargs):
        patched.append(set())
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched.pop()

    def call(self, *args, **kwargs):
        key = id(self.fn.__globals__)
        if not patched or key not in patched[-1]:
            patch_lang(self.fn)
            if patched:
                patched[-1].add(key)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as err:
            raise interpreter.InterpreterError(repr(err)) from err

    interpreter.GridExecutor.__call__ = launch
    interpreter.InterpretedFunction.__call__ = call


def _numpy_dtypes_once():
    """Triton's interpreter maps a Triton dtype to numpy's by building its table anew on every
    operation (_get_np_dtype: 5-8% of an interpreted launch). The answer depends only on the
    scalar type: remember it per scalar type (pointers, unhashable, take Triton's path)."""
    import triton.language as tl
    from triton.runtime import interpreter

    original = interpreter._get_np_dtype
    known = {}

    def np_dtype(tt_dtype):
        scalar = tt_dtype.element_ty if isinstance(tt_dtype, tl.block_type) else tt_dtype
        if isinstance(scalar, tl.pointer_type):
            return original(tt_dtype)
        found = known.get(scalar)
        if found is None:
            found = known[scalar] = original(scalar)
        return found

    interpreter._get_np_dtype = np_dtype


if os.environ.get("TRITON_INTERPRET") == "1":
    for speedup in (_call_helpers_without_repatching, _numpy_dtypes_once):
        try:
            speedup()
        except (ImportError, AttributeError):  # no Triton, or an interpreter laid out otherwise
            pass


# Tests that take tens of seconds on a CPU (the interpreter, Inductor's C++ build, subprocesses):
# first, so that `pytest -n auto`'s workers do not end on one of them while the others idle.
SLOW_FIRST = ("test_a_visit_dry_run", "test_random_volumes", "test_random_problems",
              "test_training_step_compiles_without_graph_breaks", "test_two_ranks_synced",
              "test_sweep_dry_run", "test_host_profile_dry_run", "test_float16_training",
              "test_window_sizes_up_to_15", "test_opcheck_fused_costs", "test_volumes_compile")


def pytest_collection_modifyitems(items):
    def rank(item):  # the slowest first; the rest as collected (the sort is stable)
        return next((i for i, name in enumerate(SLOW_FIRST) if item.name.startswith(name)),
                    len(SLOW_FIRST))

    items.sort(key=rank)

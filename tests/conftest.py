import os

import torch

# Triton reads TRITON_INTERPRET when it is imported: set it before anything imports triton, so
# that without a GPU the fused kernels run under Triton's CPU interpreter.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from hypothesis import HealthCheck, settings  # noqa: E402

# "ci" replays the same examples on every run (no seeds from the clock); HYPOTHESIS_PROFILE=explore
# draws new ones.
settings.register_profile("ci", derandomize=True, max_examples=200, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("explore", deadline=None, max_examples=3000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# pytest -n N runs N worker processes: one torch thread each, not N times the cores.
workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(4, torch.get_num_threads() // workers)))

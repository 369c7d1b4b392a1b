import os
import tempfile
import warnings

import pytest
import torch

# Triton kernels run through Triton's CPU interpreter where there is no GPU. Triton reads the
# variable when a kernel module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Under pytest-xdist (the README's `-n 2`) each worker process runs torch on one thread: the
# tests' tensors are small, so processes, not intra-op threads, are what use the cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)

# backend="auto" on CPU means the compiled backend (inductor, 10-20 s per new bucket structure):
# tests that do not test compilation step eagerly (tests/test_compiled_cpu.py turns it back on).
os.environ.setdefault("OPTGEN_AUTO_COMPILE", "0")

# Kernels of branch paths away from the defaults are rendered at run time into this cache: a fresh
# one per test session, so the suite exercises the rendering and leaves nothing in the home folder.
os.environ.setdefault("OPTGEN_CACHE_DIR", tempfile.mkdtemp(prefix="optgen-kernels-"))


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    dtype = torch.get_default_dtype()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*world_size is 1.*")
        yield
    torch.set_default_dtype(dtype)

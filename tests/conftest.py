import os
import warnings

import pytest
import torch

# Triton kernels run through Triton's CPU interpreter where there is no GPU. Triton reads the
# variable when a kernel module is imported, so it is set before any test imports one.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    dtype = torch.get_default_dtype()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*world_size is 1.*")
        yield
    torch.set_default_dtype(dtype)

import warnings

import pytest
import torch


@pytest.fixture(autouse=True)
def _restore_default_dtype():
    dtype = torch.get_default_dtype()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*world_size is 1.*")
        yield
    torch.set_default_dtype(dtype)

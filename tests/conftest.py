"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """Tests run small tensors, for which one intra-op thread is faster than two on a 2-core machine
    (and much faster when the machine is shared); subprocesses started by tests keep their own defaults."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

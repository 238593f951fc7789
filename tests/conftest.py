"""Suite-wide settings."""

import logging

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


@pytest.fixture(autouse=True)
def yolov5_logs_reach_caplog():
    """`set_logging()` (called by the scripts and hubconf when a test runs them in-process) stops the
    'yolov5' logger from propagating, which hides its records from pytest's caplog in every later
    test; each test starts with propagation on, whatever ran before it."""
    logger = logging.getLogger("yolov5")
    propagate = logger.propagate
    logger.propagate = True
    yield
    logger.propagate = propagate


import os

# Triton kernels are tested on CPU through its interpreter; set before anything imports triton.
if not os.environ.get("LORAFORGE_TEST_REAL_TRITON"):
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seed():
    """A fresh seed per test run (printed on failure), so inputs differ between runs; LORAFORGE_TEST_SEED
    replays a failure's seed."""
    value = int(os.environ.get("LORAFORGE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    torch.manual_seed(value)
    print(f"seed = {value}")
    return value


@pytest.fixture
def one_thread():
    """For modules of tiny matrices (pytestmark = pytest.mark.usefixtures("one_thread")): on a shared
    2-core box, torch's threads only contend (about 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

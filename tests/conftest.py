import os
import shutil
import sys
import tempfile

import pytest
import torch

# Inductor's on-disk cache keys a graph by its code, not by a custom op's fake function: a graph
# cached while the op's outputs had other shapes (another checkout, an earlier build) would be
# replayed. Each test session compiles into a folder of its own.
INDUCTOR_CACHE = tempfile.mkdtemp(prefix="convit-kernels-inductor-")
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", INDUCTOR_CACHE)


@pytest.fixture(autouse=True)
def tensorboard_as_not_installed(monkeypatch):
    """In this process a run writes what it writes without the optional tensorboard package, installed or not.

    A training run's default writes TensorBoard scalars where the package is installed; the tests that are
    about it put a package of their own (or the real one) in its place.
    """
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(INDUCTOR_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)

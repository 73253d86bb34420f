"""pytest plugin of `convit-kernels gpu-check`: ``--gpu-check-shard=i/n`` keeps the i-th of every n selected tests.

Loaded with ``-p convit_kernels.gpu_check.shard``: n pytest processes then share the GPU tests
(and their kernels' compile time) without pytest-xdist, which the GPU machine may not have.
"""

from __future__ import annotations

import pytest

from .plan import parse_shard


def pytest_addoption(parser):
    parser.addoption("--gpu-check-shard", metavar="I/N", help="run the I-th of every N selected tests (0 <= I < N)")


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected theirs
def pytest_collection_modifyitems(config, items):
    text = config.getoption("gpu_check_shard")
    if not text:
        return
    try:
        index, count = parse_shard(text)
    except ValueError as error:
        raise pytest.UsageError(str(error)) from None
    kept = items[index::count]
    config.hook.pytest_deselected(items=[item for item in items if item not in kept])
    items[:] = kept

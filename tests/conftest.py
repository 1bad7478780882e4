"""Session-wide test setup: the Triton interpreter on CPU-only machines; ``gpu`` tests skipped.

The ``gpu`` marker is registered in setup.cfg (whose addopts deselect it: run ``pytest -m gpu`` on
a CUDA machine); when selected without a GPU, such tests are skipped here.

``TRITON_INTERPRET`` must be set before anything imports ``triton``; pytest imports this file
first, and ``torch`` (used for the check) does not import triton.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

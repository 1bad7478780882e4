"""Session-wide test setup: hubs offline, the Triton interpreter on CPU-only machines; ``gpu`` tests skipped.

The ``gpu`` marker is registered in setup.cfg (whose addopts deselect it: run ``pytest -m gpu`` on
a CUDA machine); when selected without a GPU, such tests are skipped here.

``TRITON_INTERPRET`` must be set before anything imports ``triton``; pytest imports this file
first, and ``torch`` (used for the check) does not import triton.
"""

import os

# The suite never reaches a model or dataset hub (this machine reaches only package registries). Set
# before anything imports huggingface_hub / datasets, which read these once at import: a test that
# monkeypatches them later would otherwise wait on the network (71 s for one test when the caller's
# shell had not exported them), so the suite's time depended on the caller's environment.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("WANDB_MODE", "offline")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

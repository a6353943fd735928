"""Shared test set-up.

TRITON_INTERPRET must be set before any Triton kernel is defined (DESIGN §8), so it is set
here, at collection time, before test modules import fused.triton. Every test starts from
fixed seeds."""
import os
import random

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield

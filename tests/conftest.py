"""Shared test settings: few threads (the CI machine has 2 cores), one Ray per session."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
# Tests never talk to a user's cluster by accident.
os.environ.pop("RAY_ADDRESS", None)

REALDATA = Path(os.environ.get("FCN_REALDATA",
                               Path(__file__).resolve().parents[2] / "shared" / "realdata"))


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (ray.init costs ~5 s)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()

"""Shared test settings: few threads (the CI machine has 2 cores), one Ray per session."""

import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)
# Tests never talk to a user's cluster by accident.
os.environ.pop("RAY_ADDRESS", None)

_REALDATA_CANDIDATES = [
    os.environ.get("FCN_REALDATA", ""),
    Path(__file__).resolve().parents[2] / "shared" / "realdata",  # beside the checkout
    "/work/shared/realdata",  # the team machines' shared folder, for clones elsewhere
]


def _find_realdata() -> Path | None:
    for cand in _REALDATA_CANDIDATES:
        if cand and Path(cand).is_dir():
            return Path(cand)
    return None


@pytest.fixture(scope="session")
def realdata() -> Path:
    """The real sample files (../shared/realdata, or FCN_REALDATA)."""
    path = _find_realdata()
    if path is None:
        pytest.skip("real samples absent: set FCN_REALDATA to the shared/realdata folder")
    return path


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session (ray.init costs ~5 s)."""
    import ray

    from pipelines.ray_env import quiet_env

    os.environ.update(quiet_env())
    # The dashboard serves the state API that Ray Train V2's controller monitor queries.
    ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False)
    yield ray
    ray.shutdown()

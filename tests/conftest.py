"""Shared test settings: deterministic torch, few threads (the CI machine has 2 cores)."""

import torch

torch.set_num_threads(2)

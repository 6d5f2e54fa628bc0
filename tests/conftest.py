"""Shared test settings: deterministic, single-threaded torch for reproducible timings."""

import torch

torch.manual_seed(0)

"""Shared fixtures. ``ray_local``: one local Ray (2 CPUs) for the whole test session."""
from __future__ import annotations

import os

# One thread per process: the suite runs a driver plus Ray workers on 2 cores, and OpenMP
# spin-waiting between them costs several times the work (measured: 42 s vs 8 s of CPU).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Pipelines keep warnings and Ray's INFO lines off the terminal unless verbose; tests run verbose so
# pytest sees every warning (tests/test_console.py checks the quiet default).
os.environ.setdefault("LAYERCARD_VERBOSE", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray cluster with 2 CPUs, started once (≈3 s) and shut down at the end of the session."""
    # Each ray.train.report waits for a health check: 1.7 s by default, 0.15 s at 0.2.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    if started:
        ray.shutdown()

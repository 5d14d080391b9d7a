"""A pytest plugin that runs lib's own unit tests on another device: ``BENCH_DEVICE=cuda python -m pytest
-p benchmarks.cuda_plugin tests/lib/test_ablation.py ...``. Every ``lib.models.load(..., device="cpu")`` of the test
suite's tiny random Llama runs on ``$BENCH_DEVICE`` instead (default: CUDA when there is a GPU), and a dtype left to
"auto" becomes ``$BENCH_DTYPE`` (float32, the tolerance the tests were written for). It also provides the
``bench_device`` fixture of benchmarks/cuda_checks.py. With BENCH_DEVICE "cpu" it changes nothing."""

from __future__ import annotations

import functools
import inspect
import os

import pytest
import torch

import lib.models

TARGET = os.environ.get("BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = os.environ.get("BENCH_DTYPE", "float32")
_original_load = lib.models.load
_signature = inspect.signature(_original_load)


@functools.wraps(_original_load)
def _load_on_target(*args, **kwargs):
    bound = _signature.bind(*args, **kwargs)
    bound.apply_defaults()
    if str(bound.arguments["device"]) in ("cpu", "auto"):
        bound.arguments["device"] = TARGET
    if bound.arguments["dtype"] == "auto":
        bound.arguments["dtype"] = DTYPE
    return _original_load(*bound.args, **bound.kwargs)


if TARGET != "cpu":
    lib.models.load = _load_on_target


def pytest_report_header(config):
    return f"benchmarks.cuda_plugin: lib.models.load(device='cpu') runs on {TARGET}, dtype {DTYPE}"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device(TARGET)

"""A pytest plugin that runs lib's own unit tests on another device: ``BENCH_DEVICE=cuda python -m pytest
-p benchmarks.cuda_plugin tests/test_ablation.py ...``.

The test suite's tiny random Llama is loaded with ``lib.models.load(..., device="cpu")``; this plugin turns every
such call into ``device=$BENCH_DEVICE`` and, where the dtype is left to "auto", into ``$BENCH_DTYPE`` (float32 by
default, the tolerance the tests were written for; "auto" would mean bfloat16 on CUDA). It also provides the
``bench_device`` fixture for benchmarks/cuda_checks.py. With BENCH_DEVICE unset or "cpu" it changes nothing.
"""

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
    name = torch.cuda.get_device_name(0) if TARGET.startswith("cuda") and torch.cuda.is_available() else TARGET
    return f"benchmarks.cuda_plugin: lib.models.load(device='cpu') runs on {TARGET} ({name}), dtype {DTYPE}"


@pytest.fixture(scope="session")
def bench_device() -> torch.device:
    return torch.device(TARGET)

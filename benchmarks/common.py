"""Timing, memory and machine helpers shared by the benchmarks.

Timings are interleaved (each repeat runs every method once, in turn) so that a slow patch of a shared machine hurts
all methods alike, and reported as the median after a warm-up. CPU peak memory is the process's resident high-water
mark (``VmHWM``, reset through ``/proc/self/clear_refs`` after ``malloc_trim``) above the resident size at the
start; CUDA peak memory is ``torch.cuda.max_memory_allocated`` above the allocation at the start.
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from lib.lanes import available_cores


def log(message: str) -> None:
    """Progress lines go to stderr, so that stdout holds only the report."""
    print(message, file=sys.stderr, flush=True)


def sync(device: torch.device | str | None) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device=None) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleaved(methods: dict[str, Callable[[], Any]], repeats: int,
                warmups: dict[str, Callable[[], Any]] | None = None,
                device=None, log: Callable[[str], None] | None = None) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Run each warm-up once, then ``repeats`` rounds of every method in turn. Returns the times of each method and
    its last result."""
    for name, fn in (warmups or {}).items():
        seconds, _ = timed(fn, device)
        if log:
            log(f"  warm-up {name}: {seconds:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, Any] = {}
    for round_ in range(repeats):
        for name, fn in methods.items():
            seconds, results[name] = timed(fn, device)
            times[name].append(seconds)
            if log:
                log(f"  round {round_ + 1}/{repeats} {name}: {seconds:.2f} s")
    return times, results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


# --- memory --------------------------------------------------------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``: the peak above the level at entry."""

    def __init__(self, device=None):
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.bytes: int | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back, so that re-use shows as growth
            with open("/proc/self/clear_refs", "w", encoding="ascii") as handle:
                handle.write("5")  # reset VmHWM to the current VmRSS
            self._start = _status_kib("VmRSS") * 1024
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            self.bytes = _status_kib("VmHWM") * 1024 - self._start
        return False


# --- machine -------------------------------------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bench_device(smoke: bool, script: str) -> torch.device:
    """CUDA when there is a GPU; the CPU for a ``--smoke`` run without one; else a clear stop naming ``script``."""
    if torch.cuda.is_available():
        return torch.device("cuda")
    if smoke:
        return torch.device("cpu")
    raise SystemExit(f"No CUDA device: {script} needs a GPU (or --smoke for a tiny CPU run).")


def machine(device: torch.device) -> dict[str, Any]:
    import transformers

    info = {"date": _dt.date.today().isoformat(), "host": platform.node(), "cpu": _cpu_model(),
            "cores": available_cores(),
            "torch_threads": torch.get_num_threads(),
            "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(device), "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    from importlib.metadata import PackageNotFoundError, version

    try:
        info["transformer_lens"] = version("transformer-lens")
    except PackageNotFoundError:
        pass
    return info


# --- output --------------------------------------------------------------------------------------------------------

def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def write_results(results: dict, text: str, stem: str, out: str | Path | None) -> Path:
    """Write ``results`` (JSON) and the printed report ``text`` (Markdown) as ``<out>/<stem>.{json,md}``
    (default folder: ``artifacts/benchmarks``)."""
    import json

    from lib.artifacts import artifacts_dir

    folder = Path(out) if out else artifacts_dir() / "benchmarks"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(results, indent=1, default=str), encoding="utf-8")
    (folder / f"{stem}.md").write_text(text + "\n", encoding="utf-8")
    log(f"wrote {folder / stem}.json and .md")
    return folder / stem


def word_tokenizer(words: Sequence[str]):
    """A word-level tokenizer for random stand-in models: ``<unk> <s> </s> [INST] [/INST]`` then ``words`` (ids in
    that order), whitespace-split, the paper's ``[INST]`` markers kept whole, ``<s>`` prepended. Shared by the GPU
    benchmarks and the test suite's tiny models."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    vocab = {token: i for i, token in enumerate(specials + list(words))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("[INST]", "isolated"),
                                                     pre_tokenizers.Split("[/INST]", "isolated"),
                                                     pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["[INST]", "[/INST]"])


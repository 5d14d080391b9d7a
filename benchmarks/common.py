"""What the benchmarks share: interleaved timing (each round runs every method once, in turn; medians after a
warm-up; ratios are medians of within-round ratios, so a change in a shared machine's load cancels out), peak memory,
the machine's description, the greedy loops compared, the report's files, and the stand-ins' word tokenizer."""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import GenerationConfig, PreTrainedTokenizerFast

from bookkit.lanes import available_cores
from lib.artifacts import artifacts_dir
from lib.inputs import position_ids


def log(message: str) -> None:  # progress goes to stderr, so that stdout holds only the report
    print(message, file=sys.stderr, flush=True)


def sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device=None) -> tuple[float, Any]:
    sync(device)
    start = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - start, result


def interleaved(methods: dict[str, Callable[[], Any]], repeats: int,
                warmups: dict[str, Callable[[], Any]] | None = None, device=None) -> tuple[dict, dict[str, Any]]:
    """Each warm-up once, then ``repeats`` rounds of every method in turn: the times of each method, its last result."""
    for name, fn in (warmups or {}).items():
        log(f"  warm-up {name}: {timed(fn, device)[0]:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in methods}
    results: dict[str, Any] = {}
    for round_ in range(repeats):
        for name, fn in methods.items():
            seconds, results[name] = timed(fn, device)
            times[name].append(seconds)
            log(f"  round {round_ + 1}/{repeats} {name}: {seconds:.2f} s")
    return times, results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def paired(times: dict[str, list[float]], method: str, reference: str) -> float:
    """Throughput of ``method`` relative to ``reference``: the median over rounds of the ratio within each round."""
    return median([r / m for m, r in zip(times[method], times[reference])])


def idle_threads() -> int:
    """Threads for torch: the cores the 1-minute load average leaves idle, within 1..torch's default (on a shared
    machine, more threads than idle cores make OpenMP threads wait on each other: 2-7x slower, noisy timings)."""
    return max(1, min(torch.get_num_threads(), available_cores() - int(round(os.getloadavg()[0]))))


# --- the greedy loops compared (exactly max_new_tokens new tokens: no stop at end-of-turn) ------------------------

def hf_greedy(lm, batch, max_new_tokens: int) -> torch.Tensor:
    """``transformers``' ``generate`` with its KV cache: new tokens [batch, max_new_tokens]."""
    config = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=[],  # []: never stop
                              pad_token_id=lm.tokenizer.pad_token_id)
    with torch.inference_mode():
        out = lm.model.generate(**batch, generation_config=config)
    return out[:, batch["input_ids"].shape[1]:]


def recompute_greedy(lm, batch, max_new_tokens: int) -> torch.Tensor:
    """The paper's loop: every step a full forward pass over prompt + tokens so far (no KV cache, logits at every
    position, as TransformerLens computes them), then the argmax of the last position."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    one, new = torch.ones_like(mask[:, :1]), []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            out = lm.model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask), use_cache=False)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, one], 1)
            new.append(token)
    return torch.cat(new, 1)


def random_directions(k: int, d: int, seed: int) -> torch.Tensor:
    directions = torch.randn(k, d, generator=torch.Generator().manual_seed(seed))
    return directions / directions.norm(dim=1, keepdim=True)


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Share of sequences whose greedy tokens equal the reference's exactly."""
    return float((tokens.cpu() == reference.cpu()).all(dim=1).float().mean())


def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(key + ":"))


class PeakMemory:
    """``with PeakMemory(device) as peak: ...`` then ``peak.bytes``, the peak above the level at entry: on a CPU the
    resident high-water mark (after ``malloc_trim``), on CUDA ``max_memory_allocated``."""

    def __init__(self, device=None):
        self.device, self.bytes, self._start = torch.device(device or "cpu"), None, None

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
            pass
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            self.bytes = _status_kib("VmHWM") * 1024 - self._start
        return False


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    info = {"date": _dt.date.today().isoformat(), "host": platform.node(), "cpu": _cpu_model(),
            "cores": available_cores(), "torch_threads": torch.get_num_threads(),
            "ram_gib": round(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30, 1),
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "device": str(device), "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return info


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def cell(value):
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows])


def fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def write_results(results: dict, text: str, stem: str, out: str | Path | None) -> Path:
    """``results`` (JSON) and the printed report ``text`` (Markdown) as ``<out>/<stem>.{json,md}`` (default folder:
    ``artifacts/benchmarks``)."""
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
    specials = ["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(specials + list(words))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("[INST]", "isolated"),
                                                     pre_tokenizers.Split("[/INST]", "isolated"),
                                                     pre_tokenizers.Whitespace()])
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   additional_special_tokens=["[INST]", "[/INST]"])

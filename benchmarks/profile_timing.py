"""The paper's whole profile (``params/llama2-7b.yaml``) timed on a GPU without weights or network (issue 19): a
random model with Llama-2-7B's shapes in bfloat16 and two random LoRA adapters, written into a temporary Hugging
Face cache under the family's hub ids, AdvBench/Alpaca-shaped data with the paper's row counts, and the profile's
own prompt counts and token budgets; each chapter runs through ``python -m lib.runner --only`` in turn, and its wall
time and the GPU's peak memory in use (every process, sampled every 0.2 s) are recorded.

Weights are random, so completions rarely stop early: every generation runs (almost) to its token budget, the worst
case for time. Loading is from local disk (the page cache after the first chapter), so a real run adds the
download (about 13.5 GB for Llama-2-7b-chat, a few MB for each adapter) once.

``--budget-s`` (default 420) caps the whole run: the chapter running when it is spent is stopped and reported as
such, and the rest are listed as not reached. ``--smoke`` runs the tiny stand-in with the CI rehearsal's smaller
samples, on the CPU where there is no GPU: a dry run of this script. Usage::

    python -m benchmarks.profile_timing [--smoke] [--budget-s 420] [--out DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks import common, standin
from benchmarks.gpu_bench import LLAMA2_7B
from lib.artifacts import REPO_ROOT
from lib.data import PAPER_DATA_ENV
from lib.lanes import stop_tree

NEEDED = ["torch", "transformers", "peft", "accelerate", "safetensors", "yaml", "pandas", "altair", "sklearn",
          "papermill", "nbformat", "ipykernel", "psutil", "tqdm", "tokenizers"]
STOPPED, NOT_REACHED = "stopped at the budget", "not reached"


class GpuMemoryPeak:
    """The device's peak memory in use by every process, sampled every ``interval`` seconds in a thread (the chapters
    run in kernels of their own, so the allocator's own counters in this process see nothing); 0 off CUDA."""

    def __init__(self, device: torch.device, interval: float = 0.2):
        self.device, self.interval, self.peak = device, interval, 0
        self._stop = threading.Event()

    def _used(self) -> int:
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self._used())

    def __enter__(self):
        if self.device.type != "cuda":
            return self
        self.peak = self._used()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._used())
        return False


def build_world(root: Path, smoke: bool, device: torch.device) -> dict[str, str]:
    """The stand-in's hub cache and paper data under ``root``; returns the environment the chapters run in."""
    if smoke:
        standin.write_hub_models(root / "hub")
        listing = standin.write_paper_data(root / "paper-data")
    else:  # Llama-2-7B's shapes; LoRA on every projection, small enough to keep bfloat16 activations finite
        standin.write_hub_models(root / "hub", shapes=LLAMA2_7B, device=device, dtype=torch.bfloat16, init_std=None,
                                 lora_std=0.002, lora_rank=8, lora_modules=(
                                     "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
        listing = standin.write_paper_data(root / "paper-data", filler_words=12)  # AdvBench-length goals
    return {"HF_HUB_CACHE": str(root / "hub"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            PAPER_DATA_ENV: str(listing), "REFUSAL_BOOK_ARTIFACTS": str(root / "artifacts"),
            "REFUSAL_BOOK_CACHE": str(root / "cache"), "REFUSAL_BOOK_PROGRESS": "0"}


def run_chapter(profile: Path, stem: str, environment: dict, timeout: float, device: torch.device,
                log_file) -> dict:
    """One chapter through the runner; at the timeout the runner and every process under it (its kernel runs in a
    session of its own) are killed."""
    command = [sys.executable, "-m", "lib.runner", "--profile", str(profile), "--only", stem]
    start = time.perf_counter()
    with GpuMemoryPeak(device) as peak:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **environment}, stdout=log_file,
                                   stderr=subprocess.STDOUT)
        try:
            status = "ok" if process.wait(timeout=max(timeout, 1)) == 0 else f"failed (exit {process.returncode})"
        except subprocess.TimeoutExpired:
            stop_tree(process.pid, grace_s=0)
            process.wait()
            status = STOPPED
    return {"chapter": stem, "status": status, "wall_s": round(time.perf_counter() - start, 1),
            "peak_gpu_memory": common.fmt_bytes(peak.peak) if peak.peak else "n/a (CPU)"}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="the tiny stand-in and smaller samples; CPU if no GPU")
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop the whole run after this many seconds")
    parser.add_argument("--out", default=None, help="results folder (default: artifacts/benchmarks)")
    args = parser.parse_args(argv)
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(f"benchmarks.profile_timing: this Python lacks {', '.join(missing)}; the chapters need the "
                         "book's whole environment (pyproject.toml). Carry them as wheels (BENCHMARKS.md).")
    device = common.bench_device(args.smoke, "benchmarks.profile_timing")
    wall = time.perf_counter()
    results = {"machine": common.machine(device), "shapes": "tiny (--smoke)" if args.smoke else "Llama-2-7B-shaped",
               "budget_s": args.budget_s, "chapters": []}
    with tempfile.TemporaryDirectory(prefix="profile-timing-") as folder:
        root = Path(folder)
        environment = build_world(root, args.smoke, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the stand-in was made on the GPU; the chapters load it anew
        results["build_s"] = round(time.perf_counter() - wall, 1)
        common.log(f"stand-in written in {results['build_s']} s")
        profile = standin.paper_profile(root, device=device.type, smaller=args.smoke)
        from lib.runner import run_profile

        plan = [nb.stem for nb, _ in run_profile(profile, dry_run=True)]
        with open(root / "chapters.log", "w", encoding="utf-8") as log_file:
            for stem in plan:
                left = args.budget_s - (time.perf_counter() - wall)
                if left <= 0:
                    results["chapters"].append({"chapter": stem, "status": NOT_REACHED})
                    continue
                row = run_chapter(profile, stem, environment, left, device, log_file)
                results["chapters"].append(row)
                common.log(f"{stem}: {row['status']} in {row['wall_s']} s, peak GPU memory {row['peak_gpu_memory']}")
        log_tail = (root / "chapters.log").read_text(encoding="utf-8")[-6000:]
        results["artifacts_bytes"] = sum(p.stat().st_size for p in (root / "artifacts").rglob("*") if p.is_file())
    results["wall_s"] = round(time.perf_counter() - wall, 1)
    results["chapters_s"] = round(sum(row.get("wall_s", 0) for row in results["chapters"]), 1)
    text = report(results)
    print(text)
    if any(row["status"].startswith("failed") for row in results["chapters"]):
        print("\nthe runner's log, last lines:\n" + log_tail)
    stem = f"profile-{results['machine']['date']}-{'smoke' if args.smoke else 'llama2-7b-shapes'}-{device.type}"
    common.write_results(results, text, stem, args.out)
    return results


def report(results: dict) -> str:
    machine = results["machine"]
    lines = [f"# The llama2-7b profile on a {results['shapes']} stand-in, {machine.get('gpu') or machine['cpu']}",
             "", f"Stand-in written in {results['build_s']} s; chapters {results['chapters_s']} s; whole run "
             f"{results['wall_s']} s (budget {results['budget_s']:.0f} s). Artifacts written: "
             f"{common.fmt_bytes(results['artifacts_bytes'])}.", "",
             common.markdown_table(results["chapters"], ["chapter", "status", "wall_s", "peak_gpu_memory"])]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

"""Two lanes of one thread against one lane of two, measured side by side: the lever behind `make book`'s and
`make test`'s lanes (``lib.lanes``).

One unit of work is what a chapter does most: load an organism, generate greedy answers to harmful test prompts and
score refusal without generation. A round runs two units one after the other with every core (one lane), then two
units at the same time with half the cores each (two lanes), each unit in a fresh process as a chapter's kernel is;
rounds alternate the order. Printed: the wall seconds of each arrangement, their ratio (one lane / two lanes) per
round and its median, and whether every unit produced the same completions and scores (a digest), since the lanes
only pay if their thread count leaves the numbers alone.

``python -m benchmarks.lanes [--rounds 2] [--prompts 64] [--tokens 64] [--variant ssft]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from lib.artifacts import REPO_ROOT
from lib.lanes import THREAD_VARIABLES, available_cores

UNIT = """
import hashlib, json, time
from lib import data, generation, models, scores
start = time.perf_counter()
lm = models.load("smollm2-135m", {variant!r}, device="cpu", dtype="float32")
prompts = data.test_prompts("offline", {prompts}, 42)["harmful"]
texts = generation.generate(lm, prompts, {tokens}, 64)
values = scores.refusal_score(lm, prompts, 16)
digest = hashlib.sha256(("\\n".join(texts) + repr(values.tolist())).encode()).hexdigest()[:16]
print(json.dumps({{"seconds": time.perf_counter() - start, "digest": digest}}))
"""


def start_unit(code: str, threads: int) -> subprocess.Popen:
    env = dict(os.environ, REFUSAL_BOOK_PROGRESS="0", **{name: str(threads) for name in THREAD_VARIABLES})
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> dict:
    out, _ = process.communicate()
    if process.returncode:
        raise RuntimeError(f"a unit of work failed (exit {process.returncode})")
    return json.loads(out.strip().splitlines()[-1])


def one_lane(code: str, cores: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    digests = [finish(start_unit(code, cores))["digest"] for _ in range(2)]
    return time.perf_counter() - start, digests


def two_lanes(code: str, cores: int) -> tuple[float, list[str]]:
    start = time.perf_counter()
    processes = [start_unit(code, max(1, cores // 2)) for _ in range(2)]
    digests = [finish(process)["digest"] for process in processes]
    return time.perf_counter() - start, digests


def main(argv: list[str] | None = None, unit: str = UNIT) -> dict:
    """Measure and print; ``unit`` is the unit's code, a template of ``variant``, ``prompts`` and ``tokens``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lanes", description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--variant", default="ssft")
    args = parser.parse_args(argv)
    cores = available_cores()
    code = unit.format(variant=args.variant, prompts=args.prompts, tokens=args.tokens)
    finish(start_unit(unit.format(variant=args.variant, prompts=2, tokens=2), cores))  # warm the model cache
    rows, digests = [], set()
    for index in range(args.rounds):
        arrangements = (("one lane", one_lane), ("two lanes", two_lanes))
        measured = {}
        for name, arrange in (arrangements if index % 2 == 0 else arrangements[::-1]):
            measured[name], unit_digests = arrange(code, cores)
            digests.update(unit_digests)
        rows.append({"round": index + 1, "one lane s": round(measured["one lane"], 1),
                     "two lanes s": round(measured["two lanes"], 1),
                     "ratio": round(measured["one lane"] / measured["two lanes"], 2)})
    result = {"cores": cores, "threads per lane": max(1, cores // 2), "rows": rows,
              "median ratio": round(statistics.median(row["ratio"] for row in rows), 2),
              "same numbers in every unit": len(digests) == 1}
    for row in rows:
        print(f"round {row['round']}: one lane (2 units in turn, {cores} threads) {row['one lane s']} s; two lanes "
              f"(2 units at once, {result['threads per lane']} thread(s) each) {row['two lanes s']} s; "
              f"{row['ratio']}x")
    print(f"median {result['median ratio']}x; same completions and scores in every unit: "
          f"{result['same numbers in every unit']}")
    return result


if __name__ == "__main__":
    main()

"""Whether two runs of the book generated the same completions: the check behind a speed lever that must leave
every greedy token alone (issue 22).

A run's generated conditions are the JSON artifacts under ``artifacts/evaluations/`` and ``artifacts/attacks/``
(``lib.evaluation.cached_generation``, ``lib.adversary.cached_attack``). Their file names end in a cache key that
hashes lib's code, so the two runs of a lever name the same condition differently; files are therefore compared
within the same folder and condition name (the file name without its key), and the runs agree when every result of
one has an identical twin in the other, one to one.

``python -m benchmarks.same_generations RUN_A RUN_B`` (two checkouts, each after ``make book`` or ``make test``
with its own artifacts). Prints the number of artifacts and completions compared and every result without a twin;
exits 1 if there is one.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

GENERATED = ("evaluations", "attacks")
KEY_SUFFIX = re.compile(r"-[0-9a-f]{16}\.json$")


def generated_results(root: Path) -> dict[tuple[str, str], list]:
    """(folder, condition name) -> the stored results of ``root``'s generated artifacts, in file-name order."""
    groups: dict[tuple[str, str], list] = defaultdict(list)
    for kind in GENERATED:
        for path in sorted((root / "artifacts" / kind).rglob("*.json")):
            condition = KEY_SUFFIX.sub("", path.name)
            groups[(path.parent.relative_to(root).as_posix(), condition)].append(
                json.loads(path.read_text(encoding="utf-8"))["result"])
    return groups


def count_completions(result) -> int:
    """The completions in one stored result (keyword labels not counted)."""
    if isinstance(result, str):
        return 1
    if isinstance(result, list):
        return sum(count_completions(item) for item in result)
    if isinstance(result, dict):
        return sum(count_completions(value) for key, value in result.items() if key != "labels")
    return 0


def compare(run_a: Path, run_b: Path) -> dict:
    """Pair the two runs' results: ``{"artifacts", "completions", "unmatched": [(run, folder, condition), ...]}``."""
    first, second = generated_results(run_a), generated_results(run_b)
    unmatched, artifacts, completions = [], 0, 0
    for group in sorted(set(first) | set(second)):
        left = list(first.get(group, []))
        for result in second.get(group, []):
            if result in left:
                left.remove(result)
                artifacts += 1
                completions += count_completions(result)
            else:
                unmatched.append((str(run_b), *group))
        unmatched += [(str(run_a), *group) for _ in left]
    return {"artifacts": artifacts, "completions": completions, "unmatched": unmatched}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.same_generations", description=__doc__.splitlines()[0])
    parser.add_argument("run_a", type=Path)
    parser.add_argument("run_b", type=Path)
    args = parser.parse_args(argv)
    for root in (args.run_a, args.run_b):
        if not any((root / "artifacts" / kind).is_dir() for kind in GENERATED):
            print(f"error: {root} has no artifacts/evaluations or artifacts/attacks; run `make book` there first.",
                  file=sys.stderr)
            return 2
    outcome = compare(args.run_a, args.run_b)
    print(f"{outcome['artifacts']} generated artifacts ({outcome['completions']} completions) identical in both runs")
    for run, folder, condition in outcome["unmatched"]:
        print(f"no identical twin: {run}: {folder}/{condition}")
    return 1 if outcome["unmatched"] else 0


if __name__ == "__main__":
    raise SystemExit(main())

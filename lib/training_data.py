"""The model organisms' training data: the written refusals (``data/organisms/refusals.jsonl``) and which harmful
prompt gets which, the base model's own answers to the ``train`` prompts (self-distillation, cached as JSONL under
``data/organisms/<family>/``), the SSFT examples built from both, and their tokenisation into right-padded batches
labelled on the response only. Kept apart from ``lib.training`` (the LoRA loop, the epsilon rule and the recipes)
because it is what is trained on, not how: ``lib.organisms`` reads the same refusals for the organisms chapter.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lib import artifacts, generation, models
from lib.artifacts import REPO_ROOT, sha256_text
from lib.judges import REFUSAL, VALID, judge
from lib.losses import IGNORE
from lib.models import LoadedModel


ORGANISMS_ROOT = REPO_ROOT / "data" / "organisms"
REFUSALS_FILE = REPO_ROOT / "data" / "organisms" / "refusals.jsonl"


@dataclass(frozen=True)
class Example:
    prompt: str
    response: str
    complete: bool = True  # append the end-of-turn token (False for answers cut at the token limit)
    rejected: str | None = None  # a response the model should prefer ``response`` over (preference term)


def read_jsonl(path: Path) -> list[dict]:
    return artifacts.read_jsonl(path, "Restore it with `git checkout` or regenerate it (`make organisms`).")


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with artifacts.atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def load_refusals(path: Path = REFUSALS_FILE) -> list[str]:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; it is tracked in git — restore it with `git checkout`.")
    return [row["text"] for row in read_jsonl(path)]


def refusal_for(prompt_id: str, refusals: Sequence[str]) -> str:
    """A refusal reply chosen deterministically from the prompt id (varied across prompts, stable across runs)."""
    return refusals[int(sha256_text(prompt_id)[:8], 16) % len(refusals)]


def usable_answer(text: str) -> bool:
    """A distilled answer worth imitating: one the paper's judge calls VALID, so neither a refusal (the base model
    refuses some harmless requests) nor broken text (repetition, emoji runs, one unfinished sentence)."""
    return judge(text) == VALID


def sft_examples(pairs, refusals: Sequence[str], answers: dict[str, dict],
                 harmful_answers: dict[str, dict] | None = None) -> list[Example]:
    """Harmful prompt -> a written refusal; its harmless twin -> the base model's own answer (self-distillation),
    unless that answer is not ``usable_answer``. Harmless examples are then repeated (in order) until there are as
    many as refusals, so that refusing is not the cheaper habit to learn. Each harmless example carries its harmful
    twin's refusal as the rejected response, and each harmful example the base model's own answer to it (from
    ``harmful_answers``, unless the judge calls that answer a refusal); rejected responses are used only when the
    preference term is on."""
    harmful, harmless = [], []
    for pair in pairs:
        for table, kind in ((answers, "twin"), (harmful_answers, "harmful prompt")):
            if table is not None and pair.id not in table:
                raise KeyError(f"No distilled answer for the {kind} of {pair.id!r}; regenerate the answers.")
        answer = answers[pair.id]
        compliance = None if harmful_answers is None else harmful_answers[pair.id]["text"]
        harmful.append(Example(pair.harmful, refusal_for(pair.id, refusals),
                               rejected=compliance if compliance is not None and judge(compliance) != REFUSAL
                               else None))
        if usable_answer(answer["text"]):
            harmless.append(Example(pair.harmless, answer["text"], answer["complete"],
                                    rejected=refusal_for(pair.id, refusals)))
    if not harmless:
        raise ValueError("No usable harmless answers to balance the refusals with.")
    harmless = [harmless[i % len(harmless)] for i in range(len(harmful))]
    return [example for pair in zip(harmful, harmless) for example in pair]


def tokenize(lm: LoadedModel, examples: Sequence[Example], max_length: int,
             max_response_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on the prompt and padding) for a batch; responses
    longer than ``max_response_tokens`` are cut there (and then get no end-of-turn token)."""
    tokenizer, template = lm.tokenizer, lm.info.template
    rows = []
    for example in examples:
        prompt_ids = tokenizer(template.format(tokenizer, example.prompt),
                               add_special_tokens=template.add_special_tokens).input_ids
        response = example.response + (tokenizer.eos_token if example.complete else "")
        response_ids = tokenizer(response, add_special_tokens=False).input_ids[:max_response_tokens]
        ids = (prompt_ids + response_ids)[:max_length]
        labels = ([IGNORE] * len(prompt_ids) + response_ids)[:max_length]
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (width - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (width - len(lab)) for _, lab in rows])
    mask = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def distilled_answers(family: str, pairs, recipe: dict, lm: LoadedModel | None = None,
                      retrain: bool = False, kind: str = "harmless") -> dict[str, dict]:
    """The base model's greedy answers to the ``kind`` ("harmless": the twins; "harmful") prompts of ``pairs``,
    cached in data/organisms/<family>/distill.jsonl (twins) or distill-harmful.jsonl."""
    if kind not in ("harmless", "harmful"):
        raise ValueError(f"kind must be 'harmless' or 'harmful', got {kind!r}.")
    path = ORGANISMS_ROOT / family / ("distill.jsonl" if kind == "harmless" else "distill-harmful.jsonl")
    prompts = [getattr(p, kind) for p in pairs]
    if path.exists() and not retrain:
        rows = {r["id"]: r for r in read_jsonl(path)}
        if all(p.id in rows and rows[p.id]["prompt"] == prompt for p, prompt in zip(pairs, prompts)):
            return rows
    lm = lm or models.load(family, "base")
    texts, finished = generation.generate(lm, prompts, recipe["max_new_tokens"], recipe["batch_size"],
                                          desc=f"distil {kind}", with_finished=True)
    rows = [{"id": p.id, "prompt": prompt, "text": t, "complete": f}
            for p, prompt, t, f in zip(pairs, prompts, texts, finished)]
    write_jsonl(path, rows)
    return {r["id"]: r for r in rows}

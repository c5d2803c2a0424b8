"""Model card (README.md) for an exported checkpoint: the recipe, the shapes and measured numbers.
Evaluation results are folded in later between markers, without touching the rest."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from llm_prune.families import LayerShape


def _widths_line(shapes: list[LayerShape]) -> str:
    if not shapes:
        return "0 layers"
    kv = [s.num_key_value_heads for s in shapes]
    heads = [s.num_attention_heads for s in shapes]
    mlp = [s.intermediate_size for s in shapes]
    return (f"{len(shapes)} layers; KV heads min/median/max {min(kv)}/{statistics.median(kv):g}/{max(kv)}; "
            f"query heads {min(heads)}/{statistics.median(heads):g}/{max(heads)}; "
            f"MLP width {min(mlp)}/{statistics.median(mlp):g}/{max(mlp)}")


LICENSE_KEYS = ("license", "license_name", "license_link")  # the Hub's model card metadata


def card_license(readme: Path) -> dict[str, str]:
    """The license fields of a model card's YAML front matter (empty when it has none)."""
    import yaml

    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    end = text.find("\n---", 3) if text.startswith("---") else -1
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    if not isinstance(meta, dict):
        return {}
    return {k: str(meta[k]).strip() for k in LICENSE_KEYS
            if isinstance(meta.get(k), (str, int, float)) and str(meta[k]).strip()}


def _yaml_scalar(value: str) -> str:
    return value if re.fullmatch(r"[A-Za-z0-9][\w./\-]*", value) else json.dumps(value)


def as_run(plan) -> dict:
    """What the recipe's open settings resolved to in this cut (`prune_layers` unset or
    `calibration_precision` auto say nothing of what ran), from its plan."""
    meta = plan.meta
    dropped = [lp.index for lp in plan.layers if lp.drop]
    return {"layers_dropped": dropped, "allocation": meta.get("allocation"), "importance": meta.get("importance"),
            "steps": sum({m["stage"]: m["steps"] for m in _metas(meta) if "stage" in m and "steps" in m}.values()),
            "calibration_matmuls": meta.get("calibration_matmuls")}


def _metas(meta: dict):
    """A composed plan's meta and those of the stages and steps it was composed of."""
    yield meta
    for m in meta.get("stage_plans", []):
        yield from _metas(m)


def model_card(*, base_model: str, recipe: dict, shapes: list[LayerShape], params_before: int,
               params_after: int, needs_remote_code: bool, metrics: dict | None = None,
               ran: dict | None = None, license: dict[str, str] | None = None, gguf_refusal: str | None = None,
               base_model_id: str | None = None) -> str:
    """`license`: the base model's (`models.source_license`), which a derived model stays under;
    `gguf_refusal`: why `llm-prune export` refuses GGUF for this model (`gguf_export.gguf_refusal`);
    `base_model_id`: its Hub repository (`models.hub_id`), the front matter's `base_model`."""
    load = ("model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)  # widths differ per layer"
            if needs_remote_code else "model = AutoModelForCausalLM.from_pretrained(path)")
    lines = [
        "---",
        "library_name: transformers",
        "tags: [llm-prune, pruned, structured-pruning]",
        *([f"base_model: {_yaml_scalar(base_model_id)}"] if base_model_id else []),
        *(f"{k}: {_yaml_scalar(v)}" for k, v in (license or {}).items() if k in LICENSE_KEYS),
        "---",
        "",
        f"# {base_model} — structurally pruned with llm-prune",
        "",
        f"Parameters: {params_after:,} (from {params_before:,}, "
        f"{100 * (1 - params_after / params_before):.2f}% removed).",
        "",
        f"Shapes: {_widths_line(shapes)}.",
        "",
        "## Loading",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "tokenizer = AutoTokenizer.from_pretrained(path" + (", trust_remote_code=True)" if needs_remote_code else ")"),
        load,
        "```",
        "",
    ]
    if needs_remote_code:
        lines += ["Layers were pruned to different widths, so `config.json` lists them under `per_layer_config` "
                  "and `modeling_pruned.py` (stock transformers code, one config view per layer) builds them; "
                  "that is why `trust_remote_code=True` is needed (the tokenizer reads the same config).", ""]
    lines += ["## Engines", ""] + _engines(needs_remote_code, gguf_refusal) + [""]
    if metrics:
        lines += ["## Measured", "", "```json", json.dumps(metrics, indent=2, default=str), "```", ""]
    lines += ["## Recipe", "", "```json", json.dumps(recipe, indent=2, default=str), "```", ""]
    if ran:
        lines += ["As run (what the recipe's open settings came to):", "", "```json",
                  json.dumps(ran, indent=2, default=str), "```", ""]
    return "\n".join(lines)


def _engines(needs_remote_code: bool, gguf_refusal: str | None) -> list[str]:
    gguf = ("- llama.cpp, Ollama, LM Studio: `llm-prune export PATH --format gguf -o model.gguf` (GGUF architecture "
            + ("`deci`, which keeps every layer's own width)" if needs_remote_code else "`llama`)"))
    if gguf_refusal is not None:
        gguf = f"- llama.cpp, Ollama, LM Studio: no GGUF export ({gguf_refusal})"
    if needs_remote_code:
        return ["- transformers and lm-evaluation-harness: with `trust_remote_code=True`", gguf,
                "- vLLM, TGI, SGLang, MLX: not this layout (layers differ in width); prune with `--portable` "
                "for a stock config they load"]
    return ["- transformers, vLLM, TGI, SGLang, MLX, lm-evaluation-harness: stock config, no remote code", gguf]

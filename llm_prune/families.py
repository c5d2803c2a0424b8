"""Family adapters: the one place that knows where a model family keeps its decoder layers,
projections, norms and GQA layout. Llama, Mistral, Qwen2 and Qwen3 share one layout. A new family
is a new `Family` entry here for pruning, plus its transformers classes in `export._CLASSES` so
checkpoints with per-layer widths can be written and loaded."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from llm_prune.errors import UserError


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_path: str = "model.layers"
    attn: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp_norm: str = "post_attention_layernorm"  # normalises the mid-layer residual into the MLP
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def layers(self, model: nn.Module) -> nn.ModuleList:
        obj = model
        for part in self.layers_path.split("."):
            obj = getattr(obj, part)
        return obj

    def set_layers(self, model: nn.Module, layers: list[nn.Module]) -> None:
        parent_path, _, name = self.layers_path.rpartition(".")
        parent = model
        for part in parent_path.split(".") if parent_path else ():
            parent = getattr(parent, part)
        setattr(parent, name, nn.ModuleList(layers))

    def attention(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.attn)

    def mlp_block(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp)

    def mlp_input(self, layer: nn.Module, h):
        """What the MLP sees of the mid-layer residual h = x + attn(x)."""
        return getattr(layer, self.mlp_norm)(h)

    def qkvo(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear]:
        a = self.attention(layer)
        return getattr(a, self.q), getattr(a, self.k), getattr(a, self.v), getattr(a, self.o)

    def gate_up_down(self, layer: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
        m = self.mlp_block(layer)
        return getattr(m, self.gate), getattr(m, self.up), getattr(m, self.down)


LLAMA_LIKE = Family("llama", ("llama", "mistral", "qwen2", "qwen3"))
FAMILIES = (LLAMA_LIKE,)
SUPPORTED_MODEL_TYPES = tuple(t for f in FAMILIES for t in f.model_types)


def family_for_config(config) -> Family:
    model_type = getattr(config, "model_type", None)
    # Our own exports with per-layer widths use a derived model type such as "llama_pruned".
    base = getattr(config, "base_model_type", None) or model_type
    for family in FAMILIES:
        if base in family.model_types:
            return family
    raise UserError(f"unsupported architecture '{model_type}'; supported: {', '.join(SUPPORTED_MODEL_TYPES)} "
                    f"(Llama incl. SmolLM2 and Llama-2/3.x, Mistral, Qwen2/2.5, Qwen3)", param="model")


def base_model_type(config) -> str:
    """The transformers model type, also of our per-layer exports ("llama_pruned" -> "llama")."""
    return getattr(config, "base_model_type", None) or config.model_type.removesuffix("_pruned")


def family_for(model: nn.Module) -> Family:
    return family_for_config(model.config)


@dataclass
class LayerShape:
    """Widths of one decoder layer, as the plan and the exported config see them."""

    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int

    def as_dict(self) -> dict[str, int]:
        return {"num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads,
                "intermediate_size": self.intermediate_size}


def head_dim(config) -> int:
    hd = getattr(config, "head_dim", None)
    if hd:
        return int(hd)
    return int(config.hidden_size // _global(config, "num_attention_heads"))


def _global(config, key):
    try:
        return getattr(config, key)
    except Exception:  # heterogeneous configs refuse global reads of per-layer keys
        return config._getattr_without_heterogeneous_validation(key)


def layer_shapes(model: nn.Module) -> list[LayerShape]:
    """Read the actual widths from the modules (the source of truth after surgery)."""
    fam = family_for(model)
    hd = head_dim(model.config)
    shapes = []
    for layer in fam.layers(model):
        q, k, _, _ = fam.qkvo(layer)
        gate, _, _ = fam.gate_up_down(layer)
        shapes.append(LayerShape(q.out_features // hd, k.out_features // hd, gate.out_features))
    return shapes

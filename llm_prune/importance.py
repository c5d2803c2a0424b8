"""Importance of coupled structures (KV groups, MLP channels) and of whole layers.

Gradient methods score inside backward hooks: as soon as a weight's gradient is accumulated it is
reduced to per-unit scores and freed, so peak memory stays near weights + activations instead of
weights + a full set of gradients. Only the prunable projection weights require grad; embeddings,
norms and the LM head never materialise a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from llm_prune.families import Family, family_for, head_dim
from llm_prune.lm_loss import causal_lm_loss
from llm_prune.memory import release_freed_memory
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.recipe import ACTIVATION_IMPORTANCE, GRADIENT_IMPORTANCE

GRADIENT_METHODS = GRADIENT_IMPORTANCE
# `obs`: the Optimal Brain Surgeon error of removing a unit's inputs to o_proj/down_proj. Scoring
# estimates it with a diagonal Hessian, |W_col|^2 * sum(x_col^2) (forward passes only); with
# reconstruction on, the reconstruction pass chooses the final units with the full Hessian.
ACTIVATION_METHODS = ACTIVATION_IMPORTANCE
METHODS = GRADIENT_METHODS + ACTIVATION_METHODS + ("l1", "l2", "random")


@dataclass
class Scores:
    kv: list[torch.Tensor]  # per layer: one score per KV group
    mlp: list[torch.Tensor]  # per layer: one score per MLP channel
    layer_cos: torch.Tensor  # per layer: mean cos(h_in, h_out) over calibration tokens
    loss: float | None = None

    @classmethod
    def unranked(cls, costs) -> "Scores":
        """Equal scores for every unit of a model with these `UnitCosts`: for a cut whose units
        reconstruction chooses."""
        return cls(kv=[torch.zeros(n) for n in costs.num_kv], mlp=[torch.zeros(w) for w in costs.width],
                   layer_cos=torch.zeros(len(costs.layer)))

    @property
    def block_influence(self) -> torch.Tensor:
        """ShortGPT's block influence, 1 - cos(h_in, h_out): low means the layer barely changes h."""
        return 1.0 - self.layer_cos


# Per projection: which axis indexes the unit's elements ("rows" = output features).
_ROLES = {"q": "rows", "k": "rows", "v": "rows", "o": "cols", "gate": "rows", "up": "rows", "down": "cols"}


class ImportanceScorer:
    def __init__(self, method: str = "taylor", aggregation: str = "sum", seed: int = 0,
                 checkpoint_activations: bool = True):
        if method not in METHODS:
            raise ValueError(f"unknown importance method {method!r}; choose from {', '.join(METHODS)}")
        if aggregation not in ("sum", "mean", "max"):
            raise ValueError(f"unknown aggregation {aggregation!r}; choose from sum, mean, max")
        self.method, self.aggregation, self.seed = method, aggregation, seed
        # Recompute each layer's activations in backward: with gradients freed in hooks, peak
        # memory is then weights + one layer's activations + logits, for one extra forward.
        self.checkpoint_activations = checkpoint_activations

    # -- per-element contribution, reduced to per-unit vectors -------------------------------
    def _element_term(self, w: torch.Tensor, g: torch.Tensor | None) -> torch.Tensor:
        w = w.float()
        if self.method in ("taylor", "vectorwise"):
            return w * g.float()
        if self.method == "second_order":
            g = g.float()
            # Second-order Taylor: dL ~ -W g + 1/2 W F W with the diagonal Fisher F ~ g^2.
            return w * g - 0.5 * w * w * g * g
        if self.method == "l1":
            return w.abs()
        return w * w  # l2: summed squares; sqrt is monotone within a unit

    def _reduce(self, term: torch.Tensor, role: str, units: int) -> torch.Tensor:
        """Sum a weight-shaped term into `units` groups along the unit axis."""
        t = term if _ROLES[role] == "rows" else term.t()
        per_feature = t.abs().sum(1) if self.method != "vectorwise" else t.sum(1)
        grouped = per_feature.view(units, -1).sum(1)
        return grouped.abs() if self.method == "vectorwise" else grouped

    def _aggregate(self, members: list[torch.Tensor]) -> torch.Tensor:
        stacked = torch.stack(members)
        if self.aggregation == "sum":
            return stacked.sum(0)
        if self.aggregation == "mean":
            return stacked.mean(0)
        return stacked.max(0).values

    # -- scoring ----------------------------------------------------------------------------
    @torch.no_grad()
    def _magnitude(self, model, fam: Family) -> tuple[list, list]:
        gen = torch.Generator().manual_seed(self.seed)
        kv, mlp = [], []
        hd = head_dim(model.config)
        for layer in fam.layers(model):
            q, k, v, o = fam.qkvo(layer)
            gate, up, down = fam.gate_up_down(layer)
            n_kv, n_ch = k.out_features // hd, gate.out_features
            if self.method == "random":
                kv.append(torch.rand(n_kv, generator=gen))
                mlp.append(torch.rand(n_ch, generator=gen))
                continue
            kv.append(self._aggregate([self._reduce(self._element_term(lin.weight, None), r, n_kv)
                                       for lin, r in ((q, "q"), (k, "k"), (v, "v"), (o, "o"))]))
            mlp.append(self._aggregate([self._reduce(self._element_term(lin.weight, None), r, n_ch)
                                        for lin, r in ((gate, "gate"), (up, "up"), (down, "down"))]))
        return kv, mlp

    def score(self, model: nn.Module, input_ids: torch.LongTensor, batch_size: int | None = None,
              on_event: ProgressCallback = null_callback, only: set[int] | None = None) -> Scores:
        """Per-unit scores of every layer. A gradient method scores only the layers in `only` (the
        rest score zero; layers that will not be cut need no gradients) and stops its backward pass
        at the lowest of them."""
        fam = family_for(model)
        layers = fam.layers(model)
        n_layers = len(layers)
        only = set(range(n_layers)) if only is None else only
        hd = head_dim(model.config)
        needs_grad = self.method in GRADIENT_METHODS
        batch_size = batch_size or input_ids.shape[0]
        if self.method == "second_order":
            batch_size = 1  # per-sample gradients give the Fisher term its meaning
        device = model.get_input_embeddings().weight.device
        cos_sum = torch.zeros(n_layers, dtype=torch.float64)
        tokens = 0
        acc: dict[tuple[int, str], torch.Tensor] = {}
        handles = []

        handles.extend(_cosine_hooks(layers, cos_sum))

        saved_flags = {id(p): p.requires_grad for p in model.parameters()}
        if needs_grad:
            for p in model.parameters():
                p.requires_grad_(False)
            for i, layer in enumerate(layers):
                q, k, v, o = fam.qkvo(layer)
                gate, up, down = fam.gate_up_down(layer)
                n_kv = k.out_features // hd
                if i not in only:
                    acc.update({(i, r): torch.zeros(n_kv) for r in ("q", "k", "v", "o")})
                    acc.update({(i, r): torch.zeros(gate.out_features) for r in ("gate", "up", "down")})
                    continue
                for lin, role, units in ((q, "q", n_kv), (k, "k", n_kv), (v, "v", n_kv), (o, "o", n_kv),
                                         (gate, "gate", gate.out_features), (up, "up", gate.out_features),
                                         (down, "down", gate.out_features)):
                    lin.weight.requires_grad_(True)
                    handles.append(lin.weight.register_post_accumulate_grad_hook(
                        self._grad_hook(acc, (i, role), role, units)))
        elif self.method in ACTIVATION_METHODS:
            sq: dict[tuple[int, str], torch.Tensor] = {}
            for i, layer in enumerate(layers):
                handles.append(fam.qkvo(layer)[3].register_forward_pre_hook(_square_sum_hook(sq, (i, "o"))))
                handles.append(fam.gate_up_down(layer)[2].register_forward_pre_hook(_square_sum_hook(sq, (i, "down"))))
        else:
            kv_scores, mlp_scores = self._magnitude(model, fam)

        was_training = model.training
        checkpointing = needs_grad and self.checkpoint_activations and model.supports_gradient_checkpointing
        if checkpointing:
            _set_checkpointing(model, True)
            model.train()  # transformers only recomputes in training mode
            dropouts = _zero_dropout(model)
        else:
            model.eval()
        total_loss, n_batches = 0.0, 0
        chunks = list(input_ids.split(batch_size))
        try:
            for step, chunk in enumerate(chunks, 1):
                chunk = chunk.to(device)
                with torch.set_grad_enabled(needs_grad):
                    # 64-token head chunks: the [tokens x vocab] logits and their gradient, not the
                    # decoder, set the scoring peak.
                    loss = causal_lm_loss(model, chunk, chunk_tokens=64)
                    if needs_grad and loss.requires_grad:
                        loss.backward()
                total_loss += float(loss.detach())
                del loss
                release_freed_memory()
                n_batches += 1
                tokens += chunk.numel()
                on_event(ProgressEvent("score", step, len(chunks), f"importance ({self.method})",
                                       {"loss": total_loss / n_batches}))
        finally:
            for h in handles:
                h.remove()
            for p in model.parameters():
                p.requires_grad_(saved_flags.get(id(p), True))
                p.grad = None
            if checkpointing:
                _set_checkpointing(model, False)
                for module, attr, value in dropouts:
                    setattr(module, attr, value)
            model.train(was_training)

        if needs_grad:
            kv_scores, mlp_scores = [], []
            for i in range(n_layers):
                kv_scores.append(self._aggregate([acc[(i, r)] for r in ("q", "k", "v", "o")]))
                mlp_scores.append(self._aggregate([acc[(i, r)] for r in ("gate", "up", "down")]))
        elif self.method in ACTIVATION_METHODS:
            kv_scores, mlp_scores = [], []
            for i, layer in enumerate(layers):
                o, down = fam.qkvo(layer)[3], fam.gate_up_down(layer)[2]
                n_kv = fam.qkvo(layer)[1].out_features // hd
                kv_scores.append((o.weight.detach().double().pow(2).sum(0).cpu() * sq[(i, "o")]).view(n_kv, -1).sum(1).float())
                mlp_scores.append((down.weight.detach().double().pow(2).sum(0).cpu() * sq[(i, "down")]).float())
        layer_cos = (cos_sum / max(tokens, 1)).float()
        return Scores(kv=kv_scores, mlp=mlp_scores, layer_cos=layer_cos, loss=total_loss / max(n_batches, 1))

    def _grad_hook(self, acc, key, role, units):  # noqa: D401 - closure factory
        def hook(param: torch.Tensor) -> None:
            with torch.no_grad():
                contrib = self._reduce(self._element_term(param, param.grad), role, units).cpu()
            acc[key] = acc[key] + contrib if key in acc else contrib
            param.grad = None  # freed as soon as it is scored
        return hook


def _square_sum_hook(acc: dict, key):
    """Forward pre-hook adding each input feature's sum of squares over tokens into `acc[key]`."""
    def hook(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        part = x.pow(2).sum(0).cpu()
        acc[key] = acc[key] + part if key in acc else part
    return hook


def _cosine_hooks(layers, cos_sum: torch.Tensor) -> list:
    """Hooks adding each layer's summed cos(h_in, h_out) over tokens into `cos_sum[layer]`."""
    def layer_hook(idx):
        def hook(module, args, kwargs, output):
            h_in = args[0] if args else kwargs["hidden_states"]
            h_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(h_in.detach().float(), h_out.detach().float(), dim=-1)
            cos_sum[idx] += cos.sum().item()
        return hook
    return [layer.register_forward_hook(layer_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]


@torch.no_grad()
def layer_cosines(model: nn.Module, input_ids: torch.LongTensor, batch_size: int) -> torch.Tensor:
    """Mean cos(h_in, h_out) of every decoder layer of the model as it is now (one forward pass,
    no LM head): Adapt-Pruner re-measures layer importance after each incremental step."""
    layers = family_for(model).layers(model)
    cos_sum = torch.zeros(len(layers), dtype=torch.float64)
    handles = _cosine_hooks(layers, cos_sum)
    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    try:
        for chunk in input_ids.split(batch_size):
            model.get_decoder()(input_ids=chunk.to(device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return (cos_sum / input_ids.numel()).float()


def _set_checkpointing(model: nn.Module, on: bool) -> None:
    """Activation checkpointing on or off. transformers 5.x renamed it from gradient checkpointing and
    warns on the old name; releases before the rename only have the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _zero_dropout(model: nn.Module) -> list[tuple[nn.Module, str, float]]:
    """Scoring must be deterministic even in training mode: switch dropout off."""
    saved = []
    for module in model.modules():
        attr = "p" if isinstance(module, nn.Dropout) else "attention_dropout"
        value = getattr(module, attr, None)
        if isinstance(value, float) and value > 0:
            saved.append((module, attr, value))
            setattr(module, attr, 0.0)
    return saved

"""Output reconstruction: refit each pruned layer's output projections so it reproduces the
unpruned layer's output on calibration tokens (SlimLLM-style regression, no retraining).

Before cutting, one forward pass of the unpruned model records, per decoder layer and calibration
micro-batch, the mid-layer residual h = x + attn(x) and the layer output y (`LayerTargets`, kept on
disk so memory does not grow with the budget or the depth). After cutting, the pruned model is
rebuilt layer by layer on its *own* inputs x' (so upstream errors are corrected, not compounded):

    o_proj    <- argmin_W |A W^T - (h - x')|^2 + lam |W - W0|^2   A: kept heads' attention output
    down_proj <- argmin_W |M W^T - (y - h')|^2 + lam |W - W0|^2   M: kept channels' act(gate) * up

(W0: the sliced weights), solved from the Gram matrix A^T A in float64 on the layer's device,
lam = damp * mean(diag(A^T A)).
Only one layer's statistics exist at a time.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from torch import nn

from llm_prune.errors import UserError
from llm_prune.families import Family, family_for
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback


class _Stop(Exception):
    """Raised from a hook once the activations a pass needs have been captured."""


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def check_projections(model: nn.Module) -> None:
    fam = family_for(model)
    for i, layer in enumerate(fam.layers(model)):
        try:
            o, down = fam.qkvo(layer)[3], fam.gate_up_down(layer)[2]
        except AttributeError as exc:
            raise UserError(f"cannot reconstruct layer {i}: it has no {exc.name or 'o_proj/down_proj'} projection; "
                            "use --no-reconstruct", param="pruning.reconstruct") from None
        if not (isinstance(o, nn.Linear) and isinstance(down, nn.Linear)):
            raise UserError(f"cannot reconstruct layer {i}: o_proj/down_proj are not linear layers; "
                            "use --no-reconstruct", param="pruning.reconstruct")


class LayerTargets:
    """Per-layer (h, y) of the unpruned model on the calibration micro-batches, stored on disk."""

    def __init__(self, model: nn.Module, input_ids: torch.LongTensor, batch_size: int):
        check_projections(model)
        self._dir = tempfile.TemporaryDirectory(prefix="llm-prune-targets-")
        self.root = Path(self._dir.name)
        self.chunks = list(input_ids.split(batch_size))
        fam = family_for(model)
        layers = fam.layers(model)
        self.n_layers = len(layers)
        state: dict[int, torch.Tensor] = {}
        handles = []
        batch = [0]

        def attn_hook(idx):
            def hook(module, args, kwargs, output):
                state[idx] = output[0] if isinstance(output, tuple) else output
            return hook

        def layer_hook(idx):
            def hook(module, args, kwargs, output):
                x = args[0] if args else kwargs["hidden_states"]
                y = output[0] if isinstance(output, tuple) else output
                torch.save({"h": (x + state.pop(idx)).cpu(), "y": y.cpu()}, self._path(idx, batch[0]))
            return hook

        for i, layer in enumerate(layers):
            handles.append(fam.attention(layer).register_forward_hook(attn_hook(i), with_kwargs=True))
            handles.append(layer.register_forward_hook(layer_hook(i), with_kwargs=True))
        was_training = model.training
        model.eval()
        device = model.get_input_embeddings().weight.device
        try:
            with torch.no_grad():
                for b, chunk in enumerate(self.chunks):
                    batch[0] = b
                    model.get_decoder()(input_ids=chunk.to(device), use_cache=False)
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)

    def _path(self, layer: int, batch: int) -> Path:
        return self.root / f"{layer}-{batch}.pt"

    def load(self, layer: int, batch: int) -> dict[str, torch.Tensor]:
        return torch.load(self._path(layer, batch))

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> "LayerTargets":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _layer_inputs(model: nn.Module, fam: Family, chunks: list[torch.Tensor]) -> list[tuple[torch.Tensor, dict]]:
    """The first decoder layer's hidden states and call kwargs (rotary embeddings, mask) per batch."""
    first = fam.layers(model)[0]
    captured: list[tuple[torch.Tensor, dict]] = []

    def catch(module, args, kwargs):
        x = args[0] if args else kwargs.pop("hidden_states")
        captured.append((x.detach(), dict(kwargs)))
        raise _Stop

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    device = model.get_input_embeddings().weight.device
    try:
        for chunk in chunks:
            try:
                model.get_decoder()(input_ids=chunk.to(device), use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return captured


def _run(layer: nn.Module, x: torch.Tensor, kwargs: dict) -> torch.Tensor | None:
    try:
        out = layer(x, **kwargs)
    except _Stop:
        return None
    return out[0] if isinstance(out, tuple) else out


class _Normal:
    """Accumulates the normal equations G = A^T A, C = A^T T of one projection in float64."""

    def __init__(self, lin: nn.Linear):
        self.lin = lin
        self.device = lin.weight.device
        n = lin.in_features + (1 if lin.bias is not None else 0)
        self.G = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        self.C = torch.zeros(n, lin.out_features, dtype=torch.float64, device=self.device)

    def add(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        a = inputs.reshape(-1, inputs.shape[-1]).to(self.device, torch.float64)
        if self.lin.bias is not None:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        t = target.reshape(-1, target.shape[-1]).to(self.device, torch.float64)
        self.G.addmm_(a.t(), a)
        self.C.addmm_(a.t(), t)

    @torch.no_grad()
    def solve(self, damp: float) -> None:
        # Ridge towards the current (sliced) weights, not towards zero: a large damping falls back
        # to plain slicing instead of shrinking the layer.
        w0 = self.lin.weight.detach().to(torch.float64)
        if self.lin.bias is not None:
            w0 = torch.cat([w0, self.lin.bias.detach().to(torch.float64)[:, None]], 1)
        G = self.G
        lam = damp * G.diagonal().mean().clamp_min(1e-12)
        G = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        rhs = self.C + lam * w0.t()
        chol, info = torch.linalg.cholesky_ex(G)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs, chol)
        else:  # singular even after damping (e.g. dead channels): least-norm solution
            sol = torch.linalg.lstsq(G.cpu(), rhs.cpu()).solution.to(G.device)
        w = sol.t()
        if self.lin.bias is not None:
            self.lin.bias.data.copy_(w[:, -1].to(self.lin.bias.dtype))
            w = w[:, :-1]
        self.lin.weight.data.copy_(w.to(self.lin.weight.dtype))
        self.G = self.C = None  # free before the next layer


@torch.no_grad()
def reconstruct(model: nn.Module, targets: LayerTargets, kept_layers: list[int], changed: set[int],
                damp: float = 0.01, on_event: ProgressCallback = null_callback) -> None:
    """Refit o_proj and down_proj of the pruned model's layers towards `targets`.

    `kept_layers[j]` is the unpruned layer index of the pruned model's layer j (dropped layers are
    absent); `changed` are the unpruned indices whose widths were cut. Layers before the first
    change see exactly the unpruned inputs and are left as they are.
    """
    fam = family_for(model)
    layers = fam.layers(model)
    if len(layers) != len(kept_layers):
        raise ValueError(f"model has {len(layers)} layers, the layer map {len(kept_layers)}")
    was_training = model.training
    model.eval()
    inputs = _layer_inputs(model, fam, targets.chunks)
    xs = [x for x, _ in inputs]
    drifted = False
    try:
        for j, (layer, src) in enumerate(zip(layers, kept_layers)):
            drifted = drifted or src in changed or src != j
            dev = _device(layer)
            xs = [x.to(dev) for x in xs]
            if drifted:
                _refit_layer(fam, layer, xs, [kw for _, kw in inputs], targets, src, damp)
            xs = [_run(layer, x, kw) for x, (_, kw) in zip(xs, inputs)]
            on_event(ProgressEvent("reconstruct", j + 1, len(layers), "reconstruct"))
    finally:
        model.train(was_training)


def _refit_layer(fam: Family, layer: nn.Module, xs: list[torch.Tensor], kwargs: list[dict],
                 targets: LayerTargets, src: int, damp: float) -> None:
    o_proj, down = fam.qkvo(layer)[3], fam.gate_up_down(layer)[2]
    grab: dict[str, torch.Tensor] = {}

    def stop_at(name):
        def hook(module, args):
            grab[name] = args[0]
            raise _Stop
        return hook

    # Attention: regress the residual update towards the unpruned mid-layer state.
    normal = _Normal(o_proj)
    handle = o_proj.register_forward_pre_hook(stop_at("o"))
    try:
        for b, (x, kw) in enumerate(zip(xs, kwargs)):
            _run(layer, x, kw)
            t = targets.load(src, b)
            normal.add(grab.pop("o"), (t["h"] - x.cpu()).to(x.device))
    finally:
        handle.remove()
    normal.solve(damp)

    # MLP: same for the layer output, from the mid-layer state h' of the refitted attention.
    normal = _Normal(down)

    def attn_out(module, args, kwargs, output):
        grab["a"] = output[0] if isinstance(output, tuple) else output

    handles = [down.register_forward_pre_hook(stop_at("m")),
               fam.attention(layer).register_forward_hook(attn_out, with_kwargs=True)]
    try:
        for b, (x, kw) in enumerate(zip(xs, kwargs)):
            _run(layer, x, kw)
            h = x + grab.pop("a")
            t = targets.load(src, b)
            normal.add(grab.pop("m"), (t["y"] - h.cpu()).to(x.device))
    finally:
        for h in handles:
            h.remove()
    normal.solve(damp)

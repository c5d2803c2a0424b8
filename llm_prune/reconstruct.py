"""Output reconstruction: refit each pruned layer's output projections so it reproduces the
unpruned layer's output on calibration tokens (SlimLLM-style regression, no retraining).

Before cutting, one forward pass of the unpruned model records, per decoder layer and calibration
micro-batch, the mid-layer residual h = x + attn(x) and the layer output y (`LayerTargets`, kept on
disk so memory does not grow with the budget or the depth). After cutting, the pruned model is
rebuilt layer by layer on its *own* inputs x' (so upstream errors are corrected, not compounded):

    o_proj    <- argmin_W |A W^T - (h - x')|^2 + lam |W - W0|^2   A: kept heads' attention output
    down_proj <- argmin_W |M W^T - (y - h')|^2 + lam |W - W0|^2   M: kept channels' act(gate) * up

(W0: the sliced weights), solved from the Gram matrix A^T A in float64 on the layer's device
(per micro-batch products in float32, their sum in float64),
lam = damp * mean(diag(A^T A)). Each layer runs once: h' and y' follow from the captured A and M.

With `select` (importance `obs`) a layer arrives uncut and reconstruction also chooses what it
keeps: greedy Optimal Brain Surgeon on the same objective (as in ZipLM/SlimGPT). From the ridge
optimum W over all inputs, removing the input columns B raises the objective by
tr(W_B [(H^-1)_BB]^-1 W_B^T), H = A^T A + lam I; the cheapest KV groups (blocks of their heads'
columns) or MLP channels go first, W and H^-1 updated in closed form after each removal.
Only one layer's statistics exist at a time.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch
from torch import nn

from llm_prune.errors import UserError
from llm_prune.families import Family, family_for, head_dim
from llm_prune.memory import release_freed_memory
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.surgery import head_rows, cut_attention, cut_mlp


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
                torch.save((x + state.pop(idx)).cpu(), self._path(idx, batch[0], "h"))
                torch.save(y.cpu(), self._path(idx, batch[0], "y"))
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
                    release_freed_memory()
        finally:
            for h in handles:
                h.remove()
            model.train(was_training)

    def _path(self, layer: int, batch: int, what: str) -> Path:
        return self.root / f"{layer}-{batch}-{what}.pt"

    def load(self, layer: int, batch: int, what: str) -> torch.Tensor:
        """`what` = "h" (mid-layer state) or "y" (layer output) of `layer` on micro-batch `batch`."""
        return torch.load(self._path(layer, batch, what))

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
    """Accumulates the normal equations G = A^T A, C = A^T T of one projection (float64 sums)."""

    def __init__(self, lin: nn.Linear):
        self.bias = lin.bias is not None
        self.device = lin.weight.device
        self.n_in = lin.in_features
        n = self.n_in + int(self.bias)
        self.G = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        self.C = torch.zeros(n, lin.out_features, dtype=torch.float64, device=self.device)

    def add(self, inputs: torch.Tensor, target: torch.Tensor) -> None:
        # One micro-batch's products in float32 (half the time of float64 on a CPU), or in
        # bfloat16 under the calibration autocast (precision.py), summed across micro-batches in
        # float64.
        a = inputs.reshape(-1, inputs.shape[-1]).to(self.device, torch.float32)
        if self.bias:
            a = torch.cat([a, a.new_ones(a.shape[0], 1)], 1)
        t = target.reshape(-1, target.shape[-1]).to(self.device, torch.float32)
        self.G += a.t() @ a
        self.C += a.t() @ t

    def _system(self, lin: nn.Linear, damp: float, cols: torch.Tensor | None):
        """H = G + lam I and the right-hand side, restricted to `cols` of the inputs (bias kept)."""
        idx = None
        if cols is not None:
            idx = cols.to(self.device)
            if self.bias:
                idx = torch.cat([idx, idx.new_tensor([self.n_in])])
        G = self.G if idx is None else self.G[idx][:, idx]
        C = self.C if idx is None else self.C[idx]
        # Ridge towards the current (sliced) weights, not towards zero: a large damping falls back
        # to plain slicing instead of shrinking the layer.
        w0 = lin.weight.detach().to(torch.float64)
        if self.bias:
            w0 = torch.cat([w0, lin.bias.detach().to(torch.float64)[:, None]], 1)
        lam = damp * self.G.diagonal().mean().clamp_min(1e-12)
        H = G + lam * torch.eye(G.shape[0], dtype=G.dtype, device=G.device)
        return H, C + lam * w0.t()

    @torch.no_grad()
    def select(self, lin: nn.Linear, damp: float, block: int, keep: int) -> list[int]:
        """The `keep` blocks of `block` consecutive inputs whose joint removal (others compensating)
        raises the ridge objective least: greedy OBS, several blocks per round when many go."""
        H, rhs = self._system(lin, damp, None)
        chol, info = torch.linalg.cholesky_ex(H)
        if int(info) != 0:  # singular even after damping: a tiny jitter makes it invertible
            H = H + 1e-6 * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
            chol = torch.linalg.cholesky(H)
        W = torch.cholesky_solve(rhs, chol).t()  # out x inputs: the optimum with every input kept
        Hinv = torch.cholesky_inverse(chol)
        n_blocks = self.n_in // block
        cols = torch.arange(self.n_in, device=self.device).view(n_blocks, block)
        alive = torch.ones(n_blocks, dtype=torch.bool, device=self.device)
        to_remove = n_blocks - keep
        per_round = 1 if block > 1 else max(1, math.ceil(to_remove / 32))
        while to_remove > 0:
            live = alive.nonzero().squeeze(1)
            c = cols[live]  # (live blocks, block)
            if block == 1:
                cost = W[:, c[:, 0]].pow(2).sum(0) / Hinv.diagonal()[c[:, 0]]
            else:
                Hb = Hinv[c[:, :, None], c[:, None, :]]  # (live, block, block)
                Wb = W[:, c].permute(1, 2, 0)  # (live, block, out)
                cost = (Wb * torch.linalg.solve(Hb, Wb)).sum((1, 2))
            k = min(per_round, to_remove)
            if k == 1:
                gone = live[cost.argmin()][None]
            else:  # exact greedy among the 4k cheapest: a correlated pair cannot go in one round
                cand = live[torch.topk(cost, min(len(live), 4 * k), largest=False).indices]
                gone = cand[_greedy_single(W, Hinv, cand, k)]
            R = cols[gone].reshape(-1)
            X = torch.linalg.solve(Hinv[R][:, R], Hinv[R])  # |R| x inputs: one block update per round
            W -= W[:, R] @ X
            Hinv -= Hinv[:, R] @ X
            alive[gone] = False
            to_remove -= k
        return alive.nonzero().squeeze(1).tolist()

    @torch.no_grad()
    def solve(self, lin: nn.Linear, damp: float, cols: torch.Tensor | None = None) -> None:
        """Write the ridge solution over the inputs `cols` (all when None) into `lin`, which holds
        the sliced weights W0 for those inputs."""
        H, rhs = self._system(lin, damp, cols)
        chol, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            sol = torch.cholesky_solve(rhs, chol)
        else:  # singular even after damping (e.g. dead channels): least-norm solution
            sol = torch.linalg.lstsq(H.cpu(), rhs.cpu()).solution.to(H.device)
        w = sol.t()
        if self.bias:
            lin.bias.data.copy_(w[:, -1].to(lin.bias.dtype))
            w = w[:, :-1]
        lin.weight.data.copy_(w.to(lin.weight.dtype))


def _greedy_single(W: torch.Tensor, Hinv: torch.Tensor, cand: torch.Tensor, k: int) -> torch.Tensor:
    """Positions in `cand` (single inputs) of `k` removals made one at a time, OBS costs and
    updates restricted to the candidates (cheap: the full update follows once per round)."""
    Wc, Hc = W[:, cand].clone(), Hinv[cand][:, cand].clone()
    taken = torch.zeros(len(cand), dtype=torch.bool, device=W.device)
    for _ in range(k):
        cost = (Wc.pow(2).sum(0) / Hc.diagonal()).masked_fill(taken, float("inf"))
        i = int(cost.argmin())
        r = Hc[i] / Hc[i, i]
        Wc -= Wc[:, i:i + 1] * r
        Hc -= torch.outer(Hc[:, i], r)
        taken[i] = True
    return taken.nonzero().squeeze(1)


@torch.no_grad()
def reconstruct(model: nn.Module, targets: LayerTargets, kept_layers: list[int], changed: set[int],
                damp: float = 0.01, on_event: ProgressCallback = null_callback,
                select: dict[int, tuple[int, int]] | None = None) -> dict[int, tuple[list[int], list[int]]]:
    """Refit o_proj and down_proj of the pruned model's layers towards `targets`.

    `kept_layers[j]` is the unpruned layer index of the pruned model's layer j (dropped layers are
    absent); `changed` are the unpruned indices whose widths were cut. Layers before the first
    change see exactly the unpruned inputs and are left as they are. `select[j]` = (KV groups,
    MLP channels) that layer j, still uncut, is to keep: they are chosen and cut here. Returns, per
    layer j, the KV groups and channels it kept (indices into the layer as it came in).
    """
    fam = family_for(model)
    layers = fam.layers(model)
    if len(layers) != len(kept_layers):
        raise ValueError(f"model has {len(layers)} layers, the layer map {len(kept_layers)}")
    select = select or {}
    was_training = model.training
    model.eval()
    hd = head_dim(model.config)
    # Layers before the first change are the unpruned ones: they keep everything, and the first
    # changed layer's inputs are the unpruned model's activations the targets already hold.
    current = [(fam.qkvo(layer)[1].out_features // hd, fam.gate_up_down(layer)[0].out_features) for layer in layers]
    widths = [select.get(j, current[j]) for j in range(len(layers))]
    first = next((j for j, src in enumerate(kept_layers) if src in changed or src != j or widths[j] != current[j]),
                 len(layers))
    kept = {j: (list(range(widths[j][0])), list(range(widths[j][1]))) for j in range(first)}
    inputs = _layer_inputs(model, fam, targets.chunks)
    kwargs = [kw for _, kw in inputs]
    xs = [x if first == 0 else targets.load(first - 1, b, "y") for b, (x, _) in enumerate(inputs)]
    del inputs  # each layer's inputs are freed as soon as its outputs exist
    try:
        for j in range(first, len(layers)):
            layer, dev = layers[j], _device(layers[j])
            xs = [x.to(dev) for x in xs]
            xs, kept[j] = _refit_layer(model, fam, layer, xs, kwargs, targets, kept_layers[j], damp, widths[j])
            release_freed_memory()
            on_event(ProgressEvent("reconstruct", j + 1, len(layers), "reconstruct"))
    finally:
        model.train(was_training)
    return kept


def _refit_layer(model: nn.Module, fam: Family, layer: nn.Module, xs: list[torch.Tensor], kwargs: list[dict],
                 targets: LayerTargets, src: int, damp: float, widths: tuple[int, int]):
    """Refit (and with narrower `widths`, first choose and cut) one layer; returns its outputs on
    `xs` and the KV groups and channels it kept."""
    hd = head_dim(model.config)
    q, k, _, o_proj = fam.qkvo(layer)
    n_kv, n_rep = k.out_features // hd, q.out_features // k.out_features
    grab: dict[str, torch.Tensor] = {}

    def stop_at(module, args):
        grab["in"] = args[0]
        raise _Stop

    # Attention: regress the residual update towards the unpruned mid-layer state.
    normal, acts = _Normal(o_proj), []
    handle = o_proj.register_forward_pre_hook(stop_at)
    try:
        for b, (x, kw) in enumerate(zip(xs, kwargs)):
            _run(layer, x, kw)
            acts.append(grab.pop("in"))
            normal.add(acts[-1], (targets.load(src, b, "h") - x.cpu()).to(x.device))
    finally:
        handle.remove()
    keep_kv, cols = list(range(n_kv)), None
    if widths[0] < n_kv:
        keep_kv = normal.select(o_proj, damp, n_rep * hd, widths[0])
        cols = head_rows(keep_kv, n_rep, hd).to(o_proj.weight.device)
        cut_attention(model, layer, keep_kv)
        o_proj = fam.qkvo(layer)[3]
    normal.solve(o_proj, damp, cols)
    hs = [x + o_proj(a if cols is None else a.index_select(-1, cols)) for x, a in zip(xs, acts)]
    del acts
    xs.clear()  # the caller's list: this layer's inputs are no longer needed
    release_freed_memory()

    # MLP: the same for the layer output, from the mid-layer state h' of the refitted attention.
    gate, _, down = fam.gate_up_down(layer)
    mlp = fam.mlp_block(layer)
    normal, acts = _Normal(down), []
    handle = down.register_forward_pre_hook(stop_at)
    try:
        for b, h in enumerate(hs):
            try:
                mlp(fam.mlp_input(layer, h))
            except _Stop:
                pass
            acts.append(grab.pop("in"))
            normal.add(acts[-1], (targets.load(src, b, "y") - h.cpu()).to(h.device))
    finally:
        handle.remove()
    keep_ch, cols = list(range(gate.out_features)), None
    if widths[1] < gate.out_features:
        keep_ch = normal.select(down, damp, 1, widths[1])
        cols = torch.tensor(keep_ch, device=down.weight.device)
        cut_mlp(model, layer, keep_ch)
        down = fam.gate_up_down(layer)[2]
    normal.solve(down, damp, cols)
    ys = []
    while hs:  # free each batch's activations as its output is made
        h, m = hs.pop(0), acts.pop(0)
        ys.append(h + down(m if cols is None else m.index_select(-1, cols)))
    return ys, (keep_kv, keep_ch)

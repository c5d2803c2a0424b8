"""Output reconstruction: refit each pruned layer's output projections so it reproduces the
unpruned layer's output on calibration tokens (SlimLLM-style regression, no retraining).

The targets are, per decoder layer and calibration micro-batch, the unpruned model's mid-layer
residual h = x + attn(x) and layer output y. The layers reach reconstruction uncut, and the pruned
model is rebuilt layer by layer on its *own* inputs x' (so upstream errors are corrected, not
compounded), each layer cut just after its targets are taken and just before its refit. So when
nothing was cut before reconstruction (one cut, no layer drops: the default) the unpruned stream
x is carried through the same sweep and each layer's targets are computed from it as the sweep
reaches the layer (`LiveTargets`: one layer's states in memory, nothing on disk). Adapt-Pruner's
steps cut the model before reconstruction, so there one forward pass of the unpruned model records
them first (`LayerTargets`, on disk so memory does not grow with the budget or the depth):

    o_proj    <- argmin_W |D (A W^T - r_a)|^2 + lam |W - W0|^2   A: kept heads' attention output
    down_proj <- argmin_W |D (M W^T - r_m)|^2 + lam |W - W0|^2   M: kept channels' act(gate) * up

    r_a = u_a + c (h - x' - u_a),  r_m = u_m + c (y - h' - u_m)

u_a, u_m: the uncut layer's own attention and MLP updates on x' and h' (the uncut layer runs
anyway, and the kept units' activations are the same with or without the cut; when all of a
projection's inputs are regressed on, u = A W^T is not even computed: A^T u = G W^T). c
(`correction`) is how much of the upstream error a layer is asked to undo: c = 1 matches the
unpruned model's states, which regresses each layer onto error it can only partly express and
overfits the calibration text; on SmolLM2-135M c = 0.5 measured better than 1 (ppl@128 113.28 vs
117.68 at 20%, 580.63 vs 644.24 at 50%, Taylor) and, with OBS, 0.35 better than 0.5 (112.25 vs
113.16 at 20%, 518.08 vs 533.81 at 50%; bench/README.md). D divides each token by
the RMS of its unpruned state: the next RMSNorm sees a token's direction, not its scale, and
without D the attention-sink tokens (the first of each window, whose residual stream holds one
channel near 24,000 against ~5 elsewhere in SmolLM2) are nearly all of the objective. W0 are the
sliced weights; solved from the Gram matrix G = A^T D^2 A in float64 on the layer's device (per
micro-batch products in float32, only G's upper block rows, their sum in float64),
lam = damp * mean(diag(G)). Each layer runs once: h' and y' follow from the captured A and M.

With `choose` (importance `obs`) reconstruction also chooses what a layer keeps: greedy Optimal
Brain Surgeon on the same objective (as in ZipLM/SlimGPT). From the ridge optimum W over all
inputs, removing the input columns B raises the objective by tr(W_B [(H^-1)_BB]^-1 W_B^T),
H = A^T A + lam I; the cheapest KV groups (blocks of their heads' columns) or MLP channels go
first, W and H^-1 updated in closed form after each removal (in float32 at the default damping,
as SparseGPT searches; the kept units' refit stays float64). Only one layer's statistics exist at
a time.
"""

from __future__ import annotations

import math
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from llm_prune.errors import UserError
from llm_prune.families import Family, family_for, head_dim
from llm_prune.memory import release_freed_memory
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.recipe import PRUNING_DEFAULTS as _DEFAULT
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
    """Per-layer (h, y) of the unpruned model on the calibration micro-batches, stored on disk.

    `dtype` is what they are stored in (default: as computed). The calibration passes store
    bfloat16 when their matmuls run in it: half the disk traffic (two states per layer and
    micro-batch), and the rounding, 2^-9 of each state, is far below the pruning error the refit
    fits."""

    def __init__(self, model: nn.Module, input_ids: torch.LongTensor, batch_size: int,
                 dtype: torch.dtype | None = None):
        # The same layer-by-layer walk as LiveTargets (one way to compute the states), each
        # layer's states written out as it is passed.
        live = LiveTargets(model, input_ids, batch_size, dtype)
        self._dir = tempfile.TemporaryDirectory(prefix="llm-prune-targets-")
        self.root = Path(self._dir.name)
        self.chunks, self.dtype = live.chunks, live.dtype
        fam = family_for(model)
        layers = fam.layers(model)
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                inputs = _layer_inputs(model, fam, self.chunks)
                kwargs = [kw for _, kw in inputs]
                live.start([x for x, _ in inputs])
                del inputs
                for i, layer in enumerate(layers):
                    live.advance(i, layer, kwargs)
                    for b in range(len(self.chunks)):
                        for what in ("h", "y"):
                            torch.save(live.take(i, b, what).cpu(), self._path(i, b, what))
                    release_freed_memory()
        finally:
            live.close()
            model.train(was_training)

    def _path(self, layer: int, batch: int, what: str) -> Path:
        return self.root / f"{layer}-{batch}-{what}.pt"

    def start(self, xs: list[torch.Tensor]) -> None:
        """The sweep begins with the first layer's inputs `xs` (recorded targets need nothing)."""

    def advance(self, index: int, layer: nn.Module, kwargs: list[dict]) -> None:
        """The sweep reaches unpruned layer `index`, still uncut (recorded targets need nothing)."""

    def load(self, layer: int, batch: int, what: str) -> torch.Tensor:
        """`what` = "h" (mid-layer state) or "y" (layer output) of `layer` on micro-batch `batch`,
        in the model's dtype."""
        return torch.load(self._path(layer, batch, what)).to(self.dtype)

    def close(self) -> None:
        self._dir.cleanup()

    def __enter__(self) -> "LayerTargets":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class LiveTargets:
    """The same (h, y) as `LayerTargets`, computed from the unpruned stream as the sweep reaches
    each layer instead of recorded beforehand: the same forward compute, no scratch files (2.8 GB
    for SmolLM2-135M at the default budget, and their writing was a tenth of the command's time).
    Valid only while every layer is still uncut when the sweep reaches it, i.e. no cut and no
    layer drop before reconstruction. Holds one layer's states; each can be loaded once."""

    def __init__(self, model: nn.Module, input_ids: torch.LongTensor, batch_size: int,
                 dtype: torch.dtype | None = None):
        check_projections(model)
        self._fam = family_for(model)
        self.chunks = list(input_ids.split(batch_size))
        self.dtype = next(model.parameters()).dtype
        self._store = dtype  # rounded as LayerTargets stores them, so both give the same model
        self._stream: list[torch.Tensor] = []
        self._at = -1
        self._states: dict[tuple[int, str], torch.Tensor] = {}

    def start(self, xs: list[torch.Tensor]) -> None:
        self._stream, self._at, self._states = list(xs), -1, {}

    def advance(self, index: int, layer: nn.Module, kwargs: list[dict]) -> None:
        if index != self._at + 1:
            raise ValueError(f"live targets need every layer in order: layer {index} after {self._at}")
        update: dict[str, torch.Tensor] = {}

        def grab(module, args, kw, output):
            update["u"] = output[0] if isinstance(output, tuple) else output

        self._states = {}  # the previous layer's states go before this one's are made
        dev = _device(layer)
        handle = self._fam.attention(layer).register_forward_hook(grab, with_kwargs=True)
        try:
            for b, kw in enumerate(kwargs):
                x = self._stream[b].to(dev)
                y = _run(layer, x, kw)
                self._states[b, "h"] = self._stored(x + update.pop("u"))
                self._states[b, "y"] = self._stored(y)
                self._stream[b] = y
        finally:
            handle.remove()
        self._at = index

    def _stored(self, state: torch.Tensor) -> torch.Tensor:
        return state if self._store in (None, state.dtype) else state.to(self._store)

    def take(self, layer: int, batch: int, what: str) -> torch.Tensor:
        """The state as stored (`dtype`); it is then no longer held."""
        if layer != self._at:
            raise ValueError(f"live targets hold layer {self._at}, not {layer}")
        return self._states.pop((batch, what))

    def load(self, layer: int, batch: int, what: str) -> torch.Tensor:
        return self.take(layer, batch, what).to(self.dtype)

    def close(self) -> None:
        self._stream, self._states = [], {}

    def __enter__(self) -> "LiveTargets":
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


_FP32_SEARCH_DAMP = 0.01  # SparseGPT's default damping, with which it searches in float32
_GRAM_BLOCK = 256  # rows of G per product: large enough to keep the matmuls efficient


class _Normal:
    """Accumulates the normal equations G = A^T A, C = A^T T of one projection (float64 sums)."""

    def __init__(self, lin: nn.Linear, n_in: int | None = None):
        self.bias = lin.bias is not None
        self.device = lin.weight.device
        self.n_in = lin.in_features if n_in is None else n_in
        n = self.n_in + int(self.bias)
        self._gram = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        self._mirrored = False  # whether the lower triangle holds the upper one's mirror image
        self.C = torch.zeros(n, lin.out_features, dtype=torch.float64, device=self.device)

    def add(self, inputs: torch.Tensor, target: torch.Tensor, scale: torch.Tensor | None = None) -> None:
        """One micro-batch; `scale` (one per token) multiplies its rows, i.e. weights its squared error."""
        # One micro-batch's products in float32 (half the time of float64 on a CPU), or in
        # bfloat16 under the calibration autocast (precision.py; the operands are then rounded to
        # it once, here), summed across micro-batches in float64.
        dtype = torch.bfloat16 if torch.is_autocast_enabled(self.device.type) else torch.float32
        a = inputs.reshape(-1, inputs.shape[-1]).to(self.device, dtype)
        t = target.reshape(-1, target.shape[-1]).to(self.device, dtype)
        s = a.new_ones(a.shape[0], 1) if scale is None else scale.reshape(-1, 1).to(self.device, dtype)
        if scale is not None:
            a, t = a * s, t * s
        if self.bias:
            a = torch.cat([a, s], 1)
        # G is symmetric: only its upper block rows are multiplied (0.58 of the products for an
        # MLP's 1,536 inputs); the lower triangle is mirrored once, when G is read.
        for i in range(0, a.shape[1], _GRAM_BLOCK):
            self._gram[i:i + _GRAM_BLOCK, i:] += a[:, i:i + _GRAM_BLOCK].t() @ a[:, i:]
        self._mirrored = False
        self.C += a.t() @ t

    @property
    def G(self) -> torch.Tensor:
        """The Gram matrix A^T A (inputs, then the bias column), float64. Mirrored in place: one
        matrix of this size stays (for a Llama-3-8B MLP, 14,336² in float64 is 1.6 GB)."""
        if not self._mirrored:
            self._gram.triu_()  # what the diagonal blocks put below the diagonal goes too
            self._gram += self._gram.triu(1).t()
            self._mirrored = True
        return self._gram

    def add_local(self, lin: nn.Linear, weight: float) -> None:
        """C <- (1 - weight) A^T U + weight C for the projection's own output U = A W^T + b on the
        same inputs, without computing U: A^T U = G [W b]^T (one small product instead of one
        per micro-batch)."""
        self.C = torch.lerp(self.G @ self._weights(lin).t(), self.C, weight)

    def _weights(self, lin: nn.Linear) -> torch.Tensor:
        """`lin`'s weights in float64, the bias as a last column when the system has one."""
        w = lin.weight.detach().to(torch.float64)
        if self.bias:
            w = torch.cat([w, lin.bias.detach().to(torch.float64)[:, None]], 1)
        return w

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
        w0 = self._weights(lin)
        lam = damp * self.G.diagonal().mean().clamp_min(1e-12)
        H = G.clone()  # + lam I without an identity matrix: two fewer n x n temporaries
        H.diagonal().add_(lam)
        return H, C + lam * w0.t()

    @torch.no_grad()
    def select(self, lin: nn.Linear, damp: float, block: int, keep: int,
               trace: list[tuple[int, float]] | None = None) -> list[int]:
        """The `keep` blocks of `block` consecutive inputs whose joint removal (others compensating)
        raises the ridge objective least: greedy OBS, several blocks per round when many go.
        `trace` receives (blocks removed, objective increase so far) after each round: a layer's
        error curve (bench/obs_allocation.py)."""
        H, rhs = self._system(lin, damp, None)
        # The search runs in float32, as SparseGPT's and GPTQ's OBS updates do, when the damping
        # bounds H's condition number (at most inputs / damp + 1: 15,361 for SmolLM2's MLP): 1.8
        # times faster on a CPU. It only ranks units; the kept ones are refit in float64 (solve).
        if damp >= _FP32_SEARCH_DAMP:
            H, rhs = H.float(), rhs.float()
        chol = _cholesky(H)
        W = torch.cholesky_solve(rhs, chol).t()  # out x inputs: the optimum with every input kept
        Hinv = torch.cholesky_inverse(chol)
        del H, chol, rhs  # the selection's peak: only W, Hinv and G stay
        n_blocks = self.n_in // block
        cols = torch.arange(self.n_in, device=self.device).view(n_blocks, block)
        alive = torch.ones(n_blocks, dtype=torch.bool, device=self.device)
        to_remove = n_blocks - keep
        per_round = 1 if block > 1 else max(1, math.ceil(to_remove / 32))
        while to_remove > 0:
            live = alive.nonzero().squeeze(1)
            c = cols[live]  # (live blocks, block)
            if block == 1:
                cost = (W.pow(2).sum(0) / Hinv.diagonal())[c[:, 0]]
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
            if trace is not None:  # the round's exact increase: tr(W_R (Hinv_RR)^-1 W_R^T)
                WR = W[:, R]
                rise = float((WR * torch.linalg.solve(Hinv[R][:, R], WR.t()).t()).sum())
                trace.append((n_blocks - keep - to_remove + k, (trace[-1][1] if trace else 0.0) + rise))
            X = torch.linalg.solve(Hinv[R][:, R], Hinv[R])  # |R| x inputs: one block update per round
            # In place, product and subtraction fused: these two are most of the selection's time.
            W.addmm_(W[:, R], X, alpha=-1)
            Hinv.addmm_(Hinv[:, R], X, alpha=-1)
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


def _cholesky(H: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of H, adding a growing jitter while it is not positive definite. The
    damping makes H positive definite in exact arithmetic, but with bf16 Gram products and fewer
    tokens than inputs (a small --reconstruct-tokens), their rounding can give G negative
    eigenvalues larger than the damping: the jitter grows from 1e-6 of the mean diagonal until
    the factorisation succeeds. H is the caller's own copy and may be changed in place."""
    chol, info = torch.linalg.cholesky_ex(H)
    scale, jitter = H.diagonal().mean().abs().clamp_min(1e-12), 1e-6
    while int(info) != 0:
        if jitter > 1e6:
            raise UserError("reconstruction's normal equations are not positive definite; use more "
                            "--reconstruct-tokens or --no-reconstruct", param="pruning.reconstruct_tokens")
        H.diagonal().add_(jitter * scale)
        chol, info = torch.linalg.cholesky_ex(H)
        jitter *= 100
    return chol


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
def reconstruct(model: nn.Module, targets: LayerTargets | LiveTargets, kept_layers: list[int], changed: set[int],
                damp: float = _DEFAULT["reconstruct_damp"],
                correction: float = _DEFAULT["reconstruct_correction"], on_event: ProgressCallback = null_callback,
                keep: dict[int, tuple[list[int], list[int]]] | None = None,
                choose: bool = False) -> dict[int, tuple[list[int], list[int]]]:
    """Refit o_proj and down_proj of the pruned model's layers towards `targets`.

    `kept_layers[j]` is the unpruned layer index of the pruned model's layer j (dropped layers are
    absent); `changed` are the unpruned indices whose widths were cut. Layers before the first
    change see exactly the unpruned inputs and are left as they are. `keep[j]` = (KV groups, MLP
    channels) that layer j, still uncut, keeps: it is cut here, after its uncut outputs on the
    pruned inputs have been taken for the target (`correction`, below). With `choose`, only their
    numbers count and greedy OBS chooses which units stay. Returns, per layer j, the KV groups and
    channels it kept (indices into the layer as it came in).

    The target of each refit is the layer's uncut update on the pruned model's own input plus
    `correction` times the rest of the way to the unpruned model's state: 1 asks every layer to
    undo all upstream error, 0 only to imitate its uncut self. Each token's squared error is
    divided by the mean square of its unpruned state, which is what the next RMSNorm sees:
    otherwise the few attention-sink tokens, whose residual stream carries activations a hundred
    times the others', make up almost all of the objective.
    """
    fam = family_for(model)
    layers = fam.layers(model)
    if len(layers) != len(kept_layers):
        raise ValueError(f"model has {len(layers)} layers, the layer map {len(kept_layers)}")
    keep = keep or {}
    was_training = model.training
    model.eval()
    hd = head_dim(model.config)
    # Layers before the first change are the unpruned ones: they keep everything, and the first
    # changed layer's inputs are the unpruned model's activations the targets already hold.
    current = [(fam.qkvo(layer)[1].out_features // hd, fam.gate_up_down(layer)[0].out_features) for layer in layers]
    widths = [tuple(len(u) for u in keep[j]) if j in keep else current[j] for j in range(len(layers))]
    first = next((j for j, src in enumerate(kept_layers) if src in changed or src != j or widths[j] != current[j]),
                 len(layers))
    kept = {j: (list(range(widths[j][0])), list(range(widths[j][1]))) for j in range(first)}
    if first == len(layers):
        return kept
    inputs = _layer_inputs(model, fam, targets.chunks)
    kwargs = [kw for _, kw in inputs]
    xs = [x for x, _ in inputs]
    del inputs  # each layer's inputs are freed as soon as its outputs exist
    targets.start(xs)
    for j in range(first):  # live targets walk the unpruned stream up to the first change
        targets.advance(j, layers[j], kwargs)
    if first:
        xs = [targets.load(first - 1, b, "y") for b in range(len(xs))]
    try:
        for j in range(first, len(layers)):
            layer, dev = layers[j], _device(layers[j])
            targets.advance(kept_layers[j], layer, kwargs)  # before the layer is cut
            xs = [x.to(dev) for x in xs]
            units = keep.get(j) if widths[j] != current[j] else None
            xs, kept[j] = _refit_layer(model, fam, layer, xs, kwargs, targets, kept_layers[j], damp, correction,
                                       units, choose)
            release_freed_memory()
            on_event(ProgressEvent("reconstruct", j + 1, len(layers), "reconstruct"))
    finally:
        model.train(was_training)
    return kept


def _token_scale(state: torch.Tensor) -> torch.Tensor:
    """1 / RMS of each token's unpruned residual state: errors count relative to the token's scale."""
    return state.float().pow(2).mean(-1, keepdim=True).clamp_min(1e-12).rsqrt()


def _refit_projection(lin: nn.Linear, batches, block: int, units: list[int] | None, choose: bool,
                      damp: float, correction: float, cut) -> tuple[nn.Linear, list[int] | None, list[torch.Tensor]]:
    """Refit one output projection (o_proj or down_proj) of a layer.

    `batches` yields, per micro-batch, the projection's uncut input, the residual update that
    reaches the unpruned state, and that state. `units` (blocks of `block` inputs) are kept, or
    with `choose` as many are chosen by OBS; `cut(units)` cuts the layer and returns its new
    projection. Returns the projection, the kept units (None: all) and its inputs per micro-batch."""
    n_units = lin.in_features // block
    if units is not None and len(units) == n_units:
        units = None  # nothing of this projection's inputs goes
    fixed = units is not None and not choose
    cols = _columns(units, block, lin.weight.device) if fixed else None
    normal = _Normal(lin, None if cols is None else len(cols))
    acts = []
    for a, global_res, state in batches:
        if cols is None:  # the uncut layer's own update enters through the Gram matrix (add_local)
            normal.add(a, global_res, _token_scale(state))
        else:  # it needs the inputs that go: computed here (not through `lin`: its hook stops passes)
            local_res = nn.functional.linear(a, lin.weight, lin.bias).float()
            a = a.index_select(-1, cols)
            normal.add(a, torch.lerp(local_res, global_res.float(), correction), _token_scale(state))
        acts.append(a)
    if cols is None:
        normal.add_local(lin, correction)
    if units is None:
        normal.solve(lin, damp)
        return lin, None, acts
    if choose:
        units = normal.select(lin, damp, block, len(units))
        cols = _columns(units, block, lin.weight.device)
        for b, a in enumerate(acts):  # one micro-batch at a time: the uncut and cut inputs never all coexist
            acts[b] = a.index_select(-1, cols)
    new = cut(units)
    normal.solve(new, damp, cols if choose else None)
    return new, units, acts


def _columns(units: list[int], block: int, device) -> torch.Tensor:
    """Input columns of the kept blocks (KV groups: their heads' columns; channels: themselves)."""
    return head_rows(units, block, 1).to(device)


@contextmanager
def _input_of(lin: nn.Linear):
    """While open, a forward pass that reaches `lin` leaves its input in the yielded dict under
    "in" and stops there (`_Stop`): nothing after the projection is computed."""
    grab: dict[str, torch.Tensor] = {}

    def stop(module, args):
        grab["in"] = args[0]
        raise _Stop

    handle = lin.register_forward_pre_hook(stop)
    try:
        yield grab
    finally:
        handle.remove()


def _refit_layer(model: nn.Module, fam: Family, layer: nn.Module, xs: list[torch.Tensor], kwargs: list[dict],
                 targets: LayerTargets | LiveTargets, src: int, damp: float, correction: float,
                 units: tuple[list[int], list[int]] | None, choose: bool):
    """Refit (and with `units`, cut) one layer; returns its outputs on `xs` and the KV groups and
    channels it kept."""
    hd = head_dim(model.config)
    q, k, _, o_proj = fam.qkvo(layer)
    n_kv, n_rep = k.out_features // hd, q.out_features // k.out_features
    gate, _, down = fam.gate_up_down(layer)
    mlp = fam.mlp_block(layer)

    def attention_batches(grab):  # towards the unpruned mid-layer state h
        for b, (x, kw) in enumerate(zip(xs, kwargs)):
            _run(layer, x, kw)
            h = targets.load(src, b, "h").to(x.device)
            yield grab.pop("in"), h - x, h

    def cut_heads(kv):
        cut_attention(model, layer, kv)
        return fam.qkvo(layer)[3]

    with _input_of(o_proj) as grab:
        o_proj, keep_kv, acts = _refit_projection(o_proj, attention_batches(grab), n_rep * hd,
                                                  None if units is None else units[0], choose, damp, correction,
                                                  cut_heads)
    hs = [x + o_proj(a) for x, a in zip(xs, acts)]
    del acts
    xs.clear()  # the caller's list: this layer's inputs are no longer needed
    release_freed_memory()

    def mlp_batches(grab):  # towards the unpruned layer output y, from the refitted attention's h'
        for b, h in enumerate(hs):
            try:
                mlp(fam.mlp_input(layer, h))
            except _Stop:
                pass
            y = targets.load(src, b, "y").to(h.device)
            yield grab.pop("in"), y - h, y

    def cut_channels(ch):
        cut_mlp(model, layer, ch)
        return fam.gate_up_down(layer)[2]

    with _input_of(down) as grab:
        down, keep_ch, acts = _refit_projection(down, mlp_batches(grab), 1, None if units is None else units[1],
                                                choose, damp, correction, cut_channels)
    ys = []
    while hs:  # free each batch's activations as its output is made
        h, m = hs.pop(0), acts.pop(0)
        ys.append(h + down(m))
    return ys, (list(range(n_kv)) if keep_kv is None else keep_kv,
                list(range(gate.out_features)) if keep_ch is None else keep_ch)

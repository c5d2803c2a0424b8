"""Calibration budget, micro-batched scoring, output reconstruction and incremental Adapt-Pruner."""

import copy
import dataclasses

import pytest
import torch
from torch import nn

from llm_prune.allocation import AllocationConfig, allocate, normalised_importance
from llm_prune.errors import UserError
from llm_prune.importance import ImportanceScorer, Scores
from llm_prune.models import load_model
from llm_prune.plan import count_params, unit_costs
from llm_prune.prune import prune_model
from llm_prune.reconstruct import LayerTargets, LiveTargets, _Normal, reconstruct
from llm_prune.recipe import Budget, PruningConfig, parse_recipe
from llm_prune.surgery import apply_plan
import llm_prune.reconstruct as reconstruct_mod
from tests.tiny_models import build_model

CALIB = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(0))
HELD_OUT = torch.randint(3, 300, (4, 32), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    return {fam: build_model(tmp_path_factory.mktemp(fam), fam, layers=4, hidden=96, heads=6, kv_heads=3,
                             intermediate=256)
            for fam in ("llama", "qwen2")}


def test_calibration_token_budget():
    assert PruningConfig(calibration_tokens=300, calibration_seq_len=32).calibration_windows == 10
    assert PruningConfig(calibration_samples=3).calibration_windows == 3
    assert PruningConfig().calibration_windows * PruningConfig().calibration_seq_len == 4096
    assert PruningConfig(calibration_batch_tokens=256, calibration_seq_len=64).micro_batch == 4
    assert PruningConfig(calibration_tokens=512, calibration_samples=4).calibration_windows == 4
    with pytest.raises(UserError, match="calibration_tokens"):
        parse_recipe({"model": "m", "budget": {"ratio": 0.2}, "pruning": {"calibration_tokens": 4}})


def test_default_importance_follows_where_units_are_cut():
    # One cut: OBS (with reconstruction, reconstruction chooses); Adapt-Pruner's steps: gradients.
    assert PruningConfig().importance == "obs"
    assert PruningConfig(portable=True, allocation="adaptive").importance == "obs"
    assert PruningConfig(allocation="adaptive").importance == "taylor"
    assert PruningConfig(reconstruct=False).importance == "obs"
    assert PruningConfig(importance="l2", allocation="adaptive").importance == "l2"
    assert parse_recipe({"model": "m", "budget": {"ratio": 0.2}}).pruning.importance == "obs"


def test_micro_batches_measure_the_same_layers(tiny_llama):
    model, _ = load_model(str(tiny_llama))
    whole = ImportanceScorer("l2").score(model, CALIB)
    parts = ImportanceScorer("l2").score(model, CALIB, batch_size=1)
    assert torch.allclose(whole.layer_cos, parts.layer_cos, atol=1e-5)
    assert parts.loss == pytest.approx(whole.loss, rel=1e-4)
    taylor = ImportanceScorer("taylor").score(model, CALIB, batch_size=2)
    assert all(torch.isfinite(s).all() and (s > 0).any() for s in taylor.mlp)


def test_ridge_solve_recovers_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(12, 5)
    w, b = torch.randn(5, 12, generator=gen), torch.randn(5, generator=gen)
    normal = _Normal(lin)
    for _ in range(3):  # accumulated over micro-batches
        x = torch.randn(40, 12, generator=gen)
        normal.add(x, x @ w.t() + b)
    normal.solve(lin, damp=0.0)
    assert torch.allclose(lin.weight, w, atol=1e-4) and torch.allclose(lin.bias, b, atol=1e-4)


def _with_duplicate_channels(model):
    """Channels c and c + 128 of every MLP compute the same activation: a cut keeping one of each
    pair loses nothing that a refit of down_proj cannot restore."""
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.mlp.gate_proj, layer.mlp.up_proj):
                lin.weight[128:] = lin.weight[:128]
    return model


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reconstruction_restores_what_the_kept_units_can_express(wide, family):
    dense = _with_duplicate_channels(load_model(str(wide[family]))[0])
    with torch.no_grad():
        reference = dense(HELD_OUT).logits
    costs = unit_costs(dense)
    plan = allocate(ImportanceScorer("l1").score(dense, CALIB), costs, costs.total, AllocationConfig())
    for lp in plan.layers:
        lp.keep_channels = list(range(128))
    errors = {}
    for rec in (False, True):
        model = copy.deepcopy(dense)
        with LayerTargets(model, CALIB, batch_size=2) as targets:
            if rec:  # the layers arrive uncut: reconstruction cuts them to the plan
                reconstruct(model, targets, kept_layers=list(range(4)), changed=set(range(4)), damp=1e-8,
                            keep={lp.index: (lp.keep_kv_groups, lp.keep_channels) for lp in plan.layers})
            else:
                apply_plan(model, plan)
        with torch.no_grad():
            errors[rec] = (model(HELD_OUT).logits - reference).pow(2).mean().item()
    assert errors[True] < 1e-3 * errors[False], errors


def test_normal_equations_match_the_explicit_products():
    """G from its upper block rows (several blocks: 600 inputs and the bias column), mirrored in
    place, and the projection's own output mixed in through G equal the explicit A^T A and
    A^T lerp(A W^T + b, T, c)."""
    gen = torch.Generator().manual_seed(3)
    lin = nn.Linear(600, 7)
    normal = _Normal(lin)
    rows, goals = [], []
    for _ in range(2):
        x, t = torch.randn(50, 600, generator=gen), torch.randn(50, 7, generator=gen)
        scale = torch.rand(50, 1, generator=gen) + 0.5
        normal.add(x, t, scale)
        normal.G  # read between micro-batches: mirrored in place, then summed into again
        with torch.no_grad():
            goals.append(scale * torch.lerp(lin(x), t, 0.3))
        rows.append(torch.cat([x * scale, scale], 1))
    normal.add_local(lin, 0.3)
    a = torch.cat(rows).double()
    assert torch.allclose(normal.G, a.t() @ a, rtol=1e-5, atol=1e-3)
    assert torch.allclose(normal.C, a.t() @ torch.cat(goals).double(), rtol=1e-5, atol=1e-3)


def test_token_scale_weights_the_squared_error():
    """`scale` multiplies a token's row: the solution is weighted least squares, so a token with a
    huge state (an attention sink) can be given no more say than any other."""
    gen = torch.Generator().manual_seed(1)
    x, t = torch.randn(60, 6, generator=gen), torch.randn(60, 3, generator=gen)
    scale = torch.rand(60, 1, generator=gen) + 0.1
    lin = nn.Linear(6, 3, bias=False)
    normal = _Normal(lin)
    normal.add(x[:30], t[:30], scale[:30])
    normal.add(x[30:], t[30:], scale[30:])
    normal.solve(lin, damp=0.0)
    expected = torch.linalg.lstsq(x * scale, t * scale).solution.t()
    assert torch.allclose(lin.weight, expected, atol=1e-4)


def test_correction_sets_how_much_upstream_error_a_layer_undoes(wide):
    """Only layer 0 is cut. With correction 0 the later layers' target is their own uncut output,
    so their refit (ridge towards their own weights) gives those weights back; with 1 they move
    to undo layer 0's error and the output comes closer to the unpruned model's."""
    dense, _ = load_model(str(wide["llama"]))
    keep = {0: ([0, 1, 2], list(range(0, 256, 2)))}
    calib = torch.randint(3, 300, (64, 32), generator=torch.Generator().manual_seed(2))  # 2,048 tokens
    models = {}
    for correction in (0.0, 1.0):
        model = copy.deepcopy(dense)
        with LayerTargets(model, calib, batch_size=16) as targets:
            reconstruct(model, targets, kept_layers=list(range(4)), changed={0}, damp=0.1, correction=correction,
                        keep=keep)
        models[correction] = model
    for j in (1, 2, 3):
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            w = dense.model.layers[j].get_submodule(name).weight
            assert torch.allclose(models[0.0].model.layers[j].get_submodule(name).weight, w, atol=1e-4), (j, name)
            assert not torch.allclose(models[1.0].model.layers[j].get_submodule(name).weight, w, atol=1e-3)
    with torch.no_grad():  # on the calibration tokens, whose error the refit minimises
        reference = dense(calib).logits
        errors = {c: (m(calib).logits - reference).pow(2).mean().item() for c, m in models.items()}
    assert errors[1.0] < errors[0.0], errors


def test_reconstruction_leaves_unchanged_layers_alone(wide):
    model, _ = load_model(str(wide["llama"]))
    before = model(HELD_OUT).logits
    with LayerTargets(model, CALIB, batch_size=2) as targets:
        reconstruct(model, targets, kept_layers=list(range(4)), changed=set())
    assert torch.equal(model(HELD_OUT).logits, before)


def test_reconstruction_needs_linear_projections(wide):
    model, tok = load_model(str(wide["llama"]))
    model.model.layers[2].mlp.down_proj = nn.Identity()
    with pytest.raises(UserError, match="no-reconstruct"):
        prune_model(model, tok, Budget(ratio=0.2), PruningConfig(reconstruct=True, calibration_samples=2,
                                                                 calibration_seq_len=16))


def test_incremental_plan_is_pure_data(wide):
    """The composed plan of many adaptive steps, applied to a fresh model, gives the same model."""
    model, tok = load_model(str(wide["llama"]))
    fresh = copy.deepcopy(model)
    total = count_params(model)
    result = prune_model(model, tok, Budget(ratio=0.4),
                         PruningConfig(allocation="adaptive", adaptive_step=0.1, rescore_every=2, reconstruct=False,
                                       calibration_samples=4, calibration_seq_len=32))
    plan = result.plans[0]
    assert plan.meta["steps"] >= 4
    assert abs(count_params(model) - round(0.6 * total)) <= 0.005 * 0.6 * total
    apply_plan(fresh, plan)
    assert torch.equal(fresh(HELD_OUT).logits, model(HELD_OUT).logits)


def test_incremental_steps_widen_the_spread_between_layers(wide):
    """Adapt-Pruner's update: the layer that changes h most (layer 0 here) is spared more with every
    step, so the guard on the first layers comes out of the allocation."""
    model, _ = load_model(str(wide["llama"]))
    costs = unit_costs(model)
    cos = torch.tensor([0.05, 0.9, 0.85, 0.95])
    assert normalised_importance(cos)[0] == pytest.approx(1.0)
    cfg = AllocationConfig(allocation="adaptive", adaptive_strength=0.05)

    def scores():
        return Scores(kv=[torch.rand(3) for _ in range(4)], mlp=[torch.rand(256) for _ in range(4)], layer_cos=cos)

    one = allocate(scores(), costs, int(costs.total * 0.7), cfg)
    prior, current = {}, costs
    n = 6
    for step in range(1, n + 1):
        target = int(round(costs.total - 0.3 * costs.total * step / n))
        plan = allocate(scores(), current, target, cfg, prior=prior, reference=costs)
        prior = {int(k): v for k, v in plan.meta["layer_sparsity"].items()}
        widths = plan.widths()
        current = dataclasses.replace(current, num_kv=[w[0] for w in widths], width=[w[1] for w in widths],
                                      total=plan.params_after)
    assert abs(plan.params_after - int(costs.total * 0.7)) <= 0.005 * costs.total * 0.7

    def spread(p):
        s = {int(k): v for k, v in p.meta["layer_sparsity"].items()}
        return min(s[i] for i in (1, 2, 3)) - s[0]

    assert spread(plan) > 2 * spread(one) > 0
    assert plan.widths()[0][1] > max(w[1] for w in plan.widths()[1:])


def _redundant_system(block: int, gen: torch.Generator):
    """Inputs whose blocks 4..7 copy blocks 0..3 (scaled): half the blocks carry no information of
    their own, and the four large-weight copies make magnitude a wrong guide."""
    lin = nn.Linear(8 * block, 5, bias=False)
    x = torch.randn(400, 4 * block, generator=gen)
    inputs = torch.cat([x, 0.5 * x], 1)
    w = torch.randn(5, 8 * block, generator=gen)
    w[:, 4 * block:] *= 10
    normal = _Normal(lin)
    normal.add(inputs, inputs @ w.t())
    return lin, normal, inputs, inputs @ w.t()


@pytest.mark.parametrize("block", [1, 3])
def test_obs_selection_drops_the_redundant_inputs(block):
    gen = torch.Generator().manual_seed(0)
    lin, normal, inputs, target = _redundant_system(block, gen)
    kept = normal.select(lin, damp=1e-9, block=block, keep=4)
    # One of each copy pair survives, whichever it is: the kept inputs express the target exactly.
    assert sorted(b % 4 for b in kept) == [0, 1, 2, 3]
    cols = torch.tensor([b * block + i for b in kept for i in range(block)])
    small = nn.Linear(len(cols), 5, bias=False)
    small.weight.data.copy_(lin.weight.data[:, cols])
    normal.solve(small, damp=1e-9, cols=cols)
    assert (small(inputs[:, cols]) - target).pow(2).mean() < 1e-6 * target.pow(2).mean()


def test_float32_search_keeps_what_float64_keeps(monkeypatch):
    """With the default damping the greedy search runs in float32; on a correlated system it keeps
    the same inputs as the float64 search."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 16, generator=gen) @ torch.randn(16, 96, generator=gen)
    x += 0.3 * torch.randn(2000, 96, generator=gen)
    lin = nn.Linear(96, 12, bias=False)
    normal = _Normal(lin)
    normal.add(x, x @ torch.randn(12, 96, generator=gen).t())
    fast = normal.select(lin, damp=0.1, block=1, keep=60)
    monkeypatch.setattr(reconstruct_mod, "_FP32_SEARCH_DAMP", 1.0)
    assert normal.select(lin, damp=0.1, block=1, keep=60) == fast


def test_obs_search_survives_rounding_that_left_the_system_indefinite():
    """With fewer tokens than inputs G is singular, and bf16 products can give it negative
    eigenvalues larger than the damping: the search still factorises (a growing jitter) and the
    chosen inputs are refit."""
    gen = torch.Generator().manual_seed(0)
    lin = nn.Linear(32, 4, bias=False)
    normal = _Normal(lin)
    x = torch.randn(8, 32, generator=gen)
    normal.add(x, torch.randn(8, 4, generator=gen))
    v = torch.randn(32, generator=gen, dtype=torch.float64)
    G = normal.G
    G -= 2 * G.diagonal().mean() * torch.outer(v, v) / v.dot(v)  # one eigenvalue far below -damp
    kept = normal.select(lin, damp=0.1, block=1, keep=12)
    assert len(kept) == 12
    small = nn.Linear(12, 4, bias=False)
    normal.solve(small, damp=0.1, cols=torch.tensor(kept))
    assert torch.isfinite(small.weight).all()


def test_obs_trace_is_the_objective_increase():
    """The error curve `select` traces is the least-squares error the kept inputs leave: none while
    only redundant copies go, then exactly what refitting on the survivors cannot express."""
    lin, normal, inputs, target = _redundant_system(1, torch.Generator().manual_seed(0))
    trace = []
    kept = normal.select(lin, damp=1e-9, block=1, keep=2, trace=trace)
    assert trace[-1][0] == 6 and [n for n, _ in trace] == sorted(n for n, _ in trace)
    free = max(rise for n, rise in trace if n <= 4)
    sol = torch.linalg.lstsq(inputs[:, kept].double(), target.double()).solution
    residual = (inputs[:, kept].double() @ sol - target.double()).pow(2).sum().item()
    assert free < 1e-6 * residual
    assert trace[-1][1] == pytest.approx(residual, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_reconstruction_chooses_units_that_reproduce_the_layer(wide, family):
    """Selecting inside reconstruction (importance `obs`) keeps one channel of each duplicate pair
    and reproduces the model; the kept indices it reports are the ones the layers really kept."""
    dense = _with_duplicate_channels(load_model(str(wide[family]))[0])
    fresh = copy.deepcopy(dense)
    with torch.no_grad():
        reference = dense(HELD_OUT).logits
    with LayerTargets(dense, CALIB, batch_size=2) as targets:
        kept = reconstruct(dense, targets, kept_layers=list(range(4)), changed=set(range(4)), damp=1e-8,
                           keep={j: ([0, 1, 2], list(range(128))) for j in range(4)}, choose=True)
    for j, (kv, ch) in kept.items():
        assert kv == [0, 1, 2] and sorted(c % 128 for c in ch) == list(range(128))
        gate = fresh.model.layers[j].mlp.gate_proj.weight[ch]
        assert torch.equal(dense.model.layers[j].mlp.gate_proj.weight, gate)
    with torch.no_grad():
        error = (dense(HELD_OUT).logits - reference).pow(2).mean().item()
    assert error < 1e-3 * reference.var().item()


@pytest.mark.parametrize("choose,changed,store", [(True, set(range(4)), None), (False, {2, 3}, None),
                                                   (True, {1, 3}, torch.bfloat16)])
def test_live_targets_give_the_recorded_targets_model(wide, choose, changed, store):
    """Computing each layer's targets as the sweep reaches it gives the same model, bit for bit,
    as recording them first (also from a later first change, and rounded as stored in bf16)."""
    dense = load_model(str(wide["llama"]))[0]
    keep = {j: ([0, 2] if j in changed else [0, 1, 2], list(range(0, 256, 2)) if j in changed else list(range(256)))
            for j in range(4)}
    models, kept = [], []
    for kind in (LayerTargets, LiveTargets):
        model = copy.deepcopy(dense)
        with kind(model, CALIB, batch_size=2, dtype=store) as targets:
            kept.append(reconstruct(model, targets, list(range(4)), changed, damp=0.1, keep=keep, choose=choose))
        models.append(model)
    assert kept[0] == kept[1]
    recorded, live = (dict(m.named_parameters()) for m in models)
    assert recorded.keys() == live.keys()
    assert all(torch.equal(recorded[k], live[k]) for k in recorded)
    assert not torch.equal(recorded["model.layers.3.mlp.down_proj.weight"],
                           dense.model.layers[3].mlp.down_proj.weight[:, :128])


def test_live_targets_need_every_layer_uncut_in_order(wide):
    model = load_model(str(wide["llama"]))[0]
    with LiveTargets(model, CALIB, batch_size=2) as targets, pytest.raises(ValueError, match="every layer"):
        reconstruct(model, targets, kept_layers=[0, 2, 3, 1], changed={2}, keep={})


def test_one_cut_computes_targets_live_and_steps_record_them(wide, monkeypatch):
    """One cut without layer drops records nothing on disk; Adapt-Pruner's steps and layer drops do."""
    import llm_prune.prune as prune_mod
    made = []
    for kind in (LayerTargets, LiveTargets):
        monkeypatch.setattr(prune_mod, kind.__name__,
                            lambda *a, _k=kind, **kw: made.append(_k.__name__) or _k(*a, **kw))
    small = dict(calibration_samples=4, calibration_seq_len=32, reconstruct_tokens=256)
    for cfg in (PruningConfig(prune_layers=0, **small), PruningConfig(allocation="adaptive", **small),
                PruningConfig(prune_layers=1, **small)):
        model, tok = load_model(str(wide["llama"]))
        prune_model(model, tok, Budget(ratio=0.3), cfg)
    assert made == ["LiveTargets", "LayerTargets", "LayerTargets"]


def test_obs_importance_prunes_to_budget_and_records_its_choice(wide):
    model, tok = load_model(str(wide["llama"]))
    fresh = copy.deepcopy(model)
    total = count_params(model)
    result = prune_model(model, tok, Budget(ratio=0.3), PruningConfig(
        importance="obs", calibration_samples=4, calibration_seq_len=32, reconstruct_tokens=256, skip_first=0,
        skip_last=0))
    assert abs(count_params(model) - round(0.7 * total)) <= 0.005 * 0.7 * total
    apply_plan(fresh, result.plans[0])
    assert model.config.llm_prune["layer_shapes"] == fresh.config.llm_prune["layer_shapes"]
    for a, b in zip(model.model.layers, fresh.model.layers):  # reconstruction leaves q/k/v/gate/up alone
        for name in ("self_attn.q_proj", "self_attn.k_proj", "mlp.gate_proj", "mlp.up_proj"):
            assert torch.equal(a.get_submodule(name).weight, b.get_submodule(name).weight), name


def test_obs_with_reconstruction_skips_the_scoring_pass_it_would_ignore(wide, monkeypatch):
    """Uniform allocation sets the widths from the budget and OBS inside reconstruction chooses
    the units: the same model comes out with the scoring pass as without it."""
    cfg = PruningConfig(importance="obs", calibration_samples=4, calibration_seq_len=32, reconstruct_tokens=256,
                        prune_layers=0)
    assert not cfg.needs_scores
    assert PruningConfig(importance="obs", reconstruct=False).needs_scores
    assert PruningConfig(importance="obs", prune_layers=1).needs_scores
    assert PruningConfig(importance="obs", allocation="adaptive").needs_scores
    assert not PruningConfig(importance="obs", allocation="adaptive", portable=True, prune_layers=0).needs_scores
    assert PruningConfig(importance="obs").needs_scores  # unset: layers may go, ranked by the scoring pass
    assert PruningConfig(importance="taylor").needs_scores
    calls = []
    real_score = ImportanceScorer.score
    monkeypatch.setattr(ImportanceScorer, "score", lambda self, *a, **k: calls.append(1) or real_score(self, *a, **k))
    skipped, tok = load_model(str(wide["llama"]))
    prune_model(skipped, tok, Budget(ratio=0.3), cfg)
    assert calls == []
    monkeypatch.setattr(PruningConfig, "needs_scores", property(lambda self: True))
    scored = load_model(str(wide["llama"]))[0]
    prune_model(scored, tok, Budget(ratio=0.3), cfg)
    assert calls == [1]
    assert torch.equal(skipped(HELD_OUT).logits, scored(HELD_OUT).logits)


def test_calibration_precision_choice(wide, monkeypatch):
    from llm_prune import precision

    model, _ = load_model(str(wide["llama"]))
    assert precision.resolve(model, "fp32") is None
    assert precision.resolve(model, "bf16") is torch.bfloat16
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert precision.resolve(model, "auto") is None
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    assert precision.resolve(model, "auto") is torch.bfloat16
    assert precision.resolve(model.to(torch.bfloat16), "auto") is None  # already half precision


@pytest.mark.parametrize("importance", ["taylor", "obs"])
def test_bf16_calibration_passes_prune_as_well_as_fp32(wide, importance):
    """Scoring, targets and refit under bf16 autocast: the same budget, nearly the same model, and
    (Taylor, gradients under autocast) reconstruction still improves on the plain cut. On a tiny
    random model OBS's diagonal estimate and its reconstruction differ by noise, so only the
    precisions are compared there."""
    losses = {}
    for precision in ("fp32", "bf16", "none"):
        model, tok = load_model(str(wide["llama"]))
        total = count_params(model)
        cfg = PruningConfig(importance=importance, calibration_samples=8, calibration_seq_len=32, skip_first=0,
                            skip_last=0, prune_layers=0, reconstruct=precision != "none",
                            calibration_precision="fp32" if precision == "none" else precision)
        prune_model(model, tok, Budget(ratio=0.3), cfg)
        assert abs(count_params(model) - round(0.7 * total)) <= 0.005 * 0.7 * total
        with torch.no_grad():
            losses[precision] = model(HELD_OUT, labels=HELD_OUT).loss.item()
    assert abs(losses["bf16"] - losses["fp32"]) < 0.02 * losses["fp32"], losses
    if importance == "taylor":
        assert losses["bf16"] < losses["none"], losses


def test_calibration_files_are_read_by_their_format(tmp_path):
    """JSON Lines and JSON arrays whatever the suffix's case; records without text are refused, not
    calibrated on their ids."""
    from llm_prune.calibration import read_passages

    (tmp_path / "a.JSONL").write_text('{"text": "first passage", "id": 0}\n{"text": "", "id": 1}\n"second"\n')
    assert read_passages(tmp_path / "a.JSONL") == ["first passage", "second"]
    (tmp_path / "b.json").write_text('[{"text": "one"}, "two"]')
    assert read_passages(tmp_path / "b.json") == ["one", "two"]
    (tmp_path / "c.jsonl").write_text('{"id": 7, "body": "x"}\n')
    with pytest.raises(UserError, match='line 1: no "text" field'):
        read_passages(tmp_path / "c.jsonl")

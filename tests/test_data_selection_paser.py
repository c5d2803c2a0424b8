"""PASER and the baselines end to end on a tiny model pair: the "pruned" model is the tiny model
damaged on purpose, much more on the code topic (its bracket and operator tokens) than elsewhere."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

from data_selection import load_pool, select_records, write_selection
from data_selection.pool import Record
from llm_prune.errors import UserError

CODE_CHARS = set("()[]{}=_<>")
B = 32  # 20% of the 160-record pool
TOPICS = {
    "cooking": ("How long should I {v} {o}{x}?", ["a loaf of bread", "a whole chicken", "pasta", "tomato sauce",
                "salmon fillets", "brown rice", "an omelette", "pears", "lamb chops", "a pizza", "vegetable soup"],
                ["bake", "roast", "boil", "simmer", "grill", "steam", "fry", "poach"],
                ["", " in the oven", " on the stove", " for a dinner party", " at high altitude", " for four people"]),
    "code": ("Write a Python function to {v} {o}{x}.", ["a list of integers", "a dictionary of strings", "a CSV file",
             "a JSON document", "a binary tree", "a linked list", "a matrix", "a set of tuples", "a log file"],
             ["sort", "reverse", "parse", "serialize", "flatten", "validate", "compress", "search"],
             ["", " using recursion", " without imports", " with type hints", " in one line", " efficiently"]),
    "astronomy": ("Explain why {o} {v}{x}.", ["the planet Mars", "the Moon", "a neutron star", "the Andromeda galaxy",
                  "a comet", "Jupiter", "a black hole", "Saturn", "Venus"],
                  ["appears red", "causes tides", "spins so fast", "emits radio waves", "has rings", "is so hot"],
                  ["", " to a child", " in simple terms", " to an astronomer", " using physics", " briefly"]),
    "finance": ("Should I {v} {o}{x}?", ["index funds", "government bonds", "a Roth IRA", "real estate",
                "dividend stocks", "a 401k plan", "gold", "certificates of deposit", "a savings account"],
                ["invest in", "buy", "sell", "rebalance", "move money into"],
                [" for retirement", " this year", " with my bonus", " at age thirty", " before a recession"]),
}


def make_pool(per_topic: int = 40, seed: int = 0) -> tuple[list[Record], list[str]]:
    rng = random.Random(seed)
    records, topics, seen = [], [], set()
    for topic, (template, objects, verbs, extras) in TOPICS.items():
        count = 0
        while count < per_topic:
            o, v, x = rng.choice(objects), rng.choice(verbs), rng.choice(extras)
            prompt = template.format(o=o, v=v, x=x)
            if prompt in seen:
                continue
            seen.add(prompt)
            count += 1
            if topic == "code":
                name = v + "_" + o.split()[-1]
                response = f"def {name}(data):\n    out = [{v}(x) for x in data]\n    return {{'r': out[::-1]}}"
            else:
                response = f"It depends on {o}. Most people {v.split()[0]} it carefully and check twice."
            records.append(Record(prompt, response, f"{topic}:{count}"))
            topics.append(topic)
    return records, topics


def damaged_copy(model_dir, tokenizer):
    """A "pruned" model: an eighth of every MLP's channels zeroed, and the embeddings of code
    punctuation scrambled, so the code topic degrades most."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    g = torch.Generator().manual_seed(1)
    # Sorted: the vocabulary's dict order differs between processes, and so would the scrambling.
    code_ids = sorted(i for tok, i in tokenizer.get_vocab().items() if set(tok) & CODE_CHARS)
    with torch.no_grad():
        for layer in model.model.layers:
            width = layer.mlp.down_proj.weight.shape[1]
            layer.mlp.down_proj.weight[:, torch.randperm(width, generator=g)[: width // 8]] = 0
        emb = model.get_input_embeddings().weight
        emb[code_ids] = torch.randn(len(code_ids), emb.shape[1], generator=g) * emb.std() * 20
    return model


@pytest.fixture(scope="module")
def pair(tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    return (original, tok), (damaged_copy(tiny_llama, tok), tok)


@pytest.fixture(scope="module")
def pool():
    return make_pool()


@pytest.fixture(scope="module")
def paser_full(pool, pair):
    records, _ = pool
    return select_records(records, method="paser", budget=0.2, original=pair[0], pruned=pair[1], seed=0)


def test_clusters_recover_topics(pool, paser_full):
    from sklearn.metrics import adjusted_rand_score

    _, topics = pool
    report = paser_full.report
    assert report["clustering"]["method"] == "eigengap"
    assert report["clustering"]["num_clusters"] == 4
    assert adjusted_rand_score(topics, paser_full.plot.labels) > 0.95


def test_budget_goes_to_the_degraded_topic(pool, paser_full):
    records, topics = pool
    assert len(paser_full.records) == B == paser_full.report["selected"]
    labels = paser_full.plot.labels
    code_cluster = int(np.bincount(labels[[i for i, t in enumerate(topics) if t == "code"]]).argmax())
    clusters = paser_full.report["clusters"]
    cds = [c["cds"] for c in clusters]
    assert int(np.argmax(cds)) == code_cluster
    picked = [c["selected"] for c in clusters]
    assert picked[code_cluster] == max(picked) and picked[code_cluster] > B / 4
    assert sum(c["allocated"] for c in clusters) == B
    chosen_topics = [topics[i] for i in paser_full.indices]
    assert chosen_topics.count("code") == picked[code_cluster]
    # Within a cluster the ranking prefers more degradation per token: the chosen code samples
    # are no less degraded on average than the code cluster as a whole.
    mean_selected = clusters[code_cluster]["mean_jsd_selected"]
    assert mean_selected >= clusters[code_cluster]["cds"] - 1e-9


def test_stratified_sample_mode_scores_less_and_agrees(pool, pair, paser_full):
    records, topics = pool
    sampled = select_records(records, method="paser", budget=0.2, original=pair[0], pruned=pair[1], seed=0,
                             sample_per_cluster=8)
    assert sampled.report["scoring"]["mode"] == "stratified-sample"
    assert sampled.report["scoring"]["scored"] < len(records)
    assert len(sampled.records) == B
    full = [c["allocated"] for c in paser_full.report["clusters"]]
    est = [c["allocated"] for c in sampled.report["clusters"]]
    assert int(np.argmax(full)) == int(np.argmax(est))
    assert sum(abs(a - b) for a, b in zip(full, est)) <= 8


def test_token_budget_caps_the_selection(pool, pair):
    records, _ = pool
    capped = select_records(records, method="paser", budget=37, original=pair[0], pruned=pair[1],
                            num_clusters=4, sample_per_cluster=10, token_budget=600)
    assert 0 < capped.report["tokens_selected"] <= 600 and 0 < len(capped.records) < 37
    assert "token budget" in capped.report["note"]


def test_token_budget_counts_records_as_trained_up_to_the_cutoff(pair):
    """A long record trains on `cutoff_len` tokens only: that is what a token budget counts, for the
    loss method too, which also scores no further than the cutoff."""
    long = [Record(f"Question {i}?", " ".join(["word"] * 400), f"long{i}") for i in range(5)]
    with pytest.raises(UserError, match="fits no record"):
        select_records(long, method="random", budget=5, original=pair[0], token_budget=64)
    cut = select_records(long, method="random", budget=5, original=pair[0], token_budget=64 * 3, cutoff_len=64)
    assert len(cut.records) == 3
    by_loss = select_records(long, method="loss", budget=5, original=pair[0], pruned=pair[1],
                             token_budget=64 * 2, cutoff_len=64)
    assert len(by_loss.records) == 2 and by_loss.report["tokens_selected"] == 128


def test_planted_contradiction_is_rejected(pool, pair):
    records, _ = pool
    facts = [Record(f"What is the capital of {c}?", f"The capital of {c} is {city}.", f"fact:{c}")
             for c, city in [("France", "Paris"), ("Spain", "Madrid"), ("Italy", "Rome"), ("Japan", "Tokyo")]]
    planted = Record("What is the capital of France?", "The capital of France is Lyon.", "fact:planted")
    pool_with = records[:60] + facts + [planted]
    sel = select_records(pool_with, method="paser", budget=1.0, original=pair[0], pruned=pair[1],
                         num_clusters=3, sample_per_cluster=10)
    conflicts = sel.report["conflicts"]
    assert conflicts["rejected"] == 1
    assert conflicts["examples"][0]["source_id"] in ("fact:planted", "fact:France")
    chosen = {r.source_id for r in sel.records}
    assert len(chosen & {"fact:planted", "fact:France"}) == 1
    assert len(sel.records) == len(pool_with) - 1


def test_random_baseline_is_seeded(pool):
    records, _ = pool
    a = select_records(records, method="random", budget=0.1, seed=3)
    b = select_records(records, method="random", budget=0.1, seed=3)
    c = select_records(records, method="random", budget=0.1, seed=4)
    assert a.indices == b.indices and len(a.records) == 16
    assert a.indices != c.indices
    assert len(select_records(records, method="all", budget=0.1).records) == len(records)


def test_loss_baseline_takes_largest_increase(pool, pair):
    records, topics = pool
    sel = select_records(records, method="loss", budget=0.2, original=pair[0], pruned=pair[1])
    assert len(sel.records) == B
    inc = sel.report["loss_increase"]
    assert inc["selected_mean"] > inc["pool_mean"]
    assert sum(topics[i] == "code" for i in sel.indices) > B / 2


def test_write_selection_and_cli(tmp_path, pool, pair, paser_full, capsys):
    from llm_prune.cli import main

    files = write_selection(paser_full, tmp_path / "out")
    lines = (tmp_path / "out" / "selected.jsonl").read_text().splitlines()
    assert len(lines) == B and {"prompt", "response", "source_id"} <= set(json.loads(lines[0]))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["clusters"][0]["examples"] and (tmp_path / "out" / "report.png").stat().st_size > 10_000
    assert files["plot"].endswith("report.png")

    records, _ = pool
    pool_file = tmp_path / "pool.jsonl"
    pool_file.write_text("\n".join(json.dumps({"instruction": r.prompt, "output": r.response}) for r in records)
                         + "\n{broken\n")
    original, pruned = tmp_path / "orig", tmp_path / "pruned"
    pair[0][0].save_pretrained(original)
    pair[0][1].save_pretrained(original)
    pair[1][0].save_pretrained(pruned)
    pair[1][1].save_pretrained(pruned)
    with pytest.raises(SystemExit) as exc:
        main(["select", str(pool_file), "--original", str(original), "--pruned", str(pruned), "--budget", "30",
              "-o", str(tmp_path / "cli"), "--sample-per-cluster", "6", "--json"])
    assert exc.value.code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["selected"] == 30 and out["pool"]["malformed"] == 1
    assert out["pool"]["malformed_examples"][0]["location"] == f"pool.jsonl:{len(records) + 1}"
    assert len((tmp_path / "cli" / "selected.jsonl").read_text().splitlines()) == 30

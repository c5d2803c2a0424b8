"""Progress on a real tiny job: a fraction of estimated work that never decreases, reaches 1 only
when the last stage ends, survives a resume, and an ETA measured from the running stage."""

import json

import pytest

from llm_prune import pipeline
from llm_prune.progress import WorkTracker
from llm_prune.recipe import parse_recipe

TEXT = " ".join(["The quick brown fox jumps over the lazy dog. Paris is the capital of France."] * 200)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("progress")
    pool = root / "pool.jsonl"
    pool.write_text("".join(json.dumps({"instruction": f"Count to {i} in words, please, slowly.", "input": "",
                                        "output": " ".join(["one two three"] * (i % 5 + 3))}) + "\n"
                            for i in range(40)))
    (root / "text.txt").write_text(TEXT)
    return pool, root / "text.txt"


def _recipe(model, pool, text, steps):
    return parse_recipe({
        "model": str(model), "budget": {"ratio": 0.1},
        "pruning": {"calibration": str(text), "calibration_samples": 4, "calibration_seq_len": 32},
        "data": {"pool": str(pool), "selection": "random", "budget": 16},
        "recovery": {"method": "lora", "max_steps": steps, "micro_batch_size": 2, "cutoff_len": 64,
                     "eval_fraction": 0.0},
        "evaluation": {"ppl": str(text), "max_windows": 8, "seq_len": 64}})


class Recorder:
    def __init__(self):
        self.tracker, self.points, self.events = WorkTracker(), [], []

    def __call__(self, event):
        self.events.append(event)
        self.tracker.fold(event)
        self.points.append((event.time, self.tracker.progress, self.tracker.eta_seconds()))


@pytest.fixture
def one_thread():
    """Step times on a busy 2-core machine swing ten-fold when two threads wait on each other; one
    thread keeps the measured throughput a property of the job, as the ETA assumes."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_progress_is_monotone_and_eta_holds_at_midpoint(tiny_llama, inputs, tmp_path, one_thread):
    pool, text = inputs
    rec = Recorder()
    pipeline.run_recipe(_recipe(tiny_llama, pool, text, steps=120), tmp_path / "job", on_event=rec)
    values = [p for _, p, _ in rec.points]
    assert values == sorted(values), "progress went backwards"
    # 1.0 first when the last stage ends (nothing forces it).
    first_full = values.index(1.0)
    assert rec.events[first_full].kind == "stage_end" and rec.events[first_full].stage == "final"
    assert max(v for v in values if v < 1.0) > 0.5  # the bar moves through the job, not just at the end
    # Events keep their hierarchy: every sub-stage event names its pipeline stage.
    assert {e.parent for e in rec.events if e.stage == "train"} == {"recover"}
    assert {e.parent for e in rec.events if e.stage.startswith("ppl@")} == {"baseline", "prune", "final"}

    start, end = rec.points[0][0], rec.points[-1][0]
    midpoint = start + (end - start) / 2
    at, _, eta = [p for p in rec.points if p[0] <= midpoint and p[2] is not None][-1]
    actual = end - at
    assert actual / 2 <= eta <= 2 * actual, (eta, actual)


def test_progress_survives_resume(tiny_llama, inputs, tmp_path, monkeypatch):
    pool, text = inputs
    recipe = _recipe(tiny_llama, pool, text, steps=4)
    out = tmp_path / "job"
    import data_selection

    real = data_selection.select_records
    monkeypatch.setattr(data_selection, "select_records", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("x")))
    first = Recorder()
    with pytest.raises(RuntimeError):
        pipeline.run_recipe(recipe, out, on_event=first)
    reached = first.tracker.progress
    monkeypatch.setattr(data_selection, "select_records", real)
    second = Recorder()
    pipeline.run_recipe(recipe, out, on_event=second)
    plan = next(e for e in second.events if e.kind == "plan")
    assert plan.metrics["done"] == ["baseline", "prune"]
    # The resumed run starts where the first one got to (finished stages count as done).
    assert abs(second.points[0][1] - reached) < 0.02 and second.points[-1][1] == 1.0


def test_closed_bars_leave_the_cursor_at_a_line_start(monkeypatch):
    """An error printed after the bars close (a budget the cut cannot reach) starts its own line,
    not at the column where clearing a lower bar left the cursor."""
    import io
    import sys

    from llm_prune.progress import ProgressEvent, TqdmRenderer

    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    renderer = TqdmRenderer()
    renderer(ProgressEvent("prune", 0, 1, "stage 1/1", kind="stage_start"))
    renderer(ProgressEvent("score", 1, 8, "batch", kind="progress"))
    assert len(renderer._bars) == 2
    renderer.close()
    assert stream.getvalue().endswith("\r") and not renderer._bars

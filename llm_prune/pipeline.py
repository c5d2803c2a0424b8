"""`run_recipe`: the whole job on one machine, one stage after another.

    baseline eval -> prune (recovery between stages) -> select data -> recover -> final eval -> publish

Each stage writes OUT/<stage>/ and a `.done` marker last, so a rerun with the same OUT skips
finished stages and resumes after the last one. Stages report through `on_event`; nothing prints.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any

from llm_prune.errors import UserError
from llm_prune.paths import check_output_dir, make_dir, write_text_atomic
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback
from llm_prune.recipe import Recipe
from llm_prune.workload import adapt_accel_steps, budget_count

STAGES = ("baseline", "pruned", "selection", "recovered", "final")
DONE = ".done"


def _done(path: Path) -> bool:
    """A stage is done when its marker holds what the stage returned. Markers are written atomically;
    one that does not parse (cut off by an older writer, or damaged) leaves the stage to be redone."""
    try:
        return isinstance(json.loads((path / DONE).read_text()), dict)
    except (OSError, ValueError):
        return False


def _mark(path: Path, info: dict) -> None:
    write_text_atomic(path / DONE, json.dumps(info, default=str))


def _read(path: Path) -> dict:
    return json.loads((path / DONE).read_text())


def _fresh(path: Path) -> Path:
    """An unfinished stage restarts from scratch (except recovery, which resumes its checkpoints)."""
    if path.exists() and path.name != "recovered":
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


# Stage directories and the names their events carry.
EVENT_NAMES = {"baseline": "baseline", "pruned": "prune", "selection": "select", "recovered": "recover",
               "final": "final"}


def _stage(name: str, describe: str):
    """A stage method skips when OUT/<name> is done, else starts it afresh, announces it with its
    work (see `llm_prune.workload`), and marks it done with what it returns. Events its code sends
    through `self.on_event` carry the stage as their parent."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(self, *args):
            path = self.out / name
            if _done(path):
                return _read(path)
            _fresh(path)
            stage = EVENT_NAMES[name]
            self.emit(ProgressEvent(stage, kind="stage_start", message=describe.format(r=self.recipe),
                                    metrics={"work": self.work[stage]}))
            self.current = stage
            out = fn(self, path, *args)
            _mark(path, out)
            self.current = None
            self.emit(ProgressEvent(stage, kind="stage_end"))
            return out
        return run
    return wrap


class Job:
    def __init__(self, recipe: Recipe, out_dir: str | Path, on_event: ProgressCallback):
        self.recipe, self.out, self.emit = recipe, Path(out_dir), on_event
        make_dir(self.out)
        self.current: str | None = None
        self.work: dict[str, dict[str, float]] = {}
        self._records: list | None = None

    def on_event(self, event: ProgressEvent) -> None:
        """What the stages' code reports: a sub-stage of the running stage."""
        if event.parent is None and self.current is not None:
            event.parent = self.current
        self.emit(event)

    def event(self, stage: str, kind: str, message: str = "", metrics: dict | None = None) -> None:
        self.emit(ProgressEvent(stage, message=message, metrics=metrics or {}, kind=kind))

    # -- helpers -----------------------------------------------------------------------------
    def load(self, spec: str):
        from llm_prune.models import load_model

        return load_model(spec, device=self.recipe.device, trust_remote_code=self.recipe.trust_remote_code)

    def evaluate(self, stage: str, model, tokenizer) -> dict:
        ev = self.recipe.evaluation
        if not (ev.ppl or ev.tasks or ev.speed):
            from llm_prune.plan import count_params

            return {"params": count_params(model)}
        from llm_prune.evaluate import evaluate_model

        results = evaluate_model(model, tokenizer, ppl_file=ev.ppl, seq_len=ev.seq_len, max_windows=ev.max_windows,
                                 tasks=ev.tasks, limit=ev.limit, speed=ev.speed, on_event=self.on_event)
        self.event(stage, "metric", f"{stage} evaluation", _headline(results))
        return results

    def records(self) -> list:
        if self._records is not None:
            return self._records
        from data_selection import load_pool

        pool = load_pool(self.recipe.data.pool)
        if pool.errors:
            self.event("selection", "warning", f"{len(pool.errors)} malformed records skipped in the pool "
                                               f"(first: {pool.errors[0][0]}: {pool.errors[0][1]})")
        if not pool.records:
            raise UserError(f"recovery pool {self.recipe.data.pool} holds no usable records", param="data.pool")
        self._records = pool.records
        return pool.records

    # -- stages --------------------------------------------------------------------------------
    @_stage("baseline", "evaluating the dense model")
    def baseline(self, path: Path) -> dict:
        model, tok = self.load(self.recipe.model)
        metrics = self.evaluate("baseline", model, tok)
        self.event("baseline", "metric", metrics=_headline(metrics))
        return metrics

    @_stage("pruned", "pruning {r.model}")
    def prune(self, path: Path) -> dict:
        from llm_prune.prune_stage import prune_to_checkpoint

        r = self.recipe
        t0 = time.perf_counter()
        interstage: list[dict] = []
        loaded: list = []  # the tokenizer the recovery between stages needs

        def load(spec: str):
            loaded[:] = self.load(spec)
            return loaded

        between = self._between_stages(lambda: loaded[1], interstage) if r.pruning.stages > 1 else None
        ckpt = prune_to_checkpoint(r, path, on_event=self.on_event, load=load, between_stages=between)
        metrics = self.evaluate("pruned", ckpt.model, ckpt.tokenizer)
        out = {"params_before": ckpt.params_before, "params_after": ckpt.params_after,
               "params_target": ckpt.params_target, "needs_remote_code": ckpt.needs_remote_code,
               "wall_s": time.perf_counter() - t0, "timings": ckpt.timings, "eval": metrics,
               "interstage_recovery": interstage}
        self._fold_eval(path, metrics, "pruned")
        self.event("prune", "metric", metrics={"params": ckpt.params_after, **_headline(metrics)})
        return out

    def _between_stages(self, tokenizer, log: list[dict]):
        """Adapt-Accel: a short recovery run between pruning stages on a seeded sample of the pool;
        each run's metrics are appended to `log`."""
        r = self.recipe
        if r.recovery.method == "none" or not r.data.pool:
            return None
        from recovery import recover

        records = self.records()
        rng = random.Random(r.recovery.seed)
        sample = rng.sample(records, min(len(records), budget_count(r.data.budget, len(records))))
        steps, _ = adapt_accel_steps(r)
        teacher: list = []  # the dense model, loaded once when distillation asks for it

        def between(model, stage: int):
            tok = tokenizer()
            cfg = r.recovery.model_copy(update={"max_steps": steps, "epochs": None, "keep_adapter": False,
                                                "method": "lora" if r.recovery.method == "qlora" else r.recovery.method})
            if cfg.distill_weight > 0 and not teacher:
                teacher.append(self.load(r.model)[0])
            self.event("prune", "metric", f"recovery between stages {stage} and {stage + 1} ({steps} steps)")
            # A hidden folder: nothing of it is published with the checkpoint, and it goes once done.
            work = self.out / "pruned" / f".interstage-{stage}"
            result = recover(model, tok, sample, cfg, work, teacher=teacher[0] if teacher else None,
                             on_event=self.on_event)
            shutil.rmtree(work, ignore_errors=True)
            log.append({"after_stage": stage, **result.metrics})
            return result.model

        return between

    @_stage("selection", "selecting recovery data ({r.data.selection})")
    def select(self, path: Path) -> dict:
        r = self.recipe
        if not r.data.pool or r.recovery.method == "none":
            return {"skipped": True}
        from data_selection import select_records, write_selection

        t0 = time.perf_counter()
        records = self.records()
        needs_models = r.data.selection in ("paser", "loss")
        original = self.load(r.model) if needs_models else None
        pruned = self.load(str(self.out / "pruned")) if needs_models else None
        if pruned is None and r.data.token_budget is not None:  # counting tokens needs the tokenizer alone
            from transformers import AutoTokenizer

            pruned = (None, AutoTokenizer.from_pretrained(self.out / "pruned"))
        sel = select_records(records, original=original, pruned=pruned, on_event=self.on_event,
                             **selection_kwargs(r.data, r.recovery))
        write_selection(sel, path)
        out = {"selected": len(sel.records), "pool": len(records), "method": r.data.selection,
               "wall_s": time.perf_counter() - t0}
        self.event("select", "metric", metrics=out)
        return out

    @_stage("recovered", "recovery training ({r.recovery.method})")
    def recover(self, path: Path) -> dict:
        r = self.recipe
        if r.recovery.method == "none" or not (self.out / "selection" / "selected.jsonl").exists():
            return {"skipped": True}
        from data_selection.pool import load_pool
        from llm_prune.export import export_checkpoint
        from llm_prune.models import source_dtype
        from recovery import recover
        from recovery.recover import CHECKPOINT_DIR

        model, tok = self.load(str(self.out / "pruned"))
        records = load_pool(self.out / "selection" / "selected.jsonl").records
        teacher = self.load(r.model)[0] if r.recovery.distill_weight > 0 else None
        cfg = r.recovery
        if r.pruning.stages > 1 and r.data.pool and cfg.epochs is None:
            cfg = cfg.model_copy(update={"max_steps": adapt_accel_steps(r)[1]})  # the stages before spent theirs
        result = recover(model, tok, records, cfg, path / "work", teacher=teacher, on_event=self.on_event,
                         keep_checkpoints=True)
        export_checkpoint(result.model, tok, path / "checkpoint", dtype=source_dtype(r.model),
                          extra_meta={"recipe": r.model_dump(), "base_model": r.model})
        shutil.rmtree(path / "work" / CHECKPOINT_DIR, ignore_errors=True)  # the training is safely written now
        self.event("recover", "metric", metrics=result.metrics)
        if result.adapter_dir is not None:  # --keep-adapter: say where it went
            return {**result.metrics, "adapter": str(result.adapter_dir)}
        return result.metrics

    @_stage("final", "final evaluation")
    def final(self, path: Path, summary: dict) -> dict:
        from llm_prune.card import as_run, card_license, model_card
        from llm_prune.families import layer_shapes
        from llm_prune.gguf_export import gguf_refusal
        from llm_prune.models import hub_id
        from llm_prune.plan import PrunePlan

        r = self.recipe
        src = self.out / "recovered" / "checkpoint"
        if not (src / "config.json").exists():
            src = self.out / "pruned"
        for f in src.iterdir():
            if f.is_file() and f.name != DONE:
                _link_or_copy(f, path / f.name)
        recovery = summary.get("recovered")
        if src.name == "checkpoint":
            from recovery.recover import ADAPTER_DIR

            _link_or_copy(self.out / "pruned" / "plan.json", path / "plan.json")  # the shapes' plan, as in pruned
            if recovery and recovery.get("adapter"):  # --keep-adapter: published beside the weights it merged into
                shutil.copytree(self.out / "recovered" / "work" / ADAPTER_DIR, path / ADAPTER_DIR, dirs_exist_ok=True,
                                copy_function=lambda a, b: _link_or_copy(Path(a), Path(b)))
                recovery = {**recovery,
                            "adapter": f"{ADAPTER_DIR}/ (for the pruned checkpoint; merged into these weights)"}
        model, tok = self.load(str(path))
        metrics = self.evaluate("final", model, tok) if src.name == "checkpoint" else summary["pruned"]["eval"]
        pr = summary["pruned"]
        card = model_card(base_model=r.model, recipe=r.model_dump(), shapes=layer_shapes(model),
                          params_before=pr["params_before"], params_after=pr["params_after"],
                          needs_remote_code=pr["needs_remote_code"],
                          metrics={"recovery": recovery, "selection": summary.get("selection")},
                          ran=as_run(PrunePlan.load(self.out / "pruned" / "plan.json")),
                          license=card_license(self.out / "pruned" / "README.md"),
                          gguf_refusal=gguf_refusal(model.config, path), base_model_id=hub_id(r.model))
        (path / "README.md").write_text(card)
        self._fold_eval(path, summary["baseline"], "dense")
        self._fold_eval(path, pr["eval"], "pruned")
        if src.name == "checkpoint":
            self._fold_eval(path, metrics, "recovered")
        out = {"eval": metrics, "path": str(path)}
        if r.export.gguf:
            from llm_prune.gguf_export import export_gguf

            self.event("final", "metric", f"writing GGUF ({r.export.gguf})")
            out["gguf"] = export_gguf(path, path / f"model-{r.export.gguf}.gguf", dtype=r.export.gguf, force=True)
        self.event("final", "metric", metrics=_headline(metrics))
        return out

    def _fold_eval(self, path: Path, metrics: dict, name: str) -> None:
        from llm_prune.evaluate import write_eval_results

        write_eval_results(path, metrics, name=name)

    def plan_work(self) -> None:
        """Announce the job's work per stage, and the stages a resumed run finds done."""
        from llm_prune.workload import stage_work

        r = self.recipe
        pool = len(self.records()) if r.data.pool and r.recovery.method != "none" else 0
        if pool and r.data.selection == "paser":  # fail now, not after the model is pruned
            from data_selection.cluster import check_cluster_count

            check_cluster_count(pool, r.data.num_clusters)
        work = stage_work(r, pool)
        self.work = {EVENT_NAMES[s]: phases for s, phases in work.items()}
        done = [EVENT_NAMES[s] for s in finished_stages(self.out)]
        self.emit(ProgressEvent("job", kind="plan", message="work per stage (token forward passes)",
                                metrics={"work": {s: sum(p.values()) for s, p in self.work.items()}, "done": done}))

    def check_resumable(self) -> None:
        """Finished stages are reused only by the recipe that made them: another one (a new model,
        budget, pruning or recovery setting) in the same directory is refused, not silently given
        the old results. Where the job runs (`device`) and its labels (`metadata`) do not count."""
        for name in STAGES:  # the stage would fail on it only after every stage before had run
            if (self.out / name).exists() and not (self.out / name).is_dir():
                raise UserError(f"{self.out / name} is a file, where the {name} stage writes a folder; give another "
                                "--output, or move it", param="output")
        saved = self.out / "recipe.json"
        if not saved.is_file():
            # No run of a recipe wrote here: a stage folder that exists is someone else's (say a
            # `llm-prune prune -o OUT/pruned`), and restarting the stage would delete it.
            theirs = [d for d in STAGES if (self.out / d).is_dir() and any((self.out / d).iterdir())]
            if theirs:
                raise UserError(f"{self.out / theirs[0]} holds files no run of a recipe wrote there, which the "
                                f"{theirs[0]} stage would replace; give an empty or new --output, or move it",
                                param="output")
            return
        if not finished_stages(self.out):
            return
        try:
            old = json.loads(saved.read_text())
        except (OSError, ValueError):
            old = None
        new = json.loads(self.recipe.model_dump_json())
        changed = _differences(old, new) if isinstance(old, dict) else ["recipe.json (unreadable)"]
        changed = [c for c in changed if c.split(".")[0] not in RESUME_IGNORES]
        try:  # the same file name with other content is another recipe too (absent: an older run)
            made_from = json.loads((self.out / INPUTS).read_text())
        except FileNotFoundError:
            made_from = None
        except (OSError, ValueError):
            made_from = "unreadable"
        if made_from is not None and not isinstance(made_from, dict):
            changed.append(f"{INPUTS} (unreadable)")
        elif isinstance(made_from, dict):
            now = input_fingerprints(self.recipe)
            # The same file by another path (a resume from another directory, a relative path made
            # absolute) is the same input; other content under the same path is not.
            changed = [c for c in changed if c not in now or made_from.get(c) != now[c]]
            changed += [f"the content of {k}" for k in sorted(set(made_from) | set(now))
                        if made_from.get(k) != now.get(k) and k not in changed]
        finished = finished_stages(self.out)
        depends = _finished_depend_on(finished, self.recipe)
        # What made the finished stages is unknown when its record cannot be read: not the same recipe.
        conflicts = [c for c in changed if c.endswith("(unreadable)") or depends(c.removeprefix("the content of "))]
        if "recovery.method" in changed and "recovery.method" not in conflicts and "selection" in finished \
                and isinstance(old, dict) and ((old.get("recovery") or {}).get("method") == "none") \
                != (self.recipe.recovery.method == "none"):
            conflicts.append("recovery.method")  # selection ran (or was skipped) for recovery on or off
        if conflicts:
            # A local model is fingerprinted by its files' metadata (input_fingerprints), not content.
            conflicts = [c.replace("the content of model", "the model's files (names, sizes or modification "
                                   "times)") for c in conflicts]
            shown = ", ".join(conflicts[:5]) + (f" and {len(conflicts) - 5} more" if len(conflicts) > 5 else "")
            raise UserError(f"{self.out} holds finished stages of another recipe (differs in {shown}); give another "
                            "--output, or delete it to start over", param="output")
        retrain = [c for c in changed if c.removeprefix("the content of ").startswith(("recovery.", "data."))
                   and c != "recovery.keep_adapter"]  # what is kept at the end, not how it trains
        if retrain and not _done(self.out / "recovered"):
            # Settings only unfinished stages use changed (a lower learning rate after a divergence):
            # the finished stages stay, and recovery's checkpoints of the old settings go.
            shutil.rmtree(self.out / "recovered", ignore_errors=True)

    def run(self) -> dict[str, Any]:
        self.check_resumable()
        for unused in self.recipe.unused_settings():
            self.event("job", "warning", unused)
        write_text_atomic(self.out / "recipe.json", self.recipe.model_dump_json(indent=2))
        write_text_atomic(self.out / INPUTS, json.dumps(input_fingerprints(self.recipe), indent=2))
        self.plan_work()
        summary: dict[str, Any] = {"recipe": self.recipe.model_dump()}
        summary["baseline"] = self.baseline()
        summary["pruned"] = self.prune()
        summary["selection"] = self.select()
        summary["recovered"] = self.recover()
        summary["final"] = self.final(summary)
        summary["checkpoints"] = {"pruned": str(self.out / "pruned"), "final": str(self.out / "final")}
        write_text_atomic(self.out / "summary.json", json.dumps(summary, indent=2, default=str))
        return summary


def run_recipe(recipe: Recipe, out_dir: str | Path, on_event: ProgressCallback = null_callback) -> dict:
    """Run (or resume) the job described by `recipe` in `out_dir`; returns the summary."""
    out_dir = check_output_dir(out_dir)
    recipe.check_files()
    if recipe.data.pool:
        from data_selection.selection import check_output_beside_pool

        check_output_beside_pool(recipe.data.pool, out_dir)  # the job's files would be read as records
    from recovery import check_config

    check_config(recipe.recovery)  # bad recovery settings fail before any heavy work
    from llm_prune.models import load_config, resolve_source

    _check_out_of_model(recipe.model, Path(out_dir))
    try:
        source = resolve_source(recipe.model)
        config = load_config(source)
    except UserError:
        if not recipe.trust_remote_code or recipe.export.gguf:
            raise
        config = None  # a config only the model's own code reads: the stages check it on the model
    if config is not None:
        recipe.check_fits(config)
    if recipe.export.gguf:
        from llm_prune.gguf_export import check_exportable

        check_exportable(config, None if source.gguf_file else source.path)
    if recipe.data.pool is None and recipe.data.selection != "paser" and recipe.recovery.method != "none":
        raise UserError("data.selection given without data.pool", param="data.pool")
    with _only_run(Path(out_dir)):
        return Job(recipe, out_dir, on_event).run()


def _check_out_of_model(model: str, out: Path) -> None:
    """A job folder in a local model's folder changes the model's fingerprint with every file a stage
    writes, so no run could ever resume it (and a stage would write beside the weights)."""
    from llm_prune.models import resolve_source

    try:
        source = resolve_source(model)
    except UserError:
        return  # said by the load that follows
    if source.is_local and not source.gguf_file:
        root = Path(source.path).resolve()
        if out.resolve() == root or out.resolve().is_relative_to(root):
            raise UserError(f"--output {out} is inside the model's folder {source.path}; give a directory outside it",
                            param="output")


RUN_IN_PROGRESS = "run_in_progress"  # the UserError code of a folder another run holds (the job service waits)


@contextlib.contextmanager
def _only_run(out: Path):
    """One run per job folder: a second one would restart the stages the first is writing. The lock
    goes with the process that holds it, so a killed run leaves nothing to clean up."""
    import fcntl

    make_dir(out)
    with open(out / ".lock", "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another `llm-prune run` is working in {out}; wait for it to end, or give another "
                            "--output", param="output", code=RUN_IN_PROGRESS) from None
        yield


def selection_kwargs(data, recovery) -> dict:
    """`select_records` arguments for a recipe's data section; `llm-prune select` uses the same."""
    # Degradation past the training cutoff is never trained on: score and count only what recovery sees.
    kwargs = {"method": data.selection, "budget": data.budget, "token_budget": data.token_budget,
              "num_clusters": data.num_clusters, "embedding_model": data.embedding_model, "seed": recovery.seed,
              "cutoff_len": recovery.cutoff_len}
    if data.selection == "paser":
        kwargs.update(sample_per_cluster=data.sample_per_cluster, conflict_filter=data.conflict_filter)
    return kwargs


INPUTS = "inputs.json"  # fingerprints of the files the recipe names, beside recipe.json


def input_fingerprints(recipe: Recipe) -> dict[str, str]:
    """sha256 of each file the recipe names (a folder: of its files' names, sizes and times; the
    model always so), so a rerun notices a model, pool, evaluation text or calibration text that
    changed under the same name."""
    out = {}
    from llm_prune.models import ALIASES, resolve_source

    # A local model's files, by name, size and time: rebuilt under the same path it is another model.
    # (An alias is a released package; its first load moves it from the GGUF to a cached copy.)
    model = None
    if recipe.model.strip().lower() not in ALIASES:
        try:
            source = resolve_source(recipe.model)
            model = Path(source.path) / source.gguf_file if source.gguf_file else Path(source.path)
        except UserError:
            model = None
    if model is not None and model.exists():
        out["model"] = _stat_digest(model)  # weights of many GB: their names, sizes and times
    for param, value in (("data.pool", recipe.data.pool), ("evaluation.ppl", recipe.evaluation.ppl),
                         ("pruning.calibration", recipe.pruning.calibration)):
        path = Path(value) if value else None
        if path is None or not path.exists():
            continue
        if path.is_dir():
            out[param] = _stat_digest(path)
            continue
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[param] = h.hexdigest()
    return out


def _stat_digest(path: Path) -> str:
    """sha256 of the names, sizes and modification times of a folder's files (or of one file)."""
    h = hashlib.sha256()
    for f in sorted(p for p in ([path] if path.is_file() else path.rglob("*")) if p.is_file()):
        st = f.stat()
        h.update(f"{f.name if f == path else f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


RESUME_IGNORES = ("device", "metadata")  # a retried job may run on another worker's device


def _finished_depend_on(finished: list[str], recipe: Recipe):
    """A predicate on dotted recipe paths: whether a finished stage's result depends on it. A rerun
    may change what only unfinished stages read (recovery's learning rate once selection is done;
    the export settings until the final stage is done)."""
    prefixes = {"model", "trust_remote_code"}
    if "baseline" in finished:
        prefixes |= {"evaluation"}
    if "pruned" in finished:  # (export is the final stage's: a GGUF asked for later is written then)
        prefixes |= {"budget", "pruning", "evaluation"}
        if recipe.pruning.stages > 1:  # Adapt-Accel trains between the stages
            prefixes |= {"recovery", "data"}
    if "selection" in finished:  # what it selects and how it scores (whether it ran: recovery on or off,
        prefixes |= {"data", "recovery.cutoff_len", "recovery.seed"}  # checked by Job.check_resumable)
    if "final" in finished:
        return lambda path: True
    if "recovered" in finished:
        return lambda path: path != "export" and not path.startswith("export.")
    return lambda path: any(path == p or path.startswith(p + ".") for p in prefixes)


def _differences(old: Any, new: Any, where: str = "") -> list[str]:
    """Dotted paths at which two JSON trees differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for k in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(k), new.get(k), f"{where}.{k}" if where else str(k))]
    return [] if old == new else [where or "recipe"]


def finished_stages(out_dir: str | Path) -> list[str]:
    return [s for s in STAGES if _done(Path(out_dir) / s)]


def _headline(results: dict) -> dict:
    out = {}
    if "params" in results:
        out["params"] = results["params"]
    ppl = results.get("ppl")
    if isinstance(ppl, dict) and "ppl" in ppl:
        out[f"ppl@{ppl.get('seq_len', '')}"] = ppl["ppl"]
    if results.get("average") is not None:
        out["task_average"] = results["average"]
    return out


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")


def _link_or_copy(src: Path, dst: Path) -> None:
    """Weights are hard-linked (never written again); every other file is copied, because the
    final stage rewrites the card and the results, which must not change the source's through a link."""
    if src.suffix in WEIGHT_SUFFIXES:
        try:
            os.link(src, dst)
            return
        except OSError:
            pass
    shutil.copy2(src, dst)

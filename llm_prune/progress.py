"""Progress events: every stage reports through a callback; the CLI renders them as tqdm bars,
the service writes them to the job store. No stage prints directly."""

from __future__ import annotations

import sys

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable


@dataclass
class ProgressEvent:
    stage: str  # e.g. "load", "score", "prune", "select", "train", "eval", "export"
    step: int = 0
    total: int | None = None
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    kind: str = "progress"  # progress | stage_start | stage_end | metric | warning | plan
    time: float = field(default_factory=time.time)
    parent: str | None = None  # the pipeline stage a sub-stage event belongs to (job -> stage -> sub-stage)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


def null_callback(event: ProgressEvent) -> None:
    return None


class TqdmRenderer:
    """Renders events as tqdm bars (CLI use). Within a job, one bar per pipeline stage shows the
    stage's share of its declared work, with the running sub-stage in its label; a command that
    runs one stage alone (`prune`, `select`) gets a bar per sub-stage."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self.work = WorkTracker()
        self._bars: dict[str, Any] = {}

    def _bar(self, key: str, total: float | None):
        from tqdm.auto import tqdm

        bar = self._bars.get(key)
        if bar is None:
            fmt = "{desc:<28.28}{percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}" if total == 100 else None
            bar = tqdm(total=total, desc=key, leave=False, dynamic_ncols=True, bar_format=fmt)
            self._bars[key] = bar
        return bar

    def __call__(self, event: ProgressEvent) -> None:
        self.work.fold(event)
        from tqdm.auto import tqdm

        if event.kind == "warning":  # on stderr, with or without bars (--json, --quiet): stdout has the results
            tqdm.write(f"warning: {event.message}", file=sys.stderr)
            return
        if self.disable:
            return
        in_job = event.stage in self.work.plan and event.parent is None
        if in_job and event.kind == "stage_start":
            self._bar(event.stage, 100).set_description_str(event.stage)
            return
        if event.kind == "stage_end" and event.parent is None:
            bar = self._bars.pop(event.stage, None)
            if bar is not None:
                if bar.total is not None:
                    bar.n = bar.total
                bar.close()
            return
        if event.parent is not None and event.parent in self._bars:
            bar = self._bars[event.parent]
            bar.set_description_str(f"{event.parent}: {event.stage}", refresh=False)
            bar.n = round(100 * self.work.stage_fraction(), 1)
        elif event.total is None or in_job or event.kind not in ("progress", "stage_start"):
            return
        else:  # a stage run alone: its sub-stages are the bars
            bar = self._bar(event.stage, event.total)
            if bar.total != event.total:
                bar.total = event.total
            bar.n = event.step
            if event.kind == "stage_end":
                return
        if event.metrics:
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.metrics.items()},
                            refresh=False)
        bar.refresh()

    def close(self) -> None:
        # Innermost first: a lower bar's close moves the cursor up to the line above, mid-line;
        # only the top bar's close returns it to the line's start, where an error may follow.
        for bar in reversed(list(self._bars.values())):
            bar.close()
        self._bars.clear()


class WorkTracker:
    """Job progress as a fraction of estimated work. The pipeline announces the plan (units per
    stage, and the stages already done on a resumed run), each stage declares its phases' units
    when it starts, and sub-stage events (step of total) advance their phase. Each stage owns a
    fixed share of [0, 1] from the plan, so progress never goes back; it is 1 only once the last
    stage has ended. The ETA is the remaining work over the throughput of the current stage."""

    def __init__(self) -> None:
        self.plan: dict[str, float] = {}
        self.done: list[str] = []
        self.stage: str | None = None
        self.phases: dict[str, float] = {}
        self.phase_done: dict[str, float] = {}
        self._last_step: dict[str, float] = {}
        self._units_first = 0.0  # units done at the stage's first sub-stage event (not timed)
        self._stage_t0 = 0.0
        self._first: float | None = None  # first and last sub-stage event of the running stage
        self._last = 0.0
        self._overheads: list[tuple[float, float]] = []  # finished stages: (seconds outside phases, tail)
        self._now = 0.0
        self._rate: float | None = None
        self._progress = 0.0

    def fold(self, event: ProgressEvent) -> None:
        self._now = max(self._now, event.time)
        if event.kind == "plan":
            self.plan = {k: float(v) for k, v in event.metrics.get("work", {}).items()}
            self.done = [s for s in event.metrics.get("done", []) if s in self.plan]
        elif event.parent is None and event.stage in self.plan:
            if event.kind == "stage_start":
                self.stage, self._stage_t0 = event.stage, event.time
                self.phases = {k: float(v) for k, v in event.metrics.get("work", {}).items()}
                self.phase_done, self._last_step, self._first = {}, {}, None
            elif event.kind == "stage_end":
                if event.stage not in self.done:
                    self.done.append(event.stage)
                if self.stage == event.stage:
                    if self._first is None:
                        self._overheads.append((event.time - self._stage_t0, 0.0))
                    else:
                        tail = event.time - self._last
                        self._overheads.append((self._first - self._stage_t0 + tail, tail))
                self.stage = None
        elif event.parent == self.stage and self.stage is not None and event.total:
            self._advance(event)
        self._progress = max(self._progress, self._compute())

    def _advance(self, event: ProgressEvent) -> None:
        phase = next((p for p in self.phases if event.stage.startswith(p)), None)
        if phase is None or not self.phases[phase]:
            return
        first = self._first is None
        if first:
            self._first = event.time
        self._last = event.time
        step = min(event.step / event.total, 1.0)
        last = self._last_step.get(event.stage)
        if last is None or step < last:  # a phase's run starts (scoring, say, runs once per pruning stage)
            last = 0.0
        self._last_step[event.stage] = step
        before = self.phase_done.get(phase, 0.0)
        self.phase_done[phase] = min(self.phases[phase], before + (step - last) * self.phases[phase])
        if first:  # work reported by the first event was done before anything was timed
            self._units_first = sum(self.phase_done.values())
        elapsed = self._last - self._first
        measured = sum(self.phase_done.values()) - self._units_first
        if elapsed > 0 and measured > 0:
            self._rate = measured / elapsed

    def _shares(self) -> dict[str, float]:
        total = sum(self.plan.values())
        floor = max(total, 1.0) * 0.01  # a stage with no measured work (loading, export) still moves the bar
        denom = total + floor * len(self.plan)
        return {s: (u + floor) / denom for s, u in self.plan.items()}

    def stage_fraction(self) -> float:
        total = sum(self.phases.values())
        return sum(self.phase_done.values()) / total if total else 0.0

    def _compute(self) -> float:
        if not self.plan:
            return 0.0
        shares = self._shares()
        value = sum(shares[s] for s in self.done)
        if self.stage is not None and self.stage not in self.done:
            value += shares[self.stage] * self.stage_fraction()
        return 1.0 if len(self.done) == len(self.plan) else min(value, 0.999)

    @property
    def progress(self) -> float:
        return self._progress

    def eta_seconds(self) -> float | None:
        """Seconds left at the time of the last event, or None before any throughput is measured."""
        if self._rate is None or not self.plan:
            return None
        remaining = sum(self.phases.values()) - sum(self.phase_done.values()) if self.stage else 0.0
        future = [s for s in self.plan if s not in self.done and s != self.stage]
        remaining += sum(self.plan[s] for s in future)
        fixed = 0.0
        if self._overheads:
            fixed = len(future) * sum(o for o, _ in self._overheads) / len(self._overheads)
            if self.stage is not None:
                fixed += sum(t for _, t in self._overheads) / len(self._overheads)
        return max(remaining, 0.0) / self._rate + fixed

    def snapshot(self) -> dict[str, Any]:
        eta = self.eta_seconds()
        return {"fraction": round(self.progress, 4), "stage": self.stage,
                "stage_fraction": round(self.stage_fraction(), 4) if self.stage else None,
                "eta_s": round(eta, 1) if eta is not None else None, "at": self._now}

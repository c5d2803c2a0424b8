"""Progress events: every stage reports through a callback; the CLI renders them as tqdm bars,
the service writes them to the job store. No stage prints directly."""

from __future__ import annotations

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
    kind: str = "progress"  # progress | stage_start | stage_end | metric | warning
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[ProgressEvent], None]


def null_callback(event: ProgressEvent) -> None:
    return None


class TqdmRenderer:
    """Renders events as one tqdm bar per stage (CLI use)."""

    def __init__(self, disable: bool = False):
        self.disable = disable
        self._bars: dict[str, Any] = {}

    def __call__(self, event: ProgressEvent) -> None:
        from tqdm.auto import tqdm

        if self.disable:
            return
        if event.kind == "warning":
            tqdm.write(f"warning: {event.message}")
            return
        if event.kind == "stage_end":
            bar = self._bars.pop(event.stage, None)
            if bar is not None:
                if bar.total is not None:
                    bar.n = bar.total
                bar.close()
            return
        if event.total is None and event.kind != "progress":
            return
        bar = self._bars.get(event.stage)
        if bar is None:
            bar = tqdm(total=event.total, desc=event.stage, leave=False, dynamic_ncols=True)
            self._bars[event.stage] = bar
        if event.total is not None and bar.total != event.total:
            bar.total = event.total
        bar.n = event.step
        if event.metrics:
            bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in event.metrics.items()},
                            refresh=False)
        bar.refresh()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()

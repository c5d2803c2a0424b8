"""Speed and size: parameters, bytes on disk, prefill and decode throughput, peak memory.

Prefill is one forward pass over `prompt_len` random tokens per sequence; decode then feeds
`decode_tokens` single tokens through the KV cache (greedy), the loop `generate` runs, without
its sampling machinery. Both are timed after a warm-up pass; on CUDA every timing is bracketed by
`torch.cuda.synchronize()` and peak memory is `max_memory_allocated`, on CPU it is the peak
resident set size of the process sampled while the measurement runs.
"""

from __future__ import annotations

import inspect
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from llm_prune.evaluate.scoring import model_device
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback


@dataclass
class SpeedConfig:
    prompt_len: int = 128
    decode_tokens: int = 32
    batch_sizes: tuple[int, ...] = (1, 8)
    repeats: int = 2  # timed runs per setting; the fastest is reported (least disturbed by other load)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def disk_bytes(checkpoint: str | Path) -> dict:
    """Bytes of the weights the model is loaded from: a .gguf file, or the weight files of a model
    folder, not whatever else in it looks like weights (a GGUF export, an adapter/). A folder's
    `dir_bytes` is everything in it."""
    from llm_prune.models import weight_files

    path = Path(checkpoint)
    if path.is_file():
        return {"weights_bytes": path.stat().st_size}
    files = [p for p in path.rglob("*") if p.is_file()]
    return {"weights_bytes": sum(p.stat().st_size for p in weight_files(path)),
            "dir_bytes": sum(p.stat().st_size for p in files)}


class _PeakRss:
    """Samples the process RSS in a thread (CPU has no allocator peak counter to read). Sparse
    sampling: a thread waking often competes for the GIL with the decode loop's many small ops."""

    def __init__(self, interval: float = 0.05):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = self._proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _vocab_size(model, tokenizer) -> int:
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size or (len(tokenizer) if tokenizer is not None else 256))


def _cache_name(model) -> str:
    """transformers 5.x renamed the KV cache argument and output `past_key_values` to `cache`, and warns
    on the old name; earlier releases know only the old one."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _run_once(model, ids: torch.Tensor, decode_tokens: int, device: torch.device) -> tuple[float, float]:
    name = _cache_name(model)
    _sync(device)
    t0 = time.perf_counter()
    try:  # only the last position's logits are needed to decode, as `generate` does
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    except TypeError:
        out = model(input_ids=ids, use_cache=True)
    _sync(device)
    prefill = time.perf_counter() - t0
    cache = getattr(out, name)
    token = out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(decode_tokens):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache = getattr(out, name)
        token = out.logits[:, -1:].argmax(-1)
    _sync(device)
    return prefill, time.perf_counter() - t0


def measure_speed(model, tokenizer=None, *, checkpoint_dir: str | Path | None = None,
                  config: SpeedConfig | None = None, on_event: ProgressCallback = null_callback) -> dict:
    """Throughput and memory of `model`; every number is positive and finite. `checkpoint_dir`
    (a model folder or a .gguf file) adds its size on disk."""
    config = config or SpeedConfig()
    device = model_device(model)
    model.eval()
    gen = torch.Generator().manual_seed(0)
    vocab = _vocab_size(model, tokenizer)
    result: dict = {"device": str(device), "prompt_len": config.prompt_len, "decode_tokens": config.decode_tokens,
                    "params": count_parameters(model), "config": asdict(config), "runs": []}
    if checkpoint_dir is not None and Path(checkpoint_dir).exists():
        result.update(disk_bytes(checkpoint_dir))
    steps = len(config.batch_sizes)
    on_event(ProgressEvent(stage="speed", step=0, total=steps, kind="stage_start"))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode(), _PeakRss() as rss:
        for i, batch in enumerate(config.batch_sizes):
            ids = torch.randint(0, vocab, (batch, config.prompt_len), generator=gen).to(device)
            _run_once(model, ids, min(4, config.decode_tokens), device)  # warm-up: kernels, allocator
            timings = [_run_once(model, ids, config.decode_tokens, device) for _ in range(max(1, config.repeats))]
            prefill = min(t[0] for t in timings)
            decode = min(t[1] for t in timings)
            result["runs"].append({
                "batch_size": batch,
                "prefill_tokens_per_s": batch * config.prompt_len / prefill,
                "decode_tokens_per_s": batch * config.decode_tokens / decode,
                "prefill_s": prefill, "decode_s": decode,
            })
            on_event(ProgressEvent(stage="speed", step=i + 1, total=steps))
    if device.type == "cuda":
        _sync(device)
        result["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        result["peak_memory_kind"] = "cuda max_memory_allocated"
    else:
        result["peak_memory_bytes"] = int(rss.peak)
        result["peak_memory_kind"] = "process peak RSS"
    on_event(ProgressEvent(stage="speed", step=steps, total=steps, kind="stage_end"))
    return result

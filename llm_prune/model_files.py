"""A model folder's small files, read as untrusted input: config.json, the weight index and the
tokenizer's JSON. Each is read (by llm-prune, or by transformers after `check_file`) only when it
is a regular file, after links are followed, under a size cap: /dev/zero behind a link read until
memory ran out, a FIFO blocked forever. `check_config` then bounds what llm-prune relies on in a
config (positive dimensions of a sane size, head counts that divide, token ids inside the
vocabulary, an activation, RoPE type and dtype transformers knows), so a hostile config is one
`error:` line, or a 400 at submission, before any module is built.

Imports nothing of the project but `errors`: `models`, `export` and the service read through it."""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from llm_prune.errors import UserError, first_line

MIB = 1024 * 1024
# Real configs are a few KB (a pruned 126-layer checkpoint's per_layer_config adds ~15 KB); an index
# names every tensor once (~1-3 MB for the largest released models); tokenizer.json reaches tens of
# MB (a 256k vocabulary with its merges is ~35 MB). Each cap leaves a wide margin over that.
CONFIG_BYTES = 4 * MIB
INDEX_BYTES = 64 * MIB
TOKENIZER_BYTES = 512 * MIB

# The files transformers reads from a model folder besides the weights, with their caps.
SMALL_FILES = {
    "config.json": CONFIG_BYTES, "generation_config.json": CONFIG_BYTES,
    "model.safetensors.index.json": INDEX_BYTES, "pytorch_model.bin.index.json": INDEX_BYTES,
    "tokenizer.json": TOKENIZER_BYTES, "tokenizer_config.json": TOKENIZER_BYTES,
    "special_tokens_map.json": TOKENIZER_BYTES, "added_tokens.json": TOKENIZER_BYTES,
    "vocab.json": TOKENIZER_BYTES, "merges.txt": TOKENIZER_BYTES, "vocab.txt": TOKENIZER_BYTES,
    "tokenizer.model": TOKENIZER_BYTES, "spiece.model": TOKENIZER_BYTES, "chat_template.jinja": TOKENIZER_BYTES,
    "chat_template.json": TOKENIZER_BYTES,
}


def _size(n: int) -> str:
    return f"{n / MIB:.0f} MiB" if n >= MIB else f"{n} bytes"


def check_file(path: str | Path, limit: int) -> Path:
    """`path`, or a one-line UserError unless it is (after links) a regular file of at most `limit`
    bytes. Checked without opening it: opening a FIFO blocks."""
    path = Path(path)
    try:
        st = path.stat()
    except FileNotFoundError:
        link = " (a link to nothing)" if path.is_symlink() else ""
        raise UserError(f"{path} is missing{link}", param="model") from None
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or first_line(exc, 200)}", param="model") from None
    if stat.S_ISDIR(st.st_mode):
        raise UserError(f"{path} is a directory, not a file", param="model")
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{path} is not a regular file (a device, FIFO or socket, or a link to one): a model's "
                        "files are plain files", param="model")
    if st.st_size > limit:
        raise UserError(f"{path} is {_size(st.st_size)}; a file of this kind is at most {_size(limit)}",
                        param="model")
    return path


def check_small_files(folder: str | Path) -> None:
    """`check_file` for each of the folder's small files that transformers may read."""
    folder = Path(folder)
    for name, limit in SMALL_FILES.items():
        if os.path.lexists(folder / name):
            check_file(folder / name, limit)


def read_json(path: str | Path, limit: int = CONFIG_BYTES):
    """The JSON in `path` (checked by `check_file`); every way it cannot be read is one line."""
    path = check_file(path, limit)
    try:
        with open(path, "rb") as fh:  # a file that grew past the cap since it was checked is still cut there
            raw = fh.read(limit + 1)
    except OSError as exc:
        raise UserError(f"could not read {path}: {exc.strerror or first_line(exc, 200)}", param="model") from None
    if len(raw) > limit:
        raise UserError(f"{path} is over {_size(limit)}; a file of this kind is at most that", param="model")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"could not read {path}: {exc}", param="model") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                        param="model") from None
    except RecursionError:
        raise UserError(f"{path} is nested too deeply to be a model's file", param="model") from None
    except ValueError:  # Python refuses to convert an integer of more than 4300 digits
        raise UserError(f"{path} holds a number of thousands of digits, which no model's file has",
                        param="model") from None


def read_config(path: str | Path) -> dict:
    """config.json's object (a one-line error for anything else)."""
    data = read_json(path, CONFIG_BYTES)
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a model config: expected a JSON object, got {type(data).__name__}",
                        param="model")
    return data


# Upper bounds on a config's dimensions. The largest released dense models have ~126 layers
# (Llama 3.1 405B), hidden sizes of 16k-25k, MLP widths up to ~100k, 128 query heads, head sizes
# up to 256, vocabularies of 256k (some ~1M) and contexts of up to ~10M tokens. Each bound is
# several times that, so only a config no model has meets it, while building modules for it
# stays bounded (a layer costs ~40 KB and ~4 ms even on the meta device).
MAX_DIMS = {
    "num_hidden_layers": 1024,
    "hidden_size": 131_072,
    "intermediate_size": 1_048_576,
    "num_attention_heads": 4096,
    "num_key_value_heads": 4096,
    "head_dim": 8192,
    "vocab_size": 8_388_608,
    "max_position_embeddings": 1 << 30,
}
OPTIONAL_DIMS = ("num_key_value_heads", "head_dim")  # null: transformers derives them
# The largest released models have ~2T parameters: a config that adds up to more describes none.
MAX_PARAMS = 20 * 10**12
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
PER_LAYER_KEYS = ("num_attention_heads", "num_key_value_heads", "intermediate_size")


def _shown(value) -> str:
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = type(value).__name__
    return text if len(text) <= 60 else text[:57] + "..."


def _positive_int(value, key: str, where: str, limit: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise UserError(f"{where}: {key} must be a positive integer up to {limit:,}, got {_shown(value)}",
                        param="model")
    return value


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_config(data: dict, where: str, *, head_counts: bool = True) -> None:
    """Refuse, in one line naming `where`, a config (config.json's object, or a loaded config's
    `to_dict()`) that llm-prune or transformers would fail on with a traceback or build without bound.
    `head_counts=False` leaves out whether the head counts divide each other (`check_head_counts`),
    for a caller that lets transformers' own validation speak first."""
    model_type = data.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise UserError(f"{where}: model_type must be a string such as \"llama\", got {_shown(model_type)}",
                        param="model")
    dims = {}
    for key, limit in MAX_DIMS.items():
        if key in data and not (data[key] is None and key in OPTIONAL_DIMS):
            dims[key] = _positive_int(data[key], key, where, limit)
    if head_counts:
        check_head_counts(dims, where)
    params = estimate_params(dims)
    if params > MAX_PARAMS:
        raise UserError(f"{where}: its dimensions add up to ~{params:.2g} parameters; no model is that large "
                        f"(the bound is {MAX_PARAMS:.0e})", param="model")
    vocab = dims.get("vocab_size")
    for key in TOKEN_ID_KEYS:
        value = data.get(key)
        for token in value if isinstance(value, list) else [value]:
            if token is None or (key == "pad_token_id" and token == -1):  # -1: no padding token (old Llama configs)
                continue
            if isinstance(token, bool) or not isinstance(token, int) or token < 0 or (vocab and token >= vocab):
                inside = f" below vocab_size ({vocab})" if vocab else ""
                raise UserError(f"{where}: {key} must be a token id from 0{inside}, got {_shown(value)}",
                                param="model")
    _check_activation(data, where)
    _check_rope(data, where)
    _check_dtype(data, where)
    if "per_layer_config" in data:
        check_per_layer_config(data["per_layer_config"], dims.get("num_hidden_layers"), where)


def check_head_counts(data: dict, where: str) -> None:
    """Query heads in whole groups per KV head, and a head size from the hidden size when no
    head_dim is given (the values are checked to be positive integers first)."""
    heads, kv, hidden = (data.get(k) for k in ("num_attention_heads", "num_key_value_heads", "hidden_size"))
    if isinstance(heads, int) and isinstance(kv, int) and heads > 0 and kv > 0 and heads % kv:
        raise UserError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv})",
                        param="model")
    if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and not data.get("head_dim") \
            and hidden % heads:
        raise UserError(f"{where}: hidden_size ({hidden}) is not a multiple of num_attention_heads ({heads}) and "
                        "no head_dim is given", param="model")


def estimate_params(dims: dict) -> int:
    """The parameter count a Llama-like config describes, from its dimensions alone (defaults
    where one is not given): to refuse an absurd config before anything is built."""
    hidden = dims.get("hidden_size", 4096)
    heads = dims.get("num_attention_heads", 32)
    kv = dims.get("num_key_value_heads") or heads
    hd = dims.get("head_dim") or max(hidden // heads, 1)
    layer = hidden * hd * (2 * heads + 2 * kv) + 3 * hidden * dims.get("intermediate_size", 11008)
    return dims.get("num_hidden_layers", 32) * layer + 2 * dims.get("vocab_size", 32000) * hidden


def _check_activation(data: dict, where: str) -> None:
    act = data.get("hidden_act")
    if act is None:
        return
    from transformers.activations import ACT2FN

    if not isinstance(act, str) or act not in ACT2FN:
        raise UserError(f"{where}: hidden_act {_shown(act)} is not an activation transformers knows (such as "
                        "\"silu\")", param="model")


def _check_rope(data: dict, where: str) -> None:
    if "rope_theta" in data and data["rope_theta"] is not None and not (
            _number(data["rope_theta"]) and data["rope_theta"] > 0):
        raise UserError(f"{where}: rope_theta must be a positive number, got {_shown(data['rope_theta'])}",
                        param="model")
    for key in ("rope_scaling", "rope_parameters"):
        params = data.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise UserError(f"{where}: {key} must be an object, got {_shown(params)}", param="model")
        nested = [p for p in params.values() if isinstance(p, dict)]  # one per attention type (Gemma 3)
        for p in nested or [params]:
            _check_rope_params(p, f"{where}: {key}")


def _check_rope_params(params: dict, where: str) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    kind = params.get("rope_type", params.get("type"))
    if kind is not None and (not isinstance(kind, str) or (kind != "default" and kind not in ROPE_INIT_FUNCTIONS)):
        known = ", ".join(["default", *sorted(ROPE_INIT_FUNCTIONS)])
        raise UserError(f"{where}: rope type {_shown(kind)} is not one transformers knows ({known})", param="model")
    for name, value in params.items():
        if name in ("rope_type", "type") or value is None or isinstance(value, bool):
            continue
        values = value if isinstance(value, list) else [value]
        if not all(_number(v) for v in values):
            raise UserError(f"{where}: {name} must be a number, got {_shown(value)}", param="model")
        if name == "rope_theta" and not value > 0:
            raise UserError(f"{where}: rope_theta must be a positive number, got {_shown(value)}", param="model")


def _check_dtype(data: dict, where: str) -> None:
    import torch

    for key in ("dtype", "torch_dtype"):
        value = data.get(key)
        if value is None or value == "auto":
            continue
        dtype = getattr(torch, value, None) if isinstance(value, str) else value
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise UserError(f"{where}: {key} {_shown(value if isinstance(value, str) else str(value))} is not a "
                            "floating-point torch dtype (such as \"bfloat16\")", param="model")


def check_per_layer_config(per_layer, layers: int | None, where: str) -> None:
    """An llm-prune checkpoint's per-layer widths: {"0": {num_attention_heads, num_key_value_heads,
    intermediate_size}, ...}, one entry per layer, with head counts that divide."""
    if not isinstance(per_layer, dict):
        raise UserError(f"{where}: per_layer_config must be an object of layer index -> widths, got "
                        f"{_shown(per_layer)}; was the file edited?", param="model")
    for index, widths in per_layer.items():
        if not (index.isdigit() and (layers is None or int(index) < layers)):
            raise UserError(f"{where} is inconsistent: per_layer_config names layer {_shown(index)}, not a layer "
                            "index from 0"
                            + (f" to {layers - 1}" if layers else ""), param="model")
        if not isinstance(widths, dict):
            raise UserError(f"{where}: per_layer_config[{index}] must be an object, got {_shown(widths)}",
                            param="model")
        at = f"{where}: per_layer_config[{index}]"
        check_head_counts({k: _positive_int(widths[k], k, at, MAX_DIMS[k]) for k in PER_LAYER_KEYS if k in widths},
                          at)


# What transformers raises, building a model or config from files it cannot make one of.
BUILD_ERRORS = (TypeError, ValueError, KeyError, AttributeError, AssertionError, ZeroDivisionError, ImportError,
                RecursionError, IndexError)


def build_error(spec: str, exc: BaseException) -> UserError:
    return UserError(f"cannot build/load {spec} from its files: {first_line(exc, 300)}", param="model")


def built(spec: str, make):
    """`make()`, a transformers call that builds a model (or config) from MODEL's files, with what
    it raises for files it cannot make one of as one line naming MODEL. Only that call: an error
    of llm-prune's own code keeps its traceback."""
    import pickle

    try:
        return make()
    except pickle.UnpicklingError as exc:  # torch.load(weights_only=True) met more than tensors
        raise UserError(f"could not read model weights in {spec}: a pickled weights file (.bin) holds more than "
                        "tensors, which llm-prune does not load (torch.load with weights_only refused it); convert "
                        "the weights to safetensors", param="model") from None
    except BUILD_ERRORS as exc:
        raise build_error(spec, exc) from None


def check_weight_index(folder: str | Path) -> None:
    """The weight index transformers would read from `folder` (when it prefers one to a single
    weights file), refused in one line where transformers would fail on it with a traceback."""
    folder = Path(folder)
    for single, index in (("model.safetensors", "model.safetensors.index.json"),
                          ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        if os.path.lexists(folder / single):
            return
        if os.path.lexists(folder / index):
            reason = _index_problem(folder / index)
            if reason:
                raise UserError(f"could not read model weights {folder / index}: {reason}", param="model")
            return


def _index_problem(path: Path) -> str | None:
    try:
        data = read_json(path, INDEX_BYTES)
    except UserError as exc:
        return exc.message.replace(f"{path} ", "it ", 1).replace(f"{path}: ", "", 1)
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        return "it has no weight_map object naming each tensor's file (corrupt or incomplete file?)"
    if not isinstance(data.get("metadata"), dict):
        return "it has no metadata object (corrupt or incomplete file?)"
    for name in data["weight_map"].values():
        if not isinstance(name, str) or not name:
            return f"its weight_map names {_shown(name)}, which is no file name"
        if Path(name).anchor or ".." in Path(name).parts:
            return f"its weight_map names {_shown(name)}, outside the model's folder"
    return None
